//! A client of Flare's Client API (`docs/client-api.md`): the local protocol between a site's
//! `flare-node` and the training program it launches.
//!
//! The node starts the program with a socket path and a token in its environment.
//! [`Client::from_env`] connects and says hello; [`Client::receive`] hands out tasks (`train`,
//! `validate`, `submit_model`) with their model read from the node's safetensors file into a
//! [`Model`]; [`Client::send`] writes the result's model into the exchange folder and waits for
//! the node to take it. Metrics go through [`Client::log`], batched. A thread sends heartbeats;
//! when the node goes away the program's whole process group ends.
//!
//! ```no_run
//! use flare_client::{Client, TaskResult};
//!
//! # fn main() -> Result<(), flare_client::ClientError> {
//! let mut client = Client::from_env()?;
//! while let Some(task) = client.receive()? {
//!     if task.is_validate() {
//!         client.send(task.id, TaskResult::default().metric("accuracy", 0.9))?;
//!         continue;
//!     }
//!     let mut model = task.model.clone().unwrap_or_default();
//!     for tensor in model.tensors.values_mut() {
//!         tensor.map_f32(|w| w * 0.99); // "training"
//!     }
//!     client.log_scalar("loss", 0.25, Some(i64::from(task.round)))?;
//!     client.send(task.id, TaskResult::with_model(model).num_steps(100))?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! [`proto`] holds the messages and their framing; the node uses it too, so both ends share
//! one definition.

mod client;
pub mod model;
pub mod proto;

pub use client::{
    Client, ClientError, Config, NUM_STEPS_CURRENT_ROUND, ParamsType, Task, TaskResult,
};
pub use model::{Model, ModelError, TensorData};
