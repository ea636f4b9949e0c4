//! The aggregation algorithms in the workflows: a swarm, whose aggregator changes every
//! round, ends on the same model as scatter-and-gather with the same algorithm and the same
//! learners, because the algorithm's state (a server optimizer's moments, SCAFFOLD's global
//! control, DP-FedAvg's clipping norm, round count and spent privacy) travels in the global
//! model of each `Learn`. Under DP every site is given the same noise seed here, which a real
//! run never does (each site draws its own), so that the noise, too, is the same.
//!
//! The learners are deterministic functions of the task's model. Site `i` pulls the weights
//! towards its own target `t_i` and, under SCAFFOLD, corrects by the global control and
//! returns a control change that depends on it, so a control that was lost or reset on the
//! way would change the models.

use std::collections::BTreeMap;
use std::time::Duration;

use super::ccwf::ReportEvent;
use super::ccwf::{ModelSlot, Outcome};
use super::ccwf_sim::SimNet;
use super::scatter_gather::{Event, Output, SagConfig, ScatterGather};
use super::swarm::{SwarmClient, SwarmConfig, SwarmMsg};
use crate::aggregators::{
    Aggregator, AggregatorSpec, Cosine, DP_CLIP_NORM, DP_RDP, DP_ROUNDS, FEDOPT_M, FEDOPT_STEPS,
    METRIC_DELTA, METRIC_EPSILON, SCAFFOLD_C_DIFF, SCAFFOLD_C_GLOBAL, ServerOpt,
};
use crate::dp::{AdaptiveClipping, Clipping, DpSpec, NoiseSeed};
use crate::model::{FLModel, META_NUM_SAMPLES, MetaValue, Tensor};
use crate::shareable::{Shareable, Task, TaskResult, task_names};
use crate::stored::ModelRef;
use crate::time::Time;

const NAMES: [&str; 4] = ["a", "b", "c", "d"];
const DIM: usize = 3;

fn index(name: &str) -> usize {
    NAMES.iter().position(|n| *n == name).unwrap()
}

fn tensor(m: &FLModel, name: &str) -> Vec<f32> {
    m.params[name].to_f32_vec()
}

