"""The operator's own Prometheus metrics (the workers export training metrics themselves).

One :class:`OperatorMetrics` per operator run, on its own ``CollectorRegistry`` (never the global
default one), so several operators can run in one process (tests) without clashing. Every metric
is listed, with its meaning, in ``docs/metrics.md`` (a test checks the list against a live scrape).

Per-job series (``namespace``, ``job`` labels) are derived from the job's stored status after each
reconcile (:meth:`OperatorMetrics.observe_reconcile`), so a restarted operator carries on from the
object alone: the fault time behind ``loco_operator_fault_recovery_seconds`` is the ``Restarting``
condition's ``lastTransitionTime``, the start of ``loco_operator_job_time_to_running_seconds`` the
job's ``creationTimestamp``. Per-job gauges are removed when the job is deleted.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from loco_detector.types import VerdictKind
from .spec import CheckpointSpec, Phase

#: Buckets of the job-level durations (creation -> running, fault -> running): 1 s to 2 h.
JOB_SECONDS_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

#: ``kind`` label of ``loco_operator_faults_total``: worker failures the planner saw (``WorkerFailed``
#: events), then the C4 detector's verdict kinds (``FaultDetected`` events, whose message starts with the kind).
FAULT_KINDS = ("worker-exit", "worker-oom", "worker-evicted", "worker-lost") + tuple(k.value for k in VerdictKind)

#: ``operation`` label of ``loco_operator_api_errors_total``: every Kubernetes API call the handlers make
#: (``handlers.py``; a test keeps the two in step). Each starts at 0, so ``rate()`` sees the first failure.
API_OPERATIONS = (
    "get_job", "list_pods", "get_service", "get_configmap", "get_secret", "get_networkpolicy", "list_nodes",
    "list_all_pods", "read_node", "create_service", "create_configmap", "create_secret", "create_networkpolicy",
    "create_pod", "patch_configmap", "patch_pod", "patch_node",
    "delete_pod", "force_delete_pod", "delete_job", "patch_status", "get_workload", "create_workload",
    "delete_workload", "patch_workload_status", "get_resourceflavor", "get_workloadpriorityclass",
    "get_population", "list_jobs", "patch_population_status", "create_job",
)

#: ``(from, to)`` of ``loco_operator_job_transitions_total`` that a job can make: from a new job (``""``) or
#: any phase but the terminal ones (Succeeded, Failed) to any other phase. Each starts at 0 when the
#: operator starts, so ``increase()``/``rate()`` see the first of its kind (a series born at 1 shows none).
PHASE_TRANSITIONS = tuple(
    (old, new.value)
    for old in ("",) + tuple(ph.value for ph in Phase if ph not in (Phase.succeeded, Phase.failed))
    for new in Phase
    if new.value != old
)


def fault_kind(message: str) -> str:
    """The fault kind of a planner ``WorkerFailed`` event message (see ``planner.lifecycle.failure_message``):
    ``worker-evicted`` (the pod was deleted under a live worker), ``worker-lost`` (the pod vanished),
    ``worker-oom`` (killed for memory), else ``worker-exit`` (the trainer exited non-zero)."""
    if " was deleted while " in message:
        return "worker-evicted"
    if " disappeared while " in message:
        return "worker-lost"
    if "OOMKilled" in message:
        return "worker-oom"
    return "worker-exit"


#: checkpoint.everySteps when the spec leaves it out
_EVERY_STEPS_DEFAULT = CheckpointSpec.model_fields["every_steps"].default


def _remove(gauge: Gauge, *labels: str) -> None:
    """Drop one labelled series of ``gauge`` (absent: nothing to do)."""
    try:
        gauge.remove(*labels)
    except KeyError:
        pass


def parse_rfc3339(text: Any) -> float | None:
    """Seconds since the epoch of an RFC 3339 time (``...Z`` accepted); None when absent or unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == type_:
            return cond
    return None


