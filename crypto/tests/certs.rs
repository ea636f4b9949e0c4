//! Certificate issue and every verification failure.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use common::*;
use flare_crypto::{AdminRole, CertError, CertificateAuthority, Role, RoleKind, RootCa};

fn root(ca: &CertificateAuthority) -> RootCa {
    RootCa::from_pem(&ca.cert().pem, now()).unwrap()
}

#[test]
fn good_certificate_verifies_and_reads_back() {
    let ca = ca("proj");
    let id = identity();
    let cert = issue(&ca, &id, "site-1", Role::Client, -1, 365);
    let root = root(&ca);
    let pc = root
        .verify_peer(
            &cert.der,
            now(),
            &id.peer_id().unwrap(),
            &[RoleKind::Client],
        )
        .unwrap();
    assert_eq!(pc.name, "site-1");
    assert_eq!(pc.org, "org-a");
    assert_eq!(pc.role, Role::Client);
    assert_eq!(pc.sealing_public, id.sealing.public());
    assert_eq!(pc.serial.len(), 16);
    assert_eq!(root.name(), "proj");
    // PEM round trip.
    let der = flare_crypto::cert::pem_to_der(&cert.pem).unwrap();
    assert_eq!(der, cert.der);
}

#[test]
fn admin_role_round_trips() {
    let ca = ca("proj");
    let id = identity();
    let cert = issue(
        &ca,
        &id,
        "admin@org.com",
        Role::Admin(AdminRole::Lead),
        -1,
        365,
    );
    let pc = root(&ca).verify(&cert.der, now()).unwrap();
    assert_eq!(pc.role, Role::Admin(AdminRole::Lead));
}

#[test]
fn other_ca_is_unknown_issuer() {
    let ca1 = ca("proj");
    let ca2 = ca("other-proj");
    let id = identity();
    let cert = issue(&ca2, &id, "site-1", Role::Client, -1, 365);
    let err = root(&ca1).verify(&cert.der, now()).unwrap_err();
    assert!(matches!(err, CertError::UnknownIssuer(_)), "{err:?}");
}

#[test]
fn forged_by_a_ca_with_the_same_name_is_bad_signature() {
    let real = ca("proj");
    let forger = ca("proj");
    let id = identity();
    let cert = issue(&forger, &id, "site-1", Role::Client, -1, 365);
    let err = root(&real).verify(&cert.der, now()).unwrap_err();
    assert!(matches!(err, CertError::BadSignature(_)), "{err:?}");
}

#[test]
fn expired_and_not_yet_valid() {
    let ca = ca("proj");
    let id = identity();
    let old = issue(&ca, &id, "site-1", Role::Client, -5, -1);
    let err = root(&ca).verify(&old.der, now()).unwrap_err();
    assert!(matches!(err, CertError::Expired(_)), "{err:?}");
    let future = issue(&ca, &id, "site-1", Role::Client, 2, 30);
    let err = root(&ca).verify(&future.der, now()).unwrap_err();
    assert!(matches!(err, CertError::NotYetValid(_)), "{err:?}");
}

#[test]
fn ca_dates_are_checked() {
    let ca = ca("proj");
    let before = now() - std::time::Duration::from_secs(30 * DAY as u64);
    assert!(matches!(
        RootCa::from_pem(&ca.cert().pem, before),
        Err(CertError::CaNotYetValid)
    ));
    let after = now() + std::time::Duration::from_secs(4000 * DAY as u64);
    assert!(matches!(
        RootCa::from_pem(&ca.cert().pem, after),
        Err(CertError::CaExpired)
    ));
}

#[test]
fn key_is_not_the_peer() {
    let ca = ca("proj");
    let id = identity();
    let other = identity();
    let cert = issue(&ca, &id, "site-1", Role::Client, -1, 365);
    let err = root(&ca)
        .verify_peer(
            &cert.der,
            now(),
            &other.peer_id().unwrap(),
            &[RoleKind::Client],
        )
        .unwrap_err();
    assert!(matches!(err, CertError::PeerIdMismatch { .. }), "{err:?}");
}

#[test]
fn wrong_role() {
    let ca = ca("proj");
    let id = identity();
    let cert = issue(&ca, &id, "site-1", Role::Client, -1, 365);
    let err = root(&ca)
        .verify_peer(
            &cert.der,
            now(),
            &id.peer_id().unwrap(),
            &[RoleKind::Server],
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            CertError::WrongRole {
                actual: Role::Client,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn tampered_bytes_are_rejected() {
    let ca = ca("proj");
    let id = identity();
    let cert = issue(&ca, &id, "site-1", Role::Client, -1, 365);
    let root = root(&ca);
    // Change the CN "site-1" into "site-2": a well-formed certificate with a bad signature.
    let pos = cert.der.windows(6).position(|w| w == b"site-1").unwrap();
    let mut forged = cert.der.clone();
    forged[pos + 5] = b'2';
    let err = root.verify(&forged, now()).unwrap_err();
    assert!(matches!(err, CertError::BadSignature(_)), "{err:?}");
    // Every single-bit flip is rejected (sampled every 7th bit to keep the test fast).
    for bit in (0..cert.der.len() * 8).step_by(7) {
        let mut t = cert.der.clone();
        t[bit / 8] ^= 1 << (bit % 8);
        assert!(root.verify(&t, now()).is_err(), "bit {bit} flip accepted");
    }
}

#[test]
fn a_participant_cert_is_not_a_root() {
    let ca = ca("proj");
    let id = identity();
    let cert = issue(&ca, &id, "site-1", Role::Client, -1, 365);
    assert!(matches!(
        RootCa::from_pem(&cert.pem, now()),
        Err(CertError::Malformed(_))
    ));
}

#[test]
fn ca_reloads_from_pem_and_key() {
    let ca1 = ca("proj");
    let key = ca1.secret().clone();
    let ca2 = CertificateAuthority::from_pem(&ca1.cert().pem, key).unwrap();
    let id = identity();
    let cert = issue(&ca2, &id, "site-9", Role::Server, -1, 365);
    root(&ca1).verify(&cert.der, now()).unwrap();
    // With a different key it refuses.
    let other = identity().signing;
    assert!(CertificateAuthority::from_pem(&ca1.cert().pem, other).is_err());
}
