//! Deterministic simulations of the statistics controller with the sites' real side
//! ([`site::execute`] and its cleansers) behind a virtual clock, checked against the pooled
//! data computed directly: count and mean exact (the data are multiples of 1/16, so every sum
//! is exact in f64 whatever its order), variance within 1e-9 relative, histograms equal to
//! the pooled data's over the same buckets. Faults: sites that fail, fall silent, answer
//! late, twice, or with garbage, and a site that drops out between the passes; property tests
//! feed random fault mixes and corrupted answers and check that the controller never panics
//! and never lets an unusable answer into the result.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::statistics::{
    DropReason, Event, Output, StatisticsController, StatsControllerConfig, StatsControllerError,
};
use crate::model::MetaValue;
use crate::shareable::{ReturnCode, Shareable, TaskId, TaskResult};
use crate::stats::wire::{self, HEADER_STATS_DATA, HEADER_STATS_TASK};
use crate::stats::{
    AddNoiseToMinMax, Cleanser, FeatureMap, FirstPass, GLOBAL, HistogramBinsCleanser,
    MinCountCleanser, Pass, SecondPass, SiteData, StatValue, Statistic, StatsConfig, Values, site,
};
use crate::time::Time;

const FULL: &str = r#"{"count":{},"failure_count":{},"sum":{},"mean":{},"min":{},"max":{},
    "var":{},"stddev":{},"histogram":{"*":{"bins":20},"Age":{"bins":10,"range":[0,120]}}}"#;

fn config(json: &str) -> StatsConfig {
    serde_json::from_str(json).unwrap()
}

/// How a site answers one pass's task.
#[derive(Debug, Clone, PartialEq)]
enum Behaviour {
    /// Computes and answers after `ms`.
    Answer { ms: u64 },
    /// Never answers.
    Silent,
    /// Answers with an error code.
    Error { ms: u64 },
    /// Answers twice.
    Duplicate { ms: u64 },
    /// Answers after the pass's deadline.
    Late,
    /// Answers with a corrupted version of its honest answer.
    Corrupt { ms: u64, seed: u64 },
    /// Answers with random bytes as the payload.
    Bytes { ms: u64, bytes: Vec<u8> },
    /// Answers with the other pass's header.
    WrongPass { ms: u64 },
}

use Behaviour::*;

struct Site {
    name: String,
    data: SiteData,
    cleansers: Vec<Cleanser>,
    rng: ChaCha8Rng,
    behaviour: [Behaviour; 2],
}

fn default_cleansers() -> Vec<Cleanser> {
    vec![
        MinCountCleanser::new(10).into(),
        AddNoiseToMinMax::new(0.1, 0.3).unwrap().into(),
        HistogramBinsCleanser::new(10.0).unwrap().into(),
    ]
}

/// Multiples of 1/16 (so every sum is exact), `nan_every`-th value NaN, one +∞ among them.
fn column(rng: &mut ChaCha8Rng, n: usize, lo: i64, hi: i64, nan_every: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            if nan_every > 0 && i % nan_every == nan_every - 1 {
                if i == nan_every - 1 {
                    f64::INFINITY
                } else {
                    f64::NAN
                }
            } else {
                rng.random_range(lo..hi) as f64 / 16.0
            }
        })
        .collect()
}

/// A site's data: `Age` in [17, 90), `Income` in [-5000, 200000), for `train` and `test`,
/// with sizes that differ by site.
fn site_data(seed: u64, n: usize) -> SiteData {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut d = SiteData::new();
    for (ds, size) in [("train", n), ("test", n / 3 + 250)] {
        let age = column(&mut rng, size, 17 * 16, 90 * 16, 23);
        let income = column(&mut rng, size, -5000 * 16, 200_000 * 16, 31);
        d.entry("Age".into()).or_default().insert(ds.into(), age);
        d.entry("Income".into())
            .or_default()
            .insert(ds.into(), income);
    }
    d
}

fn sites(sizes: &[usize], behaviours: Vec<[Behaviour; 2]>) -> Vec<Site> {
    sizes
        .iter()
        .zip(behaviours)
        .enumerate()
        .map(|(i, (&n, behaviour))| Site {
            name: format!("site-{}", i + 1),
            data: site_data(100 + i as u64, n),
            cleansers: default_cleansers(),
            rng: ChaCha8Rng::seed_from_u64(900 + i as u64),
            behaviour,
        })
        .collect()
}

