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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flare_crypto::seal::{
    MessageHeader, ReplayWindow, SealError, SealedStreamHeader, StreamOpener, StreamSealer,
};
use flare_crypto::{PeerId, SealingSecret};
use flare_protocols::codec::{decode, encode};
use flare_protocols::model::{DType, FLModel, MetaValue, ParamsType, Tensor, numel};
use flare_protocols::shareable::ReturnCode;
use futures::{AsyncReadExt, AsyncWriteExt};
use serde::{Deserialize, Serialize};

use super::PeerInfo;

/// Plaintext bytes sealed per chunk.
pub const CHUNK: usize = 1 << 20;
/// Largest frame accepted: a chunk plus its flag and tag, with room to spare.
const MAX_FRAME: usize = CHUNK + 1024;
/// Largest transfer meta (CBOR) accepted.
const MAX_META: usize = 4 << 20;
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
    /// The sender is not an admitted peer.
    #[error("peer {0} is not admitted")]
    NotAdmitted(PeerId),
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
        }
    }
}

async fn write_frame<W: futures::AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| std::io::Error::other("frame too large"))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(bytes).await
}

async fn read_frame<R: futures::AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, BulkError> {
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
        let mut buf = vec![0u8; n];
        r.read_exact(&mut buf).await?;
        Ok(Some(buf))
    })
    .await
    .map_err(|_| BulkError::Stalled(FRAME_TIMEOUT))?;
    Ok(read?)
}

/// Buffers plaintext and writes it out as sealed chunks of [`CHUNK`] bytes.
struct ChunkWriter<'a, W> {
    out: &'a mut W,
    sealer: Option<StreamSealer>,
    buf: Vec<u8>,
    sent: u64,
}

impl<W: futures::AsyncWrite + Unpin> ChunkWriter<'_, W> {
    async fn push(&mut self, mut data: &[u8]) -> Result<(), BulkError> {
        while !data.is_empty() {
            let room = CHUNK - self.buf.len();
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK {
                let sealer = self.sealer.as_mut().ok_or(SealError::AfterEnd)?;
                let framed = sealer.seal_chunk(&self.buf)?;
                write_frame(self.out, &framed).await?;
                self.sent += framed.len() as u64 + 4;
                self.buf.clear();
            }
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<u64, BulkError> {
        let sealer = self.sealer.take().ok_or(SealError::AfterEnd)?;
        let framed = sealer.seal_last(&self.buf)?;
        write_frame(self.out, &framed).await?;
        self.out.flush().await?;
        self.out.close().await?;
        Ok(self.sent + framed.len() as u64 + 4)
    }
}

/// Seals and sends `meta` and `model` to `to` over `stream`; returns the bytes written.
pub async fn send<S: futures::AsyncWrite + Unpin>(
    stream: &mut S,
    sealing: &Sealing,
    to: &PeerInfo,
    route: &Route,
    mut meta: TransferMeta,
    model: Option<&FLModel>,
) -> Result<u64, BulkError> {
    let header = MessageHeader {
        sender: sealing.me,
        receiver: to.peer,
        job: route.job.clone(),
        workflow: route.workflow.clone(),
        round: route.round,
        kind: route.kind.clone(),
        seq: sealing.seq.fetch_add(1, Ordering::Relaxed),
    };
    meta.skeleton = model.map(Skeleton::of);
    let mut w = start_stream(stream, sealing, header, &to.cert.sealing_public, &meta).await?;
    if let Some(m) = model {
        for t in m.params.values() {
            w.push(t.bytes()).await?;
        }
    }
    w.finish().await
}

/// Writes the sealed-stream header and the meta; returns the writer for the tensor bytes.
async fn start_stream<'a, S: futures::AsyncWrite + Unpin>(
    stream: &'a mut S,
    sealing: &Sealing,
    header: MessageHeader,
    to: &flare_crypto::SealingPublicKey,
    meta: &TransferMeta,
) -> Result<ChunkWriter<'a, S>, BulkError> {
    let (sealer, head) = StreamSealer::start(&header, &sealing.secret, to, sealing.rng.as_ref())?;
    write_frame(stream, &head).await?;
    let meta_bytes = encode(meta, MAX_META).map_err(|e| BulkError::Malformed(e.to_string()))?;
    let mut w = ChunkWriter {
        out: stream,
        sealer: Some(sealer),
        buf: Vec::with_capacity(CHUNK),
        sent: head.len() as u64 + 4,
    };
    w.push(&(meta_bytes.len() as u32).to_be_bytes()).await?;
    w.push(&meta_bytes).await?;
    Ok(w)
}

/// Sends a synthetic f32 model of `bytes` bytes (rounded down to whole f32s), generated chunk
/// by chunk, so the sender's memory does not grow with the size: for transfer benchmarks.
pub async fn send_synthetic<S: futures::AsyncWrite + Unpin>(
    stream: &mut S,
    sealing: &Sealing,
    to: &PeerInfo,
    route: &Route,
    bytes: u64,
) -> Result<u64, BulkError> {
    let header = MessageHeader {
        sender: sealing.me,
        receiver: to.peer,
        job: route.job.clone(),
        workflow: route.workflow.clone(),
        round: route.round,
        kind: route.kind.clone(),
        seq: sealing.seq.fetch_add(1, Ordering::Relaxed),
    };
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
    /// The model, if one was sent.
    pub model: Option<FLModel>,
    /// Bytes read from the stream.
    pub bytes: u64,
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
                self.filling.extend_from_slice(&data[..take]);
            }
            self.filled += take;
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

    fn finish(mut self) -> Result<(TransferMeta, Option<FLModel>), BulkError> {
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
        Ok((meta, model))
    }
}

/// Receives and opens one transfer from `from` (an admitted peer).
pub async fn receive<S: futures::AsyncRead + Unpin>(
    stream: &mut S,
    sealing: &Sealing,
    from: &PeerInfo,
    max_model_bytes: u64,
) -> Result<Received, BulkError> {
    receive_inner(stream, sealing, from, max_model_bytes, true).await
}

/// Like [`receive`], but checks and drops the tensor bytes instead of keeping them: memory
/// stays at one chunk whatever the size. For transfer benchmarks.
pub async fn receive_discard<S: futures::AsyncRead + Unpin>(
    stream: &mut S,
    sealing: &Sealing,
    from: &PeerInfo,
    max_model_bytes: u64,
) -> Result<Received, BulkError> {
    receive_inner(stream, sealing, from, max_model_bytes, false).await
}

async fn receive_inner<S: futures::AsyncRead + Unpin>(
    stream: &mut S,
    sealing: &Sealing,
    from: &PeerInfo,
    max_model_bytes: u64,
    keep: bool,
) -> Result<Received, BulkError> {
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
    let mut opener: StreamOpener = {
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
    let header = opener.header().clone();
    let mut asm = Assembler {
        max_model_bytes,
        keep,
        filled: 0,
        prefix: Vec::new(),
        meta: None,
        current: 0,
        filling: Vec::new(),
        tensors: BTreeMap::new(),
    };
    let mut bytes = head.len() as u64 + 4;
    loop {
        let Some(frame) = read_frame(stream, MAX_FRAME).await? else {
            opener.finish()?;
            return Err(BulkError::Malformed(
                "stream ended without its last chunk".into(),
            ));
        };
        bytes += frame.len() as u64 + 4;
        let chunk = opener.open_chunk(&frame)?;
        asm.push(&chunk.data)?;
        if chunk.last {
            break;
        }
    }
    opener.finish()?;
    let (meta, model) = asm.finish()?;
    Ok(Received {
        header,
        meta,
        model,
        bytes,
    })
}
