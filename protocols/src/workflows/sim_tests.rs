//! Deterministic simulations of the scatter-and-gather controller with injected faults.
//!
//! A virtual clock and an ordered queue of deliveries stand in for the network; each client
//! follows a scripted behaviour. The checks recompute every round's expected model from the
//! results the controller reported as accepted.
//!
//! As the node's server does, the simulation stores each aggregated model and hands it back
//! with `replace_global` (every other round), and odd-numbered clients answer with stored
//! results, so the stored paths of aggregation run under the same faults.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::scatter_gather::{DropReason, Event, Output, SagConfig, ScatterGather};
use crate::model::{FLModel, META_NUM_SAMPLES, MetaValue, Tensor};
use crate::shareable::{ReturnCode, Shareable, Task, TaskResult, task_names};
use crate::stored::{ModelRef, StoredModel};
use crate::time::Time;

/// How a simulated client answers a task.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Behaviour {
    /// Answers after `ms` milliseconds.
    Answer { ms: u64 },
    /// Never answers.
    Silent,
    /// Answers with an error code after `ms`.
    Error { ms: u64 },
    /// Answers twice, `ms` apart.
    Duplicate { ms: u64 },
    /// Answers with a model of the wrong shape.
    BadShape { ms: u64 },
}

fn model(v: f32) -> FLModel {
    FLModel::from_params(BTreeMap::from([(
        "w".to_string(),
        Tensor::from_f32(vec![2], &[v, -v]).unwrap(),
    )]))
}

/// What client `i` returns for `task`: the global model plus `i + 1`, weighted by `10 * (i + 1)`
/// samples, reporting accuracy `i` for the incoming model.
fn train(i: usize, task: &Task) -> FLModel {
    let global = task.data.model.as_ref().unwrap();
    let w = global.params["w"].to_f32_vec();
    let delta = (i + 1) as f32;
    let mut m = FLModel::from_params(BTreeMap::from([(
        "w".to_string(),
        Tensor::from_f32(vec![2], &[w[0] + delta, w[1] - delta]).unwrap(),
    )]));
    m.meta
        .insert(META_NUM_SAMPLES.into(), MetaValue::Int(10 * (i as i64 + 1)));
    m.metrics.insert("accuracy".into(), i as f64);
    m
}

struct Sim {
    ctrl: ScatterGather,
    now: Time,
    /// Pending deliveries: (time, sequence, client index, result).
    queue: Vec<(Time, u64, usize, TaskResult)>,
    seq: u64,
    behaviours: Vec<Behaviour>,
    names: Vec<String>,
    events: Vec<Event>,
    /// The global model each task carried, by task id, to recompute expectations.
    sent: BTreeMap<u64, (usize, Task)>,
    /// Whether to drop a delivery (message loss), decided per delivery from the rng.
    loss: f64,
    rng: ChaCha8Rng,
}

