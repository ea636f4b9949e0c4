//! Client-controlled cross-site evaluation (FLARE's `CrossSiteEvalClientController`) as a
//! sans-IO [`ClientWorkflow`].
//!
//! Every evaluator measures every evaluatee's locally trained model, and the global model if
//! a client holds one (`global_model_client`, for example the best model of a preceding swarm
//! run), on its own validation data. Models travel peer to peer; only the metrics go to the
//! server, as [`ReportEvent::Evaluated`] (the model named by its site, or `global`).
//!
//! Rules:
//! - the server starts the run by sending [`CseMsg::Start`] to every client; a client serves
//!   its models from the moment it exists, and evaluates once started;
//! - an evaluator fetches one model at a time ([`CseMsg::Request`], answered with
//!   [`CseMsg::Model`] and the model beside it, or [`CseMsg::NoModel`]), so it never receives
//!   many models at once; evaluators walk the models in different orders (rotated by their
//!   place in the evaluator list and the seed), so they spread over the holders. Its own
//!   model it takes directly;
//! - a request is resent every eighth of `submit_model_timeout`; when the holder goes down,
//!   refuses, or does not answer within `submit_model_timeout`, the evaluation is reported as
//!   failed ([`ReportEvent::EvaluationFailed`]) and the evaluator moves on. A `validate` task
//!   that fails or outlasts `eval_task_timeout` is reported as failed too;
//! - a late, duplicated or unrequested model is dropped; every model is evaluated at most once
//!   per evaluator;
//! - an evaluator that has measured (or given up) every model tells every other client
//!   ([`CseMsg::Done`], resent until acknowledged or the client is down). A client finishes
//!   with [`Outcome::Completed`] once its own evaluations are over and every other evaluator
//!   has said `Done` or gone down: until then it keeps serving its models.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ccwf::{
    Action, ClientWorkflow, Epoch, Input, Outcome, Report, ReportEvent, replace_in,
    replace_in_actions, result_model,
};
use crate::shareable::{ReturnCode, Shareable, Task, TaskId, task_names};
use crate::stored::ModelRef;
use crate::time::Time;

/// The name under which the global model is evaluated.
pub const GLOBAL_MODEL: &str = "global";

/// How many times `Done` is sent to a client before it is given up.
const DONE_TRIES: u32 = 10;

/// Settings of a cross-site evaluation (FLARE's argument names; durations in seconds).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct CseConfig {
    /// The participants, filled in by the driver.
    pub clients: Vec<String>,
    /// Clients that evaluate; empty (default) means every client.
    pub evaluators: Vec<String>,
    /// Clients whose local models are evaluated; empty (default) means every client.
    pub evaluatees: Vec<String>,
    /// The client holding the global model, if one is to be evaluated. Default none.
    pub global_model_client: Option<String>,
    /// How long one `validate` task may take. Default 300.
    pub eval_task_timeout: f64,
    /// How long a holder may take to send a requested model. Default 600.
    pub submit_model_timeout: f64,
    /// Seed of the evaluators' orders (the driver derives it from the job id). Default 0.
    pub seed: u64,
}

impl Default for CseConfig {
    fn default() -> Self {
        CseConfig {
            clients: Vec::new(),
            evaluators: Vec::new(),
            evaluatees: Vec::new(),
            global_model_client: None,
            eval_task_timeout: 300.0,
            submit_model_timeout: 600.0,
            seed: 0,
        }
    }
}

/// A cross-site evaluation's arguments in a job config (the names of FLARE's
/// `CrossSiteEvalServerController`; durations in seconds). It runs after the job's training
/// workflow, on the models that run left: each site's own last trained model and the global
/// model (the best one, or the final one without a best).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CseArgs {
    /// Clients that evaluate (default: every client).
    #[serde(default)]
    pub evaluators: Vec<String>,
    /// Clients whose own models are evaluated (default: every client).
    #[serde(default)]
    pub evaluatees: Vec<String>,
    /// The client whose global model is evaluated (default: one that received it).
    #[serde(default)]
    pub global_model_client: Option<String>,
    /// See [`CseConfig::eval_task_timeout`]. Default 300.
    #[serde(default = "default_eval_timeout")]
    pub eval_task_timeout: f64,
    /// See [`CseConfig::submit_model_timeout`]. Default 600.
    #[serde(default = "default_submit_timeout")]
    pub submit_model_timeout: f64,
    /// Seconds without a report after which the server fails the job. Default 3600.
    #[serde(default = "default_progress_timeout")]
    pub progress_timeout: f64,
}

