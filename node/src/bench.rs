//! `flare-node bench …`: repeatable measurements of the simulator (seconds per round, peak
//! memory), run in a fresh process per configuration so peak RSS belongs to that run alone.

use std::path::Path;

use anyhow::Context;
use serde_json::json;

use crate::simulator::{SimOptions, SimReport, run};

/// One simulator benchmark configuration.
#[derive(Debug, Clone)]
pub struct SimBench {
    /// f32 parameters in the model.
    pub params: usize,
    /// Simulated clients.
    pub clients: usize,
    /// Rounds.
    pub rounds: u32,
    /// Worker threads.
    pub threads: usize,
}

/// What one benchmark run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimBenchResult {
    /// f32 parameters in the model.
    pub params: usize,
    /// Simulated clients.
    pub clients: usize,
    /// Rounds.
    pub rounds: u32,
    /// Worker threads.
    pub threads: usize,
    /// Median wall seconds per round.
    pub median_round_s: f64,
    /// Peak resident memory of the process in MiB (`VmHWM`).
    pub peak_rss_mib: f64,
    /// The model's size in MiB (4 bytes a parameter).
    pub model_mib: f64,
    /// Peak RSS over the model's size (the goal for a large model: at most 2.5).
    pub peak_rss_per_model: f64,
    /// Whole run in seconds, including setup and writing the final model.
    pub total_s: f64,
}

/// Writes a job that trains a synthetic model with FedAvg into `dir`.
pub fn write_synthetic_job(
    dir: &Path,
    params: usize,
    clients: usize,
    rounds: u32,
) -> anyhow::Result<()> {
    let meta =
        json!({"name": "bench-synthetic", "min_clients": clients, "deploy_map": {"app": ["@ALL"]}});
    let server = json!({
        "format_version": 2,
        "workflows": [{"id": "sag", "name": "ScatterAndGather", "args": {
            "num_rounds": rounds, "min_clients": clients,
            "wait_time_after_min_received": 0, "task_timeout": 3600, "validate_final": false}}],
        "components": [
            {"id": "model", "name": "SyntheticModel", "args": {"num_params": params}},
            {"id": "aggregator", "name": "FedAvg", "args": {}},
            {"id": "persistor", "name": "SafetensorsPersistor", "args": {"save_every_round": false}}
        ]
    });
    let client = json!({
        "format_version": 2,
        "executors": [{"tasks": ["train", "validate"],
                       "executor": {"name": "SyntheticLearner", "args": {"num_params": params}}}]
    });
    write_job_files(dir, &meta, &server, &client)
}

