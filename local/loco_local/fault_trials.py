"""Operating-system faults against a TrainingJob on a local stack, timed from the signal to the operator's
verdict in the job's status: what the OS-fault scenarios (e2e/test_os_faults.py) assert and the benchmark
(bench/os_faults_cluster.py) measures. One worker (replica 1 of 3) gets the fault; see :mod:`.os_faults`."""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from .os_faults import StopCycler, cpu_cap, signal_all
from .scenario import small_job, worker_processes

#: the faults a trial can make: a hang, a straggler, a slow (CPU-capped) machine, a crash
FAULTS = ("stop", "cycle", "cap", "kill")
#: the worker that gets the fault
VICTIM = 1
#: thresholds for the shared 2-core machine (docs/fault-detection.md "Loaded hosts"); hang floor: the default
DETECTION = {"minLatenessSeconds": 0.8, "minLinkExcessSeconds": 0.1, "hangTimeoutFloorSeconds": 10.0}
#: a straggler made by stopping: frozen STOP_S out of every STOP_S + RUN_S (late by more than minLatenessSeconds
#: at a collective, each stop far under the hang floor)
STOP_S, RUN_S = 1.5, 0.5
#: a slow machine: the victim gets this share of one core
CAP_FRACTION = 0.02


def os_fault_job(name: str, *, steps: int, algorithm: str = "ddp", **overrides: Any) -> dict[str, Any]:
    """Three DDP workers checkpointing every 10 steps, judged with :data:`DETECTION` after a short warm-up."""
    overrides.setdefault("faultDetection", {**DETECTION, "warmupCollectives": 8})
    return small_job(name, replicas=3, steps=steps, algorithm=algorithm, checkpoint__everySteps=10, **overrides)


def victim_processes(job: str, replica: int = VICTIM) -> list[Any]:
    return [p for p in worker_processes(job) if p.environ().get("LOCO_REPLICA_INDEX") == str(replica)]


def status(stack: Any, name: str) -> dict[str, Any]:
    return (stack.get_job(name) or {}).get("status") or {}


def wait_training(stack: Any, name: str, min_step: int, timeout_s: float) -> None:
    """Until the job is Running past ``min_step`` with every worker of epoch 0 up (the detector warmed up)."""
    def ready() -> bool:
        st = status(stack, name)  # the process scan only once the job says it trains
        return st.get("phase") == "Running" and (st.get("step") or 0) >= min_step and bool(victim_processes(name))

    stack.wait_for(ready, timeout_s=timeout_s, interval_s=0.3, what=f"{name} Running past step {min_step}")


@dataclass
class TrialResult:
    """What one fault led to: the first record the operator wrote after it (a fault from ``status.faults``,
    or for ``kill`` the ``status.lastFailure``), and the seconds from the signal to it."""

    fault: str
    seconds: float | None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str | None:
        return self.record.get("kind") or self.record.get("reason")

    def blames_only(self, job: str, replica: int = VICTIM) -> bool:
        """The record names the victim and nobody else."""
        if self.fault == "kill":
            return self.record.get("pods") == [f"{job}-worker-{replica}"]
        return self.record.get("ranks") == [replica] and self.record.get("pods") == [f"{job}-worker-{replica}"]


@contextmanager
def _fault(fault: str, procs: list[Any]) -> Iterator[None]:
    """Make the fault for as long as the block runs; then undo it where it can be undone."""
    if fault == "stop":
        signal_all(procs, signal.SIGSTOP)
        try:
            yield
        finally:
            signal_all(procs, signal.SIGCONT)  # a stopped process ends only on SIGKILL: let SIGTERM in
    elif fault == "cycle":
        with StopCycler(procs, STOP_S, RUN_S):
            yield
    elif fault == "cap":
        with cpu_cap([p.pid for p in procs], CAP_FRACTION):
            yield
    elif fault == "kill":
        signal_all(procs, signal.SIGKILL)
        yield
    else:
        raise ValueError(f"fault must be one of {FAULTS}, not {fault!r}")


def _new_record(fault: str, before: dict[str, Any], now: dict[str, Any]) -> dict[str, Any] | None:
    """The operator's first record of the fault: status ``before`` it and ``now``."""
    if fault == "kill":
        failure = now.get("lastFailure")
        return failure if failure and failure != before.get("lastFailure") else None
    seen, faults = len(before.get("faults") or []), now.get("faults") or []
    return faults[seen] if len(faults) > seen else None


def run_fault(stack: Any, name: str, fault: str, *, timeout_s: float) -> TrialResult:
    """Do ``fault`` to the victim of the running job ``name``, wait (up to ``timeout_s``) for the operator's
    record of it, undo the fault, and return the record with the time it took (None: no record came)."""
    procs = victim_processes(name)
    if not procs:
        raise RuntimeError(f"no worker process of replica {VICTIM} of {name}")
    before = status(stack, name)
    record = None
    with _fault(fault, procs):
        began = time.monotonic()
        while record is None and time.monotonic() - began < timeout_s:
            record = _new_record(fault, before, status(stack, name))
            if record is None:
                time.sleep(0.2)
        took = time.monotonic() - began
    return TrialResult(fault, round(took, 2) if record is not None else None, record or {})
