//! Swarm learning (FLARE's `SwarmClientController`), one state machine per client.
//!
//! The server configures the clients and sends [`SwarmMsg::Start`] with the initial model to
//! the starting client; from then on the clients run the workflow among themselves, peer to
//! peer, and the server only receives [`Report`]s.
//!
//! A run is a sequence of *epochs* (`round.attempt`, see [`Epoch`]). Each epoch has one
//! aggregator, drawn from `aggr_clients` with [`pick`] from the job's seed, the round and the
//! attempt, so every client computes the same one.
//!
//! 1. **Learn.** The client that opens an epoch (the starting client, then each round's
//!    aggregator) sends [`SwarmMsg::Learn`] with the global model to every client. A client
//!    adopts a `Learn` only for an epoch later than its own; an earlier one is answered with
//!    its own current `Learn`, so a lagging sender catches up.
//! 2. **Train.** Each trainer validates the incoming global model and trains on it (one
//!    `train` task; the result carries the validation metrics of the model it received).
//! 3. **Submit.** The trainer sends [`SwarmMsg::Ready`] to the epoch's aggregator, repeating it
//!    every `resend_interval` until the aggregator answers [`SwarmMsg::Grant`]; the
//!    aggregator grants at most `max_concurrent_submissions` at a time, then the trainer sends
//!    [`SwarmMsg::Submit`] with its model. Each result is folded into a streaming FedAvg and
//!    dropped; a duplicate or a result for another epoch is dropped.
//! 4. **Aggregate.** The aggregator aggregates when every expected trainer has submitted,
//!    when `min_responses_required` results are in and `wait_time_after_min_resps_received`
//!    has passed, or at `learn_task_timeout` after the epoch began. Trainers that have not
//!    submitted by then are pruned for the round (the next `Learn` names the members); if
//!    fewer than `min_clients` results are in, the run fails and everyone is told
//!    ([`SwarmMsg::Abort`]). The aggregator persists the round's model, updates the best model
//!    from the trainers' validation metrics (`key_metric`), and opens the next round.
//! 5. **End.** After the last round, one more epoch validates the final model (a `validate`
//!    task on every trainer), its aggregator decides the best model and sends
//!    [`SwarmMsg::Done`] to everyone, with the final model to the `result_clients`; the best
//!    model's holder sends it to them ([`SwarmMsg::BestModel`]).
//!
//! Failures:
//! - **A trainer dies** (or is silent): the aggregator stops expecting it when the driver
//!   reports [`Input::PeerDown`], else prunes it at the timeout.
//! - **The aggregator dies**: a trainer that hears [`Input::PeerDown`] for it, or that has
//!   waited `learn_task_timeout + wait_time_after_min_resps_received + 2 × resend_interval`
//!   after becoming ready, moves to the next attempt of the same round, whose aggregator is
//!   the next pick (known-dead candidates are skipped). Trainers keep their result for the
//!   round and submit it again; the new aggregator re-announces the epoch with the same
//!   global model. Nothing is trained twice and the round's base model is the last global.
//! - **Forks cannot survive**: an epoch is aggregated at most once by its one aggregator, and
//!   when two lineages meet, every client adopts the later epoch (round first, then attempt)
//!   and abandons the other, so all clients end on one chain of models.
//! - **Loss, duplicates, reordering**: `Ready` repeats, grants expire, stale messages are
//!   answered with the current epoch, duplicates are ignored.
//! - **A restarted client** is built with [`SwarmClient::joining`]: it asks everyone
//!   ([`SwarmMsg::Sync`]) until someone sends it the current epoch's `Learn`.
//! - **The server away**: nothing here depends on it after the start; reports queue in the
//!   driver.
//!
//! With secure aggregation ([`SwarmClient::with_secagg`]) each training epoch's aggregator
//! learns only the weighted mean of the trainers' updates: it runs a SecAgg+ round
//! ([`crate::secagg`]) among the epoch's trainers while they train, and a trainer submits its
//! masked input instead of its model (see [`secagg`]). A SecAgg+ round that aborts sends the
//! round to its next attempt, with the next aggregator.

pub mod secagg;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ccwf::{
    Action, Best, ClientWorkflow, Epoch, Input, ModelSlot, Outcome, Report, ReportEvent, pick,
    replace_in, replace_in_actions, result_model,
};
use crate::aggregate::weight_of_ref;
use crate::aggregators::{Aggregator, RoundAgg, task_view, weights};
use crate::model::ParamsType;
use crate::secagg::{SecAggAggregator, ToAggregator, ToClient};
use crate::shareable::{ReturnCode, Shareable, Task, TaskId, TaskResult, task_names};
use crate::stored::ModelRef;
use crate::time::Time;

