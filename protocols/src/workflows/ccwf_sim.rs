//! A deterministic discrete-event simulator for client-controlled workflows (test only).
//!
//! [`SimNet`] runs one [`ClientWorkflow`] per client over a simulated network driven by a
//! virtual clock and a seeded [`ChaCha8Rng`]. It stands in for the node's driver: it hands
//! each client its [`Input`]s, calls [`ClientWorkflow::handle_timeout`] at the times the client
//! asks for, drains [`ClientWorkflow::poll_action`] after every call, and carries the actions
//! out:
//!
//! - [`Action::Send`] becomes a delivery after a random delay (so messages reorder); it may be
//!   dropped or duplicated with the configured probabilities. A message a client sends to
//!   itself is never dropped nor duplicated. A message to a dead client, or to a client that
//!   died (or restarted) while it was in flight, is lost.
//! - [`Action::RunTask`] goes to the learner closure; its answer comes back as
//!   [`Input::TaskDone`] after a random task duration. A client runs one task at a time, in
//!   the order asked; a task in progress when its client dies is lost.
//! - [`Action::Report`] is recorded with its delivery time; during a server-away window it is
//!   held and delivered when the window closes (lost if its client dies first).
//! - [`Action::Persist`] and [`Action::Finished`] are only recorded.
//! - Models go stored as in a node with large models: every other delivered model, task
//!   result and persisted model reaches the client as a [`ModelRef::Stored`] copy (a persisted
//!   one through [`ClientWorkflow::replace_model`]), so the state machines are run with both
//!   kinds under every fault.
//!
//! Faults: scheduled kills and restarts, and a predicate ([`SimNet::kill_when`]) evaluated on
//! every action a client emits, which can kill the client just before the action takes effect
//! (the action is lost) or just after. A detection delay after a death, every live client gets
//! [`Input::PeerDown`]; on a restart every live client gets [`Input::PeerUp`], and the
//! restarted client learns of the peers that are down at that time after the detection delay.
//!
//! Every action each client emitted is recorded with its time and incarnation, so tests can
//! check their invariants over the whole run. Events at the same time run in the order they
//! were scheduled; timers run after deliveries due at the same time, clients in name order.

#![allow(dead_code)] // a harness for every workflow's tests; not each uses every part

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::ccwf::{Action, ClientWorkflow, Input, ModelSlot, Outcome, Report};
use crate::shareable::{Task, TaskResult};
use crate::stored::{ModelRef, StoredModel};
use crate::time::Time;

/// What [`SimNet::kill_when`]'s predicate decides for one action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KillPoint {
    /// Nothing happens: the action takes effect and the client lives on.
    None,
    /// The client dies before the action takes effect: the action is lost.
    Before,
    /// The action takes effect, then the client dies.
    After,
}

/// One action a client emitted, as it took effect.
#[derive(Debug, Clone)]
pub(crate) struct Recorded<M> {
    /// When.
    pub(crate) at: Time,
    /// Who.
    pub(crate) client: String,
    /// Which incarnation of the client (0 first, +1 per restart).
    pub(crate) incarnation: u32,
    /// The action.
    pub(crate) action: Action<M>,
}

/// A report as the server received it.
#[derive(Debug, Clone)]
pub(crate) struct ReportRecord {
    /// The reporting client.
    pub(crate) client: String,
    /// When the client emitted it.
    pub(crate) emitted: Time,
    /// When the server received it (after any server-away window).
    pub(crate) delivered: Time,
    /// The report.
    pub(crate) report: Report,
}

/// Why [`SimNet::run_until`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunEnd {
    /// Nothing is left to happen.
    Idle,
    /// The next event lies after the limit.
    Limit,
    /// Every live client is done ([`SimNet::run_until_done`] only).
    AllDone,
    /// The event budget ran out: a livelock.
    MaxEvents,
}

/// Counters over the whole run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct NetStats {
    /// Sends the clients emitted.
    pub(crate) sent: u64,
    /// Sends dropped by the loss probability.
    pub(crate) dropped: u64,
    /// Extra copies made by the duplication probability.
    pub(crate) duplicated: u64,
    /// Deliveries lost because the receiver was dead (or restarted) on arrival.
    pub(crate) lost_to_dead: u64,
    /// Messages handed to a live client.
    pub(crate) delivered: u64,
    /// Events processed.
    pub(crate) events: u64,
}

