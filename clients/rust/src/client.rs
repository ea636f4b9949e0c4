//! The connection to the node: the handshake, tasks and results, log batching, heartbeats, and
//! the rule that a program whose node is gone ends its own process group.
//!
//! Three threads serve a [`Client`]: a reader that turns the node's frames into one bounded
//! channel the calls wait on, a heartbeat thread that also flushes buffered log records, and a
//! watcher of the parent process. Every write goes through one mutex, so frames never
//! interleave and log records buffered before a result reach the node before it.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::model::{Model, ModelError};
use crate::proto::{
    self, Accept, FrameError, LogRecord, MAX_LOG_RECORDS, MAX_TO_NODE, MAX_TO_PROGRAM, Meta,
    ModelRef, PROTOCOL, RC_EXCEPTION, RC_OK, ResultMsg, TaskMsg, ToNode, ToProgram,
};

/// The meta key of a result's FedAvg weight.
pub const NUM_STEPS_CURRENT_ROUND: &str = "NUM_STEPS_CURRENT_ROUND";

/// How long the node has to answer `hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the parent process is checked.
const PARENT_POLL: Duration = Duration::from_millis(500);
/// Messages the reader may queue ahead of the calls that take them.
const INCOMING_BOUND: usize = 64;
/// Bytes of buffered log records that make a flush (well under the node's 4 MiB limit).
const LOG_FLUSH_BYTES: usize = 1 << 20;
/// Room a `log` message needs around its records.
const LOG_FRAME_OVERHEAD: usize = 64;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A launch variable is missing or unreadable.
    #[error("environment variable {name} {what} (is this program launched by a Flare site?)")]
    Env {
        /// The variable.
        name: &'static str,
        /// What is wrong with it.
        what: &'static str,
    },
    /// The socket could not be reached.
    #[error("cannot connect to the node at {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The node refused the hello.
    #[error("the node refused this program: {0}")]
    Rejected(String),
    /// The node's answer to the hello is not an `accept` this client can use.
    #[error("the node's answer to hello: {0}")]
    Handshake(String),
    /// Reading or writing a frame failed.
    #[error("the connection to the node: {0}")]
    Frame(#[from] FrameError),
    /// The connection ended without a shutdown.
    #[error("the connection to the node was lost: {0}")]
    Lost(String),
    /// The node sent something this protocol does not allow at that point.
    #[error("the node broke the protocol: {0}")]
    Protocol(String),
    /// The node reported that it could not read a message of this program.
    #[error("the node reported an error: {0}")]
    Node(String),
    /// The node told the program to stop (`shutdown` or `abort`).
    #[error("the node stopped this program ({0}); there is no task to answer")]
    Stopped(String),
    /// The node refused the result; the task failed.
    #[error("the node rejected the result of task {task_id}: {reason}")]
    ResultRejected {
        /// The task.
        task_id: u64,
        /// The node's reason.
        reason: String,
    },
    /// `send` with no task received.
    #[error("no task to answer: call receive() first")]
    NoTask,
    /// `send` for a task already answered.
    #[error("task {0} was already answered; call receive() for the next task")]
    AlreadyAnswered(u64),
    /// `send` for a task that is not the one outstanding.
    #[error("task {given} is not the outstanding task ({outstanding})")]
    WrongTask {
        /// The id passed.
        given: u64,
        /// The task waiting for its result.
        outstanding: u64,
    },
    /// `receive` while a task still waits for its result.
    #[error("task {0} has not been answered: send its result before receiving again")]
    TaskOutstanding(u64),
    /// A metric that is not a finite number.
    #[error("metric {key} is {value}, not a finite number")]
    NonFiniteMetric {
        /// The metric.
        key: String,
        /// Its value.
        value: f64,
    },
    /// A log record this protocol cannot carry.
    #[error("log record {key}: {what}")]
    BadLogRecord {
        /// The record's key.
        key: String,
        /// What is wrong with it.
        what: String,
    },
    /// The task's model file could not be read; the task was answered as failed.
    #[error("task {task_id}: cannot read its model, the task was failed: {source}")]
    TaskModel {
        /// The task.
        task_id: u64,
        /// What failed.
        source: ModelError,
    },
    /// A model could not be read, written or turned into a difference.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The result file could not be put in place.
    #[error("result file {path}: {source}")]
    ResultFile {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
}

/// What a model's weights are: the weights themselves, or trained minus received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamsType {
    /// The weights.
    Full,
    /// The trained weights minus the task's weights.
    Diff,
}

