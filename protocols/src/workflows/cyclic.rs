//! Client-controlled cyclic weight transfer (FLARE's `CyclicClientController`) as a sans-IO
//! [`ClientWorkflow`].
//!
//! The model travels from client to client, peer to peer: in each round every client trains
//! it once, in a fixed order (the client list, rotated to start at `starting_client`) or in an
//! order reshuffled every round from the seed (`random`; the starting client still opens round
//! `start_round`). Training replaces the weights; nothing is averaged.
//!
//! Every visit is a *hop*, numbered by its position in the whole run: hop `k` is round
//! `start_round + k / n`, place `k % n` of that round's order (`n` clients). Every client
//! computes the same order, so a hop number names exactly one client.
//!
//! Rules:
//! - the server starts the run with [`CyclicMsg::Start`] at the starting client, which holds
//!   the initial model and trains hop 0;
//! - a client accepts a model only for a hop of its own that is later than every hop it has
//!   accepted: stale, duplicated or reordered models are answered ([`CyclicMsg::Ack`] with
//!   `accepted: false`) but never trained, so one client never trains two models for the same
//!   hop, and a hop number is only ever accepted by the one client it names;
//! - the holder acknowledges the model, tells every peer ([`CyclicMsg::Progress`]), trains it,
//!   reports the validation metrics the learner measured on the model it *received*
//!   ([`ReportEvent::Aggregated`] with `accepted = [holder]`, `version = hop`), and sends the
//!   trained model to the next hop whose client is not known to be down;
//! - the sender resends every `learn_task_ack_timeout` until the receiver acknowledges, then
//!   keeps the model until the receiver reports that it passed the model on
//!   ([`CyclicMsg::Passed`]). If the receiver goes down, stays unacknowledged for
//!   `learn_task_timeout`, or does not pass the model on within `learn_task_timeout` of its
//!   acknowledgement, the sender skips it (reported as [`ReportEvent::Reelected`]) and sends
//!   the same model to the hop after it. A lost acknowledgement is thus never mistaken for a
//!   dead receiver. A failed training passes the received model on unchanged (reported with
//!   `pruned = [holder]`);
//! - when the next hop is the holder's own (a round boundary in random order, or skipped
//!   peers), it keeps the model, and its predecessor keeps answering for it until the model
//!   leaves the holder;
//! - hearing [`CyclicMsg::Progress`] of a later hop from a client other than its receiver
//!   tells a sender the model moved on (as `Passed` would); hearing that its receiver came
//!   back ([`Input::PeerUp`]: it may have restarted and lost the model) makes it resend;
//! - after the last hop (or when no later hop has a live client) the holder sends
//!   [`CyclicMsg::Done`] to every client, with the final model to each of `result_clients`
//!   (who persist it as [`ModelSlot::Final`]), resends until acknowledged (every
//!   `learn_task_ack_timeout`, ten tries, or until the client is down), and everyone
//!   finishes with [`Outcome::Completed`];
//! - a client that has finished answers a late model with `Done` (with the final model, when
//!   it has it and the sender is a result client); a result client told `Done` without the
//!   final model waits for the announcement that carries it;
//! - a client that hears no news of the run for `progress_timeout` while it holds no model
//!   asks every peer where the run is ([`CyclicMsg::Query`]; a finished peer answers `Done`);
//!   without an answer it finishes with [`Outcome::Failed`] (or `Completed` without the final
//!   model, if it was told the run ended). A restarted client (see
//!   [`CyclicClient::joining`]) asks at once.
//!
//! Two holders can only race for the model when a holder is falsely given up (reported down,
//! or slower than `learn_task_timeout`): both lineages then send to later hops, and the first
//! to reach a client wins there while the other is refused with `accepted: false`; a client
//! that has finished answers a late model with `Done`. Only a race that reaches the end of
//! the run can end it twice (the first `Done` a client hears wins). If a holder and its
//! predecessor die together before the model moved on, the model is lost and the run fails by
//! the progress timeout.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ccwf::{
    Action, ClientWorkflow, Epoch, Input, ModelSlot, Outcome, Report, ReportEvent, replace_in,
    replace_in_actions, result_model,
};
use crate::model::ParamsType;
use crate::shareable::{ReturnCode, Shareable, Task, TaskId, TaskResult, task_names};
use crate::stored::ModelRef;
use crate::time::Time;

/// How many times the end of the run is sent to a client before it is given up.
const DONE_TRIES: u32 = 10;