fn ctrl_config(json: &str, min_clients: Option<usize>) -> StatsControllerConfig {
    StatsControllerConfig {
        min_clients,
        ..StatsControllerConfig::new(config(json))
    }
}

struct Sim {
    ctrl: StatisticsController,
    now: Time,
    /// Pending deliveries: (time, sequence, site index, result).
    queue: Vec<(Time, u64, usize, TaskResult)>,
    seq: u64,
    sites: Vec<Site>,
    events: Vec<Event>,
    /// The honest answers each site computed, by pass.
    answers: BTreeMap<(usize, Pass), Shareable>,
}

impl Sim {
    fn new(cfg: StatsControllerConfig, sites: Vec<Site>) -> Sim {
        let names = sites.iter().map(|s| s.name.clone()).collect();
        Sim {
            ctrl: StatisticsController::new(cfg, names).unwrap(),
            now: Time::ZERO,
            queue: Vec::new(),
            seq: 0,
            sites,
            events: Vec::new(),
            answers: BTreeMap::new(),
        }
    }

    fn deliver_at(&mut self, at: Time, i: usize, r: TaskResult) {
        self.seq += 1;
        self.queue.push((at, self.seq, i, r));
    }

    fn later(&self, ms: u64) -> Time {
        self.now + Duration::from_millis(ms)
    }

    fn on_send(&mut self, to: String, task: crate::shareable::Task) {
        let i = self.sites.iter().position(|s| s.name == to).unwrap();
        let pass = wire::pass_of(&task.data).unwrap();
        let honest = {
            let s = &mut self.sites[i];
            site::execute(&task, &s.data, &s.cleansers, &mut s.rng)
        };
        self.answers.insert((i, pass), honest.data.clone());
        let idx = match pass {
            Pass::First => 0,
            Pass::Second => 1,
        };
        let with = |data: Shareable| TaskResult {
            task_id: task.id,
            round: task.round,
            data,
        };
        match self.sites[i].behaviour[idx].clone() {
            Answer { ms } => self.deliver_at(self.later(ms), i, honest),
            Silent => {}
            Error { ms } => {
                let r = with(Shareable::error(
                    ReturnCode::ExecutionException,
                    "disk gone",
                ));
                self.deliver_at(self.later(ms), i, r);
            }
            Duplicate { ms } => {
                self.deliver_at(self.later(ms), i, honest.clone());
                self.deliver_at(self.later(ms + 5), i, honest);
            }
            Late => self.deliver_at(self.later(60_000), i, honest),
            Corrupt { ms, seed } => {
                let data = corrupt(pass, &honest.data, seed);
                self.deliver_at(self.later(ms), i, with(data));
            }
            Bytes { ms, bytes } => {
                let mut data = honest.data.clone();
                data.headers.insert(
                    HEADER_STATS_DATA.to_string(),
                    MetaValue::Text(hex::encode(bytes)),
                );
                self.deliver_at(self.later(ms), i, with(data));
            }
            WrongPass { ms } => {
                let mut data = honest.data.clone();
                let other = match pass {
                    Pass::First => Pass::Second,
                    Pass::Second => Pass::First,
                };
                data.headers.insert(
                    HEADER_STATS_TASK.to_string(),
                    MetaValue::Text(other.as_str().to_string()),
                );
                self.deliver_at(self.later(ms), i, with(data));
            }
        }
    }

    fn drain(&mut self) {
        while let Some(out) = self.ctrl.poll_output() {
            match out {
                Output::Send { to, task } => self.on_send(to, task),
                Output::Event(e) => self.events.push(e),
            }
        }
    }

    fn run(&mut self) {
        self.ctrl.start(self.now);
        for _ in 0..10_000 {
            self.drain();
            self.queue.sort_by_key(|(t, s, _, _)| (*t, *s));
            let next_delivery = self.queue.first().map(|(t, ..)| *t);
            let next_timeout = self.ctrl.poll_timeout();
            let deliver = match (next_delivery, next_timeout) {
                (Some(d), Some(t)) => d <= t,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => return,
            };
            if deliver {
                let (at, _, i, r) = self.queue.remove(0);
                self.now = at;
                let name = self.sites[i].name.clone();
                self.ctrl.handle_result(self.now, &name, r);
            } else if let Some(t) = next_timeout {
                self.now = self.now.max(t);
                self.ctrl.handle_timeout(self.now);
            }
        }
        panic!("the simulation did not settle");
    }

    fn finished(&self) -> Option<(&crate::stats::StatsOutput, &Vec<String>)> {
        self.events.iter().find_map(|e| match e {
            Event::Finished { output, sites } => Some((output, sites)),
            _ => None,
        })
    }

