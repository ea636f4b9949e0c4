//! Benchmarks across real node processes of a throw-away POC project on this machine.
//!
//! - `flare-node bench transfer`: a sealed model transfer between two node processes, direct
//!   or through the server's circuit relay, with throughput and each process's peak RSS. The
//!   orchestrator starts the relay (a real server node) when asked, then a receiving and a
//!   sending `flare-node bench transfer-peer` process. The payload is generated and checked
//!   chunk by chunk, so memory reflects the transfer path, not the model.
//! - `flare-node bench fedavg`: one FedAvg job of a synthetic model on a [`Federation`] (a
//!   server and N site processes), scatter-and-gather or swarm, with or without secure
//!   aggregation: seconds per round from the server's log, the TCP bytes each process sent
//!   (the kernel's per-socket counters), and memory. `flare-node bench secagg`
//!   ([`crate::bench_secagg`]) runs jobs on the same machinery.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use flare_protocols::filters::QuantizationType;
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde_json::{Value, json};

use crate::bench::peak_rss_mib;
use crate::net::bulk::{self, Route, Sealing};
use crate::net::connect::connect_peer;
use crate::net::protocol::BULK_PROTOCOL;
use crate::net::{Credentials, NetConfig, spawn};
use crate::roles::peer_addrs;

/// What one peer process does.
#[derive(Debug, Clone)]
pub struct PeerArgs {
    /// The kit to run as.
    pub kit: PathBuf,
    /// Receive (true) or send (false).
    pub receive: bool,
    /// Payload size in MiB.
    pub mib: u64,
    /// Sender: the receiver's PeerId.
    pub to: Option<PeerId>,
    /// Sender: the receiver's direct addresses (tried first).
    pub addr: Vec<Multiaddr>,
    /// Sender: the receiver's relay circuit address (the fallback).
    pub circuit: Option<Multiaddr>,
    /// Listen here (both ends; DCUtR needs listeners). Receiver default: 127.0.0.1, any port.
    pub listen: Option<Multiaddr>,
    /// Receiver: also reserve a circuit on the kit's server (the relay).
    pub relay: bool,
    /// Relay only: no direct addresses and no hole punching (implies `relay`).
    pub relayed: bool,
    /// Send the payload unsealed, in 1 MiB writes: the libp2p ceiling the sealed transfer is
    /// compared with, measured the same way on the same machine.
    pub plain: bool,
}

struct Reaper(Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn vm_hwm_of(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

fn lines(child: &mut Child, what: &str) -> anyhow::Result<BufReader<std::process::ChildStdout>> {
    Ok(BufReader::new(
        child
            .stdout
            .take()
            .with_context(|| format!("{what}: no stdout"))?,
    ))
}

fn next_json(r: &mut BufReader<std::process::ChildStdout>, what: &str) -> anyhow::Result<Value> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    if line.is_empty() {
        bail!("{what} exited without output");
    }
    serde_json::from_str(line.trim()).with_context(|| format!("{what} said {line:?}"))
}

/// Runs the whole benchmark and returns its JSON report.
pub fn run_transfer(mib: u64, relayed: bool) -> anyhow::Result<Value> {
    run_transfer_mode(mib, relayed, false)
}

/// [`run_transfer`], sealed or (`plain`) unsealed: the same streams and 1 MiB writes without
/// the seal, for the ceiling the sealed numbers are compared with.
pub fn run_transfer_mode(mib: u64, relayed: bool, plain: bool) -> anyhow::Result<Value> {
    let bin = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let out = flare_provision::poc::prepare_now(&flare_provision::poc::PocOptions {
        workspace: dir.path().join("poc"),
        clients: 2,
        base_port: None,
    })?;
    let kit_of = |name: &str| -> anyhow::Result<PathBuf> {
        out.provisioned
            .kits
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.join("startup"))
            .with_context(|| format!("no kit {name}"))
    };
    let mut procs = Reaper(Vec::new());
    let mut relay_pid = None;
    if relayed {
        let server = Command::new(&bin)
            .arg("--kit")
            .arg(kit_of("server")?)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        relay_pid = Some(server.id());
        procs.0.push(server);
        std::thread::sleep(Duration::from_millis(500));
    }
    let peer = |kit: PathBuf, extra: Vec<String>| -> anyhow::Result<Child> {
        let mut c = Command::new(&bin);
        c.args(["bench", "transfer-peer", "--mib", &mib.to_string(), "--kit"])
            .arg(kit)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if relayed {
            c.arg("--relayed");
        }
        if plain {
            c.arg("--plain");
        }
        Ok(c.spawn()?)
    };
    let mut receiver = peer(kit_of("site-2")?, vec!["--receive".into()])?;
    let mut rx_out = lines(&mut receiver, "receiver")?;
    procs.0.push(receiver);
    let ready = next_json(&mut rx_out, "receiver")?;
    let to = ready["peer"].as_str().context("receiver peer")?.to_string();
    let mut args = vec!["--to".to_string(), to];
    for a in ready["addrs"].as_array().into_iter().flatten() {
        args.push("--addr".into());
        args.push(a.as_str().context("receiver addr")?.to_string());
    }
    if let Some(c) = ready["circuit"].as_str() {
        args.push("--circuit".into());
        args.push(c.to_string());
    }
    let mut sender = peer(kit_of("site-1")?, args)?;
    let mut tx_out = lines(&mut sender, "sender")?;
    procs.0.push(sender);
    let sent = next_json(&mut tx_out, "sender")?;
    let got = next_json(&mut rx_out, "receiver")?;
    let relay_rss = relay_pid.and_then(vm_hwm_of);
    Ok(json!({
        "mode": if relayed { "relayed" } else { "direct" },
        "sealed": !plain,
        "mib": mib,
        "sender": sent,
        "receiver": got,
        "relay_peak_rss_mib": relay_rss,
    }))
}

