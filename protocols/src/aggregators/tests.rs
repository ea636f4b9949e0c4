use super::*;
use crate::aggregate::META_PARTIAL_WEIGHT;
use crate::model::META_NUM_SAMPLES;

fn model(values: &[f32], samples: i64) -> ModelRef {
    let mut params = BTreeMap::new();
    params.insert(
        "w".to_string(),
        Tensor::from_f32(vec![values.len()], values).unwrap(),
    );
    // An integer tensor, the same in every model (a step counter).
    params.insert("step".to_string(), Tensor::from_i64(vec![1], &[1]).unwrap());
    let mut m = FLModel::from_params(params);
    m.meta
        .insert(META_NUM_SAMPLES.into(), MetaValue::Int(samples));
    m.metrics.insert("loss".into(), samples as f64);
    m.into()
}

fn values(m: &FLModel) -> Vec<f32> {
    m.params["w"].to_f32_vec()
}

fn run(spec: AggregatorSpec, global: &ModelRef, results: &[ModelRef]) -> FLModel {
    let agg = Aggregator::new(spec);
    aggregate(&mut agg.clone(), global, results).unwrap()
}

fn aggregate(
    agg: &mut Aggregator,
    global: &ModelRef,
    results: &[ModelRef],
) -> Result<FLModel, AggregateError> {
    let mut round = agg.round();
    for r in results {
        let w = crate::aggregate::weight_of_ref(r);
        round.add_ref(global, r, w)?;
    }
    agg.finish(round, global)
}

fn rule(rule: Rule) -> AggregatorSpec {
    AggregatorSpec {
        rule,
        ..AggregatorSpec::default()
    }
}

#[test]
fn the_median_and_trimmed_mean_by_hand() {
    let g = model(&[0.0, 0.0], 1);
    let rs = [
        model(&[1.0, 10.0], 1),
        model(&[2.0, -4.0], 1),
        model(&[3.0, 0.0], 1),
        model(&[100.0, 2.0], 1),
        model(&[-50.0, 1.0], 1),
    ];
    // Per coordinate: sorted (-50, 1, 2, 3, 100) and (-4, 0, 1, 2, 10).
    assert_eq!(values(&run(rule(Rule::Median), &g, &rs)), vec![2.0, 1.0]);
    let trimmed = run(rule(Rule::TrimmedMean { beta: 0.2 }), &g, &rs);
    assert_eq!(values(&trimmed), vec![2.0, 1.0]);
    let trimmed = run(rule(Rule::TrimmedMean { beta: 0.0 }), &g, &rs);
    assert_eq!(values(&trimmed), vec![11.2, 1.8]);
    // An integer tensor goes through the same rule.
    assert_eq!(
        run(rule(Rule::Median), &g, &rs).params["step"]
            .to_f32_vec()
            .first()
            .copied(),
        Some(1.0)
    );
}

#[test]
fn krum_keeps_the_result_nearest_its_neighbours_and_multikrum_averages_by_weight() {
    let g = model(&[0.0], 1);
    let rs = [
        model(&[0.0], 1),
        model(&[1.0], 3),
        model(&[2.0], 1),
        model(&[10.0], 1),
    ];
    // f = 0: scores 5, 2, 5, 145 (two nearest squared distances): Krum keeps [1.0].
    let krum = run(
        rule(Rule::Krum {
            malicious: 0,
            keep: 1,
        }),
        &g,
        &rs,
    );
    assert_eq!(values(&krum), vec![1.0]);
    // MultiKrum keeps 1, 0, 2, weighted 3 : 1 : 1.
    let multi = run(
        rule(Rule::Krum {
            malicious: 0,
            keep: 3,
        }),
        &g,
        &rs,
    );
    assert_eq!(values(&multi), vec![1.0]);
    let mut agg = Aggregator::new(rule(Rule::Krum {
        malicious: 0,
        keep: 5,
    }));
    assert_eq!(
        aggregate(&mut agg, &g, &rs).unwrap_err(),
        AggregateError::Robust(RobustError::KeepsTooMany { n: 4, keep: 5 })
    );
}