impl ParamsType {
    /// The protocol's spelling: `FULL` or `DIFF`.
    pub fn as_str(self) -> &'static str {
        match self {
            ParamsType::Full => "FULL",
            ParamsType::Diff => "DIFF",
        }
    }

    /// Reads the protocol's spelling.
    pub fn parse(s: &str) -> Option<ParamsType> {
        match s {
            "FULL" => Some(ParamsType::Full),
            "DIFF" => Some(ParamsType::Diff),
            _ => None,
        }
    }
}

/// Where and how to connect; [`Config::from_env`] reads what the node's launch sets.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node's socket (`FLARE_CLIENT_SOCKET`).
    pub socket: PathBuf,
    /// The launch token (`FLARE_CLIENT_TOKEN`).
    pub token: String,
    /// The node's pid (`FLARE_CLIENT_PARENT_PID`): with `end_group_on_loss`, the program ends
    /// its process group once this process is gone or its own parent changes.
    pub parent_pid: Option<u32>,
    /// This process's rank, sent in `hello` (`RANK` when set).
    pub rank: Option<String>,
    /// Whether a lost node (the connection closed without a shutdown, or the parent gone) ends
    /// this process group with SIGKILL, as the protocol requires of a launched program. Off
    /// only where the process is not the node's program, such as a test that plays the node.
    pub end_group_on_loss: bool,
}

impl Config {
    /// The launch variables of `docs/client-api.md`, with `end_group_on_loss` on.
    pub fn from_env() -> Result<Config, ClientError> {
        let var = |name: &'static str| match std::env::var(name) {
            Ok(v) if !v.is_empty() => Ok(Some(v)),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(ClientError::Env {
                name,
                what: "is not UTF-8",
            }),
        };
        let socket = var(proto::ENV_SOCKET)?.ok_or(ClientError::Env {
            name: proto::ENV_SOCKET,
            what: "is not set",
        })?;
        let token = var(proto::ENV_TOKEN)?.ok_or(ClientError::Env {
            name: proto::ENV_TOKEN,
            what: "is not set",
        })?;
        let parent_pid = var(proto::ENV_PARENT_PID)?
            .map(|p| {
                p.parse::<u32>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or(ClientError::Env {
                        name: proto::ENV_PARENT_PID,
                        what: "is not a pid",
                    })
            })
            .transpose()?;
        Ok(Config {
            socket: socket.into(),
            token,
            parent_pid,
            rank: var("RANK")?,
            end_group_on_loss: true,
        })
    }
}

/// A task from the node.
#[derive(Debug, Clone)]
pub struct Task {
    /// The task's id; [`Client::send`] names it.
    pub id: u64,
    /// `train`, `validate` or `submit_model`.
    pub name: String,
    /// The round.
    pub round: u32,
    /// The planned number of rounds, when the workflow has one.
    pub total_rounds: Option<u32>,
    /// Metadata scalars, FLARE's meta keys among them.
    pub meta: Meta,
    /// The task's model, read from its file (`None` for `submit_model`).
    pub model: Option<Model>,
    /// The task's model file, readable until the result is sent.
    pub model_path: Option<PathBuf>,
    /// Whether the task's model is `FULL` or `DIFF`, when it says.
    pub params_type: Option<ParamsType>,
    /// Seconds spent reading the task's model file.
    pub load_seconds: f64,
}

impl Task {
    /// A `train` task.
    pub fn is_train(&self) -> bool {
        self.name == "train"
    }

    /// A `validate` task: answer with metrics only.
    pub fn is_validate(&self) -> bool {
        self.name == "validate"
    }

    /// A `submit_model` task: answer with the local model.
    pub fn is_submit_model(&self) -> bool {
        self.name == "submit_model"
    }
}

/// A task's answer: a model, metrics, meta.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskResult {
    /// The weights, or `None` for a result of metrics only (`validate`).
    pub model: Option<Model>,
    /// What `model` holds; `None` means `FULL`. A `FULL` model of a `train` task is sent as
    /// its difference from the task's model when the job's `params_transfer_type` is `DIFF`.
    pub params_type: Option<ParamsType>,
    /// Metrics: finite numbers.
    pub metrics: BTreeMap<String, f64>,
    /// Metadata scalars; [`NUM_STEPS_CURRENT_ROUND`] is the FedAvg weight.
    pub meta: Meta,
}