/// Settings of a swarm run as the clients see them (FLARE's names).
#[derive(Debug, Clone, PartialEq)]
pub struct SwarmConfig {
    /// Number of training rounds.
    pub num_rounds: u32,
    /// The first round's number.
    pub start_round: u32,
    /// Every client in the run.
    pub clients: Vec<String>,
    /// Clients that train.
    pub train_clients: Vec<String>,
    /// Clients that may aggregate.
    pub aggr_clients: Vec<String>,
    /// Clients that receive the final and the best model.
    pub result_clients: Vec<String>,
    /// Fewest results a round may be aggregated from; below it the run fails.
    pub min_clients: usize,
    /// How long a round may take before missing trainers are pruned.
    pub learn_task_timeout: Duration,
    /// Results after which the aggregator waits only `wait_time_after_min_resps_received`.
    pub min_responses_required: usize,
    /// See `min_responses_required`.
    pub wait_time_after_min_resps_received: Duration,
    /// Results the aggregator receives at once.
    pub max_concurrent_submissions: usize,
    /// Longest silence towards the server.
    pub max_status_report_interval: Duration,
    /// How often a trainer repeats `Ready` and a joining client repeats `Sync`.
    pub resend_interval: Duration,
    /// The metric that picks the best model (`loss`-like names: lower is better).
    pub key_metric: String,
    /// Seed of the aggregator draws; every client of a run must use the same.
    pub seed: u64,
}

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwarmConfigError {
    /// `num_rounds` is zero.
    #[error("num_rounds must be at least 1")]
    NoRounds,
    /// A role list is empty.
    #[error("{0} is empty")]
    Empty(&'static str),
    /// A role list names a client that is not in the run.
    #[error("{list} names {name:?}, which is not a client of the run")]
    Unknown {
        /// The list.
        list: &'static str,
        /// The name.
        name: String,
    },
    /// `min_clients` is zero or above the number of trainers.
    #[error("min_clients is {min} but there are {trainers} train_clients")]
    MinClients {
        /// The configured value.
        min: usize,
        /// Trainers.
        trainers: usize,
    },
    /// A duration or count that must be positive is not.
    #[error("{0} must be positive")]
    NotPositive(&'static str),
}

impl SwarmConfig {
    /// Checks the configuration.
    pub fn check(&self) -> Result<(), SwarmConfigError> {
        if self.num_rounds == 0 {
            return Err(SwarmConfigError::NoRounds);
        }
        if self.clients.is_empty() {
            return Err(SwarmConfigError::Empty("clients"));
        }
        for (list, names) in [
            ("train_clients", &self.train_clients),
            ("aggr_clients", &self.aggr_clients),
            ("result_clients", &self.result_clients),
        ] {
            if names.is_empty() {
                return Err(SwarmConfigError::Empty(list));
            }
            if let Some(n) = names.iter().find(|n| !self.clients.contains(n)) {
                return Err(SwarmConfigError::Unknown {
                    list,
                    name: n.clone(),
                });
            }
        }
        if self.min_clients == 0 || self.min_clients > self.train_clients.len() {
            return Err(SwarmConfigError::MinClients {
                min: self.min_clients,
                trainers: self.train_clients.len(),
            });
        }
        if self.learn_task_timeout.is_zero() {
            return Err(SwarmConfigError::NotPositive("learn_task_timeout"));
        }
        if self.resend_interval.is_zero() {
            return Err(SwarmConfigError::NotPositive("resend_interval"));
        }
        if self.max_concurrent_submissions == 0 {
            return Err(SwarmConfigError::NotPositive("max_concurrent_submissions"));
        }
        if self.max_status_report_interval.is_zero() {
            return Err(SwarmConfigError::NotPositive("max_status_report_interval"));
        }
        Ok(())
    }

    /// The aggregator of `epoch`.
    pub fn aggregator(&self, epoch: Epoch) -> &str {
        let i = pick(
            self.seed,
            epoch.round,
            epoch.attempt,
            self.aggr_clients.len(),
        );
        self.aggr_clients.get(i).map_or("", String::as_str)
    }

    /// The round after the last training round: the final model's validation epoch.
    pub fn end_round(&self) -> u32 {
        self.start_round.saturating_add(self.num_rounds)
    }

    fn lower_is_better(&self) -> bool {
        self.key_metric.contains("loss") || self.key_metric.contains("error")
    }
}

/// A swarm workflow's arguments in a job config (FLARE's names; durations in seconds). The
/// client lists default to every client of the run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwarmArgs {
    /// Training rounds.
    pub num_rounds: u32,
    /// First round number.
    #[serde(default)]
    pub start_round: u32,
    /// The client the server starts the run on (default: the first of `aggr_clients` that
    /// is configured).
    #[serde(default)]
    pub starting_client: Option<String>,
    /// Clients that train.
    #[serde(default)]
    pub train_clients: Vec<String>,
    /// Clients that may aggregate.
    #[serde(default)]
    pub aggr_clients: Vec<String>,
    /// Clients that receive the final and best models.
    #[serde(default)]
    pub result_clients: Vec<String>,
    /// Fewest results a round may be aggregated from.
    #[serde(default = "one")]
    pub min_clients: usize,
    /// Seconds a round may take before missing trainers are pruned.
    #[serde(default = "default_learn_timeout")]
    pub learn_task_timeout: f64,
    /// Results after which the aggregator waits only `wait_time_after_min_resps_received`.
    #[serde(default = "one")]
    pub min_responses_required: usize,
    /// Seconds to wait for more results once `min_responses_required` are in.
    #[serde(default = "default_wait")]
    pub wait_time_after_min_resps_received: f64,
    /// Results an aggregator receives at once.
    #[serde(default = "one")]
    pub max_concurrent_submissions: usize,
    /// Longest silence of a client towards the server, in seconds.
    #[serde(default = "default_status_interval")]
    pub max_status_report_interval: f64,
    /// Seconds without progress after which the server fails the job.
    #[serde(default = "default_progress_timeout")]
    pub progress_timeout: f64,
    /// Configured clients the server waits for before starting (default: all).
    #[serde(default)]
    pub configure_min_clients: Option<usize>,
    /// The metric that selects the best model.
    #[serde(default = "default_key_metric")]
    pub key_metric: String,
    /// Seconds between repeated `Ready`/`Sync` messages.
    #[serde(default = "default_resend")]
    pub resend_interval: f64,
    /// SecAgg+ settings: each round's aggregator learns only the weighted mean update
    /// ([`secagg`]).
    #[serde(default)]
    pub secure_aggregation: Option<crate::secagg::SecAggArgs>,
}

fn one() -> usize {
    1
}
fn default_learn_timeout() -> f64 {
    600.0
}
fn default_wait() -> f64 {
    10.0
}
fn default_status_interval() -> f64 {
    30.0
}
fn default_progress_timeout() -> f64 {
    3600.0
}
fn default_key_metric() -> String {
    "accuracy".into()
}
fn default_resend() -> f64 {
    2.0
}

/// A bad duration in [`SwarmArgs`].
fn secs(name: &'static str, v: f64) -> Result<Duration, SwarmConfigError> {
    Duration::try_from_secs_f64(v).map_err(|_| SwarmConfigError::NotPositive(name))
}

impl SwarmArgs {
    /// The clients' configuration for a run among `clients`, with the run's `seed`.
    pub fn to_config(
        &self,
        clients: &[String],
        seed: u64,
    ) -> Result<SwarmConfig, SwarmConfigError> {
        let or_all = |v: &Vec<String>| {
            if v.is_empty() {
                clients.to_vec()
            } else {
                v.clone()
            }
        };
        let cfg = SwarmConfig {
            num_rounds: self.num_rounds,
            start_round: self.start_round,
            clients: clients.to_vec(),
            train_clients: or_all(&self.train_clients),
            aggr_clients: or_all(&self.aggr_clients),
            result_clients: or_all(&self.result_clients),
            min_clients: self.min_clients,
            learn_task_timeout: secs("learn_task_timeout", self.learn_task_timeout)?,
            min_responses_required: self.min_responses_required,
            wait_time_after_min_resps_received: secs(
                "wait_time_after_min_resps_received",
                self.wait_time_after_min_resps_received,
            )?,
            max_concurrent_submissions: self.max_concurrent_submissions,
            max_status_report_interval: secs(
                "max_status_report_interval",
                self.max_status_report_interval,
            )?,
            resend_interval: secs("resend_interval", self.resend_interval)?,
            key_metric: self.key_metric.clone(),
            seed,
        };
        cfg.check()?;
        if let Some(s) = &self.starting_client
            && !cfg.clients.contains(s)
        {
            return Err(SwarmConfigError::Unknown {
                list: "starting_client",
                name: s.clone(),
            });
        }
        if secs("progress_timeout", self.progress_timeout)?.is_zero() {
            return Err(SwarmConfigError::NotPositive("progress_timeout"));
        }
        Ok(cfg)
    }
}

/// Messages between swarm clients. Models travel beside them (see [`Input::Message`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SwarmMsg {
    /// Server → starting client, with the initial model: begin.
    Start,
    /// Opens `epoch`, with its global model.
    Learn {
        /// The epoch opened.
        epoch: Epoch,
        /// Trainers expected this round.
        members: Vec<String>,
        /// The best model so far.
        best: Option<Best>,
        /// The final model's validation epoch (validate, do not train).
        validate_only: bool,
    },
    /// Trainer → aggregator: my result for `epoch` is ready.
    Ready {
        /// The epoch.
        epoch: Epoch,
    },
    /// Aggregator → trainer: send it now.
    Grant {
        /// The epoch.
        epoch: Epoch,
    },
    /// Trainer → aggregator, with the result model (or none on failure).
    Submit {
        /// The epoch.
        epoch: Epoch,
        /// The task's outcome.
        return_code: ReturnCode,
        /// Why it failed, if it did.
        reason: Option<String>,
    },
    /// "I am at `epoch`; send me yours if it is later."
    Sync {
        /// The sender's epoch, if it has one.
        epoch: Option<Epoch>,
    },
    /// The run is complete; the final model goes with it to result clients.
    Done {
        /// The validation epoch that ended it.
        epoch: Epoch,
        /// The best model.
        best: Option<Best>,
    },
    /// The best model's holder → result clients, with the model.
    BestModel {
        /// Which one.
        best: Best,
    },
    /// The run failed.
    Abort {
        /// Why.
        reason: String,
    },
    /// Aggregator → trainer: a message of `epoch`'s SecAgg+ round.
    SecAggToClient {
        /// The epoch.
        epoch: Epoch,
        /// The message.
        msg: ToClient,
    },
    /// Trainer → aggregator: the answer to a [`SwarmMsg::SecAggToClient`].
    SecAggToAggregator {
        /// The epoch.
        epoch: Epoch,
        /// The answer.
        msg: ToAggregator,
    },
}

