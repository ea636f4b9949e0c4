//! One identity runs once: a second process started from a site's kit is refused, whether
//! it starts on the same participant folder (the workspace lock) or on a copy of it (the
//! server refuses a second process behind an admitted PeerId), and the real site goes on.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{Federation, bin, job_copy, root};

/// Copies a participant folder as an operator would (`cp -r site-1 site-1-copy`), without
/// the running node's own files.
fn copy_participant(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let name = e.file_name();
        if ["log.txt", "node.lock", "node.pid"].contains(&name.to_str().unwrap()) {
            continue;
        }
        if e.file_type().unwrap().is_dir() {
            copy_participant(&e.path(), &to.join(&name));
        } else {
            std::fs::copy(e.path(), to.join(&name)).unwrap();
        }
    }
}

/// Waits up to `limit` for `child` to exit; kills it and returns `None` if it does not.
fn exit_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// An admin command's table output (no `--json`).
fn admin_text(f: &Federation, args: &[&str]) -> String {
    let out = Command::new(bin())
        .arg("admin")
        .arg("--kit")
        .arg(f.prod.join("admin@nvidia.com/startup"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn site<'a>(sites: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    sites
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not connected: {sites}"))
}

#[test]
fn a_copy_of_a_site_kit_is_refused_and_the_job_runs_on_the_real_site() {
    let mut f = Federation::running(2, 19100);
    let real_addr = site(&f.admin_json(&["sites"]), "site-1")["address"].clone();

    copy_participant(&f.prod.join("site-1"), &f.prod.join("site-1-copy"));
    f.start("site-1-copy");
    let i = f
        .nodes
        .iter()
        .position(|(n, _)| n == "site-1-copy")
        .unwrap();
    let status = exit_within(&mut f.nodes[i].1, Duration::from_secs(20));
    let copy_log = f.log("site-1-copy");
    let status = status.unwrap_or_else(|| {
        panic!(
            "the copy of site-1's kit still runs after 20 s\ncopy log:\n{copy_log}\nserver log:\n{}",
            f.log("server")
        )
    });
    assert!(!status.success(), "the copy exited with {status}");
    assert!(
        copy_log.contains("the server refused this site")
            && copy_log.contains("duplicate")
            && copy_log.contains("one identity runs once"),
        "the copy does not say why it was refused:\n{copy_log}"
    );
    let server_log = f.log("server");
    assert!(
        server_log.contains("second process with an admitted identity refused")
            && server_log.contains("site-1"),
        "the server does not log the refusal:\n{server_log}"
    );

    // `admin sites` shows the refused duplicate for site-1, and site-1 where it was.
    let sites = f.admin_json(&["sites"]);
    let s1 = site(&sites, "site-1");
    assert!(s1["duplicates"]["count"].as_u64() >= Some(1), "{sites}");
    assert!(
        s1["duplicates"]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("/ip4/127.0.0.1/tcp/")),
        "{sites}"
    );
    assert_eq!(s1["address"], real_addr, "{sites}");
    assert!(site(&sites, "site-2")["duplicates"].is_null(), "{sites}");
    let table = admin_text(&f, &["sites"]);
    assert!(
        table.contains("REFUSED_DUPLICATES") && table.contains(" (last from /ip4/127.0.0.1/tcp/"),
        "{table}"
    );

    // The job runs on the real site-1 (and site-2) to the end.
    let tmp = tempfile::tempdir().unwrap();
    let job = job_copy(tmp.path(), 2, 0);
    let id = f.submit(job.to_str().unwrap());
    let done = f.admin_json(&["wait", &id, "--timeout", "120"]);
    assert_eq!(done["state"], "finished", "{done}");

    // A restart of site-1 (new process, old connection gone) is admitted again.
    f.kill("site-1");
    f.start("site-1");
    let start = Instant::now();
    loop {
        let log = f.log("site-1");
        if log.matches("connected to the server").count() >= 2 {
            break;
        }
        assert!(
            !log.contains("the server refused this site"),
            "the restarted site-1 was refused:\n{log}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the restarted site-1 did not connect:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    f.wait_sites(2);
}

#[test]
fn a_second_start_on_the_same_folder_is_refused_by_the_lock() {
    let mut f = Federation::prepare(1, 19200);
    // No server is needed: the site runs (and waits for it) on its own.
    f.start("site-1");
    let first = f.nodes[0].1.id();
    let lock = f.prod.join("site-1").join("node.lock");
    let start = Instant::now();
    while !std::fs::read_to_string(&lock).is_ok_and(|t| t.trim() == first.to_string()) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "site-1 did not write its pid into {}:\n{}",
            lock.display(),
            f.log("site-1")
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let t = Instant::now();
    let mut second = Command::new(bin())
        .arg("--kit")
        .arg(f.prod.join("site-1/startup"))
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = exit_within(&mut second, Duration::from_secs(10))
        .expect("a second node on site-1's folder still runs after 10 s");
    let out = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "the second start exited with {status}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "refused only after {:?}",
        t.elapsed()
    );
    assert!(
        stderr.contains(&lock.display().to_string())
            && stderr.contains(&format!("locked by pid {first}")),
        "the refusal does not name the lock file and its holder:\n{stderr}"
    );
    // The first node still runs.
    assert!(f.nodes[0].1.try_wait().unwrap().is_none());
}