fn default_eval_timeout() -> f64 {
    CseConfig::default().eval_task_timeout
}
fn default_submit_timeout() -> f64 {
    CseConfig::default().submit_model_timeout
}
fn default_progress_timeout() -> f64 {
    3600.0
}

impl CseArgs {
    /// The clients' configuration for an evaluation among `clients`, with the run's `seed`;
    /// `global_holder` holds the global model unless `global_model_client` names one. Checked.
    pub fn to_config(
        &self,
        clients: &[String],
        seed: u64,
        global_holder: Option<String>,
    ) -> Result<CseConfig, CseConfigError> {
        let cfg = CseConfig {
            clients: clients.to_vec(),
            evaluators: self.evaluators.clone(),
            evaluatees: self.evaluatees.clone(),
            global_model_client: self.global_model_client.clone().or(global_holder),
            eval_task_timeout: self.eval_task_timeout,
            submit_model_timeout: self.submit_model_timeout,
            seed,
        };
        let first = clients.first().ok_or(CseConfigError::NoClients)?;
        CseClient::new(cfg.clone(), first, None, None)?;
        if !(self.progress_timeout > 0.0 && self.progress_timeout.is_finite()) {
            return Err(CseConfigError::BadDuration("progress_timeout"));
        }
        Ok(cfg)
    }
}

/// Why a cross-site evaluation configuration was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CseConfigError {
    /// No clients take part.
    #[error("no clients take part")]
    NoClients,
    /// A client is listed twice.
    #[error("client {0:?} is listed twice")]
    DuplicateClient(String),
    /// A named client (this one, an evaluator, an evaluatee or the global model's holder) does
    /// not take part.
    #[error("{0:?} is not one of the clients")]
    UnknownClient(String),
    /// A duration is not a positive number of seconds.
    #[error("{0} must be a positive number of seconds")]
    BadDuration(&'static str),
}

/// Messages between the clients of a cross-site evaluation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CseMsg {
    /// From the server: begin evaluating.
    Start,
    /// Send me model `model` (a site name or [`GLOBAL_MODEL`]).
    Request {
        /// Which model.
        model: String,
    },
    /// The requested model, beside the message.
    Model {
        /// Which model.
        model: String,
    },
    /// The requested model is not here.
    NoModel {
        /// Which model.
        model: String,
        /// Why.
        reason: String,
    },
    /// The sender has evaluated (or given up) every model.
    Done,
    /// The answer to `Done`.
    DoneAck,
}

fn secs(v: f64, name: &'static str) -> Result<Duration, CseConfigError> {
    match Duration::try_from_secs_f64(v) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(CseConfigError::BadDuration(name)),
    }
}

/// What the evaluator is doing about its current model.
#[derive(Debug)]
enum Step {
    /// Waiting for the model: resend at `resend`, give up at `give_up`.
    Fetching { resend: Time, give_up: Time },
    /// Validating it (task `task`) until `give_up`.
    Validating { task: TaskId, give_up: Time },
}

/// One client of a cross-site evaluation.
#[derive(Debug)]
pub struct CseClient {
    me: String,
    evaluators: Vec<String>,
    clients: Vec<String>,
    global_holder: Option<String>,
    local: Option<ModelRef>,
    global: Option<ModelRef>,
    eval_timeout: Duration,
    submit_timeout: Duration,
    /// The models this client still has to evaluate, in order: (name, holder).
    todo: VecDeque<(String, String)>,
    current: Option<((String, String), Step)>,
    next_task: u64,
    started: bool,
    evaluating_done: bool,
    down: BTreeSet<String>,
    /// Other evaluators not yet done.
    waiting_for: BTreeSet<String>,
    /// Clients not yet acknowledging this client's `Done`, with tries so far.
    announce: BTreeMap<String, u32>,
    announce_at: Option<Time>,
    finished: bool,
    /// The evaluations done: model name → whether it succeeded.
    results: BTreeMap<String, bool>,
    out: VecDeque<Action<CseMsg>>,
}