/// A trainer's result, kept for its round so it can be submitted again to a new aggregator.
#[derive(Debug, Clone)]
struct Cached {
    round: u32,
    validate_only: bool,
    data: Shareable,
    model: Option<ModelRef>,
}

/// The aggregator's state for one epoch.
#[derive(Debug)]
struct Gather {
    epoch: Epoch,
    deadline: Time,
    quorum_at: Option<Time>,
    fedavg: RoundAgg,
    /// Validation epoch: weighted metric sums.
    metric_sums: BTreeMap<String, (f64, f64)>,
    accepted: BTreeSet<String>,
    failed: BTreeSet<String>,
    expected: BTreeSet<String>,
    granted: BTreeMap<String, Time>,
    queue: VecDeque<String>,
    /// The epoch's SecAgg+ round, with secure aggregation.
    secagg: Option<SecAggAggregator>,
    /// The masked inputs are closed and the survivors are unmasking the sum.
    unmasking: bool,
}

/// One client of a swarm run.
#[derive(Debug)]
pub struct SwarmClient {
    cfg: SwarmConfig,
    me: String,
    started: bool,
    joining: bool,
    epoch: Epoch,
    validate_only: bool,
    global: Option<ModelRef>,
    members: Vec<String>,
    best: Option<Best>,
    best_model: Option<ModelRef>,
    running: Option<(TaskId, u32, bool)>,
    next_task: u64,
    cached: Option<Cached>,
    granted: bool,
    ready_at: Option<Time>,
    suspect_at: Option<Time>,
    gather: Option<Gather>,
    aggregated: BTreeSet<Epoch>,
    down: BTreeSet<String>,
    last_report: Option<Time>,
    sync_at: Option<Time>,
    done: Option<Outcome>,
    final_model: Option<ModelRef>,
    inbox: VecDeque<(String, SwarmMsg, Option<ModelRef>)>,
    actions: VecDeque<Action<SwarmMsg>>,
    /// `Ready` messages for a later epoch than this client's, by sender (one each): a
    /// trainer that validates quickly can reach the next round's aggregator before the
    /// message that opens the round does. They are taken up once this client adopts that
    /// epoch, instead of waiting for the trainer's resend.
    early_ready: BTreeMap<String, Epoch>,
    /// The run's aggregation algorithm (stateless: the aggregator changes every round).
    aggregator: Aggregator,
    /// Secure aggregation's settings and this client's side of it.
    secagg: Option<secagg::SwarmSecAgg>,
}

impl SwarmClient {
    /// Client `me` of a run that has not started yet.
    pub fn new(cfg: SwarmConfig, me: impl Into<String>) -> Result<Self, SwarmConfigError> {
        cfg.check()?;
        let me = me.into();
        if !cfg.clients.contains(&me) {
            return Err(SwarmConfigError::Unknown {
                list: "clients",
                name: me,
            });
        }
        Ok(SwarmClient {
            members: cfg.train_clients.clone(),
            cfg,
            me,
            started: false,
            joining: false,
            epoch: Epoch::default(),
            validate_only: false,
            global: None,
            best: None,
            best_model: None,
            running: None,
            next_task: 1,
            cached: None,
            granted: false,
            ready_at: None,
            suspect_at: None,
            gather: None,
            aggregated: BTreeSet::new(),
            down: BTreeSet::new(),
            last_report: None,
            sync_at: None,
            done: None,
            final_model: None,
            inbox: VecDeque::new(),
            actions: VecDeque::new(),
            early_ready: BTreeMap::new(),
            aggregator: Aggregator::default(),
            secagg: None,
        })
    }

