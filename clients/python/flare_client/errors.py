"""The exceptions of the Client API: every misuse and every refusal is a `FlareError`."""


class FlareError(RuntimeError):
    """Base of every error the Client API raises."""


class FlareStateError(FlareError):
    """A call out of order: `receive` before `init`, `send` before `receive`, `send` twice for
    one task, ..."""


class FlareConnectionError(FlareError):
    """The node could not be reached, refused the connection, or the connection broke."""


class FlareRejectedError(FlareConnectionError):
    """The node answered `hello` with `reject` (a wrong token, an unsupported protocol, a second
    connection). `reason` is the node's."""

    def __init__(self, reason):
        super().__init__("the node refused this program: %s" % reason)
        self.reason = reason


class FlareResultRejected(FlareError):
    """The node answered a result with `result_rejected`; the task failed with `reason`."""

    def __init__(self, task_id, reason):
        super().__init__("the node rejected the result of task %s: %s" % (task_id, reason))
        self.task_id = task_id
        self.reason = reason


class FlareProtocolError(FlareError):
    """The node sent something this client cannot read, or reported an `error`."""


class FlareModelError(FlareError):
    """A model or metrics that cannot be sent or received: a non-finite metric, an unsupported
    dtype (bf16 with numpy), a tensor that is not in the task's model when computing DIFF, ..."""