    fn excluded(&self) -> Vec<(Pass, String, String)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::SiteExcluded {
                    pass,
                    client,
                    reason,
                    ..
                } => Some((*pass, client.clone(), reason.clone())),
                _ => None,
            })
            .collect()
    }
}

/// Corrupts one value of an honest answer, `seed` choosing which and how.
fn corrupt(pass: Pass, honest: &Shareable, seed: u64) -> Shareable {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let weird = [
        f64::NAN,
        f64::INFINITY,
        -1.0,
        1e308,
        -1e308,
        0.0,
        f64::MIN_POSITIVE,
    ];
    let pick = |rng: &mut ChaCha8Rng| weird[rng.random_range(0..weird.len())];
    match pass {
        Pass::First => {
            let Ok(mut stats) = wire::from_shareable::<FeatureMap<FirstPass>>(honest, pass) else {
                return honest.clone();
            };
            let feature = ["Age", "Income", ""][rng.random_range(0..3)].to_string();
            let e = stats
                .entry(feature)
                .or_default()
                .entry(["train", "test"][rng.random_range(0..2)].to_string())
                .or_insert(FirstPass {
                    count: 1,
                    failure_count: 0,
                    sum: None,
                    min: None,
                    max: None,
                });
            match rng.random_range(0..8) {
                0 => e.count = rng.random(),
                1 => e.failure_count = u64::MAX,
                2 => e.sum = Some(pick(&mut rng)),
                3 => e.min = Some(pick(&mut rng)),
                4 => e.max = Some(pick(&mut rng)),
                5 => std::mem::swap(&mut e.min, &mut e.max),
                6 => e.sum = None,
                _ => e.max = None,
            }
            wire::to_shareable(pass, &stats).unwrap()
        }
        Pass::Second => {
            let Ok(mut stats) = wire::from_shareable::<FeatureMap<SecondPass>>(honest, pass) else {
                return honest.clone();
            };
            let feature = ["Age", "Income", "Other"][rng.random_range(0..3)].to_string();
            let e = stats
                .entry(feature)
                .or_default()
                .entry(["train", "test"][rng.random_range(0..2)].to_string())
                .or_insert(SecondPass {
                    count: 3,
                    failure_count: 0,
                    sum_sq_dev: Some(1.0),
                    histogram: None,
                });
            match rng.random_range(0..6) {
                0 => e.sum_sq_dev = Some(pick(&mut rng)),
                1 => e.sum_sq_dev = None,
                2 => e.count += 1,
                3 => e.histogram.get_or_insert_with(Vec::new).push(1),
                4 => {
                    if let Some(h) = e.histogram.as_mut().and_then(|h| h.first_mut()) {
                        *h = u64::MAX;
                    } else {
                        e.histogram = Some(vec![u64::MAX; 20]);
                    }
                }
                _ => e.failure_count = e.failure_count.wrapping_sub(1),
            }
            wire::to_shareable(pass, &stats).unwrap()
        }
    }
}

/// The finite values of `feature`/`dataset` at the given sites, pooled.
fn pooled(sites: &[Site], which: &[usize], feature: &str, dataset: &str) -> Vec<f64> {
    which
        .iter()
        .flat_map(|&i| sites[i].data[feature][dataset].iter().copied())
        .filter(|v| v.is_finite())
        .collect()
}

fn failures(sites: &[Site], which: &[usize], feature: &str, dataset: &str) -> u64 {
    which
        .iter()
        .flat_map(|&i| sites[i].data[feature][dataset].iter())
        .filter(|v| !v.is_finite())
        .count() as u64
}

/// numpy's `var(ddof=1)`, two-pass.
fn sample_var(xs: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)
}

