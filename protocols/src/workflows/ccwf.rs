//! Client-controlled workflows (FLARE's `app_common/ccwf`): what the swarm, cyclic and
//! cross-site evaluation state machines share with the drivers that run them.
//!
//! In these workflows the server only configures the run, starts it on one client, and
//! watches. From then on every client runs one [`ClientWorkflow`] state machine that talks to
//! the other clients directly: the driver hands it [`Input`]s (peer messages with the model
//! that travelled beside them, the local learner's results, peers going down or coming back)
//! and the current [`Time`], and carries out the [`Action`]s it hands back (send to a peer,
//! run a local task, report to the server, persist a model, finish). The state machine never
//! learns whether a message went direct or through the relay, nor whether the server is
//! there: reports are buffered by the driver while it is away.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::shareable::{Task, TaskResult};
use crate::stored::ModelRef;
use crate::time::Time;

/// The round of a run and the attempt at it. Attempts grow when a round's aggregator is
/// replaced; the order is lexicographic, so the further lineage wins when two meet.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Epoch {
    /// Round number.
    pub round: u32,
    /// Attempt at that round (0 first).
    pub attempt: u32,
}

impl Epoch {
    /// Round `round`, attempt `attempt`.
    pub fn new(round: u32, attempt: u32) -> Self {
        Epoch { round, attempt }
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.round, self.attempt)
    }
}

/// What the driver hands a client workflow.
#[derive(Debug, Clone)]
pub enum Input<M> {
    /// A message from another client (or the server), with the model that came with it.
    Message {
        /// Sender's name.
        from: String,
        /// The message.
        msg: M,
        /// The model sent beside it, if any.
        model: Option<ModelRef>,
    },
    /// The local learner finished a task this state machine asked for, with the model it
    /// returned (in memory, or stored by the driver when large). A model left in the
    /// result's `data.model` is taken too ([`result_model`]).
    TaskDone(TaskResult, Option<ModelRef>),
    /// The driver lost every connection to this peer, or a delivery to it failed for good.
    PeerDown(String),
    /// The peer is reachable again.
    PeerUp(String),
}

/// Where a persisted model belongs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelSlot {
    /// The global model a round produced (`round-NNN`).
    Round(u32),
    /// The best global model so far (`best`).
    Best,
    /// The last global model (`global_final`).
    Final,
    /// A client's own locally trained model (`local`), for cross-site evaluation.
    Local,
}

impl ModelSlot {
    /// The file stem the driver writes (`.safetensors` is added).
    pub fn file_stem(&self) -> String {
        match self {
            ModelSlot::Round(r) => format!("round-{r:03}"),
            ModelSlot::Best => "best".into(),
            ModelSlot::Final => "global_final".into(),
            ModelSlot::Local => "local".into(),
        }
    }
}

/// What a client workflow asks its driver to do.
#[derive(Debug, Clone)]
pub enum Action<M> {
    /// Send `msg` (and `model`) to the client `to`, sealed to it.
    Send {
        /// Receiver's name.
        to: String,
        /// The message.
        msg: M,
        /// A model to send beside it.
        model: Option<ModelRef>,
    },
    /// Run a task on the local learner, with `model` as its input (the driver loads a stored
    /// one into the task's `data.model`); answer with [`Input::TaskDone`]. The driver runs
    /// one task at a time, in the order asked.
    RunTask {
        /// The task; its `data.model` is empty.
        task: Task,
        /// The model to work on.
        model: Option<ModelRef>,
    },
    /// Report to the server (buffered by the driver while the server is away).
    Report(Report),
    /// Write a model into the job's workspace on this site.
    Persist {
        /// Which model.
        slot: ModelSlot,
        /// The model.
        model: ModelRef,
    },
    /// The run is over for this client.
    Finished(Outcome),
}

/// The best global model so far: which one, how good, and who holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Best {
    /// The global model's version: the number of aggregations behind it (0 is the initial
    /// model).
    pub version: u32,
    /// Its key metric, as the trainers measured it on their validation data.
    pub metric: f64,
    /// The client holding it.
    pub holder: String,
}

/// A progress report to the server (which only watches).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Where the reporting client is.
    pub epoch: Epoch,
    /// What happened.
    pub event: ReportEvent,
}

