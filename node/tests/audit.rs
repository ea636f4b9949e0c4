//! The real `flare-node audit` binary on audit logs written by the library: `verify` passes
//! an intact file and names the line of a hand-edited one; `show` prints and filters.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use flare_node::audit::{Actor, AuditEntry, AuditKind, AuditLog, Decision, WorkflowAudit};

fn audit(args: &[&str], file: &Path) -> Output {
    Command::new(flare_node::node_bin())
        .arg("audit")
        .args(args)
        .arg(file)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Five lines: a refused and an allowed command, a job event and two workflow steps.
fn write_log(path: &Path) {
    let log = AuditLog::open(path, "server").unwrap();
    let lead = Actor {
        name: "lead@org-a.com".into(),
        org: "org-a".into(),
        role: "lead".into(),
    };
    log.record(
        AuditEntry::new(AuditKind::AdminCommand, "abort_job")
            .actor(lead.clone())
            .job("job-1")
            .decision(Decision::Refused)
            .reason("not the submitter"),
    )
    .unwrap();
    log.record(
        AuditEntry::new(AuditKind::AdminCommand, "submit_job")
            .actor(lead)
            .job("job-2")
            .decision(Decision::Allowed),
    )
    .unwrap();
    log.record(AuditEntry::new(AuditKind::JobEvent, "deployed").job("job-2"))
        .unwrap();
    let wf = WorkflowAudit::new(log, "job-2", "scatter_and_gather");
    wf.event("round_started", Some(serde_json::json!({ "round": 0 })));
    wf.event("finished", None);
}

#[test]
fn verify_passes_an_intact_log_and_names_the_edited_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&path);

    let out = audit(&["verify"], &path);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(&format!("{}: 5 lines, chain intact (last ", path.display())),
        "{stdout}"
    );

    // Someone turns the refusal of line 1 into an allowance.
    let original = std::fs::read_to_string(&path).unwrap();
    let edited = original.replacen("\"refused\"", "\"allowed\"", 1);
    assert_ne!(edited, original);
    std::fs::write(&path, &edited).unwrap();
    let out = audit(&["verify"], &path);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        format!(
            "{}: line 2: prev is not the SHA-256 of line 1: line 1 was edited (or this line's prev was)",
            path.display()
        )
    );

    // A deleted middle line.
    let lines: Vec<&str> = original.lines().collect();
    let mut kept = [&lines[..2], &lines[3..]].concat().join("\n");
    kept.push('\n');
    std::fs::write(&path, kept).unwrap();
    let out = audit(&["verify"], &path);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(": line 3: seq 4 where 3 was due"),
        "{}",
        text(&out.stderr)
    );

    // A missing file is not a broken chain.
    let out = audit(&["verify"], &dir.path().join("nope.log"));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn show_prints_the_lines_and_filters_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&path);

    let out = audit(&["show"], &path);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let all = text(&out.stdout);
    assert_eq!(all.lines().count(), 6, "a header and five lines:\n{all}");
    assert!(all.contains("abort_job — not the submitter") && all.contains("refused"));

    let out = audit(&["show", "--kind", "workflow", "--job", "job-2"], &path);
    let wf = text(&out.stdout);
    assert_eq!(wf.lines().count(), 3, "{wf}");
    assert!(wf.contains("round_started") && !wf.contains("deployed"));

    let out = audit(&["show", "--kind", "coffee"], &path);
    assert_eq!(out.status.code(), Some(2), "clap refuses an unknown kind");
}