/// The order in which clients take the model within a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CyclicOrder {
    /// The client list, rotated to start at the starting client, every round.
    #[default]
    Fixed,
    /// Reshuffled every round from the seed.
    Random,
}

/// Settings of a cyclic run (FLARE's argument names; durations in seconds).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct CyclicConfig {
    /// Number of rounds (every client trains once per round). Default 5.
    pub num_rounds: u32,
    /// The first round's number. Default 0.
    pub start_round: u32,
    /// `fixed` (default) or `random`.
    pub order: CyclicOrder,
    /// The participants, filled in by the driver.
    pub clients: Vec<String>,
    /// The client that holds the initial model and trains first; default the first client.
    pub starting_client: Option<String>,
    /// Clients that receive and persist the final model; empty (default) means every client.
    pub result_clients: Vec<String>,
    /// How long a receiver may take to acknowledge a model before it is resent. Default 10.
    pub learn_task_ack_timeout: f64,
    /// How long a hop (training and passing the model on) may take before the previous holder
    /// gives it up and sends its model to the hop after. Default 3600.
    pub learn_task_timeout: f64,
    /// How long a client without the model waits without hearing of progress before it gives
    /// the run up; must exceed `learn_task_timeout`. Default 7200.
    pub progress_timeout: f64,
    /// The longest interval between two status reports to the server. Default 90.
    pub max_status_report_interval: f64,
    /// Seed of the random order (the driver derives it from the job id). Default 0.
    pub seed: u64,
}

impl Default for CyclicConfig {
    fn default() -> Self {
        CyclicConfig {
            num_rounds: 5,
            start_round: 0,
            order: CyclicOrder::Fixed,
            clients: Vec::new(),
            starting_client: None,
            result_clients: Vec::new(),
            learn_task_ack_timeout: 10.0,
            learn_task_timeout: 3600.0,
            progress_timeout: 7200.0,
            max_status_report_interval: 90.0,
            seed: 0,
        }
    }
}

/// A cyclic workflow's arguments in a job config (the names of FLARE's
/// `CyclicServerController` and `CyclicClientController`; durations in seconds). Every client
/// of the run takes part; the driver derives the seed from the job id.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CyclicArgs {
    /// Rounds: every client trains the model once per round.
    pub num_rounds: u32,
    /// The first round's number.
    #[serde(default)]
    pub start_round: u32,
    /// `fixed` (default) or `random`.
    #[serde(default, alias = "order")]
    pub cyclic_order: CyclicOrder,
    /// The client that trains first (default: the first client).
    #[serde(default)]
    pub starting_client: Option<String>,
    /// Clients that receive the final model (default: every client).
    #[serde(default)]
    pub result_clients: Vec<String>,
    /// See [`CyclicConfig::learn_task_ack_timeout`]. Default 10.
    #[serde(default = "default_ack_timeout")]
    pub learn_task_ack_timeout: f64,
    /// See [`CyclicConfig::learn_task_timeout`]. Default 3600.
    #[serde(default = "default_learn_timeout")]
    pub learn_task_timeout: f64,
    /// See [`CyclicConfig::progress_timeout`]; the server also fails the job after this long
    /// without a report. Default 7200.
    #[serde(default = "default_progress_timeout")]
    pub progress_timeout: f64,
    /// The longest interval between two status reports. Default 90.
    #[serde(default = "default_status_interval")]
    pub max_status_report_interval: f64,
    /// Configured clients the server waits for before starting (default: all).
    #[serde(default)]
    pub configure_min_clients: Option<usize>,
}

fn default_ack_timeout() -> f64 {
    CyclicConfig::default().learn_task_ack_timeout
}
fn default_learn_timeout() -> f64 {
    CyclicConfig::default().learn_task_timeout
}
fn default_progress_timeout() -> f64 {
    CyclicConfig::default().progress_timeout
}
fn default_status_interval() -> f64 {
    CyclicConfig::default().max_status_report_interval
}

impl CyclicArgs {
    /// The clients' configuration for a run among `clients`, with the run's `seed`, checked.
    pub fn to_config(
        &self,
        clients: &[String],
        seed: u64,
    ) -> Result<CyclicConfig, CyclicConfigError> {
        let cfg = CyclicConfig {
            num_rounds: self.num_rounds,
            start_round: self.start_round,
            order: self.cyclic_order,
            clients: clients.to_vec(),
            starting_client: self.starting_client.clone(),
            result_clients: self.result_clients.clone(),
            learn_task_ack_timeout: self.learn_task_ack_timeout,
            learn_task_timeout: self.learn_task_timeout,
            progress_timeout: self.progress_timeout,
            max_status_report_interval: self.max_status_report_interval,
            seed,
        };
        let first = clients.first().ok_or(CyclicConfigError::NoClients)?;
        CyclicClient::new(cfg.clone(), first, None)?;
        Ok(cfg)
    }
}