/// Site `i`'s answer to `task`.
fn learner(me: &str, task: &Task) -> TaskResult {
    let got = task.data.model.as_ref().unwrap();
    let i = index(me) as f32;
    let w = tensor(got, "w");
    let metrics = BTreeMap::from([("accuracy".to_string(), f64::from(w[0]))]);
    assert!(
        !got.params.keys().any(|k| k.starts_with(FEDOPT_M)),
        "a learner was sent the optimizer's state"
    );
    let m = if task.name == task_names::TRAIN {
        let target: Vec<f32> = (0..DIM).map(|k| (i + 1.0) * (k as f32 + 1.0)).collect();
        let c = got.params.get(&format!("{SCAFFOLD_C_GLOBAL}w"));
        let c: Vec<f32> = c.map_or(vec![0.0; DIM], |t| t.to_f32_vec());
        let local: Vec<f32> = (0..DIM)
            .map(|k| w[k] + 0.5 * (target[k] - w[k]) - 0.3 * c[k])
            .collect();
        let mut params = BTreeMap::from([(
            "w".to_string(),
            Tensor::from_f32(vec![DIM], &local).unwrap(),
        )]);
        if got.params.contains_key(&format!("{SCAFFOLD_C_GLOBAL}w")) {
            let diff: Vec<f32> = (0..DIM)
                .map(|k| 0.2 * (target[k] - w[k]) - 0.1 * c[k])
                .collect();
            params.insert(
                format!("{SCAFFOLD_C_DIFF}w"),
                Tensor::from_f32(vec![DIM], &diff).unwrap(),
            );
        }
        let mut m = FLModel::from_params(params);
        m.meta.insert(
            META_NUM_SAMPLES.into(),
            MetaValue::Int(index(me) as i64 + 1),
        );
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

fn initial() -> FLModel {
    FLModel::from_params(BTreeMap::from([(
        "w".to_string(),
        Tensor::from_f32(vec![DIM], &[0.0; DIM]).unwrap(),
    )]))
}

fn names() -> Vec<String> {
    NAMES.iter().map(|s| s.to_string()).collect()
}

/// A scatter-and-gather controller of the sites, with `spec`, from `initial`.
fn controller(spec: AggregatorSpec, rounds: u32, initial: FLModel) -> ScatterGather {
    let cfg = SagConfig {
        num_rounds: rounds,
        min_clients: NAMES.len(),
        ..SagConfig::default()
    };
    ScatterGather::new(cfg, names(), initial)
        .unwrap()
        .with_aggregator(Aggregator::new(spec))
        .unwrap()
}

/// The metrics reported per model version.
type Versions = BTreeMap<u32, BTreeMap<String, f64>>;

/// Runs `c` with every site answering at once: the final global model, the last round's
/// (with the algorithm's state) and the metrics reported per version.
fn drive(mut c: ScatterGather) -> (Option<ModelRef>, Option<ModelRef>, Versions) {
    let mut now = Time::ZERO;
    c.start(now);
    let (mut end, mut last, mut versions) = (None, None, Versions::new());
    for _ in 0..10_000 {
        let Some(out) = c.poll_output() else {
            match c.poll_timeout() {
                Some(t) => {
                    now = t;
                    c.handle_timeout(now);
                    continue;
                }
                None => break,
            }
        };
        match out {
            Output::Send {
                to,
                mut task,
                model,
            } => {
                task.data.model = Some(model.load().unwrap());
                let r = learner(&to, &task);
                c.handle_result(now, &to, r);
            }
            Output::Event(Event::Finished { model }) => end = Some(model),
            Output::Event(Event::RoundAggregated { model, .. }) => last = Some(model),
            Output::Event(Event::Aborted { reason, .. }) => panic!("aborted: {reason}"),
            Output::Event(Event::ModelEvaluated { version, metrics }) => {
                versions.insert(version, metrics);
            }
            Output::Event(_) => {}
        }
    }
    (end, last, versions)
}

/// [`drive`] from the initial model, both models loaded.
fn run_sag(spec: AggregatorSpec, rounds: u32) -> (FLModel, FLModel) {
    let (end, last, _) = drive(controller(spec, rounds, initial()));
    let load = |m: Option<ModelRef>| (*m.expect("the run finished").load().unwrap()).clone();
    (load(end), load(last))
}

/// A swarm of the same sites: the final model a result client persisted, and the last
/// round's model its aggregator persisted (with the algorithm's state).
fn run_swarm(spec: AggregatorSpec, rounds: u32) -> (FLModel, FLModel) {
    let (end, last, _) = swarm_with_reports(spec, rounds);
    (end, last)
}

/// [`run_swarm`], and the metrics its aggregators reported per version.
fn swarm_with_reports(spec: AggregatorSpec, rounds: u32) -> (FLModel, FLModel, Versions) {
    let all = names();
    let cfg = SwarmConfig {
        num_rounds: rounds,
        start_round: 0,
        clients: all.clone(),
        train_clients: all.clone(),
        aggr_clients: all.clone(),
        result_clients: vec!["a".into()],
        min_clients: NAMES.len(),
        learn_task_timeout: Duration::from_secs(5),
        min_responses_required: NAMES.len(),
        wait_time_after_min_resps_received: Duration::from_secs(1),
        max_concurrent_submissions: 2,
        max_status_report_interval: Duration::from_secs(30),
        resend_interval: Duration::from_millis(500),
        key_metric: "accuracy".into(),
        seed: 5,
    };
    let mut sim = SimNet::new(
        3,
        &NAMES,
        move |n| {
            SwarmClient::new(cfg.clone(), n)
                .unwrap()
                .with_aggregator(Aggregator::new(spec))
        },
        learner,
    );
    sim.inject(0, "a", "server", SwarmMsg::Start, Some(initial().into()));
    sim.run_until_done(600_000);
    let outcomes = sim.outcomes("a");
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Completed { .. })),
        "{outcomes:?}"
    );
    // Different sites aggregated the rounds, so the state crossed sites.
    let aggregators: std::collections::BTreeSet<&str> = (0..rounds)
        .map(|r| {
            sim.workflow("a")
                .unwrap()
                .config()
                .aggregator(super::ccwf::Epoch::new(r, 0))
        })
        .collect();
    assert!(aggregators.len() >= 2, "{aggregators:?}");
    let final_model = sim
        .persisted("a")
        .into_iter()
        .find(|(s, _)| *s == ModelSlot::Final)
        .map(|(_, m)| m)
        .expect("a final model");
    let last = NAMES
        .iter()
        .flat_map(|n| sim.persisted(n))
        .find(|(s, _)| *s == ModelSlot::Round(rounds - 1))
        .map(|(_, m)| m)
        .expect("the last round's model");
    let load = |m: ModelRef| (*m.load().unwrap()).clone();
    let mut versions = Versions::new();
    for r in sim.reports() {
        if let ReportEvent::Aggregated {
            version, metrics, ..
        } = &r.report.event
        {
            versions.insert(*version, metrics.clone());
        }
    }
    (load(final_model), load(last), versions)
}

