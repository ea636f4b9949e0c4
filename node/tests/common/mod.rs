//! The process-test harness shared by `federation.rs` and `faults/`: a federation of a server
//! and client sites as separate `flare-node` processes started from provisioned POC kits on
//! 127.0.0.1, driven with the admin console as a user would.

#![allow(clippy::unwrap_used, dead_code)]

pub(crate) mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use flare_node::data::Dataset;
use flare_node::learner::mlp::Mlp;
use serde_json::Value;

pub(crate) fn bin() -> PathBuf {
    flare_node::node_bin()
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

pub(crate) struct Federation {
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) prod: PathBuf,
    pub(crate) nodes: Vec<(String, Child)>,
}

impl Drop for Federation {
    fn drop(&mut self) {
        for (_, c) in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Federation {
    /// Tests run in parallel: each federation gets its own port range.
    pub(crate) fn prepare(clients: usize, base_port: u16) -> Federation {
        Federation::prepare_with(&["-n", &clients.to_string()], base_port)
    }

    /// `poc prepare <args>` (`--regions 2 -n 3`, say) on its own port range.
    pub(crate) fn prepare_with(args: &[&str], base_port: u16) -> Federation {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("poc");
        let out = Command::new(bin())
            .args(["poc", "prepare"])
            .args(args)
            .args(["--base-port", &base_port.to_string(), "-w"])
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
        Federation {
            _dir: dir,
            prod,
            nodes: Vec::new(),
        }
    }

    pub(crate) fn start(&mut self, name: &str) {
        let dir = self.prod.join(name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log.txt"))
            .unwrap();
        let child = Command::new(bin())
            .arg("--kit")
            .arg(dir.join("startup"))
            .current_dir(root())
            .env("RUST_LOG", "info,flare_node::roles::workflow=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.nodes.push((name.to_string(), child));
    }

    /// A prepared federation with the server and every site started and connected.
    pub(crate) fn running(sites: usize, port: u16) -> Federation {
        let mut f = Federation::prepare(sites, port);
        f.start("server");
        for i in 1..=sites {
            f.start(&format!("site-{i}"));
        }
        f.wait_sites(sites);
        f
    }

    /// Submits the job folder `dir` and returns the job id.
    pub(crate) fn submit(&self, dir: &str) -> String {
        self.admin_json(&["submit", dir])["job_id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub(crate) fn kill(&mut self, name: &str) {
        let i = self.nodes.iter().position(|(n, _)| n == name).unwrap();
        let (_, mut c) = self.nodes.remove(i);
        c.kill().unwrap();
        c.wait().unwrap();
    }

    pub(crate) fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.prod.join(name).join("log.txt")).unwrap_or_default()
    }

    /// The last `lines` lines of every node's log, for a failure message.
    pub(crate) fn log_tails(&self, lines: usize) -> String {
        let mut s = String::new();
        for (kit, _) in &self.nodes {
            let log = self.log(kit);
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            s.push_str(&format!("--- {kit}\n"));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    pub(crate) fn admin(&self, args: &[&str]) -> Output {
        self.admin_as("admin@nvidia.com", args)
    }

    /// `admin --json <args>` with the admin kit `prod_00/<kit>` (a region's admin, say).
    pub(crate) fn admin_as(&self, kit: &str, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("admin")
            .arg("--kit")
            .arg(self.prod.join(kit).join("startup"))
            .arg("--json")
            .args(args)
            .current_dir(root())
            .output()
            .unwrap()
    }

    pub(crate) fn admin_json(&self, args: &[&str]) -> Value {
        self.admin_as_json("admin@nvidia.com", args)
    }

    /// [`Federation::admin_as`], its output parsed; fails with the server's log.
    pub(crate) fn admin_as_json(&self, kit: &str, args: &[&str]) -> Value {
        let out = self.admin_as(kit, args);
        assert!(
            out.status.success(),
            "admin {args:?} failed: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log("server")
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub(crate) fn wait_sites(&self, n: usize) {
        self.wait_sites_as("admin@nvidia.com", n);
    }

    /// Waits until the server that the admin kit `prod_00/<kit>` reaches has `n` sites.
    pub(crate) fn wait_sites_as(&self, kit: &str, n: usize) {
        let start = Instant::now();
        loop {
            let sites = self.admin_as_json(kit, &["sites"]);
            if sites.as_array().unwrap().len() >= n {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "sites did not connect: {sites}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub(crate) fn wait_round(&self, job: &str, round: u64) {
        let start = Instant::now();
        loop {
            let st = self.admin_json(&["status", job]);
            if st["round"].as_u64().is_some_and(|r| r >= round) {
                return;
            }
            assert!(
                !matches!(st["state"].as_str(), Some("failed" | "aborted")),
                "job ended early: {st}"
            );
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "job stuck: {st}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A copy of hello-fedavg with `rounds` rounds and a short wait after the quorum.
pub(crate) fn job_copy(dir: &Path, rounds: u32, wait_s: u32) -> PathBuf {
    let src = root().join("examples/hello-fedavg");
    let job = dir.join(format!("fedavg-{rounds}"));
    std::fs::create_dir_all(job.join("app/config")).unwrap();
    std::fs::copy(src.join("meta.json"), job.join("meta.json")).unwrap();
    std::fs::copy(
        src.join("app/config/config_fed_client.json"),
        job.join("app/config/config_fed_client.json"),
    )
    .unwrap();
    let server = std::fs::read_to_string(src.join("app/config/config_fed_server.json"))
        .unwrap()
        .replace("\"num_rounds\": 5", &format!("\"num_rounds\": {rounds}"))
        .replace(
            "\"wait_time_after_min_received\": 10",
            &format!("\"wait_time_after_min_received\": {wait_s}"),
        );
    std::fs::write(job.join("app/config/config_fed_server.json"), server).unwrap();
    job
}

/// A copy of examples/hub-mnist (a tiered job) named `name`, with `args` as its workflow's
/// arguments.
pub(crate) fn hub_job(dir: &Path, name: &str, args: Value) -> PathBuf {
    let src = root().join("examples/hub-mnist");
    let job = dir.join(name);
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

pub(crate) fn held_out_accuracy(model: &Path) -> f64 {
    let m = flare_node::model_io::read(model).unwrap();
    let net = Mlp::from_model(&m, 64).unwrap();
    let (_, test) = Dataset::load_mnist_test(&root().join("data/mnist"))
        .unwrap()
        .split(2000, 0);
    net.evaluate(&test)["accuracy"]
}

/// A copy of swarm-mnist with `rounds` rounds and `epochs` local epochs (slower rounds).
pub(crate) fn swarm_copy(dir: &Path, rounds: u32, epochs: u32) -> PathBuf {
    example_copy(dir, "swarm-mnist", 5, rounds, epochs)
}

/// A copy of `examples/<name>` (shipped with `shipped_rounds` rounds and 2 local epochs)
/// with `rounds` rounds of `epochs` local epochs.
pub(crate) fn example_copy(
    dir: &Path,
    name: &str,
    shipped_rounds: u32,
    rounds: u32,
    epochs: u32,
) -> PathBuf {
    let src = root().join("examples").join(name);
    let job = dir.join(format!("{name}-{rounds}"));
    std::fs::create_dir_all(job.join("app/config")).unwrap();
    std::fs::copy(src.join("meta.json"), job.join("meta.json")).unwrap();
    let client = std::fs::read_to_string(src.join("app/config/config_fed_client.json"))
        .unwrap()
        .replace("\"epochs\": 2", &format!("\"epochs\": {epochs}"));
    std::fs::write(job.join("app/config/config_fed_client.json"), client).unwrap();
    let server = std::fs::read_to_string(src.join("app/config/config_fed_server.json"))
        .unwrap()
        .replace(
            &format!("\"num_rounds\": {shipped_rounds}"),
            &format!("\"num_rounds\": {rounds}"),
        );
    std::fs::write(job.join("app/config/config_fed_server.json"), server).unwrap();
    job
}

/// The aggregator every site computes for round `round` (attempt 0) of `job`.
pub(crate) fn swarm_aggregator(job_dir: &Path, job_id: &str, round: u32) -> String {
    let job = flare_node::job::Job::load(job_dir).unwrap();
    let flare_node::job::WorkflowSpec::Swarm(args) = &job.server.workflow else {
        panic!("not a swarm job");
    };
    let names: Vec<String> = (1..=3).map(|i| format!("site-{i}")).collect();
    let cfg = args
        .to_config(&names, flare_node::simulator::seed_of(job_id))
        .unwrap();
    cfg.aggregator(flare_protocols::workflows::ccwf::Epoch::new(round, 0))
        .to_string()
}

/// Puts DP-FedAvg (fixed clipping at 0.5, ε 8 at δ 1e-5 over the run) in place of the
/// aggregator of the job in `job`.
pub(crate) fn use_dp_aggregator(job: &Path) {
    let server = job.join("app/config/config_fed_server.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&server).unwrap()).unwrap();
    for comp in c["components"].as_array_mut().unwrap() {
        if comp["id"] == "aggregator" {
            *comp = serde_json::json!({
                "id": "aggregator",
                "name": "DifferentialPrivacyServerSideFixedClipping",
                "args": { "target_epsilon": 8.0, "clipping_norm": 0.5, "target_delta": 1e-5 }
            });
        }
    }
    std::fs::write(&server, c.to_string()).unwrap();
}

/// The notes of a job status's history, oldest first.
pub(crate) fn history_notes(st: &Value) -> Vec<String> {
    st["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["note"].as_str().unwrap().to_string())
        .collect()
}

/// Whether a job status is an end state.
pub(crate) fn ended(st: &Value) -> bool {
    matches!(
        st["state"].as_str(),
        Some("finished" | "failed" | "aborted")
    )
}

impl Federation {
    /// Polls `job`'s status until `ok` holds and returns it; fails after `timeout`, saying
    /// `what` with the status and the server's log.
    pub(crate) fn wait_status(
        &self,
        job: &str,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            let st = self.admin_json(&["status", job]);
            if ok(&st) {
                return st;
            }
            assert!(
                started.elapsed() < timeout,
                "{what}: {st}\nserver:\n{}",
                self.log("server")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}