/// Checks the global column against the pooled data of sites `which`.
fn check_global(sim: &Sim, which: &[usize]) {
    let result = sim.ctrl.result().expect("finished");
    let req = sim.ctrl.second_request().expect("two passes");
    for feature in ["Age", "Income"] {
        for dataset in ["train", "test"] {
            let xs = pooled(&sim.sites, which, feature, dataset);
            let g: &Values = &result.global[feature][dataset];
            assert_eq!(g.count, xs.len() as u64, "{feature}/{dataset} count");
            assert_eq!(
                g.failure_count,
                failures(&sim.sites, which, feature, dataset),
                "{feature}/{dataset} failure_count"
            );
            let mean = xs.iter().sum::<f64>() / xs.len() as f64;
            assert_eq!(g.mean, Some(mean), "{feature}/{dataset} mean is exact");
            let var = sample_var(&xs);
            let got = g.var.unwrap();
            assert!(
                ((got - var) / var).abs() <= 1e-9,
                "{feature}/{dataset} var {got} vs pooled {var}"
            );
            assert_eq!(g.stddev, Some(got.sqrt()));
            let (lo, hi) = xs
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                    (a.min(x), b.max(x))
                });
            assert!(
                g.min.unwrap() < lo && g.max.unwrap() > hi,
                "noised range contains the data"
            );
            let spec = req.histograms[feature];
            let mut want = vec![0u64; spec.bins as usize];
            for &x in &xs {
                want[spec.bucket(x).unwrap() as usize] += 1;
            }
            let hist = g.histogram.as_ref().unwrap();
            let got_counts: Vec<u64> = hist.iter().map(|b| b.count).collect();
            assert_eq!(got_counts, want, "{feature}/{dataset} histogram");
            assert_eq!(
                got_counts.iter().sum::<u64>(),
                g.count,
                "histogram holds every value"
            );
        }
    }
}

fn fast() -> Behaviour {
    Answer { ms: 10 }
}

#[test]
fn global_statistics_match_the_pooled_data() {
    let mut sim = Sim::new(
        ctrl_config(FULL, None),
        sites(
            &[400, 1300, 3100],
            vec![
                [fast(), fast()],
                [Answer { ms: 40 }, fast()],
                [fast(), Answer { ms: 70 }],
            ],
        ),
    );
    sim.run();
    let (output, included) = sim.finished().expect("finished");
    assert_eq!(included, &["site-1", "site-2", "site-3"]);
    assert!(sim.excluded().is_empty());
    check_global(&sim, &[0, 1, 2]);

    // Ages are configured to [0, 120]; incomes span the noised global extremes.
    let req = sim.ctrl.second_request().unwrap();
    assert_eq!(
        (req.histograms["Age"].low, req.histograms["Age"].high),
        (0.0, 120.0)
    );
    assert_eq!(req.histograms["Age"].bins, 10);
    assert_eq!(req.histograms["Income"].bins, 20);

    // The output, in FLARE's layout, rounded to 4 decimals.
    let json = serde_json::to_value(output).unwrap();
    let g = &sim.ctrl.result().unwrap().global["Income"]["train"];
    assert_eq!(
        json["Income"]["count"][GLOBAL]["train"],
        serde_json::json!(g.count)
    );
    let mean = json["Income"]["mean"][GLOBAL]["train"].as_f64().unwrap();
    assert!((mean - g.mean.unwrap()).abs() <= 5e-5);
    let hist = json["Age"]["histogram"]["site-2"]["test"]
        .as_array()
        .unwrap();
    assert_eq!(hist.len(), 10);
    assert_eq!(hist[1], serde_json::json!([12.0, 24.0, hist[1][2]]));
    for stat in Statistic::ALL {
        assert!(
            output.get("Age", stat, "site-1", "train").is_some(),
            "{stat} for site-1"
        );
    }
    // Site columns: a site's own var is its data's sample variance.
    let own = &sim.ctrl.result().unwrap().sites["site-3"]["Age"]["test"];
    let xs = pooled(&sim.sites, &[2], "Age", "test");
    assert!((own.var.unwrap() / sample_var(&xs) - 1.0).abs() <= 1e-9);
    let ok = (1..=3).all(|i| {
        matches!(
            output.get("Income", Statistic::Count, &format!("site-{i}"), "test"),
            Some(StatValue::Int(_))
        )
    });
    assert!(ok);
}

