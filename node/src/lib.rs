//! The Flare node: the simulator, trainers and data, job folders, and (in later modules) the
//! libp2p driver and roles. The binary `flare-node` is a thin CLI over this library.

pub mod bench;
pub mod bench_client_api;
pub mod bench_net;
pub mod cmd_provision;
pub mod data;
pub mod filters;
pub mod job;
pub mod jobpack;
pub mod learner;
pub mod model_io;
pub mod net;
pub mod poc_run;
pub mod roles;
pub mod simulator;
pub mod store;
