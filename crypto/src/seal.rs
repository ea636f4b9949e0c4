//! Sealed peer-to-peer messages: only the named receiver can open them, and it knows who sealed
//! them.
//!
//! Key schedule (per message): `dh_e = x25519(ephemeral, receiver)` and
//! `dh_s = x25519(sender, receiver)`; both must be contributory. HKDF-SHA256 with salt
//! `flare/seal/v1`, input `dh_e || dh_s`, and info = purpose label, sender and receiver static
//! public keys, and the whole header (which holds the ephemeral key, sender, receiver, job,
//! workflow, round, message kind and sequence number). The static-static term authenticates
//! the sender, so a relay or another peer cannot seal in someone else's name.
//!
//! Wire format of the header (all integers big-endian):
//! `magic "FLS" | format (1 = message, 2 = stream) | ephemeral x25519 [32] | seq u64 | round u64 |
//! sender len u8, bytes | receiver len u8, bytes | job, workflow, kind: len u16, UTF-8`.
//! A message is `header || AES-256-GCM(ciphertext || tag)` with the header as associated data.
//! A stream starts with `header || confirm tag [16]` (an AES-GCM tag over the header under a
//! separate key, so the header is authenticated before any chunk) and goes on with chunks
//! `flag (0 = more, 1 = last) || STREAM-BE32 ciphertext`, each chunk authenticated, each with
//! the header digest as associated data; STREAM detects reordering and truncation.
//!
//! Replays are caught by [`ReplayWindow`], a per-sender sliding window over sequence numbers.

use std::collections::HashMap;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use libp2p_identity::PeerId;
use ring::hkdf;
use ring::rand::SecureRandom;

use crate::identity::{SealingPublicKey, SealingSecret, random_secret};

const MAGIC: &[u8; 3] = b"FLS";
const FORMAT_MESSAGE: u8 = 1;
const FORMAT_STREAM: u8 = 2;
const TAG_LEN: usize = 16;
/// The longest job, workflow or kind string (bytes).
pub const MAX_FIELD_LEN: usize = 256;
/// The longest PeerId in bytes (an identity multihash of an Ed25519 key is 38).
pub const MAX_PEER_ID_LEN: usize = 64;
/// The largest plaintext of one chunk (bytes); chunks of 1 MiB are the norm.
pub const MAX_CHUNK_LEN: usize = 16 * 1024 * 1024;
/// The largest plaintext of one single-shot message (bytes).
pub const MAX_MESSAGE_LEN: usize = 64 * 1024 * 1024;
/// How many sequence numbers behind the highest seen are still accepted once.
pub const REPLAY_WINDOW: u64 = 128;

/// Why a message could not be sealed or was refused.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The envelope bytes are not a well-formed sealed message or chunk.
    #[error("malformed sealed message: {0}")]
    Malformed(&'static str),
    /// The message was sealed to someone else.
    #[error("message addressed to {found}, not to this node ({expected})")]
    WrongReceiver {
        /// This node.
        expected: Box<PeerId>,
        /// The receiver named in the message.
        found: Box<PeerId>,
    },
    /// The sequence number was already seen from this sender.
    #[error("replayed message {seq} from {sender}")]
    Replayed {
        /// The sender.
        sender: Box<PeerId>,
        /// The sequence number.
        seq: u64,
    },
    /// The sequence number is older than the replay window.
    #[error("message {seq} from {sender} is older than the replay window")]
    TooOld {
        /// The sender.
        sender: Box<PeerId>,
        /// The sequence number.
        seq: u64,
    },
    /// Authentication failed: the message or chunk was altered, reordered, sealed by another
    /// sender, or sealed with different header fields.
    #[error("sealed message failed authentication (tampered, reordered or wrong sender)")]
    Tampered,
    /// A key was of low order, so the shared secret would be predictable.
    #[error("non-contributory x25519 key")]
    NonContributory,
    /// A header field is too long.
    #[error("header field {0} is too long")]
    FieldTooLong(&'static str),
    /// A chunk or message is larger than allowed.
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The size given.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended without its last chunk.
    #[error("sealed stream truncated: no last chunk")]
    Truncated,
    /// A chunk came after the last chunk.
    #[error("chunk after the last chunk of a sealed stream")]
    AfterEnd,
    /// The stream has used every chunk counter value.
    #[error("sealed stream too long")]
    CounterExhausted,
    /// The random source handed in failed.
    #[error("the random source failed")]
    Random,
    /// The replay window tracks too many senders.
    #[error("replay window full ({0} senders)")]
    TooManySenders(usize),
}

/// Who sends what to whom: bound into every sealed message as associated data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageHeader {
    /// The sealing peer.
    pub sender: PeerId,
    /// The only peer that can open it.
    pub receiver: PeerId,
    /// The job it belongs to.
    pub job: String,
    /// The workflow (e.g. `swarm`, `cyclic`).
    pub workflow: String,
    /// The round number.
    pub round: u64,
    /// The message kind (e.g. `learn`, `result`).
    pub kind: String,
    /// The sender's sequence number toward this receiver; never reused.
    pub seq: u64,
}

