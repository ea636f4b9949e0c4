//! The startup kit on disk and its loader: `load_kit` proves the kit (signature against the
//! root CA, certificate chain, keys that match the certificate) before a node may start.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use flare_crypto::cert::pem_to_der;
use flare_crypto::folder::{FolderError, Manifest, Purpose, verify_folder};
use flare_crypto::{
    CertError, Identity, KeyError, ParticipantCert, PeerId, Role, RootCa, SealingSecret,
    SigningSecret,
};

use crate::config::NodeConfig;

/// The node config, in `startup/`.
pub const NODE_CONFIG_FILE: &str = "node.json";
/// The project root CA certificate, in `startup/`.
pub const ROOT_CA_FILE: &str = "rootCA.pem";
/// The participant certificate, in `startup/`.
pub const CERT_FILE: &str = "cert.pem";
/// The participant's Ed25519 key (PKCS#8 PEM, mode 0600), in `startup/`.
pub const KEY_FILE: &str = "key.pem";
/// The participant's x25519 sealing key (PKCS#8 PEM, mode 0600), in `startup/`.
pub const SEALING_KEY_FILE: &str = "sealing_key.pem";
/// The kit signature, in `startup/`.
pub const SIGNATURE_FILE: &str = flare_crypto::folder::SIGNATURE_FILE;
/// Starts a non-admin node in the background, in `startup/`.
pub const START_SCRIPT: &str = "start.sh";
/// Stops it, in `startup/`.
pub const STOP_SCRIPT: &str = "stop.sh";
/// Runs the admin console, in an admin's `startup/`.
pub const ADMIN_SCRIPT: &str = "fl_admin.sh";
/// The largest kit file read into memory (bytes).
const MAX_KIT_FILE: u64 = 1024 * 1024;

