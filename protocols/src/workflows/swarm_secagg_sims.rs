//! Deterministic simulations of swarm learning with secure aggregation, on [`SimNet`].
//!
//! The model is three numbers `w`. Client `i` (0-based) trains to `w + (i + 1)·[1, -½, ¼]`
//! with `i + 1` samples and reports `accuracy = w[0]`. After each run:
//! - every live client has `Completed`;
//! - no submission of a training epoch carries anything but a masked input;
//! - every published round model is the old one plus the weighted mean of the updates of
//!   the trainers its aggregator accepted, within the quantization error;
//! - each round is published once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::ccwf::{Action, Epoch, ModelSlot, Outcome, ReportEvent};
use super::ccwf_sim::{KillPoint, RunEnd, SimNet};
use super::swarm::{SwarmClient, SwarmConfig, SwarmMsg};
use crate::model::{DType, FLModel, META_NUM_SAMPLES, MetaValue, Tensor};
use crate::secagg::{MASKED_TENSOR, SecAggArgs};
use crate::shareable::{Shareable, Task, TaskResult, task_names};
use crate::stored::ModelRef;

const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
const STEP: [f64; 3] = [1.0, -0.5, 0.25];
/// Well above the quantization error of these runs (a few 1e-5), well below any update.
const TOLERANCE: f64 = 2e-3;