/// Why a cyclic configuration was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CyclicConfigError {
    /// `num_rounds` is zero.
    #[error("num_rounds must be at least 1")]
    NoRounds,
    /// No clients take part.
    #[error("no clients take part")]
    NoClients,
    /// A client is listed twice.
    #[error("client {0:?} is listed twice")]
    DuplicateClient(String),
    /// A named client (this one, the starting client or a result client) does not take part.
    #[error("{0:?} is not one of the clients")]
    UnknownClient(String),
    /// A duration is not a positive number of seconds.
    #[error("{0} must be a positive number of seconds")]
    BadDuration(&'static str),
    /// `progress_timeout` does not exceed `learn_task_timeout`.
    #[error("progress_timeout must exceed learn_task_timeout")]
    ProgressTimeout,
    /// The run has more hops than a `u32` counts.
    #[error("num_rounds × clients is too large")]
    TooManyHops,
}

/// Messages between the clients of a cyclic run. Models travel beside `Model` and `Done`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CyclicMsg {
    /// From the server to the starting client: begin.
    Start,
    /// The model (beside the message) for hop `hop`.
    Model {
        /// The hop.
        hop: u32,
    },
    /// The answer to `Model`: `accepted` is false when the receiver already holds a later
    /// (or another) model, so the sender should stop.
    Ack {
        /// The hop acknowledged.
        hop: u32,
        /// Whether the receiver took this model.
        accepted: bool,
    },
    /// The receiver of hop `hop` has passed the model on (or given it up): the sender may
    /// forget it.
    Passed {
        /// The hop.
        hop: u32,
    },
    /// The sender accepted hop `hop` (to everyone, best effort: liveness only).
    Progress {
        /// The hop.
        hop: u32,
    },
    /// The run is over after hop `hop`; result clients get the final model beside it.
    Done {
        /// The last hop trained.
        hop: u32,
    },
    /// The answer to `Done`.
    DoneAck,
    /// Where is the run? Asked by a restarted client, and by a client about to give the run
    /// up: a finished client answers `Done` (with the final model for a result client),
    /// others `Progress`.
    Query,
}

fn secs(v: f64, name: &'static str) -> Result<Duration, CyclicConfigError> {
    match Duration::try_from_secs_f64(v) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(CyclicConfigError::BadDuration(name)),
    }
}

