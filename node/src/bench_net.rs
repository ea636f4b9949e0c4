//! `flare-node bench transfer`: a sealed model transfer between two real node processes, direct
//! or through the server's circuit relay, with throughput and each process's peak RSS.
//!
//! The orchestrator provisions a throw-away POC project, starts the relay (a real server node)
//! when asked, then a receiving and a sending `flare-node bench transfer-peer` process. The
//! payload is generated and checked chunk by chunk, so memory reflects the transfer path, not
//! the model.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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

/// What the server's log says as the job runs: when each round started (seen by this
/// process), and the server's RSS when the 100th round started.
#[derive(Default)]
struct RoundLog {
    starts: Vec<Instant>,
    rss_at_100: Option<f64>,
    /// The server logged `job ended`.
    ended: bool,
}

/// Reads the server's log lines, notes each `round started`, and prints progress to
/// stderr every `every` rounds (rounds, seconds a round lately, server RSS, ETA).
fn watch_rounds(
    log: std::process::ChildStderr,
    server_pid: u32,
    rounds: u32,
    every: u32,
    out: std::sync::Arc<std::sync::Mutex<RoundLog>>,
) {
    let mut last = Instant::now();
    for line in BufReader::new(log).lines() {
        let Ok(line) = line else { break };
        if line.contains("job ended") {
            out.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .ended = true;
            continue;
        }
        if !line.contains("round started") {
            continue;
        }
        let now = Instant::now();
        let mut g = out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.starts.push(now);
        let n = g.starts.len() as u32;
        if n == 100 {
            g.rss_at_100 = vm_rss_of(server_pid);
        }
        if every > 0 && n % every == 0 {
            let per = now.duration_since(last).as_secs_f64() / f64::from(every);
            last = now;
            eprintln!(
                "round {n}/{rounds}: {per:.4} s a round, server RSS {:.1} MiB, ETA {:.0} s",
                vm_rss_of(server_pid).unwrap_or(0.0),
                per * f64::from(rounds.saturating_sub(n))
            );
        }
    }
}

/// One FedAvg job of a synthetic model run by a real server and `clients` client processes
/// from a throw-away POC: seconds per round (overall, first and last hundred rounds), the
/// server's RSS at round 100 and at the end, and each process's peak RSS. Progress goes to
/// stderr every `progress_every` rounds (0: none). With `swarm`, the job runs swarm instead
/// of scatter-and-gather (the server only watches; rounds are not logged there).
pub fn run_fedavg(
    params: usize,
    clients: usize,
    rounds: u32,
    progress_every: u32,
    quantize: Option<QuantizationType>,
    swarm: bool,
) -> anyhow::Result<Value> {
    let bin = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let out = flare_provision::poc::prepare_now(&flare_provision::poc::PocOptions {
        workspace: dir.path().join("poc"),
        clients,
        base_port: None,
    })?;
    let job = dir.path().join("job");
    crate::bench::write_synthetic_job(&job, params, clients, rounds)?;
    if swarm {
        crate::bench::make_swarm_job(&job, params, clients, rounds)?;
    }
    if let Some(qt) = quantize {
        crate::filters::write_quantized_filters(&job.join("app"), qt)?;
    }
    let mut procs = Reaper(Vec::new());
    let mut names = Vec::new();
    let mut admin_kit = None;
    let log = std::sync::Arc::new(std::sync::Mutex::new(RoundLog::default()));
    let mut watcher = None;
    let mut server_pid = None;
    for (name, path) in &out.provisioned.kits {
        if name.contains('@') {
            admin_kit = Some(path.join("startup"));
            continue;
        }
        let server = name == "server";
        let mut child = Command::new(&bin)
            .arg("--kit")
            .arg(path.join("startup"))
            .env("RUST_LOG", if server { "info" } else { "warn" })
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if server {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .spawn()?;
        if server {
            let pid = child.id();
            server_pid = Some(pid);
            let err = child.stderr.take().context("server: no stderr")?;
            let log = std::sync::Arc::clone(&log);
            watcher = Some(std::thread::spawn(move || {
                watch_rounds(err, pid, rounds, progress_every, log);
            }));
        }
        names.push(name.clone());
        procs.0.push(child);
    }
    let server_pid = server_pid.context("no server kit")?;
    let admin_kit = admin_kit.context("no admin kit")?;
    let admin = |args: &[&str]| -> anyhow::Result<Value> {
        let o = Command::new(&bin)
            .arg("admin")
            .arg("--kit")
            .arg(&admin_kit)
            .arg("--json")
            .args(args)
            .output()?;
        if !o.status.success() {
            bail!("admin {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(serde_json::from_slice(&o.stdout)?)
    };
    let start = Instant::now();
    loop {
        let sites = admin(&["sites"])?;
        if sites.as_array().map_or(0, Vec::len) >= clients {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("only {sites} connected");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let job_dir = job.to_string_lossy().into_owned();
    let id = admin(&["submit", &job_dir])?["job_id"]
        .as_str()
        .context("job id")?
        .to_string();
    // Watch the server's log for the end rather than poll `status`: a status answer carries
    // every round's metrics, so polling would be a cost that grows with the job.
    let started = Instant::now();
    while !log
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .ended
    {
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("job {id} did not end within an hour");
        }
        if watcher
            .as_ref()
            .is_some_and(std::thread::JoinHandle::is_finished)
        {
            bail!("the server exited before job {id} ended");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let rec = admin(&["status", &id])?;
    let at = |state: &str| {
        rec["history"]
            .as_array()
            .and_then(|h| h.iter().find(|e| e["state"] == state))
            .and_then(|e| e["at_ms"].as_u64())
    };
    let running = at("running").context("no running entry")?;
    let finished = at("finished").with_context(|| format!("the job did not finish: {rec}"))?;
    let rss_end = vm_rss_of(server_pid);
    let rss: Vec<Value> = names
        .iter()
        .zip(&procs.0)
        .map(|(n, c)| {
            let peak = vm_hwm_of(c.id());
            json!({"process": n, "peak_rss_mib": peak,
                   "peak_rss_per_model": peak.map(|p| p / crate::bench::model_mib(params))})
        })
        .collect();
    drop(procs);
    if let Some(w) = watcher {
        let _ = w.join();
    }
    let log = log
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let gaps: Vec<f64> = log
        .starts
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_secs_f64())
        .collect();
    let k = gaps.len().min(100);
    let per_transfer = synthetic_wire_bytes(params, quantize);
    Ok(json!({
        "workflow": if swarm { "swarm" } else { "scatter_and_gather" },
        "params": params,
        "model_mib": crate::bench::model_mib(params),
        "quantize": quantize.map(QuantizationType::as_str),
        "model_bytes_per_transfer": per_transfer,
        "model_bytes_per_round": per_transfer * 2 * clients as u64,
        "clients": clients,
        "rounds": rounds,
        "seconds_per_round": (finished - running) as f64 / 1000.0 / f64::from(rounds.max(1)),
        "rounds_seen": log.starts.len(),
        "first_100_mean_s": mean(&gaps[..k]),
        "last_100_mean_s": mean(&gaps[gaps.len() - k..]),
        "server_rss_mib_at_round_100": log.rss_at_100,
        "server_rss_mib_at_end": rss_end,
        "processes": rss,
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
