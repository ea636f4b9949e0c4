//! Site policies decided by real nodes: federated authorization (`local/authorization.json`
//! at the server and at each site, with admins of several roles and orgs) and privacy
//! scopes (`local/privacy.json`).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Federation, bin, history_notes, job_copy, use_dp_aggregator};
use serde_json::Value;

/// A project with a server, two sites of two orgs, and admins of every role: the project
/// admin, a lead of each org, a second lead of org B, and a member of org A.
fn project(base: u16) -> String {
    format!(
        "api_version: 3
name: policies
description: policy tests
participants:
  - name: server
    type: server
    org: nvidia
    host_names: [127.0.0.1]
    listen_host: 127.0.0.1
    fed_learn_port: {base}
    admin_port: {}
  - name: site-1
    type: client
    org: hospital-a
    listen_host: 127.0.0.1
    port: {}
  - name: site-2
    type: client
    org: hospital-b
    listen_host: 127.0.0.1
    port: {}
  - name: admin@nvidia.com
    type: admin
    org: nvidia
    role: project_admin
  - name: lead@a.org
    type: admin
    org: hospital-a
    role: lead
  - name: lead@b.org
    type: admin
    org: hospital-b
    role: lead
  - name: lead2@b.org
    type: admin
    org: hospital-b
    role: lead
  - name: member@a.org
    type: admin
    org: hospital-a
    role: member
builders: [workspace, static_files, certs, signature]
",
        base + 1,
        base + 2,
        base + 3
    )
}

fn provisioned(base: u16) -> Federation {
    let dir = tempfile::tempdir().unwrap();
    let yml = dir.path().join("project.yml");
    std::fs::write(&yml, project(base)).unwrap();
    let ws = dir.path().join("ws");
    let out = Command::new(bin())
        .args(["provision", "-p"])
        .arg(&yml)
        .arg("-w")
        .arg(&ws)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Federation {
        prod: ws.join("policies/prod_00"),
        _dir: dir,
        nodes: Vec::new(),
    }
}

