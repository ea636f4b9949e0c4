//! The tamper-evident audit log: every admin command, job event, policy decision and
//! workflow step a node sees, appended to `<workspace>/audit.log` ([`AUDIT_FILE`]), one JSON
//! object per line, each line carrying the SHA-256 of the line before it (FLARE's audit
//! files on the server and each site, with a hash chain added).
//!
//! # A line
//!
//! ```text
//! {"seq":3,"ts_ms":1733445012345,"node":"server","prev":"5d1c…(64 hex digits)",
//!  "kind":"admin_command","actor":{"name":"admin@nvidia.com","org":"nvidia",
//!  "role":"project_admin"},"action":"abort_job","job":"7f3e…","decision":"refused",
//!  "reason":"not the submitter"}
//! ```
//!
//! (one line in the file; wrapped here). The fields, in this order ([`AuditLine`]):
//! - `seq`: the line's number, 1 for the first line, one more on every line;
//! - `ts_ms`: the writer's wall clock, milliseconds since the Unix epoch (informative: a
//!   clock can be set back, and the order that counts is `seq`'s);
//! - `node`: the name of the node that wrote the line;
//! - `prev`: the hex SHA-256 of the previous line's exact bytes, without its newline; the
//!   first line's is 64 zeros ([`GENESIS`]);
//! - `kind`: `admin_command`, `job_event`, `policy` or `workflow` ([`AuditKind`]);
//! - `action`: what happened (`submit_job`, `deployed`, `round_started`, …);
//! - when given: `actor` (`{name, org, role}`), `job`, `decision` (`allowed` or `refused`),
//!   `reason`, and `detail`, any JSON value.
//!
//! Lines are bounded. Each string is cut to [`MAX_FIELD_BYTES`] and `detail` to
//! [`MAX_DETAIL_BYTES`] of JSON, with a marker that says how much was cut; should a line
//! still exceed [`MAX_LINE_BYTES`] (strings of control characters grow sixfold as JSON
//! escapes), its strings are cut to 256 bytes and `detail` is replaced by its marker. JSON
//! escapes every newline inside a string, so a line is always one line.
//!
//! # What the chain proves, and what it does not
//!
//! Line `k + 1`'s `prev` commits to every byte of line `k`, and each `seq` to the count
//! before it, so [`verify`] finds a line that was edited, deleted, inserted, repeated or
//! moved, and names the first one, as long as some line after it is left. It does not find:
//! - the last lines deleted, or the last line edited: nothing after them commits to them.
//!   Compare [`VerifyReport::lines`] and [`VerifyReport::last_hash`] with values noted
//!   elsewhere;
//! - anything done by someone who can rewrite the whole file: the chain uses no secret, so
//!   they can rebuild it from the first line they change. The remedies, not built here: ship
//!   each line off the host as it is written (to a log collector the node cannot rewrite), or
//!   sign the head hash with the node's key from time to time and keep the signatures
//!   elsewhere;
//! - that `ts_ms` is true, or that the node recorded everything it should have.
//!
//! # Writing
//!
//! [`AuditLog::open`] reads the file once to find the last line's hash and the next `seq`.
//! A last line without its newline is a write torn by a crash: it is cut off, with a
//! warning. A file whose chain is already broken is appended to, with a warning that names
//! the first bad line: refusing to start would let whoever can damage the file stop the
//! node. [`AuditLog::record`] writes each line with one `write_all` of the line and its
//! newline and then `sync_data`, under a mutex, so lines from many tasks never interleave
//! and a recorded line survives a crash. One writer per file: two processes appending to
//! one file fork the chain.
//!
//! The sync is the cost of a line: on this project's 2-core development VM (ext4 on a
//! virtio disk), 500 lines took 2.9 to 4.4 ms each (about 300 lines a second), against
//! about 4 µs each without the sync. Audit lines come with admin commands and with job and
//! round events, a few a second at most, so the sync stays off every hot path; a caller on
//! an async runtime should still record from a blocking task (`spawn_blocking`), not from
//! the event loop.
//!
//! Workflow drivers add their own lines through [`WorkflowAudit`] (FLARE's
//! `AuditService.add_job_event`).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

/// The audit log's file name in a node's workspace.
pub const AUDIT_FILE: &str = "audit.log";

/// The `prev` of the first line: 64 zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Bytes of a string field kept in a line; the rest is replaced by a marker.
pub const MAX_FIELD_BYTES: usize = 4 * 1024;

/// Bytes of `detail`'s JSON kept in a line; a larger detail becomes a marker object.
pub const MAX_DETAIL_BYTES: usize = 16 * 1024;

/// The longest line the log writes, without its newline. [`verify`] refuses longer ones.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Bytes of a string kept when a line has to shrink to fit [`MAX_LINE_BYTES`].
const SHRUNK_FIELD_BYTES: usize = 256;

/// The audit log of the node whose workspace is `workspace`.
pub fn path_in(workspace: &Path) -> PathBuf {
    workspace.join(AUDIT_FILE)
}

/// What a line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// A command from the admin console, allowed or refused.
    AdminCommand,
    /// A job's life at this node: submitted, deployed, started, finished, aborted.
    JobEvent,
    /// A decision of a local policy (authorization, privacy, resources).
    Policy,
    /// A step a workflow reports itself ([`WorkflowAudit`]).
    Workflow,
}

impl AuditKind {
    /// The name in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::AdminCommand => "admin_command",
            AuditKind::JobEvent => "job_event",
            AuditKind::Policy => "policy",
            AuditKind::Workflow => "workflow",
        }
    }
}

