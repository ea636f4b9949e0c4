//! Deterministic simulations of the cyclic workflow with injected faults, on [`SimNet`].
//!
//! The learner appends `hop:client` to a `path` string in the model's metadata, so every
//! model spells out the lineage of trainings behind it. The checks after every run:
//! - a hop is trained only by the client it names, at most once per incarnation of it;
//! - no two models that left a client (sent or persisted) claim different lineages for the
//!   same hop;
//! - the final model's lineage is one chain: its hops grow, each names its trainer, and each
//!   training started from exactly the model the chain had up to there;
//! - every live result client persisted the same final model once, every live client
//!   finished once with `Completed`, and no incarnation reported a hop twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::ccwf::{Action, ModelSlot, Outcome, ReportEvent};
use super::ccwf_sim::{KillPoint, RunEnd, SimNet};
use super::cyclic::{CyclicClient, CyclicConfig, CyclicMsg, CyclicOrder};
use crate::model::{FLModel, MetaValue, Tensor};
use crate::shareable::{ReturnCode, Shareable, Task, TaskResult};
use crate::stored::ModelRef;

fn path_of(m: &ModelRef) -> String {
    match m.meta().get("path") {
        Some(MetaValue::Text(s)) => s.clone(),
        _ => String::new(),
    }
}

/// The final models `name` persisted, in order.
fn finals_of(net: &SimNet<CyclicClient>, name: &str) -> Vec<(ModelSlot, ModelRef)> {
    net.persisted(name)
        .into_iter()
        .filter(|(s, _)| *s == ModelSlot::Final)
        .collect()
}

fn entries(path: &str) -> Vec<(u32, String)> {
    path.split(',')
        .filter(|s| !s.is_empty())
        .map(|e| {
            let (h, c) = e.split_once(':').unwrap();
            (h.parse().unwrap(), c.to_string())
        })
        .collect()
}

fn initial() -> ModelRef {
    ModelRef::from(FLModel::from_params(BTreeMap::from([(
        "w".to_string(),
        Tensor::from_f32(vec![1], &[0.0]).unwrap(),
    )])))
}

/// Trains: appends `hop:me` to the path, adds one to `w`, and reports as `hops` the length
/// of the lineage it received.
fn learner(me: &str, task: &Task) -> TaskResult {
    let got = task.data.model.as_ref().unwrap();
    let path = path_of(&ModelRef::Memory(Arc::clone(got)));
    let mut m = (**got).clone();
    let w = m.params["w"].to_f32_vec()[0];
    m.params
        .insert("w".into(), Tensor::from_f32(vec![1], &[w + 1.0]).unwrap());
    let sep = if path.is_empty() { "" } else { "," };
    m.meta.insert(
        "path".into(),
        MetaValue::Text(format!("{path}{sep}{}:{me}", task.id.0)),
    );
    m.metrics = BTreeMap::from([("hops".to_string(), entries(&path).len() as f64)]);
    TaskResult {
        task_id: task.id,
        round: task.round,
        data: Shareable::with_model(m),
    }
}

fn cfg(names: &[&str], rounds: u32, order: CyclicOrder) -> CyclicConfig {
    CyclicConfig {
        num_rounds: rounds,
        order,
        clients: names.iter().map(|s| s.to_string()).collect(),
        learn_task_ack_timeout: 1.0,
        learn_task_timeout: 20.0,
        progress_timeout: 60.0,
        max_status_report_interval: 30.0,
        seed: 42,
        ..CyclicConfig::default()
    }
}

fn sim(seed: u64, cfg: &CyclicConfig) -> SimNet<CyclicClient> {
    let names: Vec<&str> = cfg.clients.iter().map(String::as_str).collect();
    let start = cfg
        .starting_client
        .clone()
        .unwrap_or_else(|| cfg.clients[0].clone());
    let (c1, c2, s1) = (cfg.clone(), cfg.clone(), start.clone());
    let mut net = SimNet::new(
        seed,
        &names,
        move |me| CyclicClient::new(c1.clone(), me, (me == s1).then(initial)).unwrap(),
        learner,
    )
    .with_remake(move |me| CyclicClient::joining(c2.clone(), me).unwrap())
    .with_task_ms(500, 1500)
    .with_delay_ms(5, 50);
    net.inject(0, &start, "server", CyclicMsg::Start, None);
    net
}

