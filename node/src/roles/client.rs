//! A client site: connects to the server (and reserves a relay slot there), accepts deployed
//! jobs its local policy allows, runs their tasks on its learner, and streams results back
//! sealed to the server.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use flare_crypto::RoleKind;
use flare_protocols::aggregators::Aggregator;
use flare_protocols::shareable::{Shareable, Task, TaskId};
use flare_provision::kit::Kit;
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, watch};

use super::workflow::{self, Inbound};
use crate::job::{CSE_WIRE_NAME, SWARM_WIRE_NAME, WorkflowSpec};
use crate::net::protocol::{EvaluationStage, PeerEntry};
use flare_protocols::stored::ModelRef;
use flare_protocols::workflows::ccwf::{Input, ModelSlot};
use flare_protocols::workflows::cse::{CseClient, CseMsg};
use flare_protocols::workflows::cyclic::{CyclicClient, CyclicMsg};
use flare_protocols::workflows::swarm::{SwarmClient, SwarmMsg};

use super::policy::SitePolicy;
use super::resources::{Ledger, ResourceAsk, Shortfall};
use crate::audit::{Actor, AuditEntry, AuditKind, AuditLog, Decision as AuditDecision};

/// A deployed job's filter chains (see [`JobSlot`]).
struct SlotFilters {
    both: FilterChains,
    peer: FilterChains,
    own_result: FilterChains,
}

impl SlotFilters {
    /// A job's own filters, with no privacy scope.
    fn job(f: FilterChains) -> SlotFilters {
        SlotFilters {
            both: f.clone(),
            peer: f,
            own_result: FilterChains::default(),
        }
    }
}

/// The audit log's actor for a certificate.
fn cert_actor(c: &flare_crypto::ParticipantCert) -> Actor {
    Actor {
        name: c.name.clone(),
        org: c.org.clone(),
        role: match c.role {
            flare_crypto::Role::Admin(r) => r.as_str().to_string(),
            other => other.to_string(),
        },
    }
}
use super::{connect, peer_addrs, start_net};
use crate::filters::FilterChains;
use crate::job::{Job, LearnerSite};
use crate::learner::{AbortHandle, Learner, execute};
use crate::model_io::Spool;
use crate::net::bulk::{self, Route, Sealing, TransferMeta};
use crate::net::protocol::{BULK_PROTOCOL, ControlRequest, ControlResponse};
use crate::net::{NetEvent, NetHandle, PeerInfo};

/// Largest model a site accepts in one task.
pub const MAX_TASK_MODEL: u64 = 16 << 30;

struct JobSlot {
    learner: Arc<Mutex<Box<dyn Learner>>>,
    /// Interrupts the learner's running task when the job is stopped here.
    abort: Option<AbortHandle>,
    round: u32,
    /// A client-controlled workflow's task.
    workflow: Option<WorkflowTask>,
    /// The app's filters on scatter-and-gather tasks coming in and results going out, the
    /// site's privacy scope first.
    filters: Arc<FilterChains>,
    /// Between sites (client-controlled workflows): the job's filters on every model sent and
    /// received, the scope's data filters first on those received. The scope's result
    /// filters run once, on the site's own training result (`own_result`), so they apply
    /// whether it goes to a peer or into the site's own aggregate.
    peer_filters: Arc<FilterChains>,
    /// The privacy scope's result filters alone.
    own_result: Arc<FilterChains>,
    /// The job's submitter, whom the site's `manage_job` rule compares an admin with.
    submitter: Option<flare_crypto::ParticipantCert>,
    /// The job's metrics on their way to the server (none when its tracking is off).
    metrics: Option<MetricsLink>,
    /// The site's secure-aggregation round of this job.
    secagg: Arc<crate::secagg::SiteSecAgg>,
}

/// A job's metric queue and its sender's stop switch, thrown when the slot goes.
struct MetricsLink {
    queue: Arc<crate::tracking::MetricQueue>,
    stop: watch::Sender<bool>,
}

impl Drop for MetricsLink {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// How long a site waits for its learner's metrics to be acknowledged before it sends a
/// result anyway (the server away: the result's own delivery waits too).
const METRICS_FLUSH: Duration = Duration::from_secs(10);

/// A running client-controlled workflow of a job: the training workflow, then (if the job has
/// one) its cross-site evaluation.
struct WorkflowTask {
    /// Its input.
    tx: mpsc::Sender<Inbound>,
    /// Its stop switch.
    stop: watch::Sender<bool>,
    /// The workflow's wire name: peer messages bound to another stage are dropped.
    stage: &'static str,
    /// Whether its start takes the job's initial model (swarm; cyclic's starting client
    /// takes it when configured, and a cross-site evaluation needs none).
    takes_initial_model: bool,
    /// The global round of a tiered job's region swarm (its hub starts it with the model).
    region_round: Option<u32>,
}

/// What a hub adds to the client role it runs towards tier 1.
#[derive(Debug, Default)]
pub struct ClientOptions {
    /// Builds the learner of a tiered job instead of the app's: the hub's region learner,
    /// which runs each global task in the region.
    pub tiered: Option<Arc<dyn TieredDeploy>>,
}

/// Takes a tiered job deployed to a hub and gives the learner that answers tier 1's tasks.
pub trait TieredDeploy: Send + Sync + std::fmt::Debug {
    /// `job` as loaded from `dir` (with `derivation`'s changes in place), `bundle`,
    /// `submitter_cert` and `derivation` (checked: the steps of the hubs above, for a nested
    /// hub) as the tier above sent them.
    fn learner(
        &self,
        job_id: &str,
        job: &Job,
        bundle: &crate::net::protocol::JobBundle,
        submitter_cert: &[u8],
        derivation: Option<&super::tier::SignedDerivation>,
    ) -> Result<Box<dyn Learner>, String>;

