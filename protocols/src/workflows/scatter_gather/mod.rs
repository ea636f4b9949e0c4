//! Scatter and gather (FLARE's `ScatterAndGather`) as a sans-IO state machine.
//!
//! Each round the controller sends a `train` task carrying the global model to every client,
//! folds the answers into a streaming [`FedAvg`] as they arrive, and aggregates once
//! `min_clients` results are in and `wait_time_after_min_received` has passed, once every
//! client has answered, or when the task timeout expires with the quorum met. After the last
//! round it sends a `validate` task with the final model to measure it.
//!
//! Rules:
//! - a result for an earlier task (late), a duplicate, or one from a client that was not
//!   asked is dropped;
//! - an error result, or one whose model does not fit the global model, is excluded;
//! - when the timeout passes with fewer than `min_clients` accepted results, the run aborts.
//!
//! Following FLARE's Client API convention, the metrics a client returns with its trained
//! model are those of the *incoming* global model on its local validation data, so round
//! `r`'s results measure model version `r` (version 0 is the initial model, version `k` the
//! model after `k` aggregations).
//!
//! The driver calls [`ScatterGather::start`], feeds [`ScatterGather::handle_result`] and
//! [`ScatterGather::handle_timeout`] with the current [`Time`], and drains
//! [`ScatterGather::poll_output`]; [`ScatterGather::poll_timeout`] says when to call back.

mod secagg;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::aggregate::{AggregateError, weight_of_ref};
use crate::aggregators::{Aggregator, RoundAgg, task_view, weights};
use crate::model::{FLModel, ModelError};
use crate::shareable::{ReturnCode, Shareable, Task, TaskId, TaskResult, task_names};
use crate::stored::ModelRef;
use crate::time::Time;

/// Settings of a scatter-and-gather run (FLARE's argument names).
#[derive(Debug, Clone, PartialEq)]
pub struct SagConfig {
    /// Number of training rounds.
    pub num_rounds: u32,
    /// The first round's number (to continue an earlier run).
    pub start_round: u32,
    /// Accepted results needed to aggregate a round.
    pub min_clients: usize,
    /// How long to wait for more results once `min_clients` are in.
    pub wait_time_after_min_received: Duration,
    /// How long a task may take before its client is given up on for the round.
    pub task_timeout: Duration,
    /// Whether to send a final `validate` task with the last model.
    pub validate_final: bool,
}

