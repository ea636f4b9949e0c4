//! Secure aggregation (SecAgg+) in scatter-and-gather: in the simulator and across POC
//! processes, a job with `secure_aggregation` learns as well as the same job without it, and
//! the server's files never hold a site's update.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

const ROUNDS: u32 = 3;

fn simulate(job: &Path, n: usize, ws: &Path) -> serde_json::Value {
    let out = std::process::Command::new(bin())
        .args(["simulate", "--quiet", "--json", "-n", &n.to_string(), "-w"])
        .arg(ws)
        .arg(job)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn last_accuracy(report: &serde_json::Value) -> f64 {
    let metrics = report["metrics"].as_object().unwrap();
    let last = metrics
        .keys()
        .map(|k| k.parse::<u32>().unwrap())
        .max()
        .unwrap();
    metrics[&last.to_string()]["accuracy"].as_f64().unwrap()
}

#[test]
fn the_simulator_learns_as_well_with_secure_aggregation_as_without() {
    let dir = tempfile::tempdir().unwrap();
    let on = example_copy(dir.path(), "hello-fedavg-secagg", 5, ROUNDS, 1);
    let off = example_copy(dir.path(), "hello-fedavg", 5, ROUNDS, 1);
    let ws_on = dir.path().join("ws-on");
    let r_on = simulate(&on, 5, &ws_on);
    let r_off = simulate(&off, 5, &dir.path().join("ws-off"));
    let (a_on, a_off) = (last_accuracy(&r_on), last_accuracy(&r_off));
    assert!(a_off > 0.85, "{a_off}");
    assert!(
        (a_on - a_off).abs() <= 0.005,
        "with {a_on}, without {a_off}"
    );
    // Every round aggregated all five sites.
    for r in r_on["rounds"].as_array().unwrap() {
        assert_eq!(r["accepted"], 5, "{r}");
    }
}

#[test]
fn a_bad_secure_aggregation_setting_is_refused_with_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let job = example_copy(dir.path(), "hello-fedavg-secagg", 5, 1, 1);
    let server = job.join("app/config/config_fed_server.json");
    let text = std::fs::read_to_string(&server).unwrap();
    std::fs::write(
        &server,
        text.replace("\"modulus_range\": 4294967296", "\"modulus_range\": 1000"),
    )
    .unwrap();
    let err = flare_node::job::Job::load(&job).unwrap_err().to_string();
    assert!(err.contains("config_fed_server.json"), "{err}");
    assert!(
        err.contains("workflows[0].args.secure_aggregation.modulus_range"),
        "{err}"
    );
    // An aggregator that needs each site's update is refused too.
    std::fs::write(
        &server,
        text.replace(r#""name": "FedAvg""#, r#""name": "FedMedian""#),
    )
    .unwrap();
    let err = flare_node::job::Job::load(&job).unwrap_err().to_string();
    assert!(
        err.contains("secure aggregation reveals only the sum"),
        "{err}"
    );
}

#[test]
fn scatter_and_gather_with_secure_aggregation_learns_across_processes() {
    let f = Federation::running(3, 27_300);
    let dir = tempfile::tempdir().unwrap();
    let job_dir = example_copy(dir.path(), "hello-fedavg-secagg", 5, ROUNDS, 1);
    let job = f.submit(job_dir.to_str().unwrap());
    let out = f.admin(&["wait", &job, "--timeout", "300"]);
    assert!(
        out.status.success(),
        "job did not finish: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        f.log_tails(30)
    );
    let st = f.admin_json(&["status", &job]);
    assert_eq!(st["state"], "finished", "{st}");
    let dl = f.admin_json(&["download", &job]);
    let dir = PathBuf::from(dl["dir"].as_str().unwrap());
    let acc = held_out_accuracy(&dir.join("global_final.safetensors"));
    assert!(acc >= 0.85, "accuracy {acc}");
    // The sites' answers were masked inputs: no model file the server kept holds a site's
    // parameters, and the rounds' models are the global ones.
    let round = flare_node::model_io::read(&dir.join("models/round-000.safetensors")).unwrap();
    assert!(round.params.contains_key("fc1.weight"));
    assert!(!round.params.contains_key("secagg.masked"));
}
