"""Federated statistics against numpy: `flare-node simulator` runs examples/stats-mnist and
examples/stats-csv (copies with `precision` 15, so the output is not rounded to FLARE's 4
decimals), and the global count, mean and variance must equal numpy's on the pooled data:
count exact, mean exact where every sum is exact in float64 (MNIST's integer pixels and
labels) and within 1e-12 relative otherwise (Iris' decimal fractions, summed in another
order), variance (ddof=1) and stddev within 1e-9 relative. The noised min and max must contain
the true ones, and MNIST's intensity histogram must equal numpy's.

Needs numpy and the flare-node binary (FLARE_NODE_BIN, default target/release/flare-node)."""

import csv
import gzip
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("FLARE_NODE_BIN") or os.path.join(ROOT, "target", "release", "flare-node")


def full_precision_copy(example, tmp_path):
    """A copy of the example whose output keeps 15 decimals; its data paths are found from
    the working directory (the repository's root), as the examples' are."""
    job = tmp_path / example
    shutil.copytree(os.path.join(ROOT, "examples", example), job)
    server = job / "app" / "config" / "config_fed_server.json"
    config = json.loads(server.read_text())
    config["workflows"][0]["args"]["precision"] = 15
    server.write_text(json.dumps(config))
    return job


def simulate(job, n, ws):
    out = subprocess.run([BIN, "simulator", str(job), "-n", str(n), "-w", str(ws), "--json", "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    with open(report["statistics"]["json"]) as f:
        stats = json.load(f)
    assert stats == report["statistics"]["output"]
    return stats


def glob(stats, feature, stat):
    return stats[feature][stat]["Global"]["train"]


def check(stats, feature, pooled, exact_mean):
    pooled = np.asarray(pooled, dtype=np.float64)
    assert glob(stats, feature, "count") == pooled.size
    mean = float(np.mean(pooled))
    if exact_mean:
        assert glob(stats, feature, "mean") == round(mean, 15), feature
    else:
        assert glob(stats, feature, "mean") == pytest.approx(mean, rel=1e-12, abs=0), feature
    var = float(np.var(pooled, ddof=1))
    assert glob(stats, feature, "var") == pytest.approx(var, rel=1e-9, abs=0), feature
    assert glob(stats, feature, "stddev") == pytest.approx(np.sqrt(var), rel=1e-9, abs=0), feature
    assert glob(stats, feature, "min") <= pooled.min()
    assert glob(stats, feature, "max") >= pooled.max()


def idx(name):
    with gzip.open(os.path.join(ROOT, "data", "mnist", name), "rb") as f:
        raw = f.read()
    offset = 16 if name.startswith("t10k-images") else 8
    return np.frombuffer(raw, dtype=np.uint8, offset=offset)


@pytest.mark.parametrize("n", [3, 5])
def test_mnist_statistics_equal_numpys(tmp_path, n):
    stats = simulate(full_precision_copy("stats-mnist", tmp_path), n, tmp_path / "ws")
    pixels = idx("t10k-images-idx3-ubyte.gz")
    labels = idx("t10k-labels-idx1-ubyte.gz")
    assert pixels.size == 10_000 * 784 and labels.size == 10_000
    check(stats, "intensity", pixels, exact_mean=True)
    check(stats, "label", labels, exact_mean=True)
    want, _ = np.histogram(pixels, bins=256, range=(0, 256))
    got = [b[2] for b in glob(stats, "intensity", "histogram")]
    assert got == want.tolist()
    assert len(stats["label"]["count"]) == n + 1, "every site and Global"


@pytest.mark.parametrize("n", [2, 3])
def test_csv_statistics_equal_numpys(tmp_path, n):
    stats = simulate(full_precision_copy("stats-csv", tmp_path), n, tmp_path / "ws")
    with open(os.path.join(ROOT, "data", "iris", "iris.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 150
    for feature in ["sepal_length", "sepal_width", "petal_length", "petal_width"]:
        check(stats, feature, [float(r[feature]) for r in rows], exact_mean=False)
