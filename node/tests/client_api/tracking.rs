//! Metrics from the user's program to the server's TensorBoard files, across real processes:
//! every `add_scalar` call arrives, once, in step order, in scatter-and-gather and in a swarm
//! whose server is killed and restarted mid-run (the sites keep the records meanwhile).

use std::path::Path;
use std::time::Duration;

use flare_node::tracking::tb;

use super::{Sites, job, sag};
use crate::common::{Federation, ended};

/// Scalars the program logs in each `train` task.
const N: u32 = 10_000;

/// The `stress` series of `site` in a downloaded job: it must be steps `0..rounds × N` in
/// order, each once, value = step.
fn check_stress(dir: &Path, site: &str, rounds: u32) {
    let series = tb::read_dir_scalars(&dir.join("tb_events").join(site)).unwrap();
    let got = series
        .get("stress")
        .unwrap_or_else(|| panic!("{site}: no stress tag among {:?}", series.keys()));
    let want = u64::from(rounds) * u64::from(N);
    assert_eq!(
        got.len() as u64,
        want,
        "{site}: {} records, not {want}",
        got.len()
    );
    for (i, (step, value)) in got.iter().enumerate() {
        assert_eq!(*step, i as i64, "{site}: record {i} has step {step}");
        assert_eq!(*value, i as f32, "{site}: record {i} has value {value}");
    }
    // The program's own `train_loss` records arrive beside them.
    assert!(
        series.contains_key("train_loss"),
        "{site}: {:?}",
        series.keys()
    );
}

#[test]
fn ten_thousand_scalars_a_round_arrive_complete_and_in_order() {
    let f = Federation::running(2, 27_100);
    let tmp = tempfile::tempdir().unwrap();
    let sites = Sites {
        per_site: &[],
        default: &format!("\"$T\" --log-scalars {N}"),
    };
    let dir = job(tmp.path(), "tracked", &sag(2, 120), &sites, "");
    let id = f.submit(dir.to_str().unwrap());
    let st = f.wait_status(&id, "the job did not end", Duration::from_secs(120), ended);
    assert_eq!(st["state"], "finished", "{st}");
    let dl = f.admin_json(&["download", &id]);
    let out = Path::new(dl["dir"].as_str().unwrap());
    for site in ["site-1", "site-2"] {
        check_stress(out, site, 2);
    }
}

#[test]
fn a_swarm_keeps_its_metrics_while_the_server_is_away() {
    let mut f = Federation::running(2, 27_200);
    let tmp = tempfile::tempdir().unwrap();
    // Each task takes a second, so the run is still going while the server is down.
    let sites = Sites {
        per_site: &[],
        default: &format!("\"$T\" --mode slow --sleep 1 --log-scalars {N}"),
    };
    let swarm = r#"{"id": "swarm", "name": "Swarm", "args": {"num_rounds": 4, "min_clients": 2,
        "learn_task_timeout": 600, "min_responses_required": 2,
        "wait_time_after_min_resps_received": 3, "max_concurrent_submissions": 2,
        "progress_timeout": 600, "key_metric": "accuracy"}}"#;
    let dir = job(tmp.path(), "swarm-tracked", swarm, &sites, "");
    let id = f.submit(dir.to_str().unwrap());
    f.wait_round(&id, 1);
    f.kill("server");
    std::thread::sleep(Duration::from_secs(3));
    f.start("server");
    let st = f.wait_status(
        &id,
        "the swarm did not end",
        Duration::from_secs(180),
        ended,
    );
    assert_eq!(
        st["state"],
        "finished",
        "{st}\nserver:\n{}\nsite-1:\n{}",
        f.log("server"),
        f.log("site-1")
    );
    let dl = f.admin_json(&["download", &id]);
    let out = Path::new(dl["dir"].as_str().unwrap());
    for site in ["site-1", "site-2"] {
        check_stress(out, site, 4);
    }
}