impl TaskResult {
    /// A result carrying `model` (`FULL`).
    pub fn with_model(model: Model) -> TaskResult {
        TaskResult {
            model: Some(model),
            ..TaskResult::default()
        }
    }

    /// A result of metrics only.
    pub fn metrics_only(metrics: BTreeMap<String, f64>) -> TaskResult {
        TaskResult {
            metrics,
            ..TaskResult::default()
        }
    }

    /// Adds a metric.
    pub fn metric(mut self, key: impl Into<String>, value: f64) -> TaskResult {
        self.metrics.insert(key.into(), value);
        self
    }

    /// Adds a meta scalar.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.meta.insert(key.into(), value.into());
        self
    }

    /// Sets [`NUM_STEPS_CURRENT_ROUND`], the result's FedAvg weight.
    pub fn num_steps(self, steps: u64) -> TaskResult {
        self.meta(NUM_STEPS_CURRENT_ROUND, steps)
    }
}

/// What the reader hands the calls.
#[derive(Debug)]
enum Incoming {
    Task(TaskMsg),
    Ack(u64),
    Rejected {
        task_id: u64,
        reason: String,
    },
    /// The session ended; [`Shared::end`] says how.
    Ended,
}

/// How the session ended.
#[derive(Debug, Clone)]
enum End {
    Shutdown(String),
    Abort(String),
    Node(String),
    Protocol(String),
    Lost(String),
}

impl End {
    fn error(&self) -> ClientError {
        match self {
            End::Shutdown(r) => ClientError::Stopped(format!("shutdown: {r}")),
            End::Abort(r) => ClientError::Stopped(format!("abort: {r}")),
            End::Node(r) => ClientError::Node(r.clone()),
            End::Protocol(r) => ClientError::Protocol(r.clone()),
            End::Lost(r) => ClientError::Lost(r.clone()),
        }
    }
}

/// The write side, with the log records not yet sent.
#[derive(Debug)]
struct Writer {
    stream: UnixStream,
    logs: Vec<LogRecord>,
    log_bytes: usize,
}

impl Writer {
    fn write(&mut self, msg: &ToNode) -> Result<(), FrameError> {
        proto::write_frame(&mut self.stream, msg, MAX_TO_NODE)
    }

    fn flush_logs(&mut self) -> Result<(), FrameError> {
        if self.logs.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(&mut self.logs);
        self.log_bytes = 0;
        self.write(&ToNode::Log { records })
    }
}

/// What the client's threads share.
#[derive(Debug)]
struct Shared {
    writer: Mutex<Writer>,
    end: Mutex<Option<End>>,
    /// Set when this side closes, so the reader does not take its own close for a lost node.
    closing: AtomicBool,
    end_group_on_loss: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn end(&self) -> Option<End> {
        lock(&self.end).clone()
    }

    /// Records how the session ended, keeping the first reason.
    fn set_end(&self, end: End) {
        lock(&self.end).get_or_insert(end);
    }

    /// The node is gone or gave up on this program: end the process group, as the protocol
    /// requires (or only record it, where `end_group_on_loss` is off).
    fn lost(&self, why: String) {
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        if self.end_group_on_loss {
            end_process_group(&why);
        }
        self.set_end(End::Lost(why));
    }
}

/// Writes a line to stderr, whatever becomes of it: the node that read it may be gone, and
/// `eprintln!` would panic on the broken pipe (before the group is ended, say).
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Ends this process group with SIGKILL (this process among them).
fn end_process_group(why: &str) {
    let group = rustix::process::getpgrp();
    say(&format!(
        "flare-client: {why}; ending process group {}",
        group.as_raw_pid()
    ));
    let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    // Not reached unless the signal could not be sent.
    std::process::exit(70);
}

