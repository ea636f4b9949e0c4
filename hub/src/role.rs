//! The hub role: one process that is a client of the tier-1 server upward and the server of
//! its region downward, both over libp2p (no shared file system, no file pipe).
//!
//! - **Upward** it runs the node library's client role (`roles::client::run_with`) on its own
//!   network endpoint, living in the region above (the tier-1 server admits it as a hub of a
//!   region below it). When tier 1 deploys a `TieredScatterAndGather` job, [`HubDeploy`]
//!   derives the region's job and gives the client role a [`RegionLearner`] in place of an
//!   app's learner.
//! - **Downward** it runs the node library's server role (`roles::server::run_with`) for its
//!   region, with its own job store: the derived job is stored there under tier 1's id, the
//!   region's admins see it in their `list`, its scheduler deploys it to the region's sites,
//!   and its scatter-and-gather runner answers each global task (`drive_region`).
//!
//! The derived job is the tier-1 submitter's job, files and signature unchanged, plus a
//! derivation record (`roles::tier::Derivation`) that the hub signs: the original signature's
//! hash and the values it set for the region (its sites in the deploy map, `min_clients`).
//! The region's sites check both signatures before they take it.
//!
//! # Nested hubs
//!
//! Tiers nest: hub `eu.de` is a member of region `eu` (its upward endpoint lives in `eu`, its
//! `server` is hub `eu`), and hub `eu` schedules it like one of its sites. A tier-1 job then
//! comes to `eu.de` with `eu`'s signed step; `eu.de` signs its own step *below* it
//! (`tier::sign_below`: linked to `eu`'s record by hash, carrying it), so that its sites can
//! check every step from tier 1 down (the rule is in `roles::tier`'s module doc). Its deploy
//! map comes from the submitter's own (`region_deploy_map` over global names), and its record
//! sets `num_rounds` to the rounds of `eu` (one task each). Site states go up the same way as
//! one tier: `eu`'s server records `eu.de`'s sites as `eu.de.site-1` and reports them up with
//! its own (`RegionLinks::publish_nested`), so every tier shows a site under one full name.
//!
//! Between the halves, one channel per job carries a global task down and the region's
//! partial back (`roles::tier::RegionLinks`). A task aborted or ended at tier 1 closes it, and
//! the region's job ends too.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use flare_node::job::Job;
use flare_node::learner::{AbortHandle, Learner, LearnerError};
use flare_node::net::protocol::JobBundle;
use flare_node::roles::client::{self, ClientOptions, TieredDeploy};
use flare_node::roles::server::{self, DerivedJob, ServerOptions};
use flare_node::roles::tier::{
    self, Derivation, DerivedChanges, RegionLinks, RegionTask, SignedDerivation,
};
use flare_protocols::model::FLModel;
use flare_protocols::shareable::{ReturnCode, Shareable, Task, TaskResult, task_names};
use flare_protocols::stored::ModelRef;
use flare_provision::config::PeerAddr;
use flare_provision::kit::Kit;
use tokio::sync::{mpsc, oneshot, watch};

/// Runs the hub of the kit in `kit_dir` until `shutdown` turns true: its region's server and
/// its client towards tier 1, in this process (each half gets its own copy of the verified
/// kit, with the endpoint it needs).
pub async fn run(kit_dir: &std::path::Path, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let load = || {
        flare_provision::kit::load_kit(kit_dir, SystemTime::now())
            .with_context(|| format!("startup kit {}", kit_dir.display()))
    };
    let kit = load()?;
    let region = kit
        .cert
        .region
        .clone()
        .with_context(|| format!("{}: a hub's certificate names its region", kit.name()))?;
    let links = RegionLinks::default();
    let (derived_tx, derived_rx) = mpsc::channel(8);
    let deploy = Arc::new(HubDeploy {
        kit: load()?,
        region: region.clone(),
        links: links.clone(),
        derived: derived_tx,
    });

    // Downward: the region's server, reached at the hub's own addresses.
    let mut down = load()?;
    let addrs = if down.config.advertise.is_empty() {
        down.config.listen.clone()
    } else {
        down.config.advertise.clone()
    };
    down.config.server = PeerAddr {
        name: kit.name().to_string(),
        peer_id: kit.cert.peer_id.to_string(),
        addrs,
    };
    down.config.relays.clear();
    let server = server::run_with(
        down,
        shutdown.clone(),
        ServerOptions {
            derived: Some(derived_rx),
            links: Some(links),
        },
    );
    // Upward: a client of tier 1, living in the region above this one.
    let mut up = kit;
    up.config.region = region.rsplit_once('.').map(|(p, _)| p.to_string());
    up.config.listen = Vec::new();
    let client = client::run_with(
        up,
        shutdown,
        ClientOptions {
            tiered: Some(deploy),
        },
    );
    tracing::info!(%region, "hub starting");
    tokio::try_join!(server, client)?;
    Ok(())
}

