//! The libp2p driver: one task owns the `Swarm`; everything else talks to it through a
//! bounded command channel ([`NetHandle`]) and hears from it through a bounded event channel.
//!
//! Transport: TCP + Noise + yamux, with the circuit-relay client on every node and the relay
//! server on the server node. Admission: on every new connection both sides send `Hello` with
//! their certificate; a peer is admitted once its certificate chains to the project CA, is in
//! its validity period, and carries the key of the connection's PeerId. A peer that is not
//! admitted within [`NetConfig::admission_timeout`] is disconnected and blocked; no handler of
//! ours (control, bulk, relay) serves a peer that is not admitted.
//!
//! A refused `Hello` is answered with the reason before the connection closes, and every
//! refusal (ours or the peer's) and failed dial is noted in [`PeerNotes`], so a dialer says why
//! it could not get in instead of timing out.
//!
//! Regions (tiered federations): an endpoint lives in one region ([`NetConfig::region`],
//! `None` for tier 1) and admits, after the certificate checks, only the peers that
//! [`flare_crypto::check_region`] lets in: its region's members and the hubs of the regions
//! directly below. A hub process runs two endpoints, one in each region it joins.
//!
//! One identity, one process: each process draws a random instance id ([`NetConfig::instance`])
//! and sends it in `Hello`. A copy of a kit has the same key, hence the same PeerId, so libp2p
//! sees its connection as a second connection of the admitted peer. A `Hello` from an admitted
//! peer with another instance while one of the first's connections lives is refused: that
//! connection alone is closed and the refusal is counted in [`Duplicates`]. Once the old
//! connections are gone (a restart), the new instance takes over.

pub mod bulk;
pub mod codec;
pub mod connect;
pub mod download;
pub mod protocol;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use flare_crypto::{ParticipantCert, RootCa};
use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, allow_block_list, dcutr, identify, noise, ping, relay, tcp, yamux,
};
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot};

use self::codec::CborCodec;
use self::protocol::{
    CONTROL_PROTOCOL, ControlRequest, ControlResponse, MAX_CONTROL_REQUEST, MAX_CONTROL_RESPONSE,
};

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The swarm task has stopped.
    #[error("the network task has stopped")]
    Stopped,
    /// Building the transport failed.
    #[error("cannot build the transport: {0}")]
    Transport(String),
    /// A listen or dial address was refused.
    #[error("address {addr}: {reason}")]
    Address {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The peer is not connected and admitted.
    #[error("peer {0} is not admitted")]
    NotAdmitted(PeerId),
    /// A control request failed on the way.
    #[error("request to {peer} failed: {reason}")]
    Request {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// Timed out waiting for something.
    #[error("timed out: {0}")]
    Timeout(String),
}

/// What the driver needs to know about this node.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Run a circuit relay server (the server node).
    pub relay_server: bool,
    /// Addresses to announce as confirmed external addresses (the relay needs one).
    pub external: Vec<Multiaddr>,
    /// Project name; peers of another project are refused.
    pub project: String,
    /// How long a connected peer has to get admitted.
    pub admission_timeout: Duration,
    /// Idle connections stay open this long.
    pub idle_timeout: Duration,
    /// Control request timeout.
    pub request_timeout: Duration,
    /// Try to upgrade relayed connections to direct ones (DCUtR).
    pub hole_punching: bool,
    /// This process's instance id, drawn at start from the OS random source by the node: a
    /// second process with the same kit (same PeerId) has another one.
    pub instance: u64,
    /// The region this endpoint lives in (`None`: tier 1, the tier-1 server's federation).
    /// Peers are admitted by [`flare_crypto::check_region`] against it.
    pub region: Option<String>,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            listen: Vec::new(),
            relay_server: false,
            external: Vec::new(),
            project: String::new(),
            admission_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(60),
            hole_punching: true,
            instance: 0,
            region: None,
        }
    }
}

/// An admitted peer.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Its PeerId.
    pub peer: PeerId,
    /// Its verified certificate.
    pub cert: ParticipantCert,
    /// Whether every open connection to it goes through a relay.
    pub relayed: bool,
    /// The address of its latest connection.
    pub addr: Multiaddr,
}

/// A peer record for `id` with a made-up certificate (`p` of `o`), for unit tests.
#[cfg(test)]
pub(crate) fn test_peer_info(id: &flare_crypto::Identity, role: flare_crypto::Role) -> PeerInfo {
    let peer_id = id.peer_id().unwrap();
    PeerInfo {
        peer: peer_id,
        cert: ParticipantCert {
            name: "p".into(),
            org: "o".into(),
            role,
            region: None,
            signing_public: id.signing.public().unwrap(),
            peer_id,
            sealing_public: id.sealing.public(),
            not_before: 0,
            not_after: 0,
            serial: Vec::new(),
            der: Vec::new(),
        },
        relayed: false,
        addr: "/ip4/127.0.0.1/tcp/1".parse().unwrap(),
    }
}

