//! Large models across real processes: a model whose one tensor is larger than 2 GiB goes
//! through a scatter-and-gather round (the server sends it from its file, the site trains it
//! in place, the server spools the result and folds it from disk) and comes back whole; a
//! swarm of a model above `FILE_BACKED_BYTES` runs with every model held as a file.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use common::*;
use serde_json::json;

/// 2 GiB of f32 and 1 MiB more, in one tensor.
const PARAMS: usize = (1 << 29) + (1 << 18);

fn write_job(dir: &Path) {
    let model = json!({"num_params": PARAMS, "tensor_size": PARAMS});
    let workflow = json!({"id": "sag", "name": "ScatterAndGather", "args": {
        "num_rounds": 1, "min_clients": 1, "wait_time_after_min_received": 0,
        "task_timeout": 600, "validate_final": false}});
    write_synthetic(dir, "one-big-tensor", 1, model, workflow);
}

fn write_synthetic(
    dir: &Path,
    name: &str,
    sites: usize,
    model: serde_json::Value,
    workflow: serde_json::Value,
) {
    let cfg = dir.join("app/config");
    std::fs::create_dir_all(&cfg).unwrap();
    let files = [
        (
            dir.join("meta.json"),
            json!({"name": name, "min_clients": sites, "deploy_map": {"app": ["@ALL"]}}),
        ),
        (
            cfg.join("config_fed_server.json"),
            json!({"format_version": 2,
                "workflows": [workflow],
                "components": [
                    {"id": "model", "name": "SyntheticModel", "args": model},
                    {"id": "aggregator", "name": "FedAvg", "args": {}},
                    {"id": "persistor", "name": "SafetensorsPersistor", "args": {"save_every_round": false}}]}),
        ),
        (
            cfg.join("config_fed_client.json"),
            json!({"format_version": 2, "executors": [{"tasks": ["train", "validate"],
                "executor": {"name": "SyntheticLearner", "args": model}}]}),
        ),
    ];
    for (p, v) in files {
        std::fs::write(p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }
}

fn find(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(find(&p, name));
        } else if p.file_name().is_some_and(|n| n == name) {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_tensor_over_2_gib_goes_through_a_round_and_comes_back_whole() {
    let f = Federation::running(1, 21_000);
    let tmp = tempfile::tempdir().unwrap();
    write_job(tmp.path());
    let job = f.submit(tmp.path().to_str().unwrap());
    let out = f.admin(&["wait", &job, "--timeout", "600"]);
    assert!(
        out.status.success(),
        "job did not finish: {}\n{}\nserver log:\n{}\nsite log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        f.log("server"),
        f.log("site-1")
    );
    let server = f.prod.join("server");
    let finals = find(&server, "global_final.safetensors");
    assert_eq!(finals.len(), 1, "{finals:?}");
    let (mut file, n, header) = open_header(&finals[0]);
    let t = &header["layer.0000"];
    assert_eq!(t["dtype"], "F32", "{header}");
    assert_eq!(t["shape"], json!([PARAMS]), "{header}");
    let bytes = 4 * PARAMS as u64;
    assert!(bytes > 2 << 30);
    assert_eq!(t["data_offsets"], json!([0, bytes]), "{header}");
    assert_eq!(file.metadata().unwrap().len(), 8 + n + bytes);
    // One site with step 1 from a model of zeros: every weight is 1 after the round. Look
    // at both ends and at the 2 GiB boundary, where a 32-bit length would have cut.
    for at in [0, (2u64 << 30) - 4, 2 << 30, bytes - 4] {
        file.seek(SeekFrom::Start(8 + n + at)).unwrap();
        let mut v = [0u8; 4];
        file.read_exact(&mut v).unwrap();
        assert_eq!(f32::from_le_bytes(v), 1.0, "weight at byte {at}");
    }
    // The result was spooled and folded: nothing is left in the spool folder.
    let spool_dir = server.join("store/jobs/.spool");
    assert!(
        spool_dir.is_dir(),
        "no spool folder at {}",
        spool_dir.display()
    );
    let spool: Vec<_> = std::fs::read_dir(&spool_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(spool.is_empty(), "{spool:?}");
}

/// A safetensors file opened past its header: the file, the header's length and the header.
fn open_header(path: &Path) -> (std::fs::File, u64, serde_json::Value) {
    let mut file = std::fs::File::open(path).unwrap();
    let mut n = [0u8; 8];
    file.read_exact(&mut n).unwrap();
    let n = u64::from_le_bytes(n);
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).unwrap();
    (file, n, serde_json::from_slice(&header).unwrap())
}

/// Reads the f32 at element `index` of tensor `name` in a safetensors file.
fn f32_at(path: &Path, name: &str, index: u64) -> f32 {
    let (mut file, n, header) = open_header(path);
    let start = header[name]["data_offsets"][0].as_u64().unwrap();
    file.seek(SeekFrom::Start(8 + n + start + 4 * index))
        .unwrap();
    let mut v = [0u8; 4];
    file.read_exact(&mut v).unwrap();
    f32::from_le_bytes(v)
}

#[test]
fn a_swarm_of_a_file_backed_model_trains_every_weight() {
    // 80 MB in 4 tensors: above FILE_BACKED_BYTES, so every site spools its results, the
    // aggregator hands its new global back as the round file, and peers get it spooled.
    const PARAMS: u64 = 20 << 20;
    let f = Federation::running(2, 21_100);
    let tmp = tempfile::tempdir().unwrap();
    let model = json!({"num_params": PARAMS, "tensor_size": PARAMS / 4});
    let workflow = json!({"id": "swarm", "name": "Swarm", "args": {
        "num_rounds": 2, "min_clients": 2, "learn_task_timeout": 300,
        "min_responses_required": 2, "wait_time_after_min_resps_received": 0,
        "max_concurrent_submissions": 2, "progress_timeout": 600, "key_metric": "value"}});
    write_synthetic(tmp.path(), "swarm-file-backed", 2, model, workflow);
    let job = f.submit(tmp.path().to_str().unwrap());
    let out = f.admin(&["wait", &job, "--timeout", "300"]);
    assert!(
        out.status.success(),
        "job did not finish: {}\n{}\nsite-1 log:\n{}\nsite-2 log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        f.log("site-1"),
        f.log("site-2")
    );
    // Sites step by 1 and 2 from zeros, equally weighted: 1.5 a round, 3 after two.
    let finals = find(&f.prod.join("server"), "global_final.safetensors");
    assert_eq!(finals.len(), 1, "{finals:?}");
    for (tensor, at) in [
        ("layer.0000", 0),
        ("layer.0001", 12_345),
        ("layer.0003", PARAMS / 4 - 1),
    ] {
        assert_eq!(f32_at(&finals[0], tensor, at), 3.0, "{tensor}[{at}]");
    }
    // Each round's global was persisted by its aggregator, and the files hold it.
    let rounds: Vec<PathBuf> = ["site-1", "site-2"]
        .iter()
        .flat_map(|s| find(&f.prod.join(s), "round-001.safetensors"))
        .collect();
    assert!(!rounds.is_empty(), "no site persisted round 1");
    for r in &rounds {
        assert_eq!(f32_at(r, "layer.0002", 7), 3.0, "{}", r.display());
    }
}
