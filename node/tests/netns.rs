//! Two sites in separate network namespaces, each linked only to the server's namespace,
//! exchange a sealed multi-MiB payload: through the server's circuit relay when they cannot
//! route to each other (proven by the relay's circuit counter), and directly once the server
//! namespace forwards between them.
//!
//! Needs root and `ip netns`; skips (and says why) otherwise. Recipe: /work/shared/NETWORK.md.
//! Every name carries the test's pid and a per-lab number, and only 10.x addresses inside the
//! namespaces made here are used. The namespaces are deleted and the processes killed when a
//! test ends, also when it fails. The tests take turns (one lab at a time): each runs several
//! processes on a 2-core machine.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

const MIB: u64 = 16;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flare-node"))
}

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn must(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Why the test cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    match Command::new("id").arg("-u").output() {
        Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == "0" => {}
        Ok(o) => {
            return Some(format!(
                "not root (uid {})",
                String::from_utf8_lossy(&o.stdout).trim()
            ));
        }
        Err(e) => return Some(format!("cannot run `id -u`: {e}")),
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`ip netns` is unavailable: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("`ip` is unavailable: {e}")),
    }
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
