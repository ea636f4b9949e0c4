"""TensorBoard reads what Flare's metric pipeline writes: hello-fedavg and swarm-mnist in the
simulator leave `tb_events/<site>/events.out.tfevents.*` (one run per site) and
`tb_events/global_model/`, which TensorBoard's own EventAccumulator and its web server read;
a headless Chromium screenshot of TensorBoard's page goes to target/tensorboard-screenshots/
(and to docs/tensorboard.png with FLARE_UPDATE_SCREENSHOTS=1).

Needs `tensorboard` in this interpreter (scripts/test-all.sh installs it in .venv-test),
the flare-node binary (FLARE_NODE_BIN), and Debian's chromium (scripts/install-chromium.sh)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tb_read  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("FLARE_NODE_BIN") or os.path.join(ROOT, "target", "release", "flare-node")
SITE_TAGS = {"train_loss", "learning_rate", "samples_per_sec", "val_acc_global_model", "val_loss_global_model"}


def simulate(job, n, ws):
    out = subprocess.run([BIN, "simulate", os.path.join(ROOT, "examples", job), "-n", str(n), "-w", ws,
                          "--json", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return os.path.join(ws, "server", "simulate_job", "tb_events")


def runs_of(logdir):
    return {run: tb_read.read_run(folder) for run, folder in tb_read.run_dirs(logdir)}


@pytest.mark.parametrize("job,n,rounds,epochs", [("hello-fedavg", 2, 5, 1), ("swarm-mnist", 3, 5, 2)])
def test_each_site_has_its_curves_and_the_global_model_its_rounds(job, n, rounds, epochs, tmp_path):
    runs = runs_of(simulate(job, n, str(tmp_path / "ws")))
    assert set(runs) == {"site-%d" % i for i in range(1, n + 1)} | {"global_model"}, sorted(runs)
    for i in range(1, n + 1):
        site = runs["site-%d" % i]
        assert SITE_TAGS <= set(site), (i, sorted(site))
        # One training-loss point per local epoch, steps 0, 1, ... in order.
        steps = [s for s, _ in site["train_loss"]]
        assert steps == list(range(len(steps))) and len(steps) >= rounds * epochs, steps
        assert all(0 < v < 5 for _, v in site["train_loss"]), site["train_loss"]
        # The validation of every model received: accuracy in [0, 1], steps = rounds.
        val = site["val_acc_global_model"]
        assert [s for s, _ in val] == sorted(s for s, _ in val) and all(0 <= v <= 1 for _, v in val), val
    acc = runs["global_model"]["accuracy"]
    assert [s for s, _ in acc] == list(range(rounds + 1)), acc
    assert acc[-1][1] > 0.85, acc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def test_tensorboard_serves_the_curves_and_a_browser_draws_them(tmp_path):
    logdir = simulate("swarm-mnist", 3, str(tmp_path / "ws"))
    port = free_port()
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1",
                           "--port", str(port), "--reload_interval", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = "http://127.0.0.1:%d" % port
        deadline = time.monotonic() + 60
        tags = {}
        while time.monotonic() < deadline:
            try:
                tags = json.loads(get(base + "/data/plugin/scalars/tags"))
                if {"site-1", "site-2", "site-3", "global_model"} <= set(tags):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert {"site-1", "site-2", "site-3", "global_model"} <= set(tags), tags
        assert "train_loss" in tags["site-1"] and "accuracy" in tags["global_model"], tags
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            pytest.fail("no chromium: install Debian's package (scripts/install-chromium.sh, or apt-get install chromium)")
        shots = os.path.join(ROOT, "target", "tensorboard-screenshots")
        os.makedirs(shots, exist_ok=True)
        png = os.path.join(shots, "tensorboard.png")
        if os.path.exists(png):
            os.remove(png)
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1400,1000", "--virtual-time-budget=20000", "--screenshot=" + png,
                        base + "/?darkMode=false#timeseries"],
                       capture_output=True, timeout=120, cwd=str(tmp_path))
        assert os.path.getsize(png) > 20_000, "the screenshot of TensorBoard is missing or blank"
        if os.environ.get("FLARE_UPDATE_SCREENSHOTS") == "1":
            shutil.copy(png, os.path.join(ROOT, "docs", "tensorboard.png"))
    finally:
        tb.terminate()
        tb.wait(timeout=30)
