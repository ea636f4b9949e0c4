//! Deterministic simulations of client-side cross-site evaluation with injected faults, on
//! [`SimNet`].
//!
//! Each site's local model carries a distinct weight and the global model another; the
//! learner's metric is that weight plus a per-evaluator offset, so a reported metric proves
//! which model was measured where. The checks after every run: every live evaluator measured
//! every model whose holder stayed alive, with the right metric, once; every other model is
//! measured or reported failed, once; an evaluator fetches one model at a time; every live
//! client finished.

use std::collections::{BTreeMap, BTreeSet};

use super::ccwf::{Action, Outcome, ReportEvent};
use super::ccwf_sim::{KillPoint, RunEnd, SimNet};
use super::cse::{CseClient, CseConfig, CseMsg, GLOBAL_MODEL};
use crate::model::{FLModel, Tensor};
use crate::shareable::{Shareable, Task, TaskResult};
use crate::stored::ModelRef;

fn weight_of(name: &str) -> f32 {
    if name == GLOBAL_MODEL {
        1000.0
    } else {
        10.0 * (name.as_bytes()[0] - b'a' + 1) as f32
    }
}

fn model(name: &str) -> ModelRef {
    ModelRef::from(FLModel::from_params(BTreeMap::from([(
        "w".to_string(),
        Tensor::from_f32(vec![1], &[weight_of(name)]).unwrap(),
    )])))
}

fn offset(evaluator: &str) -> f64 {
    f64::from(evaluator.as_bytes()[0] - b'a') / 100.0
}

fn learner(me: &str, task: &Task) -> TaskResult {
    let w = task.data.model.as_ref().unwrap().params["w"].to_f32_vec()[0];
    let mut m = FLModel::default();
    m.metrics.insert("acc".into(), f64::from(w) + offset(me));
    TaskResult {
        task_id: task.id,
        round: 0,
        data: Shareable::with_model(m),
    }
}

fn cfg(names: &[&str], global: Option<&str>) -> CseConfig {
    CseConfig {
        clients: names.iter().map(|s| s.to_string()).collect(),
        global_model_client: global.map(str::to_string),
        eval_task_timeout: 10.0,
        submit_model_timeout: 8.0,
        seed: 3,
        ..CseConfig::default()
    }
}

fn sim(seed: u64, cfg: &CseConfig) -> SimNet<CseClient> {
    let names: Vec<&str> = cfg.clients.iter().map(String::as_str).collect();
    let c1 = cfg.clone();
    let mut net = SimNet::new(
        seed,
        &names,
        move |me| {
            let global =
                (c1.global_model_client.as_deref() == Some(me)).then(|| model(GLOBAL_MODEL));
            CseClient::new(c1.clone(), me, Some(model(me)), global).unwrap()
        },
        learner,
    )
    .with_task_ms(200, 800)
    .with_delay_ms(5, 80);
    for n in &names {
        net.inject(0, n, "server", CseMsg::Start, None);
    }
    net
}

fn run(net: &mut SimNet<CseClient>) {
    assert_eq!(net.run_until_done(3_600_000), RunEnd::AllDone);
}

fn or_all(v: &[String], all: &[String]) -> Vec<String> {
    if v.is_empty() {
        all.to_vec()
    } else {
        v.to_vec()
    }
}

/// Checks the invariants of the module documentation; returns the (evaluator, model) pairs
/// reported failed.
fn check(
    net: &SimNet<CseClient>,
    cfg: &CseConfig,
    may_fail: &[&str],
) -> BTreeSet<(String, String)> {
    let evaluators = or_all(&cfg.evaluators, &cfg.clients);
    let mut models = or_all(&cfg.evaluatees, &cfg.clients);
    if cfg.global_model_client.is_some() {
        models.push(GLOBAL_MODEL.to_string());
    }
    let holder = |m: &str| {
        if m == GLOBAL_MODEL {
            cfg.global_model_client.clone().unwrap()
        } else {
            m.to_string()
        }
    };
    let killed: BTreeSet<String> = net.kills().iter().map(|(_, c)| c.clone()).collect();
    let mut done: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut failed = BTreeSet::new();
    for r in net.reports() {
        match &r.report.event {
            ReportEvent::Evaluated { model, metrics } => {
                let want = f64::from(weight_of(model)) + offset(&r.client);
                assert!(
                    (metrics["acc"] - want).abs() < 1e-9,
                    "{} measured {model}",
                    r.client
                );
                *done.entry((r.client.clone(), model.clone())).or_default() += 1;
            }
            ReportEvent::EvaluationFailed { model, .. } => {
                *done.entry((r.client.clone(), model.clone())).or_default() += 1;
                failed.insert((r.client.clone(), model.clone()));
            }
            _ => {}
        }
    }
    for ((e, m), n) in &done {
        assert_eq!(*n, 1, "{e} reported {m} {n} times");
    }
    for e in evaluators.iter().filter(|e| net.is_alive(e)) {
        for m in &models {
            let key = (e.clone(), m.clone());
            assert!(done.contains_key(&key), "{e} never reported {m}");
            if !killed.contains(&holder(m)) && !may_fail.contains(&m.as_str()) {
                assert!(!failed.contains(&key), "{e} failed {m} whose holder lived");
            }
        }
        // One model at a time: the models it requested come in blocks, never interleaved.
        let mut seen = BTreeSet::new();
        let mut last: Option<String> = None;
        for (_, _, msg, _) in net.sends_of(e) {
            if let CseMsg::Request { model } = msg {
                if last.as_ref() != Some(model) {
                    assert!(seen.insert(model.clone()), "{e} went back to {model}");
                    last = Some(model.clone());
                }
            }
        }
    }
    for c in cfg.clients.iter().filter(|c| net.is_alive(c)) {
        let outs = net.outcomes(c);
        assert_eq!(outs.len(), 1, "{c}: {outs:?}");
        assert!(matches!(outs[0], Outcome::Completed { .. }));
    }
    failed
}

