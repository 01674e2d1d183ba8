"""The operator's own Prometheus metrics (the workers export training metrics themselves).

One :class:`OperatorMetrics` per operator run, on its own ``CollectorRegistry`` (never the global
default one), so several operators can run in one process (tests) without clashing.

==============================================  =========  ==========================================
metric                                          type       meaning
==============================================  =========  ==========================================
``loco_operator_jobs{phase}``                   gauge      TrainingJobs this operator sees, by phase
``loco_operator_job_transitions_total{from,to}`` counter   phase transitions (``from`` "" for new jobs)
``loco_operator_restarts_total``                counter    job restarts (a worker failed)
``loco_operator_reconcile_duration_seconds``    histogram  observe + plan + apply of one reconcile
``loco_operator_api_errors_total{operation}``   counter    Kubernetes API calls that failed
==============================================  =========  ==========================================
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .spec import Phase


class OperatorMetrics:
    """Metrics of one operator; ``observe_job``/``forget_job`` keep the per-phase gauge exact."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.jobs = Gauge("loco_operator_jobs", "TrainingJobs seen by this operator, by phase.", ["phase"], registry=self.registry)
        self.transitions = Counter(
            "loco_operator_job_transitions", "TrainingJob phase transitions.", ["from", "to"], registry=self.registry
        )
        self.restarts = Counter("loco_operator_restarts", "TrainingJob restarts after a worker failure.", registry=self.registry)
        self.reconcile_duration = Histogram(
            "loco_operator_reconcile_duration_seconds",
            "Duration of one reconcile (observe, plan, apply, patch status).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.api_errors = Counter(
            "loco_operator_api_errors", "Failed Kubernetes API calls.", ["operation"], registry=self.registry
        )
        for phase in Phase:
            self.jobs.labels(phase=phase.value)
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: Any = None

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

    def forget_job(self, key: str) -> None:
        with self._lock:
            self._phases.pop(key, None)
            self._refresh()

    def _refresh(self) -> None:
        counts = {phase.value: 0 for phase in Phase}
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            self.jobs.labels(phase=phase).set(count)

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
