//! The library in this process against a mock node: misuse is an error that says what went
//! wrong, and the node's answers reach the caller.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::{Conn, MockNode, TOKEN, result, sample_model};
use flare_client::proto::{ToNode, ToProgram};
use flare_client::{Client, ClientError, Config, Model, ParamsType, TaskResult};

fn config(node: &MockNode) -> Config {
    Config {
        socket: node.socket.clone(),
        token: TOKEN.into(),
        parent_pid: None,
        rank: Some("0".into()),
        // This process is the test, not a launched program: a lost node must not end it.
        end_group_on_loss: false,
    }
}

fn connected(node: &MockNode, ptype: &str) -> (Client, Conn) {
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            let mut conn = node.connection();
            conn.handshake(node.accept_msg(ptype));
            conn
        });
        let client = Client::connect(config(node)).unwrap();
        (client, server.join().unwrap())
    })
}

#[test]
fn the_client_reports_what_the_node_accepted() {
    let node = MockNode::new();
    let (client, mut conn) = connected(&node, "DIFF");
    assert_eq!(client.job_id(), common::JOB);
    assert_eq!(client.site_name(), common::SITE);
    assert_eq!(client.params_transfer_type(), ParamsType::Diff);
    assert_eq!(client.params_format(), "pytorch");
    assert!(client.train_with_evaluation());
    assert_eq!(client.exchange_dir(), node.exchange);
    assert!(client.is_running());
    drop(client);
    // Closing sends nothing more and ends the connection.
    loop {
        match flare_client::proto::read_frame::<_, ToNode>(&mut conn.stream, 1 << 20) {
            Ok(ToNode::Heartbeat) => {}
            Ok(other) => panic!("{other:?}"),
            Err(_) => break,
        }
    }
}

#[test]
fn a_rejected_hello_is_an_error_with_the_reason() {
    let node = MockNode::new();
    let err = std::thread::scope(|s| {
        s.spawn(|| {
            let mut conn = node.connection();
            conn.read_any();
            conn.send(&ToProgram::Reject {
                reason: "a wrong token".into(),
            });
        });
        Client::connect(config(&node)).unwrap_err()
    });
    assert!(
        matches!(&err, ClientError::Rejected(r) if r == "a wrong token"),
        "{err}"
    );
}

#[test]
fn misuse_is_an_error_not_a_panic() {
    let node = MockNode::new();
    let (mut client, mut conn) = connected(&node, "FULL");

    let err = client.send(1, TaskResult::default()).unwrap_err();
    assert!(matches!(err, ClientError::NoTask), "{err}");
    assert_eq!(err.to_string(), "no task to answer: call receive() first");

    conn.send(&node.task(5, "train", 0, Some(&sample_model())));
    let task = client.receive().unwrap().unwrap();
    assert_eq!((task.id, task.round, task.total_rounds), (5, 0, Some(3)));
    assert!(task.is_train());
    assert_eq!(task.model.as_ref().unwrap(), &sample_model());

    let err = client.receive().unwrap_err();
    assert!(matches!(err, ClientError::TaskOutstanding(5)), "{err}");
    let err = client.send(6, TaskResult::default()).unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::WrongTask {
                given: 6,
                outstanding: 5
            }
        ),
        "{err}"
    );
    let err = client
        .send(5, TaskResult::default().metric("loss", f64::NAN))
        .unwrap_err();
    assert!(matches!(err, ClientError::NonFiniteMetric { .. }), "{err}");

    // The task is still outstanding after those: a good answer goes.
    let answer = std::thread::scope(|s| {
        let node_side = s.spawn(|| {
            let r = result(conn.read());
            conn.send(&ToProgram::ResultAck { task_id: r.task_id });
            r
        });
        client
            .send(
                5,
                TaskResult::with_model(task.model.clone().unwrap()).num_steps(3),
            )
            .unwrap();
        node_side.join().unwrap()
    });
    assert_eq!(answer.meta["NUM_STEPS_CURRENT_ROUND"], 3);

    let err = client.send(5, TaskResult::default()).unwrap_err();
    assert!(matches!(err, ClientError::AlreadyAnswered(5)), "{err}");

    conn.send(&ToProgram::Shutdown {
        reason: "done".into(),
    });
    assert!(client.receive().unwrap().is_none());
    assert!(!client.is_running());
    assert!(client.receive().unwrap().is_none());
}

#[test]
fn a_rejected_result_is_an_error_with_the_reason() {
    let node = MockNode::new();
    let (mut client, mut conn) = connected(&node, "FULL");
    conn.send(&node.task(2, "train", 1, Some(&sample_model())));
    let task = client.receive().unwrap().unwrap();
    let err = std::thread::scope(|s| {
        s.spawn(|| {
            let r = result(conn.read());
            conn.send(&ToProgram::ResultRejected {
                task_id: r.task_id,
                reason: "a non-finite metric".into(),
            });
        });
        client
            .send(task.id, TaskResult::with_model(task.model.clone().unwrap()))
            .unwrap_err()
    });
    assert!(
        matches!(&err, ClientError::ResultRejected { task_id: 2, reason } if reason == "a non-finite metric"),
        "{err}"
    );
    // The task is over either way.
    assert!(matches!(
        client.send(2, TaskResult::default()),
        Err(ClientError::AlreadyAnswered(2))
    ));
}

