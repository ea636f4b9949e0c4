//! The aggregation algorithms across real processes: a swarm of `flare-node` sites started
//! from POC kits runs FedOpt and SCAFFOLD, whose state (the server optimizer's moments and
//! step count, SCAFFOLD's global control) must travel from each round's aggregator to the
//! next inside the sealed `Learn`.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::*;
use flare_protocols::aggregators::{FEDOPT_M, FEDOPT_STEPS, SCAFFOLD_C_GLOBAL};

const ROUNDS: u32 = 4;

/// A copy of swarm-mnist with `ROUNDS` rounds of one local epoch and `aggregator` as its
/// aggregator component.
fn swarm_job(dir: &Path, aggregator: &str) -> PathBuf {
    let job = example_copy(dir, "swarm-mnist", 5, ROUNDS, 1);
    let server = job.join("app/config/config_fed_server.json");
    let text = std::fs::read_to_string(&server).unwrap();
    let changed = text.replace(
        r#"{ "id": "aggregator", "name": "FedAvg", "args": {} }"#,
        &format!(r#"{{ "id": "aggregator", "name": "{aggregator}", "args": {{}} }}"#),
    );
    assert_ne!(text, changed, "the example's aggregator line changed");
    std::fs::write(&server, changed).unwrap();
    job
}

#[test]
fn fedopt_and_scaffold_run_as_swarms_whose_state_crosses_aggregators() {
    let f = Federation::running(3, 24_000);
    for aggregator in ["FedOpt", "Scaffold"] {
        // Each run draws its aggregators from its job id, so one run in 27 has the same site
        // aggregate every round; run again until the state had to go from one site to another.
        let mut tries = 0;
        let (job, aggregators) = loop {
            tries += 1;
            let dir = tempfile::tempdir().unwrap();
            let job_dir = swarm_job(dir.path(), aggregator);
            let job = f.submit(job_dir.to_str().unwrap());
            let out = f.admin(&["wait", &job, "--timeout", "300"]);
            assert!(
                out.status.success(),
                "{aggregator}: job did not finish: {}\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                f.log_tails(30)
            );
            let st = f.admin_json(&["status", &job]);
            assert_eq!(st["state"], "finished", "{aggregator}: {st}");
            let aggregators: BTreeSet<String> = st["history"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|h| h["note"].as_str())
                .filter_map(|n| n.split("aggregated by ").nth(1))
                .filter_map(|rest| rest.split(':').next())
                .map(str::to_string)
                .collect();
            assert!(
                !aggregators.is_empty(),
                "{aggregator}: no round was aggregated: {st}"
            );
            if aggregators.len() >= 2 || tries == 4 {
                break (job, aggregators);
            }
        };
        // More than one site aggregated: the state had to go from one to the next.
        assert!(
            aggregators.len() >= 2,
            "{aggregator}: {aggregators:?} in {tries} runs"
        );

        // The run's result is the model alone: the state stays out of it.
        let dl = f.admin_json(&["download", &job]);
        let dir = PathBuf::from(dl["dir"].as_str().unwrap());
        let path = dir.join("global_final.safetensors");
        let model = flare_node::model_io::read(&path).unwrap();
        assert_eq!(
            model.params.keys().collect::<Vec<_>>(),
            ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"],
            "{aggregator}"
        );
        // The last round's model, kept by the site that aggregated it, carries the state
        // every round's aggregator handed on.
        let last = (1..=3)
            .map(|i| {
                f.prod
                    .join(format!("site-{i}/jobs/{job}/models"))
                    .join(format!("round-{:03}.safetensors", ROUNDS - 1))
            })
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{aggregator}: no site kept round {}", ROUNDS - 1));
        let last = flare_node::model_io::read(&last).unwrap();
        match aggregator {
            "FedOpt" => {
                // Every round's aggregator took one step from the count it was handed.
                assert_eq!(
                    last.params[FEDOPT_STEPS].to_f32_vec(),
                    vec![ROUNDS as f32],
                    "{aggregator}"
                );
                assert!(
                    last.params.keys().any(|k| k.starts_with(FEDOPT_M)),
                    "{aggregator}: no momentum buffer in the round model"
                );
            }
            _ => {
                let c = &last.params[&format!("{SCAFFOLD_C_GLOBAL}fc1.weight")];
                let norm: f64 = c.to_f32_vec().iter().map(|x| f64::from(*x).powi(2)).sum();
                assert!(norm > 0.0, "{aggregator}: the global control stayed zero");
            }
        }
        let acc = held_out_accuracy(&path);
        assert!(acc >= 0.85, "{aggregator}: accuracy {acc}");
    }
}

/// The first file named `name` under `dir`, depth first.
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(found) = find_file(&p, name) {
                return Some(found);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

/// Scatter-and-gather across the same kind of federation: the server keeps the state with
/// its round models (what a restarted server resumes from), the result is the model alone.
#[test]
fn fedadam_fedprox_and_the_median_run_in_scatter_and_gather_across_processes() {
    let f = Federation::running(3, 24_100);
    for component in [
        r#"{ "id": "aggregator", "name": "FedAdam", "args": { "eta": 0.01 } }"#,
        r#"{ "id": "aggregator", "name": "FedProx", "args": { "mu": 0.1 } }"#,
        r#"{ "id": "aggregator", "name": "FedMedian", "args": {} }"#,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let job_dir = with_aggregator(dir.path(), "hello-fedavg", component);
        let job = f.submit(job_dir.to_str().unwrap());
        let out = f.admin(&["wait", &job, "--timeout", "300"]);
        assert!(
            out.status.success(),
            "{component}: job did not finish: {}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            f.log_tails(30)
        );
        let dl = f.admin_json(&["download", &job]);
        let path = PathBuf::from(dl["dir"].as_str().unwrap()).join("global_final.safetensors");
        let model = flare_node::model_io::read(&path).unwrap();
        assert_eq!(
            model.params.len(),
            4,
            "{component}: {:?}",
            model.params.keys()
        );
        let acc = held_out_accuracy(&path);
        assert!(acc >= 0.7, "{component}: accuracy {acc} after 2 rounds");
        if component.contains("FedAdam") {
            let last = find_file(&f.prod.join("server"), "round-001.safetensors")
                .unwrap_or_else(|| panic!("the server kept no round model"));
            let last = flare_node::model_io::read(&last).unwrap();
            assert_eq!(last.params[FEDOPT_STEPS].to_f32_vec(), vec![2.0]);
        }
    }
}

/// A copy of `examples/<name>` with its aggregator line replaced by `component`.
fn with_aggregator(dir: &Path, name: &str, component: &str) -> PathBuf {
    let job = example_copy(dir, name, if name == "cyclic-mnist" { 3 } else { 5 }, 2, 1);
    let server = job.join("app/config/config_fed_server.json");
    let text = std::fs::read_to_string(&server).unwrap();
    let line = r#"{ "id": "aggregator", "name": "FedAvg", "args": {} }"#;
    assert!(text.contains(line), "the example's aggregator line changed");
    let changed = text.replace(line, component);
    std::fs::write(&server, changed).unwrap();
    job
}

fn simulate(job: &Path, n: usize) -> std::process::Output {
    let ws = tempfile::tempdir().unwrap();
    std::process::Command::new(bin())
        .args(["simulate", "--quiet", "--json", "-n", &n.to_string(), "-w"])
        .arg(ws.path())
        .arg(job)
        .current_dir(root())
        .output()
        .unwrap()
}

/// Every algorithm a job can name runs in the simulator, in scatter-and-gather and in swarm,
/// with 7 sites (Bulyan's 4f + 3 for f = 1), and learns.
#[test]
fn the_simulator_runs_every_algorithm_in_both_workflows() {
    let components = [
        r#"{ "id": "aggregator", "name": "FedAvg", "args": {} }"#,
        r#"{ "id": "aggregator", "name": "FedProx", "args": { "mu": 0.01 } }"#,
        r#"{ "id": "aggregator", "name": "FedOpt", "args": {} }"#,
        r#"{ "id": "aggregator", "name": "FedAvgM", "args": { "server_momentum": 0.5 } }"#,
        r#"{ "id": "aggregator", "name": "FedAdam", "args": { "eta": 0.01 } }"#,
        r#"{ "id": "aggregator", "name": "FedYogi", "args": {} }"#,
        r#"{ "id": "aggregator", "name": "FedAdagrad", "args": { "eta": 0.01 } }"#,
        r#"{ "id": "aggregator", "name": "Scaffold", "args": {} }"#,
        r#"{ "id": "aggregator", "name": "FedMedian", "args": {} }"#,
        r#"{ "id": "aggregator", "name": "FedTrimmedAvg", "args": { "beta": 0.2 } }"#,
        r#"{ "id": "aggregator", "name": "Krum", "args": { "num_malicious_nodes": 1 } }"#,
        r#"{ "id": "aggregator", "name": "MultiKrum", "args": { "num_malicious_nodes": 1, "num_nodes_to_select": 3 } }"#,
        r#"{ "id": "aggregator", "name": "Bulyan", "args": { "num_malicious_nodes": 1 } }"#,
    ];
    for example in ["hello-fedavg", "swarm-mnist"] {
        for c in components {
            let dir = tempfile::tempdir().unwrap();
            let job = with_aggregator(dir.path(), example, c);
            let out = simulate(&job, 7);
            assert!(
                out.status.success(),
                "{example} {c}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let acc = report["metrics"]["2"]["accuracy"].as_f64().unwrap();
            assert!(acc > 0.6, "{example} {c}: accuracy {acc} after 2 rounds");
        }
    }
}

#[test]
fn an_algorithm_that_cannot_run_is_refused_with_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    // Bulyan with f = 1 needs 7 sites.
    let job = with_aggregator(
        dir.path(),
        "hello-fedavg",
        r#"{ "id": "aggregator", "name": "Bulyan", "args": { "num_malicious_nodes": 1 } }"#,
    );
    let out = simulate(&job, 6);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("needs at least 7") && err.contains("at most 6"),
        "{err}"
    );
    // A cyclic run has nothing to aggregate.
    let job = with_aggregator(
        dir.path(),
        "cyclic-mnist",
        r#"{ "id": "aggregator", "name": "FedOpt", "args": {} }"#,
    );
    let out = simulate(&job, 3);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("config_fed_server.json") && err.contains("components[1].name"),
        "{err}"
    );
    // A bad argument names its key.
    let job = with_aggregator(
        dir.path(),
        "swarm-mnist",
        r#"{ "id": "aggregator", "name": "FedAdam", "args": { "beta_1": 1.5 } }"#,
    );
    let out = simulate(&job, 3);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("components[1].args.beta_1"), "{err}");
}

