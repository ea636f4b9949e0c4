//! Finding 7: a large but valid job must not make a node allocate what it asks. A 57 MB
//! `meta.json` was read whole by the admin console before any size check (a 595 MB peak), and
//! a deploy map of a million names raised the server's RSS by 260 MB. The admin now refuses a
//! `meta.json` over the byte cap by its length, before reading it, and a deploy map of too many
//! names by counting them, naming the file, the field and the limit. (The same `Job::load`
//! runs in the server's store and on each site; unit tests in `job.rs` and `store.rs` cover
//! those.)

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::common::{Federation, bin, job_copy, root};

/// Runs `admin --json <args>` with the federation's admin kit and samples the process's peak
/// RSS (`VmHWM`, KiB) while it runs: the output and the highest peak seen.
fn admin_with_peak(fed: &Federation, args: &[&str]) -> (Output, u64) {
    let mut child = Command::new(bin())
        .arg("admin")
        .arg("--kit")
        .arg(fed.prod.join("admin@nvidia.com/startup"))
        .arg("--json")
        .args(args)
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            && let Some(kib) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak = peak.max(kib);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    (child.wait_with_output().unwrap(), peak)
}

/// Writes a meta.json deploying `app` to the server and `n` sites named `site-<i>` padded to
/// `len` bytes, streamed so the test itself stays small.
fn write_meta(job: &Path, n: usize, len: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(job.join("meta.json")).unwrap());
    write!(
        f,
        r#"{{"name": "large", "min_clients": 1, "deploy_map": {{"app": ["server""#
    )
    .unwrap();
    for i in 0..n {
        write!(f, r#","{:0>len$}""#, format!("site-{i}")).unwrap();
    }
    write!(f, "]}}}}").unwrap();
    f.flush().unwrap();
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_57_mb_meta_json_is_refused_before_it_is_read() {
    // Packing happens before the server is contacted: no node needs to run.
    let fed = Federation::prepare(1, 19600);
    let dir = tempfile::tempdir().unwrap();
    let job = job_copy(dir.path(), 1, 0);
    // Valid JSON: a deploy map of 4 million 13-byte names.
    write_meta(&job, 4_000_000, 11);
    let len = std::fs::metadata(job.join("meta.json")).unwrap().len();
    assert!(len > 57_000_000, "{len}");
    let (out, peak_kib) = admin_with_peak(&fed, &["submit", job.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("meta.json") && err.contains(&format!("{len} bytes, at most 1048576")),
        "{err}"
    );
    // The file was not read: the console stayed small (it read 57 MB and peaked at 595 MB).
    // Small against the same console asking a server that is not there (a build with the
    // torch feature maps LibTorch, a hundred MB more for every command).
    let (_, base_kib) = admin_with_peak(&fed, &["sites"]);
    eprintln!("admin peak RSS {peak_kib} KiB, {base_kib} KiB for `sites`");
    assert!(
        peak_kib < base_kib + 32 * 1024,
        "admin peak RSS {peak_kib} KiB, {base_kib} KiB for `sites`"
    );
}

#[test]
fn a_deploy_map_of_too_many_names_is_refused_at_the_admin() {
    let fed = Federation::running(1, 19700);
    let dir = tempfile::tempdir().unwrap();
    let job = job_copy(dir.path(), 1, 0);
    // Under the byte cap, over the name limit.
    write_meta(&job, 60_000, 1);
    assert!(std::fs::metadata(job.join("meta.json")).unwrap().len() < 1 << 20);
    let out = fed.admin(&["submit", job.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("meta.json: deploy_map: 60001 names, at most 4096"),
        "{err}"
    );
    assert_eq!(fed.admin_json(&["list"]), serde_json::json!([]));

    // The largest deploy map allowed (4,096 names of 64 bytes) is taken; what it costs the
    // server is printed for the record.
    let server = fed
        .nodes
        .iter()
        .find(|(n, _)| n == "server")
        .map(|(_, c)| c.id())
        .unwrap();
    let before = rss_kib(server);
    write_meta(&job, 4095, 64);
    let id = fed.submit(job.to_str().unwrap());
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kib(server);
    eprintln!(
        "server RSS {before} KiB before the largest allowed job ({} bytes of meta.json), {after} KiB after",
        std::fs::metadata(job.join("meta.json")).unwrap().len()
    );
    let st = fed.admin_json(&["status", &id]);
    assert_eq!(st["name"], "large", "{st}");
}