fn splitmix(z: &mut u64) -> u64 {
    *z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut x = *z;
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The model this client holds: accepted for `hop`, being trained.
#[derive(Debug)]
struct Holding {
    hop: u32,
    /// The client that still answers for the model (and the hop it sent it as), until this
    /// client passes the model to another client.
    pred: Option<(String, u32)>,
    model: ModelRef,
}

/// A model this client sent and still answers for.
#[derive(Debug)]
struct Pending {
    hop: u32,
    to: String,
    model: ModelRef,
    acked: bool,
    /// The next resend (unacknowledged) or the time to give the receiver up.
    deadline: Time,
    /// When the receiver is given up.
    give_up: Time,
    /// Who sent us the model we trained, and its hop: told `Passed` once the receiver acks.
    pred: Option<(String, u32)>,
}

/// The end of the run, being announced.
#[derive(Debug)]
struct Closing {
    hop: u32,
    model: ModelRef,
    /// The predecessor still answering for the model this client trained last.
    pred: Option<(String, u32)>,
    /// Clients not yet acknowledging, with the tries so far.
    waiting: BTreeMap<String, u32>,
    deadline: Time,
}

/// One client of a cyclic run.
#[derive(Debug)]
pub struct CyclicClient {
    me: String,
    clients: Vec<String>,
    starting: String,
    result_clients: BTreeSet<String>,
    order: CyclicOrder,
    seed: u64,
    start_round: u32,
    total: u32,
    ack_timeout: Duration,
    learn_timeout: Duration,
    progress_timeout: Duration,
    status_interval: Duration,
    initial: Option<ModelRef>,
    started: bool,
    down: BTreeSet<String>,
    /// The latest hop accepted, and from whom.
    seen: Option<(u32, Option<String>)>,
    holding: Option<Holding>,
    pending: Option<Pending>,
    closing: Option<Closing>,
    finished: bool,
    /// A joining client still has to ask its peers where the run is (at its first timeout).
    join_pending: bool,
    /// This client asked where the run is since it last heard news of it.
    queried: bool,
    /// The latest hop any client was heard to accept.
    progress: u32,
    /// The final model, once known.
    final_model: Option<ModelRef>,
    /// The run was announced over (without the final model) after this hop.
    ended: Option<u32>,
    last_hop: u32,
    progress_deadline: Option<Time>,
    next_status: Option<Time>,
    out: VecDeque<Action<CyclicMsg>>,
}

impl CyclicClient {
    /// Client `me` of the run `cfg`; the starting client passes the initial model.
    pub fn new(
        cfg: CyclicConfig,
        me: &str,
        initial: Option<ModelRef>,
    ) -> Result<Self, CyclicConfigError> {
        if cfg.num_rounds == 0 {
            return Err(CyclicConfigError::NoRounds);
        }
        let Some(first) = cfg.clients.first().cloned() else {
            return Err(CyclicConfigError::NoClients);
        };
        let mut seen = BTreeSet::new();
        if let Some(dup) = cfg.clients.iter().find(|c| !seen.insert(c.as_str())) {
            return Err(CyclicConfigError::DuplicateClient(dup.clone()));
        }
        let starting = cfg.starting_client.clone().unwrap_or(first);
        for name in std::iter::once(me)
            .chain(std::iter::once(starting.as_str()))
            .chain(cfg.result_clients.iter().map(String::as_str))
        {
            if !seen.contains(name) {
                return Err(CyclicConfigError::UnknownClient(name.to_string()));
            }
        }
        let ack_timeout = secs(cfg.learn_task_ack_timeout, "learn_task_ack_timeout")?;
        let learn_timeout = secs(cfg.learn_task_timeout, "learn_task_timeout")?;
        let progress_timeout = secs(cfg.progress_timeout, "progress_timeout")?;
        let status_interval = secs(cfg.max_status_report_interval, "max_status_report_interval")?;
        if progress_timeout <= learn_timeout {
            return Err(CyclicConfigError::ProgressTimeout);
        }
        let total = u32::try_from(cfg.clients.len())
            .ok()
            .and_then(|n| n.checked_mul(cfg.num_rounds))
            .ok_or(CyclicConfigError::TooManyHops)?;
        let result_clients = if cfg.result_clients.is_empty() {
            cfg.clients.iter().cloned().collect()
        } else {
            cfg.result_clients.iter().cloned().collect()
        };
        let mut c = CyclicClient {
            me: me.to_string(),
            starting,
            result_clients,
            order: cfg.order,
            seed: cfg.seed,
            start_round: cfg.start_round,
            total,
            clients: cfg.clients,
            ack_timeout,
            learn_timeout,
            progress_timeout,
            status_interval,
            initial,
            started: false,
            down: BTreeSet::new(),
            seen: None,
            holding: None,
            pending: None,
            closing: None,
            finished: false,
            join_pending: false,
            queried: false,
            progress: 0,
            final_model: None,
            ended: None,
            last_hop: 0,
            progress_deadline: None,
            next_status: None,
            out: VecDeque::new(),
        };
        c.report(ReportEvent::Alive);
        Ok(c)
    }

    /// Client `me` restarting in the middle of a run: it holds no model, asks its peers where
    /// the run is ([`CyclicMsg::Query`], at its first [`ClientWorkflow::handle_timeout`], which
    /// [`ClientWorkflow::poll_timeout`] asks for at once) and waits for its next hop.
    pub fn joining(cfg: CyclicConfig, me: &str) -> Result<Self, CyclicConfigError> {
        let mut c = CyclicClient::new(cfg, me, None)?;
        c.started = true;
        c.join_pending = true;
        Ok(c)
    }

    /// The number of hops in the run (`num_rounds × clients`).
    pub fn total_hops(&self) -> u32 {
        self.total
    }

    /// The order of round `round` (absolute round number).
    pub fn round_order(&self, round: u32) -> Vec<String> {
        let n = self.clients.len();
        let mut order = self.clients.clone();
        let s = order.iter().position(|c| *c == self.starting).unwrap_or(0);
        order.rotate_left(s);
        if self.order == CyclicOrder::Random {
            let mut z = self.seed ^ u64::from(round).wrapping_mul(0xD1B5_4A32_D192_ED03);
            // The starting client keeps the first place of the first round: it holds the model.
            let lo = usize::from(round == self.start_round);
            for i in (lo + 1..n).rev() {
                let span = (i - lo + 1) as u64;
                let j = lo + (splitmix(&mut z) % span) as usize;
                order.swap(i, j);
            }
        }
        order
    }

    /// The round of hop `hop` and the client it names.
    pub fn hop_owner(&self, hop: u32) -> (u32, String) {
        let n = self.clients.len().max(1) as u32;
        let round = self.start_round + hop / n;
        let order = self.round_order(round);
        let name = order.get((hop % n) as usize).cloned().unwrap_or_default();
        (round, name)
    }

    /// The latest hop this client accepted.
    pub fn latest_hop(&self) -> Option<u32> {
        self.seen.as_ref().map(|(h, _)| *h)
    }

    fn epoch(&self) -> Epoch {
        let hop = self.latest_hop().unwrap_or(0);
        Epoch::new(self.hop_owner(hop).0, 0)
    }

    fn report(&mut self, event: ReportEvent) {
        let epoch = self.epoch();
        self.out.push_back(Action::Report(Report { epoch, event }));
    }

    fn send(&mut self, to: &str, msg: CyclicMsg, model: Option<ModelRef>) {
        self.out.push_back(Action::Send {
            to: to.to_string(),
            msg,
            model,
        });
    }

    /// The first hop after `after` whose client is not known to be down.
    fn next_live_hop(&self, after: u32) -> Option<(u32, String)> {
        (after.saturating_add(1)..self.total)
            .map(|h| (h, self.hop_owner(h).1))
            .find(|(_, c)| !self.down.contains(c))
    }

    /// Takes the model for `hop`: from the network (`from`, acknowledged and answering for
    /// it) or from this client itself (a hop after its own, `pred` carried over).
    fn accept(
        &mut self,
        now: Time,
        hop: u32,
        from: Option<String>,
        pred: Option<(String, u32)>,
        model: ModelRef,
    ) {
        // A newer hop supersedes whatever this client still held or answered for.
        self.drop_pending();
        if let Some((f, h)) = self.holding.take().and_then(|old| old.pred) {
            self.send(&f, CyclicMsg::Passed { hop: h }, None);
        }
        self.seen = Some((hop, from.clone()));
        self.progress = self.progress.max(hop);
        let pred = match &from {
            Some(f) => Some((f.clone(), hop)),
            None => pred,
        };
        if let Some(f) = &from {
            self.send(
                f,
                CyclicMsg::Ack {
                    hop,
                    accepted: true,
                },
                None,
            );
        }
        for c in self.clients.clone() {
            if c != self.me && !self.down.contains(&c) {
                self.send(&c, CyclicMsg::Progress { hop }, None);
            }
        }
        self.report(ReportEvent::Training);
        let (round, _) = self.hop_owner(hop);
        self.out.push_back(Action::RunTask {
            task: Task {
                id: TaskId(u64::from(hop)),
                name: task_names::TRAIN.to_string(),
                round,
                data: Shareable::default().with_total_rounds(
                    self.start_round + self.total / (self.clients.len().max(1) as u32),
                ),
            },
            model: Some(model.clone()),
        });
        self.holding = Some(Holding { hop, pred, model });
        self.progress_deadline = Some(now + self.progress_timeout);
    }

    fn drop_pending(&mut self) {
        if let Some(p) = self.pending.take() {
            if let Some((pred, hop)) = p.pred {
                self.send(&pred, CyclicMsg::Passed { hop }, None);
            }
        }
    }

    fn on_task_done(&mut self, now: Time, mut r: TaskResult, model: Option<ModelRef>) {
        let Some(h) = self
            .holding
            .take_if(|h| TaskId(u64::from(h.hop)) == r.task_id)
        else {
            return;
        };
        let model = result_model(&mut r, model);
        let (accepted, pruned, metrics, model) = match (r.data.return_code, model) {
            (ReturnCode::Ok, Some(m)) => {
                let metrics = m.metrics().clone();
                let (round, _) = self.hop_owner(h.hop);
                let total = self.start_round + self.total / self.clients.len() as u32;
                let m = m.with_rounds(Some(round), Some(total));
                if m.params_type() == ParamsType::Full {
                    // This site's own model, kept for a cross-site evaluation after the run.
                    self.out.push_back(Action::Persist {
                        slot: ModelSlot::Local,
                        model: m.clone(),
                    });
                }
                (vec![self.me.clone()], vec![], metrics, m)
            }
            _ => (vec![], vec![self.me.clone()], BTreeMap::new(), h.model),
        };
        self.report(ReportEvent::Aggregated {
            accepted,
            pruned,
            version: h.hop,
            metrics,
            best: None,
            weight: 0.0,
        });
        self.forward(now, h.hop, model, h.pred);
    }

    /// Sends `model`, trained at hop `after`, to the next live hop, or ends the run.
    fn forward(&mut self, now: Time, after: u32, model: ModelRef, pred: Option<(String, u32)>) {
        match self.next_live_hop(after) {
            // The next hop is this client's own: it keeps the model, and its predecessor keeps
            // answering for it until the model leaves this client.
            Some((hop, to)) if to == self.me => self.accept(now, hop, None, pred, model),
            Some((hop, to)) => {
                self.send(&to, CyclicMsg::Model { hop }, Some(model.clone()));
                self.pending = Some(Pending {
                    hop,
                    to,
                    model,
                    acked: false,
                    deadline: now + self.ack_timeout.min(self.learn_timeout),
                    give_up: now + self.learn_timeout,
                    pred,
                });
            }
            None => self.close(now, after, model, pred),
        }
    }

    /// Gives up the receiver of the pending model and sends it to the hop after.
    fn skip_pending(&mut self, now: Time) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let next = self.next_live_hop(p.hop).map(|(_, c)| c);
        self.report(ReportEvent::Reelected {
            previous: p.to.clone(),
            next: next.unwrap_or_else(|| self.me.clone()),
        });
        // Hop numbers only grow: the model goes out under the skipped hop's successor.
        self.forward(now, p.hop, p.model, p.pred);
    }

    fn close(&mut self, now: Time, hop: u32, model: ModelRef, pred: Option<(String, u32)>) {
        // The predecessor keeps its model until it hears the end (or `Passed` after every
        // client acknowledged it): should this client die now, it ends the run instead.
        self.last_hop = hop;
        let mut waiting = BTreeMap::new();
        for c in self.clients.clone() {
            if c == self.me || self.down.contains(&c) {
                continue;
            }
            let m = self.result_clients.contains(&c).then(|| model.clone());
            self.send(&c, CyclicMsg::Done { hop }, m);
            waiting.insert(c, 1);
        }
        self.closing = Some(Closing {
            hop,
            model,
            pred,
            waiting,
            deadline: now + self.ack_timeout,
        });
        self.maybe_complete();
    }

    fn maybe_complete(&mut self) {
        let Some(c) = self.closing.take_if(|c| c.waiting.is_empty()) else {
            return;
        };
        if let Some((p, h)) = c.pred {
            self.send(&p, CyclicMsg::Passed { hop: h }, None);
        }
        self.finish_completed(c.hop, Some(c.model));
    }

    fn finish_completed(&mut self, hop: u32, model: Option<ModelRef>) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.last_hop = hop;
        self.holding = None;
        self.pending = None;
        self.final_model = model.clone();
        if let Some(m) = model.filter(|_| self.result_clients.contains(&self.me)) {
            self.out.push_back(Action::Persist {
                slot: ModelSlot::Final,
                model: m,
            });
            self.report(ReportEvent::Persisted {
                slot: ModelSlot::Final,
            });
        }
        let n = self.clients.len().max(1) as u32;
        let outcome = Outcome::Completed {
            last_round: self.start_round + (self.total.saturating_sub(1)) / n,
            best: None,
        };
        self.report(ReportEvent::Finished(outcome.clone()));
        self.out.push_back(Action::Finished(outcome));
    }

    fn fail(&mut self, reason: String) {
        if self.finished {
            return;
        }
        self.finished = true;
        let outcome = Outcome::Failed { reason };
        self.report(ReportEvent::Finished(outcome.clone()));
        self.out.push_back(Action::Finished(outcome));
    }

    fn on_message(&mut self, now: Time, from: String, msg: CyclicMsg, model: Option<ModelRef>) {
        match msg {
            CyclicMsg::Start => {
                if self.started || self.finished || self.me != self.starting {
                    return;
                }
                self.started = true;
                match self.initial.take() {
                    Some(m) => self.accept(now, 0, None, None, m),
                    None => self.fail("the starting client has no initial model".into()),
                }
            }
            CyclicMsg::Model { hop } => {
                self.started = true;
                if self.finished {
                    let accepted = false;
                    self.send(&from, CyclicMsg::Ack { hop, accepted }, None);
                    let hop = self.last_hop;
                    let m = self
                        .final_model
                        .clone()
                        .filter(|_| self.result_clients.contains(&from));
                    self.send(&from, CyclicMsg::Done { hop }, m);
                    return;
                }
                let Some(model) = model else {
                    return;
                };
                if hop >= self.total || self.hop_owner(hop).1 != self.me {
                    return;
                }
                match &self.seen {
                    Some((h, f)) if *h >= hop => {
                        // The same model again (a resend or a duplicate), or the one this
                        // client still holds on the sender's behalf after hops of its own.
                        let same = *h == hop && f.as_deref() == Some(from.as_str());
                        let pred = Some((from.clone(), hop));
                        let carried = self.holding.as_ref().is_some_and(|x| x.pred == pred)
                            || self.pending.as_ref().is_some_and(|x| x.pred == pred);
                        let accepted = same || carried;
                        self.send(&from, CyclicMsg::Ack { hop, accepted }, None);
                    }
                    _ => self.accept(now, hop, Some(from), None, model),
                }
            }
            CyclicMsg::Ack { hop, accepted } => {
                let Some(p) = self
                    .pending
                    .as_mut()
                    .filter(|p| p.hop == hop && p.to == from && !p.acked)
                else {
                    return;
                };
                p.acked = true;
                p.deadline = now + self.learn_timeout;
                p.give_up = p.deadline;
                let pred = p.pred.take();
                if !accepted {
                    self.pending = None;
                }
                if let Some((pred, h)) = pred {
                    self.send(&pred, CyclicMsg::Passed { hop: h }, None);
                }
            }
            CyclicMsg::Passed { hop } => {
                if self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.hop == hop && p.to == from)
                {
                    self.pending = None;
                }
            }
            CyclicMsg::Progress { hop } => {
                self.progress = self.progress.max(hop);
                // Another client took a later hop: the model this client answers for has
                // moved on, even if its receiver's `Passed` was lost.
                if self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.acked && hop > p.hop && from != p.to)
                {
                    self.drop_pending();
                }
            }
            CyclicMsg::Query => {
                if self.finished {
                    let m = self
                        .final_model
                        .clone()
                        .filter(|_| self.result_clients.contains(&from));
                    let hop = self.last_hop;
                    self.send(&from, CyclicMsg::Done { hop }, m);
                } else if self.progress > 0 || self.seen.is_some() {
                    let hop = self.progress;
                    self.send(&from, CyclicMsg::Progress { hop }, None);
                }
            }
            CyclicMsg::Done { hop } => {
                // A result client waits for the announcement that carries the final model
                // (its closer resends it until acknowledged).
                if model.is_none() && !self.finished && self.result_clients.contains(&self.me) {
                    self.ended = Some(hop);
                    return;
                }
                self.send(&from, CyclicMsg::DoneAck, None);
                self.finish_completed(hop, model);
            }
            CyclicMsg::DoneAck => {
                if let Some(c) = self.closing.as_mut() {
                    c.waiting.remove(&from);
                }
                self.maybe_complete();
            }
        }
    }

    fn on_down(&mut self, now: Time, peer: String) {
        if peer == self.me {
            return;
        }
        self.down.insert(peer.clone());
        if self.pending.as_ref().is_some_and(|p| p.to == peer) {
            self.skip_pending(now);
        }
        if let Some(c) = self.closing.as_mut() {
            c.waiting.remove(&peer);
        }
        self.maybe_complete();
    }
}

