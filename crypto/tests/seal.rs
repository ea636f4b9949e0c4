//! Sealed messages and streams: round trips and every refusal.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use common::identity;
use flare_crypto::Identity;
use flare_crypto::seal::{
    CHUNK_OVERHEAD, MessageHeader, ReplayWindow, SealError, SealedMessage, SealedStreamHeader,
    StreamOpener, StreamSealer, seal,
};
use ring::rand::SystemRandom;

fn header(a: &Identity, b: &Identity, seq: u64) -> MessageHeader {
    MessageHeader {
        sender: a.peer_id().unwrap(),
        receiver: b.peer_id().unwrap(),
        job: "job-1".into(),
        workflow: "swarm".into(),
        round: 3,
        kind: "learn".into(),
        seq,
    }
}

fn open(
    env: &[u8],
    b: &Identity,
    a: &Identity,
    w: &mut ReplayWindow,
) -> Result<(MessageHeader, Vec<u8>), SealError> {
    SealedMessage::parse(env)?.open(&b.peer_id().unwrap(), &b.sealing, &a.sealing.public(), w)
}

#[test]
fn round_trip() {
    let (a, b) = (identity(), identity());
    let rng = SystemRandom::new();
    let h = header(&a, &b, 1);
    let env = seal(&h, &a.sealing, &b.sealing.public(), b"model weights", &rng).unwrap();
    let mut w = ReplayWindow::default();
    let (got, pt) = open(&env, &b, &a, &mut w).unwrap();
    assert_eq!(got, h);
    assert_eq!(pt, b"model weights");
}

#[test]
fn replay_is_rejected_and_reordering_within_window_accepted() {
    let (a, b) = (identity(), identity());
    let rng = SystemRandom::new();
    let mut w = ReplayWindow::default();
    let e5 = seal(
        &header(&a, &b, 5),
        &a.sealing,
        &b.sealing.public(),
        b"5",
        &rng,
    )
    .unwrap();
    let e3 = seal(
        &header(&a, &b, 3),
        &a.sealing,
        &b.sealing.public(),
        b"3",
        &rng,
    )
    .unwrap();
    open(&e5, &b, &a, &mut w).unwrap();
    open(&e3, &b, &a, &mut w).unwrap();
    assert!(matches!(
        open(&e5, &b, &a, &mut w),
        Err(SealError::Replayed { seq: 5, .. })
    ));
    assert!(matches!(
        open(&e3, &b, &a, &mut w),
        Err(SealError::Replayed { seq: 3, .. })
    ));
    let far = seal(
        &header(&a, &b, 1000),
        &a.sealing,
        &b.sealing.public(),
        b"",
        &rng,
    )
    .unwrap();
    open(&far, &b, &a, &mut w).unwrap();
    let old = seal(
        &header(&a, &b, 6),
        &a.sealing,
        &b.sealing.public(),
        b"",
        &rng,
    )
    .unwrap();
    assert!(matches!(
        open(&old, &b, &a, &mut w),
        Err(SealError::TooOld { .. })
    ));
}

#[test]
fn tampering_anywhere_is_rejected() {
    let (a, b) = (identity(), identity());
    let rng = SystemRandom::new();
    let env = seal(
        &header(&a, &b, 1),
        &a.sealing,
        &b.sealing.public(),
        b"payload",
        &rng,
    )
    .unwrap();
    for i in 0..env.len() {
        let mut t = env.clone();
        t[i] ^= 0x01;
        let mut w = ReplayWindow::default();
        assert!(
            open(&t, &b, &a, &mut w).is_err(),
            "flip at byte {i} accepted"
        );
    }
    // A failed open leaves no trace in the window: the real message still opens.
    let mut w = ReplayWindow::default();
    let mut t = env.clone();
    let last = t.len() - 1;
    t[last] ^= 1;
    assert!(matches!(open(&t, &b, &a, &mut w), Err(SealError::Tampered)));
    open(&env, &b, &a, &mut w).unwrap();
}

#[test]
fn misaddressed_and_wrong_sender_rejected() {
    let (a, b, c) = (identity(), identity(), identity());
    let rng = SystemRandom::new();
    let env = seal(
        &header(&a, &b, 1),
        &a.sealing,
        &b.sealing.public(),
        b"x",
        &rng,
    )
    .unwrap();
    let mut w = ReplayWindow::default();
    // C is not the receiver.
    assert!(matches!(
        open(&env, &c, &a, &mut w),
        Err(SealError::WrongReceiver { .. })
    ));
    // C seals in A's name: the static-static term does not match A's key.
    let forged = seal(
        &header(&a, &b, 2),
        &c.sealing,
        &b.sealing.public(),
        b"x",
        &rng,
    )
    .unwrap();
    assert!(matches!(
        open(&forged, &b, &a, &mut w),
        Err(SealError::Tampered)
    ));
    // Sealed to B's PeerId but C's key: B cannot open it.
    let wrong_key = seal(
        &header(&a, &b, 3),
        &a.sealing,
        &c.sealing.public(),
        b"x",
        &rng,
    )
    .unwrap();
    assert!(matches!(
        open(&wrong_key, &b, &a, &mut w),
        Err(SealError::Tampered)
    ));
}

