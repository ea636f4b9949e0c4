//! The `ScriptExecutor` (FLARE's `ClientAPILauncherExecutor`): a [`Learner`] that runs the
//! user's own program and talks to it over the Client API (`docs/client-api.md`).
//!
//! - [`process`] starts the program in a process group of its own, logs its output and stops
//!   the whole group; [`session`] is the socket, the handshake and the reader thread.
//! - A task's model goes to the program as a safetensors file written from the copy the node
//!   holds anyway; the result file is read tensor by tensor into the one copy an in-process
//!   learner would have made, then removed.
//! - Every way the program can fail ends the task at once with a reason: an exit (the code or
//!   signal and its last stderr lines), silence past `heartbeat_timeout`, a task past
//!   `task_timeout` (the group gets SIGTERM, then SIGKILL after `stop_grace_period`), a
//!   malformed message, a result that does not fit the task. After a crash or a timeout the
//!   program is not started again for the job: later tasks fail with the same reason.
//! - An [`AbortHandle`] (the job was aborted) interrupts a running task; dropping the learner
//!   tells the program to shut down and stops its group on a thread of its own.

pub mod process;
pub mod session;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flare_client::proto::{Accept, ModelRef, ResultMsg, TaskMsg, ToProgram};
use flare_protocols::model::{FLModel, MetaValue, ParamsType};
use flare_protocols::shareable::{
    HEADER_TOTAL_ROUNDS, ReturnCode, Shareable, Task, TaskId, TaskResult, task_names,
};
use serde::Deserialize;

use super::{AbortHandle, Learner, LearnerError};
use process::Program;
use session::{Connection, Endpoint, Event};

/// Arguments of the `ScriptExecutor` (durations in seconds).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptArgs {
    /// The program and its arguments (no shell), run in the app folder.
    pub command: Vec<String>,
    /// One process for the whole job (true) or one per task.
    #[serde(default = "yes")]
    pub launch_once: bool,
    /// What results carry: `FULL` weights or `DIFF`s.
    #[serde(default)]
    pub params_transfer_type: TransferType,
    /// What the client library hands the program: `pytorch` or `numpy`.
    #[serde(default = "pytorch", alias = "params_exchange_format")]
    pub params_format: String,
    /// Whether train results carry the received model's metrics (FLARE's flag, passed on).
    #[serde(default = "yes")]
    pub train_with_evaluation: bool,
    /// Longest a task may take.
    #[serde(default = "task_timeout")]
    pub task_timeout: f64,
    /// Longest the program may be silent.
    #[serde(default = "heartbeat_timeout")]
    pub heartbeat_timeout: f64,
    /// How often the program sends a heartbeat.
    #[serde(default = "heartbeat_interval")]
    pub heartbeat_interval: f64,
    /// Longest the program may take to connect.
    #[serde(default = "launch_timeout", alias = "external_pre_init_timeout")]
    pub launch_timeout: f64,
    /// How long the program has to exit once told to, and again after SIGTERM.
    #[serde(default = "grace", alias = "shutdown_timeout")]
    pub stop_grace_period: f64,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// `FULL` or `DIFF`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TransferType {
    /// Complete weights.
    #[default]
    Full,
    /// Trained minus received weights.
    Diff,
}

impl TransferType {
    fn wire(self) -> &'static str {
        match self {
            TransferType::Full => "FULL",
            TransferType::Diff => "DIFF",
        }
    }
}

fn yes() -> bool {
    true
}
fn pytorch() -> String {
    "pytorch".into()
}
fn task_timeout() -> f64 {
    3600.0
}
fn heartbeat_timeout() -> f64 {
    30.0
}
fn heartbeat_interval() -> f64 {
    5.0
}
fn launch_timeout() -> f64 {
    300.0
}
fn grace() -> f64 {
    10.0
}