#[test]
fn bulyan_refuses_fewer_than_4f_plus_3_results() {
    let g = model(&[0.0], 1);
    let rs: Vec<ModelRef> = (0..6).map(|i| model(&[i as f32], 1)).collect();
    let mut agg = Aggregator::new(rule(Rule::Bulyan { malicious: 1 }));
    let err = aggregate(&mut agg, &g, &rs).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Bulyan with num_malicious_nodes = 1 needs at least 7 results (4f + 3), got 6"
    );
}

/// Seven sites: six honest updates near 1.0, one sent scaled by −10. The robust rules stay
/// near the honest mean; FedAvg does not.
#[test]
fn a_byzantine_site_moves_fedavg_but_not_the_robust_rules() {
    let g = model(&[0.0; 4], 1);
    let honest: Vec<Vec<f32>> = (0..6)
        .map(|i| {
            (0..4)
                .map(|k| 1.0 + 0.01 * ((i * 4 + k) % 7) as f32 - 0.03)
                .collect()
        })
        .collect();
    let mean: Vec<f64> = (0..4)
        .map(|k| honest.iter().map(|h| f64::from(h[k])).sum::<f64>() / 6.0)
        .collect();
    let mut rs: Vec<ModelRef> = honest.iter().map(|h| model(h, 1)).collect();
    rs.push(model(
        &honest[0].iter().map(|x| -10.0 * x).collect::<Vec<_>>(),
        1,
    ));
    let off = |m: &FLModel| -> f64 {
        values(m)
            .iter()
            .zip(&mean)
            .map(|(a, b)| (f64::from(*a) - b).abs())
            .fold(0.0, f64::max)
    };
    let fedavg = run(AggregatorSpec::default(), &g, &rs);
    assert!(off(&fedavg) > 1.0, "FedAvg {:?}", values(&fedavg));
    for r in [
        Rule::Median,
        Rule::TrimmedMean { beta: 0.2 },
        Rule::Krum {
            malicious: 1,
            keep: 1,
        },
        Rule::Krum {
            malicious: 1,
            keep: 3,
        },
        Rule::Bulyan { malicious: 1 },
    ] {
        let m = run(rule(r), &g, &rs);
        assert!(off(&m) < 0.05, "{r:?}: {:?}", values(&m));
    }
}

#[test]
fn robust_rules_take_diffs_onto_the_global_and_refuse_partials() {
    let g = model(&[10.0, 20.0], 1);
    let diff = |v: &[f32]| {
        let mut m = (*model(v, 1).load().unwrap()).clone();
        m.params_type = ParamsType::Diff;
        ModelRef::from(m)
    };
    let rs = [diff(&[1.0, -1.0]), diff(&[2.0, -2.0]), diff(&[3.0, 5.0])];
    let m = run(rule(Rule::Median), &g, &rs);
    assert_eq!(values(&m), vec![12.0, 19.0]);
    assert_eq!(m.params_type, ParamsType::Full);

    let mut partial = (*model(&[1.0, 1.0], 1).load().unwrap()).clone();
    partial
        .meta
        .insert(META_PARTIAL_WEIGHT.into(), MetaValue::Float(2.0));
    let agg = Aggregator::new(rule(Rule::Median));
    let mut round = agg.round();
    assert_eq!(
        round.add_ref(&g, &partial.into(), 1.0),
        Err(AggregateError::PartialToRobust)
    );
    assert_eq!(round.count(), 0);
}

#[test]
fn fedopt_sgd_with_lr_one_and_no_momentum_equals_fedavg_bit_for_bit() {
    let g = model(&[0.125, -3.5, 7.0e-4, 12.0], 1);
    let rs = [
        model(&[0.3, -3.1, 1.1e-3, 11.0], 10),
        model(&[0.2, -2.9, -4.0e-4, 12.5], 30),
        model(&[0.1, -3.7, 9.0e-4, 13.0], 7),
    ];
    let fedavg = run(AggregatorSpec::default(), &g, &rs);
    let sgd = AggregatorSpec {
        opt: Some(ServerOpt::Sgd {
            lr: 1.0,
            momentum: 0.0,
            cosine: None,
        }),
        ..AggregatorSpec::default()
    };
    let mut agg = Aggregator::new(sgd);
    let opt = aggregate(&mut agg, &g, &rs).unwrap();
    // The weights are FedAvg's bit for bit; the momentum buffer travels beside them.
    assert_eq!(opt.params["w"], fedavg.params["w"]);
    assert_eq!(opt.params["step"], fedavg.params["step"]);
    assert!(opt.params.contains_key(&format!("{FEDOPT_M}w")));
    assert_eq!(opt.params[FEDOPT_STEPS].to_f32_vec(), vec![1.0]);
}