/// Admitted peers, shared with bulk handlers and the relay's admission filter.
#[derive(Debug, Clone, Default)]
pub struct PeerTable(Arc<RwLock<HashMap<PeerId, PeerInfo>>>);

impl PeerTable {
    /// The peer's record, if admitted.
    pub fn get(&self, peer: &PeerId) -> Option<PeerInfo> {
        self.0.read().ok()?.get(peer).cloned()
    }

    /// Whether the peer is admitted.
    pub fn is_admitted(&self, peer: &PeerId) -> bool {
        self.0.read().is_ok_and(|t| t.contains_key(peer))
    }

    /// The admitted peer with participant name `name`.
    pub fn by_name(&self, name: &str) -> Option<PeerInfo> {
        self.0
            .read()
            .ok()?
            .values()
            .find(|p| p.cert.name == name)
            .cloned()
    }

    /// All admitted peers.
    pub fn all(&self) -> Vec<PeerInfo> {
        self.0
            .read()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default()
    }

    fn insert(&self, info: PeerInfo) {
        if let Ok(mut t) = self.0.write() {
            t.insert(info.peer, info);
        }
    }

    fn remove(&self, peer: &PeerId) -> Option<PeerInfo> {
        self.0.write().ok()?.remove(peer)
    }

    fn update(&self, peer: &PeerId, f: impl FnOnce(&mut PeerInfo)) {
        if let Ok(mut t) = self.0.write()
            && let Some(p) = t.get_mut(peer)
        {
            f(p);
        }
    }
}

/// How many peers [`PeerNotes`] remembers (the oldest note goes first).
const MAX_NOTES: usize = 256;

/// What went wrong last with a peer: refusals either way and failed dials.
#[derive(Debug, Clone, Default)]
pub struct PeerNote {
    /// We refused the peer, and why (its certificate, its project, ...).
    pub refused_by_us: Option<(Instant, String)>,
    /// The peer refused us, and the reason it gave in its answer to our `Hello`.
    pub refused_by_peer: Option<(Instant, String)>,
    /// The last failed dial of the peer, and why.
    pub dial_error: Option<(Instant, String)>,
    /// Failed dials of the peer so far.
    pub dial_errors: u64,
    updated: Option<Instant>,
}

/// Refusals and dial failures per peer, written by the driver and read by `connect`, so a
/// node that cannot get in says why. Bounded to [`MAX_NOTES`] peers.
#[derive(Debug, Clone, Default)]
pub struct PeerNotes(Arc<RwLock<HashMap<PeerId, PeerNote>>>);

impl PeerNotes {
    /// The note on `peer`, if any.
    pub fn get(&self, peer: &PeerId) -> Option<PeerNote> {
        self.0.read().ok()?.get(peer).cloned()
    }

    fn edit(&self, peer: PeerId, f: impl FnOnce(&mut PeerNote)) {
        let Ok(mut t) = self.0.write() else { return };
        if !t.contains_key(&peer)
            && t.len() >= MAX_NOTES
            && let Some(oldest) = t.iter().min_by_key(|(_, n)| n.updated).map(|(p, _)| *p)
        {
            t.remove(&oldest);
        }
        let note = t.entry(peer).or_default();
        f(note);
        note.updated = Some(Instant::now());
    }
}

/// Second processes refused for an admitted identity (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    /// Where the last one connected from.
    pub addr: String,
    /// When the last one was refused, in ms since the Unix epoch.
    pub last_ms: u64,
    /// How many were refused.
    pub count: u64,
}

/// Refused duplicates per admitted peer. Only admitted identities get an entry, so it is
/// bounded by the project's participants.
#[derive(Debug, Clone, Default)]
pub struct Duplicates(Arc<RwLock<HashMap<PeerId, Duplicate>>>);

impl Duplicates {
    /// The refused duplicates of `peer`, if any.
    pub fn get(&self, peer: &PeerId) -> Option<Duplicate> {
        self.0.read().ok()?.get(peer).cloned()
    }

    fn record(&self, peer: PeerId, addr: String) {
        let last_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if let Ok(mut t) = self.0.write() {
            let d = t.entry(peer).or_insert(Duplicate {
                addr: String::new(),
                last_ms,
                count: 0,
            });
            d.addr = addr;
            d.last_ms = last_ms;
            d.count += 1;
        }
    }
}

/// Why a `Hello` was not accepted.
enum Refusal {
    /// The peer itself: its certificate, project or name. It is disconnected and blocked.
    Peer(String),
    /// A second process of an admitted peer: only this connection is closed.
    Duplicate(String),
}

/// How long a refused peer's connection stays open for the answer that says why.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// How long it stays open once the answer is written, so that it is flushed to the peer
/// (closing at once could drop it on a busy machine, and the peer, blocked from then on,
/// would never learn why).
const REFUSAL_FLUSH: Duration = Duration::from_millis(300);

