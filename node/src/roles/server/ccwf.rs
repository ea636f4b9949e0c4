//! The server's side of client-controlled jobs (swarm, cyclic, then a cross-site
//! evaluation): configures and starts each stage on the sites, watches their reports into
//! the job store, re-admits sites that restarted, and decides when a stage has ended.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flare_protocols::workflows::ccwf::{ModelSlot, Outcome, Report, ReportEvent};
use tokio::sync::{mpsc, watch};

use super::{SITE_GONE_AFTER, Server, WfEvent};

/// How long a stage whose sites have all finished waits for the final model to be stored
/// (a result client retries an upload the server could not store) before it fails.
const FINAL_MODEL_WAIT: Duration = Duration::from_secs(60);
use crate::job::{Job, WorkflowSpec};
use crate::net::protocol::{ControlRequest, ControlResponse, EvaluationStage};
use crate::roles::now_ms;
use crate::store::JobState;

impl Server {
    /// Configures the sites of a client-controlled job for a stage (the training workflow,
    /// or with `evaluation` its cross-site evaluation) and starts it on `starters` (the first
    /// that accepts; every one with `all`). Returns why it could not start.
    #[allow(clippy::too_many_arguments)]
    async fn start_stage(
        &self,
        id: &str,
        sites: &[String],
        seed: u64,
        evaluation: Option<&EvaluationStage>,
        configure_min: usize,
        starters: &[String],
        all: bool,
    ) -> Result<(), String> {
        let configured = self.configure_on(id, sites, seed, evaluation, None).await;
        if configured.len() < configure_min {
            return Err(format!(
                "{} of {} sites configured, configure_min_clients is {configure_min}",
                configured.len(),
                sites.len()
            ));
        }
        let what = if evaluation.is_some() {
            "cross-site evaluation"
        } else {
            "workflow"
        };
        self.note(
            id,
            format!("{what} configured on {}", configured.join(", ")),
        );
        let mut started = Vec::new();
        for c in starters.iter().filter(|c| configured.contains(c)) {
            let Some(p) = self.net.peers.by_name(c) else {
                continue;
            };
            let req = ControlRequest::StartWorkflow {
                job: id.to_string(),
            };
            if let Ok(ControlResponse::Ok) = self.net.request(p.peer, req).await {
                started.push(c.clone());
                if !all {
                    break;
                }
            }
        }
        if started.is_empty() {
            return Err(format!("no starting client accepted the {what}'s start"));
        }
        self.note(id, format!("{what} started on {}", started.join(", ")));
        Ok(())
    }

    /// Configures a client-controlled workflow of job `id` on every connected one of `sites`
    /// (its training workflow, its cross-site `evaluation`, or a tiered job's region swarm for
    /// global round `region_round`); returns the sites that took it.
    pub(super) async fn configure_on(
        &self,
        id: &str,
        sites: &[String],
        seed: u64,
        evaluation: Option<&EvaluationStage>,
        region_round: Option<u32>,
    ) -> Vec<String> {
        let peers = self.peer_entries(sites);
        let asks = sites.iter().filter_map(|name| {
            let p = self.net.peers.by_name(name)?;
            let req = ControlRequest::Configure {
                job: id.to_string(),
                peers: peers.clone(),
                seed,
                rejoin: false,
                evaluation: evaluation.cloned(),
                region_round,
            };
            let net = self.net.clone();
            let name = name.clone();
            Some(async move { (name, net.request(p.peer, req).await) })
        });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(|(n, a)| match a {
                Ok(ControlResponse::Ok) => Some(n),
                other => {
                    tracing::warn!(job = %id, site = %n, answer = ?other, "site not configured");
                    None
                }
            })
            .collect()
    }