impl MessageHeader {
    fn encode(&self, format: u8, ephemeral: &[u8; 32]) -> Result<Vec<u8>, SealError> {
        let sender = self.sender.to_bytes();
        let receiver = self.receiver.to_bytes();
        let mut out = Vec::with_capacity(96 + self.job.len() + self.workflow.len());
        out.extend_from_slice(MAGIC);
        out.push(format);
        out.extend_from_slice(ephemeral);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.round.to_be_bytes());
        for (name, id) in [("sender", &sender), ("receiver", &receiver)] {
            if id.len() > MAX_PEER_ID_LEN {
                return Err(SealError::FieldTooLong(name));
            }
            out.push(id.len() as u8);
            out.extend_from_slice(id);
        }
        for (name, s) in [
            ("job", &self.job),
            ("workflow", &self.workflow),
            ("kind", &self.kind),
        ] {
            if s.len() > MAX_FIELD_LEN {
                return Err(SealError::FieldTooLong(name));
            }
            out.extend_from_slice(&(s.len() as u16).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Ok(out)
    }
}

/// A cursor over untrusted bytes; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SealError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(SealError::Malformed("length overflow"))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(SealError::Malformed("truncated header"))?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, SealError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, SealError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Result<u64, SealError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn peer(&mut self) -> Result<PeerId, SealError> {
        let n = self.u8()? as usize;
        if n > MAX_PEER_ID_LEN {
            return Err(SealError::Malformed("peer id too long"));
        }
        PeerId::from_bytes(self.take(n)?).map_err(|_| SealError::Malformed("bad peer id"))
    }
    fn string(&mut self) -> Result<String, SealError> {
        let n = self.u16()? as usize;
        if n > MAX_FIELD_LEN {
            return Err(SealError::Malformed("field too long"));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| SealError::Malformed("field is not UTF-8"))
    }
}

/// A parsed header: the fields, the ephemeral key, and the exact header bytes.
#[derive(Clone, Debug)]
struct ParsedHeader {
    header: MessageHeader,
    ephemeral: [u8; 32],
    len: usize,
}

fn parse_header(bytes: &[u8], format: u8) -> Result<ParsedHeader, SealError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    if r.take(3)? != MAGIC {
        return Err(SealError::Malformed("bad magic"));
    }
    if r.u8()? != format {
        return Err(SealError::Malformed("wrong format byte"));
    }
    let mut ephemeral = [0u8; 32];
    ephemeral.copy_from_slice(r.take(32)?);
    let seq = r.u64()?;
    let round = r.u64()?;
    let sender = r.peer()?;
    let receiver = r.peer()?;
    let job = r.string()?;
    let workflow = r.string()?;
    let kind = r.string()?;
    Ok(ParsedHeader {
        header: MessageHeader {
            sender,
            receiver,
            job,
            workflow,
            round,
            kind,
            seq,
        },
        ephemeral,
        len: r.pos,
    })
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// The keys of one message or stream.
struct Keys {
    /// AES-256-GCM key of the message, or of the STREAM.
    data: zeroize::Zeroizing<[u8; 32]>,
    /// AES-256-GCM key of the stream header's confirmation tag.
    confirm: zeroize::Zeroizing<[u8; 32]>,
    /// STREAM nonce prefix.
    nonce_prefix: [u8; 7],
    /// SHA-256 of the header, associated data of every chunk.
    header_digest: [u8; 32],
}

