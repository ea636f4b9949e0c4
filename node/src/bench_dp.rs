//! `flare-node bench dp`: what central differential privacy costs in accuracy. DP-FedAvg
//! (`DifferentialPrivacyServerSideFixedClipping`, [`flare_protocols::dp`]) on MNIST at a
//! strong and a moderate budget (ε ≈ 1 and ε ≈ 8 at δ = 1e-5 over the whole run) against
//! the same run without DP: same sites, rounds, data and seeds.
//!
//! # What runs, and why so many sites
//!
//! Every setting is a ScatterAndGather job run by [`crate::simulator::run`] in this
//! process: `sites` sites splitting the MNIST training part (the t10k file less `held_out`
//! examples) uniformly, every site in every round (so the sampling rate is 1 and no
//! amplification by sampling is claimed), the built-in MLP, the global model validated on the
//! held-out examples after every round. Seed `s` sets the partition, the shuffles, the
//! initial model and, for the DP runs, nothing else: each run's noise comes from a seed the
//! simulator's job loader draws from the OS, as a real server's does.
//!
//! The noise on the mean update has standard deviation `z·C/m` per coordinate, with `m`
//! the sites of a round, while the mean update itself is at most `C` long; over the model's
//! `d` weights the noise is `z·√d/m` times the signal. With the 8 sites of `bench
//! algorithms`, ε = 1 over 20 rounds needs `z ≈ 18` and the noise would be hundreds of times
//! the update: nothing learns. The default here is therefore **400 sites** of 20 examples
//! each (two batches of 10: every site a small share, as in cross-device federated
//! learning), the most the 8,000 training images spread over with each site keeping more
//! than one batch; 20 rounds of 1 local epoch (lr 0.1) and a small MLP (32 hidden units,
//! d = 25,450). Measured while choosing (one seed): at ε = 1 the final accuracy was 0.66
//! with 200 sites and 0.77 with 400 (20 rounds), and with 200 sites 30 rounds ended lower
//! than 10 (0.51 against 0.71): at a fixed ε more rounds mean more noise per round (z grows
//! about as √rounds) while an MLP on MNIST stops gaining after a few rounds. A run takes
//! 13–40 s on the 2-core development machine (depending on what else runs there).
//!
//! The noise multiplier for a target `ε` is solved for like Opacus's
//! `make_private_with_epsilon` (`get_noise_multiplier` over `rounds` steps at sampling rate
//! 1); the table's final ε is what the run itself reported (`privacy_epsilon` of the last
//! version), so it checks the solver. The clipping norm `C` is fixed (default 0.5; with 0.25
//! or 1.0 the DP runs ended lower, and 2.0 much lower at ε = 1). With `adaptive` (the
//! default) each budget also runs with adaptive clipping from `C₀ = C`, Flower's other
//! defaults (γ 0.5, η 0.2, σ_b = m/20): it shows where the median update norm lies and what
//! following it costs, as its count noise takes part of the budget (`z_Δ > z`).
//!
//! # Outputs (under `--out`, default `bench/results/dp`)
//!
//! - `table.md`: per setting `z`, `C`, the final ε and the final accuracy (mean ± sample std,
//!   min–max over the seeds), with the settings of the study on top;
//! - `results.json`: the settings and every accuracy and ε curve, per seed;
//! - `accuracy.svg`: accuracy per round (mean over the seeds, band min–max) on the left and
//!   the ε spent so far on the right.
//!
//! ```text
//! flare-node bench dp            # the study (5 settings × 3 seeds, 3–6 min on 2 cores)
//! flare-node bench dp --quick    # 10 rounds, 1 seed
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use flare_protocols::aggregators::{METRIC_CLIP, METRIC_DELTA, METRIC_EPSILON};
use flare_protocols::dp::accountant::get_noise_multiplier;
use flare_protocols::dp::adaptive_model_noise;
use plotters::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};

use crate::bench_algorithms::Spread;
use crate::simulator::{SimOptions, run};