impl Sim {
    fn new(cfg: SagConfig, behaviours: Vec<Behaviour>, seed: u64, loss: f64) -> Sim {
        let names: Vec<String> = (0..behaviours.len())
            .map(|i| format!("site-{}", i + 1))
            .collect();
        let ctrl = ScatterGather::new(cfg, names.clone(), model(0.0)).unwrap();
        Sim {
            ctrl,
            now: Time::ZERO,
            queue: Vec::new(),
            seq: 0,
            behaviours,
            names,
            events: Vec::new(),
            sent: BTreeMap::new(),
            loss,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    fn deliver_later(&mut self, ms: u64, i: usize, r: TaskResult) {
        if self.loss > 0.0 && self.rng.random_bool(self.loss) {
            return;
        }
        self.seq += 1;
        self.queue
            .push((self.now + Duration::from_millis(ms), self.seq, i, r));
    }

    fn drain(&mut self) {
        while let Some(out) = self.ctrl.poll_output() {
            match out {
                Output::Event(e) => {
                    if let Event::RoundAggregated { round, model, .. } = &e
                        && round % 2 == 1
                    {
                        let m = model.in_memory().unwrap();
                        let stored = ModelRef::Stored(Arc::new(StoredModel::from_memory(m)));
                        self.ctrl.replace_global(stored).unwrap();
                    }
                    self.events.push(e)
                }
                Output::Send {
                    to,
                    mut task,
                    model,
                } => {
                    task.data.model = Some(model.load().unwrap());
                    let i = self.names.iter().position(|n| *n == to).unwrap();
                    self.sent.insert(task.id.0, (i, task.clone()));
                    let answer = |data| TaskResult {
                        task_id: task.id,
                        round: task.round,
                        data,
                    };
                    let ok = || {
                        if task.name == task_names::TRAIN {
                            Shareable::with_model(train(i, &task))
                        } else {
                            let mut m = FLModel::default();
                            m.metrics.insert("accuracy".into(), 100.0 + i as f64);
                            Shareable::with_model(m)
                        }
                    };
                    match self.behaviours[i] {
                        Behaviour::Answer { ms } => self.deliver_later(ms, i, answer(ok())),
                        Behaviour::Silent => {}
                        Behaviour::Error { ms } => self.deliver_later(
                            ms,
                            i,
                            answer(Shareable::error(ReturnCode::ExecutionException, "boom")),
                        ),
                        Behaviour::Duplicate { ms } => {
                            self.deliver_later(ms, i, answer(ok()));
                            self.deliver_later(2 * ms, i, answer(ok()));
                        }
                        Behaviour::BadShape { ms } if task.name == task_names::TRAIN => {
                            let mut bad = FLModel::from_params(BTreeMap::from([(
                                "w".to_string(),
                                Tensor::from_f32(vec![3], &[1.0, 2.0, 3.0]).unwrap(),
                            )]));
                            bad.meta.insert(META_NUM_SAMPLES.into(), MetaValue::Int(1));
                            self.deliver_later(ms, i, answer(Shareable::with_model(bad)))
                        }
                        Behaviour::BadShape { ms } => self.deliver_later(ms, i, answer(ok())),
                    }
                }
            }
        }
    }

    /// Runs to completion (or `limit` steps) and returns the events.
    fn run(mut self) -> Vec<Event> {
        self.ctrl.start(self.now);
        self.drain();
        for _ in 0..100_000 {
            if self.ctrl.is_done() {
                break;
            }
            self.queue.sort_by_key(|(t, s, _, _)| (*t, *s));
            let next_delivery = self.queue.first().map(|(t, ..)| *t);
            let timer = self.ctrl.poll_timeout();
            match (next_delivery, timer) {
                (Some(d), Some(t)) if t < d => {
                    self.now = t;
                    self.ctrl.handle_timeout(t);
                }
                (Some(d), _) => {
                    let (t, _, i, r) = self.queue.remove(0);
                    self.now = d.max(t);
                    let name = self.names[i].clone();
                    if i % 2 == 1 {
                        let mut r = r;
                        let model = r
                            .data
                            .model
                            .take()
                            .map(|m| ModelRef::Stored(Arc::new(StoredModel::from_memory(&m))));
                        self.ctrl.handle_result_ref(self.now, &name, r, model);
                    } else {
                        self.ctrl.handle_result(self.now, &name, r);
                    }
                }
                (None, Some(t)) => {
                    self.now = t;
                    self.ctrl.handle_timeout(t);
                }
                (None, None) => break,
            }
            self.drain();
        }
        assert!(self.ctrl.is_done(), "simulation did not terminate");
        check_invariants(&self.events, &self.sent);
        self.events
    }
}

/// Every aggregated model must be the weighted average of the accepted results of that
/// round, no round may be aggregated twice, and the run ends exactly once.
fn check_invariants(events: &[Event], sent: &BTreeMap<u64, (usize, Task)>) {
    let mut aggregated = BTreeSet::new();
    let mut accepted: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for e in events {
        match e {
            Event::ResultAccepted { round, client, .. } => {
                accepted.entry(*round).or_default().push(client.clone())
            }
            Event::RoundAggregated {
                round,
                model,
                accepted: n,
                ..
            } => {
                assert!(aggregated.insert(*round), "round {round} aggregated twice");
                let clients = &accepted[round];
                assert_eq!(clients.len(), *n);
                // Recompute from what each accepted client was sent this round.
                let mut sum = [0.0f64; 2];
                let mut total = 0.0;
                for c in clients {
                    let i: usize = c.trim_start_matches("site-").parse::<usize>().unwrap() - 1;
                    let (_, task) = sent
                        .values()
                        .find(|(j, t)| *j == i && t.round == *round && t.name == "train")
                        .unwrap();
                    let m = train(i, task);
                    let w = 10.0 * (i as f64 + 1.0);
                    let v = m.params["w"].to_f32_vec();
                    sum[0] += w * f64::from(v[0]);
                    sum[1] += w * f64::from(v[1]);
                    total += w;
                }
                let got = model.load().unwrap().params["w"].to_f32_vec();
                for k in 0..2 {
                    let want = sum[k] / total;
                    assert!(
                        (f64::from(got[k]) - want).abs() < 1e-3 * (1.0 + want.abs()),
                        "round {round}: {got:?} vs {want}"
                    );
                }
            }
            _ => {}
        }
    }
    let ends = events
        .iter()
        .filter(|e| matches!(e, Event::Finished { .. } | Event::Aborted { .. }))
        .count();
    assert_eq!(ends, 1, "the run must end exactly once");
}

fn cfg(rounds: u32, min: usize) -> SagConfig {
    SagConfig {
        num_rounds: rounds,
        start_round: 0,
        min_clients: min,
        wait_time_after_min_received: Duration::from_secs(2),
        task_timeout: Duration::from_secs(10),
        validate_final: true,
    }
}

fn count(events: &[Event], f: impl Fn(&Event) -> bool) -> usize {
    events.iter().filter(|e| f(e)).count()
}

fn finished(events: &[Event]) -> bool {
    matches!(events.last(), Some(Event::Finished { .. }))
}

#[test]
fn all_healthy_clients_finish_every_round() {
    let b = vec![Behaviour::Answer { ms: 100 }; 3];
    let ev = Sim::new(cfg(4, 3), b, 1, 0.0).run();
    assert!(finished(&ev));
    assert_eq!(
        count(&ev, |e| matches!(e, Event::RoundAggregated { .. })),
        4
    );
    // Versions 0..=4 are each evaluated once; version 4 by the final validation.
    let versions: Vec<u32> = ev
        .iter()
        .filter_map(|e| match e {
            Event::ModelEvaluated { version, .. } => Some(*version),
            _ => None,
        })
        .collect();
    assert_eq!(versions, vec![0, 1, 2, 3, 4]);
    // Round metrics are the sample-weighted mean of each client's reported accuracy:
    // (10*0 + 20*1 + 30*2) / 60.
    let Some(Event::ModelEvaluated { metrics, .. }) = ev
        .iter()
        .find(|e| matches!(e, Event::ModelEvaluated { .. }))
    else {
        unreachable!()
    };
    assert!((metrics["accuracy"] - 80.0 / 60.0).abs() < 1e-12);
}

#[test]
fn a_silent_client_is_given_up_after_the_timeout() {
    let b = vec![
        Behaviour::Answer { ms: 100 },
        Behaviour::Silent,
        Behaviour::Answer { ms: 200 },
    ];
    let ev = Sim::new(cfg(2, 2), b, 1, 0.0).run();
    assert!(finished(&ev));
    // Min reached at 200 ms, so each round closes 2 s later, before the 10 s timeout; the
    // final validation has no aggregation wait for the silent one either.
    assert_eq!(
        count(&ev, |e| matches!(
            e,
            Event::RoundAggregated { accepted: 2, .. }
        )),
        2
    );
}

#[test]
fn without_a_wait_window_the_timeout_names_the_silent_client() {
    let mut c = cfg(1, 1);
    c.wait_time_after_min_received = Duration::from_secs(60);
    let b = vec![Behaviour::Answer { ms: 100 }, Behaviour::Silent];
    let ev = Sim::new(c, b, 1, 0.0).run();
    assert!(finished(&ev));
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::TimedOut { round: 0, clients } if clients == &["site-2".to_string()]
    )));
}