fn w_of(m: &FLModel) -> Vec<f64> {
    m.params["w"]
        .to_f32_vec()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn w_ref(m: &ModelRef) -> Vec<f64> {
    w_of(&m.load().unwrap())
}

fn index(name: &str) -> usize {
    NAMES.iter().position(|n| *n == name).unwrap()
}

fn learner(me: &str, task: &Task) -> TaskResult {
    let got = task.data.model.as_ref().unwrap();
    let w = w_of(got);
    let k = index(me) as f64 + 1.0;
    let metrics = BTreeMap::from([("accuracy".to_string(), w[0])]);
    let m = if task.name == task_names::TRAIN {
        let v: Vec<f32> = w
            .iter()
            .zip(STEP)
            .map(|(w, s)| (w + k * s) as f32)
            .collect();
        let mut m = FLModel::from_params(BTreeMap::from([(
            "w".to_string(),
            Tensor::from_f32(vec![3], &v).unwrap(),
        )]));
        m.meta
            .insert(META_NUM_SAMPLES.into(), MetaValue::Int(k as i64));
        m.metrics = metrics;
        m
    } else {
        FLModel {
            metrics,
            ..FLModel::default()
        }
    };
    TaskResult {
        task_id: task.id,
        round: task.round,
        data: Shareable::with_model(m),
    }
}

fn cfg(rounds: u32) -> SwarmConfig {
    let all: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    SwarmConfig {
        num_rounds: rounds,
        start_round: 0,
        clients: all.clone(),
        train_clients: all.clone(),
        aggr_clients: all.clone(),
        result_clients: vec!["a".into(), "b".into()],
        min_clients: 2,
        learn_task_timeout: Duration::from_secs(5),
        min_responses_required: 6,
        wait_time_after_min_resps_received: Duration::from_secs(1),
        max_concurrent_submissions: 2,
        max_status_report_interval: Duration::from_secs(30),
        resend_interval: Duration::from_millis(500),
        key_metric: "accuracy".into(),
        seed: 23,
    }
}

fn args(num_shares: f64, threshold: f64) -> SecAggArgs {
    SecAggArgs {
        num_shares,
        reconstruction_threshold: threshold,
        // Sample counts 1..=6 keep weights well above the quantization step.
        max_weight: 10.0,
        stage_timeout: 2.0,
        ..SecAggArgs::default()
    }
}

/// The run's first global model: `w = 0`.
fn initial() -> ModelRef {
    ModelRef::from(FLModel::from_params(BTreeMap::from([(
        "w".to_string(),
        Tensor::from_f32(vec![3], &[0.0, 0.0, 0.0]).unwrap(),
    )])))
}

fn seed_of(name: &str, incarnation: u8) -> [u8; 32] {
    let mut s = [incarnation; 32];
    s[0] = name.as_bytes()[0];
    s
}

/// Client `n` of a secure run, with its first incarnation's seed.
fn secure_client(c: &SwarmConfig, n: &str, sa: SecAggArgs) -> SwarmClient {
    SwarmClient::new(c.clone(), n)
        .unwrap()
        .with_secagg(sa, "job-1", seed_of(n, 0))
        .unwrap()
}

fn net(seed: u64, rounds: u32, sa: SecAggArgs) -> SimNet<SwarmClient> {
    let c = cfg(rounds);
    let c2 = c.clone();
    let mut sim = SimNet::new(seed, &NAMES, move |n| secure_client(&c, n, sa), learner)
        .with_remake(move |n| {
            SwarmClient::joining(c2.clone(), n)
                .unwrap()
                .with_secagg(sa, "job-1", seed_of(n, 1))
                .unwrap()
        });
    sim.inject(0, "a", "server", SwarmMsg::Start, Some(initial()));
    sim
}

/// The checks every run must pass; returns the trainers each round's model took, by round.
fn check(sim: &SimNet<SwarmClient>, rounds: u32) -> BTreeMap<u32, Vec<String>> {
    // Nothing but masked inputs reaches an aggregator in a training epoch.
    for r in sim.actions() {
        if let Action::Send {
            msg: SwarmMsg::Submit { epoch, .. },
            model: Some(m),
            ..
        } = &r.action
            && epoch.round < rounds
        {
            let m = m.load().unwrap();
            let names: Vec<&String> = m.params.keys().collect();
            assert_eq!(
                names,
                vec![MASKED_TENSOR],
                "{} submitted {names:?}",
                r.client
            );
            assert_eq!(m.params[MASKED_TENSOR].dtype(), DType::U32);
        }
    }
    // Published models per round (the Learn of round r carries the base of round r).
    let mut published: BTreeMap<u32, BTreeSet<Vec<u64>>> = BTreeMap::new();
    let bits = |w: Vec<f64>| w.into_iter().map(f64::to_bits).collect::<Vec<u64>>();
    for r in sim.actions() {
        if let Action::Send {
            msg: SwarmMsg::Learn { epoch, .. },
            model: Some(m),
            ..
        } = &r.action
        {
            published
                .entry(epoch.round)
                .or_default()
                .insert(bits(w_ref(m)));
        }
    }
    for (round, ws) in &published {
        assert_eq!(ws.len(), 1, "round {round} forked: {ws:?}");
    }
    let base = |round: u32| -> Vec<f64> {
        published[&round]
            .iter()
            .next()
            .unwrap()
            .iter()
            .map(|b| f64::from_bits(*b))
            .collect()
    };
    let mut took = BTreeMap::new();
    for (i, r) in sim.actions().iter().enumerate() {
        let Action::Report(rep) = &r.action else {
            continue;
        };
        let ReportEvent::Aggregated { accepted, .. } = &rep.event else {
            continue;
        };
        let round = rep.epoch.round;
        if round >= rounds {
            continue;
        }
        let persisted = sim.actions()[i..].iter().find_map(|x| match &x.action {
            Action::Persist {
                slot: ModelSlot::Round(pr),
                model,
            } if x.client == r.client && x.incarnation == r.incarnation && *pr == round => {
                Some(w_ref(model))
            }
            _ => None,
        });
        let Some(got) = persisted else { continue };
        if !published
            .get(&(round + 1))
            .is_some_and(|p| p.contains(&bits(got.clone())))
        {
            continue;
        }
        assert!(
            took.insert(round, accepted.clone()).is_none(),
            "round {round} published twice"
        );
        let (num, den) = accepted.iter().fold((0.0, 0.0), |(n, d), c| {
            let k = index(c) as f64 + 1.0;
            (n + k * k, d + k)
        });
        for (j, (g, b)) in got.iter().zip(base(round)).enumerate() {
            let want = b + STEP[j] * num / den;
            assert!(
                (g - want).abs() < TOLERANCE,
                "round {round} w[{j}]: {g} is not the weighted mean of {accepted:?} from {b} ({want})"
            );
        }
    }
    for round in 0..rounds {
        assert!(took.contains_key(&round), "round {round} never published");
    }
    for n in NAMES {
        if sim.is_alive(n) {
            let outcomes = sim.outcomes(n);
            assert!(
                outcomes
                    .iter()
                    .any(|o| matches!(o, Outcome::Completed { .. })),
                "{n}: {outcomes:?}"
            );
        }
    }
    took
}

fn aggregator_of(round: u32, attempt: u32) -> String {
    cfg(4).aggregator(Epoch::new(round, attempt)).to_string()
}

#[test]
fn a_healthy_secure_swarm_gives_every_round_the_weighted_mean() {
    let mut sim = net(1, 4, args(4.0, 3.0));
    assert_eq!(sim.run_until_done(120_000), RunEnd::AllDone);
    let took = check(&sim, 4);
    for (round, accepted) in took {
        assert_eq!(accepted.len(), 6, "round {round}: {accepted:?}");
    }
    // Each round the aggregator sent key stages to every trainer.
    let setups = sim
        .actions()
        .iter()
        .filter(|r| {
            matches!(
                &r.action,
                Action::Send {
                    msg: SwarmMsg::SecAggToClient {
                        msg: crate::secagg::ToClient::Setup { .. },
                        ..
                    },
                    ..
                }
            )
        })
        .count();
    // Five of six per round go out; the aggregator's own goes through its inbox.
    assert_eq!(setups, 4 * 5);
}

/// A trainer that is not round 1's aggregator, dying at its submission.
fn dies_at_submit(seed: u64, victims: Vec<String>, point: KillPoint) -> SimNet<SwarmClient> {
    net(seed, 4, args(4.0, 3.0)).with_kill_when(move |who, a| match a {
        Action::Send {
            msg: SwarmMsg::Submit { epoch, .. },
            ..
        } if epoch.round == 1 && victims.iter().any(|v| v == who) => point,
        _ => KillPoint::None,
    })
}

fn not_aggregating(round: u32, n: usize) -> Vec<String> {
    NAMES
        .iter()
        .filter(|x| **x != aggregator_of(round, 0) && **x != aggregator_of(round, 1))
        .take(n)
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn a_trainer_that_dies_before_its_upload_is_left_out_and_its_masks_removed() {
    let victim = not_aggregating(1, 1);
    let mut sim = dies_at_submit(2, victim.clone(), KillPoint::Before);
    assert_eq!(sim.run_until_done(300_000), RunEnd::AllDone);
    assert_eq!(sim.kills().len(), 1);
    let took = check(&sim, 4);
    assert!(!took[&1].contains(&victim[0]), "{took:?}");
    assert_eq!(took[&1].len(), 5);
}

#[test]
fn a_trainer_that_dies_after_its_upload_is_still_in_the_sum() {
    let victim = not_aggregating(1, 1);
    let mut sim = dies_at_submit(3, victim.clone(), KillPoint::After);
    assert_eq!(sim.run_until_done(300_000), RunEnd::AllDone);
    let took = check(&sim, 4);
    assert!(took[&1].contains(&victim[0]), "{took:?}");
    // Later rounds go on without it.
    assert!(!took[&2].contains(&victim[0]), "{took:?}");
}

#[test]
fn too_few_uploads_abort_the_secure_round_and_the_next_attempt_aggregates() {
    // 5-of-6 shares: two trainers gone leave four inputs, too few to hide each one; the
    // next attempt runs among the four left, 4-of-4.
    let victims = not_aggregating(1, 2);
    let mut sim = net(4, 4, args(1.0, 0.8)).with_kill_when({
        let victims = victims.clone();
        move |who, a| match a {
            Action::Send {
                msg: SwarmMsg::Submit { epoch, .. },
                ..
            } if epoch.round == 1 && victims.iter().any(|v| v == who) => KillPoint::Before,
            _ => KillPoint::None,
        }
    });
    assert_eq!(sim.run_until_done(300_000), RunEnd::AllDone);
    let took = check(&sim, 4);
    assert_eq!(took[&1].len(), 4, "{took:?}");
    let retried: Vec<&ReportEvent> = sim
        .reports()
        .iter()
        .map(|r| &r.report.event)
        .filter(|e| matches!(e, ReportEvent::Retried { .. }))
        .collect();
    assert_eq!(retried.len(), 1, "{retried:?}");
    let ReportEvent::Retried { reason, .. } = retried[0] else {
        unreachable!()
    };
    assert!(reason.contains("masked inputs arrived"), "{reason}");
}

#[test]
fn too_few_trainers_for_the_threshold_fail_the_run_with_the_reason() {
    // min_clients 2 but a threshold of 5 shares: with one of five trainers gone for good no
    // attempt can unmask, and the run fails instead of retrying for ever.
    let mut c = cfg(3);
    c.clients.truncate(5);
    c.train_clients.truncate(5);
    c.aggr_clients.truncate(5);
    let sa = args(1.0, 5.0);
    let victim = NAMES[..5]
        .iter()
        .find(|n| **n != c.aggregator(Epoch::new(1, 0)))
        .unwrap()
        .to_string();
    let mut sim = SimNet::new(5, &NAMES[..5], move |n| secure_client(&c, n, sa), learner)
        .with_kill_when(move |who, a| match a {
            Action::Send {
                msg: SwarmMsg::Submit { epoch, .. },
                ..
            } if epoch.round == 1 && who == victim => KillPoint::Before,
            _ => KillPoint::None,
        });
    sim.inject(0, "a", "server", SwarmMsg::Start, Some(initial()));
    sim.run_until_done(600_000);
    let failed: Vec<Outcome> = NAMES[..5]
        .iter()
        .filter(|n| sim.is_alive(n))
        .flat_map(|n| sim.outcomes(n))
        .collect();
    assert!(!failed.is_empty());
    for o in failed {
        let Outcome::Failed { reason } = o else {
            panic!("{o:?}")
        };
        assert!(reason.contains("secure aggregation"), "{reason}");
    }
}

#[test]
fn loss_duplicates_and_reordering_over_many_seeds() {
    for seed in 0..60 {
        let mut sim = net(100 + seed, 3, args(4.0, 3.0))
            .with_drop(0.05)
            .with_dup(0.1)
            .with_delay_ms(1, 80)
            .with_task_ms(50, 400);
        let end = sim.run_until_done(600_000);
        assert_eq!(end, RunEnd::AllDone, "seed {seed}");
        check(&sim, 3);
    }
}

#[test]
fn a_restarted_site_rejoins_with_fresh_keys() {
    let mut sim = net(6, 5, args(4.0, 3.0)).with_task_ms(300, 400);
    sim.kill("c", 150).restart("c", 1_000);
    assert_eq!(sim.run_until_done(300_000), RunEnd::AllDone);
    let took = check(&sim, 5);
    assert!(took[&4].contains(&"c".to_string()), "{took:?}");
}

mod fuzz {
    use std::collections::VecDeque;

    use proptest::prelude::*;

    use super::*;
    use crate::codec::{decode, encode};
    use crate::time::Time;
    use crate::workflows::ccwf::{ClientWorkflow, Input};

    /// Drives the six clients in lockstep: messages in order, tasks answered at once, and
    /// the clock moved on only when nothing is in flight. The `n`-th SecAgg+ message (in
    /// sending order) whose number is in `hits` gets `flips` of its encoded bytes changed;
    /// if it no longer decodes it is lost.
    fn run(hits: &BTreeSet<usize>, flips: &[(usize, u8)]) -> (usize, bool) {
        let sa = args(4.0, 3.0);
        let mut clients: BTreeMap<String, SwarmClient> = NAMES
            .iter()
            .map(|n| (n.to_string(), secure_client(&cfg(2), n, sa)))
            .collect();
        let mut queue: VecDeque<(String, Input<SwarmMsg>)> = VecDeque::new();
        queue.push_back((
            "a".into(),
            Input::Message {
                from: "server".into(),
                msg: SwarmMsg::Start,
                model: Some(initial()),
            },
        ));
        let (mut now, mut secagg_msgs, mut steps) = (Time::ZERO, 0usize, 0usize);
        while steps < 20_000 && !clients.values().all(|c| c.is_done()) {
            steps += 1;
            match queue.pop_front() {
                Some((to, input)) => {
                    if let Some(c) = clients.get_mut(&to) {
                        c.handle(now, input);
                    }
                }
                None => {
                    now = now + Duration::from_millis(250);
                    for c in clients.values_mut() {
                        c.handle_timeout(now);
                    }
                }
            }
            for (name, c) in &mut clients {
                while let Some(a) = c.poll_action() {
                    match a {
                        Action::Send { to, msg, model } => {
                            let msg = if matches!(
                                msg,
                                SwarmMsg::SecAggToClient { .. }
                                    | SwarmMsg::SecAggToAggregator { .. }
                            ) {
                                secagg_msgs += 1;
                                if hits.contains(&secagg_msgs) {
                                    let mut bytes = encode(&msg, 1 << 20).unwrap();
                                    for (at, x) in flips {
                                        let i = at % bytes.len();
                                        bytes[i] ^= x | 1;
                                    }
                                    match decode::<SwarmMsg>(&bytes, 1 << 20) {
                                        Ok(m) => m,
                                        Err(_) => continue,
                                    }
                                } else {
                                    msg
                                }
                            } else {
                                msg
                            };
                            let from = name.clone();
                            queue.push_back((to, Input::Message { from, msg, model }));
                        }
                        Action::RunTask { task, model } => {
                            let mut task = task;
                            task.data.model = model.map(|m| m.load().unwrap());
                            let r = learner(name, &task);
                            queue.push_back((name.clone(), Input::TaskDone(r, None)));
                        }
                        _ => {}
                    }
                }
            }
        }
        let completed = clients.values().all(|c| c.is_done() && c.best().is_some());
        (secagg_msgs, completed)
    }

    #[test]
    fn the_lockstep_driver_runs_a_clean_secure_swarm_to_the_end() {
        // The harness itself: with nothing corrupted the run ends, having sent SecAgg+
        // messages for the fuzz cases to hit.
        let (sent, completed) = run(&BTreeSet::new(), &[]);
        assert!(completed);
        assert!(sent > 50, "{sent}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any SecAgg+ message, its bytes changed at random, never panics a client.
        #[test]
        fn corrupted_secagg_messages_never_panic(
            hits in prop::collection::btree_set(1usize..120, 1..6),
            flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        ) {
            run(&hits, &flips);
        }
    }
}

mod dp {
    use super::*;
    use crate::aggregators::{Aggregator, AggregatorSpec, METRIC_EPSILON};
    use crate::dp::{AdaptiveClipping, Clipping, DpSpec, NoiseSeed};

    fn spec(adaptive: bool, seed: u8) -> DpSpec {
        DpSpec {
            noise_multiplier: 0.5,
            clipping: if adaptive {
                Clipping::Adaptive(AdaptiveClipping {
                    initial_norm: 3.0,
                    ..AdaptiveClipping::DEFAULT
                })
            } else {
                // Sites 1 and 2 (norms 1.15, 2.29) within, the rest clipped.
                Clipping::Fixed { norm: 2.5 }
            },
            target_delta: 1e-5,
            noise_seed: NoiseSeed([seed; 32]),
        }
    }

    /// The final model and the ε of each round's model, from a healthy run.
    fn run(adaptive: bool, secure: bool, seed: u8) -> (Vec<f64>, Vec<f64>) {
        let c = cfg(3);
        let agg = Aggregator::new(AggregatorSpec {
            dp: Some(spec(adaptive, seed)),
            ..AggregatorSpec::default()
        });
        let sa = args(4.0, 3.0);
        let mut sim = SimNet::new(
            9,
            &NAMES,
            move |n| {
                let c = SwarmClient::new(c.clone(), n)
                    .unwrap()
                    .with_aggregator(agg.clone());
                if secure {
                    c.with_secagg(sa, "job-1", seed_of(n, 0)).unwrap()
                } else {
                    c
                }
            },
            learner,
        );
        sim.inject(0, "a", "server", SwarmMsg::Start, Some(initial()));
        assert_eq!(sim.run_until_done(120_000), RunEnd::AllDone);
        let finals: Vec<Vec<f64>> = sim
            .persisted("a")
            .iter()
            .filter(|(s, _)| *s == ModelSlot::Final)
            .map(|(_, m)| w_ref(m))
            .collect();
        let mut eps = Vec::new();
        for r in sim.reports() {
            if let ReportEvent::Aggregated {
                metrics, accepted, ..
            } = &r.report.event
            {
                assert_eq!(accepted.len(), 6, "a healthy run takes everyone");
                if let Some(e) = metrics.get(METRIC_EPSILON) {
                    eps.push(*e);
                }
            }
        }
        (finals[0].clone(), eps)
    }

    /// DP-FedAvg under secure aggregation is the same mechanism: the sites clip, the
    /// aggregator adds the same noise once to the unmasked mean, and the accountant spends the
    /// same ε. With one noise seed both runs end on the same model, within the quantization
    /// error, while the noise itself (z·C/m ≈ 0.2 per value) is far larger.
    #[test]
    fn dp_fedavg_under_secure_aggregation_matches_plain_dp_fedavg() {
        for adaptive in [false, true] {
            let (plain, eps_plain) = run(adaptive, false, 7);
            let (secure, eps_secure) = run(adaptive, true, 7);
            for (a, b) in plain.iter().zip(&secure) {
                assert!(
                    (a - b).abs() < TOLERANCE,
                    "adaptive {adaptive}: {plain:?} vs {secure:?}"
                );
            }
            assert_eq!(eps_plain.len(), 3, "{eps_plain:?}");
            assert_eq!(eps_plain, eps_secure);
            // The match is the noise's: another seed's noise ends elsewhere.
            let (other, _) = run(adaptive, true, 8);
            let apart = other
                .iter()
                .zip(&secure)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(apart > 50.0 * TOLERANCE, "{other:?} vs {secure:?}");
        }
    }
}
