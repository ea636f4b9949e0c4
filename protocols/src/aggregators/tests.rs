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
