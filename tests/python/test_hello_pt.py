"""examples/hello-pt and examples/hello-pt-swarm: a PyTorch script federated with the Client
API, run by flare-node's ScriptExecutor in the simulator and in a POC federation of real
processes (a server and three sites), each reaching >= 97% held-out accuracy; and the same
script under the harness (python -m flare_client.sim).

Needs torch in this interpreter (scripts/test-torch.sh runs it in .venv-torch) and the
flare-node binary: FLARE_NODE_BIN, default target/release/flare-node; this file builds
nothing. The sites run `python3` from PATH: this interpreter's bin folder goes first."""

import difflib
import json
import os
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "clients", "python")
EXAMPLES = os.path.join(ROOT, "examples")
BIN = os.environ.get("FLARE_NODE_BIN") or os.path.join(ROOT, "target", "release", "flare-node")
TARGET = 0.97
JOBS = ["hello-pt", "hello-pt-swarm"]


def env():
    e = dict(os.environ)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e["PYTHONPATH"] = PKG + os.pathsep + e.get("PYTHONPATH", "")
    e["FLARE_DATA_ROOT"] = ROOT
    e.pop("FLARE_CLIENT_SOCKET", None)
    return e


def node_bin():
    if not os.access(BIN, os.X_OK):
        pytest.fail("no flare-node binary at %s (set FLARE_NODE_BIN or build it: cargo build --release -p flare-hub)" % BIN)
    return BIN


