//! POC prepare and clean.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::SystemTime;

use flare_provision::load_kit;
use flare_provision::poc::{PocError, PocOptions, clean, prepare};
use ring::rand::SystemRandom;
use time::OffsetDateTime;

#[test]
fn prepare_load_and_clean() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("poc");
    let opts = PocOptions {
        workspace: ws.clone(),
        clients: 3,
        base_port: None,
    };
    let out = prepare(&opts, OffsetDateTime::now_utc(), &SystemRandom::new()).unwrap();
    assert!(
        out.provisioned
            .prod_dir
            .ends_with("example_project/prod_00")
    );
    let mut ports = HashSet::new();
    for name in ["server", "site-1", "site-2", "site-3", "admin@nvidia.com"] {
        let kit = load_kit(
            &out.provisioned.prod_dir.join(name).join("startup"),
            SystemTime::now(),
        )
        .unwrap();
        for l in &kit.config.listen {
            assert!(l.starts_with("/ip4/127.0.0.1/tcp/"), "{l}");
            assert!(ports.insert(l.clone()), "port reused: {l}");
        }
    }
    assert_eq!(ports.len(), 5); // server p2p + admin, three sites
    // A second prepare refuses.
    assert!(matches!(
        prepare(&opts, OffsetDateTime::now_utc(), &SystemRandom::new()),
        Err(PocError::AlreadyPrepared(_))
    ));
    assert!(clean(&ws).unwrap());
    assert!(!ws.exists());
    assert!(!clean(&ws).unwrap());
}

#[test]
fn clean_refuses_a_folder_that_is_not_a_poc() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("precious.txt"), b"keep").unwrap();
    assert!(matches!(clean(dir.path()), Err(PocError::NotPoc(_))));
    assert!(dir.path().join("precious.txt").exists());
    let opts = PocOptions {
        workspace: dir.path().to_path_buf(),
        clients: 1,
        base_port: None,
    };
    assert!(matches!(
        prepare(&opts, OffsetDateTime::now_utc(), &SystemRandom::new()),
        Err(PocError::NotPoc(_))
    ));
}

#[test]
fn busy_base_port_is_refused_and_zero_sites_too() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let opts = PocOptions {
        workspace: dir.path().join("p"),
        clients: 1,
        base_port: Some(port),
    };
    assert!(matches!(
        prepare(&opts, OffsetDateTime::now_utc(), &SystemRandom::new()),
        Err(PocError::NoFreePorts(3))
    ));
    let opts = PocOptions {
        workspace: dir.path().join("p"),
        clients: 0,
        base_port: None,
    };
    assert!(matches!(
        prepare(&opts, OffsetDateTime::now_utc(), &SystemRandom::new()),
        Err(PocError::BadCount(0))
    ));
}

