//! Deterministic simulations of swarm learning with injected faults, on [`SimNet`].
//!
//! The model is one number `w`. Client `i` (0-based) trains to `w + i + 1` with weight
//! `i + 1` and reports `accuracy = w`, so every aggregate can be recomputed. After each run:
//! - the run finishes: every live client has `Completed` (once per incarnation);
//! - no fork: for every round, all `Learn`s sent carry the same model;
//! - every published round model is the FedAvg of the results its aggregator accepted,
//!   computed from the round's published base;
//! - every live result client persisted the final model, equal to the published last one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::ccwf::{Action, ClientWorkflow, Epoch, Input, ModelSlot, Outcome, ReportEvent};
use super::ccwf_sim::{KillPoint, RunEnd, SimNet};
use super::swarm::{SwarmClient, SwarmConfig, SwarmMsg};
use crate::model::{FLModel, META_NUM_SAMPLES, MetaValue, Tensor};
use crate::shareable::{Shareable, Task, TaskResult, task_names};
use crate::stored::ModelRef;
use crate::time::Time;

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

fn w_of(m: &FLModel) -> f64 {
    f64::from(m.params["w"].to_f32_vec()[0])
}

fn w_ref(m: &ModelRef) -> f64 {
    w_of(&m.load().unwrap())
}

fn index(name: &str) -> usize {
    NAMES.iter().position(|n| *n == name).unwrap()
}

fn learner(me: &str, task: &Task) -> TaskResult {
    let got = task.data.model.as_ref().unwrap();
    let w = w_of(got);
    let i = index(me);
    let metrics = BTreeMap::from([("accuracy".to_string(), w)]);
    let m = if task.name == task_names::TRAIN {
        let mut m = FLModel::from_params(BTreeMap::from([(
            "w".to_string(),
            Tensor::from_f32(vec![1], &[(w + i as f64 + 1.0) as f32]).unwrap(),
        )]));
        m.meta
            .insert(META_NUM_SAMPLES.into(), MetaValue::Int(i as i64 + 1));
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
        min_responses_required: 4,
        wait_time_after_min_resps_received: Duration::from_secs(1),
        max_concurrent_submissions: 2,
        max_status_report_interval: Duration::from_secs(30),
        resend_interval: Duration::from_millis(500),
        key_metric: "accuracy".into(),
        seed: 11,
    }
}

fn net(seed: u64, rounds: u32) -> SimNet<SwarmClient> {
    let c = cfg(rounds);
    let c2 = c.clone();
    let mut sim = SimNet::new(
        seed,
        &NAMES,
        move |n| SwarmClient::new(c.clone(), n).unwrap(),
        learner,
    )
    .with_remake(move |n| SwarmClient::joining(c2.clone(), n).unwrap());
    let initial = FLModel::from_params(BTreeMap::from([(
        "w".to_string(),
        Tensor::from_f32(vec![1], &[0.0]).unwrap(),
    )]));
    sim.inject(
        0,
        "a",
        "server",
        SwarmMsg::Start,
        Some(ModelRef::from(initial)),
    );
    sim
}

