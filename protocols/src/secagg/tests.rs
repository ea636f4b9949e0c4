//! Deterministic simulations of SecAgg+ rounds with dropouts, against the plaintext mean.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::time::Time;

const T0: Time = Time::ZERO;
const STAGE: Duration = Duration::from_secs(60);

fn names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("site-{i:02}")).collect()
}

/// When a site stops answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drop {
    /// Never: it takes part to the end.
    Never,
    /// After it advertised its keys (no shares).
    AfterKeys,
    /// After it sent its shares (no masked input).
    AfterShares,
    /// After it uploaded its masked input (no unmask answer).
    AfterInput,
}

struct Outcome {
    result: Result<Unmasked, String>,
    agg: SecAggAggregator,
    /// What the aggregator received of each site's masked input.
    uploads: BTreeMap<String, Vec<u32>>,
}

/// Runs one round among `updates` (site → (update, samples)) with `drops`, every message
/// delivered in order; silent sites are waited out by the stage timeouts.
fn run(
    args: SecAggArgs,
    updates: &BTreeMap<String, (Vec<f32>, f64)>,
    drops: &BTreeMap<String, Drop>,
    seed: u64,
) -> Outcome {
    let sites: Vec<String> = updates.keys().cloned().collect();
    let params = args.resolve(sites.len()).unwrap();
    let len = updates.values().next().unwrap().0.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ctx = format!("job-1/round-{seed}");
    let mut agg =
        SecAggAggregator::new(params, &sites, ctx.clone(), len, rng.random(), STAGE, T0).unwrap();
    let mut clients: BTreeMap<String, SecAggClient> = sites
        .iter()
        .map(|s| {
            (
                s.clone(),
                SecAggClient::new(s.clone(), ctx.clone(), rng.random()),
            )
        })
        .collect();
    let drop_of = |s: &str| drops.get(s).copied().unwrap_or(Drop::Never);
    let mut uploads = BTreeMap::new();
    let mut now = T0;
    loop {
        let mut progressed = false;
        while let Some(out) = agg.poll_output() {
            progressed = true;
            match out {
                AggOutput::Send { to, msg } => {
                    let d = drop_of(&to);
                    let silent = match &msg {
                        ToClient::Setup { .. } => false,
                        ToClient::NeighbourKeys { .. } => d == Drop::AfterKeys,
                        ToClient::Shares { .. } => matches!(d, Drop::AfterKeys | Drop::AfterShares),
                        ToClient::Unmask { .. } => d != Drop::Never,
                    };
                    if silent {
                        continue;
                    }
                    let c = clients.get_mut(&to).unwrap();
                    match c.handle(&msg).unwrap() {
                        Some(reply) => {
                            let r = agg.handle(&to, reply, now);
                            // Once unmasked, the remaining answers are late and refused.
                            assert!(r.is_ok() || agg.is_done(), "{r:?}");
                        }
                        None => {
                            let (u, w) = &updates[&to];
                            let masked = c.mask(u.iter().copied(), *w).unwrap();
                            agg.add_input(&to, &masked).unwrap();
                            uploads.insert(to.clone(), masked);
                            if agg.inputs().len() == agg.expected_inputs().len() {
                                agg.close_inputs(now);
                            }
                        }
                    }
                }
                AggOutput::Done(u) => {
                    return Outcome {
                        result: Ok(u),
                        agg,
                        uploads,
                    };
                }
                AggOutput::Aborted { reason } => {
                    return Outcome {
                        result: Err(reason),
                        agg,
                        uploads,
                    };
                }
            }
        }
        if !progressed {
            if agg.taking_inputs() {
                agg.close_inputs(now);
                continue;
            }
            let at = agg.poll_timeout().expect("a stalled round has a deadline");
            now = at;
            agg.handle_timeout(now);
        }
    }
}

fn random_updates(n: usize, len: usize, seed: u64) -> BTreeMap<String, (Vec<f32>, f64)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    names(n)
        .into_iter()
        .map(|s| {
            let u: Vec<f32> = (0..len).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            (s, (u, f64::from(rng.random_range(100u32..=900))))
        })
        .collect()
}

