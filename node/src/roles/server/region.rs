//! A hub's region runner: the server role a hub runs for its region answers each global task
//! tier 1 sends the hub by running it among the region's sites, and hands the region's answer
//! up through the hub's [`RegionLinks`](super::super::tier::RegionLinks).
//!
//! - **Scatter-and-gather regions** (the default): `local_rounds` rounds of the same
//!   `ScatterGather` controller a flat job runs, watched by a `RegionRound`.
//! - **Swarm regions** (`region_workflow: Swarm`): the hub configures a fresh swarm on its
//!   sites for the global round (`Configure` with `region_round`), starts it on the round's
//!   first aggregator with a sealed start message carrying the global model, and from then on
//!   only watches: the sites' reports go to the `RegionRound`, and the final model one of
//!   the result sites uploads, once it is the swarm's last round's, is the region's model.
//!   The swarm's rounds never share an epoch with the previous global round's, so a late
//!   message of that run is stale to this one.
//! - The final validation is a scatter-and-gather `validate` in both.
//!
//! A region round that fails is answered with the reason (tier 1 counts the region as failed
//! for that round), and the region waits for the next global task.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flare_protocols::shareable::TaskResult;
use flare_protocols::stored::ModelRef;
use flare_protocols::workflows::ccwf::{Epoch, ModelSlot, ReportEvent};
use flare_protocols::workflows::scatter_gather::Event;
use flare_protocols::workflows::swarm::SwarmMsg;
use flare_protocols::workflows::tiered::{RegionRound, TieredArgs};
use tokio::sync::{mpsc, watch};

use super::{Server, WfEvent};
use crate::job::{Job, SWARM_WIRE_NAME};
use crate::net::bulk;
use crate::roles::tier::RegionLinks;
use crate::store::JobState;

/// How long the region runner waits for tier 1's first task after the job was derived.
const FIRST_TASK_WAIT: Duration = Duration::from_secs(30);

/// What reaches a scatter-and-gather job's runner (a region runner too) from the server role.
pub(super) struct Channels {
    /// Scatter-and-gather results from the sites.
    pub results: mpsc::Receiver<(String, TaskResult, Option<ModelRef>)>,
    /// Workflow reports and uploads from the sites (a region swarm's).
    pub reports: mpsc::Receiver<(String, WfEvent)>,
    /// An admin stopping the job (at a hub, also tier 1's abort).
    pub abort: watch::Receiver<bool>,
}

/// Each site's last round, whether it counted, and what happened (the job's site states).
type TookPart = BTreeMap<String, (u32, bool, String)>;

impl Server {
    /// Runs a job a hub derived for its region: waits for each global task tier 1 sends, runs
    /// it among `sites` (see the module docs), and answers with the region's partial or
    /// validation. It ends when tier 1's job ends (the link closes) or after the validation.
    pub(super) async fn drive_region(
        self: &Arc<Self>,
        id: &str,
        job: &Job,
        sites: Vec<String>,
        links: &RegionLinks,
        mut ch: Channels,
        took_part: &mut TookPart,
    ) -> anyhow::Result<(JobState, String)> {
        let Some(args) = job.server.tiered.clone() else {
            anyhow::bail!("not a tiered job");
        };
        let aborted = || Ok((JobState::Aborted, "aborted by an admin".to_string()));
        // After a restart the link comes back when tier 1 deploys to the hub again.
        let deadline = Instant::now() + FIRST_TASK_WAIT.max(args.top_config().task_timeout);
        let mut link = loop {
            if let Some(l) = links.take(id) {
                break l;
            }
            if Instant::now() >= deadline {
                anyhow::bail!("tier 1 sent this region no task for the job");
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = ch.abort.changed() => return aborted(),
            }
        };
        let mut weight = 1.0;
        loop {
            let task = tokio::select! {
                t = link.recv() => t,
                _ = ch.abort.changed() => return aborted(),
            };
            let Some(task) = task else {
                return Ok((JobState::Aborted, "tier 1 ended the job".into()));
            };
            tracing::info!(job = %id, round = task.round, validate = task.validate, swarm = args.region_swarm(), "global task for the region");
            let mut watch = RegionRound::new(&args, weight);
            let mut reply = task.reply;
            // Tier 1 stopping the job drops the hub's wait for this answer: the round stops.
            let ended = if args.region_swarm() && !task.validate {
                tokio::select! {
                    r = self.region_swarm(id, &args, &sites, task.round, task.model, &mut ch, took_part, &mut watch) => r?,
                    _ = reply.closed() => Some((JobState::Aborted, "tier 1 ended the job".to_string())),
                }
            } else {
                let ctrl =
                    args.region_controller(task.round, task.validate, sites.clone(), task.model)?;
                let mut observe = |e: &Event| watch.observe(e);
                let (state, note) = tokio::select! {
                    r = self.drive_controller(
                        id,
                        job,
                        ctrl,
                        &mut ch.results,
                        &mut ch.abort,
                        took_part,
                        &mut observe,
                    ) => r?,
                    _ = reply.closed() => (JobState::Aborted, "tier 1 ended the job".to_string()),
                };
                (state == JobState::Aborted).then_some((state, note))
            };
            if let Some(end) = ended {
                return Ok(end);
            }
            if let Some(w) = watch.weight() {
                weight = w;
            }
            links.publish(
                id,
                took_part
                    .iter()
                    .map(|(s, (r, _, what))| (s.clone(), format!("round {r}: {what}")))
                    .collect(),
            );
            let answer = tokio::task::block_in_place(|| {
                if task.validate {
                    watch.into_validation()
                } else {
                    watch.into_partial()
                }
            })
            .map_err(|e| e.to_string());
            if let Err(e) = &answer {
                self.note(id, format!("global round {}: {e}", task.round));
            }
            let _ = reply.send(answer);
            let last = task.round + 1 >= args.num_rounds;
            if task.validate || (last && !args.validate_final) {
                return Ok((JobState::Finished, "finished".into()));
            }
        }
    }