/// The checks every run must pass; returns the final `w`.
fn check(sim: &SimNet<SwarmClient>, rounds: u32) -> f64 {
    // Published models per round (the Learn of round r carries the base of round r).
    let mut published: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
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
                .insert(w_ref(m).to_bits());
        }
    }
    for (round, ws) in &published {
        assert_eq!(ws.len(), 1, "round {round} forked: {ws:?}");
    }
    let base = |round: u32| f64::from_bits(*published[&round].iter().next().unwrap());
    // Every aggregation whose model was published is the FedAvg of what it accepted.
    let mut aggregated_rounds = BTreeMap::new();
    for (i, r) in sim.actions().iter().enumerate() {
        let Action::Report(rep) = &r.action else {
            continue;
        };
        let ReportEvent::Aggregated { accepted, .. } = &rep.event else {
            continue;
        };
        let round = rep.epoch.round;
        if round >= rounds {
            continue; // the validation epoch
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
        let Some(next) = published.get(&(round + 1)) else {
            continue; // died before publishing
        };
        if !next.contains(&got.to_bits()) {
            continue; // never published
        }
        *aggregated_rounds.entry(round).or_insert(0) += 1;
        let (num, den) = accepted.iter().fold((0.0, 0.0), |(n, d), c| {
            let k = index(c) as f64 + 1.0;
            (n + k * k, d + k)
        });
        let want = base(round) + num / den;
        assert!(
            (got - want).abs() < 1e-4,
            "round {round}: {got} is not FedAvg of {accepted:?} from {}",
            base(round)
        );
    }
    for round in 0..rounds {
        assert_eq!(
            aggregated_rounds.get(&round),
            Some(&1),
            "round {round} published {:?} times",
            aggregated_rounds.get(&round)
        );
    }
    let last = base(rounds);
    for n in NAMES {
        if !sim.is_alive(n) {
            continue;
        }
        let outcomes = sim.outcomes(n);
        assert!(
            outcomes
                .iter()
                .any(|o| matches!(o, Outcome::Completed { .. })),
            "{n}: {outcomes:?}"
        );
        if ["a", "b"].contains(&n) {
            let finals: Vec<f64> = sim
                .persisted(n)
                .iter()
                .filter(|(s, _)| *s == ModelSlot::Final)
                .map(|(_, m)| w_ref(m))
                .collect();
            assert!(!finals.is_empty(), "{n} has no final model");
            assert!(
                finals.iter().all(|w| (*w - last).abs() < 1e-6),
                "{n}: {finals:?} vs {last}"
            );
        }
    }
    last
}

#[test]
fn a_healthy_swarm_aggregates_every_round_once() {
    let mut sim = net(1, 5);
    assert_eq!(sim.run_until_done(120_000), RunEnd::AllDone);
    // Let the best model, sent as the run ends, arrive.
    sim.run_until(200_000);
    let w = check(&sim, 5);
    // Every round adds sum(k^2)/sum(k) = 30/10 = 3.
    assert!((w - 15.0).abs() < 1e-4, "{w}");
    // The best model is the last one (accuracy = w grows), and a result client has it.
    let best: Vec<f64> = sim
        .persisted("a")
        .iter()
        .filter(|(s, _)| *s == ModelSlot::Best)
        .map(|(_, m)| w_ref(m))
        .collect();
    assert_eq!(best, vec![15.0]);
}

fn aggregator_of(round: u32) -> String {
    cfg(5)
        .aggregator(super::ccwf::Epoch::new(round, 0))
        .to_string()
}

fn dies_on_persist(round: u32, point: KillPoint) -> SimNet<SwarmClient> {
    let victim = aggregator_of(round);
    net(2, 5).with_kill_when(move |who, a| match a {
        Action::Persist {
            slot: ModelSlot::Round(r),
            ..
        } if *r == round && who == victim => point,
        _ => KillPoint::None,
    })
}

#[test]
fn the_aggregator_dies_before_aggregating() {
    let mut sim = dies_on_persist(2, KillPoint::Before);
    assert_eq!(sim.run_until_done(300_000), RunEnd::AllDone);
    assert_eq!(sim.kills().len(), 1);
    check(&sim, 5);
    assert!(sim.reports().iter().any(|r| matches!(
        &r.report.event,
        ReportEvent::Reelected { previous, .. } if *previous == aggregator_of(2)
    )));
}

#[test]
fn the_aggregator_dies_after_aggregating() {
    let mut sim = dies_on_persist(3, KillPoint::After);
    assert_eq!(sim.run_until_done(300_000), RunEnd::AllDone);
    assert_eq!(sim.kills().len(), 1);
    check(&sim, 5);
}

