//! The region side of a tiered job, in the node roles that a hub (`flare-hub`) reuses.
//!
//! A hub takes a `TieredScatterAndGather` job from tier 1 and runs it in its region under the
//! same job id. It does not rewrite the job: the region's sites get the tier-1 submitter's files
//! and signature unchanged, plus a [`Derivation`] record, signed by the hub, that names the
//! original signature's hash and lists every value the hub changed for its region (the
//! deploy map, `min_clients` and the region's rounds). A site accepts a derived job only when
//! both signatures verify, the hub's certificate is its own region's hub, and the record is for
//! this job; a job whose `meta.json` claims to come from a hub (`from_hub_site`, FLARE's flag)
//! without such a record is refused. [`apply`] then puts the changes in place on the loaded job.
//!
//! The region's rounds are asked for by tier 1, one global task at a time: the hub's upward
//! learner sends a [`RegionTask`] down a [`RegionLinks`] channel, and the region server's
//! scatter-and-gather runner (`server/sag.rs` `drive_region`) runs it with the same
//! `ScatterGather` and `RegionRound` machines as the tiered simulator and answers with the
//! region's partial.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use flare_crypto::{RootCa, SigningSecret};
use flare_protocols::model::FLModel;
use flare_protocols::stored::ModelRef;
use serde::{Deserialize, Serialize};
use sha2_free::sha256_hex;
use tokio::sync::{mpsc, oneshot};

use crate::job::Job;
use crate::net::protocol::JobBundle;

/// The domain label a hub's signature over a derivation record starts with.
const DERIVATION_DOMAIN: &[u8] = b"flare/hub-derivation/v1\0";

/// `meta.json` keys that claim a job came through a hub; only a signed [`Derivation`] may.
pub const HUB_FLAGS: &[&str] = &["from_hub_site", "derived_by_hub", "hub"];

/// What a hub changed in a job it runs in its region, and what it derived it from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Derivation {
    /// The job id (the same at every tier).
    pub job_id: String,
    /// The hub that derived it (its certificate's name).
    pub hub: String,
    /// The hub's region.
    pub region: String,
    /// Who submitted the original at tier 1.
    pub submitter: String,
    /// SHA-256 (hex) of the original `signature.json`, which covers every file's hash.
    pub original_signature_sha256: String,
    /// The values the hub set for its region.
    pub changes: DerivedChanges,
}

/// The values a derivation changes: each replaces the original's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DerivedChanges {
    /// `meta.json` `deploy_map`, in the region's own site names.
    pub deploy_map: BTreeMap<String, Vec<String>>,
    /// `meta.json` `min_clients`: the tiered job's `min_clients` within a region.
    pub min_clients: usize,
}

/// A derivation record as it travels: the record's bytes, the hub's signature over them, and
/// the hub's certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedDerivation {
    /// The record, JSON.
    #[serde(with = "serde_bytes")]
    pub record: Vec<u8>,
    /// Ed25519 over the domain label and `record`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
    /// The hub's certificate (DER).
    #[serde(with = "serde_bytes")]
    pub hub_cert: Vec<u8>,
}

/// Why a derived job was refused.
#[derive(Debug, thiserror::Error)]
pub enum DerivationError {
    /// The job claims a hub origin without a signed record.
    #[error("meta.json sets {0:?}, which only a hub's signed derivation record may claim; refused")]
    FlagWithoutRecord(String),
    /// The hub's certificate does not verify, or is not the hub of this region.
    #[error("the derivation's hub certificate is refused: {0}")]
    Hub(String),
    /// The hub's signature does not verify over the record.
    #[error("the hub's signature over the derivation record does not verify")]
    Signature,
    /// The record does not parse.
    #[error("the derivation record is malformed: {0}")]
    Malformed(String),
    /// The record is for another job, or another original.
    #[error("the derivation record does not match the job: {0}")]
    Mismatch(String),
}

fn signing_bytes(record: &[u8]) -> Vec<u8> {
    let mut msg = DERIVATION_DOMAIN.to_vec();
    msg.extend_from_slice(record);
    msg
}

/// The hash a derivation names: SHA-256 of the bundle's signature bytes.
pub fn original_hash(bundle: &JobBundle) -> String {
    sha256_hex(&bundle.signature)
}

/// Signs `record` as the hub whose certificate is `hub_cert`.
pub fn sign(
    record: &Derivation,
    key: &SigningSecret,
    hub_cert: &[u8],
) -> Result<SignedDerivation, String> {
    let bytes = serde_json::to_vec(record).map_err(|e| e.to_string())?;
    let signature = key
        .sign(&signing_bytes(&bytes))
        .map_err(|e| e.to_string())?
        .to_vec();
    Ok(SignedDerivation {
        record: bytes,
        signature,
        hub_cert: hub_cert.to_vec(),
    })
}

