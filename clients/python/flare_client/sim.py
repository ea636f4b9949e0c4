"""A local harness: a fake node that speaks the Client API protocol (docs/client-api.md),
launches a training script as a site's flare-node would, and runs scatter-and-gather with one
site (FedAvg of one result is that result). Standard library only.

    python -m flare_client.sim train.py [script args] [--rounds 2] [--initial model.safetensors]

Options of the harness are recognized anywhere on the line; put the script's own arguments
after `--` when one of them has the name of a harness option. `FakeNode` is the same node
for tests.
"""

import argparse
import json
import math
import os
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

from . import _st, _wire


class NodeError(RuntimeError):
    """What a node would report as the task's failure."""


class FakeNode:
    """One site's side of the protocol, for one launch of a program."""

    def __init__(self, job_id="sim-job", site_name="site-1", params_transfer_type="FULL",
                 params_format="pytorch", heartbeat_interval=5.0, heartbeat_timeout=30.0,
                 train_with_evaluation=True, workdir=None):
        self.dir = tempfile.mkdtemp(prefix="flare-sim-", dir=workdir)
        os.chmod(self.dir, 0o700)
        self.socket_path = os.path.join(self.dir, "client_api.sock")
        self.exchange_dir = os.path.join(self.dir, "exchange")
        os.mkdir(self.exchange_dir)
        self.token = secrets.token_hex(16)
        self.job_id = job_id
        self.site_name = site_name
        self.accept_msg = {
            "type": "accept", "protocol": _wire.PROTOCOL, "job_id": job_id, "site_name": site_name,
            "heartbeat_interval": float(heartbeat_interval), "params_transfer_type": params_transfer_type,
            "params_format": params_format, "train_with_evaluation": bool(train_with_evaluation),
            "exchange_dir": self.exchange_dir,
        }
        self.heartbeat_timeout = heartbeat_timeout
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.socket_path)
        self.listener.listen(2)
        self.conn = None
        self.proc = None
        self.hello = None
        self.records = []
        self.log_messages = 0
        self.heartbeats = 0
        self.last_heard = time.monotonic()
        self.next_task_id = 1
        self.outstanding = None  # (task_id, name, {name: (dtype, shape)} or None)

    # ---- launch ----------------------------------------------------------------------------

    def env(self, extra=None):
        env = dict(os.environ)
        env.update({
            "FLARE_CLIENT_SOCKET": self.socket_path,
            "FLARE_CLIENT_TOKEN": self.token,
            "FLARE_CLIENT_PARENT_PID": str(os.getpid()),
            "FLARE_JOB_ID": self.job_id,
            "FLARE_SITE_NAME": self.site_name,
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra or {})
        return env

    def launch(self, argv, cwd=None, env=None, **popen):
        """Starts the program in a process group of its own (as the node does)."""
        self.proc = subprocess.Popen(argv, cwd=cwd, env=self.env(env), start_new_session=True,
                                     stdin=subprocess.DEVNULL, **popen)
        return self.proc

    def connect(self, timeout=60.0):
        """Waits for the program to connect and reads its hello."""
        deadline = time.monotonic() + timeout
        while True:
            r, _, _ = select.select([self.listener], [], [], 0.2)
            if r:
                break
            if self.proc is not None and self.proc.poll() is not None:
                raise NodeError("the program exited (%s) before it connected" % self.proc.returncode)
            if time.monotonic() > deadline:
                raise NodeError("the program did not connect within %.0f s" % timeout)
        self.conn, _ = self.listener.accept()
        self.hello = self._read(5.0)
        self.last_heard = time.monotonic()
        return self.hello

    def handshake(self, timeout=60.0, **accept):
        """connect(), then accept or reject as a node does; returns whether it accepted."""
        hello = self.connect(timeout)
        if hello.get("type") != "hello":
            self.reject("the first message must be hello, not %s" % hello.get("type"))
            return False
        if hello.get("token") != self.token:
            self.reject("wrong token")
            return False
        if hello.get("protocol") != _wire.PROTOCOL:
            self.reject("unsupported protocol %r; this node speaks %d" % (hello.get("protocol"), _wire.PROTOCOL))
            return False
        msg = dict(self.accept_msg)
        msg.update(accept)
        self.send(msg)
        return True

    def reject(self, reason):
        self.send({"type": "reject", "reason": reason})
        self.close_conn()

    # ---- frames ----------------------------------------------------------------------------

    def send(self, msg):
        self.conn.sendall(_wire.encode(msg, _wire.MAX_TO_PROGRAM))

    def _read(self, timeout):
        self.conn.settimeout(timeout)
        try:
            return _wire.read_frame(self.conn, _wire.MAX_TO_NODE)
        finally:
            self.conn.settimeout(None)

    def recv(self, timeout=60.0):
        """The next message other than log and heartbeat (those are recorded), or None when the
        program closed the connection; NodeError when it exits, goes silent or times out."""
        deadline = time.monotonic() + timeout
        while True:
            r, _, _ = select.select([self.conn], [], [], 0.2)
            now = time.monotonic()
            if not r:
                if self.proc is not None and self.proc.poll() is not None:
                    raise NodeError("the program exited with %s before answering" % self.proc.returncode)
                if now - self.last_heard > self.heartbeat_timeout:
                    raise NodeError("the program was silent for %.0f s" % (now - self.last_heard))
                if now > deadline:
                    raise NodeError("no answer within %.0f s" % timeout)
                continue
            try:
                msg = self._read(30.0)
            except _wire.Closed:
                return None
            self.last_heard = time.monotonic()
            t = msg["type"]
            if t == "log":
                self.log_messages += 1
                self.records.extend(msg.get("records", []))
            elif t == "heartbeat":
                self.heartbeats += 1
            else:
                return msg

    # ---- tasks -----------------------------------------------------------------------------

    def send_task(self, name, model=None, round=0, total_rounds=None, meta=None, params_type="FULL"):
        """Sends a task; `model` is {name: (dtype, shape, bytes)} or None. Returns its id."""
        tid = self.next_task_id
        self.next_task_id += 1
        ref = None
        spec = None
        if model is not None:
            path = os.path.join(self.exchange_dir, "%d.in.safetensors" % tid)
            _st.write_raw(path, model)
            ref = {"path": path, "params_type": params_type}
            spec = {k: (v[0], list(v[1])) for k, v in model.items()}
        self.outstanding = (tid, name, spec)
        self.send({"type": "task", "task_id": tid, "name": name, "round": round,
                   "total_rounds": total_rounds, "meta": meta or {}, "model": ref})
        return tid

    def check_result(self, res):
        """What a node checks; returns (the result's model or None), or raises NodeError with the
        reason for result_rejected."""
        if self.outstanding is None or res.get("task_id") != self.outstanding[0]:
            raise NodeError("task %r is not the outstanding task" % res.get("task_id"))
        for k, v in (res.get("metrics") or {}).items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise NodeError("metric %r is not a finite number: %r" % (k, v))
        ref = res.get("model")
        if not ref:
            return None
        path = os.path.realpath(ref.get("path", ""))
        if os.path.dirname(path) != os.path.realpath(self.exchange_dir):
            raise NodeError("the model file %s is not in the exchange folder" % ref.get("path"))
        try:
            model = _st.read_raw(path)
        except Exception as e:
            raise NodeError("the model file %s cannot be read: %s" % (path, e))
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass
        spec = self.outstanding[2]
        if spec is not None:
            for k, (dtype, shape, _) in model.items():
                if k not in spec:
                    raise NodeError("tensor %r is not in the task's model" % k)
                if spec[k] != (dtype, list(shape)):
                    raise NodeError("tensor %r is %s %s, the task's %s %s" % (k, dtype, shape, spec[k][0], spec[k][1]))
        return model

    def answer(self, timeout=3600.0, reject=None):
        """Waits for the result of the outstanding task, checks it and answers result_ack (or
        result_rejected with the reason: the check's, or `reject`). Returns (result, model)."""
        res = self.recv(timeout)
        if res is None:
            raise NodeError("the program closed the connection")
        if res["type"] != "result":
            raise NodeError("expected a result, got %s" % res["type"])
        tid = res.get("task_id")
        try:
            model = self.check_result(res)
            if reject is not None:
                raise NodeError(reject)
        except NodeError as e:
            self.send({"type": "result_rejected", "task_id": tid, "reason": str(e)})
            self._task_done()
            res = dict(res, rejected=str(e))
            return res, None
        self.send({"type": "result_ack", "task_id": tid})
        self._task_done()
        return res, model

    def _task_done(self):
        if self.outstanding is not None:
            try:
                os.unlink(os.path.join(self.exchange_dir, "%d.in.safetensors" % self.outstanding[0]))
            except OSError:
                pass
        self.outstanding = None

    # ---- the end ---------------------------------------------------------------------------

    def shutdown(self, reason="the job is done"):
        self.send({"type": "shutdown", "reason": reason})

    def wait_exit(self, grace=10.0):
        """Waits `grace` s for the program, then SIGTERM to its group, then SIGKILL."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                return self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                continue
        return self.proc.wait()

    def close_conn(self):
        if self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.conn.close()
            self.conn = None

    def close(self):
        self.close_conn()
        self.listener.close()
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- model arithmetic (the global model + a DIFF) ------------------------------------------

def _bf16_to_f32(words):
    return struct.unpack("<%df" % len(words), struct.pack("<%dI" % len(words), *[w << 16 for w in words]))


def _f32_to_bf16(vals):
    out = []
    for (b,) in struct.iter_unpack("<I", struct.pack("<%df" % len(vals), *vals)):
        if (b & 0x7F800000) == 0x7F800000 and b & 0x7FFFFF:  # NaN
            out.append((b >> 16) | 0x40)
        else:
            out.append((b + 0x7FFF + ((b >> 16) & 1)) >> 16 & 0xFFFF)
    return out


_STRUCT = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "I32": "i", "I16": "h", "I8": "b", "U8": "B",
           "U16": "H", "U32": "I", "U64": "Q"}


def add_raw(a, d):
    """(dtype, shape, bytes) a + d, elementwise, in a's dtype."""
    dtype, shape, x = a
    _, _, y = d
    try:
        import numpy as np
    except ImportError:
        np = None
    if dtype == "BF16":
        n = len(x) // 2
        xs = _bf16_to_f32(struct.unpack("<%dH" % n, x))
        ys = _bf16_to_f32(struct.unpack("<%dH" % n, y))
        out = _f32_to_bf16([p + q for p, q in zip(xs, ys)])
        return dtype, shape, struct.pack("<%dH" % n, *out)
    if np is not None and _st.DTYPES[dtype][1]:
        npd = np.dtype(_st.DTYPES[dtype][1])
        s = np.frombuffer(x, dtype=npd) + np.frombuffer(y, dtype=npd)
        return dtype, shape, s.astype(npd).tobytes()
    code = _STRUCT.get(dtype)
    if code is None:
        raise NodeError("cannot add %s tensors" % dtype)
    size = struct.calcsize(code)
    n = len(x) // size
    xs = struct.unpack("<%d%s" % (n, code), x)
    ys = struct.unpack("<%d%s" % (n, code), y)
    return dtype, shape, struct.pack("<%d%s" % (n, code), *[p + q for p, q in zip(xs, ys)])


def apply_result(global_model, result, model):
    """FedAvg of one site: the result itself (FULL) or the global model plus its DIFF."""
    if model is None:
        return global_model
    if result.get("params_type") == "DIFF":
        if global_model is None:
            raise NodeError("a DIFF result for a task that carried no model")
        out = dict(global_model)
        for k, d in model.items():
            out[k] = add_raw(global_model[k], d)
        return out
    if global_model is None:
        return model
    out = dict(global_model)
    out.update(model)
    return out


# ---- the command ---------------------------------------------------------------------------

HARNESS_OPTS = {
    "--rounds": 1, "--initial": 1, "--site": 1, "--job-id": 1, "--params-format": 1,
    "--transfer-type": 1, "--app-dir": 1, "--out": 1, "--report": 1, "--task-timeout": 1,
    "--heartbeat-interval": 1, "--python": 1, "--no-validate": 0, "--submit-model": 0,
    "--no-train-with-evaluation": 0,
}


def _split_argv(argv):
    """(the harness's arguments, the script, the script's arguments)."""
    mine, script, rest = [], None, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest.extend(argv[i + 1 :])
            break
        name = a.split("=", 1)[0]
        if name in HARNESS_OPTS or name in ("-h", "--help"):
            mine.append(a)
            if HARNESS_OPTS.get(name) and "=" not in a and i + 1 < len(argv):
                mine.append(argv[i + 1])
                i += 1
        elif script is None and not a.startswith("-"):
            script = a
        else:
            rest.append(a)
        i += 1
    return mine, script, rest


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m flare_client.sim",
        usage="python -m flare_client.sim SCRIPT [script args] [options]",
        description="Runs a Client API training script against a local fake node: scatter-and-gather "
        "with one site for --rounds rounds, then a validate task (and a submit_model task).",
    )
    p.add_argument("--rounds", type=int, default=2, help="train rounds (2)")
    p.add_argument("--initial", help="the initial global model (safetensors); without it the first "
                   "train task carries no model and the script's first result becomes the global model")
    p.add_argument("--site", default="site-1", help="the site name (site-1)")
    p.add_argument("--job-id", default="sim-job")
    p.add_argument("--params-format", default="pytorch", choices=["pytorch", "numpy"])
    p.add_argument("--transfer-type", default="FULL", choices=["FULL", "DIFF"])
    p.add_argument("--app-dir", help="the script's working directory (default: the parent of the "
                   "script's custom/ folder when it lies in one, as in a job's app, else the current one)")
    p.add_argument("--out", help="write the final global model here")
    p.add_argument("--report", help="write a JSON report here")
    p.add_argument("--task-timeout", type=float, default=3600.0)
    p.add_argument("--heartbeat-interval", type=float, default=5.0)
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs the script")
    p.add_argument("--no-validate", action="store_true", help="no final validate task")
    p.add_argument("--submit-model", action="store_true", help="end with a submit_model task")
    p.add_argument("--no-train-with-evaluation", action="store_true")
    return p


