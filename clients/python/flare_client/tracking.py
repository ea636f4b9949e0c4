"""FLARE's experiment-tracking writers (`nvflare.client.tracking`): every call is a `log`
record, batched with the others and shown by the node."""

from . import AnalyticsDataType, log


class SummaryWriter:
    """TensorBoard's SummaryWriter calls."""

    def __init__(self, *args, **kwargs):
        pass

    def add_scalar(self, tag, scalar, global_step=None, **kwargs):
        log(tag, scalar, AnalyticsDataType.SCALAR, global_step=global_step, **kwargs)

    def add_scalars(self, main_tag, tag_scalar_dict, global_step=None, **kwargs):
        log(main_tag, tag_scalar_dict, AnalyticsDataType.SCALARS, global_step=global_step, **kwargs)

    def add_text(self, tag, text_string, global_step=None, **kwargs):
        log(tag, text_string, AnalyticsDataType.TEXT, global_step=global_step, **kwargs)

    def flush(self):
        from . import _client

        if _client.inited:
            _client.flush_logs()

    def close(self):
        self.flush()


class MLflowWriter:
    """MLflow's calls."""

    def __init__(self, *args, **kwargs):
        pass

    def log_param(self, key, value):
        log(key, value, AnalyticsDataType.PARAMETER)

    def log_params(self, values):
        log("", values, AnalyticsDataType.PARAMETERS)

    def log_metric(self, key, value, step=None):
        log(key, value, AnalyticsDataType.METRIC, global_step=step)

    def log_metrics(self, metrics, step=None):
        log("", metrics, AnalyticsDataType.METRICS, global_step=step)

    def log_text(self, text, artifact_file_path):
        log(artifact_file_path, text, AnalyticsDataType.TEXT)

    def set_tag(self, key, tag):
        log(key, tag, AnalyticsDataType.TAG)

    def set_tags(self, tags):
        log("", tags, AnalyticsDataType.TAGS)


class WandBWriter:
    """Weights & Biases' `log`."""

    def __init__(self, *args, **kwargs):
        pass

    def log(self, metrics, step=None):
        log("", metrics, AnalyticsDataType.METRICS, global_step=step)
