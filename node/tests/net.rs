//! The libp2p driver over real loopback TCP with Noise, using kits from real provisioning:
//! admission, refusal of foreign and stolen certificates, and sealed bulk transfers.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use flare_node::net::bulk::{self, Route, Sealing, TransferMeta};
use flare_node::net::protocol::BULK_PROTOCOL;
use flare_node::net::{Credentials, NetConfig, NetEvent, NetHandle, PeerInfo, spawn};
use flare_protocols::model::{FLModel, Tensor};
use flare_protocols::shareable::ReturnCode;
use flare_provision::kit::{Kit, load_kit};
use flare_provision::poc::{PocOptions, prepare_now};
use futures::StreamExt;
use libp2p::Multiaddr;
use tokio::sync::mpsc;

fn poc(dir: &Path, clients: usize) -> Vec<Kit> {
    let out = prepare_now(&PocOptions {
        workspace: dir.to_path_buf(),
        clients,
        base_port: None,
    })
    .unwrap();
    out.provisioned
        .kits
        .iter()
        .map(|(_, p)| load_kit(&p.join("startup"), SystemTime::now()).unwrap())
        .collect()
}

fn kit<'a>(kits: &'a [Kit], name: &str) -> &'a Kit {
    kits.iter().find(|k| k.name() == name).unwrap()
}

fn start(k: &Kit, listen: bool) -> (NetHandle, mpsc::Receiver<NetEvent>) {
    start_as(k, &k.cert.der, listen)
}

fn start_as(k: &Kit, cert_der: &[u8], listen: bool) -> (NetHandle, mpsc::Receiver<NetEvent>) {
    let cfg = NetConfig {
        listen: if listen {
            vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()]
        } else {
            vec![]
        },
        project: k.config.project.clone(),
        admission_timeout: Duration::from_secs(3),
        ..NetConfig::default()
    };
    spawn(
        k.identity.signing.to_libp2p().unwrap(),
        Credentials {
            cert_der: cert_der.to_vec(),
            root_ca: k.root_ca.clone(),
        },
        cfg,
    )
    .unwrap()
}

async fn listen_addr(h: &NetHandle) -> Multiaddr {
    for _ in 0..100 {
        if let Some(a) = h.listeners().await.unwrap().into_iter().next() {
            return a.with(libp2p::multiaddr::Protocol::P2p(h.local));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no listen address");
}

async fn refused(rx: &mut mpsc::Receiver<NetEvent>) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(NetEvent::Refused { reason, .. })) => return reason,
            Ok(Some(_)) => {}
            other => panic!("no refusal: {other:?}"),
        }
    }
}

/// Dials `s` from `c` and waits until each has admitted the other: (`s` as `c` sees it, `c`
/// as `s` sees it).
async fn admitted_pair(s: &NetHandle, c: &NetHandle) -> (PeerInfo, PeerInfo) {
    c.dial(listen_addr(s).await).await.unwrap();
    let on_client = c
        .wait_admitted(s.local, Duration::from_secs(10))
        .await
        .unwrap();
    let on_server = s
        .wait_admitted(c.local, Duration::from_secs(10))
        .await
        .unwrap();
    (on_client, on_server)
}