impl Default for SagConfig {
    fn default() -> Self {
        SagConfig {
            num_rounds: 5,
            start_round: 0,
            min_clients: 1,
            wait_time_after_min_received: Duration::from_secs(10),
            task_timeout: Duration::from_secs(600),
            validate_final: true,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SagConfigError {
    /// `num_rounds` is zero.
    #[error("num_rounds must be at least 1")]
    NoRounds,
    /// `min_clients` is zero or larger than the number of clients.
    #[error("min_clients is {min} but {available} clients take part")]
    MinClients {
        /// The configured minimum.
        min: usize,
        /// How many clients take part.
        available: usize,
    },
    /// `task_timeout` is zero.
    #[error("task_timeout must be positive")]
    NoTimeout,
    /// A resumed run's next round is outside the configured rounds.
    #[error("cannot resume at round {round}: the run's rounds are {first}..{end}")]
    ResumeRound {
        /// The round asked for.
        round: u32,
        /// The first round.
        first: u32,
        /// One past the last round.
        end: u32,
    },
    /// The same client name appears twice.
    #[error("client {0:?} is listed twice")]
    DuplicateClient(String),
}

/// Why a result was dropped without being looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// It answers a task of an earlier round or phase.
    Late,
    /// This client already answered this task.
    Duplicate,
    /// No task was sent to this client.
    NotAsked,
}

/// Something the driver should log, show or persist.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A training round began.
    RoundStarted {
        /// The round.
        round: u32,
        /// How many clients got the task.
        clients: usize,
    },
    /// A result was folded into the round's aggregate.
    ResultAccepted {
        /// The round.
        round: u32,
        /// Who sent it.
        client: String,
        /// Its aggregation weight.
        weight: f64,
        /// Clients that have answered this round so far (accepted or not).
        answered: usize,
        /// Clients asked this round.
        asked: usize,
    },
    /// A result was dropped.
    ResultDropped {
        /// Who sent it.
        client: String,
        /// The task it named.
        task_id: TaskId,
        /// Why.
        reason: DropReason,
    },
    /// A result was excluded from aggregation: an error code or an unusable model.
    ResultExcluded {
        /// The round.
        round: u32,
        /// Who sent it.
        client: String,
        /// Its return code.
        code: ReturnCode,
        /// Why it was excluded.
        reason: String,
    },
    /// These clients did not answer before the task timeout.
    TimedOut {
        /// The round (or the final validation's round number).
        round: u32,
        /// The silent clients.
        clients: Vec<String>,
    },
    /// A round was aggregated into a new global model.
    RoundAggregated {
        /// The round.
        round: u32,
        /// The new global model (version `round + 1 - start_round`), in memory.
        model: ModelRef,
        /// How many results went into it.
        accepted: usize,
        /// Their total aggregation weight (the sample counts, as a rule).
        weight: f64,
    },
    /// Metrics of a global model version, averaged over the clients that measured it.
    ModelEvaluated {
        /// 0 is the initial model, `k` the model after `k` aggregations.
        version: u32,
        /// Weighted average metrics; empty when nobody reported any.
        metrics: BTreeMap<String, f64>,
    },
    /// The run finished; `model` is the final global model.
    Finished {
        /// The final global model.
        model: ModelRef,
    },
    /// The run stopped without finishing.
    Aborted {
        /// The round it stopped in.
        round: u32,
        /// Why.
        reason: String,
    },
}

/// What the controller asks the driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Deliver `task` with `model` to client `to`.
    Send {
        /// Client name.
        to: String,
        /// The task (its `data.model` is empty: the model travels in `model`).
        task: Task,
        /// The global model the task carries, shared by every task of the round.
        model: ModelRef,
    },
    /// Report an event.
    Event(Event),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Train,
    Validate,
    Done,
}

/// The scatter-and-gather controller.
#[derive(Debug)]
pub struct ScatterGather {
    cfg: SagConfig,
    clients: Vec<String>,
    phase: Phase,
    round: u32,
    global: ModelRef,
    next_task: u64,
    /// Task sent to each client in the current phase.
    asked: BTreeMap<String, TaskId>,
    answered: BTreeSet<String>,
    /// The run's algorithm and its state (a server optimizer's moments).
    aggregator: Aggregator,
    /// The current phase's accumulator.
    agg: RoundAgg,
    /// What the current phase's tasks carry: the global model, or its view without a server
    /// optimizer's state ([`task_view`]).
    task_model: ModelRef,
    /// When the current phase gives up on silent clients.
    deadline: Time,
    /// When to aggregate now that `min_clients` results are in.
    aggregate_at: Option<Time>,
    /// Secure aggregation, when the run uses it.
    secagg: Option<secagg::SagSecAgg>,
    out: VecDeque<Output>,
}

impl ScatterGather {
    /// A controller for `clients`, starting from `initial`.
    pub fn new(
        cfg: SagConfig,
        clients: Vec<String>,
        initial: impl Into<ModelRef>,
    ) -> Result<Self, SagConfigError> {
        if cfg.num_rounds == 0 {
            return Err(SagConfigError::NoRounds);
        }
        if cfg.min_clients == 0 || cfg.min_clients > clients.len() {
            return Err(SagConfigError::MinClients {
                min: cfg.min_clients,
                available: clients.len(),
            });
        }
        if cfg.task_timeout.is_zero() {
            return Err(SagConfigError::NoTimeout);
        }
        let mut seen = BTreeSet::new();
        if let Some(dup) = clients.iter().find(|c| !seen.insert(c.as_str())) {
            return Err(SagConfigError::DuplicateClient(dup.clone()));
        }
        Ok(ScatterGather {
            round: cfg.start_round,
            cfg,
            clients,
            phase: Phase::Idle,
            global: initial.into(),
            next_task: 0,
            asked: BTreeMap::new(),
            answered: BTreeSet::new(),
            aggregator: Aggregator::default(),
            agg: RoundAgg::default(),
            task_model: ModelRef::from(FLModel::default()),
            deadline: Time::ZERO,
            aggregate_at: None,
            secagg: None,
            out: VecDeque::new(),
        })
    }