fn run(net: &mut SimNet<CyclicClient>) {
    assert_eq!(net.run_until_done(3_600_000), RunEnd::AllDone);
}

/// Checks the invariants of the module documentation; returns the final lineage.
fn check(net: &SimNet<CyclicClient>, cfg: &CyclicConfig) -> Vec<(u32, String)> {
    let probe = CyclicClient::new(cfg.clone(), &cfg.clients[0], None).unwrap();
    // Every hop trained only by its owner, at most once per incarnation.
    let mut trained: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    let mut once = BTreeSet::new();
    // Every model that left a client (sent or persisted) claims its whole lineage: no two
    // claim different models for the same hop.
    let mut claims: BTreeMap<u32, String> = BTreeMap::new();
    for r in net.actions() {
        let claimed = match &r.action {
            Action::RunTask { task: t, model } => {
                let hop = t.id.0 as u32;
                assert_eq!(
                    probe.hop_owner(hop).1,
                    r.client,
                    "hop {hop} trained by its owner"
                );
                assert!(
                    once.insert((r.client.clone(), r.incarnation, hop)),
                    "{}#{} trained hop {hop} twice",
                    r.client,
                    r.incarnation
                );
                let input = path_of(model.as_ref().unwrap());
                trained.entry(hop).or_default().insert(input);
                None
            }
            Action::Send { model: Some(m), .. } => Some(path_of(m)),
            Action::Persist { model, .. } => Some(path_of(model)),
            _ => None,
        };
        if let Some(path) = claimed {
            let chain = entries(&path);
            for k in 0..chain.len() {
                let prefix: Vec<String> = chain[..=k]
                    .iter()
                    .map(|(h, c)| format!("{h}:{c}"))
                    .collect();
                let prefix = prefix.join(",");
                let prev = claims.entry(chain[k].0).or_insert_with(|| prefix.clone());
                assert_eq!(*prev, prefix, "two models claimed for hop {}", chain[k].0);
            }
        }
    }
    // Live result clients persisted one and the same final model.
    let results: Vec<String> = if cfg.result_clients.is_empty() {
        cfg.clients.clone()
    } else {
        cfg.result_clients.clone()
    };
    let mut finals = BTreeSet::new();
    for c in results.iter().filter(|c| net.is_alive(c)) {
        let last_inc = net.actions_of(c).map(|r| r.incarnation).max().unwrap_or(0);
        let p: Vec<_> = net
            .actions_of(c)
            .filter(|r| r.incarnation == last_inc)
            .filter_map(|r| match &r.action {
                Action::Persist { slot, model } => Some((slot.clone(), path_of(model))),
                _ => None,
            })
            .collect();
        // Its own models (for cross-site evaluation) are the ones it trained: their lineage
        // ends with one of its hops.
        for (_, path) in p.iter().filter(|(s, _)| *s == ModelSlot::Local) {
            let last = entries(path).pop();
            assert!(
                last.is_some_and(|(_, who)| who == *c),
                "{c} kept {path} as its own"
            );
        }
        let p: Vec<_> = p
            .into_iter()
            .filter(|(s, _)| *s != ModelSlot::Local)
            .collect();
        assert_eq!(p.len(), 1, "{c} persisted {p:?}");
        assert_eq!(p[0].0, ModelSlot::Final);
        finals.insert(p[0].1.clone());
    }
    assert_eq!(finals.len(), 1, "one final model: {finals:?}");
    let final_path = finals.pop_first().unwrap_or_default();
    let chain = entries(&final_path);
    // The lineage is one chain through the trained hops.
    for (k, (hop, who)) in chain.iter().enumerate() {
        if k > 0 {
            assert!(chain[k - 1].0 < *hop, "hops grow: {chain:?}");
        }
        assert_eq!(&probe.hop_owner(*hop).1, who);
        let prefix: Vec<String> = chain[..k].iter().map(|(h, c)| format!("{h}:{c}")).collect();
        assert!(
            trained
                .get(hop)
                .is_some_and(|s| s.contains(&prefix.join(","))),
            "hop {hop} trained from the chain so far"
        );
    }
    // Every live client finished once (per incarnation), completed.
    for c in &cfg.clients {
        if !net.is_alive(c) {
            continue;
        }
        let last_inc = net.actions_of(c).map(|r| r.incarnation).max().unwrap_or(0);
        let outs: Vec<&Outcome> = net
            .actions_of(c)
            .filter(|r| r.incarnation == last_inc)
            .filter_map(|r| match &r.action {
                Action::Finished(o) => Some(o),
                _ => None,
            })
            .collect();
        assert_eq!(outs.len(), 1, "{c}: {outs:?}");
        assert!(
            matches!(outs[0], Outcome::Completed { .. }),
            "{c}: {outs:?}"
        );
    }
    // No hop reported twice by one incarnation; its metrics measure the model received.
    let mut reported = BTreeSet::new();
    for r in net.reports() {
        if let ReportEvent::Aggregated {
            version, metrics, ..
        } = &r.report.event
        {
            let inc = net
                .restarts()
                .iter()
                .filter(|(t, c)| *c == r.client && *t <= r.emitted)
                .count();
            assert!(
                reported.insert((r.client.clone(), inc, *version)),
                "hop {version} reported twice"
            );
            if let Some(inputs) = trained.get(version) {
                if !metrics.is_empty() {
                    let hops: BTreeSet<usize> = inputs.iter().map(|i| entries(i).len()).collect();
                    assert!(hops.contains(&(metrics["hops"] as usize)));
                }
            }
        }
    }
    chain
}

