//! An honest admin console: a kit from another CA is told that its certificate was refused
//! (not "cannot reach the server" after 15 s), a server that is down is reported within a
//! few seconds, a closed stdout ends the output quietly, and versions sort as numbers.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use flare_crypto::SigningSecret;
use flare_crypto::folder::{Purpose, write_folder_signature};

use crate::common::{Federation, bin, job_copy, root};

fn admin_with(kit: &Path, args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let out = Command::new(bin())
        .arg("admin")
        .arg("--kit")
        .arg(kit)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    (out, t.elapsed())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_kit_from_another_ca_is_told_why_and_a_down_server_is_reported_fast() {
    let mut ours = Federation::prepare(1, 19400);
    ours.start("server");
    // A second `poc prepare` in another workspace: another root CA. Its admin kit is
    // pointed at our server (address and PeerId) and signed again by its own CA, as its
    // provisioner could do.
    let theirs = Federation::prepare(1, 19450);
    let foreign = theirs.prod.join("admin-foreign");
    copy_dir(&theirs.prod.join("admin@nvidia.com"), &foreign);
    let config = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("startup/node.json")).unwrap()).unwrap()
    };
    let mut cfg = config(&foreign);
    cfg["server"] = config(&ours.prod.join("admin@nvidia.com"))["server"].clone();
    std::fs::write(
        foreign.join("startup/node.json"),
        serde_json::to_vec_pretty(&cfg).unwrap(),
    )
    .unwrap();
    let ca_key = theirs.prod.parent().unwrap().join("state/rootCA.key");
    let ca = SigningSecret::from_pkcs8_pem(&std::fs::read_to_string(ca_key).unwrap()).unwrap();
    write_folder_signature(&foreign.join("startup"), Purpose::Kit, &ca).unwrap();
    let start = Instant::now();
    while !admin_with(&ours.prod.join("admin@nvidia.com/startup"), &["sites"])
        .0
        .status
        .success()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            ours.log("server")
        );
    }

    let (out, took) = admin_with(&foreign.join("startup"), &["sites"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    // The error line itself (warnings of the network layer may say more around it).
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line:\n{stderr}"));
    assert!(
        error.contains("refused") && error.contains("certificate rejected"),
        "the console does not say the certificate was refused:\n{stderr}\nserver:\n{}",
        ours.log("server")
    );
    assert!(!error.contains("cannot reach the server"), "{stderr}");
    assert!(took < Duration::from_secs(8), "refused after {took:?}");
    eprintln!("a kit from another CA: exit 3 after {took:?}: {error}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Their own server is not running: said within a few seconds, not 15.
    let (out, took) = admin_with(&theirs.prod.join("admin@nvidia.com/startup"), &["sites"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("cannot reach the server"), "{stderr}");
    assert!(
        took < Duration::from_secs(8),
        "reported after {took:?}: {stderr}"
    );
    eprintln!("a down server: exit 3 after {took:?}");
}

/// Runs an admin command whose stdout is a pipe nobody reads any more.
fn admin_into_closed_pipe(f: &Federation, args: &[&str]) -> Output {
    // `std::io::pipe` is stable since 1.87; the declared `rust-version` (1.85) lags the
    // toolchain the workspace needs.
    #[allow(clippy::incompatible_msrv)]
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = Command::new(bin())
        .arg("admin")
        .arg("--kit")
        .arg(f.prod.join("admin@nvidia.com/startup"))
        .args(args)
        .current_dir(root())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn console_output_survives_a_closed_pipe_and_sorts_versions_as_numbers() {
    let f = Federation::running(2, 19300);
    let tmp = tempfile::tempdir().unwrap();
    let job = job_copy(tmp.path(), 11, 0);
    let id = f.submit(job.to_str().unwrap());
    let done = f.admin_json(&["wait", &id, "--timeout", "300"]);
    assert_eq!(done["state"], "finished", "{done}");

    for args in [
        vec!["list"],
        vec!["status", id.as_str()],
        vec!["sites"],
        vec!["--json", "status", id.as_str()],
    ] {
        let out = admin_into_closed_pipe(&f, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "admin {args:?} into a closed pipe:\n{stderr}"
        );
        assert_ne!(out.status.code(), Some(101), "admin {args:?}: {stderr}");
        assert!(
            out.status.success(),
            "admin {args:?}: {:?} {stderr}",
            out.status
        );
    }

    // The VERSION column, in the order printed.
    let out = Command::new(bin())
        .arg("admin")
        .arg("--kit")
        .arg(f.prod.join("admin@nvidia.com/startup"))
        .args(["status", &id])
        .current_dir(root())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let versions: Vec<u64> = text
        .lines()
        .skip_while(|l| !l.starts_with("VERSION"))
        .skip(1)
        .map_while(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(versions.len() >= 11, "{text}");
    assert!(
        versions.is_sorted(),
        "VERSION column not in numeric order: {versions:?}\n{text}"
    );

    // The JSON's metrics keys, in the order of the text.
    let out = f.admin(&["status", &id]);
    let json = String::from_utf8(out.stdout).unwrap();
    let metrics = &json[json.find("\"metrics\":{").expect(&json) + 11..];
    let mut keys = Vec::new();
    let mut depth = 0;
    let mut rest = metrics;
    while let Some(c) = rest.chars().next() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            '"' if depth == 0 => {
                let end = rest[1..].find('"').unwrap() + 1;
                keys.push(rest[1..end].to_string());
                rest = &rest[end..];
            }
            _ => {}
        }
        rest = &rest[c.len_utf8()..];
    }
    let keys: Vec<u64> = keys.iter().map(|k| k.parse().expect(k)).collect();
    assert!(keys.len() >= 11, "{json}");
    assert!(
        keys.is_sorted(),
        "metrics keys not in numeric order: {keys:?}"
    );
    // Same content as the parsed map.
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["metrics"].as_object().unwrap().len(), keys.len());
}
