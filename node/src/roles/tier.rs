//! The region side of a tiered job, in the node roles that a hub (`flare-hub`) reuses.
//!
//! A hub takes a `TieredScatterAndGather` job from the tier above and runs it in its region
//! under the same job id. It does not rewrite the job: the region's sites get the submitter's
//! files and signature unchanged, plus a [`Derivation`] record, signed by the hub, that names
//! the original signature's hash and lists every value the hub changed for its region (the
//! deploy map, `min_clients` and the region's rounds). A job whose `meta.json` claims to come
//! from a hub (`from_hub_site`, FLARE's flag) without such a record is refused. [`apply`] then
//! puts the changes in place on the loaded job.
//!
//! # Nesting: the derivation chain
//!
//! Tiers nest: a region's site may itself be a hub (`eu.de`, a member of region `eu`). A job
//! of tier 1 reaches a site of `eu.de` through two hubs, `eu` then `eu.de`, and each signs one
//! step. A [`SignedDerivation`] is the last step (signed by the hub that deploys the job) with
//! the steps above it in `parents`, top first; each record below the top names the SHA-256 of
//! its parent's record bytes (`parent_record_sha256`), so the steps are linked as well as
//! signed. A node checks a deploy with [`check_deploy`]; the rule, for a node whose endpoint
//! lives in region `L` (`None`: tier 1) and a job whose submitter's certificate names region
//! `S` (`None`: an admin of tier 1):
//!
//! - the job must need exactly the hubs strictly below `S` down to `L`, top first (for a
//!   tier-1 job at a site of `eu.de`: `eu`, `eu.de`; at a site of `eu`: `eu`; at a hub's
//!   upward endpoint in `eu`, the member `eu.de`: `eu`). `S` must be `L` or above it. No
//!   hub between them: the job must carry no derivation (an ordinary job of the node's own
//!   region); otherwise exactly one step per hub, neither more nor fewer;
//! - step `k` must be signed by a certificate of the project's CA with role hub and region
//!   exactly the `k`-th of those regions (a hub's certificate is scoped to its region, as in
//!   `flare_crypto::check_region`), and its record must name that hub and region, this job,
//!   this bundle's original signature and the submitter;
//! - the top step names no parent; every other step names its parent's record hash, and the
//!   parent's deploy map must pass the job on to it (an entry `@ALL` or the hub's name);
//! - the last step's hub must be the node's own server (the hub that deployed the job).
//!
//! Old single-step records (no `parents`, no parent hash) are exactly the one-hub chain, so
//! they stay valid for a region directly below the submitter's and are refused, as a chain
//! missing a step, for a nested region.
//!
//! The region's rounds are asked for by the tier above, one task at a time: the hub's upward
//! learner sends a [`RegionTask`] down a [`RegionLinks`] channel, and the region server's
//! scatter-and-gather runner (`server/sag.rs` `drive_region`) runs it with the same
//! `ScatterGather` and `RegionRound` machines as the tiered simulator and answers with the
//! region's partial. A nested hub gets one task per round of the hub above it, so its record
//! sets `num_rounds` to that count ([`DerivedChanges::num_rounds`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use flare_crypto::{ParticipantCert, RootCa, SigningSecret};
use flare_protocols::model::FLModel;
use flare_protocols::stored::ModelRef;
use serde::{Deserialize, Serialize};
use sha2_free::sha256_hex;
use tokio::sync::{mpsc, oneshot};

use crate::job::Job;
use crate::net::protocol::JobBundle;

/// The domain label a hub's signature over a derivation record starts with.
const DERIVATION_DOMAIN: &[u8] = b"flare/hub-derivation/v1\0";

/// The largest derivation record (JSON) a node parses.
pub const MAX_RECORD_BYTES: usize = 256 << 10;