impl ClientWorkflow for CyclicClient {
    type Msg = CyclicMsg;

    fn handle(&mut self, now: Time, input: Input<CyclicMsg>) {
        if self.next_status.is_none() {
            self.next_status = Some(now + self.status_interval);
        }
        match input {
            Input::Message { from, msg, model } => {
                // Only the run's clients talk to each other; only the driver's start comes
                // from elsewhere.
                if !matches!(msg, CyclicMsg::Start) && !self.clients.contains(&from) {
                    return;
                }
                // Only news of the run keeps a waiting client from giving up: not a query, nor
                // an answer telling it what it already knew.
                let news = match &msg {
                    CyclicMsg::Start => self.me == self.starting,
                    CyclicMsg::Query => false,
                    CyclicMsg::Progress { hop } => *hop > self.progress,
                    _ => true,
                };
                if news {
                    self.progress_deadline = Some(now + self.progress_timeout);
                    self.queried = false;
                }
                self.on_message(now, from, msg, model);
            }
            Input::TaskDone(r, m) => self.on_task_done(now, r, m),
            Input::PeerDown(p) => self.on_down(now, p),
            Input::PeerUp(p) => {
                self.down.remove(&p);
                // The receiver of the pending model may have restarted and lost it: send it
                // again (a receiver that kept it acknowledges it again).
                if let Some(pd) = self.pending.as_mut().filter(|pd| pd.to == p) {
                    pd.acked = false;
                    pd.deadline = now + self.ack_timeout.min(self.learn_timeout);
                    pd.give_up = now + self.learn_timeout;
                    let (hop, model) = (pd.hop, pd.model.clone());
                    self.send(&p, CyclicMsg::Model { hop }, Some(model));
                }
            }
        }
    }

