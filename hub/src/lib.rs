//! Tiered federations: a global federation whose members are regions, each with its own hub
//! and sites.
//!
//! - [`role`]: the hub role that `flare-node --kit <hub>/startup` runs.
//! - [`sim`]: the tiered simulator (`flare-node simulate <job> --regions R -n N`).
//!
//! The tiered workflow itself is sans-IO, in `flare_protocols::workflows::tiered`; this crate
//! drives it. It depends on the node library and nothing depends on it: the `flare-node`
//! binary is built here so that it can run the hub role.

pub mod role;
pub mod sim;