    /// The region's sites and their states, per tiered job, for the heartbeat.
    fn region_sites(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        BTreeMap::new()
    }
}

struct Site {
    tiered: Option<Arc<dyn TieredDeploy>>,
    kit: Kit,
    dir: PathBuf,
    net: NetHandle,
    sealing: Sealing,
    server: PeerId,
    jobs: Mutex<HashMap<String, JobSlot>>,
    /// What this site has given the jobs it holds (reserved at deploy, freed when the server
    /// stops the job here).
    ledger: Mutex<Ledger>,
    /// Where peer models and large local ones are spooled (`jobs/.spool`).
    spool: Arc<Spool>,
    /// `<workspace>/audit.log`: this site's policy decisions and job events.
    audit: AuditLog,
}

/// Runs a client site until `shutdown` turns true.
pub async fn run(kit: Kit, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    run_with(kit, shutdown, ClientOptions::default()).await
}

/// [`run`] with a hub's additions (see [`ClientOptions`]).
pub async fn run_with(
    kit: Kit,
    mut shutdown: watch::Receiver<bool>,
    opts: ClientOptions,
) -> anyhow::Result<()> {
    let dir = kit
        .participant_dir()
        .context("the kit folder has no parent")?
        .to_path_buf();
    // A malformed policy stops the site here, naming the file and the key; it is read again
    // for each job, so a corrected or changed file applies without a restart.
    SitePolicy::load(&dir.join("local"))
        .map_err(|e| anyhow::anyhow!("local policy of {}: {e}", kit.name()))?;
    let (net, mut events) = start_net(&kit, false)?;
    let (server, server_addrs) = peer_addrs(&kit.config.server)?;
    let sealing = Sealing::new(net.local, kit.identity.sealing.clone());
    let spool = Arc::new(Spool::new(dir.join("jobs").join(".spool")));
    let audit = AuditLog::open(&crate::audit::path_in(&dir), kit.name())?;
    let site = Arc::new(Site {
        audit,
        tiered: opts.tiered,
        kit,
        dir,
        net: net.clone(),
        sealing,
        server,
        jobs: Mutex::new(HashMap::new()),
        ledger: Mutex::new(Ledger::default()),
        spool,
    });
    tracing::info!(site = %site.kit.name(), peer = %net.local, "client starting");

    // Tasks arrive as bulk streams from the server.
    let mut incoming = net
        .streams
        .clone()
        .accept(BULK_PROTOCOL)
        .map_err(|e| anyhow::anyhow!("bulk protocol: {e}"))?;
    let s2 = Arc::clone(&site);
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            let s = Arc::clone(&s2);
            tokio::spawn(async move {
                if let Err(e) = s.on_stream(peer, stream).await {
                    tracing::warn!(%peer, error = %e, "task transfer failed");
                }
            });
        }
    });

    let s3 = Arc::clone(&site);
    let addrs2 = server_addrs.clone();
    let mut keeper = tokio::spawn(async move { s3.keep_connected(addrs2).await });

    loop {
        tokio::select! {
            refused = &mut keeper => {
                // Refused by the server (a second process of this site, a foreign kit):
                // retrying would not help.
                let why = refused.map_or_else(|e| e.to_string(), |r| r.to_string());
                anyhow::bail!("the server refused this site, stopping: {why}");
            }
            ev = events.recv() => match ev {
                Some(NetEvent::Request { from, request, reply }) => {
                    let resp = site.on_request(&from, request);
                    let _ = reply.send(resp);
                }
                Some(NetEvent::Disconnected { name, .. }) => {
                    tracing::warn!(peer = %name, "disconnected");
                    site.peer_event(&name, false);
                }
                Some(NetEvent::Admitted(p)) => site.peer_event(&p.cert.name, true),
                Some(_) => {}
                None => break,
            },
            _ = shutdown.changed() => break,
        }
    }
    tracing::info!(site = %site.kit.name(), "client stopped");
    Ok(())
}

impl Site {
    /// Keeps a connection and a relay reservation at the server; heartbeats every 10 s. Returns
    /// only if the server refused this site (or the site refused the server).
    async fn keep_connected(self: Arc<Self>, addrs: Vec<Multiaddr>) -> super::ConnectError {
        let mut reserved = false;
        loop {
            if !self.net.peers.is_admitted(&self.server) {
                reserved = false;
                match connect(&self.net, self.server, &addrs, Duration::from_secs(30)).await {
                    Ok(()) => tracing::info!("connected to the server"),
                    Err(e @ super::ConnectError::Refused(_)) => return e,
                    Err(e) => {
                        tracing::warn!(error = %e, "server unreachable; retrying");
                        continue;
                    }
                }
            }
            if !reserved && let Some(a) = addrs.first() {
                let circuit = a.clone().with(Protocol::P2pCircuit);
                match self.net.listen(circuit.clone()).await {
                    Ok(()) => reserved = true,
                    Err(e) => tracing::warn!(%circuit, error = %e, "relay reservation failed"),
                }
            }
            let jobs: BTreeMap<String, u32> = self
                .jobs
                .lock()
                .map(|j| j.iter().map(|(k, v)| (k.clone(), v.round)).collect())
                .unwrap_or_default();
            let listen = self.kit.config.listen.clone();
            let regions = self
                .tiered
                .as_ref()
                .map(|t| t.region_sites())
                .unwrap_or_default();
            // A hub beats faster: its region's state is what tier 1 shows.
            let every = if self.tiered.is_some() { 3 } else { 10 };
            let _ = self
                .net
                .request(
                    self.server,
                    ControlRequest::Heartbeat {
                        jobs,
                        listen,
                        regions,
                    },
                )
                .await;
            tokio::time::sleep(Duration::from_secs(every)).await;
        }
    }