/// The addresses peers should dial to reach this node directly (loopback only when there is
/// nothing else), each ending in `/p2p/<local>`.
async fn direct_addrs(net: &crate::net::NetHandle) -> anyhow::Result<Vec<Multiaddr>> {
    let is_loopback = |a: &Multiaddr| {
        a.iter().any(|p| match p {
            Protocol::Ip4(ip) => ip.is_loopback(),
            Protocol::Ip6(ip) => ip.is_loopback(),
            _ => false,
        })
    };
    let start = Instant::now();
    let mut found = Vec::new();
    while start.elapsed() < Duration::from_secs(5) {
        found = net
            .listeners()
            .await?
            .into_iter()
            .filter(|a| !a.iter().any(|p| p == Protocol::P2pCircuit))
            .collect();
        if found.iter().any(|a| !is_loopback(a)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if found.iter().any(|a| !is_loopback(a)) {
        found.retain(|a| !is_loopback(a));
    }
    Ok(found
        .into_iter()
        .map(|a| a.with(Protocol::P2p(net.local)))
        .collect())
}

/// One end of the benchmark; prints JSON lines on stdout.
pub async fn run_peer(a: PeerArgs) -> anyhow::Result<()> {
    let kit = flare_provision::kit::load_kit(&a.kit, SystemTime::now())?;
    let listen: Vec<Multiaddr> = match (&a.listen, a.relayed) {
        (_, true) => Vec::new(),
        (Some(l), false) => vec![l.clone()],
        (None, false) if a.receive => vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        (None, false) => Vec::new(),
    };
    let (net, _events) = spawn(
        kit.identity.signing.to_libp2p()?,
        Credentials {
            cert_der: kit.cert.der.clone(),
            root_ca: kit.root_ca.clone(),
        },
        NetConfig {
            listen,
            project: kit.config.project.clone(),
            hole_punching: !a.relayed,
            ..NetConfig::default()
        },
    )?;
    let sealing = Sealing::new(net.local, kit.identity.sealing.clone());
    let bytes = a.mib << 20;
    let use_relay = a.relayed || a.relay;
    if a.receive {
        let mut incoming = net
            .streams
            .clone()
            .accept(BULK_PROTOCOL)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let addrs = if a.relayed {
            Vec::new()
        } else {
            direct_addrs(&net).await?
        };
        let circuit = if use_relay {
            let (server, server_addrs) = peer_addrs(&kit.config.server)?;
            crate::roles::connect(&net, server, &server_addrs, Duration::from_secs(20)).await?;
            // Reserve on the relay at the address that reached it.
            let mut base = net.peers.get(&server).context("relay gone")?.addr;
            if !matches!(base.iter().last(), Some(Protocol::P2p(_))) {
                base.push(Protocol::P2p(server));
            }
            let circuit = base.with(Protocol::P2pCircuit);
            net.listen(circuit.clone()).await?;
            // Give the reservation a moment to be accepted.
            tokio::time::sleep(Duration::from_millis(500)).await;
            Some(circuit.with(Protocol::P2p(net.local)))
        } else {
            None
        };
        let first = addrs.first().or(circuit.as_ref()).context("no address")?;
        println!(
            "{}",
            json!({"peer": net.local.to_string(), "addr": first.to_string(),
                   "addrs": addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                   "circuit": circuit.as_ref().map(ToString::to_string)})
        );
        let (peer, mut stream) = incoming.next().await.context("no stream")?;
        // A peer whose relayed connection just closed may be re-admitting on the direct one.
        let from = net
            .wait_admitted(peer, Duration::from_secs(5))
            .await
            .context("stream from an unadmitted peer")?;
        let start = Instant::now();
        let got = if a.plain {
            receive_plain(&mut stream).await?
        } else {
            bulk::receive_discard(&mut stream, &sealing, &from, bytes + (1 << 20))
                .await?
                .bytes
        };
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{}",
            json!({"role": "receiver", "bytes": got, "secs": secs,
                   "mib_s": got as f64 / secs / 1048576.0, "relayed": from.relayed,
                   "conn_addr": from.addr.to_string(), "peak_rss_mib": peak_rss_mib()})
        );
        // Let the acknowledgement drain through the connection (and a relay) before the
        // process exits and its connections close.
        tokio::time::sleep(Duration::from_millis(500)).await;
        return Ok(());
    }
    let to = a.to.context("--to is required to send")?;
    let direct: Vec<Multiaddr> = if a.relayed {
        Vec::new()
    } else {
        a.addr.clone()
    };
    if direct.is_empty() && a.circuit.is_none() {
        bail!("--addr or --circuit is required to send");
    }
    let info = connect_peer(
        &net,
        to,
        &direct,
        a.circuit.as_ref(),
        Duration::from_secs(30),
    )
    .await?;
    let route = Route {
        job: "bench".into(),
        workflow: "bench".into(),
        round: 0,
        kind: "payload".into(),
    };
    let start = Instant::now();
    let mut stream = net.streams.clone().open_stream(to, BULK_PROTOCOL).await?;
    let sent = if a.plain {
        send_plain(&mut stream, bytes).await?
    } else {
        bulk::send_synthetic(&mut stream, &sealing, &info, &route, bytes).await?
    };
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"role": "sender", "bytes": sent, "secs": secs, "mib_s": sent as f64 / secs / 1048576.0,
               "relayed": info.relayed, "conn_addr": info.addr.to_string(),
               "peak_rss_mib": peak_rss_mib()})
    );
    // Let the last frames drain before the process exits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// Unsealed: `bytes` in 1 MiB writes, then the receiver's one-byte acknowledgement.
