//! The messages of the Client API protocol, version [`PROTOCOL`], and their framing: a 4-byte
//! big-endian length, then one JSON object whose `type` names the message
//! (`docs/client-api.md`).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The protocol version this crate speaks.
pub const PROTOCOL: u32 = 1;
/// Largest frame the node accepts from a program.
pub const MAX_TO_NODE: usize = 4 << 20;
/// Largest frame a program accepts from the node.
pub const MAX_TO_PROGRAM: usize = 16 << 20;
/// Most log records in one `log` message.
pub const MAX_LOG_RECORDS: usize = 10_000;

/// Environment variable: the socket path.
pub const ENV_SOCKET: &str = "FLARE_CLIENT_SOCKET";
/// Environment variable: the launch token.
pub const ENV_TOKEN: &str = "FLARE_CLIENT_TOKEN";
/// Environment variable: the node's pid.
pub const ENV_PARENT_PID: &str = "FLARE_CLIENT_PARENT_PID";
/// Environment variable: the job id.
pub const ENV_JOB_ID: &str = "FLARE_JOB_ID";
/// Environment variable: the site name.
pub const ENV_SITE_NAME: &str = "FLARE_SITE_NAME";

/// Return code of a successful result.
pub const RC_OK: &str = "OK";
/// Return code of a failed result.
pub const RC_EXCEPTION: &str = "EXECUTION_EXCEPTION";

/// A scalar of `meta` (numbers, strings, booleans).
pub type Meta = BTreeMap<String, serde_json::Value>;

/// Messages from the program to the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToNode {
    /// The first message on a connection.
    Hello {
        /// Protocol version.
        protocol: u32,
        /// The launch token (`FLARE_CLIENT_TOKEN`).
        token: String,
        /// The program's pid.
        pid: u32,
        /// The program's rank, when it has several processes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rank: Option<String>,
        /// The client library and its version.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
    },
    /// The answer to a task.
    Result(ResultMsg),
    /// A batch of metrics.
    Log {
        /// The records, oldest first.
        records: Vec<LogRecord>,
    },
    /// Still alive.
    Heartbeat,
}

/// A task's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMsg {
    /// The task answered.
    pub task_id: u64,
    /// `OK` or `EXECUTION_EXCEPTION`.
    pub rc: String,
    /// `FULL` or `DIFF`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params_type: Option<String>,
    /// Metrics (finite numbers).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Metadata scalars, `NUM_STEPS_CURRENT_ROUND` among them.
    #[serde(default)]
    pub meta: Meta,
    /// The model file, if the result carries weights.
    #[serde(default)]
    pub model: Option<ModelRef>,
    /// Why the task failed, with a failing `rc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One metric record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The metric's name (a tag).
    pub key: String,
    /// A number (`scalar`), an object of numbers (`scalars`) or a string (`text`).
    pub value: serde_json::Value,
    /// The step it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i64>,
    /// `scalar`, `scalars` or `text`; `scalar` when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// A safetensors file in the exchange folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    /// Absolute path.
    pub path: String,
    /// `FULL` or `DIFF` (on tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params_type: Option<String>,
}

/// What the node tells a program it accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accept {
    /// Protocol version.
    pub protocol: u32,
    /// The job.
    pub job_id: String,
    /// The site.
    pub site_name: String,
    /// Seconds between heartbeats.
    pub heartbeat_interval: f64,
    /// `FULL` or `DIFF`: what results should carry.
    pub params_transfer_type: String,
    /// `pytorch` or `numpy`: what the client library hands the user.
    pub params_format: String,
    /// Whether a train task's result should carry the metrics of the received model.
    pub train_with_evaluation: bool,
    /// Where results' model files go.
    pub exchange_dir: String,
}

/// A task for the program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMsg {
    /// The task's id; the result names it.
    pub task_id: u64,
    /// `train`, `validate` or `submit_model`.
    pub name: String,
    /// The round.
    pub round: u32,
    /// The planned number of rounds, when known.
    #[serde(default)]
    pub total_rounds: Option<u32>,
    /// Metadata scalars.
    #[serde(default)]
    pub meta: Meta,
    /// The model, if the task carries one.
    #[serde(default)]
    pub model: Option<ModelRef>,
}