/// How to run the study.
#[derive(Debug, Clone, Serialize)]
pub struct DpBench {
    /// Rounds per run.
    pub rounds: u32,
    /// Local epochs per round.
    pub epochs: usize,
    /// Seeds per setting (0, 1, …).
    pub seeds: u64,
    /// Simulated sites, all in every round.
    pub sites: usize,
    /// Hidden units of the MLP.
    pub hidden: usize,
    /// The sites' learning rate.
    pub lr: f64,
    /// The sites' mini-batch size.
    pub batch_size: usize,
    /// The fixed clipping norm `C` of the DP runs.
    pub clipping_norm: f64,
    /// `δ` of the budgets.
    pub delta: f64,
    /// The budgets: one DP setting per `ε`.
    pub epsilons: Vec<f64>,
    /// Also run each budget with adaptive clipping (Andrew et al., Flower's defaults but
    /// the initial norm, which is `clipping_norm`), where the count noise `m/20` allows it.
    pub adaptive: bool,
    /// Examples held out for validation.
    pub held_out: usize,
    /// Folder with the MNIST IDX files.
    #[serde(skip)]
    pub data_dir: PathBuf,
    /// Where `table.md`, `results.json` and `accuracy.svg` go.
    #[serde(skip)]
    pub out: PathBuf,
    /// Worker threads of the simulator.
    #[serde(skip)]
    pub threads: usize,
    /// Print a line per finished run on stderr.
    #[serde(skip)]
    pub progress: bool,
}

impl DpBench {
    /// The study's defaults (see the module doc), reading MNIST from `data_dir` and writing
    /// into `out`.
    pub fn new(data_dir: PathBuf, out: PathBuf) -> Self {
        DpBench {
            rounds: 20,
            epochs: 1,
            seeds: 3,
            sites: 400,
            hidden: 32,
            lr: 0.1,
            batch_size: 10,
            clipping_norm: 0.5,
            delta: 1e-5,
            epsilons: vec![8.0, 1.0],
            adaptive: true,
            held_out: 2_000,
            data_dir,
            out,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            progress: false,
        }
    }
}

/// One setting: the non-private run or DP at one budget.
#[derive(Debug, Clone, Serialize)]
pub struct Setting {
    /// What the table and the plot call it.
    pub label: String,
    /// The budget, for a DP setting.
    pub target_epsilon: Option<f64>,
    /// `z` (solved for from the budget), for a DP setting.
    pub noise_multiplier: Option<f64>,
    /// `C`, for a DP setting.
    pub clipping_norm: Option<f64>,
    /// The `aggregator` component's name.
    pub aggregator: String,
    /// Its `args`.
    pub args: Value,
}

/// One run of a setting.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// The seed.
    pub seed: u64,
    /// Held-out accuracy after r rounds at index r (0: the initial model); empty when the
    /// run failed.
    pub accuracy: Vec<f64>,
    /// The ε spent after r rounds at index r, as the run reported it (0 without DP).
    pub epsilon: Vec<f64>,
    /// The clipping norm of round r at index r − 1 (empty without DP).
    pub clip: Vec<f64>,
    /// Wall seconds.
    pub seconds: f64,
    /// Why the run failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RunResult {
    fn ok(&self) -> bool {
        self.error.is_none() && !self.accuracy.is_empty()
    }
}

/// A setting with its runs and their summary.
#[derive(Debug, Clone, Serialize)]
pub struct SettingResult {
    /// The setting.
    #[serde(flatten)]
    pub setting: Setting,
    /// Final accuracy over the runs that finished.
    pub final_accuracy: Option<Spread>,
    /// The largest final ε any run reported (they agree: the budget does not depend on the
    /// data).
    pub final_epsilon: Option<f64>,
    /// The `δ` the runs reported.
    pub delta: Option<f64>,
    /// One run per seed.
    pub runs: Vec<RunResult>,
}