fn full_chain(cfg: &CyclicConfig) -> Vec<(u32, String)> {
    let probe = CyclicClient::new(cfg.clone(), &cfg.clients[0], None).unwrap();
    (0..probe.total_hops())
        .map(|h| (h, probe.hop_owner(h).1))
        .collect()
}

fn names_of(chain: &[(u32, String)]) -> Vec<&str> {
    chain.iter().map(|(_, c)| c.as_str()).collect()
}

#[test]
fn healthy_fixed_ring_trains_every_hop_in_order() {
    let c = cfg(&["a", "b", "c"], 3, CyclicOrder::Fixed);
    let mut net = sim(1, &c);
    run(&mut net);
    let chain = check(&net, &c);
    assert_eq!(
        names_of(&chain),
        ["a", "b", "c", "a", "b", "c", "a", "b", "c"]
    );
    let aggregated = net
        .reports()
        .iter()
        .filter(|r| matches!(r.report.event, ReportEvent::Aggregated { .. }))
        .count();
    assert_eq!(aggregated, 9);
    let w = finals_of(&net, "b")[0].1.load().unwrap().params["w"].to_f32_vec();
    assert_eq!(w, [9.0]);
}

#[test]
fn the_starting_client_opens_the_fixed_ring() {
    let mut c = cfg(&["a", "b", "c"], 2, CyclicOrder::Fixed);
    c.starting_client = Some("b".into());
    c.result_clients = vec!["a".into()];
    let mut net = sim(2, &c);
    run(&mut net);
    let chain = check(&net, &c);
    assert_eq!(names_of(&chain), ["b", "c", "a", "b", "c", "a"]);
    assert!(finals_of(&net, "b").is_empty() && finals_of(&net, "b").is_empty());
}

#[test]
fn random_order_reshuffles_each_round() {
    let c = cfg(&["a", "b", "c", "d"], 6, CyclicOrder::Random);
    let mut net = sim(3, &c);
    run(&mut net);
    let chain = check(&net, &c);
    assert_eq!(chain, full_chain(&c));
    assert_eq!(chain[0].1, "a");
    let rounds: BTreeSet<Vec<&str>> = chain
        .chunks(4)
        .map(|r| {
            let mut sorted: Vec<&str> = names_of(r);
            let order = sorted.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, ["a", "b", "c", "d"], "every client once a round");
            order
        })
        .collect();
    assert!(rounds.len() > 1, "orders differ between rounds");
}

