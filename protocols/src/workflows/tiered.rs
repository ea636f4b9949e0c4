//! Tiered scatter-and-gather: a global federation whose members are regions, each with its own
//! hub (the region's server) and sites.
//!
//! Tier 1 runs an ordinary [`ScatterGather`](super::scatter_gather::ScatterGather) whose
//! clients are the hubs ([`TieredArgs::top_config`]: `min_regions` results make a round).
//! A hub answers each global `train` task by running `local_rounds` rounds of FedAvg among its
//! sites, again a `ScatterGather` ([`TieredArgs::region_config`]), and sends up a *partial*
//! ([`to_partial`]): the weighted sum of the region's model with its total weight, sample count
//! and result count, never a bare mean. Tier 1 folds partials with their weight, so with
//! `local_rounds: 1` the global model is FedAvg over every site of every region, as if the
//! federation were flat. Partials of partials merge the same way, so tiers nest.
//!
//! [`RegionRound`] watches the region controller's events and turns its end into the answer
//! for tier 1. Rules:
//! - a region sends its partial only when its last round aggregated at least
//!   `min_sites_per_partial` results (default 2), so a one-site region never hands up one
//!   site's update as its own;
//! - the metrics sent up are those the region's sites measured on the incoming global model,
//!   weighted within the region, so tier 1's weighted mean of them is the flat one;
//! - a region run that aborts answers with the reason, and tier 1 counts the region as a failed
//!   client for that round (it goes on while `min_regions` answered).
//!
//! With `region_workflow: Swarm` a region's sites run each global task as a swarm instead
//! ([`TieredArgs::region_swarm_config`]): `local_rounds` swarm rounds from the global model,
//! the hub starting the run on one site with the model and only watching the sites' reports
//! ([`RegionRound::observe_report`]); the final model a result site uploads
//! ([`RegionRound::finished`]), weighted by the total weight of the swarm's last round, is
//! the partial. The final validation is a scatter-and-gather `validate` in either case.
//!
//! The hub node (`hub/`) and the tiered simulator drive the same machines.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::ccwf::{Outcome, Report, ReportEvent};
use super::scatter_gather::{Event, SagConfig, SagConfigError, ScatterGather};
use super::swarm::{SwarmConfig, SwarmConfigError};
use crate::aggregate::{PartialError, to_partial};
use crate::model::{FLModel, META_NUM_SAMPLES, MetaValue};
use crate::stored::{LoadError, ModelRef};

/// The workflow name of a tiered job in `config_fed_server.json`.
pub const WORKFLOW_NAME: &str = "TieredScatterAndGather";
/// `region_workflow`: scatter-and-gather among a region's sites (the default).
pub const SAG_REGION: &str = "ScatterAndGather";
/// `region_workflow`: a swarm among a region's sites.
pub const SWARM_REGION: &str = "Swarm";

/// A tiered scatter-and-gather job's arguments (durations in seconds).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TieredArgs {
    /// Global rounds.
    pub num_rounds: u32,
    /// Rounds of FedAvg within each region per global round.
    #[serde(default = "one_u32")]
    pub local_rounds: u32,
    /// Region partials a global round needs.
    #[serde(default = "one")]
    pub min_regions: usize,
    /// Results a round within a region needs.
    #[serde(default = "one")]
    pub min_clients: usize,
    /// Results a region's last round must fold before its partial may go up.
    #[serde(default = "two")]
    pub min_sites_per_partial: usize,
    /// Seconds to wait for more results once the minimum is in (both tiers).
    #[serde(default = "default_wait")]
    pub wait_time_after_min_received: f64,
    /// Seconds a site's task may take.
    #[serde(default = "default_task_timeout")]
    pub task_timeout: f64,
    /// Seconds a region's global round may take [default: `task_timeout` × `local_rounds` +
    /// 60].
    #[serde(default)]
    pub region_timeout: Option<f64>,
    /// The workflow among a region's sites.
    #[serde(default = "sag_name")]
    pub region_workflow: String,
    /// Whether tier 1 measures the final model on every region's sites.
    #[serde(default = "yes")]
    pub validate_final: bool,
    /// The id of the initial model's component.
    #[serde(default = "model_id")]
    pub model_id: String,
    /// The id of the aggregator's component.
    #[serde(default = "aggregator_id")]
    pub aggregator_id: String,
    /// The id of the persistor's component.
    #[serde(default = "persistor_id")]
    pub persistor_id: String,
}

