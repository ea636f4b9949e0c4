//! The site-side driver of client-controlled workflows (swarm): runs one [`ClientWorkflow`]
//! state machine per job and carries out what it asks.
//!
//! - Peer messages go sealed to the receiving site over bulk streams (`bulk::deliver`), with
//!   the model beside them; the site is connected first with `connect_peer` (direct, then the
//!   server's relay). A delivery that fails for good reports the peer down to the workflow.
//!   A message whose model is already on its way to that peer is dropped, as if lost: the
//!   workflows resend what they miss, and a resend of a large model while the first copy is
//!   still streaming (a peer asking again because its copy has not arrived) would start one
//!   more whole transfer, and one more file at the receiver, per resend interval.
//! - The site's job filters apply to models between sites as FLARE's apply to tasks: its
//!   `task_result_filters` to a model it sends, its `task_data_filters` to one it receives,
//!   for the stage's task (`train` in swarm and cyclic, `validate` in cross-site evaluation).
//!   A model a filter refuses is not sent, or is dropped on arrival, with an error in the log.
//! - Local tasks run on the job's learner on a blocking thread, one at a time.
//! - Reports go to the server over the control protocol through a bounded queue that keeps
//!   them, in order, while the server is away, and delivers them when it is back.
//! - Models the workflow persists are written under `<site>/jobs/<job>/models/`; the final
//!   and best models of result clients are also uploaded to the server's job store.
//! - Large models live in files, not memory: large peer models arrive spooled (the site's
//!   `on_stream`), a task's result of at least [`FILE_BACKED_BYTES`] is spooled before the
//!   workflow holds it, and a persisted model that large is handed back to the workflow as
//!   the file just written ([`ClientWorkflow::replace_model`]). A task loads its model once,
//!   for the learner, and that copy is the learner's to train in place.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flare_protocols::codec::{decode, encode};
use flare_protocols::model::FLModel;
use flare_protocols::shareable::{ReturnCode, Shareable};
use flare_protocols::stored::ModelRef;
use flare_protocols::time::Time;
use flare_protocols::workflows::ccwf::{
    Action, ClientWorkflow, Epoch, Input, ModelSlot, Report, ReportEvent,
};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, watch};

use crate::filters::FilterChains;
use crate::learner::{Learner, execute};
use crate::model_io::{FILE_BACKED_BYTES, Spool};
use crate::net::NetHandle;
use crate::net::bulk::{self, Body, Route, Sealing, TransferMeta};
use crate::net::connect::connect_peer;
use crate::net::protocol::{ControlRequest, ControlResponse, PeerEntry};

/// Largest workflow message (CBOR), models excluded.
pub const MAX_WORKFLOW_MSG: usize = 1 << 20;
/// Reports kept while the server is away; the oldest are dropped beyond this.
const REPORT_QUEUE: usize = 4096;
/// How many times (a second apart) a report the server refuses is tried again before it is
/// dropped.
const REFUSALS_KEPT: u32 = 60;
/// How long a report waits for the metrics logged before it to be acknowledged.
const METRICS_BEFORE_REPORT: Duration = Duration::from_secs(5);
/// How long a peer connection may take (direct, relay, hole punching).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What reaches a job's workflow task from the rest of the site.
#[derive(Debug)]
pub enum Inbound {
    /// A sealed peer message: sender name, CBOR body, model.
    Message {
        /// Sender's participant name.
        from: String,
        /// The CBOR message.
        body: Vec<u8>,
        /// The model that came with it (spooled to a file, or in memory).
        model: Option<ModelRef>,
    },
    /// The server's start, with the initial model when the workflow takes one (swarm).
    Start(Option<FLModel>),
    /// A peer's connection state changed.
    Peer {
        /// Participant name.
        name: String,
        /// Reachable again (true) or gone (false).
        up: bool,
    },
}

