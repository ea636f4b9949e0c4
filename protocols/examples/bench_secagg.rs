//! Cost of one SecAgg+ round against plain FedAvg, in one process: 8 sites, models of 1e6 and
//! 1e7 parameters. Prints, per size, the bytes each site sends (its model, or its key stages,
//! shares, masked input and unmasking shares, all CBOR-encoded as on the wire) and the compute
//! seconds of a round (every site's masking plus the aggregator's sum and unmasking, against
//! the plain weighted sum of the 8 models), median of 3.
//!
//! `cargo run --release -p flare-protocols --example bench_secagg [-- --json]`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flare_protocols::codec::encode;
use flare_protocols::secagg::{
    AggOutput, MAX_SECAGG_MESSAGE, SecAggAggregator, SecAggArgs, SecAggClient,
};
use flare_protocols::time::Time;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SITES: usize = 8;

struct Round {
    seconds: f64,
    bytes_per_site: f64,
}

fn secagg_round(updates: &[Vec<f32>], seed: u64) -> Round {
    let names: Vec<String> = (1..=SITES).map(|i| format!("site-{i}")).collect();
    let args = SecAggArgs {
        max_weight: 10_000.0,
        ..SecAggArgs::default()
    };
    let params = args.resolve(SITES).expect("parameters");
    let len = updates[0].len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let start = Instant::now();
    let mut agg = SecAggAggregator::new(
        params,
        &names,
        "bench/round-0",
        len,
        rng.random(),
        Duration::from_secs(60),
        Time::ZERO,
    )
    .expect("aggregator");
    let mut clients: BTreeMap<String, SecAggClient> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                SecAggClient::new(n.clone(), "bench/round-0", rng.random()),
            )
        })
        .collect();
    let mut sent = 0usize;
    while let Some(out) = agg.poll_output() {
        match out {
            AggOutput::Send { to, msg } => {
                let i = names.iter().position(|n| *n == to).expect("site");
                let c = clients.get_mut(&to).expect("client");
                match c.handle(&msg).expect("site step") {
                    Some(reply) => {
                        sent += encode(&reply, MAX_SECAGG_MESSAGE).expect("encode").len();
                        let _ = agg.handle(&to, reply, Time::ZERO);
                    }
                    None => {
                        let masked = c.mask(updates[i].iter().copied(), 1000.0).expect("mask");
                        sent += masked.len() * 4;
                        agg.add_input(&to, &masked).expect("input");
                        if agg.inputs().len() == SITES {
                            agg.close_inputs(Time::ZERO);
                        }
                    }
                }
            }
            AggOutput::Done(u) => {
                assert_eq!(u.mean.len(), len);
                break;
            }
            AggOutput::Aborted { reason } => panic!("{reason}"),
        }
    }
    Round {
        seconds: start.elapsed().as_secs_f64(),
        bytes_per_site: sent as f64 / SITES as f64,
    }
}

fn plain_round(updates: &[Vec<f32>]) -> Round {
    let start = Instant::now();
    let mut sum = vec![0f64; updates[0].len()];
    for u in updates {
        for (s, x) in sum.iter_mut().zip(u) {
            *s += 1000.0 * f64::from(*x);
        }
    }
    let mean: Vec<f32> = sum.iter().map(|s| (s / 8000.0) as f32).collect();
    std::hint::black_box(mean);
    Round {
        seconds: start.elapsed().as_secs_f64(),
        bytes_per_site: (updates[0].len() * 4) as f64,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let mut rows = Vec::new();
    for len in [1_000_000usize, 10_000_000] {
        let mut rng = ChaCha8Rng::seed_from_u64(len as u64);
        let updates: Vec<Vec<f32>> = (0..SITES)
            .map(|_| (0..len).map(|_| rng.random_range(-0.01f32..0.01)).collect())
            .collect();
        let (mut on, mut off, mut bytes_on, mut bytes_off) = (vec![], vec![], 0.0, 0.0);
        for rep in 0..3 {
            let r = secagg_round(&updates, rep);
            on.push(r.seconds);
            bytes_on = r.bytes_per_site;
            let p = plain_round(&updates);
            off.push(p.seconds);
            bytes_off = p.bytes_per_site;
        }
        let (on, off) = (median(on), median(off));
        rows.push((len, on, off, bytes_on, bytes_off));
    }
    if json {
        let out: Vec<String> = rows
            .iter()
            .map(|(len, on, off, b_on, b_off)| {
                format!(
                    "{{\"params\":{len},\"sites\":{SITES},\"secagg_s\":{on:.4},\"plain_s\":{off:.4},\"secagg_bytes_per_site\":{b_on:.0},\"plain_bytes_per_site\":{b_off:.0}}}"
                )
            })
            .collect();
        println!("[{}]", out.join(","));
        return;
    }
    println!(
        "| params | sites | bytes/site plain | bytes/site SecAgg+ | ratio | compute s plain | compute s SecAgg+ |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (len, on, off, b_on, b_off) in rows {
        println!(
            "| {len} | {SITES} | {b_off:.0} | {b_on:.0} | {:.4} | {off:.3} | {on:.3} |",
            b_on / b_off
        );
    }
}