def run(args, timeout=600, check=True, **kw):
    out = subprocess.run([node_bin()] + args, cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise AssertionError("flare-node %s: exit %s\nstdout:\n%s\nstderr:\n%s"
                             % (" ".join(args), out.returncode, out.stdout[-4000:], out.stderr[-4000:]))
    return out


def final_accuracy(metrics):
    """The accuracy of the last version of a {version: {metric: value}} table."""
    versions = sorted(int(v) for v, m in metrics.items() if "accuracy" in m)
    assert versions, metrics
    return versions[-1], metrics[str(versions[-1])]["accuracy"]


def trainers_under(folder):
    """Live processes running custom/train.py whose working directory is inside `folder`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open("/proc/%s/cmdline" % pid, "rb").read().split(b"\0")
            cwd = os.readlink("/proc/%s/cwd" % pid)
            state = open("/proc/%s/stat" % pid).read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(c.endswith(b"custom/train.py") for c in cmd) and cwd.startswith(folder):
            found.append(int(pid))
    return found


def tensorboard_runs(logdir):
    """What TensorBoard itself reads in `logdir`: {run: {tag: [[step, value], ...]}}."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tb_read  # needs the tensorboard package (scripts/test-torch.sh installs it)

    return {run: tb_read.read_run(folder) for run, folder in tb_read.run_dirs(logdir)}


def check_curves(logdir, rounds=5):
    """Each site's run holds the program's `train_loss` (one point a round, steps in order)
    and the validation of every global model it received; the global model's run its
    accuracy per round."""
    runs = tensorboard_runs(logdir)
    for site in ("site-1", "site-2", "site-3"):
        assert site in runs, "no TensorBoard run for %s in %s: %s" % (site, logdir, sorted(runs))
        loss = runs[site].get("train_loss", [])
        steps = [s for s, _ in loss]
        assert steps == sorted(steps) and len(steps) >= rounds, (site, loss)
    assert len(runs["global_model"]["accuracy"]) >= rounds, runs["global_model"]


def no_trainers_left(folder, timeout=30):
    deadline = time.monotonic() + timeout
    while trainers_under(folder) and time.monotonic() < deadline:
        time.sleep(0.5)
    return trainers_under(folder)


# ---- the example's files -----------------------------------------------------------------


def test_the_federated_script_is_the_centralized_one_plus_marked_lines():
    central = open(os.path.join(EXAMPLES, "hello-pt", "centralized", "train.py")).read().splitlines()
    fed = open(os.path.join(EXAMPLES, "hello-pt", "app", "custom", "train.py")).read().splitlines()
    code_start = next(i for i, l in enumerate(fed) if l.startswith("import"))
    changed = [l for l in difflib.ndiff(central, fed) if l.startswith("+ ")]
    docstring = set(fed[:code_start])
    unmarked = [l for l in changed if "# FL" not in l and l[2:] not in docstring and l[2:].strip()]
    assert not unmarked, unmarked
    swarm = open(os.path.join(EXAMPLES, "hello-pt-swarm", "app", "custom", "train.py")).read().splitlines()
    assert swarm == fed, "hello-pt-swarm runs the same client script"


def test_the_initial_model_is_small_and_fits_the_cnn():
    sys.path.insert(0, os.path.join(EXAMPLES, "hello-pt", "centralized"))
    try:
        from train import Net
    finally:
        sys.path.pop(0)
    sys.path.insert(0, PKG)
    from flare_client import _st

    for job in JOBS:
        path = os.path.join(EXAMPLES, job, "app", "models", "initial.safetensors")
        assert os.path.getsize(path) < 1 << 20
        f = _st.SafetensorsFile(path)
        state = Net().state_dict()
        assert {n: (d, s) for n, d, s, _, _ in f.entries} == {k: ("F32", list(v.shape)) for k, v in state.items()}
        Net().load_state_dict(f.load("pytorch"))
    a, b = (open(os.path.join(EXAMPLES, j, "app", "models", "initial.safetensors"), "rb").read() for j in JOBS)
    assert a == b


def test_the_job_configs_name_the_script_executor():
    for job in JOBS:
        cfg = json.load(open(os.path.join(EXAMPLES, job, "app", "config", "config_fed_client.json")))
        ex = cfg["executors"][0]
        assert ex["tasks"] == ["train", "validate", "submit_model"]
        assert ex["executor"]["name"] == "ScriptExecutor"
        args = ex["executor"]["args"]
        assert args["command"][:3] == ["python3", "-u", "custom/train.py"]
        assert args["launch_once"] is True and args["params_transfer_type"] == "FULL"
        server = json.load(open(os.path.join(EXAMPLES, job, "app", "config", "config_fed_server.json")))
        model = [c for c in server["components"] if c["id"] == "model"][0]
        assert model["name"] == "SafetensorsModel"
        assert os.path.isfile(os.path.join(EXAMPLES, job, "app", model["args"]["path"]))


# ---- the script under the harness --------------------------------------------------------


def test_the_federated_script_runs_under_the_harness(tmp_path):
    report = tmp_path / "report.json"
    app = os.path.join(EXAMPLES, "hello-pt", "app")
    out = subprocess.run(
        [sys.executable, "-m", "flare_client.sim", os.path.join(app, "custom", "train.py"), "--rounds", "2",
         "--initial", os.path.join(app, "models", "initial.safetensors"), "--submit-model",
         "--report", str(report), "--", "--epochs", "1", "--num-sites", "3"],
        env=env(), capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rep = json.loads(report.read_text())
    first, second = rep["rounds"]
    assert first["metrics"]["accuracy"] < 0.3  # the initial model
    assert first["meta"]["NUM_STEPS_CURRENT_ROUND"] == 84  # ceil(8000 / 3 / 32): site-1's shard
    assert second["metrics"]["accuracy"] > 0.85  # after one local epoch on a third of the data
    assert rep["validate"]["accuracy"] > 0.9
    assert rep["submit_model"]["tensors"] == 8
    assert rep["logs"]["last"]["train_loss"] > 0


# ---- flare-node: the simulator -----------------------------------------------------------


@pytest.mark.parametrize("job", JOBS)
def test_the_simulator_runs_the_example_to_97_percent(job, tmp_path):
    ws = str(tmp_path / "ws")
    out = run(["simulate", os.path.join(EXAMPLES, job), "-n", "3", "-w", ws, "--json", "--quiet"], timeout=1200)
    text = out.stdout
    try:
        report = json.loads(text)
    except ValueError:  # something else on stdout: the report is the last JSON object
        report = json.loads(text[text.rindex("\n{") + 1 :] if "\n{" in text else text[text.index("{") :])
    version, acc = final_accuracy(report["metrics"])
    assert version == 5, report["metrics"]
    assert acc >= TARGET, "%s: held-out accuracy %.4f after %d rounds\n%s" % (job, acc, version, out.stderr[-3000:])
    assert os.path.isfile(report["final_model"])
    assert not no_trainers_left(ws), "trainers outlived the simulator"
    check_curves(os.path.join(ws, "server", "simulate_job", "tb_events"))


# ---- flare-node: a POC federation of real processes --------------------------------------


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    ws = str(tmp_path_factory.mktemp("poc") / "poc")
    run(["poc", "prepare", "-n", "3", "-w", ws])
    prod = None
    for d in os.listdir(ws):
        p = os.path.join(ws, d, "prod_00")
        if os.path.isdir(p):
            prod = p
    assert prod, os.listdir(ws)
    kit = os.path.join(prod, "admin@nvidia.com", "startup")
    run(["poc", "start", "-w", ws])
    try:
        deadline = time.monotonic() + 90
        while True:
            out = run(["admin", "--kit", kit, "--json", "sites"], check=False, timeout=60)
            if out.returncode == 0 and len(json.loads(out.stdout)) >= 3:
                break
            assert time.monotonic() < deadline, "the sites did not connect: %s %s" % (out.stdout, out.stderr)
            time.sleep(0.5)
        yield ws, prod, kit
    finally:
        run(["poc", "stop", "-w", ws], check=False, timeout=60)


def logs(prod):
    text = []
    for name in ("server", "site-1", "site-2", "site-3"):
        try:
            text.append("== %s\n%s" % (name, open(os.path.join(prod, name, "log.txt")).read()[-3000:]))
        except OSError:
            pass
    return "\n".join(text)


@pytest.mark.parametrize("job", JOBS)
def test_a_poc_federation_runs_the_example_to_97_percent(poc, job):
    ws, prod, kit = poc
    sub = run(["admin", "--kit", kit, "--json", "submit", os.path.join(EXAMPLES, job)], timeout=120)
    job_id = json.loads(sub.stdout)["job_id"]
    waited = run(["admin", "--kit", kit, "wait", job_id, "--timeout", "1200"], check=False, timeout=1300)
    assert waited.returncode == 0, "%s did not finish:\n%s\n%s\n%s" % (job, waited.stdout[-3000:], waited.stderr[-3000:], logs(prod))
    st = json.loads(run(["admin", "--kit", kit, "--json", "status", job_id]).stdout)
    assert st["state"] == "finished", st
    version, acc = final_accuracy(st["metrics"])
    assert version == 5, st["metrics"]
    assert acc >= TARGET, "%s: held-out accuracy %.4f after %d rounds" % (job, acc, version)
    left = no_trainers_left(ws)
    assert not left, "trainer processes outlived the job: %s" % left
    # `tensorboard --logdir <download>/tb_events` shows each site's curves.
    dl = json.loads(run(["admin", "--kit", kit, "--json", "download", job_id], timeout=300).stdout)
    check_curves(os.path.join(dl["dir"], "tb_events"))
