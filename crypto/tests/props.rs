//! Property tests for every parser of untrusted bytes: random input never panics, and valid
//! input round-trips. Case counts are modest so the suite stays fast.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::collections::{BTreeMap, HashSet};

use common::*;
use flare_crypto::cert::pem_to_der;
use flare_crypto::folder::{Purpose, SignatureFile};
use flare_crypto::seal::{
    MessageHeader, REPLAY_WINDOW, ReplayWindow, SealedMessage, SealedStreamHeader, StreamSealer,
    seal,
};
use flare_crypto::{Identity, Role, RootCa, SealingSecret, SigningSecret};
use proptest::prelude::*;
use ring::rand::SystemRandom;

fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn header(a: &Identity, b: &Identity, job: String, round: u64, seq: u64) -> MessageHeader {
    MessageHeader {
        sender: a.peer_id().unwrap(),
        receiver: b.peer_id().unwrap(),
        job,
        workflow: "cyclic".into(),
        round,
        kind: "result".into(),
        seq,
    }
}

proptest! {
    #![proptest_config(cfg(256))]

    #[test]
    fn key_pem_parsers_never_panic(s in ".{0,400}", bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = SigningSecret::from_pkcs8_pem(&s);
        let _ = SealingSecret::from_pkcs8_pem(&s);
        let wrapped = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64ish(&bytes));
        let _ = SigningSecret::from_pkcs8_pem(&wrapped);
        let _ = SealingSecret::from_pkcs8_pem(&wrapped);
        let _ = pem_to_der(&s);
    }

    #[test]
    fn cert_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = RootCa::from_der(&bytes, now());
        let ca = fixed_ca();
        prop_assert!(ca.1.verify(&bytes, now()).is_err());
    }

    #[test]
    fn signature_json_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400), s in ".{0,200}") {
        let _ = SignatureFile::parse(&bytes);
        if let Ok(f) = SignatureFile::parse(s.as_bytes()) { let _ = f.manifest(); }
    }

    #[test]
    fn sealed_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let (a, b) = peers();
        let mut w = ReplayWindow::default();
        if let Ok(m) = SealedMessage::parse(&bytes) {
            prop_assert!(m.open(&b.peer_id().unwrap(), &b.sealing, &a.sealing.public(), &mut w).is_err());
        }
        if let Ok(h) = SealedStreamHeader::parse(&bytes) {
            prop_assert!(h.open(&b.peer_id().unwrap(), &b.sealing, &a.sealing.public(), &mut w).is_err());
        }
        // Random chunks fed to a real opener.
        let (_, head) = StreamSealer::start(&header(a, b, "j".into(), 0, 1), &a.sealing, &b.sealing.public(), &SystemRandom::new()).unwrap();
        let mut o = SealedStreamHeader::parse(&head).unwrap()
            .open(&b.peer_id().unwrap(), &b.sealing, &a.sealing.public(), &mut w).unwrap();
        prop_assert!(o.open_chunk(&bytes).is_err());
        let mut copy = bytes.clone();
        prop_assert!(o.open_in_place(&mut copy).is_err());
    }
}