fn derive(
    dh_e: &x25519_dalek::SharedSecret,
    dh_s: &x25519_dalek::SharedSecret,
    sender: &SealingPublicKey,
    receiver: &SealingPublicKey,
    header_bytes: &[u8],
) -> Result<Keys, SealError> {
    if !dh_e.was_contributory() || !dh_s.was_contributory() {
        return Err(SealError::NonContributory);
    }
    let mut ikm = zeroize::Zeroizing::new([0u8; 64]);
    ikm[..32].copy_from_slice(dh_e.as_bytes());
    ikm[32..].copy_from_slice(dh_s.as_bytes());
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"flare/seal/v1").extract(ikm.as_ref());
    let expand = |label: &[u8], out: &mut [u8]| -> Result<(), SealError> {
        let info = [
            label,
            sender.as_bytes().as_slice(),
            receiver.as_bytes().as_slice(),
            header_bytes,
        ];
        prk.expand(&info, Len(out.len()))
            .and_then(|okm| okm.fill(out))
            .map_err(|_| SealError::Malformed("key derivation failed"))
    };
    let mut data = zeroize::Zeroizing::new([0u8; 32]);
    let mut confirm = zeroize::Zeroizing::new([0u8; 32]);
    let mut nonce_prefix = [0u8; 7];
    expand(b"flare/seal/v1/data", data.as_mut())?;
    expand(b"flare/seal/v1/confirm", confirm.as_mut())?;
    expand(b"flare/seal/v1/nonce", &mut nonce_prefix)?;
    let mut header_digest = [0u8; 32];
    header_digest
        .copy_from_slice(ring::digest::digest(&ring::digest::SHA256, header_bytes).as_ref());
    Ok(Keys {
        data,
        confirm,
        nonce_prefix,
        header_digest,
    })
}

/// Sender side: makes the ephemeral key, the header bytes and the keys.
fn sender_keys(
    header: &MessageHeader,
    format: u8,
    sender: &SealingSecret,
    receiver: &SealingPublicKey,
    rng: &dyn SecureRandom,
) -> Result<(Vec<u8>, Keys), SealError> {
    let eph_bytes = random_secret(rng).map_err(|_| SealError::Random)?;
    let eph = x25519_dalek::StaticSecret::from(*eph_bytes);
    let eph_pub = x25519_dalek::PublicKey::from(&eph).to_bytes();
    let header_bytes = header.encode(format, &eph_pub)?;
    let recv = x25519_dalek::PublicKey::from(*receiver.as_bytes());
    let dh_e = eph.diffie_hellman(&recv);
    let dh_s = sender.to_dalek().diffie_hellman(&recv);
    let keys = derive(&dh_e, &dh_s, &sender.public(), receiver, &header_bytes)?;
    Ok((header_bytes, keys))
}

/// Receiver side: the keys for a parsed header.
fn receiver_keys(
    parsed: &ParsedHeader,
    header_bytes: &[u8],
    me: &SealingSecret,
    sender: &SealingPublicKey,
) -> Result<Keys, SealError> {
    let secret = me.to_dalek();
    let dh_e = secret.diffie_hellman(&x25519_dalek::PublicKey::from(parsed.ephemeral));
    let dh_s = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*sender.as_bytes()));
    derive(&dh_e, &dh_s, sender, &me.public(), header_bytes)
}

fn cipher(key: &[u8; 32]) -> Result<Aes256Gcm, SealError> {
    Aes256Gcm::new_from_slice(key).map_err(|_| SealError::Malformed("bad key length"))
}

const ZERO_NONCE: [u8; 12] = [0u8; 12];

