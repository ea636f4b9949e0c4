//! `admin download` of results larger than the control channel's 16 MiB: a real server and
//! site run a synthetic FedAvg job whose final model is about 20 MB, and the admin downloads it
//! over a sealed download stream.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn bin() -> PathBuf {
    flare_node::node_bin()
}

struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(prod: &Path, name: &str) -> Child {
    let dir = prod.join(name);
    let log = std::fs::File::create(dir.join("log.txt")).unwrap();
    Command::new(bin())
        .arg("--kit")
        .arg(dir.join("startup"))
        .current_dir(&dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn admin(prod: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("admin")
        .arg("--kit")
        .arg(prod.join("admin@nvidia.com/startup"))
        .arg("--json")
        .args(args)
        .output()
        .unwrap()
}

fn admin_json(prod: &Path, args: &[&str]) -> Value {
    let out = admin(prod, args);
    assert!(
        out.status.success(),
        "admin {args:?} failed: {}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(prod.join("server/log.txt")).unwrap_or_default()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sha256(p: &Path) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, &std::fs::read(p).unwrap())
        .as_ref()
        .to_vec()
}

#[test]
fn results_larger_than_the_control_cap_are_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("poc");
    let out = Command::new(bin())
        .args(["poc", "prepare", "-n", "1", "--base-port", "18600", "-w"])
        .arg(&ws)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prod = std::fs::read_dir(&ws)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("prod_00"))
        .find(|p| p.is_dir())
        .unwrap();
    let _nodes = Nodes(vec![start(&prod, "server"), start(&prod, "site-1")]);

    let t = Instant::now();
    while admin_json(&prod, &["sites"]).as_array().unwrap().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the site did not connect"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // 5.5 M f32 parameters: a 22 MB final model, over the 16 MiB control cap.
    let job = dir.path().join("job");
    flare_node::bench::write_synthetic_job(&job, 5_500_000, 1, 1).unwrap();
    let id = admin_json(&prod, &["submit", job.to_str().unwrap()])["job_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Not finished yet (or unknown): refused with exit code 1, nothing written.
    let early = admin(&prod, &["download", "no-such-job"]);
    assert_eq!(early.status.code(), Some(1), "{early:?}");

    let rec = admin_json(&prod, &["wait", &id, "--timeout", "300"]);
    assert_eq!(rec["state"], "finished", "{rec}");

    let got = admin_json(&prod, &["download", &id]);
    let dest = prod.join("admin@nvidia.com/transfer").join(&id);
    assert_eq!(Path::new(got["dir"].as_str().unwrap()), dest);
    let names: Vec<&str> = got["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(names.contains(&"global_final.safetensors"), "{got}");
    let results = std::fs::read_dir(prod.join("server/store/jobs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap() == id.as_str())
        .unwrap()
        .join("result");
    let mut total = 0;
    for n in &names {
        let (a, b) = (results.join(n), dest.join(n));
        assert_eq!(sha256(&a), sha256(&b), "{n}");
        total += std::fs::metadata(&b).unwrap().len();
    }
    assert!(total > 16 << 20, "only {total} bytes downloaded");
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dest)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A second download into another folder (`--output`) works too, and prints text.
    let other = dir.path().join("again");
    let out = Command::new(bin())
        .arg("admin")
        .arg("--kit")
        .arg(prod.join("admin@nvidia.com/startup"))
        .args(["download", &id, "--output"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("downloaded {} files of job {id}", names.len())),
        "{text}"
    );
    assert_eq!(
        sha256(&other.join("global_final.safetensors")),
        sha256(&results.join("global_final.safetensors"))
    );
}
