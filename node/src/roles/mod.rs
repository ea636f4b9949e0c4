//! The roles a `flare-node` process plays, chosen by its kit: the server (job lifecycle,
//! admin access, relay), a client site (runs deployed jobs), and the admin console.
//!
//! Also what they share: starting the network for a kit, [`connect`]ing to the server (which
//! says why it did not get in: refused either way, or unreachable), and the workspace lock
//! that lets one process run a participant's kit at a time ([`lock_workspace`]).

pub mod admin;
pub mod client;
pub mod metrics;
pub mod policy;
pub mod resources;
pub mod server;
pub mod tier;
pub mod workflow;

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// Starts the network for a kit: listening where its config says, relay server on servers,
/// in the kit's region (`node.json`'s `region`). [`start_net_in`] with [`Endpoint::of_kit`].
pub fn start_net(
    kit: &Kit,
    relay_server: bool,
) -> anyhow::Result<(NetHandle, mpsc::Receiver<NetEvent>)> {
    start_net_in(kit, &Endpoint::of_kit(kit, relay_server))
}

/// One network endpoint of a kit's identity: where it listens and which region it lives in.
///
/// A node has one, from its kit ([`Endpoint::of_kit`]). A hub process runs two with the same
/// key: [`Endpoint::hub_upward`] in the parent region, a member of the server above, and
/// [`Endpoint::hub_downward`] in its own region, the server and relay of its sites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The region peers are admitted in ([`flare_crypto::check_region`]); `None`: tier 1.
    pub region: Option<String>,
    /// Multiaddrs to listen on, as in `node.json` (`/ip4/0.0.0.0/tcp/8002`).
    pub listen: Vec<String>,
    /// Run the circuit relay server here.
    pub relay_server: bool,
    /// Besides `listen`, the addresses announced as confirmed external ones (what peers are
    /// given to dial); the relay needs one. Used only with `relay_server`.
    pub external: Vec<String>,
}

impl Endpoint {
    /// The kit's own endpoint: its `listen` addresses in its region. A relay server announces
    /// the addresses its clients are given: `server.addrs` (the server's own entry), or a
    /// hub's `advertise`.
    pub fn of_kit(kit: &Kit, relay_server: bool) -> Self {
        let external = match (relay_server, kit.role()) {
            (false, _) => Vec::new(),
            (true, flare_crypto::Role::Hub) => kit.config.advertise.clone(),
            (true, _) => kit.config.server.addrs.clone(),
        };
        Endpoint {
            region: kit.config.region.clone(),
            listen: kit.config.listen.clone(),
            relay_server,
            external,
        }
    }

    /// A hub's upward endpoint: a member of the parent region (`None` for `eu`, `eu` for
    /// `eu.de`), dialing the server in `node.json`'s `server`; it listens nowhere.
    pub fn hub_upward(kit: &Kit) -> Self {
        Endpoint {
            region: kit
                .config
                .region
                .as_deref()
                .and_then(flare_crypto::region_parent)
                .map(str::to_string),
            listen: Vec::new(),
            relay_server: false,
            external: Vec::new(),
        }
    }

    /// A hub's downward endpoint: the server and relay of its own region, on its `listen`
    /// addresses, announcing its `advertise` ones.
    pub fn hub_downward(kit: &Kit) -> Self {
        Endpoint::of_kit(kit, true)
    }
}