fn model_id() -> String {
    "model".into()
}
fn aggregator_id() -> String {
    "aggregator".into()
}
fn persistor_id() -> String {
    "persistor".into()
}

fn one() -> usize {
    1
}
fn one_u32() -> u32 {
    1
}
fn two() -> usize {
    2
}
fn yes() -> bool {
    true
}
fn default_wait() -> f64 {
    10.0
}
fn default_task_timeout() -> f64 {
    600.0
}
fn sag_name() -> String {
    SAG_REGION.into()
}

/// Why tiered arguments were refused; each names its key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TieredArgsError {
    /// A count that must be positive is zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// A duration is negative, not finite, or zero where it must be positive.
    #[error("{key}: {value} is not a valid number of seconds")]
    Seconds {
        /// The key.
        key: &'static str,
        /// Its value, printed.
        value: String,
    },
    /// `region_workflow` names a workflow regions cannot run.
    #[error("region_workflow {0:?} is not supported (known: ScatterAndGather, Swarm)")]
    RegionWorkflow(String),
}

fn secs(key: &'static str, v: f64, positive: bool) -> Result<Duration, TieredArgsError> {
    match Duration::try_from_secs_f64(v) {
        Ok(d) if !positive || !d.is_zero() => Ok(d),
        _ => Err(TieredArgsError::Seconds {
            key,
            value: v.to_string(),
        }),
    }
}