/// The plaintext weighted mean over `sites`, with Flower's weights.
fn plain_mean(
    updates: &BTreeMap<String, (Vec<f32>, f64)>,
    sites: &[String],
    max_weight: f64,
) -> Vec<f64> {
    let len = updates.values().next().unwrap().0.len();
    let mut acc = vec![0.0; len];
    let mut total = 0.0;
    for s in sites {
        let (u, samples) = &updates[s];
        let w = (samples / max_weight).min(1.0);
        total += w;
        for (a, x) in acc.iter_mut().zip(u) {
            *a += w * f64::from(*x);
        }
    }
    acc.into_iter().map(|a| a / total).collect()
}

/// The most the unmasked mean may differ from the plaintext one: `n` rounding steps on the
/// weighted sum and on the total weight.
fn bound(n: usize, args: &SecAggArgs, total_weight: f64, mean_abs: f64) -> f64 {
    let e = n as f64 * quantization_step(args.clipping_range, args.quantization_range);
    e * (1.0 + mean_abs) / (total_weight - e) + 1e-6 // the f32 of the result
}

fn check_mean(out: &Unmasked, updates: &BTreeMap<String, (Vec<f32>, f64)>, args: &SecAggArgs) {
    let want = plain_mean(updates, &out.survivors, args.max_weight);
    let total: f64 = out
        .survivors
        .iter()
        .map(|s| (updates[s].1 / args.max_weight).min(1.0))
        .sum();
    assert!((out.total_weight - total * args.max_weight).abs() < 0.05);
    let mut worst: f64 = 0.0;
    for (got, w) in out.mean.iter().zip(&want) {
        let b = bound(out.survivors.len(), args, total, w.abs());
        let err = (f64::from(*got) - w).abs();
        assert!(err <= b, "error {err} above the bound {b}");
        worst = worst.max(err);
    }
    assert!(worst > 0.0, "quantization leaves some error");
}

fn ten_sites() -> SecAggArgs {
    SecAggArgs {
        num_shares: 5.0,
        reconstruction_threshold: 3.0,
        ..SecAggArgs::default()
    }
}

#[test]
fn ten_sites_without_dropouts_give_the_weighted_mean_within_the_quantization_bound() {
    let args = ten_sites();
    let updates = random_updates(10, 2_000, 1);
    let o = run(args, &updates, &BTreeMap::new(), 7);
    let out = o.result.unwrap();
    assert_eq!(out.survivors, names(10));
    assert!(out.dropped.is_empty());
    check_mean(&out, &updates, &args);
    // Only self-masks were rebuilt: nobody dropped.
    let (b, s) = o.agg.rebuilt();
    assert_eq!(b.len(), 10);
    assert!(s.is_empty());
}

#[test]
fn two_sites_dropping_after_their_upload_are_unmasked_from_their_neighbours_shares() {
    let args = ten_sites();
    let updates = random_updates(10, 500, 2);
    let drops = BTreeMap::from([
        ("site-03".to_string(), Drop::AfterInput),
        ("site-08".to_string(), Drop::AfterInput),
    ]);
    let o = run(args, &updates, &drops, 3);
    let out = o.result.unwrap();
    assert_eq!(out.survivors.len(), 10, "their inputs are in the sum");
    check_mean(&out, &updates, &args);
}

#[test]
fn two_sites_dropping_before_their_upload_leave_the_survivors_mean() {
    let args = ten_sites();
    let updates = random_updates(10, 500, 4);
    let drops = BTreeMap::from([
        ("site-02".to_string(), Drop::AfterShares),
        ("site-09".to_string(), Drop::AfterShares),
    ]);
    let o = run(args, &updates, &drops, 5);
    let out = o.result.unwrap();
    assert_eq!(out.dropped, ["site-02", "site-09"]);
    assert_eq!(out.survivors.len(), 8);
    check_mean(&out, &updates, &args);
    // The dropped sites' mask keys were rebuilt, the survivors' self-mask seeds: never both.
    let (b, s) = o.agg.rebuilt();
    assert_eq!(
        s.iter().cloned().collect::<Vec<_>>(),
        ["site-02", "site-09"]
    );
    assert!(b.is_disjoint(s));
    assert_eq!(b.len(), 8);
}