/// Starts one network endpoint for a kit's identity (see [`Endpoint`]).
pub fn start_net_in(
    kit: &Kit,
    endpoint: &Endpoint,
) -> anyhow::Result<(NetHandle, mpsc::Receiver<NetEvent>)> {
    let parse = |field: &str, a: &String| {
        a.parse::<Multiaddr>()
            .with_context(|| format!("node.json: {field}: bad address {a:?}"))
    };
    let listen: Vec<Multiaddr> = endpoint
        .listen
        .iter()
        .map(|a| parse("listen", a))
        .collect::<anyhow::Result<_>>()?;
    // The relay needs a confirmed external address: the listen addresses, plus the addresses
    // clients are given (host_names), which is what counts when listening on 0.0.0.0.
    let external = if endpoint.relay_server {
        let mut ext = listen.clone();
        for a in &endpoint.external {
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
        relay_server: endpoint.relay_server,
        project: kit.config.project.clone(),
        instance: instance_id()?,
        region: endpoint.region.clone(),
        ..NetConfig::default()
    };
    let keypair = kit.identity.signing.to_libp2p()?;
    let creds = Credentials {
        cert_der: kit.cert.der.clone(),
        root_ca: kit.root_ca.clone(),
    };
    Ok(spawn(keypair, creds, cfg)?)
}

/// A random id for this process, from the OS random source (see [`NetConfig::instance`]).
pub(crate) fn instance_id() -> anyhow::Result<u64> {
    let bytes: [u8; 8] = ring::rand::generate(&ring::rand::SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("the OS random source failed"))?
        .expose();
    Ok(u64::from_le_bytes(bytes))
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

/// Why [`connect`] did not get in.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server refused us, or we refused it: waiting longer would not help.
    #[error("{0}")]
    Refused(String),
    /// No admission: every dial failed, or the time ran out.
    #[error("cannot reach the server at {addrs}: {why}")]
    Unreachable {
        /// The addresses tried.
        addrs: String,
        /// The last dial error and how many rounds were tried, or the time waited.
        why: String,
    },
}

/// How [`connect_with`] dials and when it gives up.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Give up after this long.
    pub timeout: Duration,
    /// Pause between rounds of dials of every address.
    pub redial: Duration,
    /// Give up after this many rounds in which every dial failed (nothing listens there),
    /// before `timeout`; `None` waits for the timeout (a site waiting for its server).
    pub give_up_after_failed_rounds: Option<u32>,
}

impl ConnectOptions {
    /// Dial every 3 s until admitted or `timeout` passes.
    pub fn patient(timeout: Duration) -> Self {
        ConnectOptions {
            timeout,
            redial: Duration::from_secs(3),
            give_up_after_failed_rounds: None,
        }
    }
}

/// How long to wait, after one side's refusal, for the other side's reason as well.
const SECOND_REASON_WAIT: Duration = Duration::from_millis(300);

/// Dials `peer` at `addrs` until it is admitted or `timeout` passes; a refusal either way
/// ends it at once with the reason.
pub async fn connect(
    net: &NetHandle,
    peer: PeerId,
    addrs: &[Multiaddr],
    timeout: Duration,
) -> Result<(), ConnectError> {
    connect_with(net, peer, addrs, &ConnectOptions::patient(timeout)).await
}

/// Dials `peer` at `addrs` until it is admitted, refused (either way: the reasons are in the
/// error), or unreachable as `opts` says.
pub async fn connect_with(
    net: &NetHandle,
    peer: PeerId,
    addrs: &[Multiaddr],
    opts: &ConnectOptions,
) -> Result<(), ConnectError> {
    let start = Instant::now();
    let list = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let mut rounds = 0u32;
    let mut failed_rounds = 0u32;
    let mut refused_dial: Option<String> = None;
    loop {
        if net.peers.is_admitted(&peer) {
            return Ok(());
        }
        let errors_before = net.notes.get(&peer).map_or(0, |n| n.dial_errors);
        let mut failed_now = 0u64;
        for a in addrs {
            if let Err(e) = net.dial(a.clone()).await {
                failed_now += 1;
                refused_dial = Some(e.to_string());
            }
        }
        rounds += 1;
        let round_end = Instant::now() + opts.redial;
        let mut all_failed = false;
        while Instant::now() < round_end {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if net.peers.is_admitted(&peer) {
                return Ok(());
            }
            if let Some(note) = net.notes.get(&peer) {
                if refusal_since(&note, start) {
                    // The other side's reason may be on its way: a moment for both.
                    tokio::time::sleep(SECOND_REASON_WAIT).await;
                    let note = net.notes.get(&peer).unwrap_or(note);
                    return Err(ConnectError::Refused(refusal_text(&note, start)));
                }
                all_failed = note.dial_errors.saturating_sub(errors_before) + failed_now
                    >= addrs.len() as u64;
            } else {
                all_failed = failed_now >= addrs.len() as u64;
            }
        }
        if all_failed {
            failed_rounds += 1;
        }
        let last_error = net
            .notes
            .get(&peer)
            .and_then(|n| n.dial_error)
            .filter(|(at, _)| *at >= start)
            .map(|(_, e)| e)
            .or_else(|| refused_dial.clone());
        if let Some(n) = opts.give_up_after_failed_rounds
            && failed_rounds >= n
        {
            return Err(ConnectError::Unreachable {
                addrs: list,
                why: format!(
                    "{} ({rounds} attempts in {:.1} s)",
                    last_error.unwrap_or_else(|| "every dial failed".into()),
                    start.elapsed().as_secs_f64()
                ),
            });
        }
        if start.elapsed() >= opts.timeout {
            return Err(ConnectError::Unreachable {
                addrs: list,
                why: match last_error {
                    Some(e) => format!("{e} (for {} s)", opts.timeout.as_secs()),
                    None => format!("not admitted within {} s", opts.timeout.as_secs()),
                },
            });
        }
    }
}