#[test]
fn fedavgm_carries_momentum_into_the_next_round() {
    // w = 0, every site returns 1. Round 1: v = 1, w = 1·η = 0.5. Round 2: Δ = 0.5,
    // v = 0.9·1 + 0.5 = 1.4, w = 0.5 + 0.7 = 1.2 (it overshoots: momentum).
    let spec = AggregatorSpec {
        opt: Some(ServerOpt::Sgd {
            lr: 0.5,
            momentum: 0.9,
            cosine: None,
        }),
        ..AggregatorSpec::default()
    };
    let mut agg = Aggregator::new(spec);
    let mut g = model(&[0.0], 1);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let next = aggregate(&mut agg, &g, &[model(&[1.0], 1), model(&[1.0], 1)]).unwrap();
        seen.push(values(&next)[0]);
        g = next.into();
    }
    assert!(
        (seen[0] - 0.5).abs() < 1e-7 && (seen[1] - 1.2).abs() < 1e-6,
        "{seen:?}"
    );
    // The integer tensor is not optimized: it takes the aggregate.
    assert_eq!(g.load().unwrap().params["step"].to_f32_vec(), vec![1.0]);
}

#[test]
fn fedprox_sends_mu_and_aggregates_like_fedavg() {
    let spec = AggregatorSpec {
        fedprox_mu: Some(0.01),
        ..AggregatorSpec::default()
    };
    let agg = Aggregator::new(spec);
    assert_eq!(
        agg.task_meta(),
        vec![(META_FEDPROX_MU.to_string(), MetaValue::Float(0.01))]
    );
    let g = model(&[0.0], 1);
    let rs = [model(&[1.0], 1), model(&[3.0], 3)];
    assert_eq!(
        run(spec, &g, &rs).params,
        run(AggregatorSpec::default(), &g, &rs).params
    );
    assert!(Aggregator::default().task_meta().is_empty());
}

#[test]
fn a_refused_result_leaves_a_robust_round_as_it_was() {
    let g = model(&[0.0, 0.0], 1);
    let agg = Aggregator::new(rule(Rule::Median));
    let mut round = agg.round();
    round.add_ref(&g, &model(&[1.0, 2.0], 2), 2.0).unwrap();
    let short = model(&[1.0], 1);
    assert!(round.add_ref(&g, &short, 1.0).is_err());
    assert_eq!(round.count(), 1);
    assert_eq!(round.metrics()["loss"], 2.0);
    let a = agg.clone();
    assert_eq!(values(&a.finish(round, &g).unwrap()), vec![1.0, 2.0]);
}

fn scaffold_result(w: &[f32], c_diff: &[f32], samples: i64) -> ModelRef {
    let mut m = (*model(w, samples).load().unwrap()).clone();
    m.params.insert(
        format!("{SCAFFOLD_C_DIFF}w"),
        Tensor::from_f32(vec![c_diff.len()], c_diff).unwrap(),
    );
    m.params.insert(
        format!("{SCAFFOLD_C_DIFF}step"),
        Tensor::from_f32(vec![1], &[0.0]).unwrap(),
    );
    m.into()
}