    /// The client with `aggregator` in place of plain FedAvg. Every client of a run must
    /// use the same. The algorithm's state (a server optimizer's moments, SCAFFOLD's global
    /// control) travels in the global model of each `Learn`, so each round's aggregator takes
    /// the step where the last one left it, as one server would.
    pub fn with_aggregator(mut self, aggregator: Aggregator) -> Self {
        self.aggregator = aggregator.for_clients(self.cfg.train_clients.len());
        self
    }

    /// Client `me` rejoining a run already under way (after a restart): it asks the others
    /// for the current epoch until one answers.
    pub fn joining(cfg: SwarmConfig, me: impl Into<String>) -> Result<Self, SwarmConfigError> {
        let mut c = SwarmClient::new(cfg, me)?;
        c.joining = true;
        Ok(c)
    }

    /// The configuration.
    pub fn config(&self) -> &SwarmConfig {
        &self.cfg
    }

    /// The current epoch (meaningful once started).
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The current global model.
    pub fn global(&self) -> Option<&ModelRef> {
        self.global.as_ref()
    }

    /// The best model known so far.
    pub fn best(&self) -> Option<&Best> {
        self.best.as_ref()
    }

    fn is_trainer(&self) -> bool {
        self.cfg.train_clients.contains(&self.me)
    }

    fn is_result_client(&self, name: &str) -> bool {
        self.cfg.result_clients.iter().any(|c| c == name)
    }

    fn report(&mut self, now: Time, event: ReportEvent) {
        self.last_report = Some(now);
        self.actions.push_back(Action::Report(Report {
            epoch: self.epoch,
            event,
        }));
    }

    fn send(&mut self, to: &str, msg: SwarmMsg, model: Option<ModelRef>) {
        if to == self.me {
            self.inbox.push_back((to.to_string(), msg, model));
        } else {
            self.actions.push_back(Action::Send {
                to: to.to_string(),
                msg,
                model,
            });
        }
    }

    fn learn_msg(&self) -> SwarmMsg {
        SwarmMsg::Learn {
            epoch: self.epoch,
            members: self.members.clone(),
            best: self.best.clone(),
            validate_only: self.validate_only,
        }
    }

    /// Sends the current epoch's `Learn` to `to` (a lagging peer).
    fn send_current(&mut self, to: &str) {
        if let Some(o) = &self.done {
            let best = match o {
                Outcome::Completed { best, .. } => best.clone(),
                Outcome::Failed { reason } => {
                    let reason = reason.clone();
                    self.send(to, SwarmMsg::Abort { reason }, None);
                    return;
                }
            };
            let model = self.final_model.clone();
            let epoch = self.epoch;
            self.send(to, SwarmMsg::Done { epoch, best }, model);
            return;
        }
        if self.started
            && let Some(g) = self.global.clone()
        {
            let msg = self.learn_msg();
            self.send(to, msg, Some(g));
        }
    }

    /// Opens `epoch` with `global` for everyone (self included).
    fn open(&mut self, epoch: Epoch, global: ModelRef, validate_only: bool) {
        let msg = SwarmMsg::Learn {
            epoch,
            members: self.members.clone(),
            best: self.best.clone(),
            validate_only,
        };
        for c in self.cfg.clients.clone() {
            self.send(&c, msg.clone(), Some(global.clone()));
        }
    }

    fn process_inbox(&mut self, now: Time) {
        // Self-addressed messages are handled in order; the bound only guards against a bug
        // turning into a livelock.
        let mut budget = 10_000;
        while let Some((from, msg, model)) = self.inbox.pop_front() {
            budget -= 1;
            if budget == 0 {
                break;
            }
            self.on_message(now, &from, msg, model);
        }
    }

