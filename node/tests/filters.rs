//! Job filters in the simulator: a blockwise8 scatter-and-gather run against the f32 one, and
//! filters that fail.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use flare_node::filters::write_quantized_filters;
use flare_node::simulator::{SimOptions, SimReport, run};
use flare_protocols::filters::QuantizationType;

/// A synthetic job of `params` f32 parameters in tensors of 1000 (the last one short), two
/// clients, two rounds.
fn job(dir: &Path, params: usize) -> std::path::PathBuf {
    let job = dir.join("job");
    flare_node::bench::write_synthetic_job(&job, params, 2, 2).unwrap();
    for file in ["config_fed_server.json", "config_fed_client.json"] {
        let path = job.join("app/config").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.replace(
            &format!("\"num_params\": {params}"),
            &format!("\"num_params\": {params}, \"tensor_size\": 1000"),
        );
        std::fs::write(&path, text).unwrap();
    }
    job
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

fn edit(job: &Path, file: &str, f: impl FnOnce(&mut serde_json::Value)) {
    let path = job.join("app/config").join(file);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn blockwise8_both_ways_sends_a_quarter_of_the_bytes_and_lands_near_the_f32_model() {
    const PARAMS: usize = 10_500;
    let dir = tempfile::tempdir().unwrap();
    let plain_job = job(&dir.path().join("plain"), PARAMS);
    let plain = simulate(&plain_job, &dir.path().join("ws-plain")).unwrap();
    let q_job = job(&dir.path().join("q"), PARAMS);
    write_quantized_filters(&q_job.join("app"), QuantizationType::Blockwise8).unwrap();
    let q = simulate(&q_job, &dir.path().join("ws-q")).unwrap();
    assert_eq!(q.rounds.len(), 2);
    assert!(q.rounds.iter().all(|r| r.accepted == 2), "{:?}", q.rounds);

    // Two rounds, two sites, each way: 4 models of 4 bytes a parameter.
    let f32_bytes = 4 * 4 * PARAMS as u64;
    assert_eq!(plain.model_bytes_to_sites, f32_bytes);
    assert_eq!(plain.model_bytes_from_sites, f32_bytes);
    // One byte a parameter, and an f32 scale per block of 64 in each tensor of 1000 (16
    // blocks) and the last of 500 (8 blocks).
    let q_bytes = 4 * (PARAMS as u64 + 4 * (10 * 16 + 8));
    assert_eq!(q.model_bytes_to_sites, q_bytes);
    assert_eq!(q.model_bytes_from_sites, q_bytes);
    let ratio = q_bytes as f64 / f32_bytes as f64;
    assert!((0.25..0.27).contains(&ratio), "{ratio}");

    // Site i adds i + 1 to every weight: the f32 mean is 1.5 a round, 3.0 after two. The
    // quantized run is within half a step (absmax / 254) per transfer of it.
    let a = flare_node::model_io::read(&plain.final_model).unwrap();
    let b = flare_node::model_io::read(&q.final_model).unwrap();
    assert_eq!(a.params.len(), b.params.len());
    for (name, t) in &a.params {
        let u = b.params[name].to_f32_vec();
        assert_eq!(b.params[name].dtype(), t.dtype(), "{name}");
        for (x, y) in t.to_f32_vec().iter().zip(&u) {
            assert!((x - 3.0).abs() < 1e-6, "{name}: {x}");
            assert!((x - y).abs() <= 4.0 * 3.0 / 254.0, "{name}: {x} vs {y}");
        }
    }
}

fn aborted(job: &Path, ws: &Path) -> String {
    // An error, not a panic or a hang: every result failed, so the round aborts.
    simulate(job, ws).unwrap_err().to_string()
}

#[test]
fn a_failing_filter_fails_that_sites_result_naming_the_filter() {
    let dir = tempfile::tempdir().unwrap();
    // The server quantizes a result its site already quantized.
    let j = job(&dir.path().join("a"), 100);
    write_quantized_filters(&j.join("app"), QuantizationType::BFloat16).unwrap();
    edit(&j, "config_fed_server.json", |v| {
        v["task_result_filters"][0]["filters"][0] = serde_json::json!(
            {"name": "ModelQuantizer", "args": {"quantization_type": "float16"}});
    });
    let err = aborted(&j, &dir.path().join("ws-a"));
    assert!(
        err.contains("the server's task result filter failed on the result of site-")
            && err.contains(
                "ModelQuantizer: meta \"flare.quantization\": the model is already quantized"
            ),
        "{err}"
    );

    // The server's own data filters quantize twice.
    let j = job(&dir.path().join("b"), 100);
    write_quantized_filters(&j.join("app"), QuantizationType::Blockwise8).unwrap();
    edit(&j, "config_fed_server.json", |v| {
        let q = v["task_data_filters"][0]["filters"][0].clone();
        v["task_data_filters"][0]["filters"] = serde_json::json!([q.clone(), q]);
    });
    let err = aborted(&j, &dir.path().join("ws-b"));
    assert!(
        err.contains("the server's task data filter for site-") && err.contains("ModelQuantizer"),
        "{err}"
    );

    // A site quantizes a result the server does not dequantize: FedAvg refuses the codes.
    let j = job(&dir.path().join("c"), 100);
    write_quantized_filters(&j.join("app"), QuantizationType::Blockwise8).unwrap();
    edit(&j, "config_fed_server.json", |v| {
        v.as_object_mut().unwrap().remove("task_result_filters");
    });
    let err = aborted(&j, &dir.path().join("ws-c"));
    assert!(
        err.contains("holds int8 quantization codes: dequantize the model before aggregating"),
        "{err}"
    );

    // A site's own data filter fails: quantizing the server's quantized task again.
    let j = job(&dir.path().join("d"), 100);
    write_quantized_filters(&j.join("app"), QuantizationType::Float16).unwrap();
    edit(&j, "config_fed_client.json", |v| {
        v["task_data_filters"][0]["filters"][0] = serde_json::json!(
            {"name": "ModelQuantizer", "args": {"quantization_type": "float16"}});
    });
    let err = aborted(&j, &dir.path().join("ws-d"));
    assert!(
        err.contains("the task data filter of site-") && err.contains("ModelQuantizer"),
        "{err}"
    );
}

/// Swarm with the sites' filters: every model between two sites goes quantized (the
/// sender's task result filter) and is dequantized where it lands (the receiver's task data
/// filter).
#[test]
fn a_swarm_quantizes_the_models_its_sites_send_each_other() {
    const PARAMS: usize = 10_500;
    let dir = tempfile::tempdir().unwrap();
    let run_swarm = |name: &str, quantize: bool| {
        let job = job(&dir.path().join(name), PARAMS);
        flare_node::bench::make_swarm_job(&job, PARAMS, 2, 2).unwrap();
        edit(&job, "config_fed_server.json", |v| {
            v["components"][0]["args"]["tensor_size"] = 1000.into();
        });
        if quantize {
            write_quantized_filters(&job.join("app"), QuantizationType::Blockwise8).unwrap();
        }
        simulate(&job, &dir.path().join(format!("ws-{name}"))).unwrap()
    };
    let plain = run_swarm("plain", false);
    let q = run_swarm("q", true);
    assert_eq!(q.rounds.len(), 2, "{:?}", q.rounds);
    // Every model between the sites went whole in f32, or quantized: a byte a parameter and
    // a scale per block of 64 (16 blocks in each tensor of 1000, 8 in the last of 500).
    let (f32_model, q_model) = (4 * PARAMS as u64, PARAMS as u64 + 4 * (10 * 16 + 8));
    assert!(plain.model_bytes_to_sites > 0);
    assert_eq!(
        plain.model_bytes_to_sites % f32_model,
        0,
        "{}",
        plain.model_bytes_to_sites
    );
    assert!(q.model_bytes_to_sites > 0);
    assert_eq!(
        q.model_bytes_to_sites % q_model,
        0,
        "{}",
        q.model_bytes_to_sites
    );
    let a = flare_node::model_io::read(&plain.final_model).unwrap();
    let b = flare_node::model_io::read(&q.final_model).unwrap();
    for (name, t) in &a.params {
        for (x, y) in t.to_f32_vec().iter().zip(&b.params[name].to_f32_vec()) {
            assert!((x - 3.0).abs() < 1e-6, "{name}: {x}");
            assert!((x - y).abs() <= 4.0 * 3.0 / 254.0, "{name}: {x} vs {y}");
        }
    }
}