#[test]
fn scaffold_starts_from_zero_controls_and_its_first_round_is_fedavg() {
    let spec = AggregatorSpec {
        scaffold: true,
        ..AggregatorSpec::default()
    };
    let agg = Aggregator::new(spec).for_clients(4);
    let g = agg.prepare(model(&[1.0, 2.0], 1)).unwrap();
    let c0 = g.load().unwrap();
    // A zero control for every f32 weight; none for the integer counter.
    assert_eq!(values(&c0), vec![1.0, 2.0]);
    assert_eq!(
        c0.params[&format!("{SCAFFOLD_C_GLOBAL}w")].to_f32_vec(),
        vec![0.0, 0.0]
    );
    assert!(!c0.params.contains_key(&format!("{SCAFFOLD_C_GLOBAL}step")));
    // The learners' weights only; the int tensor has no control.
    let rs = [
        scaffold_result(&[2.0, 2.0], &[0.5, -1.0], 1),
        scaffold_result(&[4.0, 0.0], &[1.5, 3.0], 3),
    ];
    let rs: Vec<ModelRef> = rs
        .iter()
        .map(|r| {
            let mut m = (*r.load().unwrap()).clone();
            m.params.remove(&format!("{SCAFFOLD_C_DIFF}step"));
            m.into()
        })
        .collect();
    let mut a = agg.clone();
    let next = aggregate(&mut a, &g, &rs).unwrap();
    let fedavg = run(
        AggregatorSpec::default(),
        &model(&[1.0, 2.0], 1),
        &[model(&[2.0, 2.0], 1), model(&[4.0, 0.0], 3)],
    );
    assert_eq!(next.params["w"], fedavg.params["w"]);
    // c = 0 + |S|/N · mean(Δc) = 2/4 · (0.25·(0.5, −1) + 0.75·(1.5, 3)) = (0.625, 1.0).
    assert_eq!(
        next.params[&format!("{SCAFFOLD_C_GLOBAL}w")].to_f32_vec(),
        vec![0.625, 1.0]
    );
    // Full participation (FLARE's rule when N is not known) adds the whole mean.
    let mut full = Aggregator::new(spec);
    let next = aggregate(&mut full, &g, &rs).unwrap();
    assert_eq!(
        next.params[&format!("{SCAFFOLD_C_GLOBAL}w")].to_f32_vec(),
        vec![1.25, 2.0]
    );
}

#[test]
fn a_scaffold_result_without_its_control_change_is_refused_whole() {
    let spec = AggregatorSpec {
        scaffold: true,
        ..AggregatorSpec::default()
    };
    let agg = Aggregator::new(spec);
    let g = agg.prepare(model(&[1.0, 2.0], 1)).unwrap();
    let mut round = agg.round();
    let e = round.add_ref(&g, &model(&[1.0, 1.0], 1), 1.0).unwrap_err();
    assert!(e.to_string().contains("scaffold_c_diff"), "{e}");
    let bad = {
        let mut m = (*model(&[1.0, 1.0], 1).load().unwrap()).clone();
        m.params.insert(
            format!("{SCAFFOLD_C_DIFF}w"),
            Tensor::from_f32(vec![2], &[f32::NAN, 0.0]).unwrap(),
        );
        ModelRef::from(m)
    };
    let e = round.add_ref(&g, &bad, 1.0).unwrap_err();
    assert_eq!(e, AggregateError::NonFinite("scaffold_c_diff.w".into()));
    assert_eq!(round.count(), 0);
}

#[test]
fn a_stored_global_with_state_aggregates_like_one_in_memory() {
    let spec = AggregatorSpec {
        opt: Some(ServerOpt::Adam {
            eta: 0.1,
            beta_1: 0.9,
            beta_2: 0.99,
            tau: 1e-3,
        }),
        ..AggregatorSpec::default()
    };
    let agg = Aggregator::new(spec);
    let g0 = model(&[0.5, -0.5], 1);
    let g1 = ModelRef::from(aggregate(&mut agg.clone(), &g0, &[model(&[1.0, 1.0], 1)]).unwrap());
    let stored = ModelRef::Stored(Arc::new(crate::stored::StoredModel::from_memory(
        &g1.load().unwrap(),
    )));
    let rs = [model(&[2.0, 0.0], 1), model(&[0.0, 3.0], 2)];
    let from_memory = aggregate(&mut agg.clone(), &g1, &rs).unwrap();
    let from_stored = aggregate(&mut agg.clone(), &stored, &rs).unwrap();
    assert_eq!(from_memory.params, from_stored.params);
    assert_eq!(from_stored.params[FEDOPT_STEPS].to_f32_vec(), vec![2.0]);
    // The task view leaves the moments with the aggregator.
    let view = task_view(&stored).unwrap();
    assert!(view.tensors().iter().all(|t| !t.name.starts_with("fedopt")));
    assert_eq!(view.tensors().len(), 2);
    assert_eq!(
        view.load().unwrap().params["w"],
        g1.load().unwrap().params["w"]
    );
}

