//! `params_transfer_type` of the built-in learners end to end: hello-fedavg whose sites send
//! weight differences (`DIFF`) ends, through the real `flare-node simulate`, on the global
//! model of the same job sending full weights.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use flare_node::job::{Job, LearnerSite};
use flare_protocols::model::ParamsType;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// A copy of `examples/hello-fedavg` in `dir`, its learner reading the repository's MNIST,
/// with `params_transfer_type` set when given.
fn hello_fedavg(dir: &Path, transfer: Option<&str>) -> PathBuf {
    let src = root().join("examples/hello-fedavg");
    let config = dir.join("app/config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::copy(src.join("meta.json"), dir.join("meta.json")).unwrap();
    std::fs::copy(
        src.join("app/config/config_fed_server.json"),
        config.join("config_fed_server.json"),
    )
    .unwrap();
    let client = std::fs::read(src.join("app/config/config_fed_client.json")).unwrap();
    let mut client: serde_json::Value = serde_json::from_slice(&client).unwrap();
    let args = &mut client["executors"][0]["executor"]["args"];
    args["data_dir"] = root()
        .join("data/mnist")
        .to_string_lossy()
        .into_owned()
        .into();
    if let Some(t) = transfer {
        args["params_transfer_type"] = t.into();
    }
    std::fs::write(
        config.join("config_fed_client.json"),
        serde_json::to_vec_pretty(&client).unwrap(),
    )
    .unwrap();
    dir.to_path_buf()
}

/// Runs `flare-node simulate` with 2 clients and returns the final global model.
fn simulate(job: &Path, ws: &Path) -> flare_protocols::model::FLModel {
    let out = Command::new(flare_node::node_bin())
        .args(["simulate", "--quiet", "--json", "-n", "2", "-w"])
        .arg(ws)
        .arg(job)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "simulate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["rounds"].as_array().unwrap().len(), 5);
    flare_node::model_io::read(Path::new(report["final_model"].as_str().unwrap())).unwrap()
}

#[test]
fn hello_fedavg_with_diff_ends_on_the_full_weights_model() {
    let dir = tempfile::tempdir().unwrap();
    let full = hello_fedavg(&dir.path().join("full"), None);
    let diff = hello_fedavg(&dir.path().join("diff"), Some("DIFF"));

    // The job's learner sends diffs: trained minus received.
    let job = Job::load(&diff).unwrap();
    let app = job.app_for("site-1").unwrap();
    let work = dir.path().join("site-1");
    let site = LearnerSite {
        site: "site-1",
        job_id: "j",
        work_dir: &work,
        tracker: &flare_node::tracking::Tracker::off(),
        gpus: None,
    };
    let mut learner = app.make_learner(0, 2, site).unwrap();
    let global = job.server.initial_model().unwrap();
    let out = learner.train(&global, 0).unwrap();
    assert_eq!(out.params_type, ParamsType::Diff);
    let back = Job::load(&full).unwrap();
    let mut learner = back
        .app_for("site-1")
        .unwrap()
        .make_learner(0, 2, site)
        .unwrap();
    let whole = learner.train(&global, 0).unwrap();
    assert_eq!(whole.params_type, ParamsType::Full);
    for (name, d) in &out.params {
        let (d, g, w) = (
            d.to_f32_vec(),
            global.params[name].to_f32_vec(),
            whole.params[name].to_f32_vec(),
        );
        assert!(
            d.iter()
                .zip(&g)
                .zip(&w)
                .all(|((d, g), w)| (d + g - w).abs() <= 1e-6)
        );
    }

    // Five rounds of FedAvg end on the same global model either way.
    let a = simulate(&full, &dir.path().join("ws-full"));
    let b = simulate(&diff, &dir.path().join("ws-diff"));
    assert!(a.params.keys().eq(b.params.keys()));
    let mut worst = 0.0f32;
    for (name, t) in &a.params {
        for (x, y) in t.to_f32_vec().iter().zip(b.params[name].to_f32_vec()) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst <= 1e-5, "largest difference {worst}");
    assert_eq!(b.params_type, ParamsType::Full);
}