/// Seals one message of at most [`MAX_MESSAGE_LEN`] bytes to `receiver`.
pub fn seal(
    header: &MessageHeader,
    sender: &SealingSecret,
    receiver: &SealingPublicKey,
    plaintext: &[u8],
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, SealError> {
    if plaintext.len() > MAX_MESSAGE_LEN {
        return Err(SealError::TooLarge {
            len: plaintext.len(),
            max: MAX_MESSAGE_LEN,
        });
    }
    let (mut out, keys) = sender_keys(header, FORMAT_MESSAGE, sender, receiver, rng)?;
    // Each message has its own key, so the all-zero nonce is used once per key.
    let ct = cipher(&keys.data)?
        .encrypt(
            (&ZERO_NONCE).into(),
            Payload {
                msg: plaintext,
                aad: &out,
            },
        )
        .map_err(|_| SealError::Malformed("encryption failed"))?;
    out.extend_from_slice(&ct);
    Ok(out)
}

/// A sealed message whose header was parsed but not yet authenticated.
///
/// Look up the sender's sealing key from [`SealedMessage::header`] (its certificate), then call
/// [`SealedMessage::open`].
#[derive(Debug)]
pub struct SealedMessage<'a> {
    parsed: ParsedHeader,
    bytes: &'a [u8],
}

impl<'a> SealedMessage<'a> {
    /// Parses untrusted bytes.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, SealError> {
        let parsed = parse_header(bytes, FORMAT_MESSAGE)?;
        let body = bytes.len().saturating_sub(parsed.len);
        if body < TAG_LEN {
            return Err(SealError::Malformed("missing tag"));
        }
        if body - TAG_LEN > MAX_MESSAGE_LEN {
            return Err(SealError::TooLarge {
                len: body - TAG_LEN,
                max: MAX_MESSAGE_LEN,
            });
        }
        Ok(Self { parsed, bytes })
    }

    /// The claimed header (authenticated only once [`SealedMessage::open`] succeeds).
    pub fn header(&self) -> &MessageHeader {
        &self.parsed.header
    }

    /// Checks the receiver and the replay window, authenticates and decrypts.
    ///
    /// `me` is this node's PeerId, `my_secret` its sealing key, and `sender` the sealing key
    /// from the certificate of the peer named as sender. The sequence number is recorded in
    /// `window` only when the message authenticates.
    pub fn open(
        self,
        me: &PeerId,
        my_secret: &SealingSecret,
        sender: &SealingPublicKey,
        window: &mut ReplayWindow,
    ) -> Result<(MessageHeader, Vec<u8>), SealError> {
        let h = &self.parsed.header;
        if &h.receiver != me {
            return Err(SealError::WrongReceiver {
                expected: Box::new(*me),
                found: Box::new(h.receiver),
            });
        }
        window.check(&h.sender, h.seq)?;
        let header_bytes = &self.bytes[..self.parsed.len];
        let keys = receiver_keys(&self.parsed, header_bytes, my_secret, sender)?;
        let pt = cipher(&keys.data)?
            .decrypt(
                (&ZERO_NONCE).into(),
                Payload {
                    msg: &self.bytes[self.parsed.len..],
                    aad: header_bytes,
                },
            )
            .map_err(|_| SealError::Tampered)?;
        window.record(&h.sender, h.seq)?;
        Ok((self.parsed.header, pt))
    }
}

/// STREAM-BE32 over AES-256-GCM: chunk `i` is sealed under the nonce
/// `prefix [7] || i as u32 big-endian || last flag [1]`, so chunks cannot be reordered,
/// dropped, or moved past the end. Byte for byte the construction of `aead_stream`'s
/// `EncryptorBE32`/`DecryptorBE32` (a test checks it), run on ring's AES-GCM, which is several
/// times faster here than the portable one.
struct Stream {
    key: ring::aead::LessSafeKey,
    prefix: [u8; 7],
    counter: u32,
}

