//! Swarm learning whose sites run `flare-test-trainer` through the ScriptExecutor.

use std::time::Duration;

use super::common::{Federation, ended, history_notes};
use super::{Sites, job};

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
