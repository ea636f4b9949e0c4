//! Privacy filters in the simulator: a site that excludes a tensor from its results, averaged
//! per tensor by FedAvg and refused by a robust rule.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use flare_node::simulator::{SimOptions, SimReport, run};

/// A synthetic job of 2500 f32 parameters in tensors `layer.0000`, `layer.0001` (1000 each)
/// and `layer.0002` (500), two clients, two rounds, whose sites exclude `layer.0002` from
/// their train results.
fn job(dir: &Path) -> PathBuf {
    let job = dir.join("job");
    flare_node::bench::write_synthetic_job(&job, 2500, 2, 2).unwrap();
    edit(&job, "config_fed_server.json", |v| {
        v["components"][0]["args"]["tensor_size"] = 1000.into();
    });
    edit(&job, "config_fed_client.json", |v| {
        v["executors"][0]["executor"]["args"]["tensor_size"] = 1000.into();
        v["task_result_filters"] = serde_json::json!([{"tasks": ["train"], "filters": [
            {"path": "nvflare.app_common.filters.exclude_vars.ExcludeVars",
             "args": {"exclude_vars": "0002$"}}]}]);
    });
    job
}

fn edit(job: &Path, file: &str, f: impl FnOnce(&mut serde_json::Value)) {
    let path = job.join("app/config").join(file);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn simulate(job: &Path, ws: &Path) -> anyhow::Result<SimReport> {
    run(&SimOptions {
        job_dir: job.to_path_buf(),
        clients: 2,
        workspace: ws.to_path_buf(),
        threads: 2,
        progress: false,
    })
}

#[test]
fn fedavg_keeps_the_base_for_a_tensor_every_site_excludes() {
    let dir = tempfile::tempdir().unwrap();
    let j = job(dir.path());
    let report = simulate(&j, &dir.path().join("ws")).unwrap();
    assert_eq!(report.rounds.len(), 2);
    assert!(
        report.rounds.iter().all(|r| r.accepted == 2),
        "{:?}",
        report.rounds
    );
    // Two rounds, two sites: 2000 of the 2500 parameters come back, 4 bytes each.
    assert_eq!(report.model_bytes_from_sites, 4 * 4 * 2000);
    // Site i adds i + 1 to every weight it gets: the mean moves 1.5 a round where the sites
    // send the tensor, and the excluded tensor stays the initial zeros.
    let m = flare_node::model_io::read(&report.final_model).unwrap();
    for name in ["layer.0000", "layer.0001"] {
        assert!(
            m.params[name]
                .to_f32_vec()
                .iter()
                .all(|x| (x - 3.0).abs() < 1e-6),
            "{name}"
        );
    }
    let excluded = m.params["layer.0002"].to_f32_vec();
    assert_eq!(excluded.len(), 500);
    assert!(excluded.iter().all(|x| *x == 0.0));
}

#[test]
fn a_robust_rule_refuses_results_that_lack_a_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let j = job(dir.path());
    edit(&j, "config_fed_server.json", |v| {
        v["components"][1] =
            serde_json::json!({"id": "aggregator", "name": "FedMedian", "args": {}});
    });
    let err = simulate(&j, &dir.path().join("ws"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer.0002"), "{err}");
}
