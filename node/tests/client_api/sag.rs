//! Scatter-and-gather jobs whose sites run `flare-test-trainer` through the ScriptExecutor.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::common::{Federation, ended, history_notes};
use super::{Sites, first_values, gone, job, pids, sag, simulate};

fn run_to_end(f: &Federation, dir: &Path, timeout: Duration) -> (String, Value) {
    let id = f.submit(dir.to_str().unwrap());
    let st = f.wait_status(&id, "the job did not end", timeout, ended);
    (id, st)
}

fn site(st: &Value, name: &str) -> String {
    st["sites"][name].as_str().unwrap_or_default().to_string()
}

#[test]
fn the_program_trains_and_its_steps_weigh_the_average() {
    let f = Federation::running(2, 20_100);
    let tmp = tempfile::tempdir().unwrap();
    // site-1 adds 1 with weight 1, site-2 adds 0 with weight 3: each round adds 0.25.
    let sites = Sites {
        per_site: &[("site-1", "\"$T\" --delta 1 --steps 1")],
        default: "\"$T\" --delta 0 --steps 3",
    };
    for (name, args) in [("full", ""), ("diff", r#""params_transfer_type": "DIFF""#)] {
        let dir = job(tmp.path(), name, &sag(3, 120), &sites, args);
        let (id, st) = run_to_end(&f, &dir, Duration::from_secs(120));
        assert_eq!(st["state"], "finished", "{name}: {st}");
        assert_eq!(site(&st, "site-1"), "finished", "{name}: {st}");
        let dl = f.admin_json(&["download", &id]);
        let model = Path::new(dl["dir"].as_str().unwrap()).join("global_final.safetensors");
        for v in first_values(&model) {
            assert!(
                (v - 0.75).abs() < 1e-6,
                "{name}: {v} after 3 rounds, not 0.75"
            );
        }
        // The program's metrics reach the job: the mean of the model it received.
        let m = st["metrics"]["2"]["accuracy"].as_f64().unwrap();
        assert!((m - 0.5).abs() < 1e-6, "{name}: {st}");
    }

    // The simulator runs the same job, each site its own process, one at a time.
    let dir = job(tmp.path(), "sim", &sag(3, 120), &sites, "");
    let ws = tmp.path().join("ws");
    simulate(&dir, &ws, &["--threads", "1"]);
    // Weights 1, 3, 3: (1 + 0 + 0) / 7 a round.
    for v in first_values(&ws.join("server/simulate_job/global_final.safetensors")) {
        assert!((v - 3.0 / 7.0).abs() < 1e-6, "{v}");
    }
}

#[test]
fn a_crashing_program_fails_its_task_at_once_with_its_stderr() {
    let f = Federation::running(2, 20_200);
    let tmp = tempfile::tempdir().unwrap();
    for (mode, code, line) in [
        ("crash", "exited with code 3", "trainer failed"),
        ("panic", "exited with code 101", "panicked"),
        (
            "exit-before-connect",
            "exited with code 3",
            "before it connected",
        ),
    ] {
        let crash = format!("\"$T\" --mode {mode}");
        let sites = Sites {
            per_site: &[("site-1", crash.as_str())],
            default: "\"$T\"",
        };
        // A task_timeout of 10 minutes: only a failure seen at the exit ends the round.
        let dir = job(tmp.path(), mode, &sag(2, 600), &sites, "");
        let started = Instant::now();
        let (_, st) = run_to_end(&f, &dir, Duration::from_secs(60));
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{mode}: the job took {:?}",
            started.elapsed()
        );
        assert_eq!(
            st["state"], "finished",
            "{mode}: the other site carries the run: {st}"
        );
        let s1 = site(&st, "site-1");
        assert!(
            s1.contains(code) && s1.contains(line),
            "{mode}: site-1 is {s1:?}"
        );
        let notes = history_notes(&st).join("\n");
        assert!(
            notes.contains("result of site-1 was excluded") && notes.contains(code),
            "{mode}: {notes}"
        );
    }
}

#[test]
fn a_hung_program_is_stopped_with_its_group_and_reported_timed_out() {
    let f = Federation::running(2, 20_300);
    let tmp = tempfile::tempdir().unwrap();
    for (mode, args, why) in [
        (
            "hang",
            r#""task_timeout": 3, "stop_grace_period": 1"#,
            "task_timeout (3 s)",
        ),
        (
            "silent",
            r#""heartbeat_timeout": 2, "heartbeat_interval": 0.5, "stop_grace_period": 1"#,
            "heartbeat_timeout 2 s",
        ),
    ] {
        let pid_file = tmp.path().join(format!("{mode}.pids"));
        let line = format!("\"$T\" --mode {mode} --pid-file '{}'", pid_file.display());
        let sites = Sites {
            per_site: &[("site-1", line.as_str())],
            default: "\"$T\"",
        };
        let dir = job(tmp.path(), mode, &sag(1, 600), &sites, args);
        let id = f.submit(dir.to_str().unwrap());
        let group = pids(
            &pid_file,
            if mode == "hang" { 2 } else { 1 },
            Duration::from_secs(30),
        );
        let st = f.wait_status(&id, mode, Duration::from_secs(60), ended);
        let s1 = site(&st, "site-1");
        assert!(
            s1.contains("timed out") && s1.contains(why),
            "{mode}: site-1 is {s1:?}"
        );
        // The whole group, the trainer's `sleep` child too, is gone.
        gone(&group, Duration::from_secs(10), mode);
    }
}