fn refusal_since(note: &crate::net::PeerNote, start: Instant) -> bool {
    let fresh = |r: &Option<(Instant, String)>| r.as_ref().is_some_and(|(at, _)| *at >= start);
    fresh(&note.refused_by_peer) || fresh(&note.refused_by_us)
}

/// Both sides' reasons, the server's first.
fn refusal_text(note: &crate::net::PeerNote, start: Instant) -> String {
    let fresh = |r: &Option<(Instant, String)>| {
        r.as_ref()
            .filter(|(at, _)| *at >= start)
            .map(|(_, why)| why.clone())
    };
    let mut parts = Vec::new();
    if let Some(why) = fresh(&note.refused_by_peer) {
        let why = why.strip_prefix("admission refused: ").unwrap_or(&why);
        parts.push(format!("the server refused this kit: {why}"));
    }
    if let Some(why) = fresh(&note.refused_by_us) {
        let hint = if why.starts_with("certificate rejected") {
            " (the server's certificate does not chain to this kit's root CA: a kit from another provisioning?)"
        } else {
            ""
        };
        parts.push(format!("this kit refused the server: {why}{hint}"));
    }
    parts.join("; and ")
}

/// The lock file in a participant's folder that lets one process run its kit.
pub const LOCK_FILE: &str = "node.lock";

/// Why the workspace lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceLockError {
    /// Another process holds it.
    #[error(
        "{path} is locked by pid {pid}: another flare-node runs this participant's kit; one identity runs once"
    )]
    Held {
        /// The lock file.
        path: PathBuf,
        /// The pid written into it by its holder (`unknown` if unreadable).
        pid: String,
    },
    /// The lock file could not be opened, locked or written.
    #[error("lock file {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Takes the lock on a participant's workspace `dir` (the kit's parent): `dir/node.lock`,