/// Everything a workflow task needs from its site.
pub struct Context {
    /// The network.
    pub net: NetHandle,
    /// This site's sealing state.
    pub sealing: Sealing,
    /// Job id.
    pub job: String,
    /// Workflow name bound into sealed transfers.
    pub workflow: &'static str,
    /// This site's name.
    pub me: String,
    /// The server's PeerId and dialable addresses (for the relay circuit).
    pub server: (PeerId, Vec<Multiaddr>),
    /// The other sites.
    pub peers: Vec<PeerEntry>,
    /// The job's learner.
    pub learner: Arc<Mutex<Box<dyn Learner>>>,
    /// `<site>/jobs/<job>`.
    pub job_dir: PathBuf,
    /// Sites that receive the final and best models (they upload them to the server).
    pub result_clients: Vec<String>,
    /// Where large models are spooled.
    pub spool: Arc<Spool>,
    /// The site's filters on models going to and coming from other sites.
    pub filters: Arc<FilterChains>,
    /// The task name the filters are chosen by.
    pub filter_task: &'static str,
    /// The site's privacy scope's result filters, on its own training results as the learner
    /// returns them (before the workflow sends one or aggregates it itself).
    pub own_result: Arc<FilterChains>,
    /// The job's metric queue: a report waits (bounded) until what the learner logged before
    /// it is acknowledged, so the server has a round's metrics when it hears of the round.
    pub metrics: Option<Arc<crate::tracking::MetricQueue>>,
    /// The site's audit log, for the workflow's own lines (this site aggregated a round, an
    /// aggregator was replaced).
    pub audit: crate::audit::WorkflowAudit,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("job", &self.job)
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Context {
    fn peer(&self, name: &str) -> Option<(PeerId, Vec<Multiaddr>)> {
        let e = self.peers.iter().find(|p| p.name == name)?;
        let id: PeerId = e.peer_id.parse().ok()?;
        let addrs = e.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        Some((id, addrs))
    }

    fn circuit(&self, to: PeerId) -> Option<Multiaddr> {
        let (server, addrs) = &self.server;
        // `addrs` already end in /p2p/<server>.
        let base = addrs.first()?.clone();
        let base = match base.iter().last() {
            Some(Protocol::P2p(_)) => base,
            _ => base.with(Protocol::P2p(*server)),
        };
        Some(base.with(Protocol::P2pCircuit).with(Protocol::P2p(to)))
    }
}

/// Sends one message (and model) to the site `to`, connecting first; returns whether it was
/// delivered.
async fn send_to(
    ctx: &Context,
    to: &str,
    body: Vec<u8>,
    model: Option<ModelRef>,
) -> anyhow::Result<()> {
    let (peer, addrs) = ctx
        .peer(to)
        .ok_or_else(|| anyhow::anyhow!("{to} is not a site of this run"))?;
    let info = match ctx.net.peers.get(&peer) {
        Some(p) => p,
        None => {
            let circuit = ctx.circuit(peer);
            connect_peer(&ctx.net, peer, &addrs, circuit.as_ref(), CONNECT_TIMEOUT).await?
        }
    };
    let (route, meta) = message_transfer(&ctx.job, ctx.workflow, body);
    bulk::deliver_body(
        &ctx.net,
        &ctx.sealing,
        &info,
        &route,
        &meta,
        model.as_ref().map(Body::of),
    )
    .await?;
    Ok(())
}

/// The route and header of a sealed workflow message (`body`, CBOR) of job `job`'s stage
/// `stage`, between sites or from the server (a hub's start of a region swarm).
pub(crate) fn message_transfer(job: &str, stage: &str, body: Vec<u8>) -> (Route, TransferMeta) {
    let meta = TransferMeta {
        task_id: 0,
        task_name: "ccwf".into(),
        round: 0,
        return_code: ReturnCode::Ok,
        headers: Default::default(),
        skeleton: None,
        body: Some(ByteBuf::from(body)),
        resume: None,
    };
    let route = Route {
        job: job.to_string(),
        workflow: stage.into(),
        round: 0,
        kind: "ccwf".into(),
    };
    (route, meta)
}

/// Uploads a final or best model to the server's job store.
async fn upload(ctx: &Context, slot: &ModelSlot, model: &ModelRef) -> anyhow::Result<()> {
    let server = ctx
        .net
        .peers
        .get(&ctx.server.0)
        .ok_or_else(|| anyhow::anyhow!("the server is not connected"))?;
    let meta = TransferMeta {
        task_id: 0,
        task_name: slot.file_stem(),
        round: 0,
        return_code: ReturnCode::Ok,
        headers: Default::default(),
        skeleton: None,
        body: None,
        resume: None,
    };
    let route = Route {
        job: ctx.job.clone(),
        workflow: ctx.workflow.into(),
        round: 0,
        kind: "upload".into(),
    };
    bulk::deliver_body(
        &ctx.net,
        &ctx.sealing,
        &server,
        &route,
        &meta,
        Some(Body::of(model)),
    )
    .await?;
    Ok(())
}

/// Delivers reports to the server in order, holding them while it is away.
async fn reporter(ctx: Arc<Context>, mut rx: mpsc::Receiver<Report>) {
    let mut queue: std::collections::VecDeque<Report> = Default::default();
    let mut refusals = 0u32;
    loop {
        if queue.is_empty() {
            match rx.recv().await {
                Some(r) => queue.push_back(r),
                None => return,
            }
        }
        while let Ok(r) = rx.try_recv() {
            if queue.len() >= REPORT_QUEUE {
                queue.pop_front();
            }
            queue.push_back(r);
        }
        let Some(r) = queue.front().cloned() else {
            continue;
        };
        if let Some(m) = &ctx.metrics {
            m.flushed(METRICS_BEFORE_REPORT).await;
        }
        let req = ControlRequest::WorkflowReport {
            job: ctx.job.clone(),
            report: r,
        };
        match ctx.net.request(ctx.server.0, req).await {
            Ok(ControlResponse::Ok) => {
                queue.pop_front();
                refusals = 0;
            }
            // A server that has just come back refuses requests until it has admitted this
            // site again and watches the job again: keep the report a while.
            Ok(other) if refusals < REFUSALS_KEPT => {
                refusals += 1;
                tracing::debug!(job = %ctx.job, answer = ?other, "report refused; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(other) => {
                tracing::warn!(job = %ctx.job, answer = ?other, "report refused; dropped");
                queue.pop_front();
                refusals = 0;
            }
            Err(e) => {
                tracing::debug!(job = %ctx.job, error = %e, queued = queue.len(), "server away; report kept");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The steps of a report that the site's audit log keeps: rounds it aggregated (who was in,
/// who was pruned) and aggregators replaced.
fn audit_report(audit: &crate::audit::WorkflowAudit, r: &flare_protocols::workflows::ccwf::Report) {
    use flare_protocols::workflows::ccwf::ReportEvent;
    match &r.event {
        ReportEvent::Aggregated {
            accepted, pruned, ..
        } => audit.event(
            "aggregated",
            Some(serde_json::json!({
                "epoch": r.epoch.to_string(),
                "accepted": accepted,
                "pruned": pruned,
            })),
        ),
        ReportEvent::Unmasked { survivors, dropped } => audit.event(
            "unmasked",
            Some(serde_json::json!({
                "epoch": r.epoch.to_string(),
                "survivors": survivors,
                "dropped": dropped,
            })),
        ),
        ReportEvent::Retried { reason, next } => audit.event(
            "retried",
            Some(serde_json::json!({
                "epoch": r.epoch.to_string(),
                "reason": reason,
                "next": next,
            })),
        ),
        ReportEvent::Reelected { previous, next } => audit.event(
            "reelected",
            Some(serde_json::json!({
                "epoch": r.epoch.to_string(),
                "previous": previous,
                "next": next,
            })),
        ),
        _ => {}
    }
}

/// A peer's model through the site's task data filters, held as the workflow should.
fn receive_filtered(ctx: &Context, model: ModelRef) -> anyhow::Result<ModelRef> {
    match ctx.filters.task_data_ref(ctx.filter_task, model)? {
        ModelRef::Memory(m) => hold(ctx, m),
        stored => Ok(stored),
    }
}

/// A (peer, model) pair being delivered, the model by the identity of its shared copy (held
/// by the delivering task, so it cannot be freed and reused meanwhile); released on drop.
struct InFlight {
    set: Arc<Mutex<HashSet<(String, usize)>>>,
    key: (String, usize),
}

impl InFlight {
    /// Claims (`to`, `model`); `None` when it is already being delivered.
    fn claim(
        set: &Arc<Mutex<HashSet<(String, usize)>>>,
        to: &str,
        model: &ModelRef,
    ) -> Option<Self> {
        let key = (to.to_string(), model.identity());
        let fresh = set
            .lock()
            .map(|mut s| s.insert(key.clone()))
            .unwrap_or(true);
        fresh.then(|| InFlight {
            set: Arc::clone(set),
            key,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.lock() {
            s.remove(&self.key);
        }
    }
}

/// `model` as the workflow should hold it: in a spooled file when large, else in memory.
fn hold(ctx: &Context, model: Arc<FLModel>) -> anyhow::Result<ModelRef> {
    ctx.spool
        .hold(model)
        .map_err(|e| anyhow::anyhow!("spooling a model of job {}: {e}", ctx.job))
}

/// Runs one local task: loads its model (the one copy the learner trains), runs the learner,
/// and holds the result's model as the workflow should ([`hold`]).
fn run_task(
    ctx: &Context,
    mut task: flare_protocols::Task,
    model: Option<ModelRef>,
) -> (flare_protocols::TaskResult, Option<ModelRef>) {
    let fail = |task_id, round, reason: String| {
        let data = Shareable::error(ReturnCode::ExecutionException, reason);
        let r = flare_protocols::TaskResult {
            task_id,
            round,
            data,
        };
        (r, None)
    };
    if let Some(m) = model {
        match m.load() {
            Ok(m) => task.data.model = Some(m),
            Err(e) => {
                return fail(
                    task.id,
                    task.round,
                    format!("cannot read the task's model: {e}"),
                );
            }
        }
    }
    let name = task.name.clone();
    let mut r = match ctx.learner.lock() {
        Ok(mut l) => execute(l.as_mut(), task),
        Err(_) => {
            let reason = "a previous task of this job panicked".to_string();
            return fail(task.id, task.round, reason);
        }
    };
    let Some(m) = r.data.model.take() else {
        return (r, None);
    };
    let m = if r.data.return_code == ReturnCode::Ok && ctx.own_result.has_task_result(&name) {
        match super::policy::filter_own_result(
            &ctx.own_result,
            &name,
            &ctx.me,
            Arc::unwrap_or_clone(m),
        ) {
            Ok(m) => Arc::new(m),
            Err(why) => {
                tracing::error!(job = %ctx.job, task = %name, error = %why, "task result refused");
                return fail(r.task_id, r.round, why);
            }
        }
    } else {
        m
    };
    match hold(ctx, m) {
        Ok(m) => (r, Some(m)),
        Err(e) => {
            tracing::error!(job = %ctx.job, error = %format!("{e:#}"), "cannot spool a task's result");
            fail(r.task_id, r.round, format!("{e:#}"))
        }
    }
}

/// Runs `wf` for the job in `ctx` until `stop` turns true. `start` turns the server's start
/// (with the initial model, for a workflow that takes one) into the workflow's input.
pub async fn run<W>(
    ctx: Arc<Context>,
    mut wf: W,
    start: fn(Option<ModelRef>) -> Input<W::Msg>,
    mut inbound: mpsc::Receiver<Inbound>,
    mut stop: watch::Receiver<bool>,
) where
    W: ClientWorkflow + Send + 'static,
    W::Msg: Send + 'static,
{
    let epoch = Instant::now();
    let now = || Time::from_duration(epoch.elapsed());
    let (self_tx, mut self_rx) = mpsc::channel::<Input<W::Msg>>(256);
    let (report_tx, report_rx) = mpsc::channel::<Report>(1024);
    let in_flight: Arc<Mutex<HashSet<(String, usize)>>> = Default::default();
    tokio::spawn(reporter(Arc::clone(&ctx), report_rx));
    let tasks = Arc::new(tokio::sync::Mutex::new(()));
    let mut down: HashMap<String, bool> = HashMap::new();
    // The epoch of the latest report, for reports the driver makes itself.
    let mut last_epoch = Epoch::new(0, 0);
    loop {
        while let Some(a) = wf.poll_action() {
            match a {
                Action::Send { to, msg, model } => {
                    let body = match encode(&msg, MAX_WORKFLOW_MSG) {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::error!(job = %ctx.job, error = %e, "cannot encode a workflow message");
                            continue;
                        }
                    };
                    let flying = match &model {
                        Some(m) => match InFlight::claim(&in_flight, &to, m) {
                            Some(g) => Some(g),
                            None => {
                                tracing::debug!(job = %ctx.job, peer = %to, "model already on its way; message dropped");
                                continue;
                            }
                        },
                        None => None,
                    };
                    let (c, tx) = (Arc::clone(&ctx), self_tx.clone());
                    tokio::spawn(async move {
                        // Released when this task ends, however it ends.
                        let _flying = flying;
                        let model = match model {
                            Some(m) if c.filters.has_task_result(c.filter_task) => {
                                let c2 = Arc::clone(&c);
                                let filtered = tokio::task::spawn_blocking(move || {
                                    c2.filters
                                        .task_result_ref(c2.filter_task, m)
                                        .map_err(|e| e.to_string())
                                })
                                .await
                                .unwrap_or_else(|e| Err(e.to_string()));
                                match filtered {
                                    Ok(m) => Some(m),
                                    Err(e) => {
                                        tracing::error!(job = %c.job, peer = %to, error = %e, "the task result filter refused a model; message not sent");
                                        return;
                                    }
                                }
                            }
                            m => m,
                        };
                        if let Err(e) = send_to(&c, &to, body, model).await {
                            tracing::warn!(job = %c.job, peer = %to, error = %format!("{e:#}"), "message not delivered");
                            let _ = tx.send(Input::PeerDown(to)).await;
                        }
                    });
                }
                Action::RunTask { task, model } => {
                    let (c, tx, lock) = (Arc::clone(&ctx), self_tx.clone(), Arc::clone(&tasks));
                    tokio::spawn(async move {
                        let _one_at_a_time = lock.lock().await;
                        let r =
                            tokio::task::spawn_blocking(move || run_task(&c, task, model)).await;
                        if let Ok((r, m)) = r {
                            let _ = tx.send(Input::TaskDone(r, m)).await;
                        }
                    });
                }
                Action::Report(r) => {
                    audit_report(&ctx.audit, &r);
                    last_epoch = r.epoch;
                    if report_tx.try_send(r).is_err() {
                        tracing::warn!(job = %ctx.job, "report queue full; report dropped");
                    }
                }
                Action::Persist { slot, mut model } => {
                    let path = ctx
                        .job_dir
                        .join("models")
                        .join(format!("{}.safetensors", slot.file_stem()));
                    let save = |m: ModelRef, p: PathBuf| {
                        tokio::task::spawn_blocking(move || crate::model_io::write_held(&p, &m))
                    };
                    // A large model in memory is written now, and the workflow holds the
                    // file from then on (its queued sends included), so memory lets it go.
                    let large = model
                        .in_memory()
                        .is_some_and(|m| m.num_bytes() as u64 >= FILE_BACKED_BYTES);
                    let mut early = None;
                    if large {
                        let wrote = match save(model.clone(), path.clone()).await {
                            Ok(Ok(Some(s))) => {
                                let stored = ModelRef::Stored(Arc::new(s));
                                wf.replace_model(&model, &stored);
                                model = stored;
                                Ok(Ok(None))
                            }
                            other => other,
                        };
                        early = Some(wrote);
                    }
                    let (c, reports, epoch) = (Arc::clone(&ctx), report_tx.clone(), last_epoch);
                    tokio::spawn(async move {
                        let wrote = match early {
                            Some(w) => w,
                            None => save(model.clone(), path.clone()).await,
                        };
                        let failed = match wrote {
                            Ok(Ok(_)) => {
                                tracing::info!(job = %c.job, path = %path.display(), "model saved");
                                None
                            }
                            Ok(Err(e)) => Some(format!("{}: {e:#}", path.display())),
                            Err(e) => Some(format!("the model writer failed: {e}")),
                        };
                        if let Some(reason) = failed {
                            // The slot's older file is not this model: remove it, so that a
                            // later stage (a cross-site evaluation) never takes it for the
                            // current one, and tell the server.
                            let stale = match std::fs::remove_file(&path) {
                                Ok(()) => "; the older file was removed",
                                Err(_) => "",
                            };
                            tracing::error!(job = %c.job, path = %path.display(), error = %reason, "cannot save a model{stale}");
                            let event = ReportEvent::PersistFailed {
                                slot: slot.clone(),
                                reason: format!("{reason}{stale}"),
                            };
                            if reports.send(Report { epoch, event }).await.is_err() {
                                tracing::warn!(job = %c.job, "the report of a failed save was dropped");
                            }
                        }
                        if matches!(slot, ModelSlot::Final | ModelSlot::Best)
                            && c.result_clients.contains(&c.me)
                        {
                            for attempt in 0..30 {
                                match upload(&c, &slot, &model).await {
                                    Ok(()) => break,
                                    Err(e)
                                        if matches!(
                                            e.downcast_ref::<bulk::BulkError>(),
                                            Some(bulk::BulkError::Refused)
                                        ) =>
                                    {
                                        tracing::info!(job = %c.job, slot = %slot.file_stem(), "the job has ended on the server; upload dropped");
                                        break;
                                    }
                                    Err(e) => {
                                        tracing::warn!(job = %c.job, attempt, error = %format!("{e:#}"), "upload to the server failed; retrying");
                                        tokio::time::sleep(Duration::from_secs(2)).await;
                                    }
                                }
                            }
                        }
                    });
                }
                Action::Finished(outcome) => {
                    tracing::info!(job = %ctx.job, ?outcome, "workflow finished on this site");
                }
            }
        }
        let wait = wf
            .poll_timeout()
            .map_or(Duration::from_secs(5), |t| t.saturating_since(now()));
        tokio::select! {
            m = inbound.recv() => match m {
                Some(Inbound::Message { from, body, model }) => match decode::<W::Msg>(&body, MAX_WORKFLOW_MSG) {
                    Ok(msg) => match model.map(|m| tokio::task::block_in_place(|| receive_filtered(&ctx, m))).transpose() {
                        Ok(model) => wf.handle(now(), Input::Message { from, msg, model }),
                        Err(e) => tracing::error!(job = %ctx.job, peer = %from, error = %format!("{e:#}"), "a model from a peer was refused by the task data filter; message dropped"),
                    },
                    Err(e) => tracing::warn!(job = %ctx.job, peer = %from, error = %e, "malformed workflow message dropped"),
                },
                Some(Inbound::Start(model)) => {
                    let model = match model.map(|m| hold(&ctx, Arc::new(m))).transpose() {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::error!(job = %ctx.job, error = %format!("{e:#}"), "cannot hold the initial model; the start is ignored");
                            continue;
                        }
                    };
                    wf.handle(now(), start(model))
                }
                Some(Inbound::Peer { name, up }) => {
                    let was_down = down.insert(name.clone(), !up).unwrap_or(false);
                    if up && was_down {
                        wf.handle(now(), Input::PeerUp(name));
                    } else if !up {
                        wf.handle(now(), Input::PeerDown(name));
                    }
                }
                None => break,
            },
            Some(i) = self_rx.recv() => {
                if let Input::PeerDown(n) = &i {
                    down.insert(n.clone(), true);
                }
                wf.handle(now(), i);
            }
            _ = tokio::time::sleep(wait) => wf.handle_timeout(now()),
            _ = stop.changed() => break,
        }
    }
    tracing::info!(job = %ctx.job, "workflow stopped");
}