impl TieredArgs {
    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), TieredArgsError> {
        for (key, v) in [
            ("num_rounds", self.num_rounds as usize),
            ("local_rounds", self.local_rounds as usize),
            ("min_regions", self.min_regions),
            ("min_clients", self.min_clients),
            ("min_sites_per_partial", self.min_sites_per_partial),
        ] {
            if v == 0 {
                return Err(TieredArgsError::Zero(key));
            }
        }
        secs(
            "wait_time_after_min_received",
            self.wait_time_after_min_received,
            false,
        )?;
        secs("task_timeout", self.task_timeout, true)?;
        if let Some(r) = self.region_timeout {
            secs("region_timeout", r, true)?;
        }
        if !matches!(self.region_workflow.as_str(), SAG_REGION | SWARM_REGION) {
            return Err(TieredArgsError::RegionWorkflow(
                self.region_workflow.clone(),
            ));
        }
        Ok(())
    }

    fn region_timeout(&self) -> Duration {
        let per_task = Duration::try_from_secs_f64(self.task_timeout).unwrap_or(Duration::MAX);
        match self.region_timeout {
            Some(r) => Duration::try_from_secs_f64(r).unwrap_or(Duration::MAX),
            None => per_task
                .saturating_mul(self.local_rounds)
                .saturating_add(Duration::from_secs(60)),
        }
    }

    fn wait(&self) -> Duration {
        Duration::try_from_secs_f64(self.wait_time_after_min_received).unwrap_or_default()
    }

    /// Tier 1's controller settings: one round per global round over the hubs.
    pub fn top_config(&self) -> SagConfig {
        SagConfig {
            num_rounds: self.num_rounds,
            start_round: 0,
            min_clients: self.min_regions,
            wait_time_after_min_received: self.wait(),
            task_timeout: self.region_timeout(),
            validate_final: self.validate_final,
        }
    }

    /// A region's controller for global round `global_round`: settings and the round to
    /// resume at, for `ScatterGather::resume`. It runs the `local_rounds` rounds numbered
    /// `global_round × local_rounds …` and stops, so every region's rounds, and the versions
    /// of its models and metrics, carry the numbers a flat run of all its rounds would give
    /// them. `min_clients` is capped at the region's size.
    pub fn region_config(&self, global_round: u32, sites: usize) -> (SagConfig, u32) {
        let next = global_round.saturating_mul(self.local_rounds);
        let cfg = SagConfig {
            num_rounds: next.saturating_add(self.local_rounds),
            start_round: 0,
            min_clients: self.min_clients.min(sites.max(1)),
            wait_time_after_min_received: self.wait(),
            task_timeout: Duration::try_from_secs_f64(self.task_timeout).unwrap_or(Duration::MAX),
            validate_final: false,
        };
        (cfg, next)
    }

    /// The region's controller for one global task: `local_rounds` rounds from `model` in
    /// global round `global_round` ([`TieredArgs::region_config`]), or with `validate` the
    /// final validation of `model` ([`TieredArgs::region_validation`]). The tiered simulator
    /// and the hub's region runner both start their region rounds here.
    pub fn region_controller(
        &self,
        global_round: u32,
        validate: bool,
        sites: Vec<String>,
        model: impl Into<ModelRef>,
    ) -> Result<ScatterGather, SagConfigError> {
        let (cfg, next) = if validate {
            self.region_validation(global_round, sites.len())
        } else {
            self.region_config(global_round, sites.len())
        };
        ScatterGather::resume(cfg, sites, model, next)
    }

    /// Whether a region's sites run each global task as a swarm.
    pub fn region_swarm(&self) -> bool {
        self.region_workflow == SWARM_REGION
    }

    /// The swarm a region's `sites` run for global round `global_round`: `local_rounds`
    /// rounds, every site training and aggregating, the first two (by name) handing the
    /// result to the hub, a round made by
    /// `min_clients` results (capped at the region's size) and `wait_time_after_min_received`,
    /// `task_timeout` per round. Its rounds start at `global_round × (local_rounds + 1)`: a
    /// swarm ends with one more epoch that validates its final model, so the runs of two
    /// global rounds never share an epoch, and a late message of one is stale to the next.
    pub fn region_swarm_config(
        &self,
        global_round: u32,
        sites: &[String],
        seed: u64,
    ) -> Result<SwarmConfig, SwarmConfigError> {
        let mut sites = sites.to_vec();
        sites.sort();
        let min = self.min_clients.min(sites.len().max(1));
        let cfg = SwarmConfig {
            num_rounds: self.local_rounds,
            start_round: global_round.saturating_mul(self.local_rounds.saturating_add(1)),
            train_clients: sites.clone(),
            aggr_clients: sites.clone(),
            // Two sites upload the result to the hub: one more in case one dies.
            result_clients: sites.iter().take(2).cloned().collect(),
            clients: sites,
            min_clients: min,
            learn_task_timeout: Duration::try_from_secs_f64(self.task_timeout)
                .unwrap_or(Duration::MAX),
            min_responses_required: min,
            wait_time_after_min_resps_received: self.wait(),
            max_concurrent_submissions: 1,
            max_status_report_interval: Duration::from_secs(30),
            resend_interval: Duration::from_secs(2),
            key_metric: "accuracy".into(),
            seed,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// The settings of a region's final validation after `global_rounds` global rounds:
    /// resumed past the last round, so the controller goes straight to `validate`.
    pub fn region_validation(&self, global_rounds: u32, sites: usize) -> (SagConfig, u32) {
        let (mut cfg, _) = self.region_config(global_rounds, sites);
        let next = global_rounds.saturating_mul(self.local_rounds);
        cfg.num_rounds = next.max(1);
        cfg.validate_final = true;
        (cfg, next.max(1))
    }
}

/// Why a region could not answer its global task.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RegionError {
    /// The region's run aborted.
    #[error("the region's round {round} aborted: {reason}")]
    Aborted {
        /// The region round.
        round: u32,
        /// Why.
        reason: String,
    },
    /// Too few sites contributed to the last round to send a partial up.
    #[error(
        "only {accepted} site(s) contributed to the region's last round; min_sites_per_partial is {min}, so no partial goes up"
    )]
    TooFewSites {
        /// Results folded.
        accepted: usize,
        /// The minimum.
        min: usize,
    },
    /// The run ended without a model.
    #[error("the region's run ended without a model")]
    NoModel,
    /// The model could not be read.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The partial could not be made.
    #[error(transparent)]
    Partial(#[from] PartialError),
}