impl FromStr for AuditKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            AuditKind::AdminCommand,
            AuditKind::JobEvent,
            AuditKind::Policy,
            AuditKind::Workflow,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| format!("{s:?}: admin_command, job_event, policy or workflow"))
    }
}

/// Who asked: the identity a certificate proved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The participant's or admin's name (an admin's is an email).
    pub name: String,
    /// Their organization.
    pub org: String,
    /// Their role (`project_admin`, `lead`, `member`, `client`, …).
    pub role: String,
}

/// What a policy or the server decided about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The request went ahead.
    Allowed,
    /// The request was refused.
    Refused,
}

/// What a caller records; [`AuditLog::record`] adds `seq`, `ts_ms`, `node` and `prev`.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// What the line is about.
    pub kind: AuditKind,
    /// Who asked, when someone did.
    pub actor: Option<Actor>,
    /// What happened: the command, or the event's name.
    pub action: String,
    /// The job it concerns.
    pub job: Option<String>,
    /// Whether the request was allowed, for lines that record a decision.
    pub decision: Option<Decision>,
    /// Why: a refusal's reason, an error.
    pub reason: Option<String>,
    /// Anything else worth keeping (arguments, counts), as JSON.
    pub detail: Option<serde_json::Value>,
}

impl AuditEntry {
    /// An entry of `kind` for `action`, with nothing else.
    pub fn new(kind: AuditKind, action: impl Into<String>) -> Self {
        AuditEntry {
            kind,
            actor: None,
            action: action.into(),
            job: None,
            decision: None,
            reason: None,
            detail: None,
        }
    }

    /// With who asked.
    pub fn actor(mut self, actor: Actor) -> Self {
        self.actor = Some(actor);
        self
    }

    /// With the job it concerns.
    pub fn job(mut self, job: impl Into<String>) -> Self {
        self.job = Some(job.into());
        self
    }

    /// With the decision taken.
    pub fn decision(mut self, decision: Decision) -> Self {
        self.decision = Some(decision);
        self
    }

    /// With the reason.
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// With more detail.
    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }
}

/// One line of the file, as written and as read back (the format is in the module doc).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditLine {
    /// The line's number, from 1.
    pub seq: u64,
    /// The writer's wall clock, in milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// The node that wrote it.
    pub node: String,
    /// Hex SHA-256 of the previous line, or [`GENESIS`].
    pub prev: String,
    /// What the line is about.
    pub kind: AuditKind,
    /// Who asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<Actor>,
    /// What happened.
    pub action: String,
    /// The job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// More detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// Why the audit log could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file could not be opened, read, written or synced.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The audit file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The chain is broken ([`verify`]).
    #[error(transparent)]
    Broken(#[from] ChainError),
    /// The line could not be encoded as JSON.
    #[error("cannot encode the audit line: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The first line at which the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why}")]
pub struct ChainError {
    /// The line, 1-based.
    pub line: usize,
    /// What is wrong with it.
    pub why: Broken,
}

/// How a line breaks the chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    /// The file ends inside this line: a write torn by a crash (the next
    /// [`AuditLog::open`] cuts it off), or a file cut short.
    #[error("no newline at the end: a torn write or a cut file")]
    Torn,
    /// Longer than any line the log writes.
    #[error("longer than {MAX_LINE_BYTES} bytes: not a line of this log")]
    TooLong,
    /// Not JSON, or not the fields of an audit line.
    #[error("not an audit line: {0}")]
    BadJson(String),
    /// `seq` skips ahead and no later line has the missing number.
    #[error(
        "seq {found} where {expected} was due: the lines between were deleted (or this line's seq was edited)"
    )]
    Deleted {
        /// The `seq` this line should have.
        expected: u64,
        /// The `seq` it has.
        found: u64,
    },
    /// `seq` skips ahead and the missing line is further down.
    #[error(
        "seq {found} where {expected} was due, and seq {expected} is at line {at}: lines were reordered"
    )]
    Moved {
        /// The `seq` this line should have.
        expected: u64,
        /// The `seq` it has.
        found: u64,
        /// Where the line with `expected` is.
        at: usize,
    },
    /// `seq` repeats or goes back.
    #[error(
        "seq {found} where {expected} was due: a line was copied or moved here (or its seq edited)"
    )]
    Repeated {
        /// The `seq` this line should have.
        expected: u64,
        /// The `seq` it has.
        found: u64,
    },
    /// The first line's `prev` is not [`GENESIS`].
    #[error("prev of the first line is not 64 zeros: the file does not start the log")]
    NotGenesis,
    /// `prev` is not the hash of the line before.
    #[error(
        "prev is not the SHA-256 of line {previous}: line {previous} was edited (or this line's prev was)"
    )]
    PrevMismatch {
        /// The line whose hash `prev` should be.
        previous: usize,
    },
}

/// An intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Lines in the file.
    pub lines: usize,
    /// Hex SHA-256 of the last line ([`GENESIS`] for an empty file): the head to compare
    /// with a copy kept elsewhere, since nothing in the file commits to the last line.
    pub last_hash: String,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One line as read: its bytes (none past [`MAX_LINE_BYTES`]) and its hash.
#[derive(Debug)]
struct RawLine {
    /// Whether the line is longer than [`MAX_LINE_BYTES`] (then `bytes` is cut).
    too_long: bool,
    /// Hex SHA-256 of the whole line, without its newline.
    hash: String,
    /// Its length without the newline.
    len: u64,
    /// Whether it ends with a newline.
    terminated: bool,
}