    fn handle_timeout(&mut self, now: Time) {
        if self.join_pending {
            self.join_pending = false;
            self.progress_deadline = Some(now + self.progress_timeout);
            self.next_status.get_or_insert(now + self.status_interval);
            for c in self.clients.clone() {
                if c != self.me {
                    self.send(&c, CyclicMsg::Query, None);
                }
            }
        }
        if self.finished && self.closing.is_none() {
            return;
        }
        if self.next_status.is_some_and(|t| t <= now) {
            self.next_status = Some(now + self.status_interval);
            self.report(ReportEvent::Alive);
        }
        if let Some(p) = self.pending.as_mut().filter(|p| p.deadline <= now) {
            if !p.acked && now < p.give_up {
                p.deadline = (now + self.ack_timeout).min(p.give_up);
                let (to, hop, model) = (p.to.clone(), p.hop, p.model.clone());
                self.send(&to, CyclicMsg::Model { hop }, Some(model));
            } else {
                self.skip_pending(now);
            }
        }
        if let Some(c) = self.closing.as_mut().filter(|c| c.deadline <= now) {
            c.deadline = now + self.ack_timeout;
            c.waiting.retain(|_, tries| *tries < DONE_TRIES);
            let mut resend = Vec::new();
            for (to, tries) in c.waiting.iter_mut() {
                *tries += 1;
                resend.push(to.clone());
            }
            let (hop, model) = (c.hop, c.model.clone());
            for to in resend {
                let m = self.result_clients.contains(&to).then(|| model.clone());
                self.send(&to, CyclicMsg::Done { hop }, m);
            }
            self.maybe_complete();
        }
        let idle = self.holding.is_none() && self.pending.is_none() && self.closing.is_none();
        if idle && !self.finished && self.progress_deadline.is_some_and(|t| t <= now) {
            if !self.queried {
                // Ask around once before giving up: the end may have been announced while
                // this client's copy was lost.
                self.queried = true;
                self.progress_deadline = Some(now + self.ack_timeout * DONE_TRIES);
                for c in self.clients.clone() {
                    if c != self.me && !self.down.contains(&c) {
                        self.send(&c, CyclicMsg::Query, None);
                    }
                }
                return;
            }
            if let Some(hop) = self.ended {
                // The run ended but the final model never came: finish without it.
                self.finish_completed(hop, None);
                return;
            }
            self.fail(format!(
                "no progress for {} s",
                self.progress_timeout.as_secs_f64()
            ));
        }
    }

