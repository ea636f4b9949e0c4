//! Sites in separate network namespaces, each linked only to the server's namespace:
//!
//! - two sites exchange a sealed multi-MiB payload: through the server's circuit relay when
//!   they cannot route to each other (proven by the relay's circuit counter), and directly once
//!   the server namespace forwards between them;
//! - three sites that cannot route to each other run a swarm job to the end through the relay,
//!   while tcpdump records every packet on the server's links; no 32-byte window of any model
//!   the sites exchanged appears in the capture.
//!
//! Needs root and `ip netns`; skips (and says why) otherwise. The swarm test also needs
//! `tcpdump` (`.ci/run` installs it) and fails, saying so, without it. Recipe:
//! /work/shared/NETWORK.md. Every name carries the test's pid and a per-lab number, and only
//! 10.x addresses inside the namespaces made here are used. The namespaces are deleted and the
//! processes killed when a test ends, also when it fails. The tests take turns (one lab at a
//! time): each runs several processes on a 2-core machine.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

mod common;

use common::netns::{must, sh, skip_reason};
use serde_json::Value;

const MIB: u64 = 16;

fn bin() -> PathBuf {
    flare_node::node_bin()
}

/// One lab at a time: each test runs a server and several sites on a 2-core machine.
static ONE_LAB: Mutex<()> = Mutex::new(());
/// Labs made by this process, so two labs never share a name.
static LABS: AtomicU32 = AtomicU32::new(0);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// The namespaces and the processes in them; Drop stops the processes, then deletes the
/// namespaces (which removes the veth pairs too).
struct Lab {
    srv: String,
    /// The sites' namespaces; site `i` (from 0) is linked to the server by `10.x.(i+1).0/24`,
    /// the server at `.1`, the site at `.2`.
    sites: Vec<String>,
    /// The server's end of each site's link, in site order.
    srv_links: Vec<String>,
    /// The second octet of every address here.
    x: u32,
    made: Vec<String>,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.made {
            let _ = sh(&["ip", "netns", "del", n]);
        }
    }
}