/// A connection to the site's node, serving one training program.
///
/// ```no_run
/// use flare_client::{Client, TaskResult};
///
/// fn main() -> Result<(), flare_client::ClientError> {
///     let mut client = Client::from_env()?;
///     while let Some(task) = client.receive()? {
///         let result = match task.model.clone() {
///             Some(model) if task.is_train() => TaskResult::with_model(model).num_steps(1),
///             _ => TaskResult::default().metric("accuracy", 0.5),
///         };
///         client.log_scalar("loss", 0.1, Some(i64::from(task.round)))?;
///         client.send(task.id, result)?;
///     }
///     Ok(())
/// }
/// ```
#[derive(Debug)]
pub struct Client {
    shared: Arc<Shared>,
    accept: Accept,
    params_transfer_type: ParamsType,
    incoming: Receiver<Incoming>,
    state: TaskState,
    /// Dropped on close: the heartbeat and parent threads stop when their sender goes.
    stop: Option<Vec<SyncSender<()>>>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
enum TaskState {
    Idle {
        last_answered: Option<u64>,
    },
    Outstanding {
        id: u64,
        model_path: Option<PathBuf>,
    },
}

impl Client {
    /// Connects as the node's launch describes ([`Config::from_env`]).
    pub fn from_env() -> Result<Client, ClientError> {
        Client::connect(Config::from_env()?)
    }

    /// Connects, says hello, and waits for the node's `accept` (or `reject`).
    pub fn connect(config: Config) -> Result<Client, ClientError> {
        let connect_err = |source| ClientError::Connect {
            path: config.socket.clone(),
            source,
        };
        let mut stream = UnixStream::connect(&config.socket).map_err(connect_err)?;
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(connect_err)?;
        let hello = ToNode::Hello {
            protocol: PROTOCOL,
            token: config.token.clone(),
            pid: std::process::id(),
            rank: config.rank.clone(),
            client: Some(format!("flare-client-rust/{}", env!("CARGO_PKG_VERSION"))),
        };
        proto::write_frame(&mut stream, &hello, MAX_TO_NODE)?;
        let accept = match proto::read_frame::<_, ToProgram>(&mut stream, MAX_TO_PROGRAM)? {
            ToProgram::Accept(a) => a,
            ToProgram::Reject { reason } => return Err(ClientError::Rejected(reason)),
            other => {
                return Err(ClientError::Handshake(format!(
                    "{} instead of accept",
                    message_type(&other)
                )));
            }
        };
        if accept.protocol != PROTOCOL {
            return Err(ClientError::Handshake(format!(
                "protocol {}, this client speaks {PROTOCOL}",
                accept.protocol
            )));
        }
        let params_transfer_type =
            ParamsType::parse(&accept.params_transfer_type).ok_or_else(|| {
                ClientError::Handshake(format!(
                    "params_transfer_type {:?} is neither FULL nor DIFF",
                    accept.params_transfer_type
                ))
            })?;
        let interval = accept.heartbeat_interval;
        if !(interval.is_finite() && interval > 0.0) {
            return Err(ClientError::Handshake(format!(
                "heartbeat_interval {interval} is not a positive number of seconds"
            )));
        }
        if !Path::new(&accept.exchange_dir).is_absolute() {
            return Err(ClientError::Handshake(format!(
                "exchange_dir {:?} is not an absolute path",
                accept.exchange_dir
            )));
        }
        stream.set_read_timeout(None).map_err(connect_err)?;
        let reader = stream.try_clone().map_err(connect_err)?;

        let shared = Arc::new(Shared {
            writer: Mutex::new(Writer {
                stream,
                logs: Vec::new(),
                log_bytes: 0,
            }),
            end: Mutex::new(None),
            closing: AtomicBool::new(false),
            end_group_on_loss: config.end_group_on_loss,
        });
        let (incoming_tx, incoming) = mpsc::sync_channel(INCOMING_BOUND);
        let (stop, stop_rx) = mpsc::sync_channel::<()>(0);
        let spawn_err = |source| ClientError::Connect {
            path: config.socket.clone(),
            source,
        };
        let mut threads = Vec::new();
        let mut stops = vec![stop];
        {
            let shared = shared.clone();
            // Not joined: it ends when the socket closes, and close does not wait for it.
            std::thread::Builder::new()
                .name("flare-client-reader".into())
                .spawn(move || read_loop(reader, incoming_tx, &shared))
                .map_err(spawn_err)?;
        }
        {
            let shared = shared.clone();
            let interval = Duration::from_secs_f64(interval.clamp(0.01, 3600.0));
            threads.push(
                std::thread::Builder::new()
                    .name("flare-client-heartbeat".into())
                    .spawn(move || heartbeat_loop(&shared, interval, &stop_rx))
                    .map_err(spawn_err)?,
            );
        }
        if let (true, Some(node)) = (config.end_group_on_loss, config.parent_pid) {
            let initial_parent = std::os::unix::process::parent_id();
            let (parent_stop, parent_stop_rx) = mpsc::sync_channel::<()>(0);
            threads.push(
                std::thread::Builder::new()
                    .name("flare-client-parent".into())
                    .spawn(move || watch_parent(node, initial_parent, &parent_stop_rx))
                    .map_err(spawn_err)?,
            );
            stops.push(parent_stop);
        }
        Ok(Client {
            shared,
            accept,
            params_transfer_type,
            incoming,
            state: TaskState::Idle {
                last_answered: None,
            },
            stop: Some(stops),
            threads,
        })
    }