    fn on_request(&self, from: &PeerInfo, request: ControlRequest) -> ControlResponse {
        if from.peer != self.server {
            return ControlResponse::Error {
                reason: "only the server sends control requests to a site".into(),
            };
        }
        match request {
            ControlRequest::Deploy {
                job,
                bundle,
                submitter_cert,
                site_index,
                num_sites,
                derivation,
            } => {
                let outcome = self.deploy(
                    &job,
                    &bundle,
                    &submitter_cert,
                    site_index,
                    num_sites,
                    derivation.as_deref(),
                );
                let mut line = AuditEntry::new(AuditKind::Policy, "deploy").job(job.clone());
                if let Ok(c) = self.kit.root_ca.verify(&submitter_cert, SystemTime::now()) {
                    line = line.actor(cert_actor(&c));
                }
                self.audit_line(match &outcome {
                    Ok(scope) => line
                        .decision(AuditDecision::Allowed)
                        .detail(serde_json::json!({ "privacy_scope": scope })),
                    Err(Refusal::Policy(reason)) => {
                        line.decision(AuditDecision::Refused).reason(reason.clone())
                    }
                    Err(Refusal::Error(e)) => line.reason(format!("failed: {e:#}")),
                });
                match outcome {
                    Ok(_) => ControlResponse::Ok,
                    Err(Refusal::Policy(reason)) => {
                        tracing::warn!(%job, %reason, "job refused by local policy");
                        ControlResponse::Refused { reason }
                    }
                    Err(Refusal::Error(e)) => {
                        tracing::warn!(%job, error = %format!("{e:#}"), "deploy failed");
                        ControlResponse::Error {
                            reason: format!("{e:#}"),
                        }
                    }
                }
            }
            ControlRequest::Configure {
                job,
                peers,
                seed,
                rejoin,
                evaluation,
                region_round,
            } => match self.configure(&job, peers, seed, rejoin, evaluation, region_round) {
                Ok(()) => ControlResponse::Ok,
                Err(e) => {
                    tracing::warn!(%job, error = %format!("{e:#}"), "configure failed");
                    ControlResponse::Error {
                        reason: format!("{e:#}"),
                    }
                }
            },
            ControlRequest::CheckResources { job, ask } => self.check_resources(&job, &ask),
            ControlRequest::StartWorkflow { job } => match self.start_workflow(&job) {
                Ok(()) => ControlResponse::Ok,
                Err(e) => ControlResponse::Error {
                    reason: format!("{e:#}"),
                },
            },
            ControlRequest::AbortJob { job, by } => {
                // An admin's abort: this site's own `manage_job` rule decides too. The
                // server's own stop (the job ended, failed, or its deploy fell short) carries
                // no admin and is obeyed.
                if let Some(by) = by {
                    let mut line = AuditEntry::new(AuditKind::Policy, "abort_job").job(job.clone());
                    if let Ok(c) = self.kit.root_ca.verify(&by, SystemTime::now()) {
                        line = line.actor(cert_actor(&c));
                    }
                    if let Err(reason) = self.may_abort(&job, &by) {
                        tracing::warn!(%job, %reason, "an admin's abort refused by local policy");
                        self.audit_line(
                            line.decision(AuditDecision::Refused).reason(reason.clone()),
                        );
                        return ControlResponse::Refused { reason };
                    }
                    self.audit_line(line.decision(AuditDecision::Allowed));
                }
                self.audit_line(
                    AuditEntry::new(AuditKind::JobEvent, "job_stopped").job(job.clone()),
                );
                if let Ok(mut jobs) = self.jobs.lock()
                    && let Some(slot) = jobs.remove(&job)
                    && let Some(abort) = &slot.abort
                {
                    abort.abort();
                }
                if let Ok(mut l) = self.ledger.lock() {
                    l.free(&job);
                }
                tracing::info!(%job, "job stopped here by the server (it ended or was aborted)");
                ControlResponse::Ok
            }
            other => ControlResponse::Error {
                reason: format!("a site does not serve {other:?}"),
            },
        }
    }

    /// Appends `line` to the audit log; a failure to write is logged, never fatal.
    fn audit_line(&self, line: AuditEntry) {
        if let Err(e) = self.audit.record(line) {
            tracing::error!(error = %e, "cannot write an audit line");
        }
    }