impl Stream {
    fn new(key: &[u8; 32], prefix: [u8; 7]) -> Result<Self, SealError> {
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key)
            .map_err(|_| SealError::Malformed("bad key length"))?;
        Ok(Self {
            key: ring::aead::LessSafeKey::new(key),
            prefix,
            counter: 0,
        })
    }

    /// The nonce of the current chunk. The counter value `u32::MAX` is left to a last chunk,
    /// as STREAM requires.
    fn nonce(&self, last: bool) -> Result<ring::aead::Nonce, SealError> {
        if !last && self.counter == u32::MAX {
            return Err(SealError::CounterExhausted);
        }
        let mut n = [0u8; 12];
        n[..7].copy_from_slice(&self.prefix);
        n[7..11].copy_from_slice(&self.counter.to_be_bytes());
        n[11] = u8::from(last);
        Ok(ring::aead::Nonce::assume_unique_for_key(n))
    }
}

/// Bytes a sealed chunk adds to its plaintext: the flag in front and the tag behind.
pub const CHUNK_OVERHEAD: usize = 1 + TAG_LEN;

/// Seals a large payload chunk by chunk; never holds more than one chunk.
pub struct StreamSealer {
    stream: Option<Stream>,
    aad: [u8; 32],
}

impl std::fmt::Debug for StreamSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSealer")
            .field("finished", &self.stream.is_none())
            .finish()
    }
}

impl StreamSealer {
    /// Starts a stream; returns the sealer and the stream header to send first.
    pub fn start(
        header: &MessageHeader,
        sender: &SealingSecret,
        receiver: &SealingPublicKey,
        rng: &dyn SecureRandom,
    ) -> Result<(Self, Vec<u8>), SealError> {
        let (mut out, keys) = sender_keys(header, FORMAT_STREAM, sender, receiver, rng)?;
        let tag = cipher(&keys.confirm)?
            .encrypt(
                (&ZERO_NONCE).into(),
                Payload {
                    msg: &[],
                    aad: &out,
                },
            )
            .map_err(|_| SealError::Malformed("encryption failed"))?;
        out.extend_from_slice(&tag);
        let stream = Stream::new(&keys.data, keys.nonce_prefix)?;
        Ok((
            Self {
                stream: Some(stream),
                aad: keys.header_digest,
            },
            out,
        ))
    }

    /// Seals a chunk in place, without allocating or copying.
    ///
    /// `buf[at]` is room for the flag byte (its value is ignored) and `buf[at + 1..]` is the
    /// plaintext (at most [`MAX_CHUNK_LEN`] bytes). Afterwards `buf[at..]` is the framed chunk,
    /// exactly what [`StreamSealer::seal_chunk`] (or, with `last`, [`StreamSealer::seal_last`])
    /// returns: the flag, the ciphertext and the tag, which is appended ([`CHUNK_OVERHEAD`]
    /// bytes in all). `buf[..at]` is left alone, for the caller's own framing. After a last
    /// chunk the sealer is finished and refuses more with [`SealError::AfterEnd`].
    pub fn seal_in_place(
        &mut self,
        buf: &mut Vec<u8>,
        at: usize,
        last: bool,
    ) -> Result<(), SealError> {
        let len = buf
            .len()
            .checked_sub(at)
            .and_then(|n| n.checked_sub(1))
            .ok_or(SealError::Malformed("no room for the chunk flag"))?;
        if len > MAX_CHUNK_LEN {
            return Err(SealError::TooLarge {
                len,
                max: MAX_CHUNK_LEN,
            });
        }
        let stream = self.stream.as_mut().ok_or(SealError::AfterEnd)?;
        let nonce = stream.nonce(last)?;
        buf[at] = u8::from(last);
        let sealed = stream.key.seal_in_place_separate_tag(
            nonce,
            ring::aead::Aad::from(&self.aad),
            &mut buf[at + 1..],
        );
        if last {
            // A finished stream never seals again, whatever happened.
            self.stream = None;
        } else if sealed.is_ok() {
            stream.counter += 1;
        }
        let tag = sealed.map_err(|_| SealError::Malformed("encryption failed"))?;
        buf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    fn seal_copy(&mut self, chunk: &[u8], last: bool) -> Result<Vec<u8>, SealError> {
        if chunk.len() > MAX_CHUNK_LEN {
            return Err(SealError::TooLarge {
                len: chunk.len(),
                max: MAX_CHUNK_LEN,
            });
        }
        let mut buf = Vec::with_capacity(CHUNK_OVERHEAD + chunk.len());
        buf.push(0);
        buf.extend_from_slice(chunk);
        self.seal_in_place(&mut buf, 0, last)?;
        Ok(buf)
    }

    /// Seals the next chunk (at most [`MAX_CHUNK_LEN`] bytes).
    pub fn seal_chunk(&mut self, chunk: &[u8]) -> Result<Vec<u8>, SealError> {
        self.seal_copy(chunk, false)
    }

    /// Seals the last chunk (may be empty) and ends the stream.
    pub fn seal_last(mut self, chunk: &[u8]) -> Result<Vec<u8>, SealError> {
        self.seal_copy(chunk, true)
    }
}

/// A sealed stream header whose fields were parsed but not yet authenticated.
#[derive(Debug)]
pub struct SealedStreamHeader<'a> {
    parsed: ParsedHeader,
    bytes: &'a [u8],
}