#[test]
fn a_site_below_min_count_shares_nothing_about_the_feature() {
    let mut all = sites(&[300, 500, 600], vec![[fast(), fast()]; 3]);
    // site-3 has five ratings; site-1 and site-2 have hundreds.
    for (i, s) in all.iter_mut().enumerate() {
        let n = if i == 2 { 5 } else { 200 + 100 * i };
        let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
        let v = column(&mut rng, n, 0, 160, 0);
        s.data
            .insert("Rating".into(), BTreeMap::from([("train".into(), v)]));
    }
    let mut sim = Sim::new(ctrl_config(FULL, None), all);
    sim.run();
    let (output, included) = sim.finished().expect("finished");
    assert_eq!(
        included.len(),
        3,
        "the site takes part for its other features"
    );
    for pass in [Pass::First, Pass::Second] {
        let sent = &sim.answers[&(2, pass)];
        let (first, second) = match pass {
            Pass::First => (
                wire::from_shareable::<FeatureMap<FirstPass>>(sent, pass)
                    .unwrap()
                    .contains_key("Rating"),
                false,
            ),
            Pass::Second => (
                false,
                wire::from_shareable::<FeatureMap<SecondPass>>(sent, pass)
                    .unwrap()
                    .contains_key("Rating"),
            ),
        };
        assert!(
            !first && !second,
            "{pass}: site-3 sent something about Rating"
        );
    }
    for stat in Statistic::ALL {
        if let Some(cols) = output.0["Rating"].get(&stat) {
            assert!(!cols.contains_key("site-3"), "{stat} shows site-3");
        }
    }
    let g = &sim.ctrl.result().unwrap().global["Rating"]["train"];
    let xs = pooled(&sim.sites, &[0, 1], "Rating", "train");
    assert_eq!(g.count, xs.len() as u64, "the global excludes site-3");
    assert_eq!(g.mean, Some(xs.iter().sum::<f64>() / xs.len() as f64));
    let var = sample_var(&xs);
    assert!(((g.var.unwrap() - var) / var).abs() <= 1e-9);
}

#[test]
fn noisy_min_and_max_contain_the_true_range() {
    for seed in 0..8 {
        let mut all = sites(&[300, 400, 500], vec![[fast(), fast()]; 3]);
        for s in &mut all {
            s.rng = ChaCha8Rng::seed_from_u64(seed * 31 + s.name.len() as u64);
        }
        let mut sim = Sim::new(ctrl_config(r#"{"min":{},"max":{}}"#, None), all);
        sim.run();
        assert!(
            sim.ctrl.second_request().is_none(),
            "min and max need one pass"
        );
        let result = sim.ctrl.result().unwrap();
        for (i, s) in sim.sites.iter().enumerate() {
            for (feature, by_ds) in &s.data {
                for dataset in by_ds.keys() {
                    let xs = pooled(&sim.sites, &[i], feature, dataset);
                    let (lo, hi) = xs
                        .iter()
                        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                            (a.min(x), b.max(x))
                        });
                    let v = &result.sites[&s.name][feature][dataset];
                    let (min, max) = (v.min.unwrap(), v.max.unwrap());
                    assert!(
                        min < lo && max > hi,
                        "{feature}: [{lo}, {hi}] not in [{min}, {max}]"
                    );
                    // 10 % to 30 % further out, for values away from zero.
                    if lo > 0.0 {
                        assert!((0.7 * lo..=0.9 * lo).contains(&min), "{min} vs {lo}");
                    }
                    if hi > 0.0 {
                        assert!((1.1 * hi..=1.3 * hi).contains(&max), "{max} vs {hi}");
                    }
                    assert_eq!(v.sum, None, "sum was not asked for");
                }
            }
        }
    }
}

#[test]
fn the_bins_cleanser_drops_a_small_sites_histogram() {
    let mut all = sites(&[400, 500, 600], vec![[fast(), fast()]; 3]);
    // site-2 has 60 `Small` values: round(60 · 10 %) = 6, and 10 bins are not below it.
    for (i, s) in all.iter_mut().enumerate() {
        let n = if i == 1 { 60 } else { 300 };
        let mut rng = ChaCha8Rng::seed_from_u64(50 + i as u64);
        let v = column(&mut rng, n, 0, 1600, 0);
        s.data
            .insert("Small".into(), BTreeMap::from([("train".into(), v)]));
    }
    let cfg = r#"{"count":{},"histogram":{"*":{"bins":10,"range":[0,100]}}}"#;
    let mut sim = Sim::new(ctrl_config(cfg, None), all);
    sim.run();
    let (output, _) = sim.finished().expect("finished");
    let hist = &output.0["Small"][&Statistic::Histogram];
    assert!(!hist.contains_key("site-2"));
    assert!(hist.contains_key("site-1") && hist.contains_key("site-3"));
    assert!(matches!(
        output.get("Small", Statistic::Count, "site-2", "train"),
        Some(StatValue::Int(60))
    ));
    let g = &sim.ctrl.result().unwrap().global["Small"]["train"];
    assert_eq!(g.count, 660);
    let total: u64 = g.histogram.as_ref().unwrap().iter().map(|b| b.count).sum();
    assert_eq!(total, 600, "the global histogram is site-1's and site-3's");
    // A ranged histogram needs no extremes: nobody sent min or max.
    for i in 0..3 {
        let sent = wire::from_shareable::<FeatureMap<FirstPass>>(
            &sim.answers[&(i, Pass::First)],
            Pass::First,
        )
        .unwrap();
        assert!(
            sent.values()
                .flat_map(|m| m.values())
                .all(|s| s.min.is_none() && s.max.is_none() && s.sum.is_none())
        );
    }
}

