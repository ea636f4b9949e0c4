//! `flare-node bench algorithms`: a learning-quality study of the aggregation algorithms on
//! MNIST, after FLARE's CIFAR-10 Dirichlet experiments (`examples/advanced/cifar10/pt/
//! cifar10-sim`): how accurate the global model gets, and how many rounds it takes to reach a
//! target accuracy, for FedAvg across label skews and for the other algorithms at the
//! strongest skew.
//!
//! # What runs
//!
//! Every configuration is a ScatterAndGather job written into a temporary folder and run by
//! [`crate::simulator::run`] in this process: `sites` sites (8), the MNIST training part
//! (the t10k file less 2,000 held-out examples, `split_seed` 0) split across them by
//! `{"kind": "dirichlet", "alpha": α}`, and the global model validated on the held-out
//! examples after every round. Seed `s` sets the partition (`partition_seed`), the sites'
//! shuffles (the learner's `seed`) and the initial model (the model component's `seed`).
//!
//! | config | α | aggregator args |
//! |---|---|---|
//! | FedAvg | 1.0, 0.5, 0.3, 0.1 | – |
//! | FedProx | 0.1 | `mu` 0.01 |
//! | FedOpt | 0.1 | FLARE's defaults: SGD lr 1.0, momentum 0.6, cosine down to 0.9 |
//! | FedAdam | 0.1 | η 0.1, β₁ 0.9, β₂ 0.99, τ 1e-3 |
//! | Scaffold | 0.1 | – |
//!
//! The *centralized reference* is the same job with one site that holds the whole training
//! part (the union of the sites' data) and the same held-out split: `rounds × epochs`
//! epochs of the same learner, its accuracy read after every `epochs` epochs, so its point at
//! round r has seen as many epochs as one federated site has after r rounds. For the MLP
//! (plain SGD, no optimizer state) this is exactly centralized training; for the CNN the Adam
//! state restarts every `epochs` epochs.
//!
//! # Defaults and time
//!
//! 50 rounds of 4 local epochs (FLARE's CIFAR-10 setup), 3 seeds, 8 sites, the MLP (lr 0.1,
//! batch 32, 64 hidden units), target accuracy 0.93 (0.97 for the CNN, trained with plain SGD, lr 0.05, batch 64, as
//! FLARE's CIFAR-10 runs). On a 2-core machine
//! one MLP run takes 5–13 s and the whole study (27 runs) about 4 minutes (229 s measured).
//! `--quick` runs 10 rounds and one seed (about 20 s), for smoke tests. The rounds to the
//! target count the first round whose global model reaches it, even if a later round dips
//! below again.
//!
//! # Outputs (under `--out`, default `bench/results/algorithms`)
//!
//! - `table.md`: per configuration the final accuracy as mean ± sample standard deviation
//!   over the seeds (with min–max), the rounds to reach the target as mean ± sample standard
//!   deviation over the seeds that reached it, and how many did;
//! - `results.json`: the settings and every accuracy curve (index r = after r rounds, 0 the
//!   initial model), per seed;
//! - `accuracy.svg`: accuracy per round, mean over the seeds with a band from the lowest to
//!   the highest seed; left panel the algorithms at the lowest α, right panel FedAvg across
//!   α; the centralized reference dashed, the target as a grey line. The SVG leaves text to
//!   the viewer's fonts, so no font library is needed to build or run it.
//!
//! ```text
//! flare-node bench algorithms                      # the full study (~5 min, MLP)
//! flare-node bench algorithms --quick              # 10 rounds, 1 seed
//! flare-node bench algorithms --algorithms FedAvg  # only the FedAvg rows
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use anyhow::{Context, bail};
use plotters::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};

use crate::simulator::{SimOptions, run};

/// Which learner the sites run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LearnerKind {
    /// The built-in pure-Rust MLP (`MnistMlpLearner`).
    Mlp,
    /// The LibTorch CNN (`TorchCnnLearner`; needs a `--features torch` build).
    Cnn,
}

