//! The Flare node.

pub mod cmd_provision;