async fn send_plain(stream: &mut libp2p::Stream, bytes: u64) -> anyhow::Result<u64> {
    use futures::{AsyncReadExt, AsyncWriteExt};
    let block: Vec<u8> = (0..bulk::CHUNK).map(|i| (i % 251) as u8).collect();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(bulk::CHUNK as u64) as usize;
        stream.write_all(&block[..n]).await?;
        left -= n as u64;
    }
    stream.close().await?;
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack).await?;
    Ok(bytes)
}

/// Unsealed: reads to the end of the stream, then acknowledges.
async fn receive_plain(stream: &mut libp2p::Stream) -> anyhow::Result<u64> {
    use futures::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; bulk::CHUNK];
    let mut got = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    stream.write_all(&[6]).await?;
    stream.close().await?;
    Ok(got)
}

/// Resident set size of a process now, in MiB (`VmRSS`).
fn vm_rss_of(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

/// The mean of `v`, or 0 for none.
fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// The median of `v`, or `None` for none.
pub(crate) fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    Some(flare_protocols::aggregators::robust::median(&mut v))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The value of `name=` in a log line of the `fmt` subscriber (`job=abc`).
fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(name)?.strip_prefix('='))
}

/// What the server's log says as jobs run, for the job under way.
#[derive(Default)]
struct RoundLog {
    /// When each `round aggregated` line of the current job was read (the server logs one a
    /// round in either workflow: its own aggregation, or a swarm aggregator's report).
    aggregated: Vec<Instant>,
    /// The server's RSS when the 100th round was aggregated.
    rss_at_100: Option<f64>,
    /// The jobs the server logged `job ended` for.
    ended: Vec<String>,
    /// Told of each `round aggregated` as it is read: the byte sampler's round boundaries.
    marks: Option<SyncSender<SamplerMsg>>,
    /// Marks the sampler's queue had no room for (its boundaries are then off).
    marks_lost: usize,
    /// The current job's rounds, for the ETA.
    rounds: u32,
    /// Print progress every this many rounds (0: never).
    every: u32,
    /// When progress was last printed (or the job submitted).
    last: Option<Instant>,
}

/// Reads the server's log lines, notes each `round aggregated` and `job ended`, and prints
/// progress to stderr every `every` rounds (rounds, seconds a round lately, server RSS, ETA).
fn watch_rounds(log: std::process::ChildStderr, server_pid: u32, out: Arc<Mutex<RoundLog>>) {
    for line in BufReader::new(log).lines() {
        let Ok(line) = line else { break };
        if line.contains("job ended") {
            if let Some(id) = log_field(&line, "job") {
                lock(&out).ended.push(id.to_string());
            }
            continue;
        }
        if !line.contains("round aggregated") {
            continue;
        }
        let now = Instant::now();
        let mut g = lock(&out);
        g.aggregated.push(now);
        if let Some(tx) = &g.marks
            && tx.try_send(SamplerMsg::Mark).is_err()
        {
            g.marks_lost += 1;
        }
        let n = g.aggregated.len() as u32;
        if n == 100 {
            g.rss_at_100 = vm_rss_of(server_pid);
        }
        // A swarm's closing epoch (it only validates) is no round of the job's.
        if g.every > 0 && n % g.every == 0 && n <= g.rounds {
            let last = g.last.unwrap_or(now);
            let per = now.duration_since(last).as_secs_f64() / f64::from(g.every);
            g.last = Some(now);
            eprintln!(
                "round {n}/{}: {per:.4} s a round, server RSS {:.1} MiB, ETA {:.0} s",
                g.rounds,
                vm_rss_of(server_pid).unwrap_or(0.0),
                per * f64::from(g.rounds.saturating_sub(n))
            );
        }
    }
}

/// How often the byte sampler reads the socket counters between round boundaries.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Round boundaries the sampler may have queued.
const MARKS_QUEUED: usize = 1024;

/// What the byte sampler is told.
enum SamplerMsg {
    /// A round was aggregated: sample now and keep the totals as a boundary.
    Mark,
    /// The job ended: a last sample, then stop.
    Stop,
}

/// TCP bytes sent by a set of processes since it started, from the kernel's per-socket
/// counters (`tcpi_bytes_sent`, as `ss -tie` prints them: payload bytes handed to the
/// network, retransmissions included, TCP/IP headers not), each socket tied to its process
/// by the inode the process holds open. Every libp2p byte a node sends (noise, yamux, the
/// sealed models) goes through these sockets. A socket that closes between two samples
/// loses what it sent since the last one: `closed` counts those sockets.
struct TcpBytes {
    pids: Vec<u32>,
    /// Socket inode → bytes sent when the sampler started, for sockets already open then.
    base: HashMap<u64, u64>,
    /// Socket inode → (process index, bytes sent at the last sample).
    last: HashMap<u64, (usize, u64)>,
    /// Per process: bytes sent on sockets gone since, counted to their last sample.
    gone: Vec<u64>,
    /// Per process: sockets that closed while sampled.
    closed: Vec<usize>,
}