impl FromStr for LearnerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mlp" => Ok(LearnerKind::Mlp),
            "cnn" => Ok(LearnerKind::Cnn),
            other => Err(format!("unknown learner {other:?} (known: mlp, cnn)")),
        }
    }
}

impl std::fmt::Display for LearnerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LearnerKind::Mlp => "MLP",
            LearnerKind::Cnn => "CNN",
        })
    }
}

impl LearnerKind {
    /// The default target accuracy: what the centralized model passes within a few epochs
    /// and the federated runs reach or miss depending on the skew.
    pub fn default_target(self) -> f64 {
        match self {
            LearnerKind::Mlp => 0.93,
            LearnerKind::Cnn => 0.97,
        }
    }
}

/// One row of the study: an aggregator with its arguments at one label skew.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlgoConfig {
    /// What the table and the plot call it.
    pub label: String,
    /// The `aggregator` component's name in the server config.
    pub aggregator: String,
    /// Its `args`.
    pub args: Value,
    /// Dirichlet concentration of the partition.
    pub alpha: f64,
}

impl AlgoConfig {
    fn new(label: &str, aggregator: &str, args: Value, alpha: f64) -> Self {
        AlgoConfig {
            label: label.into(),
            aggregator: aggregator.into(),
            args,
            alpha,
        }
    }
}

/// The study's configurations: FedAvg at α = 1.0, 0.5, 0.3, 0.1, and FedProx, FedOpt,
/// FedAdam and Scaffold at α = 0.1 (FLARE's CIFAR-10 table).
pub fn default_configs() -> Vec<AlgoConfig> {
    let mut v: Vec<AlgoConfig> = [1.0, 0.5, 0.3, 0.1]
        .into_iter()
        .map(|a| AlgoConfig::new("FedAvg", "FedAvg", json!({}), a))
        .collect();
    v.extend([
        AlgoConfig::new("FedProx (mu 0.01)", "FedProx", json!({"mu": 0.01}), 0.1),
        AlgoConfig::new("FedOpt (SGDm, cosine)", "FedOpt", json!({}), 0.1),
        AlgoConfig::new("FedAdam", "FedAdam", json!({}), 0.1),
        AlgoConfig::new("Scaffold", "Scaffold", json!({}), 0.1),
    ]);
    v
}

/// How to run the study.
#[derive(Debug, Clone)]
pub struct AlgorithmsBench {
    /// Rounds per run.
    pub rounds: u32,
    /// Local epochs per round.
    pub epochs: usize,
    /// Seeds per configuration (0, 1, …).
    pub seeds: u64,
    /// Simulated sites.
    pub sites: usize,
    /// The accuracy whose first crossing is counted in rounds.
    pub target: f64,
    /// The sites' learner.
    pub learner: LearnerKind,
    /// Hidden units of the MLP (ignored by the CNN); small values make tests fast.
    pub hidden: usize,
    /// Folder with the MNIST IDX files.
    pub data_dir: PathBuf,
    /// Where `table.md`, `results.json` and `accuracy.svg` go.
    pub out: PathBuf,
    /// The configurations to run.
    pub configs: Vec<AlgoConfig>,
    /// Worker threads of the simulator.
    pub threads: usize,
    /// Print a line per finished run on stderr.
    pub progress: bool,
}

/// One run: a configuration (or the reference) at one seed.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// The seed.
    pub seed: u64,
    /// Held-out accuracy of the global model after r rounds at index r (0: initial model);
    /// empty when the run failed.
    pub accuracy: Vec<f64>,
    /// Wall seconds of the run.
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