#[test]
fn logs_are_batched_and_precede_the_result() {
    let node = MockNode::new();
    let (mut client, mut conn) = connected(&node, "FULL");
    conn.send(&node.task(1, "validate", 0, Some(&sample_model())));
    let task = client.receive().unwrap().unwrap();
    let (batches, steps) = std::thread::scope(|s| {
        // The node reads all along, as a node does.
        let node_side = s.spawn(|| {
            let mut batches = Vec::new();
            let mut steps = Vec::new();
            loop {
                match conn.read() {
                    ToNode::Log { records } => {
                        batches.push(records.len());
                        steps.extend(records.iter().map(|r| r.step));
                    }
                    ToNode::Result(r) => {
                        conn.send(&ToProgram::ResultAck { task_id: r.task_id });
                        return (batches, steps);
                    }
                    other => panic!("{other:?}"),
                }
            }
        });
        for step in 0..25_000 {
            client.log_scalar("loss", 0.5, Some(step)).unwrap();
        }
        client.log_text("note", "half way", None).unwrap();
        let err = client.log_scalar("loss", f64::INFINITY, None).unwrap_err();
        assert!(matches!(err, ClientError::NonFiniteMetric { .. }), "{err}");
        let bad = flare_client::proto::LogRecord {
            key: "x".into(),
            value: "text".into(),
            step: None,
            kind: Some("scalar".into()),
        };
        assert!(matches!(
            client.log([bad]),
            Err(ClientError::BadLogRecord { .. })
        ));
        client
            .send(task.id, TaskResult::default().metric("accuracy", 0.9))
            .unwrap();
        node_side.join().unwrap()
    });
    assert_eq!(batches.iter().sum::<usize>(), 25_001);
    assert!(batches.iter().all(|n| *n <= 10_000), "{batches:?}");
    // Full batches, and the partial ones heartbeats flush (every 0.2 s here).
    assert!(
        batches.len() < 50,
        "batched, not one message a record: {batches:?}"
    );
    let expected: Vec<Option<i64>> = (0..25_000).map(Some).chain([None]).collect();
    assert_eq!(steps, expected, "in order");
}

#[test]
fn a_diff_is_computed_against_the_task_model() {
    let node = MockNode::new();
    let (mut client, mut conn) = connected(&node, "DIFF");
    conn.send(&node.task(3, "train", 0, Some(&sample_model())));
    let task = client.receive().unwrap().unwrap();
    let mut trained = task.model.clone().unwrap();
    for t in trained.tensors.values_mut() {
        t.map_f32(|v| v * 2.0);
    }
    let r = std::thread::scope(|s| {
        let node_side = s.spawn(|| {
            let r = result(conn.read());
            conn.send(&ToProgram::ResultAck { task_id: r.task_id });
            r
        });
        client.send(3, TaskResult::with_model(trained)).unwrap();
        node_side.join().unwrap()
    });
    assert_eq!(r.params_type.as_deref(), Some("DIFF"));
    let d = Model::load(Path::new(&r.model.unwrap().path)).unwrap();
    assert_eq!(
        d.tensors["a.weight"].to_f32().unwrap(),
        vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    );
}

#[test]
fn an_unreadable_task_model_fails_the_task() {
    let node = MockNode::new();
    let (mut client, mut conn) = connected(&node, "FULL");
    let path = node.exchange.join("1.in.safetensors");
    std::fs::write(&path, b"not a model").unwrap();
    conn.send(&ToProgram::Task(flare_client::proto::TaskMsg {
        task_id: 1,
        name: "train".into(),
        round: 0,
        total_rounds: None,
        meta: Default::default(),
        model: Some(flare_client::proto::ModelRef {
            path: path.to_string_lossy().into_owned(),
            params_type: None,
        }),
    }));
    let err = std::thread::scope(|s| {
        let node_side = s.spawn(|| {
            let r = result(conn.read());
            conn.send(&ToProgram::ResultAck { task_id: r.task_id });
            r
        });
        let err = client.receive().unwrap_err();
        let r = node_side.join().unwrap();
        assert_eq!(r.rc, "EXECUTION_EXCEPTION");
        assert!(r.reason.unwrap().contains("cannot read the task's model"));
        err
    });
    assert!(
        matches!(err, ClientError::TaskModel { task_id: 1, .. }),
        "{err}"
    );
}

#[test]
fn a_lost_node_is_an_error_when_the_group_is_not_ended() {
    let node = MockNode::new();
    let (mut client, conn) = connected(&node, "FULL");
    drop(conn);
    let err = client.receive().unwrap_err();
    assert!(matches!(err, ClientError::Lost(_)), "{err}");
    assert!(!client.is_running());
}

#[test]
fn an_unknown_message_from_the_node_is_a_protocol_error() {
    let node = MockNode::new();
    let (mut client, mut conn) = connected(&node, "FULL");
    let body = br#"{"type": "reboot"}"#;
    std::io::Write::write_all(&mut conn.stream, &(body.len() as u32).to_be_bytes()).unwrap();
    std::io::Write::write_all(&mut conn.stream, body).unwrap();
    let err = client.receive().unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err}");
}

#[test]
fn from_env_says_which_variable_is_missing() {
    // Tests run without the launch variables.
    let err = Client::from_env().unwrap_err();
    assert!(
        err.to_string().contains("FLARE_CLIENT_SOCKET is not set"),
        "{err}"
    );
}
