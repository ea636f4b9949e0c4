//! The admin console as a new user types it, against a real POC federation: the group's
//! options (`--kit`, `--json`) before or after the command, and tables people can read
//! (local times, time since submit, metrics to four decimals) while `--json` keeps the raw
//! values.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};

use common::*;
use serde_json::Value;
use time::{OffsetDateTime, UtcOffset};

/// The zone the console runs in for the table checks: POSIX `TZ` for UTC+05:30, which needs
/// no zone database, and which no machine's default zone is likely to be.
const TZ: &str = "FLR-05:30";

/// `flare-node admin <args>` exactly as given, in the zone [`TZ`].
fn admin(args: &[&str]) -> Output {
    Command::new(bin())
        .arg("admin")
        .args(args)
        .current_dir(root())
        .env("TZ", TZ)
        .output()
        .unwrap()
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: exit {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// `admin <args>`, which must succeed, its stdout parsed as JSON.
fn json(args: &[&str], what: &str) -> Value {
    let text = ok(&admin(args), what);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}\n{text}"))
}

/// Unix milliseconds at UTC+05:30, to the second, computed apart from the console.
fn at_plus_0530(ms: u64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap()
        .to_offset(UtcOffset::from_hms(5, 30, 0).unwrap());
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[test]
fn admin_options_go_either_side_and_tables_are_readable() {
    let f = Federation::running(2, 27_800);
    let kit = f.prod.join("admin@nvidia.com/startup");
    let kit = kit.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let job = job_copy(tmp.path(), 2, 1);
    use_dp_aggregator(&job);
    let job = job.to_str().unwrap();

    // Without --kit anywhere: a usage error that names the option.
    let out = admin(&["list"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin: --kit <"), "{err}");
    assert!(err.contains("is required"), "{err}");

    // --kit and --json after the subcommand, as in `admin submit <job> --kit K`.
    let after = json(&["submit", job, "--kit", kit, "--json"], "after");
    // ... and before it, and split around it.
    let before = json(&["--kit", kit, "--json", "submit", job], "before");
    let split = json(&["--json", "submit", job, "--kit", kit], "split");
    let ids: Vec<&str> = [&after, &before, &split]
        .iter()
        .map(|v| v["job_id"].as_str().unwrap())
        .collect();
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
        "{ids:?}"
    );
    let id = ids[0];
    // A subcommand's own option and the group's options, in any order.
    ok(
        &admin(&["wait", id, "--kit", kit, "--timeout", "300"]),
        "wait with --kit after",
    );
    let listed = ok(&admin(&["list", "--kit", kit]), "list with --kit after");
    for id in &ids {
        assert!(listed.contains(id), "{id} missing from\n{listed}");
    }

    // --json keeps the raw values: history times in Unix milliseconds, metrics in full.
    let raw = json(&["status", id, "--json", "--kit", kit], "status --json");
    assert_eq!(raw["state"], "finished", "{raw}");
    let history = raw["history"].as_array().unwrap();
    let at: Vec<u64> = history
        .iter()
        .map(|h| h["at_ms"].as_u64().unwrap())
        .collect();
    assert!(at.len() >= 4, "{raw}");
    let submitted = raw["submitted_ms"].as_u64().unwrap();
    let metrics = &raw["metrics"]["2"];
    let (acc, loss) = (
        metrics["accuracy"].as_f64().unwrap(),
        metrics["loss"].as_f64().unwrap(),
    );
    assert_eq!(metrics["privacy_delta"].as_f64(), Some(1e-5), "{raw}");

    // The table: no raw milliseconds; each history line starts with its local time and the
    // time since submit; metrics to four decimals, δ in scientific notation.
    let table = ok(&admin(&["status", id, "--kit", kit]), "status table");
    for ms in &at {
        assert!(!table.contains(&ms.to_string()), "raw {ms} in\n{table}");
    }
    assert!(!table.contains("AT_MS"), "{table}");
    let head = table
        .lines()
        .position(|l| l.starts_with("TIME"))
        .unwrap_or_else(|| panic!("no history table in\n{table}"));
    assert!(
        table.lines().nth(head).unwrap().contains("SINCE_SUBMIT"),
        "{table}"
    );
    let rows: Vec<&str> = table.lines().skip(head + 1).collect();
    assert_eq!(rows.len(), at.len(), "{table}");
    for (row, ms) in rows.iter().zip(&at) {
        let since = (ms - submitted) as f64 / 1000.0;
        let prefix = format!("{}  +", at_plus_0530(*ms));
        assert!(row.starts_with(&prefix), "{row:?} for {ms}, not {prefix:?}");
        if since < 59.0 {
            let shown: f64 = row[prefix.len()..]
                .split('s')
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|e| panic!("{row:?}: {e}"));
            assert!((shown - since).abs() <= 0.051, "{row:?}: {since} s");
        }
    }
    assert!(rows[0].contains("+0.0s"), "{table}");
    let version = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some("2"))
        .unwrap_or_else(|| panic!("no version 2 in\n{table}"));
    let cells: Vec<&str> = version.split_whitespace().collect();
    assert_eq!(cells[1], format!("{acc:.4}"), "{version}");
    assert_eq!(cells[2], format!("{loss:.4}"), "{version}");
    assert_eq!(cells[4], "1.000e-5", "{version}");
    assert!(
        cells[1..4]
            .iter()
            .all(|c| c.split_once('.').unwrap().1.len() == 4),
        "{version}"
    );

    // The same table with the group's options before the command.
    let before = ok(
        &admin(&["--kit", kit, "status", id]),
        "status, --kit before",
    );
    assert_eq!(before, table);
}