/// Mean, sample standard deviation, min and max of some numbers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (n − 1); 0 for one value.
    pub std: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `v`, or `None` when it is empty.
    pub fn of(v: &[f64]) -> Option<Spread> {
        if v.is_empty() {
            return None;
        }
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let std = if v.len() > 1 {
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        Some(Spread {
            mean,
            std,
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }
}

/// A configuration's numbers over its seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Final accuracy over the runs that finished.
    pub final_accuracy: Option<Spread>,
    /// Rounds to the target over the runs that reached it.
    pub rounds_to_target: Option<Spread>,
    /// Runs that reached the target.
    pub reached: usize,
    /// Runs (seeds), failed ones included.
    pub runs: usize,
    /// Runs that failed.
    pub failed: usize,
}

/// A configuration with its runs.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigResult {
    /// The configuration.
    #[serde(flatten)]
    pub config: AlgoConfig,
    /// Its numbers over the seeds.
    pub summary: Summary,
    /// One run per seed.
    pub runs: Vec<RunResult>,
}

/// The whole study, as written to `results.json`.
#[derive(Debug, Clone, Serialize)]
pub struct StudyResult {
    /// Rounds per run.
    pub rounds: u32,
    /// Local epochs per round.
    pub epochs: usize,
    /// Seeds per configuration.
    pub seeds: u64,
    /// Simulated sites.
    pub sites: usize,
    /// Target accuracy.
    pub target: f64,
    /// The learner.
    pub learner: LearnerKind,
    /// Examples held out for validation.
    pub held_out: usize,
    /// Centralized training on the union of the sites' data, per seed (index r: after
    /// `r × epochs` epochs).
    pub reference: ConfigResult,
    /// The configurations.
    pub configs: Vec<ConfigResult>,
    /// Wall seconds of the whole study.
    pub seconds: f64,
}

/// Examples held out for validation (the learners' default).
const HELD_OUT: usize = 2_000;

/// Rounds until `curve` (accuracy after r rounds at index r) first reaches `target`, or
/// `None` when it never does.
pub fn rounds_to_target(curve: &[f64], target: f64) -> Option<u32> {
    curve
        .iter()
        .position(|&a| a >= target)
        .and_then(|r| u32::try_from(r).ok())
}

fn summarize(runs: &[RunResult], target: f64) -> Summary {
    let ok: Vec<&RunResult> = runs.iter().filter(|r| r.ok()).collect();
    let finals: Vec<f64> = ok
        .iter()
        .filter_map(|r| r.accuracy.last().copied())
        .collect();
    let reached: Vec<f64> = ok
        .iter()
        .filter_map(|r| rounds_to_target(&r.accuracy, target))
        .map(f64::from)
        .collect();
    Summary {
        final_accuracy: Spread::of(&finals),
        rounds_to_target: Spread::of(&reached),
        reached: reached.len(),
        runs: runs.len(),
        failed: runs.len() - ok.len(),
    }
}

/// The job of one run: `sites` sites, the partition, the seed and the aggregator.
struct JobSpec<'a> {
    sites: usize,
    rounds: u32,
    partition: Value,
    seed: u64,
    aggregator: &'a str,
    args: &'a Value,
}

/// The CNN's local learning rate: plain SGD (SCAFFOLD's client rule assumes it) at FLARE's
/// CIFAR-10 setting, batch 64.
const CNN_LR: f64 = 0.05;