#[test]
fn loss_duplicates_and_reordering_never_fork_the_model() {
    let c = cfg(&["a", "b", "c", "d"], 3, CyclicOrder::Random);
    let mut complete = 0;
    for seed in 0..500 {
        let mut net = sim(seed, &c)
            .with_drop(0.3)
            .with_dup(0.15)
            .with_delay_ms(1, 400);
        run(&mut net);
        let chain = check(&net, &c);
        assert!(chain.len() >= 6, "seed {seed}: {chain:?}");
        if chain.len() == 12 {
            complete += 1;
        }
        assert!(net.stats().dropped > 0 && net.stats().duplicated > 0);
    }
    assert!(complete > 400, "most runs skip no hop: {complete}");
}

/// Kills `who` at its action for hop `hop` matched by `is_it`, at `point`, once.
fn kill_at(
    who: &'static str,
    point: KillPoint,
    is_it: impl Fn(&Action<CyclicMsg>) -> bool + 'static,
) -> impl FnMut(&str, &Action<CyclicMsg>) -> KillPoint {
    let mut fired = false;
    move |c, a| {
        if !fired && c == who && is_it(a) {
            fired = true;
            point
        } else {
            KillPoint::None
        }
    }
}

fn sends_model(hop: u32) -> impl Fn(&Action<CyclicMsg>) -> bool {
    move |a| matches!(a, Action::Send { msg: CyclicMsg::Model { hop: h }, .. } if *h == hop)
}

#[test]
fn a_holder_dying_before_sending_is_skipped_by_its_predecessor() {
    let c = cfg(&["a", "b", "c"], 3, CyclicOrder::Fixed);
    let mut net = sim(4, &c).with_kill_when(kill_at("b", KillPoint::Before, sends_model(5)));
    run(&mut net);
    let chain = check(&net, &c);
    // b trained hop 4 but died with it; a (hop 3) resent its model to c (hop 5).
    assert_eq!(names_of(&chain), ["a", "b", "c", "a", "c", "a", "c"]);
    assert!(net.reports().iter().any(|r| matches!(
        &r.report.event,
        ReportEvent::Reelected { previous, next } if previous == "b" && next == "c"
    )));
}

#[test]
fn a_holder_dying_after_sending_loses_nothing() {
    let c = cfg(&["a", "b", "c"], 3, CyclicOrder::Fixed);
    let mut net = sim(5, &c).with_kill_when(kill_at("b", KillPoint::After, sends_model(5)));
    run(&mut net);
    let chain = check(&net, &c);
    assert_eq!(names_of(&chain), ["a", "b", "c", "a", "b", "c", "a", "c"]);
}

#[test]
fn a_holder_dying_while_training_is_skipped() {
    let c = cfg(&["a", "b", "c"], 3, CyclicOrder::Fixed);
    let training =
        |a: &Action<CyclicMsg>| matches!(a, Action::RunTask { task, .. } if task.id.0 == 4);
    let mut net = sim(6, &c).with_kill_when(kill_at("b", KillPoint::After, training));
    run(&mut net);
    let chain = check(&net, &c);
    assert_eq!(names_of(&chain), ["a", "b", "c", "a", "c", "a", "c"]);
}

#[test]
fn a_receiver_dying_before_its_ack_is_retried_then_skipped() {
    // b takes hop 4 but dies before acknowledging it: a resends until b is reported down.
    let c = cfg(&["a", "b", "c"], 3, CyclicOrder::Fixed);
    let acks = |a: &Action<CyclicMsg>| {
        matches!(
            a,
            Action::Send {
                msg: CyclicMsg::Ack { hop: 4, .. },
                ..
            }
        )
    };
    let mut net = sim(7, &c).with_kill_when(kill_at("b", KillPoint::Before, acks));
    run(&mut net);
    let chain = check(&net, &c);
    assert_eq!(names_of(&chain), ["a", "b", "c", "a", "c", "a", "c"]);
}