#[test]
fn a_site_dropping_out_between_the_passes_is_left_out_exactly() {
    for second in [Silent, Error { ms: 30 }, Corrupt { ms: 30, seed: 3 }] {
        let behaviours = vec![[fast(), fast()], [fast(), second.clone()], [fast(), fast()]];
        let mut sim = Sim::new(
            ctrl_config(FULL, Some(2)),
            sites(&[700, 900, 1500], behaviours),
        );
        sim.run();
        let (output, included) = sim.finished().expect("finished");
        assert_eq!(included, &["site-1", "site-3"], "{second:?}");
        // The second pass's means included site-2's data; the global does not.
        check_global(&sim, &[0, 2]);
        assert!(!output.0["Age"][&Statistic::Count].contains_key("site-2"));
        let reported = sim.events.iter().any(|e| match e {
            Event::NoAnswer { pass, clients } => *pass == Pass::Second && clients == &["site-2"],
            Event::SiteExcluded { pass, client, .. } => *pass == Pass::Second && client == "site-2",
            _ => false,
        });
        assert!(reported, "{second:?}: site-2's exclusion is reported");
    }
    // With every site required, the run aborts instead.
    let behaviours = vec![[fast(), fast()], [fast(), Silent], [fast(), fast()]];
    let mut sim = Sim::new(ctrl_config(FULL, None), sites(&[300, 300, 300], behaviours));
    sim.run();
    assert!(sim.finished().is_none());
    assert!(sim.events.iter().any(|e| matches!(
        e,
        Event::Aborted {
            pass: Pass::Second,
            ..
        }
    )));
    assert!(sim.ctrl.is_done());
}

#[test]
fn faulty_sites_are_excluded_or_dropped_with_reasons() {
    let behaviours = vec![
        [fast(), fast()],
        [Error { ms: 5 }, fast()],
        [
            Bytes {
                ms: 5,
                bytes: vec![0xff, 0x00, 0x13],
            },
            fast(),
        ],
        [WrongPass { ms: 5 }, fast()],
        [Duplicate { ms: 5 }, Duplicate { ms: 5 }],
        [Late, fast()],
        [fast(), Corrupt { ms: 5, seed: 11 }],
    ];
    let mut sim = Sim::new(
        ctrl_config(FULL, Some(2)),
        sites(&[300, 300, 300, 300, 300, 300, 300], behaviours),
    );
    sim.run();
    let (_, included) = sim.finished().expect("finished");
    assert_eq!(included, &["site-1", "site-5"]);
    let excluded = sim.excluded();
    let why = |site: &str| {
        excluded
            .iter()
            .find(|(_, c, _)| c == site)
            .map(|(_, _, r)| r.clone())
            .unwrap_or_default()
    };
    assert_eq!(why("site-2"), "disk gone");
    assert!(why("site-3").contains("payload"), "{}", why("site-3"));
    assert!(
        why("site-4").contains("expected fed_stats_1st_statistics"),
        "{}",
        why("site-4")
    );
    assert!(!why("site-7").is_empty());
    let dropped: Vec<(String, DropReason)> = sim
        .events
        .iter()
        .filter_map(|e| match e {
            Event::ResultDropped { client, reason, .. } => Some((client.clone(), *reason)),
            _ => None,
        })
        .collect();
    assert!(dropped.contains(&("site-5".into(), DropReason::Duplicate)));
    assert!(dropped.contains(&("site-6".into(), DropReason::Late)));
    assert!(sim.events.iter().any(
        |e| matches!(e, Event::NoAnswer { pass: Pass::First, clients } if clients == &["site-6"])
    ));
    check_global(&sim, &[0, 4]);
}

