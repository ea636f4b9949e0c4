//! The node's end of a Client API connection (`docs/client-api.md`): the private socket, the
//! handshake, and a reader thread that takes heartbeats and metrics itself and hands results
//! and failures to the task that waits for them.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flare_client::proto::{
    self, Accept, FrameError, MAX_TO_NODE, MAX_TO_PROGRAM, PROTOCOL, ResultMsg, ToNode, ToProgram,
};

/// How long a connected program has to send its `hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 100;

/// The socket a launch listens on, in a folder only this user may enter.
#[derive(Debug)]
pub struct Endpoint {
    /// The socket's path.
    pub socket: PathBuf,
    listener: UnixListener,
    /// A folder made in the temporary directory for a socket whose path would be too long.
    temp: Option<PathBuf>,
}

fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

impl Endpoint {
    /// Binds `<dir>/api.sock` (or, when that path is too long, a socket in a fresh
    /// `flare-capi-<token>` folder of the temporary directory).
    pub fn bind(dir: &Path, token: &str) -> std::io::Result<Endpoint> {
        private_dir(dir)?;
        let mut socket = dir.join("api.sock");
        let mut temp = None;
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            let t = std::env::temp_dir().join(format!("flare-capi-{}", &token[..12]));
            private_dir(&t)?;
            socket = t.join("api.sock");
            temp = Some(t);
        }
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)?;
        listener.set_nonblocking(true)?;
        Ok(Endpoint {
            socket,
            listener,
            temp,
        })
    }

    /// A pending connection, if there is one.
    pub fn try_accept(&self) -> std::io::Result<Option<UnixStream>> {
        match self.listener.accept() {
            Ok((s, _)) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        if let Some(t) = &self.temp {
            let _ = std::fs::remove_dir_all(t);
        }
    }
}

/// What the reader thread hands on.
#[derive(Debug)]
pub enum Event {
    /// A result.
    Result(ResultMsg),
    /// A message the node cannot read; the connection is over.
    Malformed(String),
    /// The program closed the connection.
    Closed,
}

/// An accepted connection.
#[derive(Debug)]
pub struct Connection {
    writer: Mutex<UnixStream>,
    /// Results and the end of the connection.
    pub events: Receiver<Event>,
    heard: Arc<AtomicU64>,
    epoch: Instant,
}

