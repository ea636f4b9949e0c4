"""`FLModel`, `ParamsType` and the meta keys, as in `nvflare.app_common.abstract.fl_model`."""

from enum import Enum


class ParamsType(str, Enum):
    """What `FLModel.params` holds: the whole model, or its difference to the task's model."""

    FULL = "FULL"
    DIFF = "DIFF"


class FLMetaKey:
    """Well-known keys of `FLModel.meta` (FLARE's names)."""

    NUM_STEPS_CURRENT_ROUND = "NUM_STEPS_CURRENT_ROUND"
    PROCESS_RC_FILE = "PROCESS_RC_FILE"
    SUBMIT_MODEL_NAME = "submit_model_name"
    INITIAL_METRICS = "initial_metrics"
    FILTER_HISTORY = "filter_history"
    CONFIGS = "configs"
    VALIDATE_TYPE = "validate_type"
    START_ROUND = "start_round"
    CURRENT_ROUND = "current_round"
    TOTAL_ROUNDS = "total_rounds"
    JOB_ID = "job_id"
    SITE_NAME = "site_name"


class FLModel:
    """A model and what goes with it. `params` given without `params_type` means FULL
    (FLARE's rule)."""

    def __init__(
        self,
        params_type=None,
        params=None,
        optimizer_params=None,
        metrics=None,
        start_round=0,
        current_round=None,
        total_rounds=None,
        meta=None,
    ):
        if params_type is not None and not isinstance(params_type, (str, ParamsType)):
            # FLModel(state_dict): FLARE's first parameter is params_type, but a model given
            # first is taken as params.
            if params is not None:
                raise TypeError("params_type must be a ParamsType or a str, not %s" % type(params_type))
            params, params_type = params_type, None
        if params_type is not None and not isinstance(params_type, ParamsType):
            params_type = ParamsType(str(getattr(params_type, "value", params_type)).upper())
        if params is not None and params_type is None:
            params_type = ParamsType.FULL
        self.params_type = params_type
        self.params = params
        self.optimizer_params = optimizer_params
        self.metrics = metrics
        self.start_round = start_round
        self.current_round = current_round
        self.total_rounds = total_rounds
        self.meta = {} if meta is None else meta

    def __repr__(self):
        params = None if self.params is None else "<%d tensors>" % len(self.params)
        return (
            "FLModel(params=%s, params_type=%s, metrics=%r, current_round=%r, total_rounds=%r, "
            "meta=%r)"
            % (
                params,
                None if self.params_type is None else self.params_type.value,
                self.metrics,
                self.current_round,
                self.total_rounds,
                self.meta,
            )
        )