    /// Whether the admin of certificate `by` may abort `job` here (`manage_job` in this site's
    /// `local/authorization.json`, against the job's submitter).
    fn may_abort(&self, job: &str, by: &[u8]) -> Result<(), String> {
        let admin = self
            .kit
            .root_ca
            .verify(by, SystemTime::now())
            .map_err(|e| format!("the aborting admin's certificate is rejected: {e}"))?;
        let submitter = self
            .jobs
            .lock()
            .ok()
            .and_then(|j| j.get(job).and_then(|s| s.submitter.clone()));
        let Some(submitter) = submitter else {
            return Ok(()); // not held here: nothing to refuse
        };
        let policy =
            SitePolicy::load(&self.dir.join("local")).map_err(|e| format!("local policy: {e}"))?;
        policy.check_manage(
            self.kit.name(),
            self.kit.org(),
            &admin,
            &submitter,
            "abort_job",
        )
    }

    /// The server's scheduler asks whether a job's `ask` fits here now: `Ok`, `Refused`
    /// with what it waits for, or `Error` when it never could (more than the site has).
    fn check_resources(&self, job: &str, ask: &ResourceAsk) -> ControlResponse {
        if let Err(reason) = ask.check() {
            return ControlResponse::Error {
                reason: format!("resource_spec: {reason}"),
            };
        }
        let policy = match SitePolicy::load(&self.dir.join("local")) {
            Ok(p) => p,
            Err(e) => {
                return ControlResponse::Error {
                    reason: format!("local policy: {e}"),
                };
            }
        };
        let Ok(ledger) = self.ledger.lock() else {
            return ControlResponse::Error {
                reason: "the resource ledger is poisoned".into(),
            };
        };
        if self.jobs.lock().is_ok_and(|j| j.contains_key(job)) {
            return ControlResponse::Ok; // deployed already
        }
        match ledger.check(&policy.resources, ask) {
            Ok(()) => ControlResponse::Ok,
            Err(Shortfall::Now(reason)) => ControlResponse::Refused { reason },
            Err(Shortfall::Never(reason)) => ControlResponse::Error { reason },
        }
    }

