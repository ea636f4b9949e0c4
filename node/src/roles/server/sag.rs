//! The server's side of scatter-and-gather: drives the job's `ScatterGather` controller,
//! sends its tasks to the sites as sealed bulk streams, records its events in the job store,
//! and persists the global model each round so that a restarted server resumes the run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use flare_protocols::aggregators::Aggregator;
use flare_protocols::shareable::{ReturnCode, Shareable, Task, TaskResult};
use flare_protocols::stored::ModelRef;
use flare_protocols::time::Time;
use flare_protocols::workflows::scatter_gather::{Event, Output, ScatterGather};
use tokio::sync::{mpsc, watch};

use super::region::Channels;
use super::{Server, WORKFLOW};
use crate::filters::{FilterChains, TaskDataOnce};
use crate::job::Job;
use crate::net::bulk::{self, Route, TransferMeta};
use crate::store::JobState;

/// How long a run resumed after a server restart waits for its sites to come back.
const RESUME_WAIT: Duration = Duration::from_secs(30);
/// How much longer it waits for the others once `min_clients` sites are back.
const RESUME_GRACE: Duration = Duration::from_secs(5);
/// How long tier 1 waits for a disconnected hub before it counts the region as failed for the
/// round.
const REGION_AWAY: Duration = Duration::from_secs(20);

impl Server {
    /// Drives one job's controller until it finishes, aborts, or an admin stops it; with
    /// `resume` (the server restarted while the job ran), from the round after its last
    /// persisted one. At the end each site's state in the record says how it took part.
    pub(super) async fn run_job(
        self: Arc<Self>,
        id: &str,
        job: Job,
        sites: Vec<String>,
        resume: bool,
        ch: Channels,
    ) -> anyhow::Result<(JobState, String)> {
        let mut took_part = BTreeMap::new();
        let outcome = self
            .drive(id, &job, sites, resume, ch, &mut took_part)
            .await;
        let end = job.server.sag.start_round + job.server.sag.num_rounds;
        let state = match &outcome {
            Ok((s, _)) => *s,
            Err(_) => JobState::Failed,
        };
        let _ = self.store.update(id, |r| {
            for (site, (round, accepted, what)) in &took_part {
                let line = if *accepted && *round == end && state == JobState::Finished {
                    "finished".to_string()
                } else if state == JobState::Aborted {
                    format!("aborted (round {round}: {what})")
                } else {
                    format!("round {round}: {what}")
                };
                r.sites.insert(site.clone(), line);
            }
        });
        outcome
    }