/// The most steps a chain may carry: one per dotted component of the deepest region.
pub const MAX_CHAIN_STEPS: usize = flare_crypto::cert::MAX_REGION_DEPTH;

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
    /// Who submitted the original (its certificate's name).
    pub submitter: String,
    /// SHA-256 (hex) of the original `signature.json`, which covers every file's hash.
    pub original_signature_sha256: String,
    /// SHA-256 (hex) of the record bytes of the step above this one (the parent hub's), for
    /// a hub whose parent region derived the job too; absent for the top step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_record_sha256: Option<String>,
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
    /// The tiered job's `num_rounds` as the region's runner counts its tasks: for a nested
    /// hub, the rounds of the hub above it (each sends it one task), its parent's count times
    /// `local_rounds`; absent for the top step (the submitter's own `num_rounds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_rounds: Option<u32>,
}

/// One signed step of a derivation chain: the record's bytes, the hub's signature over them,
/// and the hub's certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DerivationStep {
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

/// A derivation record as it travels: the last step (the record's bytes, the signature of the
/// hub that deploys the job, its certificate) and the steps of the hubs above it.
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
    /// The steps above this one, top first; empty for a region directly below the submitter's
    /// (and in records of nodes that predate nesting). At most [`MAX_CHAIN_STEPS`] are decoded.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "bounded_steps"
    )]
    pub parents: Vec<DerivationStep>,
}

impl SignedDerivation {
    /// This record as a step, without its parents.
    pub fn step(&self) -> DerivationStep {
        DerivationStep {
            record: self.record.clone(),
            signature: self.signature.clone(),
            hub_cert: self.hub_cert.clone(),
        }
    }

    /// Every step, top first: the parents, then this one.
    pub fn chain(&self) -> Vec<DerivationStep> {
        let mut v = self.parents.clone();
        v.push(self.step());
        v
    }
}

/// Decodes `parents`, refusing more than [`MAX_CHAIN_STEPS`] without reading them.
fn bounded_steps<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<DerivationStep>, D::Error> {
    struct Steps;
    impl<'de> serde::de::Visitor<'de> for Steps {
        type Value = Vec<DerivationStep>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "at most {MAX_CHAIN_STEPS} derivation steps")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(step) = seq.next_element::<DerivationStep>()? {
                if out.len() == MAX_CHAIN_STEPS {
                    return Err(serde::de::Error::custom(format!(
                        "the derivation chain has more than {MAX_CHAIN_STEPS} parent steps"
                    )));
                }
                out.push(step);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Steps)
}

/// Why a derived job was refused.
#[derive(Debug, thiserror::Error)]
pub enum DerivationError {
    /// The job claims a hub origin without a signed record.
    #[error("meta.json sets {0:?}, which only a hub's signed derivation record may claim; refused")]
    FlagWithoutRecord(String),
    /// A step's certificate does not verify, or is not the hub of the step's region.
    #[error("the derivation's hub certificate is refused: {0}")]
    Hub(String),
    /// A step's signature does not verify over its record.
    #[error("the signature over the derivation record does not verify: {0}")]
    Signature(String),
    /// A record does not parse.
    #[error("the derivation record is malformed: {0}")]
    Malformed(String),
    /// A record is for another job, another original or another submitter.
    #[error("the derivation record does not match the job: {0}")]
    Mismatch(String),
    /// The steps are not the chain of hubs from the submitter's region down to the node's: one
    /// missing or extra, unlinked, or a step the hub above did not pass the job to.
    #[error("the derivation chain is refused: {0}")]
    Chain(String),
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

/// The hash a child step names of its parent: SHA-256 of the parent's record bytes.
pub fn record_hash(record: &[u8]) -> String {
    sha256_hex(record)
}

/// Signs `record` as the hub whose certificate is `hub_cert`: a top step, with no parents.
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
        parents: Vec::new(),
    })
}

/// Signs `record` as the step below `parent` (the derivation the hub's own upward endpoint
/// took): the record names the parent's record hash, and the result carries `parent`'s chain.
pub fn sign_below(
    parent: &SignedDerivation,
    mut record: Derivation,
    key: &SigningSecret,
    hub_cert: &[u8],
) -> Result<SignedDerivation, String> {
    if parent.parents.len() + 1 >= MAX_CHAIN_STEPS {
        return Err(format!(
            "a derivation chain has at most {MAX_CHAIN_STEPS} steps"
        ));
    }
    record.parent_record_sha256 = Some(record_hash(&parent.record));
    let mut signed = sign(&record, key, hub_cert)?;
    signed.parents = parent.chain();
    Ok(signed)
}