/// `poc prepare --regions 2 -n 3`: the layout, every kit, and the node.json of a hub, a
/// region's site and a region's admin.
#[test]
fn tiered_prepare_layout_and_node_configs() {
    use flare_crypto::{Role, check_region};
    use flare_provision::poc::prepare_tiered;

    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("poc");
    let opts = PocOptions {
        workspace: ws.clone(),
        clients: 3,
        base_port: None,
    };
    let out = prepare_tiered(&opts, 2, OffsetDateTime::now_utc(), &SystemRandom::new()).unwrap();
    let prod = out.provisioned.prod_dir.clone();
    let mut expected: Vec<String> = vec!["server".into(), "admin@nvidia.com".into()];
    for r in ["region-1", "region-2"] {
        expected.push(format!("{r}/{r}"));
        for i in 1..=3 {
            expected.push(format!("{r}/site-{i}"));
        }
        expected.push(format!("{r}/admin@{r}"));
    }
    let got: Vec<String> = out
        .provisioned
        .kits
        .iter()
        .map(|(_, p)| p.strip_prefix(&prod).unwrap().display().to_string())
        .collect();
    assert_eq!(got, expected);
    assert!(!prod.join("site-1").exists());
    assert!(prod.join("docker-compose.yml").is_file());

    let now = SystemTime::now();
    let load = |rel: &str| load_kit(&prod.join(rel).join("startup"), now).unwrap();
    let mut ports = HashSet::new();
    for rel in &expected {
        for l in &load(rel).config.listen {
            assert!(ports.insert(l.clone()), "port reused: {l}");
        }
    }
    // Server 2, each hub 2, each site 1.
    assert_eq!(ports.len(), 2 + 2 * (2 + 3));

    let server = load("server");
    let hub = load("region-1/region-1");
    let site = load("region-1/site-2");
    let admin = load("region-1/admin@region-1");
    let base = out.base_port;

    // The hub: role hub in region-1, upward to the tier-1 server, listening for its region.
    assert_eq!(hub.role(), Role::Hub);
    assert_eq!(hub.cert.region.as_deref(), Some("region-1"));
    assert_eq!(hub.config.region.as_deref(), Some("region-1"));
    assert_eq!(hub.config.server.name, "server");
    assert_eq!(hub.config.server.peer_id, server.peer_id().to_string());
    assert_eq!(
        hub.config.server.addrs,
        [format!("/ip4/127.0.0.1/tcp/{base}")]
    );
    let (hub_p2p, hub_admin) = (base + 2, base + 3);
    assert_eq!(
        hub.config.listen,
        [
            format!("/ip4/127.0.0.1/tcp/{hub_p2p}"),
            format!("/ip4/127.0.0.1/tcp/{hub_admin}")
        ]
    );
    assert_eq!(
        hub.config.advertise,
        [format!("/ip4/127.0.0.1/tcp/{hub_p2p}")]
    );
    assert_eq!(
        hub.config.relays,
        std::slice::from_ref(&server.config.server)
    );

    // A region's site: its hub is its server and its relay.
    assert_eq!(site.role(), Role::Client);
    assert_eq!(site.config.region.as_deref(), Some("region-1"));
    assert_eq!(site.config.server.name, "region-1");
    assert_eq!(site.config.server.peer_id, hub.peer_id().to_string());
    assert_eq!(
        site.config.server.addrs,
        [format!("/ip4/127.0.0.1/tcp/{hub_p2p}")]
    );
    assert_eq!(
        site.config.relays,
        std::slice::from_ref(&site.config.server)
    );
    assert!(site.config.advertise.is_empty());

    // A region's admin: its hub's admin address.
    assert_eq!(admin.config.region.as_deref(), Some("region-1"));
    assert!(admin.config.listen.is_empty());
    assert_eq!(admin.config.server.peer_id, hub.peer_id().to_string());
    assert_eq!(
        admin.config.server.addrs,
        [format!("/ip4/127.0.0.1/tcp/{hub_admin}")]
    );

    // The tier-1 server and its admin have no region.
    assert_eq!(server.config.region, None);
    assert_eq!(server.cert.region, None);
    assert_eq!(load("admin@nvidia.com").config.region, None);

    // A hub's certificate is scoped to its region: its own region and tier 1 admit it,
    // another region does not; region-2's site-2 is not region-1's.
    let other_site = load("region-2/site-2");
    check_region(Some("region-1"), &hub.cert).unwrap();
    check_region(None, &hub.cert).unwrap();
    assert!(check_region(Some("region-2"), &hub.cert).is_err());
    assert!(check_region(Some("region-1"), &other_site.cert).is_err());
    check_region(Some("region-2"), &other_site.cert).unwrap();
    assert!(check_region(Some("region-1"), &server.cert).is_err());

    // node.json leaves the new fields out where they are empty.
    let text = std::fs::read_to_string(prod.join("server/startup/node.json")).unwrap();
    assert!(
        !text.contains("region") && !text.contains("advertise"),
        "{text}"
    );

    // docker-compose names region members by name and region, and mounts their folders.
    let compose = std::fs::read_to_string(prod.join("docker-compose.yml")).unwrap();
    assert!(compose.contains("  site-1.region-2:\n"), "{compose}");
    assert!(compose.contains("  region-2:\n"), "{compose}");
    assert!(
        compose.contains("/workspace/region-2/site-1/startup"),
        "{compose}"
    );
}

#[test]
fn tiered_prepare_refuses_bad_counts() {
    use flare_provision::poc::prepare_tiered;
    let dir = tempfile::tempdir().unwrap();
    for (regions, clients) in [(0, 2), (11, 1), (2, 0), (4, 26)] {
        let opts = PocOptions {
            workspace: dir.path().join("p"),
            clients,
            base_port: None,
        };
        let err = prepare_tiered(
            &opts,
            regions,
            OffsetDateTime::now_utc(),
            &SystemRandom::new(),
        )
        .unwrap_err();
        assert!(matches!(err, PocError::BadRegions { .. }), "{err}");
    }
    assert!(!dir.path().join("p").exists());
}