    /// A controller that continues an interrupted run at `next_round` from `model`, the
    /// global model after round `next_round - 1` (FLARE resumes from its snapshot the same
    /// way). Versions keep counting from `cfg.start_round`, so the resumed run's metrics and
    /// models carry the numbers the uninterrupted run would have given them. With
    /// `next_round` past the last round, [`ScatterGather::start`] goes straight to the final
    /// validation.
    pub fn resume(
        cfg: SagConfig,
        clients: Vec<String>,
        model: impl Into<ModelRef>,
        next_round: u32,
    ) -> Result<Self, SagConfigError> {
        let end = cfg.start_round.saturating_add(cfg.num_rounds);
        if next_round < cfg.start_round || next_round > end {
            return Err(SagConfigError::ResumeRound {
                round: next_round,
                first: cfg.start_round,
                end,
            });
        }
        let mut c = ScatterGather::new(cfg, clients, model)?;
        c.round = next_round;
        Ok(c)
    }

    /// The controller with `aggregator` in place of plain FedAvg, for this run's clients.
    /// The algorithm's state travels in the global model, so a resumed run
    /// ([`ScatterGather::resume`]) from a snapshot continues it where it stopped; a model
    /// without it (the initial one) gets the state the algorithm starts from.
    pub fn with_aggregator(mut self, aggregator: Aggregator) -> Result<Self, AggregateError> {
        self.aggregator = aggregator.for_clients(self.clients.len());
        self.global = self.aggregator.prepare(self.global)?;
        if self.phase == Phase::Train {
            self.agg = self.aggregator.round();
        }
        Ok(self)
    }

    /// The run's aggregator and its state.
    pub fn aggregator(&self) -> &Aggregator {
        &self.aggregator
    }

    /// Starts the first round (or, for a resumed run past its last round, the final
    /// validation).
    pub fn start(&mut self, now: Time) {
        if self.phase != Phase::Idle {
            return;
        }
        self.enter_round(now);
    }

    /// The current global model.
    pub fn global(&self) -> &ModelRef {
        &self.global
    }

    /// Puts `model` in place of the global model: the same model, now stored by the driver
    /// (which persisted it), so the controller stops holding it in memory. Tasks sent from
    /// now on, and those still queued with the old one, carry `model`. Refused, changing
    /// nothing, when its tensors differ.
    pub fn replace_global(&mut self, model: ModelRef) -> Result<(), ModelError> {
        self.global.check_compatible(&model)?;
        let old = std::mem::replace(&mut self.global, model);
        // Tasks carry the global model, or its view without a server optimizer's state:
        // either is swapped for its counterpart of `model`.
        let view = task_view(&self.global).unwrap_or_else(|_| self.global.clone());
        let old_view = std::mem::replace(&mut self.task_model, view);
        for out in &mut self.out {
            if let Output::Send { model: m, .. } = out {
                if m.same(&old) {
                    *m = self.global.clone();
                } else if m.same(&old_view) {
                    *m = self.task_model.clone();
                }
            }
        }
        Ok(())
    }

    /// The current round.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Whether the run has finished or aborted.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The next thing for the driver to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When the driver must call [`ScatterGather::handle_timeout`] next, if ever.
    pub fn poll_timeout(&self) -> Option<Time> {
        match self.phase {
            Phase::Train if self.unmasking() => self.secagg_timeout(),
            Phase::Train | Phase::Validate => {
                let t = match self.aggregate_at {
                    Some(at) => at.min(self.deadline),
                    None => self.deadline,
                };
                Some(self.secagg_timeout().map_or(t, |s| s.min(t)))
            }
            Phase::Idle | Phase::Done => None,
        }
    }

    fn emit(&mut self, e: Event) {
        self.out.push_back(Output::Event(e));
    }