    fn poll_action(&mut self) -> Option<Action<CyclicMsg>> {
        self.out.pop_front()
    }

    fn poll_timeout(&self) -> Option<Time> {
        if self.join_pending {
            // Asks to be called at once: the driver's clock starts the joining.
            return Some(Time::ZERO);
        }
        if self.finished && self.closing.is_none() {
            return None;
        }
        let idle = self.holding.is_none() && self.pending.is_none() && self.closing.is_none();
        [
            self.next_status,
            self.pending.as_ref().map(|p| p.deadline),
            self.closing.as_ref().map(|c| c.deadline),
            self.progress_deadline.filter(|_| idle && !self.finished),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn is_done(&self) -> bool {
        self.finished && self.closing.is_none()
    }

    fn replace_model(&mut self, was: &ModelRef, now: &ModelRef) {
        let swap = |m: &mut ModelRef| {
            if m.same(was) {
                *m = now.clone();
            }
        };
        replace_in(&mut self.initial, was, now);
        replace_in(&mut self.final_model, was, now);
        if let Some(h) = &mut self.holding {
            swap(&mut h.model);
        }
        if let Some(p) = &mut self.pending {
            swap(&mut p.model);
        }
        if let Some(c) = &mut self.closing {
            swap(&mut c.model);
        }
        replace_in_actions(&mut self.out, was, now);
    }
}