/// One region's answer to one global task, built from its controller's events.
#[derive(Debug)]
pub struct RegionRound {
    min_sites: usize,
    local_rounds: u32,
    /// The first (global-model) evaluation seen: what the sites measured on the incoming model.
    metrics: Option<BTreeMap<String, f64>>,
    last: Option<(usize, f64)>,
    /// The weight of the region's last training round, for a validation answer.
    weight_hint: f64,
    model: Option<ModelRef>,
    aborted: Option<(u32, String)>,
    /// The latest training round of a region swarm that reported its aggregation.
    swarm_version: Option<u32>,
}

impl RegionRound {
    /// Watches one region run; `weight_hint` weighs a validation answer (the region's weight in
    /// its last training round).
    pub fn new(args: &TieredArgs, weight_hint: f64) -> Self {
        RegionRound {
            min_sites: args.min_sites_per_partial,
            local_rounds: args.local_rounds,
            metrics: None,
            last: None,
            weight_hint,
            model: None,
            aborted: None,
            swarm_version: None,
        }
    }

    /// Takes one event of the region's controller.
    pub fn observe(&mut self, event: &Event) {
        match event {
            Event::ModelEvaluated { metrics, .. } if self.metrics.is_none() => {
                self.metrics = Some(metrics.clone());
            }
            Event::RoundAggregated {
                accepted, weight, ..
            } => self.last = Some((*accepted, *weight)),
            Event::Finished { model } => self.model = Some(model.clone()),
            Event::Aborted { round, reason } => self.aborted = Some((*round, reason.clone())),
            _ => {}
        }
    }

    /// Takes one report of a region's swarm site ([`TieredArgs::region_swarm_config`]): the
    /// first round's aggregation carries the metrics the sites measured on the incoming
    /// global model, each training round's its folded results and weight (the last one
    /// counts), and a site whose run failed fails the region's answer.
    pub fn observe_report(&mut self, report: &Report) {
        match &report.event {
            ReportEvent::Aggregated {
                accepted,
                version,
                metrics,
                weight,
                ..
            } if *version < self.local_rounds => {
                if *version == 0 && self.metrics.is_none() && !metrics.is_empty() {
                    self.metrics = Some(metrics.clone());
                }
                if self.swarm_version.is_none_or(|v| *version >= v) {
                    self.swarm_version = Some(*version);
                    self.last = Some((accepted.len(), *weight));
                }
            }
            ReportEvent::Finished(Outcome::Failed { reason }) if self.aborted.is_none() => {
                self.aborted = Some((report.epoch.round, reason.clone()));
            }
            _ => {}
        }
    }

    /// The region swarm's final model (uploaded by a result site).
    pub fn finished(&mut self, model: ModelRef) {
        self.model = Some(model);
    }

    /// Whether the region's swarm has aggregated its last round, or failed.
    pub fn swarm_done(&self) -> bool {
        self.aborted.is_some() || self.swarm_version == Some(self.local_rounds.saturating_sub(1))
    }

    /// How many results the region swarm's latest reported round folded.
    pub fn swarm_sites(&self) -> Option<usize> {
        self.swarm_version.and(self.last.map(|(n, _)| n))
    }

    /// Whether the region's swarm failed.
    pub fn swarm_failed(&self) -> bool {
        self.aborted.is_some()
    }

    /// The total weight of the region's last training round.
    pub fn weight(&self) -> Option<f64> {
        self.last.map(|(_, w)| w)
    }