    fn begin_phase(&mut self, now: Time, phase: Phase) {
        self.phase = phase;
        self.asked.clear();
        self.answered.clear();
        self.agg = match phase {
            Phase::Train => self.aggregator.round(),
            _ => RoundAgg::default(),
        };
        self.aggregate_at = None;
        self.deadline = now + self.cfg.task_timeout;
        let name = match phase {
            Phase::Train => task_names::TRAIN,
            _ => task_names::VALIDATE,
        };
        if phase == Phase::Train {
            self.emit(Event::RoundStarted {
                round: self.round,
                clients: self.clients.len(),
            });
        }
        // A server optimizer's moments stay here; everything else of the global model goes.
        let task_model = task_view(&self.global).unwrap_or_else(|_| self.global.clone());
        self.task_model = task_model.clone();
        if phase == Phase::Train && self.secagg.is_some() {
            // The train tasks go out with the shares, after the key stages.
            self.secagg_begin(now);
            return;
        }
        for client in self.clients.clone() {
            let id = TaskId(self.next_task);
            self.next_task += 1;
            self.asked.insert(client.clone(), id);
            let mut data =
                Shareable::default().with_total_rounds(self.cfg.start_round + self.cfg.num_rounds);
            if phase == Phase::Train {
                data.headers.extend(self.aggregator.task_meta());
            }
            let task = Task {
                id,
                name: name.to_string(),
                round: self.round,
                data,
            };
            self.out.push_back(Output::Send {
                to: client,
                task,
                model: task_model.clone(),
            });
        }
    }

    /// Takes a client's answer, its model in memory.
    pub fn handle_result(&mut self, now: Time, from: &str, mut result: TaskResult) {
        let model = result.data.model.take().map(ModelRef::Memory);
        self.handle_result_ref(now, from, result, model);
    }

    /// Takes a client's answer whose model (if any) is `model`, in memory or stored; the
    /// result's own `data.model` is ignored.
    pub fn handle_result_ref(
        &mut self,
        now: Time,
        from: &str,
        result: TaskResult,
        model: Option<ModelRef>,
    ) {
        if self.secagg_claims(&result) {
            return self.secagg_result(now, from, result);
        }
        let expected = self.asked.get(from).copied();
        let reason = match expected {
            _ if !matches!(self.phase, Phase::Train | Phase::Validate) => Some(DropReason::Late),
            None => Some(DropReason::NotAsked),
            // The round too: a resumed run numbers its tasks afresh, so a result a site
            // computed for the run before the restart may carry a task id of this one.
            Some(id) if id != result.task_id || result.round != self.round => {
                Some(DropReason::Late)
            }
            Some(_) if self.answered.contains(from) => Some(DropReason::Duplicate),
            Some(_) => None,
        };
        if let Some(reason) = reason {
            self.emit(Event::ResultDropped {
                client: from.to_string(),
                task_id: result.task_id,
                reason,
            });
            return;
        }
        self.answered.insert(from.to_string());
        let code = result.data.return_code;
        let outcome = match (&model, code) {
            (_, c) if c != ReturnCode::Ok => Err(result
                .data
                .error_reason()
                .unwrap_or("the client reported an error")
                .to_string()),
            (None, _) => Err("the result carries no model".to_string()),
            (Some(m), _) if self.phase == Phase::Validate => {
                // Validation answers carry only metrics; fold them with an empty model.
                let metrics_only = FLModel {
                    metrics: m.metrics().clone(),
                    meta: m.meta().clone(),
                    ..FLModel::default()
                };
                let w = weight_of_ref(m);
                self.agg
                    .add(&FLModel::default(), &metrics_only, w)
                    .map(|()| w)
                    .map_err(|e| e.to_string())
            }
            (Some(m), _) if self.secagg.is_some() => self.secagg_input(from, m),
            (Some(m), _) => {
                let w = weight_of_ref(m);
                self.agg
                    .add_ref(&self.global, m, w)
                    .map(|()| w)
                    .map_err(|e| e.to_string())
            }
        };
        match outcome {
            Ok(weight) => {
                self.emit(Event::ResultAccepted {
                    round: self.round,
                    client: from.to_string(),
                    weight,
                    answered: self.answered.len(),
                    asked: self.asked.len(),
                });
                if self.agg.count() == self.cfg.min_clients {
                    self.aggregate_at = Some(now + self.cfg.wait_time_after_min_received);
                }
            }
            Err(reason) => self.emit(Event::ResultExcluded {
                round: self.round,
                client: from.to_string(),
                code,
                reason,
            }),
        }
        let everyone_answered = self.answered.len() == self.asked.len();
        if everyone_answered || self.aggregate_at.is_some_and(|at| at <= now) {
            self.close_phase(now, false);
        }
    }