/// The whole study, as written to `results.json`.
#[derive(Debug, Clone, Serialize)]
pub struct DpStudy {
    /// The settings of the study.
    pub bench: DpBench,
    /// Model parameters (`d`).
    pub params: usize,
    /// Training examples per site.
    pub examples_per_site: usize,
    /// The settings, the non-private one first.
    pub settings: Vec<SettingResult>,
    /// Wall seconds of the whole study.
    pub seconds: f64,
}

/// Weights of the MLP with `hidden` units: 784 → hidden → 10.
fn mlp_params(hidden: usize) -> usize {
    784 * hidden + hidden + hidden * 10 + 10
}

/// The settings of `b`: FedAvg, then DP at each budget, `z` solved for (with adaptive
/// clipping too, when asked for and `z < 2σ_b = m/10`).
pub fn settings(b: &DpBench) -> anyhow::Result<Vec<Setting>> {
    let mut v = vec![Setting {
        label: "no DP (FedAvg)".into(),
        target_epsilon: None,
        noise_multiplier: None,
        clipping_norm: None,
        aggregator: "FedAvg".into(),
        args: json!({}),
    }];
    for &eps in &b.epsilons {
        let z = get_noise_multiplier(eps, b.delta, 1.0, u64::from(b.rounds))
            .with_context(|| format!("ε = {eps}"))?;
        v.push(Setting {
            label: format!("DP-FedAvg ε ≈ {eps}"),
            target_epsilon: Some(eps),
            noise_multiplier: Some(z),
            clipping_norm: Some(b.clipping_norm),
            aggregator: "DifferentialPrivacyServerSideFixedClipping".into(),
            args: json!({"noise_multiplier": z, "clipping_norm": b.clipping_norm,
                         "target_delta": b.delta}),
        });
    }
    if b.adaptive {
        for &eps in &b.epsilons {
            let z = get_noise_multiplier(eps, b.delta, 1.0, u64::from(b.rounds))?;
            if z >= b.sites as f64 / 10.0 {
                continue;
            }
            v.push(Setting {
                label: format!("DP-FedAvg ε ≈ {eps}, adaptive C"),
                target_epsilon: Some(eps),
                noise_multiplier: Some(z),
                clipping_norm: None,
                aggregator: "DifferentialPrivacyServerSideAdaptiveClipping".into(),
                args: json!({"noise_multiplier": z, "initial_clipping_norm": b.clipping_norm,
                             "target_delta": b.delta}),
            });
        }
    }
    Ok(v)
}

/// Writes the job folder of one run into `dir`.
fn write_job(b: &DpBench, s: &Setting, seed: u64, dir: &Path) -> anyhow::Result<()> {
    let meta = json!({"name": "bench-dp", "min_clients": b.sites,
                      "deploy_map": {"app": ["@ALL"]}});
    let server = json!({
        "format_version": 2,
        "workflows": [{"id": "sag", "name": "ScatterAndGather", "args": {
            "num_rounds": b.rounds, "min_clients": b.sites,
            "wait_time_after_min_received": 0, "task_timeout": 3600}}],
        "components": [
            {"id": "model", "name": "MnistMlp", "args": {"hidden": b.hidden, "seed": seed}},
            {"id": "aggregator", "name": s.aggregator, "args": s.args},
            {"id": "persistor", "name": "SafetensorsPersistor", "args": {"save_every_round": false}}
        ]
    });
    let client = json!({
        "format_version": 2,
        "executors": [{"tasks": ["train", "validate"], "executor": {
            "name": "MnistMlpLearner", "args": {
                "data_dir": b.data_dir, "held_out": b.held_out, "split_seed": 0,
                "partition": {"kind": "uniform"}, "partition_seed": seed,
                "hidden": b.hidden, "lr": b.lr, "batch_size": b.batch_size,
                "epochs": b.epochs, "seed": seed}}}]
    });
    crate::bench::write_job_files(dir, &meta, &server, &client)
}

