//! A tiered federation as processes on 127.0.0.1, from `poc prepare --regions 2 -n 3` kits:
//! the tier-1 server, two hubs and three sites in each region, all `flare-node` processes,
//! driven with the admin console of tier 1 and of a region, as a user would.

#![allow(clippy::unwrap_used)]

#[path = "../../node/tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Federation, ended, history_notes, hub_job};
use serde_json::Value;

/// A tiered POC of `regions` regions with `sites` sites each, every node started (the server,
/// the hubs, then the sites; kits `server`, `region-1/region-1`, `region-1/site-2`) and
/// connected.
fn running(regions: usize, sites: usize, port: u16) -> Federation {
    let (r, n) = (regions.to_string(), sites.to_string());
    let mut t = Federation::prepare_with(&["--regions", &r, "-n", &n], port);
    t.start("server");
    for r in 1..=regions {
        t.start(&format!("region-{r}/region-{r}"));
    }
    for r in 1..=regions {
        for s in 1..=sites {
            t.start(&format!("region-{r}/site-{s}"));
        }
    }
    t.wait_sites(regions);
    for r in 1..=regions {
        t.wait_sites_as(&region_admin(r), sites);
    }
    t
}

fn region_admin(r: usize) -> String {
    format!("region-{r}/admin@region-{r}")
}

#[test]
fn one_submit_at_tier_1_runs_the_job_in_every_region() {
    let t = running(2, 3, 23_000);
    let tmp = tempfile::tempdir().unwrap();
    let job = hub_job(
        tmp.path(),
        "hub-mnist",
        serde_json::json!({"num_rounds": 2, "local_rounds": 2, "min_regions": 2,
            "min_clients": 3, "wait_time_after_min_received": 1, "task_timeout": 120}),
    );
    let id = t.submit(job.to_str().unwrap());
    let st = t.wait_status(
        &id,
        "the tiered job did not end",
        Duration::from_secs(240),
        ended,
    );
    assert_eq!(st["state"], "finished", "{st}\n{}", t.log_tails(30));
    // Every site of every region shows at tier 1 as region.site.
    let sites = st["sites"].as_object().unwrap();
    for r in 1..=2 {
        for s in 1..=3 {
            let name = format!("region-{r}.site-{s}");
            assert!(sites.contains_key(&name), "{name} missing from {st}");
        }
    }
    // The global model learned: every version is measured, the last one well.
    let metrics = st["metrics"].as_object().unwrap();
    let last = metrics["2"]["accuracy"].as_f64().unwrap();
    assert!(last > 0.85, "final accuracy {last}: {st}");
    // The region's own admins see the derived job, under tier 1's id.
    for r in 1..=2 {
        let list = t.admin_as_json(&region_admin(r), &["list"]);
        let mine = list
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id.as_str())
            .unwrap_or_else(|| panic!("region-{r} does not list job {id}: {list}"));
        assert_eq!(mine["state"], "finished", "{mine}");
    }
    // And tier 1's result downloads.
    let out = tmp.path().join("download");
    let dl = t.admin_json(&["download", &id, "--output", out.to_str().unwrap()]);
    assert!(dl.to_string().contains("global_final.safetensors"), "{dl}");
}

#[test]
fn each_region_can_run_its_rounds_as_a_swarm() {
    let t = running(2, 3, 23_500);
    let tmp = tempfile::tempdir().unwrap();
    let job = hub_job(
        tmp.path(),
        "hub-mnist",
        serde_json::json!({"num_rounds": 2, "local_rounds": 2, "min_regions": 2,
            "min_clients": 3, "wait_time_after_min_received": 1, "task_timeout": 120,
            "region_workflow": "Swarm"}),
    );
    let id = t.submit(job.to_str().unwrap());
    let st = t.wait_status(
        &id,
        "the tiered swarm job did not end",
        Duration::from_secs(240),
        ended,
    );
    assert_eq!(st["state"], "finished", "{st}\n{}", t.log_tails(30));
    // Every global round folded both regions' swarm results, and the global model learned.
    let metrics = st["metrics"].as_object().unwrap();
    let last = metrics["2"]["accuracy"].as_f64().unwrap();
    assert!(last > 0.85, "final accuracy {last}: {st}");
    // Inside each region the sites aggregated among themselves: the region's record shows
    // swarm rounds aggregated by its sites, and its hub ran no training round of its own.
    for r in 1..=2 {
        let region = t.admin_as_json(&region_admin(r), &["status", &id]);
        let history = history_notes(&region);
        assert!(
            !history
                .iter()
                .any(|n| n.contains("global round") && n.contains("aborted")),
            "region-{r}: {history:?}"
        );
        assert_eq!(region["state"], "finished", "region-{r}: {region}");
        for g in 0..2 {
            let line = format!(
                "global round {g}: the region's swarm of 3 sites ended (3 in its last round)"
            );
            assert!(
                history.iter().any(|n| n.contains(&line)),
                "region-{r} has no {line:?}: {history:?}"
            );
        }
        for s in 1..=3 {
            assert!(
                st["sites"]
                    .as_object()
                    .unwrap()
                    .contains_key(&format!("region-{r}.site-{s}")),
                "{st}"
            );
        }
    }
}

