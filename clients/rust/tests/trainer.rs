//! `flare-test-trainer` launched as the node launches a program, against a mock node: the
//! handshake, the `add` arithmetic on real result files, DIFF, validate, submit_model, a
//! rejected result, batched logs, shutdown, and the end of the process group when the node
//! goes away.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::sync::Once;
use std::time::Duration;

use common::{MockNode, TOKEN, result, sample_model};
use flare_client::Model;
use flare_client::proto::{ToNode, ToProgram};

/// Orphans of killed trainers come to this process, which reaps them, so that a test can see
/// a killed grandchild gone rather than a zombie no one waits for.
fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        rustix::process::set_child_subreaper(Some(rustix::process::getpid())).unwrap();
    });
}

fn values(model: &Model, name: &str) -> Vec<f32> {
    model.tensors[name].to_f32().unwrap()
}

#[test]
fn a_train_task_round_trips_with_the_add_arithmetic() {
    let node = MockNode::new();
    let mut trainer = node.launch(&["--mode", "add", "--delta", "0.25", "--steps", "7"]);
    let mut conn = node.connection();
    let hello = conn.handshake(node.accept_msg("FULL"));
    let ToNode::Hello {
        protocol,
        token,
        pid,
        client,
        ..
    } = hello
    else {
        panic!("not a hello: {hello:?}")
    };
    assert_eq!((protocol, token.as_str(), pid), (1, TOKEN, trainer.pid()));
    assert!(client.unwrap().starts_with("flare-client-rust/"));

    let sent = sample_model();
    conn.send(&node.task(1, "train", 0, Some(&sent)));

    // The task's log records come in one message, before the result.
    let ToNode::Log { records } = conn.read() else {
        panic!("the records did not come first")
    };
    assert_eq!(records.len(), 3, "{records:?}");
    assert!(records.iter().all(|r| r.key == "train_loss"));
    assert_eq!(
        records.iter().map(|r| r.step).collect::<Vec<_>>(),
        vec![Some(0), Some(1), Some(2)]
    );

    let r = result(conn.read());
    assert_eq!((r.task_id, r.rc.as_str()), (1, "OK"));
    assert_eq!(r.params_type.as_deref(), Some("FULL"));
    assert_eq!(r.meta["NUM_STEPS_CURRENT_ROUND"], 7);
    assert_eq!(
        r.metrics["accuracy"], 3.5,
        "the mean of a.weight as received"
    );
    assert_eq!(r.metrics["loss"], 1.0);
    let path = Path::new(&r.model.unwrap().path).to_path_buf();
    assert_eq!(path, node.exchange.join("1.out.safetensors"));
    let got = Model::load(&path).unwrap();
    assert_eq!(
        values(&got, "a.weight"),
        vec![1.25, 2.25, 3.25, 4.25, 5.25, 6.25]
    );
    assert_eq!(got.tensors["a.weight"].shape, vec![2, 3]);
    assert_eq!(got.tensors["b.bias"].dtype, "BF16");
    assert_eq!(values(&got, "b.bias"), vec![0.75, -0.75, 2.25, 8.25]);
    assert_eq!(got.tensors["c.steps"], sent.tensors["c.steps"]);
    assert_eq!(
        node.exchange_files(),
        vec!["1.in.safetensors", "1.out.safetensors"],
        "no partial file left behind"
    );

    conn.send(&ToProgram::ResultAck { task_id: 1 });
    conn.send(&ToProgram::Shutdown {
        reason: "the job is done".into(),
    });
    let status = trainer.exit();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", trainer.stderr());
}

#[test]
fn a_diff_job_gets_the_difference() {
    let node = MockNode::new();
    let mut trainer = node.launch(&["--delta", "0.5"]);
    let mut conn = node.connection();
    conn.handshake(node.accept_msg("DIFF"));
    conn.send(&node.task(4, "train", 2, Some(&sample_model())));
    let r = conn.result();
    assert_eq!(r.params_type.as_deref(), Some("DIFF"));
    let got = Model::load(Path::new(&r.model.unwrap().path)).unwrap();
    assert_eq!(values(&got, "a.weight"), vec![0.5; 6]);
    assert_eq!(values(&got, "b.bias"), vec![0.5; 4]);
    assert_eq!(got.tensors["c.steps"].to_i64().unwrap(), vec![0, 0]);
    conn.send(&ToProgram::ResultAck { task_id: 4 });
    conn.send(&ToProgram::Shutdown { reason: "".into() });
    assert_eq!(trainer.exit().code(), Some(0));
}