/// Runs one job in `scratch`: the accuracy and the ε after each round, and the `δ`.
fn run_one(
    b: &DpBench,
    s: &Setting,
    seed: u64,
    scratch: &Path,
) -> anyhow::Result<(RunResult, Option<f64>)> {
    let job = scratch.join("job");
    write_job(b, s, seed, &job)?;
    let report = run(&SimOptions {
        job_dir: job,
        clients: b.sites,
        workspace: scratch.join("ws"),
        threads: b.threads,
        progress: false,
    })?;
    let (mut accuracy, mut epsilon, mut clip) = (Vec::new(), Vec::new(), Vec::new());
    for v in 0..=b.rounds {
        let m = report
            .metrics
            .get(&v)
            .with_context(|| format!("no metrics for the global model after {v} rounds"))?;
        accuracy.push(
            *m.get("accuracy")
                .with_context(|| format!("no accuracy after {v} rounds"))?,
        );
        epsilon.push(m.get(METRIC_EPSILON).copied().unwrap_or(0.0));
        clip.extend(m.get(METRIC_CLIP).copied());
    }
    if s.target_epsilon.is_some() && epsilon.last().is_none_or(|e| *e <= 0.0) {
        bail!("the DP run reported no {METRIC_EPSILON}");
    }
    let delta = report
        .metrics
        .get(&b.rounds)
        .and_then(|m| m.get(METRIC_DELTA))
        .copied();
    let r = RunResult {
        seed,
        accuracy,
        epsilon,
        clip,
        seconds: 0.0,
        error: None,
    };
    Ok((r, delta))
}

/// Runs the study, writes `table.md`, `results.json` and `accuracy.svg` under `b.out`, and
/// returns what it measured. A failed run is recorded with its error and the study goes on.
pub fn run_study(b: &DpBench) -> anyhow::Result<DpStudy> {
    if b.rounds == 0 || b.epochs == 0 || b.seeds == 0 || b.sites == 0 || b.hidden == 0 {
        bail!("rounds, epochs, seeds, sites and hidden must be at least 1");
    }
    if !(b.clipping_norm.is_finite() && b.clipping_norm > 0.0) {
        bail!("the clipping norm must be > 0, got {}", b.clipping_norm);
    }
    let data_dir = b
        .data_dir
        .canonicalize()
        .with_context(|| format!("MNIST folder {}", b.data_dir.display()))?;
    let b = &DpBench {
        data_dir,
        ..b.clone()
    };
    std::fs::create_dir_all(&b.out)
        .with_context(|| format!("cannot create {}", b.out.display()))?;
    let settings = settings(b)?;
    let started = Instant::now();
    let scratch = tempfile::tempdir()?;
    let total = settings.len() * b.seeds as usize;
    let per_site = 10_000usize.saturating_sub(b.held_out) / b.sites;
    if b.progress {
        eprintln!(
            "{total} runs: {} settings × {} seeds; {} sites of about {per_site} examples, {} rounds × {} epochs, MLP with {} hidden units ({} parameters) → {}",
            settings.len(),
            b.seeds,
            b.sites,
            b.rounds,
            b.epochs,
            b.hidden,
            mlp_params(b.hidden),
            b.out.display()
        );
    }
    let mut done = 0;
    let mut results = Vec::new();
    for s in settings {
        let mut runs = Vec::new();
        for seed in 0..b.seeds {
            done += 1;
            let dir = scratch.path().join(format!("run-{done}"));
            let t = Instant::now();
            let out = run_one(b, &s, seed, &dir);
            let _ = std::fs::remove_dir_all(&dir);
            let seconds = t.elapsed().as_secs_f64();
            let (r, delta) = match out {
                Ok((r, delta)) => (RunResult { seconds, ..r }, delta),
                Err(e) => (
                    RunResult {
                        seed,
                        accuracy: Vec::new(),
                        epsilon: Vec::new(),
                        clip: Vec::new(),
                        seconds,
                        error: Some(format!("{e:#}")),
                    },
                    None,
                ),
            };
            if b.progress {
                let elapsed = started.elapsed().as_secs_f64();
                let left = elapsed / done as f64 * (total - done) as f64;
                let outcome = match (&r.error, r.accuracy.last(), r.epsilon.last()) {
                    (Some(e), _, _) => format!("FAILED: {e}"),
                    (None, Some(a), Some(e)) => format!("accuracy {a:.4}, ε {e:.3}"),
                    _ => "no accuracy".into(),
                };
                eprintln!(
                    "[{done}/{total}] {} seed {seed}: {outcome}, {seconds:.1} s (about {left:.0} s left)",
                    s.label
                );
            }
            runs.push((r, delta));
        }
        let ok: Vec<&RunResult> = runs.iter().map(|(r, _)| r).filter(|r| r.ok()).collect();
        let finals: Vec<f64> = ok
            .iter()
            .filter_map(|r| r.accuracy.last().copied())
            .collect();
        let final_epsilon = ok
            .iter()
            .filter_map(|r| r.epsilon.last().copied())
            .reduce(f64::max);
        let delta = runs.iter().find_map(|(_, d)| *d);
        results.push(SettingResult {
            setting: s,
            final_accuracy: Spread::of(&finals),
            final_epsilon,
            delta,
            runs: runs.into_iter().map(|(r, _)| r).collect(),
        });
    }
    let study = DpStudy {
        bench: b.clone(),
        params: mlp_params(b.hidden),
        examples_per_site: per_site,
        settings: results,
        seconds: started.elapsed().as_secs_f64(),
    };
    let write = |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let path = b.out.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
    };
    write("table.md", format_table(&study).as_bytes())?;
    write("results.json", &serde_json::to_vec_pretty(&study)?)?;
    plot(&study, &b.out.join("accuracy.svg"))?;
    if !study
        .settings
        .iter()
        .flat_map(|s| &s.runs)
        .any(RunResult::ok)
    {
        let first = study
            .settings
            .iter()
            .flat_map(|s| &s.runs)
            .find_map(|r| r.error.clone())
            .unwrap_or_default();
        bail!("every run failed, the first with: {first}");
    }
    Ok(study)
}

