//! A three-tier federation as processes on 127.0.0.1: the tier-1 server; hub `eu` (region
//! `eu`) whose members are its site `site-1` and the nested hub `eu.de`; sites `site-1` and
//! `site-2` of region `eu.de`. One `TieredScatterAndGather` job submitted at tier 1 runs down
//! both tiers of hubs: every leaf site trains, the global model learns, and every tier shows
//! the leaf sites under their full names (`eu.de.site-1`).

#![allow(clippy::unwrap_used)]

#[path = "../../node/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Federation, ended, hub_job};
use serde_json::Value;

/// The ports of this test (no other test uses 23_300..23_400).
const BASE: u16 = 23_300;

fn project_yml() -> String {
    let mut s = format!(
        "api_version: 3\nname: nested\ndescription: three tiers\nparticipants:\n  \
         - name: server\n    type: server\n    org: nvidia\n    host_names: [127.0.0.1]\n    \
         listen_host: 127.0.0.1\n    fed_learn_port: {}\n    admin_port: {}\n  \
         - name: admin@nvidia.com\n    type: admin\n    org: nvidia\n    role: project_admin\n",
        BASE,
        BASE + 1
    );
    let hub = |name: &str, port: u16| {
        format!(
            "  - name: {name}\n    type: hub\n    org: nvidia\n    host_names: [127.0.0.1]\n    \
             listen_host: 127.0.0.1\n    fed_learn_port: {port}\n    admin_port: {}\n  \
             - name: admin@{name}\n    type: admin\n    org: nvidia\n    role: project_admin\n    \
             region: {name}\n",
            port + 1
        )
    };
    let site = |name: &str, region: &str, port: u16| {
        format!(
            "  - name: {name}\n    type: client\n    org: nvidia\n    region: {region}\n    \
             listen_host: 127.0.0.1\n    port: {port}\n"
        )
    };
    s.push_str(&hub("eu", BASE + 2));
    s.push_str(&site("site-1", "eu", BASE + 4));
    s.push_str(&hub("eu.de", BASE + 5));
    s.push_str(&site("site-1", "eu.de", BASE + 7));
    s.push_str(&site("site-2", "eu.de", BASE + 8));
    s.push_str("builders: [workspace, static_files, certs, signature]\n");
    s
}

/// The kits provisioned and every node started in order (the server, hub `eu`, hub `eu.de`,
/// then the sites), each tier's sites connected.
fn running() -> Federation {
    let dir = tempfile::tempdir().unwrap();
    let project = flare_provision::project::Project::parse(&project_yml()).unwrap();
    let out = flare_provision::builder::provision_now(&project, &dir.path().join("ws")).unwrap();
    let mut t = Federation {
        _dir: dir,
        prod: out.prod_dir,
        nodes: Vec::new(),
    };
    for kit in [
        "server",
        "eu/eu",
        "eu.de/eu.de",
        "eu/site-1",
        "eu.de/site-1",
        "eu.de/site-2",
    ] {
        t.start(kit);
    }
    t.wait_sites(1);
    t.wait_sites_as("eu/admin@eu", 2);
    t.wait_sites_as("eu.de/admin@eu.de", 2);
    t
}

/// examples/hub-mnist with `args` in its workflow and `deploy_map` in its meta.
fn nested_job(dir: &Path, args: Value, deploy_map: Value) -> PathBuf {
    let job = hub_job(dir, "hub-mnist", args);
    let mut meta: Value =
        serde_json::from_slice(&std::fs::read(job.join("meta.json")).unwrap()).unwrap();
    meta["deploy_map"] = deploy_map;
    // Tier 1 has one member, hub `eu`.
    meta["min_clients"] = serde_json::json!(1);
    std::fs::write(job.join("meta.json"), meta.to_string()).unwrap();
    job
}