/// Writes the job folder of one run into `dir`.
fn write_job(b: &AlgorithmsBench, spec: &JobSpec<'_>, dir: &Path) -> anyhow::Result<()> {
    let meta = json!({"name": "bench-algorithms", "min_clients": spec.sites,
                      "deploy_map": {"app": ["@ALL"]}});
    let (model, executor) = match b.learner {
        LearnerKind::Mlp => (
            json!({"id": "model", "name": "MnistMlp",
                   "args": {"hidden": b.hidden, "seed": spec.seed}}),
            json!({"name": "MnistMlpLearner", "args": {
                "data_dir": b.data_dir, "held_out": HELD_OUT, "split_seed": 0,
                "partition": spec.partition, "partition_seed": spec.seed,
                "hidden": b.hidden, "lr": 0.1, "batch_size": 32,
                "epochs": b.epochs, "seed": spec.seed}}),
        ),
        LearnerKind::Cnn => (
            json!({"id": "model", "name": "MnistCnn", "args": {"seed": spec.seed}}),
            json!({"name": "TorchCnnLearner", "args": {
                "data_dir": b.data_dir, "held_out": HELD_OUT, "split_seed": 0,
                "partition": spec.partition, "partition_seed": spec.seed,
                "optimizer": "sgd", "lr": CNN_LR, "batch_size": 64,
                "epochs": b.epochs, "seed": spec.seed}}),
        ),
    };
    let server = json!({
        "format_version": 2,
        "workflows": [{"id": "sag", "name": "ScatterAndGather", "args": {
            "num_rounds": spec.rounds, "min_clients": spec.sites,
            "wait_time_after_min_received": 0, "task_timeout": 3600}}],
        "components": [
            model,
            {"id": "aggregator", "name": spec.aggregator, "args": spec.args},
            {"id": "persistor", "name": "SafetensorsPersistor", "args": {"save_every_round": false}}
        ]
    });
    let client = json!({
        "format_version": 2,
        "executors": [{"tasks": ["train", "validate"], "executor": executor}]
    });
    crate::bench::write_job_files(dir, &meta, &server, &client)
}

/// Runs one job in `scratch` and returns the global accuracy after each round.
fn run_one(b: &AlgorithmsBench, spec: &JobSpec<'_>, scratch: &Path) -> anyhow::Result<Vec<f64>> {
    let job = scratch.join("job");
    let ws = scratch.join("ws");
    write_job(b, spec, &job)?;
    let report = run(&SimOptions {
        job_dir: job,
        clients: spec.sites,
        workspace: ws,
        threads: b.threads,
        progress: false,
    })?;
    (0..=spec.rounds)
        .map(|v| {
            report
                .metrics
                .get(&v)
                .and_then(|m| m.get("accuracy"))
                .copied()
                .with_context(|| format!("no accuracy for the global model after {v} rounds"))
        })
        .collect()
}

/// Prints one progress line per finished run, with an estimate of the time left.
struct Progress {
    enabled: bool,
    total: usize,
    done: usize,
    started: Instant,
}

impl Progress {
    fn finished(&mut self, what: &str, seed: u64, r: &RunResult) {
        self.done += 1;
        if !self.enabled {
            return;
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        let left = elapsed / self.done as f64 * (self.total - self.done) as f64;
        let outcome = match (&r.error, r.accuracy.last()) {
            (Some(e), _) => format!("FAILED: {e}"),
            (None, Some(a)) => format!("final accuracy {a:.4}"),
            (None, None) => "no accuracy".into(),
        };
        eprintln!(
            "[{:>w$}/{}] {what} seed {seed}: {outcome}, {:.1} s (about {:.0} s left)",
            self.done,
            self.total,
            r.seconds,
            left,
            w = self.total.to_string().len(),
        );
    }
}

/// Runs every seed of one configuration, each in its own scratch folder.
struct Runner<'a> {
    b: &'a AlgorithmsBench,
    scratch: &'a Path,
    /// Runs started so far (names the scratch folders).
    n: usize,
    progress: Progress,
}

impl Runner<'_> {
    fn seeds<'j>(&mut self, label: &str, make: impl Fn(u64) -> JobSpec<'j>) -> Vec<RunResult> {
        (0..self.b.seeds)
            .map(|seed| {
                self.n += 1;
                let dir = self.scratch.join(format!("run-{}", self.n));
                let t = Instant::now();
                let out = run_one(self.b, &make(seed), &dir);
                // Models and logs are not needed once the curve is read.
                let _ = std::fs::remove_dir_all(&dir);
                let seconds = t.elapsed().as_secs_f64();
                let r = match out {
                    Ok(accuracy) => RunResult {
                        seed,
                        accuracy,
                        seconds,
                        error: None,
                    },
                    Err(e) => RunResult {
                        seed,
                        accuracy: Vec::new(),
                        seconds,
                        error: Some(format!("{e:#}")),
                    },
                };
                self.progress.finished(label, seed, &r);
                r
            })
            .collect()
    }
}