impl ScriptArgs {
    /// Checks the values serde cannot: `(key, reason)` of the first bad one.
    pub fn check(&self) -> Result<(), (String, String)> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(("command".into(), "names no program".into()));
        }
        for (key, v) in [
            ("task_timeout", self.task_timeout),
            ("heartbeat_timeout", self.heartbeat_timeout),
            ("heartbeat_interval", self.heartbeat_interval),
            ("launch_timeout", self.launch_timeout),
        ] {
            if !(v.is_finite() && v > 0.0 && v < 1e9) {
                return Err((
                    key.into(),
                    format!("{v} is not a positive number of seconds"),
                ));
            }
        }
        if !(self.stop_grace_period.is_finite() && (0.0..1e6).contains(&self.stop_grace_period)) {
            return Err((
                "stop_grace_period".into(),
                format!("{} is not a number of seconds", self.stop_grace_period),
            ));
        }
        if self.heartbeat_interval >= self.heartbeat_timeout {
            return Err((
                "heartbeat_interval".into(),
                format!(
                    "{} s is not shorter than heartbeat_timeout ({} s)",
                    self.heartbeat_interval, self.heartbeat_timeout
                ),
            ));
        }
        if !matches!(self.params_format.as_str(), "pytorch" | "numpy") {
            return Err((
                "params_format".into(),
                format!("{:?}: pytorch or numpy", self.params_format),
            ));
        }
        if let Some(k) = self.env.keys().find(|k| k.starts_with("FLARE_CLIENT_")) {
            return Err((
                format!("env.{k}"),
                "FLARE_CLIENT_* variables are the node's".into(),
            ));
        }
        Ok(())
    }
}

/// Where one site's program runs.
#[derive(Debug, Clone)]
pub struct ScriptSite {
    /// The app folder: the program's working directory.
    pub app_dir: PathBuf,
    /// A folder of this site for the job: the socket and exchange files go under it.
    pub work_dir: PathBuf,
    /// The job.
    pub job_id: String,
    /// The site.
    pub site_name: String,
    /// The task names the executor serves.
    pub tasks: Vec<String>,
    /// Where the program's `log` records go ([`crate::tracking`]).
    pub tracker: crate::tracking::Tracker,
    /// The GPUs the site reserved for the job, given to the program as
    /// `CUDA_VISIBLE_DEVICES` (over the job's own `env`); `None` leaves it alone.
    pub gpus: Option<Vec<u32>>,
}

/// A launched program and its connection.
#[derive(Debug)]
struct Running {
    program: Program,
    endpoint: Endpoint,
    conn: Option<Connection>,
}

/// The learner that runs the user's program.
#[derive(Debug)]
pub struct ScriptLearner {
    args: ScriptArgs,
    site: ScriptSite,
    exchange: PathBuf,
    running: Option<Running>,
    /// The program between tasks, where an abort finds it.
    idle: Arc<Mutex<Option<Running>>>,
    /// Why the program is not started again (it crashed or hung).
    failed: Option<String>,
    abort: AbortHandle,
    seq: u64,
    timings: Handoff,
}

/// Where the last task's time went, at the node (for `bench client-api`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Handoff {
    /// Writing the task's model file.
    pub write_s: f64,
    /// From the task message to the result message (the program's whole part).
    pub program_s: f64,
    /// Reading the result's model file.
    pub read_s: f64,
}

type Failure = (ReturnCode, String);

fn secs(v: f64) -> Duration {
    Duration::from_secs_f64(v)
}