/// held while the returned file is open (the OS drops it with the process), with this pid
/// written into it for people.
pub fn lock_workspace(dir: &Path) -> Result<File, WorkspaceLockError> {
    let path = dir.join(LOCK_FILE);
    let io = |source| WorkspaceLockError::Io {
        path: path.clone(),
        source,
    };
    // Not truncated on open: the holder's pid stays readable until we hold the lock.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    // `File::try_lock` is stable since 1.89; the workspace builds with 1.95 and already needs
    // 1.88 (let chains), but its declared `rust-version` still says 1.85.
    #[allow(clippy::incompatible_msrv)]
    let locked = file.try_lock();
    match locked {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let pid = text.trim();
            return Err(WorkspaceLockError::Held {
                path: path.clone(),
                pid: if pid.is_empty() { "unknown" } else { pid }.to_string(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(file)
}

/// Runs the node of the kit in `kit_dir` (server or client) until SIGINT or SIGTERM.
///
/// The kit's signature is verified first; a changed, added or removed file is named. Then the
/// participant's folder is locked ([`lock_workspace`]) for as long as the node runs. A hub
/// kit is refused: the hub role lives in the hub crate, which runs it through
/// [`run_node_with`].
pub fn run_node(kit_dir: &std::path::Path) -> anyhow::Result<()> {
    run_node_with(kit_dir, None)
}

/// A role run from outside this crate: given the shutdown switch, the role's future.
pub type ExternalRole = Box<
    dyn FnOnce(
        tokio::sync::watch::Receiver<bool>,
    )
        -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>,
>;

/// [`run_node`], with `hub` to run a hub kit (the hub crate's role), under the same kit check,
/// workspace lock, runtime and signal handling.
pub fn run_node_with(kit_dir: &std::path::Path, hub: Option<ExternalRole>) -> anyhow::Result<()> {
    let kit = flare_provision::kit::load_kit(kit_dir, SystemTime::now())
        .with_context(|| format!("startup kit {}", kit_dir.display()))?;
    // One identity runs once: a second start on this participant's folder stops here.
    let _lock = match kit.role().kind() {
        flare_crypto::RoleKind::Server
        | flare_crypto::RoleKind::Client
        | flare_crypto::RoleKind::Hub => {
            let dir = kit.participant_dir().with_context(|| {
                format!("startup kit {} has no parent folder", kit_dir.display())
            })?;
            Some(lock_workspace(dir)?)
        }
        _ => None,
    };
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
            flare_crypto::RoleKind::Hub => match hub {
                Some(run) => run(rx).await,
                None => anyhow::bail!(
                    "{} is a hub kit: the hub role runs in flare-node built with the hub crate",
                    kit.name()
                ),
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_provision::poc::{PocOptions, prepare_tiered_now};

    /// A hub kit is refused with a pointer to the hub crate, after its folder was locked (so
    /// a second process on it would be refused like a server's); its endpoints are in its
    /// region (downward) and the parent region (upward).
    #[test]
    fn a_hub_kit_is_locked_then_refused_and_has_two_endpoints() {
        let tmp = tempfile::tempdir().unwrap();
        let out = prepare_tiered_now(
            &PocOptions {
                workspace: tmp.path().join("poc"),
                clients: 1,
                base_port: None,
            },
            1,
        )
        .unwrap();
        let hub_dir = out.provisioned.prod_dir.join("region-1/region-1");
        let err = run_node(&hub_dir.join("startup")).unwrap_err().to_string();
        assert_eq!(
            err,
            "region-1 is a hub kit: the hub role runs in flare-node built with the hub crate"
        );
        assert!(hub_dir.join(LOCK_FILE).is_file());

        let kit = flare_provision::load_kit(&hub_dir.join("startup"), SystemTime::now()).unwrap();
        let down = Endpoint::hub_downward(&kit);
        assert_eq!(down.region.as_deref(), Some("region-1"));
        assert!(down.relay_server);
        assert_eq!(down.listen, kit.config.listen);
        assert_eq!(down.external, kit.config.advertise);
        assert!(!down.external.is_empty());
        let up = Endpoint::hub_upward(&kit);
        assert_eq!(up.region, None);
        assert!(!up.relay_server && up.listen.is_empty());
        // A region's site lives in its region; the tier-1 server in none, announcing its own
        // entry for the relay.
        let site = out.provisioned.prod_dir.join("region-1/site-1/startup");
        let site = flare_provision::load_kit(&site, SystemTime::now()).unwrap();
        assert_eq!(
            Endpoint::of_kit(&site, false).region.as_deref(),
            Some("region-1")
        );
        let server = out.provisioned.prod_dir.join("server/startup");
        let server = flare_provision::load_kit(&server, SystemTime::now()).unwrap();
        let ep = Endpoint::of_kit(&server, true);
        assert_eq!(ep.region, None);
        assert_eq!(ep.external, server.config.server.addrs);
    }
}