#[test]
fn bad_messages_and_models_fail_the_task_and_the_site_goes_on() {
    let f = Federation::running(2, 20_400);
    let tmp = tempfile::tempdir().unwrap();
    for (mode, why) in [
        ("malformed", "malformed message"),
        ("wrong-shape", "does not fit the task's"),
        ("outside-file", "is not in the exchange folder"),
    ] {
        let bad = format!("\"$T\" --mode {mode}");
        let sites = Sites {
            per_site: &[("site-1", bad.as_str())],
            default: "\"$T\"",
        };
        let dir = job(tmp.path(), mode, &sag(1, 600), &sites, "");
        let (_, st) = run_to_end(&f, &dir, Duration::from_secs(60));
        assert_eq!(st["state"], "finished", "{mode}: {st}");
        let notes = history_notes(&st).join("\n");
        assert!(
            notes.contains("result of site-1 was excluded") && notes.contains(why),
            "{mode}: {notes}"
        );
    }
    // The node of site-1 is still up and trains the next job.
    let sites = Sites {
        per_site: &[],
        default: "\"$T\"",
    };
    let dir = job(tmp.path(), "after", &sag(1, 600), &sites, "");
    let (_, st) = run_to_end(&f, &dir, Duration::from_secs(60));
    assert_eq!(site(&st, "site-1"), "finished", "{st}");
}

#[test]
fn a_program_printing_megabytes_still_trains_and_its_output_is_logged() {
    let f = Federation::running(2, 20_500);
    let tmp = tempfile::tempdir().unwrap();
    let sites = Sites {
        per_site: &[],
        default: "\"$T\" --mode spam-stdout --spam-bytes 4194304",
    };
    let dir = job(tmp.path(), "spam", &sag(2, 600), &sites, "");
    let (id, st) = run_to_end(&f, &dir, Duration::from_secs(120));
    assert_eq!(st["state"], "finished", "{st}");
    for s in ["site-1", "site-2"] {
        assert_eq!(site(&st, s), "finished", "{st}");
    }
    let log = f.log("site-1");
    let lines = log
        .lines()
        .filter(|l| {
            l.contains("flare::program") && l.contains(&format!("job={id}")) && l.contains("pid=")
        })
        .count();
    // Two tasks of 4 MiB each, in lines of at most 8 KiB.
    assert!(
        lines >= 1000,
        "{lines} lines of the program's output in site-1's log"
    );
}

#[test]
fn abort_and_a_killed_node_leave_no_program_behind() {
    let mut f = Federation::running(2, 20_600);
    let tmp = tempfile::tempdir().unwrap();
    let files = |tag: &str| -> Vec<std::path::PathBuf> {
        ["site-1", "site-2"]
            .iter()
            .map(|s| tmp.path().join(format!("{tag}-{s}.pids")))
            .collect()
    };
    for tag in ["abort", "kill"] {
        let line = format!(
            "\"$T\" --mode slow --sleep 600 --pid-file '{}/{tag}-'\"$FLARE_SITE_NAME\".pids",
            tmp.path().display()
        );
        let sites = Sites {
            per_site: &[],
            default: line.as_str(),
        };
        let dir = job(
            tmp.path(),
            tag,
            &sag(1, 600),
            &sites,
            r#""stop_grace_period": 2"#,
        );
        let id = f.submit(dir.to_str().unwrap());
        let all: Vec<Vec<u32>> = files(tag)
            .iter()
            .map(|p| pids(p, 1, Duration::from_secs(30)))
            .collect();
        if tag == "abort" {
            f.admin_json(&["abort", &id]);
            gone(&all.concat(), Duration::from_secs(15), "after admin abort");
        } else {
            f.kill("site-1");
            // The program sees its node go (the socket closes, its parent changes).
            gone(
                &all[0],
                Duration::from_secs(10),
                "after kill -9 of site-1's flare-node",
            );
            f.admin_json(&["abort", &id]);
            gone(&all[1], Duration::from_secs(15), "after admin abort");
        }
    }
}

#[test]
fn a_site_that_forbids_custom_code_refuses_the_job() {
    let mut f = Federation::prepare(2, 20_700);
    std::fs::create_dir_all(f.prod.join("site-2/local")).unwrap();
    std::fs::write(
        f.prod.join("site-2/local/authorization.json"),
        r#"{"permissions": {"project_admin": {"submit_job": "any", "byoc": "none"}}}"#,
    )
    .unwrap();
    f.start("server");
    f.start("site-1");
    f.start("site-2");
    f.wait_sites(2);
    let tmp = tempfile::tempdir().unwrap();
    let sites = Sites {
        per_site: &[],
        default: "\"$T\"",
    };
    let dir = job(tmp.path(), "byoc", &sag(1, 600), &sites, "");
    let (_, st) = run_to_end(&f, &dir, Duration::from_secs(60));
    assert_eq!(st["state"], "finished", "site-1 runs it: {st}");
    let s2 = site(&st, "site-2");
    assert!(
        s2.starts_with("refused") && s2.contains("byoc"),
        "site-2 is {s2:?}"
    );
}
