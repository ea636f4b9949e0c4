//! Swarm learning whose sites run `flare-test-trainer` through the ScriptExecutor.

use std::time::Duration;

use super::common::{Federation, ended, history_notes};
use super::{Sites, job, simulate};

#[test]
fn a_swarm_prunes_the_site_whose_program_crashed() {
    let f = Federation::running(3, 20_800);
    let tmp = tempfile::tempdir().unwrap();
    let sites = Sites {
        per_site: &[("site-3", "\"$T\" --mode crash-at-round --round 1")],
        default: "\"$T\"",
    };
    let swarm = r#"{"id": "swarm", "name": "Swarm", "args": {"num_rounds": 3, "min_clients": 2,
        "learn_task_timeout": 600, "min_responses_required": 2,
        "wait_time_after_min_resps_received": 3, "max_concurrent_submissions": 3,
        "progress_timeout": 600, "key_metric": "accuracy"}}"#;
    let dir = job(tmp.path(), "swarm", swarm, &sites, "");
    let id = f.submit(dir.to_str().unwrap());
    let st = f.wait_status(
        &id,
        "the swarm did not end",
        Duration::from_secs(120),
        ended,
    );
    assert_eq!(st["state"], "finished", "{st}");
    let notes = history_notes(&st);
    // Round 0 takes all three; from round 1 on site-3's program is gone and it is pruned.
    let aggregated: Vec<&String> = notes
        .iter()
        .filter(|n| n.contains("aggregated by"))
        .collect();
    assert!(
        aggregated
            .iter()
            .any(|n| n.contains("epoch 0.") && n.contains("pruned []")),
        "{notes:#?}"
    );
    assert!(
        aggregated
            .iter()
            .any(|n| n.contains("epoch 1.") && n.contains("pruned [\"site-3\"]")),
        "{notes:#?}"
    );
    assert!(st["metrics"]["3"]["accuracy"].as_f64().is_some(), "{st}");
}

#[test]
fn cyclic_and_cross_site_evaluation_run_the_program_too() {
    let tmp = tempfile::tempdir().unwrap();
    let sites = Sites {
        per_site: &[
            ("site-1", "\"$T\" --delta 1"),
            ("site-2", "\"$T\" --delta 2"),
        ],
        default: "\"$T\" --delta 3",
    };
    // Cyclic: the model goes site-1, site-2, site-3 twice, each hop adding its site's delta.
    let cyclic =
        r#"{"id": "cyclic", "name": "Cyclic", "args": {"num_rounds": 2, "cyclic_order": "fixed"}}"#;
    let dir = job(tmp.path(), "cyclic", cyclic, &sites, "");
    let ws = tmp.path().join("ws-cyclic");
    simulate(&dir, &ws, &[]);
    for v in super::first_values(&ws.join("server/simulate_job/global_final.safetensors")) {
        assert!((v - 12.0).abs() < 1e-5, "{v} after two cycles, not 12");
    }

    // Swarm, then each site evaluates every site's last trained model and the best global one
    // with its program: the program's metric (the mean of the model's first tensor) lands in
    // the matrix, the same on every row.
    let swarm_cse = r#"{"id": "swarm", "name": "Swarm", "args": {"num_rounds": 2, "min_clients": 3,
        "min_responses_required": 3, "max_concurrent_submissions": 3, "key_metric": "accuracy"}},
        {"id": "cse", "name": "CrossSiteEval", "args": {}}"#;
    let dir = job(tmp.path(), "swarm-cse", swarm_cse, &sites, "");
    let ws = tmp.path().join("ws-cse");
    simulate(&dir, &ws, &[]);
    let text = std::fs::read_to_string(
        ws.join("server/simulate_job/cross_site_val/cross_val_results.json"),
    )
    .unwrap();
    let matrix: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = matrix.as_object().unwrap();
    assert_eq!(rows.len(), 3, "{text}");
    let first = &rows["site-1"];
    assert!(first.as_object().unwrap().len() >= 4, "{text}");
    for (evaluator, row) in rows {
        for (model, metrics) in row.as_object().unwrap() {
            let a = metrics["accuracy"].as_f64().unwrap();
            assert_eq!(
                Some(a),
                first[model]["accuracy"].as_f64(),
                "{evaluator} on {model}: {text}"
            );
        }
    }
}
