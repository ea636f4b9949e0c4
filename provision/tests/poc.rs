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