    fn on_message(&mut self, now: Time, from: &str, msg: SwarmMsg, model: Option<ModelRef>) {
        // Only the run's clients talk to each other; only the driver's start comes from
        // elsewhere.
        if !matches!(msg, SwarmMsg::Start) && !self.cfg.clients.iter().any(|c| c == from) {
            return;
        }
        if self.done.is_some() {
            // A finished client still answers, so late peers finish too.
            match msg {
                SwarmMsg::Done { .. } | SwarmMsg::Abort { .. } => {}
                SwarmMsg::BestModel { best } => self.on_best_model(now, best, model),
                _ => self.send_current(from),
            }
            return;
        }
        match msg {
            SwarmMsg::Start => {
                if !self.started
                    && let Some(g) = model
                {
                    self.members = self.cfg.train_clients.clone();
                    // The initial model gets the state the algorithm starts from; a model
                    // that cannot be read fails the run as a bad aggregate would.
                    match self.aggregator.prepare(g) {
                        Ok(g) => self.open(Epoch::new(self.cfg.start_round, 0), g, false),
                        Err(e) => {
                            let reason = format!("initial model: {e}");
                            self.finish(now, Outcome::Failed { reason });
                        }
                    }
                }
            }
            SwarmMsg::Learn {
                epoch,
                members,
                best,
                validate_only,
            } => {
                if self.started && epoch < self.epoch {
                    self.send_current(from);
                } else if !self.started || epoch > self.epoch {
                    match model {
                        Some(g) => self.adopt(now, epoch, g, members, best, validate_only),
                        None => {
                            // A Learn always carries its model; without it, ask again.
                            let e = self.started.then_some(self.epoch);
                            self.send(from, SwarmMsg::Sync { epoch: e }, None);
                        }
                    }
                }
            }
            SwarmMsg::Ready { epoch } => {
                if !self.catch_up(now, from, epoch) {
                    if self.started
                        && epoch > self.epoch
                        && self.cfg.clients.iter().any(|c| c == from)
                    {
                        self.early_ready.insert(from.to_string(), epoch);
                    }
                    return;
                }
                let max = self.cfg.max_concurrent_submissions;
                let Some(g) = self.gather.as_mut() else {
                    return;
                };
                if g.accepted.contains(from) || g.failed.contains(from) || g.unmasking {
                    return;
                }
                if let Some(sa) = &g.secagg {
                    // Inputs are taken once every trainer holds its shares, and only from the
                    // round's participants.
                    if !sa.taking_inputs() {
                        if sa.is_participant(from) && !g.queue.iter().any(|q| q == from) {
                            g.queue.push_back(from.to_string());
                        }
                        return;
                    }
                    if !sa.expects_input(from) {
                        return;
                    }
                }
                if g.granted.contains_key(from) || g.granted.len() < max {
                    g.granted.insert(from.to_string(), now);
                    let epoch = g.epoch;
                    self.send(from, SwarmMsg::Grant { epoch }, None);
                } else if !g.queue.iter().any(|q| q == from) {
                    g.queue.push_back(from.to_string());
                }
            }
            SwarmMsg::Grant { epoch } => {
                if epoch != self.epoch || self.cfg.aggregator(epoch) != from {
                    return;
                }
                let Some(c) = self.cached.clone() else {
                    return;
                };
                if c.round != epoch.round || c.validate_only != self.validate_only {
                    return;
                }
                let mut return_code = c.data.return_code;
                let mut reason = c.data.error_reason().map(str::to_string);
                let mut model = c.model.clone();
                if self.secagg.is_some() && !self.validate_only && return_code == ReturnCode::Ok {
                    match self.secagg_masked(epoch, &c) {
                        // The shares have not come yet: the next Ready asks again.
                        None => return,
                        Some(Ok(m)) => model = Some(m),
                        Some(Err(e)) => {
                            return_code = ReturnCode::ExecutionException;
                            reason = Some(e);
                            model = None;
                        }
                    }
                }
                self.granted = true;
                self.ready_at = None;
                self.send(
                    from,
                    SwarmMsg::Submit {
                        epoch,
                        return_code,
                        reason,
                    },
                    model,
                );
            }
            SwarmMsg::Submit {
                epoch,
                return_code,
                reason,
            } => {
                if !self.catch_up(now, from, epoch) {
                    return;
                }
                self.on_submit(now, from, return_code, reason, model);
            }
            SwarmMsg::Sync { epoch } => {
                if self.started && epoch.is_none_or(|e| e < self.epoch) {
                    self.send_current(from);
                } else if let Some(e) = epoch
                    && (!self.started || e > self.epoch)
                {
                    let mine = self.started.then_some(self.epoch);
                    self.send(from, SwarmMsg::Sync { epoch: mine }, None);
                }
            }
            SwarmMsg::Done { epoch, best } => {
                self.epoch = self.epoch.max(epoch);
                if let Some(m) = model {
                    self.final_model = Some(m.clone());
                    if self.is_result_client(&self.me) {
                        self.persist(now, ModelSlot::Final, m);
                    }
                }
                self.best = best.clone();
                if let Some(b) = &best
                    && b.holder == self.me
                    && let Some(m) = self.best_model.clone()
                {
                    for rc in self.cfg.result_clients.clone() {
                        if rc == self.me {
                            self.persist(now, ModelSlot::Best, m.clone());
                        } else {
                            let msg = SwarmMsg::BestModel { best: b.clone() };
                            self.send(&rc, msg, Some(m.clone()));
                        }
                    }
                }
                self.finish(
                    now,
                    Outcome::Completed {
                        last_round: self.cfg.end_round().saturating_sub(1),
                        best,
                    },
                );
            }
            SwarmMsg::BestModel { best } => self.on_best_model(now, best, model),
            SwarmMsg::Abort { reason } => self.finish(now, Outcome::Failed { reason }),
            SwarmMsg::SecAggToClient { epoch, msg } => {
                self.secagg_to_client(now, from, epoch, msg);
            }
            SwarmMsg::SecAggToAggregator { epoch, msg } => {
                self.secagg_to_aggregator(now, from, epoch, msg);
            }
        }
    }

    fn on_best_model(&mut self, now: Time, best: Best, model: Option<ModelRef>) {
        if self.is_result_client(&self.me)
            && let Some(m) = model
        {
            self.best = Some(best);
            self.persist(now, ModelSlot::Best, m);
        }
    }

    fn persist(&mut self, now: Time, slot: ModelSlot, model: ModelRef) {
        // The run's results are the model alone: an algorithm's state (optimizer moments,
        // SCAFFOLD's control) stays in the round models it continues from.
        let model = match slot {
            ModelSlot::Final | ModelSlot::Best => weights(&model).unwrap_or(model),
            _ => model,
        };
        self.actions.push_back(Action::Persist {
            slot: slot.clone(),
            model,
        });
        self.report(now, ReportEvent::Persisted { slot });
    }

    /// Brings this client to the epoch of a `Ready`/`Submit` from `from`. Returns whether the
    /// message is for the current epoch now.
    fn catch_up(&mut self, now: Time, from: &str, epoch: Epoch) -> bool {
        if !self.started {
            self.send(from, SwarmMsg::Sync { epoch: None }, None);
            return false;
        }
        if epoch < self.epoch {
            self.send_current(from);
            return false;
        }
        if epoch > self.epoch {
            // A later attempt of this round needs no model: the global is the same.
            if epoch.round == self.epoch.round
                && let Some(g) = self.global.clone()
            {
                let (members, best, v) =
                    (self.members.clone(), self.best.clone(), self.validate_only);
                self.adopt(now, epoch, g, members, best, v);
            } else {
                let mine = Some(self.epoch);
                self.send(from, SwarmMsg::Sync { epoch: mine }, None);
                return false;
            }
        }
        true
    }

    /// Handles the `Ready` messages that came early for the epoch just adopted, and forgets
    /// those of epochs now past.
    fn take_up_early_ready(&mut self, now: Time) {
        let epoch = self.epoch;
        let early = std::mem::take(&mut self.early_ready);
        for (from, e) in early {
            if e == epoch {
                self.on_message(now, &from, SwarmMsg::Ready { epoch }, None);
            } else if e > epoch {
                self.early_ready.insert(from, e);
            }
        }
    }

