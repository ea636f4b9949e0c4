//! The Flare node: the simulator, trainers and data, job folders, the libp2p driver and the
//! roles. The binary `flare-node` (built by the `flare-hub` crate, which adds the hub role) is
//! a thin CLI over this library.

pub mod aggregators;
pub mod audit;
pub mod authz;
pub mod bench;
pub mod bench_algorithms;
pub mod bench_client_api;
pub mod bench_dp;
pub mod bench_net;
pub mod bench_secagg;
pub mod cmd_provision;
pub mod dashboard;
pub mod data;
pub mod display;
pub mod filters;
pub mod job;
pub mod job_cli;
pub mod jobpack;
pub mod learner;
pub mod model_io;
pub mod net;
pub mod poc_run;
pub mod roles;
pub mod secagg;
pub mod simulator;
pub mod stats;
pub mod store;
pub mod tracking;

/// The `flare-node` binary for tests and benchmarks that start node processes: `$FLARE_NODE_BIN`
/// when set, else `flare-node` in the cargo target folder of the running executable (a test
/// runs from `target/<profile>/deps/`). The binary is built by the `flare-hub` crate
/// (`cargo build --release -p flare-hub`; `cargo test --workspace` builds it too).
pub fn node_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("FLARE_NODE_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("flare-node")
}
