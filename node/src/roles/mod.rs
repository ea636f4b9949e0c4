//! The roles a `flare-node` process plays, chosen by its kit: the server (job lifecycle,
//! admin access, relay), a client site (runs deployed jobs), and the admin console.

pub mod admin;
pub mod client;
pub mod policy;
pub mod server;
pub mod workflow;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use flare_provision::config::PeerAddr;
use flare_provision::kit::Kit;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;

use crate::net::{Credentials, NetConfig, NetEvent, NetHandle, spawn};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Starts the network for a kit: listening where its config says, relay server on servers.
pub fn start_net(
    kit: &Kit,
    relay_server: bool,
) -> anyhow::Result<(NetHandle, mpsc::Receiver<NetEvent>)> {
    let listen: Vec<Multiaddr> = kit
        .config
        .listen
        .iter()
        .map(|a| {
            a.parse()
                .with_context(|| format!("node.json: listen: bad address {a:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    // The relay needs a confirmed external address: the listen addresses, plus the addresses
    // clients are given (host_names), which is what counts when listening on 0.0.0.0.
    let external = if relay_server {
        let mut ext = listen.clone();
        for a in &kit.config.server.addrs {
            if let Ok(m) = a.parse::<Multiaddr>()
                && !ext.contains(&m)
            {
                ext.push(m);
            }
        }
        ext
    } else {
        Vec::new()
    };
    let cfg = NetConfig {
        external,
        listen,
        relay_server,
        project: kit.config.project.clone(),
        ..NetConfig::default()
    };
    let keypair = kit.identity.signing.to_libp2p()?;
    let creds = Credentials {
        cert_der: kit.cert.der.clone(),
        root_ca: kit.root_ca.clone(),
    };
    Ok(spawn(keypair, creds, cfg)?)
}

/// The server's PeerId and dialable addresses (with `/p2p/<id>`) from a kit entry.
pub fn peer_addrs(p: &PeerAddr) -> anyhow::Result<(PeerId, Vec<Multiaddr>)> {
    let id: PeerId = p
        .peer_id
        .parse()
        .with_context(|| format!("node.json: server.peer_id {:?}", p.peer_id))?;
    let addrs = p
        .addrs
        .iter()
        .map(|a| {
            a.parse::<Multiaddr>()
                .map(|m| m.with(Protocol::P2p(id)))
                .with_context(|| format!("node.json: server.addrs: bad address {a:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((id, addrs))
}

/// Dials `peer` at `addrs` until it is admitted or `timeout` passes.
pub async fn connect(
    net: &NetHandle,
    peer: PeerId,
    addrs: &[Multiaddr],
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    loop {
        if net.peers.is_admitted(&peer) {
            return Ok(());
        }
        for a in addrs {
            let _ = net.dial(a.clone()).await;
        }
        if net
            .wait_admitted(peer, Duration::from_secs(3))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            anyhow::bail!("cannot reach the server at {}", list.join(", "));
        }
    }
}

/// Runs the node of the kit in `kit_dir` (server or client) until SIGINT or SIGTERM.
///
/// The kit's signature is verified first; a changed, added or removed file is named.
pub fn run_node(kit_dir: &std::path::Path) -> anyhow::Result<()> {
    let kit = flare_provision::kit::load_kit(kit_dir, SystemTime::now())
        .with_context(|| format!("startup kit {}", kit_dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot watch SIGTERM");
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutdown requested");
            let _ = tx.send(true);
        });
        match kit.role().kind() {
            flare_crypto::RoleKind::Server => server::run(kit, rx).await,
            flare_crypto::RoleKind::Client => client::run(kit, rx).await,
            flare_crypto::RoleKind::Admin => {
                anyhow::bail!(
                    "{} is an admin kit: use `flare-node admin --kit {}`",
                    kit.name(),
                    kit_dir.display()
                )
            }
            flare_crypto::RoleKind::Relay => anyhow::bail!("relay nodes are not supported yet"),
        }
    })
}
