//! The node config file of a kit (`startup/node.json`) and the site policy defaults in
//! `local/`. The node reads these; provisioning writes them.

use flare_crypto::Role;
use serde::{Deserialize, Serialize};

/// The current `format_version` of `node.json`.
pub const NODE_CONFIG_VERSION: u32 = 1;

/// `startup/node.json`: everything a node needs to join the federation, besides its keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Format version, so a node refuses a kit it does not understand.
    pub format_version: u32,
    /// The project name; peers from another project are not admitted.
    pub project: String,
    /// This participant's name (also the certificate CN).
    pub name: String,
    /// This participant's org (also the certificate O).
    pub org: String,
    /// This participant's role (also in the certificate), e.g. `client`, `admin:lead`.
    pub role: Role,
    /// Multiaddrs to listen on, e.g. `/ip4/0.0.0.0/tcp/8002`; empty for admins, who only
    /// dial. Port 0 means any free port.
    pub listen: Vec<String>,
    /// The server to connect to: admins get its admin addresses, others its peer-to-peer
    /// addresses. For the server itself, its own entry.
    pub server: PeerAddr,
    /// Relays to fall back to when a direct connection fails, in order of preference; the
    /// server (which runs a circuit relay) is last. Empty for the server and relays.
    pub relays: Vec<PeerAddr>,
}

/// Where to reach a peer known at provisioning time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAddr {
    /// Its participant name.
    pub name: String,
    /// Its libp2p PeerId (base58), so a dial checks who answers.
    pub peer_id: String,
    /// Its multiaddrs without the `/p2p/` suffix, e.g. `/ip4/127.0.0.1/tcp/8002`, preferred
    /// first.
    pub addrs: Vec<String>,
}

/// `local/authorization.json`: which admin roles may do what on this site (FLARE-style).
pub fn default_authorization() -> serde_json::Value {
    serde_json::json!({
        "format_version": 1,
        "permissions": {
            "project_admin": "any",
            "org_admin": {
                "submit_job": "none",
                "manage_job": "o:submitter",
                "download_job": "o:submitter",
                "view": "any",
                "operate": "o:site",
                "shell_commands": "o:site"
            },
            "lead": {
                "submit_job": "any",
                "manage_job": "n:submitter",
                "download_job": "n:submitter",
                "view": "any",
                "operate": "o:site",
                "shell_commands": "none"
            },
            "member": {
                "view": "any"
            }
        },
        "allow_custom_code": true
    })
}

/// `local/privacy.json`: privacy scopes and the filters each applies (FLARE-style).
pub fn default_privacy() -> serde_json::Value {
    serde_json::json!({
        "format_version": 1,
        "default_scope": "public",
        "scopes": [
            { "name": "public", "task_result_filters": [], "task_data_filters": [] },
            { "name": "private", "task_result_filters": [
                { "name": "exclude_vars", "args": { "exclude_vars": [] } }
            ], "task_data_filters": [] }
        ]
    })
}

/// `local/resources.json`: what this site offers to jobs.
pub fn default_resources() -> serde_json::Value {
    serde_json::json!({
        "format_version": 1,
        "num_of_gpus": 0,
        "mem_per_gpu_in_GiB": 0,
        "max_concurrent_jobs": 1
    })
}
