//! Bulk transfers: a model (or a result) streamed over a `/flare/bulk/1.0.0` stream, sealed
//! end to end to the receiver's x25519 key, in chunks, so memory stays bounded by one chunk on
//! top of the model itself, and a relay in between reads nothing.
//!
//! On the wire: a length-prefixed frame with the sealed-stream header (sender, receiver, job,
//! workflow, round, kind and sequence number, authenticated), then length-prefixed sealed
//! chunks. Inside the seal: a length-prefixed CBOR [`TransferMeta`] (task, return code,
//! headers, and the model's skeleton: names, dtypes, shapes, metrics), then the raw bytes of
//! every tensor in skeleton order.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flare_crypto::seal::{
    CHUNK_OVERHEAD, MessageHeader, ReplayWindow, SealError, SealedStreamHeader, StreamOpener,
    StreamSealer,
};
use flare_crypto::{PeerId, SealingSecret};
use flare_protocols::codec::{decode, encode};
use flare_protocols::model::{DType, FLModel, MetaValue, ParamsType, Tensor, numel};
use flare_protocols::shareable::ReturnCode;
use flare_protocols::stored::{ModelRef, StoredModel, TensorInfo};
use futures::{AsyncReadExt, AsyncWriteExt};
use serde::{Deserialize, Serialize};

use super::PeerInfo;

/// Plaintext bytes sealed per chunk.
pub const CHUNK: usize = 1 << 20;
/// Largest frame accepted: a chunk plus its flag and tag, with room to spare.
const MAX_FRAME: usize = CHUNK + 1024;
/// Largest transfer meta (CBOR) accepted.
const MAX_META: usize = 4 << 20;
/// The byte a receiver writes back once a transfer is complete.
const ACK: u8 = 0x06;
/// The byte a receiver writes back for a transfer it will never take (the job it belongs to
/// has ended): the sender stops trying.
const REFUSED: u8 = 0x15;
/// How long a frame may take to arrive before the transfer is abandoned.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    /// The stream failed.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// Sealing or opening failed (tampering, replay, wrong receiver, truncation).
    #[error("seal: {0}")]
    Seal(#[from] SealError),
    /// The peer sent something malformed or over a limit.
    #[error("malformed transfer: {0}")]
    Malformed(String),
    /// A frame did not arrive in time.
    #[error("transfer stalled: no data for {0:?}")]
    Stalled(Duration),
    /// The receiver did not confirm the transfer.
    #[error("transfer not acknowledged: {0}")]
    NotAcknowledged(String),
    /// The receiver will never take the transfer (its job has ended there); not retried.
    #[error("the receiver refused the transfer: its job no longer runs there")]
    Refused,
    /// The sender is not an admitted peer.
    #[error("peer {0} is not admitted")]
    NotAdmitted(PeerId),
    /// The stream ended before its last chunk.
    #[error("the stream ended before the transfer was complete")]
    Cut,
    /// The transfer could not be spooled to disk (a full disk, say); `job`, `kind` and
    /// `task_name` say what it was, so the receiver can report it.
    #[error("the transfer could not be stored: {reason}")]
    Spool {
        /// Job of the transfer, once its header was read.
        job: String,
        /// Kind of the transfer (`result`, `upload`).
        kind: String,
        /// Task name from its meta.
        task_name: String,
        /// Task id from its meta.
        task_id: u64,
        /// Round from its meta.
        round: u32,
        /// Why.
        reason: String,
    },
}

impl BulkError {
    /// Whether the stream broke off (its connection went, or it stalled), as opposed to the
    /// peer sending something wrong: a broken transfer can be resumed.
    pub fn is_cut(&self) -> bool {
        matches!(
            self,
            BulkError::Io(_)
                | BulkError::Stalled(_)
                | BulkError::Cut
                | BulkError::Seal(SealError::Truncated)
        )
    }
}

/// The names, dtypes and shapes of a model's tensors, and everything else it carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skeleton {
    /// Tensors in transfer order.
    pub tensors: Vec<(String, DType, Vec<usize>)>,
    /// Full weights or a diff.
    pub params_type: ParamsType,
    /// Metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Metadata.
    pub meta: BTreeMap<String, MetaValue>,
    /// Round, if known.
    pub current_round: Option<u32>,
    /// Total rounds, if known.
    pub total_rounds: Option<u32>,
}

impl Skeleton {
    fn of(model: &FLModel) -> Skeleton {
        Skeleton {
            tensors: model
                .params
                .iter()
                .map(|(k, t)| (k.clone(), t.dtype(), t.shape().to_vec()))
                .collect(),
            params_type: model.params_type,
            metrics: model.metrics.clone(),
            meta: model.meta.clone(),
            current_round: model.current_round,
            total_rounds: model.total_rounds,
        }
    }

    fn of_stored(model: &StoredModel) -> Skeleton {
        Skeleton {
            tensors: model
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
                .collect(),
            params_type: model.params_type,
            metrics: model.metrics.clone(),
            meta: model.meta.clone(),
            current_round: model.current_round,
            total_rounds: model.total_rounds,
        }
    }

    fn infos(&self) -> Vec<TensorInfo> {
        self.tensors
            .iter()
            .map(|(name, dtype, shape)| TensorInfo {
                name: name.clone(),
                dtype: *dtype,
                shape: shape.clone(),
            })
            .collect()
    }

    /// Total tensor bytes, or `None` on overflow.
    fn byte_len(&self) -> Option<u64> {
        self.tensors.iter().try_fold(0u64, |acc, (_, d, s)| {
            let n = numel(s)?.checked_mul(d.size())?;
            acc.checked_add(n as u64)
        })
    }
}

