//! The server: keeps the job store, answers admins, deploys jobs to sites once enough of them
//! are connected, drives each job's scatter-and-gather controller over the network, and runs
//! the circuit relay for sites that cannot reach each other.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use flare_crypto::{AdminRole, Role, RoleKind};
use flare_protocols::shareable::{Shareable, TaskResult};
use flare_protocols::stored::ModelRef;
use flare_provision::kit::Kit;
use futures::StreamExt;
use libp2p::PeerId;
use serde_bytes::ByteBuf;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

mod ccwf;
mod region;
mod sag;
mod schedule;
mod stats;
mod tracking;

use super::resources::ServerResources;
use super::{now_ms, start_net};
use crate::audit::{Actor, AuditEntry, AuditKind, AuditLog, Decision as AuditDecision};
use crate::authz::{Authorization, Person, Request, Right};
use crate::job::{Job, WorkflowSpec};
use crate::net::bulk::{self, Sealing};
use crate::net::download;
use crate::net::protocol::{
    AdminRequest, BULK_PROTOCOL, ControlRequest, ControlResponse, DOWNLOAD_PROTOCOL, PeerEntry,
};
use crate::net::{NetEvent, NetHandle, PeerInfo};
use crate::store::{JobState, JobStore};
use flare_protocols::workflows::ccwf::Report;
use schedule::Placement;

/// Largest result model the server accepts from a site.
pub const MAX_RESULT_MODEL: u64 = 16 << 30;
/// How long a site's report may wait to be written before the site is told to send it again.
const REPORT_WRITE_WAIT: Duration = Duration::from_secs(30);
/// How long a swarm site may be disconnected before the end of a run stops waiting for it.
const SITE_GONE_AFTER: Duration = Duration::from_secs(20);
/// Workflow name bound into sealed task and result streams.
const WORKFLOW: &str = "scatter_and_gather";

/// A site's last heartbeat: when (ms), its jobs with their rounds, and where it listens.
type Heartbeat = (u64, BTreeMap<String, u32>, Vec<String>);

/// What a client-controlled job's watcher hears from the sites.
#[derive(Debug)]
enum WfEvent {
    /// A progress report, and who to tell once it is in the job store: a site's report is
    /// acknowledged only after it is written, so a server killed in between loses nothing
    /// (the site sends it again).
    Report(Report, oneshot::Sender<()>),
    /// A result client uploaded a model (`global_final` or `best`).
    Uploaded(String),
    /// A model a site uploaded could not be stored (`stem`, why); the site sends it again.
    StoreFailed(String, String),
}

struct Runner {
    results: mpsc::Sender<(String, TaskResult, Option<ModelRef>)>,
    reports: mpsc::Sender<(String, WfEvent)>,
    abort: watch::Sender<bool>,
    /// The certificate (DER) of the admin who aborted the job, which the sites check against
    /// their own `manage_job` rule when they are told to stop it.
    aborted_by: Arc<Mutex<Option<Vec<u8>>>>,
}

/// Counters a test or an operator can read from `status`.
#[derive(Debug, Default)]
struct Counters {
    relay_circuits_opened: AtomicU64,
    relay_circuits_closed: AtomicU64,
}

/// What a hub adds to the server role it runs for its region.
#[derive(Debug, Default)]
pub struct ServerOptions {
    /// Jobs the hub derived from tier 1's, to store under tier 1's id and run here.
    pub derived: Option<mpsc::Receiver<DerivedJob>>,
    /// The hub's upward learners' links to this server's region runners.
    pub links: Option<super::tier::RegionLinks>,
}