    /// The node's `accept`, as sent.
    pub fn accept(&self) -> &Accept {
        &self.accept
    }

    /// The job.
    pub fn job_id(&self) -> &str {
        &self.accept.job_id
    }

    /// The site.
    pub fn site_name(&self) -> &str {
        &self.accept.site_name
    }

    /// What results should carry: `FULL` weights or their `DIFF` from the task's.
    pub fn params_transfer_type(&self) -> ParamsType {
        self.params_transfer_type
    }

    /// `pytorch` or `numpy`: the form the job's other clients hand their users.
    pub fn params_format(&self) -> &str {
        &self.accept.params_format
    }

    /// Whether a `train` result should carry the metrics of the received model.
    pub fn train_with_evaluation(&self) -> bool {
        self.accept.train_with_evaluation
    }

    /// Where result files go.
    pub fn exchange_dir(&self) -> &Path {
        Path::new(&self.accept.exchange_dir)
    }

    /// Whether the node may still send tasks: false once it said `shutdown` or `abort`, or the
    /// connection ended.
    pub fn is_running(&self) -> bool {
        self.shared.end().is_none()
    }

    /// Waits for the next task; `None` once the node said `shutdown` or `abort`.
    pub fn receive(&mut self) -> Result<Option<Task>, ClientError> {
        match &self.state {
            TaskState::Outstanding { id, .. } => return Err(ClientError::TaskOutstanding(*id)),
            TaskState::Idle { .. } => {}
        }
        if let Some(End::Shutdown(_) | End::Abort(_)) = self.shared.end() {
            return Ok(None);
        }
        self.flush_logs()?;
        loop {
            let msg = match self.incoming.recv() {
                Ok(Incoming::Task(t)) => t,
                // A reply with no result outstanding: nothing waits for it.
                Ok(Incoming::Ack(_) | Incoming::Rejected { .. }) => continue,
                Ok(Incoming::Ended) | Err(_) => return self.ended_without_task(),
            };
            return self.take_task(msg).map(Some);
        }
    }

    fn ended_without_task(&self) -> Result<Option<Task>, ClientError> {
        match self.shared.end() {
            Some(End::Shutdown(_) | End::Abort(_)) => Ok(None),
            Some(end) => Err(end.error()),
            None => Err(ClientError::Lost("the reader stopped".into())),
        }
    }

    fn take_task(&mut self, msg: TaskMsg) -> Result<Task, ClientError> {
        let model_path = msg.model.as_ref().map(|m| PathBuf::from(&m.path));
        let params_type = msg
            .model
            .as_ref()
            .and_then(|m| m.params_type.as_deref())
            .and_then(ParamsType::parse);
        self.state = TaskState::Outstanding {
            id: msg.task_id,
            model_path: model_path.clone(),
        };
        let loading = std::time::Instant::now();
        let model = match model_path.as_deref().map(Model::load).transpose() {
            Ok(m) => m,
            Err(source) => {
                let reason = format!("cannot read the task's model: {source}");
                self.send_result(msg.task_id, failure(msg.task_id, reason))?;
                return Err(ClientError::TaskModel {
                    task_id: msg.task_id,
                    source,
                });
            }
        };
        Ok(Task {
            id: msg.task_id,
            name: msg.name,
            round: msg.round,
            total_rounds: msg.total_rounds,
            meta: msg.meta,
            model,
            model_path,
            params_type,
            load_seconds: loading.elapsed().as_secs_f64(),
        })
    }