impl TcpBytes {
    fn start(pids: Vec<u32>) -> anyhow::Result<Self> {
        let n = pids.len();
        let mut t = TcpBytes {
            pids,
            base: HashMap::new(),
            last: HashMap::new(),
            gone: vec![0; n],
            closed: vec![0; n],
        };
        t.last = t.read()?;
        t.base = t.last.iter().map(|(&ino, &(_, b))| (ino, b)).collect();
        Ok(t)
    }

    /// Every TCP socket of the processes now: inode → (process index, bytes sent).
    fn read(&self) -> anyhow::Result<HashMap<u64, (usize, u64)>> {
        let mut owner = HashMap::new();
        for (i, pid) in self.pids.iter().enumerate() {
            let fds = format!("/proc/{pid}/fd");
            let Ok(dir) = std::fs::read_dir(&fds) else {
                continue; // the process is gone: its sockets too
            };
            for fd in dir.flatten() {
                let Ok(target) = std::fs::read_link(fd.path()) else {
                    continue;
                };
                let target = target.to_string_lossy();
                if let Some(ino) = target
                    .strip_prefix("socket:[")
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok())
                {
                    owner.insert(ino, i);
                }
            }
        }
        let out = Command::new("ss")
            .args(["-t", "-i", "-n", "-e", "-H"])
            .stdin(Stdio::null())
            .output()
            .context("cannot run ss (iproute2), which reads the TCP byte counters")?;
        if !out.status.success() {
            bail!("ss failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(parse_ss(&String::from_utf8_lossy(&out.stdout))
            .into_iter()
            .filter_map(|(ino, bytes)| owner.get(&ino).map(|&i| (ino, (i, bytes))))
            .collect())
    }

    fn sample(&mut self) -> anyhow::Result<()> {
        let now = self.read()?;
        let base = &self.base;
        for (ino, &(i, bytes)) in &self.last {
            if !now.contains_key(ino) {
                self.gone[i] += bytes.saturating_sub(base.get(ino).copied().unwrap_or(0));
                self.closed[i] += 1;
            }
        }
        self.last = now;
        Ok(())
    }

    /// Bytes each process sent since the start, to the last sample.
    fn totals(&self) -> Vec<u64> {
        let mut t = self.gone.clone();
        for (ino, &(i, bytes)) in &self.last {
            t[i] += bytes.saturating_sub(self.base.get(ino).copied().unwrap_or(0));
        }
        t
    }
}

/// `ss -tineH` output → (socket inode, bytes sent) for each socket with an inode. A
/// socket's `ino:` comes on its first line and its `bytes_sent:` (absent while 0) on the
/// indented line that follows, so the tokens are read in order.
fn parse_ss(text: &str) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for token in text.split_whitespace() {
        if let Some(ino) = token.strip_prefix("ino:").and_then(|v| v.parse().ok()) {
            out.push((ino, 0));
        } else if let Some(b) = token
            .strip_prefix("bytes_sent:")
            .and_then(|v| v.parse().ok())
            && let Some(last) = out.last_mut()
        {
            last.1 = b;
        }
    }
    out.retain(|&(ino, _)| ino != 0);
    out
}

/// What the byte sampler of one job saw.
struct Sampled {
    /// Per process: bytes sent from submission to the job's end.
    total: Vec<u64>,
    /// Per round boundary (each `round aggregated`): each process's bytes sent to then.
    boundaries: Vec<Vec<u64>>,
    /// Per process: CPU seconds (user and system) from submission to the job's end.
    cpu_total: Vec<f64>,
    /// Per round boundary: each process's CPU seconds to then.
    cpu_boundaries: Vec<Vec<f64>>,
    /// Per process: sockets that closed during the job (their last bytes are not counted).
    closed: Vec<usize>,
    /// Samples that failed (a boundary taken then holds the sample before).
    failed: usize,
}

/// CPU seconds (user and system) process `pid` has used, from `/proc/<pid>/stat` (in
/// `USER_HZ`, 100 a second on Linux).
fn cpu_seconds_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from the state (field 3) on:
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: f64 = f.next()?.parse().ok()?;
    let stime: f64 = f.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Each process's CPU seconds now; a process gone keeps what was read last.
fn cpu_now(pids: &[u32], last: &mut [f64]) {
    for (p, l) in pids.iter().zip(last.iter_mut()) {
        if let Some(c) = cpu_seconds_of(*p) {
            *l = c;
        }
    }
}