/// Derives a tiered job for the region and hands back the learner that runs tier 1's tasks.
#[derive(Debug)]
struct HubDeploy {
    kit: Kit,
    region: String,
    links: RegionLinks,
    derived: mpsc::Sender<DerivedJob>,
}

/// The region's part of the submitter's deploy map (names as the submitter's server shows
/// them: `eu`, `eu.site-2`, `eu.de.site-1`), in the names the region's server knows its
/// members by:
/// - `@ALL`, the region itself or a region around it (`eu` for region `eu.de`): `@ALL`;
/// - a name inside the region, `eu.<rest>`: the site `<rest>`, and the hub of the nested
///   region `eu.<first component of rest>` (`eu.de` for `eu.de.site-1` or `eu.de`), should
///   there be one (a hub is named after its region; a site of `eu` literally named `eu.de`
///   would be taken too);
/// - `server`: `server`, on an app that the region takes, so that the region's server runs
///   the submitter's server app;
/// - anything else: nothing.
pub fn region_deploy_map(map: &BTreeMap<String, Vec<String>>, region: &str) -> RegionDeploy {
    let inside = format!("{region}.");
    let mut all = false;
    let mut members: Vec<&str> = Vec::new();
    let mut deploy_map: BTreeMap<String, Vec<String>> = map
        .iter()
        .filter_map(|(app, names)| {
            let mut mine: Vec<String> = Vec::new();
            for n in names {
                if n == "@ALL" || n == region || region.starts_with(&format!("{n}.")) {
                    all = true;
                    mine.push("@ALL".to_string());
                } else if let Some(rest) = n.strip_prefix(&inside) {
                    mine.push(rest.to_string());
                    let first = rest.split('.').next().unwrap_or(rest);
                    members.push(first);
                    mine.push(format!("{inside}{first}"));
                }
            }
            mine.sort();
            mine.dedup();
            (!mine.is_empty()).then(|| (app.clone(), mine))
        })
        .collect();
    // The server's app, where the region takes any and it is not `@ALL` already.
    if let Some((app, _)) = map
        .iter()
        .find(|(_, names)| names.iter().any(|n| n == "server"))
        .filter(|_| !deploy_map.is_empty())
    {
        let names = deploy_map.entry(app.clone()).or_default();
        if !names.iter().any(|n| n == "@ALL") {
            names.push("server".to_string());
        }
    }
    members.sort_unstable();
    members.dedup();
    RegionDeploy {
        deploy_map,
        members: (!all).then_some(members.len()),
    }
}

/// What a region takes of a job's deploy map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDeploy {
    /// The region's deploy map, in its members' names; empty where the job names no site of
    /// the region.
    pub deploy_map: BTreeMap<String, Vec<String>>,
    /// How many of the region's members (sites, or hubs of nested regions) the map names, or
    /// `None` where it takes them all (`@ALL`, the region or a region around it).
    pub members: Option<usize>,
}

impl RegionDeploy {
    /// The region's `min_clients`: the job's, but never more than the members it names.
    pub fn min_clients(&self, asked: usize) -> usize {
        self.members.map_or(asked, |m| asked.min(m)).max(1)
    }
}

