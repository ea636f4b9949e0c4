//! Flare provisioning: `project.yml` → signed startup kits, the kit loader the node uses,
//! and POC workspaces.
//!
//! Layout of one run: `workspace/<project>/prod_NN/<participant>/{startup,local,transfer}`,
//! `<participant>.zip` and `docker-compose.yml` beside them, and the root CA in
//! `workspace/<project>/state/`. In a tiered federation each region has a folder
//! `prod_NN/<region>/` with its hub's kit (`<region>/<region>/`: a hub is named after its
//! region) and its sites' and admins' kits and zips (`<region>/<name>/`); see
//! [`project::Participant::kit_dir`]. See [`kit`] for the files of a kit and [`kit::load_kit`] for
//! how a node proves it.

pub mod builder;
pub mod config;
pub mod kit;
pub mod poc;
pub mod project;

pub use builder::{ProvisionError, ProvisionOutput, provision, provision_now};
pub use config::{NodeConfig, PeerAddr};
pub use kit::{Kit, KitError, load_kit};
pub use project::{Project, ProjectError};