#[test]
fn a_late_result_is_dropped_in_the_next_round() {
    // site-2 answers after 12 s: after the 10 s timeout of round 0.
    let mut c = cfg(2, 1);
    c.wait_time_after_min_received = Duration::from_secs(30);
    let b = vec![
        Behaviour::Answer { ms: 100 },
        Behaviour::Answer { ms: 12_000 },
    ];
    let ev = Sim::new(c, b, 1, 0.0).run();
    assert!(finished(&ev));
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::ResultDropped { client, reason: DropReason::Late, .. } if client == "site-2"
    )));
    assert_eq!(
        count(&ev, |e| matches!(
            e,
            Event::RoundAggregated { accepted: 1, .. }
        )),
        2
    );
}

#[test]
fn an_error_result_is_excluded_and_logged() {
    let b = vec![
        Behaviour::Answer { ms: 100 },
        Behaviour::Error { ms: 50 },
        Behaviour::Answer { ms: 100 },
    ];
    let ev = Sim::new(cfg(2, 2), b, 1, 0.0).run();
    assert!(finished(&ev));
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::ResultExcluded { client, code: ReturnCode::ExecutionException, reason, .. }
            if client == "site-2" && reason == "boom"
    )));
    assert_eq!(
        count(&ev, |e| matches!(
            e,
            Event::RoundAggregated { accepted: 2, .. }
        )),
        2
    );
}