/// Messages from the node to the program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToProgram {
    /// The hello was accepted.
    Accept(Accept),
    /// The hello was refused; the connection closes.
    Reject {
        /// Why.
        reason: String,
    },
    /// A task.
    Task(TaskMsg),
    /// The result was taken.
    ResultAck {
        /// The task.
        task_id: u64,
    },
    /// The result was refused; the task failed.
    ResultRejected {
        /// The task.
        task_id: u64,
        /// Why.
        reason: String,
    },
    /// No more tasks: finish and exit.
    Shutdown {
        /// Why.
        reason: String,
    },
    /// The job was aborted: stop at once.
    Abort {
        /// Why.
        reason: String,
    },
    /// A message could not be read; the connection closes.
    Error {
        /// Why.
        reason: String,
    },
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection between frames.
    #[error("the connection was closed")]
    Closed,
    /// Reading or writing failed (a closed connection mid-frame among others).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The frame is larger than the limit.
    #[error("a frame of {len} bytes, at most {max}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame is not a message of this protocol.
    #[error("a malformed message: {0}")]
    Malformed(String),
}

/// Writes one message as a frame.
pub fn write_frame<W: Write, T: Serialize>(
    w: &mut W,
    msg: &T,
    max: usize,
) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if body.len() > max {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max,
        });
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
        len: body.len(),
        max,
    })?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame's bytes, refusing one longer than `max` before reading it.
pub fn read_frame_bytes<R: Read>(r: &mut R, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Decodes a frame's bytes as a message.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Reads one message.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R, max: usize) -> Result<T, FrameError> {
    decode(&read_frame_bytes(r, max)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_in_the_documented_shape() {
        let hello = ToNode::Hello {
            protocol: 1,
            token: "ab".into(),
            pid: 7,
            rank: None,
            client: None,
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &hello, MAX_TO_NODE).unwrap();
        assert_eq!(&buf[..4], &(buf.len() as u32 - 4).to_be_bytes());
        let json: serde_json::Value = serde_json::from_slice(&buf[4..]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "hello", "protocol": 1, "token": "ab", "pid": 7})
        );
        let back: ToNode = read_frame(&mut buf.as_slice(), MAX_TO_NODE).unwrap();
        assert_eq!(back, hello);

        let text = r#"{"type":"result","task_id":3,"rc":"OK","metrics":{"accuracy":0.5},
            "meta":{"NUM_STEPS_CURRENT_ROUND":10},"model":{"path":"/x/3.out.safetensors"},"extra":1}"#;
        let r: ToNode = decode(text.as_bytes()).unwrap();
        let ToNode::Result(r) = r else {
            panic!("not a result: {r:?}")
        };
        assert_eq!(r.task_id, 3);
        assert_eq!(r.model.unwrap().path, "/x/3.out.safetensors");
        let hb: ToNode = decode(br#"{"type":"heartbeat"}"#).unwrap();
        assert_eq!(hb, ToNode::Heartbeat);
    }

    #[test]
    fn bad_frames_are_errors() {
        let big = (MAX_TO_NODE as u32 + 1).to_be_bytes();
        assert!(matches!(
            read_frame::<_, ToNode>(&mut big.as_slice(), MAX_TO_NODE),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            read_frame::<_, ToNode>(&mut [].as_slice(), MAX_TO_NODE),
            Err(FrameError::Closed)
        ));
        assert!(matches!(
            read_frame::<_, ToNode>(&mut [0u8, 0, 0, 9, b'{'].as_slice(), MAX_TO_NODE),
            Err(FrameError::Io(_))
        ));
        for bad in [
            &b"{\"type\":\"nope\"}"[..],
            b"[1]",
            b"{\"type\":\"result\"}",
            b"\xff",
        ] {
            assert!(
                matches!(decode::<ToNode>(bad), Err(FrameError::Malformed(_))),
                "{bad:?}"
            );
        }
    }
}