/// Compares two tokens in time independent of where they differ.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Connection {
    /// Runs the handshake on `stream`: a `hello` with `token` within [`HELLO_TIMEOUT`], then
    /// `accept`. A refused hello is answered with `reject` and the reason.
    pub fn handshake(
        mut stream: UnixStream,
        token: &str,
        accept: Accept,
        job: &str,
        tracker: crate::tracking::Tracker,
    ) -> Result<Connection, String> {
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(HELLO_TIMEOUT)))
            .map_err(|e| format!("the program's connection: {e}"))?;
        let hello: ToNode = proto::read_frame(&mut stream, MAX_TO_NODE).map_err(|e| match e {
            FrameError::Io(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                format!("the program connected but sent no hello within {HELLO_TIMEOUT:?}")
            }
            other => format!("the program's hello: {other}"),
        })?;
        let refusal = match &hello {
            ToNode::Hello { protocol, .. } if *protocol != PROTOCOL => Some(format!(
                "protocol version {protocol} is not supported (this node speaks {PROTOCOL})"
            )),
            ToNode::Hello { token: t, .. } if !same_token(t, token) => {
                Some("wrong token (FLARE_CLIENT_TOKEN of this launch expected)".to_string())
            }
            ToNode::Hello { .. } => None,
            other => Some(format!("the first message must be a hello, not {other:?}")),
        };
        if let Some(reason) = refusal {
            let _ = proto::write_frame(
                &mut stream,
                &ToProgram::Reject {
                    reason: reason.clone(),
                },
                MAX_TO_PROGRAM,
            );
            return Err(format!("the program's hello was refused: {reason}"));
        }
        proto::write_frame(&mut stream, &ToProgram::Accept(accept), MAX_TO_PROGRAM)
            .map_err(|e| format!("cannot answer the program's hello: {e}"))?;
        stream
            .set_read_timeout(None)
            .map_err(|e| format!("the program's connection: {e}"))?;
        let reader = stream
            .try_clone()
            .map_err(|e| format!("the program's connection: {e}"))?;
        let (tx, events) = sync_channel(4);
        let epoch = Instant::now();
        let heard = Arc::new(AtomicU64::new(0));
        let h = Arc::clone(&heard);
        let job = job.to_string();
        std::thread::spawn(move || read_loop(reader, tx, h, epoch, &job, &tracker));
        Ok(Connection {
            writer: Mutex::new(stream),
            events,
            heard,
            epoch,
        })
    }

    /// Sends one message.
    pub fn send(&self, msg: &ToProgram) -> Result<(), String> {
        let mut w = self
            .writer
            .lock()
            .map_err(|_| "the connection's writer is poisoned".to_string())?;
        proto::write_frame(&mut *w, msg, MAX_TO_PROGRAM)
            .map_err(|e| format!("cannot write to the program: {e}"))
    }

    /// How long since the program last sent anything.
    pub fn silent_for(&self) -> Duration {
        let at = Duration::from_millis(self.heard.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(at)
    }

    /// Closes both directions (the program sees the end of the connection).
    pub fn close(&self) {
        if let Ok(w) = self.writer.lock() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Ok(mut w) = self.writer.lock() {
            let _ = w.flush();
        }
    }
}

fn read_loop(
    mut stream: UnixStream,
    tx: SyncSender<Event>,
    heard: Arc<AtomicU64>,
    epoch: Instant,
    job: &str,
    tracker: &crate::tracking::Tracker,
) {
    let mut records = 0u64;
    let mut refused = 0u64;
    let end = loop {
        let body = match proto::read_frame_bytes(&mut stream, MAX_TO_NODE) {
            Ok(b) => b,
            Err(FrameError::Closed) => break Event::Closed,
            Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break Event::Malformed("the connection closed in the middle of a message".into());
            }
            Err(FrameError::Io(_)) => break Event::Closed,
            Err(e) => break Event::Malformed(e.to_string()),
        };
        heard.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        match proto::decode::<ToNode>(&body) {
            Ok(ToNode::Heartbeat) => {}
            Ok(ToNode::Log { records: batch }) => {
                if batch.len() > proto::MAX_LOG_RECORDS {
                    break Event::Malformed(format!(
                        "a log message of {} records, at most {}",
                        batch.len(),
                        proto::MAX_LOG_RECORDS
                    ));
                }
                records += batch.len() as u64;
                let now = crate::tracking::now_ms();
                for r in batch {
                    match to_metric(r, now) {
                        Ok(m) => tracker.record(m),
                        Err(why) => {
                            refused += 1;
                            // The first few refusals are shown; the rest only counted.
                            if refused <= 10 {
                                tracing::warn!(%job, %why, "a metric record from the program refused");
                            }
                        }
                    }
                }
                tracing::debug!(%job, total = records, refused, "metric records from the program");
            }
            Ok(ToNode::Result(r)) => {
                if tx.send(Event::Result(r)).is_err() {
                    return;
                }
            }
            Ok(ToNode::Hello { .. }) => break Event::Malformed("a second hello".into()),
            Err(e) => break Event::Malformed(e.to_string()),
        }
    };
    let _ = tx.send(end);
}