#[test]
fn a_pass_closes_after_the_wait_once_min_clients_answered() {
    let behaviours = vec![
        [fast(), fast()],
        [fast(), fast()],
        [Answer { ms: 5_000 }, fast()],
    ];
    let mut sim = Sim::new(
        ctrl_config(FULL, Some(2)),
        sites(&[300, 300, 300], behaviours),
    );
    sim.run();
    let (_, included) = sim.finished().expect("finished");
    assert_eq!(
        included,
        &["site-1", "site-2"],
        "site-3 was waited for 1 s only"
    );
    let second_started = sim.events.iter().position(|e| {
        matches!(
            e,
            Event::PassStarted {
                pass: Pass::Second,
                clients: 2
            }
        )
    });
    assert!(second_started.is_some());
    // Its late first-pass answer arrived during the second pass and was dropped.
    assert!(sim.events.iter().any(|e| matches!(
        e,
        Event::ResultDropped { client, reason: DropReason::Late, .. } if client == "site-3"
    )));
}

#[test]
fn settings_are_checked() {
    let names = |n: usize| (1..=n).map(|i| format!("site-{i}")).collect::<Vec<_>>();
    let cfg = ctrl_config(FULL, Some(4));
    assert_eq!(
        StatisticsController::new(cfg, names(3)).unwrap_err(),
        StatsControllerError::MinClients {
            min: 4,
            available: 3
        }
    );
    let cfg = ctrl_config(FULL, None);
    assert_eq!(
        StatisticsController::new(cfg.clone(), vec!["Global".into()]).unwrap_err(),
        StatsControllerError::ReservedName
    );
    assert!(matches!(
        StatisticsController::new(cfg.clone(), vec!["a".into(), "a".into()]),
        Err(StatsControllerError::DuplicateClient(_))
    ));
    let cfg = StatsControllerConfig {
        precision: 40,
        ..cfg
    };
    assert_eq!(
        StatisticsController::new(cfg, names(1)).unwrap_err(),
        StatsControllerError::Precision(40)
    );
}

