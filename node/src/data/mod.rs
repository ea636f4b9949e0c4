//! Local data sets: reading MNIST's IDX files, deterministic train/held-out splits and
//! partitions of the training part across sites.

pub mod mnist;
pub mod partition;

pub use mnist::{Dataset, MnistError};
pub use partition::{Partition, PartitionError};