impl<'a> SealedStreamHeader<'a> {
    /// Parses untrusted bytes.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, SealError> {
        let parsed = parse_header(bytes, FORMAT_STREAM)?;
        if bytes.len() != parsed.len + TAG_LEN {
            return Err(SealError::Malformed("stream header length"));
        }
        Ok(Self { parsed, bytes })
    }

    /// The claimed header (authenticated only once [`SealedStreamHeader::open`] succeeds).
    pub fn header(&self) -> &MessageHeader {
        &self.parsed.header
    }

    /// Checks the receiver and the replay window, authenticates the header, records the
    /// sequence number, and returns the opener for the chunks.
    pub fn open(
        self,
        me: &PeerId,
        my_secret: &SealingSecret,
        sender: &SealingPublicKey,
        window: &mut ReplayWindow,
    ) -> Result<StreamOpener, SealError> {
        let h = &self.parsed.header;
        if &h.receiver != me {
            return Err(SealError::WrongReceiver {
                expected: Box::new(*me),
                found: Box::new(h.receiver),
            });
        }
        window.check(&h.sender, h.seq)?;
        let header_bytes = &self.bytes[..self.parsed.len];
        let keys = receiver_keys(&self.parsed, header_bytes, my_secret, sender)?;
        cipher(&keys.confirm)?
            .decrypt(
                (&ZERO_NONCE).into(),
                Payload {
                    msg: &self.bytes[self.parsed.len..],
                    aad: header_bytes,
                },
            )
            .map_err(|_| SealError::Tampered)?;
        window.record(&h.sender, h.seq)?;
        let stream = Stream::new(&keys.data, keys.nonce_prefix)?;
        Ok(StreamOpener {
            stream: Some(stream),
            aad: keys.header_digest,
            header: self.parsed.header,
        })
    }
}

/// One opened chunk.
#[derive(Debug, PartialEq, Eq)]
pub struct OpenedChunk {
    /// The plaintext.
    pub data: Vec<u8>,
    /// Whether this was the last chunk.
    pub last: bool,
}

/// One chunk opened in place: the plaintext lies in the caller's buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct OpenedInPlace<'a> {
    /// The plaintext.
    pub data: &'a [u8],
    /// Whether this was the last chunk.
    pub last: bool,
}

/// Opens a sealed stream chunk by chunk; never holds more than one chunk.
pub struct StreamOpener {
    stream: Option<Stream>,
    aad: [u8; 32],
    header: MessageHeader,
}

impl std::fmt::Debug for StreamOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamOpener")
            .field("header", &self.header)
            .field("finished", &self.stream.is_none())
            .finish()
    }
}

impl StreamOpener {
    /// The authenticated header of the stream.
    pub fn header(&self) -> &MessageHeader {
        &self.header
    }