    /// Checks that `task_id` is the task waiting for its result.
    fn outstanding(&self, task_id: u64) -> Result<Option<&Path>, ClientError> {
        match &self.state {
            TaskState::Outstanding { id, model_path } if *id == task_id => {
                Ok(model_path.as_deref())
            }
            TaskState::Outstanding { id, .. } => Err(ClientError::WrongTask {
                given: task_id,
                outstanding: *id,
            }),
            TaskState::Idle {
                last_answered: Some(last),
            } if *last == task_id => Err(ClientError::AlreadyAnswered(task_id)),
            TaskState::Idle { .. } => Err(ClientError::NoTask),
        }
    }

    /// Answers task `task_id`: writes the model (if any) into the exchange folder, sends the
    /// result, and waits for the node to take it. A node's `result_rejected` is
    /// [`ClientError::ResultRejected`]; the task is answered either way.
    pub fn send(&mut self, task_id: u64, result: TaskResult) -> Result<(), ClientError> {
        let task_model = self.outstanding(task_id)?.map(Path::to_path_buf);
        if let Some((key, value)) = result.metrics.iter().find(|(_, v)| !v.is_finite()) {
            return Err(ClientError::NonFiniteMetric {
                key: key.clone(),
                value: *value,
            });
        }
        if let Some(end) = self.shared.end() {
            return Err(end.error());
        }
        let mut params_type = None;
        let mut model_ref = None;
        if let Some(model) = result.model {
            let asked = result.params_type.unwrap_or(ParamsType::Full);
            let (model, sent) = match (asked, self.params_transfer_type, task_model) {
                (ParamsType::Full, ParamsType::Diff, Some(base)) => {
                    (model.diff(&Model::load(&base)?)?, ParamsType::Diff)
                }
                _ => (model, asked),
            };
            let path = self.write_result_file(task_id, &model)?;
            params_type = Some(sent.as_str().to_owned());
            model_ref = Some(ModelRef {
                path: path.to_string_lossy().into_owned(),
                params_type: None,
            });
        }
        let msg = ResultMsg {
            task_id,
            rc: RC_OK.into(),
            params_type,
            metrics: result.metrics,
            meta: result.meta,
            model: model_ref,
            reason: None,
        };
        self.send_result(task_id, msg)
    }

    /// Answers task `task_id` as failed (`EXECUTION_EXCEPTION`) with `reason`.
    pub fn send_failure(&mut self, task_id: u64, reason: &str) -> Result<(), ClientError> {
        self.outstanding(task_id)?;
        self.send_result(task_id, failure(task_id, reason.to_owned()))
    }

    fn write_result_file(&self, task_id: u64, model: &Model) -> Result<PathBuf, ClientError> {
        let dir = self.exchange_dir();
        let path = dir.join(format!("{task_id}.out.safetensors"));
        let partial = dir.join(format!(
            ".{task_id}.out.safetensors.{}.partial",
            std::process::id()
        ));
        if let Err(e) = model.save(&partial) {
            let _ = std::fs::remove_file(&partial);
            return Err(e.into());
        }
        std::fs::rename(&partial, &path).map_err(|source| {
            let _ = std::fs::remove_file(&partial);
            ClientError::ResultFile {
                path: path.clone(),
                source,
            }
        })?;
        Ok(path)
    }

    fn send_result(&mut self, task_id: u64, msg: ResultMsg) -> Result<(), ClientError> {
        {
            let mut w = lock(&self.shared.writer);
            w.flush_logs()?;
            w.write(&ToNode::Result(msg))?;
        }
        self.state = TaskState::Idle {
            last_answered: Some(task_id),
        };
        match self.incoming.recv() {
            Ok(Incoming::Ack(id)) if id == task_id => Ok(()),
            Ok(Incoming::Rejected {
                task_id: id,
                reason,
            }) if id == task_id => Err(ClientError::ResultRejected { task_id, reason }),
            Ok(Incoming::Ack(id) | Incoming::Rejected { task_id: id, .. }) => {
                Err(ClientError::Protocol(format!(
                    "an answer for task {id} while task {task_id} waits for one"
                )))
            }
            Ok(Incoming::Task(t)) => Err(ClientError::Protocol(format!(
                "task {} before the answer to task {task_id}'s result",
                t.task_id
            ))),
            Ok(Incoming::Ended) | Err(_) => Err(self.shared.end().map_or_else(
                || ClientError::Lost("the reader stopped".into()),
                |e| e.error(),
            )),
        }
    }

