//! A tiered federation as real processes in network namespaces (issue #13), where tier 1 is
//! out of the sites' reach:
//!
//! - namespaces: tier 1 (`T`, the server and its admin), two hubs (`H1`, `H2`, each linked
//!   to `T` by its own veth pair) and three sites per hub, each linked only to its hub's
//!   namespace with its default route through it. The hub namespaces do not forward (and
//!   tier 1 has no route to the sites' links), so no site has a route to tier 1: the test
//!   proves it (a site's TCP connect to every address of the tier-1 server fails while the
//!   hub's own connect succeeds) before the hubs and sites start. Everything that a site does
//!   for the job therefore goes through its hub process.
//! - the kits come from one `project.yml` (`type: hub` participants with the hub-side
//!   addresses of their sites' links as `host_names`, `region:` sites and admins); each hub
//!   dials tier 1 at the server's `host_names`, one of which is unreachable from its
//!   namespace (the other hub's link).
//! - job 1: one submit at tier 1 of `examples/hub-mnist` (3 global rounds of 3 local ones, both
//!   regions needed) runs in every region, every `region-r.site-j` shows at tier 1, the result
//!   downloads in `T` and classifies held-out digits. The bytes on tier 1's two links (the
//!   kernel's counters of `T`'s veth ends, so every frame, headers and control traffic
//!   included), from just before the submit to the end of the job, are at most 1.3 × the
//!   models tier 1 has to move: per region one model down per global round plus one for the
//!   final validation (it sends the final model to be measured), one partial up per global
//!   round (the validation answer carries metrics only). The summary line prints them per
//!   global round against the floor of a flat job of the same sites, which has to send each
//!   of the N sites the model in each of its `local_rounds` rounds per global round.
//! - job 2: hub 2's process is killed after round 1 of a `min_regions: 1` job; tier 1 declares
//!   region-2 away and the job still finishes with region-1.
//!
//! Needs root and `ip netns`; skips (and says why) otherwise. Every name carries the test's
//! pid, only 10.x addresses inside the namespaces made here are used, and the namespaces
//! (with their veth pairs, made straight inside them) are deleted and the processes killed
//! when the test ends, also when it fails (as in `node/tests/netns.rs`).

#![allow(clippy::unwrap_used)]

#[path = "../../node/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::netns::{must, sh, skip_reason};
use common::{ended, held_out_accuracy, history_notes, hub_job, root};
use serde_json::Value;

/// Regions (hubs) and sites per region.
const REGIONS: usize = 2;
const SITES: usize = 3;
/// The tier-1 server's ports, and every hub's (in its own namespace).
const SERVER_PORT: u16 = 8002;
const SERVER_ADMIN_PORT: u16 = 8003;
const HUB_PORT: u16 = 8102;
const HUB_ADMIN_PORT: u16 = 8103;
const TIER1_ADMIN: &str = "admin@nvidia.com";

/// The namespaces, the kits and the node processes; Drop kills the processes, then deletes
/// the namespaces (which removes the veth pairs too).
///
/// Addresses (x from the pid): hub `r`'s link to tier 1 is `10.x.r.0/24` (tier 1 `.1`, the
/// hub `.2`); site `j` of hub `r` is linked to it by `10.x.(10r+j).0/24` (hub `.1`, site `.2`).
struct Lab {
    /// Tier 1's namespace.
    t: String,
    /// The hubs' namespaces, hub 1 first.
    hubs: Vec<String>,
    /// The sites' namespaces, by hub.
    sites: Vec<Vec<String>>,
    /// Tier 1's end of each hub's link, in hub order.
    t_links: Vec<String>,
    x: u32,
    made: Vec<String>,
    /// Each node's kit (relative to `prod`) and process.
    nodes: Vec<(String, Child)>,
    prod: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, c) in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.made {
            let _ = sh(&["ip", "netns", "del", n]);
        }
    }
}

/// Adds a veth pair between namespaces `a` (end `va`, address `.1` of `net`) and `b` (end
/// `vb`, `.2`), both up.
fn link(a: &str, va: &str, b: &str, vb: &str, net: &str) {
    // Made straight inside the two namespaces: nothing is ever added to the host's own.
    must(&[
        "ip", "-n", b, "link", "add", vb, "type", "veth", "peer", "name", va, "netns", a,
    ]);
    must(&[
        "ip",
        "-n",
        a,
        "addr",
        "add",
        &format!("{net}.1/24"),
        "dev",
        va,
    ]);
    must(&[
        "ip",
        "-n",
        b,
        "addr",
        "add",
        &format!("{net}.2/24"),
        "dev",
        vb,
    ]);
    must(&["ip", "-n", a, "link", "set", va, "up"]);
    must(&["ip", "-n", b, "link", "set", vb, "up"]);
}

