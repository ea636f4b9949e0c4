//! Direct-versus-relay connection logic for peer-to-peer transfers between two sites.
//!
//! [`connect_peer`] tries the peer's direct addresses first (short timeout), then a circuit
//! through a relay (`<relay>/p2p/<relay-id>/p2p-circuit/p2p/<peer>`). With hole punching on it
//! then waits briefly for DCUtR to bring a direct connection. Whenever a direct connection
//! exists it closes the relayed ones before returning: libp2p-stream picks a connection at
//! random, so a relayed connection left open would carry part of the bulk traffic.

use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use super::{NetError, NetHandle, PeerInfo};

/// How long the direct addresses get before the relay is tried.
pub const DIRECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait for DCUtR after a relayed connection (it fails slowly, ~30 s).
pub const HOLE_PUNCH_WAIT: Duration = Duration::from_secs(4);
/// How long a new direct connection gets to settle on the remote's side before the relayed
/// one is closed.
pub const DIRECT_GRACE: Duration = Duration::from_millis(300);

/// Splits `<relay addr>/p2p/<relay>/p2p-circuit[/p2p/<peer>]` into the relay's PeerId and its
/// dialable address (with `/p2p/<relay>`).
pub fn relay_of(circuit: &Multiaddr) -> Option<(PeerId, Multiaddr)> {
    let mut base = Multiaddr::empty();
    let mut relay = None;
    for p in circuit.iter() {
        match p {
            Protocol::P2pCircuit => return relay.map(|r| (r, base)),
            Protocol::P2p(id) => {
                relay = Some(id);
                base.push(p);
            }
            other => base.push(other),
        }
    }
    None
}

/// Ensures `addr` ends in `/p2p/<peer>`, so the dial checks who answers.
fn with_peer(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    match addr.iter().last() {
        Some(Protocol::P2p(id)) if id == peer => addr.clone(),
        _ => addr.clone().with(Protocol::P2p(peer)),
    }
}

/// Polls until `ok` holds for the peer's record or `deadline` passes.
async fn wait_for(
    net: &NetHandle,
    peer: PeerId,
    deadline: Instant,
    ok: impl Fn(&PeerInfo) -> bool,
) -> Option<PeerInfo> {
    loop {
        if let Some(p) = net.peers.get(&peer).filter(|p| ok(p)) {
            return Some(p);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Closes relayed connections to `peer` (it has a direct one) and returns its fresh record.
///
/// The direct connection completes on our side a moment before the remote's (the last
/// handshake message is in flight), so closing the relayed one at once can leave the remote
/// with no connection for an instant: it would drop our admission. Hence the grace period
/// first. Then it waits until the relayed connections are really gone: a stream opened while
/// one is still closing may pick it and fail.
async fn go_direct(net: &NetHandle, peer: PeerId) -> Result<PeerInfo, NetError> {
    let has_relayed = |c: &[(Multiaddr, bool)]| c.iter().any(|(_, r)| *r);
    if has_relayed(&net.connections(peer).await?) {
        tokio::time::sleep(DIRECT_GRACE).await;
        let closed = net.close_relayed(peer).await?;
        tracing::info!(%peer, closed, "closed relayed connections; bulk traffic goes direct");
        let deadline = Instant::now() + Duration::from_secs(5);
        while has_relayed(&net.connections(peer).await?) {
            if Instant::now() >= deadline {
                return Err(NetError::Timeout(format!(
                    "closing the relayed connection to {peer}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    net.peers.get(&peer).ok_or(NetError::NotAdmitted(peer))
}

/// Connects to `peer` and returns its admitted record, direct when possible.
///
/// 1. Dials `direct` (each gets `/p2p/<peer>` appended if missing) and waits up to
///    [`DIRECT_TIMEOUT`] for a direct, admitted connection.
/// 2. Otherwise, when `relay_circuit` is given (`<relay>/p2p/<relay-id>/p2p-circuit`, with or
///    without `/p2p/<peer>`), connects to the relay first (the relay serves admitted peers
///    only) and dials the peer through it.
/// 3. With hole punching on ([`NetHandle::hole_punching`]), waits up to [`HOLE_PUNCH_WAIT`]
///    for DCUtR to add a direct connection.
///
/// Whenever a direct connection exists, relayed ones are closed before returning.
pub async fn connect_peer(
    net: &NetHandle,
    peer: PeerId,
    direct: &[Multiaddr],
    relay_circuit: Option<&Multiaddr>,
    timeout: Duration,
) -> Result<PeerInfo, NetError> {
    let deadline = Instant::now() + timeout;
    if let Some(p) = net.peers.get(&peer)
        && !p.relayed
    {
        return go_direct(net, peer).await;
    }
    if !direct.is_empty() {
        for a in direct {
            if let Err(e) = net.dial(with_peer(a, peer)).await {
                tracing::debug!(%peer, addr = %a, %e, "direct dial refused");
            }
        }
        let until = deadline.min(Instant::now() + DIRECT_TIMEOUT);
        if wait_for(net, peer, until, |p| !p.relayed).await.is_some() {
            tracing::info!(%peer, "connected direct");
            return go_direct(net, peer).await;
        }
        tracing::info!(%peer, "no direct connection; trying the relay");
    }
    let Some(circuit) = relay_circuit else {
        return Err(NetError::Timeout(format!(
            "direct connection to {peer} (no relay to fall back to)"
        )));
    };
    let Some((relay, relay_addr)) = relay_of(circuit) else {
        return Err(NetError::Address {
            addr: circuit.to_string(),
            reason: "not a relay circuit address (<relay>/p2p/<id>/p2p-circuit)".into(),
        });
    };
    if !net.peers.is_admitted(&relay) {
        net.dial(relay_addr).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        net.wait_admitted(relay, left).await?;
    }
    if !net.peers.is_admitted(&peer) {
        let mut via = Multiaddr::empty();
        for p in circuit.iter() {
            if matches!(p, Protocol::P2p(id) if id == peer) {
                break;
            }
            via.push(p);
        }
        net.dial(via.with(Protocol::P2p(peer))).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        net.wait_admitted(peer, left).await?;
    }
    if net.hole_punching {
        let until = deadline.min(Instant::now() + HOLE_PUNCH_WAIT);
        if wait_for(net, peer, until, |p| !p.relayed).await.is_some() {
            tracing::info!(%peer, "hole punch brought a direct connection");
            return go_direct(net, peer).await;
        }
        tracing::info!(%peer, "no hole punch in time; staying on the relay");
    }
    net.peers.get(&peer).ok_or(NetError::NotAdmitted(peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_of_splits_circuit_addresses() {
        let relay = PeerId::random();
        let peer = PeerId::random();
        let base: Multiaddr = "/ip4/10.0.1.1/tcp/8002".parse().unwrap();
        let circuit = base
            .clone()
            .with(Protocol::P2p(relay))
            .with(Protocol::P2pCircuit)
            .with(Protocol::P2p(peer));
        let (r, a) = relay_of(&circuit).unwrap();
        assert_eq!(r, relay);
        assert_eq!(a, base.with(Protocol::P2p(relay)));
        assert!(relay_of(&"/ip4/10.0.1.1/tcp/8002".parse().unwrap()).is_none());
    }

    #[test]
    fn with_peer_appends_once() {
        let peer = PeerId::random();
        let a: Multiaddr = "/ip4/10.0.1.2/tcp/9000".parse().unwrap();
        let b = with_peer(&a, peer);
        assert_eq!(with_peer(&b, peer), b);
        assert_eq!(b, a.with(Protocol::P2p(peer)));
    }
}
