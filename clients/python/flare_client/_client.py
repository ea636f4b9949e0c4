"""The program's side of the Client API session (docs/client-api.md): one connection to the
node, a reader thread that sorts incoming frames into queues, a heartbeat thread, and the
state machine behind `flare_client`'s functions."""

import atexit
import math
import os
import queue
import socket
import sys
import threading
import traceback
import weakref

from . import _params, _st, _watchdog, _wire
from .errors import (
    FlareConnectionError,
    FlareModelError,
    FlareProtocolError,
    FlareRejectedError,
    FlareResultRejected,
    FlareStateError,
)
from .model import FLMetaKey, FLModel, ParamsType

VERSION = "0.1.0"
CLIENT = "flare_client-python/" + VERSION
HELLO_TIMEOUT_S = 30.0
LOG_FLUSH_RECORDS = 1000
LOG_FLUSH_BYTES = 1 << 20
MAX_TEXT = 1 << 20

TASK_TRAIN = "train"
TASK_VALIDATE = "validate"
TASK_SUBMIT_MODEL = "submit_model"


def _warn(text):
    try:
        sys.stderr.write("flare_client: %s\n" % text)
        sys.stderr.flush()
    except Exception:
        pass


def _scalar(v):
    """A JSON scalar from a number, string, bool or None (numpy scalars and 0-d tensors too)."""
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if isinstance(v, float):
        return v
    item = getattr(v, "item", None)
    if item is not None:
        try:
            x = item()
        except Exception:
            x = v
        if isinstance(x, (bool, int, float, str)):
            return x
    raise TypeError(type(v).__name__)


def _finite_number(v):
    """A finite float from a number, a numpy scalar or a one-element tensor."""
    if isinstance(v, bool):
        raise TypeError("bool")
    if not isinstance(v, (int, float)):
        item = getattr(v, "item", None)
        if item is None:
            raise TypeError(type(v).__name__)
        v = item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(type(v).__name__)
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(repr(f))
    return f