fn assert_close(a: &FLModel, b: &FLModel, what: &str) {
    assert_eq!(
        a.params.keys().collect::<Vec<_>>(),
        b.params.keys().collect::<Vec<_>>(),
        "{what}: tensors"
    );
    for (name, t) in &a.params {
        let (x, y) = (t.to_f32_vec(), b.params[name].to_f32_vec());
        for (p, q) in x.iter().zip(&y) {
            assert!(
                (p - q).abs() <= 1e-5 * (1.0 + p.abs()),
                "{what}: {name} {x:?} vs {y:?}"
            );
        }
    }
}

const ROUNDS: u32 = 4;

fn fedadam() -> AggregatorSpec {
    AggregatorSpec {
        opt: Some(ServerOpt::Adam {
            eta: 0.1,
            beta_1: 0.9,
            beta_2: 0.99,
            tau: 1e-3,
        }),
        ..AggregatorSpec::default()
    }
}

fn fedopt() -> AggregatorSpec {
    AggregatorSpec {
        opt: Some(ServerOpt::Sgd {
            lr: 1.0,
            momentum: 0.6,
            cosine: Some(Cosine {
                t_max: ROUNDS,
                eta_min: 0.9,
            }),
        }),
        ..AggregatorSpec::default()
    }
}

fn scaffold() -> AggregatorSpec {
    AggregatorSpec {
        scaffold: true,
        ..AggregatorSpec::default()
    }
}

/// DP-FedAvg whose clipping bites: the sites' updates have norms from about 1.9 to 7.5.
fn dp(clipping: Clipping) -> AggregatorSpec {
    AggregatorSpec {
        dp: Some(DpSpec {
            noise_multiplier: 0.5,
            clipping,
            target_delta: 1e-5,
            noise_seed: NoiseSeed([11; 32]),
        }),
        ..AggregatorSpec::default()
    }
}

fn dp_fixed() -> AggregatorSpec {
    dp(Clipping::Fixed { norm: 3.0 })
}

fn dp_adaptive() -> AggregatorSpec {
    dp(Clipping::Adaptive(AdaptiveClipping {
        initial_norm: 3.0,
        count_stddev: Some(1.0),
        ..AdaptiveClipping::DEFAULT
    }))
}

#[test]
fn swarm_and_scatter_gather_agree_under_fedopt_fedadam_scaffold_and_dp() {
    let (fedavg, _) = run_sag(AggregatorSpec::default(), ROUNDS);
    for (what, spec) in [
        ("FedOpt", fedopt()),
        ("FedAdam", fedadam()),
        ("SCAFFOLD", scaffold()),
        ("DP-FedAvg, fixed clipping", dp_fixed()),
        ("DP-FedAvg, adaptive clipping", dp_adaptive()),
    ] {
        let (sag, sag_last) = run_sag(spec, ROUNDS);
        let (swarm, swarm_last) = run_swarm(spec, ROUNDS);
        assert_close(&sag, &swarm, what);
        assert_close(&sag_last, &swarm_last, what);
        // And the algorithm did something: the models differ from FedAvg's.
        assert_ne!(tensor(&sag, "w"), tensor(&fedavg, "w"), "{what}");
    }
}

#[test]
fn the_state_travels_in_the_round_models_and_stays_out_of_the_result() {
    let (end, last) = run_swarm(fedadam(), ROUNDS);
    assert!(last.params.contains_key(&format!("{FEDOPT_M}w")));
    assert_eq!(last.params[FEDOPT_STEPS].to_f32_vec(), vec![ROUNDS as f32]);
    assert_eq!(end.params.keys().collect::<Vec<_>>(), ["w"]);
    assert_eq!(end.params["w"], last.params["w"]);
    let (end, last) = run_sag(scaffold(), ROUNDS);
    let c = tensor(&last, &format!("{SCAFFOLD_C_GLOBAL}w"));
    assert!(c.iter().all(|x| *x != 0.0), "{c:?}");
    assert_eq!(end.params.keys().collect::<Vec<_>>(), ["w"]);
}