    /// Call when [`ScatterGather::poll_timeout`]'s time has come.
    pub fn handle_timeout(&mut self, now: Time) {
        if !matches!(self.phase, Phase::Train | Phase::Validate) {
            return;
        }
        if self.secagg_timeout().is_some_and(|t| t <= now) {
            self.secagg_tick(now);
        }
        if self.unmasking() || self.phase == Phase::Done {
            return;
        }
        if now >= self.deadline {
            self.close_phase(now, true);
        } else if self.aggregate_at.is_some_and(|at| at <= now) {
            self.close_phase(now, false);
        }
    }

    fn close_phase(&mut self, now: Time, timed_out: bool) {
        if self.unmasking() {
            return;
        }
        if timed_out {
            let silent: Vec<String> = self
                .asked
                .keys()
                .filter(|c| !self.answered.contains(*c))
                .cloned()
                .collect();
            if !silent.is_empty() {
                self.emit(Event::TimedOut {
                    round: self.round,
                    clients: silent,
                });
            }
        }
        let agg = std::mem::take(&mut self.agg);
        let mut metrics = agg.metrics();
        // The model's own metrics (what DP-FedAvg spent to make it) go with the measurements.
        for (k, v) in self.global.metrics() {
            metrics.entry(k.clone()).or_insert(*v);
        }
        let version = self.round - self.cfg.start_round;
        if self.phase == Phase::Validate {
            self.emit(Event::ModelEvaluated { version, metrics });
            self.finish();
            return;
        }
        if agg.count() < self.cfg.min_clients {
            let reason = format!(
                "round {}: {} accepted results, {} needed",
                self.round,
                agg.count(),
                self.cfg.min_clients
            );
            self.emit(Event::Aborted {
                round: self.round,
                reason,
            });
            self.phase = Phase::Done;
            return;
        }
        self.emit(Event::ModelEvaluated { version, metrics });
        if self.secagg.is_some() {
            return self.secagg_close(now);
        }
        let accepted = agg.count();
        let weight = agg.total_weight();
        match self.aggregator.finish(agg, &self.global) {
            Ok(mut model) => {
                model.current_round = Some(self.round);
                model.total_rounds = Some(self.cfg.start_round + self.cfg.num_rounds);
                self.global = ModelRef::Memory(Arc::new(model));
            }
            Err(e) => {
                self.emit(Event::Aborted {
                    round: self.round,
                    reason: e.to_string(),
                });
                self.phase = Phase::Done;
                return;
            }
        }
        self.emit(Event::RoundAggregated {
            round: self.round,
            model: self.global.clone(),
            accepted,
            weight,
        });
        self.next_phase(now);
    }

    /// After a round's aggregation: the next round, the final validation, or the end.
    fn next_phase(&mut self, now: Time) {
        self.round += 1;
        self.enter_round(now);
    }

    /// Trains the current round, or after the last one validates the final model or ends.
    fn enter_round(&mut self, now: Time) {
        if self.round < self.cfg.start_round + self.cfg.num_rounds {
            self.begin_phase(now, Phase::Train);
        } else if self.cfg.validate_final {
            self.begin_phase(now, Phase::Validate);
        } else {
            self.finish();
        }
    }

    fn finish(&mut self) {
        self.phase = Phase::Done;
        self.asked.clear();
        // The run's result is the model alone, without the algorithm's state.
        let model = weights(&self.global).unwrap_or_else(|_| self.global.clone());
        self.emit(Event::Finished { model });
    }
}