/// Everything about a transfer except the tensor bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferMeta {
    /// Task id this belongs to.
    pub task_id: u64,
    /// Task name.
    pub task_name: String,
    /// Round.
    pub round: u32,
    /// Outcome (results).
    pub return_code: ReturnCode,
    /// Headers (for example an error reason).
    pub headers: BTreeMap<String, MetaValue>,
    /// The model's skeleton, if a model follows.
    pub skeleton: Option<Skeleton>,
    /// A workflow's own message (CBOR), for peer-to-peer workflows.
    #[serde(default)]
    pub body: Option<serde_bytes::ByteBuf>,
    /// The id under which a model transfer can be resumed: the sender gives every attempt of
    /// one transfer the same id, and waits after the meta for the receiver to say how many
    /// tensor bytes it already holds ([`RESUME_TTL`]).
    #[serde(default)]
    pub resume: Option<u64>,
}

/// How long a receiver keeps a broken transfer for its sender to resume.
pub const RESUME_TTL: Duration = Duration::from_secs(600);
/// How many broken transfers a receiver keeps (the oldest goes first).
pub const MAX_PARTIALS: usize = 8;

/// Broken transfers kept for resuming: by sender and resume id, with the seal header's job
/// and kind (a resumption must match them) and when each broke.
#[derive(Default)]
struct Partials(
    std::collections::VecDeque<(PeerId, u64, String, String, std::time::Instant, Assembler)>,
);

impl Partials {
    fn put(&mut self, from: PeerId, id: u64, header: &MessageHeader, asm: Assembler) {
        self.0
            .retain(|p| p.4.elapsed() < RESUME_TTL && !(p.0 == from && p.1 == id));
        while self.0.len() >= MAX_PARTIALS {
            self.0.pop_front();
        }
        self.0.push_back((
            from,
            id,
            header.job.clone(),
            header.kind.clone(),
            std::time::Instant::now(),
            asm,
        ));
    }

    fn take(&mut self, from: PeerId, id: u64, header: &MessageHeader) -> Option<Assembler> {
        self.0.retain(|p| p.4.elapsed() < RESUME_TTL);
        let i = self
            .0
            .iter()
            .position(|p| p.0 == from && p.1 == id && p.2 == header.job && p.3 == header.kind)?;
        self.0.remove(i).map(|p| p.5)
    }
}

/// Where a transfer belongs: bound into the seal's associated data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Job id.
    pub job: String,
    /// Workflow name.
    pub workflow: String,
    /// Round.
    pub round: u64,
    /// Message kind, for example `task` or `result`.
    pub kind: String,
}

/// This node's sealing state, shared by all transfers.
#[derive(Clone)]
pub struct Sealing {
    me: PeerId,
    secret: SealingSecret,
    seq: Arc<AtomicU64>,
    window: Arc<Mutex<ReplayWindow>>,
    rng: Arc<ring::rand::SystemRandom>,
    partials: Arc<Mutex<Partials>>,
}

impl std::fmt::Debug for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealing")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Sealing {
    /// Sealing state for `me`. Sequence numbers start at the current time in microseconds,
    /// so a restarted node never reuses one a peer has already seen.
    pub fn new(me: PeerId, secret: SealingSecret) -> Self {
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        Sealing {
            me,
            secret,
            seq: Arc::new(AtomicU64::new(start)),
            window: Arc::new(Mutex::new(ReplayWindow::new(4096))),
            rng: Arc::new(ring::rand::SystemRandom::new()),
            partials: Arc::default(),
        }
    }
}

async fn write_frame<W: futures::AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| std::io::Error::other("frame too large"))?;
    // One write: a lone 4-byte write would become a yamux frame of its own.
    let mut buf = Vec::with_capacity(4 + bytes.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(bytes);
    w.write_all(&buf).await
}

/// Reads one length-prefixed frame into `buf` (reused across frames; it grows to the largest
/// frame seen, at most `max`) and returns its length, or `None` on a clean end of stream
/// before a frame starts. The frame is `buf[..n]`.
async fn read_frame_into<R: futures::AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    buf: &mut Vec<u8>,
) -> Result<Option<usize>, BulkError> {
    let mut len = [0u8; 4];
    let read = tokio::time::timeout(FRAME_TIMEOUT, async {
        // A clean end of stream before a frame starts is reported as `None`.
        let n = r.read(&mut len[..1]).await?;
        if n == 0 {
            return Ok::<_, std::io::Error>(None);
        }
        r.read_exact(&mut len[1..]).await?;
        let n = u32::from_be_bytes(len) as usize;
        if n > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("frame of {n} bytes exceeds {max}"),
            ));
        }
        if buf.len() < n {
            buf.resize(n, 0);
        }
        r.read_exact(&mut buf[..n]).await?;
        Ok(Some(n))
    })
    .await
    .map_err(|_| BulkError::Stalled(FRAME_TIMEOUT))?;
    Ok(read?)
}

async fn read_frame<R: futures::AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, BulkError> {
    let mut buf = Vec::new();
    Ok(read_frame_into(r, max, &mut buf).await?.map(|n| {
        buf.truncate(n);
        buf
    }))
}

/// Bytes in front of a chunk's plaintext in [`ChunkWriter`]'s buffer: the frame's length
/// prefix and the seal's flag byte.
const FRAME_HEAD: usize = 4 + 1;