/// The events a client reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReportEvent {
    /// The client is configured and waiting (sent once at start, and as a keep-alive).
    Alive,
    /// The client started training (or evaluating) for this epoch.
    Training,
    /// This client aggregated the epoch: who was accepted, who was pruned, and the metrics of
    /// the global model the trainers received (version `version`).
    Aggregated {
        /// Clients whose results went into the model.
        accepted: Vec<String>,
        /// Clients given up on for this round.
        pruned: Vec<String>,
        /// Version of the model the metrics measure.
        version: u32,
        /// Weighted mean of the trainers' validation metrics of that model.
        metrics: BTreeMap<String, f64>,
        /// The best model after this round.
        best: Option<Best>,
        /// The total weight (sample count) of the results folded into the model; 0 when the
        /// epoch only validated. A hub hands it up with a region's swarm result.
        #[serde(default)]
        weight: f64,
    },
    /// The aggregator of the epoch was replaced (it died or went silent).
    Reelected {
        /// The aggregator given up on.
        previous: String,
        /// Its successor.
        next: String,
    },
    /// The epoch's secure aggregation unmasked the sum of `survivors`' updates; the masks of
    /// `dropped` (sites that shared keys but sent no input) were removed with their
    /// neighbours' shares. Sent just before [`ReportEvent::Aggregated`].
    Unmasked {
        /// Sites whose update is in the sum.
        survivors: Vec<String>,
        /// Sites recovered from.
        dropped: Vec<String>,
    },
    /// The epoch's aggregation failed in a way another aggregator may not (a secure
    /// aggregation round aborted): the round goes on with its next attempt.
    Retried {
        /// Why.
        reason: String,
        /// The next attempt's aggregator.
        next: String,
    },
    /// A cross-site evaluation result: `evaluator` measured `model` (a site name or
    /// `global`/`best`).
    Evaluated {
        /// Which model was measured.
        model: String,
        /// Its metrics on this client's data.
        metrics: BTreeMap<String, f64>,
    },
    /// A cross-site evaluation that could not be done: the model never came (its holder is
    /// down or silent), or validating it failed or timed out.
    EvaluationFailed {
        /// Which model was to be measured (a site name or `global`).
        model: String,
        /// Why it failed.
        reason: String,
    },
    /// The client persisted a model.
    Persisted {
        /// Which one.
        slot: ModelSlot,
    },
    /// The client could not persist a model (a full disk, say): it holds no file for that
    /// slot now, so a stale one is never taken for the current model.
    PersistFailed {
        /// Which one.
        slot: ModelSlot,
        /// Why, with the path.
        reason: String,
    },
    /// The run ended for this client.
    Finished(Outcome),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// Every round ran.
    Completed {
        /// The last round's number.
        last_round: u32,
        /// The best model at the end.
        best: Option<Best>,
    },
    /// The run could not go on.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A client-side workflow state machine. All of them are deterministic functions of their
/// inputs, the times handed in and their seed.
pub trait ClientWorkflow {
    /// Messages between the clients of this workflow.
    type Msg: Clone + std::fmt::Debug + Serialize + for<'de> Deserialize<'de>;

    /// Feeds one input.
    fn handle(&mut self, now: Time, input: Input<Self::Msg>);
    /// Called at (or after) the time [`ClientWorkflow::poll_timeout`] gave.
    fn handle_timeout(&mut self, now: Time);
    /// The next action, if any.
    fn poll_action(&mut self) -> Option<Action<Self::Msg>>;
    /// When to call [`ClientWorkflow::handle_timeout`] next.
    fn poll_timeout(&self) -> Option<Time>;
    /// Whether this client has finished (it may still answer late peers until the driver
    /// drops it).
    fn is_done(&self) -> bool;
    /// The driver has written `was` (a model this state machine handed out, in memory) to
    /// a file and hands it back as `now`: hold `now` wherever `was` is held, queued actions
    /// included, so that memory can let the copy go.
    fn replace_model(&mut self, was: &ModelRef, now: &ModelRef);
}

/// The model of a finished task: the one handed beside it, else the one left in the result.
pub fn result_model(result: &mut TaskResult, model: Option<ModelRef>) -> Option<ModelRef> {
    model.or_else(|| result.data.model.take().map(ModelRef::Memory))
}

/// Puts `now` in place of `was` in `slot`.
pub fn replace_in(slot: &mut Option<ModelRef>, was: &ModelRef, now: &ModelRef) {
    if let Some(m) = slot
        && m.same(was)
    {
        *m = now.clone();
    }
}

/// Puts `now` in place of `was` in the queued actions.
pub fn replace_in_actions<M>(actions: &mut VecDeque<Action<M>>, was: &ModelRef, now: &ModelRef) {
    for a in actions {
        match a {
            Action::Send { model, .. } | Action::RunTask { model, .. } => {
                replace_in(model, was, now)
            }
            Action::Persist { model, .. } => {
                if model.same(was) {
                    *model = now.clone();
                }
            }
            Action::Report(_) | Action::Finished(_) => {}
        }
    }
}

/// A seeded, stable choice: the `attempt`-th pick for `round` from `n` candidates. Every
/// client computes the same answer from the same inputs (splitmix64, no platform
/// dependence).
pub fn pick(seed: u64, round: u32, attempt: u32, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let z = splitmix64(seed ^ (u64::from(round).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    ((z % n as u64) as usize + attempt as usize) % n
}

/// SplitMix64's output mix: a well-spread 64-bit value from a seed combined with counters.
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_order_by_round_then_attempt() {
        assert!(Epoch::new(2, 0) > Epoch::new(1, 5));
        assert!(Epoch::new(1, 1) > Epoch::new(1, 0));
        assert_eq!(Epoch::new(3, 1).to_string(), "3.1");
    }

    #[test]
    fn picks_are_stable_and_walk_every_candidate() {
        for round in 0..20 {
            let first = pick(7, round, 0, 5);
            assert_eq!(first, pick(7, round, 0, 5));
            let all: std::collections::BTreeSet<usize> =
                (0..5).map(|a| pick(7, round, a, 5)).collect();
            assert_eq!(all.len(), 5, "five attempts visit five candidates");
        }
        let spread: std::collections::BTreeSet<usize> = (0..50).map(|r| pick(1, r, 0, 4)).collect();
        assert!(spread.len() > 1, "different rounds pick different clients");
        assert_eq!(pick(1, 1, 0, 0), 0);
    }
}