#[derive(Debug)]
enum Ev<M> {
    Deliver {
        to: String,
        incarnation: u32,
        from: String,
        msg: M,
        model: Option<ModelRef>,
    },
    TaskDone {
        client: String,
        incarnation: u32,
        result: TaskResult,
        model: Option<ModelRef>,
    },
    Kill(String),
    Restart(String),
    /// Tell `to` (every live client other than `dead` when `None`) that `dead` is down, if
    /// `dead` is still in incarnation `incarnation` and dead.
    PeerDown {
        to: Option<String>,
        dead: String,
        incarnation: u32,
    },
    /// Server-away window closes: release the reports held until `at`.
    ServerBack,
}

struct Node<W> {
    wf: W,
    alive: bool,
    incarnation: u32,
    /// The learner is busy until then.
    busy_until: Time,
}

type MakeFn<W> = Box<dyn FnMut(&str) -> W>;
type LearnFn = Box<dyn FnMut(&str, &Task) -> TaskResult>;
type KillFn<M> = Box<dyn FnMut(&str, &Action<M>) -> KillPoint>;

/// The simulated network of clients. See the module documentation.
pub(crate) struct SimNet<W: ClientWorkflow> {
    now: Time,
    rng: ChaCha8Rng,
    names: Vec<String>,
    nodes: BTreeMap<String, Node<W>>,
    make: MakeFn<W>,
    remake: Option<MakeFn<W>>,
    learner: LearnFn,
    kill_when: Option<KillFn<W::Msg>>,
    queue: BTreeMap<(Time, u64), Ev<W::Msg>>,
    seq: u64,
    drop_prob: f64,
    dup_prob: f64,
    delay: (Duration, Duration),
    task_time: (Duration, Duration),
    detect_delay: Duration,
    away: Vec<(Time, Time)>,
    held: Vec<ReportRecord>,
    max_events: u64,
    actions: Vec<Recorded<W::Msg>>,
    reports: Vec<ReportRecord>,
    kills: Vec<(Time, String)>,
    restarts: Vec<(Time, String)>,
    stats: NetStats,
    /// Counts models handed over, to turn every other one into a stored copy.
    flips: u64,
}

/// A stored copy of `m` (one in memory), or `m` itself (already stored).
fn stored_copy(m: &ModelRef) -> ModelRef {
    match m {
        ModelRef::Memory(x) => ModelRef::Stored(Arc::new(StoredModel::from_memory(x))),
        ModelRef::Stored(_) => m.clone(),
    }
}

impl<W: ClientWorkflow> std::fmt::Debug for SimNet<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNet")
            .field("now", &self.now)
            .field("names", &self.names)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn random_duration(rng: &mut ChaCha8Rng, (lo, hi): (Duration, Duration)) -> Duration {
    let lo_n = u64::try_from(lo.as_nanos()).unwrap_or(u64::MAX);
    let hi_n = u64::try_from(hi.as_nanos()).unwrap_or(u64::MAX);
    if hi_n <= lo_n {
        return lo;
    }
    Duration::from_nanos(rng.random_range(lo_n..=hi_n))
}

impl<W: ClientWorkflow> SimNet<W> {
    /// A network of `names`, each client built by `make(name)` at time zero, with `learner`
    /// answering their tasks. No faults; deliveries take 10 ms, tasks 100 ms, deaths are
    /// noticed after 300 ms.
    pub(crate) fn new(
        seed: u64,
        names: &[&str],
        make: impl FnMut(&str) -> W + 'static,
        learner: impl FnMut(&str, &Task) -> TaskResult + 'static,
    ) -> Self {
        let mut net = SimNet {
            now: Time::ZERO,
            rng: ChaCha8Rng::seed_from_u64(seed),
            names: names.iter().map(|n| n.to_string()).collect(),
            nodes: BTreeMap::new(),
            make: Box::new(make),
            remake: None,
            learner: Box::new(learner),
            kill_when: None,
            queue: BTreeMap::new(),
            seq: 0,
            drop_prob: 0.0,
            dup_prob: 0.0,
            delay: (Duration::from_millis(10), Duration::from_millis(10)),
            task_time: (Duration::from_millis(100), Duration::from_millis(100)),
            detect_delay: Duration::from_millis(300),
            away: Vec::new(),
            held: Vec::new(),
            max_events: 1_000_000,
            actions: Vec::new(),
            reports: Vec::new(),
            kills: Vec::new(),
            restarts: Vec::new(),
            stats: NetStats::default(),
            flips: 0,
        };
        for name in net.names.clone() {
            let wf = (net.make)(&name);
            net.nodes.insert(
                name.clone(),
                Node {
                    wf,
                    alive: true,
                    incarnation: 0,
                    busy_until: Time::ZERO,
                },
            );
            net.drain(&name);
        }
        net
    }