#[test]
fn a_site_silent_from_the_start_is_left_out_and_the_rest_aggregate() {
    let args = ten_sites();
    let updates = random_updates(10, 200, 6);
    let drops = BTreeMap::from([("site-05".to_string(), Drop::AfterKeys)]);
    let out = run(args, &updates, &drops, 9).result.unwrap();
    assert!(!out.survivors.contains(&"site-05".to_string()));
    assert!(
        out.dropped.is_empty(),
        "it never shared, so nothing to unmask"
    );
    check_mean(&out, &updates, &args);
}

#[test]
fn too_many_dropouts_abort_the_round_with_a_reason_and_reveal_nothing() {
    let args = ten_sites();
    let updates = random_updates(10, 100, 8);
    // Four of ten drop before uploading: some site's neighbourhood of five keeps fewer than
    // three live members.
    let drops: BTreeMap<String, Drop> = ["site-01", "site-02", "site-03", "site-04", "site-05"]
        .iter()
        .map(|s| (s.to_string(), Drop::AfterShares))
        .collect();
    let o = run(args, &updates, &drops, 11);
    let reason = o.result.unwrap_err();
    assert!(
        reason.contains("live in its neighbourhood, 3 needed"),
        "{reason}"
    );
    let (b, s) = o.agg.rebuilt();
    assert!(b.is_empty() && s.is_empty(), "nothing was rebuilt");
    assert!(o.agg.masked_sum().is_empty(), "the masked sum is dropped");
}

#[test]
fn too_few_unmask_answers_abort_at_the_deadline() {
    let args = ten_sites();
    let updates = random_updates(10, 50, 12);
    let drops: BTreeMap<String, Drop> = names(10)
        .into_iter()
        .take(8)
        .map(|s| (s, Drop::AfterInput))
        .collect();
    let reason = run(args, &updates, &drops, 13).result.unwrap_err();
    assert!(reason.starts_with("unmasking timed out"), "{reason}");
}

#[test]
fn what_the_aggregator_holds_of_one_site_is_uncorrelated_with_its_update() {
    let args = ten_sites();
    let len = 4_000;
    let mut worst: f64 = 0.0;
    for draw in 0..20u64 {
        let updates = random_updates(10, len, 100 + draw);
        let o = run(args, &updates, &BTreeMap::new(), 200 + draw);
        check_mean(o.result.as_ref().unwrap(), &updates, &args);
        for (site, masked) in &o.uploads {
            let x: Vec<f64> = updates[site].0.iter().map(|v| f64::from(*v)).collect();
            let y: Vec<f64> = masked[1..].iter().map(|v| f64::from(*v)).collect();
            worst = worst.max(correlation(&x, &y).abs());
            // The masked values spread over the whole modulus, as uniform noise does.
            let mean = y.iter().sum::<f64>() / y.len() as f64;
            assert!((mean / 2f64.powi(32) - 0.5).abs() < 0.02, "mean {mean}");
        }
    }
    // 200 uploads of 4,000 values: |r| of independent data stays below ~4.5/sqrt(4000).
    assert!(worst < 0.07, "correlation {worst}");
    // And the same check sees a plain quantized update at once.
    let q: Vec<f64> = (0..len)
        .map(|i| f64::from(quantize(i as f64 / len as f64, 8.0, 1 << 22, 0.5)))
        .collect();
    let x: Vec<f64> = (0..len).map(|i| i as f64 / len as f64).collect();
    assert!(correlation(&x, &q) > 0.99);
}

fn correlation(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    sxy / (sxx * syy).sqrt()
}

