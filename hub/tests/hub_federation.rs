//! A tiered federation as processes on 127.0.0.1, from `poc prepare --regions 2 -n 3` kits:
//! the tier-1 server, two hubs and three sites in each region, all `flare-node` processes,
//! driven with the admin console of tier 1 and of a region, as a user would.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

struct Tiered {
    _dir: tempfile::TempDir,
    prod: PathBuf,
    nodes: Vec<(String, Child)>,
}

impl Drop for Tiered {
    fn drop(&mut self) {
        for (_, c) in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

const TIER1_ADMIN: &str = "admin@nvidia.com";

impl Tiered {
    fn prepare(regions: usize, sites: usize, base_port: u16) -> Tiered {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("poc");
        let out = Command::new(flare_node::node_bin())
            .args(["poc", "prepare", "--regions", &regions.to_string()])
            .args([
                "-n",
                &sites.to_string(),
                "--base-port",
                &base_port.to_string(),
            ])
            .arg("-w")
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
        Tiered {
            _dir: dir,
            prod,
            nodes: Vec::new(),
        }
    }

    /// Starts the node whose kit is `prod_00/<kit>` (`server`, `region-1/region-1`,
    /// `region-1/site-2`).
    fn start(&mut self, kit: &str) {
        let dir = self.prod.join(kit);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log.txt"))
            .unwrap();
        let child = Command::new(flare_node::node_bin())
            .arg("--kit")
            .arg(dir.join("startup"))
            .current_dir(root())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.nodes.push((kit.to_string(), child));
    }

    fn kill(&mut self, kit: &str) {
        let i = self.nodes.iter().position(|(n, _)| n == kit).unwrap();
        let (_, mut c) = self.nodes.remove(i);
        c.kill().unwrap();
        c.wait().unwrap();
    }

    fn log(&self, kit: &str) -> String {
        std::fs::read_to_string(self.prod.join(kit).join("log.txt")).unwrap_or_default()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for (kit, _) in &self.nodes {
            let log = self.log(kit);
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            s.push_str(&format!("--- {kit}\n"));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// `admin --json <args>` with the admin kit `prod_00/<kit>`.
    fn admin(&self, kit: &str, args: &[&str]) -> Output {
        Command::new(flare_node::node_bin())
            .arg("admin")
            .arg("--kit")
            .arg(self.prod.join(kit).join("startup"))
            .arg("--json")
            .args(args)
            .current_dir(root())
            .output()
            .unwrap()
    }

    fn admin_json(&self, kit: &str, args: &[&str]) -> Value {
        let out = self.admin(kit, args);
        assert!(
            out.status.success(),
            "admin {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn wait_sites(&self, admin: &str, n: usize) {
        let start = Instant::now();
        loop {
            let out = self.admin(admin, &["sites"]);
            if out.status.success() {
                let sites: Value = serde_json::from_slice(&out.stdout).unwrap();
                if sites.as_array().is_some_and(|a| a.len() >= n) {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{admin}: sites did not connect\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn wait_status(
        &self,
        job: &str,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            let st = self.admin_json(TIER1_ADMIN, &["status", job]);
            if ok(&st) {
                return st;
            }
            assert!(started.elapsed() < timeout, "{what}: {st}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Starts the server, the hubs and their sites, and waits until every one is connected.
    fn running(regions: usize, sites: usize, port: u16) -> Tiered {
        let mut t = Tiered::prepare(regions, sites, port);
        t.start("server");
        for r in 1..=regions {
            t.start(&format!("region-{r}/region-{r}"));
        }
        for r in 1..=regions {
            for s in 1..=sites {
                t.start(&format!("region-{r}/site-{s}"));
            }
        }
        t.wait_sites(TIER1_ADMIN, regions);
        for r in 1..=regions {
            t.wait_sites(&format!("region-{r}/admin@region-{r}"), sites);
        }
        t
    }
}

/// examples/hub-mnist with `args` replaced in its workflow.
fn hub_job(dir: &Path, args: Value) -> PathBuf {
    let src = root().join("examples/hub-mnist");
    let job = dir.join("hub-mnist");
    std::fs::create_dir_all(job.join("app/config")).unwrap();
    std::fs::copy(src.join("meta.json"), job.join("meta.json")).unwrap();
    std::fs::copy(
        src.join("app/config/config_fed_client.json"),
        job.join("app/config/config_fed_client.json"),
    )
    .unwrap();
    let mut server: Value = serde_json::from_slice(
        &std::fs::read(src.join("app/config/config_fed_server.json")).unwrap(),
    )
    .unwrap();
    server["workflows"][0]["args"] = args;
    std::fs::write(
        job.join("app/config/config_fed_server.json"),
        serde_json::to_vec_pretty(&server).unwrap(),
    )
    .unwrap();
    job
}

fn ended(st: &Value) -> bool {
    matches!(
        st["state"].as_str(),
        Some("finished" | "failed" | "aborted")
    )
}

#[test]
fn one_submit_at_tier_1_runs_the_job_in_every_region() {
    let t = Tiered::running(2, 3, 23_000);
    let tmp = tempfile::tempdir().unwrap();
    let job = hub_job(
        tmp.path(),
        serde_json::json!({"num_rounds": 2, "local_rounds": 2, "min_regions": 2,
            "min_clients": 3, "wait_time_after_min_received": 1, "task_timeout": 120}),
    );
    let submitted = t.admin_json(TIER1_ADMIN, &["submit", job.to_str().unwrap()]);
    let id = submitted["job_id"].as_str().unwrap().to_string();
    let st = t.wait_status(
        &id,
        "the tiered job did not end",
        Duration::from_secs(240),
        ended,
    );
    assert_eq!(st["state"], "finished", "{st}\n{}", t.logs());
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
        let list = t.admin_json(&format!("region-{r}/admin@region-{r}"), &["list"]);
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
    let dl = t.admin_json(
        TIER1_ADMIN,
        &["download", &id, "--output", out.to_str().unwrap()],
    );
    assert!(dl.to_string().contains("global_final.safetensors"), "{dl}");
}

fn notes(st: &Value) -> Vec<String> {
    st["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter_map(|e| e["note"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_killed_hub_leaves_its_rounds_to_the_other_region_and_rejoins_after_a_restart() {
    let mut t = Tiered::running(2, 3, 23_100);
    let tmp = tempfile::tempdir().unwrap();
    let job = hub_job(
        tmp.path(),
        // A long wait after the quorum: a round waits for the killed hub until tier 1 declares
        // its region away.
        serde_json::json!({"num_rounds": 20, "local_rounds": 1, "min_regions": 1,
            "min_clients": 3, "wait_time_after_min_received": 60, "task_timeout": 120}),
    );
    let submitted = t.admin_json(TIER1_ADMIN, &["submit", job.to_str().unwrap()]);
    let id = submitted["job_id"].as_str().unwrap().to_string();
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
            notes(st)
                .iter()
                .any(|n| n.contains("region region-2 is away"))
                || ended(st)
        },
    );
    assert!(!ended(&st), "the job ended with its hub gone: {st}");
    let away_after = killed.elapsed();
    assert!(
        away_after < Duration::from_secs(40),
        "declared away after {away_after:?}"
    );
    t.start("region-2/region-2");
    let st = t.wait_status(&id, "the job did not end", Duration::from_secs(300), ended);
    assert_eq!(st["state"], "finished", "{st}\n{}", t.logs());
    let history = notes(&st);
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
    let t = Tiered::running(2, 2, 23_200);
    let tmp = tempfile::tempdir().unwrap();
    // Many rounds, so the job is mid-way when it is aborted.
    let job = hub_job(
        tmp.path(),
        serde_json::json!({"num_rounds": 50, "local_rounds": 2, "min_regions": 2,
            "min_clients": 2, "wait_time_after_min_received": 1, "task_timeout": 120}),
    );
    let submitted = t.admin_json(TIER1_ADMIN, &["submit", job.to_str().unwrap()]);
    let id = submitted["job_id"].as_str().unwrap().to_string();
    t.wait_status(
        &id,
        "round 1 did not start",
        Duration::from_secs(120),
        |st| st["round"].as_u64().is_some_and(|r| r >= 1),
    );
    let asked = Instant::now();
    t.admin_json(TIER1_ADMIN, &["abort", &id]);
    // Tier 1 and both regions' jobs end aborted. A region's job reads as ended only after
    // its server told each of its sites to free the job and they answered.
    loop {
        let top = t.admin_json(TIER1_ADMIN, &["status", &id]);
        let regions: Vec<Value> = (1..=2)
            .map(|r| t.admin_json(&format!("region-{r}/admin@region-{r}"), &["status", &id]))
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
            t.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("every tier stopped {:?} after the abort", asked.elapsed());
}