    fn deploy(
        &self,
        job_id: &str,
        bundle: &crate::net::protocol::JobBundle,
        submitter_cert: &[u8],
        site_index: u32,
        num_sites: u32,
        derivation: Option<&super::tier::SignedDerivation>,
    ) -> Result<Option<String>, Refusal> {
        let submitter = self
            .kit
            .root_ca
            .verify(submitter_cert, SystemTime::now())
            .map_err(|e| Refusal::Policy(format!("submitter certificate rejected: {e}")))?;
        submitter
            .check_role(&[RoleKind::Admin])
            .map_err(|e| Refusal::Policy(e.to_string()))?;
        // A job from a region above this one: every hub's step down to this site's must
        // verify before anything is written (`tier`'s module doc has the rule).
        let derived = super::tier::check_deploy(
            &super::tier::DeployCheck {
                root: &self.kit.root_ca,
                // The region this endpoint lives in: a site's own, a nested hub's parent.
                region: self.kit.config.region.as_deref(),
                server: &self.kit.config.server.name,
                submitter: &submitter,
                job_id,
                bundle,
                now: SystemTime::now(),
            },
            derivation,
        )
        .map_err(|e| Refusal::Policy(format!("from {}: {e}", self.kit.config.server.name)))?;
        if job_id.is_empty()
            || !job_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(Refusal::Policy(format!("bad job id {job_id:?}")));
        }
        if self.jobs.lock().is_ok_and(|j| j.contains_key(job_id)) {
            return Ok(None); // deployed already (a repeated deploy changes nothing)
        }
        let jobs = self.dir.join("jobs");
        let dest = jobs.join(job_id);
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(|e| self.disk_error(&dest, e))?;
        }
        std::fs::create_dir_all(&jobs).map_err(|e| self.disk_error(&jobs, e))?;
        crate::jobpack::unpack_verified(bundle, &dest, &submitter.signing_public).map_err(|e| {
            match e {
                // Writing the job failed (a full disk, say): not the admin's signature.
                crate::jobpack::JobPackError::Io { path, source } => self.disk_error(&path, source),
                other => Refusal::Policy(other.to_string()),
            }
        })?;
        let mut job = Job::load(&dest).map_err(|e| Refusal::Error(e.into()))?;
        match &derived {
            Some(d) => super::tier::apply(&mut job, d),
            None => {
                if let Err(e) = super::tier::refuse_flags(&dest) {
                    let _ = std::fs::remove_dir_all(&dest);
                    return Err(Refusal::Policy(e.to_string()));
                }
            }
        }
        let policy = SitePolicy::load(&self.dir.join("local"))
            .map_err(|e| Refusal::Policy(format!("local policy: {e}")))?;
        let scope = policy
            .check(self.kit.name(), self.kit.org(), &submitter, &job.meta)
            .map_err(Refusal::Policy)?
            .cloned();
        let ask = ResourceAsk::of(&job.meta, self.kit.name());
        let gpus = self
            .ledger
            .lock()
            .map_err(|_| Refusal::Error(anyhow::anyhow!("the resource ledger is poisoned")))?
            .reserve(job_id, &policy.resources, &ask)
            .map_err(|e| Refusal::Policy(format!("resources: {e}")))?;
        // The GPUs the job may see: exactly those reserved where the site lends GPUs.
        let gpus = (!policy.resources.gpus.is_empty()).then_some(gpus);
        let held = self.hold_deployed(
            job_id,
            DeployedJob {
                job,
                dest,
                derived,
                bundle,
                submitter_cert,
                submitter,
                policy: &policy,
                scope,
                gpus,
            },
            site_index,
            num_sites,
            derivation,
        );
        if held.is_err()
            && let Ok(mut l) = self.ledger.lock()
        {
            l.free(job_id);
        }
        held
    }

    /// The rest of a deploy once the site's resources are reserved: the learner, its filters
    /// and its slot.
    fn hold_deployed(
        &self,
        job_id: &str,
        d: DeployedJob<'_>,
        site_index: u32,
        num_sites: u32,
        derivation: Option<&super::tier::SignedDerivation>,
    ) -> Result<Option<String>, Refusal> {
        let DeployedJob {
            job,
            dest,
            derived,
            bundle,
            submitter_cert,
            submitter,
            policy,
            scope,
            gpus,
        } = d;
        // A hub answers tier 1's tasks with its region.
        if job.server.tiered.is_some()
            && let Some(hook) = &self.tiered
        {
            let learner = hook
                .learner(job_id, &job, bundle, submitter_cert, derivation)
                .map_err(Refusal::Policy)?;
            self.hold(
                job_id,
                learner,
                SlotFilters::job(FilterChains::default()),
                submitter,
                None,
            );
            tracing::info!(job = %job_id, name = %job.meta.name, "tiered job taken for the region");
            return Ok(None);
        }
        // A derived job's deploy map names this site as the submitter's server does: by
        // region path (`eu.de.site-1`).
        let me = match (&derived, self.kit.config.region.as_deref()) {
            (Some(_), Some(region)) => format!("{region}.{}", self.kit.name()),
            _ => self.kit.name().to_string(),
        };
        let app = job
            .app_for(&me)
            .ok_or_else(|| Refusal::Policy(format!("the job deploys no app to {me}")))?;
        if app.runs_custom_code() {
            policy
                .check_custom_code(self.kit.name(), self.kit.org(), &submitter)
                .map_err(Refusal::Policy)?;
        }
        let queue = job
            .server
            .tracking
            .is_on()
            // The queue's stream id: random, like the process's instance id, so a restarted
            // site's queue is a new stream (`crate::tracking`).
            .then(|| crate::tracking::MetricQueue::new(super::instance_id().unwrap_or_default()));
        let tracker = queue
            .clone()
            .map(crate::tracking::Tracker::to_queue)
            .unwrap_or_default();
        let site = LearnerSite {
            site: self.kit.name(),
            job_id,
            work_dir: &dest,
            tracker: &tracker,
            gpus: gpus.as_deref(),
        };
        let learner = app
            .make_learner(site_index as usize, num_sites.max(1) as usize, site)
            .map_err(|e| Refusal::Error(e.into()))?;
        // The site's privacy scope runs first, on every task, then the job's own filters.
        let scope_name = scope.as_ref().map(|s| s.name.clone());
        let filters = match &scope {
            Some(scope) => {
                tracing::info!(job = %job_id, scope = %scope.name, data = scope.task_data_filters.len(), result = scope.task_result_filters.len(), "privacy scope");
                SlotFilters {
                    both: app.filters.clone().with_site_scope(
                        scope.task_data_filters.clone(),
                        scope.task_result_filters.clone(),
                    ),
                    peer: app
                        .filters
                        .clone()
                        .with_site_scope(scope.task_data_filters.clone(), Vec::new()),
                    own_result: FilterChains::default()
                        .with_site_scope(Vec::new(), scope.task_result_filters.clone()),
                }
            }
            None => SlotFilters::job(app.filters.clone()),
        };
        self.hold(job_id, learner, filters, submitter, queue);
        tracing::info!(job = %job_id, name = %job.meta.name, site_index, num_sites, "job deployed");
        Ok(scope_name)
    }

    /// Holds a deployed job's learner in its slot.
    fn hold(
        &self,
        job_id: &str,
        learner: Box<dyn Learner>,
        filters: SlotFilters,
        submitter: flare_crypto::ParticipantCert,
        metrics: Option<Arc<crate::tracking::MetricQueue>>,
    ) {
        let abort = learner.abort_handle();
        let metrics = metrics.map(|queue| {
            let (stop, stop_rx) = watch::channel(false);
            super::metrics::spawn_sender(
                self.net.clone(),
                self.server,
                job_id.to_string(),
                Arc::clone(&queue),
                stop_rx,
            );
            MetricsLink { queue, stop }
        });
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.insert(
                job_id.to_string(),
                JobSlot {
                    learner: Arc::new(Mutex::new(learner)),
                    abort,
                    round: 0,
                    workflow: None,
                    filters: Arc::new(filters.both),
                    peer_filters: Arc::new(filters.peer),
                    own_result: Arc::new(filters.own_result),
                    submitter: Some(submitter),
                    metrics,
                    secagg: Arc::default(),
                },
            );
        }
    }

    /// A file-system failure while taking a job, labelled as the disk's (a full one named as
    /// such), with the path.
    fn disk_error(&self, path: &std::path::Path, e: std::io::Error) -> Refusal {
        let what = if e.kind() == std::io::ErrorKind::StorageFull {
            "the disk is full"
        } else {
            "cannot write the job"
        };
        Refusal::Error(anyhow::anyhow!(
            "{what} at {}: {}: {e}",
            self.kit.name(),
            path.display()
        ))
    }

    async fn on_stream(
        self: Arc<Self>,
        peer: PeerId,
        mut stream: libp2p::Stream,
    ) -> anyhow::Result<()> {
        let from = self
            .net
            .peers
            .get(&peer)
            .with_context(|| format!("bulk stream from {peer}, which is not admitted"))?;
        if peer != self.server && from.cert.role.kind() != RoleKind::Client {
            anyhow::bail!(
                "bulk stream from {} ({}), neither the server nor a site",
                from.cert.name,
                from.cert.role
            );
        }
        // A large peer model goes to disk as it arrives: the workflow holds it as a file.
        let spool = self.spool.file()?;
        let got = bulk::receive_spooling(
            &mut stream,
            &self.sealing,
            &from,
            MAX_TASK_MODEL,
            spool,
            "ccwf",
            crate::model_io::FILE_BACKED_BYTES,
        )
        .await?;
        drop(stream);
        let job = got.header.job.clone();
        if got.header.kind == "ccwf" {
            let (tx, stage) = self
                .jobs
                .lock()
                .map_err(|_| anyhow::anyhow!("job table poisoned"))?
                .get(&job)
                .and_then(|s| s.workflow.as_ref().map(|w| (w.tx.clone(), w.stage)))
                .with_context(|| {
                    format!("workflow message for job {job}, which does not run here")
                })?;
            if got.header.workflow != stage {
                tracing::debug!(%job, peer = %from.cert.name, workflow = %got.header.workflow, "message for a stage that is over dropped");
                return Ok(());
            }
            let body = got
                .meta
                .body
                .map(|b| b.into_vec())
                .context("workflow message without a body")?;
            let model = match (got.stored, got.model) {
                (Some(s), _) => Some(ModelRef::Stored(Arc::new(s))),
                (None, m) => m.map(ModelRef::from),
            };
            tx.send(Inbound::Message {
                from: from.cert.name.clone(),
                body,
                model,
            })
            .await
            .ok();
            return Ok(());
        }
        if peer != self.server {
            anyhow::bail!(
                "{} transfer from {}, not from the server",
                got.header.kind,
                from.cert.name
            );
        }
        let (learner, filters, metrics, secagg) = {
            let mut jobs = self
                .jobs
                .lock()
                .map_err(|_| anyhow::anyhow!("job table poisoned"))?;
            let slot = jobs
                .get_mut(&job)
                .with_context(|| format!("task for job {job} that is not deployed here"))?;
            slot.round = got.meta.round;
            (
                Arc::clone(&slot.learner),
                Arc::clone(&slot.filters),
                slot.metrics.as_ref().map(|m| Arc::clone(&m.queue)),
                Arc::clone(&slot.secagg),
            )
        };
        let mut task = Task {
            id: TaskId(got.meta.task_id),
            name: got.meta.task_name.clone(),
            round: got.meta.round,
            data: Shareable {
                headers: got.meta.headers.clone(),
                return_code: got.meta.return_code,
                model: None,
            },
        };
        tracing::info!(%job, task = %task.name, round = task.round, "task received");
        let received = got.model;
        let site = self.kit.name().to_string();
        let job_id = job.clone();
        let result = tokio::task::spawn_blocking(move || {
            let (task_id, round) = (task.id, task.round);
            let failed = move |reason: String| flare_protocols::TaskResult {
                task_id,
                round,
                data: Shareable::error(flare_protocols::ReturnCode::ExecutionException, reason),
            };
            // The site's task data filters, on the model as it comes in.
            match received.map(|m| filters.task_data(&task.name, m)).transpose() {
                Ok(m) => task.data.model = m.map(Arc::new),
                Err(e) => {
                    tracing::error!(job = %job_id, task = %task.name, error = %e, "task data filter failed");
                    return failed(format!("the task data filter of {site} failed: {e}"));
                }
            }
            // Secure aggregation answers its own tasks and masks the train result, after
            // the site's result filters ran on it.
            secagg.run_task(&site, &job_id, task, |task| {
                let name = task.name.clone();
                let mut result = match learner.lock() {
                    Ok(mut l) => execute(l.as_mut(), task),
                    Err(_) => return failed("a previous task of this job panicked".into()),
                };
                // A statistics answer goes through the site's cleansers first.
                crate::stats::cleanse_result(&filters, &name, &site, &mut result);
                // The site's task result filters, on the result's model going out.
                if result.data.return_code == flare_protocols::ReturnCode::Ok
                    && filters.has_task_result(&name)
                    && let Some(m) = result.data.model.take()
                {
                    match super::policy::filter_own_result(&filters, &name, &site, Arc::unwrap_or_clone(m)) {
                        Ok(m) => result.data.model = Some(Arc::new(m)),
                        Err(why) => {
                            tracing::error!(job = %job_id, task = %name, error = %why, "task result refused");
                            result.data = Shareable::error(
                                flare_protocols::ReturnCode::ExecutionException,
                                why,
                            );
                        }
                    }
                }
                result
            })
        })
        .await?;
        // What the learner logged during the task reaches the server before its result.
        if let Some(q) = metrics
            && !q.flushed(METRICS_FLUSH).await
        {
            tracing::warn!(%job, queued = q.len(), "metrics not yet acknowledged; the result goes first");
        }
        let meta = TransferMeta {
            task_id: result.task_id.0,
            task_name: got.meta.task_name,
            round: result.round,
            return_code: result.data.return_code,
            headers: result.data.headers.clone(),
            skeleton: None,
            body: None,
            resume: None,
        };
        let route = Route {
            job,
            workflow: got.header.workflow,
            round: u64::from(result.round),
            kind: "result".into(),
        };
        let server = self
            .net
            .peers
            .get(&self.server)
            .context("the server went away")?;
        bulk::deliver(
            &self.net,
            &self.sealing,
            &server,
            &route,
            &meta,
            result.data.model.as_deref(),
        )
        .await?;
        Ok(())
    }
}