    /// Buffers log records; they go in batches (at most [`MAX_LOG_RECORDS`] a message), at the
    /// next heartbeat, [`Client::flush_logs`], `receive`, `send` or close, and always before a
    /// result that follows them.
    pub fn log(&mut self, records: impl IntoIterator<Item = LogRecord>) -> Result<(), ClientError> {
        let mut w = lock(&self.shared.writer);
        for record in records {
            let len = check_record(&record)?;
            if w.logs.len() >= MAX_LOG_RECORDS || w.log_bytes + len > LOG_FLUSH_BYTES {
                w.flush_logs()?;
            }
            w.logs.push(record);
            w.log_bytes += len + 1;
        }
        Ok(())
    }

    /// Buffers a `scalar` record.
    pub fn log_scalar(
        &mut self,
        key: &str,
        value: f64,
        step: Option<i64>,
    ) -> Result<(), ClientError> {
        self.log([LogRecord {
            key: key.into(),
            value: finite(key, value)?,
            step,
            kind: Some("scalar".into()),
        }])
    }

    /// Buffers a `scalars` record: several named numbers under one key.
    pub fn log_scalars(
        &mut self,
        key: &str,
        values: &BTreeMap<String, f64>,
        step: Option<i64>,
    ) -> Result<(), ClientError> {
        let value = values
            .iter()
            .map(|(k, v)| Ok((k.clone(), finite(&format!("{key}.{k}"), *v)?)))
            .collect::<Result<serde_json::Map<_, _>, ClientError>>()?;
        self.log([LogRecord {
            key: key.into(),
            value: serde_json::Value::Object(value),
            step,
            kind: Some("scalars".into()),
        }])
    }

    /// Buffers a `text` record.
    pub fn log_text(
        &mut self,
        key: &str,
        text: &str,
        step: Option<i64>,
    ) -> Result<(), ClientError> {
        self.log([LogRecord {
            key: key.into(),
            value: text.into(),
            step,
            kind: Some("text".into()),
        }])
    }

    /// Sends the buffered log records now.
    pub fn flush_logs(&mut self) -> Result<(), ClientError> {
        lock(&self.shared.writer).flush_logs()?;
        Ok(())
    }

    /// Sends the buffered log records and closes the connection.
    pub fn close(mut self) -> Result<(), ClientError> {
        let flushed = self.flush_logs();
        self.shutdown();
        flushed
    }

    fn shutdown(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        let _ = lock(&self.shared.writer)
            .stream
            .shutdown(std::net::Shutdown::Both);
        self.stop = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.stop.is_some() {
            let _ = self.flush_logs();
            self.shutdown();
        }
    }
}

fn failure(task_id: u64, reason: String) -> ResultMsg {
    ResultMsg {
        task_id,
        rc: RC_EXCEPTION.into(),
        params_type: None,
        metrics: BTreeMap::new(),
        meta: Meta::new(),
        model: None,
        reason: Some(reason),
    }
}

fn finite(key: &str, value: f64) -> Result<serde_json::Value, ClientError> {
    serde_json::Number::from_f64(value)
        .map(serde_json::Value::Number)
        .ok_or_else(|| ClientError::NonFiniteMetric {
            key: key.into(),
            value,
        })
}

/// Checks a record's kind against its value; its encoded length.
fn check_record(record: &LogRecord) -> Result<usize, ClientError> {
    let bad = |what: String| ClientError::BadLogRecord {
        key: record.key.clone(),
        what,
    };
    let kind = record.kind.as_deref().unwrap_or("scalar");
    let fits = match kind {
        "scalar" => record.value.is_number(),
        "scalars" => record
            .value
            .as_object()
            .is_some_and(|o| o.values().all(serde_json::Value::is_number)),
        "text" | "param" | "tag" => record.value.is_string(),
        other => return Err(bad(format!("unknown kind {other:?}"))),
    };
    if !fits {
        return Err(bad(format!("a {kind} record with value {}", record.value)));
    }
    let len = serde_json::to_vec(record)
        .map_err(|e| bad(e.to_string()))?
        .len();
    if len + LOG_FRAME_OVERHEAD > MAX_TO_NODE {
        return Err(bad(format!(
            "{len} bytes, a message holds at most {MAX_TO_NODE}"
        )));
    }
    Ok(len)
}

fn message_type(msg: &ToProgram) -> &'static str {
    match msg {
        ToProgram::Accept(_) => "accept",
        ToProgram::Reject { .. } => "reject",
        ToProgram::Task(_) => "task",
        ToProgram::ResultAck { .. } => "result_ack",
        ToProgram::ResultRejected { .. } => "result_rejected",
        ToProgram::Shutdown { .. } => "shutdown",
        ToProgram::Abort { .. } => "abort",
        ToProgram::Error { .. } => "error",
    }
}