/// The Markdown table of a study, with what it ran on top and the failed runs below.
pub fn format_table(r: &DpStudy) -> String {
    let b = &r.bench;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "MNIST, {} sites of about {} examples each (uniform split), every site in every round (sampling rate 1), {} rounds × {} local epoch(s), MLP with {} hidden units ({} parameters), lr {}, batch {}; accuracy of the global model on {} held-out examples, mean ± sample std (min–max) over {} seed(s). DP-FedAvg: noise std z·C/m on the equal-weight mean of the clipped updates (m = {} sites); z solved for the target ε at δ = {:e} over {} rounds (Opacus's get_noise_multiplier); the final ε is what the run reported. Why so many sites: the noise is z·√d/m times the longest possible mean update, so central DP needs a large m (see `flare-node bench dp --help` and node/src/bench_dp.rs); adaptive rows start from the fixed C and follow the median update norm (Flower's defaults otherwise), their count noise leaving the model z_Δ > z.\n",
        b.sites,
        r.examples_per_site,
        b.rounds,
        b.epochs,
        b.hidden,
        r.params,
        b.lr,
        b.batch_size,
        b.held_out,
        b.seeds,
        b.sites,
        b.delta,
        b.rounds,
    );
    let _ = writeln!(
        s,
        "| setting | z | clip C | noise std z·C/m | final ε (δ) | final accuracy |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for c in &r.settings {
        let st = &c.setting;
        let m = b.sites as f64;
        // The last round's clipping norm, averaged over the runs.
        let last_clip = Spread::of(
            &c.runs
                .iter()
                .filter_map(|r| r.clip.last().copied())
                .collect::<Vec<_>>(),
        )
        .map(|s| s.mean);
        let (z, clip, std) = match (st.noise_multiplier, st.clipping_norm, last_clip) {
            (Some(z), Some(c), _) => (
                format!("{z:.3}"),
                format!("{c}"),
                format!("{:.2e}", z * c / m),
            ),
            // Adaptive: the model's share of the noise, z_Δ, with the last round's C.
            (Some(z), None, Some(c)) => {
                let z_model = adaptive_model_noise(z, m / 20.0).unwrap_or(f64::NAN);
                (
                    format!("{z:.3} (model {z_model:.3})"),
                    format!("{} → {c:.3} (adaptive)", b.clipping_norm),
                    format!("{:.2e} (last round)", z_model * c / m),
                )
            }
            _ => ("–".into(), "–".into(), "–".into()),
        };
        let eps = match (c.final_epsilon, c.delta) {
            (Some(e), Some(d)) if e > 0.0 => format!("{e:.3} ({d:e})"),
            _ => "∞ (no DP)".into(),
        };
        let acc = match c.final_accuracy {
            Some(a) => format!("{:.4} ± {:.4} ({:.4}–{:.4})", a.mean, a.std, a.min, a.max),
            None => "–".into(),
        };
        let failed = c.runs.iter().filter(|r| !r.ok()).count();
        let failed = if failed == 0 {
            String::new()
        } else {
            format!(" ({failed} failed)")
        };
        let _ = writeln!(
            s,
            "| {} | {z} | {clip} | {std} | {eps} | {acc}{failed} |",
            st.label
        );
    }
    for c in &r.settings {
        for run in &c.runs {
            if let Some(e) = &run.error {
                let _ = writeln!(s, "\n{} seed {} failed: {e}", c.setting.label, run.seed);
            }
        }
    }
    s
}