#[test]
fn every_evaluator_measures_every_model() {
    let c = cfg(&["a", "b", "c", "d"], Some("b"));
    let mut net = sim(1, &c);
    run(&mut net);
    let failed = check(&net, &c, &[]);
    assert!(failed.is_empty(), "{failed:?}");
    let evaluated = net
        .reports()
        .iter()
        .filter(|r| matches!(r.report.event, ReportEvent::Evaluated { .. }))
        .count();
    assert_eq!(evaluated, 4 * 5);
    // Evaluators start on different models.
    let firsts: BTreeSet<String> = ["a", "b", "c", "d"]
        .iter()
        .filter_map(|e| {
            net.reports().iter().find_map(|r| match &r.report.event {
                ReportEvent::Evaluated { model, .. } if r.client == *e => Some(model.clone()),
                _ => None,
            })
        })
        .collect();
    assert!(firsts.len() > 1);
}

#[test]
fn evaluators_and_evaluatees_can_be_subsets() {
    let mut c = cfg(&["a", "b", "c", "d"], Some("a"));
    c.evaluators = vec!["a".into(), "b".into()];
    c.evaluatees = vec!["c".into(), "d".into()];
    let mut net = sim(2, &c);
    run(&mut net);
    assert!(check(&net, &c, &[]).is_empty());
    let by = |who: &str| {
        net.reports()
            .iter()
            .filter(|r| r.client == who && matches!(r.report.event, ReportEvent::Evaluated { .. }))
            .count()
    };
    assert_eq!((by("a"), by("b"), by("c"), by("d")), (3, 3, 0, 0));
    assert!(net.workflow("c").is_some_and(|w| !w.is_evaluator()));
}

#[test]
fn loss_and_duplicates_leave_the_matrix_complete() {
    let c = cfg(&["a", "b", "c", "d"], Some("c"));
    for seed in 0..200 {
        let mut net = sim(seed, &c)
            .with_drop(0.15)
            .with_dup(0.2)
            .with_delay_ms(1, 500);
        run(&mut net);
        let failed = check(&net, &c, &[]);
        assert!(failed.is_empty(), "seed {seed}: {failed:?}");
    }
}

#[test]
fn a_dead_evaluatee_is_reported_failed_not_waited_for() {
    let c = cfg(&["a", "b", "c", "d"], None);
    for (seed, at) in [(3, 0), (4, 700), (5, 1500), (6, 3000)] {
        let mut net = sim(seed, &c).with_drop(0.05);
        net.kill("c", at);
        run(&mut net);
        let failed = check(&net, &c, &[]);
        assert!(failed.iter().all(|(_, m)| m == "c"), "{failed:?}");
        if at == 0 {
            assert_eq!(failed.len(), 3, "every live evaluator failed c");
        }
    }
}

#[test]
fn a_dead_evaluator_does_not_stall_the_others() {
    let c = cfg(&["a", "b", "c", "d"], Some("a"));
    // b dies as it starts validating its second model; d dies as it serves its model.
    let mut validations = 0;
    let mut net = sim(7, &c).with_kill_when(move |who, a| match a {
        Action::RunTask { .. } if who == "b" => {
            validations += 1;
            if validations == 2 {
                KillPoint::After
            } else {
                KillPoint::None
            }
        }
        Action::Send {
            msg: CseMsg::Model { .. },
            ..
        } if who == "d" => KillPoint::Before,
        _ => KillPoint::None,
    });
    run(&mut net);
    let failed = check(&net, &c, &[]);
    assert!(
        failed.iter().all(|(_, m)| m == "b" || m == "d"),
        "{failed:?}"
    );
    assert!(!net.is_alive("b") && !net.is_alive("d"));
}

