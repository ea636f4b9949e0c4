//! Finding 5: a long scatter-and-gather job must cost the server the same at its last round as
//! at its first. The server once rewrote the whole job record (history and every round's
//! metrics) on each round, so both the bytes it wrote a round and `record.json` grew with the
//! round. This runs a synthetic 10-parameter job for 150 rounds and checks what the server
//! writes: the size of `record.json`, and the bytes the server process writes a round
//! (`wchar` in `/proc/<pid>/io`), early and late.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::Federation;

const ROUNDS: u32 = 150;

/// The bytes the process has written so far (files, sockets, logs).
fn wchar(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The round in `record.json` (read from disk, so that watching costs the server nothing).
fn record_round(record: &Path) -> Option<u64> {
    let bytes = std::fs::read(record).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v["round"].as_u64()
}

/// Waits until `record.json` shows round `round` or later; returns (round, wchar, record size).
fn at_round(record: &Path, pid: u32, round: u64) -> (u64, u64, u64) {
    let start = Instant::now();
    loop {
        if let Some(r) = record_round(record)
            && r >= round
        {
            let w = wchar(pid);
            let len = std::fs::metadata(record).unwrap().len();
            return (r, w, len);
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "round {round} not reached: {:?}",
            record_round(record)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_long_job_writes_the_same_at_its_last_rounds_as_at_its_first() {
    let fed = Federation::running(2, 19500);
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("long");
    flare_node::bench::write_synthetic_job(&job, 10, 2, ROUNDS).unwrap();
    let id = fed.submit(job.to_str().unwrap());
    let pid = fed
        .nodes
        .iter()
        .find(|(n, _)| n == "server")
        .map(|(_, c)| c.id())
        .unwrap();
    let record: PathBuf = fed
        .prod
        .join("server/store/jobs")
        .join(&id)
        .join("record.json");

    let (r10, w10, _) = at_round(&record, pid, 10);
    let (r20, _, len20) = at_round(&record, pid, 20);
    let (r30, w30, _) = at_round(&record, pid, 30);
    let (r120, w120, _) = at_round(&record, pid, 120);
    let (r140, w140, len140) = at_round(&record, pid, 140);
    let done = fed.admin_json(&["wait", &id, "--timeout", "120"]);
    assert_eq!(done["state"], "finished", "{done}");
    // `round` counts the rounds done; versions 0..ROUNDS were measured.
    assert_eq!(done["round"], ROUNDS, "{done}");
    assert_eq!(done["metrics"].as_object().unwrap().len(), ROUNDS as usize);

    // record.json does not grow with the round (a digit more in the round number at most).
    assert!(
        len140.abs_diff(len20) <= 4,
        "record.json was {len20} bytes at round {r20} and {len140} at round {r140}"
    );
    // Nor do the bytes the server writes a round.
    let early = (w30 - w10) as f64 / (r30 - r10) as f64;
    let late = (w140 - w120) as f64 / (r140 - r120) as f64;
    eprintln!(
        "server writes {early:.0} bytes a round at rounds {r10}..{r30}, {late:.0} at {r120}..{r140}"
    );
    assert!(
        late <= early * 1.5,
        "the server wrote {early:.0} bytes a round at rounds {r10}..{r30} and {late:.0} at rounds {r120}..{r140}"
    );
}
