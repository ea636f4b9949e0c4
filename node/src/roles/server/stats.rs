//! The server's side of federated statistics: drives the job's `StatisticsController` (the
//! same sans-IO machine the simulator drives), sends its `fed_stats` tasks to the sites as
//! sealed bulk streams without a model (the payload rides the task's headers), takes their
//! answers from the result channel, and writes the statistics and their plots into the job's
//! result folder ([`crate::stats::write_results`]).
//!
//! A run after a server restart starts over: both passes are cheap and nothing of a pass is
//! kept. It waits for its sites (as scatter-and-gather does) and deploys the job to them
//! again, a no-op at a site that still holds it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use flare_protocols::shareable::TaskResult;
use flare_protocols::stored::ModelRef;
use flare_protocols::time::Time;
use flare_protocols::workflows::statistics::{Event, Output, StatisticsController};
use tokio::sync::{mpsc, watch};

use super::Server;
use crate::job::{Job, WorkflowSpec};
use crate::store::JobState;

/// How long a run resumed after a server restart waits for its sites to come back.
const RESUME_WAIT: Duration = Duration::from_secs(30);

impl Server {
    /// Runs job `id`'s statistics on `sites` until it finishes or aborts, or an admin stops
    /// it. At the end each site's state in the record says how it took part.
    pub(super) async fn run_stats(
        self: Arc<Self>,
        id: &str,
        job: &Job,
        sites: Vec<String>,
        resume: bool,
        mut results: mpsc::Receiver<(String, TaskResult, Option<ModelRef>)>,
        mut abort: watch::Receiver<bool>,
    ) -> anyhow::Result<(JobState, String)> {
        let WorkflowSpec::Statistics(wf) = &job.server.workflow else {
            anyhow::bail!("not a statistics job");
        };
        let sites = if resume {
            tokio::select! {
                s = self.stats_sites_back(id, sites) => s?,
                _ = abort.changed() => return Ok((JobState::Aborted, "aborted by an admin".into())),
            }
        } else {
            sites
        };
        let mut ctrl = StatisticsController::new(wf.controller.clone(), sites.clone())
            .context("the StatisticsController's settings")?;
        let result_dir = self.store.result_dir(id);
        let epoch = Instant::now();
        let now = || Time::from_duration(epoch.elapsed());
        let wire = job.server.workflow.wire_name();
        // What each site last did, for its line in the record.
        let mut took_part: BTreeMap<String, String> = BTreeMap::new();
        let mut outcome = None;
        ctrl.start(now());
        while outcome.is_none() {
            while let Some(out) = ctrl.poll_output() {
                match out {
                    Output::Send { to, task } => {
                        let s = Arc::clone(&self);
                        let id = id.to_string();
                        tokio::spawn(async move {
                            if let Err(e) = s.send_task(&id, wire, &to, task, None).await {
                                tracing::warn!(job = %id, site = %to, error = %format!("{e:#}"), "statistics task not delivered");
                            }
                        });
                    }
                    Output::Event(ev) => {
                        if let Some(end) =
                            self.on_stats_event(id, wf, &result_dir, ev, &mut took_part)?
                        {
                            outcome = Some(end);
                        }
                    }
                }
            }
            if outcome.is_some() {
                break;
            }
            if ctrl.is_done() {
                outcome = Some((
                    JobState::Failed,
                    "the controller stopped without an outcome".into(),
                ));
                break;
            }
            let wait = ctrl
                .poll_timeout()
                .map_or(Duration::from_secs(1), |t| t.saturating_since(now()));
            tokio::select! {
                r = results.recv() => match r {
                    // Statistics answers carry no model: one sent anyway is dropped unread.
                    Some((site, result, _)) => ctrl.handle_result(now(), &site, result),
                    None => outcome = Some((JobState::Failed, "result channel closed".into())),
                },
                _ = tokio::time::sleep(wait) => ctrl.handle_timeout(now()),
                _ = abort.changed() => outcome = Some((JobState::Aborted, "aborted by an admin".into())),
            }
        }
        let (state, note) = outcome.unwrap_or((JobState::Failed, "no outcome".into()));
        let _ = self.store.update(id, |r| {
            for site in &sites {
                let line = match took_part.get(site) {
                    Some(l) if state == JobState::Finished => l.clone(),
                    Some(l) => format!("{state} ({l})"),
                    None => format!("{state}"),
                };
                r.sites.insert(site.clone(), line);
            }
        });
        Ok((state, note))
    }

    /// Records what the controller reports; the job's end state when it ends.
    fn on_stats_event(
        &self,
        id: &str,
        wf: &crate::stats::StatsWorkflow,
        result_dir: &std::path::Path,
        ev: Event,
        took_part: &mut BTreeMap<String, String>,
    ) -> anyhow::Result<Option<(JobState, String)>> {
        match ev {
            Event::PassStarted { pass, clients } => {
                tracing::info!(job = %id, %pass, clients, "statistics pass started");
                self.store.set_round(id, pass.round())?;
            }
            Event::ResultAccepted {
                pass,
                client,
                answered,
                asked,
            } => {
                tracing::info!(job = %id, %pass, %client, answered, asked, "statistics accepted");
                took_part.insert(client, format!("{pass}: answered"));
            }
            Event::ResultDropped { client, reason, .. } => {
                tracing::warn!(job = %id, %client, ?reason, "statistics result dropped");
            }
            Event::SiteExcluded {
                pass,
                client,
                reason,
                ..
            } => {
                tracing::warn!(job = %id, %pass, %client, %reason, "site excluded");
                self.note(id, format!("{pass}: {client} is left out: {reason}"));
                took_part.insert(client, format!("excluded in {pass}: {reason}"));
            }
            Event::NoAnswer { pass, clients } => {
                tracing::warn!(job = %id, %pass, ?clients, "sites did not answer");
                self.note(id, format!("{pass}: no answer from {}", clients.join(", ")));
                for c in clients {
                    took_part.insert(c, format!("no answer in {pass}"));
                }
            }
            Event::Finished { output, sites } => {
                let files = crate::stats::write_results(result_dir, &wf.output_path, &output)?;
                tracing::info!(job = %id, file = %files.json.display(), plots = files.plots.len(), "statistics written");
                self.store.set_round(id, wf.passes())?;
                for s in &sites {
                    took_part.insert(s.clone(), "finished".into());
                }
                return Ok(Some((
                    JobState::Finished,
                    format!("statistics of {}", sites.join(", ")),
                )));
            }
            Event::Aborted { reason, .. } => return Ok(Some((JobState::Failed, reason))),
        }
        Ok(None)
    }

    /// After a server restart: the job's sites that came back within [`RESUME_WAIT`] and
    /// took the job again.
    async fn stats_sites_back(&self, id: &str, sites: Vec<String>) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + RESUME_WAIT;
        let back = loop {
            let back: Vec<String> = sites
                .iter()
                .filter(|s| self.net.peers.by_name(s).is_some())
                .cloned()
                .collect();
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
        self.note(
            id,
            format!(
                "the server restarted; the statistics run starts again on {}",
                ready.join(", ")
            ),
        );
        Ok(ready)
    }
}