impl ScriptLearner {
    /// A learner for `site`; the program starts with the first task.
    pub fn new(args: ScriptArgs, site: ScriptSite) -> ScriptLearner {
        let exchange = site.work_dir.join("client_api").join("exchange");
        let idle: Arc<Mutex<Option<Running>>> = Arc::default();
        // Stopped at this site while between tasks (the job ended or was aborted): nothing is
        // lost, so the program is told to shut down.
        let (i, grace, job) = (
            Arc::clone(&idle),
            secs(args.stop_grace_period),
            site.job_id.clone(),
        );
        let abort = AbortHandle::with_hook(Arc::new(move || {
            if let Some(r) = i.lock().ok().and_then(|mut g| g.take()) {
                shut_down(r, "the job is over at this site", false, grace, &job);
            }
        }));
        ScriptLearner {
            args,
            site,
            exchange,
            running: None,
            idle,
            failed: None,
            abort,
            seq: 0,
            timings: Handoff::default(),
        }
    }

    /// Where the last task's time went.
    pub fn handoff(&self) -> Handoff {
        self.timings
    }

    fn token() -> Result<String, Failure> {
        use ring::rand::{SecureRandom, SystemRandom};
        let mut t = [0u8; 16];
        SystemRandom::new().fill(&mut t).map_err(|_| {
            (
                ReturnCode::ExecutionException,
                "no randomness for the launch token".to_string(),
            )
        })?;
        Ok(hex::encode(t))
    }

