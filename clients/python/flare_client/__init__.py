"""Flare's Client API: the API of `nvflare.client` for a training program that a site's
flare-node launches (`docs/client-api.md`). A FLARE script changes
`import nvflare.client as flare` to `import flare_client as flare` and nothing else:

    import flare_client as flare

    flare.init()
    while flare.is_running():
        model = flare.receive()          # FLModel: params are torch tensors (or numpy arrays)
        ...                              # train
        flare.send(flare.FLModel(params=net.state_dict(), metrics={"accuracy": acc},
                                 meta={"NUM_STEPS_CURRENT_ROUND": steps}))
"""

from enum import Enum

from . import _watchdog
from ._client import CLIENT, VERSION, Client
from .errors import (
    FlareConnectionError,
    FlareError,
    FlareModelError,
    FlareProtocolError,
    FlareRejectedError,
    FlareResultRejected,
    FlareStateError,
)
from .model import FLMetaKey, FLModel, ParamsType

__version__ = VERSION

__all__ = [
    "AnalyticsDataType", "FLMetaKey", "FLModel", "FlareConnectionError", "FlareError",
    "FlareModelError", "FlareProtocolError", "FlareRejectedError", "FlareResultRejected",
    "FlareStateError", "ParamsType", "clear", "get_config", "get_job_id", "get_site_name",
    "get_task_name", "init", "is_evaluate", "is_running", "is_submit_model", "is_train", "log",
    "receive", "send", "shutdown", "system_info",
]

# A program started by a node is watched from the moment it imports this package.
_watchdog.start()


class AnalyticsDataType(str, Enum):
    """The kinds of `log()` records (FLARE's names). SCALAR and METRIC go as `scalar`, SCALARS
    and METRICS as `scalars` (without a key: one `scalar` record per item); TEXT as `text`;
    PARAMETER and TAG as `param` and `tag` (PARAMETERS and TAGS as one record per item, keyed
    `<key>/<name>`), which the server's MLflow writer stores as MLflow params and tags."""

    SCALAR = "SCALAR"
    SCALARS = "SCALARS"
    TEXT = "TEXT"
    IMAGE = "IMAGE"
    METRIC = "METRIC"
    METRICS = "METRICS"
    PARAMETER = "PARAMETER"
    PARAMETERS = "PARAMETERS"
    TAG = "TAG"
    TAGS = "TAGS"
    LOG_RECORD = "LOG_RECORD"


_client = Client()


def init(rank=None, config_file=None, params_format=None):
    """Connects to the node (rank 0 only: `rank`, else env RANK, else "0"). `config_file` is
    accepted for FLARE's signature and not used: everything comes from the node.
    `params_format` ("pytorch" or "numpy") overrides what the job's accept says."""
    _client.init(rank=rank, config_file=config_file, params_format=params_format)


def is_running():
    """Whether the job goes on: waits for the next task when the last one was answered;
    False after the node's shutdown or abort (or `shutdown()`)."""
    return _client.is_running()


def receive(timeout=None, params_format=None):
    """The task's model as an FLModel (torch tensors or numpy arrays, per the job or
    `params_format`), or None at the end of the job, after `timeout` seconds, or on a rank
    other than 0."""
    return _client.receive(timeout=timeout, params_format=params_format)


def send(model, clear_cache=True):
    """Answers the task received last with `model` and waits for the node to take it
    (raises FlareResultRejected with the node's reason otherwise)."""
    return _client.send(model, clear_cache=clear_cache)


def is_train():
    return _client.task_name("is_train()") == "train"


def is_evaluate():
    return _client.task_name("is_evaluate()") == "validate"


def is_submit_model():
    return _client.task_name("is_submit_model()") == "submit_model"


def get_task_name():
    return _client.task_name("get_task_name()")


def get_job_id():
    return _client.get_job_id()


def get_site_name():
    return _client.get_site_name()


def system_info():
    return {"job_id": _client.get_job_id(), "site_name": _client.get_site_name()}


def get_config():
    return _client.get_config()


def log(key, value, data_type=None, **kwargs):
    """Records a metric; records are batched and sent before each result and with each
    heartbeat. `global_step` (or `step`) in kwargs is the record's step."""
    step = kwargs.get("global_step", kwargs.get("step"))
    dt = data_type
    if dt is not None:
        dt = str(getattr(dt, "value", dt)).upper()
    if dt is None:
        if isinstance(value, dict):
            dt = "SCALARS"
        elif isinstance(value, str):
            dt = "TEXT"
        else:
            dt = "SCALAR"
    if dt in ("SCALAR", "METRIC"):
        _client.log(key, value, "scalar", step)
    elif dt in ("SCALARS", "METRICS"):
        if key:
            _client.log(key, value, "scalars", step)
        else:  # WandB's log(metrics), MLflow's log_metrics: one scalar record per metric
            for k, v in dict(value).items():
                _client.log(k, v, "scalar", step)
    elif dt in ("PARAMETERS", "TAGS"):
        kind = "param" if dt == "PARAMETERS" else "tag"
        for k, v in dict(value).items():
            _client.log("%s/%s" % (key, k) if key else str(k), str(v), kind, step)
    elif dt in ("PARAMETER", "TAG"):
        _client.log(key, str(value), "param" if dt == "PARAMETER" else "tag", step)
    elif dt in ("TEXT", "LOG_RECORD"):
        _client.log(key, value, "text", step)
    else:
        raise FlareModelError("log %r: data type %s cannot be sent" % (key, dt))


def clear():
    """Forgets the model received last (the library keeps no other reference to it)."""
    _client.clear()


def shutdown():
    """Flushes the metrics and closes the session; `is_running()` is False afterwards."""
    _client.shutdown()