/// The route and meta of a training result of `round`, task `task_id`.
fn result_of(task_id: u64, round: u32) -> (Route, TransferMeta) {
    let route = Route {
        job: "j1".into(),
        workflow: "sag".into(),
        round: u64::from(round),
        kind: "result".into(),
    };
    let meta = TransferMeta {
        task_id,
        task_name: "train".into(),
        round,
        return_code: ReturnCode::Ok,
        headers: BTreeMap::new(),
        skeleton: None,
        body: None,
        resume: None,
    };
    (route, meta)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admitted_peers_exchange_a_sealed_model() {
    let dir = tempfile::tempdir().unwrap();
    let kits = poc(dir.path(), 2);
    let server = kit(&kits, "server");
    let site = kit(&kits, "site-1");
    let (s, _srx) = start(server, true);
    let (c, _crx) = start(site, false);
    let (on_client, on_server) = admitted_pair(&s, &c).await;
    assert_eq!(on_client.cert.name, "server");
    assert_eq!(on_server.cert.name, "site-1");
    assert!(!on_server.relayed);

    // A 3 MiB model, sealed to the server, through a bulk stream.
    let values: Vec<f32> = (0..786_432).map(|i| i as f32).collect();
    let model = FLModel::from_params(BTreeMap::from([(
        "w".to_string(),
        Tensor::from_f32(vec![768, 1024], &values).unwrap(),
    )]));
    let mut incoming = s.streams.clone().accept(BULK_PROTOCOL).unwrap();
    let server_sealing = Sealing::new(s.local, server.identity.sealing.clone());
    let client_sealing = Sealing::new(c.local, site.identity.sealing.clone());
    let (route, meta) = result_of(9, 3);
    let sender = {
        let mut ctl = c.streams.clone();
        let model = model.clone();
        let route = route.clone();
        let meta = meta.clone();
        tokio::spawn(async move {
            let mut st = ctl
                .open_stream(on_client.peer, BULK_PROTOCOL)
                .await
                .unwrap();
            bulk::send(
                &mut st,
                &client_sealing,
                &on_client,
                &route,
                meta,
                Some(&model),
            )
            .await
            .unwrap()
        })
    };
    let (peer, mut st) = incoming.next().await.unwrap();
    let from = s.peers.get(&peer).unwrap();
    let got = bulk::receive(&mut st, &server_sealing, &from, 1 << 30)
        .await
        .unwrap();
    let sent = sender.await.unwrap();
    assert_eq!(got.model.as_ref(), Some(&model));
    assert_eq!(got.meta.task_id, 9);
    assert_eq!(got.header.job, "j1");
    assert_eq!(got.header.kind, "result");
    assert_eq!(got.bytes, sent);
    // Sealing adds a tag per 1 MiB chunk and a header: a little over the model's size.
    assert!(
        sent > 3 * (1 << 20) && sent < 3 * (1 << 20) + 4096,
        "{sent}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ours = poc(&dir.path().join("a"), 1);
    let theirs = poc(&dir.path().join("b"), 1);
    let (s, mut srx) = start(kit(&ours, "server"), true);
    // Same project name, same participant name, but a different root CA.
    let (c, mut crx) = start(kit(&theirs, "site-1"), false);
    c.dial(listen_addr(&s).await).await.unwrap();
    // Each side finds the other's certificate foreign; whichever checks first refuses and
    // hangs up, so the refusal may be reported on either side.
    let reason = tokio::select! {
        r = refused(&mut srx) => r,
        r = refused(&mut crx) => r,
    };
    assert!(reason.contains("certificate rejected"), "{reason}");
    assert!(!s.peers.is_admitted(&c.local));
    // Blocked: a second dial does not get admitted either.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = c.dial(listen_addr(&s).await).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!s.peers.is_admitted(&c.local));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kits = poc(dir.path(), 2);
    let (s, mut srx) = start(kit(&kits, "server"), true);
    // site-2's key presenting site-1's certificate: the key is not the certificate's.
    let stolen = kit(&kits, "site-1").cert.der.clone();
    let (c, _crx) = start_as(kit(&kits, "site-2"), &stolen, false);
    c.dial(listen_addr(&s).await).await.unwrap();
    let reason = refused(&mut srx).await;
    assert!(reason.contains("certificate rejected"), "{reason}");
    assert!(!s.peers.is_admitted(&c.local));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_dropped_after_the_admission_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let kits = poc(dir.path(), 1);
    let (s, mut srx) = start(kit(&kits, "server"), true);
    // A plain libp2p node with Noise but without our protocol: it never says Hello.
    let mut stranger = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| libp2p::ping::Behaviour::default())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    stranger.dial(listen_addr(&s).await).unwrap();
    let drive = tokio::spawn(async move {
        loop {
            stranger.select_next_some().await;
        }
    });
    let reason = refused(&mut srx).await;
    assert!(reason.contains("not admitted in time"), "{reason}");
    drive.abort();
}

/// A stream that counts what is read from it, says so once `at` bytes went through, and
/// then (with `cut`) fails as a reset connection does.
struct Counting<S> {
    cut: bool,
    inner: S,
    read: u64,
    at: u64,
    tell: Option<tokio::sync::oneshot::Sender<()>>,
}

impl<S: futures::AsyncRead + Unpin> futures::AsyncRead for Counting<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.cut && this.read >= this.at {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
        }
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            this.read += *n as u64;
            if this.read >= this.at
                && let Some(t) = this.tell.take()
            {
                let _ = t.send(());
            }
        }
        r
    }
}

