//! The LibTorch back-end through the real `flare-node simulate` binary (feature `torch`;
//! `scripts/test-torch.sh` runs it with LibTorch on `LD_LIBRARY_PATH`).

#![cfg(feature = "torch")]
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use flare_node::data::Dataset;
use flare_node::learner::cnn::DeviceSpec;
use flare_node::learner::torch::{CnnNet, evaluate, resolve_device, to_device};
use tch::Device;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// swarm-mnist-torch as shipped, in the simulator with 3 sites: the sites pass the CNN to
/// each other for 5 rounds and the final model reaches 97% on the held-out images; the
/// file written is that model (evaluated here again, in this process).
#[test]
fn swarm_mnist_torch_reaches_97_percent() {
    let ws = tempfile::tempdir().unwrap();
    let out = Command::new(flare_node::node_bin())
        .args(["simulate", "--quiet", "--json", "-n", "3", "-w"])
        .arg(ws.path())
        .arg(root().join("examples/swarm-mnist-torch"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "simulate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let metrics = report["metrics"].as_object().unwrap();
    assert_eq!(metrics.len(), 6, "versions 0..=5: {metrics:?}");
    let acc: Vec<f64> = (0..=5)
        .map(|v| metrics[&v.to_string()]["accuracy"].as_f64().unwrap())
        .collect();
    assert!(acc[0] < 0.3, "untrained accuracy {acc:?}");
    assert!(acc[1] > 0.9, "one swarm round: {acc:?}");
    assert!(acc[5] >= 0.97, "final held-out accuracy: {acc:?}");

    let model =
        flare_node::model_io::read(Path::new(report["final_model"].as_str().unwrap())).unwrap();
    // The device the example's "auto" chose: on the CPU the result is exact; on a GPU other
    // kernels may flip a borderline image or two.
    let device = resolve_device(DeviceSpec::Auto).unwrap();
    let tolerance = if device == Device::Cpu { 1e-9 } else { 0.002 };
    let mut net = CnnNet::new(device, true);
    net.load(&model).unwrap();
    let (_, held_out) = Dataset::load_mnist_test(&root().join("data/mnist"))
        .unwrap()
        .split(2000, 0);
    let all: Vec<usize> = (0..held_out.len()).collect();
    let (x, y) = to_device(&held_out, &all, device);
    let mine = evaluate(&net, &x, &y).unwrap()["accuracy"];
    assert!(
        (mine - acc[5]).abs() <= tolerance,
        "file gives {mine}, report {acc:?}"
    );
}