#[test]
fn a_restarted_client_rejoins_later_rounds() {
    let c = cfg(&["a", "b", "c"], 5, CyclicOrder::Fixed);
    let training =
        |a: &Action<CyclicMsg>| matches!(a, Action::RunTask { task, .. } if task.id.0 == 4);
    let mut net = sim(8, &c).with_kill_when(kill_at("b", KillPoint::After, training));
    net.restart("b", 8_000);
    run(&mut net);
    let chain = check(&net, &c);
    assert!(!chain.iter().any(|(h, _)| *h == 4));
    assert!(
        chain.iter().any(|(h, c)| *h > 4 && c == "b"),
        "b trains again: {chain:?}"
    );
    assert_eq!(
        finals_of(&net, "b").len(),
        1,
        "the new b gets the final model"
    );
}

#[test]
fn the_last_holder_dying_before_announcing_the_end_is_replaced() {
    let c = cfg(&["a", "b", "c"], 2, CyclicOrder::Fixed);
    let done = |a: &Action<CyclicMsg>| {
        matches!(
            a,
            Action::Send {
                msg: CyclicMsg::Done { .. },
                ..
            }
        )
    };
    let mut net = sim(9, &c).with_kill_when(kill_at("c", KillPoint::Before, done));
    run(&mut net);
    let chain = check(&net, &c);
    // b (hop 4) ends the run with its own model.
    assert_eq!(names_of(&chain), ["a", "b", "c", "a", "b"]);
}

#[test]
fn dead_clients_do_not_stall_the_run() {
    let mut c = cfg(&["a", "b", "c", "d"], 3, CyclicOrder::Random);
    c.result_clients = vec!["a".into(), "c".into()];
    let mut net = sim(10, &c).with_drop(0.05);
    net.kill("c", 2_000).kill("d", 9_000);
    net.server_away(1_000, 20_000);
    run(&mut net);
    let chain = check(&net, &c);
    assert!(chain.len() >= 5, "{chain:?}");
    // The reports held while the server was away arrive when it is back.
    net.run_until(30_000);
    assert!(
        net.reports()
            .iter()
            .any(|r| r.emitted < r.delivered && r.delivered.since_epoch().as_millis() == 20_000)
    );
}

#[test]
fn a_training_error_passes_the_model_on_unchanged() {
    let c = cfg(&["a", "b", "c"], 2, CyclicOrder::Fixed);
    let names = ["a", "b", "c"];
    let c1 = c.clone();
    let mut net = SimNet::new(
        11,
        &names,
        move |me| CyclicClient::new(c1.clone(), me, (me == "a").then(initial)).unwrap(),
        |me, task| {
            if me == "b" && task.id.0 == 1 {
                TaskResult {
                    task_id: task.id,
                    round: task.round,
                    data: Shareable::error(ReturnCode::ExecutionException, "boom"),
                }
            } else {
                learner(me, task)
            }
        },
    );
    net.inject(0, "a", "server", CyclicMsg::Start, None);
    run(&mut net);
    let chain = check(&net, &c);
    assert_eq!(names_of(&chain), ["a", "c", "a", "b", "c"]);
    assert!(net.reports().iter().any(|r| matches!(
        &r.report.event,
        ReportEvent::Aggregated { version: 1, pruned, .. } if pruned == &["b".to_string()]
    )));
}

#[test]
fn configs_parse_with_defaults_and_are_checked() {
    use serde::de::value::{Error, MapDeserializer};
    let de: MapDeserializer<'_, _, Error> =
        MapDeserializer::new(vec![("order", "random")].into_iter());
    let c: CyclicConfig = serde::Deserialize::deserialize(de).unwrap();
    assert_eq!(c.order, CyclicOrder::Random);
    assert_eq!(c.num_rounds, 5);
    assert_eq!(c.learn_task_timeout, 3600.0);
    let de: MapDeserializer<'_, _, Error> =
        MapDeserializer::new(vec![("num_rounds", 2u32), ("seed", 7)].into_iter());
    let c: CyclicConfig = serde::Deserialize::deserialize(de).unwrap();
    assert_eq!((c.num_rounds, c.seed, c.order), (2, 7, CyclicOrder::Fixed));

    let mut c = cfg(&["a", "b"], 1, CyclicOrder::Fixed);
    assert!(CyclicClient::new(c.clone(), "z", None).is_err());
    c.progress_timeout = 5.0;
    assert!(CyclicClient::new(c.clone(), "a", None).is_err());
    c.progress_timeout = 60.0;
    c.clients.push("a".into());
    assert!(CyclicClient::new(c, "a", None).is_err());
}