/// Reads the next line into `buf` (at most [`MAX_LINE_BYTES`] of it, hashing all of it):
/// `None` at the end of the file.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Option<RawLine>> {
    buf.clear();
    let mut ctx = Context::new(&SHA256);
    let mut len = 0u64;
    let mut too_long = false;
    let mut any = false;
    loop {
        let chunk = match r.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            if !any {
                return Ok(None);
            }
            return Ok(Some(RawLine {
                too_long,
                hash: hex::encode(ctx.finish()),
                len,
                terminated: false,
            }));
        }
        any = true;
        let newline = chunk.iter().position(|&b| b == b'\n');
        let part = &chunk[..newline.unwrap_or(chunk.len())];
        ctx.update(part);
        len += part.len() as u64;
        if buf.len() + part.len() <= MAX_LINE_BYTES {
            buf.extend_from_slice(part);
        } else {
            too_long = true;
        }
        let used = part.len() + usize::from(newline.is_some());
        r.consume(used);
        if newline.is_some() {
            return Ok(Some(RawLine {
                too_long,
                hash: hex::encode(ctx.finish()),
                len,
                terminated: true,
            }));
        }
    }
}

/// The chain as read so far.
#[derive(Debug)]
struct Chain {
    /// Lines taken.
    lines: usize,
    /// Hash of the last line taken, or [`GENESIS`].
    last_hash: String,
    /// The `seq` the next line should have.
    next_seq: u64,
}

impl Chain {
    fn new() -> Chain {
        Chain {
            lines: 0,
            last_hash: GENESIS.to_string(),
            next_seq: 1,
        }
    }

    /// Takes the next line (`bytes` as read into the buffer) and says how it breaks the
    /// chain, if it does. The chain moves past it either way, so that a writer can go on
    /// after a broken line: the next `seq` is one more than this line's when it has one.
    fn push(&mut self, raw: &RawLine, bytes: &[u8]) -> Result<(), Broken> {
        self.lines += 1;
        let previous = std::mem::replace(&mut self.last_hash, raw.hash.clone());
        let expected = self.next_seq;
        self.next_seq = expected.saturating_add(1);
        if !raw.terminated {
            return Err(Broken::Torn);
        }
        if raw.too_long {
            return Err(Broken::TooLong);
        }
        let line: AuditLine =
            serde_json::from_slice(bytes).map_err(|e| Broken::BadJson(e.to_string()))?;
        self.next_seq = line.seq.saturating_add(1);
        if line.seq > expected {
            return Err(Broken::Deleted {
                expected,
                found: line.seq,
            });
        }
        if line.seq < expected {
            return Err(Broken::Repeated {
                expected,
                found: line.seq,
            });
        }
        if line.prev != previous {
            return Err(if self.lines == 1 {
                Broken::NotGenesis
            } else {
                Broken::PrevMismatch {
                    previous: self.lines - 1,
                }
            });
        }
        Ok(())
    }
}

/// Checks the chain of the audit file at `path`: every line an audit line, `seq` counting
/// from 1, every `prev` the hash of the line before. The first line that breaks it is an
/// [`AuditError::Broken`] naming it; what the check cannot see is in the module doc.
pub fn verify(path: &Path) -> Result<VerifyReport, AuditError> {
    let file = File::open(path).map_err(io_error(path))?;
    let mut r = BufReader::with_capacity(64 * 1024, file);
    let mut chain = Chain::new();
    let mut buf = Vec::new();
    while let Some(raw) = read_line(&mut r, &mut buf).map_err(io_error(path))? {
        if let Err(why) = chain.push(&raw, &buf) {
            let why = match why {
                Broken::Deleted { expected, found } => {
                    match find_seq(path, expected, chain.lines)? {
                        Some(at) => Broken::Moved {
                            expected,
                            found,
                            at,
                        },
                        None => why,
                    }
                }
                why => why,
            };
            return Err(ChainError {
                line: chain.lines,
                why,
            }
            .into());
        }
    }
    Ok(VerifyReport {
        lines: chain.lines,
        last_hash: chain.last_hash,
    })
}

/// The first line after line `after` whose `seq` is `seq`.
fn find_seq(path: &Path, seq: u64, after: usize) -> Result<Option<usize>, AuditError> {
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    let file = File::open(path).map_err(io_error(path))?;
    let mut r = BufReader::with_capacity(64 * 1024, file);
    let mut buf = Vec::new();
    let mut line = 0;
    while let Some(raw) = read_line(&mut r, &mut buf).map_err(io_error(path))? {
        line += 1;
        if line > after
            && !raw.too_long
            && serde_json::from_slice::<Seq>(&buf).is_ok_and(|s| s.seq == seq)
        {
            return Ok(Some(line));
        }
    }
    Ok(None)
}

/// The append-only audit log of one node. Cloning is cheap: clones share the file.
#[derive(Debug, Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    /// The writing node's name, in every line.
    node: String,
    state: Mutex<State>,
}

/// Where the chain stands, behind the mutex that orders the lines.
#[derive(Debug)]
struct State {
    file: File,
    /// The file's length: a failed write is cut back to it, so that no torn line stays in
    /// the middle of the file.
    len: u64,
    /// Hash of the last line.
    prev: String,
    /// `seq` of the next line.
    next_seq: u64,
}