    /// The controller of a new run, or of a resumed one: its sites back (waiting up to
    /// [`RESUME_WAIT`] for them), the job deployed to them again (a no-op at a site that
    /// still holds it), and the run continued after the last persisted round.
    async fn controller(
        &self,
        id: &str,
        job: &Job,
        sites: Vec<String>,
        resume: bool,
    ) -> anyhow::Result<ScatterGather> {
        let cfg = job.server.sag.clone();
        let aggregator = Aggregator::new(job.server.aggregator);
        crate::aggregators::check_clients(
            Path::new("config_fed_server"),
            "aggregator",
            &job.server.aggregator,
            sites.len(),
        )?;
        if !resume {
            let c = ScatterGather::new(cfg, sites, job.server.initial_model()?)?;
            return with_secagg(c.with_aggregator(aggregator)?, job, id);
        }
        let rec = self.store.get(id)?;
        let (next, model) = match rec.snapshot_round {
            None => (cfg.start_round, job.server.initial_model()?.into()),
            Some(r) => {
                let path = self.snapshot_path(id, job, r);
                let model = crate::model_io::open(&path)
                    .with_context(|| format!("the snapshot of round {r} to resume from"))?;
                (r + 1, ModelRef::Stored(Arc::new(model)))
            }
        };
        // Every site, or once min_clients are back a little longer for the others.
        let mut deadline = Instant::now() + RESUME_WAIT;
        let back = loop {
            let back: Vec<String> = sites
                .iter()
                .filter(|s| self.net.peers.by_name(s).is_some())
                .cloned()
                .collect();
            if back.len() >= cfg.min_clients {
                deadline = deadline.min(Instant::now() + RESUME_GRACE);
            }
            if back.len() == sites.len() || Instant::now() >= deadline {
                break back;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let mut ready = Vec::new();
        for name in back {
            let index = sites.iter().position(|s| *s == name).unwrap_or(0);
            match self.redeploy(id, &name, index, sites.len()).await {
                Ok(()) => ready.push(name),
                Err(e) => self.note(id, format!("{name} could not take the job again: {e:#}")),
            }
        }
        if ready.len() < cfg.min_clients {
            anyhow::bail!(
                "the server restarted; {} of the job's sites ({}) came back within {RESUME_WAIT:?} and took the job, min_clients is {}",
                ready.len(),
                sites.join(", "),
                cfg.min_clients
            );
        }
        self.note(
            id,
            format!(
                "the server restarted; the run resumes at round {next} on {}",
                ready.join(", ")
            ),
        );
        let c = ScatterGather::resume(cfg, ready, model, next)?.with_aggregator(aggregator)?;
        with_secagg(c, job, id)
    }

    /// Where the global model after `round` is kept for a resume: the persistor's round file
    /// when it saves every round, else a snapshot beside the job's record.
    fn snapshot_path(&self, id: &str, job: &Job, round: u32) -> PathBuf {
        if job.server.persistor.save_every_round {
            self.store
                .result_dir(id)
                .join(format!("models/round-{round:03}.safetensors"))
        } else {
            self.store
                .job_dir(id)
                .with_file_name(format!("snapshot-{round:03}.safetensors"))
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn drive(
        self: &Arc<Self>,
        id: &str,
        job: &Job,
        sites: Vec<String>,
        resume: bool,
        ch: Channels,
        took_part: &mut BTreeMap<String, (u32, bool, String)>,
    ) -> anyhow::Result<(JobState, String)> {
        let result_dir = self.store.result_dir(id);
        std::fs::create_dir_all(result_dir.join("models"))
            .with_context(|| result_dir.display().to_string())?;
        if job.server.tiered.is_some()
            && let Some(links) = self.links.clone()
            && self.is_derived(id)
        {
            return self
                .drive_region(id, job, sites, &links, ch, took_part)
                .await;
        }
        let Channels {
            mut results,
            mut abort,
            ..
        } = ch;
        let ctrl = tokio::select! {
            c = self.controller(id, job, sites, resume) => c?,
            _ = abort.changed() => return Ok((JobState::Aborted, "aborted by an admin".into())),
        };
        self.drive_controller(
            id,
            job,
            ctrl,
            &mut results,
            &mut abort,
            took_part,
            &mut |_| {},
        )
        .await
    }

    /// Whether `id` is a job a hub derived for its region.
    pub(super) fn is_derived(&self, id: &str) -> bool {
        super::derivation_path(&self.store, id).exists()
    }

    /// Drives one controller to its end: tasks out, results in, events recorded (and shown to
    /// `observe`), until it finishes or aborts, or an admin aborts the job.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn drive_controller(
        self: &Arc<Self>,
        id: &str,
        job: &Job,
        mut ctrl: ScatterGather,
        results: &mut mpsc::Receiver<(String, TaskResult, Option<ModelRef>)>,
        abort: &mut watch::Receiver<bool>,
        took_part: &mut BTreeMap<String, (u32, bool, String)>,
        observe: &mut (dyn FnMut(&Event) + Send),
    ) -> anyhow::Result<(JobState, String)> {
        let result_dir = self.store.result_dir(id);
        // The global model is kept on disk from the start: tasks are sent from the file.
        if ctrl.global().in_memory().is_some() {
            let path = self.initial_path(id);
            crate::model_io::write_ref(&path, ctrl.global())?;
            let stored = crate::model_io::open(&path)?;
            ctrl.replace_global(ModelRef::Stored(Arc::new(stored)))?;
        }
        let epoch = Instant::now();
        let now = || Time::from_duration(epoch.elapsed());
        let filters = &job.server.filters;
        // Each site's last task (id and name): a result's filters are chosen by task name.
        let mut asked: BTreeMap<String, (u64, String)> = BTreeMap::new();
        // The last task model filtered, so one round's sends filter the global model once.
        let mut filtered = TaskDataOnce::default();
        // Tier 1 of a tiered job counts a hub that stays disconnected as a failed region for
        // the round, and deploys the job again to a hub that restarted without it.
        let tier1 = job.server.tiered.is_some() && !self.is_derived(id);
        let since_ms = super::now_ms();
        let mut away: BTreeMap<String, Instant> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        ctrl.start(now());
        loop {
            while let Some(out) = ctrl.poll_output() {
                match out {
                    Output::Send { to, task, model } => {
                        asked.insert(to.clone(), (task.id.0, task.name.clone()));
                        let model = match tokio::task::block_in_place(|| {
                            filtered.task_data(filters, &task.name, model)
                        }) {
                            Ok(m) => m,
                            Err(reason) => {
                                tracing::error!(job = %id, site = %to, task = %task.name, error = %reason, "task data filter failed; the task fails for this site");
                                let failed = TaskResult {
                                    task_id: task.id,
                                    round: task.round,
                                    data: Shareable::error(
                                        ReturnCode::ExecutionException,
                                        format!(
                                            "the server's task data filter for {to} failed: {reason}"
                                        ),
                                    ),
                                };
                                ctrl.handle_result_ref(now(), &to, failed, None);
                                continue;
                            }
                        };
                        let s = Arc::clone(self);
                        let id = id.to_string();
                        tokio::spawn(async move {
                            if tier1 && s.lost_job(&id, &to, since_ms) {
                                s.note(
                                    &id,
                                    format!(
                                        "{to} came back without the job; it is deployed to it again"
                                    ),
                                );
                                if let Err(e) = s.redeploy(&id, &to, 0, 1).await {
                                    tracing::warn!(job = %id, hub = %to, error = %format!("{e:#}"), "redeploy failed");
                                }
                            }
                            if let Err(e) =
                                s.send_task(&id, WORKFLOW, &to, task, Some(&model)).await
                            {
                                tracing::warn!(job = %id, site = %to, error = %format!("{e:#}"), "task not delivered");
                            }
                        });
                    }
                    Output::Event(ev) => {
                        observe(&ev);
                        let aggregated = match &ev {
                            Event::RoundAggregated { round, .. } => Some(*round),
                            _ => None,
                        };
                        if let Some(end) = self.on_job_event(id, job, &result_dir, ev, took_part)? {
                            return Ok(end);
                        }
                        // The new global model was persisted: hold the file, not the tensors.
                        if let Some(round) = aggregated {
                            let path = self.snapshot_path(id, job, round);
                            let stored = crate::model_io::open(&path)?;
                            ctrl.replace_global(ModelRef::Stored(Arc::new(stored)))?;
                        }
                    }
                }
            }
            if ctrl.is_done() {
                return Ok((
                    JobState::Failed,
                    "the controller stopped without an outcome".into(),
                ));
            }
            let wait = ctrl
                .poll_timeout()
                .map_or(Duration::from_secs(1), |t| t.saturating_since(now()));
            tokio::select! {
                r = results.recv() => match r {
                    // Folding a stored result reads it from disk: off the async workers.
                    Some((site, result, model)) => tokio::task::block_in_place(|| {
                        let task = asked
                            .get(&site)
                            .filter(|(t, _)| *t == result.task_id.0)
                            .map(|(_, name)| name.as_str());
                        if job.server.tiered.is_some() {
                            self.record_region_answer(id, &site, &result);
                        }
                        let (result, model) = filter_result(filters, task, &site, result, model);
                        if result.data.return_code != ReturnCode::Ok {
                            tracing::debug!(job = %id, %site, reason = ?result.data.error_reason(), "failed result");
                        }
                        ctrl.handle_result_ref(now(), &site, result, model)
                    }),
                    None => return Ok((JobState::Failed, "result channel closed".into())),
                },
                _ = tokio::time::sleep(wait) => ctrl.handle_timeout(now()),
                _ = tick.tick(), if tier1 => {
                    for (hub, (task_id, _)) in &asked {
                        if self.net.peers.by_name(hub).is_some() {
                            away.remove(hub);
                            continue;
                        }
                        let since = *away.entry(hub.clone()).or_insert_with(Instant::now);
                        if since.elapsed() >= REGION_AWAY {
                            // An answer already in makes this a dropped duplicate.
                            let gone = TaskResult {
                                task_id: flare_protocols::shareable::TaskId(*task_id),
                                round: ctrl.round(),
                                data: Shareable::error(
                                    ReturnCode::ExecutionException,
                                    format!("region {hub} is away: its hub has been disconnected for {REGION_AWAY:?}"),
                                ),
                            };
                            ctrl.handle_result_ref(now(), hub, gone, None);
                        }
                    }
                }
                _ = abort.changed() => return Ok((JobState::Aborted, "aborted by an admin".into())),
            }
        }
    }

    /// The region sites' states a hub's answer names (`tier::REGION_SITES_HEADER`), into the
    /// job's record as `region.site`.
    fn record_region_answer(&self, id: &str, hub: &str, result: &TaskResult) {
        let Some(flare_protocols::MetaValue::Text(json)) = result
            .data
            .headers
            .get(super::super::tier::REGION_SITES_HEADER)
        else {
            return;
        };
        let Ok(sites) = serde_json::from_str::<BTreeMap<String, String>>(json) else {
            tracing::warn!(job = %id, %hub, "unreadable region site states");
            return;
        };
        self.record_region_job(hub, id, sites);
    }

    /// Whether `site` has heartbeated since `since_ms` without holding job `id`: it restarted
    /// and lost it.
    fn lost_job(&self, id: &str, site: &str, since_ms: u64) -> bool {
        self.heartbeats.lock().is_ok_and(|h| {
            h.get(site)
                .is_some_and(|(at, jobs, _)| *at > since_ms && !jobs.contains_key(id))
        })
    }

    /// Records what the controller reports (`took_part`: each site's last round, whether its
    /// result was accepted, and what happened); returns the job's end state when it ends.
    fn on_job_event(
        &self,
        id: &str,
        job: &Job,
        result_dir: &std::path::Path,
        ev: Event,
        took_part: &mut BTreeMap<String, (u32, bool, String)>,
    ) -> anyhow::Result<Option<(JobState, String)>> {
        match ev {
            Event::RoundStarted { round, clients } => {
                tracing::info!(job = %id, round, clients, "round started");
                self.store.set_round(id, round)?;
            }
            Event::ModelEvaluated { version, metrics } => {
                tracing::info!(job = %id, version, ?metrics, "global model evaluated");
                self.tracking.global(id, version, &metrics);
                self.store.add_metrics(id, version, metrics)?;
            }
            Event::RoundAggregated {
                round,
                model,
                accepted,
                ..
            } => {
                tracing::info!(job = %id, round, accepted, "round aggregated");
                // The model is persisted before the record names it, so a resume never
                // finds a round without its model.
                let path = self.snapshot_path(id, job, round);
                crate::model_io::write_ref(&path, &model)?;
                drop(model);
                // `round` counts the rounds done: N after N rounds, as for swarm.
                self.store.set_snapshot(id, round)?;
                if !job.server.persistor.save_every_round && round > 0 {
                    let _ = std::fs::remove_file(self.snapshot_path(id, job, round - 1));
                }
            }
            Event::ResultExcluded {
                client,
                reason,
                round,
                ..
            } => {
                tracing::warn!(job = %id, %client, round, %reason, "result excluded");
                self.note(
                    id,
                    format!("round {round}: the result of {client} was excluded: {reason}"),
                );
                took_part.insert(client, (round, false, format!("result excluded: {reason}")));
            }
            Event::TimedOut { clients, round } => {
                tracing::warn!(job = %id, round, ?clients, "sites timed out");
                for c in clients {
                    took_part.insert(c, (round, false, "timed out".into()));
                }
            }
            Event::ResultDropped { client, reason, .. } => {
                tracing::warn!(job = %id, %client, ?reason, "result dropped");
            }
            Event::ResultAccepted { client, round, .. } => {
                took_part.insert(client, (round, true, "result accepted".into()));
            }
            Event::Finished { model } => {
                crate::model_io::write_ref(&result_dir.join("global_final.safetensors"), &model)?;
                let _ = std::fs::remove_file(self.initial_path(id));
                self.write_metrics(id, result_dir)?;
                if !job.server.persistor.save_every_round
                    && let Some(r) = self.store.get(id)?.snapshot_round
                {
                    let _ = std::fs::remove_file(self.snapshot_path(id, job, r));
                }
                return Ok(Some((JobState::Finished, "finished".into())));
            }
            Event::Aborted { reason, .. } => return Ok(Some((JobState::Failed, reason))),
        }
        Ok(None)
    }

    /// Where a new run's initial model is kept while the run needs it.
    fn initial_path(&self, id: &str) -> PathBuf {
        self.store.job_dir(id).with_file_name("initial.safetensors")
    }

    /// Sends `task` of `workflow` to `site`: its headers in the transfer's meta, with `model`
    /// when the task carries one (a statistics task carries none).
    pub(super) async fn send_task(
        &self,
        id: &str,
        workflow: &str,
        site: &str,
        task: Task,
        model: Option<&ModelRef>,
    ) -> anyhow::Result<()> {
        let to = self
            .net
            .peers
            .by_name(site)
            .with_context(|| format!("site {site} is not connected"))?;
        let meta = TransferMeta {
            task_id: task.id.0,
            task_name: task.name.clone(),
            round: task.round,
            return_code: task.data.return_code,
            headers: task.data.headers.clone(),
            skeleton: None,
            body: None,
            resume: None,
        };
        let route = Route {
            job: id.to_string(),
            workflow: workflow.into(),
            round: u64::from(task.round),
            kind: "task".into(),
        };
        bulk::deliver_body(
            &self.net,
            &self.sealing,
            &to,
            &route,
            &meta,
            model.map(bulk::Body::of),
        )
        .await?;
        Ok(())
    }
}

/// The controller with the job's secure aggregation, if it asks for it; the neighbour graphs
/// and round contexts come from a fresh OS-random seed, so a resumed run never reuses a key.
fn with_secagg(c: ScatterGather, job: &Job, id: &str) -> anyhow::Result<ScatterGather> {
    match &job.server.secagg {
        None => Ok(c),
        Some(args) => Ok(c.with_secagg(*args, id, super::super::instance_id()?)?),
    }
}

/// A site's result once the server's task result filters ran on its model: unchanged when it
/// is an error, carries no model, or answers no task of ours (the controller drops it); an
/// error result naming the filter and the site when a filter fails.
fn filter_result(
    filters: &FilterChains,
    task: Option<&str>,
    site: &str,
    result: TaskResult,
    model: Option<ModelRef>,
) -> (TaskResult, Option<ModelRef>) {
    let Some(task) = task.filter(|t| filters.has_task_result(t)) else {
        return (result, model);
    };
    let Some(m) = model.filter(|_| result.data.return_code == ReturnCode::Ok) else {
        return (result, None);
    };
    match filters.task_result_ref(task, m) {
        Ok(m) => (result, Some(m)),
        Err(e) => {
            tracing::warn!(%site, %task, error = %e, "task result filter failed");
            let failed = TaskResult {
                data: Shareable::error(
                    ReturnCode::ExecutionException,
                    format!("the server's task result filter failed on the result of {site}: {e}"),
                ),
                ..result
            };
            (failed, None)
        }
    }
}
