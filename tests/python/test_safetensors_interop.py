"""Interoperability of Flare's safetensors files with the Python ecosystem.

Reads what `flare-node simulate` writes with the independent `safetensors` package, runs the
MLP forward pass in NumPy on MNIST read straight from the IDX files, and goes the other way:
starts a Flare job from weights that NumPy wrote.
"""

import gzip
import json
import os
import pathlib
import subprocess

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("FLARE_NODE_BIN", str(ROOT / "target/release/flare-node"))
MNIST = ROOT / "data/mnist"


def read_idx(name):
    with gzip.open(MNIST / f"{name}.gz", "rb") as f:
        data = f.read()
    ndims = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndims).reshape(dims)


def mlp_accuracy(params):
    x = read_idx("t10k-images-idx3-ubyte").reshape(-1, 784).astype(np.float32)
    y = read_idx("t10k-labels-idx1-ubyte")
    x = (x / 255.0 - 0.1307) / 0.3081
    h = np.maximum(x @ params["fc1.weight"].T + params["fc1.bias"], 0.0)
    z = h @ params["fc2.weight"].T + params["fc2.bias"]
    return float((z.argmax(axis=1) == y).mean())


def simulate(job, workspace, n):
    out = subprocess.run(
        [BIN, "simulate", "--quiet", "--json", "-n", str(n), "-w", str(workspace), str(job)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def test_python_reads_what_flare_writes(tmp_path):
    report = simulate(ROOT / "examples/hello-fedavg", tmp_path, 4)
    params = load_file(report["final_model"])
    assert sorted(params) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    assert params["fc1.weight"].shape == (64, 784)
    assert params["fc2.weight"].shape == (10, 64)
    assert all(p.dtype == np.float32 for p in params.values())
    # Evaluated independently on all 10,000 images (train and held-out parts together).
    assert mlp_accuracy(params) >= 0.85
    for path in report["round_models"]:
        assert sorted(load_file(path)) == sorted(params)


def test_flare_starts_from_weights_python_wrote(tmp_path):
    rng = np.random.default_rng(0)
    weights = {
        "fc1.weight": rng.uniform(-0.03, 0.03, (64, 784)).astype(np.float32),
        "fc1.bias": np.zeros(64, np.float32),
        "fc2.weight": rng.uniform(-0.1, 0.1, (10, 64)).astype(np.float32),
        "fc2.bias": np.zeros(10, np.float32),
    }
    job = tmp_path / "job"
    (job / "app/config").mkdir(parents=True)
    save_file(weights, str(job / "app/initial.safetensors"))
    src = ROOT / "examples/hello-fedavg"
    (job / "meta.json").write_text((src / "meta.json").read_text())
    server = json.loads((src / "app/config/config_fed_server.json").read_text())
    server["workflows"][0]["args"]["num_rounds"] = 2
    server["components"][0] = {
        "id": "model",
        "name": "SafetensorsModel",
        "args": {"path": "initial.safetensors"},
    }
    (job / "app/config/config_fed_server.json").write_text(json.dumps(server))
    client = json.loads((src / "app/config/config_fed_client.json").read_text())
    client["executors"][0]["executor"]["args"]["data_dir"] = str(MNIST)
    (job / "app/config/config_fed_client.json").write_text(json.dumps(client))
    report = simulate(job, tmp_path / "ws", 2)
    # Version 0 is the model Python wrote: Flare measured it before training.
    assert abs(report["metrics"]["0"]["accuracy"] - 0.1) < 0.1
    assert report["metrics"]["2"]["accuracy"] >= 0.85