/// The largest difference between two models' tensors (they must have the same names).
fn max_diff(a: &Path, b: &Path) -> f32 {
    let (a, b) = (
        flare_node::model_io::read(a).unwrap(),
        flare_node::model_io::read(b).unwrap(),
    );
    assert_eq!(
        a.params.keys().collect::<Vec<_>>(),
        b.params.keys().collect::<Vec<_>>()
    );
    a.params
        .iter()
        .flat_map(|(k, t)| {
            let (x, y) = (t.to_f32_vec(), b.params[k].to_f32_vec());
            x.into_iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// `flare-node simulate` of the same sites, data, seeds and algorithm gives the same model in
/// a swarm (a different aggregator every round) as in scatter-and-gather (one server).
#[test]
fn a_simulated_swarm_ends_on_the_scatter_and_gather_model_under_fedopt_and_scaffold() {
    let dir = tempfile::tempdir().unwrap();
    let runs = std::cell::Cell::new(0);
    let final_of = |example: &str, component: &str| -> PathBuf {
        runs.set(runs.get() + 1);
        let sub = dir.path().join(format!("run-{}", runs.get()));
        let job = with_aggregator(&sub, example, component);
        let ws = sub.join("ws");
        let out = std::process::Command::new(bin())
            .args(["simulate", "--quiet", "-n", "4", "-w"])
            .arg(&ws)
            .arg(&job)
            .current_dir(root())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{example} {component}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ws.join("server/simulate_job/global_final.safetensors")
    };
    let fedavg = final_of(
        "hello-fedavg",
        r#"{ "id": "aggregator", "name": "FedAvg", "args": {} }"#,
    );
    for component in [
        r#"{ "id": "aggregator", "name": "FedOpt", "args": {} }"#,
        r#"{ "id": "aggregator", "name": "Scaffold", "args": {} }"#,
    ] {
        let sag = final_of("hello-fedavg", component);
        let swarm = final_of("swarm-mnist", component);
        let d = max_diff(&sag, &swarm);
        // The order results arrive in changes the last bits of an f32 mean, nothing more.
        assert!(d < 1e-5, "{component}: swarm and SAG differ by {d}");
        let from_fedavg = max_diff(&sag, &fedavg);
        assert!(from_fedavg > 1e-3, "{component}: as FedAvg ({from_fedavg})");
    }
}