impl Site {
    /// Tells every running workflow that a peer came or went.
    fn peer_event(&self, name: &str, up: bool) {
        let senders: Vec<mpsc::Sender<Inbound>> = self
            .jobs
            .lock()
            .map(|j| {
                j.values()
                    .filter_map(|s| s.workflow.as_ref().map(|w| w.tx.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for tx in senders {
            let _ = tx.try_send(Inbound::Peer {
                name: name.to_string(),
                up,
            });
        }
    }

    /// Starts a deployed job's client-controlled workflow among `peers`: its training
    /// workflow, or with `evaluation` its cross-site evaluation (which replaces the training
    /// workflow's task), or with `region_round` a tiered job's region swarm for that global
    /// round (which replaces the previous round's).
    fn configure(
        &self,
        job_id: &str,
        peers: Vec<PeerEntry>,
        seed: u64,
        rejoin: bool,
        evaluation: Option<EvaluationStage>,
        region_round: Option<u32>,
    ) -> anyhow::Result<()> {
        let dir = self.dir.join("jobs").join(job_id);
        let job = Job::load(&dir)?;
        let mut names: Vec<String> = peers.iter().map(|p| p.name.clone()).collect();
        names.sort();
        names.dedup();
        let region_swarm = match (region_round, &job.server.tiered) {
            (None, _) => None,
            (Some(g), Some(args)) if args.region_swarm() && evaluation.is_none() => {
                Some(args.region_swarm_config(g, &names, seed)?)
            }
            (Some(g), _) => anyhow::bail!(
                "job {job_id} is not a tiered job whose regions run a swarm, so it has no region swarm for global round {g}"
            ),
        };
        let stage = match (&evaluation, &region_swarm) {
            (Some(_), _) => CSE_WIRE_NAME,
            (None, Some(_)) => SWARM_WIRE_NAME,
            (None, None) => job.server.workflow.wire_name(),
        };
        let me = self.kit.name().to_string();
        let configured = |slot: &JobSlot| {
            slot.workflow
                .as_ref()
                .is_some_and(|w| w.stage == stage && w.region_round == region_round)
        };
        let (learner, filters, own_result, metrics, already) = self.with_slot(job_id, |slot| {
            (
                Arc::clone(&slot.learner),
                Arc::clone(&slot.peer_filters),
                Arc::clone(&slot.own_result),
                slot.metrics.as_ref().map(|m| Arc::clone(&m.queue)),
                configured(slot),
            )
        })?;
        let filter_task = match evaluation {
            Some(_) => flare_protocols::shareable::task_names::VALIDATE,
            None => flare_protocols::shareable::task_names::TRAIN,
        };
        if already {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel(256);
        let (stop_tx, stop_rx) = watch::channel(false);
        let server_addrs = peer_addrs(&self.kit.config.server)?.1;
        let models = dir.join("models");
        let ctx = |result_clients: Vec<String>| {
            Arc::new(workflow::Context {
                net: self.net.clone(),
                sealing: self.sealing.clone(),
                job: job_id.to_string(),
                workflow: stage,
                me: me.clone(),
                server: (self.server, server_addrs.clone()),
                peers: peers.clone(),
                learner: Arc::clone(&learner),
                job_dir: dir.clone(),
                result_clients,
                spool: Arc::clone(&self.spool),
                filters: Arc::clone(&filters),
                own_result: Arc::clone(&own_result),
                metrics: metrics.clone(),
                filter_task,
                audit: crate::audit::WorkflowAudit::new(self.audit.clone(), job_id, stage),
            })
        };
        let task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            match (&evaluation, &job.server.workflow, region_swarm) {
                // The hub starts it with a sealed start message that carries the global model.
                (None, _, Some(cfg)) => {
                    let wf = SwarmClient::new(cfg.clone(), me.clone())?;
                    let c = ctx(cfg.result_clients.clone());
                    Box::pin(workflow::run(c, wf, swarm_start, rx, stop_rx))
                }
                (Some(ev), _, _) => {
                    let args =
                        job.server.evaluation.as_ref().with_context(|| {
                            format!("job {job_id} has no CrossSiteEval workflow")
                        })?;
                    let cfg = args.to_config(&names, seed, ev.global_holder.clone())?;
                    // The models stay in their files: read when sent or validated.
                    let read = |stem: &str| -> anyhow::Result<Option<ModelRef>> {
                        let p = models.join(format!("{stem}.safetensors"));
                        if !p.is_file() {
                            return Ok(None);
                        }
                        Ok(Some(ModelRef::Stored(Arc::new(crate::model_io::open(&p)?))))
                    };
                    let local = read(&ModelSlot::Local.file_stem())?;
                    let global = if cfg.global_model_client.as_deref() == Some(me.as_str()) {
                        match read(&ModelSlot::Best.file_stem())? {
                            Some(m) => Some(m),
                            None => read(&ModelSlot::Final.file_stem())?,
                        }
                    } else {
                        None
                    };
                    let wf = CseClient::new(cfg, &me, local, global)?;
                    fn start(_: Option<ModelRef>) -> Input<CseMsg> {
                        Input::Message {
                            from: "server".into(),
                            msg: CseMsg::Start,
                            model: None,
                        }
                    }
                    Box::pin(workflow::run(ctx(Vec::new()), wf, start, rx, stop_rx))
                }
                (None, WorkflowSpec::Swarm(args), None) => {
                    let cfg = args.to_config(&names, seed)?;
                    let wf = if rejoin {
                        SwarmClient::joining(cfg.clone(), me.clone())?
                    } else {
                        SwarmClient::new(cfg.clone(), me.clone())?
                    }
                    .with_aggregator(Aggregator::new(job.server.aggregator));
                    let wf = match &job.server.secagg {
                        Some(a) => wf.with_secagg(*a, job_id, crate::secagg::os_seed()?)?,
                        None => wf,
                    };
                    let c = ctx(cfg.result_clients.clone());
                    Box::pin(workflow::run(c, wf, swarm_start, rx, stop_rx))
                }
                (None, WorkflowSpec::Cyclic(args), None) => {
                    let cfg = args.to_config(&names, seed)?;
                    let starting = cfg.starting_client.as_ref().unwrap_or(&names[0]);
                    let wf = if rejoin {
                        CyclicClient::joining(cfg.clone(), &me)?
                    } else {
                        let initial = if *starting == me {
                            Some(self.spool.hold(Arc::new(job.server.initial_model()?))?)
                        } else {
                            None
                        };
                        CyclicClient::new(cfg.clone(), &me, initial)?
                    };
                    fn start(_: Option<ModelRef>) -> Input<CyclicMsg> {
                        Input::Message {
                            from: "server".into(),
                            msg: CyclicMsg::Start,
                            model: None,
                        }
                    }
                    let result_clients = if cfg.result_clients.is_empty() {
                        names.clone()
                    } else {
                        cfg.result_clients.clone()
                    };
                    Box::pin(workflow::run(ctx(result_clients), wf, start, rx, stop_rx))
                }
                (None, WorkflowSpec::ScatterAndGather | WorkflowSpec::Statistics(_), None) => {
                    anyhow::bail!(
                        "job {job_id} runs {}, not a client-controlled workflow",
                        job.server.workflow.wire_name()
                    )
                }
            };
        // Install the new task (stopping the previous stage's) only now that it is built: a
        // configure that fails leaves the running workflow alone, and of two at once only
        // the first starts a task.
        let installed = self.with_slot(job_id, |slot| {
            if configured(slot) {
                return false;
            }
            if let Some(old) = slot.workflow.take() {
                let _ = old.stop.send(true);
            }
            slot.workflow = Some(WorkflowTask {
                tx,
                stop: stop_tx,
                stage,
                takes_initial_model: evaluation.is_none()
                    && matches!(job.server.workflow, WorkflowSpec::Swarm(_)),
                region_round,
            });
            true
        })?;
        if installed {
            tokio::spawn(task);
            tracing::info!(job = %job_id, rejoin, stage, "workflow configured");
        }
        Ok(())
    }

    /// Runs `f` on the slot of the deployed job `job_id`.
    fn with_slot<T>(&self, job_id: &str, f: impl FnOnce(&mut JobSlot) -> T) -> anyhow::Result<T> {
        let mut jobs = self
            .jobs
            .lock()
            .map_err(|_| anyhow::anyhow!("job table poisoned"))?;
        let slot = jobs
            .get_mut(job_id)
            .with_context(|| format!("job {job_id} is not deployed here"))?;
        Ok(f(slot))
    }

    fn start_workflow(&self, job_id: &str) -> anyhow::Result<()> {
        let (tx, takes_initial_model) = self
            .with_slot(job_id, |s| {
                s.workflow
                    .as_ref()
                    .map(|w| (w.tx.clone(), w.takes_initial_model))
            })?
            .with_context(|| format!("job {job_id} is not configured here"))?;
        let model = if takes_initial_model {
            let job = Job::load(&self.dir.join("jobs").join(job_id))?;
            Some(job.server.initial_model()?)
        } else {
            None
        };
        tx.try_send(Inbound::Start(model))
            .map_err(|_| anyhow::anyhow!("the workflow of job {job_id} is not accepting input"))?;
        tracing::info!(job = %job_id, "workflow started here");
        Ok(())
    }
}

/// The server's start of a swarm, with the model it starts from.
fn swarm_start(model: Option<ModelRef>) -> Input<SwarmMsg> {
    Input::Message {
        from: "server".into(),
        msg: SwarmMsg::Start,
        model,
    }
}

/// A job unpacked and allowed here, with its resources reserved.
struct DeployedJob<'a> {
    job: Job,
    dest: PathBuf,
    derived: Option<super::tier::Derivation>,
    bundle: &'a crate::net::protocol::JobBundle,
    submitter_cert: &'a [u8],
    submitter: flare_crypto::ParticipantCert,
    policy: &'a SitePolicy,
    scope: Option<super::policy::PrivacyScope>,
    /// The GPUs the job may use; `None` where the site lends none (the job's environment is
    /// left alone).
    gpus: Option<Vec<u32>>,
}

enum Refusal {
    /// The site's policy says no: reported as a refusal.
    Policy(String),
    /// Something failed: reported as an error.
    Error(anyhow::Error),
}