/// Buffers plaintext and writes it out as sealed chunks of [`CHUNK`] bytes.
///
/// One buffer, reused for every chunk, holds the frame as it goes out: the length prefix, the
/// flag, the plaintext (sealed in place) and the tag, written with one `write_all`.
pub(crate) struct ChunkWriter<'a, W> {
    out: &'a mut W,
    sealer: StreamSealer,
    buf: Vec<u8>,
    sent: u64,
}

impl<'a, W: futures::AsyncWrite + Unpin> ChunkWriter<'a, W> {
    fn new(out: &'a mut W, sealer: StreamSealer, sent: u64) -> Self {
        let mut buf = Vec::with_capacity(FRAME_HEAD + CHUNK + CHUNK_OVERHEAD);
        buf.resize(FRAME_HEAD, 0);
        ChunkWriter {
            out,
            sealer,
            buf,
            sent,
        }
    }

    pub(crate) async fn push(&mut self, mut data: &[u8]) -> Result<(), BulkError> {
        while !data.is_empty() {
            let room = FRAME_HEAD + CHUNK - self.buf.len();
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == FRAME_HEAD + CHUNK {
                self.write_chunk(false).await?;
            }
        }
        Ok(())
    }

    /// Seals what is buffered as a chunk of its own (not the last) and flushes it out, so the
    /// receiver can act on it before more comes.
    async fn flush_chunk(&mut self) -> Result<(), BulkError> {
        if self.buf.len() > FRAME_HEAD {
            self.write_chunk(false).await?;
        }
        self.out.flush().await?;
        Ok(())
    }

    /// Reads the receiver's answer to a resumable transfer's meta: how many tensor bytes it
    /// already holds.
    async fn read_offset(&mut self) -> Result<u64, BulkError>
    where
        W: futures::AsyncRead,
    {
        let mut b = [0u8; 8];
        match tokio::time::timeout(FRAME_TIMEOUT, self.out.read_exact(&mut b)).await {
            Ok(r) => r?,
            Err(_) => return Err(BulkError::Stalled(FRAME_TIMEOUT)),
        }
        Ok(u64::from_be_bytes(b))
    }

    /// Seals the buffered plaintext in place and writes the frame.
    async fn write_chunk(&mut self, last: bool) -> Result<(), BulkError> {
        self.sealer.seal_in_place(&mut self.buf, 4, last)?;
        let len = u32::try_from(self.buf.len() - 4)
            .map_err(|_| BulkError::Malformed("frame too large".into()))?;
        self.buf[..4].copy_from_slice(&len.to_be_bytes());
        self.out.write_all(&self.buf).await?;
        self.sent += self.buf.len() as u64;
        self.buf.truncate(FRAME_HEAD);
        Ok(())
    }

    pub(crate) async fn finish(mut self) -> Result<u64, BulkError>
    where
        W: futures::AsyncRead,
    {
        self.write_chunk(true).await?;
        self.out.flush().await?;
        self.out.close().await?;
        // The receiver acknowledges a transfer it opened and rebuilt completely. Without the
        // ack the sender cannot tell a delivered transfer from one the receiving side dropped
        // (libp2p-stream drops inbound streams its accept queue has no room for).
        let mut ack = [0u8; 1];
        match tokio::time::timeout(FRAME_TIMEOUT, self.out.read_exact(&mut ack)).await {
            Ok(Ok(())) if ack[0] == ACK => Ok(self.sent),
            Ok(Ok(())) if ack[0] == REFUSED => Err(BulkError::Refused),
            Ok(Ok(())) => Err(BulkError::NotAcknowledged(format!(
                "bad ack byte {}",
                ack[0]
            ))),
            Ok(Err(e)) => Err(BulkError::NotAcknowledged(e.to_string())),
            Err(_) => Err(BulkError::NotAcknowledged(format!(
                "no ack within {FRAME_TIMEOUT:?}"
            ))),
        }
    }
}

/// Seals and sends `meta` and `model` to `to` over `stream`; returns the bytes written.
pub async fn send<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(
    stream: &mut S,
    sealing: &Sealing,
    to: &PeerInfo,
    route: &Route,
    meta: TransferMeta,
    model: Option<&FLModel>,
) -> Result<u64, BulkError> {
    send_body(stream, sealing, to, route, meta, model.map(Body::Memory)).await
}

