//! Local data sets: reading MNIST's IDX files, deterministic train/held-out splits,
//! partitions of the training part across sites and the per-site label histograms of a
//! partition.

pub mod histogram;
pub mod mnist;
pub mod partition;

pub use histogram::{LabelHistograms, label_histogram, site_histograms};
pub use mnist::{Dataset, MnistError};
pub use partition::{DIRICHLET_MAX_DRAWS, DIRICHLET_MIN_SITE_SIZE, Partition, PartitionError};