    /// The partial to send up after training: the region's model times its weight, with the
    /// metrics its sites measured on the incoming global model.
    pub fn into_partial(self) -> Result<FLModel, RegionError> {
        if let Some((round, reason)) = self.aborted {
            return Err(RegionError::Aborted { round, reason });
        }
        let (accepted, weight) = self.last.ok_or(RegionError::NoModel)?;
        if accepted < self.min_sites {
            return Err(RegionError::TooFewSites {
                accepted,
                min: self.min_sites,
            });
        }
        let model = Arc::unwrap_or_clone(self.model.ok_or(RegionError::NoModel)?.load()?);
        let mut partial = to_partial(model, weight, weight.round() as i64, accepted)?;
        partial.metrics = self.metrics.unwrap_or_default();
        Ok(partial)
    }

    /// The answer to a `validate` task: no tensors, the region's weighted metrics, weighted
    /// by the region's last training weight.
    pub fn into_validation(self) -> Result<FLModel, RegionError> {
        if let Some((round, reason)) = self.aborted {
            return Err(RegionError::Aborted { round, reason });
        }
        let mut m = FLModel {
            metrics: self.metrics.unwrap_or_default(),
            ..FLModel::default()
        };
        m.meta.insert(
            META_NUM_SAMPLES.into(),
            MetaValue::Int(self.weight_hint.round().max(1.0) as i64),
        );
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{META_PARTIAL_WEIGHT, weight_of};
    use crate::model::Tensor;
    use crate::shareable::{Shareable, TaskResult};
    use crate::time::Time;
    use crate::workflows::scatter_gather::{Output, ScatterGather};

    fn args(json: &str) -> TieredArgs {
        serde_json::from_str(json).unwrap()
    }

    /// A site's "training": the incoming model plus its own offset, with its sample count.
    fn train(model: &FLModel, offset: f32, samples: i64) -> FLModel {
        let w = model.params["w"].to_f32_vec();
        let mut out = FLModel::from_params(BTreeMap::from([(
            "w".to_string(),
            Tensor::from_f32(
                vec![w.len()],
                &w.iter().map(|x| x * 0.5 + offset).collect::<Vec<_>>(),
            )
            .unwrap(),
        )]));
        out.meta
            .insert(META_NUM_SAMPLES.into(), MetaValue::Int(samples));
        out.metrics.insert("accuracy".into(), f64::from(offset));
        out
    }

    /// Drives one controller to its end, every client answering at once.
    fn drive(
        mut c: ScatterGather,
        mut answer: impl FnMut(&str, &crate::shareable::Task, &ModelRef) -> Result<FLModel, String>,
        mut seen: impl FnMut(&Event),
    ) {
        c.start(Time::ZERO);
        while let Some(out) = c.poll_output() {
            match out {
                Output::Send { to, task, model } => {
                    let data = match answer(&to, &task, &model) {
                        Ok(m) => Shareable::with_model(m),
                        Err(e) => Shareable::error(crate::ReturnCode::ExecutionException, e),
                    };
                    c.handle_result(
                        Time::ZERO,
                        &to,
                        TaskResult {
                            task_id: task.id,
                            round: task.round,
                            data,
                        },
                    );
                }
                Output::Event(e) => seen(&e),
            }
        }
        assert!(c.is_done());
    }

    fn initial() -> FLModel {
        FLModel::from_params(BTreeMap::from([(
            "w".to_string(),
            Tensor::from_f32(vec![2], &[1.0, -1.0]).unwrap(),
        )]))
    }

    type Site = (f32, i64);

    /// A two-tier run: the final global model.
    fn tiered(a: &TieredArgs, regions: &[Vec<Site>]) -> FLModel {
        let names: Vec<String> = (0..regions.len()).map(|r| format!("r{r}")).collect();
        let top = ScatterGather::new(a.top_config(), names, initial()).unwrap();
        let mut last = None;
        let mut weights = vec![1.0; regions.len()];
        drive(
            top,
            |hub, task, global| {
                let r: usize = hub[1..].parse().unwrap();
                let sites = &regions[r];
                let site_names: Vec<String> = (0..sites.len()).map(|i| format!("s{i}")).collect();
                let g = task.round;
                let mut watch = RegionRound::new(a, weights[r]);
                let validate = task.name == "validate";
                if a.region_swarm() && !validate {
                    swarm(a, g, sites, global.clone(), &mut watch);
                    weights[r] = watch.weight().unwrap_or(1.0);
                    return watch.into_partial().map_err(|e| e.to_string());
                }
                let c = a
                    .region_controller(g, validate, site_names, global.clone())
                    .unwrap();
                drive(
                    c,
                    |s, _, m| {
                        let (off, n) = sites[s[1..].parse::<usize>().unwrap()];
                        Ok(train(&m.load().unwrap(), off, n))
                    },
                    |e| watch.observe(e),
                );
                if validate {
                    return watch.into_validation().map_err(|e| e.to_string());
                }
                weights[r] = watch.weight().unwrap_or(1.0);
                watch.into_partial().map_err(|e| e.to_string())
            },
            |e| {
                if let Event::Finished { model } = e {
                    last = Some(Arc::unwrap_or_clone(model.load().unwrap()));
                }
            },
        );
        last.unwrap()
    }

    /// One region's swarm for global round `g` from `global`, every site's state machine
    /// driven in turn, messages delivered in order, tasks answered at once; the reports and
    /// the first final model a site persists go to `watch`.
    fn swarm(a: &TieredArgs, g: u32, sites: &[Site], global: ModelRef, watch: &mut RegionRound) {
        use crate::workflows::ccwf::{Action, ClientWorkflow, Input, ModelSlot};
        use crate::workflows::swarm::{SwarmClient, SwarmMsg};
        let names: Vec<String> = (0..sites.len()).map(|i| format!("s{i}")).collect();
        let cfg = a.region_swarm_config(g, &names, 7).unwrap();
        let mut clients: Vec<SwarmClient> = names
            .iter()
            .map(|n| SwarmClient::new(cfg.clone(), n.clone()).unwrap())
            .collect();
        let mut now = Time::ZERO;
        clients[0].handle(
            now,
            Input::Message {
                from: "hub".into(),
                msg: SwarmMsg::Start,
                model: Some(global),
            },
        );
        let mut have_final = false;
        for _ in 0..100_000 {
            let mut acted = false;
            for i in 0..clients.len() {
                while let Some(action) = clients[i].poll_action() {
                    acted = true;
                    match action {
                        Action::Send { to, msg, model } => {
                            let j = names.iter().position(|n| *n == to).unwrap();
                            let from = names[i].clone();
                            clients[j].handle(now, Input::Message { from, msg, model });
                        }
                        Action::RunTask { task, model } => {
                            let (off, n) = sites[i];
                            let base = model.unwrap().load().unwrap();
                            let mut out = train(&base, off, n);
                            if task.name == "validate" {
                                out.params.clear();
                            }
                            let result = TaskResult {
                                task_id: task.id,
                                round: task.round,
                                data: Shareable::with_model(out),
                            };
                            clients[i].handle(now, Input::TaskDone(result, None));
                        }
                        Action::Report(r) => watch.observe_report(&r),
                        Action::Persist { slot, model } => {
                            if slot == ModelSlot::Final && !have_final {
                                have_final = true;
                                watch.finished(model);
                            }
                        }
                        Action::Finished(_) => {}
                    }
                }
            }
            if !acted && clients.iter().all(|c| c.is_done()) {
                assert!(watch.swarm_done());
                return;
            }
            if !acted {
                let next = clients
                    .iter()
                    .filter_map(|c| c.poll_timeout())
                    .min()
                    .unwrap();
                now = next.max(now);
                for c in &mut clients {
                    if c.poll_timeout().is_some_and(|t| t <= now) {
                        c.handle_timeout(now);
                    }
                }
            }
        }
        panic!("the region's swarm did not end");
    }

    /// The same sites in one flat run.
    fn flat(rounds: u32, sites: &[Site]) -> FLModel {
        let names: Vec<String> = (0..sites.len()).map(|i| format!("s{i}")).collect();
        let cfg = SagConfig {
            num_rounds: rounds,
            min_clients: 1,
            validate_final: false,
            ..SagConfig::default()
        };
        let mut last = None;
        drive(
            ScatterGather::new(cfg, names, initial()).unwrap(),
            |s, _, m| {
                let (off, n) = sites[s[1..].parse::<usize>().unwrap()];
                Ok(train(&m.load().unwrap(), off, n))
            },
            |e| {
                if let Event::Finished { model } = e {
                    last = Some(Arc::unwrap_or_clone(model.load().unwrap()));
                }
            },
        );
        last.unwrap()
    }

    #[test]
    fn one_local_round_equals_flat_fedavg_over_every_site() {
        let regions = vec![
            vec![(1.0, 10), (2.0, 100), (3.0, 1000)],
            vec![(-4.0, 20), (0.5, 200), (8.0, 30)],
        ];
        let a = args(r#"{"num_rounds": 3, "min_regions": 2}"#);
        let t = tiered(&a, &regions);
        let all: Vec<Site> = regions.concat();
        let f = flat(3, &all);
        for (x, y) in t.params["w"]
            .to_f32_vec()
            .iter()
            .zip(f.params["w"].to_f32_vec())
        {
            assert!(((x - y) / y).abs() < 1e-6, "{x} vs {y}");
        }
        // The test can fail: regions weighted 1:1 give another model.
        let mean_of = |r: &[Site]| {
            let w: f32 = r.iter().map(|s| s.1 as f32).sum();
            r.iter().map(|s| s.0 * s.1 as f32).sum::<f32>() / w
        };
        let one_to_one = (mean_of(&regions[0]) + mean_of(&regions[1])) / 2.0;
        let weighted = mean_of(&all);
        assert!((one_to_one - weighted).abs() > 0.5);
    }

    #[test]
    fn a_swarm_in_each_region_with_one_local_round_equals_flat_fedavg_too() {
        let regions = vec![
            vec![(1.0, 10), (2.0, 100), (3.0, 1000)],
            vec![(-4.0, 20), (0.5, 200), (8.0, 30)],
        ];
        let a = args(
            r#"{"num_rounds": 3, "min_regions": 2, "min_clients": 3, "region_workflow": "Swarm"}"#,
        );
        let t = tiered(&a, &regions);
        let f = flat(3, &regions.concat());
        for (x, y) in t.params["w"]
            .to_f32_vec()
            .iter()
            .zip(f.params["w"].to_f32_vec())
        {
            assert!(((x - y) / y).abs() < 1e-6, "{x} vs {y}");
        }
        // Local rounds run inside the swarm: 2 per global round give the flat run of 2 × 3.
        let a = args(
            r#"{"num_rounds": 3, "local_rounds": 2, "min_regions": 2, "min_clients": 3, "region_workflow": "Swarm"}"#,
        );
        let one = vec![regions[0].clone()];
        let t = tiered(
            &args(
                r#"{"num_rounds": 3, "local_rounds": 2, "min_regions": 1, "min_clients": 3, "region_workflow": "Swarm"}"#,
            ),
            &one,
        );
        let f = flat(6, &regions[0]);
        for (x, y) in t.params["w"]
            .to_f32_vec()
            .iter()
            .zip(f.params["w"].to_f32_vec())
        {
            assert!(((x - y) / y).abs() < 1e-5, "{x} vs {y}");
        }
        // Two global rounds' swarms never share an epoch (each ends with a validation one).
        let sites: Vec<String> = vec!["s0".into(), "s1".into()];
        let c0 = a.region_swarm_config(0, &sites, 1).unwrap();
        let c1 = a.region_swarm_config(1, &sites, 1).unwrap();
        assert!(c0.start_round + c0.num_rounds < c1.start_round);
    }

    #[test]
    fn a_failed_region_swarm_sends_its_reason_up() {
        let a = args(r#"{"num_rounds": 1, "region_workflow": "Swarm"}"#);
        let mut w = RegionRound::new(&a, 1.0);
        w.observe_report(&Report {
            epoch: crate::workflows::ccwf::Epoch::new(0, 0),
            event: ReportEvent::Finished(Outcome::Failed {
                reason: "round 0: 1 result(s), min_clients 2".into(),
            }),
        });
        assert!(w.swarm_done() && w.swarm_failed());
        assert!(matches!(w.into_partial(), Err(RegionError::Aborted { .. })));
    }

    #[test]
    fn a_region_with_one_contributing_site_sends_nothing_up() {
        let a = args(r#"{"num_rounds": 1, "min_regions": 1}"#);
        let mut w = RegionRound::new(&a, 1.0);
        let model = ModelRef::Memory(Arc::new(initial()));
        w.observe(&Event::RoundAggregated {
            round: 0,
            model: model.clone(),
            accepted: 1,
            weight: 10.0,
        });
        w.observe(&Event::Finished { model });
        assert_eq!(
            w.into_partial(),
            Err(RegionError::TooFewSites {
                accepted: 1,
                min: 2
            })
        );
        // Tier 1 goes on with the other region; the lone site's update is nowhere in it.
        let regions = vec![vec![(1.0, 10), (2.0, 100)], vec![(50.0, 1000)]];
        let t = tiered(&a, &regions);
        let f = flat(1, &regions[0]);
        for (x, y) in t.params["w"]
            .to_f32_vec()
            .iter()
            .zip(f.params["w"].to_f32_vec())
        {
            assert!(((x - y) / y).abs() < 1e-6, "{x} vs {y}");
        }
    }

    #[test]
    fn local_rounds_run_within_the_region_and_number_like_a_flat_run() {
        let a = args(r#"{"num_rounds": 2, "local_rounds": 3, "min_regions": 2}"#);
        let (cfg, next) = a.region_config(1, 3);
        assert_eq!((cfg.start_round, cfg.num_rounds, next), (0, 6, 3));
        assert_eq!(a.top_config().task_timeout, Duration::from_secs(1860));
        // One region alone with k local rounds is k flat rounds.
        let one = args(r#"{"num_rounds": 2, "local_rounds": 3, "min_regions": 1}"#);
        let sites = vec![(1.0, 10), (2.0, 100), (3.0, 1000)];
        let t = tiered(&one, std::slice::from_ref(&sites));
        let f = flat(6, &sites);
        for (x, y) in t.params["w"]
            .to_f32_vec()
            .iter()
            .zip(f.params["w"].to_f32_vec())
        {
            assert!(((x - y) / y).abs() < 1e-6, "{x} vs {y}");
        }
    }

    #[test]
    fn bad_arguments_name_their_key() {
        let a = args(r#"{"num_rounds": 1, "local_rounds": 0}"#);
        assert_eq!(a.validate(), Err(TieredArgsError::Zero("local_rounds")));
        let a = args(r#"{"num_rounds": 1, "task_timeout": -1}"#);
        assert!(matches!(
            a.validate(),
            Err(TieredArgsError::Seconds {
                key: "task_timeout",
                ..
            })
        ));
        let a = args(r#"{"num_rounds": 1, "region_workflow": "Swarm"}"#);
        assert_eq!(a.validate(), Ok(()));
        assert!(a.region_swarm());
        let a = args(r#"{"num_rounds": 1, "region_workflow": "Cyclic"}"#);
        assert!(matches!(
            a.validate(),
            Err(TieredArgsError::RegionWorkflow(_))
        ));
        assert!(serde_json::from_str::<TieredArgs>(r#"{"num_rounds": 1, "rounds": 2}"#).is_err());
        let partial = to_partial(initial(), 4.0, 4, 2).unwrap();
        assert_eq!(weight_of(&partial), 4.0);
        assert!(partial.meta.contains_key(META_PARTIAL_WEIGHT));
    }
}