def _fmt_metrics(m):
    return "  ".join("%s=%.4f" % (k, v) for k, v in sorted((m or {}).items())) or "-"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    mine, script, rest = _split_argv(argv)
    args = _parser().parse_args(mine)
    if script is None:
        _parser().error("no script given")
    script = os.path.abspath(script)
    cwd = args.app_dir
    if cwd is None:
        parent = os.path.dirname(script)
        cwd = os.path.dirname(parent) if os.path.basename(parent) == "custom" else os.getcwd()
    global_model = _st.read_raw(args.initial) if args.initial else None
    node = FakeNode(job_id=args.job_id, site_name=args.site, params_transfer_type=args.transfer_type,
                    params_format=args.params_format, heartbeat_interval=args.heartbeat_interval,
                    train_with_evaluation=not args.no_train_with_evaluation)
    report = {"script": script, "rounds": [], "validate": None, "submit_model": None}
    failed = None
    t0 = time.monotonic()
    try:
        node.launch([args.python, "-u", script] + rest, cwd=cwd)
        if not node.handshake():
            raise NodeError("the program's hello was rejected")
        print("[sim] %s connected (pid %s), job %s, site %s" % (node.hello.get("client"), node.hello.get("pid"),
                                                                 args.job_id, args.site), flush=True)
        for r in range(args.rounds):
            started = time.monotonic()
            node.send_task("train", global_model, round=r, total_rounds=args.rounds,
                           meta={"current_round": r, "total_rounds": args.rounds})
            res, model = node.answer(args.task_timeout)
            if res.get("rc") != "OK":
                raise NodeError("round %d: %s: %s" % (r, res.get("rc"), res.get("reason")))
            if "rejected" in res:
                raise NodeError("round %d: result rejected: %s" % (r, res["rejected"]))
            global_model = apply_result(global_model, res, model)
            row = {"round": r, "metrics": res.get("metrics", {}), "meta": res.get("meta", {}),
                   "params_type": res.get("params_type"), "seconds": round(time.monotonic() - started, 3)}
            report["rounds"].append(row)
            print("[sim] round %d/%d (%.1f s): %s  %s" % (r + 1, args.rounds, row["seconds"], _fmt_metrics(row["metrics"]),
                                                        " ".join("%s=%s" % kv for kv in sorted(row["meta"].items()))),
                  flush=True)
        if not args.no_validate and global_model is not None:
            node.send_task("validate", global_model, round=args.rounds, total_rounds=args.rounds)
            res, _ = node.answer(args.task_timeout)
            if res.get("rc") != "OK" or "rejected" in res:
                raise NodeError("validate: %s" % (res.get("reason") or res.get("rejected")))
            report["validate"] = res.get("metrics", {})
            print("[sim] final model: %s" % _fmt_metrics(report["validate"]), flush=True)
        if args.submit_model:
            node.send_task("submit_model", None, round=args.rounds, total_rounds=args.rounds)
            res, model = node.answer(args.task_timeout)
            if res.get("rc") != "OK" or "rejected" in res:
                raise NodeError("submit_model: %s" % (res.get("reason") or res.get("rejected")))
            report["submit_model"] = {"tensors": len(model or {}), "metrics": res.get("metrics", {})}
            print("[sim] submit_model: %d tensors" % len(model or {}), flush=True)
        node.shutdown()
    except NodeError as e:
        failed = str(e)
        print("[sim] FAILED: %s" % e, file=sys.stderr, flush=True)
    finally:
        # drain what the program still sends (logs) until it closes the connection
        try:
            while node.conn is not None and node.proc.poll() is None:
                if node.recv(10.0) is None:
                    break
        except Exception:
            pass
        code = node.wait_exit(10.0)
        report["exit_code"] = code
        report["seconds"] = round(time.monotonic() - t0, 3)
        keys = {}
        for rec in node.records:
            keys[rec.get("key")] = rec.get("value")
        report["logs"] = {"records": len(node.records), "messages": node.log_messages,
                          "heartbeats": node.heartbeats, "last": keys}
        report["failed"] = failed
        if args.out and global_model is not None:
            _st.write_raw(args.out, global_model, {"format": "pt"})
        node.close()
    if node.records:
        print("[sim] %d metric records in %d log messages; last values:" % (len(node.records), node.log_messages))
        for k, v in sorted(keys.items(), key=lambda kv: str(kv[0])):
            print("[sim]   %s = %s" % (k, v))
    print("[sim] the script exited with %s after %.1f s" % (code, report["seconds"]))
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if failed is None and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