#[test]
fn a_wrongly_shaped_model_is_excluded() {
    let b = vec![
        Behaviour::Answer { ms: 100 },
        Behaviour::BadShape { ms: 10 },
    ];
    let ev = Sim::new(cfg(1, 1), b, 1, 0.0).run();
    assert!(finished(&ev));
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::ResultExcluded { client, code: ReturnCode::Ok, .. } if client == "site-2"
    )));
}

#[test]
fn duplicates_are_dropped() {
    let b = vec![Behaviour::Duplicate { ms: 100 }, Behaviour::Silent];
    let mut c = cfg(1, 1);
    c.wait_time_after_min_received = Duration::from_secs(5);
    let ev = Sim::new(c, b, 1, 0.0).run();
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::ResultDropped {
            reason: DropReason::Duplicate,
            ..
        }
    )));
    assert_eq!(
        count(&ev, |e| matches!(
            e,
            Event::RoundAggregated { accepted: 1, .. }
        )),
        1
    );
}

#[test]
fn too_few_results_abort_the_run() {
    let b = vec![
        Behaviour::Answer { ms: 100 },
        Behaviour::Error { ms: 100 },
        Behaviour::Silent,
    ];
    let ev = Sim::new(cfg(3, 2), b, 1, 0.0).run();
    assert!(matches!(ev.last(), Some(Event::Aborted { round: 0, .. })));
    assert_eq!(
        count(&ev, |e| matches!(e, Event::RoundAggregated { .. })),
        0
    );
}

#[test]
fn results_after_the_wait_window_miss_the_round() {
    // Min (1) is reached at 100 ms; the window closes at 2.1 s; site-2 answers at 3 s.
    let b = vec![
        Behaviour::Answer { ms: 100 },
        Behaviour::Answer { ms: 3_000 },
    ];
    let ev = Sim::new(cfg(1, 1), b, 1, 0.0).run();
    assert!(finished(&ev));
    assert_eq!(
        count(&ev, |e| matches!(
            e,
            Event::RoundAggregated { accepted: 1, .. }
        )),
        1
    );
}

#[test]
fn configuration_is_checked() {
    use super::scatter_gather::SagConfigError;
    let names = vec!["a".to_string(), "b".to_string()];
    let bad = |c: SagConfig, n: Vec<String>| ScatterGather::new(c, n, model(0.0)).unwrap_err();
    assert_eq!(bad(cfg(0, 1), names.clone()), SagConfigError::NoRounds);
    assert!(matches!(
        bad(cfg(1, 3), names.clone()),
        SagConfigError::MinClients {
            min: 3,
            available: 2
        }
    ));
    let mut c = cfg(1, 1);
    c.task_timeout = Duration::ZERO;
    assert_eq!(bad(c, names.clone()), SagConfigError::NoTimeout);
    assert!(matches!(
        bad(cfg(1, 1), vec!["a".into(), "a".into()]),
        SagConfigError::DuplicateClient(_)
    ));
}

#[test]
fn results_from_strangers_and_after_the_end_are_dropped() {
    let names = vec!["a".to_string()];
    let mut c = ScatterGather::new(cfg(1, 1), names, model(0.0)).unwrap();
    c.start(Time::ZERO);
    let mut task = None;
    while let Some(o) = c.poll_output() {
        if let Output::Send {
            task: mut t, model, ..
        } = o
        {
            t.data.model = Some(model.load().unwrap());
            task = Some(t);
        }
    }
    let task = task.unwrap();
    let r = TaskResult {
        task_id: task.id,
        round: 0,
        data: Shareable::with_model(Arc::new(train(0, &task))),
    };
    c.handle_result(Time::ZERO, "mallory", r.clone());
    assert!(matches!(
        c.poll_output(),
        Some(Output::Event(Event::ResultDropped {
            reason: DropReason::NotAsked,
            ..
        }))
    ));
}