#[test]
fn a_holder_without_its_model_answers_no_model() {
    let c = cfg(&["a", "b", "c"], None);
    let c1 = c.clone();
    let mut net = SimNet::new(
        8,
        &["a", "b", "c"],
        move |me| {
            let local = (me != "c").then(|| model(me));
            CseClient::new(c1.clone(), me, local, None).unwrap()
        },
        learner,
    );
    for n in ["a", "b", "c"] {
        net.inject(0, n, "server", CseMsg::Start, None);
    }
    run(&mut net);
    let failed = check(&net, &c, &["c"]);
    let want: BTreeSet<(String, String)> = ["a", "b", "c"]
        .iter()
        .map(|e| (e.to_string(), "c".to_string()))
        .collect();
    assert_eq!(failed, want);
}

#[test]
fn configs_parse_with_defaults_and_are_checked() {
    use serde::de::value::{Error, MapDeserializer};
    let de: MapDeserializer<'_, _, Error> = MapDeserializer::new(vec![("seed", 9u64)].into_iter());
    let d: CseConfig = serde::Deserialize::deserialize(de).unwrap();
    assert_eq!(d.seed, 9);
    assert!(d.evaluators.is_empty() && d.evaluatees.is_empty());
    assert_eq!(
        (d.eval_task_timeout, d.submit_model_timeout),
        (300.0, 600.0)
    );
    let mut c = cfg(&["a", "b"], Some("z"));
    assert!(CseClient::new(c.clone(), "a", None, None).is_err());
    c.global_model_client = None;
    c.submit_model_timeout = 0.0;
    assert!(CseClient::new(c.clone(), "a", None, None).is_err());
    c.submit_model_timeout = 1.0;
    assert!(CseClient::new(c, "a", None, None).is_ok());
}

mod hostile {
    use proptest::prelude::*;

    use super::*;
    use crate::codec::decode;
    use crate::time::Time;
    use crate::workflows::ccwf::{ClientWorkflow, Input};

    fn msg(kind: u8, name: &str) -> CseMsg {
        let model = name.to_string();
        match kind % 6 {
            0 => CseMsg::Start,
            1 => CseMsg::Request { model },
            2 => CseMsg::Model { model },
            3 => CseMsg::NoModel {
                model,
                reason: String::new(),
            },
            4 => CseMsg::Done,
            _ => CseMsg::DoneAck,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random bytes never decode into a panic.
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<CseMsg>(&bytes, 1 << 20);
        }

        /// Requests and models for any name, from anyone, with a model of the wrong shape or
        /// none, never panic a client; a stranger is never sent a model, and a stranger's
        /// model is never evaluated.
        #[test]
        fn nonsense_messages_never_panic(
            steps in prop::collection::vec((any::<u8>(), 0usize..6, any::<bool>(), 0usize..5), 1..40)
        ) {
            let mut x = CseClient::new(cfg(&["a", "b", "c"], Some("b")), "b", Some(model("b")), Some(model(GLOBAL_MODEL))).unwrap();
            let odd = ModelRef::from(FLModel::from_params(BTreeMap::from([(
                "v".to_string(),
                Tensor::from_f32(vec![2], &[1.0, f32::NAN]).unwrap(),
            )])));
            let planted = ModelRef::from(FLModel::from_params(BTreeMap::from([(
                "stranger".to_string(),
                Tensor::from_f32(vec![1], &[1.0]).unwrap(),
            )])));
            for (i, (kind, name, with_model, from)) in steps.into_iter().enumerate() {
                let sender = ["a", "c", "stranger", "", "b"][from];
                let name = ["a", "b", "c", GLOBAL_MODEL, "stranger", ""][name];
                let model = match (with_model, sender) {
                    (false, _) => None,
                    (true, "stranger") => Some(planted.clone()),
                    (true, _) => Some(odd.clone()),
                };
                let now = Time::from_millis(i as u64 * 700);
                x.handle(now, Input::Message { from: sender.to_string(), msg: msg(kind, name), model });
                x.handle_timeout(now);
                while let Some(a) = x.poll_action() {
                    match &a {
                        Action::Send { to, .. } => prop_assert!(to != "stranger", "{a:?}"),
                        Action::RunTask { model, .. } => prop_assert!(
                            !model.as_ref().is_some_and(|m| m.tensors().iter().any(|t| t.name == "stranger")),
                            "a stranger's model was evaluated: {a:?}"
                        ),
                        _ => {}
                    }
                }
            }
        }
    }
}