#[test]
fn a_trainer_dies_before_and_one_after_submitting() {
    for point in [KillPoint::Before, KillPoint::After] {
        // A trainer that is not the aggregator of round 1.
        let victim = NAMES
            .iter()
            .find(|n| **n != aggregator_of(1))
            .unwrap()
            .to_string();
        let mut sim = net(3, 5).with_kill_when(move |who, a| match a {
            Action::Send {
                msg: SwarmMsg::Submit { epoch, .. },
                ..
            } if epoch.round == 1 && who == victim => point,
            _ => KillPoint::None,
        });
        assert_eq!(sim.run_until_done(300_000), RunEnd::AllDone, "{point:?}");
        check(&sim, 5);
    }
}

#[test]
fn a_restarted_site_rejoins_at_the_current_round() {
    let mut sim = net(4, 8).with_task_ms(300, 400);
    sim.kill("c", 150).restart("c", 1_000);
    assert_eq!(sim.run_until_done(300_000), RunEnd::AllDone);
    check(&sim, 8);
    // The new incarnation of c trained again.
    assert!(sim.actions().iter().any(|r| r.client == "c"
        && r.incarnation == 1
        && matches!(r.action, Action::RunTask { .. })));
}

#[test]
fn the_server_away_changes_nothing_and_its_reports_arrive_later() {
    let mut sim = net(5, 5);
    sim.server_away(100, 600);
    assert_eq!(sim.run_until_done(300_000), RunEnd::AllDone);
    sim.run_until(300_000);
    check(&sim, 5);
    let away = Duration::from_millis(600);
    let late = sim
        .reports()
        .iter()
        .filter(|r| r.emitted.since_epoch() < away && r.delivered.since_epoch() >= away)
        .count();
    assert!(late > 0, "reports emitted while away are delivered after");
}

#[test]
fn loss_duplicates_and_reordering_over_many_seeds() {
    for seed in 0..150 {
        let mut sim = net(seed, 4)
            .with_drop(0.1)
            .with_dup(0.1)
            .with_delay_ms(1, 80)
            .with_task_ms(50, 400);
        let end = sim.run_until_done(600_000);
        assert_eq!(end, RunEnd::AllDone, "seed {seed}");
        check(&sim, 4);
    }
}

#[test]
fn a_random_aggregator_death_over_many_seeds() {
    for seed in 0..60 {
        let round = (seed % 4) as u32;
        let point = if seed % 2 == 0 {
            KillPoint::Before
        } else {
            KillPoint::After
        };
        let victim = aggregator_of(round);
        let mut sim = net(seed, 4)
            .with_drop(0.05)
            .with_delay_ms(1, 50)
            .with_kill_when(move |who, a| match a {
                Action::Persist {
                    slot: ModelSlot::Round(r),
                    ..
                } if *r == round && who == victim => point,
                _ => KillPoint::None,
            });
        assert_eq!(sim.run_until_done(600_000), RunEnd::AllDone, "seed {seed}");
        check(&sim, 4);
    }
}

#[test]
fn too_few_results_fail_the_run_for_everyone() {
    let mut sim = net(6, 5);
    sim.kill("b", 50).kill("c", 50).kill("d", 50);
    sim.run_until_done(300_000);
    let outcomes = sim.outcomes("a");
    assert!(
        matches!(outcomes.as_slice(), [Outcome::Failed { reason }] if reason.contains("min_clients")),
        "{outcomes:?}"
    );
}

mod hostile {
    use proptest::prelude::*;

    use super::*;
    use crate::codec::decode;
    use crate::time::Time;
    use crate::workflows::ccwf::{ClientWorkflow, Epoch, Input};