impl<S: futures::AsyncWrite + Unpin> futures::AsyncWrite for Counting<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// A transfer whose connection is cut in the middle resumes where it broke: the attempt
/// after the cut carries only the rest, and the model arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_cut_mid_way_resumes_from_what_arrived() {
    let dir = tempfile::tempdir().unwrap();
    let kits = poc(dir.path(), 2);
    let server = kit(&kits, "server");
    let site = kit(&kits, "site-1");
    let (s, _srx) = start(server, true);
    let (c, _crx) = start(site, false);
    let addr = listen_addr(&s).await;
    let (on_client, _) = admitted_pair(&s, &c).await;

    // 48 MiB in one tensor and a small one after it.
    let big: Vec<f32> = (0..12 << 20).map(|i| (i % 1000) as f32).collect();
    let model = FLModel::from_params(BTreeMap::from([
        (
            "a".to_string(),
            Tensor::from_f32(vec![big.len()], &big).unwrap(),
        ),
        (
            "b".to_string(),
            Tensor::from_f32(vec![3], &[1.0, 2.0, 3.0]).unwrap(),
        ),
    ]));
    let model_bytes = model.num_bytes() as u64;
    let server_sealing = Sealing::new(s.local, server.identity.sealing.clone());
    let client_sealing = Sealing::new(c.local, site.identity.sealing.clone());
    let (route, meta) = result_of(4, 1);
    let mut incoming = s.streams.clone().accept(BULK_PROTOCOL).unwrap();
    let (cut_tx, cut_rx) = tokio::sync::oneshot::channel();
    let receiver = {
        let s_peers = s.peers.clone();
        tokio::spawn(async move {
            let mut tell = Some(cut_tx);
            let mut attempts = Vec::new();
            loop {
                let (peer, st) = incoming.next().await.unwrap();
                let from = s_peers.get(&peer).unwrap();
                let mut st = Counting {
                    cut: tell.is_some(),
                    inner: st,
                    read: 0,
                    at: 20 << 20,
                    tell: tell.take(),
                };
                let got = bulk::receive(&mut st, &server_sealing, &from, 1 << 30).await;
                attempts.push(st.read);
                if let Ok(got) = got {
                    return (got, attempts);
                }
            }
        })
    };
    let sender = {
        let c = c.clone();
        let model = model.clone();
        tokio::spawn(async move {
            bulk::deliver(&c, &client_sealing, &on_client, &route, &meta, Some(&model)).await
        })
    };
    // Past 20 MiB the connection goes (the server's end of the stream fails as a reset one
    // does, and the server drops the connection); the site dials again, as a site does.
    cut_rx.await.unwrap();
    s.disconnect(c.local).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.dial(addr).await.unwrap();
    let (got, attempts) = tokio::time::timeout(Duration::from_secs(60), receiver)
        .await
        .unwrap()
        .unwrap();
    sender.await.unwrap().unwrap();
    assert_eq!(got.model.as_ref(), Some(&model));
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    // The first attempt brought at least 20 MiB; the second carried only the rest.
    assert!(attempts[0] >= 20 << 20, "{attempts:?}");
    assert!(
        attempts[1] < model_bytes - (16 << 20),
        "the attempt after the cut sent {} of {model_bytes} bytes",
        attempts[1]
    );
    assert!(
        attempts[0] + attempts[1] < model_bytes + (model_bytes / 10),
        "{attempts:?} for {model_bytes}"
    );
}

/// Kits of a tiered POC (`poc prepare --regions 2 -n 1`), by folder under `prod_NN`.
fn tiered_poc(dir: &Path) -> Vec<(String, Kit)> {
    let out = flare_provision::poc::prepare_tiered_now(
        &PocOptions {
            workspace: dir.to_path_buf(),
            clients: 1,
            base_port: None,
        },
        2,
    )
    .unwrap();
    let prod = out.provisioned.prod_dir.clone();
    out.provisioned
        .kits
        .iter()
        .map(|(_, p)| {
            let rel = p.strip_prefix(&prod).unwrap().display().to_string();
            (
                rel,
                load_kit(&p.join("startup"), SystemTime::now()).unwrap(),
            )
        })
        .collect()
}

fn at<'a>(kits: &'a [(String, Kit)], rel: &str) -> &'a Kit {
    &kits.iter().find(|(r, _)| r == rel).unwrap().1
}

/// An endpoint of `k` on a free loopback port (or none), in `region`, through the node's own
/// `start_net_in`.
fn start_in(k: &Kit, region: Option<&str>, listen: bool) -> (NetHandle, mpsc::Receiver<NetEvent>) {
    let endpoint = flare_node::roles::Endpoint {
        region: region.map(str::to_string),
        listen: if listen {
            vec!["/ip4/127.0.0.1/tcp/0".into()]
        } else {
            vec![]
        },
        relay_server: false,
        external: vec![],
    };
    flare_node::roles::start_net_in(k, &endpoint).unwrap()
}

