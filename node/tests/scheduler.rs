//! The server's scheduler across real processes: `max_jobs` lets two swarm jobs run on the
//! same sites at once while a third waits with its reason, and each keeps its own rounds,
//! models and metrics. The resources side (GPUs reserved per job, `CUDA_VISIBLE_DEVICES`, a
//! job waiting for GPUs and one refused at submit) is in `client_api/resources.rs`.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Federation, ended, example_copy, held_out_accuracy, history_notes};
use serde_json::Value;

#[test]
fn two_swarm_jobs_run_at_once_and_a_third_waits_for_a_slot() {
    let mut f = Federation::prepare(3, 28_100);
    std::fs::write(
        f.prod.join("server/local/resources.json"),
        r#"{"format_version": 1, "max_jobs": 2}"#,
    )
    .unwrap();
    f.start("server");
    for i in 1..=3 {
        f.start(&format!("site-{i}"));
    }
    f.wait_sites(3);
    let dir = tempfile::tempdir().unwrap();
    // Three jobs of different lengths, with different model seeds: what one job aggregates
    // or records would show in another's round count, metrics or model.
    let rounds = [3u32, 4, 2];
    let mut jobs = Vec::new();
    for (k, r) in rounds.iter().enumerate() {
        let src = example_copy(dir.path(), "swarm-mnist", 5, *r, 8);
        let server = src.join("app/config/config_fed_server.json");
        let text = std::fs::read_to_string(&server)
            .unwrap()
            .replace("\"seed\": 0", &format!("\"seed\": {k}"));
        std::fs::write(&server, text).unwrap();
        let meta = src.join("meta.json");
        let mut m: Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
        m["name"] = format!("swarm-{k}").into();
        std::fs::write(&meta, serde_json::to_vec(&m).unwrap()).unwrap();
        jobs.push(f.submit(src.to_str().unwrap()));
    }
    let mut finals = Vec::new();
    for (job, r) in jobs.iter().zip(rounds) {
        let st = f.wait_status(job, "the job did not end", Duration::from_secs(300), ended);
        assert_eq!(st["state"], "finished", "{st}\n{}", f.log_tails(30));
        // Its own rounds and nothing of the others'.
        let rounds_seen: Vec<u64> = st["metrics"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.parse().unwrap())
            .collect();
        // A swarm of r rounds reports epochs 0 (the initial model's) to r.
        assert_eq!(rounds_seen.iter().max(), Some(&u64::from(r)), "{st}");
        let mut aggregated: Vec<u32> = history_notes(&st)
            .iter()
            .filter(|n| n.contains("aggregated by"))
            .filter_map(|n| n.strip_prefix("epoch ")?.split('.').next()?.parse().ok())
            .collect();
        aggregated.dedup();
        assert_eq!(aggregated, (0..=r).collect::<Vec<_>>(), "{st}");
        let dl = f.admin_json(&["download", job]);
        let model = PathBuf::from(dl["dir"].as_str().unwrap()).join("global_final.safetensors");
        let acc = held_out_accuracy(&model);
        assert!(acc >= 0.8, "job {job}: accuracy {acc}");
        finals.push(std::fs::read(&model).unwrap());
    }
    assert!(finals[0] != finals[1] && finals[1] != finals[2] && finals[0] != finals[2]);

    // From the server's own timestamps, not from polling: the first two ran together, and
    // the third waited, saying for what, and ran only once one of them had ended.
    let spans: Vec<(u64, u64)> = jobs
        .iter()
        .map(|j| {
            let st = f.admin_json(&["status", j]);
            let h = st["history"].as_array().unwrap().clone();
            let at = |state: &str| {
                h.iter()
                    .find(|e| e["state"] == state)
                    .and_then(|e| e["at_ms"].as_u64())
                    .unwrap_or_else(|| panic!("no {state} in {st}"))
            };
            (at("running"), at("finished"))
        })
        .collect();
    assert!(
        spans[1].0 < spans[0].1 && spans[0].0 < spans[1].1,
        "the first two did not overlap: {spans:?}"
    );
    assert!(
        spans[2].0 >= spans[0].1.min(spans[1].1),
        "the third ran beside both: {spans:?}"
    );
    let third = f.admin_json(&["status", &jobs[2]]);
    assert!(
        history_notes(&third)
            .iter()
            .any(|n| n == "waiting for a slot: 2 jobs run (max_jobs 2)"),
        "{third}"
    );
}