#[test]
fn validate_answers_metrics_only_and_submit_model_the_trained_model() {
    let node = MockNode::new();
    let mut trainer = node.launch(&["--delta", "1"]);
    let mut conn = node.connection();
    conn.handshake(node.accept_msg("FULL"));

    conn.send(&node.task(1, "train", 0, Some(&sample_model())));
    let trained = conn.result();
    let trained = Model::load(Path::new(&trained.model.unwrap().path)).unwrap();
    conn.send(&ToProgram::ResultAck { task_id: 1 });

    conn.send(&node.task(2, "validate", 0, Some(&trained)));
    let r = conn.result();
    assert_eq!(r.task_id, 2);
    assert_eq!(r.model, None);
    assert_eq!(r.params_type, None);
    assert_eq!(r.metrics["accuracy"], 4.5);
    conn.send(&ToProgram::ResultAck { task_id: 2 });

    conn.send(&node.task(3, "submit_model", 0, None));
    let r = conn.result();
    assert_eq!(r.params_type.as_deref(), Some("FULL"));
    let submitted = Model::load(Path::new(&r.model.unwrap().path)).unwrap();
    assert_eq!(submitted, trained);
    conn.send(&ToProgram::ResultAck { task_id: 3 });
    conn.send(&ToProgram::Shutdown { reason: "".into() });
    assert_eq!(trainer.exit().code(), Some(0));
}

#[test]
fn a_rejected_result_fails_the_trainer_with_the_reason() {
    let node = MockNode::new();
    let mut trainer = node.launch(&[]);
    let mut conn = node.connection();
    conn.handshake(node.accept_msg("FULL"));
    conn.send(&node.task(9, "train", 0, Some(&sample_model())));
    conn.result();
    conn.send(&ToProgram::ResultRejected {
        task_id: 9,
        reason: "tensor a.weight: shape [3, 2], the task's [2, 3]".into(),
    });
    let status = trainer.exit();
    assert_eq!(status.code(), Some(3));
    let stderr = trainer.stderr();
    assert!(
        stderr.contains("the node rejected the result of task 9")
            && stderr.contains("tensor a.weight: shape [3, 2], the task's [2, 3]"),
        "stderr:\n{stderr}"
    );
}

#[test]
fn a_rejected_hello_fails_the_trainer_with_the_reason() {
    let node = MockNode::new();
    let mut trainer = node.launch(&[]);
    let mut conn = node.connection();
    conn.read_any();
    conn.send(&ToProgram::Reject {
        reason: "a wrong token".into(),
    });
    drop(conn);
    assert_eq!(trainer.exit().code(), Some(3));
    assert!(
        trainer
            .stderr()
            .contains("the node refused this program: a wrong token")
    );
}

