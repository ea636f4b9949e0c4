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
    /// This participant's role (also in the certificate), e.g. `client`, `admin:lead`, `hub`.
    pub role: Role,
    /// The region this participant belongs to (also in the certificate): a hub's is the
    /// region it serves. Absent for the tier-1 server and its direct members. The node's
    /// network endpoint lives in this region and admits peers by
    /// [`flare_crypto::check_region`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Multiaddrs to listen on, e.g. `/ip4/0.0.0.0/tcp/8002`; empty for admins, who only
    /// dial. Port 0 means any free port. A hub listens here for its region (downward).
    pub listen: Vec<String>,
    /// The server to connect to: admins get its admin addresses, others its peer-to-peer
    /// addresses. For the server itself, its own entry. A region's sites and admins get
    /// their hub, and a hub the server of the parent region (upward): the tier-1 server,
    /// or for a nested hub (`eu.de`) the parent hub.
    pub server: PeerAddr,
    /// Relays to fall back to when a direct connection fails, in order of preference; the
    /// server (which runs a circuit relay) is last. Empty for the server and relays. A
    /// region's sites fall back to their hub, which runs its region's relay; a hub has the
    /// relays of a member of the parent region.
    pub relays: Vec<PeerAddr>,
    /// The addresses its region's nodes dial (hubs only, from `host_names`): the confirmed
    /// external addresses of the relay it runs downward. Absent for everyone else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advertise: Vec<String>,
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

/// `local/authorization.json`: which admin roles may do what on this site, FLARE's
/// `authorization.json.default` (the node's `authz` module reads it; its doc has the rules).
pub fn default_authorization() -> serde_json::Value {
    serde_json::json!({
        "format_version": "1.0",
        "permissions": {
            "project_admin": "any",
            "org_admin": {
                "submit_job": "none",
                "clone_job": "none",
                "manage_job": "o:submitter",
                "download_job": "o:submitter",
                "view": "any",
                "operate": "o:site",
                "shell_commands": "o:site",
                "byoc": "none"
            },
            "lead": {
                "submit_job": "any",
                "clone_job": "n:submitter",
                "manage_job": "n:submitter",
                "download_job": "n:submitter",
                "view": "any",
                "operate": "o:site",
                "shell_commands": "o:site",
                "byoc": "any"
            },
            "member": { "view": "any" }
        }
    })
}

/// The file name of the sample privacy policy: as in FLARE, a kit has no `privacy.json` (no
/// privacy control) until the site copies the sample, or writes its own.
pub const PRIVACY_SAMPLE: &str = "privacy.json.sample";

/// `local/privacy.json.sample`: privacy scopes and the filters each applies (FLARE's format;
/// a job picks a scope with `scope` in `meta.json`).
pub fn default_privacy() -> serde_json::Value {
    serde_json::json!({
        "scopes": [
            {
                "name": "public",
                "properties": {},
                "task_result_filters": [
                    {
                        "path": "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
                        "args": { "percentile": 10, "gamma": 0.01 }
                    }
                ],
                "task_data_filters": []
            },
            {
                "name": "private",
                "properties": {},
                "task_result_filters": [
                    {
                        "path": "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
                        "args": { "percentile": 10, "gamma": 0.01 }
                    },
                    {
                        "path": "nvflare.app_common.filters.exclude_vars.ExcludeVars",
                        "args": { "exclude_vars": "^fc2\\." }
                    }
                ],
                "task_data_filters": []
            }
        ],
        "default_scope": "public"
    })
}

/// `local/resources.json`: what a site lends jobs (`num_of_gpus` or a `gpus` list,
/// `mem_per_gpu_in_GiB`, `max_concurrent_jobs`) and how many jobs a server runs at once
/// (`max_jobs`); a hub's holds both.
pub fn default_resources(server: bool, site: bool) -> serde_json::Value {
    let mut v = serde_json::json!({ "format_version": 1 });
    if server {
        v["max_jobs"] = 4.into();
    }
    if site {
        v["num_of_gpus"] = 0.into();
        v["mem_per_gpu_in_GiB"] = 0.into();
        v["max_concurrent_jobs"] = 4.into();
    }
    v
}
