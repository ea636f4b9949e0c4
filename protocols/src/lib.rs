//! Flare's wire types, their CBOR encoding, aggregators and the sans-IO workflow state machines.
//!
//! This crate is pure: it never touches sockets, files, threads, the clock or the OS random
//! source. Time comes in as an argument ([`time::Time`]), randomness from a seed.

pub mod aggregate;
pub mod aggregators;
pub mod codec;
pub mod dp;
pub mod filters;
pub mod model;
pub mod safetensors_io;
pub mod secagg;
pub mod shareable;
pub mod stats;
pub mod stored;
pub mod time;
pub mod workflows;

pub use model::{DType, FLModel, MetaValue, ModelError, ParamsType, Tensor};
pub use shareable::{ReturnCode, Shareable, Task, TaskId, TaskResult};