/// Why a kit was refused.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// A kit file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A kit file is larger than any valid one.
    #[error("{0}: file too large")]
    TooLarge(PathBuf),
    /// `rootCA.pem` is not a valid, current root CA.
    #[error("rootCA.pem: {0}")]
    RootCa(#[source] CertError),
    /// The kit signature does not verify; the message names the file added, removed or changed.
    #[error("kit signature check failed: {0}")]
    Signature(#[source] FolderError),
    /// `node.json` does not parse.
    #[error("node.json: {field}: {source}")]
    Config {
        /// Where in the file.
        field: String,
        /// The parser's message.
        #[source]
        source: serde_json::Error,
    },
    /// `node.json` has a format version this node does not understand.
    #[error("node.json: unsupported format_version {0}")]
    ConfigVersion(u32),
    /// The participant certificate does not verify.
    #[error("cert.pem: {0}")]
    Cert(#[source] CertError),
    /// A key file is not a valid key.
    #[error("{file}: {source}")]
    Key {
        /// The key file.
        file: &'static str,
        /// The cause.
        #[source]
        source: KeyError,
    },
    /// A key file does not belong to the certificate.
    #[error("{0}: key does not match the certificate")]
    KeyMismatch(&'static str),
    /// `node.json` disagrees with the certificate.
    #[error("node.json: {field} is {config:?} but the certificate says {cert:?}")]
    ConfigMismatch {
        /// The field.
        field: &'static str,
        /// The value in node.json.
        config: String,
        /// The value in the certificate.
        cert: String,
    },
}

/// A proven startup kit.
#[derive(Debug)]
pub struct Kit {
    /// The `startup/` folder.
    pub startup_dir: PathBuf,
    /// The node config.
    pub config: NodeConfig,
    /// The participant's secret keys.
    pub identity: Identity,
    /// The participant's verified certificate.
    pub cert: ParticipantCert,
    /// The PEM text of the certificate, to present to peers.
    pub cert_pem: String,
    /// The project root CA, to verify peers.
    pub root_ca: RootCa,
    /// The signed manifest of `startup/`.
    pub manifest: Manifest,
}

impl Kit {
    /// The participant's name.
    pub fn name(&self) -> &str {
        &self.cert.name
    }
    /// The participant's org.
    pub fn org(&self) -> &str {
        &self.cert.org
    }
    /// The participant's role.
    pub fn role(&self) -> Role {
        self.cert.role
    }
    /// The participant's region (a hub: the region it serves); `None`: tier 1.
    pub fn region(&self) -> Option<&str> {
        self.cert.region.as_deref()
    }
    /// The participant's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.cert.peer_id
    }
    /// The participant's folder (the parent of `startup/`), holding `local/` and `transfer/`.
    pub fn participant_dir(&self) -> Option<&Path> {
        self.startup_dir.parent()
    }
}

fn read_small(path: &Path) -> Result<String, KitError> {
    let io = |source| KitError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.len() > MAX_KIT_FILE {
        return Err(KitError::TooLarge(path.to_path_buf()));
    }
    std::fs::read_to_string(path).map_err(io)
}

/// Proves and loads the kit in `startup_dir` at time `now`.
///
/// Order: the root CA (its own dates), then the kit signature over every file in `startup/`
/// (so nothing else is parsed from a kit that was tampered with), then `node.json`, the
/// certificate chain, and that both keys and `node.json` match the certificate.
pub fn load_kit(startup_dir: &Path, now: SystemTime) -> Result<Kit, KitError> {
    let root_pem = read_small(&startup_dir.join(ROOT_CA_FILE))?;
    let root_ca = RootCa::from_pem(&root_pem, now).map_err(KitError::RootCa)?;
    let manifest = verify_folder(startup_dir, Purpose::Kit, root_ca.public_key())
        .map_err(KitError::Signature)?;

    let config_text = read_small(&startup_dir.join(NODE_CONFIG_FILE))?;
    let de = &mut serde_json::Deserializer::from_str(&config_text);
    let config: NodeConfig =
        serde_path_to_error::deserialize(de).map_err(|e| KitError::Config {
            field: e.path().to_string(),
            source: e.into_inner(),
        })?;
    if config.format_version != crate::config::NODE_CONFIG_VERSION {
        return Err(KitError::ConfigVersion(config.format_version));
    }

    let cert_pem = read_small(&startup_dir.join(CERT_FILE))?;
    let der = pem_to_der(&cert_pem).map_err(KitError::Cert)?;
    let cert = root_ca.verify(&der, now).map_err(KitError::Cert)?;

    let key_pem = zeroize::Zeroizing::new(read_small(&startup_dir.join(KEY_FILE))?);
    let signing = SigningSecret::from_pkcs8_pem(&key_pem).map_err(|source| KitError::Key {
        file: KEY_FILE,
        source,
    })?;
    let public = signing.public().map_err(|source| KitError::Key {
        file: KEY_FILE,
        source,
    })?;
    if public != cert.signing_public {
        return Err(KitError::KeyMismatch(KEY_FILE));
    }
    let seal_pem = zeroize::Zeroizing::new(read_small(&startup_dir.join(SEALING_KEY_FILE))?);
    let sealing = SealingSecret::from_pkcs8_pem(&seal_pem).map_err(|source| KitError::Key {
        file: SEALING_KEY_FILE,
        source,
    })?;
    if sealing.public() != cert.sealing_public {
        return Err(KitError::KeyMismatch(SEALING_KEY_FILE));
    }

    for (field, config_value, cert_value) in [
        ("name", config.name.clone(), cert.name.clone()),
        ("org", config.org.clone(), cert.org.clone()),
        ("role", config.role.to_string(), cert.role.to_string()),
        (
            "region",
            config.region.clone().unwrap_or_default(),
            cert.region.clone().unwrap_or_default(),
        ),
    ] {
        if config_value != cert_value {
            return Err(KitError::ConfigMismatch {
                field,
                config: config_value,
                cert: cert_value,
            });
        }
    }

    Ok(Kit {
        startup_dir: startup_dir.to_path_buf(),
        config,
        identity: Identity { signing, sealing },
        cert,
        cert_pem,
        root_ca,
        manifest,
    })
}