fn write_policy(f: &Federation, who: &str, file: &str, v: Value) {
    let p = f.prod.join(who).join("local").join(file);
    std::fs::write(p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// `admin --json <args>` as `kit`: (success, stdout JSON or null, stderr).
fn admin(f: &Federation, kit: &str, args: &[&str]) -> (bool, Value, String) {
    let out = f.admin_as(kit, args);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        v,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The lines of an audit log, parsed.
fn audit_lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn site_state(st: &Value, site: &str) -> String {
    st["sites"][site].as_str().unwrap_or_default().to_string()
}

/// hello-fedavg for one site, `rounds` rounds.
fn one_site_job(dir: &Path, rounds: u32) -> String {
    let job = job_copy(dir, rounds, 0);
    let meta = job.join("meta.json");
    let text = std::fs::read_to_string(&meta)
        .unwrap()
        .replace("\"min_clients\": 2", "\"min_clients\": 1");
    std::fs::write(&meta, text).unwrap();
    let server = job.join("app/config/config_fed_server.json");
    let text = std::fs::read_to_string(&server)
        .unwrap()
        .replace("\"min_clients\": 2", "\"min_clients\": 1");
    std::fs::write(&server, text).unwrap();
    job.display().to_string()
}

#[test]
fn authorization_is_checked_by_the_server_and_again_by_each_site() {
    let mut f = provisioned(26_000);
    // The server: leads manage the jobs of their own org (FLARE's o:submitter), not only
    // their own.
    let mut server_rules = flare_provision::config::default_authorization();
    server_rules["permissions"]["lead"]["manage_job"] = "o:submitter".into();
    write_policy(&f, "server", "authorization.json", server_rules);
    // Site-2 takes no job from a lead.
    let mut site2_rules = flare_provision::config::default_authorization();
    site2_rules["permissions"]["lead"]["submit_job"] = "none".into();
    write_policy(&f, "site-2", "authorization.json", site2_rules);
    f.start("server");
    f.start("site-1");
    f.start("site-2");
    f.wait_sites(2);
    let tmp = tempfile::tempdir().unwrap();
    let job = one_site_job(tmp.path(), 40);

    // A member cannot submit: the refusal names the right, the role and the rule.
    let (ok, _, err) = admin(&f, "member@a.org", &["submit", &job]);
    assert!(!ok, "a member submitted a job");
    for part in [
        "submit_job",
        "member@a.org",
        "role member",
        "no rule for member's submit_job",
    ] {
        assert!(err.contains(part), "{part:?} not in {err}");
    }
    // A member may view.
    let (ok, _, err) = admin(&f, "member@a.org", &["list"]);
    assert!(ok, "{err}");

    // Lead B submits; site-2 refuses it by its own rule, site-1 runs it.
    let (ok, v, err) = admin(&f, "lead@b.org", &["submit", &job]);
    assert!(ok, "{err}");
    let id = v["job_id"].as_str().unwrap().to_string();
    let st = f.wait_status(
        &id,
        "the job runs on site-1",
        Duration::from_secs(60),
        |st| st["state"] == "running" && site_state(st, "site-2").starts_with("refused"),
    );
    let s2 = site_state(&st, "site-2");
    for part in [
        "site-2 refuses submit_job",
        "lead@b.org",
        "role lead",
        "permissions.lead.submit_job = \"none\"",
        "site-2/local/authorization.json",
    ] {
        assert!(s2.contains(part), "{part:?} not in site-2's state {s2:?}");
    }
    assert_eq!(site_state(&st, "site-1"), "deployed", "{st}");

    // Lead A may not abort org B's job (o:submitter); the refusal shows in `status`.
    let (ok, _, err) = admin(&f, "lead@a.org", &["abort", &id]);
    assert!(!ok, "lead A aborted org B's job");
    assert!(
        err.contains("manage_job")
            && err.contains("permissions.lead.manage_job = \"o:submitter\"")
            && err.contains("job of lead@b.org (hospital-b)"),
        "{err}"
    );
    let (ok, status, err) = admin(&f, "admin@nvidia.com", &["status"]);
    assert!(ok, "{err}");
    let refused = status["refused_commands"].as_array().unwrap();
    assert!(
        refused
            .iter()
            .any(|r| r["admin"] == "lead@a.org" && r["command"] == "abort_job"),
        "{status}"
    );
    assert!(
        refused
            .iter()
            .any(|r| r["admin"] == "member@a.org" && r["command"] == "submit_job"),
        "{status}"
    );
    // A lead of the submitter's org may, at the server. Site-1 decides again with its own
    // rules, FLARE's default (a lead manages only their own jobs: n:submitter), and refuses.
    let (ok, _, err) = admin(&f, "lead2@b.org", &["abort", &id]);
    assert!(ok, "{err}");
    let st = f.wait_status(&id, "the job is aborted", Duration::from_secs(60), |st| {
        st["state"] == "aborted"
    });
    let notes = history_notes(&st);
    assert!(
        notes.iter().any(|n| n.contains("lead2@b.org")
            && n.contains("site-1 refused to stop")
            && n.contains("permissions.lead.manage_job = \"n:submitter\"")),
        "{st}"
    );

    // The server's file changes without a restart: members lose `view` at once.
    let mut no_view = flare_provision::config::default_authorization();
    no_view["permissions"]["member"] = serde_json::json!({"view": "none"});
    write_policy(&f, "server", "authorization.json", no_view);
    let (ok, _, err) = admin(&f, "member@a.org", &["list"]);
    assert!(
        !ok && err.contains("permissions.member.view = \"none\""),
        "{err}"
    );

    // Audit: every command above is in the server's log with who, what and the decision;
    // each site logged its own decisions.
    let lines = audit_lines(&f.prod.join("server/audit.log"));
    for (admin, command, decision) in [
        ("member@a.org", "submit_job", "refused"),
        ("member@a.org", "list_jobs", "allowed"),
        ("lead@b.org", "submit_job", "allowed"),
        ("lead@a.org", "abort_job", "refused"),
        ("admin@nvidia.com", "check_status", "allowed"),
        ("lead2@b.org", "abort_job", "allowed"),
        ("member@a.org", "list_jobs", "refused"),
    ] {
        assert!(
            lines.iter().any(|l| l["kind"] == "admin_command"
                && l["actor"]["name"] == admin
                && l["action"] == command
                && l["decision"] == decision),
            "no {admin} {command} {decision} line in {lines:#?}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l["action"] == "job_ended" && l["job"] == id.as_str()),
        "{lines:#?}"
    );
    let site2 = audit_lines(&f.prod.join("site-2/audit.log"));
    assert!(
        site2.iter().any(|l| l["kind"] == "policy"
            && l["action"] == "deploy"
            && l["decision"] == "refused"
            && l["actor"]["name"] == "lead@b.org"
            && l["reason"].as_str().unwrap().contains("submit_job")),
        "{site2:#?}"
    );
    let site1 = audit_lines(&f.prod.join("site-1/audit.log"));
    assert!(
        site1.iter().any(|l| l["action"] == "abort_job"
            && l["decision"] == "refused"
            && l["actor"]["name"] == "lead2@b.org"),
        "{site1:#?}"
    );

    // A malformed file never means "allow all": the server stops at start, naming the key.
    f.kill("server");
    // The chain holds; a hand-edited line is found.
    let log = f.prod.join("server/audit.log");
    let verify = |p: &Path| {
        Command::new(bin())
            .args(["audit", "verify"])
            .arg(p)
            .output()
            .unwrap()
    };
    let out = verify(&log);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let edited = text.replacen("\"decision\":\"refused\"", "\"decision\":\"allowed\"", 1);
    assert_ne!(text, edited);
    let bad_line = text
        .lines()
        .position(|l| l.contains("\"decision\":\"refused\""))
        .unwrap()
        + 1;
    let tampered = f.prod.join("server/audit-tampered.log");
    std::fs::write(&tampered, edited).unwrap();
    let out = verify(&tampered);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an edited log verified");
    assert!(
        err.contains(&format!("line {bad_line}"))
            || err.contains(&format!("line {}", bad_line + 1)),
        "line {bad_line} not named: {err}"
    );
    write_policy(
        &f,
        "server",
        "authorization.json",
        serde_json::json!({"permissions": {"lead": {"submit_job": "everyone"}}}),
    );
    let out = Command::new(bin())
        .arg("--kit")
        .arg(f.prod.join("server/startup"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("authorization.json") && err.contains("permissions.lead.submit_job"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// Privacy scopes: what leaves a site, seen where it is aggregated.

type Params = std::collections::BTreeMap<String, Vec<f32>>;

fn params(m: &flare_protocols::model::FLModel) -> Params {
    m.params
        .iter()
        .map(|(k, t)| (k.clone(), t.to_f32_vec()))
        .collect()
}

fn read_params(p: &Path) -> Params {
    params(&flare_node::model_io::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

/// The initial global model of the example jobs (`MnistMlp`, hidden 64, seed 0).
fn initial() -> Params {
    params(&flare_node::learner::mlp::Mlp::init(64, 0).to_model())
}

fn sub(a: &Params, b: &Params) -> Params {
    a.iter()
        .map(|(k, v)| (k.clone(), v.iter().zip(&b[k]).map(|(x, y)| x - y).collect()))
        .collect()
}

/// FLARE's PercentilePrivacy by hand (one step): the cutoff is numpy's linear percentile
/// of |Δ| over every element; entries below it become 0, the rest are clipped to ±gamma.
/// Returns the filtered diff and the cutoff.
fn percentile_privacy(diff: &Params, q: f64, gamma: f32) -> (Params, f64) {
    let mut abs: Vec<f64> = diff
        .values()
        .flatten()
        .map(|v| f64::from(v.abs()))
        .collect();
    abs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pos = q / 100.0 * (abs.len() - 1) as f64;
    let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
    let cutoff = abs[lo] + (abs[(lo + 1).min(abs.len() - 1)] - abs[lo]) * frac;
    let out = diff
        .iter()
        .map(|(k, v)| {
            let f = v
                .iter()
                .map(|&x| {
                    if f64::from(x.abs()) < cutoff {
                        0.0
                    } else {
                        x.clamp(-gamma, gamma)
                    }
                })
                .collect();
            (k.clone(), f)
        })
        .collect();
    (out, cutoff)
}

/// Asserts `got` equals `want` within `tol`, except elements within `tol` of the cutoff
/// (where an f32 rounding of Δ may land on either side of it).
fn assert_close(got: &Params, want: &Params, raw: &Params, cutoff: f64, tol: f32, what: &str) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}"
    );
    let mut checked = 0usize;
    for (k, g) in got {
        for (i, (x, y)) in g.iter().zip(&want[k]).enumerate() {
            if (f64::from(raw[k][i].abs()) - cutoff).abs() < f64::from(tol) {
                continue;
            }
            assert!(
                (x - y).abs() <= tol,
                "{what}: {k}[{i}] is {x}, by hand {y} (raw {})",
                raw[k][i]
            );
            checked += 1;
        }
    }
    assert!(checked > 50_000, "{what}: only {checked} elements compared");
}

const SCOPES: &str = r#"{
  "scopes": [
    { "name": "open" },
    { "name": "public", "task_result_filters": [
        { "path": "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
          "args": { "percentile": 10, "gamma": 0.01 } } ] },
    { "name": "private", "task_result_filters": [
        { "path": "nvflare.app_common.filters.exclude_vars.ExcludeVars",
          "args": { "exclude_vars": ["fc2.weight", "fc2.bias"] } } ] }
  ],
  "default_scope": "public"
}"#;

/// A copy of `job` named `name`, under `scope` (none: the site's default), its learner
/// sending `transfer` (FULL or DIFF).
fn scoped(job: &Path, dir: &Path, name: &str, scope: Option<&str>, transfer: &str) -> String {
    let out = dir.join(name);
    let cp = Command::new("cp")
        .arg("-r")
        .arg(job)
        .arg(&out)
        .status()
        .unwrap();
    assert!(cp.success());
    let meta_path = out.join("meta.json");
    let mut meta: Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    meta["name"] = name.into();
    if let Some(s) = scope {
        meta["scope"] = s.into();
    }
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    let client = out.join("app/config/config_fed_client.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&client).unwrap()).unwrap();
    c["executors"][0]["executor"]["args"]["params_transfer_type"] = transfer.into();
    c["executors"][0]["executor"]["args"]["epochs"] = 1.into();
    std::fs::write(&client, c.to_string()).unwrap();
    out.display().to_string()
}

fn run_job(f: &Federation, job: &str) -> (String, Value) {
    let id = f.submit(job);
    let st = f.wait_status(&id, "the job ends", Duration::from_secs(180), common::ended);
    (id, st)
}

fn result(f: &Federation, id: &str) -> Params {
    read_params(&f.prod.join(format!(
        "server/store/jobs/{id}/result/global_final.safetensors"
    )))
}

/// `job` with central DP as its aggregator, at ε = 8 over its one round.
fn with_dp(job: &str, dir: &Path, name: &str) -> String {
    let out = dir.join(name);
    let cp = Command::new("cp")
        .arg("-r")
        .arg(job)
        .arg(&out)
        .status()
        .unwrap();
    assert!(cp.success());
    use_dp_aggregator(&out);
    let meta_path = out.join("meta.json");
    let mut meta: Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    meta["name"] = name.into();
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    out.display().to_string()
}

/// The privacy spent that a finished DP job reports for its first version.
fn assert_dp_reported(st: &Value) {
    assert_eq!(st["state"], "finished", "{st}");
    let m = st["metrics"].as_object().unwrap();
    let eps: Vec<f64> = m
        .values()
        .filter_map(|x| x["privacy_epsilon"].as_f64())
        .collect();
    assert!(!eps.is_empty(), "no privacy_epsilon in {st}");
    let last = eps[eps.len() - 1];
    assert!(
        last > 7.0 && last <= 8.0 + 1e-9,
        "ε {last} for a target of 8: {st}"
    );
    assert!(
        m.values()
            .any(|x| x["privacy_delta"].as_f64() == Some(1e-5)),
        "{st}"
    );
}

#[test]
fn a_sites_privacy_scope_filters_what_reaches_the_aggregator_in_scatter_and_gather() {
    let mut f = Federation::prepare(1, 26_100);
    std::fs::write(f.prod.join("site-1/local/privacy.json"), SCOPES).unwrap();
    f.start("server");
    f.start("site-1");
    f.wait_sites(1);
    let tmp = tempfile::tempdir().unwrap();
    let base = Path::new(&one_site_job(tmp.path(), 1)).to_path_buf();
    let init = initial();

    // No filter: the raw update Δ the site's learner makes.
    let (id, st) = run_job(&f, &scoped(&base, tmp.path(), "open", Some("open"), "DIFF"));
    assert_eq!(st["state"], "finished", "{st}");
    let raw = sub(&result(&f, &id), &init);

    // The site's default scope: PercentilePrivacy(10, 0.01). The aggregator (the server) got
    // exactly the filtered update: the new global model is init + filtered Δ.
    let (id, st) = run_job(&f, &scoped(&base, tmp.path(), "public", None, "DIFF"));
    assert_eq!(st["state"], "finished", "{st}");
    let got = sub(&result(&f, &id), &init);
    let (want, cutoff) = percentile_privacy(&raw, 10.0, 0.01);
    assert!(cutoff > 0.0);
    assert_close(
        &got,
        &want,
        &raw,
        cutoff,
        1e-6,
        "scatter-and-gather, PercentilePrivacy",
    );
    let zeros = got.values().flatten().filter(|v| **v == 0.0).count();
    let all = got.values().map(Vec::len).sum::<usize>();
    assert!(zeros * 100 >= all * 9, "{zeros} of {all} zeroed");

    // ExcludeVars: fc2 never reached the aggregator, whose fc2 stays the initial one; fc1
    // is the site's.
    let (id, st) = run_job(
        &f,
        &scoped(&base, tmp.path(), "private", Some("private"), "FULL"),
    );
    assert_eq!(st["state"], "finished", "{st}");
    let got = result(&f, &id);
    assert_eq!(got["fc2.weight"], init["fc2.weight"]);
    assert_eq!(got["fc2.bias"], init["fc2.bias"]);
    for (i, (g, r)) in got["fc1.weight"].iter().zip(&raw["fc1.weight"]).enumerate() {
        let want = init["fc1.weight"][i] + r;
        assert!((g - want).abs() < 1e-5, "fc1.weight[{i}]: {g} vs {want}");
    }

    // A diff-only privacy filter with a learner that sends full weights: nothing is sent,
    // and the job says why.
    let (_, st) = run_job(
        &f,
        &scoped(&base, tmp.path(), "full", Some("public"), "FULL"),
    );
    assert_eq!(st["state"], "failed", "{st}");
    assert!(st.to_string().contains("params_transfer_type"), "{st}");

    // Central DP in the aggregation: the job reports the privacy it spent.
    let dp = with_dp(
        &scoped(&base, tmp.path(), "dp-base", Some("open"), "FULL"),
        tmp.path(),
        "dp",
    );
    let (_, st) = run_job(&f, &dp);
    assert_dp_reported(&st);

    // An unknown scope is refused at deploy with the reason.
    let (_, st) = run_job(
        &f,
        &scoped(&base, tmp.path(), "secret", Some("secret"), "DIFF"),
    );
    assert_eq!(st["state"], "failed", "{st}");
    let s1 = site_state(&st, "site-1");
    assert!(
        s1.starts_with("refused")
            && s1.contains("\"secret\"")
            && s1.contains("open, public, private"),
        "{s1}"
    );
}

#[test]
fn a_sites_privacy_scope_filters_its_updates_in_a_swarm() {
    let mut f = Federation::prepare(2, 26_200);
    for s in ["site-1", "site-2"] {
        std::fs::write(f.prod.join(s).join("local/privacy.json"), SCOPES).unwrap();
    }
    f.start("server");
    f.start("site-1");
    f.start("site-2");
    f.wait_sites(2);
    let tmp = tempfile::tempdir().unwrap();
    let base = common::swarm_copy(tmp.path(), 1, 1);
    let init = initial();
    let local = |id: &str, site: &str| {
        read_params(
            &f.prod
                .join(format!("{site}/jobs/{id}/models/local.safetensors")),
        )
    };

    // Unfiltered, full weights: each site keeps its own trained model, init + its raw
    // update (a site keeps no local model of a diff).
    let (id, st) = run_job(&f, &scoped(&base, tmp.path(), "open", Some("open"), "FULL"));
    assert_eq!(st["state"], "finished", "{st}");
    let raw1 = sub(&local(&id, "site-1"), &init);
    let raw2 = sub(&local(&id, "site-2"), &init);
    assert_ne!(raw1, raw2);

    // Under PercentilePrivacy each site's update is filtered before it leaves the learner,
    // whichever site aggregates: the round's model is init + the mean of the filtered
    // updates (equal weights: 4,000 images each).
    let (id, st) = run_job(&f, &scoped(&base, tmp.path(), "public", None, "DIFF"));
    assert_eq!(st["state"], "finished", "{st}");
    let (f1, c1) = percentile_privacy(&raw1, 10.0, 0.01);
    let (f2, c2) = percentile_privacy(&raw2, 10.0, 0.01);
    let mean: Params = f1
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.iter().zip(&f2[k]).map(|(a, b)| (a + b) / 2.0).collect(),
            )
        })
        .collect();
    let got = sub(&result(&f, &id), &init);
    // Elements within rounding of either cutoff may fall on either side; every other one
    // must match.
    let mut off = 0usize;
    for (k, g) in &got {
        for (i, (x, y)) in g.iter().zip(&mean[k]).enumerate() {
            if (x - y).abs() > 1e-6 {
                off += 1;
                assert!(
                    (f64::from(raw1[k][i].abs()) - c1).abs() < 1e-5
                        || (f64::from(raw2[k][i].abs()) - c2).abs() < 1e-5,
                    "{k}[{i}]: {x} vs {y}"
                );
            }
        }
    }
    assert!(off < 10, "{off} elements off");

    // Central DP where each round's aggregator is a site: ε reaches the server's metrics.
    let dp = with_dp(
        &scoped(&base, tmp.path(), "dp-base", Some("open"), "FULL"),
        tmp.path(),
        "dp",
    );
    let (_, st) = run_job(&f, &dp);
    assert_dp_reported(&st);
}