    /// Each message (other than to oneself) is dropped with probability `p`.
    pub(crate) fn with_drop(mut self, p: f64) -> Self {
        self.drop_prob = p;
        self
    }

    /// Each delivered message (other than to oneself) arrives twice with probability `p`.
    pub(crate) fn with_dup(mut self, p: f64) -> Self {
        self.dup_prob = p;
        self
    }

    /// Each delivery takes a uniform random time in `[min, max]` (milliseconds).
    pub(crate) fn with_delay_ms(mut self, min: u64, max: u64) -> Self {
        self.delay = (Duration::from_millis(min), Duration::from_millis(max));
        self
    }

    /// Each learner task takes a uniform random time in `[min, max]` (milliseconds).
    pub(crate) fn with_task_ms(mut self, min: u64, max: u64) -> Self {
        self.task_time = (Duration::from_millis(min), Duration::from_millis(max));
        self
    }

    /// Deaths are noticed (as [`Input::PeerDown`]) this long after they happen.
    pub(crate) fn with_detect_ms(mut self, ms: u64) -> Self {
        self.detect_delay = Duration::from_millis(ms);
        self
    }

    /// Restarted clients are built by `remake(name)` instead of `make`.
    pub(crate) fn with_remake(mut self, remake: impl FnMut(&str) -> W + 'static) -> Self {
        self.remake = Some(Box::new(remake));
        self
    }

    /// Evaluates `f(client, action)` on every action a client emits; see [`KillPoint`].
    pub(crate) fn with_kill_when(
        mut self,
        f: impl FnMut(&str, &Action<W::Msg>) -> KillPoint + 'static,
    ) -> Self {
        self.kill_when = Some(Box::new(f));
        self
    }

    /// At most this many events per run call before declaring a livelock.
    pub(crate) fn with_max_events(mut self, n: u64) -> Self {
        self.max_events = n;
        self
    }

    fn schedule(&mut self, at: Time, ev: Ev<W::Msg>) {
        self.seq += 1;
        self.queue.insert((at.max(self.now), self.seq), ev);
    }

    /// Kills `name` at virtual time `at` (milliseconds).
    pub(crate) fn kill(&mut self, name: &str, at_ms: u64) -> &mut Self {
        self.schedule(Time::from_millis(at_ms), Ev::Kill(name.to_string()));
        self
    }

    /// Restarts `name` (if dead) at `at_ms` with a fresh workflow.
    pub(crate) fn restart(&mut self, name: &str, at_ms: u64) -> &mut Self {
        self.schedule(Time::from_millis(at_ms), Ev::Restart(name.to_string()));
        self
    }

    /// Delivers `msg` (and `model`) to `to` at `at_ms` as if from `from`, without loss.
    pub(crate) fn inject(
        &mut self,
        at_ms: u64,
        to: &str,
        from: &str,
        msg: W::Msg,
        model: Option<ModelRef>,
    ) -> &mut Self {
        let incarnation = self.nodes.get(to).map_or(0, |n| n.incarnation);
        self.schedule(
            Time::from_millis(at_ms),
            Ev::Deliver {
                to: to.to_string(),
                incarnation,
                from: from.to_string(),
                msg,
                model,
            },
        );
        self
    }

    /// The server is away from `from_ms` to `to_ms`: reports emitted meanwhile are held and
    /// delivered at `to_ms`.
    pub(crate) fn server_away(&mut self, from_ms: u64, to_ms: u64) -> &mut Self {
        let (from, to) = (Time::from_millis(from_ms), Time::from_millis(to_ms));
        self.away.push((from, to));
        self.schedule(to, Ev::ServerBack);
        self
    }

    /// The current virtual time.
    pub(crate) fn now(&self) -> Time {
        self.now
    }

    /// The client names.
    pub(crate) fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether `name` is alive.
    pub(crate) fn is_alive(&self, name: &str) -> bool {
        self.nodes.get(name).is_some_and(|n| n.alive)
    }

    /// The live (or last) workflow of `name`, for inspection.
    pub(crate) fn workflow(&self, name: &str) -> Option<&W> {
        self.nodes.get(name).map(|n| &n.wf)
    }

    /// Every action that took effect, in order.
    pub(crate) fn actions(&self) -> &[Recorded<W::Msg>] {
        &self.actions
    }

