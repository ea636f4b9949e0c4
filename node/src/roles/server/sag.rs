//! The server's side of scatter-and-gather: drives the job's `ScatterGather` controller,
//! sends its tasks to the sites as sealed bulk streams, records its events in the job store,
//! and persists the global model each round so that a restarted server resumes the run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use flare_protocols::shareable::{Task, TaskResult};
use flare_protocols::time::Time;
use flare_protocols::workflows::scatter_gather::{Event, Output, ScatterGather};
use tokio::sync::{mpsc, watch};

use super::{Server, WORKFLOW};
use crate::job::Job;
use crate::net::bulk::{self, Route, TransferMeta};
use crate::store::JobState;

impl Server {
    /// Drives one job's controller until it finishes, aborts, or an admin stops it.
    pub(super) async fn run_job(
        self: Arc<Self>,
        id: &str,
        job: Job,
        sites: Vec<String>,
        mut results: mpsc::Receiver<(String, TaskResult)>,
        mut abort: watch::Receiver<bool>,
    ) -> anyhow::Result<(JobState, String)> {
        let initial = job.server.initial_model()?;
        let mut ctrl = ScatterGather::new(job.server.sag.clone(), sites, initial)?;
        let epoch = Instant::now();
        let now = || Time::from_duration(epoch.elapsed());
        let result_dir = self.store.result_dir(id);
        std::fs::create_dir_all(result_dir.join("models"))
            .with_context(|| result_dir.display().to_string())?;
        ctrl.start(now());
        loop {
            while let Some(out) = ctrl.poll_output() {
                match out {
                    Output::Send { to, task } => {
                        let s = Arc::clone(&self);
                        let id = id.to_string();
                        tokio::spawn(async move {
                            if let Err(e) = s.send_task(&id, &to, task).await {
                                tracing::warn!(job = %id, site = %to, error = %format!("{e:#}"), "task not delivered");
                            }
                        });
                    }
                    Output::Event(ev) => {
                        if let Some(end) = self.on_job_event(id, &job, &result_dir, ev)? {
                            return Ok(end);
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
                    Some((site, result)) => ctrl.handle_result(now(), &site, result),
                    None => return Ok((JobState::Failed, "result channel closed".into())),
                },
                _ = tokio::time::sleep(wait) => ctrl.handle_timeout(now()),
                _ = abort.changed() => return Ok((JobState::Aborted, "aborted by an admin".into())),
            }
        }
    }

    /// Records what the controller reports; returns the job's end state when it ends.
    fn on_job_event(
        &self,
        id: &str,
        job: &Job,
        result_dir: &std::path::Path,
        ev: Event,
    ) -> anyhow::Result<Option<(JobState, String)>> {
        match ev {
            Event::RoundStarted { round, clients } => {
                tracing::info!(job = %id, round, clients, "round started");
                self.store.update(id, |r| r.round = Some(round))?;
            }
            Event::ModelEvaluated { version, metrics } => {
                tracing::info!(job = %id, version, ?metrics, "global model evaluated");
                self.store.update(id, |r| {
                    r.metrics.insert(version, metrics.clone());
                })?;
            }
            Event::RoundAggregated {
                round,
                model,
                accepted,
            } => {
                tracing::info!(job = %id, round, accepted, "round aggregated");
                if job.server.persistor.save_every_round {
                    crate::model_io::write(
                        &result_dir.join(format!("models/round-{round:03}.safetensors")),
                        &model,
                    )?;
                }
            }
            Event::ResultExcluded {
                client,
                reason,
                round,
                ..
            } => {
                tracing::warn!(job = %id, %client, round, %reason, "result excluded");
            }
            Event::TimedOut { clients, round } => {
                tracing::warn!(job = %id, round, ?clients, "sites timed out");
            }
            Event::ResultDropped { client, reason, .. } => {
                tracing::warn!(job = %id, %client, ?reason, "result dropped");
            }
            Event::ResultAccepted { .. } => {}
            Event::Finished { model } => {
                crate::model_io::write(&result_dir.join("global_final.safetensors"), &model)?;
                self.write_metrics(id, result_dir)?;
                return Ok(Some((JobState::Finished, "finished".into())));
            }
            Event::Aborted { reason, .. } => return Ok(Some((JobState::Failed, reason))),
        }
        Ok(None)
    }

    async fn send_task(&self, id: &str, site: &str, task: Task) -> anyhow::Result<()> {
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
        };
        let route = Route {
            job: id.to_string(),
            workflow: WORKFLOW.into(),
            round: u64::from(task.round),
            kind: "task".into(),
        };
        bulk::deliver(
            &self.net,
            &self.sealing,
            &to,
            &route,
            &meta,
            task.data.model.as_deref(),
        )
        .await?;
        Ok(())
    }
}