impl Lab {
    /// A server namespace and `n` site namespaces, each site linked to the server only; the
    /// server does not forward between them.
    fn new(n: usize) -> Lab {
        assert!((1..=9).contains(&n));
        let pid = std::process::id();
        // Interface names have at most 15 bytes: "fs" + site + pid (≤ 7) + lab number.
        let tag = format!("{pid}{}", LABS.fetch_add(1, Ordering::Relaxed) % 10);
        let mut lab = Lab {
            srv: format!("flsrv{tag}"),
            sites: (1..=n).map(|i| format!("fl{i}n{tag}")).collect(),
            srv_links: (1..=n).map(|i| format!("fs{i}{tag}")).collect(),
            x: 100 + pid % 100,
            made: Vec::new(),
            children: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        let all: Vec<String> = std::iter::once(lab.srv.clone())
            .chain(lab.sites.iter().cloned())
            .collect();
        for ns in all {
            must(&["ip", "netns", "add", &ns]);
            lab.made.push(ns.clone());
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        let x = lab.x;
        let srv = lab.srv.clone();
        for (k, (c, vs)) in lab.sites.iter().zip(&lab.srv_links).enumerate() {
            let i = k + 1;
            let vc = format!("fv{i}{tag}");
            // Each veth pair is created straight inside its two namespaces, so nothing is
            // ever added to the host's own namespace.
            must(&[
                "ip", "-n", c, "link", "add", &vc, "type", "veth", "peer", "name", vs, "netns",
                &srv,
            ]);
            must(&[
                "ip",
                "-n",
                &srv,
                "addr",
                "add",
                &format!("10.{x}.{i}.1/24"),
                "dev",
                vs,
            ]);
            must(&[
                "ip",
                "-n",
                c,
                "addr",
                "add",
                &format!("10.{x}.{i}.2/24"),
                "dev",
                &vc,
            ]);
            must(&["ip", "-n", &srv, "link", "set", vs, "up"]);
            must(&["ip", "-n", c, "link", "set", &vc, "up"]);
            must(&[
                "ip",
                "-n",
                c,
                "route",
                "add",
                "default",
                "via",
                &format!("10.{x}.{i}.1"),
            ]);
        }
        lab.forward(false);
        lab
    }

    /// Whether the server namespace routes between the sites.
    fn forward(&self, on: bool) {
        let v = format!("net.ipv4.ip_forward={}", u8::from(on));
        must(&["ip", "netns", "exec", &self.srv, "sysctl", "-qw", &v]);
    }

    /// Provisions the server, the admin and `names` (one site per namespace, in order). With
    /// `port`, site `i` listens on its own link address (`10.x.(i+1).2:port`), which is what
    /// it tells the server and so the other sites; without, on any free port of 0.0.0.0.
    fn project(&self, names: &[&str], port: Option<u16>) -> PathBuf {
        assert_eq!(names.len(), self.sites.len());
        let x = self.x;
        let hosts: Vec<String> = (1..=names.len()).map(|i| format!("10.{x}.{i}.1")).collect();
        let mut yml = format!(
            "api_version: 3\nname: netns_project\ndescription: netns test\nparticipants:\n  \
             - name: server\n    type: server\n    org: nvidia\n    \
             host_names: [{}]\n    listen_host: 0.0.0.0\n    \
             fed_learn_port: 8002\n    admin_port: 8003\n",
            hosts.join(", ")
        );
        for (k, name) in names.iter().enumerate() {
            yml.push_str(&format!(
                "  - name: {name}\n    type: client\n    org: nvidia\n"
            ));
            match port {
                Some(p) => yml.push_str(&format!(
                    "    listen_host: 10.{x}.{}.2\n    port: {p}\n",
                    k + 1
                )),
                None => yml.push_str("    port: 0\n"),
            }
        }
        yml.push_str(
            "  - name: admin@nvidia.com\n    type: admin\n    org: nvidia\n    role: project_admin\n\
             builders: [workspace, static_files, certs, signature]\n",
        );
        let project = flare_provision::project::Project::parse(&yml).unwrap();
        let out =
            flare_provision::builder::provision_now(&project, &self.dir.path().join("ws")).unwrap();
        out.prod_dir
    }

    /// Runs `program args` in namespace `ns` (from the repository root), stderr (and stdout
    /// unless `piped`) to `log`; returns its index in `children`.
    fn spawn_cmd(
        &mut self,
        ns: &str,
        program: &Path,
        args: &[&str],
        log: &Path,
        piped: bool,
    ) -> usize {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .current_dir(root())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(if piped {
                Stdio::piped()
            } else {
                Stdio::from(log.try_clone().unwrap())
            })
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.len() - 1
    }

    /// Runs `flare-node args` in namespace `ns` (see [`Lab::spawn_cmd`]).
    fn spawn(&mut self, ns: &str, args: &[&str], log: &Path, piped: bool) -> usize {
        self.spawn_cmd(ns, &bin(), args, log, piped)
    }

    /// JSON lines from a child's stdout, read on a thread so a hang becomes a timeout.
    fn lines(&mut self, i: usize) -> mpsc::Receiver<Value> {
        let out = self.children[i].stdout.take().unwrap();
        let (tx, rx) = mpsc::sync_channel(16);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
                    let _ = tx.send(v);
                }
            }
        });
        rx
    }

    /// `flare-node admin --json args` from the server's namespace.
    fn admin(&self, prod: &Path, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.srv])
            .arg(bin())
            .arg("admin")
            .arg("--kit")
            .arg(prod.join("admin@nvidia.com/startup"))
            .arg("--json")
            .args(args)
            .current_dir(root())
            .output()
            .unwrap()
    }

    fn admin_json(&self, prod: &Path, args: &[&str]) -> Value {
        let out = self.admin(prod, args);
        assert!(
            out.status.success(),
            "admin {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn circuits_opened(&self, prod: &Path) -> u64 {
        self.admin_json(prod, &["status"])["relay_circuits_opened"]
            .as_u64()
            .unwrap()
    }

    /// Starts the server and waits until the admin console gets an answer; returns the relay
    /// circuits opened so far.
    fn start_server(&mut self, prod: &Path) -> u64 {
        let server_log = self.dir.path().join("server.log");
        let srv = self.srv.clone();
        let kit = prod.join("server/startup").display().to_string();
        self.spawn(&srv, &["--kit", &kit], &server_log, false);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.admin(prod, &["status"]).status.success() {
                return self.circuits_opened(prod);
            }
            assert!(
                Instant::now() < deadline,
                "server did not come up:\n{}",
                log_of(&server_log)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills child `i` and reaps it.
    fn kill(&mut self, i: usize) {
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
    }

    /// Sends SIGINT to child `i` (tcpdump then writes out what it holds and its counts) and
    /// waits up to 10 s for it to exit.
    fn interrupt(&mut self, i: usize) {
        let pid = self.children[i].id().to_string();
        must(&["kill", "-INT", &pid]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.children[i].try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "pid {pid} ignored SIGINT");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `log` without terminal colour codes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn log_of(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// One transfer from site-a to site-b; returns (sender, receiver) reports.
fn transfer(lab: &mut Lab, prod: &Path, tag: &str, give_direct: bool) -> (Value, Value) {
    let logs = lab.dir.path().to_path_buf();
    let kit = |n: &str| prod.join(n).join("startup").display().to_string();
    let mib = MIB.to_string();
    let rx_log = logs.join(format!("{tag}-receiver.log"));
    let (ka, kb) = (kit("site-a"), kit("site-b"));
    let r = lab.spawn(
        &lab.sites[1].clone(),
        &[
            "bench",
            "transfer-peer",
            "--receive",
            "--relay",
            "--mib",
            &mib,
            "--listen",
            "/ip4/0.0.0.0/tcp/0",
            "--kit",
            &kb,
        ],
        &rx_log,
        true,
    );
    let rx = lab.lines(r);
    let ready = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("receiver not ready:\n{}", log_of(&rx_log)));
    let mut args: Vec<String> = [
        "bench",
        "transfer-peer",
        "--mib",
        &mib,
        "--listen",
        "/ip4/0.0.0.0/tcp/0",
        "--kit",
        &ka,
        "--to",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    args.push(ready["peer"].as_str().unwrap().to_string());
    for a in ready["addrs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|_| give_direct)
    {
        args.push("--addr".into());
        args.push(a.as_str().unwrap().to_string());
    }
    args.push("--circuit".into());
    args.push(ready["circuit"].as_str().unwrap().to_string());
    let tx_log = logs.join(format!("{tag}-sender.log"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = lab.spawn(&lab.sites[0].clone(), &args, &tx_log, true);
    let txl = lab.lines(s);
    let fail = |what: &str| -> String {
        format!(
            "{what}\nsender log:\n{}\nreceiver log:\n{}",
            log_of(&tx_log),
            log_of(&rx_log)
        )
    };
    let sent = txl
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("{}", fail("no sender report")));
    let got = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{}", fail("no receiver report")));
    println!("{tag}: ready {ready}\n{tag}: sender {sent}\n{tag}: receiver {got}");
    (sent, got)
}

#[test]
fn sites_without_a_route_use_the_relay_and_with_one_go_direct() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping the network-namespace test: {why}");
        return;
    }
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut lab = Lab::new(2);
    let prod = lab.project(&["site-a", "site-b"], None);
    let server_log = lab.dir.path().join("server.log");
    let before = lab.start_server(&prod);

    // (a) No route between the sites: the direct dial fails, the relay carries the payload.
    let (sent, got) = transfer(&mut lab, &prod, "no-route", true);
    let after_relay = lab.circuits_opened(&prod);
    println!("relay circuits opened: {before} before, {after_relay} after the relayed transfer");
    // The payload plus the sealing overhead (headers and tags).
    assert!(got["bytes"].as_u64().unwrap() >= MIB << 20, "{got}");
    assert_eq!(got["bytes"], sent["bytes"]);
    assert_eq!(got["relayed"], Value::Bool(true), "receiver: {got}");
    assert_eq!(sent["relayed"], Value::Bool(true), "sender: {sent}");
    assert!(
        sent["conn_addr"]
            .as_str()
            .unwrap()
            .contains("/p2p-circuit/"),
        "{sent}"
    );
    assert!(
        !got["conn_addr"].as_str().unwrap().contains("/tcp/"),
        "{got}"
    );
    assert!(
        after_relay > before,
        "the relay opened no circuit:\n{}",
        log_of(&server_log)
    );

    // (b) The server namespace now routes between them: the transfer goes direct, and the
    // relay opens no new circuit.
    lab.forward(true);
    let (sent, got) = transfer(&mut lab, &prod, "routed", true);
    let after_direct = lab.circuits_opened(&prod);
    println!("relay circuits opened: {after_direct} after the direct transfer");
    // The payload plus the sealing overhead (headers and tags).
    assert!(got["bytes"].as_u64().unwrap() >= MIB << 20, "{got}");
    assert_eq!(got["bytes"], sent["bytes"]);
    assert_eq!(got["relayed"], Value::Bool(false), "receiver: {got}");
    assert_eq!(sent["relayed"], Value::Bool(false), "sender: {sent}");
    assert!(
        got["conn_addr"]
            .as_str()
            .unwrap()
            .contains(&format!("/ip4/10.{}.1.2/", lab.x)),
        "{got}"
    );
    assert_eq!(
        after_direct, after_relay,
        "a direct transfer opened a circuit"
    );

    // (c) Routed, but the sender knows only the circuit: it connects through the relay, DCUtR
    // brings a direct connection, and the relayed one is closed before the payload flows.
    let (sent, got) = transfer(&mut lab, &prod, "hole-punch", false);
    let after_punch = lab.circuits_opened(&prod);
    println!("relay circuits opened: {after_punch} after the hole-punched transfer");
    assert!(after_punch > after_direct, "no circuit was opened first");
    assert_eq!(got["relayed"], Value::Bool(false), "receiver: {got}");
    assert_eq!(sent["relayed"], Value::Bool(false), "sender: {sent}");
    assert!(
        !sent["conn_addr"].as_str().unwrap().contains("p2p-circuit"),
        "{sent}"
    );
    println!("netns test took {:.1} s", started.elapsed().as_secs_f64());
}

/// The length of the model windows searched for in the capture.
const WINDOW: usize = 32;

/// Byte windows of plaintext to look for in a capture: every [`WINDOW`]-byte window of the
/// data given, at offsets that are multiples of [`WINDOW`], so any stretch of
/// `2 * WINDOW - 1` bytes of it contains one whole window. Windows of few distinct bytes (runs
/// of zeros, repeated values) are left out: they could match anything.
#[derive(Default)]
struct Needles {
    by_prefix: HashMap<u64, Vec<[u8; WINDOW]>>,
    /// A 2^24-bit filter on the first 8 bytes, so most offsets of the haystack cost one load.
    filter: Vec<u64>,
    count: usize,
    skipped: usize,
}

impl Needles {
    fn slot(prefix: u64) -> usize {
        (prefix.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize
    }

    fn add(&mut self, data: &[u8]) {
        if self.filter.is_empty() {
            self.filter = vec![0; (1 << 24) / 64];
        }
        for w in data.chunks_exact(WINDOW) {
            let mut seen = [false; 256];
            let distinct = w
                .iter()
                .filter(|&&b| !std::mem::replace(&mut seen[usize::from(b)], true))
                .count();
            if distinct < 12 {
                self.skipped += 1;
                continue;
            }
            let w: [u8; WINDOW] = w.try_into().unwrap();
            let prefix = u64::from_le_bytes(w[..8].try_into().unwrap());
            let s = Self::slot(prefix);
            self.filter[s / 64] |= 1 << (s % 64);
            let v = self.by_prefix.entry(prefix).or_default();
            if !v.contains(&w) {
                v.push(w);
                self.count += 1;
            }
        }
    }

    /// The first offset of `hay` where a window starts, at any alignment.
    fn find(&self, hay: &[u8]) -> Option<usize> {
        if hay.len() < WINDOW || self.count == 0 {
            return None;
        }
        (0..=hay.len() - WINDOW).find(|&off| {
            let prefix = u64::from_le_bytes(hay[off..off + 8].try_into().unwrap());
            let s = Self::slot(prefix);
            self.filter[s / 64] & (1 << (s % 64)) != 0
                && self
                    .by_prefix
                    .get(&prefix)
                    .is_some_and(|v| v.iter().any(|w| w[..] == hay[off..off + WINDOW]))
        })
    }
}

/// Starts tcpdump on `link` of the server's namespace, writing every whole packet to `pcap`,
/// and waits until it listens.
fn capture(lab: &mut Lab, link: &str, pcap: &Path) -> (usize, PathBuf) {
    let log = lab.dir.path().join(format!("tcpdump-{link}.log"));
    let srv = lab.srv.clone();
    let pcap = pcap.display().to_string();
    // -U, --immediate-mode: each packet is taken and written as it comes; -s 0: whole
    // packets; -B: a 32 MiB kernel buffer, so none are dropped; -Z root: keep the right to
    // write where we ask.
    let i = lab.spawn_cmd(
        &srv,
        Path::new("tcpdump"),
        &[
            "-i",
            link,
            "-n",
            "-U",
            "--immediate-mode",
            "-s",
            "0",
            "-B",
            "32768",
            "-Z",
            "root",
            "-w",
            &pcap,
        ],
        &log,
        false,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log_of(&log).contains("listening on") {
        assert!(
            lab.children[i].try_wait().unwrap().is_none(),
            "tcpdump exited:\n{}",
            log_of(&log)
        );
        assert!(Instant::now() < deadline, "tcpdump: {}", log_of(&log));
        std::thread::sleep(Duration::from_millis(50));
    }
    (i, log)
}

#[test]
fn swarm_through_the_relay_leaks_no_model_bytes() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping the network-namespace test: {why}");
        return;
    }
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let has_tcpdump = Command::new("tcpdump").arg("--version").output();
    assert!(
        has_tcpdump.is_ok_and(|o| o.status.success()),
        "this test records the traffic with tcpdump: install it (apt-get install tcpdump; \
         .ci/run does)"
    );
    let started = Instant::now();
    let names = ["site-1", "site-2", "site-3"];
    let mut lab = Lab::new(names.len());
    let prod = lab.project(&names, Some(9100));
    let logs = lab.dir.path().to_path_buf();

    // Every packet on the server's links, from before the first connection.
    let mut captures = Vec::new();
    for link in lab.srv_links.clone() {
        let pcap = logs.join(format!("{link}.pcap"));
        let (i, log) = capture(&mut lab, &link, &pcap);
        captures.push((i, log, pcap));
    }

    let before = lab.start_server(&prod);
    for (name, ns) in names.iter().zip(lab.sites.clone()) {
        let kit = prod.join(name).join("startup").display().to_string();
        lab.spawn(
            &ns,
            &["--kit", &kit],
            &logs.join(format!("{name}.log")),
            false,
        );
    }
    let all_logs = || {
        std::iter::once("server")
            .chain(names)
            .map(|n| format!("--- {n}:\n{}", log_of(&logs.join(format!("{n}.log")))))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sites = lab.admin_json(&prod, &["sites"]);
        if sites.as_array().unwrap().len() == names.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sites did not connect: {sites}\n{}",
            all_logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let connected = Instant::now();

    // The swarm: every model goes site to site, and no site has a route to another.
    let src = root().join("examples/swarm-mnist");
    let swarm = flare_node::job::Job::load(&src).unwrap();
    let flare_node::job::WorkflowSpec::Swarm(args) = &swarm.server.workflow else {
        panic!("swarm-mnist is not a swarm job");
    };
    let rounds = args.num_rounds;
    let job = lab.admin_json(&prod, &["submit", src.to_str().unwrap()])["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = lab.admin(&prod, &["wait", &job, "--timeout", "120"]);
    assert!(
        out.status.success(),
        "the swarm did not finish: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        all_logs()
    );
    let ran = connected.elapsed();
    let st = lab.admin_json(&prod, &["status", &job]);
    assert_eq!(st["state"], "finished", "{st}");
    for v in 0..=rounds {
        assert!(
            st["metrics"][v.to_string()]["accuracy"].as_f64().is_some(),
            "version {v} has no metrics: {st}"
        );
    }

    // The relay carried it: circuits were opened, and no site ever reached another directly.
    let after = lab.circuits_opened(&prod);
    println!("relay circuits opened: {before} before the job, {after} after");
    assert!(
        after >= before + 2,
        "the relay opened {} circuits:\n{}",
        after - before,
        all_logs()
    );
    // Every site admitted the sites it worked with over relayed connections only.
    for n in names {
        let log = plain(&log_of(&logs.join(format!("{n}.log"))));
        let peers: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("peer admitted") && l.contains("role=client"))
            .collect();
        assert!(!peers.is_empty(), "{n} met no other site:\n{log}");
        assert!(
            peers.iter().all(|l| l.ends_with("relayed=true")),
            "{n} reached another site directly: {peers:#?}"
        );
    }

    // Stop the nodes, then the captures: tcpdump writes out what it holds and says what it
    // saw. Every packet the kernel passed it must be in the file.
    let nodes = captures.len()..lab.children.len();
    for i in nodes {
        lab.kill(i);
    }
    std::thread::sleep(Duration::from_millis(300));
    for (i, log, pcap) in &captures {
        lab.interrupt(*i);
        let log = log_of(log);
        let count = |what: &str| -> u64 {
            log.lines()
                .find_map(|l| l.strip_suffix(what)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("tcpdump did not say how many {what}:\n{log}"))
        };
        let (captured, received, dropped) = (
            count(" packets captured"),
            count(" packets received by filter"),
            count(" packets dropped by kernel"),
        );
        assert!(
            dropped == 0 && captured == received && captured > 0,
            "tcpdump lost packets, so the capture would prove nothing:\n{log}"
        );
        println!("{}: {captured} packets, none dropped", pcap.display());
    }

    // The models the sites exchanged, as they hold them in the clear: the initial model (the
    // server builds it from the job and starts the run with it; the starting site sends it to
    // every site) and every global model the sites persisted (each round's, final, best).
    let mut models = Vec::new();
    for n in names {
        let dir = prod.join(n).join("jobs").join(&job).join("models");
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                let m = flare_node::model_io::read(&p).unwrap();
                models.push((p, m));
            }
        }
    }
    models.sort_by(|a, b| a.0.cmp(&b.0));
    let initial = swarm.server.initial_model().unwrap();
    models.insert(0, (PathBuf::from("(initial model)"), initial));
    let stems: std::collections::BTreeSet<String> = models
        .iter()
        .filter_map(|(p, _)| Some(p.file_stem()?.to_str()?.to_string()))
        .collect();
    for r in 0..rounds {
        assert!(
            stems.contains(&format!("round-{r:03}")),
            "the global model of round {r} is not kept: {stems:?}"
        );
    }
    assert!(stems.contains("global_final"), "{stems:?}");
    let mut needles = Needles::default();
    let mut tensor_names = std::collections::BTreeSet::new();
    let mut distinct = std::collections::HashSet::new();
    for (_, m) in &models {
        for (name, t) in &m.params {
            needles.add(t.bytes());
            tensor_names.insert(name.clone());
        }
        distinct.insert(
            m.params
                .values()
                .flat_map(|t| t.bytes())
                .copied()
                .collect::<Vec<u8>>(),
        );
    }
    let model_bytes = models[0].1.num_bytes();
    println!(
        "{} models ({} distinct), {model_bytes} bytes of tensors each: {} distinct \
         {WINDOW}-byte windows ({} too uniform to count)",
        models.len(),
        distinct.len(),
        needles.count,
        needles.skipped
    );
    assert!(distinct.len() > rounds as usize, "{stems:?}");
    assert!(
        needles.count * WINDOW * 10 >= distinct.len() * model_bytes * 9,
        "too few windows to search for"
    );

    // What was on the wire.
    let mut wire = Vec::new();
    for (_, _, pcap) in &captures {
        let bytes = std::fs::read(pcap).unwrap();
        println!("{}: {} bytes", pcap.display(), bytes.len());
        // Each round, every site's link carries at least two models through the relay: a
        // trainer gets the round's model and submits its own, an aggregator gets two
        // submissions and sends two models on.
        assert!(
            bytes.len() >= 2 * model_bytes * rounds as usize,
            "{} holds only {} bytes",
            pcap.display(),
            bytes.len()
        );
        wire.push(bytes);
    }
    let total: usize = wire.iter().map(Vec::len).sum();

    // Positive controls. The capture holds payload bytes, not just headers: the plaintext
    // protocol negotiation that opens each TCP connection is in it.
    for (bytes, (_, _, pcap)) in wire.iter().zip(&captures) {
        for clear in [&b"/multistream/1.0.0\n"[..], b"/noise\n"] {
            assert!(
                bytes.windows(clear.len()).any(|w| w == clear),
                "{} lacks {:?}: the capture does not hold payloads",
                pcap.display(),
                String::from_utf8_lossy(clear)
            );
        }
    }
    // And the search finds a model in the clear: in a model file, and in a capture with a
    // stretch of 2 * WINDOW - 1 bytes of a tensor put in at an odd offset.
    let (path, m) = &models[models.len() - 1];
    let file = std::fs::read(path).unwrap();
    assert!(
        needles.find(&file).is_some(),
        "the search misses {}",
        path.display()
    );
    let t = m.params.values().max_by_key(|t| t.bytes().len()).unwrap();
    let from = t.bytes().len() / 2 + 7;
    let stretch = &t.bytes()[from..from + 2 * WINDOW - 1];
    let mut spliced = wire[0].clone();
    let at = (spliced.len() / 3) | 1;
    spliced.splice(at..at, stretch.iter().copied());
    let found = needles.find(&spliced);
    assert!(
        found.is_some_and(|o| o >= at && o + WINDOW <= at + stretch.len()),
        "the search misses a model stretch put in at {at} (found {found:?})"
    );

    // And end to end: model bytes that cross a site's link in the clear (one UDP datagram
    // from site-1 to a closed port of the server, where nothing listens) land in a capture
    // made the same way, and the search finds them there.
    let clear_pcap = logs.join("clear.pcap");
    let link = lab.srv_links[0].clone();
    let (c, _) = capture(&mut lab, &link, &clear_pcap);
    let skip = (file.len() / 2 / 1024).to_string();
    let udp = format!("/dev/udp/10.{}.1.1/9", lab.x);
    must(&[
        "ip",
        "netns",
        "exec",
        &lab.sites[0],
        "bash",
        "-c",
        r#"dd if="$1" bs=1024 skip="$2" count=1 status=none > "$3""#,
        "clear",
        path.to_str().unwrap(),
        &skip,
        &udp,
    ]);
    std::thread::sleep(Duration::from_millis(300));
    lab.interrupt(c);
    let clear = std::fs::read(&clear_pcap).unwrap();
    assert!(
        needles.find(&clear).is_some(),
        "model bytes sent in the clear are not found in their capture ({} bytes)",
        clear.len()
    );

    // The test itself: no window of any model, nor any tensor name, is on the wire.
    let searched = Instant::now();
    for (bytes, (_, _, pcap)) in wire.iter().zip(&captures) {
        if let Some(off) = needles.find(bytes) {
            panic!(
                "{} holds model bytes in the clear at offset {off}",
                pcap.display()
            );
        }
        for name in &tensor_names {
            assert!(
                !bytes.windows(name.len()).any(|w| w == name.as_bytes()),
                "{} holds the tensor name {name:?} in the clear",
                pcap.display()
            );
        }
    }
    println!(
        "searched {total} captured bytes for {} windows in {:.2} s; the swarm ran {:.1} s; \
         the test took {:.1} s",
        needles.count,
        searched.elapsed().as_secs_f64(),
        ran.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
