//! A mock node: the node's side of the Client API over a Unix socket in a temporary folder,
//! and the launch of `flare-test-trainer` as the node launches a program.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flare_client::proto::{
    self, Accept, MAX_TO_NODE, MAX_TO_PROGRAM, ModelRef, TaskMsg, ToNode, ToProgram,
};
use flare_client::{Model, TensorData};

pub const TOKEN: &str = "0123456789abcdef0123456789abcdef";
pub const JOB: &str = "job-7";
pub const SITE: &str = "site-1";

/// A listening node with its folders.
pub struct MockNode {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub exchange: PathBuf,
    pub app: PathBuf,
    listener: UnixListener,
}

impl MockNode {
    pub fn new() -> MockNode {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("node.sock");
        let exchange = dir.path().join("exchange");
        let app = dir.path().join("app");
        std::fs::create_dir(&exchange).unwrap();
        std::fs::create_dir(&app).unwrap();
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        MockNode {
            dir,
            socket,
            exchange,
            app,
            listener,
        }
    }

    /// The trainer's launch command: its own process group, the documented environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flare-test-trainer"));
        cmd.args(args);
        self.launch_env(&mut cmd);
        cmd.current_dir(&self.app)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    pub fn launch_env(&self, cmd: &mut Command) {
        cmd.env(proto::ENV_SOCKET, &self.socket)
            .env(proto::ENV_TOKEN, TOKEN)
            .env(proto::ENV_PARENT_PID, std::process::id().to_string())
            .env(proto::ENV_JOB_ID, JOB)
            .env(proto::ENV_SITE_NAME, SITE)
            .env("PYTHONUNBUFFERED", "1")
            .env_remove("RANK");
    }

    /// Starts the trainer with `args`.
    pub fn launch(&self, args: &[&str]) -> Trainer {
        Trainer::spawn(self.command(args))
    }

    /// Waits for the program to connect.
    pub fn connection(&self) -> Conn {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    return Conn { stream };
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the program did not connect");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    pub fn accept_msg(&self, params_transfer_type: &str) -> Accept {
        Accept {
            protocol: 1,
            job_id: JOB.into(),
            site_name: SITE.into(),
            heartbeat_interval: 0.2,
            params_transfer_type: params_transfer_type.into(),
            params_format: "pytorch".into(),
            train_with_evaluation: true,
            exchange_dir: self.exchange.to_string_lossy().into_owned(),
        }
    }

    /// Writes `model` as task `id`'s file and returns the task message.
    pub fn task(&self, id: u64, name: &str, round: u32, model: Option<&Model>) -> ToProgram {
        let model = model.map(|m| {
            let path = self.exchange.join(format!("{id}.in.safetensors"));
            m.save(&path).unwrap();
            ModelRef {
                path: path.to_string_lossy().into_owned(),
                params_type: Some("FULL".into()),
            }
        });
        ToProgram::Task(TaskMsg {
            task_id: id,
            name: name.into(),
            round,
            total_rounds: Some(3),
            meta: BTreeMap::new(),
            model,
        })
    }

    /// The files in the exchange folder, names sorted.
    pub fn exchange_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.exchange)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

/// One accepted connection, from the node's side.
pub struct Conn {
    pub stream: UnixStream,
}

impl Conn {
    /// The next message, heartbeats included.
    pub fn read_any(&mut self) -> ToNode {
        proto::read_frame(&mut self.stream, MAX_TO_NODE).unwrap()
    }

    /// The next message that is not a heartbeat.
    pub fn read(&mut self) -> ToNode {
        loop {
            match self.read_any() {
                ToNode::Heartbeat => {}
                msg => return msg,
            }
        }
    }

    /// The next result, skipping heartbeats and log records.
    pub fn result(&mut self) -> proto::ResultMsg {
        loop {
            match self.read() {
                ToNode::Log { .. } => {}
                msg => return result(msg),
            }
        }
    }

    pub fn send(&mut self, msg: &ToProgram) {
        proto::write_frame(&mut self.stream, msg, MAX_TO_PROGRAM).unwrap();
    }

    /// Reads the hello and answers `accept`; the hello.
    pub fn handshake(&mut self, accept: Accept) -> ToNode {
        let hello = self.read_any();
        self.send(&ToProgram::Accept(accept));
        hello
    }
}

/// A launched trainer; its group is killed when dropped.
pub struct Trainer {
    pub child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Trainer {
    pub fn spawn(mut cmd: Command) -> Trainer {
        let mut child = cmd.spawn().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Trainer { child, stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `limit` for the exit.
    pub fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader take the last of stderr.
                std::thread::sleep(Duration::from_millis(50));
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the exit, failing the test after 10 s.
    pub fn exit(&mut self) -> ExitStatus {
        self.wait_for(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("the trainer did not exit; stderr:\n{}", self.stderr()))
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Trainer {
    fn drop(&mut self) {
        if let Some(group) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = self.child.wait();
    }
}

/// Whether process `pid` is gone: reaped if it was a zombie of this process (a child, or an
/// orphan handed to this process as subreaper), then probed with `kill(pid, 0)`.
pub fn gone(pid: u32) -> bool {
    let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
        return true;
    };
    let _ = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG);
    rustix::process::test_kill_process(p) == Err(rustix::io::Errno::SRCH)
}

/// Waits up to `limit` for every pid to be gone.
pub fn all_gone_within(pids: &[u32], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if pids.iter().all(|p| gone(*p)) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a pid file with at least `count` pids, waiting for it.
pub fn pids(path: &Path, count: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            let pids: Vec<u32> = text.lines().map(|l| l.parse().unwrap()).collect();
            if pids.len() >= count {
                return pids;
            }
        }
        assert!(Instant::now() < deadline, "no pid file with {count} pids");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A model of every dtype Flare holds, values exact in BF16.
pub fn sample_model() -> Model {
    let mut m = Model::default();
    m.tensors.insert(
        "a.weight".into(),
        TensorData::from_f32(vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
    );
    m.tensors.insert(
        "b.bias".into(),
        TensorData::from_f32_as("BF16", vec![4], &[0.5, -1.0, 2.0, 8.0]).unwrap(),
    );
    m.tensors
        .insert("c.steps".into(), TensorData::from_i64(vec![2], &[3, -9]));
    m
}

pub fn result(msg: ToNode) -> proto::ResultMsg {
    match msg {
        ToNode::Result(r) => r,
        other => panic!("not a result: {other:?}"),
    }
}