    /// The actions of `name` (every incarnation), in order.
    pub(crate) fn actions_of<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Recorded<W::Msg>> + 'a {
        self.actions.iter().filter(move |r| r.client == name)
    }

    /// The messages `name` sent: (time, receiver, message, model).
    pub(crate) fn sends_of<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = (Time, &'a str, &'a W::Msg, Option<&'a ModelRef>)> + 'a {
        self.actions_of(name).filter_map(|r| match &r.action {
            Action::Send { to, msg, model } => Some((r.at, to.as_str(), msg, model.as_ref())),
            _ => None,
        })
    }

    /// The models `name` persisted, in order.
    pub(crate) fn persisted(&self, name: &str) -> Vec<(ModelSlot, ModelRef)> {
        self.actions_of(name)
            .filter_map(|r| match &r.action {
                Action::Persist { slot, model } => Some((slot.clone(), model.clone())),
                _ => None,
            })
            .collect()
    }

    /// Every outcome `name` finished with (every incarnation), in order.
    pub(crate) fn outcomes(&self, name: &str) -> Vec<Outcome> {
        self.actions_of(name)
            .filter_map(|r| match &r.action {
                Action::Finished(o) => Some(o.clone()),
                _ => None,
            })
            .collect()
    }

    /// The reports the server received so far, in delivery order.
    pub(crate) fn reports(&self) -> &[ReportRecord] {
        &self.reports
    }

    /// Deaths so far: (time, client).
    pub(crate) fn kills(&self) -> &[(Time, String)] {
        &self.kills
    }

    /// Restarts so far: (time, client).
    pub(crate) fn restarts(&self) -> &[(Time, String)] {
        &self.restarts
    }

    /// Network counters.
    pub(crate) fn stats(&self) -> NetStats {
        self.stats
    }

    /// Whether every live client is done.
    pub(crate) fn all_live_done(&self) -> bool {
        self.nodes.values().all(|n| !n.alive || n.wf.is_done())
    }

    /// Processes every event up to `limit_ms`.
    pub(crate) fn run_until(&mut self, limit_ms: u64) -> RunEnd {
        self.run(Time::from_millis(limit_ms), false)
    }

    /// Processes events up to `limit_ms`, stopping as soon as every live client is done.
    pub(crate) fn run_until_done(&mut self, limit_ms: u64) -> RunEnd {
        self.run(Time::from_millis(limit_ms), true)
    }

    fn next_timer(&self) -> Option<(Time, String)> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.alive)
            .filter_map(|(name, n)| n.wf.poll_timeout().map(|t| (t, name.clone())))
            .min()
    }

    fn run(&mut self, limit: Time, stop_when_done: bool) -> RunEnd {
        let mut budget = self.max_events;
        loop {
            if stop_when_done && self.all_live_done() {
                return RunEnd::AllDone;
            }
            if budget == 0 {
                return RunEnd::MaxEvents;
            }
            budget -= 1;
            let next_ev = self.queue.keys().next().map(|(t, _)| *t);
            let timer = self.next_timer();
            let timer_first = match (&timer, next_ev) {
                (Some((t, _)), Some(e)) => *t < e,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if timer_first {
                let Some((t, name)) = timer else {
                    return RunEnd::Idle;
                };
                if t > limit {
                    return RunEnd::Limit;
                }
                self.stats.events += 1;
                self.now = self.now.max(t);
                let now = self.now;
                if let Some(n) = self.nodes.get_mut(&name) {
                    n.wf.handle_timeout(now);
                }
                self.drain(&name);
                continue;
            }
            let Some(e) = next_ev else {
                return RunEnd::Idle;
            };
            if e > limit {
                return RunEnd::Limit;
            }
            let Some(((t, _), ev)) = self.queue.pop_first() else {
                return RunEnd::Idle;
            };
            self.stats.events += 1;
            self.now = self.now.max(t);
            self.process(ev);
        }
    }

    fn live(&self, name: &str, incarnation: u32) -> bool {
        self.nodes
            .get(name)
            .is_some_and(|n| n.alive && n.incarnation == incarnation)
    }

    /// Every other model handed over becomes a stored copy.
    fn flip(&mut self, m: ModelRef) -> ModelRef {
        self.flips += 1;
        if self.flips % 2 == 0 {
            stored_copy(&m)
        } else {
            m
        }
    }

    fn feed(&mut self, name: &str, input: Input<W::Msg>) {
        let now = self.now;
        if let Some(n) = self.nodes.get_mut(name) {
            n.wf.handle(now, input);
        }
        self.drain(name);
    }

    fn process(&mut self, ev: Ev<W::Msg>) {
        match ev {
            Ev::Deliver {
                to,
                incarnation,
                from,
                msg,
                model,
            } => {
                if !self.live(&to, incarnation) {
                    self.stats.lost_to_dead += 1;
                    return;
                }
                self.stats.delivered += 1;
                let model = model.map(|m| self.flip(m));
                self.feed(&to, Input::Message { from, msg, model });
            }
            Ev::TaskDone {
                client,
                incarnation,
                result,
                model,
            } => {
                if self.live(&client, incarnation) {
                    self.feed(&client, Input::TaskDone(result, model));
                }
            }
            Ev::Kill(name) => self.die(&name),
            Ev::Restart(name) => self.revive(&name),
            Ev::PeerDown {
                to,
                dead,
                incarnation,
            } => {
                let still_dead = self
                    .nodes
                    .get(&dead)
                    .is_some_and(|n| !n.alive && n.incarnation == incarnation);
                if !still_dead {
                    return;
                }
                let targets: Vec<String> = match to {
                    Some(t) => vec![t],
                    None => self.names.iter().filter(|n| **n != dead).cloned().collect(),
                };
                for t in targets {
                    if self.is_alive(&t) {
                        self.feed(&t, Input::PeerDown(dead.clone()));
                    }
                }
            }
            Ev::ServerBack => {
                let now = self.now;
                let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
                    .into_iter()
                    .partition(|r| r.delivered <= now);
                self.held = rest;
                self.reports.extend(due);
            }
        }
    }

    fn die(&mut self, name: &str) {
        let now = self.now;
        let Some(n) = self.nodes.get_mut(name) else {
            return;
        };
        if !n.alive {
            return;
        }
        n.alive = false;
        let incarnation = n.incarnation;
        self.kills.push((now, name.to_string()));
        self.held.retain(|r| r.client != name);
        let at = now + self.detect_delay;
        self.schedule(
            at,
            Ev::PeerDown {
                to: None,
                dead: name.to_string(),
                incarnation,
            },
        );
    }

    fn revive(&mut self, name: &str) {
        let now = self.now;
        if self.nodes.get(name).is_none_or(|n| n.alive) {
            return;
        }
        let wf = match self.remake.as_mut() {
            Some(f) => f(name),
            None => (self.make)(name),
        };
        if let Some(n) = self.nodes.get_mut(name) {
            n.wf = wf;
            n.alive = true;
            n.incarnation += 1;
            n.busy_until = now;
        }
        self.restarts.push((now, name.to_string()));
        self.drain(name);
        let others: Vec<String> = self.names.iter().filter(|n| *n != name).cloned().collect();
        for other in others {
            match self.nodes.get(&other).map(|n| (n.alive, n.incarnation)) {
                Some((true, _)) => self.feed(&other, Input::PeerUp(name.to_string())),
                Some((false, inc)) => {
                    let at = now + self.detect_delay;
                    self.schedule(
                        at,
                        Ev::PeerDown {
                            to: Some(name.to_string()),
                            dead: other,
                            incarnation: inc,
                        },
                    );
                }
                None => {}
            }
        }
    }

    /// Drains and carries out `name`'s actions.
    fn drain(&mut self, name: &str) {
        loop {
            let Some(n) = self.nodes.get_mut(name) else {
                return;
            };
            if !n.alive {
                return;
            }
            let Some(action) = n.wf.poll_action() else {
                return;
            };
            let incarnation = n.incarnation;
            let point = match self.kill_when.as_mut() {
                Some(f) => f(name, &action),
                None => KillPoint::None,
            };
            if point == KillPoint::Before {
                self.die(name);
                return;
            }
            self.apply(name, incarnation, action);
            if point == KillPoint::After {
                self.die(name);
                return;
            }
        }
    }

    fn apply(&mut self, name: &str, incarnation: u32, action: Action<W::Msg>) {
        let now = self.now;
        self.actions.push(Recorded {
            at: now,
            client: name.to_string(),
            incarnation,
            action: action.clone(),
        });
        match action {
            Action::Send { to, msg, model } => {
                self.stats.sent += 1;
                let Some(to_inc) = self
                    .nodes
                    .get(&to)
                    .filter(|n| n.alive)
                    .map(|n| n.incarnation)
                else {
                    self.stats.lost_to_dead += 1;
                    return;
                };
                let to_self = to == name;
                if !to_self && self.drop_prob > 0.0 && self.rng.random_bool(self.drop_prob) {
                    self.stats.dropped += 1;
                    return;
                }
                let copies =
                    if !to_self && self.dup_prob > 0.0 && self.rng.random_bool(self.dup_prob) {
                        self.stats.duplicated += 1;
                        2
                    } else {
                        1
                    };
                for _ in 0..copies {
                    let d = random_duration(&mut self.rng, self.delay);
                    self.schedule(
                        now + d,
                        Ev::Deliver {
                            to: to.clone(),
                            incarnation: to_inc,
                            from: name.to_string(),
                            msg: msg.clone(),
                            model: model.clone(),
                        },
                    );
                }
            }
            Action::RunTask { mut task, model } => {
                // A stored model is loaded for the learner, as a node's driver does.
                task.data.model = model.map(|m| m.load().expect("simulated models load"));
                let mut result = (self.learner)(name, &task);
                let model = result
                    .data
                    .model
                    .take()
                    .map(|m| self.flip(ModelRef::Memory(m)));
                let d = random_duration(&mut self.rng, self.task_time);
                let Some(n) = self.nodes.get_mut(name) else {
                    return;
                };
                let done = n.busy_until.max(now) + d;
                n.busy_until = done;
                self.schedule(
                    done,
                    Ev::TaskDone {
                        client: name.to_string(),
                        incarnation,
                        result,
                        model,
                    },
                );
            }
            Action::Report(report) => {
                let window = self
                    .away
                    .iter()
                    .filter(|(a, b)| *a <= now && now < *b)
                    .map(|(_, b)| *b)
                    .max();
                let rec = ReportRecord {
                    client: name.to_string(),
                    emitted: now,
                    delivered: window.unwrap_or(now),
                    report,
                };
                if window.is_some() {
                    self.held.push(rec);
                } else {
                    self.reports.push(rec);
                }
            }
            Action::Persist { model, .. } => {
                // A node writes a large model out and holds the file instead.
                let stored = self.flip(model.clone());
                if !stored.same(&model) {
                    if let Some(n) = self.nodes.get_mut(name).filter(|n| n.alive) {
                        n.wf.replace_model(&model, &stored);
                    }
                }
            }
            Action::Finished(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::shareable::{Shareable, TaskId};
    use crate::workflows::ccwf::{Epoch, ReportEvent};

    /// A toy workflow: does what the messages say, and logs what it sees.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    enum Toy {
        /// Send `count` numbered messages to `to`.
        Flood {
            to: String,
            count: u32,
        },
        Num(u32),
        /// Send `Num(n)` to `to`.
        SendOne {
            to: String,
            n: u32,
        },
        /// Report something.
        Report,
        /// Run a task.
        Train,
        /// Ask for a timeout `ms` from now.
        Timer(u64),
        /// Ask for a timeout that never advances.
        Spin,
    }

    #[derive(Debug, Default)]
    struct ToyWf {
        fresh: bool,
        log: Vec<String>,
        nums: Vec<u32>,
        out: VecDeque<Action<Toy>>,
        timer: Option<Time>,
        spin: bool,
        done: bool,
    }

    impl ClientWorkflow for ToyWf {
        type Msg = Toy;
        fn handle(&mut self, now: Time, input: Input<Toy>) {
            match input {
                Input::Message { msg, .. } => match msg {
                    Toy::Flood { to, count } => {
                        for i in 0..count {
                            self.out.push_back(Action::Send {
                                to: to.clone(),
                                msg: Toy::Num(i),
                                model: None,
                            });
                        }
                    }
                    Toy::Num(i) => self.nums.push(i),
                    Toy::SendOne { to, n } => self.out.push_back(Action::Send {
                        to,
                        msg: Toy::Num(n),
                        model: None,
                    }),
                    Toy::Report => self.out.push_back(Action::Report(Report {
                        epoch: Epoch::default(),
                        event: ReportEvent::Alive,
                    })),
                    Toy::Train => self.out.push_back(Action::RunTask {
                        task: Task {
                            id: TaskId(1),
                            name: "train".into(),
                            round: 0,
                            data: Shareable::default(),
                        },
                        model: None,
                    }),
                    Toy::Timer(ms) => self.timer = Some(now + Duration::from_millis(ms)),
                    Toy::Spin => self.spin = true,
                },
                Input::TaskDone(r, _) => {
                    self.log.push(format!("done {}", r.task_id));
                    self.done = true;
                    self.out.push_back(Action::Finished(Outcome::Completed {
                        last_round: 0,
                        best: None,
                    }));
                }
                Input::PeerDown(p) => self.log.push(format!("down {p}")),
                Input::PeerUp(p) => self.log.push(format!("up {p}")),
            }
        }
        fn handle_timeout(&mut self, now: Time) {
            if self.timer.is_some_and(|t| t <= now) {
                self.timer = None;
                self.log
                    .push(format!("timeout {}", now.since_epoch().as_millis()));
            }
        }
        fn poll_action(&mut self) -> Option<Action<Toy>> {
            self.out.pop_front()
        }
        fn poll_timeout(&self) -> Option<Time> {
            if self.spin {
                return Some(Time::ZERO);
            }
            self.timer
        }
        fn is_done(&self) -> bool {
            self.done
        }
        fn replace_model(&mut self, _: &ModelRef, _: &ModelRef) {}
    }

    fn net(seed: u64) -> SimNet<ToyWf> {
        SimNet::new(
            seed,
            &["a", "b", "c"],
            |_| ToyWf {
                fresh: false,
                ..ToyWf::default()
            },
            |_, t| TaskResult {
                task_id: t.id,
                round: t.round,
                data: Shareable::default(),
            },
        )
        .with_remake(|_| ToyWf {
            fresh: true,
            ..ToyWf::default()
        })
    }

    fn flood(to: &str, count: u32) -> Toy {
        Toy::Flood {
            to: to.into(),
            count,
        }
    }

    #[test]
    fn healthy_network_delivers_everything_in_order() {
        let mut n = net(1);
        n.inject(0, "a", "server", flood("b", 100), None);
        assert_eq!(n.run_until(10_000), RunEnd::Idle);
        let b = n.workflow("b").map(|w| w.nums.clone()).unwrap_or_default();
        assert_eq!(b, (0..100).collect::<Vec<_>>());
        assert_eq!(n.sends_of("a").count(), 100);
        assert_eq!(n.stats().delivered, 101);
    }

    #[test]
    fn loss_drops_about_the_configured_share() {
        let mut n = net(2).with_drop(0.3);
        n.inject(0, "a", "server", flood("b", 2000), None);
        n.run_until(10_000);
        let got = n.workflow("b").map_or(0, |w| w.nums.len());
        assert!((1250..1550).contains(&got), "{got}");
        assert_eq!(n.stats().dropped as usize, 2000 - got);
    }

    #[test]
    fn duplicates_and_reordering_happen() {
        let mut n = net(3).with_dup(0.2).with_delay_ms(1, 200);
        n.inject(0, "a", "server", flood("b", 1000), None);
        n.run_until(10_000);
        let nums = n.workflow("b").map(|w| w.nums.clone()).unwrap_or_default();
        let dups = nums.len() - 1000;
        assert!((120..280).contains(&dups), "{dups}");
        assert!(nums.windows(2).any(|w| w[0] > w[1]), "reordered");
        let distinct: std::collections::BTreeSet<_> = nums.iter().collect();
        assert_eq!(distinct.len(), 1000);
    }

    #[test]
    fn messages_to_oneself_are_never_lost() {
        let mut n = net(4).with_drop(1.0).with_dup(1.0);
        n.inject(0, "a", "server", flood("a", 50), None);
        n.inject(0, "a", "server", flood("b", 50), None);
        n.run_until(10_000);
        assert_eq!(n.workflow("a").map(|w| w.nums.len()), Some(50));
        assert_eq!(n.workflow("b").map(|w| w.nums.len()), Some(0));
    }

    #[test]
    fn the_dead_receive_nothing_and_are_noticed_then_restart_fresh() {
        let mut n = net(5).with_detect_ms(300);
        n.kill("b", 1000);
        n.inject(
            500,
            "a",
            "server",
            Toy::SendOne {
                to: "b".into(),
                n: 1,
            },
            None,
        );
        n.inject(
            1500,
            "a",
            "server",
            Toy::SendOne {
                to: "b".into(),
                n: 2,
            },
            None,
        );
        n.inject(1500, "b", "server", Toy::Report, None);
        n.run_until(1299);
        assert!(!n.is_alive("b"));
        assert!(n.workflow("a").is_some_and(|w| w.log.is_empty()));
        n.run_until(1300);
        assert_eq!(
            n.workflow("a").map(|w| w.log.clone()),
            Some(vec!["down b".into()])
        );
        assert_eq!(
            n.workflow("c").map(|w| w.log.clone()),
            Some(vec!["down b".into()])
        );
        n.restart("b", 2000);
        n.inject(
            2500,
            "a",
            "server",
            Toy::SendOne {
                to: "b".into(),
                n: 3,
            },
            None,
        );
        n.run_until(10_000);
        let b = n.workflow("b");
        assert!(b.is_some_and(|w| w.fresh), "rebuilt by remake");
        assert_eq!(b.map(|w| w.nums.clone()), Some(vec![3]));
        assert_eq!(
            n.workflow("a").map(|w| w.log.clone()),
            Some(vec!["down b".into(), "up b".into()])
        );
        assert!(n.reports().is_empty(), "the dead do not report");
        assert_eq!(n.kills().len(), 1);
        assert_eq!(n.restarts().len(), 1);
    }

    #[test]
    fn a_restarted_client_learns_who_is_down() {
        let mut n = net(6);
        n.kill("b", 100);
        n.kill("c", 100);
        n.restart("b", 1000);
        n.run_until(5000);
        assert_eq!(
            n.workflow("b").map(|w| w.log.clone()),
            Some(vec!["down c".into()])
        );
        assert_eq!(
            n.workflow("a").map(|w| w.log.clone()),
            Some(vec!["down b".into(), "down c".into(), "up b".into()])
        );
    }

    #[test]
    fn a_kill_before_loses_the_action_after_keeps_it() {
        for (point, delivered) in [(KillPoint::Before, 0), (KillPoint::After, 1)] {
            let mut n = net(7).with_kill_when(move |who, a| match a {
                Action::Send { to, .. } if who == "a" && to == "b" => point,
                _ => KillPoint::None,
            });
            n.inject(
                0,
                "a",
                "server",
                Toy::SendOne {
                    to: "b".into(),
                    n: 9,
                },
                None,
            );
            n.run_until(5000);
            assert!(!n.is_alive("a"));
            assert_eq!(n.workflow("b").map(|w| w.nums.len()), Some(delivered));
            assert_eq!(n.sends_of("a").count(), delivered);
            assert_eq!(
                n.workflow("b").map(|w| w.log.clone()),
                Some(vec!["down a".into()])
            );
        }
    }

    #[test]
    fn reports_wait_out_a_server_away_window() {
        let mut n = net(8);
        n.server_away(1000, 3000);
        n.server_away(5000, 6000);
        n.inject(500, "a", "server", Toy::Report, None);
        n.inject(1500, "a", "server", Toy::Report, None);
        n.inject(2500, "b", "server", Toy::Report, None);
        n.inject(2600, "c", "server", Toy::Report, None);
        n.kill("c", 2800);
        n.inject(4000, "a", "server", Toy::Report, None);
        n.run_until(10_000);
        let got: Vec<(String, u128, u128)> = n
            .reports()
            .iter()
            .map(|r| {
                (
                    r.client.clone(),
                    r.emitted.since_epoch().as_millis(),
                    r.delivered.since_epoch().as_millis(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".into(), 500, 500),
                ("a".into(), 1500, 3000),
                ("b".into(), 2500, 3000),
                ("a".into(), 4000, 4000),
            ],
            "c's held report dies with it"
        );
    }

    #[test]
    fn tasks_come_back_after_their_duration_unless_the_client_died() {
        let mut n = net(9).with_task_ms(1000, 1000);
        n.inject(0, "a", "server", Toy::Train, None);
        n.inject(0, "b", "server", Toy::Train, None);
        n.inject(0, "c", "server", Toy::Train, None);
        n.inject(0, "c", "server", Toy::Train, None);
        n.kill("b", 500);
        assert_eq!(n.run_until_done(10_000), RunEnd::AllDone);
        // c runs its two tasks one after the other: the run is all done when the first ends.
        assert_eq!(n.now(), Time::from_millis(1000));
        assert_eq!(n.outcomes("a").len(), 1);
        n.run_until(10_000);
        assert_eq!(n.now(), Time::from_millis(2000));
        assert_eq!(n.outcomes("c").len(), 2);
        assert!(n.outcomes("b").is_empty());
        assert!(
            n.workflow("a")
                .is_some_and(|w| w.log == ["down b", "done task-1"])
        );
    }

    #[test]
    fn timers_fire_and_livelocks_are_caught() {
        let mut n = net(10);
        n.inject(0, "a", "server", Toy::Timer(700), None);
        n.run_until(10_000);
        assert_eq!(
            n.workflow("a").map(|w| w.log.clone()),
            Some(vec!["timeout 700".into()])
        );
        let mut n = net(10).with_max_events(1000);
        n.inject(0, "a", "server", Toy::Spin, None);
        assert_eq!(n.run_until(10_000), RunEnd::MaxEvents);
    }

    #[test]
    fn runs_are_reproducible_from_the_seed() {
        let run = |seed| {
            let mut n = net(seed).with_drop(0.2).with_dup(0.2).with_delay_ms(1, 100);
            n.inject(0, "a", "server", flood("b", 200), None);
            n.inject(0, "b", "server", flood("c", 200), None);
            n.run_until(10_000);
            (
                n.workflow("b").map(|w| w.nums.clone()),
                n.workflow("c").map(|w| w.nums.clone()),
            )
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }
}