#[test]
fn random_kills_and_restarts_under_loss_keep_one_lineage() {
    use rand::{Rng, SeedableRng};
    let c = cfg(&["a", "b", "c", "d", "e"], 3, CyclicOrder::Random);
    for seed in 0..400 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut net = sim(seed, &c)
            .with_drop(0.1)
            .with_dup(0.1)
            .with_delay_ms(1, 200);
        let victim = ["b", "c", "d", "e"][rng.random_range(0..4)];
        let at = rng.random_range(0..15_000);
        net.kill(victim, at);
        if rng.random_bool(0.5) {
            net.restart(victim, at + rng.random_range(100..5_000));
        }
        run(&mut net);
        let chain = check(&net, &c);
        assert!(chain.len() >= 10, "seed {seed}: {chain:?}");
    }
}

mod hostile {
    use proptest::prelude::*;

    use super::*;
    use crate::codec::decode;
    use crate::time::Time;
    use crate::workflows::ccwf::{ClientWorkflow, Input};

    fn msg(kind: u8, hop: u32) -> CyclicMsg {
        match kind % 8 {
            0 => CyclicMsg::Start,
            1 => CyclicMsg::Model { hop },
            2 => CyclicMsg::Ack {
                hop,
                accepted: hop % 2 == 0,
            },
            3 => CyclicMsg::Passed { hop },
            4 => CyclicMsg::Progress { hop },
            5 => CyclicMsg::Done { hop },
            6 => CyclicMsg::DoneAck,
            _ => CyclicMsg::Query,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random bytes never decode into a panic.
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<CyclicMsg>(&bytes, 1 << 20);
        }

        /// Messages for any hop (far past the run's end included), with a model of the wrong
        /// shape or none, never panic a client, and a stranger's model is never trained,
        /// kept or passed on.
        #[test]
        fn nonsense_messages_never_panic(
            steps in prop::collection::vec((any::<u8>(), 0u32..12, any::<bool>(), 0usize..5), 1..40)
        ) {
            let c = cfg(&["a", "b", "c"], 2, CyclicOrder::Fixed);
            let mut x = CyclicClient::new(c, "b", None).unwrap();
            let odd = ModelRef::from(FLModel::from_params(BTreeMap::from([(
                "v".to_string(),
                Tensor::from_f32(vec![2], &[1.0, f32::NAN]).unwrap(),
            )])));
            let planted = ModelRef::from(FLModel::from_params(BTreeMap::from([(
                "stranger".to_string(),
                Tensor::from_f32(vec![1], &[1.0]).unwrap(),
            )])));
            let hop = |h: u32| if h >= 10 { u32::MAX - h } else { h };
            for (i, (kind, h, with_model, from)) in steps.into_iter().enumerate() {
                let sender = ["a", "c", "stranger", "", "b"][from];
                let model = match (with_model, sender) {
                    (false, _) => None,
                    (true, "stranger") => Some(planted.clone()),
                    (true, _) => Some(odd.clone()),
                };
                let now = Time::from_millis(i as u64 * 700);
                x.handle(now, Input::Message { from: sender.to_string(), msg: msg(kind, hop(h)), model });
                x.handle_timeout(now);
                while let Some(a) = x.poll_action() {
                    let carried = match &a {
                        Action::RunTask { model, .. } => model.clone(),
                        Action::Persist { model, .. } => Some(model.clone()),
                        Action::Send { model, .. } => model.clone(),
                        _ => None,
                    };
                    prop_assert!(
                        !carried.is_some_and(|m| m.tensors().iter().any(|t| t.name == "stranger")),
                        "a stranger's model got through: {a:?}"
                    );
                }
            }
        }
    }
}