#[test]
fn a_job_submitted_at_tier_1_runs_through_a_nested_hub_to_its_sites() {
    let started = Instant::now();
    let t = running();
    eprintln!("three tiers connected after {:?}", started.elapsed());
    let tmp = tempfile::tempdir().unwrap();
    // The deploy map names region `eu` only: `eu.de` is inside it, so its sites take part.
    let job = nested_job(
        tmp.path(),
        serde_json::json!({"num_rounds": 2, "local_rounds": 1, "min_regions": 1,
            "min_clients": 2, "wait_time_after_min_received": 1, "task_timeout": 60}),
        serde_json::json!({"app": ["server", "eu"]}),
    );
    let id = t.submit(job.to_str().unwrap());
    let st = t.wait_status(
        &id,
        "the three-tier job did not end",
        Duration::from_secs(90),
        ended,
    );
    eprintln!("job ended after {:?}", started.elapsed());
    assert_eq!(st["state"], "finished", "{st}\n{}", t.log_tails(25));
    eprintln!("tier 1's sites: {}", st["sites"]);

    // Tier 1 shows the hubs and every leaf under its full name, and each leaf trained.
    let sites = st["sites"].as_object().unwrap();
    for name in ["eu", "eu.site-1", "eu.de", "eu.de.site-1", "eu.de.site-2"] {
        assert!(sites.contains_key(name), "{name} missing at tier 1: {st}");
    }
    for leaf in ["eu.site-1", "eu.de.site-1", "eu.de.site-2"] {
        let state = sites[leaf].as_str().unwrap();
        assert!(
            state.contains("result accepted") || state == "finished",
            "{leaf} at tier 1: {state}"
        );
    }
    assert!(
        !sites.keys().any(|k| k.starts_with("eu.eu")),
        "a name qualified twice: {st}"
    );

    // The global model learned: both global versions measured, the last one well.
    let metrics = st["metrics"].as_object().unwrap();
    let first = metrics["0"]["accuracy"].as_f64().unwrap();
    let last = metrics["2"]["accuracy"].as_f64().unwrap();
    assert!(
        first < 0.5,
        "the initial model already scores {first}: {st}"
    );
    assert!(last > 0.8, "final accuracy {last}: {st}");

    // Each region's admin lists the job under tier 1's id, finished; region `eu` shows the
    // nested sites under the same full names as tier 1.
    for admin in ["eu/admin@eu", "eu.de/admin@eu.de"] {
        let list = t.admin_as_json(admin, &["list"]);
        let mine = list
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{admin} does not list job {id}: {list}"));
        assert_eq!(mine["state"], "finished", "{admin}: {mine}");
    }
    let eu = t.admin_as_json("eu/admin@eu", &["status", &id]);
    for name in ["site-1", "eu.de", "eu.de.site-1", "eu.de.site-2"] {
        assert!(
            eu["sites"].as_object().unwrap().contains_key(name),
            "{name} missing in region eu: {eu}"
        );
    }
    eprintln!("region eu's sites: {}", eu["sites"]);
    let de = t.admin_as_json("eu.de/admin@eu.de", &["status", &id]);
    for name in ["site-1", "site-2"] {
        assert_eq!(de["sites"][name], "finished", "region eu.de: {de}");
    }
    eprintln!("first job checked after {:?}", started.elapsed());

    // Two rounds per task in each region, and no final validation: hub `eu` runs 2 rounds per
    // global round (4), the nested hub gets one task per round of `eu`'s and runs 2 rounds for
    // each (8), and its run ends with `eu`'s last round, not after tier 1's `num_rounds` tasks.
    let tmp = tempfile::tempdir().unwrap();
    let job = nested_job(
        tmp.path(),
        serde_json::json!({"num_rounds": 2, "local_rounds": 2, "min_regions": 1,
            "min_clients": 2, "wait_time_after_min_received": 1, "task_timeout": 60,
            "validate_final": false}),
        serde_json::json!({"app": ["server", "eu"]}),
    );
    let id = t.submit(job.to_str().unwrap());
    let st = t.wait_status(
        &id,
        "the second three-tier job did not end",
        Duration::from_secs(90),
        ended,
    );
    eprintln!("second job ended after {:?}", started.elapsed());
    assert_eq!(st["state"], "finished", "{st}\n{}", t.log_tails(25));
    let version_1 = st["metrics"]["1"]["accuracy"].as_f64().unwrap();
    assert!(version_1 > 0.8, "accuracy of version 1: {st}");
    let eu = t.admin_as_json("eu/admin@eu", &["status", &id]);
    assert_eq!(eu["state"], "finished", "region eu: {eu}");
    assert_eq!(eu["round"], 4, "region eu: {eu}");
    let de = t.admin_as_json("eu.de/admin@eu.de", &["status", &id]);
    assert_eq!(de["state"], "finished", "region eu.de: {de}");
    assert_eq!(de["round"], 8, "region eu.de: {de}");
    eprintln!("checked after {:?}", started.elapsed());
}
