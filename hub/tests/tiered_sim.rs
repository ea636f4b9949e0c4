//! The tiered simulator against the flat one: 2 regions × 3 sites with very unequal sample
//! counts and one local round give the model of flat FedAvg over the same 6 sites.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use flare_hub::sim::{TieredSimOptions, run};
use flare_node::simulator::{SimOptions, run as run_flat};
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// A job folder: the MNIST MLP under `workflow`, its training data split by `partition`.
fn job(dir: &Path, workflow: Value, partition: Value) {
    let config = dir.join("app/config");
    std::fs::create_dir_all(&config).unwrap();
    let meta =
        json!({"name": "tiered-exactness", "min_clients": 1, "deploy_map": {"app": ["@ALL"]}});
    std::fs::write(dir.join("meta.json"), meta.to_string()).unwrap();
    let server = json!({
        "format_version": 2,
        "workflows": [workflow],
        "components": [
            {"id": "model", "name": "MnistMlp", "args": {"hidden": 16, "seed": 0}},
            {"id": "aggregator", "name": "FedAvg", "args": {}},
            {"id": "persistor", "name": "SafetensorsPersistor", "args": {"save_every_round": false}}
        ]
    });
    std::fs::write(config.join("config_fed_server.json"), server.to_string()).unwrap();
    let client = json!({
        "format_version": 2,
        "executors": [{"tasks": ["train", "validate"], "executor": {"name": "MnistMlpLearner", "args": {
            "data_dir": root().join("data/mnist"),
            "held_out": 2000,
            "partition": partition,
            "hidden": 16, "lr": 0.1, "batch_size": 32, "epochs": 1, "seed": 0
        }}}]
    });
    std::fs::write(config.join("config_fed_client.json"), client.to_string()).unwrap();
}

/// Sites of very unequal size: site i gets a share ∝ 10^(i mod 4), about 7, 71, 708 and
/// 7,080 examples.
fn unequal() -> Value {
    json!({"kind": "geometric", "ratio": 10.0, "period": 4})
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let m = flare_node::model_io::read(path).unwrap();
    m.params
        .into_iter()
        .map(|(k, t)| (k, t.to_f32_vec()))
        .collect()
}

/// The largest difference between the tiered and the flat final model after `rounds` rounds,
/// relative to each tensor's largest value.
fn tiered_against_flat(rounds: u32, region_workflow: &str) -> f64 {
    let tmp = tempfile::tempdir().unwrap();
    let (tiered_job, flat_job) = (tmp.path().join("tiered"), tmp.path().join("flat"));
    job(
        &tiered_job,
        json!({"name": "TieredScatterAndGather", "args": {
            "num_rounds": rounds, "local_rounds": 1, "min_regions": 2, "min_clients": 3,
            "region_workflow": region_workflow}}),
        unequal(),
    );
    job(
        &flat_job,
        json!({"name": "ScatterAndGather", "args": {"num_rounds": rounds, "min_clients": 6}}),
        unequal(),
    );
    let tiered = run(&TieredSimOptions {
        job_dir: tiered_job,
        regions: 2,
        sites_per_region: 3,
        workspace: tmp.path().join("ws-tiered"),
        threads: 2,
        progress: false,
    })
    .unwrap();
    let flat = run_flat(&SimOptions {
        job_dir: flat_job,
        clients: 6,
        workspace: tmp.path().join("ws-flat"),
        threads: 2,
        progress: false,
    })
    .unwrap();
    // The regions weigh very differently (sizes 7 + 71 + 708 against 7,080 + 7 + 71), so
    // counting them 1:1 would give another model (protocols' tiered tests show that it does).
    let w = &tiered.rounds[0].weights;
    assert_eq!(w.len(), 2);
    assert!(w["region-2"] > 5.0 * w["region-1"], "{w:?}");
    assert_eq!(tiered.sites_on_final_model, 6);
    let (a, b) = (tensors(&tiered.final_model), tensors(&flat.final_model));
    assert_eq!(a.len(), b.len());
    let mut worst = 0f64;
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let scale = tb.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
        for (x, y) in ta.iter().zip(tb) {
            worst = worst.max(f64::from((x - y).abs()) / scale);
        }
    }
    eprintln!(
        "{rounds} round(s), {region_workflow} in each region: tiered vs flat differ by at most {worst:.2e} of the tensor's largest value"
    );
    // The sites measured the same models.
    for (v, m) in &flat.metrics {
        let t = &tiered.metrics[v];
        assert!(
            (t["accuracy"] - m["accuracy"]).abs() < 1e-6,
            "version {v}: {t:?} vs {m:?}"
        );
    }
    worst
}

#[test]
fn one_local_round_equals_flat_fedavg_over_every_site() {
    // One aggregation: the partials' sums and the flat running mean differ only by f32
    // rounding.
    let one = tiered_against_flat(1, "ScatterAndGather");
    assert!(
        one < 1e-6,
        "after one round tiered and flat differ by {one:e} (relative)"
    );
    // Training amplifies those last bits round by round; three rounds stay within 1e-5.
    let three = tiered_against_flat(3, "ScatterAndGather");
    assert!(
        three < 1e-5,
        "after three rounds tiered and flat differ by {three:e}"
    );
}

#[test]
fn a_swarm_in_each_region_equals_flat_fedavg_over_every_site_too() {
    // Each region's sites run a swarm (peer to peer, a different aggregator each round), the
    // hub hands its result up weighted by the swarm's last round: still flat FedAvg.
    let one = tiered_against_flat(1, "Swarm");
    assert!(
        one < 1e-6,
        "after one round tiered (swarm regions) and flat differ by {one:e} (relative)"
    );
}

#[test]
fn a_flat_job_is_refused_with_regions_and_names_its_config() {
    let tmp = tempfile::tempdir().unwrap();
    job(
        tmp.path(),
        json!({"name": "ScatterAndGather", "args": {"num_rounds": 1}}),
        unequal(),
    );
    let e = run(&TieredSimOptions {
        job_dir: tmp.path().to_path_buf(),
        regions: 2,
        sites_per_region: 2,
        workspace: tmp.path().join("ws"),
        threads: 1,
        progress: false,
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("config_fed_server.json") && e.contains("TieredScatterAndGather"),
        "{e}"
    );
}

#[test]
fn a_thousand_sites_in_ten_regions_end_on_one_model() {
    let tmp = tempfile::tempdir().unwrap();
    job(
        tmp.path(),
        json!({"name": "TieredScatterAndGather", "args": {
            "num_rounds": 2, "local_rounds": 1, "min_regions": 10, "min_clients": 100}}),
        json!({"kind": "uniform"}),
    );
    let out = std::process::Command::new(flare_node::node_bin())
        .args(["simulate", "--regions", "10", "-n", "100", "--json", "-w"])
        .arg(tmp.path().join("ws"))
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["sites"], 1000);
    assert_eq!(r["sites_on_final_model"], 1000);
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    for g in rounds {
        assert_eq!(g["regions"], 10);
        assert_eq!(g["sites"], 1000);
    }
    // Tier 1 carries one model down and one partial up per region and round (and the final
    // validation's model down): R·(2·rounds + 1) models, against 1000·2·rounds flat.
    let model = std::fs::metadata(r["final_model"].as_str().unwrap())
        .unwrap()
        .len();
    let tier1 = r["bytes_tier1"].as_u64().unwrap();
    assert!(
        tier1 <= 10 * 5 * model,
        "{tier1} bytes at tier 1 for a {model}-byte model"
    );
}
