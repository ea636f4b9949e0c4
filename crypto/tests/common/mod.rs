//! Helpers shared by the crypto integration tests.
#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flare_crypto::{
    CaParams, CertificateAuthority, Identity, IssuedCert, ParticipantCertParams, Role,
    SigningSecret,
};
use ring::rand::SystemRandom;
use time::OffsetDateTime;

pub(crate) const DAY: i64 = 86_400;

/// A fixed "now" so the tests do not depend on the clock: 2030-01-01.
pub(crate) fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_893_456_000)
}

pub(crate) fn at(offset_days: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_893_456_000 + offset_days * DAY).unwrap()
}

pub(crate) fn ca(name: &str) -> CertificateAuthority {
    let rng = SystemRandom::new();
    CertificateAuthority::create(
        SigningSecret::generate(&rng).unwrap(),
        &CaParams {
            common_name: name.into(),
            org: Some("flare".into()),
            not_before: at(-10),
            not_after: at(3650),
            serial: [7; 16],
        },
    )
    .unwrap()
}

pub(crate) fn issue(
    ca: &CertificateAuthority,
    id: &Identity,
    name: &str,
    role: Role,
    from: i64,
    to: i64,
) -> IssuedCert {
    ca.issue(&ParticipantCertParams {
        name: name.into(),
        org: "org-a".into(),
        role,
        region: None,
        signing_public: id.signing.public().unwrap(),
        sealing_public: id.sealing.public(),
        not_before: at(from),
        not_after: at(to),
        serial: [9; 16],
    })
    .unwrap()
}

pub(crate) fn identity() -> Identity {
    Identity::generate(&SystemRandom::new()).unwrap()
}