proptest! {
    #![proptest_config(cfg(48))]

    #[test]
    fn signature_json_round_trips(files in proptest::collection::btree_map("[a-z]{1,8}(/[a-z]{1,8}){0,2}", any::<[u8; 32]>(), 0..8)) {
        let f = SignatureFile {
            version: 1,
            purpose: Purpose::Job,
            algorithm: "ed25519".into(),
            signer: hex::encode([1u8; 32]),
            files: files.iter().map(|(k, v)| (k.clone(), hex::encode(v))).collect::<BTreeMap<_, _>>(),
            signature: hex::encode([2u8; 64]),
        };
        let back = SignatureFile::parse(&serde_json::to_vec(&f).unwrap()).unwrap();
        prop_assert_eq!(&back, &f);
        prop_assert_eq!(back.manifest().unwrap().files, files);
    }

    #[test]
    fn seal_round_trips(pt in proptest::collection::vec(any::<u8>(), 0..2048), job in "[a-z0-9-]{0,40}", round: u64, seq: u64) {
        let (a, b) = peers();
        let h = header(a, b, job, round, seq);
        let env = seal(&h, &a.sealing, &b.sealing.public(), &pt, &SystemRandom::new()).unwrap();
        let mut w = ReplayWindow::default();
        let (got, back) = SealedMessage::parse(&env).unwrap()
            .open(&b.peer_id().unwrap(), &b.sealing, &a.sealing.public(), &mut w).unwrap();
        prop_assert_eq!(got, h);
        prop_assert_eq!(back, pt);
    }

    #[test]
    fn sealed_mutations_rejected(pt in proptest::collection::vec(any::<u8>(), 0..256), idx: usize, x in 1u8..) {
        let (a, b) = peers();
        let env = seal(&header(a, b, "j".into(), 1, 1), &a.sealing, &b.sealing.public(), &pt, &SystemRandom::new()).unwrap();
        let mut t = env.clone();
        let i = idx % t.len();
        t[i] ^= x;
        let mut w = ReplayWindow::default();
        let r = SealedMessage::parse(&t).and_then(|m| m.open(&b.peer_id().unwrap(), &b.sealing, &a.sealing.public(), &mut w));
        prop_assert!(r.is_err());
    }

    #[test]
    fn stream_round_trips(data in proptest::collection::vec(any::<u8>(), 0..4096), cut in 1usize..700) {
        let (a, b) = peers();
        let (mut s, head) = StreamSealer::start(&header(a, b, "j".into(), 2, 9), &a.sealing, &b.sealing.public(), &SystemRandom::new()).unwrap();
        let pieces: Vec<&[u8]> = data.chunks(cut).collect();
        let mut framed = Vec::new();
        for p in pieces.iter().take(pieces.len().saturating_sub(1)) {
            framed.push(s.seal_chunk(p).unwrap());
        }
        framed.push(s.seal_last(pieces.last().copied().unwrap_or(&[])).unwrap());
        let mut w = ReplayWindow::default();
        let mut o = SealedStreamHeader::parse(&head).unwrap()
            .open(&b.peer_id().unwrap(), &b.sealing, &a.sealing.public(), &mut w).unwrap();
        let mut back = Vec::new();
        for f in &framed { back.extend(o.open_chunk(f).unwrap().data); }
        o.finish().unwrap();
        prop_assert_eq!(&back, &data);

        // The same stream sealed and opened in place, in one reused buffer each way.
        let (mut s, head) = StreamSealer::start(&header(a, b, "j".into(), 2, 10), &a.sealing, &b.sealing.public(), &SystemRandom::new()).unwrap();
        let mut o = SealedStreamHeader::parse(&head).unwrap()
            .open(&b.peer_id().unwrap(), &b.sealing, &a.sealing.public(), &mut w).unwrap();
        let mut buf = Vec::new();
        let mut back = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            buf.clear();
            buf.push(0);
            buf.extend_from_slice(p);
            s.seal_in_place(&mut buf, 0, i + 1 == pieces.len()).unwrap();
            let got = o.open_in_place(&mut buf).unwrap();
            prop_assert_eq!(got.last, i + 1 == pieces.len());
            back.extend_from_slice(got.data);
        }
        if pieces.is_empty() {
            buf.clear();
            buf.push(0);
            s.seal_in_place(&mut buf, 0, true).unwrap();
            prop_assert!(o.open_in_place(&mut buf).unwrap().last);
        }
        o.finish().unwrap();
        prop_assert_eq!(back, data);
    }

    #[test]
    fn cert_mutations_rejected(idx: usize, x in 1u8..) {
        let (ca, root, der) = fixed_ca();
        let _ = ca;
        let mut t = der.clone();
        let i = idx % t.len();
        t[i] ^= x;
        prop_assert!(root.verify(&t, now()).is_err());
    }

    /// The same for a hub's certificate, whose region extension is one more field to break.
    #[test]
    fn hub_cert_mutations_rejected(idx: usize, x in 1u8..) {
        let (_, root, der) = fixed_hub();
        let mut t = der.clone();
        let i = idx % t.len();
        t[i] ^= x;
        prop_assert!(root.verify(&t, now()).is_err());
    }

    #[test]
    fn replay_window_matches_a_model(seqs in proptest::collection::vec(0u64..400, 1..200)) {
        let (a, _) = peers();
        let sender = a.peer_id().unwrap();
        let mut w = ReplayWindow::default();
        let mut seen = HashSet::new();
        let mut highest: Option<u64> = None;
        for s in seqs {
            let fresh = !seen.contains(&s);
            let in_window = highest.is_none_or(|h| s > h || h - s < REPLAY_WINDOW);
            let ok = w.record(&sender, s).is_ok();
            prop_assert_eq!(ok, fresh && in_window);
            if ok {
                seen.insert(s);
                highest = Some(highest.map_or(s, |h| h.max(s)));
            }
        }
    }
}

fn peers() -> (&'static Identity, &'static Identity) {
    use std::sync::OnceLock;
    static P: OnceLock<(Identity, Identity)> = OnceLock::new();
    let p = P.get_or_init(|| (identity(), identity()));
    (&p.0, &p.1)
}

fn fixed_ca() -> &'static (flare_crypto::CertificateAuthority, RootCa, Vec<u8>) {
    use std::sync::OnceLock;
    static C: OnceLock<(flare_crypto::CertificateAuthority, RootCa, Vec<u8>)> = OnceLock::new();
    C.get_or_init(|| {
        let c = ca("proj");
        let root = RootCa::from_pem(&c.cert().pem, now()).unwrap();
        let der = issue(&c, &identity(), "site-1", Role::Client, -1, 30).der;
        (c, root, der)
    })
}

fn fixed_hub() -> &'static (flare_crypto::CertificateAuthority, RootCa, Vec<u8>) {
    use std::sync::OnceLock;
    static C: OnceLock<(flare_crypto::CertificateAuthority, RootCa, Vec<u8>)> = OnceLock::new();
    C.get_or_init(|| {
        let c = ca("proj");
        let root = RootCa::from_pem(&c.cert().pem, now()).unwrap();
        let id = identity();
        let der = c
            .issue(&flare_crypto::ParticipantCertParams {
                name: "eu".into(),
                org: "org-a".into(),
                role: Role::Hub,
                region: Some("eu".into()),
                signing_public: id.signing.public().unwrap(),
                sealing_public: id.sealing.public(),
                not_before: at(-1),
                not_after: at(30),
                serial: [3; 16],
            })
            .unwrap()
            .der;
        assert_eq!(
            root.verify(&der, now()).unwrap().region.as_deref(),
            Some("eu")
        );
        (c, root, der)
    })
}

/// Wraps random bytes in base64-like text (not always valid) to reach deeper PEM paths.
fn base64ish(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=";
    bytes
        .iter()
        .map(|b| A[*b as usize % A.len()] as char)
        .collect()
}
