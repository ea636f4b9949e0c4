//! The real `flare-node simulate` binary on the shipped example and on generated jobs.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use flare_node::data::Dataset;
use flare_node::learner::mlp::Mlp;

fn bin() -> Command {
    Command::new(flare_node::node_bin())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn simulate(job: &Path, n: usize, ws: &Path) -> serde_json::Value {
    let out = bin()
        .args(["simulate", "--quiet", "--json", "-n", &n.to_string(), "-w"])
        .arg(ws)
        .arg(job)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "simulate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn hello_fedavg_reaches_85_percent_with_8_clients() {
    let ws = tempfile::tempdir().unwrap();
    let report = simulate(&root().join("examples/hello-fedavg"), 8, ws.path());
    let metrics = report["metrics"].as_object().unwrap();
    assert_eq!(metrics.len(), 6, "versions 0..=5: {metrics:?}");
    let acc = metrics["5"]["accuracy"].as_f64().unwrap();
    assert!(acc >= 0.85, "final held-out accuracy {acc}");
    assert!(metrics["0"]["accuracy"].as_f64().unwrap() < 0.3);
    assert_eq!(report["rounds"].as_array().unwrap().len(), 5);
    assert_eq!(report["round_models"].as_array().unwrap().len(), 5);

    // The written model is the final one: evaluating it independently gives the reported
    // accuracy on the same held-out split.
    let model =
        flare_node::model_io::read(Path::new(report["final_model"].as_str().unwrap())).unwrap();
    let net = Mlp::from_model(&model, 64).unwrap();
    let (_, held_out) = Dataset::load_mnist_test(&root().join("data/mnist"))
        .unwrap()
        .split(2000, 0);
    let mine = net.evaluate(&held_out)["accuracy"];
    assert!((mine - acc).abs() < 1e-9, "file gives {mine}, report {acc}");
    assert!(ws.path().join("server/simulate_job/metrics.json").is_file());
}

#[test]
fn a_thousand_clients_of_a_tiny_model_finish() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job");
    flare_node::bench::write_synthetic_job(&job, 10, 1000, 3).unwrap();
    let report = simulate(&job, 1000, &dir.path().join("ws"));
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    assert!(rounds.iter().all(|r| r["accepted"] == 1000));
    // Every site adds (index % 1024) + 1 with equal weight: the mean step is 500.5 a round.
    // FedAvg's running f32 mean over 1000 results stays within a few ulps of 1501.5.
    let model =
        flare_node::model_io::read(Path::new(report["final_model"].as_str().unwrap())).unwrap();
    for v in model.params["layer.0000"].to_f32_vec() {
        assert!((v - 1501.5).abs() < 1e-3, "{v}");
    }
}

#[test]
fn bad_jobs_fail_with_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job");
    flare_node::bench::write_synthetic_job(&job, 10, 2, 1).unwrap();
    let server = job.join("app/config/config_fed_server.json");
    let text = std::fs::read_to_string(&server).unwrap();
    std::fs::write(&server, text.replace("\"FedAvg\"", "\"Median\"")).unwrap();
    let out = bin()
        .args(["simulate", "-n", "2"])
        .arg(&job)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config_fed_server.json: components[1].name: unknown aggregator \"Median\""),
        "{err}"
    );

    let out = bin()
        .args(["simulate", "-n", "1"])
        .arg(root().join("examples/hello-fedavg"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("min_clients is 2 but only 1 clients"), "{err}");

    let out = bin()
        .args(["simulate", "-n", "2", "/nonexistent/job"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/job"));
}

#[test]
fn dirichlet_skew_still_trains() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job");
    let src = root().join("examples/hello-fedavg");
    std::fs::create_dir_all(job.join("app/config")).unwrap();
    std::fs::copy(src.join("meta.json"), job.join("meta.json")).unwrap();
    std::fs::copy(
        src.join("app/config/config_fed_server.json"),
        job.join("app/config/config_fed_server.json"),
    )
    .unwrap();
    let client = std::fs::read_to_string(src.join("app/config/config_fed_client.json"))
        .unwrap()
        .replace(
            "../../data/mnist",
            &root().join("data/mnist").display().to_string(),
        )
        .replace(
            "{ \"kind\": \"uniform\" }",
            "{ \"kind\": \"dirichlet\", \"alpha\": 0.5 }",
        );
    assert!(client.contains("dirichlet"));
    std::fs::write(job.join("app/config/config_fed_client.json"), client).unwrap();
    let report = simulate(&job, 4, &dir.path().join("ws"));
    let acc = report["metrics"]["5"]["accuracy"].as_f64().unwrap();
    assert!(acc > 0.7, "non-IID accuracy {acc}");
}

#[test]
fn cyclic_passes_one_model_round_the_sites() {
    let ws = tempfile::tempdir().unwrap();
    let report = simulate(&root().join("examples/cyclic-mnist"), 3, ws.path());
    // 3 rounds × 3 sites = 9 hops, each trained by one site; the metrics of hop k measure
    // the model after k hops.
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 9, "{report}");
    assert!(rounds.iter().all(|r| r["accepted"] == 1));
    let metrics = report["metrics"].as_object().unwrap();
    assert!(metrics["0"]["accuracy"].as_f64().unwrap() < 0.3);
    let last = metrics["8"]["accuracy"].as_f64().unwrap();
    assert!(last >= 0.9, "accuracy after 8 hops {last}");
    // The final model is the last hop's: it is better than the initial one on held-out data.
    let model =
        flare_node::model_io::read(Path::new(report["final_model"].as_str().unwrap())).unwrap();
    let net = Mlp::from_model(&model, 64).unwrap();
    let (_, held_out) = Dataset::load_mnist_test(&root().join("data/mnist"))
        .unwrap()
        .split(2000, 0);
    assert!(net.evaluate(&held_out)["accuracy"] >= 0.9);
}

#[test]
fn swarm_then_cross_site_evaluation_fills_the_matrix() {
    let ws = tempfile::tempdir().unwrap();
    let report = simulate(&root().join("examples/swarm-cse-mnist"), 3, ws.path());
    let cross = report["cross_site"].as_object().unwrap();
    assert_eq!(cross.len(), 3, "{report}");
    let best = report["metrics"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|m| m["accuracy"].as_f64())
        .fold(0.0, f64::max);
    for (evaluator, row) in cross {
        let row = row.as_object().unwrap();
        assert_eq!(row.len(), 4, "{evaluator}: {row:?}");
        for model in ["site-1", "site-2", "site-3"] {
            let acc = row[model]["accuracy"].as_f64().unwrap();
            assert!(acc > 0.85, "{evaluator} on {model}: {acc}");
        }
        // The global model evaluated is the best one the swarm produced.
        let global = row["global"]["accuracy"].as_f64().unwrap();
        assert!((global - best).abs() < 1e-9, "global {global}, best {best}");
    }
    // Each site's own model is the one it trained last, not the global one.
    let own = cross["site-1"]["site-1"]["accuracy"].as_f64().unwrap();
    assert!((own - best).abs() > 1e-9);
    let file = ws
        .path()
        .join("server/simulate_job/cross_site_val/cross_val_results.json");
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(&written, &report["cross_site"]);
}