class Client:
    def __init__(self):
        self.lock = threading.Lock()
        self.wlock = threading.Lock()
        self.log_lock = threading.Lock()
        self.inited = False
        self.rank = None
        self.sock = None
        self.accept = None
        self.params_format = None
        self.events = queue.Queue()
        self.acks = queue.Queue()
        self.ended = None  # (kind, reason): shutdown, abort, error, closed, local
        self.pending = None  # a task fetched by is_running(), not yet given out
        self.task = None  # the task given out last
        self.answered = True
        self.model_ref = None
        self.last_ids = []
        self.logbuf = []
        self.logbytes = 0
        self.hb_stop = threading.Event()
        self.nan_warned = False

    # ---- connection ------------------------------------------------------------------------

    def init(self, rank=None, config_file=None, params_format=None):
        if self.inited:
            _warn("init() was called already; ignored")
            return
        if rank is None:
            rank = os.environ.get("RANK", "0")
        self.rank = str(rank)
        if params_format is not None:
            self.params_format = _params.torch_format_name(params_format)
        if self.rank != "0":
            self.inited = True
            return
        path = os.environ.get("FLARE_CLIENT_SOCKET")
        token = os.environ.get("FLARE_CLIENT_TOKEN", "")
        if not path:
            raise FlareConnectionError(
                "FLARE_CLIENT_SOCKET is not set: this program was not started by a flare-node; "
                "run it in a job (ScriptExecutor) or with `python -m flare_client.sim %s`"
                % (sys.argv[0] if sys.argv and sys.argv[0] else "train.py")
            )
        _watchdog.start()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(HELLO_TIMEOUT_S)
            sock.connect(path)
            hello = {"type": "hello", "protocol": _wire.PROTOCOL, "token": token, "pid": os.getpid(),
                     "rank": self.rank, "client": CLIENT}
            sock.sendall(_wire.encode(hello, _wire.MAX_TO_NODE))
            msg = _wire.read_frame(sock, _wire.MAX_TO_PROGRAM)
        except (OSError, _wire.Closed, _wire.BadFrame) as e:
            sock.close()
            raise FlareConnectionError("cannot open the session with the node at %s: %s" % (path, e))
        if msg["type"] == "reject":
            sock.close()
            raise FlareRejectedError(msg.get("reason", "no reason given"))
        if msg["type"] != "accept":
            sock.close()
            raise FlareProtocolError("the node answered hello with %r" % msg["type"])
        if msg.get("protocol", _wire.PROTOCOL) != _wire.PROTOCOL:
            sock.close()
            raise FlareProtocolError("the node speaks protocol %r, this client %d" % (msg.get("protocol"), _wire.PROTOCOL))
        sock.settimeout(None)
        self.sock = sock
        self.accept = msg
        self.inited = True
        if self.params_format is None:
            self.params_format = _params.torch_format_name(msg.get("params_format") or "pytorch")
        threading.Thread(target=self._reader, name="flare-reader", daemon=True).start()
        interval = float(msg.get("heartbeat_interval") or 5.0)
        threading.Thread(target=self._heartbeat, args=(interval,), name="flare-heartbeat", daemon=True).start()
        atexit.register(self._at_exit)
        self._install_excepthook()

    def _write(self, msg):
        frame = _wire.encode(msg, _wire.MAX_TO_NODE)
        with self.wlock:
            if self.sock is None:
                raise FlareConnectionError("not connected to the node")
            try:
                self.sock.sendall(frame)
            except OSError as e:
                raise FlareConnectionError("the connection to the node broke: %s" % e)

    def _reader(self):
        sock = self.sock
        while True:
            try:
                msg = _wire.read_frame(sock, _wire.MAX_TO_PROGRAM)
            except (_wire.Closed, OSError) as e:
                self._closed(str(e))
                return
            except _wire.BadFrame as e:
                self._fatal("an unreadable message from the node: %s" % e)
                return
            t = msg["type"]
            if t == "task":
                self.events.put(msg)
            elif t in ("result_ack", "result_rejected"):
                self.acks.put(msg)
            elif t in ("shutdown", "abort", "error"):
                reason = msg.get("reason", "")
                if t == "error":
                    _warn("the node reported an error: %s" % reason)
                elif t == "abort":
                    _warn("the job was aborted: %s" % reason)
                with self.lock:
                    if self.ended is None:
                        self.ended = (t, reason)
                self.events.put(msg)
                self.acks.put(msg)
            else:
                self._fatal("an unknown message type %r from the node" % t)
                return

    def _fatal(self, why):
        _warn(why)
        with self.lock:
            if self.ended is None:
                self.ended = ("error", why)
        self._close("local-error")
        self.events.put({"type": "error", "reason": why})
        self.acks.put({"type": "error", "reason": why})

    def _closed(self, why):
        with self.lock:
            ended = self.ended
        if ended is not None and ended[0] in ("shutdown", "local"):
            # the end was announced (or this side closed): the program finishes by itself,
            # and the node's stop_grace_period bounds how long it may take
            self.events.put({"type": "closed", "reason": why})
            self.acks.put({"type": "closed", "reason": why})
            return
        if ended is not None and ended[0] == "local-error":
            return
        _watchdog.kill_group("the connection to the node closed (%s)" % why)

    def _close(self, kind):
        with self.lock:
            if self.ended is None or kind == "local":
                if self.ended is None:
                    self.ended = (kind, "")
            if kind == "local-error":
                self.ended = ("local-error", self.ended[1] if self.ended else "")
        self.hb_stop.set()
        with self.wlock:
            sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _heartbeat(self, interval):
        while not self.hb_stop.wait(interval):
            try:
                self.flush_logs()
                self._write({"type": "heartbeat"})
            except Exception:
                return

    def _at_exit(self):
        try:
            self.flush_logs()
        except Exception:
            pass

    def _install_excepthook(self):
        previous = sys.excepthook
        client = self

        def hook(kind, value, tb):
            try:
                client._report_exception(kind, value, tb)
            finally:
                previous(kind, value, tb)

        sys.excepthook = hook

    def _report_exception(self, kind, value, tb):
        """An uncaught exception while a task is open: the task's result says why."""
        if self.sock is None or self.task is None or self.answered or self.ended is not None:
            return
        text = "".join(traceback.format_exception(kind, value, tb))
        reason = text[-4000:]
        try:
            self.flush_logs()
            self.answered = True
            self._write({"type": "result", "task_id": self.task["task_id"], "rc": "EXECUTION_EXCEPTION",
                         "metrics": {}, "meta": {}, "model": None, "reason": reason})
            self.acks.get(timeout=10)
        except Exception:
            pass

    # ---- state -----------------------------------------------------------------------------

    def _need_init(self, what):
        if not self.inited:
            raise FlareStateError("%s before flare.init()" % what)

    def _end_raise(self):
        """After an end that is not an orderly one, calls that need the node raise."""
        if self.ended is not None and self.ended[0] in ("error", "local-error", "closed"):
            raise FlareConnectionError("the session with the node ended: %s" % (self.ended[1] or self.ended[0]))

    def _next_task(self, timeout):
        """The next task from the node, or None at the end (or after `timeout` seconds)."""
        while True:
            if self.pending is not None:
                t, self.pending = self.pending, None
                return t
            if self.ended is not None and self.events.empty():
                return None
            try:
                msg = self.events.get(timeout=timeout)
            except queue.Empty:
                return None
            if msg["type"] != "task":
                if msg["type"] in ("error",) and self.ended and self.ended[0] == "local-error":
                    raise FlareProtocolError(self.ended[1])
                return None
            tid = msg.get("task_id")
            if tid in self.last_ids:
                continue  # a task seen already: ignored
            return msg

    def is_running(self):
        self._need_init("is_running()")
        if self.rank != "0":
            return self.ended is None
        if self.task is not None and not self.answered:
            return True
        if self.pending is not None:
            return True
        t = self._next_task(None)
        if t is None:
            return False
        self.pending = t
        return True

    def receive(self, timeout=None, params_format=None):
        self._need_init("receive()")
        if self.rank != "0":
            return None
        fmt = _params.torch_format_name(params_format) if params_format is not None else self.params_format
        if self.task is not None and not self.answered:
            model = self.model_ref() if self.model_ref is not None else None
            if model is not None:
                return model
            return self._model_of(self.task, fmt)
        msg = self._next_task(timeout)
        if msg is None:
            return None
        model = self._model_of(msg, fmt)
        self.task = msg
        self.answered = False
        self.last_ids = (self.last_ids + [msg.get("task_id")])[-8:]
        self.model_ref = weakref.ref(model)
        return model

    def _model_of(self, msg, fmt):
        ref = msg.get("model")
        params = None
        params_type = None
        if ref:
            if fmt == "pytorch":
                try:
                    import torch  # noqa: F401
                except ImportError:
                    raise FlareModelError(
                        'params_format "pytorch" needs torch: pip install "flare_client[torch]", '
                        'or ask for numpy arrays with flare.init(params_format="numpy")'
                    )
            else:
                try:
                    import numpy  # noqa: F401
                except ImportError:
                    raise FlareModelError(
                        'params_format "numpy" needs numpy: pip install "flare_client[numpy]"'
                    )
            params = _st.SafetensorsFile(ref["path"]).load(fmt)
            params_type = ParamsType(str(ref.get("params_type") or "FULL").upper())
        meta = dict(msg.get("meta") or {})
        meta.setdefault(FLMetaKey.JOB_ID, self.get_job_id())
        meta.setdefault(FLMetaKey.SITE_NAME, self.get_site_name())
        model = FLModel(params=params, params_type=params_type, current_round=msg.get("round"),
                        total_rounds=msg.get("total_rounds"), meta=meta)
        if params is None:
            model.params_type = None
        return model

    def send(self, model, clear_cache=True):
        self._need_init("send()")
        if self.rank != "0":
            return
        if not isinstance(model, FLModel):
            raise FlareModelError("send() takes an FLModel, not %s" % type(model).__name__)
        if self.ended is not None and self.ended[0] in ("shutdown", "abort"):
            _warn("send() after %s from the node: the result is dropped" % self.ended[0])
            return
        self._end_raise()
        if self.task is None:
            raise FlareStateError("send() before receive(): there is no task to answer")
        if self.answered:
            raise FlareStateError("send() called twice for task %s (%s)" % (self.task.get("task_id"), self.task.get("name")))
        task = self.task
        tid = task["task_id"]
        metrics = {}
        for k, v in (model.metrics or {}).items():
            try:
                metrics[str(k)] = _finite_number(v)
            except (TypeError, ValueError) as e:
                raise FlareModelError("metric %r must be a finite number, not %s" % (k, e))
        meta = {}
        for k, v in (model.meta or {}).items():
            try:
                s = _scalar(v)
            except TypeError as e:
                raise FlareModelError("meta %r must be a number, string or bool, not %s" % (k, e))
            if isinstance(s, float) and not math.isfinite(s):
                raise FlareModelError("meta %r is not finite: %r" % (k, s))
            meta[str(k)] = s
        result = {"type": "result", "task_id": tid, "rc": "OK", "metrics": metrics, "meta": meta,
                  "model": None, "reason": None}
        if model.params is not None:
            ptype = model.params_type or ParamsType.FULL
            if not isinstance(ptype, ParamsType):
                ptype = ParamsType(str(getattr(ptype, "value", ptype)).upper())
            base = None
            ref = task.get("model")
            if (str(self.accept.get("params_transfer_type", "FULL")).upper() == "DIFF"
                    and ptype == ParamsType.FULL and ref):
                base = _st.SafetensorsFile(ref["path"])
                ptype = ParamsType.DIFF
            items = _params.items_for(model.params, base)
            exchange = self.accept.get("exchange_dir") or os.path.dirname(ref["path"] if ref else ".")
            final = os.path.join(exchange, "%s.out.safetensors" % tid)
            tmp = os.path.join(exchange, ".%s.out.safetensors.%d.tmp" % (tid, os.getpid()))
            fmt = "pt" if any(_params._is_torch(v) for v in model.params.values()) else "np"
            try:
                _st.write(tmp, items, {"format": fmt})
                os.replace(tmp, final)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            del items, base
            result["model"] = {"path": final}
            result["params_type"] = ptype.value
        self.flush_logs()
        self._write(result)
        self.answered = True
        if clear_cache:
            model.params = None
            self.model_ref = None
        while True:
            ack = self.acks.get()
            t = ack["type"]
            if t == "result_ack" and ack.get("task_id") == tid:
                return
            if t == "result_rejected" and ack.get("task_id") == tid:
                raise FlareResultRejected(tid, ack.get("reason", ""))
            if t in ("result_ack", "result_rejected"):
                continue  # an answer to another task
            if t in ("shutdown", "abort"):
                _warn("%s from the node before the result of task %s was acknowledged" % (t, tid))
                self.acks.put(ack)
                return
            raise FlareConnectionError("the session ended before the result of task %s was acknowledged: %s"
                                       % (tid, ack.get("reason", "")))

    # ---- metrics ---------------------------------------------------------------------------

    def log(self, key, value, kind, step):
        self._need_init("log()")
        if self.rank != "0" or self.sock is None:
            return
        rec = {"key": str(key), "kind": kind}
        if kind == "scalar":
            try:
                rec["value"] = _finite_number(value)
            except ValueError:
                if not self.nan_warned:
                    _warn("metric %r is not finite (%r): not logged (reported once)" % (key, value))
                    self.nan_warned = True
                return
            except TypeError:
                raise FlareModelError("log %r: a scalar must be a number, not %s" % (key, type(value).__name__))
            size = 48 + len(rec["key"])
        elif kind == "scalars":
            if not isinstance(value, dict):
                raise FlareModelError("log %r: scalars must be a dict of name -> number" % key)
            vals = {}
            for k, v in value.items():
                try:
                    vals[str(k)] = _finite_number(v)
                except ValueError:
                    continue
                except TypeError:
                    raise FlareModelError("log %r: %r must be a number, not %s" % (key, k, type(v).__name__))
            rec["value"] = vals
            size = 48 + len(rec["key"]) + sum(len(k) + 24 for k in vals)
        else:
            text = str(value)
            if len(text) > MAX_TEXT:
                raise FlareModelError("log %r: a text of %d characters, at most %d" % (key, len(text), MAX_TEXT))
            rec["value"] = text
            size = 48 + len(rec["key"]) + 2 * len(text)
        if step is not None:
            try:
                rec["step"] = int(step)
            except (TypeError, ValueError):
                raise FlareModelError("log %r: step must be an integer, not %r" % (key, step))
        with self.log_lock:
            self.logbuf.append(rec)
            self.logbytes += size
            if len(self.logbuf) >= LOG_FLUSH_RECORDS or self.logbytes >= LOG_FLUSH_BYTES:
                self._flush_locked()

    def flush_logs(self):
        with self.log_lock:
            self._flush_locked()

    def _flush_locked(self):
        if not self.logbuf:
            return
        recs, self.logbuf, self.logbytes = self.logbuf, [], 0
        if self.sock is None:
            return
        for i in range(0, len(recs), LOG_FLUSH_RECORDS):
            self._write({"type": "log", "records": recs[i : i + LOG_FLUSH_RECORDS]})

    # ---- the rest --------------------------------------------------------------------------

    def _need_rank0(self, what):
        self._need_init(what)
        if self.rank != "0":
            raise FlareStateError("%s: only rank 0 talks to the node (this is rank %s)" % (what, self.rank))

    def task_name(self, what):
        self._need_rank0(what)
        task = self.task if self.task is not None else self.pending
        if task is None:
            raise FlareStateError("%s before receive(): no task yet" % what)
        return task.get("name")

    def get_job_id(self):
        if self.accept is not None:
            return self.accept.get("job_id")
        return os.environ.get("FLARE_JOB_ID")

    def get_site_name(self):
        if self.accept is not None:
            return self.accept.get("site_name")
        return os.environ.get("FLARE_SITE_NAME")

    def get_config(self):
        self._need_init("get_config()")
        cfg = {k: v for k, v in (self.accept or {}).items() if k != "type"}
        cfg.setdefault("job_id", self.get_job_id())
        cfg.setdefault("site_name", self.get_site_name())
        cfg["rank"] = self.rank
        cfg["params_format"] = self.params_format or cfg.get("params_format")
        return cfg

    def clear(self):
        self.model_ref = None

    def shutdown(self):
        if not self.inited:
            return
        if self.sock is not None:
            try:
                self.flush_logs()
            except Exception:
                pass
        with self.lock:
            self.ended = ("local", "shutdown() was called")
        self._close("local")
        self.pending = None