/// Writes a job folder's `meta.json` and its app's server and client configs into `dir`
/// (`app/config/` made if missing).
pub(crate) fn write_job_files(
    dir: &Path,
    meta: &serde_json::Value,
    server: &serde_json::Value,
    client: &serde_json::Value,
) -> anyhow::Result<()> {
    let cfg = dir.join("app/config");
    std::fs::create_dir_all(&cfg).with_context(|| format!("cannot create {}", cfg.display()))?;
    for (path, v) in [
        (dir.join("meta.json"), meta),
        (cfg.join("config_fed_server.json"), server),
        (cfg.join("config_fed_client.json"), client),
    ] {
        std::fs::write(&path, serde_json::to_vec_pretty(v)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Turns the job [`write_synthetic_job`] wrote into `dir` into a swarm job: every site trains
/// and may aggregate, all results are waited for, and nothing times out before an hour.
pub fn make_swarm_job(
    dir: &Path,
    params: usize,
    clients: usize,
    rounds: u32,
) -> anyhow::Result<()> {
    let server = json!({
        "format_version": 2,
        "workflows": [{"id": "swarm", "name": "Swarm", "args": {
            "num_rounds": rounds, "min_clients": clients,
            "learn_task_timeout": 3600, "min_responses_required": clients,
            "wait_time_after_min_resps_received": 0, "max_concurrent_submissions": clients,
            "max_status_report_interval": 600, "progress_timeout": 3600,
            "key_metric": "value"}}],
        "components": [
            {"id": "model", "name": "SyntheticModel", "args": {"num_params": params}},
            {"id": "aggregator", "name": "FedAvg", "args": {}},
            {"id": "persistor", "name": "SafetensorsPersistor", "args": {"save_every_round": false}}
        ]
    });
    let path = dir.join("app/config/config_fed_server.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&server)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// SecAgg+ settings for the synthetic model of a job with `clients` sites: every site a
/// neighbour of every other (`num_shares` 1.0), half of them rebuild a secret, and
/// `max_weight` large enough that no weight is clipped to 1 and every weighted update stays
/// well inside `clipping_range`. The synthetic learner of site `i` moves every weight by
/// `i + 1` and claims [`SyntheticArgs::default`]'s sample count `n`, so its weighted update is
/// `(i + 1) · n / max_weight`; with `max_weight = n · max(clients, 10)` that is at most 1,
/// an eighth of the clipping range of 8.
///
/// [`SyntheticArgs::default`]: crate::learner::synthetic::SyntheticArgs
pub fn synthetic_secagg_args(clients: usize) -> serde_json::Value {
    let samples = crate::learner::synthetic::SyntheticArgs::default().samples;
    json!({
        "num_shares": 1.0,
        "reconstruction_threshold": 0.5,
        "max_weight": (samples * clients.max(10)) as f64,
        "clipping_range": 8.0,
        "quantization_range": 1u64 << 22,
        "modulus_range": 1u64 << 32,
        // The key stages carry a few hundred bytes, but a loaded machine moving 40 MB models
        // to eight processes can be slow to answer them: no stage is given up on early.
        "stage_timeout": 600.0
    })
}

/// Adds `secure_aggregation` (`args`) to the workflow of the job in `dir` (a job
/// [`write_synthetic_job`] or [`make_swarm_job`] wrote: one workflow, FedAvg).
pub fn add_secure_aggregation(dir: &Path, args: &serde_json::Value) -> anyhow::Result<()> {
    let path = dir.join("app/config/config_fed_server.json");
    let text = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut server: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let wf_args = server
        .pointer_mut("/workflows/0/args")
        .and_then(serde_json::Value::as_object_mut)
        .with_context(|| format!("{}: no workflows[0].args object", path.display()))?;
    wf_args.insert("secure_aggregation".into(), args.clone());
    std::fs::write(&path, serde_json::to_vec_pretty(&server)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Peak resident set size of this process in MiB, from `/proc/self/status`.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    flare_protocols::aggregators::robust::median(&mut v)
}

/// The size of a synthetic model of `params` f32 parameters, in MiB.
pub fn model_mib(params: usize) -> f64 {
    params as f64 * 4.0 / f64::from(1 << 20)
}

/// Runs one configuration in this process and measures it.
pub fn run_sim_bench(b: &SimBench) -> anyhow::Result<SimBenchResult> {
    let dir = tempfile::tempdir()?;
    let job = dir.path().join("job");
    write_synthetic_job(&job, b.params, b.clients, b.rounds)?;
    let report: SimReport = run(&SimOptions {
        job_dir: job,
        clients: b.clients,
        workspace: dir.path().join("ws"),
        threads: b.threads,
        progress: false,
    })?;
    Ok(SimBenchResult {
        params: b.params,
        clients: b.clients,
        rounds: b.rounds,
        threads: b.threads,
        median_round_s: median(report.rounds.iter().map(|r| r.seconds).collect()),
        peak_rss_mib: peak_rss_mib().unwrap_or(f64::NAN),
        model_mib: model_mib(b.params),
        peak_rss_per_model: peak_rss_mib().unwrap_or(f64::NAN) / model_mib(b.params),
        total_s: report.seconds,
    })
}

/// Centralized training of the built-in MLP on the whole MNIST training part: the yardstick
/// that federated runs are compared with.
pub fn run_centralized(data_dir: &Path, epochs: usize) -> anyhow::Result<serde_json::Value> {
    use crate::learner::mlp::{Mlp, MlpHyper};
    use rand::SeedableRng;
    let ds = crate::data::Dataset::load_mnist_test(data_dir)?;
    let (train, test) = ds.split(2_000, 0);
    let hyper = MlpHyper {
        epochs: 1,
        ..MlpHyper::default()
    };
    let mut net = Mlp::init(hyper.hidden, 0);
    let idx: Vec<usize> = (0..train.len()).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let started = std::time::Instant::now();
    let mut per_epoch = Vec::new();
    for _ in 0..epochs {
        net.train(&train, &idx, &hyper, &mut rng)?;
        per_epoch.push(net.evaluate(&test)["accuracy"]);
    }
    Ok(json!({
        "train_examples": train.len(),
        "held_out_examples": test.len(),
        "hidden": hyper.hidden,
        "epochs": epochs,
        "held_out_accuracy_per_epoch": per_epoch,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

/// One `flare-node bench torch-step` configuration (feature `torch`).
#[derive(Debug, Clone)]
pub struct TorchStepBench {
    /// Where to train.
    pub device: crate::learner::cnn::DeviceSpec,
    /// Batch sizes to time, one after the other.
    pub batch_sizes: Vec<usize>,
    /// Timed steps per batch size.
    pub steps: usize,
    /// Untimed steps first (cuDNN autotuning, allocator warm-up).
    pub warmup: usize,
    /// The optimizer.
    pub optimizer: crate::learner::cnn::OptimizerKind,
    /// Its learning rate.
    pub lr: f64,
}

/// Times the CNN training step of the torch learner ([`crate::learner::torch::CnnTrainer`])
/// on random data kept on the device, as `bench/torch_step.py` does in PyTorch: batches are
/// consecutive slices of an 8192-example pool, the clock is read after a device sync.
#[cfg(feature = "torch")]
pub fn run_torch_step(b: &TorchStepBench) -> anyhow::Result<Vec<serde_json::Value>> {
    use crate::learner::cnn::CnnHyper;
    use crate::learner::torch::{CnnTrainer, resolve_device};
    use tch::{Device, Kind, Tensor};

    let device = resolve_device(b.device)?;
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    tch::manual_seed(0);
    const POOL: i64 = 8192;
    let x = Tensor::randn([POOL, 1, 28, 28], (Kind::Float, device));
    let y = Tensor::randint(10, [POOL], (Kind::Int64, device));
    let mut out = Vec::new();
    for &bs in &b.batch_sizes {
        let bs = i64::try_from(bs.clamp(1, POOL as usize))?;
        let hyper = CnnHyper {
            lr: b.lr,
            batch_size: bs as usize,
            optimizer: b.optimizer,
            ..CnnHyper::default()
        };
        let mut t = CnnTrainer::new(device, &hyper)?;
        // Start from PyTorch's default initialization, as the Python side does.
        t.net_mut().load(&crate::learner::cnn::init(0))?;
        let batches = POOL / bs;
        let mut run = |steps: usize| {
            let mut last = None;
            for i in 0..steps as i64 {
                let start = (i % batches) * bs;
                last = Some(t.step(&x.narrow(0, start, bs), &y.narrow(0, start, bs)));
            }
            sync();
            last.map(|l| f64::try_from(l).unwrap_or(f64::NAN))
        };
        run(b.warmup);
        let started = std::time::Instant::now();
        let loss = run(b.steps);
        let secs = started.elapsed().as_secs_f64();
        out.push(json!({
            "impl": "flare-tch",
            "device": format!("{device:?}"),
            "optimizer": format!("{:?}", b.optimizer).to_lowercase(),
            "batch_size": bs,
            "steps": b.steps,
            "seconds": secs,
            "ms_per_step": 1e3 * secs / b.steps.max(1) as f64,
            "samples_per_s": (b.steps as f64 * bs as f64) / secs,
            "last_loss": loss,
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn secure_aggregation_is_added_to_either_workflow_and_the_job_loads() {
        for swarm in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_synthetic_job(dir.path(), 100, 8, 2).unwrap();
            if swarm {
                make_swarm_job(dir.path(), 100, 8, 2).unwrap();
            }
            let args = synthetic_secagg_args(8);
            add_secure_aggregation(dir.path(), &args).unwrap();
            let job = crate::job::Job::load(dir.path()).unwrap();
            let sa: flare_protocols::secagg::SecAggArgs = serde_json::from_value(args).unwrap();
            assert_eq!(job.server.secagg, Some(sa), "swarm: {swarm}");
            let p = sa.resolve(8).unwrap();
            assert_eq!((p.num_shares, p.threshold), (8, 4));
            // The largest weighted update (site 8's step of 8) is well inside the clip.
            let samples = crate::learner::synthetic::SyntheticArgs::default().samples as f64;
            assert!(8.0 * samples / p.max_weight <= p.clipping_range / 8.0);
        }
    }

    #[test]
    fn a_small_benchmark_runs_and_measures() {
        let r = run_sim_bench(&SimBench {
            params: 10,
            clients: 4,
            rounds: 3,
            threads: 2,
        })
        .unwrap();
        assert_eq!(r.rounds, 3);
        assert!(r.median_round_s > 0.0 && r.median_round_s < 5.0, "{r:?}");
        assert!(r.peak_rss_mib > 1.0, "{r:?}");
    }
}