fn alpha_text(alpha: f64) -> String {
    format!("{alpha:?}")
}

/// Runs the study, writes `table.md`, `results.json` and `accuracy.svg` under `b.out`, and
/// returns what it measured. A run that fails is recorded with its error and the study goes
/// on.
pub fn run_study(b: &AlgorithmsBench) -> anyhow::Result<StudyResult> {
    if b.rounds == 0 || b.epochs == 0 || b.seeds == 0 || b.sites == 0 {
        bail!("rounds, epochs, seeds and sites must be at least 1");
    }
    if !(b.target > 0.0 && b.target <= 1.0) {
        bail!("the target accuracy must be in (0, 1], got {}", b.target);
    }
    let data_dir = b
        .data_dir
        .canonicalize()
        .with_context(|| format!("MNIST folder {}", b.data_dir.display()))?;
    let b = &AlgorithmsBench {
        data_dir,
        ..b.clone()
    };
    std::fs::create_dir_all(&b.out)
        .with_context(|| format!("cannot create {}", b.out.display()))?;
    let started = Instant::now();
    let scratch = tempfile::tempdir()?;
    let progress = Progress {
        enabled: b.progress,
        total: (b.configs.len() + 1) * b.seeds as usize,
        done: 0,
        started,
    };
    if b.progress {
        eprintln!(
            "{} runs: {} configurations and the centralized reference × {} seeds, {} rounds × {} local epochs, {} sites → {}",
            progress.total,
            b.configs.len(),
            b.seeds,
            b.rounds,
            b.epochs,
            b.sites,
            b.out.display()
        );
    }
    let mut runner = Runner {
        b,
        scratch: scratch.path(),
        n: 0,
        progress,
    };
    let no_args = json!({});
    let reference_runs = runner.seeds("centralized", |seed| JobSpec {
        sites: 1,
        rounds: b.rounds,
        partition: json!({"kind": "uniform"}),
        seed,
        aggregator: "FedAvg",
        args: &no_args,
    });
    let reference = ConfigResult {
        config: AlgoConfig::new("centralized", "FedAvg", json!({}), f64::INFINITY),
        summary: summarize(&reference_runs, b.target),
        runs: reference_runs,
    };
    let mut configs = Vec::new();
    for c in &b.configs {
        let label = format!("{} α={}", c.label, alpha_text(c.alpha));
        let runs = runner.seeds(&label, |seed| JobSpec {
            sites: b.sites,
            rounds: b.rounds,
            partition: json!({"kind": "dirichlet", "alpha": c.alpha}),
            seed,
            aggregator: &c.aggregator,
            args: &c.args,
        });
        configs.push(ConfigResult {
            config: c.clone(),
            summary: summarize(&runs, b.target),
            runs,
        });
    }
    let result = StudyResult {
        rounds: b.rounds,
        epochs: b.epochs,
        seeds: b.seeds,
        sites: b.sites,
        target: b.target,
        learner: b.learner,
        held_out: HELD_OUT,
        reference,
        configs,
        seconds: started.elapsed().as_secs_f64(),
    };
    let write = |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let path = b.out.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
    };
    write("table.md", format_table(&result).as_bytes())?;
    write("results.json", &serde_json::to_vec_pretty(&result)?)?;
    plot(&result, &b.out.join("accuracy.svg"))?;
    let all = || std::iter::once(&result.reference).chain(&result.configs);
    if !all().flat_map(|c| &c.runs).any(RunResult::ok) {
        let first = all()
            .flat_map(|c| &c.runs)
            .find_map(|r| r.error.clone())
            .unwrap_or_default();
        bail!("every run failed, the first with: {first}");
    }
    Ok(result)
}

