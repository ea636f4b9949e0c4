//! Flare provisioning: `project.yml` → signed startup kits, the kit loader the node uses,
//! and POC workspaces.

pub mod project;