/// What a node checks a deployed job against: who it is, who submitted the job, and what it
/// was sent.
#[derive(Debug, Clone, Copy)]
pub struct DeployCheck<'a> {
    /// The project's root CA.
    pub root: &'a RootCa,
    /// The region the node's endpoint lives in (`None`: tier 1): a site's own, a hub's
    /// parent region for its upward endpoint.
    pub region: Option<&'a str>,
    /// The name of the node's server: the hub (or tier-1 server) that deployed the job.
    pub server: &'a str,
    /// The submitter's certificate, verified.
    pub submitter: &'a ParticipantCert,
    /// The job id.
    pub job_id: &'a str,
    /// The job as sent.
    pub bundle: &'a JobBundle,
    /// Now, for the certificates' validity.
    pub now: SystemTime,
}

fn region_text(region: Option<&str>) -> String {
    match region {
        Some(r) => format!("region {r}"),
        None => "tier 1".to_string(),
    }
}

/// The regions whose hubs a job of a submitter of region `from` passes through to reach a
/// node living in `to`, top first, or `None` when `to` is not `from` or below it.
fn hubs_between<'a>(from: Option<&str>, to: Option<&'a str>) -> Option<Vec<&'a str>> {
    let Some(to) = to else {
        return from.is_none().then(Vec::new);
    };
    let mut path = Vec::new();
    let mut r = Some(to);
    while let Some(region) = r {
        if Some(region) == from {
            path.reverse();
            return Some(path);
        }
        path.push(region);
        r = flare_crypto::region_parent(region);
    }
    if from.is_none() {
        path.reverse();
        Some(path)
    } else {
        None
    }
}

/// Checks what came with a deployed job (see the module doc for the rule): `Ok(None)` for an
/// ordinary job of the node's own region, `Ok(Some(record))` with the last step's record for
/// a derived job whose whole chain holds.
pub fn check_deploy(
    c: &DeployCheck<'_>,
    derivation: Option<&SignedDerivation>,
) -> Result<Option<Derivation>, DerivationError> {
    let from = c.submitter.region.as_deref();
    let Some(path) = hubs_between(from, c.region) else {
        return Err(DerivationError::Chain(format!(
            "the submitter {} belongs to {}, which is neither this node's {} nor above it",
            c.submitter.name,
            region_text(from),
            region_text(c.region)
        )));
    };
    let Some(signed) = derivation else {
        if path.is_empty() {
            return Ok(None);
        }
        return Err(DerivationError::Chain(format!(
            "a job of {} ({}) reaches {} only through the hubs of {}, and it came without their derivation records",
            c.submitter.name,
            region_text(from),
            region_text(c.region),
            path.join(", ")
        )));
    };
    if signed.parents.len() >= MAX_CHAIN_STEPS {
        return Err(DerivationError::Chain(format!(
            "more than {MAX_CHAIN_STEPS} steps"
        )));
    }
    let steps = signed.chain();
    if steps.len() != path.len() {
        let needed = if path.is_empty() {
            "none (it is a job of this node's own region)".to_string()
        } else {
            format!("one by each hub of {}, top first", path.join(", "))
        };
        return Err(DerivationError::Chain(format!(
            "it has {} step(s); a job of {} ({}) at {} needs {needed}",
            steps.len(),
            c.submitter.name,
            region_text(from),
            region_text(c.region),
        )));
    }
    let original = original_hash(c.bundle);
    let mut above: Option<(&DerivationStep, Derivation)> = None;
    for (k, (step, region)) in steps.iter().zip(&path).enumerate() {
        let (hub, record) = check_step(c, step, region, &original)?;
        match &above {
            None if record.parent_record_sha256.is_some() => {
                return Err(DerivationError::Chain(format!(
                    "the step of region {region} names a parent step, but it is the top one ({} submitted the job in {})",
                    c.submitter.name,
                    region_text(from)
                )));
            }
            None => {}
            Some((parent_step, parent)) => {
                if record.parent_record_sha256.as_deref()
                    != Some(record_hash(&parent_step.record).as_str())
                {
                    return Err(DerivationError::Chain(format!(
                        "the step of region {region} does not name the step of region {} as its parent",
                        parent.region
                    )));
                }
                let passed = parent
                    .changes
                    .deploy_map
                    .values()
                    .flatten()
                    .any(|n| n == "@ALL" || *n == hub.name);
                if !passed {
                    return Err(DerivationError::Chain(format!(
                        "hub {} did not pass the job on to {}: its deploy map names neither {} nor @ALL",
                        parent.hub, hub.name, hub.name
                    )));
                }
            }
        }
        if k + 1 == steps.len() && hub.name != c.server {
            return Err(DerivationError::Hub(format!(
                "{} signed the last step, but this node's server is {}",
                hub.name, c.server
            )));
        }
        above = Some((step, record));
    }
    Ok(above.map(|(_, r)| r))
}