fn stream(a: &Identity, b: &Identity, seq: u64, chunks: &[&[u8]]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let rng = SystemRandom::new();
    let (mut s, head) =
        StreamSealer::start(&header(a, b, seq), &a.sealing, &b.sealing.public(), &rng).unwrap();
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        if i + 1 == chunks.len() {
            out.push(s.seal_last(c).unwrap());
            break;
        }
        out.push(s.seal_chunk(c).unwrap());
    }
    (head, out)
}

fn open_stream(
    head: &[u8],
    chunks: &[Vec<u8>],
    a: &Identity,
    b: &Identity,
    w: &mut ReplayWindow,
) -> Result<Vec<u8>, SealError> {
    let mut o = SealedStreamHeader::parse(head)?.open(
        &b.peer_id().unwrap(),
        &b.sealing,
        &a.sealing.public(),
        w,
    )?;
    let mut all = Vec::new();
    for c in chunks {
        all.extend(o.open_chunk(c)?.data);
    }
    o.finish()?;
    Ok(all)
}

#[test]
fn stream_round_trip() {
    let (a, b) = (identity(), identity());
    let big = vec![0xabu8; 1 << 20];
    let (head, chunks) = stream(&a, &b, 1, &[&big, b"middle", b"end"]);
    assert_eq!(chunks[0].len(), 1 + (1 << 20) + 16);
    let mut w = ReplayWindow::default();
    let got = open_stream(&head, &chunks, &a, &b, &mut w).unwrap();
    assert_eq!(got.len(), (1 << 20) + 9);
    // The same stream again is a replay.
    assert!(matches!(
        open_stream(&head, &chunks, &a, &b, &mut w),
        Err(SealError::Replayed { .. })
    ));
}

#[test]
fn stream_truncation_reordering_and_tampering_rejected() {
    let (a, b) = (identity(), identity());
    let (head, chunks) = stream(&a, &b, 1, &[b"one", b"two", b"three"]);
    let w = || ReplayWindow::default();
    // Truncated: last chunk dropped.
    assert!(matches!(
        open_stream(&head, &chunks[..2], &a, &b, &mut w()),
        Err(SealError::Truncated)
    ));
    // Reordered.
    let re = vec![chunks[1].clone(), chunks[0].clone(), chunks[2].clone()];
    assert!(matches!(
        open_stream(&head, &re, &a, &b, &mut w()),
        Err(SealError::Tampered)
    ));
    // A middle chunk marked last.
    let mut early = chunks[..2].to_vec();
    early[1][0] = 1;
    assert!(matches!(
        open_stream(&head, &early, &a, &b, &mut w()),
        Err(SealError::Tampered)
    ));
    // A chunk after the last.
    let mut extra = chunks.clone();
    extra.push(chunks[2].clone());
    assert!(matches!(
        open_stream(&head, &extra, &a, &b, &mut w()),
        Err(SealError::AfterEnd)
    ));
    // Flipped bits in a chunk and in the header.
    let mut flipped = chunks.clone();
    flipped[1][5] ^= 0x80;
    assert!(matches!(
        open_stream(&head, &flipped, &a, &b, &mut w()),
        Err(SealError::Tampered)
    ));
    for i in 0..head.len() {
        let mut h = head.clone();
        h[i] ^= 1;
        assert!(
            open_stream(&h, &chunks, &a, &b, &mut w()).is_err(),
            "header flip {i}"
        );
    }
    // Chunks of another stream between the same peers.
    let (head2, chunks2) = stream(&a, &b, 2, &[b"one", b"two", b"three"]);
    let _ = head2;
    assert!(matches!(
        open_stream(&head, &chunks2, &a, &b, &mut w()),
        Err(SealError::Tampered)
    ));
    // Misaddressed stream.
    let c = identity();
    assert!(matches!(
        open_stream(&head, &chunks, &a, &c, &mut w()),
        Err(SealError::WrongReceiver { .. })
    ));
}

/// Seals `chunks` in place behind a 4-byte caller prefix; returns the header and the framed
/// chunks (without the prefix).
fn stream_in_place(
    a: &Identity,
    b: &Identity,
    seq: u64,
    chunks: &[&[u8]],
) -> (Vec<u8>, Vec<Vec<u8>>) {
    let rng = SystemRandom::new();
    let (mut s, head) =
        StreamSealer::start(&header(a, b, seq), &a.sealing, &b.sealing.public(), &rng).unwrap();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        buf.clear();
        buf.extend_from_slice(&[0xaa; 4]);
        buf.push(0);
        buf.extend_from_slice(c);
        s.seal_in_place(&mut buf, 4, i + 1 == chunks.len()).unwrap();
        assert_eq!(&buf[..4], &[0xaa; 4]);
        assert_eq!(buf.len(), 4 + c.len() + CHUNK_OVERHEAD);
        out.push(buf[4..].to_vec());
    }
    (head, out)
}