/// The state in a global model comes from a peer in a swarm: bad state is an error, never a
/// panic, and never a silently restarted optimizer.
#[test]
fn bad_state_in_the_global_model_is_refused() {
    let spec = AggregatorSpec {
        opt: Some(ServerOpt::Adam {
            eta: 0.1,
            beta_1: 0.9,
            beta_2: 0.99,
            tau: 1e-3,
        }),
        ..AggregatorSpec::default()
    };
    let with = |name: &str, t: Tensor| {
        let mut m = (*model(&[0.5, -0.5], 1).load().unwrap()).clone();
        m.params.insert(name.to_string(), t);
        ModelRef::from(m)
    };
    let rs = [model(&[1.0, 1.0], 1)];
    for (name, t) in [
        (FEDOPT_STEPS, Tensor::from_i64(vec![1], &[-1]).unwrap()),
        (FEDOPT_STEPS, Tensor::from_f32(vec![1], &[1.5]).unwrap()),
        (FEDOPT_STEPS, Tensor::from_i64(vec![2], &[1, 1]).unwrap()),
        (
            &format!("{FEDOPT_M}w") as &str,
            Tensor::from_f32(vec![3], &[0.0; 3]).unwrap(),
        ),
    ] {
        let g = with(name, t);
        let e = aggregate(&mut Aggregator::new(spec), &g, &rs);
        assert!(e.is_err(), "{name}: {e:?}");
    }
}

// ---- DP-FedAvg ----

use crate::dp::accountant::RdpAccountant;
use crate::dp::{AdaptiveClipping, Clipping, DpSpec, Gaussian, NoiseSeed, noise_rng};

fn dp(z: f64, clipping: Clipping) -> AggregatorSpec {
    AggregatorSpec {
        dp: Some(DpSpec {
            noise_multiplier: z,
            clipping,
            target_delta: 1e-5,
            noise_seed: NoiseSeed([3; 32]),
        }),
        ..AggregatorSpec::default()
    }
}

fn fixed(z: f64, norm: f64) -> AggregatorSpec {
    dp(z, Clipping::Fixed { norm })
}

/// A model with weights `w`, an integer counter `step` and `samples` samples.
fn counted(w: &[f32], step: i64, samples: i64, params_type: ParamsType) -> ModelRef {
    let mut m = (*model(w, samples).load().unwrap()).clone();
    m.params
        .insert("step".into(), Tensor::from_i64(vec![1], &[step]).unwrap());
    m.params_type = params_type;
    m.into()
}

fn close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
}

#[test]
fn dp_clips_each_update_and_averages_them_with_equal_weights() {
    // Without noise: updates of norm 5 and 0.5 against C = 1 become (0.6, 0.8, 0) and
    // (0.3, 0.4, 0), whose plain mean is (0.45, 0.6, 0), whatever the sample counts.
    let g = counted(&[1.0, 1.0, 1.0], 7, 1, ParamsType::Full);
    for params_type in [ParamsType::Full, ParamsType::Diff] {
        let base = if params_type == ParamsType::Full {
            1.0
        } else {
            0.0
        };
        let rs = [
            counted(&[base + 3.0, base + 4.0, base], 100, 1, params_type),
            counted(&[base + 0.3, base + 0.4, base], 100, 9, params_type),
        ];
        let agg = Aggregator::new(fixed(0.0, 1.0));
        let mut round = agg.round();
        for r in &rs {
            round
                .add_ref(&g, r, crate::aggregate::weight_of_ref(r))
                .unwrap();
        }
        // The round's metrics and weight are still the results' own (loss = samples:
        // (1 + 81)/10 by sample count).
        assert!(
            (round.metrics()["loss"] - 8.2).abs() < 1e-12,
            "{:?}",
            round.metrics()
        );
        assert_eq!(round.total_weight(), 10.0);
        let next = agg.finish(round, &g).unwrap();
        close(&values(&next), &[1.45, 1.6, 1.0]);
        // The integer counter cannot be clipped: it keeps the global's value.
        assert_eq!(
            next.params["step"],
            Tensor::from_i64(vec![1], &[7]).unwrap()
        );
        assert_eq!(next.params_type, ParamsType::Full);
    }
    // Both within C: the plain mean of the results, not FedAvg's sample-weighted one.
    let rs = [
        counted(&[1.2, 1.0, 1.0], 7, 1, ParamsType::Full),
        counted(&[1.0, 1.4, 1.0], 7, 3, ParamsType::Full),
    ];
    let next = run(fixed(0.0, 1.0), &g, &rs);
    close(&values(&next), &[1.1, 1.2, 1.0]);
}