/// A swarm whose aggregators restart their optimizer each round (state not carried) would
/// end elsewhere: what the comparison above proves is not an accident of a small state.
#[test]
fn losing_the_optimizer_state_each_round_changes_the_model() {
    let (carried, _) = run_sag(fedadam(), ROUNDS);
    // Round by round, each from a model stripped of its state.
    let mut g = ModelRef::from(initial());
    for _ in 0..ROUNDS {
        let plain = crate::aggregators::weights(&g).unwrap();
        let c = controller(fedadam(), 1, (*plain.load().unwrap()).clone());
        g = drive(c).1.expect("the round aggregated");
    }
    let lost = g.load().unwrap();
    assert_ne!(tensor(&carried, "w"), tensor(&lost, "w"));
}

/// The server hands back each aggregated model stored; the next round's queued tasks then
/// carry the stored model's view without the optimizer's moments, not a copy in memory.
#[test]
fn queued_tasks_follow_a_stored_global_and_leave_the_moments_out() {
    let mut c = controller(fedadam(), 2, initial());
    c.start(Time::ZERO);
    let mut sends = Vec::new();
    while let Some(out) = c.poll_output() {
        if let Output::Send {
            to,
            mut task,
            model,
        } = out
        {
            task.data.model = Some(model.load().unwrap());
            sends.push((to, task));
        }
    }
    for (to, task) in sends {
        let r = learner(&to, &task);
        c.handle_result(Time::ZERO, &to, r);
    }
    // Round 0 aggregated, round 1's tasks queued: store the global as the node's server does.
    let global = c.global().load().unwrap();
    assert!(global.params.contains_key(FEDOPT_STEPS));
    let stored = ModelRef::Stored(std::sync::Arc::new(
        crate::stored::StoredModel::from_memory(&global),
    ));
    c.replace_global(stored).unwrap();
    let mut queued = 0;
    while let Some(out) = c.poll_output() {
        if let Output::Send { model, .. } = out {
            queued += 1;
            assert!(model.in_memory().is_none(), "a task kept a copy in memory");
            assert!(
                model
                    .tensors()
                    .iter()
                    .all(|t| !t.name.starts_with("fedopt")),
                "{:?}",
                model.tensors()
            );
        }
    }
    assert_eq!(queued, NAMES.len());
}

/// DP-FedAvg's state travels with the round models (and the adaptive clipping norm moves),
/// stays out of the result, and each version's reported metrics carry the privacy spent
/// to make it, in scatter-and-gather's evaluations and in the swarm's reports alike.
#[test]
fn dp_state_travels_and_every_version_reports_its_privacy() {
    for spec in [dp_fixed(), dp_adaptive()] {
        let (end, last, sag_versions) = drive(controller(spec, ROUNDS, initial()));
        let (end, last) = (end.unwrap().load().unwrap(), last.unwrap().load().unwrap());
        assert_eq!(end.params.keys().collect::<Vec<_>>(), ["w"]);
        assert_eq!(
            last.params[DP_ROUNDS],
            Tensor::from_i64(vec![1], &[i64::from(ROUNDS)]).unwrap()
        );
        assert!(last.params.contains_key(DP_RDP));
        let clip = last.params[DP_CLIP_NORM].to_f32_vec()[0];
        let adaptive = matches!(spec.dp.unwrap().clipping, Clipping::Adaptive(_));
        assert_eq!(clip != 3.0, adaptive, "C = {clip}");
        let (_, _, swarm_versions) = swarm_with_reports(spec, ROUNDS);
        for versions in [&sag_versions, &swarm_versions] {
            // Version 0 is the initial model; every later one was paid for, and more each
            // round.
            assert!(!versions[&0].contains_key(METRIC_EPSILON), "{versions:?}");
            let eps: Vec<f64> = (1..=ROUNDS).map(|v| versions[&v][METRIC_EPSILON]).collect();
            assert!(eps.windows(2).all(|w| w[0] < w[1]), "{eps:?}");
            assert_eq!(versions[&ROUNDS][METRIC_DELTA], 1e-5);
            // The trainers' measurements are still there.
            assert!(versions[&ROUNDS].contains_key("accuracy"));
        }
        let last_eps = |v: &Versions| v[&ROUNDS][METRIC_EPSILON];
        assert!((last_eps(&sag_versions) / last_eps(&swarm_versions) - 1.0).abs() < 1e-12);
    }
}