    /// Opens the next framed chunk (untrusted bytes) in place, without allocating or copying:
    /// the plaintext is decrypted where the ciphertext was and returned as a slice of
    /// `framed`. On an error the contents of `framed` are unspecified. A chunk that fails
    /// authentication does not advance the stream; a chunk flagged last ends it, authentic or
    /// not.
    pub fn open_in_place<'a>(
        &mut self,
        framed: &'a mut [u8],
    ) -> Result<OpenedInPlace<'a>, SealError> {
        let (&mut flag, body) = framed
            .split_first_mut()
            .ok_or(SealError::Malformed("empty chunk"))?;
        if body.len() < TAG_LEN {
            return Err(SealError::Malformed("chunk shorter than its tag"));
        }
        if body.len() - TAG_LEN > MAX_CHUNK_LEN {
            return Err(SealError::TooLarge {
                len: body.len() - TAG_LEN,
                max: MAX_CHUNK_LEN,
            });
        }
        let last = match flag {
            0 => false,
            1 => true,
            _ => return Err(SealError::Malformed("bad chunk flag")),
        };
        let stream = self.stream.as_mut().ok_or(SealError::AfterEnd)?;
        let nonce = stream.nonce(last)?;
        let opened = stream
            .key
            .open_in_place(nonce, ring::aead::Aad::from(&self.aad), body);
        if last {
            self.stream = None;
        } else if opened.is_ok() {
            stream.counter += 1;
        }
        let data = opened.map_err(|_| SealError::Tampered)?;
        Ok(OpenedInPlace { data, last })
    }

    /// Opens the next framed chunk (untrusted bytes) into a new buffer.
    pub fn open_chunk(&mut self, framed: &[u8]) -> Result<OpenedChunk, SealError> {
        if framed.len().saturating_sub(CHUNK_OVERHEAD) > MAX_CHUNK_LEN {
            return Err(SealError::TooLarge {
                len: framed.len() - CHUNK_OVERHEAD,
                max: MAX_CHUNK_LEN,
            });
        }
        let mut buf = framed.to_vec();
        let opened = self.open_in_place(&mut buf)?;
        let (len, last) = (opened.data.len(), opened.last);
        buf.copy_within(1..1 + len, 0);
        buf.truncate(len);
        Ok(OpenedChunk { data: buf, last })
    }

    /// Call when the transport says the stream ended: an error unless the last chunk came.
    pub fn finish(self) -> Result<(), SealError> {
        if self.stream.is_none() {
            Ok(())
        } else {
            Err(SealError::Truncated)
        }
    }
}

/// Which sequence numbers one sender has used recently.
#[derive(Clone, Copy, Debug, Default)]
struct Window {
    /// The highest sequence number seen.
    highest: u64,
    /// Bit `i` set: `highest - i` was seen.
    seen: u128,
}

/// The receiver's memory of recent sequence numbers, per sender.
///
/// A message is accepted once if its number is above the highest seen, or within
/// [`REPLAY_WINDOW`] below it and not seen before. Senders start their counter at a value that
/// grows across restarts (e.g. milliseconds since the epoch shifted left), so a restarted
/// sender is not mistaken for a replayer.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    senders: HashMap<PeerId, Window>,
    max_senders: usize,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new(4096)
    }
}

impl ReplayWindow {
    /// A window that tracks at most `max_senders` peers.
    pub fn new(max_senders: usize) -> Self {
        Self {
            senders: HashMap::new(),
            max_senders,
        }
    }

    /// Whether `seq` from `sender` would be accepted (records nothing).
    pub fn check(&self, sender: &PeerId, seq: u64) -> Result<(), SealError> {
        let Some(w) = self.senders.get(sender) else {
            if self.senders.len() >= self.max_senders {
                return Err(SealError::TooManySenders(self.max_senders));
            }
            return Ok(());
        };
        if seq > w.highest {
            return Ok(());
        }
        let age = w.highest - seq;
        if age >= REPLAY_WINDOW {
            return Err(SealError::TooOld {
                sender: Box::new(*sender),
                seq,
            });
        }
        if w.seen & (1u128 << age) != 0 {
            return Err(SealError::Replayed {
                sender: Box::new(*sender),
                seq,
            });
        }
        Ok(())
    }