#[test]
fn heartbeats_come_at_the_accepted_interval() {
    let node = MockNode::new();
    let _trainer = node.launch(&[]);
    let mut conn = node.connection();
    conn.handshake(node.accept_msg("FULL"));
    let start = std::time::Instant::now();
    for _ in 0..3 {
        assert_eq!(conn.read_any(), ToNode::Heartbeat);
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[test]
fn a_closed_connection_ends_the_whole_process_group_within_2_s() {
    become_subreaper();
    let node = MockNode::new();
    let pid_file = node.dir.path().join("pids");
    let mut trainer = node.launch(&["--mode", "hang", "--pid-file", pid_file.to_str().unwrap()]);
    let mut conn = node.connection();
    conn.handshake(node.accept_msg("FULL"));
    conn.send(&node.task(1, "train", 0, Some(&sample_model())));
    let pids = common::pids(&pid_file, 2);
    assert_eq!(pids[0], trainer.pid());
    assert!(!common::gone(pids[1]), "the child sleep runs");

    drop(conn);
    let status = trainer
        .wait_for(Duration::from_secs(2))
        .expect("the trainer outlived its node");
    assert_eq!(status.signal(), Some(9), "stderr:\n{}", trainer.stderr());
    assert!(
        common::all_gone_within(&pids[1..], Duration::from_secs(2)),
        "the trainer's child outlived it"
    );
    assert!(
        trainer
            .stderr()
            .contains("the connection to the node closed; ending process group"),
        "stderr:\n{}",
        trainer.stderr()
    );
}

#[test]
fn a_dead_parent_ends_the_whole_process_group() {
    become_subreaper();
    let node = MockNode::new();
    let pid_file = node.dir.path().join("pids");
    // A parent shell stands for the node: FLARE_CLIENT_PARENT_PID is its pid.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"FLARE_CLIENT_PARENT_PID=$$ "$0" "$@" & wait"#)
        .arg(env!("CARGO_BIN_EXE_flare-test-trainer"))
        .args(["--mode", "hang", "--pid-file", pid_file.to_str().unwrap()]);
    node.launch_env(&mut cmd);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.stderr(std::process::Stdio::piped());
    let mut shell = common::Trainer::spawn(cmd);
    let mut conn = node.connection();
    conn.handshake(node.accept_msg("FULL"));
    conn.send(&node.task(1, "train", 0, Some(&sample_model())));
    let pids = common::pids(&pid_file, 2);

    // Only the shell dies; the connection stays open.
    let sh = rustix::process::Pid::from_raw(shell.pid() as i32).unwrap();
    rustix::process::kill_process(sh, rustix::process::Signal::KILL).unwrap();
    shell.exit();
    assert!(
        common::all_gone_within(&pids, Duration::from_secs(2)),
        "the trainer outlived its parent; stderr:\n{}",
        shell.stderr()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !shell.stderr().contains("is gone") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(shell.stderr().contains("is gone"), "{}", shell.stderr());
}

#[test]
fn fault_modes_fail_as_documented() {
    // exit-before-connect: exit 3 at once, a line on stderr.
    let node = MockNode::new();
    let mut t = node.launch(&["--mode", "exit-before-connect"]);
    assert_eq!(t.exit().code(), Some(3));
    assert!(!t.stderr().is_empty());

    // crash: connects, takes the task, "trainer failed: boom", exit 3.
    let mut t = node.launch(&["--mode", "crash"]);
    let mut conn = node.connection();
    conn.handshake(node.accept_msg("FULL"));
    conn.send(&node.task(1, "train", 0, Some(&sample_model())));
    assert_eq!(t.exit().code(), Some(3));
    assert!(
        t.stderr().contains("trainer failed: boom"),
        "{}",
        t.stderr()
    );

    // panic: exit code 101 with the panic message.
    let mut t = node.launch(&["--mode", "panic"]);
    let mut conn = node.connection();
    conn.handshake(node.accept_msg("FULL"));
    conn.send(&node.task(2, "train", 0, Some(&sample_model())));
    assert_eq!(t.exit().code(), Some(101));
    assert!(
        t.stderr().contains("boom: a panic in task 2"),
        "{}",
        t.stderr()
    );

    // malformed: a frame that is not JSON after the task.
    let mut t = node.launch(&["--mode", "malformed"]);
    let mut conn = node.connection();
    conn.handshake(node.accept_msg("FULL"));
    conn.send(&node.task(3, "train", 0, Some(&sample_model())));
    let body = flare_client::proto::read_frame_bytes(&mut conn.stream, 1 << 20).unwrap();
    assert!(serde_json::from_slice::<serde_json::Value>(&body).is_err());
    conn.send(&ToProgram::Error {
        reason: "bad JSON".into(),
    });
    drop(conn);
    assert_eq!(t.exit().code(), Some(3));
    assert!(t.stderr().contains("bad JSON"), "{}", t.stderr());

    // wrong-shape: the first tensor's shape differs from the task's.
    let mut t = node.launch(&["--mode", "wrong-shape"]);
    let mut conn = node.connection();
    conn.handshake(node.accept_msg("FULL"));
    conn.send(&node.task(4, "train", 0, Some(&sample_model())));
    let r = conn.result();
    let got = Model::load(Path::new(&r.model.unwrap().path)).unwrap();
    assert_eq!(got.tensors["a.weight"].shape, vec![7]);
    conn.send(&ToProgram::ResultRejected {
        task_id: 4,
        reason: "shape".into(),
    });
    assert_eq!(t.exit().code(), Some(3));

    // outside-file: the result names a file outside exchange_dir.
    let mut t = node.launch(&["--mode", "outside-file"]);
    let mut conn = node.connection();
    conn.handshake(node.accept_msg("FULL"));
    conn.send(&node.task(5, "train", 0, Some(&sample_model())));
    let r = conn.result();
    let path = r.model.unwrap().path;
    assert!(!Path::new(&path).starts_with(&node.exchange), "{path}");
    assert!(Path::new(&path).exists());
    conn.send(&ToProgram::ResultRejected {
        task_id: 5,
        reason: "outside".into(),
    });
    assert_eq!(t.exit().code(), Some(3));
    assert!(!Path::new(&path).exists(), "the outside file is removed");
}

#[test]
fn crash_at_round_trains_until_that_round() {
    let node = MockNode::new();
    let mut t = node.launch(&["--mode", "crash-at-round", "--round", "1"]);
    let mut conn = node.connection();
    conn.handshake(node.accept_msg("FULL"));
    conn.send(&node.task(1, "train", 0, Some(&sample_model())));
    assert_eq!(conn.result().rc, "OK");
    conn.send(&ToProgram::ResultAck { task_id: 1 });
    conn.send(&node.task(2, "train", 1, Some(&sample_model())));
    assert_eq!(t.exit().code(), Some(3));
}

#[test]
fn silent_stops_heartbeating_and_slow_waits() {
    let node = MockNode::new();
    let mut t = node.launch(&["--mode", "silent"]);
    let mut conn = node.connection();
    conn.handshake(node.accept_msg("FULL"));
    conn.send(&node.task(1, "train", 0, Some(&sample_model())));
    conn.stream
        .set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    let mut frame = [0u8; 4];
    let err = std::io::Read::read(&mut conn.stream, &mut frame).unwrap_err();
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    drop(conn);
    assert_eq!(t.exit().code(), Some(3), "it goes once the node closes");

    let mut t = node.launch(&["--mode", "slow", "--sleep", "0.6"]);
    let mut conn = node.connection();
    conn.handshake(node.accept_msg("FULL"));
    let start = std::time::Instant::now();
    conn.send(&node.task(1, "train", 0, Some(&sample_model())));
    conn.result();
    assert!(start.elapsed() >= Duration::from_millis(600));
    conn.send(&ToProgram::ResultAck { task_id: 1 });
    conn.send(&ToProgram::Abort {
        reason: "aborted".into(),
    });
    assert_eq!(t.exit().code(), Some(0));
}

#[test]
fn spam_stdout_still_trains() {
    let node = MockNode::new();
    let mut cmd = node.command(&["--mode", "spam-stdout", "--spam-bytes", "1000000"]);
    cmd.stdout(std::process::Stdio::piped());
    let mut t = common::Trainer::spawn(cmd);
    let mut out = t.child.stdout.take().unwrap();
    let counter = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).unwrap();
        s.lines().count()
    });
    let mut conn = node.connection();
    conn.handshake(node.accept_msg("FULL"));
    conn.send(&node.task(1, "train", 0, Some(&sample_model())));
    assert_eq!(conn.result().rc, "OK");
    conn.send(&ToProgram::ResultAck { task_id: 1 });
    conn.send(&ToProgram::Shutdown { reason: "".into() });
    assert_eq!(t.exit().code(), Some(0));
    assert!(counter.join().unwrap() > 5_000);
}