impl CseClient {
    /// Client `me` of the evaluation `cfg`, with its own locally trained model (if it is an
    /// evaluatee) and the global model (if it is `global_model_client`).
    pub fn new(
        cfg: CseConfig,
        me: &str,
        local: Option<ModelRef>,
        global: Option<ModelRef>,
    ) -> Result<Self, CseConfigError> {
        if cfg.clients.is_empty() {
            return Err(CseConfigError::NoClients);
        }
        let mut known = BTreeSet::new();
        if let Some(dup) = cfg.clients.iter().find(|c| !known.insert(c.as_str())) {
            return Err(CseConfigError::DuplicateClient(dup.clone()));
        }
        let or_all = |v: &Vec<String>| {
            if v.is_empty() {
                cfg.clients.clone()
            } else {
                v.clone()
            }
        };
        let evaluators = or_all(&cfg.evaluators);
        let evaluatees = or_all(&cfg.evaluatees);
        for name in std::iter::once(me)
            .chain(evaluators.iter().map(String::as_str))
            .chain(evaluatees.iter().map(String::as_str))
            .chain(cfg.global_model_client.iter().map(String::as_str))
        {
            if !known.contains(name) {
                return Err(CseConfigError::UnknownClient(name.to_string()));
            }
        }
        let eval_timeout = secs(cfg.eval_task_timeout, "eval_task_timeout")?;
        let submit_timeout = secs(cfg.submit_model_timeout, "submit_model_timeout")?;
        let mut targets: Vec<(String, String)> =
            evaluatees.iter().map(|e| (e.clone(), e.clone())).collect();
        if let Some(g) = &cfg.global_model_client {
            targets.push((GLOBAL_MODEL.to_string(), g.clone()));
        }
        let todo: VecDeque<(String, String)> = match evaluators.iter().position(|e| e == me) {
            Some(i) if !targets.is_empty() => {
                let shift = (i as u64).wrapping_add(cfg.seed) % targets.len() as u64;
                targets.rotate_left(shift as usize);
                targets.into()
            }
            _ => VecDeque::new(),
        };
        let waiting_for = evaluators.iter().filter(|e| *e != me).cloned().collect();
        Ok(CseClient {
            me: me.to_string(),
            evaluators,
            clients: cfg.clients,
            global_holder: cfg.global_model_client,
            local,
            global,
            eval_timeout,
            submit_timeout,
            todo,
            current: None,
            next_task: 0,
            started: false,
            evaluating_done: false,
            down: BTreeSet::new(),
            waiting_for,
            announce: BTreeMap::new(),
            announce_at: None,
            finished: false,
            results: BTreeMap::new(),
            out: VecDeque::new(),
        })
    }

    /// The evaluations this client has done so far: model name → whether it succeeded.
    pub fn results(&self) -> &BTreeMap<String, bool> {
        &self.results
    }

    /// Whether this client evaluates.
    pub fn is_evaluator(&self) -> bool {
        self.evaluators.contains(&self.me)
    }

    fn report(&mut self, event: ReportEvent) {
        self.out.push_back(Action::Report(Report {
            epoch: Epoch::default(),
            event,
        }));
    }

    fn send(&mut self, to: &str, msg: CseMsg, model: Option<ModelRef>) {
        self.out.push_back(Action::Send {
            to: to.to_string(),
            msg,
            model,
        });
    }

    fn resend_interval(&self) -> Duration {
        self.submit_timeout / 8
    }

    /// The model `name` if this client holds it.
    fn own_model(&self, name: &str) -> Result<ModelRef, String> {
        let held = if name == GLOBAL_MODEL {
            self.global
                .clone()
                .filter(|_| self.global_holder.as_deref() == Some(self.me.as_str()))
        } else if name == self.me {
            self.local.clone()
        } else {
            None
        };
        held.ok_or_else(|| format!("{} does not hold model {name:?}", self.me))
    }

