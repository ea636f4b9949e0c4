//! Real federations: a server and client sites as separate `flare-node` processes started from
//! provisioned POC kits on 127.0.0.1, driven with the admin console as a user would.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

#[test]
fn three_sites_run_hello_fedavg_like_the_simulator() {
    let f = Federation::running(3, 18_100);
    let sites = f.admin_json(&["sites"]);
    assert!(
        sites
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["connection"] == "direct"),
        "{sites}"
    );

    let sub = f.admin_json(&[
        "submit",
        root().join("examples/hello-fedavg").to_str().unwrap(),
    ]);
    let job = sub["job_id"].as_str().unwrap().to_string();
    let out = f.admin(&["wait", &job, "--timeout", "300"]);
    assert!(
        out.status.success(),
        "job did not finish: {}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        f.log("server")
    );
    let st = f.admin_json(&["status", &job]);
    assert_eq!(st["state"], "finished");
    let states: Vec<&str> = st["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["submitted", "dispatched", "running", "finished"]);

    let dl = f.admin_json(&["download", &job]);
    let dir = PathBuf::from(dl["dir"].as_str().unwrap());
    let acc = held_out_accuracy(&dir.join("global_final.safetensors"));
    let reported = st["metrics"]["5"]["accuracy"].as_f64().unwrap();
    assert!(
        (acc - reported).abs() < 1e-9,
        "file {acc} vs reported {reported}"
    );
    assert!(acc >= 0.85, "accuracy {acc}");

    // The same job in the simulator with 3 clients: the same sites, partitions and seeds.
    let ws = tempfile::tempdir().unwrap();
    let sim = Command::new(bin())
        .args(["simulate", "--quiet", "--json", "-n", "3", "-w"])
        .arg(ws.path())
        .arg(root().join("examples/hello-fedavg"))
        .output()
        .unwrap();
    let sim: Value = serde_json::from_slice(&sim.stdout).unwrap();
    let sim_acc = sim["metrics"]["5"]["accuracy"].as_f64().unwrap();
    assert!(
        (sim_acc - acc).abs() < 0.01,
        "simulator {sim_acc} vs federation {acc}"
    );
}