impl Lab {
    fn new() -> Lab {
        let pid = std::process::id();
        // Interface names have at most 15 bytes: "fs" + hub + site + pid (≤ 7).
        let tag = pid.to_string();
        let mut lab = Lab {
            t: format!("flt1{tag}"),
            hubs: (1..=REGIONS).map(|r| format!("flh{r}{tag}")).collect(),
            sites: (1..=REGIONS)
                .map(|r| (1..=SITES).map(|j| format!("fls{r}{j}{tag}")).collect())
                .collect(),
            t_links: (1..=REGIONS).map(|r| format!("ft{r}{tag}")).collect(),
            x: 100 + pid % 100,
            made: Vec::new(),
            nodes: Vec::new(),
            prod: PathBuf::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        let all: Vec<String> = std::iter::once(lab.t.clone())
            .chain(lab.hubs.iter().cloned())
            .chain(lab.sites.iter().flatten().cloned())
            .collect();
        for ns in all {
            must(&["ip", "netns", "add", &ns]);
            lab.made.push(ns.clone());
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        let x = lab.x;
        for r in 1..=REGIONS {
            let hub = &lab.hubs[r - 1];
            link(
                &lab.t,
                &lab.t_links[r - 1],
                hub,
                &format!("fh{r}{tag}"),
                &format!("10.{x}.{r}"),
            );
            for j in 1..=SITES {
                let site = &lab.sites[r - 1][j - 1];
                let net = format!("10.{x}.{}", 10 * r + j);
                link(
                    hub,
                    &format!("fs{r}{j}{tag}"),
                    site,
                    &format!("fv{r}{j}{tag}"),
                    &net,
                );
                must(&[
                    "ip",
                    "-n",
                    site,
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("{net}.1"),
                ]);
            }
            // The hub does not route: its sites reach the hub's own addresses only.
            must(&[
                "ip",
                "netns",
                "exec",
                hub,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=0",
            ]);
        }
        lab.provision();
        lab
    }

    /// The tier-1 server's addresses, one on each hub's link.
    fn server_addrs(&self) -> Vec<String> {
        (1..=REGIONS)
            .map(|r| format!("10.{}.{r}.1", self.x))
            .collect()
    }

    /// Hub `r`'s addresses, one on each of its sites' links.
    fn hub_addrs(&self, r: usize) -> Vec<String> {
        (1..=SITES)
            .map(|j| format!("10.{}.{}.1", self.x, 10 * r + j))
            .collect()
    }

    /// The project: the server, its admin, and per region the hub, its sites and admin.
    fn provision(&mut self) {
        let mut yml = format!(
            "api_version: 3\nname: hub_netns\ndescription: tiered federation in namespaces\n\
             participants:\n  \
             - name: server\n    type: server\n    org: nvidia\n    host_names: [{}]\n    \
             listen_host: 0.0.0.0\n    fed_learn_port: {SERVER_PORT}\n    \
             admin_port: {SERVER_ADMIN_PORT}\n  \
             - name: {TIER1_ADMIN}\n    type: admin\n    org: nvidia\n    role: project_admin\n",
            self.server_addrs().join(", ")
        );
        for r in 1..=REGIONS {
            yml.push_str(&format!(
                "  - name: region-{r}\n    type: hub\n    org: nvidia\n    host_names: [{}]\n    \
                 listen_host: 0.0.0.0\n    fed_learn_port: {HUB_PORT}\n    \
                 admin_port: {HUB_ADMIN_PORT}\n",
                self.hub_addrs(r).join(", ")
            ));
            for j in 1..=SITES {
                yml.push_str(&format!(
                    "  - name: site-{j}\n    type: client\n    org: nvidia\n    \
                     region: region-{r}\n    port: 0\n"
                ));
            }
            yml.push_str(&format!(
                "  - name: admin@region-{r}\n    type: admin\n    org: nvidia\n    \
                 role: project_admin\n    region: region-{r}\n"
            ));
        }
        yml.push_str("builders: [workspace, static_files, certs, signature]\n");
        let project = flare_provision::project::Project::parse(&yml).unwrap();
        let out =
            flare_provision::builder::provision_now(&project, &self.dir.path().join("ws")).unwrap();
        self.prod = out.prod_dir;
    }

    /// Starts `flare-node --kit <kit>/startup` in namespace `ns`, its output to the kit's
    /// `log.txt`.
    fn start(&mut self, kit: &str, ns: &str) {
        let dir = self.prod.join(kit);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log.txt"))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(flare_node::node_bin())
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

    /// Kills the node of `kit` and reaps it.
    fn kill(&mut self, kit: &str) {
        let i = self.nodes.iter().position(|(k, _)| k == kit).unwrap();
        let (_, mut c) = self.nodes.remove(i);
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// The last lines of every node's log, for a failure message.
    fn logs(&self) -> String {
        let mut s = String::new();
        for (kit, _) in &self.nodes {
            let log =
                std::fs::read_to_string(self.prod.join(kit).join("log.txt")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            s.push_str(&format!("--- {kit}\n"));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// `flare-node admin --json args` with the admin kit `kit`, from namespace `ns`.
    fn admin_in(&self, ns: &str, kit: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(flare_node::node_bin())
            .arg("admin")
            .arg("--kit")
            .arg(self.prod.join(kit).join("startup"))
            .arg("--json")
            .args(args)
            .current_dir(root())
            .output()
            .unwrap()
    }

    fn admin_json_in(&self, ns: &str, kit: &str, args: &[&str]) -> Value {
        let out = self.admin_in(ns, kit, args);
        assert!(
            out.status.success(),
            "admin {args:?} ({kit}) failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The tier-1 admin, in `T`.
    fn admin_json(&self, args: &[&str]) -> Value {
        self.admin_json_in(&self.t.clone(), TIER1_ADMIN, args)
    }

    /// Waits until the server that admin kit `kit` reaches (from `ns`) answers and has `n`
    /// sites.
    fn wait_sites(&self, ns: &str, kit: &str, n: usize) {
        let start = Instant::now();
        loop {
            let out = self.admin_in(ns, kit, &["sites"]);
            let sites = serde_json::from_slice::<Value>(&out.stdout).ok();
            if out.status.success()
                && sites
                    .as_ref()
                    .and_then(Value::as_array)
                    .is_some_and(|s| s.len() >= n)
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{kit} (from {ns}) did not answer with {n} sites: {sites:?} {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Polls tier 1's status of `job` until `ok` holds; fails after `timeout`, saying `what`.
    fn wait_status(
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
                "{what} within {timeout:?}: {st}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Bytes (sent, received) by tier 1 on each hub's link, from the kernel's counters of
    /// `T`'s veth ends: every frame, headers included.
    fn tier1_bytes(&self) -> Vec<(u64, u64)> {
        self.t_links
            .iter()
            .map(|l| {
                let out = sh(&["ip", "-n", &self.t, "-s", "-j", "link", "show", "dev", l]);
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                let s = &v[0]["stats64"];
                (
                    s["tx"]["bytes"].as_u64().unwrap(),
                    s["rx"]["bytes"].as_u64().unwrap(),
                )
            })
            .collect()
    }
}

/// Whether a TCP connect from namespace `ns` to `addr:port` succeeds within 2 s; started, so
/// that many probes run at once.
fn tcp_probe(ns: &str, addr: &str, port: u16) -> Child {
    Command::new("ip")
        .args(["netns", "exec", ns, "timeout", "2", "bash", "-c"])
        .arg(r#"exec 3<>"/dev/tcp/$0/$1""#)
        .args([addr, &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits for each probe (what it tried, whether it should connect) and checks its outcome.
fn check_probes(probes: Vec<(String, bool, Child)>, port: u16) {
    for (what, want, mut p) in probes {
        let connected = p.wait().unwrap().success();
        assert_eq!(
            connected, want,
            "TCP connect {what}:{port}: connected {connected}, expected {want}"
        );
    }
}

/// Every file under `dir` named `name`.
fn find(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            found.extend(find(&p, name));
        } else if p.file_name().is_some_and(|n| n == name) {
            found.push(p);
        }
    }
    found
}

#[test]
fn tiered_federation_across_namespaces_with_tier_1_out_of_the_sites_reach() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping the network-namespace test: {why}");
        return;
    }
    let started = Instant::now();
    let mut lab = Lab::new();
    let t = lab.t.clone();

    // Tier 1 first: its admin, in T, gets an answer.
    lab.start("server", &t);
    lab.wait_sites(&t, TIER1_ADMIN, 0);

    // No route from a site to tier 1: a TCP connect to each of the server's addresses fails
    // from every site. A hub's namespace reaches the server on its own link only.
    let server_addrs = lab.server_addrs();
    let mut probes = Vec::new();
    for (r, hub) in lab.hubs.iter().enumerate() {
        for (i, a) in server_addrs.iter().enumerate() {
            probes.push((
                format!("{hub} -> {a}"),
                i == r,
                tcp_probe(hub, a, SERVER_PORT),
            ));
        }
        for site in &lab.sites[r] {
            for a in &server_addrs {
                probes.push((
                    format!("{site} -> {a}"),
                    false,
                    tcp_probe(site, a, SERVER_PORT),
                ));
            }
        }
    }
    check_probes(probes, SERVER_PORT);

    // The hubs (in their namespaces) reach tier 1; then the sites reach their hubs.
    for r in 1..=REGIONS {
        let ns = lab.hubs[r - 1].clone();
        lab.start(&format!("region-{r}/region-{r}"), &ns);
    }
    lab.wait_sites(&t, TIER1_ADMIN, REGIONS);
    for r in 1..=REGIONS {
        for j in 1..=SITES {
            let ns = lab.sites[r - 1][j - 1].clone();
            lab.start(&format!("region-{r}/site-{j}"), &ns);
        }
    }
    for r in 1..=REGIONS {
        let ns = lab.hubs[r - 1].clone();
        lab.wait_sites(&ns, &format!("region-{r}/admin@region-{r}"), SITES);
    }
    // The same probe from a site does connect to its hub.
    let probes = (1..=REGIONS)
        .flat_map(|r| {
            let a = lab.hub_addrs(r)[0].clone();
            lab.sites[r - 1].iter().map(move |site| {
                (
                    format!("{site} -> {a}"),
                    true,
                    tcp_probe(site, &a, HUB_PORT),
                )
            })
        })
        .collect();
    check_probes(probes, HUB_PORT);
    let connected = started.elapsed();

    // Job 1: one submit at tier 1, both regions needed, 3 global rounds of 3 local ones.
    let (g, k) = (3u32, 3u32);
    let tmp = tempfile::tempdir().unwrap();
    let job = hub_job(
        tmp.path(),
        "tiered",
        serde_json::json!({"num_rounds": g, "local_rounds": k, "min_regions": REGIONS,
            "min_clients": SITES, "wait_time_after_min_received": 1, "task_timeout": 120}),
    );
    let before = lab.tier1_bytes();
    let submitted = Instant::now();
    let id = lab.admin_json(&["submit", job.to_str().unwrap()])["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = lab.admin_in(&t, TIER1_ADMIN, &["wait", &id, "--timeout", "150"]);
    let after = lab.tier1_bytes();
    let ran = submitted.elapsed();
    assert!(
        out.status.success(),
        "the tiered job did not end: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        lab.logs()
    );
    let st = lab.admin_json(&["status", &id]);
    assert_eq!(st["state"], "finished", "{st}\n{}", lab.logs());
    let sites = st["sites"].as_object().unwrap();
    for r in 1..=REGIONS {
        for j in 1..=SITES {
            let name = format!("region-{r}.site-{j}");
            assert!(sites.contains_key(&name), "{name} missing from {st}");
        }
    }
    let last = st["metrics"][g.to_string()]["accuracy"]
        .as_f64()
        .unwrap_or_else(|| panic!("the final model was not measured: {st}"));
    assert!(last > 0.85, "final accuracy {last}: {st}");

    // The result downloads in T, and the model in it classifies held-out digits.
    let out = tmp.path().join("download");
    let dl = lab.admin_json(&["download", &id, "--output", out.to_str().unwrap()]);
    let finals = find(&out, "global_final.safetensors");
    assert_eq!(finals.len(), 1, "{dl}: {finals:?}");
    let model = std::fs::metadata(&finals[0]).unwrap().len();
    let held_out = held_out_accuracy(&finals[0]);
    assert!(
        held_out > 0.85,
        "held-out accuracy of the download {held_out}"
    );
    println!(
        "job 1: final accuracy {last:.4} at tier 1, {held_out:.4} of the downloaded \
         global_final.safetensors on held-out digits"
    );

    // Tier 1's traffic, per direction, against the models it has to move: per region, one
    // model down per global round and one for the final validation, one partial up per global
    // round.
    let (rr, gg) = (REGIONS as u64, u64::from(g));
    let per_link: Vec<(u64, u64)> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a.0 - b.0, a.1 - b.1))
        .collect();
    let down: u64 = per_link.iter().map(|l| l.0).sum();
    let up: u64 = per_link.iter().map(|l| l.1).sum();
    let models = |b: u64| b as f64 / model as f64;
    let need_down = rr * (gg + 1);
    let need_up = rr * gg;
    let flat_floor = REGIONS * SITES * k as usize;
    for (r, (d, u)) in per_link.iter().enumerate() {
        println!(
            "tier-1 link of region-{}: {d} bytes down ({:.2} models), {u} up ({:.2} models)",
            r + 1,
            models(*d),
            models(*u)
        );
    }
    println!(
        "model (global_final.safetensors) {model} bytes; job 1 ran {:.1} s ({g} global rounds \
         of {k} local ones); tier 1 moved {down} bytes down = {:.2} models (needs {need_down}: \
         {g} rounds + the final validation, per region) and {up} up = {:.2} models (needs \
         {need_up}): {:.3}x and {:.3}x of what it has to move",
        ran.as_secs_f64(),
        models(down),
        models(up),
        models(down) / need_down as f64,
        models(up) / need_up as f64,
    );
    println!(
        "tier-1 traffic: {:.2} models/global round down ({:.2} without the final validation's \
         {REGIONS}), {:.2} up (R={REGIONS}); flat floor N×local_rounds = {flat_floor} each way \
         ({:.1}x the tiered down, {:.1}x the up)",
        models(down) / gg as f64,
        models(down.saturating_sub(rr * model)) / gg as f64,
        models(up) / gg as f64,
        flat_floor as f64 / (models(down) / gg as f64),
        flat_floor as f64 / (models(up) / gg as f64),
    );
    // The counters saw the job: each link carried its region's models each way.
    for (r, (d, u)) in per_link.iter().enumerate() {
        assert!(
            *d >= (gg + 1) * model && *u >= gg * model,
            "region-{}'s link carried {d} bytes down and {u} up for {g} rounds of a \
             {model}-byte model",
            r + 1
        );
    }
    assert!(
        models(down) <= 1.3 * need_down as f64,
        "tier 1 sent {:.2} models for {need_down} model sends",
        models(down)
    );
    assert!(
        models(up) <= 1.3 * need_up as f64,
        "tier 1 received {:.2} models for {need_up} partials",
        models(up)
    );

    // Job 2: hub 2 is killed mid-job; with `min_regions: 1` the job still finishes. A round
    // waits for the killed hub (a long wait after the quorum) until tier 1 declares its
    // region away.
    let job = hub_job(
        tmp.path(),
        "one-region",
        serde_json::json!({"num_rounds": 6, "local_rounds": 1, "min_regions": 1,
            "min_clients": SITES, "wait_time_after_min_received": 30, "task_timeout": 120}),
    );
    let submitted = Instant::now();
    let id = lab.admin_json(&["submit", job.to_str().unwrap()])["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let st = lab.wait_status(
        &id,
        "round 1 did not start",
        Duration::from_secs(90),
        |st| ended(st) || st["round"].as_u64().is_some_and(|r| r >= 1),
    );
    assert!(!ended(&st), "job 2 ended before hub 2 was killed: {st}");
    let killed = Instant::now();
    lab.kill(&format!("region-{REGIONS}/region-{REGIONS}"));
    let st = lab.wait_status(
        &id,
        "job 2 did not end after hub 2 was killed",
        Duration::from_secs(120),
        ended,
    );
    assert_eq!(st["state"], "finished", "{st}\n{}", lab.logs());
    let history = history_notes(&st);
    assert!(
        history
            .iter()
            .any(|n| n.contains(&format!("region region-{REGIONS} is away"))),
        "no note of region-{REGIONS} away: {history:?}"
    );
    assert!(
        st["metrics"]["6"]["accuracy"].as_f64().is_some(),
        "the final model of job 2 was not measured: {st}"
    );
    println!(
        "job 2: hub region-{REGIONS} killed {:.1} s after the submit, the job finished {:.1} s \
         later with region-1; nodes connected in {:.1} s; the test took {:.1} s",
        (killed - submitted).as_secs_f64(),
        killed.elapsed().as_secs_f64(),
        connected.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