#[test]
fn a_site_asked_for_both_secrets_of_a_neighbour_refuses() {
    let args = ten_sites();
    let sites = names(3);
    let params = SecAggArgs {
        num_shares: 3.0,
        reconstruction_threshold: 2.0,
        ..args
    }
    .resolve(3)
    .unwrap();
    let mut agg = SecAggAggregator::new(params, &sites, "c", 4, 1, STAGE, T0).unwrap();
    let mut clients: Vec<SecAggClient> = sites
        .iter()
        .enumerate()
        .map(|(i, s)| SecAggClient::new(s.clone(), "c", [i as u8; 32]))
        .collect();
    // Run to the masked inputs.
    while let Some(AggOutput::Send { to, msg }) = agg.poll_output() {
        let i = sites.iter().position(|s| *s == to).unwrap();
        if let Some(r) = clients[i].handle(&msg).unwrap() {
            agg.handle(&to, r, T0).unwrap();
        } else {
            clients[i].mask([0.1f32; 4].into_iter(), 10.0).unwrap();
        }
    }
    let both = ToClient::Unmask {
        survivors: vec![sites[0].clone(), sites[1].clone()],
        dropped: vec![sites[1].clone()],
    };
    let err = clients[0].handle(&both).unwrap_err();
    assert!(
        err.to_string().contains("both survivor and dropped"),
        "{err}"
    );
    // A neighbour it holds nothing of, and a request that leaves itself out, too.
    let stranger = ToClient::Unmask {
        survivors: vec![sites[0].clone(), "site-99".into()],
        dropped: vec![],
    };
    assert!(clients[0].handle(&stranger).is_err());
    let fine = ToClient::Unmask {
        survivors: vec![sites[0].clone(), sites[1].clone(), sites[2].clone()],
        dropped: vec![],
    };
    assert!(clients[0].handle(&fine).is_ok());
    // One answer per round.
    assert!(clients[0].handle(&fine).is_err());
}

#[test]
fn out_of_turn_and_misaddressed_messages_are_refused_without_changing_the_round() {
    let sites = names(4);
    let params = SecAggArgs::default().resolve(4).unwrap();
    let mut agg = SecAggAggregator::new(params, &sites, "c", 2, 3, STAGE, T0).unwrap();
    assert!(
        agg.handle(
            "site-77",
            ToAggregator::Keys(PublicKeys {
                c: [1; 32],
                s: [2; 32]
            }),
            T0
        )
        .is_err()
    );
    let shares = ToAggregator::Shares {
        shares: BTreeMap::new(),
    };
    assert!(agg.handle("site-01", shares, T0).is_err());
    assert!(agg.add_input("site-01", &[0, 0, 0]).is_err());
    let keys = ToAggregator::Keys(PublicKeys {
        c: [1; 32],
        s: [2; 32],
    });
    agg.handle("site-01", keys.clone(), T0).unwrap();
    assert!(agg.handle("site-01", keys, T0).is_err(), "twice");
    // A setup for another round is refused by the site.
    let mut c = SecAggClient::new("site-01", "round-2", [0; 32]);
    let setup = ToClient::Setup {
        context: "round-1".into(),
        participants: sites.clone(),
        graph_seed: 0,
        params,
    };
    assert!(
        c.handle(&setup)
            .unwrap_err()
            .to_string()
            .contains("round-1")
    );
}

#[test]
fn every_resolved_neighbourhood_is_symmetric() {
    // A site gets shares only from sites whose keys it got: its neighbours must have it
    // as a neighbour too, for every count and fraction of shares.
    for n in 2..14 {
        for shares in (2..=n + 1).map(|k| k as f64).chain([0.3, 0.5, 0.8, 1.0]) {
            let Ok(p) = SecAggArgs {
                num_shares: shares,
                reconstruction_threshold: 2.0,
                ..SecAggArgs::default()
            }
            .resolve(n) else {
                continue;
            };
            let hoods = crate::secagg::neighbourhoods(&names(n), p.num_shares.into(), n as u64);
            for (site, hood) in &hoods {
                assert_eq!(hood.len(), usize::from(p.num_shares), "{n} sites, {shares}");
                for other in hood {
                    assert!(
                        hoods[other].contains(site),
                        "{n} sites, {shares} shares: {site} has {other}, not back"
                    );
                }
            }
        }
    }
}