/// A hub's certificate is scoped to its region: a site of region-2 refuses hub region-1 (even
/// one whose own endpoint would admit it), tells it why, and admits its own hub; the tier-1
/// server admits a hub and refuses a region's site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_admits_only_its_own_regions_hub() {
    let dir = tempfile::tempdir().unwrap();
    let kits = tiered_poc(dir.path());
    let site = at(&kits, "region-2/site-1");
    let other_hub = at(&kits, "region-1/region-1");
    let own_hub = at(&kits, "region-2/region-2");
    assert_eq!(site.config.region.as_deref(), Some("region-2"));
    let (s, mut srx) = start_in(site, site.config.region.as_deref(), true);

    // Hub region-1 dials it from an endpoint that claims region-2: only the site's check
    // stands between them.
    let (h1, _h1rx) = start_in(other_hub, Some("region-2"), false);
    h1.dial(listen_addr(&s).await).await.unwrap();
    let reason = refused(&mut srx).await;
    assert!(
        reason
            .contains("region-1 (hub, region \"region-1\") is not admitted in region \"region-2\""),
        "{reason}"
    );
    // Whether the dialer hears the reason before the hang-up depends on timing under load
    // (the answer lingers at most REFUSAL_LINGER); what counts here is the site's own check.
    assert!(!s.peers.is_admitted(&h1.local));

    // Its own hub, from the hub's downward endpoint (region-2), is admitted both ways.
    let down = flare_node::roles::Endpoint::hub_downward(own_hub);
    assert_eq!(down.region.as_deref(), Some("region-2"));
    let (h2, _h2rx) = start_in(own_hub, down.region.as_deref(), false);
    let (on_hub, on_site) = admitted_pair(&s, &h2).await;
    assert_eq!(on_site.cert.role, flare_crypto::Role::Hub);
    assert_eq!(on_site.cert.region.as_deref(), Some("region-2"));
    assert_eq!(on_hub.cert.name, "site-1");

    // The tier-1 server (region none) admits hub region-1 from its upward endpoint ...
    let server = at(&kits, "server");
    let (t1, mut t1rx) = start_in(server, None, true);
    let up = flare_node::roles::Endpoint::hub_upward(other_hub);
    assert_eq!(up.region, None);
    let (hu, _hurx) = start_in(other_hub, up.region.as_deref(), false);
    let (_, hub_on_server) = admitted_pair(&t1, &hu).await;
    assert_eq!(hub_on_server.cert.role, flare_crypto::Role::Hub);
    // ... and refuses region-1's site, even from an endpoint that would admit the server.
    let (rs, _rsrx) = start_in(at(&kits, "region-1/site-1"), None, false);
    rs.dial(listen_addr(&t1).await).await.unwrap();
    let reason = refused(&mut t1rx).await;
    assert!(
        reason.contains("site-1 (client, region \"region-1\") is not admitted in region none"),
        "{reason}"
    );
    assert!(!t1.peers.is_admitted(&rs.local));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_transfer_is_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let kits = poc(dir.path(), 2);
    let server = kit(&kits, "server");
    let site = kit(&kits, "site-1");
    let (s, _srx) = start(server, true);
    let (c, _crx) = start(site, false);
    let (on_client, _) = admitted_pair(&s, &c).await;
    let model = FLModel::from_params(BTreeMap::from([(
        "w".to_string(),
        Tensor::from_f32(vec![4], &[1.0, 2.0, 3.0, 4.0]).unwrap(),
    )]));
    let mut incoming = s.streams.clone().accept(BULK_PROTOCOL).unwrap();
    let server_sealing = Sealing::new(s.local, server.identity.sealing.clone());
    let client_sealing = Sealing::new(c.local, site.identity.sealing.clone());
    // The server takes the whole transfer, then refuses it, as it does an upload for a job
    // that has ended; it counts every stream that comes.
    let receiver = tokio::spawn({
        let peers = s.peers.clone();
        async move {
            let mut n = 0;
            while let Ok(Some((peer, mut st))) =
                tokio::time::timeout(Duration::from_secs(3), incoming.next()).await
            {
                n += 1;
                let from = peers.get(&peer).unwrap();
                bulk::receive_held(&mut st, &server_sealing, &from, 1 << 20)
                    .await
                    .unwrap();
                bulk::refuse(&mut st).await.unwrap();
            }
            n
        }
    });
    let (route, meta) = result_of(1, 0);
    let sent = bulk::deliver(&c, &client_sealing, &on_client, &route, &meta, Some(&model)).await;
    assert!(matches!(sent, Err(bulk::BulkError::Refused)), "{sent:?}");
    assert_eq!(
        receiver.await.unwrap(),
        1,
        "the refused transfer was sent again"
    );
}