fn behaviour() -> impl Strategy<Value = Behaviour> {
    let ms = 1u64..3_000;
    prop_oneof![
        4 => ms.clone().prop_map(|ms| Answer { ms }),
        1 => Just(Silent),
        1 => ms.clone().prop_map(|ms| Error { ms }),
        1 => ms.clone().prop_map(|ms| Duplicate { ms }),
        1 => Just(Late),
        3 => (ms.clone(), any::<u64>()).prop_map(|(ms, seed)| Corrupt { ms, seed }),
        1 => (ms.clone(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(ms, bytes)| Bytes { ms, bytes }),
        1 => ms.prop_map(|ms| WrongPass { ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random fault mixes never panic the controller, always end the run, and an included
    /// site is one whose answers were all accepted; honest, timely sites are never left out.
    #[test]
    fn random_faults_never_panic(
        plan in prop::collection::vec((behaviour(), behaviour()), 2..6),
        min in 1usize..6,
    ) {
        let n = plan.len();
        let min = min.min(n);
        let sizes: Vec<usize> = (0..n).map(|i| 250 + 50 * i).collect();
        let behaviours: Vec<[Behaviour; 2]> = plan.iter().map(|(a, b)| [a.clone(), b.clone()]).collect();
        // Long enough a wait that every timely answer (at most 3 s) is in before a pass closes.
        let cfg = StatsControllerConfig {
            wait_time_after_min_received: Duration::from_secs(5),
            ..ctrl_config(FULL, Some(min))
        };
        let mut sim = Sim::new(cfg, sites(&sizes, behaviours.clone()));
        sim.run();
        prop_assert!(sim.ctrl.is_done());
        let excluded: Vec<String> = sim.excluded().into_iter().map(|(_, c, _)| c).collect();
        match sim.finished() {
            Some((_, included)) => {
                prop_assert!(included.len() >= min);
                for site in included {
                    prop_assert!(!excluded.contains(site), "{site} excluded yet included");
                }
                let result = sim.ctrl.result().unwrap();
                for (feature, by_ds) in &result.global {
                    for (dataset, g) in by_ds {
                        let total: u64 = result.sites.values()
                            .filter_map(|s| s.get(feature).and_then(|m| m.get(dataset)))
                            .map(|v| v.count)
                            .sum();
                        prop_assert_eq!(g.count, total);
                        if let Some(h) = &g.histogram {
                            prop_assert!(h.iter().map(|b| b.count).sum::<u64>() <= g.count);
                        }
                        prop_assert!(g.var.is_none_or(|v| v.is_finite() && v >= 0.0));
                    }
                }
                // Sites whose every answer was honest and in time are in.
                for (i, b) in behaviours.iter().enumerate() {
                    let timely = |b: &Behaviour| matches!(b, Answer { .. } | Duplicate { .. });
                    if timely(&b[0]) && timely(&b[1]) {
                        let name = format!("site-{}", i + 1);
                        prop_assert!(included.contains(&name), "{} left out", name);
                    }
                }
                // With only honest sites in, the global is the pooled data's.
                let all_honest = included.iter().all(|s| {
                    let i: usize = s.trim_start_matches("site-").parse::<usize>().unwrap() - 1;
                    !matches!(behaviours[i][0], Corrupt { .. }) && !matches!(behaviours[i][1], Corrupt { .. })
                });
                if all_honest {
                    let which: Vec<usize> = included.iter()
                        .map(|s| s.trim_start_matches("site-").parse::<usize>().unwrap() - 1)
                        .collect();
                    check_global(&sim, &which);
                }
            }
            None => {
                let aborted = sim.events.iter().any(|e| matches!(e, Event::Aborted { .. }));
                prop_assert!(aborted);
            }
        }
    }

    /// Arbitrary results — any return code, any header text, any payload bytes — from asked
    /// and unknown sites never panic the controller.
    #[test]
    fn arbitrary_results_never_panic(
        results in prop::collection::vec(
            (0usize..4, any::<u64>(), 0u32..3, any::<bool>(), prop::collection::vec(any::<u8>(), 0..96), "[a-z_0-9]{0,30}"),
            0..24,
        ),
    ) {
        let names: Vec<String> = (1..=3).map(|i| format!("site-{i}")).collect();
        let mut ctrl = StatisticsController::new(ctrl_config(FULL, Some(1)), names.clone()).unwrap();
        ctrl.start(Time::ZERO);
        let mut tasks = BTreeMap::new();
        let mut now = Time::ZERO;
        for (who, task, round, ok, bytes, header) in results {
            while let Some(out) = ctrl.poll_output() {
                if let Output::Send { to, task } = out {
                    tasks.insert(to, task);
                }
            }
            let from = names.get(who).cloned().unwrap_or_else(|| "stranger".into());
            // Half the time, name the real task so the payload gets read.
            let (task_id, round) = match tasks.get(&from) {
                Some(t) if task % 2 == 0 => (t.id, t.round),
                _ => (TaskId(task), round),
            };
            let mut data = if ok { Shareable::default() } else { Shareable::error(ReturnCode::Refused, header.clone()) };
            let pass = ctrl.pass().unwrap_or(Pass::First);
            let name = if header.len() % 3 == 0 { pass.as_str().to_string() } else { header.clone() };
            data.headers.insert(HEADER_STATS_TASK.into(), MetaValue::Text(name));
            let payload = if header.len() % 2 == 0 { hex::encode(&bytes) } else { header };
            data.headers.insert(HEADER_STATS_DATA.into(), MetaValue::Text(payload));
            now = now + Duration::from_millis(300);
            ctrl.handle_result(now, &from, TaskResult { task_id, round, data });
            if let Some(t) = ctrl.poll_timeout() && t <= now {
                ctrl.handle_timeout(now);
            }
        }
        ctrl.handle_timeout(now + Duration::from_secs(60));
        ctrl.handle_timeout(now + Duration::from_secs(120));
        prop_assert!(ctrl.is_done());
    }

    /// A site fed arbitrary requests and arbitrary data answers without panicking.
    #[test]
    fn the_site_never_panics(
        means in prop::collection::vec(any::<f64>(), 0..4),
        spec in (0u32..40, any::<f64>(), any::<f64>()),
        values in prop::collection::vec(prop_oneof![any::<f64>(), Just(f64::NAN), -1e6f64..1e6], 0..200),
    ) {
        let data: SiteData = BTreeMap::from([(
            "f".to_string(),
            BTreeMap::from([("train".to_string(), values)]),
        )]);
        let req = crate::stats::SecondRequest {
            means: BTreeMap::from([(
                "f".to_string(),
                means.iter().enumerate().map(|(i, m)| (if i == 0 { "train".to_string() } else { format!("d{i}") }, *m)).collect(),
            )]),
            histograms: BTreeMap::from([(
                "f".to_string(),
                crate::stats::HistogramSpec { bins: spec.0, low: spec.1, high: spec.2 },
            )]),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let cleansers = default_cleansers();
        for task in [
            wire::task(TaskId(1), Pass::First, &config(FULL)).unwrap(),
            wire::task(TaskId(2), Pass::Second, &req).unwrap(),
        ] {
            let r = site::execute(&task, &data, &cleansers, &mut rng);
            prop_assert_eq!(r.task_id, task.id);
        }
    }
}
