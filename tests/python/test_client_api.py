"""The Python Client API (clients/python, `flare_client`) driven through its state machine by
a mock node (flare_client.sim.FakeNode, which speaks docs/client-api.md). Every trainer runs
in a subprocess in a session of its own, as a node starts it, so that the process-group kills
under test never reach pytest."""

import json
import math
import os
import select
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "clients", "python")
sys.path.insert(0, PKG)  # the working tree's package, whether or not the venv holds a copy

import flare_client  # noqa: E402
from flare_client import _params, _st  # noqa: E402
from flare_client.sim import FakeNode, add_raw  # noqa: E402

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flare_scripts")
ENV = {"PYTHONPATH": PKG + os.pathsep + os.environ.get("PYTHONPATH", "")}


def have(mod):
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def f32(*vals):
    return ("F32", [len(vals)], struct.pack("<%df" % len(vals), *vals))


def unf32(t):
    dtype, shape, data = t
    assert dtype == "F32"
    return list(struct.unpack("<%df" % (len(data) // 4), data))


@pytest.fixture
def node(request):
    nodes = []

    def make(**kw):
        n = FakeNode(**kw)
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        n.close()


def launch(node, tmp_path, body, env=None, name="trainer.py"):
    script = tmp_path / name
    script.write_text(textwrap.dedent(body))
    e = dict(ENV)
    e.update(env or {})
    node.launch([sys.executable, "-u", str(script)], cwd=str(tmp_path), env=e,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return node.proc


def finish(proc, timeout=30):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def pgroup_members(pgid):
    """Live (not zombie) processes of process group `pgid`."""
    live = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = open("/proc/%s/stat" % pid).read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(pid))
    return live


def wait_gone(pgid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pgroup_members(pgid):
            return True
        time.sleep(0.1)
    return False


# ---- files and models, in process --------------------------------------------------------


@pytest.mark.skipif(not (have("numpy") and have("safetensors")), reason="numpy and safetensors needed")
def test_safetensors_files_agree_with_the_safetensors_package(tmp_path):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "h": np.array([1.5, -2.0], dtype=np.float16),
        "n": np.array(7, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "t": np.arange(6, dtype=np.float64).reshape(2, 3).T,  # not contiguous
        "be": np.arange(3, dtype=">i4"),  # big-endian: written little-endian
    }
    mine = tmp_path / "mine.safetensors"
    _st.write(str(mine), _params.items_for(arrays), {"format": "np"})
    theirs = load_file(str(mine))
    assert set(theirs) == set(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(theirs[k], v)
        assert theirs[k].shape == v.shape
    other = tmp_path / "theirs.safetensors"
    save_file({k: np.ascontiguousarray(v.astype(v.dtype.newbyteorder("<"))) for k, v in arrays.items()}, str(other))
    back = _st.SafetensorsFile(str(other)).load("numpy")
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].flags.writeable  # a private mapping: the user may train in place


def test_bf16_cannot_be_numpy_and_the_error_says_so(tmp_path):
    p = tmp_path / "bf16.safetensors"
    _st.write_raw(str(p), {"e": ("BF16", [2], struct.pack("<2H", 0x3F80, 0x4000))})
    f = _st.SafetensorsFile(str(p))
    assert f.raw("e") == struct.pack("<2H", 0x3F80, 0x4000)
    if have("numpy"):
        with pytest.raises(flare_client.FlareModelError, match="pytorch"):
            f.numpy("e")


def test_a_truncated_file_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.safetensors"
    _st.write_raw(str(p), {"w": f32(1, 2, 3)})
    data = p.read_bytes()
    p.write_bytes(data[:-4])
    with pytest.raises(flare_client.FlareModelError, match="data_offsets"):
        _st.SafetensorsFile(str(p))


def test_flmodel_follows_flare():
    m = flare_client.FLModel(params={"w": 1})
    assert m.params_type == flare_client.ParamsType.FULL
    assert flare_client.FLModel().params_type is None
    assert flare_client.FLModel(params_type="diff", params={}).params_type == flare_client.ParamsType.DIFF
    assert flare_client.FLModel({"w": 1}).params == {"w": 1}  # a model given first is params
    assert m.meta == {} and m.start_round == 0
    assert issubclass(flare_client.FlareStateError, flare_client.FlareError)
    assert issubclass(flare_client.FlareResultRejected, flare_client.FlareError)


def test_the_harness_adds_a_diff_in_every_dtype():
    assert unf32(add_raw(f32(1, 2), f32(0.5, -1))) == [1.5, 1.0]
    bf = add_raw(("BF16", [2], struct.pack("<2H", 0x3F80, 0x4000)), ("BF16", [2], struct.pack("<2H", 0x3F80, 0x3F80)))
    assert struct.unpack("<2H", bf[2]) == (0x4000, 0x4040)  # 1+1 = 2, 2+1 = 3


# ---- the session -------------------------------------------------------------------------


def test_a_wrong_token_is_rejected_and_init_says_why(node, tmp_path):
    n = node()
    proc = launch(n, tmp_path, """
        import sys
        import flare_client as flare
        try:
            flare.init()
        except flare.FlareRejectedError as e:
            print("REJECTED:", e.reason)
            sys.exit(3)
        """, env={"FLARE_CLIENT_TOKEN": "0" * 32})
    assert n.handshake() is False
    code, out = finish(proc)
    assert code == 3, out
    assert "REJECTED: wrong token" in out


def test_tasks_diff_rejection_duplicates_and_shutdown(node, tmp_path):
    n = node(params_transfer_type="DIFF", params_format="numpy")
    proc = launch(n, tmp_path, """
        import numpy as np
        import flare_client as flare
        try:
            flare.receive()
        except flare.FlareStateError as e:
            print("receive before init:", e)
        flare.init()
        try:
            flare.send(flare.FLModel(metrics={"a": 1.0}))
        except flare.FlareStateError as e:
            print("send before receive:", e)
        assert flare.is_running()
        m = flare.receive()
        assert flare.is_train() and flare.get_task_name() == "train"
        assert (m.current_round, m.total_rounds) == (0, 2), m
        assert m.meta["job_id"] == "sim-job" and m.meta["color"] == "blue", m.meta
        assert isinstance(m.params["w"], np.ndarray) and m.params_type == flare.ParamsType.FULL
        m.params["w"] += 0.0  # writable
        out = flare.FLModel(params={k: v + 1.5 for k, v in m.params.items()}, metrics={"accuracy": np.float32(0.5)},
                            meta={"NUM_STEPS_CURRENT_ROUND": np.int64(7)})
        flare.send(out)
        assert out.params is None  # clear_cache
        try:
            flare.send(flare.FLModel(metrics={"a": 1.0}))
        except flare.FlareStateError as e:
            print("second send:", e)
        m = flare.receive()
        try:
            flare.send(flare.FLModel(params=m.params))
        except flare.FlareResultRejected as e:
            print("rejected:", e.reason)
        m = flare.receive()  # the duplicate of task 2 is skipped: this is task 3
        assert flare.is_evaluate(), flare.get_task_name()
        try:
            flare.send(flare.FLModel(metrics={"loss": float("nan")}))
        except flare.FlareModelError as e:
            print("nan:", e)
        flare.send(flare.FLModel(metrics={"loss": 0.25}))
        while flare.is_running():
            flare.receive()
        print("after shutdown:", flare.is_running(), flare.receive())
        """)
    assert n.handshake()
    assert n.hello["rank"] == "0" and n.hello["client"].startswith("flare_client-python/")
    model = {"w": f32(1, 2, 3), "b": ("F32", [2, 2], struct.pack("<4f", 0, 0, 0, 0))}
    n.send_task("train", model, round=0, total_rounds=2, meta={"color": "blue"})
    res, got = n.answer(30)
    assert res["rc"] == "OK" and res["params_type"] == "DIFF", res
    assert unf32(got["w"]) == [1.5, 1.5, 1.5]
    assert unf32(("F32", [4], got["b"][2])) == [1.5] * 4 and got["b"][1] == [2, 2]
    assert res["meta"]["NUM_STEPS_CURRENT_ROUND"] == 7 and res["metrics"] == {"accuracy": 0.5}
    assert os.listdir(n.exchange_dir) == []  # no temporary file left behind

    n.send_task("train", model, round=1, total_rounds=2)
    res, _ = n.answer(30, reject="the aggregator refused it")
    assert res["rejected"] == "the aggregator refused it"
    n.send({"type": "task", "task_id": 2, "name": "train", "round": 1, "total_rounds": 2, "meta": {},
            "model": None})
    n.send_task("validate", model, round=2, total_rounds=2)
    res, got = n.answer(30)
    assert res["model"] is None and got is None and res["metrics"] == {"loss": 0.25}
    n.shutdown()
    code, out = finish(proc)
    assert code == 0, out
    for line in ["receive before init:", "send before receive:", "second send: send() called twice for task 1",
                 "rejected: the aggregator refused it", "nan: metric 'loss' must be a finite number",
                 "after shutdown: False None"]:
        assert line in out, out


def test_abort_ends_receive(node, tmp_path):
    n = node()
    proc = launch(n, tmp_path, """
        import flare_client as flare
        flare.init()
        print("got", flare.receive(), flare.is_running())
        """)
    assert n.handshake()
    n.send({"type": "abort", "reason": "the admin aborted the job"})
    code, out = finish(proc)
    assert code == 0 and "got None False" in out, out
    assert "aborted: the admin aborted the job" in out


def test_ten_thousand_scalars_arrive_in_order_in_few_messages(node, tmp_path):
    n = node(params_format="numpy")
    proc = launch(n, tmp_path, """
        import flare_client as flare
        from flare_client.tracking import MLflowWriter, SummaryWriter, WandBWriter
        flare.init()
        m = flare.receive()
        w = SummaryWriter()
        for i in range(10000):
            w.add_scalar("loss", i * 0.5, global_step=i)
        w.add_scalars("acc", {"train": 0.9, "val": 0.8}, global_step=3)
        ml = MLflowWriter()
        ml.log_metric("lr", 0.01, step=1)
        ml.log_metrics({"a": 1.0, "b": 2.0}, step=2)
        ml.log_params({"batch": 32})
        ml.set_tag("model", "cnn")
        ml.log_text("hello", "notes.txt")
        WandBWriter().log({"wb": 4.0}, step=5)
        flare.log("direct", 1.25, flare.AnalyticsDataType.SCALAR, global_step=9)
        flare.send(flare.FLModel(metrics={"accuracy": 1.0}))
        """)
    assert n.handshake()
    n.send_task("train", {"w": f32(0)})
    res, _ = n.answer(60)
    assert res["rc"] == "OK"
    loss = [r for r in n.records if r["key"] == "loss"]
    assert len(loss) == 10000
    assert [r["step"] for r in loss] == list(range(10000))
    assert all(r["value"] == r["step"] * 0.5 and r["kind"] == "scalar" for r in loss)
    assert n.log_messages <= 20, n.log_messages
    by_key = {r["key"]: r for r in n.records}
    assert by_key["acc"]["kind"] == "scalars" and by_key["acc"]["value"] == {"train": 0.9, "val": 0.8}
    assert by_key["lr"]["value"] == 0.01 and by_key["a"]["step"] == 2 and by_key["b"]["value"] == 2.0
    # MLflow params and tags go as their own kinds (the server's MLflow writer stores them so).
    assert by_key["batch"] == {"key": "batch", "kind": "param", "value": "32"}
    assert by_key["model"]["value"] == "cnn" and by_key["model"]["kind"] == "tag"
    assert by_key["notes.txt"]["value"] == "hello" and by_key["notes.txt"]["kind"] == "text"
    assert by_key["wb"]["value"] == 4.0 and by_key["direct"]["step"] == 9
    n.shutdown()
    code, out = finish(proc)
    assert code == 0, out


def test_heartbeats_flow_and_flush_logs(node, tmp_path):
    n = node(heartbeat_interval=0.2)
    proc = launch(n, tmp_path, """
        import time
        import flare_client as flare
        flare.init()
        m = flare.receive()
        flare.log("x", 1.0, global_step=1)
        time.sleep(1.5)
        flare.send(flare.FLModel(metrics={"accuracy": 1.0}))
        """)
    assert n.handshake()
    n.send_task("train", None)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and not n.records:
        r, _, _ = select.select([n.conn], [], [], 0.1)
        if r:
            msg = n._read(5)
            if msg["type"] == "heartbeat":
                n.heartbeats += 1
            elif msg["type"] == "log":
                n.records.extend(msg["records"])
    assert n.records and n.records[0]["key"] == "x"  # flushed by the heartbeat, before the result
    res, _ = n.answer(30)
    assert n.heartbeats >= 3
    n.shutdown()
    assert finish(proc)[0] == 0


def test_an_uncaught_exception_fails_the_task_with_its_traceback(node, tmp_path):
    n = node()
    proc = launch(n, tmp_path, """
        import flare_client as flare
        flare.init()
        flare.receive()
        raise ValueError("the loss exploded")
        """)
    assert n.handshake()
    n.send_task("train", None)
    res, _ = n.answer(30)
    assert res["rc"] == "EXECUTION_EXCEPTION"
    assert "ValueError: the loss exploded" in res["reason"]
    code, out = finish(proc)
    assert code == 1 and "the loss exploded" in out


def test_other_ranks_do_not_connect(node, tmp_path):
    n = node()
    proc = launch(n, tmp_path, """
        import flare_client as flare
        flare.init()
        assert flare.receive() is None
        flare.send(flare.FLModel(metrics={"a": 1.0}))  # nothing to send from rank 1
        flare.log("x", 1.0)
        print("rank 1 done", flare.is_running())
        flare.shutdown()
        print("after shutdown", flare.is_running())
        """, env={"RANK": "1"})
    code, out = finish(proc)
    assert code == 0 and "rank 1 done True" in out and "after shutdown False" in out, out
    r, _, _ = select.select([n.listener], [], [], 0)
    assert not r, "rank 1 connected"


def test_the_end_of_the_connection_kills_the_process_group(node, tmp_path):
    n = node()
    proc = launch(n, tmp_path, """
        import subprocess, sys
        import flare_client as flare
        flare.init()
        child = subprocess.Popen(["sleep", "300"])
        print("child", child.pid, flush=True)
        flare.receive()
        print("not reached")
        """)
    assert n.handshake()
    line = proc.stdout.readline()
    assert line.startswith("child"), line
    child = int(line.split()[1])
    pgid = proc.pid
    assert child in pgroup_members(pgid)
    n.close_conn()
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    assert wait_gone(pgid), pgroup_members(pgid)
    assert "not reached" not in proc.stdout.read()


def test_a_dead_parent_kills_the_group_even_before_init(tmp_path):
    trainer = tmp_path / "hang.py"
    trainer.write_text("import time\nimport flare_client\ntime.sleep(300)\n")
    parent = tmp_path / "parent.py"
    parent.write_text(textwrap.dedent("""
        import os, subprocess, sys, time
        env = dict(os.environ, FLARE_CLIENT_SOCKET="/nonexistent/client_api.sock",
                   FLARE_CLIENT_PARENT_PID=str(os.getpid()))
        p = subprocess.Popen([sys.executable, sys.argv[1]], env=env)
        print(p.pid, flush=True)
        time.sleep(300)
        """))
    env = dict(os.environ, **ENV)
    env.pop("FLARE_CLIENT_SOCKET", None)
    proc = subprocess.Popen([sys.executable, str(parent), str(trainer)], env=env, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        pid = int(proc.stdout.readline())
        time.sleep(1.0)  # the trainer imported flare_client
        assert pid in pgroup_members(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_gone(proc.pid, 10), pgroup_members(proc.pid)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_misuse_is_a_flare_error_outside_a_node(tmp_path):
    script = tmp_path / "plain.py"
    script.write_text(textwrap.dedent("""
        import flare_client as flare
        for call in (flare.is_running, flare.receive, lambda: flare.send(flare.FLModel())):
            try:
                call()
            except flare.FlareStateError as e:
                print("state:", e)
        try:
            flare.init()
        except flare.FlareConnectionError as e:
            print("init:", e)
        """))
    env = dict(os.environ, **ENV)
    env.pop("FLARE_CLIENT_SOCKET", None)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("state:") == 3 and "before flare.init()" in out.stdout
    assert "FLARE_CLIENT_SOCKET is not set" in out.stdout


@pytest.mark.skipif(not have("torch"), reason="torch is not installed (scripts/test-torch.sh runs this)")
def test_torch_bf16_tied_and_strided_tensors_round_trip(node, tmp_path):
    import torch

    e = torch.arange(12, dtype=torch.float32).reshape(4, 3).to(torch.bfloat16) / 8
    w = torch.linspace(-1, 1, 12).reshape(3, 4)
    raw = lambda t: bytes(t.contiguous().view(torch.uint8).numpy().tobytes())  # noqa: E731
    model = {"e": ("BF16", [4, 3], raw(e)), "e_tied": ("BF16", [4, 3], raw(e)), "w": ("F32", [3, 4], raw(w))}
    n = node(params_transfer_type="DIFF")
    proc = launch(n, tmp_path, """
        import torch
        import flare_client as flare
        flare.init()
        m = flare.receive()
        assert m.params["e"].dtype == torch.bfloat16 and m.params["w"].dtype == torch.float32
        e = m.params["e"] * 2
        w = m.params["w"].clone().t().contiguous().t() + 1  # not contiguous
        assert not w.is_contiguous()
        flare.send(flare.FLModel(params={"e": e, "e_tied": e, "w": w}, params_type=flare.ParamsType.FULL))
        m = flare.receive()
        # a model that is a DIFF already goes as it is
        flare.send(flare.FLModel(params={"e": m.params["e"], "e_tied": m.params["e"][:], "w": m.params["w"]},
                                 params_type=flare.ParamsType.DIFF))
        """)
    assert n.handshake()
    n.send_task("train", model)
    res, got = n.answer(60)
    assert res["params_type"] == "DIFF"  # params - received, computed by the client
    assert got["e"][2] == raw(e * 2 - e) and got["e_tied"][2] == got["e"][2]
    assert got["w"][2] == raw(w + 1 - w)
    n.send_task("train", model)
    res, got = n.answer(60)
    assert res["params_type"] == "DIFF"
    assert got["e"][2] == raw(e) and got["e_tied"][2] == raw(e) and got["w"][2] == raw(w)
    n.shutdown()
    code, out = finish(proc)
    assert code == 0, out


# ---- FLARE users' scripts ----------------------------------------------------------------


def flare_script(name, tmp_path):
    """A FLARE Client API script with only its nvflare imports changed."""
    src = open(os.path.join(SCRIPTS, name)).read()
    ported = src.replace("import nvflare.client as flare", "import flare_client as flare").replace(
        "from nvflare.client.tracking import", "from flare_client.tracking import")
    changed = [(a, b) for a, b in zip(src.splitlines(), ported.splitlines()) if a != b]
    assert len(changed) == 2 and all("import" in a and "nvflare" in a for a, _ in changed), changed
    path = tmp_path / name
    path.write_text(ported)
    return path


def run_flare_user_job(n, script, initial, rounds=2):
    n.launch([sys.executable, "-u", str(script)], cwd=str(script.parent), env=ENV,
             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert n.handshake()
    assert n.hello["token"] == n.token
    global_model = initial
    for r in range(rounds):
        n.send_task("train", global_model, round=r, total_rounds=rounds)
        res, model = n.answer(120)
        assert res["rc"] == "OK" and "rejected" not in res, res
        assert res["params_type"] == "FULL" and res["meta"]["NUM_STEPS_CURRENT_ROUND"] > 0
        assert math.isfinite(res["metrics"]["accuracy"])
        assert set(model) == set(initial)
        global_model = model
    n.send_task("validate", global_model, round=rounds, total_rounds=rounds)
    res, model = n.answer(60)
    assert res["rc"] == "OK" and model is None and set(res["metrics"]) == {"accuracy"}, res
    n.send_task("submit_model", None, round=rounds, total_rounds=rounds)
    res, model = n.answer(60)
    assert res["rc"] == "OK" and set(model) == set(initial), res
    n.shutdown()
    code, out = finish(n.proc, 60)
    assert code == 0, out
    return global_model, out


def test_a_flare_numpy_script_runs_with_only_its_imports_changed(node, tmp_path):
    script = flare_script("hello_numpy_client.py", tmp_path)
    n = node(params_format="numpy")
    initial = {"numpy_key": ("F32", [3, 3], struct.pack("<9f", *range(9)))}
    final, out = run_flare_user_job(n, script, initial)
    assert unf32(("F32", [9], final["numpy_key"][2])) == [v + 2 for v in range(9)]
    assert "system info is: {'job_id': 'sim-job', 'site_name': 'site-1'}" in out
    assert [r["step"] for r in n.records if r["key"] == "loss"] == list(range(20))


@pytest.mark.skipif(not have("torch"), reason="torch is not installed (scripts/test-torch.sh runs this)")
def test_a_flare_hello_pt_script_runs_with_only_its_imports_changed(node, tmp_path):
    import torch

    script = flare_script("hello_pt_client.py", tmp_path)
    sys.path.insert(0, SCRIPTS)
    try:
        torch.manual_seed(0)
        fc1, fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 2)
    finally:
        sys.path.remove(SCRIPTS)
    raw = lambda t: t.detach().contiguous().view(torch.uint8).numpy().tobytes()  # noqa: E731
    initial = {
        "fc1.weight": ("F32", [16, 8], raw(fc1.weight)), "fc1.bias": ("F32", [16], raw(fc1.bias)),
        "fc2.weight": ("F32", [2, 16], raw(fc2.weight)), "fc2.bias": ("F32", [2], raw(fc2.bias)),
    }
    n = node(params_format="pytorch")
    run_flare_user_job(n, script, initial, rounds=3)
    steps = [r["step"] for r in n.records if r["key"] == "loss_for_each_batch"]
    assert len(steps) == 3 * 16 and steps == sorted(steps)


def test_the_sim_command_runs_a_flare_script(tmp_path):
    script = flare_script("hello_numpy_client.py", tmp_path)
    initial = tmp_path / "initial.safetensors"
    _st.write_raw(str(initial), {"numpy_key": ("F32", [2], struct.pack("<2f", 1, 2))})
    report = tmp_path / "report.json"
    final = tmp_path / "final.safetensors"
    env = dict(os.environ, **ENV)
    out = subprocess.run([sys.executable, "-m", "flare_client.sim", str(script), "--rounds", "3",
                          "--initial", str(initial), "--params-format", "numpy", "--transfer-type", "DIFF",
                          "--submit-model", "--report", str(report), "--out", str(final)],
                         env=env, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    rep = json.loads(report.read_text())
    assert [r["params_type"] for r in rep["rounds"]] == ["DIFF"] * 3
    assert [r["metrics"]["accuracy"] for r in rep["rounds"]] == [1.5, 2.5, 3.5]
    assert rep["validate"] == {"accuracy": 4.5} and rep["submit_model"]["tensors"] == 1
    assert rep["logs"]["records"] == 30 and rep["exit_code"] == 0
    assert unf32(_st.read_raw(str(final))["numpy_key"]) == [4.0, 5.0]
    assert "[sim] round 3/3" in out.stdout and "accuracy=4.5000" in out.stdout
