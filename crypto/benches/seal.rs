//! Sealing and opening throughput for 1 MiB chunks (AES-256-GCM STREAM) and 1 MiB messages.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use flare_crypto::Identity;
use flare_crypto::seal::{
    MessageHeader, ReplayWindow, SealedMessage, SealedStreamHeader, StreamSealer, seal,
};
use ring::rand::SystemRandom;

const MIB: usize = 1 << 20;

fn header(a: &Identity, b: &Identity, seq: u64) -> MessageHeader {
    MessageHeader {
        sender: a.peer_id().expect("peer id"),
        receiver: b.peer_id().expect("peer id"),
        job: "bench".into(),
        workflow: "swarm".into(),
        round: 1,
        kind: "learn".into(),
        seq,
    }
}

fn bench(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let a = Identity::generate(&rng).expect("identity");
    let b = Identity::generate(&rng).expect("identity");
    let chunk = vec![0x5au8; MIB];
    let me = b.peer_id().expect("peer id");

    let mut g = c.benchmark_group("seal_1MiB");
    g.throughput(Throughput::Bytes(MIB as u64));

    let (mut sealer, _) =
        StreamSealer::start(&header(&a, &b, 0), &a.sealing, &b.sealing.public(), &rng)
            .expect("start");
    g.bench_function("stream_seal_chunk", |bn| {
        bn.iter(|| sealer.seal_chunk(&chunk).expect("seal"))
    });

    // In place in one reused buffer, as bulk transfers do.
    let mut buf = Vec::with_capacity(1 + MIB + 16);
    g.bench_function("stream_seal_in_place", |bn| {
        bn.iter(|| {
            buf.clear();
            buf.push(0);
            buf.extend_from_slice(&chunk);
            sealer.seal_in_place(&mut buf, 0, false).expect("seal");
        })
    });

    let mut seq = 1u64;
    g.bench_function("stream_open_in_place", |bn| {
        bn.iter_batched(
            || {
                seq += 1;
                let (mut s, head) = StreamSealer::start(
                    &header(&a, &b, seq),
                    &a.sealing,
                    &b.sealing.public(),
                    &rng,
                )
                .expect("start");
                let framed = s.seal_chunk(&chunk).expect("seal");
                let mut w = ReplayWindow::default();
                let opener = SealedStreamHeader::parse(&head)
                    .expect("parse")
                    .open(&me, &b.sealing, &a.sealing.public(), &mut w)
                    .expect("open");
                (opener, framed)
            },
            |(mut opener, mut framed)| {
                let n = opener
                    .open_in_place(&mut framed)
                    .expect("open chunk")
                    .data
                    .len();
                (opener, framed, n)
            },
            BatchSize::LargeInput,
        )
    });

    g.bench_function("stream_open_chunk", |bn| {
        bn.iter_batched(
            || {
                seq += 1;
                let (mut s, head) = StreamSealer::start(
                    &header(&a, &b, seq),
                    &a.sealing,
                    &b.sealing.public(),
                    &rng,
                )
                .expect("start");
                let framed = s.seal_chunk(&chunk).expect("seal");
                let mut w = ReplayWindow::default();
                let opener = SealedStreamHeader::parse(&head)
                    .expect("parse")
                    .open(&me, &b.sealing, &a.sealing.public(), &mut w)
                    .expect("open");
                (opener, framed)
            },
            |(mut opener, framed)| opener.open_chunk(&framed).expect("open chunk"),
            BatchSize::LargeInput,
        )
    });

    g.bench_function("message_seal", |bn| {
        bn.iter(|| {
            seal(
                &header(&a, &b, 1),
                &a.sealing,
                &b.sealing.public(),
                &chunk,
                &rng,
            )
            .expect("seal")
        })
    });

    let env = seal(
        &header(&a, &b, 1),
        &a.sealing,
        &b.sealing.public(),
        &chunk,
        &rng,
    )
    .expect("seal");
    g.bench_function("message_open", |bn| {
        bn.iter(|| {
            // A fresh window each time, so the same message is not a replay.
            let mut w = ReplayWindow::default();
            SealedMessage::parse(&env)
                .expect("parse")
                .open(&me, &b.sealing, &a.sealing.public(), &mut w)
                .expect("open")
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