/// Checks a derived job at a site of `region` whose server is `server_name`: the hub's
/// certificate chains to the project and is that region's hub, its signature covers the
/// record, and the record names this job and this bundle's original signature. (The
/// submitter's signature over the files is checked by the deploy as for any job.)
pub fn verify(
    signed: &SignedDerivation,
    root: &RootCa,
    region: Option<&str>,
    server_name: &str,
    job_id: &str,
    bundle: &JobBundle,
    now: std::time::SystemTime,
) -> Result<Derivation, DerivationError> {
    let hub = root
        .verify(&signed.hub_cert, now)
        .map_err(|e| DerivationError::Hub(e.to_string()))?;
    if hub.role.kind() != flare_crypto::RoleKind::Hub {
        return Err(DerivationError::Hub(format!(
            "{} is a {}, not a hub",
            hub.name, hub.role
        )));
    }
    if hub.name != server_name || hub.region.as_deref() != region {
        return Err(DerivationError::Hub(format!(
            "{} (region {}) is not the hub of this site's region ({}, served by {server_name})",
            hub.name,
            hub.region.as_deref().unwrap_or("none"),
            region.unwrap_or("none"),
        )));
    }
    if !hub
        .signing_public
        .verify(&signing_bytes(&signed.record), &signed.signature)
    {
        return Err(DerivationError::Signature);
    }
    let record: Derivation = serde_json::from_slice(&signed.record)
        .map_err(|e| DerivationError::Malformed(e.to_string()))?;
    if record.job_id != job_id {
        return Err(DerivationError::Mismatch(format!(
            "it is for job {}, not {job_id}",
            record.job_id
        )));
    }
    if record.hub != hub.name || Some(record.region.as_str()) != hub.region.as_deref() {
        return Err(DerivationError::Mismatch(format!(
            "it names hub {} of region {}, but {} signed it",
            record.hub, record.region, hub.name
        )));
    }
    let original = original_hash(bundle);
    if record.original_signature_sha256 != original {
        return Err(DerivationError::Mismatch(format!(
            "it derives from the original whose signature hashes to {}, this job's hashes to {original}",
            record.original_signature_sha256
        )));
    }
    Ok(record)
}

/// Refuses a job that claims a hub origin in `meta.json` without a verified record.
pub fn refuse_flags(job_dir: &std::path::Path) -> Result<(), DerivationError> {
    let meta = std::fs::read(job_dir.join("meta.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&meta).unwrap_or_default();
    for flag in HUB_FLAGS {
        if v.get(flag).is_some() {
            return Err(DerivationError::FlagWithoutRecord((*flag).to_string()));
        }
    }
    Ok(())
}

/// Puts a derivation's changes in place on a loaded job.
pub fn apply(job: &mut Job, d: &Derivation) {
    job.meta.deploy_map = d.changes.deploy_map.clone();
    job.meta.min_clients = d.changes.min_clients;
    job.meta.mandatory_clients.clear();
    if let Some(args) = &job.server.tiered {
        // The region's own rounds: `local_rounds` per global round.
        job.server.sag.min_clients = args.min_clients.max(1);
        job.server.sag.num_rounds = args.num_rounds.saturating_mul(args.local_rounds);
    }
}

/// One global task for a region: train from `model` in global round `round` (or, with
/// `validate`, measure it), answered on `reply` with the region's partial or validation
/// metrics, or why it has none.
#[derive(Debug)]
pub struct RegionTask {
    /// The global round.
    pub round: u32,
    /// A `validate` task rather than `train`.
    pub validate: bool,
    /// The global model.
    pub model: ModelRef,
    /// The answer.
    pub reply: oneshot::Sender<Result<FLModel, String>>,
}

/// The result header in which a hub's answer names its region's sites and their states (JSON
/// of site → state), for tier 1's record (`region.site`).
pub const REGION_SITES_HEADER: &str = "flare.region_sites";

/// A region's sites and their states, per job.
pub type RegionSites = BTreeMap<String, BTreeMap<String, String>>;

/// The channels between a hub's upward learners and its region server's runners, by job id,
/// and the region's site states that the hub reports up.
#[derive(Debug, Clone, Default)]
pub struct RegionLinks {
    links: Arc<Mutex<HashMap<String, mpsc::Receiver<RegionTask>>>>,
    sites: Arc<Mutex<RegionSites>>,
}

/// Jobs whose site states a hub keeps for its heartbeat.
const MAX_REPORTED_JOBS: usize = 64;

impl RegionLinks {
    /// A new link for `job`: the sender goes to the upward learner, the receiver waits for the
    /// region's runner.
    pub fn open(&self, job: &str) -> mpsc::Sender<RegionTask> {
        let (tx, rx) = mpsc::channel(1);
        if let Ok(mut m) = self.links.lock() {
            m.insert(job.to_string(), rx);
        }
        tx
    }

    /// The runner's end of `job`'s link, once.
    pub fn take(&self, job: &str) -> Option<mpsc::Receiver<RegionTask>> {
        self.links.lock().ok()?.remove(job)
    }

    /// The region runner's latest site states for `job`.
    pub fn publish(&self, job: &str, sites: BTreeMap<String, String>) {
        if let Ok(mut m) = self.sites.lock() {
            if m.len() >= MAX_REPORTED_JOBS && !m.contains_key(job) {
                m.pop_first();
            }
            m.insert(job.to_string(), sites);
        }
    }

    /// Every job's site states.
    pub fn sites(&self) -> RegionSites {
        self.sites.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// SHA-256 without another dependency: ring's digest.
mod sha2_free {
    pub(super) fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
    }
}