#[test]
fn dp_state_and_privacy_metrics_are_in_the_new_global_and_not_in_its_views() {
    let g = model(&[0.0, 0.0], 1);
    let next = ModelRef::from(run(fixed(1.0, 2.0), &g, &[model(&[1.0, 1.0], 1)]));
    let m = next.load().unwrap();
    assert_eq!(m.params[DP_CLIP_NORM].to_f32_vec(), vec![2.0]);
    assert_eq!(
        m.params[DP_ROUNDS],
        Tensor::from_i64(vec![1], &[1]).unwrap()
    );
    assert_eq!(m.params[DP_RDP].numel(), 151);
    assert_eq!(m.metrics[METRIC_DELTA], 1e-5);
    assert_eq!(m.metrics[METRIC_CLIP], 2.0);
    assert!(m.metrics[METRIC_EPSILON] > 0.0);
    for view in [weights(&next).unwrap(), task_view(&next).unwrap()] {
        let names: Vec<String> = view.tensors().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["step", "w"]);
    }
    // A second round counts on from the first.
    let after = run(fixed(1.0, 2.0), &next, &[model(&[1.0, 1.0], 1)]);
    assert_eq!(
        after.params[DP_ROUNDS],
        Tensor::from_i64(vec![1], &[2]).unwrap()
    );
    assert!(after.metrics[METRIC_EPSILON] > m.metrics[METRIC_EPSILON]);
}