    /// Moves to `epoch` with its global model.
    fn adopt(
        &mut self,
        now: Time,
        epoch: Epoch,
        global: ModelRef,
        members: Vec<String>,
        best: Option<Best>,
        validate_only: bool,
    ) {
        let same_round =
            self.started && epoch.round == self.epoch.round && validate_only == self.validate_only;
        self.started = true;
        self.joining = false;
        self.sync_at = None;
        self.epoch = epoch;
        self.validate_only = validate_only;
        self.members = members;
        if best.is_some() {
            self.best = best;
        }
        if !same_round {
            self.global = Some(global);
            self.cached = None;
        }
        self.gather = None;
        self.granted = false;
        self.ready_at = None;
        let aggr = self.cfg.aggregator(epoch).to_string();
        if aggr == self.me && !self.aggregated.contains(&epoch) {
            let expected: BTreeSet<String> = self
                .members
                .iter()
                .filter(|m| !self.down.contains(*m))
                .cloned()
                .collect();
            self.gather = Some(Gather {
                epoch,
                deadline: now + self.cfg.learn_task_timeout,
                quorum_at: None,
                fedavg: if self.validate_only {
                    RoundAgg::default()
                } else {
                    self.aggregator.round()
                },
                metric_sums: BTreeMap::new(),
                accepted: BTreeSet::new(),
                failed: BTreeSet::new(),
                expected,
                granted: BTreeMap::new(),
                queue: VecDeque::new(),
                secagg: None,
                unmasking: false,
            });
            if same_round && epoch.attempt > 0 {
                // A re-elected aggregator announces itself, so every trainer resubmits now.
                if let Some(g) = self.global.clone() {
                    let msg = self.learn_msg();
                    for c in self.cfg.clients.clone() {
                        if c != self.me {
                            self.send(&c, msg.clone(), Some(g.clone()));
                        }
                    }
                }
            }
            self.suspect_at = None;
        } else if self.down.contains(&aggr) {
            // The aggregator is known to be gone: replace it at the next timeout call.
            self.suspect_at = Some(now);
        } else {
            self.suspect_at = Some(now + self.patience());
        }
        self.take_up_early_ready(now);
        self.report(now, ReportEvent::Training);
        if self.secagg.is_some() && !validate_only {
            if self.gather.is_some() {
                self.secagg_begin(now);
                if self.done.is_some() {
                    return;
                }
            }
            self.take_up_early_secagg(now);
        }
        if self.is_trainer() {
            let have = self
                .cached
                .as_ref()
                .is_some_and(|c| c.round == epoch.round && c.validate_only == validate_only);
            let busy = self
                .running
                .is_some_and(|(_, r, v)| r == epoch.round && v == validate_only);
            if have {
                self.ready(now);
            } else if !busy {
                self.run_task(epoch.round, validate_only);
            }
        }
        // An aggregator with nobody left to wait for finishes at once.
        self.check_gather(now);
    }

    /// How long a client waits for the aggregator before replacing it.
    fn patience(&self) -> Duration {
        self.cfg.learn_task_timeout
            + self.cfg.wait_time_after_min_resps_received
            + self.cfg.resend_interval * 2
    }

    fn run_task(&mut self, round: u32, validate_only: bool) {
        let Some(global) = self.global.clone() else {
            return;
        };
        let id = TaskId(self.next_task);
        self.next_task += 1;
        self.running = Some((id, round, validate_only));
        let name = if validate_only {
            task_names::VALIDATE
        } else {
            task_names::TRAIN
        };
        let mut data = Shareable::default().with_total_rounds(self.cfg.end_round());
        if !self.validate_only {
            data.headers.extend(self.aggregator.task_meta());
        }
        self.actions.push_back(Action::RunTask {
            task: Task {
                id,
                name: name.into(),
                round,
                data,
            },
            model: Some(task_view(&global).unwrap_or(global)),
        });
    }

    fn ready(&mut self, now: Time) {
        let aggr = self.cfg.aggregator(self.epoch).to_string();
        let epoch = self.epoch;
        self.send(&aggr, SwarmMsg::Ready { epoch }, None);
        self.ready_at = Some(now + self.cfg.resend_interval);
        if self.down.contains(&aggr) {
            self.suspect_at = Some(now);
        } else if aggr != self.me {
            self.suspect_at = Some(now + self.patience());
        }
    }

    fn on_task_done(&mut self, now: Time, mut result: TaskResult, model: Option<ModelRef>) {
        let Some((id, round, validate_only)) = self.running else {
            return;
        };
        if result.task_id != id {
            return;
        }
        self.running = None;
        let model = result_model(&mut result, model);
        if let (false, ReturnCode::Ok, Some(m)) = (validate_only, result.data.return_code, &model) {
            // This site's own model, kept for a cross-site evaluation after the run.
            if m.params_type() == ParamsType::Full {
                self.persist(now, ModelSlot::Local, m.clone());
            }
        }
        self.cached = Some(Cached {
            round,
            validate_only,
            data: result.data,
            model,
        });
        if self.done.is_some() {
            return;
        }
        if round == self.epoch.round && validate_only == self.validate_only {
            self.ready(now);
        } else if self.started && self.is_trainer() {
            // A later epoch arrived while this task ran: work on that one instead.
            self.cached = None;
            let (r, v) = (self.epoch.round, self.validate_only);
            self.run_task(r, v);
        }
    }

    fn on_submit(
        &mut self,
        now: Time,
        from: &str,
        code: ReturnCode,
        reason: Option<String>,
        model: Option<ModelRef>,
    ) {
        let Some(global) = self.global.clone() else {
            return;
        };
        let validate_only = self.validate_only;
        let Some(g) = self.gather.as_mut() else {
            return;
        };
        if !self.cfg.train_clients.iter().any(|c| c == from)
            || g.accepted.contains(from)
            || g.failed.contains(from)
            || g.unmasking
        {
            return;
        }
        g.granted.remove(from);
        let outcome = match (code, model) {
            (ReturnCode::Ok, Some(m)) if g.secagg.is_some() && !validate_only => {
                secagg::add_input(g, from, &m)
            }
            (ReturnCode::Ok, Some(m)) if validate_only => {
                let w = weight_of_ref(&m);
                for (k, v) in m.metrics() {
                    if v.is_finite() {
                        let e = g.metric_sums.entry(k.clone()).or_insert((0.0, 0.0));
                        e.0 += w * v;
                        e.1 += w;
                    }
                }
                Ok(())
            }
            (ReturnCode::Ok, Some(m)) => g
                .fedavg
                .add_ref(&global, &m, weight_of_ref(&m))
                .map_err(|e| e.to_string()),
            (ReturnCode::Ok, None) => Err("no model".to_string()),
            (c, _) => Err(format!("{c:?}: {}", reason.unwrap_or_default())),
        };
        match outcome {
            Ok(()) => {
                g.accepted.insert(from.to_string());
                if g.quorum_at.is_none()
                    && g.accepted.len() >= self.cfg.min_responses_required.max(1)
                {
                    g.quorum_at = Some(now);
                }
            }
            Err(_) => {
                g.failed.insert(from.to_string());
            }
        }
        self.grant_next(now);
        self.check_gather(now);
    }