fn opener(head: &[u8], a: &Identity, b: &Identity) -> StreamOpener {
    SealedStreamHeader::parse(head)
        .unwrap()
        .open(
            &b.peer_id().unwrap(),
            &b.sealing,
            &a.sealing.public(),
            &mut ReplayWindow::default(),
        )
        .unwrap()
}

fn open_all_in_place(o: &mut StreamOpener, chunks: &[Vec<u8>]) -> Result<Vec<u8>, SealError> {
    let mut all = Vec::new();
    for c in chunks {
        let mut c = c.clone();
        let got = o.open_in_place(&mut c)?;
        all.extend_from_slice(got.data);
    }
    Ok(all)
}

#[test]
fn in_place_round_trip_and_interop_with_copying_api() {
    let (a, b) = (identity(), identity());
    let big: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    let parts: [&[u8]; 4] = [&big, b"", b"middle", b"end"];
    let expected: Vec<u8> = parts.concat();
    // In place to in place.
    let (head, chunks) = stream_in_place(&a, &b, 1, &parts);
    let mut o = opener(&head, &a, &b);
    assert_eq!(open_all_in_place(&mut o, &chunks).unwrap(), expected);
    o.finish().unwrap();
    // In place sealed, opened by the copying API.
    let mut w = ReplayWindow::default();
    assert_eq!(
        open_stream(&head, &chunks, &a, &b, &mut w).unwrap(),
        expected
    );
    // Copying API sealed, opened in place.
    let (head, chunks) = stream(&a, &b, 2, &parts);
    let mut o = opener(&head, &a, &b);
    assert_eq!(open_all_in_place(&mut o, &chunks).unwrap(), expected);
    o.finish().unwrap();
}

#[test]
fn in_place_tampering_truncation_and_reordering_rejected() {
    let (a, b) = (identity(), identity());
    let (head, chunks) = stream_in_place(&a, &b, 1, &[b"one", b"two", b"three"]);
    // Truncated: the last chunk never comes.
    let mut o = opener(&head, &a, &b);
    open_all_in_place(&mut o, &chunks[..2]).unwrap();
    assert!(matches!(o.finish(), Err(SealError::Truncated)));
    // Every single bit flip anywhere in a chunk is caught.
    for i in 0..chunks[1].len() {
        for bit in [0x01u8, 0x80] {
            let mut bad = chunks.clone();
            bad[1][i] ^= bit;
            let mut o = opener(&head, &a, &b);
            assert!(open_all_in_place(&mut o, &bad).is_err(), "flip {i}/{bit}");
        }
    }
    // Reordered.
    let mut o = opener(&head, &a, &b);
    let re = vec![chunks[1].clone(), chunks[0].clone()];
    assert!(matches!(
        open_all_in_place(&mut o, &re),
        Err(SealError::Tampered)
    ));
    // A failed chunk does not advance the stream: the genuine one still opens.
    let mut o = opener(&head, &a, &b);
    let mut bad = chunks[0].clone();
    bad[2] ^= 1;
    assert!(o.open_in_place(&mut bad).is_err());
    assert_eq!(open_all_in_place(&mut o, &chunks).unwrap(), b"onetwothree");
    o.finish().unwrap();
    // A chunk after the last.
    let mut o = opener(&head, &a, &b);
    let mut extra = chunks.clone();
    extra.push(chunks[2].clone());
    assert!(matches!(
        open_all_in_place(&mut o, &extra),
        Err(SealError::AfterEnd)
    ));
    // Too short to hold a tag, empty, or a bad flag.
    let mut o = opener(&head, &a, &b);
    assert!(matches!(
        o.open_in_place(&mut []),
        Err(SealError::Malformed(_))
    ));
    assert!(matches!(
        o.open_in_place(&mut [0u8; 16]),
        Err(SealError::Malformed(_))
    ));
    let mut flag = chunks[0].clone();
    flag[0] = 2;
    assert!(matches!(
        o.open_in_place(&mut flag),
        Err(SealError::Malformed(_))
    ));
    // A sealer after its last chunk, and a buffer without room for the flag.
    let rng = SystemRandom::new();
    let (mut s, _) =
        StreamSealer::start(&header(&a, &b, 9), &a.sealing, &b.sealing.public(), &rng).unwrap();
    assert!(matches!(
        s.seal_in_place(&mut vec![0; 4], 4, false),
        Err(SealError::Malformed(_))
    ));
    s.seal_in_place(&mut vec![0, 1, 2], 0, true).unwrap();
    assert!(matches!(
        s.seal_in_place(&mut vec![0, 1], 0, false),
        Err(SealError::AfterEnd)
    ));
}