    /// Records `seq` from `sender` after checking it.
    pub fn record(&mut self, sender: &PeerId, seq: u64) -> Result<(), SealError> {
        self.check(sender, seq)?;
        match self.senders.get_mut(sender) {
            None => {
                self.senders.insert(
                    *sender,
                    Window {
                        highest: seq,
                        seen: 1,
                    },
                );
            }
            Some(w) if seq > w.highest => {
                let shift = seq - w.highest;
                w.seen = if shift >= 128 { 0 } else { w.seen << shift };
                w.seen |= 1;
                w.highest = seq;
            }
            Some(w) => {
                w.seen |= 1u128 << (w.highest - seq);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod stream_tests {
    use aead_stream::{DecryptorBE32, EncryptorBE32};
    use aes_gcm::Aes256Gcm;

    use super::*;

    /// The ring-based STREAM writes exactly what `aead_stream`'s STREAM-BE32 over
    /// AES-256-GCM writes (the wire format of earlier versions), and reads it back.
    #[test]
    fn matches_aead_stream_be32() {
        let key = [7u8; 32];
        let prefix = [1, 2, 3, 4, 5, 6, 7];
        let aad = [9u8; 32];
        let chunks: [&[u8]; 4] = [b"first chunk", b"", &[0x5a; 4096], b"last"];
        let mut ours = StreamSealer {
            stream: Some(Stream::new(&key, prefix).unwrap()),
            aad,
        };
        let mut theirs = EncryptorBE32::<Aes256Gcm>::new((&key).into(), (&prefix).into());
        let mut framed = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let mut buf = vec![0xee; 3];
            buf.push(0xff);
            buf.extend_from_slice(c);
            ours.seal_in_place(&mut buf, 3, last).unwrap();
            assert_eq!(&buf[..3], &[0xee; 3], "the caller's prefix is untouched");
            let payload = Payload { msg: c, aad: &aad };
            let expected = if last {
                let enc = std::mem::replace(
                    &mut theirs,
                    EncryptorBE32::<Aes256Gcm>::new((&key).into(), (&prefix).into()),
                );
                enc.encrypt_last(payload).unwrap()
            } else {
                theirs.encrypt_next(payload).unwrap()
            };
            assert_eq!(buf[3], u8::from(last));
            assert_eq!(&buf[4..], expected.as_slice(), "chunk {i}");
            framed.push(buf[3..].to_vec());
        }
        assert!(matches!(
            ours.seal_in_place(&mut vec![0], 0, false),
            Err(SealError::AfterEnd)
        ));
        // aead_stream opens what ring sealed.
        let mut dec = DecryptorBE32::<Aes256Gcm>::new((&key).into(), (&prefix).into());
        for (c, f) in chunks.iter().zip(&framed).take(3) {
            let pt = dec
                .decrypt_next(Payload {
                    msg: &f[1..],
                    aad: &aad,
                })
                .unwrap();
            assert_eq!(pt.as_slice(), *c);
        }
        // And ring opens in place what it sealed.
        let peer = crate::Identity::generate(&ring::rand::SystemRandom::new())
            .unwrap()
            .peer_id()
            .unwrap();
        let mut opener = StreamOpener {
            stream: Some(Stream::new(&key, prefix).unwrap()),
            aad,
            header: MessageHeader {
                sender: peer,
                receiver: peer,
                job: String::new(),
                workflow: String::new(),
                round: 0,
                kind: String::new(),
                seq: 0,
            },
        };
        for (i, (c, f)) in chunks.iter().zip(&framed).enumerate() {
            let mut f = f.clone();
            let got = opener.open_in_place(&mut f).unwrap();
            assert_eq!(got.data, *c);
            assert_eq!(got.last, i + 1 == chunks.len());
        }
        opener.finish().unwrap();
    }

    #[test]
    fn counter_exhaustion_leaves_room_for_the_last_chunk() {
        let mut s = StreamSealer {
            stream: Some(Stream::new(&[1; 32], [0; 7]).unwrap()),
            aad: [0; 32],
        };
        if let Some(st) = s.stream.as_mut() {
            st.counter = u32::MAX;
        }
        assert!(matches!(
            s.seal_in_place(&mut vec![0, 1], 0, false),
            Err(SealError::CounterExhausted)
        ));
        s.seal_in_place(&mut vec![0, 1], 0, true).unwrap();
    }
}
