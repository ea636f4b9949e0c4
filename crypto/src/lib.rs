//! Flare cryptography: participant identities, the project CA and certificates, folder
//! signatures for kits and jobs, and sealed peer-to-peer messages.
//!
//! Pure: this crate never reads the clock or the OS random source. Every function that needs
//! the time takes `now`, and every function that needs randomness takes a
//! `&dyn ring::rand::SecureRandom`. Folder signatures read files (that is their job); writing
//! key files with safe permissions is left to `flare-provision`.

pub mod cert;
pub mod folder;
pub mod identity;
pub mod oid;
pub mod seal;
pub mod secagg;

pub use cert::{
    AdminRole, CaParams, CertError, CertificateAuthority, IssuedCert, ParticipantCert,
    ParticipantCertParams, Role, RoleKind, RootCa, check_region, check_region_name, region_parent,
};
pub use identity::{
    Identity, KeyError, SealingPublicKey, SealingSecret, SigningPublicKey, SigningSecret,
};
pub use libp2p_identity::PeerId;
