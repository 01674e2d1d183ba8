"""How a trainer process ends: the exit codes the trainer uses and the operator's failure policy matches on.

One table on both sides, so a rule such as "fail the job at once on a configuration error" reads the same
number the trainer wrote (``runPolicy.failurePolicy``, docs/api.md). Codes below 128 are the trainer's own;
128 + N is death by signal N, as the kubelet reports it.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    #: anything not classified below (a bug, an unexpected exception): the trace is in the log
    ERROR = 1
    #: the configuration cannot be used (a value the trainer refuses, a model that cannot be built): retrying the
    #: same spec cannot help
    CONFIG = 2
    #: the training data cannot be read or is invalid (EX_DATAERR)
    DATA = 65
    #: the local launcher's fault detector stopped the run (EX_TEMPFAIL: resume from the last checkpoint)
    FAULT_STOP = 75
    #: a peer left or the process group broke (a rendezvous that never completed, a collective whose peer is gone)
    PEER_LOST = 76
    #: the training loss became NaN or infinite
    NON_FINITE_LOSS = 80
    #: the device or host ran out of memory
    OUT_OF_MEMORY = 81
    #: SIGTERM (the pod was deleted: a restart, a resize, a drain, a preemption)
    SIGTERM = 143

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.OK: "success",
    ExitCode.ERROR: "unclassified error",
    ExitCode.CONFIG: "configuration error",
    ExitCode.DATA: "data error",
    ExitCode.FAULT_STOP: "stopped by the fault detector",
    ExitCode.PEER_LOST: "peer lost",
    ExitCode.NON_FINITE_LOSS: "non-finite loss",
    ExitCode.OUT_OF_MEMORY: "out of memory",
    ExitCode.SIGTERM: "terminated (SIGTERM)",
}


def describe(code: int) -> str:
    """``"configuration error"`` for 2, ``"signal 9"`` for 137, ``"exit code 7"`` for a code outside the table."""
    try:
        return ExitCode(code).meaning
    except ValueError:
        return f"signal {code - 128}" if code > 128 else f"exit code {code}"