/// A model to send: in memory (its bytes are sealed from where they are), or stored (read a
/// chunk at a time).
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    /// Tensors in memory.
    Memory(&'a FLModel),
    /// Tensors read through the model's source.
    Stored(&'a StoredModel),
}

impl<'a> Body<'a> {
    /// The body of `model`.
    pub fn of(model: &'a ModelRef) -> Body<'a> {
        match model {
            ModelRef::Memory(m) => Body::Memory(m),
            ModelRef::Stored(s) => Body::Stored(s),
        }
    }
}

async fn send_body<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(
    stream: &mut S,
    sealing: &Sealing,
    to: &PeerInfo,
    route: &Route,
    mut meta: TransferMeta,
    model: Option<Body<'_>>,
) -> Result<u64, BulkError> {
    let header = sealing.header(to, route);
    meta.skeleton = model.map(|b| match b {
        Body::Memory(m) => Skeleton::of(m),
        Body::Stored(s) => Skeleton::of_stored(s),
    });
    if model.is_none() {
        meta.resume = None;
    }
    let total = meta
        .skeleton
        .as_ref()
        .and_then(Skeleton::byte_len)
        .unwrap_or(0);
    let resumable = meta.resume.is_some();
    let mut w = start_stream(stream, sealing, header, &to.cert.sealing_public, &meta).await?;
    // Tensor bytes the receiver already holds from an earlier attempt: not sent again.
    let mut skip = 0u64;
    if resumable {
        w.flush_chunk().await?;
        skip = w.read_offset().await?;
        if skip > total {
            return Err(BulkError::Malformed(format!(
                "the receiver holds {skip} bytes of a {total}-byte transfer"
            )));
        }
    }
    match model {
        None => {}
        Some(Body::Memory(m)) => {
            for t in m.params.values() {
                let b = t.bytes();
                let from = skip.min(b.len() as u64) as usize;
                skip -= from as u64;
                w.push(&b[from..]).await?;
            }
        }
        Some(Body::Stored(s)) => {
            let mut buf = vec![0u8; CHUNK];
            for (i, t) in s.tensors.iter().enumerate() {
                let len = t.byte_len().unwrap_or(0);
                let mut at = skip.min(len as u64) as usize;
                skip -= at as u64;
                while at < len {
                    let n = (len - at).min(CHUNK);
                    s.source
                        .read_at(i, at as u64, &mut buf[..n])
                        .map_err(|e| BulkError::Io(std::io::Error::other(e)))?;
                    w.push(&buf[..n]).await?;
                    at += n;
                }
            }
        }
    }
    w.finish().await
}

impl Sealing {
    /// The seal header of a new transfer to `to` on `route`, with a fresh sequence number.
    pub(crate) fn header(&self, to: &PeerInfo, route: &Route) -> MessageHeader {
        MessageHeader {
            sender: self.me,
            receiver: to.peer,
            job: route.job.clone(),
            workflow: route.workflow.clone(),
            round: route.round,
            kind: route.kind.clone(),
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// Writes the sealed-stream header and the meta; returns the writer for the tensor bytes.
pub(crate) async fn start_stream<'a, S: futures::AsyncWrite + Unpin>(
    stream: &'a mut S,
    sealing: &Sealing,
    header: MessageHeader,
    to: &flare_crypto::SealingPublicKey,
    meta: &TransferMeta,
) -> Result<ChunkWriter<'a, S>, BulkError> {
    let (sealer, head) = StreamSealer::start(&header, &sealing.secret, to, sealing.rng.as_ref())?;
    write_frame(stream, &head).await?;
    let meta_bytes = encode(meta, MAX_META).map_err(|e| BulkError::Malformed(e.to_string()))?;
    let mut w = ChunkWriter::new(stream, sealer, head.len() as u64 + 4);
    w.push(&(meta_bytes.len() as u32).to_be_bytes()).await?;
    w.push(&meta_bytes).await?;
    Ok(w)
}

/// Sends a synthetic f32 model of `bytes` bytes (rounded down to whole f32s), generated chunk
/// by chunk, so the sender's memory does not grow with the size: for transfer benchmarks.
pub async fn send_synthetic<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(
    stream: &mut S,
    sealing: &Sealing,
    to: &PeerInfo,
    route: &Route,
    bytes: u64,
) -> Result<u64, BulkError> {
    let header = sealing.header(to, route);
    let elements = usize::try_from(bytes / 4).map_err(|_| BulkError::Malformed("size".into()))?;
    let meta = TransferMeta {
        task_id: 0,
        task_name: "bench".into(),
        round: 0,
        return_code: ReturnCode::Ok,
        headers: BTreeMap::new(),
        skeleton: Some(Skeleton {
            tensors: vec![("synthetic".into(), DType::F32, vec![elements])],
            params_type: ParamsType::Full,
            metrics: BTreeMap::new(),
            meta: BTreeMap::new(),
            current_round: None,
            total_rounds: None,
        }),
        body: None,
        resume: None,
    };
    let mut w = start_stream(stream, sealing, header, &to.cert.sealing_public, &meta).await?;
    let block: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
    let mut left = elements as u64 * 4;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        w.push(&block[..n]).await?;
        left -= n as u64;
    }
    w.finish().await
}

/// A received transfer.
#[derive(Debug)]
pub struct Received {
    /// The authenticated seal header (job, workflow, round, kind, sequence number).
    pub header: MessageHeader,
    /// Task, outcome and headers.
    pub meta: TransferMeta,
    /// The model, if one was sent and kept in memory.
    pub model: Option<FLModel>,
    /// The model, if one was sent and spooled to a file ([`receive_spooled`]); the file goes
    /// when the model is dropped.
    pub stored: Option<StoredModel>,
    /// Bytes read from the stream.
    pub bytes: u64,
}

/// A spool failure of task `task_name`; the stream's job and kind are filled in by
/// [`receive_inner`].
fn spool_error(meta: &TransferMeta, e: crate::model_io::ModelFileError) -> BulkError {
    BulkError::Spool {
        job: String::new(),
        kind: String::new(),
        task_name: meta.task_name.clone(),
        task_id: meta.task_id,
        round: meta.round,
        reason: e.to_string(),
    }
}

/// Rebuilds meta and tensors from the plaintext as it arrives.
struct Assembler {
    max_model_bytes: u64,
    /// Keep tensor bytes (false: count and check them, then drop them).
    keep: bool,
    prefix: Vec<u8>,
    meta: Option<TransferMeta>,
    /// Index of the tensor being filled, and its bytes so far.
    current: usize,
    filling: Vec<u8>,
    /// Bytes of the current tensor received so far.
    filled: usize,
    tensors: BTreeMap<String, Tensor>,
    /// Where to spool the tensor bytes (instead of keeping them), and the writer once the
    /// meta said what comes.
    spool: Option<PathBuf>,
    writer: Option<crate::model_io::SpoolWriter>,
    /// A model smaller than this is kept in memory even with a spool.
    spool_min: u64,
    /// Tensor bytes taken in so far (what a resumed transfer need not send again).
    consumed: u64,
}

impl Assembler {
    fn push(&mut self, mut data: &[u8]) -> Result<(), BulkError> {
        while !data.is_empty() {
            let Some(meta) = &self.meta else {
                let need = if self.prefix.len() < 4 {
                    4 - self.prefix.len()
                } else {
                    let len = u32::from_be_bytes([
                        self.prefix[0],
                        self.prefix[1],
                        self.prefix[2],
                        self.prefix[3],
                    ]) as usize;
                    if len > MAX_META {
                        return Err(BulkError::Malformed(format!(
                            "meta of {len} bytes exceeds {MAX_META}"
                        )));
                    }
                    4 + len - self.prefix.len()
                };
                let take = need.min(data.len());
                self.prefix.extend_from_slice(&data[..take]);
                data = &data[take..];
                if let Some(len) = self.prefix.get(..4) {
                    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                    if len > MAX_META {
                        return Err(BulkError::Malformed(format!(
                            "meta of {len} bytes exceeds {MAX_META}"
                        )));
                    }
                }
                if self.prefix.len() > 4 && take == need {
                    let meta: TransferMeta = decode(&self.prefix[4..], MAX_META)
                        .map_err(|e| BulkError::Malformed(e.to_string()))?;
                    if let Some(s) = &meta.skeleton {
                        let total = s
                            .byte_len()
                            .ok_or_else(|| BulkError::Malformed("model size overflows".into()))?;
                        if total > self.max_model_bytes {
                            return Err(BulkError::Malformed(format!(
                                "model of {total} bytes exceeds the limit of {}",
                                self.max_model_bytes
                            )));
                        }
                    }
                    if let Some(s) = &meta.skeleton
                        && self.spool.is_some()
                        && s.byte_len().is_some_and(|n| n < self.spool_min)
                    {
                        // Small enough for memory: kept there, not spooled.
                        self.spool = None;
                        self.keep = true;
                    }
                    if let (Some(path), Some(s)) = (&self.spool, &meta.skeleton) {
                        let like = FLModel {
                            params_type: s.params_type,
                            current_round: s.current_round,
                            metrics: s.metrics.clone(),
                            ..FLModel::default()
                        };
                        let w = crate::model_io::SpoolWriter::create(
                            path,
                            &s.infos(),
                            &flare_protocols::safetensors_io::metadata(&like),
                        )
                        .map_err(|e| spool_error(&meta, e))?;
                        self.writer = Some(w);
                    }
                    self.meta = Some(meta);
                    self.prefix = Vec::new();
                }
                continue;
            };
            let Some(skel) = &meta.skeleton else {
                return Err(BulkError::Malformed(
                    "bytes after a transfer without a model".into(),
                ));
            };
            let Some((name, dtype, shape)) = skel.tensors.get(self.current) else {
                return Err(BulkError::Malformed(
                    "more tensor bytes than the skeleton declares".into(),
                ));
            };
            let want = numel(shape).unwrap_or(0) * dtype.size();
            let take = (want - self.filled).min(data.len());
            if self.keep {
                // Grow by doubling what actually arrived, never past the declared size: a
                // peer's claim alone reserves nothing, and the tensor ends up exactly sized.
                let need = self.filling.len() + take;
                if need > self.filling.capacity() {
                    let grow = self.filling.capacity().max(CHUNK);
                    let target = (self.filling.len() + grow).max(need).min(want);
                    self.filling.reserve_exact(target - self.filling.len());
                }
                self.filling.extend_from_slice(&data[..take]);
            } else if let Some(w) = &mut self.writer {
                w.push(&data[..take]).map_err(|e| spool_error(meta, e))?;
            }
            self.filled += take;
            self.consumed += take as u64;
            data = &data[take..];
            if self.filled == want {
                self.filled = 0;
                if !self.keep {
                    self.current += 1;
                    continue;
                }
                let t =
                    Tensor::from_bytes(*dtype, shape.clone(), std::mem::take(&mut self.filling))
                        .map_err(|e| BulkError::Malformed(e.to_string()))?;
                self.tensors.insert(name.clone(), t);
                self.current += 1;
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(TransferMeta, Option<FLModel>, Option<StoredModel>), BulkError> {
        let meta = self
            .meta
            .take()
            .ok_or_else(|| BulkError::Malformed("transfer ended before its meta".into()))?;
        let model = match &meta.skeleton {
            None => None,
            Some(s) if !self.keep => {
                if self.current
                    + s.tensors
                        .iter()
                        .skip(self.current)
                        .filter(|t| numel(&t.2) == Some(0))
                        .count()
                    != s.tensors.len()
                {
                    return Err(BulkError::Malformed(
                        "transfer ended inside a tensor".into(),
                    ));
                }
                if let Some(w) = self.writer.take() {
                    let path = w.finish().map_err(|e| spool_error(&meta, e))?;
                    let mut stored =
                        crate::model_io::open_spooled(&path).map_err(|e| spool_error(&meta, e))?;
                    stored.meta = s.meta.clone();
                    stored.total_rounds = s.total_rounds;
                    return Ok((meta, None, Some(stored)));
                }
                None
            }
            Some(s) => {
                // Zero-sized tensors need no bytes; settle them now.
                while let Some((name, dtype, shape)) = s.tensors.get(self.current) {
                    if numel(shape) != Some(0) {
                        return Err(BulkError::Malformed(format!(
                            "transfer ended inside tensor {name:?}"
                        )));
                    }
                    let t = Tensor::from_bytes(*dtype, shape.clone(), Vec::new())
                        .map_err(|e| BulkError::Malformed(e.to_string()))?;
                    self.tensors.insert(name.clone(), t);
                    self.current += 1;
                }
                if self.tensors.len() != s.tensors.len() {
                    return Err(BulkError::Malformed("duplicate tensor names".into()));
                }
                Some(FLModel {
                    params: self.tensors,
                    params_type: s.params_type,
                    metrics: s.metrics.clone(),
                    meta: s.meta.clone(),
                    current_round: s.current_round,
                    total_rounds: s.total_rounds,
                })
            }
        };
        Ok((meta, model, None))
    }
}

/// Receives and opens one transfer from `from` (an admitted peer).
pub async fn receive<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(
    stream: &mut S,
    sealing: &Sealing,
    from: &PeerInfo,
    max_model_bytes: u64,
) -> Result<Received, BulkError> {
    receive_inner(stream, sealing, from, max_model_bytes, true, true, None).await
}

/// Like [`receive`], but the model of a transfer of kind `kind` that is at least `min` bytes
/// goes to a safetensors file at `spool` as it arrives ([`Received::stored`]); smaller ones
/// and other kinds are kept in memory.
pub async fn receive_spooling<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(
    stream: &mut S,
    sealing: &Sealing,
    from: &PeerInfo,
    max_model_bytes: u64,
    spool: PathBuf,
    kind: &str,
    min: u64,
) -> Result<Received, BulkError> {
    receive_inner(
        stream,
        sealing,
        from,
        max_model_bytes,
        false,
        true,
        Some((spool, Some(kind), min)),
    )
    .await
}

/// Like [`receive_held`], but the tensor bytes go to a safetensors file at `spool` as they
/// arrive ([`Received::stored`]), so memory holds one chunk whatever the model's size. No
/// partial file is left when the transfer fails.
pub async fn receive_spooled<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(
    stream: &mut S,
    sealing: &Sealing,
    from: &PeerInfo,
    max_model_bytes: u64,
    spool: PathBuf,
) -> Result<Received, BulkError> {
    receive_inner(
        stream,
        sealing,
        from,
        max_model_bytes,
        false,
        false,
        Some((spool, None, 0)),
    )
    .await
}

/// Like [`receive`], but leaves the acknowledgement to the caller ([`acknowledge`]), once it
/// has stored what arrived: a transfer whose payload could not be kept (a full disk, say) is
/// not acknowledged, so the sender tries it again.
pub async fn receive_held<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(
    stream: &mut S,
    sealing: &Sealing,
    from: &PeerInfo,
    max_model_bytes: u64,
) -> Result<Received, BulkError> {
    receive_inner(stream, sealing, from, max_model_bytes, true, false, None).await
}

/// Tells the sender of a transfer received with [`receive_held`] or [`receive_spooled`] that
/// it will never be taken, so it is not sent again.
pub async fn refuse<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<(), BulkError> {
    stream.write_all(&[REFUSED]).await?;
    stream.flush().await?;
    let _ = stream.close().await;
    Ok(())
}

/// Acknowledges a transfer received with [`receive_held`].
pub async fn acknowledge<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<(), BulkError> {
    stream.write_all(&[ACK]).await?;
    stream.flush().await?;
    let _ = stream.close().await;
    Ok(())
}

/// Like [`receive`], but checks and drops the tensor bytes instead of keeping them: memory
/// stays at one chunk whatever the size. For transfer benchmarks.
pub async fn receive_discard<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(
    stream: &mut S,
    sealing: &Sealing,
    from: &PeerInfo,
    max_model_bytes: u64,
) -> Result<Received, BulkError> {
    receive_inner(stream, sealing, from, max_model_bytes, false, true, None).await
}

/// The receiving end of a sealed stream: opens the header, then hands out plaintext chunk by
/// chunk, each read into and opened in one reused buffer.
pub(crate) struct SealedReader<'a, S> {
    stream: &'a mut S,
    opener: Option<StreamOpener>,
    header: MessageHeader,
    frame: Vec<u8>,
    bytes: u64,
}

impl<'a, S: futures::AsyncRead + futures::AsyncWrite + Unpin> SealedReader<'a, S> {
    /// Reads and authenticates the stream header from `from` (an admitted peer).
    pub(crate) async fn open(
        stream: &'a mut S,
        sealing: &Sealing,
        from: &PeerInfo,
    ) -> Result<Self, BulkError> {
        let head = read_frame(stream, 64 << 10)
            .await?
            .ok_or_else(|| BulkError::Malformed("empty stream".into()))?;
        let parsed = SealedStreamHeader::parse(&head)?;
        if parsed.header().sender != from.peer {
            return Err(BulkError::Malformed(format!(
                "seal names sender {} but the stream comes from {}",
                parsed.header().sender,
                from.peer
            )));
        }
        let opener: StreamOpener = {
            let mut window = sealing
                .window
                .lock()
                .map_err(|_| BulkError::Malformed("replay window poisoned".into()))?;
            parsed.open(
                &sealing.me,
                &sealing.secret,
                &from.cert.sealing_public,
                &mut window,
            )?
        };
        Ok(SealedReader {
            stream,
            header: opener.header().clone(),
            opener: Some(opener),
            frame: Vec::new(),
            bytes: head.len() as u64 + 4,
        })
    }

    /// The authenticated seal header.
    pub(crate) fn header(&self) -> &MessageHeader {
        &self.header
    }

    /// The next chunk's plaintext, or `None` once the last chunk was read.
    pub(crate) async fn next(&mut self) -> Result<Option<&[u8]>, BulkError> {
        let Some(opener) = self.opener.as_mut() else {
            return Ok(None);
        };
        let Some(n) = read_frame_into(self.stream, MAX_FRAME, &mut self.frame).await? else {
            if let Some(o) = self.opener.take() {
                o.finish()?;
            }
            return Err(BulkError::Cut);
        };
        self.bytes += n as u64 + 4;
        let chunk = opener.open_in_place(&mut self.frame[..n])?;
        if chunk.last {
            self.opener = None;
        }
        Ok(Some(chunk.data))
    }

    /// Writes `bytes` back to the sender in the clear (the answer to a resumable transfer's
    /// meta: a count, which changes only what the sender sends again).
    pub(crate) async fn answer(&mut self, bytes: &[u8]) -> Result<(), BulkError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Acknowledges a complete transfer (call once `next` returned `None` and the payload
    /// checked out); returns the bytes read.
    pub(crate) async fn acknowledge(self) -> Result<u64, BulkError> {
        if self.opener.is_some() {
            return Err(SealError::Truncated.into());
        }
        self.stream.write_all(&[ACK]).await?;
        self.stream.flush().await?;
        let _ = self.stream.close().await;
        Ok(self.bytes)
    }
}

async fn receive_inner<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(
    stream: &mut S,
    sealing: &Sealing,
    from: &PeerInfo,
    max_model_bytes: u64,
    keep: bool,
    ack: bool,
    spool: Option<(PathBuf, Option<&str>, u64)>,
) -> Result<Received, BulkError> {
    let mut reader = SealedReader::open(stream, sealing, from).await?;
    let header = reader.header().clone();
    // The file to spool to, the only kind to spool (another kind is kept in memory), and the
    // smallest model to spool.
    let (keep, spool, spool_min) = match spool {
        Some((_, Some(k), _)) if k != header.kind => (true, None, 0),
        Some((path, _, min)) => (keep, Some(path), min),
        None => (keep, None, 0),
    };
    let mut asm = Assembler {
        max_model_bytes,
        keep,
        filled: 0,
        prefix: Vec::new(),
        meta: None,
        current: 0,
        filling: Vec::new(),
        tensors: BTreeMap::new(),
        spool,
        writer: None,
        spool_min,
        consumed: 0,
    };
    let named = |e: BulkError| match e {
        BulkError::Spool {
            task_name,
            task_id,
            round,
            reason,
            ..
        } => BulkError::Spool {
            job: header.job.clone(),
            kind: header.kind.clone(),
            task_name,
            task_id,
            round,
            reason,
        },
        other => other,
    };
    let mut answered = false;
    loop {
        let data = match reader.next().await {
            Ok(Some(data)) => data,
            Ok(None) => break,
            Err(e) => {
                // A transfer cut off in the middle is kept for its sender to resume.
                let resume = asm.meta.as_ref().and_then(|m| m.resume);
                if let (Some(id), true) = (resume, answered && e.is_cut())
                    && let Ok(mut p) = sealing.partials.lock()
                {
                    tracing::info!(peer = %from.peer, bytes = asm.consumed, "transfer broken; kept to resume");
                    p.put(from.peer, id, &header, asm);
                }
                return Err(e);
            }
        };
        asm.push(data).map_err(named)?;
        if !answered && let Some(id) = asm.meta.as_ref().and_then(|m| m.resume) {
            if asm.consumed > 0 {
                return Err(BulkError::Malformed(
                    "tensor bytes before the answer to a resumable transfer".into(),
                ));
            }
            let earlier = sealing
                .partials
                .lock()
                .ok()
                .and_then(|mut p| p.take(from.peer, id, &header));
            if let Some(old) = earlier {
                // The same transfer only: the same task and model skeleton.
                let same = match (&old.meta, &asm.meta) {
                    (Some(a), Some(b)) => {
                        a.skeleton == b.skeleton && a.task_id == b.task_id && a.round == b.round
                    }
                    _ => false,
                };
                if same {
                    tracing::info!(peer = %from.peer, bytes = old.consumed, "transfer resumed");
                    asm = old;
                }
            }
            reader.answer(&asm.consumed.to_be_bytes()).await?;
            answered = true;
        }
    }
    let (meta, model, stored) = asm.finish().map_err(named)?;
    let bytes = if ack {
        reader.acknowledge().await?
    } else if reader.opener.is_some() {
        return Err(SealError::Truncated.into());
    } else {
        reader.bytes
    };
    Ok(Received {
        header,
        meta,
        model,
        stored,
        bytes,
    })
}

/// How long [`deliver`] waits between attempts for a peer whose connection went to be
/// admitted again.
pub const RECONNECT_WAIT: Duration = Duration::from_secs(5);

/// How many times [`deliver`] tries a transfer.
pub const ATTEMPTS: u32 = 4;

/// Opens a bulk stream to `to` and sends `meta` and `model`, trying again (up to [`ATTEMPTS`]
/// times, with a growing pause) while the receiver does not acknowledge the transfer and is
/// still admitted. A retried transfer that had in fact arrived is a duplicate the receiver's
/// workflow drops.
pub async fn deliver(
    net: &super::NetHandle,
    sealing: &Sealing,
    to: &PeerInfo,
    route: &Route,
    meta: &TransferMeta,
    model: Option<&FLModel>,
) -> Result<u64, BulkError> {
    deliver_body(net, sealing, to, route, meta, model.map(Body::Memory)).await
}

/// Like [`deliver`], for a model in memory or stored.
pub async fn deliver_body(
    net: &super::NetHandle,
    sealing: &Sealing,
    to: &PeerInfo,
    route: &Route,
    meta: &TransferMeta,
    model: Option<Body<'_>>,
) -> Result<u64, BulkError> {
    let mut last = None;
    let mut meta = meta.clone();
    // Every attempt of a model transfer carries one id, under which the receiver keeps what
    // arrived before a break, so the next attempt sends only the rest.
    if model.is_some() {
        let mut id = [0u8; 8];
        ring::rand::SecureRandom::fill(sealing.rng.as_ref(), &mut id)
            .map_err(|_| BulkError::Malformed("no randomness for a transfer id".into()))?;
        meta.resume = Some(u64::from_be_bytes(id));
    }
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
            // A cut connection comes back when the peer (or we) dial again: wait a little.
            let back = std::time::Instant::now() + RECONNECT_WAIT;
            while !net.peers.is_admitted(&to.peer) && std::time::Instant::now() < back {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !net.peers.is_admitted(&to.peer) {
                break;
            }
        }
        let result = match net
            .streams
            .clone()
            .open_stream(to.peer, super::protocol::BULK_PROTOCOL)
            .await
        {
            Ok(mut stream) => send_body(&mut stream, sealing, to, route, meta.clone(), model).await,
            Err(e) => Err(BulkError::Io(std::io::Error::other(e.to_string()))),
        };
        match result {
            Ok(n) => return Ok(n),
            Err(BulkError::Refused) => return Err(BulkError::Refused),
            Err(e) => {
                tracing::warn!(peer = %to.peer, attempt, error = %e, "transfer failed; retrying");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(BulkError::NotAdmitted(to.peer)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn assembler(keep: bool) -> Assembler {
        Assembler {
            max_model_bytes: 1 << 20,
            keep,
            prefix: Vec::new(),
            meta: None,
            current: 0,
            filling: Vec::new(),
            filled: 0,
            tensors: BTreeMap::new(),
            spool: None,
            writer: None,
            spool_min: 0,
            consumed: 0,
        }
    }

    fn plaintext(model: &FLModel) -> Vec<u8> {
        let meta = TransferMeta {
            task_id: 1,
            task_name: "train".into(),
            round: 2,
            return_code: ReturnCode::Ok,
            headers: BTreeMap::new(),
            skeleton: Some(Skeleton::of(model)),
            body: None,
            resume: None,
        };
        let m = encode(&meta, MAX_META).unwrap();
        let mut out = (m.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&m);
        for t in model.params.values() {
            out.extend_from_slice(t.bytes());
        }
        out
    }

    fn model() -> FLModel {
        FLModel::from_params(BTreeMap::from([
            (
                "a".to_string(),
                Tensor::from_f32(vec![3], &[1.0, 2.0, 3.0]).unwrap(),
            ),
            ("b".to_string(), Tensor::zeros(DType::F32, vec![0]).unwrap()),
            ("c".to_string(), Tensor::from_i64(vec![2], &[7, 8]).unwrap()),
        ]))
    }

    #[test]
    fn rebuilds_a_model_from_any_chunking() {
        let m = model();
        let bytes = plaintext(&m);
        for step in [1, 3, 7, bytes.len()] {
            let mut a = assembler(true);
            for c in bytes.chunks(step) {
                a.push(c).unwrap();
            }
            let (meta, got, _) = a.finish().unwrap();
            assert_eq!(meta.round, 2);
            assert_eq!(got.unwrap().params, m.params);
        }
        let mut d = assembler(false);
        d.push(&bytes).unwrap();
        assert!(d.finish().unwrap().1.is_none());
    }

    #[test]
    fn refuses_lies_about_sizes() {
        let bytes = plaintext(&model());
        // One byte more than the skeleton declares.
        let mut a = assembler(true);
        let mut more = bytes.clone();
        more.push(0);
        assert!(a.push(&more).is_err());
        // Cut inside a tensor.
        let mut a = assembler(true);
        a.push(&bytes[..bytes.len() - 3]).unwrap();
        assert!(a.finish().is_err());
        // A declared meta larger than the cap.
        let mut a = assembler(true);
        assert!(a.push(&(MAX_META as u32 + 1).to_be_bytes()).is_err());
        // A model larger than the receiver accepts.
        let mut a = assembler(true);
        a.max_model_bytes = 8;
        assert!(a.push(&bytes).is_err());
    }

    #[test]
    fn frames_over_the_cap_are_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut big = (MAX_FRAME as u32 + 1).to_be_bytes().to_vec();
            big.extend_from_slice(&[0; 16]);
            let mut r = futures::io::Cursor::new(big);
            assert!(read_frame(&mut r, MAX_FRAME).await.is_err());
            let mut empty = futures::io::Cursor::new(Vec::new());
            assert!(read_frame(&mut empty, MAX_FRAME).await.unwrap().is_none());
            let mut cut = futures::io::Cursor::new(vec![0, 0, 0, 9, 1, 2]);
            assert!(read_frame(&mut cut, MAX_FRAME).await.is_err());
        });
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn random_plaintext_never_panics(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut a = assembler(true);
            for c in &chunks {
                if a.push(c).is_err() {
                    break;
                }
            }
            let _ = a.finish();
        }

        #[test]
        fn random_plaintext_never_panics_while_spooling(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let dir = tempfile::tempdir().unwrap();
            let mut a = assembler(false);
            a.spool = Some(dir.path().join("s.safetensors"));
            for c in &chunks {
                if a.push(c).is_err() {
                    break;
                }
            }
            let _ = a.finish();
        }
    }
}