    fn grant_next(&mut self, now: Time) {
        let max = self.cfg.max_concurrent_submissions;
        let mut grants = Vec::new();
        if let Some(g) = self.gather.as_mut() {
            let open = !g.unmasking && g.secagg.as_ref().is_none_or(|sa| sa.taking_inputs());
            while open && g.granted.len() < max {
                let Some(next) = g.queue.pop_front() else {
                    break;
                };
                if g.accepted.contains(&next) || g.failed.contains(&next) {
                    continue;
                }
                if g.secagg.as_ref().is_some_and(|sa| !sa.expects_input(&next)) {
                    continue;
                }
                g.granted.insert(next.clone(), now);
                grants.push((next, g.epoch));
            }
        }
        for (to, epoch) in grants {
            self.send(&to, SwarmMsg::Grant { epoch }, None);
        }
    }

    /// Aggregates when the epoch's conditions are met.
    fn check_gather(&mut self, now: Time) {
        let Some(g) = self.gather.as_ref() else {
            return;
        };
        if g.unmasking {
            return; // the SecAgg+ round ends it
        }
        let answered = g.accepted.len() + g.failed.len();
        // With secure aggregation, a trainer the key stages went on without sends nothing.
        let in_round = |m: &String| {
            g.secagg
                .as_ref()
                .is_none_or(|sa| sa.taking_inputs() && sa.expects_input(m))
        };
        let all_in = g.secagg.as_ref().is_none_or(|sa| sa.taking_inputs())
            && g.expected.iter().all(|m| {
                g.accepted.contains(m)
                    || g.failed.contains(m)
                    || self.down.contains(m)
                    || !in_round(m)
            });
        let quorum_wait = g
            .quorum_at
            .is_some_and(|t| now >= t + self.cfg.wait_time_after_min_resps_received);
        let timed_out = now >= g.deadline;
        // With every expected trainer gone and nothing in, only the timeout can still bring
        // results (a trainer coming back).
        if (all_in && answered > 0) || quorum_wait || timed_out {
            self.aggregate(now);
        }
    }

    /// Why `g` cannot be aggregated: fewer than `min_clients` usable results.
    fn short_of_min(&self, g: &Gather) -> Option<String> {
        if g.accepted.len() >= self.cfg.min_clients {
            return None;
        }
        let missing: Vec<&String> = self
            .cfg
            .train_clients
            .iter()
            .filter(|c| !g.accepted.contains(*c) && !g.failed.contains(*c))
            .collect();
        Some(format!(
            "round {}: {} usable results, fewer than min_clients {} (failed: {:?}, missing: {:?})",
            g.epoch.round,
            g.accepted.len(),
            self.cfg.min_clients,
            g.failed,
            missing
        ))
    }

    /// Fails the run for everyone.
    fn abort_run(&mut self, now: Time, reason: String) {
        self.gather = None;
        for c in self.cfg.clients.clone() {
            if c != self.me {
                let reason = reason.clone();
                self.send(&c, SwarmMsg::Abort { reason }, None);
            }
        }
        self.finish(now, Outcome::Failed { reason });
    }

    fn aggregate(&mut self, now: Time) {
        if !self.validate_only && self.gather.as_ref().is_some_and(|g| g.secagg.is_some()) {
            return self.secagg_close(now);
        }
        let Some(g) = self.gather.take() else {
            return;
        };
        let Some(global) = self.global.clone() else {
            return;
        };
        self.aggregated.insert(g.epoch);
        if let Some(reason) = self.short_of_min(&g) {
            return self.abort_run(now, reason);
        }
        let weight = if self.validate_only {
            0.0
        } else {
            g.fedavg.total_weight()
        };
        let (metrics, next) = if self.validate_only {
            let m: BTreeMap<String, f64> = g
                .metric_sums
                .iter()
                .map(|(k, (s, w))| (k.clone(), s / w))
                .collect();
            (m, None)
        } else {
            let metrics = g.fedavg.metrics();
            match self.aggregator.finish(g.fedavg, &global) {
                Ok(mut m) => {
                    m.current_round = Some(g.epoch.round);
                    (metrics, Some(ModelRef::from(m)))
                }
                Err(e) => {
                    let reason = format!("round {}: aggregation failed: {e}", g.epoch.round);
                    self.finish(now, Outcome::Failed { reason });
                    return;
                }
            }
        };
        self.conclude(now, g.epoch, &g.accepted, metrics, next, weight);
    }

    /// Ends the aggregated `epoch`, whose model took the results of `in_round`: the best model, the report, and the next epoch (or the
    /// end of the run) with `next`, the new global model (none after the validation epoch).
    fn conclude(
        &mut self,
        now: Time,
        epoch: Epoch,
        in_round: &BTreeSet<String>,
        metrics: BTreeMap<String, f64>,
        next: Option<ModelRef>,
        weight: f64,
    ) {
        let Some(global) = self.global.clone() else {
            return;
        };
        let mut accepted: Vec<String> = in_round.iter().cloned().collect();
        accepted.sort();
        let pruned: Vec<String> = self
            .cfg
            .train_clients
            .iter()
            .filter(|c| !in_round.contains(*c))
            .cloned()
            .collect();
        let version = epoch.round.saturating_sub(self.cfg.start_round);
        // The model's own metrics (what DP-FedAvg spent to make it) go with the measurements.
        let mut metrics = metrics;
        for (k, v) in global.metrics() {
            metrics.entry(k.clone()).or_insert(*v);
        }
        // The trainers measured `global` (version `version`): is it the best so far?
        if let Some(&m) = metrics.get(&self.cfg.key_metric) {
            let better = self.best.as_ref().is_none_or(|b| {
                if self.cfg.lower_is_better() {
                    m < b.metric
                } else {
                    m > b.metric
                }
            });
            if better {
                self.best = Some(Best {
                    version,
                    metric: m,
                    holder: self.me.clone(),
                });
                self.best_model = Some(global.clone());
            }
        }
        self.report(
            now,
            ReportEvent::Aggregated {
                accepted,
                pruned: pruned.clone(),
                version,
                metrics,
                best: self.best.clone(),
                weight,
            },
        );
        let next_epoch = Epoch::new(epoch.round + 1, epoch.attempt);
        match next {
            Some(model) => {
                self.persist(now, ModelSlot::Round(epoch.round), model.clone());
                // Pruned trainers are not waited for next round, but may still submit.
                self.members = self
                    .cfg
                    .train_clients
                    .iter()
                    .filter(|c| !pruned.contains(c) && !self.down.contains(*c))
                    .cloned()
                    .collect();
                let validate = next_epoch.round >= self.cfg.end_round();
                self.open(next_epoch, model, validate);
            }
            None => {
                let best = self.best.clone();
                // Every client gets the final model, so any of them can hand it to a result
                // client that missed the end.
                let global = weights(&global).unwrap_or(global);
                for c in self.cfg.clients.clone() {
                    let model = Some(global.clone());
                    self.send(
                        &c,
                        SwarmMsg::Done {
                            epoch,
                            best: best.clone(),
                        },
                        model,
                    );
                }
                self.final_model = Some(global);
            }
        }
    }