    /// Starts on the next model, or finishes evaluating.
    fn next(&mut self, now: Time) {
        while self.current.is_none() {
            let Some((name, holder)) = self.todo.pop_front() else {
                self.done_evaluating(now);
                return;
            };
            if holder == self.me {
                match self.own_model(&name) {
                    Ok(m) => self.validate(now, (name, holder), m),
                    Err(reason) => self.failed(&name, reason),
                }
            } else if self.down.contains(&holder) {
                self.failed(&name, format!("{holder} is down"));
            } else {
                self.send(
                    &holder,
                    CseMsg::Request {
                        model: name.clone(),
                    },
                    None,
                );
                let step = Step::Fetching {
                    resend: now + self.resend_interval(),
                    give_up: now + self.submit_timeout,
                };
                self.current = Some(((name, holder), step));
            }
        }
    }

    fn validate(&mut self, now: Time, target: (String, String), model: ModelRef) {
        let task = TaskId(self.next_task);
        self.next_task += 1;
        self.out.push_back(Action::RunTask {
            task: Task {
                id: task,
                name: task_names::VALIDATE.to_string(),
                round: 0,
                data: Shareable::default(),
            },
            model: Some(model),
        });
        let give_up = now + self.eval_timeout;
        self.current = Some((target, Step::Validating { task, give_up }));
    }

    fn failed(&mut self, model: &str, reason: String) {
        self.results.insert(model.to_string(), false);
        self.report(ReportEvent::EvaluationFailed {
            model: model.to_string(),
            reason,
        });
    }

    fn fail_current(&mut self, now: Time, reason: String) {
        if let Some(((name, _), _)) = self.current.take() {
            self.failed(&name, reason);
        }
        self.next(now);
    }

    fn done_evaluating(&mut self, now: Time) {
        if self.evaluating_done {
            return;
        }
        self.evaluating_done = true;
        if self.is_evaluator() {
            for c in self.clients.clone() {
                if c != self.me && !self.down.contains(&c) {
                    self.send(&c, CseMsg::Done, None);
                    self.announce.insert(c, 1);
                }
            }
            self.announce_at = Some(now + self.resend_interval());
        }
        self.maybe_finish();
    }

    fn maybe_finish(&mut self) {
        if self.finished || !self.evaluating_done || !self.waiting_for.is_empty() {
            return;
        }
        self.finished = true;
        let outcome = Outcome::Completed {
            last_round: 0,
            best: None,
        };
        self.report(ReportEvent::Finished(outcome.clone()));
        self.out.push_back(Action::Finished(outcome));
    }

    fn on_message(&mut self, now: Time, from: String, msg: CseMsg, model: Option<ModelRef>) {
        // Only the run's clients talk to each other (a stranger is never sent a model); only
        // the driver's start comes from elsewhere.
        if !matches!(msg, CseMsg::Start) && !self.clients.contains(&from) {
            return;
        }
        match msg {
            CseMsg::Start => {
                if !self.started {
                    self.started = true;
                    self.report(ReportEvent::Training);
                    self.next(now);
                }
            }
            CseMsg::Request { model: name } => match self.own_model(&name) {
                Ok(m) => self.send(&from, CseMsg::Model { model: name }, Some(m)),
                Err(reason) => self.send(
                    &from,
                    CseMsg::NoModel {
                        model: name,
                        reason,
                    },
                    None,
                ),
            },
            CseMsg::Model { model: name } => {
                let wanted = matches!(
                    &self.current,
                    Some(((n, h), Step::Fetching { .. })) if *n == name && *h == from
                );
                if let (true, Some(m)) = (wanted, model) {
                    if let Some((target, _)) = self.current.take() {
                        self.validate(now, target, m);
                    }
                }
            }
            CseMsg::NoModel {
                model: name,
                reason,
            } => {
                let wanted = matches!(
                    &self.current,
                    Some(((n, h), Step::Fetching { .. })) if *n == name && *h == from
                );
                if wanted {
                    self.fail_current(now, reason);
                }
            }
            CseMsg::Done => {
                self.send(&from, CseMsg::DoneAck, None);
                self.waiting_for.remove(&from);
                self.maybe_finish();
            }
            CseMsg::DoneAck => {
                self.announce.remove(&from);
            }
        }
    }
}