fn spread_text(s: Option<Spread>, digits: usize) -> String {
    match s {
        Some(s) => format!(
            "{:.d$} ± {:.d$} ({:.d$}–{:.d$})",
            s.mean,
            s.std,
            s.min,
            s.max,
            d = digits
        ),
        None => "–".into(),
    }
}

/// The Markdown table of a study, with a line on how to read it and the failed runs.
pub fn format_table(r: &StudyResult) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "MNIST, {} learner, {} sites, {} rounds × {} local epochs, {} seed(s); accuracy of the global model on {} held-out examples. Values are mean ± sample std (min–max) over the seeds; rounds to target over the seeds that reached it. The centralized reference counts {} epochs as a round.\n",
        r.learner, r.sites, r.rounds, r.epochs, r.seeds, r.held_out, r.epochs
    );
    let _ = writeln!(
        s,
        "| config | α | final accuracy | rounds to {} | reached |",
        r.target
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for c in std::iter::once(&r.reference).chain(&r.configs) {
        let alpha = if c.config.alpha.is_finite() {
            alpha_text(c.config.alpha)
        } else {
            "–".into()
        };
        let rounds = if c.summary.reached == 0 {
            "not reached".into()
        } else {
            spread_text(c.summary.rounds_to_target, 1)
        };
        let failed = match c.summary.failed {
            0 => String::new(),
            f => format!(" ({f} failed)"),
        };
        let _ = writeln!(
            s,
            "| {} | {alpha} | {} | {rounds} | {}/{}{failed} |",
            c.config.label,
            spread_text(c.summary.final_accuracy, 4),
            c.summary.reached,
            c.summary.runs
        );
    }
    for c in std::iter::once(&r.reference).chain(&r.configs) {
        for run in &c.runs {
            if let Some(e) = &run.error {
                let _ = writeln!(
                    s,
                    "\n{} α={} seed {} failed: {e}",
                    c.config.label,
                    alpha_text(c.config.alpha),
                    run.seed
                );
            }
        }
    }
    s
}

/// Mean, lowest and highest accuracy per round over the finished runs of a configuration.
fn band(c: &ConfigResult) -> Option<Vec<(f64, f64, f64)>> {
    let ok: Vec<&RunResult> = c.runs.iter().filter(|r| r.ok()).collect();
    let len = ok.iter().map(|r| r.accuracy.len()).min()?;
    Some(
        (0..len)
            .map(|i| {
                let v: Vec<f64> = ok.iter().map(|r| r.accuracy[i]).collect();
                let s = Spread::of(&v).unwrap_or(Spread {
                    mean: f64::NAN,
                    std: 0.0,
                    min: f64::NAN,
                    max: f64::NAN,
                });
                (s.mean, s.min, s.max)
            })
            .collect(),
    )
}

/// Colours that stay apart on white (matplotlib's tab10).
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// One panel: its title and its lines (label, configuration).
struct Panel<'a> {
    title: String,
    lines: Vec<(String, &'a ConfigResult)>,
}