    /// Gives up on the current aggregator and moves to the next attempt of the round.
    fn reelect(&mut self, now: Time) {
        let previous = self.cfg.aggregator(self.epoch).to_string();
        let next = self.next_attempt();
        let successor = self.cfg.aggregator(next).to_string();
        self.report(
            now,
            ReportEvent::Reelected {
                previous,
                next: successor,
            },
        );
        if let Some(g) = self.global.clone() {
            let (members, best, v) = (self.members.clone(), self.best.clone(), self.validate_only);
            self.adopt(now, next, g, members, best, v);
        }
    }

    /// The round's next attempt whose aggregator is not known to be down.
    fn next_attempt(&self) -> Epoch {
        let n = self.cfg.aggr_clients.len() as u32;
        let mut next = Epoch::new(self.epoch.round, self.epoch.attempt + 1);
        for _ in 0..n {
            if !self.down.contains(self.cfg.aggregator(next)) {
                break;
            }
            next.attempt += 1;
        }
        next
    }

    fn finish(&mut self, now: Time, outcome: Outcome) {
        if self.done.is_some() {
            return;
        }
        self.gather = None;
        self.suspect_at = None;
        self.ready_at = None;
        self.done = Some(outcome.clone());
        self.report(now, ReportEvent::Finished(outcome.clone()));
        self.actions.push_back(Action::Finished(outcome));
    }
}

impl ClientWorkflow for SwarmClient {
    type Msg = SwarmMsg;

    fn handle(&mut self, now: Time, input: Input<SwarmMsg>) {
        if self.last_report.is_none() {
            self.report(now, ReportEvent::Alive);
        }
        match input {
            Input::Message { from, msg, model } => self.on_message(now, &from, msg, model),
            Input::TaskDone(r, m) => self.on_task_done(now, r, m),
            Input::PeerDown(p) => {
                self.down.insert(p.clone());
                if self.done.is_some() || !self.started {
                    return;
                }
                if self.gather.is_some() {
                    if let Some(g) = self.gather.as_mut() {
                        g.granted.remove(&p);
                        g.queue.retain(|q| q != &p);
                    }
                    self.grant_next(now);
                    self.check_gather(now);
                } else if self.cfg.aggregator(self.epoch) == p {
                    self.reelect(now);
                }
            }
            Input::PeerUp(p) => {
                self.down.remove(&p);
            }
        }
        self.process_inbox(now);
    }

    fn handle_timeout(&mut self, now: Time) {
        if self.last_report.is_none() {
            self.report(now, ReportEvent::Alive);
        }
        if self.done.is_none() {
            if self.joining && self.sync_at.is_none_or(|t| now >= t) {
                for c in self.cfg.clients.clone() {
                    if c != self.me {
                        self.send(&c, SwarmMsg::Sync { epoch: None }, None);
                    }
                }
                self.sync_at = Some(now + self.cfg.resend_interval);
            }
            // Expired grants free their slot.
            let grant_timeout = self.cfg.learn_task_timeout / 2;
            if let Some(g) = self.gather.as_mut() {
                let stale: Vec<String> = g
                    .granted
                    .iter()
                    .filter(|(_, t)| now >= **t + grant_timeout)
                    .map(|(k, _)| k.clone())
                    .collect();
                for s in stale {
                    g.granted.remove(&s);
                }
            }
            self.secagg_tick(now);
            self.grant_next(now);
            self.check_gather(now);
            if self.ready_at.is_some_and(|t| now >= t) && !self.granted {
                self.ready(now);
            }
            if self.gather.is_none() && self.started && self.suspect_at.is_some_and(|t| now >= t) {
                self.reelect(now);
            }
        }
        if self
            .last_report
            .is_some_and(|t| now >= t + self.cfg.max_status_report_interval)
        {
            self.report(now, ReportEvent::Alive);
        }
        self.process_inbox(now);
    }

    fn poll_action(&mut self) -> Option<Action<SwarmMsg>> {
        self.actions.pop_front()
    }

    fn poll_timeout(&self) -> Option<Time> {
        let mut t: Vec<Time> = Vec::new();
        if let Some(r) = self.last_report {
            t.push(r + self.cfg.max_status_report_interval);
        }
        if self.done.is_none() {
            if let Some(g) = self.gather.as_ref().filter(|g| !g.unmasking) {
                t.push(g.deadline);
                if let Some(q) = g.quorum_at {
                    t.push(q + self.cfg.wait_time_after_min_resps_received);
                }
                for at in g.granted.values() {
                    t.push(*at + self.cfg.learn_task_timeout / 2);
                }
            }
            if let Some(d) = self
                .gather
                .as_ref()
                .and_then(|g| g.secagg.as_ref())
                .and_then(SecAggAggregator::poll_timeout)
            {
                t.push(d);
            }
            if !self.granted
                && let Some(r) = self.ready_at
            {
                t.push(r);
            }
            if self.gather.is_none()
                && let Some(s) = self.suspect_at
            {
                t.push(s);
            }
            if self.joining {
                t.push(self.sync_at.unwrap_or(Time::ZERO));
            }
        }
        t.into_iter().min()
    }

    fn is_done(&self) -> bool {
        self.done.is_some()
    }

    fn replace_model(&mut self, was: &ModelRef, now: &ModelRef) {
        replace_in(&mut self.global, was, now);
        replace_in(&mut self.best_model, was, now);
        replace_in(&mut self.final_model, was, now);
        if let Some(c) = &mut self.cached {
            replace_in(&mut c.model, was, now);
        }
        for (_, _, m) in &mut self.inbox {
            replace_in(m, was, now);
        }
        if let Some(sa) = &mut self.secagg {
            sa.replace_model(was, now);
        }
        replace_in_actions(&mut self.actions, was, now);
    }
}
