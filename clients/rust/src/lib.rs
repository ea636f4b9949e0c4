//! A client of Flare's Client API (`docs/client-api.md`): the local protocol between a site's
//! `flare-node` and the training program it launches.
//!
//! [`proto`] holds the messages and their framing; the node uses it too, so both ends share
//! one definition.

pub mod proto;