impl ClientWorkflow for CseClient {
    type Msg = CseMsg;

    fn handle(&mut self, now: Time, input: Input<CseMsg>) {
        match input {
            Input::Message { from, msg, model } => self.on_message(now, from, msg, model),
            Input::TaskDone(mut r, model) => {
                let ours = matches!(
                    &self.current,
                    Some((_, Step::Validating { task, .. })) if *task == r.task_id
                );
                if !ours {
                    return;
                }
                let Some(((name, _), _)) = self.current.take() else {
                    return;
                };
                match (r.data.return_code, result_model(&mut r, model)) {
                    (ReturnCode::Ok, Some(m)) => {
                        self.results.insert(name.clone(), true);
                        self.report(ReportEvent::Evaluated {
                            model: name,
                            metrics: m.metrics().clone(),
                        });
                    }
                    (ReturnCode::Ok, None) => {
                        self.failed(&name, "the validation returned no metrics".into())
                    }
                    (code, _) => {
                        let reason = r
                            .data
                            .error_reason()
                            .map_or_else(|| format!("validation failed: {code:?}"), str::to_string);
                        self.failed(&name, reason);
                    }
                }
                self.next(now);
            }
            Input::PeerDown(p) => {
                if p == self.me {
                    return;
                }
                self.down.insert(p.clone());
                self.waiting_for.remove(&p);
                self.announce.remove(&p);
                let fetching_from_it = matches!(
                    &self.current,
                    Some(((_, h), Step::Fetching { .. })) if *h == p
                );
                if fetching_from_it {
                    self.fail_current(now, format!("{p} is down"));
                }
                self.maybe_finish();
            }
            Input::PeerUp(p) => {
                self.down.remove(&p);
            }
        }
    }

    fn handle_timeout(&mut self, now: Time) {
        match &mut self.current {
            Some((_, Step::Fetching { give_up, .. })) if *give_up <= now => {
                self.fail_current(now, "the model did not come in time".into());
            }
            Some(((name, holder), Step::Fetching { resend, .. })) if *resend <= now => {
                *resend = now + self.submit_timeout / 8;
                let (name, holder) = (name.clone(), holder.clone());
                self.send(&holder, CseMsg::Request { model: name }, None);
            }
            Some((_, Step::Validating { give_up, .. })) if *give_up <= now => {
                self.fail_current(now, "the validation timed out".into());
            }
            _ => {}
        }
        if self.announce_at.is_some_and(|t| t <= now) {
            self.announce.retain(|_, tries| *tries < DONE_TRIES);
            let to: Vec<String> = self.announce.keys().cloned().collect();
            for c in to {
                if let Some(t) = self.announce.get_mut(&c) {
                    *t += 1;
                }
                self.send(&c, CseMsg::Done, None);
            }
            self.announce_at = (!self.announce.is_empty()).then(|| now + self.resend_interval());
        }
    }

    fn poll_action(&mut self) -> Option<Action<CseMsg>> {
        self.out.pop_front()
    }

    fn poll_timeout(&self) -> Option<Time> {
        let step = self.current.as_ref().map(|(_, s)| match s {
            Step::Fetching { resend, give_up } => (*resend).min(*give_up),
            Step::Validating { give_up, .. } => *give_up,
        });
        [step, self.announce_at].into_iter().flatten().min()
    }

    fn is_done(&self) -> bool {
        self.finished && self.announce.is_empty()
    }

    fn replace_model(&mut self, was: &ModelRef, now: &ModelRef) {
        replace_in(&mut self.local, was, now);
        replace_in(&mut self.global, was, now);
        replace_in_actions(&mut self.out, was, now);
    }
}
