//! A training program for tests of the node's `ScriptExecutor`: a deterministic "training"
//! (add a constant to every float weight) and the faults a real program can have (crashes,
//! hangs, silence, bad messages, bad results), chosen with `--mode`.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use flare_client::proto::{
    self, Accept, LogRecord, MAX_TO_NODE, MAX_TO_PROGRAM, ModelRef, PROTOCOL, RC_OK, ResultMsg,
    TaskMsg, ToNode, ToProgram,
};
use flare_client::{Client, ClientError, Config, Model, ParamsType, Task, TaskResult};

/// Exit code of every failure the trainer reports itself.
const FAILED: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Add `--delta` to every float weight of each `train` task's model.
    Add,
    /// Print a line to stderr and exit 3 without connecting.
    ExitBeforeConnect,
    /// Receive the first task, print "trainer failed: boom" (and more) to stderr, exit 3.
    Crash,
    /// Receive the first task and panic.
    Panic,
    /// Receive the first task, start a child `sleep 600` in the same group, never answer
    /// (heartbeats go on).
    Hang,
    /// Receive the first task, then neither answer nor heartbeat.
    Silent,
    /// Print `--spam-bytes` to stdout during each task, then train as `add`.
    SpamStdout,
    /// Receive the first task and send a frame of invalid JSON.
    Malformed,
    /// Answer `train` tasks with a model whose first tensor has another shape.
    WrongShape,
    /// Answer the first task with a result file outside the exchange folder.
    OutsideFile,
    /// Train as `add`, but exit 3 on receiving the task of round `--round`.
    CrashAtRound,
    /// Train as `add`, sleeping `--sleep` seconds in each task before answering.
    Slow,
}