    /// Starts the program if it does not run.
    fn launch(&mut self) -> Result<(), Failure> {
        if let Some(r) = &mut self.running {
            if r.program.exited().is_none() {
                return Ok(());
            }
            self.running = None;
        }
        let fail = |what: &str, e: std::io::Error| {
            (ReturnCode::ExecutionException, format!("{what}: {e}"))
        };
        std::fs::create_dir_all(&self.exchange)
            .map_err(|e| fail(&format!("cannot make {}", self.exchange.display()), e))?;
        let token = Self::token()?;
        let endpoint = Endpoint::bind(&self.site.work_dir.join("client_api"), &token)
            .map_err(|e| fail("cannot open the Client API socket", e))?;
        let mut env = self.args.env.clone();
        env.extend([
            (
                flare_client::proto::ENV_SOCKET.to_string(),
                endpoint.socket.display().to_string(),
            ),
            (flare_client::proto::ENV_TOKEN.to_string(), token.clone()),
            (
                flare_client::proto::ENV_PARENT_PID.to_string(),
                std::process::id().to_string(),
            ),
            (
                flare_client::proto::ENV_JOB_ID.to_string(),
                self.site.job_id.clone(),
            ),
            (
                flare_client::proto::ENV_SITE_NAME.to_string(),
                self.site.site_name.clone(),
            ),
            ("PYTHONUNBUFFERED".to_string(), "1".to_string()),
        ]);
        if let Some(gpus) = &self.site.gpus {
            env.insert(
                "CUDA_VISIBLE_DEVICES".to_string(),
                crate::roles::resources::cuda_visible_devices(gpus),
            );
        }
        let program = Program::spawn(
            &self.args.command,
            &self.site.app_dir,
            &env,
            &self.site.job_id,
        )
        .map_err(|e| fail(&format!("in {}", self.site.app_dir.display()), e))?;
        tracing::info!(job = %self.site.job_id, site = %self.site.site_name, pid = program.pid(), command = ?self.args.command, "program started");
        let mut running = Running {
            program,
            endpoint,
            conn: None,
        };
        let deadline = Instant::now() + secs(self.args.launch_timeout);
        let accept = Accept {
            protocol: flare_client::proto::PROTOCOL,
            job_id: self.site.job_id.clone(),
            site_name: self.site.site_name.clone(),
            heartbeat_interval: self.args.heartbeat_interval,
            params_transfer_type: self.args.params_transfer_type.wire().into(),
            params_format: self.args.params_format.clone(),
            train_with_evaluation: self.args.train_with_evaluation,
            exchange_dir: self.exchange.display().to_string(),
        };
        loop {
            if let Some(status) = running.program.exited() {
                let report = running.program.exit_report(status);
                return Err(self.give_up(running, format!("{report} (before it connected)")));
            }
            if self.abort.is_aborted() {
                running.program.stop(secs(self.args.stop_grace_period));
                return Err((ReturnCode::TaskAborted, "the job was aborted".into()));
            }
            match running.endpoint.try_accept() {
                Ok(Some(stream)) => {
                    match Connection::handshake(
                        stream,
                        &token,
                        accept.clone(),
                        &self.site.job_id,
                        self.site.tracker.clone(),
                    ) {
                        Ok(c) => {
                            running.conn = Some(c);
                            self.running = Some(running);
                            return Ok(());
                        }
                        // Another connection (a stray process with the wrong token) does
                        // not end the launch.
                        Err(e) => {
                            tracing::warn!(job = %self.site.job_id, error = %e, "Client API connection refused")
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => return Err(self.give_up(running, format!("the Client API socket: {e}"))),
            }
            if Instant::now() >= deadline {
                let why = format!(
                    "the program did not connect within launch_timeout ({} s)",
                    self.args.launch_timeout
                );
                return Err(self.give_up(running, why));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the program for good and remembers why.
    fn give_up(&mut self, mut running: Running, why: String) -> Failure {
        if let Some(c) = &running.conn {
            c.close();
        }
        running.program.stop(secs(self.args.stop_grace_period));
        self.failed = Some(why.clone());
        (ReturnCode::ExecutionException, why)
    }

    fn task_message(&self, task: &Task, model: Option<&Path>) -> TaskMsg {
        let mut meta = BTreeMap::new();
        for (k, v) in &task.data.headers {
            meta.insert(k.clone(), meta_to_json(v));
        }
        meta.insert("job_id".into(), self.site.job_id.clone().into());
        meta.insert("site_name".into(), self.site.site_name.clone().into());
        let total_rounds = match task.data.headers.get(HEADER_TOTAL_ROUNDS) {
            Some(MetaValue::Int(n)) => u32::try_from(*n).ok(),
            _ => task.data.model.as_ref().and_then(|m| m.total_rounds),
        };
        let params_type = task.data.model.as_ref().map(|m| match m.params_type {
            ParamsType::Full => "FULL",
            ParamsType::Diff => "DIFF",
        });
        TaskMsg {
            task_id: task.id.0,
            name: task.name.clone(),
            round: task.round,
            total_rounds,
            meta,
            model: model.map(|p| ModelRef {
                path: p.display().to_string(),
                params_type: params_type.map(str::to_string),
            }),
        }
    }

    fn run(&mut self, task: &Task) -> Result<FLModel, Failure> {
        if !self.site.tasks.iter().any(|t| t == &task.name) {
            return Err((
                ReturnCode::TaskUnknown,
                format!(
                    "the ScriptExecutor of this job does not serve task {:?}",
                    task.name
                ),
            ));
        }
        if self.abort.is_aborted() {
            return Err((ReturnCode::TaskAborted, "the job was aborted".into()));
        }
        if let Some(why) = &self.failed {
            return Err((
                ReturnCode::ExecutionException,
                format!("the program is not running: {why}"),
            ));
        }
        self.running = self.idle.lock().ok().and_then(|mut g| g.take());
        let out = self.run_launched(task);
        if let Some(r) = self.running.take() {
            match self.idle.lock() {
                Ok(mut g) if !self.abort.is_aborted() => *g = Some(r),
                _ => self.shut_down(r, "the job is over at this site", false),
            }
        }
        out
    }

    fn run_launched(&mut self, task: &Task) -> Result<FLModel, Failure> {
        self.launch()?;
        self.seq += 1;
        self.timings = Handoff::default();
        let t0 = Instant::now();
        let input = match task.data.model.as_deref() {
            Some(m) => {
                let p = self
                    .exchange
                    .join(format!("task-{}.in.safetensors", self.seq));
                crate::model_io::write(&p, m).map_err(|e| {
                    (
                        ReturnCode::ExecutionException,
                        format!("cannot write the task's model: {e}"),
                    )
                })?;
                Some(p)
            }
            None => None,
        };
        self.timings.write_s = t0.elapsed().as_secs_f64();
        let out = self.exchange_task(task, input.as_deref());
        if let Some(p) = &input {
            let _ = std::fs::remove_file(p);
        }
        if !self.args.launch_once
            && let Some(r) = self.running.take()
        {
            self.shut_down(r, "the task is done (launch_once is false)", false);
        }
        out
    }

    fn exchange_task(&mut self, task: &Task, input: Option<&Path>) -> Result<FLModel, Failure> {
        let msg = self.task_message(task, input);
        let grace = secs(self.args.stop_grace_period);
        let Some(mut running) = self.running.take() else {
            return Err((
                ReturnCode::ExecutionException,
                "the program is not running".into(),
            ));
        };
        let Some(conn) = running.conn.as_ref() else {
            return Err(self.give_up(running, "the program is not connected".into()));
        };
        if let Err(e) = conn.send(&ToProgram::Task(msg)) {
            return Err(self.give_up(running, e));
        }
        let started = Instant::now();
        let task_timeout = secs(self.args.task_timeout);
        let heartbeat_timeout = secs(self.args.heartbeat_timeout);
        loop {
            let Some(conn) = running.conn.as_ref() else {
                return Err(self.give_up(running, "the program is not connected".into()));
            };
            match conn.events.recv_timeout(Duration::from_millis(50)) {
                Ok(Event::Result(r)) if r.task_id != task.id.0 => {
                    let reason = format!(
                        "a result for task {}, but task {} is outstanding",
                        r.task_id, task.id.0
                    );
                    let _ = conn.send(&ToProgram::ResultRejected {
                        task_id: r.task_id,
                        reason: reason.clone(),
                    });
                    self.running = Some(running);
                    return Err((ReturnCode::ValidationError, reason));
                }
                Ok(Event::Result(r)) => {
                    self.timings.program_s = started.elapsed().as_secs_f64();
                    let t = Instant::now();
                    let taken = self.take_result(task, r);
                    self.timings.read_s = t.elapsed().as_secs_f64();
                    let reply = match &taken {
                        Ok(_) | Err((ReturnCode::ExecutionException, _)) => {
                            ToProgram::ResultAck { task_id: task.id.0 }
                        }
                        Err((_, reason)) => ToProgram::ResultRejected {
                            task_id: task.id.0,
                            reason: reason.clone(),
                        },
                    };
                    let _ = conn.send(&reply);
                    self.running = Some(running);
                    return taken;
                }
                Ok(Event::Malformed(why)) => {
                    let _ = conn.send(&ToProgram::Error {
                        reason: why.clone(),
                    });
                    return Err(self.give_up(
                        running,
                        format!("the program sent a malformed message: {why}"),
                    ));
                }
                Ok(Event::Closed) | Err(RecvTimeoutError::Disconnected) => {
                    // It is going away: report how it ended.
                    let why = match running.program.wait_exit(Duration::from_secs(1)) {
                        Some(status) => running.program.exit_report(status),
                        None => "the program closed its Client API connection".to_string(),
                    };
                    return Err(
                        self.give_up(running, format!("{why} (during task {:?})", task.name))
                    );
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if let Some(status) = running.program.exited() {
                let report = running.program.exit_report(status);
                return Err(
                    self.give_up(running, format!("{report} (during task {:?})", task.name))
                );
            }
            if self.abort.is_aborted() {
                self.shut_down(running, "the job was aborted", true);
                return Err((ReturnCode::TaskAborted, "the job was aborted".into()));
            }
            if started.elapsed() >= task_timeout {
                let why = format!(
                    "task {:?} timed out: no result within task_timeout ({} s); the program's group was stopped (SIGTERM, then SIGKILL after {} s)",
                    task.name, self.args.task_timeout, self.args.stop_grace_period
                );
                running.program.stop(grace);
                self.failed = Some(why.clone());
                return Err((ReturnCode::TaskTimeout, why));
            }
            let silent = running
                .conn
                .as_ref()
                .map_or(Duration::ZERO, Connection::silent_for);
            if silent >= heartbeat_timeout {
                let why = format!(
                    "task {:?} timed out: the program sent nothing for {:.0} s (heartbeat_timeout {} s); its group was stopped",
                    task.name,
                    silent.as_secs_f64(),
                    self.args.heartbeat_timeout
                );
                running.program.stop(grace);
                self.failed = Some(why.clone());
                return Err((ReturnCode::TaskTimeout, why));
            }
        }
    }

    /// Checks a result and builds its model. A failure the program reported is
    /// `ExecutionException` (acknowledged); anything the node refuses is `ValidationError`.
    fn take_result(&self, task: &Task, r: ResultMsg) -> Result<FLModel, Failure> {
        let refuse = |reason: String| (ReturnCode::ValidationError, reason);
        let file = match &r.model {
            Some(m) => Some(self.exchange_file(&m.path).map_err(refuse)?),
            None => None,
        };
        let out = self.build_result(task, r, file.as_deref());
        if let Some(f) = &file {
            let _ = std::fs::remove_file(f);
        }
        out
    }

    fn build_result(
        &self,
        task: &Task,
        r: ResultMsg,
        file: Option<&Path>,
    ) -> Result<FLModel, Failure> {
        let refuse = |reason: String| (ReturnCode::ValidationError, reason);
        if r.rc != flare_client::proto::RC_OK {
            return Err((
                ReturnCode::ExecutionException,
                format!(
                    "the program reported {}: {}",
                    r.rc,
                    r.reason.as_deref().unwrap_or("no reason given")
                ),
            ));
        }
        let params_type = match r
            .params_type
            .as_deref()
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            None | Some("FULL") => ParamsType::Full,
            Some("DIFF") => ParamsType::Diff,
            Some(other) => return Err(refuse(format!("params_type {other:?}: FULL or DIFF"))),
        };
        if let Some((k, v)) = r.metrics.iter().find(|(_, v)| !v.is_finite()) {
            return Err(refuse(format!("metric {k:?} is not finite ({v})")));
        }
        let mut meta = BTreeMap::new();
        for (k, v) in r.meta {
            let value = json_to_meta(&v).ok_or_else(|| {
                refuse(format!(
                    "meta {k:?}: {v} is not a number, string or boolean"
                ))
            })?;
            meta.insert(k, value);
        }
        let params = match (file, task.name.as_str()) {
            (None, task_names::VALIDATE) => BTreeMap::new(),
            // A validation's weights are not used.
            (Some(_), task_names::VALIDATE) => BTreeMap::new(),
            (None, name) => {
                return Err(refuse(format!(
                    "the result of task {name:?} carries no model"
                )));
            }
            (Some(f), _) => {
                crate::model_io::read_streaming(f).map_err(|e| refuse(e.to_string()))?
            }
        };
        let model = FLModel {
            params,
            params_type,
            metrics: r.metrics,
            meta,
            current_round: Some(task.round),
            total_rounds: None,
        };
        if task.name == task_names::TRAIN
            && let Some(global) = task.data.model.as_deref()
        {
            global
                .check_compatible(&model)
                .map_err(|e| refuse(format!("the result's model does not fit the task's: {e}")))?;
        }
        Ok(model)
    }

    /// The result file `path`, which must lie in the exchange folder.
    fn exchange_file(&self, path: &str) -> Result<PathBuf, String> {
        let p = PathBuf::from(path);
        let dir = std::fs::canonicalize(&self.exchange)
            .map_err(|e| format!("{}: {e}", self.exchange.display()))?;
        let real = std::fs::canonicalize(&p)
            .map_err(|e| format!("the result's model file {path}: {e}"))?;
        if real.parent() != Some(dir.as_path()) {
            return Err(format!(
                "the result's model file {path} is not in the exchange folder {}",
                self.exchange.display()
            ));
        }
        Ok(real)
    }

    /// Tells the program to stop (shutdown or abort) and stops its group on a thread of its
    /// own: first `stop_grace_period` to exit, then SIGTERM, then SIGKILL.
    fn shut_down(&self, running: Running, reason: &str, abort: bool) {
        shut_down(
            running,
            reason,
            abort,
            secs(self.args.stop_grace_period),
            &self.site.job_id,
        );
    }

    fn into_result(task: &Task, out: Result<FLModel, Failure>) -> TaskResult {
        TaskResult {
            task_id: TaskId(task.id.0),
            round: task.round,
            data: match out {
                Ok(m) => Shareable::with_model(Arc::new(m)),
                Err((code, reason)) => Shareable::error(code, reason),
            },
        }
    }

    fn one(&mut self, name: &str, model: &FLModel, round: u32) -> Result<FLModel, LearnerError> {
        let task = Task {
            id: TaskId(self.seq),
            name: name.into(),
            round,
            data: Shareable::with_model(Arc::new(model.clone())),
        };
        self.run(&task)
            .map_err(|(_, why)| LearnerError::Backend(why))
    }
}

impl Learner for ScriptLearner {
    fn train(&mut self, global: &FLModel, round: u32) -> Result<FLModel, LearnerError> {
        self.one(task_names::TRAIN, global, round)
    }

    fn validate(&mut self, model: &FLModel) -> Result<BTreeMap<String, f64>, LearnerError> {
        Ok(self.one(task_names::VALIDATE, model, 0)?.metrics)
    }

    fn execute_task(&mut self, task: Task) -> TaskResult {
        let out = self.run(&task);
        if let Err((code, why)) = &out {
            tracing::warn!(job = %self.site.job_id, site = %self.site.site_name, task = %task.name, ?code, "task failed: {why}");
        }
        Self::into_result(&task, out)
    }

    fn abort_handle(&self) -> Option<AbortHandle> {
        Some(self.abort.clone())
    }
}

impl Drop for ScriptLearner {
    fn drop(&mut self) {
        let idle = self.idle.lock().ok().and_then(|mut g| g.take());
        if let Some(r) = self.running.take().or(idle) {
            self.shut_down(r, "the job is over at this site", false);
        }
    }
}

/// Tells the program to stop (shutdown or abort) and stops its group on a thread of its own:
/// first `grace` to exit, then SIGTERM, then SIGKILL after `grace` again.
fn shut_down(mut running: Running, reason: &str, abort: bool, grace: Duration, job: &str) {
    if let Some(c) = &running.conn {
        let msg = if abort {
            ToProgram::Abort {
                reason: reason.into(),
            }
        } else {
            ToProgram::Shutdown {
                reason: reason.into(),
            }
        };
        let _ = c.send(&msg);
    }
    let job = job.to_string();
    std::thread::spawn(move || {
        if running.program.wait_exit(grace).is_none() {
            tracing::info!(%job, pid = running.program.pid(), "the program did not exit when told; stopping its group");
        }
        running.program.stop(grace);
    });
}

fn meta_to_json(v: &MetaValue) -> serde_json::Value {
    match v {
        MetaValue::Bool(b) => (*b).into(),
        MetaValue::Int(i) => (*i).into(),
        MetaValue::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into)
        }
        MetaValue::Text(s) => s.clone().into(),
    }
}

fn json_to_meta(v: &serde_json::Value) -> Option<MetaValue> {
    Some(match v {
        serde_json::Value::Bool(b) => MetaValue::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => MetaValue::Int(i),
            None => MetaValue::Float(n.as_f64().filter(|f| f.is_finite())?),
        },
        serde_json::Value::String(s) => MetaValue::Text(s.clone()),
        _ => return None,
    })
}