    /// One global round of a swarm region: configures the round's swarm on the connected
    /// sites, starts it with `model`, and feeds the sites' reports and the final model to
    /// `watch` until the swarm ended (or failed, or ran past the region's timeout, which
    /// fails the region's answer). Returns the job's end when an admin aborted it.
    #[allow(clippy::too_many_arguments)]
    async fn region_swarm(
        self: &Arc<Self>,
        id: &str,
        args: &TieredArgs,
        sites: &[String],
        global_round: u32,
        model: ModelRef,
        ch: &mut Channels,
        took_part: &mut TookPart,
        watch: &mut RegionRound,
    ) -> anyhow::Result<Option<(JobState, String)>> {
        let seed = crate::simulator::seed_of(id);
        let connected: Vec<String> = sites
            .iter()
            .filter(|s| self.net.peers.by_name(s).is_some())
            .cloned()
            .collect();
        let fail = |watch: &mut RegionRound, why: String| {
            watch.observe_report(&flare_protocols::workflows::ccwf::Report {
                epoch: Epoch::new(global_round, 0),
                event: ReportEvent::Finished(flare_protocols::workflows::ccwf::Outcome::Failed {
                    reason: why,
                }),
            });
            Ok(None)
        };
        let cfg = match args.region_swarm_config(global_round, &connected, seed) {
            Ok(c) => c,
            Err(e) => return fail(watch, format!("the region's swarm: {e}")),
        };
        // Every connected site takes part; the swarm itself prunes one that falls silent.
        let configured = self
            .configure_on(id, &connected, seed, None, Some(global_round))
            .await;
        if configured.len() < cfg.min_clients {
            return fail(
                watch,
                format!(
                    "{} of the region's sites took the swarm of global round {global_round}, min_clients is {}",
                    configured.len(),
                    cfg.min_clients
                ),
            );
        }
        // The first epoch's aggregator opens it: starting there saves it a hop.
        let first = cfg.aggregator(Epoch::new(cfg.start_round, 0)).to_string();
        let starter = if configured.contains(&first) {
            first
        } else {
            configured[0].clone()
        };
        if let Err(e) = self.start_swarm(id, &starter, &model).await {
            return fail(
                watch,
                format!("the region's swarm could not start on {starter}: {e:#}"),
            );
        }
        let last_round = cfg.end_round().saturating_sub(1);
        let deadline = Instant::now() + args.top_config().task_timeout;
        let final_path = self
            .store
            .result_dir(id)
            .join(format!("{}.safetensors", ModelSlot::Final.file_stem()));
        loop {
            if watch.swarm_failed() {
                return Ok(None);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return fail(
                    watch,
                    format!(
                        "the region's swarm of global round {global_round} did not end within the region timeout"
                    ),
                );
            }
            let ev = tokio::select! {
                ev = ch.reports.recv() => ev,
                _ = tokio::time::sleep(left) => continue,
                _ = ch.abort.changed() => {
                    return Ok(Some((JobState::Aborted, "aborted by an admin".into())));
                }
            };
            match ev {
                Some((site, WfEvent::Report(report, ack))) => {
                    watch.observe_report(&report);
                    let what = match &report.event {
                        ReportEvent::Aggregated { accepted, .. } => {
                            format!("swarm round aggregated from {} site(s)", accepted.len())
                        }
                        ReportEvent::Finished(o) => format!("swarm ended: {o:?}"),
                        _ => "swarm".into(),
                    };
                    took_part.insert(site, (report.epoch.round, true, what));
                    let _ = ack.send(());
                }
                Some((site, WfEvent::Uploaded(stem))) if stem == ModelSlot::Final.file_stem() => {
                    // A late upload of the previous global round's swarm is not this one's.
                    let model = tokio::task::block_in_place(|| crate::model_io::open(&final_path));
                    match model {
                        Ok(m) if m.current_round == Some(last_round) && watch.swarm_done() => {
                            tracing::info!(job = %id, %site, round = global_round, "region swarm result");
                            let folded = watch.swarm_sites().unwrap_or(0);
                            self.note(
                                id,
                                format!(
                                    "global round {global_round}: the region's swarm of {} sites ended ({folded} in its last round); {site} uploaded its model",
                                    configured.len()
                                ),
                            );
                            watch.finished(ModelRef::Stored(Arc::new(m)));
                            return Ok(None);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(job = %id, %site, error = %e, "unreadable swarm result")
                        }
                    }
                }
                Some((site, WfEvent::StoreFailed(stem, why))) => {
                    tracing::error!(job = %id, %site, %stem, error = %why, "swarm upload not stored");
                }
                Some(_) => {}
                None => anyhow::bail!("report channel closed"),
            }
        }
    }

    /// Starts a region swarm on `site`: the sealed start message, with the global model beside
    /// it, bound to the swarm stage the site configured.
    async fn start_swarm(&self, id: &str, site: &str, model: &ModelRef) -> anyhow::Result<()> {
        let to = self
            .net
            .peers
            .by_name(site)
            .ok_or_else(|| anyhow::anyhow!("{site} is not connected"))?;
        let body = flare_protocols::codec::encode(
            &SwarmMsg::Start,
            crate::roles::workflow::MAX_WORKFLOW_MSG,
        )?;
        let (route, meta) = crate::roles::workflow::message_transfer(id, SWARM_WIRE_NAME, body);
        bulk::deliver_body(
            &self.net,
            &self.sealing,
            &to,
            &route,
            &meta,
            Some(bulk::Body::of(model)),
        )
        .await?;
        Ok(())
    }
}