#[test]
fn dp_noise_has_standard_deviation_z_c_over_m() {
    // Results equal to the global: the new model minus the old is the noise alone.
    let n = 100_000;
    let g = model(&vec![0.5; n], 1);
    let (z, c, m) = (2.0, 0.5, 4);
    let rs: Vec<ModelRef> = (0..m).map(|_| g.clone()).collect();
    let agg = Aggregator::new(fixed(z, c));
    let next = ModelRef::from(aggregate(&mut agg.clone(), &g, &rs).unwrap());
    let noise: Vec<f64> = values(&next.load().unwrap())
        .iter()
        .map(|x| f64::from(*x) - 0.5)
        .collect();
    let mean = noise.iter().sum::<f64>() / n as f64;
    let std = (noise.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    let want = z * c / m as f64;
    assert!((std / want - 1.0).abs() < 0.02, "std {std}, z·C/m {want}");
    assert!(mean.abs() < 4.0 * want / (n as f64).sqrt(), "{mean}");
    // The next round draws from its own stream.
    let again = aggregate(&mut agg.clone(), &next, std::slice::from_ref(&next)).unwrap();
    let before = values(&next.load().unwrap());
    let second: Vec<f32> = values(&again)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    let first: Vec<f32> = before.iter().map(|x| x - 0.5).collect();
    assert_ne!(first[..8], second[..8]);
    // The same seed and round give the same noise; another seed other noise.
    let same = aggregate(&mut agg.clone(), &g, &rs).unwrap();
    assert_eq!(same.params["w"], next.load().unwrap().params["w"]);
    let mut other = fixed(z, c);
    if let Some(d) = other.dp.as_mut() {
        d.noise_seed = NoiseSeed([4; 32]);
    }
    let other = run(other, &g, &rs);
    assert_ne!(other.params["w"], same.params["w"]);
}

#[test]
fn each_rounds_epsilon_is_the_accountants_over_the_rounds_so_far() {
    let z = 1.3;
    let agg = Aggregator::new(fixed(z, 1.0)).for_clients(5);
    let mut acc = RdpAccountant::new();
    let mut g = model(&[0.0, 0.0], 1);
    for m in [4usize, 3, 5, 5] {
        let rs: Vec<ModelRef> = (0..m).map(|i| model(&[i as f32, 1.0], 1)).collect();
        let next = aggregate(&mut agg.clone(), &g, &rs).unwrap();
        acc.step(z, m as f64 / 5.0).unwrap();
        let (want, _) = acc.epsilon(1e-5).unwrap();
        let got = next.metrics[METRIC_EPSILON];
        assert!(
            (got / want - 1.0).abs() < 1e-5,
            "{m} results: ε {got}, accountant {want}"
        );
        g = next.into();
    }
    assert_eq!(acc.history.len(), 3, "q = 4/5, 3/5, then 5/5 twice");
}

/// Andrew et al.'s rule through the aggregator: update norms drawn from a lognormal with
/// median 1 and log-sd 0.5; from Flower's initial 0.1 the clipping norm settles on the
/// target quantile (0.5: the median, 1.0).
#[test]
fn adaptive_clipping_follows_the_median_update_norm() {
    let m = 50;
    let spec = dp(0.1, Clipping::Adaptive(AdaptiveClipping::DEFAULT));
    let agg = Aggregator::new(spec);
    let mut draws = Gaussian::new(noise_rng(&NoiseSeed([5; 32]), 77));
    let mut g = model(&[0.0, 0.0], 1);
    let mut clips = Vec::new();
    for _ in 0..200 {
        let base = values(&g.load().unwrap());
        let rs: Vec<ModelRef> = (0..m)
            .map(|_| {
                let norm = (0.5 * draws.sample()).exp() as f32;
                model(&[base[0] + norm, base[1]], 1)
            })
            .collect();
        let next = aggregate(&mut agg.clone(), &g, &rs).unwrap();
        clips.push(next.metrics[METRIC_CLIP]);
        g = next.into();
    }
    assert_eq!(clips[0], 0.1);
    let tail = &clips[150..];
    let geo = (tail.iter().map(|c| c.ln()).sum::<f64>() / tail.len() as f64).exp();
    assert!((geo - 1.0).abs() < 0.05, "C settled at {geo}");
}

#[test]
fn dp_refuses_partials_and_other_algorithms() {
    let g = model(&[0.0], 1);
    let mut partial = (*model(&[1.0], 1).load().unwrap()).clone();
    partial
        .meta
        .insert(META_PARTIAL_WEIGHT.into(), MetaValue::Float(2.0));
    let mut round = Aggregator::new(fixed(1.0, 1.0)).round();
    let e = round.add_ref(&g, &partial.into(), 2.0).unwrap_err();
    assert!(e.to_string().contains("partial"), "{e}");
    assert_eq!(round.count(), 0);
    for spec in [
        AggregatorSpec {
            rule: Rule::Median,
            ..fixed(1.0, 1.0)
        },
        AggregatorSpec {
            scaffold: true,
            ..fixed(1.0, 1.0)
        },
        AggregatorSpec {
            opt: Some(ServerOpt::Sgd {
                lr: 1.0,
                momentum: 0.0,
                cosine: None,
            }),
            ..fixed(1.0, 1.0)
        },
    ] {
        assert!(spec.dp_conflict().is_some());
        // SCAFFOLD refuses the result first (it carries no control change); the others
        // refuse to finish.
        let e = aggregate(&mut Aggregator::new(spec), &g, &[model(&[1.0], 1)]).unwrap_err();
        assert!(spec.scaffold || e.to_string().contains("DP-FedAvg"), "{e}");
    }
    assert_eq!(fixed(1.0, 1.0).dp_conflict(), None);
    assert_eq!(
        AggregatorSpec {
            fedprox_mu: Some(0.01),
            ..fixed(1.0, 1.0)
        }
        .dp_conflict(),
        None
    );
}

#[test]
fn bad_dp_state_in_the_global_model_is_refused() {
    let with = |name: &str, t: Tensor| {
        let mut m = (*model(&[0.5, -0.5], 1).load().unwrap()).clone();
        m.params.insert(name.to_string(), t);
        ModelRef::from(m)
    };
    let rs = [model(&[1.0, 1.0], 1)];
    for (name, t) in [
        (DP_CLIP_NORM, Tensor::from_f32(vec![1], &[-1.0]).unwrap()),
        (
            DP_CLIP_NORM,
            Tensor::from_f32(vec![1], &[f32::NAN]).unwrap(),
        ),
        (DP_CLIP_NORM, Tensor::from_i64(vec![1], &[1]).unwrap()),
        (DP_ROUNDS, Tensor::from_i64(vec![1], &[-3]).unwrap()),
        (DP_ROUNDS, Tensor::from_i64(vec![2], &[1, 1]).unwrap()),
        (DP_RDP, Tensor::from_f32(vec![3], &[0.0; 3]).unwrap()),
        (DP_RDP, Tensor::from_f32(vec![151], &[-1.0; 151]).unwrap()),
    ] {
        let g = with(name, t);
        let e = aggregate(&mut Aggregator::new(fixed(1.0, 1.0)), &g, &rs);
        assert!(e.is_err(), "{name}: {e:?}");
    }
}