impl AuditLog {
    /// Opens the audit file at `path` for appending, creating it if needed, for the node
    /// named `node`. A torn last line is cut off and a broken chain appended to, each with a
    /// warning (see the module doc).
    pub fn open(path: &Path, node: &str) -> Result<AuditLog, AuditError> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io_error(path))?;
        let mut r = BufReader::with_capacity(64 * 1024, &file);
        let mut chain = Chain::new();
        let mut buf = Vec::new();
        let mut first_break: Option<ChainError> = None;
        let mut len = 0u64;
        let mut torn = None;
        while let Some(raw) = read_line(&mut r, &mut buf).map_err(io_error(path))? {
            if !raw.terminated {
                torn = Some(raw.len);
                break;
            }
            if let Err(why) = chain.push(&raw, &buf) {
                first_break.get_or_insert(ChainError {
                    line: chain.lines,
                    why,
                });
            }
            len += raw.len + 1;
        }
        drop(r);
        if let Some(bytes) = torn {
            file.set_len(len).map_err(io_error(path))?;
            file.sync_data().map_err(io_error(path))?;
            tracing::warn!(
                path = %path.display(),
                line = chain.lines + 1,
                bytes,
                "audit log: cut off a torn last line (a write interrupted by a crash)"
            );
        }
        if let Some(e) = &first_break {
            tracing::warn!(
                path = %path.display(),
                line = e.line,
                why = %e.why,
                "audit log: the hash chain is broken; appending to it anyway"
            );
        }
        Ok(AuditLog {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                node: node.to_string(),
                state: Mutex::new(State {
                    file,
                    len,
                    prev: chain.last_hash,
                    next_seq: chain.next_seq,
                }),
            }),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Appends `entry` as the next line, synced to disk, and returns its `seq`. A write that
    /// fails is cut back out of the file and returned; this never panics.
    pub fn record(&self, entry: AuditEntry) -> Result<u64, AuditError> {
        let path = &self.inner.path;
        let mut st = self
            .inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let seq = st.next_seq;
        let mut line = encode(&entry, seq, now_ms(), &self.inner.node, &st.prev)?;
        let hash = hex::encode(ring::digest::digest(&SHA256, &line));
        line.push(b'\n');
        if let Err(e) = st.file.write_all(&line) {
            let len = st.len;
            if let Err(cut) = st.file.set_len(len) {
                tracing::warn!(path = %path.display(), error = %cut, "audit log: cannot cut a failed write back out");
            }
            return Err(io_error(path)(e));
        }
        st.len += line.len() as u64;
        st.prev = hash;
        st.next_seq = seq.saturating_add(1);
        st.file.sync_data().map_err(io_error(path))?;
        Ok(seq)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `s`, or its first `cap` bytes (at a character boundary) and a marker of what was cut.
fn cut(s: &str, cap: usize) -> String {
    if s.len() <= cap {
        return s.to_string();
    }
    let mut end = cap;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}…[truncated {} of {} bytes]",
        &s[..end],
        s.len() - end,
        s.len()
    )
}

/// A writer that takes at most `cap` bytes and fails past them.
struct Capped {
    buf: Vec<u8>,
    cap: usize,
}