/// A job a hub derived from tier 1's, for its region's server to store and run.
#[derive(Debug)]
pub struct DerivedJob {
    /// Tier 1's job id.
    pub id: String,
    /// The job as tier 1's submitter signed it.
    pub bundle: crate::net::protocol::JobBundle,
    /// The submitter's certificate (DER), already checked by the hub.
    pub submitter_cert: Vec<u8>,
    /// The hub's signed record of what it changed.
    pub derivation: super::tier::SignedDerivation,
    /// Stored, or why not.
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// Sites of one region a hub's heartbeat may name for one job.
const MAX_REGION_SITES: usize = 1000;

/// The file beside a derived job's folder that holds its signed derivation record (CBOR).
const DERIVATION_FILE: &str = "derivation.cbor";
/// The largest derivation record file read or written.
const MAX_DERIVATION_BYTES: usize = 1 << 20;

/// Where a derived job's signed record is kept (beside its folder).
fn derivation_path(store: &JobStore, id: &str) -> PathBuf {
    store.job_dir(id).with_file_name(DERIVATION_FILE)
}

struct Server {
    /// Links to the hub's upward learners (a hub's region server only).
    links: Option<super::tier::RegionLinks>,
    kit: Kit,
    net: NetHandle,
    sealing: Sealing,
    store: JobStore,
    runners: Mutex<HashMap<String, Runner>>,
    /// Per site: when it last reported, and the round of each job it runs.
    heartbeats: Mutex<HashMap<String, Heartbeat>>,
    counters: Counters,
    started_ms: u64,
    /// `<workspace>/audit.log`: admin commands, job events, policy decisions.
    audit: AuditLog,
    /// The last admin commands refused by the server's authorization, for `admin status`.
    refusals: Mutex<std::collections::VecDeque<serde_json::Value>>,
    /// The running jobs' metric writers.
    tracking: tracking::Tracking,
    /// `local/resources.json`: how many jobs run at once.
    limits: ServerResources,
}

/// How many refused admin commands `admin status` shows.
const MAX_REFUSALS_SHOWN: usize = 20;

/// Runs the server until `shutdown` turns true.
pub async fn run(kit: Kit, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    run_with(kit, shutdown, ServerOptions::default()).await
}

/// [`run`] with a hub's additions: derived jobs to take in, and links to its upward learners.
pub async fn run_with(
    kit: Kit,
    mut shutdown: watch::Receiver<bool>,
    opts: ServerOptions,
) -> anyhow::Result<()> {
    let ServerOptions { mut derived, links } = opts;
    let dir: PathBuf = kit
        .participant_dir()
        .context("the kit folder has no parent")?
        .to_path_buf();
    // A malformed authorization file stops the server here, naming the file and the key.
    Authorization::load(&dir.join("local").join("authorization.json"))
        .map_err(|e| anyhow::anyhow!("local policy of {}: {e}", kit.name()))?;
    let limits = ServerResources::load(&dir.join("local").join("resources.json"))
        .map_err(|e| anyhow::anyhow!("local policy of {}: {e}", kit.name()))?;
    let store = JobStore::open(&dir.join("store"))?;
    let audit = AuditLog::open(&crate::audit::path_in(&dir), kit.name())?;
    // Jobs that were running when the server stopped go on: a client-controlled job is
    // watched again, a scatter-and-gather job resumes after its last persisted round. A job
    // caught mid-deploy is deployed again (a repeated deploy is a no-op on a site).
    let mut resume = Vec::new();
    for rec in store.list() {
        match rec.state {
            JobState::Running => match load_job(&store, &rec.id) {
                Ok(job) => {
                    // The sites that took the job (not those that refused it).
                    let sites: Vec<String> = rec
                        .sites
                        .iter()
                        .filter(|(_, st)| !st.starts_with("refused") && !st.starts_with("error"))
                        .map(|(name, _)| name.clone())
                        .collect();
                    resume.push((rec.id.clone(), job, sites));
                }
                Err(e) => {
                    store.set_state(
                        &rec.id,
                        JobState::Failed,
                        &format!("the server restarted and cannot load the job again: {e}"),
                        now_ms(),
                    )?;
                }
            },
            JobState::Dispatched => {
                store.set_state(
                    &rec.id,
                    JobState::Submitted,
                    "the server restarted while deploying the job; it is deployed again",
                    now_ms(),
                )?;
            }
            _ => {}
        }
    }
    let (net, mut events) = start_net(&kit, true)?;
    let sealing = Sealing::new(net.local, kit.identity.sealing.clone());
    tracing::info!(peer = %net.local, listen = ?kit.config.listen, "server starting");
    let server = Arc::new(Server {
        links,
        kit,
        net: net.clone(),
        sealing,
        store,
        runners: Mutex::new(HashMap::new()),
        heartbeats: Mutex::new(HashMap::new()),
        counters: Counters::default(),
        started_ms: now_ms(),
        refusals: Mutex::new(std::collections::VecDeque::new()),
        tracking: tracking::Tracking::default(),
        audit,
        limits,
    });

    for (id, job, sites) in resume {
        tracing::info!(job = %id, workflow = job.server.workflow.wire_name(), "resuming a running job");
        Arc::clone(&server).launch(&id, job, sites, true);
    }
    let mut incoming = net
        .streams
        .clone()
        .accept(BULK_PROTOCOL)
        .map_err(|e| anyhow::anyhow!("bulk protocol: {e}"))?;
    let s2 = Arc::clone(&server);
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            let s = Arc::clone(&s2);
            tokio::spawn(async move {
                if let Err(e) = s.on_result_stream(peer, stream).await {
                    tracing::warn!(%peer, error = %format!("{e:#}"), "result transfer failed");
                }
            });
        }
    });

    let mut downloads = net
        .streams
        .clone()
        .accept(DOWNLOAD_PROTOCOL)
        .map_err(|e| anyhow::anyhow!("download protocol: {e}"))?;
    let s3 = Arc::clone(&server);
    tokio::spawn(async move {
        while let Some((peer, stream)) = downloads.next().await {
            let s = Arc::clone(&s3);
            tokio::spawn(async move {
                if let Err(e) = s.on_download_stream(peer, stream).await {
                    tracing::warn!(%peer, error = %format!("{e:#}"), "download failed");
                }
            });
        }
    });

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(NetEvent::Request { from, request, reply }) => {
                    let s = Arc::clone(&server);
                    tokio::spawn(async move {
                        let resp = s.on_request(&from, request).await;
                        let _ = reply.send(resp);
                    });
                }
                Some(NetEvent::RelayCircuit { opened, src, dst }) => {
                    let c = if opened { &server.counters.relay_circuits_opened } else { &server.counters.relay_circuits_closed };
                    c.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%src, %dst, opened, "relay circuit");
                }
                Some(_) => {}
                None => break,
            },
            _ = tick.tick() => Arc::clone(&server).schedule().await,
            Some(d) = async { match derived.as_mut() { Some(rx) => rx.recv().await, None => None } } => {
                let r = server.take_derived(&d).map_err(|e| format!("{e:#}"));
                let _ = d.reply.send(r);
            }
            _ = shutdown.changed() => break,
        }
    }
    // Running jobs stay `running` in the store: a client-controlled job goes on without the
    // server, and a scatter-and-gather job resumes after its last persisted round when the
    // server starts again.
    let ids: Vec<String> = server
        .runners
        .lock()
        .map(|r| r.keys().cloned().collect())
        .unwrap_or_default();
    for id in ids {
        server.note(&id, "the server shut down while the job ran".into());
    }
    tracing::info!("server stopped");
    Ok(())
}

/// What a deploy sends: the stored bundle, the submitter's certificate, and a derived job's
/// signed record.
type DeployParts = (
    crate::net::protocol::JobBundle,
    Vec<u8>,
    Option<Box<super::tier::SignedDerivation>>,
);

/// A derived job's signed record, if `id` is one.
fn read_derivation(
    store: &JobStore,
    id: &str,
) -> anyhow::Result<Option<super::tier::SignedDerivation>> {
    let path = derivation_path(store, id);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(
            flare_protocols::codec::decode(&bytes, MAX_DERIVATION_BYTES)
                .with_context(|| path.display().to_string())?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::Error::new(e).context(path.display().to_string())),
    }
}

/// Loads a stored job; a derived one with its hub's changes in place.
fn load_job(store: &JobStore, id: &str) -> anyhow::Result<Job> {
    let mut job = Job::load(&store.job_dir(id))?;
    if let Some(signed) = read_derivation(store, id)? {
        let d: super::tier::Derivation =
            serde_json::from_slice(&signed.record).context("the job's derivation record")?;
        super::tier::apply(&mut job, &d);
    }
    Ok(job)
}

fn admin_json(v: serde_json::Value) -> ControlResponse {
    ControlResponse::Admin {
        json: v.to_string(),
        files: BTreeMap::new(),
    }
}

fn err(reason: impl Into<String>) -> ControlResponse {
    ControlResponse::Error {
        reason: reason.into(),
    }
}

/// The roles that take part as sites of this server: clients, and in a tiered federation the
/// hubs of the regions below, which the tier-1 server schedules, deploys to and hears from
/// (heartbeats, results) like sites.
const SITE_KINDS: [RoleKind; 2] = [RoleKind::Client, RoleKind::Hub];

/// The audit log's actor for a peer: its certificate's name, org and role.
pub(crate) fn actor(from: &PeerInfo) -> Actor {
    Actor {
        name: from.cert.name.clone(),
        org: from.cert.org.clone(),
        role: match from.cert.role {
            Role::Admin(r) => r.as_str().to_string(),
            other => other.to_string(),
        },
    }
}