impl TieredDeploy for HubDeploy {
    fn learner(
        &self,
        job_id: &str,
        job: &Job,
        bundle: &JobBundle,
        submitter_cert: &[u8],
        derivation: Option<&SignedDerivation>,
    ) -> Result<Box<dyn Learner>, String> {
        // `job` has the changes of the hub above in place (a nested hub's); its tiered
        // arguments count that hub's rounds.
        let args = job
            .server
            .tiered
            .clone()
            .ok_or("not a TieredScatterAndGather job")?;
        let submitter = self
            .kit
            .root_ca
            .verify(submitter_cert, SystemTime::now())
            .map_err(|e| format!("the submitter's certificate: {e}"))?;
        // The region's sites come from the submitter's own deploy map (global names), not
        // from the one the hub above derived for its region.
        let original = Job::load(&job.dir).map_err(|e| format!("the job as submitted: {e}"))?;
        let region = region_deploy_map(&original.meta.deploy_map, &self.region);
        if region.deploy_map.is_empty() {
            return Err(format!(
                "the job's deploy_map names no site of region {}",
                self.region
            ));
        }
        let record = Derivation {
            job_id: job_id.to_string(),
            hub: self.kit.name().to_string(),
            region: self.region.clone(),
            submitter: submitter.name.clone(),
            original_signature_sha256: tier::original_hash(bundle),
            parent_record_sha256: None,
            changes: DerivedChanges {
                min_clients: region.min_clients(args.min_clients),
                deploy_map: region.deploy_map,
                // Below another hub, one task comes per round of that hub's.
                num_rounds: derivation.map(|_| args.num_rounds.saturating_mul(args.local_rounds)),
            },
        };
        // Below another hub's step, this one is linked to it and carries the chain.
        let (key, cert) = (&self.kit.identity.signing, &self.kit.cert.der);
        let signed = match derivation {
            Some(parent) => tier::sign_below(parent, record, key, cert)?,
            None => tier::sign(&record, key, cert)?,
        };
        let link = self.links.open(job_id);
        let (reply, stored) = oneshot::channel();
        self.derived
            .try_send(DerivedJob {
                id: job_id.to_string(),
                bundle: bundle.clone(),
                submitter_cert: submitter_cert.to_vec(),
                derivation: signed,
                reply,
            })
            .map_err(|e| format!("the region's server does not take the job: {e}"))?;
        let refused = Arc::new(Mutex::new(None));
        let r2 = Arc::clone(&refused);
        let id = job_id.to_string();
        tokio::spawn(async move {
            let why = match stored.await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(_) => "the region's server stopped".to_string(),
            };
            tracing::error!(job = %id, error = %why, "the region could not take the job");
            if let Ok(mut r) = r2.lock() {
                *r = Some(why);
            }
        });
        let timeout = args.top_config().task_timeout;
        let link = Arc::new(Mutex::new(Some(link)));
        let l2 = Arc::clone(&link);
        let (stop_tx, stop) = watch::channel(false);
        let abort = AbortHandle::with_hook(Arc::new(move || {
            // Closing the link ends the region's job; a task waiting on the region returns at
            // once, and its dropped answer stops the region's running round.
            if let Ok(mut l) = l2.lock() {
                l.take();
            }
            let _ = stop_tx.send(true);
        }));
        Ok(Box::new(RegionLearner {
            job: job_id.to_string(),
            links: self.links.clone(),
            link,
            refused,
            timeout,
            abort,
            stop,
        }))
    }

    fn region_sites(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.links.sites()
    }
}

/// The hub's learner towards tier 1: each task runs in the region, and its answer is the
/// region's partial (or its validation metrics).
#[derive(Debug)]
struct RegionLearner {
    job: String,
    /// Where the region's runner publishes its sites' states.
    links: RegionLinks,
    link: Arc<Mutex<Option<mpsc::Sender<RegionTask>>>>,
    /// Why the region could not take the job, once known.
    refused: Arc<Mutex<Option<String>>>,
    timeout: Duration,
    abort: AbortHandle,
    /// Turns true when the job is stopped at this hub.
    stop: watch::Receiver<bool>,
}

impl RegionLearner {
    fn run(&self, task: &Task) -> Result<FLModel, String> {
        if let Some(why) = self.refused.lock().ok().and_then(|r| r.clone()) {
            return Err(format!("the region did not take the job: {why}"));
        }
        let model = task
            .data
            .model
            .clone()
            .ok_or("the task carries no global model")?;
        let sender = self
            .link
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .ok_or("the job was stopped at this hub")?;
        let (reply, answer) = oneshot::channel();
        let region_task = RegionTask {
            round: task.round,
            validate: task.name == task_names::VALIDATE,
            model: ModelRef::Memory(model),
            reply,
        };
        let mut stop = self.stop.clone();
        let handle = tokio::runtime::Handle::current();
        handle.block_on(async {
            let ask = tokio::time::timeout(self.timeout, async {
                sender
                    .send(region_task)
                    .await
                    .map_err(|_| "the region's run has ended".to_string())?;
                drop(sender);
                answer
                    .await
                    .map_err(|_| "the region's run ended without an answer".to_string())?
            });
            tokio::select! {
                r = ask => r.map_err(|_| format!("the region gave no answer within {:?}", self.timeout))?,
                _ = stop.wait_for(|s| *s) => Err("the job was stopped at this hub".to_string()),
            }
        })
    }
}

impl Learner for RegionLearner {
    fn train(&mut self, _: &FLModel, _: u32) -> Result<FLModel, LearnerError> {
        Err(LearnerError::Backend(
            "a hub trains through its region".into(),
        ))
    }

    fn validate(&mut self, _: &FLModel) -> Result<BTreeMap<String, f64>, LearnerError> {
        Err(LearnerError::Backend(
            "a hub validates through its region".into(),
        ))
    }

    fn execute_task(&mut self, task: Task) -> TaskResult {
        let data = if self.abort.is_aborted() {
            Shareable::error(ReturnCode::TaskAborted, "the job was stopped at this hub")
        } else {
            match self.run(&task) {
                Ok(m) => Shareable::with_model(m),
                Err(e) => Shareable::error(ReturnCode::ExecutionException, e),
            }
        };
        let mut data = data;
        // The region's sites and their states go up with every answer.
        if let Some(sites) = self.links.sites().remove(&self.job)
            && let Ok(json) = serde_json::to_string(&sites)
        {
            data.headers.insert(
                tier::REGION_SITES_HEADER.to_string(),
                flare_protocols::MetaValue::Text(json),
            );
        }
        TaskResult {
            task_id: task.id,
            round: task.round,
            data,
        }
    }