fn behaviour() -> impl Strategy<Value = Behaviour> {
    prop_oneof![
        4 => (1u64..15_000).prop_map(|ms| Behaviour::Answer { ms }),
        1 => Just(Behaviour::Silent),
        1 => (1u64..15_000).prop_map(|ms| Behaviour::Error { ms }),
        1 => (1u64..8_000).prop_map(|ms| Behaviour::Duplicate { ms }),
        1 => (1u64..15_000).prop_map(|ms| Behaviour::BadShape { ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Random mixes of faults and message loss: the run always ends once, every aggregated
    /// model is the weighted mean of that round's accepted results, no round repeats, and an
    /// abort happens only when a round had fewer than `min_clients` accepted results.
    #[test]
    fn random_faults_keep_the_invariants(
        behaviours in prop::collection::vec(behaviour(), 1..7),
        min in 1usize..4,
        rounds in 1u32..5,
        wait_ms in 0u64..5_000,
        seed in any::<u64>(),
        loss in prop_oneof![Just(0.0), 0.0f64..0.3],
    ) {
        let min = min.min(behaviours.len());
        let mut c = cfg(rounds, min);
        c.wait_time_after_min_received = Duration::from_millis(wait_ms);
        let ev = Sim::new(c, behaviours, seed, loss).run();
        let aggregated = count(&ev, |e| matches!(e, Event::RoundAggregated { .. }));
        match ev.last() {
            Some(Event::Finished { .. }) => prop_assert_eq!(aggregated, rounds as usize),
            Some(Event::Aborted { round, .. }) => {
                prop_assert_eq!(aggregated, *round as usize);
                let accepted = count(&ev, |e| matches!(
                    e, Event::ResultAccepted { round: r, .. } if r == round));
                prop_assert!(accepted < min);
            }
            other => prop_assert!(false, "unexpected end {:?}", other),
        }
    }
}

#[test]
fn a_resumed_run_ends_where_the_uninterrupted_one_does() {
    let b = vec![Behaviour::Answer { ms: 100 }; 3];
    let whole = Sim::new(cfg(5, 3), b.clone(), 1, 0.0).run();
    let after: BTreeMap<u32, Arc<FLModel>> = whole
        .iter()
        .filter_map(|e| match e {
            Event::RoundAggregated { round, model, .. } => Some((*round, model.load().unwrap())),
            _ => None,
        })
        .collect();
    let last = |ev: &[Event]| match ev.last() {
        Some(Event::Finished { model }) => model.load().unwrap(),
        other => panic!("no Finished at the end: {other:?}"),
    };
    let evaluated = |ev: &[Event]| -> Vec<(u32, BTreeMap<String, f64>)> {
        ev.iter()
            .filter_map(|e| match e {
                Event::ModelEvaluated { version, metrics } => Some((*version, metrics.clone())),
                _ => None,
            })
            .collect()
    };
    // Interrupted after any number of aggregated rounds (5: only the final validation is
    // left), the resumed run gives the same later versions, metrics and final model.
    for next in 0..=5u32 {
        let mut sim = Sim::new(cfg(5, 3), b.clone(), 1, 0.0);
        let from = match next {
            0 => model(0.0),
            n => (*after[&(n - 1)]).clone(),
        };
        sim.ctrl = ScatterGather::resume(cfg(5, 3), sim.names.clone(), from, next).unwrap();
        let ev = sim.run();
        assert!(finished(&ev), "resumed at {next}");
        assert_eq!(last(&ev).params, last(&whole).params, "resumed at {next}");
        let tail: Vec<_> = evaluated(&whole)
            .into_iter()
            .filter(|(v, _)| *v >= next)
            .collect();
        assert_eq!(evaluated(&ev), tail, "resumed at {next}");
        assert_eq!(
            count(&ev, |e| matches!(e, Event::RoundStarted { .. })),
            (5 - next) as usize
        );
    }
    // A round outside the run is refused.
    let names: Vec<String> = vec!["site-1".into()];
    assert!(ScatterGather::resume(cfg(5, 1), names.clone(), model(0.0), 6).is_err());
    let mut late = cfg(5, 1);
    late.start_round = 3;
    assert!(ScatterGather::resume(late, names, model(0.0), 2).is_err());
}