/// A Client API `log` record as a tracked metric: `scalar` (a number), `scalars` (an object of
/// numbers), `text`, `param` or `tag` (strings); checked against the tracking limits.
fn to_metric(r: proto::LogRecord, now_ms: u64) -> Result<crate::tracking::MetricRecord, String> {
    use crate::tracking::{MetricRecord, MetricValue};
    let kind = r.kind.as_deref().unwrap_or("scalar");
    let text = |v: &serde_json::Value| {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("{:?}: a {kind} record needs a string, not {v}", r.key))
    };
    let value = match kind {
        "scalar" => MetricValue::Scalar(r.value.as_f64().ok_or_else(|| {
            format!(
                "{:?}: a scalar record needs a number, not {}",
                r.key, r.value
            )
        })?),
        "scalars" => {
            let o = r.value.as_object().ok_or_else(|| {
                format!("{:?}: a scalars record needs an object of numbers", r.key)
            })?;
            let mut m = std::collections::BTreeMap::new();
            for (k, v) in o {
                let x = v
                    .as_f64()
                    .ok_or_else(|| format!("{:?}: {k:?} is not a number", r.key))?;
                m.insert(k.clone(), x);
            }
            MetricValue::Scalars(m)
        }
        "text" => MetricValue::Text(text(&r.value)?),
        "param" => MetricValue::Param(text(&r.value)?),
        "tag" => MetricValue::Tag(text(&r.value)?),
        other => return Err(format!("{:?}: unknown kind {other:?}", r.key)),
    };
    let m = MetricRecord {
        key: r.key,
        value,
        step: r.step,
        wall_ms: now_ms,
    };
    m.check().map_err(|e| e.to_string())?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_records_become_metrics_or_are_refused() {
        use crate::tracking::MetricValue;
        let rec = |key: &str, value: serde_json::Value, kind: Option<&str>| proto::LogRecord {
            key: key.into(),
            value,
            step: Some(3),
            kind: kind.map(str::to_string),
        };
        let m = to_metric(rec("loss", serde_json::json!(0.5), None), 7).unwrap();
        assert_eq!(
            (m.value, m.step, m.wall_ms),
            (MetricValue::Scalar(0.5), Some(3), 7)
        );
        let m = to_metric(
            rec("l", serde_json::json!({"a": 1, "b": 2.5}), Some("scalars")),
            0,
        )
        .unwrap();
        assert!(matches!(m.value, MetricValue::Scalars(ref x) if x.len() == 2 && x["b"] == 2.5));
        assert!(matches!(
            to_metric(rec("p", serde_json::json!("x"), Some("param")), 0)
                .unwrap()
                .value,
            MetricValue::Param(_)
        ));
        assert!(matches!(
            to_metric(rec("t", serde_json::json!("x"), Some("tag")), 0)
                .unwrap()
                .value,
            MetricValue::Tag(_)
        ));
        for (r, what) in [
            (rec("x", serde_json::json!("a"), None), "number"),
            (
                rec("x", serde_json::json!({"a": "b"}), Some("scalars")),
                "not a number",
            ),
            (rec("x", serde_json::json!(1), Some("text")), "string"),
            (
                rec("x", serde_json::json!(1), Some("image")),
                "unknown kind",
            ),
            (rec("", serde_json::json!(1), None), "metric key"),
        ] {
            let e = to_metric(r, 0).unwrap_err();
            assert!(e.contains(what), "{e}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token("abcd", "abcd"));
        assert!(!same_token("abcd", "abce"));
        assert!(!same_token("abcd", "abc"));
    }

    #[test]
    fn long_socket_paths_move_to_the_temporary_directory() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("x".repeat(120));
        let token = "0123456789abcdef0123456789abcdef";
        let e = Endpoint::bind(&deep, token).unwrap();
        assert!(e.socket.as_os_str().len() <= MAX_SOCKET_PATH);
        let folder = e.socket.parent().unwrap().to_path_buf();
        let mode = std::fs::metadata(&folder).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(
            std::fs::metadata(&deep).unwrap().permissions().mode() & 0o777,
            0o700
        );
        drop(e);
        assert!(!folder.exists());
    }
}