#[test]
fn a_deploy_map_that_names_some_sites_of_a_region_runs_the_region_on_just_those() {
    let t = running(2, 3, 23_700);
    let tmp = tempfile::tempdir().unwrap();
    let job = hub_job(
        tmp.path(),
        "hub-mnist",
        serde_json::json!({"num_rounds": 2, "local_rounds": 1, "min_regions": 2,
            "min_clients": 3, "wait_time_after_min_received": 1, "task_timeout": 120,
            "region_workflow": "Swarm"}),
    );
    // region-1 is named whole, region-2 by two of its three sites.
    let meta = job.join("meta.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    m["deploy_map"] = serde_json::json!({
        "app": ["server", "region-1", "region-2.site-1", "region-2.site-2"]
    });
    std::fs::write(&meta, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let id = t.submit(job.to_str().unwrap());
    let st = t.wait_status(
        &id,
        "the tiered job with a partial deploy map did not end",
        Duration::from_secs(240),
        ended,
    );
    assert_eq!(st["state"], "finished", "{st}\n{}", t.log_tails(30));
    let sites = st["sites"].as_object().unwrap();
    for name in [
        "region-1.site-1",
        "region-1.site-2",
        "region-1.site-3",
        "region-2.site-1",
        "region-2.site-2",
    ] {
        assert!(sites.contains_key(name), "{name} missing from {st}");
    }
    assert!(
        !sites.contains_key("region-2.site-3"),
        "region-2.site-3 is not in the deploy map but took part: {st}"
    );
    // Each region's swarm was the sites the map gives it, and neither waited for more.
    for (r, n) in [(1, 3), (2, 2)] {
        let region = t.admin_as_json(&region_admin(r), &["status", &id]);
        let history = history_notes(&region);
        assert_eq!(region["state"], "finished", "region-{r}: {region}");
        for g in 0..2 {
            let line = format!(
                "global round {g}: the region's swarm of {n} sites ended ({n} in its last round)"
            );
            assert!(
                history.iter().any(|h| h.contains(&line)),
                "region-{r} has no {line:?}: {history:?}"
            );
        }
    }
}

#[test]
fn a_killed_hub_leaves_its_rounds_to_the_other_region_and_rejoins_after_a_restart() {
    let mut t = running(2, 3, 23_100);
    let tmp = tempfile::tempdir().unwrap();
    let job = hub_job(
        tmp.path(),
        "hub-mnist",
        // A long wait after the quorum: a round waits for the killed hub until tier 1 declares
        // its region away.
        serde_json::json!({"num_rounds": 20, "local_rounds": 1, "min_regions": 1,
            "min_clients": 3, "wait_time_after_min_received": 60, "task_timeout": 120}),
    );
    let id = t.submit(job.to_str().unwrap());
    t.wait_status(
        &id,
        "round 1 did not start",
        Duration::from_secs(120),
        |st| st["round"].as_u64().is_some_and(|r| r >= 1),
    );
    let killed = Instant::now();
    t.kill("region-2/region-2");
    // Tier 1 declares the region away and goes on with region-1.
    let st = t.wait_status(
        &id,
        "region-2 was not declared away",
        Duration::from_secs(60),
        |st| {
            history_notes(st)
                .iter()
                .any(|n| n.contains("region region-2 is away"))
                || ended(st)
        },
    );
    assert!(!ended(&st), "the job ended with its hub gone: {st}");
    let away_after = killed.elapsed();
    assert!(
        away_after < Duration::from_secs(30),
        "declared away after {away_after:?}"
    );
    t.start("region-2/region-2");
    let st = t.wait_status(&id, "the job did not end", Duration::from_secs(300), ended);
    assert_eq!(st["state"], "finished", "{st}\n{}", t.log_tails(30));
    let history = history_notes(&st);
    assert!(
        history
            .iter()
            .any(|n| n.contains("region-2 came back without the job")),
        "{history:?}"
    );
    // The restarted hub answered the last round again: its region took part to the end.
    assert_eq!(st["sites"]["region-2"], "finished", "{st}");
}

#[test]
fn abort_at_tier_1_stops_every_tier_within_ten_seconds() {
    let t = running(2, 2, 23_200);
    let tmp = tempfile::tempdir().unwrap();
    // Many rounds, so the job is mid-way when it is aborted.
    let job = hub_job(
        tmp.path(),
        "hub-mnist",
        serde_json::json!({"num_rounds": 50, "local_rounds": 2, "min_regions": 2,
            "min_clients": 2, "wait_time_after_min_received": 1, "task_timeout": 120}),
    );
    let id = t.submit(job.to_str().unwrap());
    t.wait_status(
        &id,
        "round 1 did not start",
        Duration::from_secs(120),
        |st| st["round"].as_u64().is_some_and(|r| r >= 1),
    );
    let asked = Instant::now();
    t.admin_json(&["abort", &id]);
    // Tier 1 and both regions' jobs end aborted. A region's job reads as ended only after
    // its server told each of its sites to free the job and they answered.
    loop {
        let top = t.admin_json(&["status", &id]);
        let regions: Vec<Value> = (1..=2)
            .map(|r| t.admin_as_json(&region_admin(r), &["status", &id]))
            .collect();
        if top["state"] == "aborted" && regions.iter().all(|r| r["state"] == "aborted") {
            break;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "not every tier stopped within 10 s: tier 1 {}, regions {:?}\n{}",
            top["state"],
            regions
                .iter()
                .map(|r| r["state"].clone())
                .collect::<Vec<_>>(),
            t.log_tails(30)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("every tier stopped {:?} after the abort", asked.elapsed());
}