class OperatorMetrics:
    """Metrics of one operator; ``observe_reconcile``/``forget_job`` keep the per-job series exact."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.jobs = Gauge("loco_operator_jobs", "TrainingJobs seen by this operator, by phase.", ["phase"], registry=r)
        self.transitions = Counter(
            "loco_operator_job_transitions", "TrainingJob phase transitions.", ["from", "to"], registry=r
        )
        self.restarts = Counter("loco_operator_restarts", "TrainingJob restarts after a worker failure (all jobs).", registry=r)
        self.job_restarts = Counter(
            "loco_operator_job_restarts", "Restarts of one TrainingJob after a worker failure.", ["namespace", "job"], registry=r
        )
        self.faults = Counter(
            "loco_operator_faults", "Faults detected, by kind (worker-exit, worker-oom, worker-evicted, worker-lost, "
            "or a fault detector verdict such as hang-comm).", ["namespace", "job", "kind"], registry=r,
        )
        self.resizes = Counter(
            "loco_operator_resizes", "Worker-count changes applied to a running TrainingJob.", ["namespace", "job"], registry=r
        )
        self.reconcile_duration = Histogram(
            "loco_operator_reconcile_duration_seconds",
            "Duration of one reconcile (observe, plan, apply, patch status).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.reconciles_in_flight = Gauge(
            "loco_operator_reconciles_in_flight",
            "Reconciles running or queued behind another reconcile of the same job (the operator's work queue).",
            registry=r,
        )
        self.api_errors = Counter("loco_operator_api_errors", "Failed Kubernetes API calls.", ["operation"], registry=r)
        self.time_to_running = Histogram(
            "loco_operator_job_time_to_running_seconds",
            "From a TrainingJob's creation to all of its workers running for the first time.",
            buckets=JOB_SECONDS_BUCKETS, registry=r,
        )
        self.fault_recovery = Histogram(
            "loco_operator_fault_recovery_seconds",
            "From a fault (the job entering Restarting) to all workers running again.",
            buckets=JOB_SECONDS_BUCKETS, registry=r,
        )
        self.workers = Gauge(
            "loco_operator_job_workers", "Worker pods of a TrainingJob's current epoch: desired, and ready (running "
            "and reporting progress).", ["namespace", "job", "state"], registry=r,
        )
        self.checkpoint_step = Gauge(
            "loco_operator_job_checkpoint_step", "Inner step of a TrainingJob's last committed checkpoint.",
            ["namespace", "job"], registry=r,
        )
        self.checkpoint_time = Gauge(
            "loco_operator_job_checkpoint_timestamp_seconds",
            "Commit time (Unix seconds) of a TrainingJob's last committed checkpoint; time() minus it is the checkpoint age.",
            ["namespace", "job"], registry=r,
        )
        self.start_time = Gauge(
            "loco_operator_job_start_timestamp_seconds",
            "When a TrainingJob's workers were first created (status.startTime, Unix seconds; reset by a resume from "
            "suspension). Only for jobs that checkpoint periodically (checkpoint.everySteps > 0): with the checkpoint "
            "timestamp, the age of the newest thing a failure would fall back to.",
            ["namespace", "job"], registry=r,
        )
        self.local_steps = Gauge(
            "loco_operator_job_worker_local_steps",
            "Inner steps per round a worker takes under spec.algorithm.adaptiveSteps (syncEvery for the fastest; fewer "
            "for a slower worker), by replica index.", ["namespace", "job", "worker"], registry=r,
        )
        self.population_score = Gauge(
            "loco_operator_population_score", "A Population's best and median member score (its spec.metric, lower is "
            "better) at the end of its last finished round.", ["namespace", "population", "stat"], registry=r,
        )
        self.population_round = Gauge(
            "loco_operator_population_round", "The round a Population's members train now (from 0).",
            ["namespace", "population"], registry=r,
        )
        self.population_exploits = Gauge(
            "loco_operator_population_exploits", "Exploits a Population has made so far (bottom members that took a top "
            "member's checkpoint).", ["namespace", "population"], registry=r,
        )
        #: per job: the worker indices with a local-steps series, so a worker that left loses its series
        self._local_steps_workers: dict[str, set[str]] = {}
        for phase in Phase:
            self.jobs.labels(phase=phase.value)
        for old, new in PHASE_TRANSITIONS:
            self.transitions.labels(**{"from": old, "to": new})
        for operation in API_OPERATIONS:
            self.api_errors.labels(operation=operation)
        self._phases: dict[str, str] = {}
        #: Per job: (uid, the stored status.restarts already counted in the restart counters).
        self._restarts_counted: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    # ------------------------------------------------------------------------------- recording

    def observe_job(self, key: str, old_phase: str | None, new_phase: str | None, restarts_added: int = 0) -> None:
        """Record a job's phase after a reconcile (``key`` is ``namespace/name``)."""
        with self._lock:
            if new_phase is not None:
                self._phases[key] = new_phase
            self._refresh()
        if new_phase is not None and old_phase != new_phase:
            self.transitions.labels(**{"from": old_phase or "", "to": new_phase}).inc()
        if restarts_added > 0:
            self.restarts.inc(restarts_added)
            namespace, _, name = key.partition("/")
            self.job_restarts.labels(namespace=namespace, job=name).inc(restarts_added)

    def observe_reconcile(
        self,
        job: Mapping[str, Any],
        old_status: Mapping[str, Any],
        new_status: Mapping[str, Any],
        events: Iterable[tuple[str, str]] = (),
        now_s: float | None = None,
    ) -> None:
        """Everything one reconcile of ``job`` teaches: phase and transition, restarts, faults (from the
        planner's ``(reason, message)`` events: ``WorkerFailed`` -> a fault of :func:`fault_kind`,
        ``FaultDetected`` -> a fault of the detector verdict's kind, ``Resizing`` -> a resize), the per-job gauges, and the creation->running and fault->running
        durations (``now_s``: Unix seconds, when the new status was computed)."""
        meta = job.get("metadata") or {}
        namespace, name = meta.get("namespace") or "default", meta.get("name") or ""
        old_phase, new_phase = old_status.get("phase"), new_status.get("phase")
        if not old_status:  # a job new to this operator: its counters start at 0, so increase() sees the first event
            self.job_restarts.labels(namespace=namespace, job=name)
            self.resizes.labels(namespace=namespace, job=name)
            for kind in FAULT_KINDS:
                self.faults.labels(namespace=namespace, job=name, kind=kind)
        self.observe_job(f"{namespace}/{name}", old_phase, new_phase,
                         restarts_added=self._new_restarts(job, old_status, new_status))
        for reason, message in events:
            if reason == "WorkerFailed":
                self.record_fault(namespace, name, fault_kind(message))
            elif reason == "FaultDetected":  # "<verdict kind>[ at collective #n]: ..."
                self.record_fault(namespace, name, message.split(" ", 1)[0].split(":", 1)[0] or "unknown")
            elif reason == "Resizing":
                self.resizes.labels(namespace=namespace, job=name).inc()
        workers = new_status.get("workers") or {}
        self.workers.labels(namespace=namespace, job=name, state="desired").set(int(workers.get("desired") or 0))
        self.workers.labels(namespace=namespace, job=name, state="ready").set(int(workers.get("ready") or 0))
        every = ((job.get("spec") or {}).get("checkpoint") or {}).get("everySteps", _EVERY_STEPS_DEFAULT)
        started = parse_rfc3339(new_status.get("startTime"))
        if started is not None and every:
            self.start_time.labels(namespace=namespace, job=name).set(started)
        else:
            _remove(self.start_time, namespace, name)
        self._set_local_steps(namespace, name, new_status.get("localSteps") or [])
        ckpt = new_status.get("lastCheckpoint") or {}
        if ckpt.get("step") is not None:
            self.checkpoint_step.labels(namespace=namespace, job=name).set(int(ckpt["step"]))
            committed = parse_rfc3339(ckpt.get("time"))
            if committed is not None:
                self.checkpoint_time.labels(namespace=namespace, job=name).set(committed)
        if now_s is None or new_phase != Phase.running.value or old_phase == Phase.running.value:
            return
        if old_phase == Phase.restarting.value:
            cond = _condition(old_status, "Restarting")
            fault_s = parse_rfc3339(cond.get("lastTransitionTime")) if cond and cond.get("reason") == "Restarting" else None
            if fault_s is not None:
                self.fault_recovery.observe(max(0.0, now_s - fault_s))
        elif _condition(old_status, "Running") is None:  # running for the first time
            created_s = parse_rfc3339(meta.get("creationTimestamp"))
            if created_s is not None:
                self.time_to_running.observe(max(0.0, now_s - created_s))

    def _set_local_steps(self, namespace: str, name: str, entries: Iterable[Mapping[str, Any]]) -> None:
        workers = {str(e["worker"]): int(e["steps"]) for e in entries if "worker" in e and "steps" in e}
        key = f"{namespace}/{name}"
        with self._lock:
            gone = self._local_steps_workers.get(key, set()) - set(workers)
            self._local_steps_workers[key] = set(workers)
        for worker in gone:
            _remove(self.local_steps, namespace, name, worker)
        for worker, steps in workers.items():
            self.local_steps.labels(namespace=namespace, job=name, worker=worker).set(steps)

    def _new_restarts(self, job: Mapping[str, Any], old_status: Mapping[str, Any], new_status: Mapping[str, Any]) -> int:
        """Restarts of ``job`` not counted yet: how far its stored ``status.restarts`` moved past the
        highest value already counted (from ``old_status`` when this operator first sees the job). A
        retried reconcile, or a status write stored although the client saw it fail, is never counted
        twice nor lost."""
        meta = job.get("metadata") or {}
        key, uid = f"{meta.get('namespace') or 'default'}/{meta.get('name') or ''}", meta.get("uid") or ""
        stored = int(new_status.get("restarts") or 0)
        with self._lock:
            seen_uid, counted = self._restarts_counted.get(key, (uid, int(old_status.get("restarts") or 0)))
            if seen_uid != uid:  # a new job of the same name
                counted = int(old_status.get("restarts") or 0)
            self._restarts_counted[key] = (uid, max(counted, stored))
        return max(0, stored - counted)

    def record_fault(self, namespace: str, job: str, kind: str) -> None:
        """Count one fault of ``kind`` in ``namespace/job`` (worker failures, detector verdicts)."""
        self.faults.labels(namespace=namespace, job=job, kind=kind).inc()

    def observe_population(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """A Population's gauges from its status (a score appears once its first round has finished)."""
        self.population_round.labels(namespace, name).set(status.get("round") or 0)
        self.population_exploits.labels(namespace, name).set(len(status.get("lineage") or []))
        best, median = (status.get("best") or {}).get("score"), status.get("medianScore")
        for stat, value in (("best", best), ("median", median)):
            if isinstance(value, (int, float)):
                self.population_score.labels(namespace, name, stat).set(value)

    def forget_population(self, namespace: str, name: str) -> None:
        for gauge, label_sets in ((self.population_score, [(namespace, name, "best"), (namespace, name, "median")]),
                                  (self.population_round, [(namespace, name)]),
                                  (self.population_exploits, [(namespace, name)])):
            for values in label_sets:
                _remove(gauge, *values)

    def forget_job(self, key: str) -> None:
        """The job is gone: drop it from the phase gauge and remove its per-job gauges (its counters
        stay, as Prometheus counters must not go backwards while the process lives)."""
        namespace, _, name = key.partition("/")
        with self._lock:
            self._phases.pop(key, None)
            self._restarts_counted.pop(key, None)
            local_workers = self._local_steps_workers.pop(key, set())
            self._refresh()
        for worker in local_workers:
            _remove(self.local_steps, namespace, name, worker)
        for gauge, label_sets in ((self.workers, [(namespace, name, "desired"), (namespace, name, "ready")]),
                                  (self.checkpoint_step, [(namespace, name)]), (self.checkpoint_time, [(namespace, name)]),
                                  (self.start_time, [(namespace, name)])):
            for values in label_sets:
                _remove(gauge, *values)

    def _refresh(self) -> None:
        counts = {phase.value: 0 for phase in Phase}
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            self.jobs.labels(phase=phase).set(count)

    # ---------------------------------------------------------------------------------- serving

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``port`` (0: any free port); returns the bound port."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