    /// Runs a client-controlled job: configures and starts its workflow on its sites (unless
    /// `resume`), watches it, then does the same for its cross-site evaluation if it has one.
    /// The watcher records the sites' reports, re-admits restarted sites, and ends a stage
    /// when every site has finished or gone (and, for training, the final model was
    /// uploaded), when a site reports failure, or after `progress_timeout` without a report.
    pub(super) async fn watch_ccwf(
        self: Arc<Self>,
        id: &str,
        job: &Job,
        sites: &[String],
        resume: bool,
        mut events: mpsc::Receiver<(String, WfEvent)>,
        mut abort: watch::Receiver<bool>,
    ) -> anyhow::Result<(JobState, String)> {
        let seed = crate::simulator::seed_of(id);
        let mut sorted = sites.to_vec();
        sorted.sort();
        let (progress_timeout, configure_min, starters) = match &job.server.workflow {
            WorkflowSpec::Swarm(args) => {
                let cfg = args.to_config(sites, seed)?;
                let starters: Vec<String> = args
                    .starting_client
                    .iter()
                    .chain(&cfg.aggr_clients)
                    .cloned()
                    .collect();
                (args.progress_timeout, args.configure_min_clients, starters)
            }
            WorkflowSpec::Cyclic(args) => {
                let cfg = args.to_config(&sorted, seed)?;
                let first = cfg.starting_client.unwrap_or(sorted[0].clone());
                (
                    args.progress_timeout,
                    args.configure_min_clients,
                    vec![first],
                )
            }
            WorkflowSpec::ScatterAndGather | WorkflowSpec::Statistics(_) => {
                anyhow::bail!("not a client-controlled job")
            }
        };
        let configure_min = configure_min.unwrap_or(sites.len());
        let rec = self.store.get(id)?;
        let mut stage = (rec.stage > 0).then(|| EvaluationStage {
            global_holder: rec.global_holder.clone(),
        });
        if resume {
            self.note(id, "the server restarted; watching the run again".into());
        }
        if stage.is_none() {
            if !resume
                && let Err(why) = self
                    .start_stage(id, sites, seed, None, configure_min, &starters, false)
                    .await
            {
                return Ok((JobState::Failed, why));
            }
            let mut holders = BTreeMap::new();
            let watched = Arc::clone(&self)
                .watch_stage(
                    id,
                    &job.server.workflow,
                    sites,
                    seed,
                    None,
                    progress_timeout,
                    &mut events,
                    &mut abort,
                    &mut holders,
                )
                .await?;
            let Some(args) = &job.server.evaluation else {
                return Ok(watched);
            };
            if watched.0 != JobState::Finished {
                return Ok(watched);
            }
            let holder = holders
                .get(&ModelSlot::Best.file_stem())
                .or(holders.get(&ModelSlot::Final.file_stem()))
                .cloned();
            self.store.update(id, |r| {
                r.stage = 1;
                r.global_holder = holder.clone();
            })?;
            let ev = EvaluationStage {
                global_holder: holder,
            };
            let need = args.evaluators.len().max(1).min(sites.len());
            if let Err(why) = self
                .start_stage(id, sites, seed, Some(&ev), need, sites, true)
                .await
            {
                return Ok((JobState::Failed, why));
            }
            stage = Some(ev);
        }
        let Some(args) = &job.server.evaluation else {
            anyhow::bail!("the job is in its cross-site evaluation but has none");
        };
        let mut holders = BTreeMap::new();
        Arc::clone(&self)
            .watch_stage(
                id,
                &job.server.workflow,
                sites,
                seed,
                stage.as_ref(),
                args.progress_timeout,
                &mut events,
                &mut abort,
                &mut holders,
            )
            .await
    }

