//! A job's lifecycle across restarts and absences: what the server and each site believe
//! about a job, and how they agree again (ARCHITECTURE.md, "Job lifecycle").

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// Sends `sig` (`STOP`, `CONT`) to a node of the federation.
fn signal(f: &Federation, name: &str, sig: &str) {
    let (_, child) = f.nodes.iter().find(|(n, _)| n == name).unwrap();
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {name}");
}

/// Waits until the job ends and returns its status.
fn wait_end(f: &Federation, job: &str, timeout_s: u64) -> Value {
    f.wait_status(
        job,
        "the job did not end",
        Duration::from_secs(timeout_s),
        ended,
    )
}

/// Finding 1: a server killed mid scatter-and-gather job used to fail the job without telling
/// the sites, which kept it and refused every later job. Now the run resumes after its last
/// persisted round, with the versions the uninterrupted run would have had, and the
/// federation takes the next job.
#[test]
fn a_server_restart_resumes_scatter_and_gather() {
    let mut f = Federation::running(2, 19_000);
    let tmp = tempfile::tempdir().unwrap();
    // Rounds take tens of milliseconds: enough of them that the run is still going when the
    // server is killed, even when the status poll that saw round 3 was slow.
    const ROUNDS: u32 = 40;
    let src = job_copy(tmp.path(), ROUNDS, 0);
    let job = f.submit(src.to_str().unwrap());
    f.wait_round(&job, 3);
    f.kill("server");
    f.start("server");
    let st = wait_end(&f, &job, 180);
    assert_eq!(
        st["state"],
        "finished",
        "{st}\nserver:\n{}\nsite-1:\n{}",
        f.log("server"),
        f.log("site-1")
    );
    let notes = history_notes(&st);
    assert!(
        notes.iter().any(|n| n.contains("the run resumes at round")),
        "{notes:#?}"
    );
    // Every version has its metrics; round counts the rounds done, as swarm's does.
    for v in 0..=ROUNDS {
        assert!(
            st["metrics"][v.to_string()]["accuracy"].as_f64().is_some(),
            "version {v}: {st}"
        );
    }
    assert_eq!(st["round"], ROUNDS, "{st}");
    let last = ROUNDS.to_string();
    assert!(st["metrics"][&last]["accuracy"].as_f64().unwrap() > 0.85);
    // Each site says how it took part, not `deployed`.
    for s in ["site-1", "site-2"] {
        assert_eq!(st["sites"][s], "finished", "{st}");
    }
    let dl = f.admin_json(&["download", &job]);
    let dir = Path::new(dl["dir"].as_str().unwrap());
    let acc = held_out_accuracy(&dir.join("global_final.safetensors"));
    assert!((acc - st["metrics"][&last]["accuracy"].as_f64().unwrap()).abs() < 1e-9);
    // The federation is not wedged: `clone` runs it again to the end.
    let again = f.admin_json(&["clone", &job]);
    let st = wait_end(&f, again["job_id"].as_str().unwrap(), 120);
    assert_eq!(st["state"], "finished", "{st}");
}

/// Finding 1, the reconciliation: a site that missed the end of a job (it was frozen while
/// the server restarted and the resumed run failed without it) learns on its next heartbeat
/// that the server no longer runs the job and frees it; `abort` of the failed job tells its
/// sites to free it too. The next job runs on every site.
#[test]
fn a_site_frees_a_job_the_server_no_longer_runs() {
    let mut f = Federation::running(2, 19_050);
    let tmp = tempfile::tempdir().unwrap();
    let src = job_copy(tmp.path(), 200, 0);
    let job = f.submit(src.to_str().unwrap());
    f.wait_round(&job, 2);
    signal(&f, "site-2", "STOP");
    f.kill("server");
    f.start("server");
    // Only site-1 comes back; min_clients is 2, so the resumed run gives up.
    let st = wait_end(&f, &job, 120);
    assert_eq!(st["state"], "failed", "{st}");
    let last = history_notes(&st).last().cloned().unwrap();
    assert!(last.contains("came back"), "{last}");
    let abort = f.admin_json(&["abort", &job]);
    assert_eq!(abort["state"], "failed", "{abort}");
    signal(&f, "site-2", "CONT");
    f.wait_sites(2);
    // site-2 still believed the job ran; its heartbeat tells the server, which frees it.
    let started = Instant::now();
    while !f.log("site-2").contains("stopped here by the server") {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "site-2 kept the job:\n{}",
            f.log("site-2")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let next = f.submit(job_copy(tmp.path(), 2, 0).to_str().unwrap());
    let st = wait_end(&f, &next, 120);
    assert_eq!(
        st["state"],
        "finished",
        "{st}\nsite-2:\n{}",
        f.log("site-2")
    );
}

/// Finding 6: a job whose `deploy_map` and `mandatory_clients` name a site that never
/// connected waited in `submitted` with no word. Its status now says what it waits for.
#[test]
fn a_job_naming_an_absent_site_says_what_it_waits_for() {
    let f = Federation::running(1, 19_080);
    let tmp = tempfile::tempdir().unwrap();
    let src = job_copy(tmp.path(), 1, 0);
    std::fs::write(
        src.join("meta.json"),
        r#"{"name": "needs-site-9", "min_clients": 2, "mandatory_clients": ["site-9"],
            "deploy_map": {"app": ["server", "site-1", "site-9"]}}"#,
    )
    .unwrap();
    let job = f.submit(src.to_str().unwrap());
    let started = Instant::now();
    let st = loop {
        let st = f.admin_json(&["status", &job]);
        if st["waiting"].is_string() {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no word on what the job waits for: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(st["state"], "submitted");
    let waiting = st["waiting"].as_str().unwrap();
    assert!(
        waiting.contains("1 of min_clients 2")
            && waiting
                .contains("mandatory_clients site-9 (not connected since the server started)"),
        "{waiting}"
    );
    assert!(history_notes(&st).iter().any(|n| n == waiting), "{st}");
    // The history says it once, not every second.
    std::thread::sleep(Duration::from_millis(2500));
    let st = f.admin_json(&["status", &job]);
    assert_eq!(
        history_notes(&st)
            .iter()
            .filter(|n| n.starts_with("waiting"))
            .count(),
        1,
        "{st}"
    );
}

/// Finding 10: a site that died mid-swarm showed its last round as if it still trained; it
/// is `away` while the run goes on and `left` once it ended.
#[test]
fn a_site_that_died_mid_swarm_is_shown_as_left() {
    let mut f = Federation::running(3, 18_800);
    let tmp = tempfile::tempdir().unwrap();
    // Rounds of 20 local epochs: the run is still going when site-3 dies.
    let src = example_copy(tmp.path(), "swarm-mnist", 5, 8, 20);
    let job = f.submit(src.to_str().unwrap());
    f.wait_round(&job, 2);
    f.kill("site-3");
    let st = wait_end(&f, &job, 180);
    assert_eq!(
        st["state"],
        "finished",
        "{st}\nserver:\n{}",
        f.log("server")
    );
    let s3 = st["sites"]["site-3"].as_str().unwrap();
    assert!(s3.starts_with("left (last: "), "{st}");
    for s in ["site-1", "site-2"] {
        assert_eq!(st["sites"][s], "finished", "{st}");
    }
    assert_eq!(st["round"], 8, "{st}");
}