/// What the driver reports to the node's roles.
#[derive(Debug)]
pub enum NetEvent {
    /// A peer was admitted.
    Admitted(PeerInfo),
    /// An admitted peer's last connection closed.
    Disconnected {
        /// The peer.
        peer: PeerId,
        /// Its participant name.
        name: String,
    },
    /// An admitted peer sent a control request; answer through `reply`.
    Request {
        /// The sender.
        from: PeerInfo,
        /// The request.
        request: ControlRequest,
        /// Where the answer goes.
        reply: oneshot::Sender<ControlResponse>,
    },
    /// A peer was refused admission.
    Refused {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// A relay circuit opened or closed (server only): for counters and tests.
    RelayCircuit {
        /// Source peer.
        src: PeerId,
        /// Destination peer.
        dst: PeerId,
        /// Opened (true) or closed (false).
        opened: bool,
    },
}

/// Where the answer to one of our requests goes.
type ReplyTo = oneshot::Sender<Result<ControlResponse, NetError>>;

enum Command {
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Listen {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Request {
        peer: PeerId,
        request: ControlRequest,
        reply: oneshot::Sender<Result<ControlResponse, NetError>>,
    },
    Respond {
        id: u64,
        response: ControlResponse,
    },
    Listeners {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    CloseRelayed {
        peer: PeerId,
        reply: oneshot::Sender<usize>,
    },
    Connections {
        peer: PeerId,
        reply: oneshot::Sender<Vec<(Multiaddr, bool)>>,
    },
    Disconnect {
        peer: PeerId,
    },
}

/// A cloneable handle to the swarm task.
#[derive(Clone)]
pub struct NetHandle {
    cmd: mpsc::Sender<Command>,
    /// Opens and accepts bulk streams without passing through the event loop.
    pub streams: libp2p_stream::Control,
    /// Admitted peers.
    pub peers: PeerTable,
    /// Refusals and failed dials per peer (why `connect` did not get in).
    pub notes: PeerNotes,
    /// Second processes refused per admitted peer.
    pub duplicates: Duplicates,
    /// This node's PeerId.
    pub local: PeerId,
    /// Whether DCUtR runs ([`NetConfig::hole_punching`]).
    pub hole_punching: bool,
}

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHandle")
            .field("local", &self.local)
            .finish()
    }
}

impl NetHandle {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(make(tx))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Dials an address (ending in `/p2p/<peer>` to check who answers).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.call(|reply| Command::Dial { addr, reply }).await?
    }

    /// Starts listening on an address (also `/p2p-circuit` addresses for relay reservations).
    pub async fn listen(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.call(|reply| Command::Listen { addr, reply }).await?
    }

    /// Sends a control request to an admitted peer and waits for the answer.
    pub async fn request(
        &self,
        peer: PeerId,
        request: ControlRequest,
    ) -> Result<ControlResponse, NetError> {
        self.call(|reply| Command::Request {
            peer,
            request,
            reply,
        })
        .await?
    }

    /// The addresses this node listens on.
    pub async fn listeners(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.call(|reply| Command::Listeners { reply }).await
    }

    /// Closes relayed connections to `peer` when a direct one exists, so bulk traffic goes
    /// direct; returns how many were closed.
    pub async fn close_relayed(&self, peer: PeerId) -> Result<usize, NetError> {
        self.call(|reply| Command::CloseRelayed { peer, reply })
            .await
    }

    /// The open connections to `peer`: address and whether it is relayed.
    pub async fn connections(&self, peer: PeerId) -> Result<Vec<(Multiaddr, bool)>, NetError> {
        self.call(|reply| Command::Connections { peer, reply })
            .await
    }