    /// Watches one stage of a client-controlled job until it ends; `holders` collects which
    /// site uploaded which model first.
    #[allow(clippy::too_many_arguments)]
    async fn watch_stage(
        self: Arc<Self>,
        id: &str,
        workflow: &WorkflowSpec,
        sites: &[String],
        seed: u64,
        evaluation: Option<&EvaluationStage>,
        progress_timeout: f64,
        events: &mut mpsc::Receiver<(String, WfEvent)>,
        abort: &mut watch::Receiver<bool>,
        holders: &mut BTreeMap<String, String>,
    ) -> anyhow::Result<(JobState, String)> {
        let started_ms = now_ms();
        let progress_timeout =
            Duration::try_from_secs_f64(progress_timeout).unwrap_or(Duration::from_secs(3600));
        let mut last_progress = Instant::now();
        let mut finished: BTreeMap<String, String> = BTreeMap::new();
        let mut rejoined: HashMap<String, Instant> = HashMap::new();
        let mut seen: HashMap<String, Instant> =
            sites.iter().map(|s| (s.clone(), Instant::now())).collect();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        let result_dir = self.store.result_dir(id);
        let cyclic = evaluation.is_none() && matches!(workflow, WorkflowSpec::Cyclic(_));
        // Sites away longer than SITE_GONE_AFTER, with the state they had.
        let mut away: BTreeMap<String, String> = BTreeMap::new();
        // Since when every site has finished while the final model is still missing, and
        // the last reason a model could not be stored.
        let mut done_without_model: Option<Instant> = None;
        let mut store_failure: Option<String> = None;
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some((site, WfEvent::Report(r, ack))) => {
                        // A keep-alive is no progress: progress_timeout holds in every state.
                        if r.event != ReportEvent::Alive {
                            last_progress = Instant::now();
                        }
                        self.on_report(id, cyclic, &site, r, &mut finished)?;
                        let _ = ack.send(());
                    }
                    Some((site, WfEvent::Uploaded(stem))) => {
                        last_progress = Instant::now();
                        self.note(id, format!("{site} uploaded {stem}"));
                        holders.entry(stem).or_insert(site);
                    }
                    Some((site, WfEvent::StoreFailed(stem, why))) => {
                        let line = format!("the server could not store {stem} from {site}: {why}");
                        tracing::error!(job = %id, %site, %stem, error = %why, "upload not stored");
                        self.note_once(id, format!("{line}; the site sends it again"))?;
                        store_failure = Some(line);
                    }
                    None => return Ok((JobState::Failed, "report channel closed".into())),
                },
                _ = tick.tick() => {
                    if last_progress.elapsed() > progress_timeout {
                        let why = store_failure.as_deref().map(|f| format!("; {f}")).unwrap_or_default();
                        self.mark_left(id, &away);
                        return Ok((JobState::Failed, format!("no progress for {progress_timeout:?} (progress_timeout){why}")));
                    }
                    self.rejoin_restarted(id, sites, seed, started_ms, evaluation, &mut rejoined).await;
                }
                _ = abort.changed() => return Ok((JobState::Aborted, "aborted by an admin".into())),
            }
            if let Some((site, why)) = finished.iter().find(|(_, v)| v.starts_with("failed")) {
                return Ok((JobState::Failed, format!("{site}: {why}")));
            }
            // A site still counts until it has been away for SITE_GONE_AFTER: one that is
            // reconnecting (after this server restarted) still has reports queued.
            for s in sites {
                if self.net.peers.by_name(s).is_some() {
                    seen.insert(s.clone(), Instant::now());
                }
            }
            self.track_away(id, sites, &seen, &finished, &mut away)?;
            let all_done = sites.iter().all(|s| {
                finished.contains_key(s)
                    || seen.get(s).is_none_or(|t| t.elapsed() > SITE_GONE_AFTER)
            });
            let have_model =
                evaluation.is_some() || holders.contains_key(&ModelSlot::Final.file_stem());
            if have_model && all_done {
                self.mark_left(id, &away);
                self.write_metrics(id, &result_dir)?;
                return Ok((JobState::Finished, "finished".into()));
            }
            // Every site is done but the final model never came (its uploads could not be
            // stored, or no result client had it): give the uploads a while, then fail.
            if all_done {
                let since = *done_without_model.get_or_insert_with(Instant::now);
                if since.elapsed() > FINAL_MODEL_WAIT {
                    self.mark_left(id, &away);
                    let why =
                        store_failure.unwrap_or_else(|| "no result client uploaded it".into());
                    return Ok((
                        JobState::Failed,
                        format!(
                            "every site finished but the final model was not stored within {FINAL_MODEL_WAIT:?}: {why}"
                        ),
                    ));
                }
            }
        }
    }

    /// Marks a site of the run that has been away for [`SITE_GONE_AFTER`] (and has not
    /// finished) as `away` in the job's status, and puts its state back when it returns.
    fn track_away(
        &self,
        id: &str,
        sites: &[String],
        seen: &HashMap<String, Instant>,
        finished: &BTreeMap<String, String>,
        away: &mut BTreeMap<String, String>,
    ) -> Result<(), crate::store::StoreError> {
        for s in sites {
            let gone = seen.get(s).is_none_or(|t| t.elapsed() > SITE_GONE_AFTER);
            if gone && !finished.contains_key(s) && !away.contains_key(s) {
                let before = self
                    .store
                    .get(id)?
                    .sites
                    .get(s)
                    .cloned()
                    .unwrap_or_default();
                self.store.update(id, |r| {
                    r.sites.insert(s.clone(), format!("away (last: {before})"));
                })?;
                away.insert(s.clone(), before);
            } else if !gone && let Some(before) = away.remove(s) {
                self.store.update(id, |r| {
                    if r.sites.get(s).is_some_and(|st| st.starts_with("away")) {
                        r.sites.insert(s.clone(), before);
                    }
                })?;
            }
        }
        Ok(())
    }

    /// At the end of a stage, a site still away has left the run.
    fn mark_left(&self, id: &str, away: &BTreeMap<String, String>) {
        if away.is_empty() {
            return;
        }
        let _ = self.store.update(id, |r| {
            for (s, before) in away {
                r.sites.insert(s.clone(), format!("left (last: {before})"));
            }
        });
    }

    /// Records one report of a client-controlled job (`cyclic`: an `Aggregated` report is a
    /// hop trained by one site).
    fn on_report(
        &self,
        id: &str,
        cyclic: bool,
        site: &str,
        r: Report,
        finished: &mut BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        match r.event {
            ReportEvent::Aggregated {
                accepted,
                pruned,
                version,
                metrics,
                best,
                ..
            } => {
                tracing::info!(job = %id, %site, epoch = %r.epoch, ?metrics, "round aggregated");
                let round = r.epoch.round;
                let best_note = best
                    .map(|b| {
                        format!(
                            "; best: version {} ({:.4}) held by {}",
                            b.version, b.metric, b.holder
                        )
                    })
                    .unwrap_or_default();
                let mut fresh = false;
                self.store.update(id, |rec| {
                    fresh = rec.metrics.get(&version) != Some(&metrics);
                    rec.metrics.insert(version, metrics.clone());
                    rec.round = Some(round.max(rec.round.unwrap_or(0)));
                })?;
                // A report sent again (its acknowledgement was lost) is not plotted twice.
                if fresh {
                    self.tracking.global(id, version, &metrics);
                }
                let note = if cyclic && pruned.is_empty() {
                    format!("hop {version} (round {round}) trained by {site}")
                } else if cyclic {
                    format!(
                        "hop {version} (round {round}): training failed at {site}; the model it received goes on"
                    )
                } else {
                    format!(
                        "epoch {} aggregated by {site}: accepted {accepted:?}, pruned {pruned:?}{best_note}",
                        r.epoch
                    )
                };
                self.note_once(id, note)?;
            }
            ReportEvent::Unmasked { survivors, dropped } => {
                let recovered = if dropped.is_empty() {
                    String::new()
                } else {
                    format!("; the masks of {dropped:?}, gone mid-round, were removed")
                };
                self.note_once(
                    id,
                    format!(
                        "epoch {} securely aggregated by {site}: the sum of {survivors:?}{recovered}",
                        r.epoch
                    ),
                )?;
            }
            ReportEvent::Retried { reason, next } => {
                self.note_once(
                    id,
                    format!("{site}: {reason}; epoch {} goes to {next}", r.epoch),
                )?;
            }
            ReportEvent::Reelected { previous, next } => {
                self.note_once(
                    id,
                    format!(
                        "{site}: aggregator {previous} replaced by {next} for epoch {}",
                        r.epoch
                    ),
                )?;
            }
            ReportEvent::Training => {
                self.store.update(id, |rec| {
                    rec.sites
                        .insert(site.to_string(), format!("round {}", r.epoch.round));
                })?;
            }
            ReportEvent::Finished(outcome) => {
                let mut state = match outcome {
                    Outcome::Completed { .. } => "finished".to_string(),
                    Outcome::Failed { reason } => format!("failed: {reason}"),
                };
                // A site that could not save some of its models says so in its state.
                let prefix = format!("{site} could not save its ");
                self.store.update(id, |rec| {
                    let mut unsaved: Vec<&str> = rec
                        .history
                        .iter()
                        .filter_map(|h| h.note.strip_prefix(&prefix)?.split(' ').next())
                        .collect();
                    unsaved.sort_unstable();
                    unsaved.dedup();
                    if !unsaved.is_empty() {
                        state = format!("{state}; could not save {}", unsaved.join(", "));
                    }
                    rec.sites.insert(site.to_string(), state.clone());
                })?;
                finished.insert(site.to_string(), state);
            }
            ReportEvent::Evaluated { model, metrics } => {
                self.store.update(id, |rec| {
                    rec.cross_site
                        .entry(site.to_string())
                        .or_default()
                        .insert(model, metrics);
                })?;
            }
            ReportEvent::EvaluationFailed { model, reason } => {
                self.note_once(id, format!("{site} could not evaluate {model}: {reason}"))?;
            }
            ReportEvent::PersistFailed { slot, reason } => {
                let stem = slot.file_stem();
                self.note_once(
                    id,
                    format!("{site} could not save its {stem} model: {reason}"),
                )?;
                // A failure that comes after the site's end still shows in its state.
                if let Some(state) = finished.get_mut(site)
                    && !state.contains(&stem)
                {
                    *state = if state.contains("; could not save ") {
                        format!("{state}, {stem}")
                    } else {
                        format!("{state}; could not save {stem}")
                    };
                    let line = state.clone();
                    self.store.update(id, |rec| {
                        rec.sites.insert(site.to_string(), line);
                    })?;
                }
            }
            ReportEvent::Alive | ReportEvent::Persisted { .. } => {}
        }
        Ok(())
    }

    /// Deploys the job again to a site of the run that restarted (its heartbeat no longer
    /// lists the job), and configures it to rejoin.
    async fn rejoin_restarted(
        &self,
        id: &str,
        sites: &[String],
        seed: u64,
        started_ms: u64,
        evaluation: Option<&EvaluationStage>,
        rejoined: &mut HashMap<String, Instant>,
    ) {
        let beats = self
            .heartbeats
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default();
        for (index, name) in sites.iter().enumerate() {
            let Some((at, jobs, _)) = beats.get(name) else {
                continue;
            };
            if *at <= started_ms || jobs.contains_key(id) {
                continue;
            }
            if rejoined
                .get(name)
                .is_some_and(|t| t.elapsed() < Duration::from_secs(30))
            {
                continue;
            }
            let Some(p) = self.net.peers.by_name(name) else {
                continue;
            };
            rejoined.insert(name.clone(), Instant::now());
            let deployed = async {
                self.redeploy(id, name, index, sites.len()).await?;
                let req = ControlRequest::Configure {
                    job: id.to_string(),
                    peers: self.peer_entries(sites),
                    seed,
                    rejoin: true,
                    evaluation: evaluation.cloned(),
                    region_round: None,
                };
                match self.net.request(p.peer, req).await? {
                    ControlResponse::Ok => Ok(()),
                    other => anyhow::bail!("configure answered {other:?}"),
                }
            };
            match deployed.await {
                Ok(()) => self.note(id, format!("{name} restarted and rejoined the swarm")),
                Err(e) => {
                    tracing::warn!(job = %id, site = %name, error = %format!("{e:#}"), "rejoin failed")
                }
            }
        }
    }
}
