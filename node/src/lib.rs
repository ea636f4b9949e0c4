//! The Flare node.