    /// Drops every connection to `peer`.
    pub async fn disconnect(&self, peer: PeerId) -> Result<(), NetError> {
        self.cmd
            .send(Command::Disconnect { peer })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Waits until `peer` is admitted, up to `timeout`.
    pub async fn wait_admitted(
        &self,
        peer: PeerId,
        timeout: Duration,
    ) -> Result<PeerInfo, NetError> {
        let start = Instant::now();
        loop {
            if let Some(p) = self.peers.get(&peer) {
                return Ok(p);
            }
            if start.elapsed() > timeout {
                return Err(NetError::Timeout(format!("admission of {peer}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    blocks: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    control: request_response::Behaviour<CborCodec<ControlRequest, ControlResponse>>,
    streams: libp2p_stream::Behaviour,
    relay_server: Toggle<relay::Behaviour>,
    relay_client: relay::client::Behaviour,
    dcutr: Toggle<dcutr::Behaviour>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// Credentials the driver presents and checks.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// This node's certificate, DER.
    pub cert_der: Vec<u8>,
    /// The project's root CA.
    pub root_ca: RootCa,
}

/// Starts the swarm task. Returns its handle and the event receiver.
pub fn spawn(
    keypair: libp2p::identity::Keypair,
    creds: Credentials,
    cfg: NetConfig,
) -> Result<(NetHandle, mpsc::Receiver<NetEvent>), NetError> {
    let peers = PeerTable::default();
    let relay_peers = peers.clone();
    let relay_server = cfg.relay_server;
    let request_timeout = cfg.request_timeout;
    let hole_punching = cfg.hole_punching;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_behaviour(|key, relay_client| {
            let local = key.public().to_peer_id();
            let relay = relay_server.then(|| {
                let admitted = relay_peers.clone();
                let admitted2 = relay_peers.clone();
                let mut rc = relay::Config {
                    max_reservations: 1024,
                    max_reservations_per_peer: 4,
                    reservation_duration: Duration::from_secs(3600),
                    max_circuits: 1024,
                    max_circuits_per_peer: 64,
                    // Model transfers need unlimited bytes and a long (non-zero) duration.
                    max_circuit_duration: Duration::from_secs(24 * 3600),
                    max_circuit_bytes: 0,
                    ..relay::Config::default()
                };
                rc.reservation_rate_limiters =
                    vec![Box::new(move |p: PeerId, _: &Multiaddr, _: Instant| {
                        admitted.is_admitted(&p)
                    })];
                rc.circuit_src_rate_limiters =
                    vec![Box::new(move |p: PeerId, _: &Multiaddr, _: Instant| {
                        admitted2.is_admitted(&p)
                    })];
                relay::Behaviour::new(local, rc)
            });
            let rr_cfg = request_response::Config::default()
                .with_request_timeout(request_timeout)
                .with_max_concurrent_streams(64);
            Ok(Behaviour {
                blocks: allow_block_list::Behaviour::default(),
                control: request_response::Behaviour::with_codec(
                    CborCodec::new(MAX_CONTROL_REQUEST, MAX_CONTROL_RESPONSE),
                    [(CONTROL_PROTOCOL, ProtocolSupport::Full)],
                    rr_cfg,
                ),
                streams: libp2p_stream::Behaviour::new(),
                relay_server: Toggle::from(relay),
                relay_client,
                dcutr: Toggle::from(hole_punching.then(|| dcutr::Behaviour::new(local))),
                identify: identify::Behaviour::new(identify::Config::new(
                    "/flare/1.0.0".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::new(
                    ping::Config::new()
                        .with_interval(Duration::from_secs(15))
                        .with_timeout(Duration::from_secs(60)),
                ),
            })
        })
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(cfg.idle_timeout))
        .build();
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Address {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
    }
    for addr in &cfg.external {
        swarm.add_external_address(addr.clone());
    }
    let local = *swarm.local_peer_id();
    let streams = swarm.behaviour().streams.new_control();
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (ev_tx, ev_rx) = mpsc::channel(256);
    let notes = PeerNotes::default();
    let duplicates = Duplicates::default();
    let driver = Driver {
        swarm,
        creds,
        cfg,
        peers: peers.clone(),
        notes: notes.clone(),
        duplicates: duplicates.clone(),
        instances: HashMap::new(),
        doomed_peers: HashMap::new(),
        doomed_conns: HashMap::new(),
        cmd_tx: cmd_tx.clone(),
        events: ev_tx,
        pending_admission: HashMap::new(),
        hello_sent: HashSet::new(),
        outbound: HashMap::new(),
        inbound: HashMap::new(),
        next_inbound: 0,
        connections: HashMap::new(),
    };
    tokio::spawn(driver.run(cmd_rx));
    Ok((
        NetHandle {
            cmd: cmd_tx,
            streams,
            peers,
            notes,
            duplicates,
            local,
            hole_punching,
        },
        ev_rx,
    ))
}

struct Driver {
    swarm: Swarm<Behaviour>,
    creds: Credentials,
    cfg: NetConfig,
    peers: PeerTable,
    notes: PeerNotes,
    duplicates: Duplicates,
    /// The process instance each admitted peer was admitted with.
    instances: HashMap<PeerId, u64>,
    /// Refused peers to disconnect and block once the answer saying why is sent (or by the
    /// deadline).
    doomed_peers: HashMap<PeerId, Instant>,
    /// Duplicate connections to close once the answer saying why is sent (or by the deadline).
    doomed_conns: HashMap<ConnectionId, (PeerId, Instant)>,
    cmd_tx: mpsc::Sender<Command>,
    events: mpsc::Sender<NetEvent>,
    /// Connected peers not yet admitted, with their deadline.
    pending_admission: HashMap<PeerId, Instant>,
    hello_sent: HashSet<PeerId>,
    /// Our requests in flight; `None` for the admission `Hello`.
    outbound: HashMap<OutboundRequestId, (PeerId, Option<ReplyTo>)>,
    inbound: HashMap<u64, ResponseChannel<ControlResponse>>,
    next_inbound: u64,
    /// Open connections per peer: id → (address, relayed).
    connections: HashMap<PeerId, HashMap<ConnectionId, (Multiaddr, bool)>>,
}

/// A dial error in a line: the innermost reason of each address tried ("Connection refused").
fn dial_error_text(e: &libp2p::swarm::DialError) -> String {
    match e {
        libp2p::swarm::DialError::Transport(list) => list
            .iter()
            .map(|(addr, err)| {
                let mut inner: &dyn std::error::Error = err;
                while let Some(src) = inner.source() {
                    inner = src;
                }
                format!("{addr}: {inner}")
            })
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

impl Driver {
    async fn run(mut self, mut cmd_rx: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm(ev).await,
                cmd = cmd_rx.recv() => match cmd {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                _ = tick.tick() => {
                    self.expire_admissions();
                    self.close_doomed(false);
                }
            }
        }
    }

    fn hello(&self) -> ControlRequest {
        ControlRequest::Hello {
            project: self.cfg.project.clone(),
            cert_der: ByteBuf::from(self.creds.cert_der.clone()),
            instance: self.cfg.instance,
        }
    }

    fn welcome(&self) -> ControlResponse {
        ControlResponse::Welcome {
            cert_der: ByteBuf::from(self.creds.cert_der.clone()),
            instance: self.cfg.instance,
        }
    }

    /// The remote address of one of `peer`'s connections, for logs and refusals.
    fn conn_addr(&self, peer: PeerId, conn: ConnectionId) -> String {
        self.connections
            .get(&peer)
            .and_then(|c| c.get(&conn))
            .map(|(a, _)| a.to_string())
            .unwrap_or_default()
    }

    /// Refuses `peer` now: disconnects and blocks it.
    fn refuse(&mut self, peer: PeerId, reason: String) {
        tracing::warn!(%peer, %reason, "peer refused admission; disconnecting and blocking");
        self.pending_admission.remove(&peer);
        self.doomed_peers.remove(&peer);
        self.swarm.behaviour_mut().blocks.block_peer(peer);
        let _ = self.swarm.disconnect_peer_id(peer);
        self.note_refusal(peer, reason);
    }

    /// Refuses `peer` whose `Hello` is answered on `channel` with the reason; it is
    /// disconnected and blocked once the answer is out ([`REFUSAL_LINGER`] at most).
    fn refuse_answering(
        &mut self,
        peer: PeerId,
        reason: String,
        channel: ResponseChannel<ControlResponse>,
    ) {
        tracing::warn!(%peer, %reason, "peer refused admission; telling it why, then disconnecting and blocking");
        self.pending_admission.remove(&peer);
        let answer = ControlResponse::Error {
            reason: format!("admission refused: {reason}"),
        };
        if self
            .swarm
            .behaviour_mut()
            .control
            .send_response(channel, answer)
            .is_ok()
        {
            self.doomed_peers
                .insert(peer, Instant::now() + REFUSAL_LINGER);
            self.note_refusal(peer, reason);
        } else {
            self.refuse(peer, reason);
        }
    }

    /// The peer answered our `Hello` with a refusal: note its reason and hang up (it would).
    fn refused_by_peer(&mut self, peer: PeerId, reason: String) {
        tracing::warn!(%peer, %reason, "the peer refused our admission");
        self.pending_admission.remove(&peer);
        self.notes.edit(peer, |n| {
            n.refused_by_peer = Some((Instant::now(), reason.clone()));
        });
        let _ = self.swarm.disconnect_peer_id(peer);
        let _ = self.events.try_send(NetEvent::Refused {
            peer,
            reason: format!("refused by the peer: {reason}"),
        });
    }

    fn note_refusal(&mut self, peer: PeerId, reason: String) {
        self.notes.edit(peer, |n| {
            n.refused_by_us = Some((Instant::now(), reason.clone()));
        });
        let _ = self.events.try_send(NetEvent::Refused { peer, reason });
    }

    /// Closes the connections and peers refused with an answer: all of them once `all`, else
    /// those past their deadline.
    fn close_doomed(&mut self, all: bool) {
        let now = Instant::now();
        let peers: Vec<PeerId> = self
            .doomed_peers
            .iter()
            .filter(|(_, d)| all || **d <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in peers {
            self.doomed_peers.remove(&peer);
            self.swarm.behaviour_mut().blocks.block_peer(peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let conns: Vec<ConnectionId> = self
            .doomed_conns
            .iter()
            .filter(|(_, (_, d))| all || *d <= now)
            .map(|(c, _)| *c)
            .collect();
        for conn in conns {
            self.doomed_conns.remove(&conn);
            self.swarm.close_connection(conn);
        }
    }

    /// The answer to a refusal went out (or failed) on `conn`: what it condemned is closed
    /// [`REFUSAL_FLUSH`] later, once the answer has left.
    fn refusal_answered(&mut self, peer: PeerId, conn: ConnectionId) {
        let flushed = Instant::now() + REFUSAL_FLUSH;
        if let Some(d) = self.doomed_peers.get_mut(&peer) {
            *d = (*d).min(flushed);
        }
        if let Some((_, d)) = self.doomed_conns.get_mut(&conn) {
            *d = (*d).min(flushed);
        }
    }

    /// Whether `peer`, admitted with another instance, still has a live connection besides
    /// `conn`; if so the `Hello` on `conn` comes from a second process with the same kit.
    fn duplicate_of_admitted(&self, peer: PeerId, conn: ConnectionId, instance: u64) -> bool {
        let Some(known) = self.instances.get(&peer) else {
            return false;
        };
        *known != instance
            && self.connections.get(&peer).is_some_and(|c| {
                c.keys()
                    .any(|id| *id != conn && !self.doomed_conns.contains_key(id))
            })
    }

    /// Checks a `Hello` (or `Welcome`) from `peer` on `conn` and admits the peer.
    fn admit(
        &mut self,
        peer: PeerId,
        conn: ConnectionId,
        project: &str,
        cert_der: &[u8],
        instance: u64,
    ) -> Result<(), Refusal> {
        if let Some(info) = self.peers.get(&peer) {
            if self.duplicate_of_admitted(peer, conn, instance) {
                let addr = self.conn_addr(peer, conn);
                return Err(Refusal::Duplicate(format!(
                    "{} is already connected from {} by another process with the same kit; \
                     one identity runs once (this connection came from {addr})",
                    info.cert.name, info.addr
                )));
            }
            if self
                .instances
                .insert(peer, instance)
                .is_some_and(|old| old != instance)
            {
                // The old process's connections are gone: a restart. The roles see it as one.
                tracing::info!(%peer, name = %info.cert.name, "peer restarted; the new process takes over");
                let _ = self.events.try_send(NetEvent::Disconnected {
                    peer,
                    name: info.cert.name.clone(),
                });
                self.refresh_connection_info(peer);
                if let Some(info) = self.peers.get(&peer) {
                    let _ = self.events.try_send(NetEvent::Admitted(info));
                }
            }
            return Ok(());
        }
        if project != self.cfg.project {
            return Err(Refusal::Peer(format!(
                "belongs to project {project:?}, not {:?}",
                self.cfg.project
            )));
        }
        let roles = [
            flare_crypto::RoleKind::Server,
            flare_crypto::RoleKind::Client,
            flare_crypto::RoleKind::Admin,
            flare_crypto::RoleKind::Relay,
            flare_crypto::RoleKind::Hub,
        ];
        match self
            .creds
            .root_ca
            .verify_peer(cert_der, SystemTime::now(), &peer, &roles)
        {
            Ok(cert) => {
                // A hub's certificate is good only in its region and the one above it.
                flare_crypto::check_region(self.cfg.region.as_deref(), &cert)
                    .map_err(|e| Refusal::Peer(e.to_string()))?;
                if let Some(other) = self.peers.by_name(&cert.name)
                    && other.peer != peer
                {
                    return Err(Refusal::Peer(format!(
                        "name {:?} is already taken by {}",
                        cert.name, other.peer
                    )));
                }
                let conns = self.connections.get(&peer);
                let relayed = conns.is_some_and(|c| c.values().all(|(_, r)| *r));
                let addr = conns
                    .and_then(|c| c.values().next().map(|(a, _)| a.clone()))
                    .unwrap_or_else(Multiaddr::empty);
                let info = PeerInfo {
                    peer,
                    cert,
                    relayed,
                    addr,
                };
                tracing::info!(%peer, name = %info.cert.name, role = %info.cert.role, relayed, "peer admitted");
                self.pending_admission.remove(&peer);
                self.instances.insert(peer, instance);
                self.peers.insert(info.clone());
                let _ = self.events.try_send(NetEvent::Admitted(info));
                Ok(())
            }
            Err(e) => Err(Refusal::Peer(format!("certificate rejected: {e}"))),
        }
    }

    /// Refuses a second process of an admitted peer: only `conn` is closed, after the answer
    /// on `channel` (if any) tells it why.
    fn refuse_duplicate(
        &mut self,
        peer: PeerId,
        conn: ConnectionId,
        reason: String,
        channel: Option<ResponseChannel<ControlResponse>>,
    ) {
        let addr = self.conn_addr(peer, conn);
        let name = self
            .peers
            .get(&peer)
            .map(|p| p.cert.name)
            .unwrap_or_default();
        tracing::warn!(%peer, %name, %addr, %reason, "second process with an admitted identity refused; closing its connection");
        self.duplicates.record(peer, addr);
        let answered = channel.is_some_and(|ch| {
            self.swarm
                .behaviour_mut()
                .control
                .send_response(
                    ch,
                    ControlResponse::Error {
                        reason: format!("admission refused: duplicate: {reason}"),
                    },
                )
                .is_ok()
        });
        if answered {
            self.doomed_conns
                .insert(conn, (peer, Instant::now() + REFUSAL_LINGER));
        } else {
            self.swarm.close_connection(conn);
        }
        self.refresh_connection_info(peer);
    }

    /// Recomputes an admitted peer's `relayed` and `addr` from its live connections (those not
    /// about to be closed as duplicates).
    fn refresh_connection_info(&mut self, peer: PeerId) {
        let Some(c) = self.connections.get(&peer) else {
            return;
        };
        let live: Vec<&(Multiaddr, bool)> = c
            .iter()
            .filter(|(id, _)| !self.doomed_conns.contains_key(id))
            .map(|(_, v)| v)
            .collect();
        if live.is_empty() {
            return;
        }
        let relayed = live.iter().all(|(_, r)| *r);
        let addr = live
            .iter()
            .find(|(_, r)| !*r)
            .or(live.first())
            .map(|(a, _)| a.clone());
        self.peers.update(&peer, |p| {
            p.relayed = relayed;
            if let Some(a) = addr {
                p.addr = a;
            }
        });
    }

    fn expire_admissions(&mut self) {
        let now = Instant::now();
        let late: Vec<PeerId> = self
            .pending_admission
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in late {
            self.refuse(peer, "not admitted in time".into());
        }
    }

    async fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let addr = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => address.clone(),
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr.clone(),
                };
                let relayed = endpoint.is_relayed() || is_relayed(&addr);
                self.connections
                    .entry(peer_id)
                    .or_default()
                    .insert(connection_id, (addr.clone(), relayed));
                if self.peers.is_admitted(&peer_id) {
                    // A direct connection replaces a relayed one as the peer's address; a
                    // second direct one (perhaps another process with the same kit, which
                    // its `Hello` will tell) does not.
                    if !relayed {
                        self.peers.update(&peer_id, |p| {
                            if p.relayed {
                                p.relayed = false;
                                p.addr = addr.clone();
                            }
                        });
                    }
                    return;
                }
                self.pending_admission
                    .entry(peer_id)
                    .or_insert_with(|| Instant::now() + self.cfg.admission_timeout);
                if self.hello_sent.insert(peer_id) {
                    let hello = self.hello();
                    let id = self
                        .swarm
                        .behaviour_mut()
                        .control
                        .send_request(&peer_id, hello);
                    self.outbound.insert(id, (peer_id, None));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                if let Some(c) = self.connections.get_mut(&peer_id) {
                    c.remove(&connection_id);
                }
                self.doomed_conns.remove(&connection_id);
                if num_established == 0 {
                    self.connections.remove(&peer_id);
                    self.pending_admission.remove(&peer_id);
                    self.hello_sent.remove(&peer_id);
                    self.instances.remove(&peer_id);
                    self.doomed_peers.remove(&peer_id);
                    if let Some(info) = self.peers.remove(&peer_id) {
                        tracing::info!(peer = %peer_id, name = %info.cert.name, "peer disconnected");
                        let _ = self.events.try_send(NetEvent::Disconnected {
                            peer: peer_id,
                            name: info.cert.name,
                        });
                    }
                } else {
                    self.refresh_connection_info(peer_id);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Control(ev)) => self.on_control(ev).await,
            SwarmEvent::Behaviour(BehaviourEvent::RelayServer(ev)) => match ev {
                relay::Event::CircuitReqAccepted {
                    src_peer_id: src,
                    dst_peer_id: dst,
                } => {
                    let _ = self.events.try_send(NetEvent::RelayCircuit {
                        src,
                        dst,
                        opened: true,
                    });
                }
                relay::Event::CircuitClosed {
                    src_peer_id: src,
                    dst_peer_id: dst,
                    ..
                } => {
                    let _ = self.events.try_send(NetEvent::RelayCircuit {
                        src,
                        dst,
                        opened: false,
                    });
                }
                other => tracing::debug!(?other, "relay server"),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                // Learn the peer's listen addresses so later dials and DCUtR can use them.
                for addr in info.listen_addrs {
                    self.swarm.add_peer_address(peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(ev)) => {
                tracing::info!(peer = %ev.remote_peer_id, result = ?ev.result.map(|_| ()), "hole punch");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(?peer_id, %error, "dial failed");
                if let Some(peer) = peer_id {
                    let why = dial_error_text(&error);
                    self.notes.edit(peer, |n| {
                        n.dial_error = Some((Instant::now(), why));
                        n.dial_errors += 1;
                    });
                }
            }
            _ => {}
        }
    }

    async fn on_control(&mut self, ev: request_response::Event<ControlRequest, ControlResponse>) {
        use request_response::{Event, Message};
        match ev {
            Event::Message {
                peer,
                connection_id,
                message:
                    Message::Request {
                        request, channel, ..
                    },
            } => {
                if let ControlRequest::Hello {
                    project,
                    cert_der,
                    instance,
                } = &request
                {
                    match self.admit(peer, connection_id, project, cert_der, *instance) {
                        Ok(()) => {
                            let welcome = self.welcome();
                            let _ = self
                                .swarm
                                .behaviour_mut()
                                .control
                                .send_response(channel, welcome);
                        }
                        Err(Refusal::Peer(reason)) => self.refuse_answering(peer, reason, channel),
                        Err(Refusal::Duplicate(reason)) => {
                            self.refuse_duplicate(peer, connection_id, reason, Some(channel));
                        }
                    }
                    return;
                }
                let Some(from) = self.peers.get(&peer) else {
                    tracing::warn!(%peer, "control request from a peer that is not admitted");
                    let _ = self.swarm.behaviour_mut().control.send_response(
                        channel,
                        ControlResponse::Error {
                            reason: "not admitted".into(),
                        },
                    );
                    return;
                };
                let id = self.next_inbound;
                self.next_inbound += 1;
                self.inbound.insert(id, channel);
                let (tx, rx) = oneshot::channel();
                let cmd = self.cmd_tx.clone();
                // The role answers on `tx`; the answer returns through the command channel, so
                // the event loop never waits for a role.
                tokio::spawn(async move {
                    let response = rx.await.unwrap_or(ControlResponse::Error {
                        reason: "the node dropped the request".into(),
                    });
                    let _ = cmd.send(Command::Respond { id, response }).await;
                });
                if self
                    .events
                    .try_send(NetEvent::Request {
                        from,
                        request,
                        reply: tx,
                    })
                    .is_err()
                {
                    tracing::warn!(%peer, "event queue full; request dropped");
                }
            }
            Event::Message {
                peer,
                connection_id,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
            } => {
                let Some((_, reply)) = self.outbound.remove(&request_id) else {
                    return;
                };
                match reply {
                    Some(tx) => {
                        let _ = tx.send(Ok(response));
                    }
                    None => match response {
                        ControlResponse::Welcome { cert_der, instance } => {
                            let project = self.cfg.project.clone();
                            match self.admit(peer, connection_id, &project, &cert_der, instance) {
                                Ok(()) => {}
                                Err(Refusal::Peer(reason)) => self.refuse(peer, reason),
                                Err(Refusal::Duplicate(reason)) => {
                                    self.refuse_duplicate(peer, connection_id, reason, None);
                                }
                            }
                        }
                        ControlResponse::Error { reason } => self.refused_by_peer(peer, reason),
                        other => self.refuse(peer, format!("answered Hello with {other:?}")),
                    },
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((_, Some(tx))) = self.outbound.remove(&request_id) {
                    let _ = tx.send(Err(NetError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            Event::InboundFailure {
                peer,
                connection_id,
                error,
                ..
            } => {
                tracing::warn!(%peer, %error, "inbound control request failed");
                self.refusal_answered(peer, connection_id);
            }
            Event::ResponseSent {
                peer,
                connection_id,
                ..
            } => self.refusal_answered(peer, connection_id),
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial { addr, reply } => {
                let r = self
                    .swarm
                    .dial(addr.clone())
                    .map_err(|e| NetError::Address {
                        addr: addr.to_string(),
                        reason: e.to_string(),
                    });
                let _ = reply.send(r);
            }
            Command::Listen { addr, reply } => {
                let r =
                    self.swarm
                        .listen_on(addr.clone())
                        .map(|_| ())
                        .map_err(|e| NetError::Address {
                            addr: addr.to_string(),
                            reason: e.to_string(),
                        });
                let _ = reply.send(r);
            }
            Command::Request {
                peer,
                request,
                reply,
            } => {
                if !self.peers.is_admitted(&peer) {
                    let _ = reply.send(Err(NetError::NotAdmitted(peer)));
                    return;
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .control
                    .send_request(&peer, request);
                self.outbound.insert(id, (peer, Some(reply)));
            }
            Command::Respond { id, response } => {
                if let Some(ch) = self.inbound.remove(&id) {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .control
                        .send_response(ch, response);
                }
            }
            Command::Listeners { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::CloseRelayed { peer, reply } => {
                let mut closed = 0;
                if let Some(c) = self.connections.get(&peer)
                    && c.values().any(|(_, r)| !*r)
                {
                    let relayed: Vec<ConnectionId> = c
                        .iter()
                        .filter(|(_, (_, r))| *r)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in relayed {
                        if self.swarm.close_connection(id) {
                            closed += 1;
                        }
                    }
                }
                let _ = reply.send(closed);
            }
            Command::Connections { peer, reply } => {
                let list = self
                    .connections
                    .get(&peer)
                    .map(|c| c.values().cloned().collect())
                    .unwrap_or_default();
                let _ = reply.send(list);
            }
            Command::Disconnect { peer } => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }
}