#[test]
fn flower_rules_resolve_shares_and_thresholds() {
    let f = |shares: f64, t: f64, n: usize| {
        SecAggArgs {
            num_shares: shares,
            reconstruction_threshold: t,
            ..SecAggArgs::default()
        }
        .resolve(n)
        .map(|p| (p.num_shares, p.threshold))
    };
    assert_eq!(f(5.0, 3.0, 10), Ok((5, 3)));
    assert_eq!(f(4.0, 3.0, 10), Ok((5, 3)), "a count is made odd too");
    assert_eq!(f(4.0, 3.0, 4), Ok((4, 3)), "unless it is everyone");
    assert_eq!(
        f(0.5, 0.5, 10),
        Ok((5, 3)),
        "0.5·10 = 5, odd; round(2.5) = 3"
    );
    assert_eq!(f(0.4, 0.5, 10), Ok((5, 3)), "4 is made odd");
    assert_eq!(f(0.1, 0.5, 10), Ok((10, 5)), "two or fewer means everyone");
    assert_eq!(f(1.0, 0.1, 3), Ok((3, 2)), "the threshold is at least 2");
    assert!(f(5.0, 6.0, 10).is_err());
    assert!(f(2.5, 2.0, 10).is_err());
    assert!(f(5.0, 3.0, 1).is_err());
    let too_many = SecAggArgs::default().resolve(1025).unwrap_err();
    assert!(too_many.to_string().contains("1024"), "{too_many}");
    let bad = SecAggArgs {
        modulus_range: 3 << 20,
        ..SecAggArgs::default()
    };
    assert!(
        bad.check()
            .unwrap_err()
            .to_string()
            .contains("modulus_range")
    );
}

#[test]
fn quantization_matches_a_hand_computation() {
    // clip 1, 5 levels: scale 2, so x = 0.3 maps to 2.6, which rounds up when u < 0.6.
    assert_eq!(quantize(0.3, 1.0, 5, 0.59), 3);
    assert_eq!(quantize(0.3, 1.0, 5, 0.61), 2);
    assert_eq!(quantize(9.0, 1.0, 5, 0.0), 4, "clipped");
    assert_eq!(quantize(-9.0, 1.0, 5, 0.99), 0, "clipped");
    // Two values quantized to 3 and 2 sum to 5, i.e. 5/2 - 2·1 = 0.5 (0.3 + 0.2 exactly here).
    assert!((dequantize_sum(5, 2, 1.0, 5) - 0.5).abs() < 1e-12);
}

#[test]
fn neighbourhoods_form_a_regular_symmetric_graph() {
    let sites = names(10);
    let hoods = neighbourhoods(&sites, 5, 42);
    for (s, hood) in &hoods {
        assert_eq!(hood.len(), 5, "{s}");
        assert!(hood.contains(s));
        for n in hood {
            assert!(hoods[n].contains(s), "{s} - {n} is one-sided");
        }
    }
    assert_ne!(
        hoods,
        neighbourhoods(&sites, 5, 43),
        "the seed shuffles the ring"
    );
    let complete = neighbourhoods(&sites, 10, 1);
    assert!(complete.values().all(|h| h.len() == 10));
}