/// One step of a chain, expected from the hub of `region`: its certificate, signature and
/// record (the job, the original, the submitter).
fn check_step(
    c: &DeployCheck<'_>,
    step: &DerivationStep,
    region: &str,
    original: &str,
) -> Result<(ParticipantCert, Derivation), DerivationError> {
    let at = |what: String| format!("the step of region {region}: {what}");
    let hub = c
        .root
        .verify(&step.hub_cert, c.now)
        .map_err(|e| DerivationError::Hub(at(e.to_string())))?;
    if hub.role.kind() != flare_crypto::RoleKind::Hub {
        return Err(DerivationError::Hub(at(format!(
            "{} is a {}, not a hub",
            hub.name, hub.role
        ))));
    }
    if hub.region.as_deref() != Some(region) {
        return Err(DerivationError::Hub(at(format!(
            "{} is the hub of {}, not of region {region}",
            hub.name,
            region_text(hub.region.as_deref())
        ))));
    }
    if !hub
        .signing_public
        .verify(&signing_bytes(&step.record), &step.signature)
    {
        return Err(DerivationError::Signature(at(format!(
            "not signed by {}",
            hub.name
        ))));
    }
    if step.record.len() > MAX_RECORD_BYTES {
        return Err(DerivationError::Malformed(at(format!(
            "{} bytes, at most {MAX_RECORD_BYTES}",
            step.record.len()
        ))));
    }
    let record: Derivation = serde_json::from_slice(&step.record)
        .map_err(|e| DerivationError::Malformed(at(e.to_string())))?;
    if record.job_id != c.job_id {
        return Err(DerivationError::Mismatch(at(format!(
            "it is for job {}, not {}",
            record.job_id, c.job_id
        ))));
    }
    if record.hub != hub.name || record.region != region {
        return Err(DerivationError::Mismatch(at(format!(
            "it names hub {} of region {}, but {} signed it",
            record.hub, record.region, hub.name
        ))));
    }
    if record.original_signature_sha256 != original {
        return Err(DerivationError::Mismatch(at(format!(
            "it derives from the original whose signature hashes to {}, this job's hashes to {original}",
            record.original_signature_sha256
        ))));
    }
    if record.submitter != c.submitter.name {
        return Err(DerivationError::Mismatch(at(format!(
            "it names submitter {}, the job is signed by {}",
            record.submitter, c.submitter.name
        ))));
    }
    Ok((hub, record))
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
    job.set_deploy_map(d.changes.deploy_map.clone());
    job.meta.min_clients = d.changes.min_clients;
    job.meta.mandatory_clients.clear();
    if let Some(args) = &mut job.server.tiered {
        // A nested region's runner counts the rounds of the hub above it.
        if let Some(n) = d.changes.num_rounds {
            args.num_rounds = n;
        }
        // The region's `min_clients`: the hub capped it at the sites the deploy map names.
        args.min_clients = d.changes.min_clients;
        // The region's own rounds: `local_rounds` per task from above.
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
/// and the region's site states that the hub reports up: its own sites' (from its runner) and
/// those the hubs of its nested regions reported (from its server, under their full names).
#[derive(Debug, Clone, Default)]
pub struct RegionLinks {
    links: Arc<Mutex<HashMap<String, mpsc::Receiver<RegionTask>>>>,
    sites: Arc<Mutex<RegionSites>>,
    nested: Arc<Mutex<RegionSites>>,
}

/// Jobs whose site states a hub keeps for its heartbeat.
const MAX_REPORTED_JOBS: usize = 64;
/// Sites of nested regions a hub keeps per job (a server takes at most as many from one hub).
pub const MAX_NESTED_SITES: usize = 1000;

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

    /// The states of `job`'s sites in a nested region, as the region's server records them
    /// from that region's hub (`eu.de.site-1` at hub `eu`): kept beside the runner's own and
    /// reported up with them. New names beyond [`MAX_NESTED_SITES`] are dropped.
    pub fn publish_nested(&self, job: &str, sites: &BTreeMap<String, String>) {
        if let Ok(mut m) = self.nested.lock() {
            if m.len() >= MAX_REPORTED_JOBS && !m.contains_key(job) {
                m.pop_first();
            }
            let mine = m.entry(job.to_string()).or_default();
            for (site, state) in sites {
                if mine.len() < MAX_NESTED_SITES || mine.contains_key(site) {
                    mine.insert(site.clone(), state.clone());
                }
            }
        }
    }

    /// Every job's site states: the runner's own sites, and those of nested regions.
    pub fn sites(&self) -> RegionSites {
        let mut all = self.sites.lock().map(|m| m.clone()).unwrap_or_default();
        if let Ok(nested) = self.nested.lock() {
            for (job, sites) in nested.iter() {
                let mine = all.entry(job.clone()).or_default();
                for (site, state) in sites {
                    mine.entry(site.clone()).or_insert_with(|| state.clone());
                }
            }
        }
        all
    }
}

/// SHA-256 without another dependency: ring's digest.
mod sha2_free {
    pub(super) fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_passes_the_hubs_strictly_below_its_submitter_s_region() {
        assert_eq!(hubs_between(None, None), Some(vec![]));
        assert_eq!(hubs_between(None, Some("eu")), Some(vec!["eu"]));
        assert_eq!(hubs_between(None, Some("eu.de")), Some(vec!["eu", "eu.de"]));
        assert_eq!(hubs_between(Some("eu"), Some("eu.de")), Some(vec!["eu.de"]));
        assert_eq!(hubs_between(Some("eu"), Some("eu")), Some(vec![]));
        // Not from above: a sibling, a region below, or a region's admin at tier 1.
        assert_eq!(hubs_between(Some("us"), Some("eu.de")), None);
        assert_eq!(hubs_between(Some("eu.de"), Some("eu")), None);
        assert_eq!(hubs_between(Some("eu"), None), None);
        // `eu-west` is not inside `eu`.
        assert_eq!(hubs_between(Some("eu"), Some("eu-west.x")), None);
    }

    #[test]
    fn a_hub_reports_its_nested_regions_sites_with_its_own() {
        let links = RegionLinks::default();
        links.publish("job", BTreeMap::from([("site-1".into(), "round 0".into())]));
        let nested = BTreeMap::from([("eu.de.site-1".to_string(), "round 1".to_string())]);
        links.publish_nested("job", &nested);
        // The runner's next publish replaces its own sites, not the nested ones.
        links.publish("job", BTreeMap::from([("eu.de".into(), "round 1".into())]));
        let sites = &links.sites()["job"];
        assert_eq!(sites.len(), 2, "{sites:?}");
        assert_eq!(sites["eu.de.site-1"], "round 1");
        // Bounded: new nested names past the cap are dropped, known ones still change.
        let many: BTreeMap<String, String> = (0..MAX_NESTED_SITES + 10)
            .map(|i| (format!("eu.de.s{i}"), "x".to_string()))
            .collect();
        links.publish_nested("job", &many);
        links.publish_nested(
            "job",
            &BTreeMap::from([("eu.de.site-1".into(), "done".into())]),
        );
        let sites = &links.sites()["job"];
        assert_eq!(sites["eu.de.site-1"], "done");
        assert_eq!(sites.len(), MAX_NESTED_SITES + 1);
    }
}