#[test]
fn a_dead_site_and_a_server_restart_lose_nothing() {
    let mut f = Federation::running(3, 18_200);
    let tmp = tempfile::tempdir().unwrap();
    // min_clients is 2: losing one of three sites mid-job must not stop it.
    let job = f.submit(job_copy(tmp.path(), 6, 1).to_str().unwrap());
    f.wait_round(&job, 1);
    f.kill("site-3");
    let out = f.admin(&["wait", &job, "--timeout", "120"]);
    assert!(
        out.status.success(),
        "{}\nserver:\n{}\nsite-1:\n{}\nsite-2:\n{}",
        String::from_utf8_lossy(&out.stdout),
        f.log("server"),
        f.log("site-1"),
        f.log("site-2")
    );
    let st = f.admin_json(&["status", &job]);
    assert!(
        st["metrics"]["6"]["accuracy"].as_f64().unwrap() > 0.85,
        "{st}"
    );

    // A second job; the server dies in the middle of it and comes back. A round takes tens
    // of milliseconds here, so the job has enough rounds that it is still running when the
    // kill lands (20 rounds once finished in the gap between the poll and the kill).
    let job2 = f.submit(job_copy(tmp.path(), 100, 1).to_str().unwrap());
    let before = f.admin_json(&["list"]);
    f.wait_round(&job2, 1);
    f.kill("server");
    f.start("server");
    f.wait_sites(2);
    let after = f.admin_json(&["list"]);
    assert_eq!(
        before.as_array().unwrap().len(),
        after.as_array().unwrap().len()
    );
    let st1 = f.admin_json(&["status", &job]);
    assert_eq!(
        st1["state"], "finished",
        "the finished job survives the restart"
    );
    // The interrupted job resumes after its last persisted round and finishes.
    let out = f.admin(&["wait", &job2, "--timeout", "180"]);
    let st2 = f.admin_json(&["status", &job2]);
    assert!(out.status.success(), "{st2}\nserver:\n{}", f.log("server"));
    let states: Vec<&str> = st2["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["state"].as_str().unwrap())
        .filter(|s| *s != "running")
        .collect();
    assert_eq!(states, ["submitted", "dispatched", "finished"], "{st2}");
    assert!(
        st2["history"].as_array().unwrap().iter().any(|h| h["note"]
            .as_str()
            .unwrap()
            .contains("the run resumes at round")),
        "{st2}"
    );
    // It can be run again.
    let again = f.admin_json(&["clone", &job2]);
    assert_ne!(again["job_id"], job2.as_str());
}

#[test]
fn bad_jobs_and_kits_are_refused_with_the_reason() {
    let mut f = Federation::prepare(1, 18_300);
    f.start("server");
    f.start("site-1");
    f.wait_sites(1);
    // A job whose server config names an unknown aggregator: refused at submit with exit 1
    // ("the command failed"); the job never reaches the server.
    let tmp = tempfile::tempdir().unwrap();
    let job = job_copy(tmp.path(), 1, 1);
    let cfg = job.join("app/config/config_fed_server.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"FedAvg\"", "\"Median\"");
    std::fs::write(&cfg, text).unwrap();
    let out = f.admin(&["submit", job.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("components[1].name: unknown aggregator \"Median\""),
        "{err}"
    );
    assert_eq!(f.admin_json(&["list"]).as_array().unwrap().len(), 0);

    // Unknown job ids are errors with exit code 1.
    let out = f.admin(&["status", "no-such-job"]);
    assert_eq!(out.status.code(), Some(1));

    // A tampered kit does not start, and the error names the changed file.
    let kit = f.prod.join("site-1/startup");
    let node_json = kit.join("node.json");
    let text = std::fs::read_to_string(&node_json)
        .unwrap()
        .replace("site-1", "site-9");
    std::fs::write(&node_json, text).unwrap();
    let out = Command::new(bin()).arg("--kit").arg(&kit).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node.json"), "{err}");

    // With the server gone, the console says it cannot reach it (exit 3).
    f.kill("server");
    let out = f.admin(&["list"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the server"));
}

#[test]
fn poc_start_runs_the_nodes_and_poc_stop_ends_them() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("poc");
    let run = |args: &[&str]| {
        let out = Command::new(bin())
            .args(args)
            .arg("-w")
            .arg(&ws)
            .current_dir(root())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["poc", "prepare", "-n", "2", "--base-port", "18400"]);
    let started = run(&["poc", "start"]);
    assert!(
        started.contains("started server") && started.contains("started site-2"),
        "{started}"
    );
    let f = Federation {
        _dir: tempfile::tempdir().unwrap(),
        prod: std::fs::read_dir(&ws)
            .unwrap()
            .flatten()
            .map(|e| e.path().join("prod_00"))
            .find(|p| p.is_dir())
            .unwrap(),
        nodes: Vec::new(),
    };
    f.wait_sites(2);
    let pids: Vec<u32> = ["server", "site-1", "site-2"]
        .iter()
        .map(|n| {
            std::fs::read_to_string(f.prod.join(n).join("node.pid"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    let stopped = run(&["poc", "stop"]);
    assert!(stopped.contains("stopped site-1"), "{stopped}");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .unwrap_or_default()
                    .contains("zombie"),
            "pid {pid} still runs"
        );
    }
}

#[test]
fn swarm_survives_its_aggregator_and_the_server() {
    let mut f = Federation::running(3, 18_500);
    let tmp = tempfile::tempdir().unwrap();

    // The plain run reaches the simulator's accuracy (the same split and seeds).
    let job = f.submit(root().join("examples/swarm-mnist").to_str().unwrap());
    let out = f.admin(&["wait", &job, "--timeout", "120"]);
    assert!(out.status.success(), "{}", f.log("server"));
    let st = f.admin_json(&["status", &job]);
    let swarm_acc = st["metrics"]["5"]["accuracy"].as_f64().unwrap();
    let dl = f.admin_json(&["download", &job]);
    let dir = PathBuf::from(dl["dir"].as_str().unwrap());
    let file_acc = held_out_accuracy(&dir.join("global_final.safetensors"));
    assert!(
        (file_acc - swarm_acc).abs() < 1e-9,
        "{file_acc} vs {swarm_acc}"
    );
    assert!(dir.join("best.safetensors").is_file());
    let ws = tempfile::tempdir().unwrap();
    let sim = Command::new(bin())
        .args(["simulate", "--quiet", "--json", "-n", "3", "-w"])
        .arg(ws.path())
        .arg(root().join("examples/hello-fedavg"))
        .output()
        .unwrap();
    let sim: Value = serde_json::from_slice(&sim.stdout).unwrap();
    let fedavg_acc = sim["metrics"]["5"]["accuracy"].as_f64().unwrap();
    assert!(
        (fedavg_acc - swarm_acc).abs() <= 0.005,
        "swarm {swarm_acc} vs FedAvg {fedavg_acc}"
    );

    // Kill the aggregator of the round under way: the others re-elect and finish.
    let src = swarm_copy(tmp.path(), 12, 40);
    let job = f.submit(src.to_str().unwrap());
    let victim = swarm_aggregator(&src, &job, 4);
    f.wait_round(&job, 3);
    f.kill(&victim);
    // And the server goes away for a while, then comes back.
    std::thread::sleep(Duration::from_millis(500));
    f.kill("server");
    std::thread::sleep(Duration::from_secs(4));
    f.start("server");
    let out = f.admin(&["wait", &job, "--timeout", "240"]);
    let survivors: Vec<&str> = ["site-1", "site-2", "site-3"]
        .into_iter()
        .filter(|s| *s != victim)
        .collect();
    assert!(
        out.status.success(),
        "{}\nserver:\n{}\n{}:\n{}\n{}:\n{}",
        String::from_utf8_lossy(&out.stdout),
        f.log("server"),
        survivors[0],
        f.log(survivors[0]),
        survivors[1],
        f.log(survivors[1])
    );
    let st = f.admin_json(&["status", &job]);
    // The history is whole: every model version has its metrics, the restart is noted.
    for v in 0..=12 {
        assert!(
            st["metrics"][v.to_string()]["accuracy"].as_f64().is_some(),
            "version {v} missing: {st}\nserver:\n{}\n{}:\n{}\n{}:\n{}",
            f.log("server"),
            survivors[0],
            f.log(survivors[0]),
            survivors[1],
            f.log(survivors[1])
        );
    }
    let notes: Vec<&str> = st["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["note"].as_str().unwrap())
        .collect();
    assert!(
        notes.iter().any(|n| n.contains("server restarted")),
        "{notes:?}"
    );
    // Round 4 was aggregated once: by the victim before it died, or by its successor.
    let round4: Vec<&&str> = notes.iter().filter(|n| n.starts_with("epoch 4.")).collect();
    assert_eq!(round4.len(), 1, "{notes:?}");
    if !round4[0].contains(&format!("aggregated by {victim}")) {
        assert!(
            notes
                .iter()
                .any(|n| n.contains(&format!("aggregator {victim} replaced by"))),
            "{notes:?}"
        );
    }
    assert!(
        st["metrics"]["12"]["accuracy"].as_f64().unwrap() > 0.9,
        "{st}"
    );
}

#[test]
fn cross_site_evaluation_follows_swarm_and_cyclic_skips_a_dead_site() {
    let mut f = Federation::running(3, 18_700);
    let tmp = tempfile::tempdir().unwrap();

    // Swarm, then every site evaluates every site's own model and the global one.
    let job = f.submit(root().join("examples/swarm-cse-mnist").to_str().unwrap());
    let out = f.admin(&["wait", &job, "--timeout", "180"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        f.log("server")
    );
    let st = f.admin_json(&["status", &job]);
    let sites = ["site-1", "site-2", "site-3"];
    for evaluator in sites {
        for model in ["global", "site-1", "site-2", "site-3"] {
            let acc = st["cross_site"][evaluator][model]["accuracy"].as_f64();
            assert!(
                acc.is_some_and(|a| a > 0.85),
                "{evaluator} on {model}: {acc:?}\n{st}"
            );
        }
    }
    // The global model evaluated is the swarm's best: its accuracy is the best version's.
    let best = (0..=5)
        .filter_map(|v| st["metrics"][v.to_string()]["accuracy"].as_f64())
        .fold(0.0, f64::max);
    let global = st["cross_site"]["site-1"]["global"]["accuracy"]
        .as_f64()
        .unwrap();
    assert!(
        (global - best).abs() < 1e-9,
        "global {global} vs best {best}"
    );
    let dl = f.admin_json(&["download", &job]);
    let dir = PathBuf::from(dl["dir"].as_str().unwrap());
    let matrix: Value =
        serde_json::from_slice(&std::fs::read(dir.join("cross_val_results.json")).unwrap())
            .unwrap();
    assert_eq!(matrix, st["cross_site"]);
    assert!(dir.join("global_final.safetensors").is_file());

    // Cyclic: the model goes round the sites; one dies mid-run and is skipped.
    let src = example_copy(tmp.path(), "cyclic-mnist", 3, 4, 15);
    let job = f.submit(src.to_str().unwrap());
    f.wait_round(&job, 1);
    f.kill("site-3");
    let out = f.admin(&["wait", &job, "--timeout", "180"]);
    assert!(
        out.status.success(),
        "{}\nserver:\n{}\nsite-1:\n{}\nsite-2:\n{}",
        String::from_utf8_lossy(&out.stdout),
        f.log("server"),
        f.log("site-1"),
        f.log("site-2")
    );
    let st = f.admin_json(&["status", &job]);
    let notes: Vec<&str> = st["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["note"].as_str().unwrap())
        .collect();
    // The run went on to its last round without site-3: hops 9 and 10 (site-1's and
    // site-2's) were trained, site-3's hop 11 was skipped.
    for (hop, site) in [(9, "site-1"), (10, "site-2")] {
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with(&format!("hop {hop} (round 3) trained by {site}"))),
            "hop {hop}: {notes:#?}"
        );
    }
    assert!(
        !notes.iter().any(|n| n.starts_with("hop 11 ")),
        "the dead site's hop: {notes:#?}"
    );
    let dl = f.admin_json(&["download", &job]);
    let dir = PathBuf::from(dl["dir"].as_str().unwrap());
    let acc = held_out_accuracy(&dir.join("global_final.safetensors"));
    assert!(acc >= 0.9, "cyclic final accuracy {acc}");
}