fn run_sampler(mut t: TcpBytes, rx: Receiver<SamplerMsg>) -> Sampled {
    let mut boundaries = Vec::new();
    let mut cpu_boundaries = Vec::new();
    let mut failed = 0;
    let pids = t.pids.clone();
    let mut cpu = vec![0.0; pids.len()];
    cpu_now(&pids, &mut cpu);
    let cpu_base = cpu.clone();
    let since =
        |cpu: &[f64]| -> Vec<f64> { cpu.iter().zip(&cpu_base).map(|(c, b)| c - b).collect() };
    loop {
        let msg = rx.recv_timeout(SAMPLE_EVERY);
        if t.sample().is_err() {
            failed += 1;
        }
        cpu_now(&pids, &mut cpu);
        match msg {
            Ok(SamplerMsg::Mark) => {
                boundaries.push(t.totals());
                cpu_boundaries.push(since(&cpu));
            }
            Ok(SamplerMsg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
    Sampled {
        total: t.totals(),
        boundaries,
        cpu_total: since(&cpu),
        cpu_boundaries,
        closed: t.closed,
        failed,
    }
}

/// What one process spent during a job: the TCP bytes it sent, and its CPU time.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProcessCost {
    /// The process (`server`, `site-1`, …).
    pub process: String,
    /// Bytes sent from submission to the job's end.
    pub total: u64,
    /// Each round: from the previous `round aggregated` (the first: from submission) to its
    /// own. What comes after the last round's end (a swarm's validation epoch, the final
    /// model) is in `total` only.
    pub per_round: Vec<u64>,
    /// A round after the first, on average: from the first `round aggregated` to the last,
    /// over the rounds between (the whole job over its rounds when it had one).
    pub per_round_after_first: f64,
    /// Sockets that closed during the job: what each sent after its last sample is missing.
    pub sockets_closed: usize,
    /// CPU seconds (user and system) from submission to the job's end.
    pub cpu_s_total: f64,
    /// CPU seconds a round after the first, on average, as `per_round_after_first`: what
    /// the process's work costs whatever else shares the machine.
    pub cpu_s_per_round_after_first: f64,
}

/// What one job on a [`Federation`] measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobRun {
    /// The job's id.
    pub job_id: String,
    /// Rounds the job was given.
    pub rounds: u32,
    /// `round aggregated` lines the server logged: `rounds`, and one more in swarm (its
    /// last epoch only validates); only the first `rounds` count below.
    pub rounds_seen: usize,
    /// Seconds from submission to the first `round aggregated`: deployment, the job's start
    /// on every process and the first round.
    pub first_round_s: Option<f64>,
    /// Seconds between consecutive `round aggregated` lines: rounds 2, 3, … each.
    pub round_s: Vec<f64>,
    /// (finished − running) / rounds, from the job's history (the server's clock).
    pub seconds_per_round: f64,
    /// The server's RSS when round 100 was aggregated.
    pub server_rss_mib_at_round_100: Option<f64>,
    /// The TCP bytes each process sent and the CPU time it used during the job, in
    /// [`Federation::names`] order; `None` when the socket counters could not be read
    /// (`bytes_error` says why).
    pub processes: Option<Vec<ProcessCost>>,
    /// Why `bytes` is missing.
    pub bytes_error: Option<String>,
    /// Byte samples that failed and round boundaries the sampler missed: 0 and 0 when every
    /// boundary is exact.
    pub bytes_samples_failed: usize,
    /// See `bytes_samples_failed`.
    pub bytes_marks_lost: usize,
    /// The metrics of the last global model the server recorded.
    pub final_metrics: Option<Value>,
    /// The notes of the job's history (what the server said of it).
    pub notes: Vec<String>,
}

/// The site whose client role logs at `info` into `<site>.log` in the project folder (its
/// `task received` lines time the stages of a scatter-and-gather round); the others log
/// warnings only, to nowhere.
pub const LOGGED_SITE: &str = "site-1";

/// A POC federation of real node processes on this machine: a server and `clients` sites of
/// a throw-away project, each a `flare-node --kit` process, and the admin kit that submits
/// jobs to it. Jobs run one after the other; the processes end when it is dropped.
pub struct Federation {
    /// Killed first on drop (fields drop in order), before the project folder goes.
    procs: Reaper,
    names: Vec<String>,
    bin: PathBuf,
    admin_kit: PathBuf,
    server_pid: u32,
    log: Arc<Mutex<RoundLog>>,
    watcher: std::thread::JoinHandle<()>,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("names", &self.names)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Federation {
    /// Provisions a project of `clients` sites, starts its server and sites, and waits until
    /// every site is connected (at most a minute).
    pub fn start(clients: usize) -> anyhow::Result<Self> {
        let bin = std::env::current_exe().context("cannot find this executable")?;
        let dir = tempfile::tempdir().context("cannot make a temporary folder")?;
        let out = flare_provision::poc::prepare_now(&flare_provision::poc::PocOptions {
            workspace: dir.path().join("poc"),
            clients,
            base_port: None,
        })
        .context("cannot provision the POC project")?;
        let mut procs = Reaper(Vec::new());
        let mut names = Vec::new();
        let mut admin_kit = None;
        let log = Arc::new(Mutex::new(RoundLog::default()));
        let mut watcher = None;
        let mut server_pid = None;
        for (name, path) in &out.provisioned.kits {
            if name.contains('@') {
                admin_kit = Some(path.join("startup"));
                continue;
            }
            let server = name == "server";
            let logged = name == LOGGED_SITE;
            let (filter, stderr) = if server {
                ("info", Stdio::piped())
            } else if logged {
                let file = dir.path().join(format!("{name}.log"));
                let f = std::fs::File::create(&file)
                    .with_context(|| format!("cannot create {}", file.display()))?;
                ("warn,flare_node::roles::client=info", Stdio::from(f))
            } else {
                ("warn", Stdio::null())
            };
            let mut child = Command::new(&bin)
                .arg("--kit")
                .arg(path.join("startup"))
                .env("RUST_LOG", filter)
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .with_context(|| format!("cannot start {name}"))?;
            if server {
                let pid = child.id();
                server_pid = Some(pid);
                let err = child.stderr.take().context("server: no stderr")?;
                let log = Arc::clone(&log);
                watcher = Some(std::thread::spawn(move || watch_rounds(err, pid, log)));
            }
            names.push(name.clone());
            procs.0.push(child);
        }
        let fed = Federation {
            procs,
            names,
            bin,
            admin_kit: admin_kit.context("no admin kit")?,
            server_pid: server_pid.context("no server kit")?,
            log,
            watcher: watcher.context("no server kit")?,
            dir,
        };
        let start = Instant::now();
        loop {
            let sites = fed.admin(&["sites"])?;
            if sites.as_array().map_or(0, Vec::len) >= clients {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("only {sites} connected after a minute");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(fed)
    }

    /// The processes' names (`server`, `site-1`, …), in the order of the per-process
    /// results.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The log of [`LOGGED_SITE`] (its client role at `info`: a line for each task it
    /// receives, once the task's model is in), if it has one.
    pub fn site_log(&self) -> Option<PathBuf> {
        let p = self.dir.path().join(format!("{LOGGED_SITE}.log"));
        p.exists().then_some(p)
    }

    /// A folder inside the federation's throw-away project, for job folders.
    pub fn scratch(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn admin(&self, args: &[&str]) -> anyhow::Result<Value> {
        let o = Command::new(&self.bin)
            .arg("admin")
            .arg("--kit")
            .arg(&self.admin_kit)
            .arg("--json")
            .args(args)
            .output()
            .with_context(|| format!("cannot run admin {args:?}"))?;
        if !o.status.success() {
            bail!("admin {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        serde_json::from_slice(&o.stdout).with_context(|| format!("admin {args:?}: not JSON"))
    }

    /// Each process's peak RSS (`VmHWM`) so far.
    fn peak_rss(&self, params: usize) -> Vec<Value> {
        self.names
            .iter()
            .zip(&self.procs.0)
            .map(|(n, c)| {
                let peak = vm_hwm_of(c.id());
                json!({"process": n, "peak_rss_mib": peak,
                       "peak_rss_per_model": peak.map(|p| p / crate::bench::model_mib(params))})
            })
            .collect()
    }

    /// Submits the job folder `job` (of `rounds` rounds), waits for it to end (at most an
    /// hour) and measures it: the time of each round from the server's log, and the TCP
    /// bytes every process sent, in total and between rounds. Progress goes to stderr every
    /// `progress_every` rounds (0: none).
    pub fn run_job(&self, job: &Path, rounds: u32, progress_every: u32) -> anyhow::Result<JobRun> {
        let pids: Vec<u32> = self.procs.0.iter().map(Child::id).collect();
        let (tx, rx) = std::sync::mpsc::sync_channel(MARKS_QUEUED);
        let (sampler, bytes_error) = match TcpBytes::start(pids) {
            Ok(t) => (Some(std::thread::spawn(move || run_sampler(t, rx))), None),
            Err(e) => {
                eprintln!("bytes sent will not be measured: {e:#}");
                (None, Some(format!("{e:#}")))
            }
        };
        let submitted = Instant::now();
        {
            let mut g = lock(&self.log);
            g.aggregated.clear();
            g.rss_at_100 = None;
            g.marks_lost = 0;
            g.marks = sampler.as_ref().map(|_| tx.clone());
            g.rounds = rounds;
            g.every = progress_every;
            g.last = Some(submitted);
        }
        let job_dir = job.to_string_lossy().into_owned();
        let id = self.admin(&["submit", &job_dir])?["job_id"]
            .as_str()
            .context("the submit answer has no job id")?
            .to_string();
        // Watch the server's log for the end rather than poll `status`: a status answer
        // carries every round's metrics, so polling would be a cost that grows with the job.
        while !lock(&self.log).ended.contains(&id) {
            if submitted.elapsed() > Duration::from_secs(3600) {
                bail!("job {id} did not end within an hour");
            }
            if self.watcher.is_finished() {
                bail!("the server exited before job {id} ended");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let marks_lost = {
            let mut g = lock(&self.log);
            g.marks = None;
            g.marks_lost
        };
        let _ = tx.send(SamplerMsg::Stop);
        let sampled = match sampler {
            Some(s) => Some(
                s.join()
                    .map_err(|_| anyhow::anyhow!("the byte sampler panicked"))?,
            ),
            None => None,
        };
        // The server logs `job ended` before it stops the job on the sites and records its
        // end: wait for the record, so the sites are free for the next job too.
        let ended = Instant::now();
        let rec = loop {
            let rec = self.admin(&["status", &id])?;
            if matches!(
                rec["state"].as_str(),
                Some("finished" | "failed" | "aborted")
            ) {
                break rec;
            }
            if ended.elapsed() > Duration::from_secs(120) {
                bail!("job {id} ended in the log but not in its record: {rec}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let at = |state: &str| {
            rec["history"]
                .as_array()
                .and_then(|h| h.iter().find(|e| e["state"] == state))
                .and_then(|e| e["at_ms"].as_u64())
        };
        let running = at("running").context("no running entry")?;
        let finished = at("finished").with_context(|| format!("the job did not finish: {rec}"))?;
        let notes = rec["history"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["note"].as_str())
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect();
        let final_metrics = rec["metrics"].as_object().and_then(|m| {
            m.iter()
                .max_by_key(|(k, _)| k.parse::<u64>().unwrap_or(0))
                .map(|(_, v)| v.clone())
        });
        let g = lock(&self.log);
        // The job's rounds end at its first `rounds` lines; a swarm logs one more, for the
        // epoch that only validates the final model and hands it to every site.
        let ends = &g.aggregated[..g.aggregated.len().min(rounds as usize)];
        let round_s: Vec<f64> = ends
            .windows(2)
            .map(|w| w[1].duration_since(w[0]).as_secs_f64())
            .collect();
        let processes = sampled.as_ref().map(|s| {
            self.names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let at: Vec<u64> = s
                        .boundaries
                        .iter()
                        .take(rounds as usize)
                        .map(|b| b[i])
                        .collect();
                    let mut prev = 0;
                    let per_round = at
                        .iter()
                        .map(|&b| {
                            let d = b.saturating_sub(prev);
                            prev = b;
                            d
                        })
                        .collect();
                    let after_first = match (at.first(), at.last()) {
                        (Some(&a), Some(&b)) if at.len() > 1 => {
                            b.saturating_sub(a) as f64 / (at.len() - 1) as f64
                        }
                        _ => s.total[i] as f64 / f64::from(rounds.max(1)),
                    };
                    let cpu: Vec<f64> = s
                        .cpu_boundaries
                        .iter()
                        .take(rounds as usize)
                        .map(|b| b[i])
                        .collect();
                    let cpu_after_first = match (cpu.first(), cpu.last()) {
                        (Some(&a), Some(&b)) if cpu.len() > 1 => (b - a) / (cpu.len() - 1) as f64,
                        _ => s.cpu_total[i] / f64::from(rounds.max(1)),
                    };
                    ProcessCost {
                        process: name.clone(),
                        total: s.total[i],
                        per_round,
                        per_round_after_first: after_first,
                        sockets_closed: s.closed[i],
                        cpu_s_total: s.cpu_total[i],
                        cpu_s_per_round_after_first: cpu_after_first,
                    }
                })
                .collect()
        });
        Ok(JobRun {
            job_id: id,
            rounds,
            rounds_seen: g.aggregated.len(),
            first_round_s: ends
                .first()
                .map(|a| a.duration_since(submitted).as_secs_f64()),
            round_s,
            seconds_per_round: (finished - running) as f64 / 1000.0 / f64::from(rounds.max(1)),
            server_rss_mib_at_round_100: g.rss_at_100,
            processes,
            bytes_error,
            bytes_samples_failed: sampled.as_ref().map_or(0, |s| s.failed),
            bytes_marks_lost: marks_lost,
            final_metrics,
            notes,
        })
    }
}

/// One `flare-node bench fedavg` configuration.
#[derive(Debug, Clone)]
pub struct FedavgBench {
    /// f32 parameters of the synthetic model.
    pub params: usize,
    /// Site processes.
    pub clients: usize,
    /// Rounds.
    pub rounds: u32,
    /// Print progress on stderr every this many rounds (0: never).
    pub progress_every: u32,
    /// Quantize the model both ways (the four quantization filters).
    pub quantize: Option<QuantizationType>,
    /// Swarm instead of scatter-and-gather.
    pub swarm: bool,
    /// Secure aggregation (SecAgg+) with [`crate::bench::synthetic_secagg_args`].
    pub secagg: bool,
}

/// Writes the job of `b` into `dir`; returns its `secure_aggregation` settings, if any.
pub fn write_fedavg_job(dir: &Path, b: &FedavgBench) -> anyhow::Result<Option<Value>> {
    if b.secagg && b.quantize.is_some() {
        bail!("--secagg with --quantize: the server's result filters cannot read masked inputs");
    }
    crate::bench::write_synthetic_job(dir, b.params, b.clients, b.rounds)?;
    if b.swarm {
        crate::bench::make_swarm_job(dir, b.params, b.clients, b.rounds)?;
    }
    if let Some(qt) = b.quantize {
        crate::filters::write_quantized_filters(&dir.join("app"), qt)
            .context("cannot write the quantization filters")?;
    }
    if !b.secagg {
        return Ok(None);
    }
    let args = crate::bench::synthetic_secagg_args(b.clients);
    crate::bench::add_secure_aggregation(dir, &args)?;
    Ok(Some(args))
}

/// One FedAvg job of a synthetic model run by a real server and `clients` client processes
/// from a throw-away POC: seconds per round (overall, the first round from submission, each
/// later round, the first and last hundred rounds), the TCP bytes each process sent, the
/// server's RSS at round 100 and at the end, and each process's peak RSS. With `swarm`, the
/// job runs swarm instead of scatter-and-gather (the server only watches and logs the
/// aggregators' reports); with `secagg`, with secure aggregation.
pub fn run_fedavg(b: &FedavgBench) -> anyhow::Result<Value> {
    let fed = Federation::start(b.clients)?;
    let job = fed.scratch().join("job");
    let secagg = write_fedavg_job(&job, b)?;
    let run = fed.run_job(&job, b.rounds, b.progress_every)?;
    let rss_end = vm_rss_of(fed.server_pid);
    let rss = fed.peak_rss(b.params);
    drop(fed);
    let gaps = &run.round_s;
    let k = gaps.len().min(100);
    let per_transfer = synthetic_wire_bytes(b.params, b.quantize);
    let sites: Vec<&ProcessCost> = run
        .processes
        .iter()
        .flatten()
        .filter(|p| p.process != "server")
        .collect();
    let site_bytes: Vec<f64> = sites.iter().map(|p| p.per_round_after_first).collect();
    let site_cpu: Vec<f64> = sites
        .iter()
        .map(|p| p.cpu_s_per_round_after_first)
        .collect();
    Ok(json!({
        "workflow": if b.swarm { "swarm" } else { "scatter_and_gather" },
        "secure_aggregation": secagg,
        "params": b.params,
        "model_mib": crate::bench::model_mib(b.params),
        "quantize": b.quantize.map(QuantizationType::as_str),
        "model_bytes_per_transfer": per_transfer,
        "model_bytes_per_round": per_transfer * 2 * b.clients as u64,
        "clients": b.clients,
        "rounds": b.rounds,
        "seconds_per_round": run.seconds_per_round,
        "rounds_seen": run.rounds_seen,
        "first_round_s": run.first_round_s,
        "median_round_s_after_first": median(gaps),
        "first_100_mean_s": mean(&gaps[..k]),
        "last_100_mean_s": mean(&gaps[gaps.len() - k..]),
        "site_tcp_bytes_sent_per_round_after_first": {
            "mean": (!site_bytes.is_empty()).then(|| mean(&site_bytes)),
            "min": site_bytes.iter().copied().reduce(f64::min),
            "max": site_bytes.iter().copied().reduce(f64::max),
        },
        "site_cpu_s_per_round_after_first": (!site_cpu.is_empty()).then(|| mean(&site_cpu)),
        "server_rss_mib_at_round_100": run.server_rss_mib_at_round_100,
        "server_rss_mib_at_end": rss_end,
        "processes": rss,
        "job": run,
    }))
}

/// The tensor bytes one transfer of the synthetic model of `params` f32 parameters carries
/// (sealing and headers aside), quantized or not: the synthetic model's tensors of
/// `SyntheticArgs::default().tensor_size`, each 4, 2, or 1 byte an element plus an f32 scale
/// per block of 64.
fn synthetic_wire_bytes(params: usize, quantize: Option<QuantizationType>) -> u64 {
    let size = crate::learner::synthetic::SyntheticArgs::default()
        .tensor_size
        .max(1);
    let block = flare_protocols::filters::quantize::DEFAULT_BLOCK_SIZE;
    let tensors = (0..params.div_ceil(size)).map(|i| (params - i * size).min(size) as u64);
    tensors
        .map(|n| match quantize {
            None => 4 * n,
            Some(QuantizationType::Float16 | QuantizationType::BFloat16) => 2 * n,
            Some(QuantizationType::Blockwise8) => n + 4 * n.div_ceil(block as u64),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_output_gives_each_socket_its_bytes() {
        let text = "ESTAB 0 0 127.0.0.1:56410 127.0.0.1:47887 ino:202263 sk:1 cgroup:/ <->\n\
            \t ts sack cubic wscale:10,10 bytes_sent:100000 bytes_acked:100001 segs_out:5\n\
            ESTAB 0 0 127.0.0.1:47887 127.0.0.1:56410 ino:202264 sk:2 cgroup:/ <->\n\
            \t ts sack cubic bytes_received:100000 segs_out:2\n\
            TIME-WAIT 0 0 127.0.0.1:1 127.0.0.1:2 ino:0 sk:3\n\
            ESTAB 0 0 127.0.0.1:3 127.0.0.1:4 ino:7 sk:4\n\
            \t bytes_sent:12 bytes_acked:13\n";
        assert_eq!(parse_ss(text), vec![(202263, 100000), (202264, 0), (7, 12)]);
        assert!(parse_ss("").is_empty());
    }

    #[test]
    fn this_process_cpu_time_is_read() {
        let x = (0..20_000_000u64).fold(0u64, |a, i| a.wrapping_add(i.wrapping_mul(i)));
        std::hint::black_box(x);
        let c = cpu_seconds_of(std::process::id()).unwrap();
        assert!(c > 0.0 && c < 1e7, "{c}");
        assert_eq!(cpu_seconds_of(u32::MAX), None);
    }

    #[test]
    fn log_fields_are_found_by_name() {
        let line = "2026-01-01T00:00:00Z  INFO flare_node::roles::server: job ended job=4f2a state=finished note=done";
        assert_eq!(log_field(line, "job"), Some("4f2a"));
        assert_eq!(log_field(line, "state"), Some("finished"));
        assert_eq!(log_field(line, "round"), None);
    }

    #[test]
    fn this_process_sockets_are_counted() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut b, _) = listener.accept().unwrap();
        let Ok(mut t) = TcpBytes::start(vec![std::process::id()]) else {
            return; // no ss here: nothing to check
        };
        a.write_all(&[7u8; 5000]).unwrap();
        let mut got = vec![0u8; 5000];
        b.read_exact(&mut got).unwrap();
        // Other tests of this process may send too: at least what this one sent is counted.
        t.sample().unwrap();
        let before = t.totals()[0];
        assert!(before >= 5000, "{before}");
        drop(a);
        t.sample().unwrap();
        assert!(t.totals()[0] >= before, "a closed socket keeps its count");
        assert!(t.closed[0] >= 1);
    }
}