fn any_to_client() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..400)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Random bytes, decoded or not, never panic either side at any stage.
    #[test]
    fn random_bytes_never_panic_either_side(bytes in any_to_client(), stage in 0usize..4) {
        let sites = names(3);
        let params = SecAggArgs::default().resolve(3).unwrap();
        let mut agg = SecAggAggregator::new(params, &sites, "c", 3, 1, STAGE, T0).unwrap();
        let mut clients: Vec<SecAggClient> = sites
            .iter()
            .enumerate()
            .map(|(i, s)| SecAggClient::new(s.clone(), "c", [i as u8 + 1; 32]))
            .collect();
        // Advance honestly to `stage` messages.
        let mut delivered = 0;
        while delivered < stage * 3 {
            let Some(AggOutput::Send { to, msg }) = agg.poll_output() else { break };
            delivered += 1;
            let i = sites.iter().position(|s| *s == to).unwrap();
            match clients[i].handle(&msg) {
                Ok(Some(r)) => { let _ = agg.handle(&to, r, T0); }
                Ok(None) => {
                    if let Ok(m) = clients[i].mask([0.5f32; 3].into_iter(), 5.0) {
                        let _ = agg.add_input(&to, &m);
                    }
                }
                Err(_) => {}
            }
        }
        if let Ok(m) = crate::codec::decode::<ToAggregator>(&bytes, MAX_SECAGG_MESSAGE) {
            let _ = agg.handle("site-01", m, T0);
        }
        if let Ok(m) = crate::codec::decode::<ToClient>(&bytes, MAX_SECAGG_MESSAGE) {
            let _ = clients[1].handle(&m);
        }
        let words: Vec<u32> = bytes.chunks(4).map(|c| c.iter().fold(0u32, |a, b| a << 8 | u32::from(*b))).collect();
        let _ = agg.add_input("site-02", &words);
        agg.close_inputs(T0);
        agg.handle_timeout(T0 + STAGE);
        while agg.poll_output().is_some() {}
    }

    /// A secagg header or a masked-input model with random contents is an error, never a
    /// panic, at the site and at the aggregator.
    #[test]
    fn random_headers_and_masked_models_never_panic(text in ".{0,200}", bytes in any_to_client()) {
        let mut headers = std::collections::BTreeMap::new();
        for v in [text.clone(), hex::encode(&bytes)] {
            headers.insert(SECAGG_HEADER.to_string(), crate::MetaValue::Text(v));
            let _ = from_headers::<ToClient>(&headers);
            let _ = from_headers::<ToAggregator>(&headers);
        }
        let n = bytes.len() / 4;
        for dtype in [crate::DType::U32, crate::DType::F32, crate::DType::I8] {
            let size = if dtype == crate::DType::I8 { bytes.len() } else { n };
            let data = bytes[..size * dtype.size()].to_vec();
            if let Ok(t) = crate::Tensor::from_bytes(dtype, vec![size], data) {
                let mut m = crate::FLModel::default();
                m.params.insert(MASKED_TENSOR.to_string(), t);
                let _ = masked_input(&m);
            }
        }
    }

    /// Well-formed messages with random contents never panic either side.
    #[test]
    fn random_well_formed_messages_never_panic(
        xs in proptest::collection::vec(any::<u8>(), 0..6),
        ys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..6),
        key in any::<[u8; 32]>(),
    ) {
        let sites = names(3);
        let params = SecAggArgs::default().resolve(3).unwrap();
        let mut agg = SecAggAggregator::new(params, &sites, "c", 3, 1, STAGE, T0).unwrap();
        for s in &sites {
            let _ = agg.handle(s, ToAggregator::Keys(PublicKeys { c: key, s: key }), T0);
        }
        let shares: BTreeMap<String, ShareOf> = sites
            .iter()
            .zip(xs.iter().zip(&ys))
            .map(|(s, (x, y))| (s.clone(), ShareOf { x: *x, y: y.clone() }))
            .collect();
        let sealed: BTreeMap<String, serde_bytes::ByteBuf> = sites
            .iter()
            .zip(&ys)
            .map(|(s, y)| (s.clone(), serde_bytes::ByteBuf::from(y.clone())))
            .collect();
        for s in &sites {
            let _ = agg.handle(s, ToAggregator::Shares { shares: sealed.clone() }, T0);
            let _ = agg.handle(s, ToAggregator::Unmask { b: shares.clone(), s: shares.clone() }, T0);
        }
        let mut c = SecAggClient::new("site-01", "c", key);
        let _ = c.handle(&ToClient::Setup { context: "c".into(), participants: sites.clone(), graph_seed: 0, params });
        let keys: BTreeMap<String, PublicKeys> = sites.iter().map(|s| (s.clone(), PublicKeys { c: key, s: key })).collect();
        let _ = c.handle(&ToClient::NeighbourKeys { keys });
        let _ = c.handle(&ToClient::Shares { shares: sealed });
        let _ = c.handle(&ToClient::Unmask { survivors: sites.clone(), dropped: vec![] });
        agg.handle_timeout(T0 + STAGE);
        agg.close_inputs(T0);
        agg.handle_timeout(T0 + STAGE + STAGE);
    }
}