/// A training program for the node's process tests.
#[derive(Debug, Parser)]
#[command(name = "flare-test-trainer")]
struct Args {
    /// What to do (faults for the node's tests, or `add`).
    #[arg(long, value_enum, default_value = "add")]
    mode: Mode,
    /// What `train` adds to every float weight.
    #[arg(long, default_value_t = 0.5)]
    delta: f32,
    /// The result's NUM_STEPS_CURRENT_ROUND (its FedAvg weight).
    #[arg(long, default_value_t = 10)]
    steps: u64,
    /// `crash-at-round`: the round whose task ends the program.
    #[arg(long, default_value_t = 1)]
    round: u32,
    /// `slow`: seconds to sleep in each task.
    #[arg(long, default_value_t = 1.0)]
    sleep: f64,
    /// `spam-stdout`: bytes printed to stdout in each task.
    #[arg(long, default_value_t = 4 << 20)]
    spam_bytes: usize,
    /// Write this process's pid (and the pids of children it starts), one a line.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Keep no copy of the trained model for `submit_model` (benchmarks: the copy is the
    /// trainer's bookkeeping, not the protocol's cost).
    #[arg(long)]
    forget_trained: bool,
    /// Log this many `stress` scalars in each `train` task (value = step = round × N + i),
    /// as `SummaryWriter.add_scalar` would, besides the three `train_loss` records.
    #[arg(long, default_value_t = 0)]
    log_scalars: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trainer failed: {e:#}");
            ExitCode::from(FAILED)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let me = std::process::id();
    if let Some(path) = &args.pid_file {
        write_pids(path, &[me])?;
    }
    match args.mode {
        Mode::ExitBeforeConnect => {
            eprintln!("trainer: exiting before connecting, as asked");
            std::process::exit(FAILED.into());
        }
        Mode::Crash => {
            let mut client = Client::from_env()?;
            let task = first_task(&mut client)?;
            eprintln!("trainer: task {} ({}), training", task.id, task.name);
            eprintln!("trainer: step 1 of 3");
            eprintln!("trainer failed: boom");
            std::process::exit(FAILED.into());
        }
        Mode::Panic => {
            let mut client = Client::from_env()?;
            let task = first_task(&mut client)?;
            panic!("boom: a panic in task {}", task.id);
        }
        Mode::Hang => {
            let mut client = Client::from_env()?;
            let task = first_task(&mut client)?;
            let child = std::process::Command::new("sleep")
                .arg("600")
                .spawn()
                .context("starting sleep 600")?;
            if let Some(path) = &args.pid_file {
                write_pids(path, &[me, child.id()])?;
            }
            eprintln!(
                "trainer: task {} received, hanging (child sleep {})",
                task.id,
                child.id()
            );
            sleep_forever()
        }
        Mode::Silent => {
            let mut raw = Raw::connect()?;
            let task = raw.task()?;
            eprintln!("trainer: task {} received, going silent", task.task_id);
            raw.exit_when_closed()?;
            sleep_forever()
        }
        Mode::Malformed => {
            let mut raw = Raw::connect()?;
            raw.task()?;
            let body = br#"{"type": "result", "task_id": "#;
            let len = u32::try_from(body.len())?.to_be_bytes();
            raw.stream.write_all(&len)?;
            raw.stream.write_all(body)?;
            raw.stream.flush()?;
            loop {
                match proto::read_frame::<_, ToProgram>(&mut raw.stream, MAX_TO_PROGRAM) {
                    Ok(ToProgram::Error { reason }) => {
                        bail!("the node refused the malformed frame: {reason}")
                    }
                    Ok(other) => eprintln!("trainer: the node sent {other:?}"),
                    Err(e) => bail!("the connection ended after the malformed frame: {e}"),
                }
            }
        }
        Mode::OutsideFile => {
            let mut raw = Raw::connect()?;
            let task = raw.task()?;
            outside_file(&mut raw, &task)
        }
        Mode::Add | Mode::SpamStdout | Mode::WrongShape | Mode::CrashAtRound | Mode::Slow => {
            train(args)
        }
    }
}

/// The loop of the training modes: one answer per task until the node says shutdown.
fn train(args: &Args) -> anyhow::Result<()> {
    let mut client = Client::from_env()?;
    eprintln!(
        "trainer: connected to job {} at {} ({})",
        client.job_id(),
        client.site_name(),
        client.params_transfer_type().as_str()
    );
    let mut last_trained: Option<Model> = None;
    while let Some(mut task) = client.receive()? {
        eprintln!(
            "trainer: task {} {} round {}",
            task.id, task.name, task.round
        );
        match args.mode {
            Mode::CrashAtRound if task.round == args.round => {
                eprintln!("trainer failed: crashing at round {}, as asked", task.round);
                std::process::exit(FAILED.into());
            }
            Mode::Slow => std::thread::sleep(Duration::from_secs_f64(args.sleep.max(0.0))),
            Mode::SpamStdout => spam_stdout(args.spam_bytes)?,
            _ => {}
        }
        let result = answer(args, &client, &mut task, &mut last_trained)?;
        let step = i64::from(task.round) * 10;
        client.log((0..3).map(|i| LogRecord {
            key: "train_loss".into(),
            value: (1.0 / f64::from(i + 1)).into(),
            step: Some(step + i64::from(i)),
            kind: Some("scalar".into()),
        }))?;
        if task.name == "train" && args.log_scalars > 0 {
            let n = i64::from(args.log_scalars);
            for i in 0..n {
                let step = i64::from(task.round) * n + i;
                client.log_scalar("stress", step as f64, Some(step))?;
            }
        }
        match result {
            Some(result) => client.send(task.id, result)?,
            None => client.send_failure(task.id, "no model to submit: nothing trained yet")?,
        }
    }
    eprintln!("trainer: no more tasks, exiting");
    Ok(())
}

/// The result of one task; `None` where there is nothing to send (a failure).
fn answer(
    args: &Args,
    client: &Client,
    task: &mut Task,
    last_trained: &mut Option<Model>,
) -> anyhow::Result<Option<TaskResult>> {
    let received = task.model.as_ref();
    let accuracy = received.map_or(0.0, first_mean);
    let metrics = [("accuracy".to_owned(), accuracy), ("loss".to_owned(), 1.0)].into();
    if task.is_validate() {
        return Ok(Some(TaskResult::metrics_only(metrics)));
    }
    if task.is_submit_model() {
        let model = last_trained.clone().or_else(|| received.cloned());
        return Ok(model.map(TaskResult::with_model));
    }
    let Some(mut model) = task.model.take() else {
        bail!("task {} ({}) carries no model", task.id, task.name);
    };
    let training = std::time::Instant::now();
    for tensor in model.tensors.values_mut() {
        tensor.map_f32(|w| w + args.delta);
    }
    let train_s = training.elapsed().as_secs_f64();
    if !args.forget_trained {
        *last_trained = Some(model.clone());
    }
    let mut result = TaskResult {
        metrics,
        ..TaskResult::with_model(model)
    }
    .num_steps(args.steps)
    .meta("trainer.read_s", task.load_seconds)
    .meta("trainer.train_s", train_s);
    if args.mode == Mode::WrongShape {
        if let Some(model) = result.model.as_mut() {
            reshape_first(model);
        }
        // Sent as it is: no difference against the task's model, whose shapes differ.
        result.params_type = Some(client.params_transfer_type());
        if client.params_transfer_type() == ParamsType::Diff {
            if let Some(model) = result.model.as_mut() {
                for tensor in model.tensors.values_mut() {
                    tensor.map_f32(|_| args.delta);
                }
            }
        }
    }
    Ok(Some(result))
}

/// The mean of the first float tensor (in name order), 0 without one.
fn first_mean(model: &Model) -> f64 {
    model
        .tensors
        .values()
        .find_map(|t| t.to_f32())
        .filter(|v| !v.is_empty())
        .map_or(0.0, |v| {
            v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64
        })
}

/// Gives the first tensor one more element, flattened: another shape.
fn reshape_first(model: &mut Model) {
    if let Some(tensor) = model.tensors.values_mut().next() {
        let width = tensor.data.len() / tensor.element_count().max(1);
        tensor.shape = vec![tensor.element_count() + 1];
        tensor.data.extend(std::iter::repeat_n(0u8, width.max(1)));
    }
}

fn first_task(client: &mut Client) -> anyhow::Result<Task> {
    client
        .receive()?
        .context("the node said shutdown before any task")
}

fn spam_stdout(bytes: usize) -> anyhow::Result<()> {
    let line = format!("{}\n", "spam ".repeat(20));
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut written = 0;
    let mut n = 0u64;
    while written < bytes {
        let text = format!("{n:08} {line}");
        out.write_all(text.as_bytes())?;
        written += text.len();
        n += 1;
    }
    out.flush()?;
    Ok(())
}

fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Writes `pids`, one a line, replacing the file whole.
fn write_pids(path: &Path, pids: &[u32]) -> anyhow::Result<()> {
    let text: String = pids.iter().map(|p| format!("{p}\n")).collect();
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A connection that speaks the protocol by hand, for the modes that break it.
struct Raw {
    stream: UnixStream,
    accept: Accept,
}

impl Raw {
    fn connect() -> anyhow::Result<Raw> {
        let config = Config::from_env()?;
        let mut stream = UnixStream::connect(&config.socket)
            .with_context(|| format!("connecting to {}", config.socket.display()))?;
        let hello = ToNode::Hello {
            protocol: PROTOCOL,
            token: config.token,
            pid: std::process::id(),
            rank: None,
            client: Some("flare-test-trainer".into()),
        };
        proto::write_frame(&mut stream, &hello, MAX_TO_NODE)?;
        match proto::read_frame::<_, ToProgram>(&mut stream, MAX_TO_PROGRAM)? {
            ToProgram::Accept(accept) => Ok(Raw { stream, accept }),
            ToProgram::Reject { reason } => Err(ClientError::Rejected(reason).into()),
            other => bail!("{other:?} instead of accept"),
        }
    }

    fn task(&mut self) -> anyhow::Result<TaskMsg> {
        loop {
            match proto::read_frame::<_, ToProgram>(&mut self.stream, MAX_TO_PROGRAM)? {
                ToProgram::Task(t) => return Ok(t),
                other @ (ToProgram::Shutdown { .. } | ToProgram::Abort { .. }) => {
                    bail!("{other:?} before any task")
                }
                other => eprintln!("trainer: the node sent {other:?}"),
            }
        }
    }

    /// Exits the process once the node closes the connection.
    fn exit_when_closed(&self) -> anyhow::Result<()> {
        let mut stream = self.stream.try_clone()?;
        std::thread::spawn(move || {
            while proto::read_frame_bytes(&mut stream, MAX_TO_PROGRAM).is_ok() {}
            eprintln!("trainer: the node closed the connection");
            std::process::exit(FAILED.into());
        });
        Ok(())
    }
}

/// Answers the task with a copy of its model written outside the exchange folder.
fn outside_file(raw: &mut Raw, task: &TaskMsg) -> anyhow::Result<()> {
    let model = match &task.model {
        Some(m) => Model::load(Path::new(&m.path))?,
        None => Model::default(),
    };
    let path = std::env::temp_dir().join(format!(
        "flare-test-trainer-{}-{}.safetensors",
        std::process::id(),
        task.task_id
    ));
    eprintln!(
        "trainer: answering task {} with {} (exchange_dir is {})",
        task.task_id,
        path.display(),
        raw.accept.exchange_dir
    );
    model.save(&path)?;
    let result = ResultMsg {
        task_id: task.task_id,
        rc: RC_OK.into(),
        params_type: Some(raw.accept.params_transfer_type.clone()),
        metrics: [("loss".to_owned(), 1.0)].into(),
        meta: [("NUM_STEPS_CURRENT_ROUND".to_owned(), 1.into())].into(),
        model: Some(ModelRef {
            path: path.to_string_lossy().into_owned(),
            params_type: None,
        }),
        reason: None,
    };
    proto::write_frame(&mut raw.stream, &ToNode::Result(result), MAX_TO_NODE)?;
    let reply = proto::read_frame::<_, ToProgram>(&mut raw.stream, MAX_TO_PROGRAM);
    let _ = std::fs::remove_file(&path);
    match reply? {
        ToProgram::ResultRejected { reason, .. } => {
            bail!("the node rejected the result: {reason}")
        }
        other => bail!("the node answered a file outside exchange_dir with {other:?}"),
    }
}