    fn msg(kind: u8, round: u32, attempt: u32) -> SwarmMsg {
        let epoch = Epoch::new(round, attempt);
        match kind % 8 {
            0 => SwarmMsg::Start,
            1 => SwarmMsg::Learn {
                epoch,
                members: vec!["zz".into()],
                best: None,
                validate_only: attempt % 2 == 0,
            },
            2 => SwarmMsg::Ready { epoch },
            3 => SwarmMsg::Grant { epoch },
            4 => SwarmMsg::Submit {
                epoch,
                return_code: crate::shareable::ReturnCode::Ok,
                reason: None,
            },
            5 => SwarmMsg::Sync { epoch: Some(epoch) },
            6 => SwarmMsg::Done { epoch, best: None },
            _ => SwarmMsg::Abort {
                reason: String::new(),
            },
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random bytes never decode into a panic.
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<SwarmMsg>(&bytes, 1 << 20);
        }

        /// Messages from strangers, for any epoch, with a model of the wrong shape or none,
        /// never panic a client, and a stranger's result is never aggregated.
        #[test]
        fn nonsense_messages_never_panic(
            steps in prop::collection::vec((any::<u8>(), 0u32..8, 0u32..4, any::<bool>(), 0usize..5), 1..40)
        ) {
            let mut c = SwarmClient::new(cfg(3), "a").unwrap();
            let odd = ModelRef::from(FLModel::from_params(BTreeMap::from([(
                "v".to_string(),
                Tensor::from_f32(vec![2], &[1.0, f32::NAN]).unwrap(),
            )])));
            for (i, (kind, round, attempt, with_model, from)) in steps.into_iter().enumerate() {
                let from = ["b", "c", "d", "stranger", ""][from].to_string();
                let model = with_model.then(|| odd.clone());
                let now = Time::from_millis(i as u64 * 300);
                c.handle(now, Input::Message { from, msg: msg(kind, round, attempt), model });
                c.handle_timeout(now);
                while let Some(a) = c.poll_action() {
                    if let Action::Report(r) = a
                        && let ReportEvent::Aggregated { accepted, .. } = r.event
                    {
                        prop_assert!(!accepted.contains(&"stranger".to_string()));
                    }
                }
            }
        }
    }
}

/// A trainer's `Ready` that reaches the next round's aggregator before the `Learn` that opens
/// the round is taken up as soon as that `Learn` arrives: the trainer is granted at once
/// instead of after its resend interval.
#[test]
fn an_early_ready_is_granted_when_the_round_opens() {
    let c = cfg(3);
    // A seed whose round 0 and round 1 have different aggregators.
    let (c, a0, a1) = (0..64u64)
        .find_map(|seed| {
            let c = SwarmConfig { seed, ..c.clone() };
            let a0 = c.aggregator(Epoch::new(0, 0)).to_string();
            let a1 = c.aggregator(Epoch::new(1, 0)).to_string();
            (a0 != a1).then_some((c, a0, a1))
        })
        .unwrap();
    let trainer = NAMES.iter().find(|n| **n != a0 && **n != a1).unwrap();
    let mut x = SwarmClient::new(c.clone(), &a1).unwrap();
    let model = ModelRef::from(FLModel::from_params(BTreeMap::from([(
        "w".to_string(),
        Tensor::from_f32(vec![1], &[0.0]).unwrap(),
    )])));
    let members: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    let learn = |round| SwarmMsg::Learn {
        epoch: Epoch::new(round, 0),
        members: members.clone(),
        best: None,
        validate_only: false,
    };
    let t = Time::from_millis(10);
    x.handle(
        t,
        Input::Message {
            from: a0.clone(),
            msg: learn(0),
            model: Some(model.clone()),
        },
    );
    while x.poll_action().is_some() {}
    let ready = SwarmMsg::Ready {
        epoch: Epoch::new(1, 0),
    };
    x.handle(
        t,
        Input::Message {
            from: trainer.to_string(),
            msg: ready,
            model: None,
        },
    );
    let granted = |x: &mut SwarmClient| {
        std::iter::from_fn(|| x.poll_action()).any(|a| {
            matches!(a, Action::Send { to, msg: SwarmMsg::Grant { epoch }, .. }
                if to == *trainer && epoch == Epoch::new(1, 0))
        })
    };
    assert!(!granted(&mut x), "granted before the round opened");
    x.handle(
        t,
        Input::Message {
            from: a0.clone(),
            msg: learn(1),
            model: Some(model),
        },
    );
    assert!(granted(&mut x), "the early Ready was not taken up");
}