/// Whether a peer of `role` is one of this server's sites ([`SITE_KINDS`]).
fn is_site(role: Role) -> bool {
    SITE_KINDS.contains(&role.kind())
}

impl Server {
    fn connected_sites(&self) -> Vec<PeerInfo> {
        let mut v: Vec<PeerInfo> = self
            .net
            .peers
            .all()
            .into_iter()
            .filter(|p| is_site(p.cert.role))
            .collect();
        v.sort_by(|a, b| a.cert.name.cmp(&b.cert.name));
        v
    }

    /// The jobs among `held` (a site's heartbeat) that this server no longer runs: ended,
    /// deleted, or never stored. A `dispatched` or `running` job counts as running (its
    /// runner may be a moment from starting, or ending and freeing its sites itself).
    fn stale_jobs<'a>(&self, held: impl Iterator<Item = &'a String>) -> Vec<String> {
        held.filter(|id| self.store.state(id).map_or(true, |s| !s.is_active()))
            .cloned()
            .collect()
    }

    async fn on_request(
        self: &Arc<Self>,
        from: &PeerInfo,
        request: ControlRequest,
    ) -> ControlResponse {
        match request {
            ControlRequest::Heartbeat {
                jobs,
                listen,
                regions,
            } => {
                if from.cert.role.kind() == RoleKind::Hub {
                    self.record_region_sites(&from.cert.name, &jobs, regions);
                }
                let stale = self.stale_jobs(jobs.keys());
                if let Ok(mut h) = self.heartbeats.lock() {
                    h.insert(from.cert.name.clone(), (now_ms(), jobs, listen));
                }
                if !stale.is_empty() {
                    tracing::info!(site = %from.cert.name, jobs = ?stale, "the site holds jobs that no longer run here; freeing them");
                    let s = Arc::clone(self);
                    let name = from.cert.name.clone();
                    tokio::spawn(async move {
                        for id in stale {
                            s.stop_on_sites(&id, std::slice::from_ref(&name), None)
                                .await;
                        }
                    });
                }
                ControlResponse::Ok
            }
            ControlRequest::WorkflowReport { job, report } => {
                let tx = self
                    .runners
                    .lock()
                    .ok()
                    .and_then(|r| r.get(&job).map(|r| r.reports.clone()));
                match tx {
                    Some(tx) => {
                        let (ack, written) = oneshot::channel();
                        let queued = tx
                            .send((from.cert.name.clone(), WfEvent::Report(report, ack)))
                            .await;
                        match (
                            queued,
                            tokio::time::timeout(REPORT_WRITE_WAIT, written).await,
                        ) {
                            (Ok(()), Ok(Ok(()))) => ControlResponse::Ok,
                            _ => err(format!(
                                "job {job}: the report was not recorded; send it again"
                            )),
                        }
                    }
                    None => err(format!("job {job} is not running here")),
                }
            }
            ControlRequest::Metrics {
                job,
                stream,
                seq,
                records,
            } if is_site(from.cert.role) => {
                match self
                    .tracking
                    .accept(&job, &from.cert.name, stream, seq, &records)
                {
                    Ok(_) => ControlResponse::Ok,
                    Err(why) => err(why),
                }
            }
            ControlRequest::Admin(req) => match from.cert.role {
                Role::Admin(role) => self.on_admin(from, role, req).await,
                other => err(format!(
                    "admin commands need an admin certificate, not {other}"
                )),
            },
            other => err(format!("the server does not serve {other:?}")),
        }
    }

    async fn on_admin(
        self: &Arc<Self>,
        from: &PeerInfo,
        role: AdminRole,
        req: AdminRequest,
    ) -> ControlResponse {
        let (right, command, job) = match &req {
            AdminRequest::Submit(_) => (Right::SubmitJob, "submit_job", None),
            AdminRequest::List => (Right::View, "list_jobs", None),
            AdminRequest::Status { job } => (Right::View, "check_status", job.as_deref()),
            AdminRequest::Sites => (Right::View, "check_status", None),
            AdminRequest::Abort { job } => (Right::ManageJob, "abort_job", Some(job.as_str())),
            AdminRequest::Delete { job } => (Right::ManageJob, "delete_job", Some(job.as_str())),
            AdminRequest::Download { job } => {
                (Right::DownloadJob, "download_job", Some(job.as_str()))
            }
            AdminRequest::Clone { job } => (Right::CloneJob, "clone_job", Some(job.as_str())),
            AdminRequest::Metrics { job } => (Right::View, "show_metrics", Some(job.as_str())),
        };
        let decided = self.authorize(from, role, right, command, job);
        let mut line = AuditEntry::new(AuditKind::AdminCommand, command).actor(actor(from));
        if let Some(job) = job {
            line = line.job(job);
        }
        line = match &decided {
            Ok(()) => line.decision(AuditDecision::Allowed),
            Err(reason) => line.decision(AuditDecision::Refused).reason(reason.clone()),
        };
        self.audit_line(line);
        if let Err(reason) = decided {
            return err(reason);
        }
        match req {
            AdminRequest::Submit(bundle) => {
                match self.store.submit(
                    &bundle,
                    &from.cert.name,
                    &from.cert.signing_public,
                    now_ms(),
                ) {
                    Ok(rec) => {
                        let cert_path = self.store.job_dir(&rec.id).with_file_name("submitter.der");
                        if let Err(e) = std::fs::write(&cert_path, &from.cert.der) {
                            return err(format!("{}: {e}", cert_path.display()));
                        }
                        if let Some(why) = self.never_fits(&rec.id).await {
                            if let Err(e) = self.store.delete(&rec.id) {
                                tracing::warn!(job = %rec.id, error = %e, "cannot remove a refused job");
                            }
                            return err(format!("job {} refused: {why}", rec.name));
                        }
                        tracing::info!(job = %rec.id, name = %rec.name, by = %from.cert.name, "job submitted");
                        self.audit_line(
                            AuditEntry::new(AuditKind::JobEvent, "job_submitted")
                                .actor(actor(from))
                                .job(rec.id.clone())
                                .detail(json!({"name": rec.name})),
                        );
                        admin_json(json!({"job_id": rec.id, "name": rec.name}))
                    }
                    Err(e) => err(format!("{e}")),
                }
            }
            AdminRequest::List => admin_json(json!(self.store.list())),
            AdminRequest::Status { job: None } => {
                let sites: Vec<serde_json::Value> = self.sites_json();
                let jobs = self.store.list();
                let running = jobs.iter().filter(|j| j.state == JobState::Running).count();
                admin_json(json!({
                    "server": self.kit.name(),
                    "peer_id": self.net.local.to_string(),
                    "uptime_s": (now_ms() - self.started_ms) / 1000,
                    "jobs": jobs.len(),
                    "running": running,
                    "sites": sites,
                    "relay_circuits_opened": self.counters.relay_circuits_opened.load(Ordering::Relaxed),
                    "relay_circuits_closed": self.counters.relay_circuits_closed.load(Ordering::Relaxed),
                    "refused_commands": self.refusals.lock().map(|r| r.iter().cloned().collect::<Vec<_>>()).unwrap_or_default(),
                }))
            }
            AdminRequest::Status { job: Some(id) } => match self.store.record_json(&id) {
                Ok(json) => ControlResponse::Admin {
                    json,
                    files: BTreeMap::new(),
                },
                Err(e) => err(e.to_string()),
            },
            AdminRequest::Abort { job } => {
                let runner = self
                    .runners
                    .lock()
                    .ok()
                    .and_then(|r| r.get(&job).map(|r| (r.abort.clone(), r.aborted_by.clone())));
                match (runner, self.store.get(&job)) {
                    (Some((abort, by)), _) => {
                        if let Ok(mut b) = by.lock() {
                            *b = Some(from.cert.der.clone());
                        }
                        let _ = abort.send(true);
                        admin_json(json!({"job_id": job, "state": "aborting"}))
                    }
                    (None, Ok(rec)) if rec.state == JobState::Submitted => {
                        match self.store.set_state(
                            &job,
                            JobState::Aborted,
                            &format!("aborted by {}", from.cert.name),
                            now_ms(),
                        ) {
                            Ok(_) => admin_json(json!({"job_id": job, "state": "aborted"})),
                            Err(e) => err(e.to_string()),
                        }
                    }
                    // An ended job holds no site here, but a site that missed its end may
                    // still hold it: tell every site of the job to free it.
                    (None, Ok(rec)) if !rec.state.is_active() => {
                        let sites: Vec<String> = rec.sites.keys().cloned().collect();
                        let refused = self.stop_on_sites(&job, &sites, Some(&from.cert.der)).await;
                        admin_json(json!({
                            "job_id": job,
                            "state": rec.state,
                            "sites_told_to_free_it": sites,
                            "sites_refused": refused.into_iter().collect::<BTreeMap<_, _>>(),
                        }))
                    }
                    (None, Ok(rec)) => err(format!(
                        "job {job} is {} and cannot be aborted yet; try again",
                        rec.state
                    )),
                    (None, Err(e)) => err(e.to_string()),
                }
            }
            AdminRequest::Download { job } => self.download(&job),
            AdminRequest::Metrics { job } => match self.store.get(&job) {
                Ok(_) => admin_json(self.tracking.series(
                    &job,
                    &self.store.result_dir(&job),
                    &self.store.job_dir(&job),
                )),
                Err(e) => err(e.to_string()),
            },
            AdminRequest::Delete { job } => match self.store.delete(&job) {
                Ok(()) => admin_json(json!({"job_id": job, "deleted": true})),
                Err(e) => err(e.to_string()),
            },
            AdminRequest::Clone { job } => match self.store.clone_job(&job, now_ms()) {
                Ok(rec) => {
                    let src = self.store.job_dir(&job).with_file_name("submitter.der");
                    let dst = self.store.job_dir(&rec.id).with_file_name("submitter.der");
                    if let Err(e) = std::fs::copy(&src, &dst) {
                        return err(format!("{}: {e}", dst.display()));
                    }
                    admin_json(json!({"job_id": rec.id, "name": rec.name, "cloned_from": job}))
                }
                Err(e) => err(e.to_string()),
            },
            AdminRequest::Sites => admin_json(json!(self.sites_json())),
        }
    }

    /// A hub's region sites in the record of each tiered job it runs, as `region.site` (a
    /// nested region's, which the hub reports under their full names, as they are); a record
    /// is rewritten only when a state changed.
    fn record_region_sites(
        &self,
        hub: &str,
        held: &BTreeMap<String, u32>,
        regions: super::tier::RegionSites,
    ) {
        for (job, sites) in regions {
            if held.contains_key(&job) {
                self.record_region_job(hub, &job, sites);
            }
        }
    }

    /// One tiered job's region sites (a hub's heartbeat or answer) into its record while it
    /// runs.
    fn record_region_job(&self, hub: &str, job: &str, sites: BTreeMap<String, String>) {
        if !self.store.state(job).is_ok_and(|s| s.is_active())
            || !self
                .net
                .peers
                .by_name(hub)
                .is_some_and(|p| p.cert.role.kind() == RoleKind::Hub)
        {
            return;
        }
        // A hub's own sites get its region's name in front; those of regions nested in it
        // (`eu.de`, `eu.de.site-1` from hub `eu`) come named in full already.
        let inside = format!("{hub}.");
        let named: BTreeMap<String, String> = sites
            .into_iter()
            .take(MAX_REGION_SITES)
            .map(|(site, state)| {
                if site.starts_with(&inside) {
                    (site, state)
                } else {
                    (format!("{inside}{site}"), state)
                }
            })
            .collect();
        // A hub's region server reports them further up.
        if let Some(links) = &self.links {
            links.publish_nested(job, &named);
        }
        let changed = self
            .store
            .get(job)
            .is_ok_and(|r| named.iter().any(|(k, v)| r.sites.get(k) != Some(v)));
        if changed {
            let _ = self.store.update(job, |r| r.sites.extend(named.clone()));
        }
    }

    fn sites_json(&self) -> Vec<serde_json::Value> {
        let beats = self
            .heartbeats
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default();
        self.connected_sites()
            .into_iter()
            .map(|p| {
                let (last, jobs, _) = beats.get(&p.cert.name).cloned().unwrap_or_default();
                // Second processes with this site's kit, refused (see `net`'s module doc).
                let duplicates = self.net.duplicates.get(&p.peer).map(|d| {
                    json!({
                        "count": d.count,
                        "address": d.addr,
                        "last_ms_ago": now_ms().saturating_sub(d.last_ms),
                    })
                });
                json!({
                    "name": p.cert.name,
                    "org": p.cert.org,
                    "peer_id": p.peer.to_string(),
                    "connection": if p.relayed { "relayed" } else { "direct" },
                    "address": p.addr.to_string(),
                    "last_heartbeat_ms_ago": if last == 0 { serde_json::Value::Null } else { json!(now_ms().saturating_sub(last)) },
                    "jobs": jobs,
                    "duplicates": duplicates,
                })
            })
            .collect()
    }

    /// The result files of `job`, once it finished.
    fn result_files(&self, job: &str) -> Result<Vec<(download::FileEntry, PathBuf)>, String> {
        let rec = self.store.get(job).map_err(|e| e.to_string())?;
        if rec.state != JobState::Finished {
            return Err(format!(
                "job {job} is {}; results exist once it is finished",
                rec.state
            ));
        }
        let dir = self.store.result_dir(job);
        download::list_files(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))
    }

    /// Answers `download` with the file list (names and sizes); the admin then fetches the
    /// files over a download stream (`on_download_stream`), so results of any size fit.
    /// Checks an admin command against the server's own `local/authorization.json`, read
    /// again for each command (a changed file applies at once). A refusal names the right,
    /// the role and the rule; the last ones show in `admin status`.
    fn authorize(
        &self,
        from: &PeerInfo,
        role: AdminRole,
        right: Right,
        command: &str,
        job: Option<&str>,
    ) -> Result<(), String> {
        let user = Person {
            name: from.cert.name.clone(),
            org: from.cert.org.clone(),
            role,
        };
        let submitter = job.and_then(|id| self.submitter_of(id));
        let local = self
            .kit
            .participant_dir()
            .map(|d| d.join("local").join("authorization.json"))
            .unwrap_or_default();
        let decided = Authorization::load(&local)
            .map_err(|e| {
                format!(
                    "authorization: the server's policy is unreadable, so nothing is allowed: {e}"
                )
            })
            .and_then(|a| {
                a.check(
                    &Request {
                        user: &user,
                        right,
                        command,
                        site_org: self.kit.org(),
                        submitter: submitter.as_ref().map(|(n, o)| (n.as_str(), o.as_str())),
                    },
                    self.kit.name(),
                )
            });
        match decided {
            Ok(_) => Ok(()),
            Err(reason) => {
                tracing::warn!(admin = %from.cert.name, %command, %reason, "admin command refused");
                if let Ok(mut r) = self.refusals.lock() {
                    if r.len() == MAX_REFUSALS_SHOWN {
                        r.pop_front();
                    }
                    r.push_back(json!({
                        "at_ms": now_ms(),
                        "admin": from.cert.name,
                        "command": command,
                        "job": job,
                        "reason": reason,
                    }));
                }
                Err(reason)
            }
        }
    }

    /// A stored job's submitter: name and org, from the certificate kept beside it (checked
    /// as of the job's submission).
    fn submitter_of(&self, id: &str) -> Option<(String, String)> {
        let rec = self.store.get(id).ok()?;
        let der = std::fs::read(self.store.job_dir(id).with_file_name("submitter.der")).ok()?;
        let at = std::time::UNIX_EPOCH + Duration::from_millis(rec.submitted_ms);
        let cert = self.kit.root_ca.verify(&der, at).ok()?;
        Some((cert.name, cert.org))
    }

    /// Appends `line` to the audit log; a failure to write is logged, never fatal.
    fn audit_line(&self, line: AuditEntry) {
        if let Err(e) = self.audit.record(line) {
            tracing::error!(error = %e, "cannot write an audit line");
        }
    }

    fn download(&self, job: &str) -> ControlResponse {
        let files = match self.result_files(job) {
            Ok(f) => f,
            Err(e) => return err(e),
        };
        let list: Vec<&download::FileEntry> = files.iter().map(|(e, _)| e).collect();
        admin_json(json!({
            "job_id": job,
            "files": list.iter().map(|e| &e.name).collect::<Vec<_>>(),
            "sizes": list.iter().map(|e| e.size).collect::<Vec<_>>(),
            "stream": DOWNLOAD_PROTOCOL.as_ref(),
        }))
    }

    /// The admitted peer behind a `what` stream, if its role is one of `kinds`.
    fn admitted_as(
        &self,
        peer: PeerId,
        kinds: &[RoleKind],
        what: &str,
    ) -> anyhow::Result<PeerInfo> {
        let from = self
            .net
            .peers
            .get(&peer)
            .with_context(|| format!("{what} stream from {peer}, which is not admitted"))?;
        if !kinds.contains(&from.cert.role.kind()) {
            anyhow::bail!(
                "{what} stream from {} ({}), not {kinds:?}",
                from.cert.name,
                from.cert.role
            );
        }
        Ok(from)
    }

    /// Streams a finished job's result files, sealed, to the admin that asked.
    async fn on_download_stream(
        self: Arc<Self>,
        peer: PeerId,
        mut stream: libp2p::Stream,
    ) -> anyhow::Result<()> {
        let from = self.admitted_as(peer, &[RoleKind::Admin], "download")?;
        let req = download::read_request(&mut stream).await?;
        if let Role::Admin(role) = from.cert.role {
            self.authorize(
                &from,
                role,
                Right::DownloadJob,
                "download_job",
                Some(&req.job),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let files = self
            .result_files(&req.job)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let n = download::send_files(&mut stream, &self.sealing, &from, &req.job, &files).await?;
        tracing::info!(job = %req.job, admin = %from.cert.name, files = files.len(), bytes = n, "results downloaded");
        Ok(())
    }

    /// What a deploy sends: the stored job bundle and the submitting admin's certificate.
    fn deploy_parts(&self, id: &str) -> anyhow::Result<DeployParts> {
        let bundle = self.store.read_bundle_for_deploy(id)?;
        let cert_path = self.store.job_dir(id).with_file_name("submitter.der");
        let cert = std::fs::read(&cert_path).with_context(|| cert_path.display().to_string())?;
        Ok((
            bundle,
            cert,
            read_derivation(&self.store, id)?.map(Box::new),
        ))
    }

    /// Stores a job the hub derived from tier 1's under tier 1's id, with its submitter's
    /// certificate and the hub's signed record; the scheduler deploys it like any job.
    fn take_derived(&self, d: &DerivedJob) -> anyhow::Result<()> {
        // A hub that restarted takes the job again from tier 1: the region still runs it.
        if let Ok(state) = self.store.state(&d.id) {
            if state.is_active() {
                return Ok(());
            }
            anyhow::bail!("the region's job {} is {state}", d.id);
        }
        let submitter = self
            .kit
            .root_ca
            .verify(&d.submitter_cert, std::time::SystemTime::now())
            .context("the tier-1 submitter's certificate")?;
        let rec = self.store.submit_as(
            &d.id,
            &d.bundle,
            &submitter.name,
            &submitter.signing_public,
            now_ms(),
        )?;
        let dir = self.store.job_dir(&rec.id);
        std::fs::write(dir.with_file_name("submitter.der"), &d.submitter_cert)?;
        let bytes = flare_protocols::codec::encode(&d.derivation, MAX_DERIVATION_BYTES)?;
        std::fs::write(derivation_path(&self.store, &rec.id), bytes)?;
        self.note(
            &rec.id,
            format!(
                "derived from tier 1's job by {} for its region",
                self.kit.name()
            ),
        );
        tracing::info!(job = %rec.id, name = %rec.name, by = %submitter.name, "derived job stored");
        Ok(())
    }

    /// Writes a finished job's `metrics.json` into its result folder.
    fn write_metrics(&self, id: &str, result_dir: &std::path::Path) -> anyhow::Result<()> {
        let rec = self.store.get(id)?;
        let metrics = serde_json::to_vec_pretty(
            &json!({"job_id": id, "name": rec.name, "metrics": rec.metrics}),
        )?;
        std::fs::create_dir_all(result_dir)?;
        std::fs::write(result_dir.join("metrics.json"), metrics)?;
        if !rec.cross_site.is_empty() {
            // FLARE's layout: evaluator → model → metrics.
            std::fs::write(
                result_dir.join("cross_val_results.json"),
                serde_json::to_vec_pretty(&rec.cross_site)?,
            )?;
        }
        Ok(())
    }

    /// Deploys job `id` if its sites are connected and have room for it: whether it now
    /// holds a slot (dispatched, running); a job that must wait says why in its status.
    async fn try_deploy(self: Arc<Self>, id: &str) -> anyhow::Result<bool> {
        let job = load_job(&self.store, id)?;
        let connected = self.connected_sites();
        let all = job
            .meta
            .deploy_map
            .values()
            .any(|s| s.iter().any(|x| x == "@ALL"));
        let targets: Vec<PeerInfo> = connected
            .into_iter()
            .filter(|p| job.deploys_to(&p.cert.name))
            .collect();
        let names: Vec<&str> = targets.iter().map(|p| p.cert.name.as_str()).collect();
        let mandatory_ok = job
            .meta
            .mandatory_clients
            .iter()
            .all(|m| names.contains(&m.as_str()));
        if targets.len() < job.meta.min_clients || !mandatory_ok {
            // Wait for more sites, and say in the job's status what for.
            let why = self.waiting_for(&job.meta, &names, all);
            self.wait(id, why)?;
            return Ok(false);
        }
        match self.place(id, &job.meta, &targets).await {
            Placement::Fits => {}
            Placement::Wait(why) => {
                self.wait(id, why)?;
                return Ok(false);
            }
            Placement::Never(why) => {
                self.store.set_state(id, JobState::Failed, &why, now_ms())?;
                return Ok(false);
            }
        }
        self.store.update(id, |r| r.waiting = None)?;
        self.store.set_state(
            id,
            JobState::Dispatched,
            &format!("deploying to {}", names.join(", ")),
            now_ms(),
        )?;
        let (bundle, submitter_cert, derivation) = self.deploy_parts(id)?;
        let n = targets.len() as u32;
        let mut asks = Vec::new();
        for (i, p) in targets.iter().enumerate() {
            let req = ControlRequest::Deploy {
                job: id.to_string(),
                bundle: bundle.clone(),
                submitter_cert: ByteBuf::from(submitter_cert.clone()),
                site_index: i as u32,
                num_sites: n,
                derivation: derivation.clone(),
            };
            let net = self.net.clone();
            let peer = p.peer;
            asks.push(async move { net.request(peer, req).await });
        }
        let answers = futures::future::join_all(asks).await;
        let mut accepted = Vec::new();
        let audit_states = |states: &BTreeMap<String, String>| {
            self.audit_line(
                AuditEntry::new(AuditKind::JobEvent, "job_deployed")
                    .job(id)
                    .detail(json!({ "sites": states })),
            );
        };
        let mut states = BTreeMap::new();
        for (p, a) in targets.iter().zip(answers) {
            let state = match a {
                Ok(ControlResponse::Ok) => {
                    accepted.push(p.cert.name.clone());
                    "deployed".to_string()
                }
                Ok(ControlResponse::Refused { reason }) => format!("refused: {reason}"),
                Ok(ControlResponse::Error { reason }) => format!("error: {reason}"),
                Ok(other) => format!("error: unexpected answer {other:?}"),
                Err(e) => format!("error: {e}"),
            };
            states.insert(p.cert.name.clone(), state);
        }
        audit_states(&states);
        self.store.update(id, |r| r.sites = states.clone())?;
        let mandatory_ok = job
            .meta
            .mandatory_clients
            .iter()
            .all(|m| accepted.contains(m));
        if accepted.len() < job.meta.min_clients
            || !mandatory_ok
            || accepted.len() < job.server.sag.min_clients
        {
            let why = format!(
                "{} of {} sites accepted the job (min_clients {}): {:?}",
                accepted.len(),
                targets.len(),
                job.meta.min_clients.max(job.server.sag.min_clients),
                states
            );
            self.store.set_state(id, JobState::Failed, &why, now_ms())?;
            self.stop_on_sites(id, &accepted, None).await;
            return Ok(false);
        }
        self.store.set_state(
            id,
            JobState::Running,
            &format!("running on {}", accepted.join(", ")),
            now_ms(),
        )?;
        Arc::clone(&self).launch(id, job, accepted, false);
        Ok(true)
    }

    /// Runs a job's workflow on a task of its own: the server's controller for
    /// scatter-and-gather, a watcher for client-controlled workflows (`resume`: after a
    /// server restart, without configuring or starting the sites again).
    fn launch(self: Arc<Self>, id: &str, job: Job, accepted: Vec<String>, resume: bool) {
        let (results_tx, results_rx) = mpsc::channel(64);
        let (reports_tx, reports_rx) = mpsc::channel(256);
        let (abort_tx, abort_rx) = watch::channel(false);
        let aborted_by = Arc::new(Mutex::new(None));
        if let Ok(mut r) = self.runners.lock() {
            r.insert(
                id.to_string(),
                Runner {
                    results: results_tx,
                    reports: reports_tx,
                    abort: abort_tx,
                    aborted_by: Arc::clone(&aborted_by),
                },
            );
        }
        self.tracking.open(id, &job, &self.store.result_dir(id));
        let rounds = tracking::num_rounds(&job);
        let _ = self.store.update(id, |r| r.num_rounds = Some(rounds));
        let s = Arc::clone(&self);
        let id = id.to_string();
        tokio::spawn(async move {
            let outcome = match job.server.workflow {
                WorkflowSpec::ScatterAndGather => {
                    Arc::clone(&s)
                        .run_job(
                            &id,
                            job,
                            accepted.clone(),
                            resume,
                            region::Channels {
                                results: results_rx,
                                reports: reports_rx,
                                abort: abort_rx,
                            },
                        )
                        .await
                }
                WorkflowSpec::Swarm(_) | WorkflowSpec::Cyclic(_) => {
                    Arc::clone(&s)
                        .watch_ccwf(&id, &job, &accepted, resume, reports_rx, abort_rx)
                        .await
                }
                WorkflowSpec::Statistics(_) => {
                    Arc::clone(&s)
                        .run_stats(&id, &job, accepted.clone(), resume, results_rx, abort_rx)
                        .await
                }
            };
            if let Ok(mut r) = s.runners.lock() {
                r.remove(&id);
            }
            let (state, mut note) = match outcome {
                Ok((state, note)) => (state, note),
                Err(e) => (JobState::Failed, format!("{e:#}")),
            };
            tracing::info!(job = %id, %state, %note, "job ended");
            s.audit_line(
                AuditEntry::new(AuditKind::JobEvent, "job_ended")
                    .job(id.clone())
                    .detail(json!({"state": state, "note": note})),
            );
            // Free the sites first: a job submitted as soon as this one reads as ended must
            // not find them still busy with it. An admin's abort goes with the admin's
            // certificate: a site whose own rule refuses it keeps its part of the job.
            let by = aborted_by.lock().ok().and_then(|b| b.clone());
            if state == JobState::Aborted
                && let Some(admin) = by
                    .as_deref()
                    .and_then(|d| s.kit.root_ca.verify(d, std::time::SystemTime::now()).ok())
            {
                note = format!("{note} ({} of {})", admin.name, admin.org);
            }
            for (site, why) in s.stop_on_sites(&id, &accepted, by.as_deref()).await {
                note.push_str(&format!("; {site} refused to stop: {why}"));
            }
            // The metric files are complete before the job reads as ended (and downloadable).
            s.tracking.close(&id);
            let _ = s.store.set_state(&id, state, &note, now_ms());
        });
    }

    /// The run's sites as the other sites need them: PeerId and listen addresses.
    fn peer_entries(&self, sites: &[String]) -> Vec<PeerEntry> {
        let beats = self
            .heartbeats
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default();
        sites
            .iter()
            .filter_map(|name| {
                let p = self.net.peers.by_name(name)?;
                let addrs = beats
                    .get(name)
                    .map(|b| dialable(&b.2, &p))
                    .unwrap_or_default();
                Some(PeerEntry {
                    name: name.clone(),
                    peer_id: p.peer.to_string(),
                    addrs,
                })
            })
            .collect()
    }

    /// Appends a note to a running job's history.
    fn note(&self, id: &str, note: String) {
        let _ = self.store.update(id, |r| {
            r.history.push(crate::store::StatusEntry {
                at_ms: now_ms(),
                state: r.state,
                note,
            });
        });
    }

    /// Appends `note` to the job's history unless it is there already: a site sends a report
    /// again when its acknowledgement was lost, and the history keeps one line for it.
    fn note_once(&self, id: &str, note: String) -> Result<(), crate::store::StoreError> {
        self.store.update(id, |r| {
            if !r.history.iter().any(|h| h.note == note) {
                r.history.push(crate::store::StatusEntry {
                    at_ms: now_ms(),
                    state: r.state,
                    note,
                });
            }
        })?;
        Ok(())
    }

    /// Deploys job `id` to the site `name` again (the site's index among the job's
    /// `num_sites`); a site that holds the job already answers at once.
    async fn redeploy(
        &self,
        id: &str,
        name: &str,
        index: usize,
        num_sites: usize,
    ) -> anyhow::Result<()> {
        let p = self
            .net
            .peers
            .by_name(name)
            .with_context(|| format!("{name} is not connected"))?;
        let (bundle, submitter_cert, derivation) = self.deploy_parts(id)?;
        let req = ControlRequest::Deploy {
            job: id.to_string(),
            bundle,
            submitter_cert: ByteBuf::from(submitter_cert),
            site_index: index as u32,
            num_sites: num_sites as u32,
            derivation,
        };
        match self.net.request(p.peer, req).await? {
            ControlResponse::Ok => Ok(()),
            ControlResponse::Refused { reason } => anyhow::bail!("refused: {reason}"),
            ControlResponse::Error { reason } => anyhow::bail!("{reason}"),
            other => anyhow::bail!("deploy answered {other:?}"),
        }
    }

    /// Tells `sites` to stop job `id`; `by` is the certificate of the admin who aborted it.
    /// Returns the sites that refused, with their reasons.
    async fn stop_on_sites(
        &self,
        id: &str,
        sites: &[String],
        by: Option<&[u8]>,
    ) -> Vec<(String, String)> {
        let mut refused = Vec::new();
        for name in sites {
            if let Some(p) = self.net.peers.by_name(name) {
                let answer = self
                    .net
                    .request(
                        p.peer,
                        ControlRequest::AbortJob {
                            job: id.to_string(),
                            by: by.map(|b| ByteBuf::from(b.to_vec())),
                        },
                    )
                    .await;
                if let Ok(ControlResponse::Refused { reason }) = answer {
                    tracing::warn!(job = %id, site = %name, %reason, "a site refused to stop the job");
                    refused.push((name.clone(), reason));
                }
            }
        }
        refused
    }

    /// Tells a job's runner that a transfer from `site` could not be stored (a full disk,
    /// say). It was not acknowledged, so the site sends it again. An upload's failure is noted
    /// as a failed write is; a result reaches the controller as an error result, excluded
    /// with the reason (the site's retry is then a duplicate).
    async fn spool_failed(&self, site: &str, e: &bulk::BulkError) {
        let bulk::BulkError::Spool {
            job,
            kind,
            task_name,
            task_id,
            round,
            reason,
        } = e
        else {
            return;
        };
        tracing::error!(%job, %site, %kind, error = %reason, "transfer not stored");
        let runner = self
            .runners
            .lock()
            .ok()
            .and_then(|r| r.get(job).map(|r| (r.results.clone(), r.reports.clone())));
        let Some((results, reports)) = runner else {
            return;
        };
        match kind.as_str() {
            "upload" => {
                let event = WfEvent::StoreFailed(task_name.clone(), reason.clone());
                reports.send((site.to_string(), event)).await.ok();
            }
            "result" => {
                let result = TaskResult {
                    task_id: flare_protocols::TaskId(*task_id),
                    round: *round,
                    data: Shareable::error(
                        flare_protocols::ReturnCode::ExecutionException,
                        format!("the server could not store the result: {reason}"),
                    ),
                };
                results.send((site.to_string(), result, None)).await.ok();
            }
            _ => {}
        }
    }

    /// `runner`, or, where the job has none because it has ended (or never was), `None`
    /// after telling the sender so: it stops sending it again. A job still `running` in the
    /// store without a runner (a server that has just restarted) is not refused.
    async fn refuse_if_ended<T>(
        &self,
        runner: Option<T>,
        job: &str,
        stream: &mut libp2p::Stream,
    ) -> Option<T> {
        if runner.is_none() && !self.store.state(job).is_ok_and(JobState::is_active) {
            let _ = bulk::refuse(stream).await;
        }
        runner
    }

    async fn on_result_stream(
        self: Arc<Self>,
        peer: PeerId,
        mut stream: libp2p::Stream,
    ) -> anyhow::Result<()> {
        let from = self.admitted_as(peer, &SITE_KINDS, "bulk")?;
        // Results and uploads go to disk as they arrive: the server never holds one whole.
        let spool = self.store.spool_file()?;
        let got =
            match bulk::receive_spooled(&mut stream, &self.sealing, &from, MAX_RESULT_MODEL, spool)
                .await
            {
                Ok(got) => got,
                Err(e @ bulk::BulkError::Spool { .. }) => {
                    self.spool_failed(&from.cert.name, &e).await;
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            };
        if got.header.kind == "upload" {
            let stem = got.meta.task_name.as_str();
            if !matches!(stem, "global_final" | "best") {
                anyhow::bail!("{} uploaded an unknown file {stem:?}", from.cert.name);
            }
            let tx = self
                .runners
                .lock()
                .ok()
                .and_then(|r| r.get(&got.header.job).map(|r| r.reports.clone()));
            let tx = self
                .refuse_if_ended(tx, &got.header.job, &mut stream)
                .await
                .with_context(|| {
                    format!("upload for job {} that is not running", got.header.job)
                })?;
            let model = got.stored.context("upload without a model")?;
            let dir = self.store.result_dir(&got.header.job);
            let stored = std::fs::create_dir_all(&dir)
                .with_context(|| dir.display().to_string())
                .and_then(|()| {
                    crate::model_io::write_ref(
                        &dir.join(format!("{stem}.safetensors")),
                        &ModelRef::Stored(Arc::new(model)),
                    )
                    .map_err(anyhow::Error::from)
                });
            // Only a stored model is acknowledged: without the ack the site sends it again.
            let event = match &stored {
                Ok(()) => {
                    bulk::acknowledge(&mut stream).await?;
                    WfEvent::Uploaded(stem.to_string())
                }
                Err(e) => WfEvent::StoreFailed(stem.to_string(), format!("{e:#}")),
            };
            tx.send((from.cert.name.clone(), event)).await.ok();
            return stored.with_context(|| format!("storing {stem} from {}", from.cert.name));
        }
        if got.header.kind != "result" {
            anyhow::bail!(
                "unexpected {} transfer from {}",
                got.header.kind,
                from.cert.name
            );
        }
        let tx = self
            .runners
            .lock()
            .ok()
            .and_then(|r| r.get(&got.header.job).map(|r| r.results.clone()));
        let tx = self
            .refuse_if_ended(tx, &got.header.job, &mut stream)
            .await
            .with_context(|| format!("result for job {} that is not running", got.header.job))?;
        let result = TaskResult {
            task_id: flare_protocols::TaskId(got.meta.task_id),
            round: got.meta.round,
            data: Shareable {
                headers: got.meta.headers,
                return_code: got.meta.return_code,
                model: None,
            },
        };
        let model = got.stored.map(|m| ModelRef::Stored(Arc::new(m)));
        tx.send((from.cert.name.clone(), result, model)).await.ok();
        bulk::acknowledge(&mut stream).await?;
        Ok(())
    }
}

/// The listen addresses a site announced, as other sites can dial them: an unspecified IP
/// (a site listening on `0.0.0.0` or `::`) is replaced by the IP the site's connection to
/// this server comes from, unless that connection is relayed.
fn dialable(announced: &[String], site: &PeerInfo) -> Vec<String> {
    use libp2p::multiaddr::Protocol;
    let observed = if site.relayed {
        None
    } else {
        site.addr.iter().find_map(|p| match p {
            Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
            Protocol::Ip6(ip) => Some(std::net::IpAddr::V6(ip)),
            _ => None,
        })
    };
    announced
        .iter()
        .map(|a| {
            let (Ok(addr), Some(ip)) = (a.parse::<libp2p::Multiaddr>(), observed) else {
                return a.clone();
            };
            addr.iter()
                .map(|p| match (p, ip) {
                    (Protocol::Ip4(x), std::net::IpAddr::V4(o)) if x.is_unspecified() => {
                        Protocol::Ip4(o)
                    }
                    (Protocol::Ip6(x), std::net::IpAddr::V6(o)) if x.is_unspecified() => {
                        Protocol::Ip6(o)
                    }
                    (p, _) => p,
                })
                .collect::<libp2p::Multiaddr>()
                .to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use flare_crypto::{Identity, Role};

    use super::*;

    fn site(addr: &str, relayed: bool) -> PeerInfo {
        let id = Identity::generate(&ring::rand::SystemRandom::new()).unwrap();
        let mut p = crate::net::test_peer_info(&id, Role::Server);
        p.relayed = relayed;
        p.addr = addr.parse().unwrap();
        p
    }

    /// A hub of a region below counts as a site of the tier-1 server; nothing else new does.
    #[test]
    fn hubs_are_sites_of_the_server_above() {
        use flare_crypto::AdminRole;
        assert!(is_site(Role::Client));
        assert!(is_site(Role::Hub));
        for other in [
            Role::Server,
            Role::Relay,
            Role::Admin(AdminRole::ProjectAdmin),
        ] {
            assert!(!is_site(other), "{other}");
        }
    }

    #[test]
    fn unspecified_listen_addresses_get_the_observed_ip() {
        let announced = vec![
            "/ip4/0.0.0.0/tcp/9100".to_string(),
            "/ip4/10.1.2.3/tcp/9100".to_string(),
            "/ip6/::/tcp/9100".to_string(),
            "not an address".to_string(),
        ];
        let direct = site("/ip4/192.168.7.9/tcp/41234", false);
        assert_eq!(
            dialable(&announced, &direct),
            [
                "/ip4/192.168.7.9/tcp/9100",
                "/ip4/10.1.2.3/tcp/9100",
                "/ip6/::/tcp/9100",
                "not an address"
            ]
        );
        let v6 = site("/ip6/fd00::5/tcp/41234", false);
        assert_eq!(dialable(&announced, &v6)[2], "/ip6/fd00::5/tcp/9100");
        // A relayed connection's address is the relay's, not the site's: left alone.
        let relayed = site("/ip4/192.168.7.9/tcp/41234", true);
        assert_eq!(dialable(&announced, &relayed), announced);
    }
}