/// Mean, lowest and highest value per round of `curve` over the finished runs.
fn band(runs: &[RunResult], curve: fn(&RunResult) -> &[f64]) -> Option<Vec<(f64, f64, f64)>> {
    let ok: Vec<&RunResult> = runs.iter().filter(|r| r.ok()).collect();
    let len = ok.iter().map(|r| curve(r).len()).min()?;
    Some(
        (0..len)
            .map(|i| {
                let v: Vec<f64> = ok.iter().map(|r| curve(r)[i]).collect();
                Spread::of(&v).map_or((f64::NAN, f64::NAN, f64::NAN), |s| (s.mean, s.min, s.max))
            })
            .collect(),
    )
}

fn accuracy_of(r: &RunResult) -> &[f64] {
    &r.accuracy
}

fn epsilon_of(r: &RunResult) -> &[f64] {
    &r.epsilon
}

/// Colours that stay apart on white (matplotlib's tab10).
const COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// The SVG: accuracy per round on the left, ε spent per round on the right.
pub fn plot(r: &DpStudy, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1500, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "DP-FedAvg on MNIST: {} sites, every site every round, mean of {} seed(s), band = min..max",
            r.bench.sites, r.bench.seeds
        ),
        ("sans-serif", 22),
    )?;
    let (left, right) = root.split_horizontally(750);
    let x1 = f64::from(r.bench.rounds.max(2));
    let top_eps = r
        .settings
        .iter()
        .filter_map(|c| c.final_epsilon)
        .fold(1.0f64, f64::max);
    for (area, title, y_desc, curve, (y0, y1)) in [
        (
            &left,
            "Held-out accuracy of the global model",
            "accuracy",
            accuracy_of as fn(&RunResult) -> &[f64],
            (0.0, 1.0),
        ),
        (
            &right,
            "Privacy spent (ε at the run's δ)",
            "ε",
            epsilon_of,
            (0.0, top_eps * 1.05),
        ),
    ] {
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x1, y0..y1)?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc(y_desc)
            .x_labels((r.bench.rounds as usize).clamp(2, 11))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        let at = |i: usize, v: f64| (i as f64, v.clamp(y0, y1));
        for (k, c) in r.settings.iter().enumerate() {
            let Some(b) = band(&c.runs, curve) else {
                continue;
            };
            // An adaptive row is dashed, in the colour of the fixed row of its budget.
            let adaptive = c.setting.clipping_norm.is_none() && c.setting.target_epsilon.is_some();
            let k = if adaptive {
                r.settings
                    .iter()
                    .position(|f| {
                        f.setting.clipping_norm.is_some()
                            && f.setting.target_epsilon == c.setting.target_epsilon
                    })
                    .unwrap_or(k)
            } else {
                k
            };
            let colour = COLOURS[k % COLOURS.len()];
            if r.bench.seeds > 1 {
                let upper = b.iter().enumerate().map(|(i, p)| at(i, p.2));
                let lower = b.iter().enumerate().rev().map(|(i, p)| at(i, p.1));
                chart.draw_series(std::iter::once(Polygon::new(
                    upper.chain(lower).collect::<Vec<_>>(),
                    colour.mix(0.15).filled(),
                )))?;
            }
            let points: Vec<(f64, f64)> = b.iter().enumerate().map(|(i, p)| at(i, p.0)).collect();
            let style = colour.stroke_width(2);
            if adaptive {
                chart
                    .draw_series(DashedLineSeries::new(points, 8, 5, style))?
                    .label(c.setting.label.as_str())
                    .legend(move |(x, y)| {
                        plotters::element::DashedPathElement::new(
                            vec![(x, y), (x + 24, y)],
                            5,
                            3,
                            style,
                        )
                    });
            } else {
                chart
                    .draw_series(LineSeries::new(points, style))?
                    .label(c.setting.label.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
            }
        }
        chart
            .configure_series_labels()
            .position(if y_desc == "ε" {
                SeriesLabelPosition::UpperLeft
            } else {
                SeriesLabelPosition::LowerRight
            })
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(110, 110, 110))
            .label_font(("sans-serif", 15))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_solve_z_for_each_budget() {
        let b = DpBench {
            rounds: 30,
            sites: 200,
            ..DpBench::new(PathBuf::new(), PathBuf::new())
        };
        let s = settings(&b).unwrap();
        assert_eq!(s[0].aggregator, "FedAvg");
        // Opacus 1.6.0 for 30 steps at sampling rate 1, δ = 1e-5.
        assert_eq!(s[1].noise_multiplier, Some(3.49609375));
        assert_eq!(s[2].noise_multiplier, Some(22.1875));
        // Adaptive clipping only where z < 2σ_b = 200/10: at ε ≈ 8, not at ε ≈ 1.
        assert_eq!(s.len(), 4);
        assert_eq!(
            s[3].aggregator,
            "DifferentialPrivacyServerSideAdaptiveClipping"
        );
        assert_eq!(s[3].target_epsilon, Some(8.0));
    }

    #[test]
    fn a_tiny_study_reports_its_privacy_and_writes_table_and_plot() {
        let out = tempfile::tempdir().unwrap();
        let b = DpBench {
            rounds: 2,
            seeds: 1,
            sites: 4,
            hidden: 8,
            epsilons: vec![8.0],
            adaptive: false,
            threads: 2,
            ..DpBench::new(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist"),
                out.path().to_path_buf(),
            )
        };
        let r = run_study(&b).unwrap();
        let dp = &r.settings[1];
        assert_eq!(dp.runs[0].error, None);
        assert_eq!(dp.runs[0].epsilon.len(), 3);
        assert_eq!(dp.runs[0].epsilon[0], 0.0);
        // The run spends what the solver promised, no more.
        let eps = dp.final_epsilon.unwrap();
        assert!(eps <= 8.0 && eps > 7.99, "{eps}");
        assert_eq!(dp.delta, Some(1e-5));
        assert_eq!(r.settings[0].final_epsilon, Some(0.0));
        let table = std::fs::read_to_string(out.path().join("table.md")).unwrap();
        assert!(table.contains("| DP-FedAvg ε ≈ 8 | "), "{table}");
        assert!(table.contains("| no DP (FedAvg) | – |"), "{table}");
        let svg = std::fs::read_to_string(out.path().join("accuracy.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
    }
}