impl Write for Capped {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let room = self.cap - self.buf.len();
        if room == 0 && !b.is_empty() {
            return Err(io::Error::other("over the cap"));
        }
        let n = b.len().min(room);
        self.buf.extend_from_slice(&b[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `detail` if its JSON fits `cap` bytes, else a marker with the start of its JSON.
fn bound_detail(detail: &serde_json::Value, cap: usize, head: usize) -> serde_json::Value {
    let mut w = Capped {
        buf: Vec::new(),
        cap,
    };
    if serde_json::to_writer(&mut w, detail).is_ok() {
        return detail.clone();
    }
    let start = String::from_utf8_lossy(&w.buf);
    serde_json::json!({
        "truncated": format!("more than {cap} bytes of JSON"),
        "head": cut(&start, head),
    })
}

/// The line for `entry`, without its newline, within [`MAX_LINE_BYTES`].
fn encode(
    entry: &AuditEntry,
    seq: u64,
    ts_ms: u64,
    node: &str,
    prev: &str,
) -> Result<Vec<u8>, serde_json::Error> {
    let line = |field: usize, detail: Option<usize>| AuditLine {
        seq,
        ts_ms,
        node: cut(node, field),
        prev: prev.to_string(),
        kind: entry.kind,
        actor: entry.actor.as_ref().map(|a| Actor {
            name: cut(&a.name, field),
            org: cut(&a.org, field),
            role: cut(&a.role, field),
        }),
        action: cut(&entry.action, field),
        job: entry.job.as_deref().map(|j| cut(j, field)),
        decision: entry.decision,
        reason: entry.reason.as_deref().map(|r| cut(r, field)),
        detail: entry.detail.as_ref().map(|d| match detail {
            Some(cap) => bound_detail(d, cap, field),
            None => serde_json::json!({
                "truncated": format!("dropped: the line was over {MAX_LINE_BYTES} bytes"),
            }),
        }),
    };
    let bytes = serde_json::to_vec(&line(MAX_FIELD_BYTES, Some(MAX_DETAIL_BYTES)))?;
    if bytes.len() <= MAX_LINE_BYTES {
        return Ok(bytes);
    }
    // Eight strings of 256 bytes, even escaped sixfold, and a marker fit with room to spare.
    serde_json::to_vec(&line(SHRUNK_FIELD_BYTES, None))
}

/// A workflow driver's pen on the audit log (FLARE's `AuditService.add_job_event`): lines
/// of kind `workflow` for one job and one workflow, with the workflow's name in `detail`.
/// A failure to write is logged, not returned, so a workflow never stops over its audit
/// line; [`WorkflowAudit::off`] writes nothing (the simulator, tests). Each event waits for
/// its line's sync (milliseconds; see the module doc).
#[derive(Debug, Clone)]
pub struct WorkflowAudit {
    log: Option<AuditLog>,
    job: String,
    workflow: String,
}

impl WorkflowAudit {
    /// Lines for `workflow` (its id in the job's config) of `job`, into `log`.
    pub fn new(log: AuditLog, job: &str, workflow: &str) -> Self {
        WorkflowAudit {
            log: Some(log),
            job: job.to_string(),
            workflow: workflow.to_string(),
        }
    }

    /// One that writes nothing.
    pub fn off() -> Self {
        WorkflowAudit {
            log: None,
            job: String::new(),
            workflow: String::new(),
        }
    }

    /// Records `action` (`round_started`, `aggregated`, `site_dropped`, …) with `detail`,
    /// whose object gains a `workflow` key (any other value is put under `value`).
    pub fn event(&self, action: &str, detail: Option<serde_json::Value>) {
        let Some(log) = &self.log else {
            return;
        };
        let detail = match detail {
            Some(serde_json::Value::Object(mut m)) => {
                m.entry("workflow")
                    .or_insert_with(|| self.workflow.clone().into());
                serde_json::Value::Object(m)
            }
            Some(v) => serde_json::json!({ "workflow": self.workflow, "value": v }),
            None => serde_json::json!({ "workflow": self.workflow }),
        };
        let entry = AuditEntry::new(AuditKind::Workflow, action)
            .job(self.job.clone())
            .detail(detail);
        if let Err(e) = log.record(entry) {
            tracing::warn!(job = %self.job, action, error = %e, "cannot write an audit line");
        }
    }
}

/// Which lines [`show`] prints; `None` passes all.
#[derive(Debug, Clone, Default)]
pub struct ShowFilter {
    /// Only lines of this job.
    pub job: Option<String>,
    /// Only lines of this kind.
    pub kind: Option<AuditKind>,
}

/// Writes the lines of the audit file at `path` that pass `filter` to `out` as a table, and
/// returns how many it wrote. A line that is not an audit line is shown as such; the chain
/// is not checked ([`verify`] does that). Control characters in the file are escaped, so a
/// line cannot drive the terminal.
pub fn show(path: &Path, filter: &ShowFilter, out: &mut dyn Write) -> Result<usize, AuditError> {
    let file = File::open(path).map_err(io_error(path))?;
    let mut r = BufReader::with_capacity(64 * 1024, file);
    let mut buf = Vec::new();
    let mut n = 0;
    let mut line_no = 0;
    let stdout = |e| AuditError::Io {
        path: PathBuf::from("<output>"),
        source: e,
    };
    writeln!(
        out,
        "{:>6}  {:<23}  {:<12}  {:<13}  {:<24}  {:<8}  {:<12}  ACTION / REASON",
        "SEQ", "TIME (UTC)", "NODE", "KIND", "ACTOR", "DECISION", "JOB"
    )
    .map_err(stdout)?;
    while let Some(raw) = read_line(&mut r, &mut buf).map_err(io_error(path))? {
        line_no += 1;
        let parsed = (!raw.too_long)
            .then(|| serde_json::from_slice::<AuditLine>(&buf).ok())
            .flatten();
        let Some(l) = parsed else {
            if filter.job.is_none() && filter.kind.is_none() {
                writeln!(out, "{:>6}  (line {line_no}: not an audit line)", "-").map_err(stdout)?;
                n += 1;
            }
            continue;
        };
        if filter.kind.is_some_and(|k| k != l.kind)
            || filter
                .job
                .as_ref()
                .is_some_and(|j| l.job.as_ref() != Some(j))
        {
            continue;
        }
        let actor = l
            .actor
            .as_ref()
            .map_or(String::new(), |a| format!("{} ({})", a.name, a.role));
        let decision = match l.decision {
            Some(Decision::Allowed) => "allowed",
            Some(Decision::Refused) => "refused",
            None => "",
        };
        let mut what = l.action.clone();
        if let Some(r) = &l.reason {
            what.push_str(" — ");
            what.push_str(r);
        }
        writeln!(
            out,
            "{:>6}  {:<23}  {:<12}  {:<13}  {:<24}  {:<8}  {:<12}  {}",
            l.seq,
            utc(l.ts_ms),
            cell(&l.node, 12),
            l.kind.as_str(),
            cell(&actor, 24),
            decision,
            cell(l.job.as_deref().unwrap_or(""), 12),
            cell(&what, 200),
        )
        .map_err(stdout)?;
        n += 1;
    }
    Ok(n)
}

/// `s` with control characters escaped, cut to `width` characters.
fn cell(s: &str, width: usize) -> String {
    let clean: String = s
        .chars()
        .flat_map(|c| {
            let esc: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            esc
        })
        .collect();
    if clean.chars().count() <= width {
        clean
    } else {
        let mut t: String = clean.chars().take(width.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// `ts_ms` as `YYYY-MM-DD HH:MM:SS.mmm`, UTC.
pub(crate) fn utc(ts_ms: u64) -> String {
    let secs = ts_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ts_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn admin() -> Actor {
        Actor {
            name: "admin@nvidia.com".into(),
            org: "nvidia".into(),
            role: "project_admin".into(),
        }
    }

    /// A log of `n` lines of assorted kinds in a fresh folder.
    fn log_of(n: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        let log = AuditLog::open(&path, "server").unwrap();
        for i in 0..n {
            let e = match i % 3 {
                0 => AuditEntry::new(AuditKind::AdminCommand, "submit_job")
                    .actor(admin())
                    .job(format!("job-{i}"))
                    .decision(Decision::Allowed),
                1 => AuditEntry::new(AuditKind::JobEvent, "deployed")
                    .job(format!("job-{i}"))
                    .detail(serde_json::json!({ "sites": ["site-1", "site-2"] })),
                _ => AuditEntry::new(AuditKind::Policy, "byoc")
                    .decision(Decision::Refused)
                    .reason("custom code not allowed"),
            };
            assert_eq!(log.record(e).unwrap(), i as u64 + 1);
        }
        (dir, path)
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut s = lines.join("\n");
        s.push('\n');
        std::fs::write(path, s).unwrap();
    }

    fn broken(path: &Path) -> ChainError {
        match verify(path) {
            Err(AuditError::Broken(e)) => e,
            other => panic!("expected a broken chain, got {other:?}"),
        }
    }

    #[test]
    fn a_chain_of_lines_verifies_and_has_the_documented_format() {
        let (_d, path) = log_of(5);
        let report = verify(&path).unwrap();
        assert_eq!(report.lines, 5);
        let ls = lines(&path);
        let hash = hex::encode(ring::digest::digest(&SHA256, ls[4].as_bytes()));
        assert_eq!(report.last_hash, hash);
        let first: AuditLine = serde_json::from_str(&ls[0]).unwrap();
        assert_eq!((first.seq, first.prev.as_str()), (1, GENESIS));
        assert_eq!(first.node, "server");
        assert!(
            ls[0].starts_with(r#"{"seq":1,"ts_ms":"#)
                && ls[0].contains(r#""kind":"admin_command","actor":{"name":"admin@nvidia.com","org":"nvidia","role":"project_admin"},"action":"submit_job","job":"job-0","decision":"allowed"}"#),
            "{}",
            ls[0]
        );
        let second: AuditLine = serde_json::from_str(&ls[1]).unwrap();
        assert_eq!(
            second.prev,
            hex::encode(ring::digest::digest(&SHA256, ls[0].as_bytes()))
        );
        assert!(!ls[1].contains("actor") && !ls[1].contains("decision"));
        // An empty file is an intact chain of none.
        let empty = path.with_file_name("empty.log");
        std::fs::write(&empty, "").unwrap();
        assert_eq!(
            verify(&empty).unwrap(),
            VerifyReport {
                lines: 0,
                last_hash: GENESIS.into()
            }
        );
    }

    #[test]
    fn editing_any_field_of_a_middle_line_is_found() {
        // Line 4 is an admin command: actor, job and decision besides the fixed fields.
        let (_d, path) = log_of(6);
        let orig = lines(&path);
        let line4 = &orig[3];
        let prev4: AuditLine = serde_json::from_str(line4).unwrap();
        let edits: Vec<(&str, String, ChainError)> = vec![
            (
                "action",
                line4.replace("submit_job", "submit_jab"),
                ChainError {
                    line: 5,
                    why: Broken::PrevMismatch { previous: 4 },
                },
            ),
            (
                "actor",
                line4.replace("project_admin", "lead"),
                ChainError {
                    line: 5,
                    why: Broken::PrevMismatch { previous: 4 },
                },
            ),
            (
                "job",
                line4.replace("job-3", "job-9"),
                ChainError {
                    line: 5,
                    why: Broken::PrevMismatch { previous: 4 },
                },
            ),
            (
                "decision",
                line4.replace("allowed", "refused"),
                ChainError {
                    line: 5,
                    why: Broken::PrevMismatch { previous: 4 },
                },
            ),
            (
                "node",
                line4.replace("\"server\"", "\"site-1\""),
                ChainError {
                    line: 5,
                    why: Broken::PrevMismatch { previous: 4 },
                },
            ),
            (
                "ts_ms",
                line4.replace(
                    &format!("\"ts_ms\":{}", prev4.ts_ms),
                    &format!("\"ts_ms\":{}", prev4.ts_ms + 1),
                ),
                ChainError {
                    line: 5,
                    why: Broken::PrevMismatch { previous: 4 },
                },
            ),
            (
                "a space",
                line4.replacen(',', ", ", 1),
                ChainError {
                    line: 5,
                    why: Broken::PrevMismatch { previous: 4 },
                },
            ),
            (
                "prev",
                line4.replace(&prev4.prev, GENESIS),
                ChainError {
                    line: 4,
                    why: Broken::PrevMismatch { previous: 3 },
                },
            ),
            (
                "seq",
                line4.replace("\"seq\":4", "\"seq\":9"),
                ChainError {
                    line: 4,
                    why: Broken::Deleted {
                        expected: 4,
                        found: 9,
                    },
                },
            ),
            (
                "kind",
                line4.replace("admin_command", "job_event"),
                ChainError {
                    line: 5,
                    why: Broken::PrevMismatch { previous: 4 },
                },
            ),
            (
                "a bad kind",
                line4.replace("admin_command", "coffee"),
                ChainError {
                    line: 4,
                    why: Broken::BadJson(String::new()),
                },
            ),
        ];
        for (what, edited, want) in edits {
            assert_ne!(&edited, line4, "{what}: the edit changed nothing");
            let mut ls = orig.clone();
            ls[3] = edited;
            write_lines(&path, &ls);
            let got = broken(&path);
            match (&got.why, &want.why) {
                (Broken::BadJson(_), Broken::BadJson(_)) => assert_eq!(got.line, want.line),
                _ => assert_eq!(got, want, "{what}"),
            }
        }
        // The message says which line was edited and which line found it.
        let mut ls = orig.clone();
        ls[3] = line4.replace("submit_job", "submit_jab");
        write_lines(&path, &ls);
        assert_eq!(
            broken(&path).to_string(),
            "line 5: prev is not the SHA-256 of line 4: line 4 was edited (or this line's prev was)"
        );
        write_lines(&path, &orig);
        assert_eq!(verify(&path).unwrap().lines, 6);
    }

    #[test]
    fn deleted_reordered_repeated_and_foreign_lines_are_found() {
        let (_d, path) = log_of(6);
        let orig = lines(&path);
        let cases: Vec<(&str, Vec<String>, ChainError)> = vec![
            (
                "middle line deleted",
                [&orig[..2], &orig[3..]].concat(),
                ChainError {
                    line: 3,
                    why: Broken::Deleted {
                        expected: 3,
                        found: 4,
                    },
                },
            ),
            (
                "first lines deleted",
                orig[2..].to_vec(),
                ChainError {
                    line: 1,
                    why: Broken::Deleted {
                        expected: 1,
                        found: 3,
                    },
                },
            ),
            (
                "two lines swapped",
                {
                    let mut v = orig.clone();
                    v.swap(2, 3);
                    v
                },
                ChainError {
                    line: 3,
                    why: Broken::Moved {
                        expected: 3,
                        found: 4,
                        at: 4,
                    },
                },
            ),
            (
                "a line repeated",
                {
                    let mut v = orig.clone();
                    v.insert(3, orig[2].clone());
                    v
                },
                ChainError {
                    line: 4,
                    why: Broken::Repeated {
                        expected: 4,
                        found: 3,
                    },
                },
            ),
            (
                "deleted and renumbered",
                {
                    let mut v = orig.clone();
                    v.remove(2);
                    v[2] = v[2].replace("\"seq\":4", "\"seq\":3");
                    v
                },
                ChainError {
                    line: 3,
                    why: Broken::PrevMismatch { previous: 2 },
                },
            ),
            (
                "first line's prev",
                {
                    let mut v = orig.clone();
                    v[0] = v[0].replace(GENESIS, &"1".repeat(64));
                    v
                },
                ChainError {
                    line: 1,
                    why: Broken::NotGenesis,
                },
            ),
        ];
        for (what, ls, want) in cases {
            write_lines(&path, &ls);
            assert_eq!(broken(&path), want, "{what}");
        }
        let mut ls = orig.clone();
        ls.insert(2, "not json".into());
        write_lines(&path, &ls);
        let e = broken(&path);
        assert!(e.line == 3 && matches!(e.why, Broken::BadJson(_)), "{e:?}");
        ls[2] = String::new();
        write_lines(&path, &ls);
        assert_eq!(broken(&path).line, 3);
        ls[2] = format!("{{\"x\":\"{}\"}}", "a".repeat(MAX_LINE_BYTES));
        write_lines(&path, &ls);
        assert_eq!(
            broken(&path),
            ChainError {
                line: 3,
                why: Broken::TooLong
            }
        );
        // A torn last line is reported by verify (and cut by the next open).
        let mut bytes = orig.join("\n").into_bytes();
        bytes.truncate(bytes.len() - 5);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            broken(&path),
            ChainError {
                line: 6,
                why: Broken::Torn
            }
        );
    }

    #[test]
    fn reopening_continues_the_chain() {
        let (_d, path) = log_of(3);
        let log = AuditLog::open(&path, "server").unwrap();
        let clone = log.clone();
        assert_eq!(
            clone
                .record(AuditEntry::new(AuditKind::JobEvent, "finished").job("job-0"))
                .unwrap(),
            4
        );
        drop((log, clone));
        let log = AuditLog::open(&path, "server").unwrap();
        assert_eq!(
            log.record(AuditEntry::new(AuditKind::JobEvent, "x"))
                .unwrap(),
            5
        );
        assert_eq!(verify(&path).unwrap().lines, 5);
    }

    #[test]
    fn a_torn_last_line_is_cut_on_reopen() {
        let (_d, path) = log_of(3);
        let intact = std::fs::read(&path).unwrap();
        let mut torn = intact.clone();
        torn.extend_from_slice(br#"{"seq":4,"ts_ms":17334"#);
        std::fs::write(&path, &torn).unwrap();
        let log = AuditLog::open(&path, "server").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), intact);
        assert_eq!(
            log.record(AuditEntry::new(AuditKind::JobEvent, "restarted"))
                .unwrap(),
            4
        );
        assert_eq!(verify(&path).unwrap().lines, 4);
        // A file that is one torn line becomes empty.
        std::fs::write(&path, b"{\"seq\":1").unwrap();
        let log = AuditLog::open(&path, "server").unwrap();
        assert_eq!(
            log.record(AuditEntry::new(AuditKind::JobEvent, "x"))
                .unwrap(),
            1
        );
        assert_eq!(verify(&path).unwrap().lines, 1);
    }

    #[test]
    fn a_broken_chain_is_appended_to_and_still_named() {
        let (_d, path) = log_of(4);
        let mut ls = lines(&path);
        ls[1] = ls[1].replace("deployed", "deleted");
        ls.insert(3, "garbage".into());
        write_lines(&path, &ls);
        let log = AuditLog::open(&path, "server").unwrap();
        // After the last good line (seq 4): seq 5, chained to it.
        assert_eq!(
            log.record(AuditEntry::new(AuditKind::JobEvent, "x"))
                .unwrap(),
            5
        );
        assert_eq!(
            broken(&path),
            ChainError {
                line: 3,
                why: Broken::PrevMismatch { previous: 2 }
            }
        );
        // The new line is chained to the last one.
        let ls = lines(&path);
        let last: AuditLine = serde_json::from_str(&ls[5]).unwrap();
        assert_eq!(
            last.prev,
            hex::encode(ring::digest::digest(&SHA256, ls[4].as_bytes()))
        );
        // A garbage last line: the next seq counts lines.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.log");
        std::fs::write(&p, "junk\nmore junk\n").unwrap();
        let log = AuditLog::open(&p, "site-1").unwrap();
        assert_eq!(
            log.record(AuditEntry::new(AuditKind::JobEvent, "x"))
                .unwrap(),
            3
        );
    }

    #[test]
    fn oversized_fields_are_truncated_and_lines_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        let log = AuditLog::open(&path, "server").unwrap();
        let big = "é".repeat(10_000); // 20 000 bytes, two per character
        log.record(
            AuditEntry::new(AuditKind::AdminCommand, big.clone())
                .reason(big.clone())
                .job("j")
                .detail(serde_json::json!({ "blob": "x".repeat(100_000) })),
        )
        .unwrap();
        let l: AuditLine = serde_json::from_str(&lines(&path)[0]).unwrap();
        assert!(l.action.starts_with(&"é".repeat(2048)), "kept the start");
        assert!(
            l.action.len() < MAX_FIELD_BYTES + 64
                && l.action.ends_with("…[truncated 15904 of 20000 bytes]"),
            "{}",
            &l.action[l.action.len() - 40..]
        );
        let detail = l.detail.unwrap();
        assert_eq!(detail["truncated"], "more than 16384 bytes of JSON");
        assert!(
            detail["head"]
                .as_str()
                .unwrap()
                .starts_with("{\"blob\":\"xxx")
        );
        // Control characters escape sixfold: the line shrinks again, and still fits.
        let ctl = "\u{1}".repeat(MAX_FIELD_BYTES);
        let actor = Actor {
            name: ctl.clone(),
            org: ctl.clone(),
            role: ctl.clone(),
        };
        log.record(
            AuditEntry::new(AuditKind::Policy, ctl.clone())
                .actor(actor)
                .job(ctl.clone())
                .reason(ctl.clone())
                .detail(serde_json::json!([ctl])),
        )
        .unwrap();
        let line = &lines(&path)[1];
        assert!(line.len() <= MAX_LINE_BYTES, "{}", line.len());
        let l: AuditLine = serde_json::from_str(line).unwrap();
        assert!(l.action.ends_with("…[truncated 3840 of 4096 bytes]"));
        assert!(l.detail.unwrap()["truncated"].is_string());
        // Newlines stay escaped: still one line each.
        log.record(AuditEntry::new(AuditKind::Policy, "a\nb\r\n"))
            .unwrap();
        assert_eq!(verify(&path).unwrap().lines, 3);
        assert_eq!(cut("ab", 1), "a…[truncated 1 of 2 bytes]");
    }

    #[test]
    fn lines_from_many_threads_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        let log = AuditLog::open(&path, "server").unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let log = log.clone();
                s.spawn(move || {
                    for i in 0..10 {
                        log.record(AuditEntry::new(
                            AuditKind::JobEvent,
                            format!("thread {t} event {i}"),
                        ))
                        .unwrap();
                    }
                });
            }
        });
        assert_eq!(verify(&path).unwrap().lines, 40);
    }

    #[test]
    fn workflow_lines_name_the_job_and_the_workflow() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        let log = AuditLog::open(&path, "server").unwrap();
        let wf = WorkflowAudit::new(log, "job-7", "scatter_and_gather");
        wf.event("round_started", Some(serde_json::json!({ "round": 2 })));
        wf.event("aborted", Some(serde_json::json!("min_clients not met")));
        wf.event("finished", None);
        WorkflowAudit::off().event("nothing", None);
        let ls = lines(&path);
        assert_eq!(ls.len(), 3);
        let l: AuditLine = serde_json::from_str(&ls[0]).unwrap();
        assert_eq!(
            (l.kind, l.job.as_deref(), l.action.as_str()),
            (AuditKind::Workflow, Some("job-7"), "round_started")
        );
        assert_eq!(
            l.detail.unwrap(),
            serde_json::json!({ "round": 2, "workflow": "scatter_and_gather" })
        );
        let l: AuditLine = serde_json::from_str(&ls[1]).unwrap();
        assert_eq!(l.detail.unwrap()["value"], "min_clients not met");
        assert_eq!(verify(&path).unwrap().lines, 3);
    }

    #[test]
    fn show_filters_and_escapes() {
        let (_d, path) = log_of(4);
        let log = AuditLog::open(&path, "server").unwrap();
        log.record(AuditEntry::new(AuditKind::Policy, "evil \u{1b}[2J").job("job-3"))
            .unwrap();
        let mut out = Vec::new();
        let n = show(&path, &ShowFilter::default(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(n, 5);
        assert!(
            !text.contains('\u{1b}') && text.contains("evil \\u{1b}[2J"),
            "{text}"
        );
        let mut out = Vec::new();
        let filter = ShowFilter {
            job: Some("job-3".into()),
            kind: Some(AuditKind::Policy),
        };
        assert_eq!(show(&path, &filter, &mut out).unwrap(), 1);
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_733_445_012_345), "2024-12-06 00:30:12.345");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000");
        assert_eq!(
            "job_event".parse::<AuditKind>().unwrap(),
            AuditKind::JobEvent
        );
        assert!("jobs".parse::<AuditKind>().is_err());
    }
}