/// Draws the accuracy curves as an SVG: the algorithms at the lowest α on the left, FedAvg
/// across α on the right; mean over the seeds with a min–max band, the centralized reference
/// dashed, the target as a grey line. Round 0 (the untrained model) is left out, so the axis
/// shows the part where the curves differ.
pub fn plot(r: &StudyResult, path: &Path) -> anyhow::Result<()> {
    let lowest = r
        .configs
        .iter()
        .map(|c| c.config.alpha)
        .fold(f64::INFINITY, f64::min);
    let left = Panel {
        title: format!("Algorithms at α = {}", alpha_text(lowest)),
        lines: r
            .configs
            .iter()
            .filter(|c| c.config.alpha == lowest)
            .map(|c| (c.config.label.clone(), c))
            .collect(),
    };
    let right = Panel {
        title: "FedAvg across α (label skew)".into(),
        lines: r
            .configs
            .iter()
            .filter(|c| c.config.aggregator == "FedAvg")
            .map(|c| (format!("FedAvg α = {}", alpha_text(c.config.alpha)), c))
            .collect(),
    };
    // One y range for both panels so they compare at a glance: from the lowest mean after
    // round 1 (rounded down to 0.05) to just above the highest value (rounded up to 0.01).
    let curves: Vec<Vec<(f64, f64, f64)>> = std::iter::once(&r.reference)
        .chain(&r.configs)
        .filter_map(band)
        .collect();
    let after_first = || {
        curves
            .iter()
            .flat_map(|b| b.iter().skip(1))
            .filter(|p| p.0.is_finite())
    };
    let low = after_first().map(|p| p.0).fold(1.0f64, f64::min);
    let high = after_first().map(|p| p.2).fold(r.target, f64::max);
    let y0 = (((low - 0.01) / 0.05).floor() * 0.05).clamp(0.0, 0.9);
    let y1 = ((high + 0.01) * 100.0).ceil().min(100.0) / 100.0;
    let root = SVGBackend::new(path, (1500, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "MNIST, {}, {} sites, {} local epochs per round, mean of {} seed(s), band = min..max",
            r.learner, r.sites, r.epochs, r.seeds
        ),
        ("sans-serif", 22),
    )?;
    let (a, b) = root.split_horizontally(750);
    for (area, panel) in [(a, left), (b, right)] {
        draw_panel(&area, &panel, r, (y0, y1))?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    panel: &Panel<'_>,
    r: &StudyResult,
    (y0, y1): (f64, f64),
) -> anyhow::Result<()> {
    let x1 = f64::from(r.rounds.max(2));
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(1.0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("held-out accuracy")
        // At most one label a round, so short runs show each round once.
        .x_labels((r.rounds as usize).clamp(2, 11))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    // Values off the axis are pinned to it, so a bad early round does not draw outside.
    let at = |i: usize, v: f64| (i as f64, v.clamp(y0, y1));
    for (k, (label, c)) in panel.lines.iter().enumerate() {
        let Some(b) = band(c) else { continue };
        let colour = COLOURS[k % COLOURS.len()];
        if r.seeds > 1 {
            let upper = b.iter().enumerate().skip(1).map(|(i, p)| at(i, p.2));
            let lower = b.iter().enumerate().skip(1).rev().map(|(i, p)| at(i, p.1));
            chart.draw_series(std::iter::once(Polygon::new(
                upper.chain(lower).collect::<Vec<_>>(),
                colour.mix(0.15).filled(),
            )))?;
        }
        chart
            .draw_series(LineSeries::new(
                b.iter().enumerate().skip(1).map(|(i, p)| at(i, p.0)),
                colour.stroke_width(2),
            ))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(2))
            });
    }
    if let Some(b) = band(&r.reference) {
        chart
            .draw_series(DashedLineSeries::new(
                b.iter()
                    .enumerate()
                    .skip(1)
                    .map(|(i, p)| at(i, p.0))
                    .collect::<Vec<_>>(),
                8,
                5,
                BLACK.stroke_width(2),
            ))?
            .label(format!("centralized ({} epochs = 1 round)", r.epochs))
            .legend(|(x, y)| {
                plotters::element::DashedPathElement::new(
                    vec![(x, y), (x + 24, y)],
                    5,
                    3,
                    BLACK.stroke_width(2),
                )
            });
    }
    let grey = RGBColor(110, 110, 110);
    chart
        .draw_series(DashedLineSeries::new(
            [(1.0, r.target), (x1, r.target)],
            2,
            4,
            grey.stroke_width(2),
        ))?
        .label(format!("target {}", r.target))
        .legend(move |(x, y)| {
            plotters::element::DashedPathElement::new(
                vec![(x, y), (x + 24, y)],
                2,
                3,
                grey.stroke_width(2),
            )
        });
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(grey)
        .label_font(("sans-serif", 15))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_target_counts_the_first_crossing() {
        let cases: [(&[f64], f64, Option<u32>); 6] = [
            (&[0.1, 0.5, 0.92, 0.93, 0.91, 0.95], 0.93, Some(3)),
            (&[0.1, 0.94], 0.93, Some(1)),
            (&[0.95, 0.2], 0.93, Some(0)),
            (&[0.1, 0.929_999, 0.9], 0.93, None),
            (&[], 0.93, None),
            (&[0.1, 0.5, 0.5], 0.5, Some(1)),
        ];
        for (curve, target, want) in cases {
            assert_eq!(
                rounds_to_target(curve, target),
                want,
                "{curve:?} to {target}"
            );
        }
    }

    #[test]
    fn spread_uses_the_sample_deviation() {
        let s = Spread::of(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.mean, s.std, s.min, s.max), (2.0, 1.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[5.0]).unwrap().std, 0.0);
        assert!(Spread::of(&[]).is_none());
    }

    #[test]
    fn summary_counts_reached_and_failed_runs() {
        let run = |seed, accuracy: Vec<f64>, error: Option<&str>| RunResult {
            seed,
            accuracy,
            seconds: 1.0,
            error: error.map(String::from),
        };
        let s = summarize(
            &[
                run(0, vec![0.1, 0.9, 0.95], None),
                run(1, vec![0.1, 0.94, 0.96], None),
                run(2, vec![0.1, 0.8, 0.85], None),
                run(3, vec![], Some("unknown aggregator")),
            ],
            0.93,
        );
        assert_eq!((s.reached, s.runs, s.failed), (2, 4, 1));
        let rounds = s.rounds_to_target.unwrap();
        assert_eq!((rounds.mean, rounds.min, rounds.max), (1.5, 1.0, 2.0));
        let f = s.final_accuracy.unwrap();
        assert!((f.mean - 0.92).abs() < 1e-12, "{f:?}");
    }

    #[test]
    fn a_tiny_study_writes_table_results_and_plot() {
        let out = tempfile::tempdir().unwrap();
        let b = AlgorithmsBench {
            rounds: 2,
            epochs: 1,
            seeds: 1,
            sites: 2,
            target: 0.5,
            learner: LearnerKind::Mlp,
            hidden: 8,
            data_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist"),
            out: out.path().to_path_buf(),
            configs: vec![
                AlgoConfig::new("FedAvg", "FedAvg", json!({}), 1.0),
                AlgoConfig::new("Nope", "NoSuchAggregator", json!({}), 1.0),
            ],
            threads: 2,
            progress: false,
        };
        let r = run_study(&b).unwrap();
        let fedavg = &r.configs[0];
        assert_eq!(fedavg.runs[0].error, None);
        assert_eq!(
            fedavg.runs[0].accuracy.len(),
            3,
            "initial model and 2 rounds"
        );
        assert!(fedavg.runs[0].accuracy[2] > 0.5, "{:?}", fedavg.runs[0]);
        assert_eq!(r.reference.runs[0].accuracy.len(), 3);
        // A configuration the job loader refuses is recorded, not fatal.
        assert_eq!(r.configs[1].summary.failed, 1);
        assert!(
            r.configs[1].runs[0]
                .error
                .as_deref()
                .unwrap()
                .contains("NoSuchAggregator")
        );
        let table = std::fs::read_to_string(out.path().join("table.md")).unwrap();
        assert!(table.contains("| FedAvg | 1.0 | 0."), "{table}");
        assert!(table.contains("| centralized | – |"), "{table}");
        assert!(
            table.contains("| Nope | 1.0 | – | not reached | 0/1 (1 failed) |"),
            "{table}"
        );
        let json: Value =
            serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap())
                .unwrap();
        assert_eq!(
            json["configs"][0]["runs"][0]["accuracy"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        let svg = std::fs::read_to_string(out.path().join("accuracy.svg")).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(100)]);
        assert!(svg.contains("FedAvg α = 1.0") && svg.contains("centralized"));
        assert!(svg.contains("<polyline"), "the curves are drawn");
    }
}