    fn abort_handle(&self) -> Option<AbortHandle> {
        Some(self.abort.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_takes_the_entries_that_name_it_or_its_sites() {
        let map = BTreeMap::from([
            (
                "app".to_string(),
                vec!["eu.site-2".to_string(), "us".to_string()],
            ),
            ("other".to_string(), vec!["eu".to_string()]),
            ("all".to_string(), vec!["@ALL".to_string()]),
        ]);
        let eu = region_deploy_map(&map, "eu").deploy_map;
        // The site, and the hub of a nested region of that name should there be one.
        assert_eq!(eu["app"], vec!["eu.site-2", "site-2"]);
        assert_eq!(eu["other"], vec!["@ALL"]);
        assert_eq!(eu["all"], vec!["@ALL"]);
        let us = region_deploy_map(&map, "us").deploy_map;
        assert_eq!(us["app"], vec!["@ALL"]);
        assert!(!us.contains_key("other"));
        // `eu-west` is not inside `eu`.
        let map = BTreeMap::from([("app".to_string(), vec!["eu-west.site-1".to_string()])]);
        assert!(region_deploy_map(&map, "eu").deploy_map.is_empty());
    }

    #[test]
    fn a_nested_region_is_reached_through_its_hub_in_the_region_around_it() {
        let map = BTreeMap::from([
            ("a".to_string(), vec!["eu.de.site-1".to_string()]),
            ("b".to_string(), vec!["eu.de".to_string()]),
            ("c".to_string(), vec!["eu".to_string()]),
            ("d".to_string(), vec!["eu.site-1".to_string()]),
        ]);
        // Hub `eu` passes `a` and `b` to the hub of `eu.de`.
        let eu = region_deploy_map(&map, "eu").deploy_map;
        assert!(eu["a"].contains(&"eu.de".to_string()), "{eu:?}");
        assert!(eu["b"].contains(&"eu.de".to_string()), "{eu:?}");
        assert_eq!(eu["c"], vec!["@ALL"]);
        // Hub `eu.de` runs `a` on its site-1, `b` and `c` on all its sites, and not `d`.
        let de = region_deploy_map(&map, "eu.de").deploy_map;
        // (and the hub of a region `eu.de.site-1`, should there be one).
        assert_eq!(de["a"], vec!["eu.de.site-1", "site-1"]);
        assert_eq!(de["b"], vec!["@ALL"]);
        assert_eq!(de["c"], vec!["@ALL"]);
        assert!(!de.contains_key("d"), "{de:?}");
        // `eu.dex` is neither `eu.de` nor inside it.
        let map = BTreeMap::from([("x".to_string(), vec!["eu.dex.site-1".to_string()])]);
        assert!(region_deploy_map(&map, "eu.de").deploy_map.is_empty());
    }

    #[test]
    fn a_region_named_in_part_runs_the_server_app_and_waits_for_only_its_named_sites() {
        let map = BTreeMap::from([
            (
                "app".to_string(),
                vec![
                    "server".to_string(),
                    "us".to_string(),
                    "eu.site-1".to_string(),
                    "eu.site-2".to_string(),
                    "eu.de.site-1".to_string(),
                    "eu.de.site-2".to_string(),
                ],
            ),
            ("other".to_string(), vec!["eu.site-1".to_string()]),
        ]);
        let eu = region_deploy_map(&map, "eu");
        // The region's server runs the server app; the sites named, and hub `eu.de`.
        assert!(
            eu.deploy_map["app"].contains(&"server".to_string()),
            "{eu:?}"
        );
        assert!(!eu.deploy_map["other"].contains(&"server".to_string()));
        assert_eq!(eu.members, Some(3), "site-1, site-2 and eu.de: {eu:?}");
        assert_eq!(eu.min_clients(5), 3);
        assert_eq!(eu.min_clients(2), 2);
        // A whole region: every member, min_clients as asked, `@ALL` serves the server.
        let us = region_deploy_map(&map, "us");
        assert_eq!(us.members, None);
        assert_eq!(us.min_clients(5), 5);
        assert_eq!(us.deploy_map["app"], vec!["@ALL"]);
        // Only the server named: the region takes nothing.
        let map = BTreeMap::from([("app".to_string(), vec!["server".to_string()])]);
        let asia = region_deploy_map(&map, "asia");
        assert!(asia.deploy_map.is_empty(), "{asia:?}");
        assert_eq!(asia.members, Some(0));
    }
}
