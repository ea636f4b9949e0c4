//! Provision → load kit → verify, and every way a kit can be spoiled.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use flare_crypto::folder::FolderError;
use flare_crypto::{AdminRole, CertError, Role};
use flare_provision::kit::{CERT_FILE, KEY_FILE, NODE_CONFIG_FILE, ROOT_CA_FILE, SEALING_KEY_FILE};
use flare_provision::project::SAMPLE_PROJECT_YML;
use flare_provision::{KitError, Project, load_kit, provision};
use ring::rand::SystemRandom;
use time::OffsetDateTime;

fn provisioned() -> (tempfile::TempDir, PathBuf) {
    let ws = tempfile::tempdir().unwrap();
    let project = Project::parse(SAMPLE_PROJECT_YML).unwrap();
    let out = provision(
        &project,
        ws.path(),
        OffsetDateTime::now_utc(),
        &SystemRandom::new(),
    )
    .unwrap();
    let prod = out.prod_dir.clone();
    (ws, prod)
}

fn startup(prod: &Path, name: &str) -> PathBuf {
    prod.join(name).join("startup")
}

#[test]
fn provision_then_load_every_kit() {
    let (ws, prod) = provisioned();
    assert!(prod.ends_with("example_project/prod_00"));
    let now = SystemTime::now();
    let server = load_kit(&startup(&prod, "server1"), now).unwrap();
    assert_eq!(server.role(), Role::Server);
    assert_eq!(
        server.config.listen,
        vec!["/ip4/0.0.0.0/tcp/8002", "/ip4/0.0.0.0/tcp/8003"]
    );
    let site = load_kit(&startup(&prod, "site-2"), now).unwrap();
    assert_eq!((site.name(), site.org()), ("site-2", "hospital-b"));
    assert_eq!(site.config.listen, vec!["/ip4/0.0.0.0/tcp/9102"]);
    assert_eq!(
        site.config.server.addrs,
        vec![
            "/ip4/127.0.0.1/tcp/8002",
            "/dns/server1.example.com/tcp/8002"
        ]
    );
    assert_eq!(site.config.server.peer_id, server.peer_id().to_string());
    assert_eq!(site.config.relays.last().unwrap().name, "server1");
    assert_eq!(site.identity.peer_id().unwrap(), site.peer_id());
    let admin = load_kit(&startup(&prod, "admin@nvidia.com"), now).unwrap();
    assert_eq!(admin.role(), Role::Admin(AdminRole::ProjectAdmin));
    assert_eq!(admin.config.server.addrs[0], "/ip4/127.0.0.1/tcp/8003");
    assert!(admin.config.listen.is_empty());
    assert!(
        startup(&prod, "admin@nvidia.com")
            .join("fl_admin.sh")
            .is_file()
    );
    assert!(startup(&prod, "site-1").join("start.sh").is_file());
    assert!(startup(&prod, "site-1").join("stop.sh").is_file());
    for f in [
        "authorization.json",
        "privacy.json.sample",
        "resources.json",
    ] {
        assert!(prod.join("site-1/local").join(f).is_file(), "{f}");
    }
    assert!(prod.join("site-1/transfer").is_dir());
    assert!(prod.join("docker-compose.yml").is_file());
    assert!(prod.join("site-1.zip").is_file());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in [KEY_FILE, SEALING_KEY_FILE] {
            let mode = fs::metadata(startup(&prod, "site-1").join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let ca_key = ws.path().join("example_project/state/rootCA.key");
        assert_eq!(
            fs::metadata(&ca_key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // The root CA key is in no kit.
    let ca_key = fs::read_to_string(ws.path().join("example_project/state/rootCA.key")).unwrap();
    for entry in walk(&prod) {
        if entry.extension().is_some_and(|e| e == "zip") {
            continue;
        }
        assert_ne!(
            fs::read_to_string(&entry).unwrap_or_default(),
            ca_key,
            "{}",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn second_run_is_prod_01_with_the_same_ca() {
    let (ws, prod0) = provisioned();
    let project = Project::parse(SAMPLE_PROJECT_YML).unwrap();
    let out = provision(
        &project,
        ws.path(),
        OffsetDateTime::now_utc(),
        &SystemRandom::new(),
    )
    .unwrap();
    assert!(out.prod_dir.ends_with("prod_01"));
    assert!(!out.new_ca);
    let ca0 = fs::read(startup(&prod0, "site-1").join(ROOT_CA_FILE)).unwrap();
    let ca1 = fs::read(startup(&out.prod_dir, "site-1").join(ROOT_CA_FILE)).unwrap();
    assert_eq!(ca0, ca1);
    // Both generations still load; prod_00 was not touched.
    load_kit(&startup(&prod0, "site-1"), SystemTime::now()).unwrap();
    load_kit(&startup(&out.prod_dir, "site-1"), SystemTime::now()).unwrap();
}

#[test]
fn any_edited_added_or_removed_kit_file_is_named() {
    let (_ws, prod) = provisioned();
    let kit = startup(&prod, "site-1");
    let files: Vec<String> = fs::read_dir(&kit)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "signature.json")
        .collect();
    assert!(files.len() >= 7, "{files:?}");
    for f in &files {
        let path = kit.join(f);
        let orig = fs::read(&path).unwrap();
        let mut edited = orig.clone();
        edited.push(b'\n');
        fs::write(&path, &edited).unwrap();
        let err = load_kit(&kit, SystemTime::now()).unwrap_err();
        match &err {
            KitError::Signature(FolderError::FileChanged(name)) => assert_eq!(name, f),
            // Editing rootCA.pem can also make it an invalid CA or a different signer.
            other if f == ROOT_CA_FILE => assert!(
                matches!(other, KitError::RootCa(_) | KitError::Signature(_)),
                "{other}"
            ),
            other => panic!("{f}: {other}"),
        }
        assert!(
            err.to_string().contains(f.as_str()) || f == ROOT_CA_FILE,
            "{err}"
        );
        fs::write(&path, &orig).unwrap();
        #[cfg(unix)]
        {
            // Removed.
            let tmp = prod.join("moved");
            fs::rename(&path, &tmp).unwrap();
            let err = load_kit(&kit, SystemTime::now()).unwrap_err();
            if f != ROOT_CA_FILE {
                assert!(
                    matches!(&err, KitError::Signature(FolderError::FileRemoved(n)) if n == f),
                    "{f}: {err}"
                );
            }
            fs::rename(&tmp, &path).unwrap();
        }
    }
    fs::write(kit.join("extra.sh"), b"echo hi").unwrap();
    let err = load_kit(&kit, SystemTime::now()).unwrap_err();
    assert!(
        matches!(&err, KitError::Signature(FolderError::FileAdded(n)) if n == "extra.sh"),
        "{err}"
    );
    assert!(err.to_string().contains("extra.sh"));
    fs::remove_file(kit.join("extra.sh")).unwrap();
    load_kit(&kit, SystemTime::now()).unwrap();
}

#[test]
fn swapped_root_ca_or_signature_is_refused() {
    let (_ws, prod) = provisioned();
    let (_ws2, other) = provisioned();
    let kit = startup(&prod, "site-1");
    // Another project's rootCA.pem: the signature is by a key the kit does not trust.
    fs::copy(
        startup(&other, "site-1").join(ROOT_CA_FILE),
        kit.join(ROOT_CA_FILE),
    )
    .unwrap();
    let err = load_kit(&kit, SystemTime::now()).unwrap_err();
    assert!(
        matches!(err, KitError::Signature(FolderError::WrongSigner { .. })),
        "{err}"
    );
    // Another kit's signature.json.
    let (_ws3, prod3) = provisioned();
    let kit3 = startup(&prod3, "site-1");
    fs::copy(
        startup(&prod3, "site-2").join("signature.json"),
        kit3.join("signature.json"),
    )
    .unwrap();
    let err = load_kit(&kit3, SystemTime::now()).unwrap_err();
    assert!(matches!(err, KitError::Signature(_)), "{err}");
}

#[test]
fn a_kit_from_another_project_signed_consistently_fails_on_cert_or_key() {
    // Swap in site-2's certificate and re-sign nothing: the kit signature catches it.
    let (_ws, prod) = provisioned();
    let kit = startup(&prod, "site-1");
    fs::copy(
        startup(&prod, "site-2").join(CERT_FILE),
        kit.join(CERT_FILE),
    )
    .unwrap();
    let err = load_kit(&kit, SystemTime::now()).unwrap_err();
    assert!(
        matches!(&err, KitError::Signature(FolderError::FileChanged(n)) if n == CERT_FILE),
        "{err}"
    );
}

#[test]
fn expired_kit_is_refused() {
    let (_ws, prod) = provisioned();
    let later = SystemTime::now() + Duration::from_secs(400 * 86_400);
    let err = load_kit(&startup(&prod, "site-1"), later).unwrap_err();
    assert!(
        matches!(err, KitError::Cert(CertError::Expired(_))),
        "{err}"
    );
    let much_later = SystemTime::now() + Duration::from_secs(4000 * 86_400);
    let err = load_kit(&startup(&prod, "site-1"), much_later).unwrap_err();
    assert!(
        matches!(err, KitError::RootCa(CertError::CaExpired)),
        "{err}"
    );
    let before = SystemTime::now() - Duration::from_secs(86_400);
    let err = load_kit(&startup(&prod, "site-1"), before).unwrap_err();
    assert!(
        matches!(err, KitError::RootCa(CertError::CaNotYetValid)),
        "{err}"
    );
}

#[test]
fn node_config_round_trips_through_the_kit() {
    let (_ws, prod) = provisioned();
    let kit = load_kit(&startup(&prod, "site-1"), SystemTime::now()).unwrap();
    let text = fs::read_to_string(startup(&prod, "site-1").join(NODE_CONFIG_FILE)).unwrap();
    let parsed: flare_provision::NodeConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed, kit.config);
    assert_eq!(parsed.role.to_string(), "client");
}

#[test]
fn zip_holds_the_kit() {
    let (_ws, prod) = provisioned();
    let f = fs::File::open(prod.join("site-1.zip")).unwrap();
    let mut z = zip::ZipArchive::new(f).unwrap();
    let names: Vec<String> = (0..z.len())
        .map(|i| z.by_index(i).unwrap().name().unwrap().to_string())
        .collect();
    for want in [
        "site-1/startup/signature.json",
        "site-1/startup/key.pem",
        "site-1/local/privacy.json.sample",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    #[cfg(unix)]
    {
        let key = z.by_name("site-1/startup/key.pem").unwrap();
        assert_eq!(key.unix_mode().unwrap() & 0o777, 0o600);
    }
}