/// Reads the node's frames until the connection ends.
fn read_loop(mut stream: UnixStream, tx: SyncSender<Incoming>, shared: &Shared) {
    loop {
        let msg = match proto::read_frame::<_, ToProgram>(&mut stream, MAX_TO_PROGRAM) {
            Ok(msg) => msg,
            Err(FrameError::Closed | FrameError::Io(_)) => {
                let why = match shared.end() {
                    Some(End::Shutdown(_) | End::Abort(_) | End::Protocol(_)) => None,
                    Some(End::Node(reason)) => Some(format!(
                        "the node closed the connection after an error: {reason}"
                    )),
                    Some(End::Lost(_)) | None => {
                        Some("the connection to the node closed".to_owned())
                    }
                };
                if let Some(why) = why {
                    shared.lost(why);
                }
                break;
            }
            Err(e @ (FrameError::TooLarge { .. } | FrameError::Malformed(_))) => {
                protocol_error(shared, &stream, e.to_string());
                break;
            }
        };
        let incoming = match msg {
            ToProgram::Task(t) => Incoming::Task(t),
            ToProgram::ResultAck { task_id } => Incoming::Ack(task_id),
            ToProgram::ResultRejected { task_id, reason } => Incoming::Rejected { task_id, reason },
            ToProgram::Shutdown { reason } => {
                shared.set_end(End::Shutdown(reason));
                Incoming::Ended
            }
            ToProgram::Abort { reason } => {
                shared.set_end(End::Abort(reason));
                Incoming::Ended
            }
            ToProgram::Error { reason } => {
                say(&format!(
                    "flare-client: the node reported an error: {reason}"
                ));
                shared.set_end(End::Node(reason));
                Incoming::Ended
            }
            other @ (ToProgram::Accept(_) | ToProgram::Reject { .. }) => {
                let what = format!("{} after the handshake", message_type(&other));
                protocol_error(shared, &stream, what);
                break;
            }
        };
        if tx.send(incoming).is_err() {
            // The client is gone.
            break;
        }
    }
}

/// The node sent what this protocol cannot read: the connection closes and calls fail with
/// the reason.
fn protocol_error(shared: &Shared, stream: &UnixStream, what: String) {
    say(&format!(
        "flare-client: the node broke the protocol: {what}"
    ));
    shared.set_end(End::Protocol(what));
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Sends a heartbeat every `interval` (buffered log records instead, when there are some).
fn heartbeat_loop(shared: &Shared, interval: Duration, stop: &Receiver<()>) {
    loop {
        match stop.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let mut w = lock(&shared.writer);
        let sent = if w.logs.is_empty() {
            w.write(&ToNode::Heartbeat)
        } else {
            w.flush_logs()
        };
        if sent.is_err() {
            // The reader sees the connection end and says why.
            return;
        }
    }
}

/// Ends the process group once the node (`node`) is gone or this process's parent changed
/// from `initial_parent` (the parent died and the process was reparented).
fn watch_parent(node: u32, initial_parent: u32, stop: &Receiver<()>) {
    let node = i32::try_from(node)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    loop {
        match stop.recv_timeout(PARENT_POLL) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let parent = std::os::unix::process::parent_id();
        if parent != initial_parent {
            end_process_group(&format!(
                "the parent process {initial_parent} is gone (the parent is now {parent})"
            ));
        }
        if let Some(node) = node {
            if rustix::process::test_kill_process(node) == Err(rustix::io::Errno::SRCH) {
                end_process_group(&format!("the node (pid {}) is gone", node.as_raw_pid()));
            }
        }
    }
}
