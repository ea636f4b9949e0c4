//! Flare provisioning.
