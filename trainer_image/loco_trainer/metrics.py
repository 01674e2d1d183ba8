"""Prometheus metrics of one trainer process (served on ``/metrics`` by :mod:`loco_trainer.progress`).

Every metric carries ``job``, ``namespace``, ``replica`` and ``rank`` labels; values are in base
units (seconds, bytes) and counters end in ``_total``. Each :class:`TrainerMetrics` owns its own
``CollectorRegistry`` (no process-global state), so tests can build several side by side.
"""

from __future__ import annotations

from typing import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: step-time buckets from 1 ms to 2 min
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class TrainerMetrics:
    """The trainer's metric families, already bound to this process's labels."""

    def __init__(self, job: str, namespace: str, replica: int, rank: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        names = ["job", "namespace", "replica", "rank"]
        labels = dict(job=job, namespace=namespace, replica=str(replica), rank=str(rank))
        r = self.registry
        self.step = Gauge("loco_trainer_step", "Inner steps completed.", names, registry=r).labels(**labels)
        self.total_steps = Gauge("loco_trainer_total_steps", "Inner steps to run in all.", names, registry=r).labels(**labels)
        self.loss = Gauge("loco_trainer_loss", "Training loss (mean over the last log interval).", names, registry=r).labels(**labels)
        self.eval_loss = Gauge("loco_trainer_eval_loss", "Latest held-out loss (mean over ranks).", names, registry=r).labels(**labels)
        self.lr = Gauge("loco_trainer_learning_rate", "Learning rate of the inner optimizer.", names, registry=r).labels(**labels)
        self.tokens_per_second = Gauge(
            "loco_trainer_tokens_per_second", "Tokens/s of this process over the last log interval.", names, registry=r
        ).labels(**labels)
        self.step_seconds = Histogram(
            "loco_trainer_step_seconds", "Wall time of one inner step.", names, buckets=STEP_BUCKETS, registry=r
        ).labels(**labels)
        self.checkpoint_save_seconds = Histogram(
            "loco_trainer_checkpoint_save_seconds", "Wall time of one checkpoint save (all ranks, commit included).",
            names, buckets=STEP_BUCKETS, registry=r,
        ).labels(**labels)
        self.tokens = Counter("loco_trainer_tokens_total", "Training tokens processed by this process.", names, registry=r).labels(**labels)
        self._comm_bytes = Counter(
            "loco_trainer_comm_bytes_sent_total", "Bytes sent through collectives, by kind of exchange.",
            names + ["kind"], registry=r,
        )
        self._algorithm = Gauge(
            "loco_trainer_algorithm_metric", "Algorithm-specific gauges (Strategy.metrics(): outer rounds, spread, ...).",
            names + ["metric"], registry=r,
        )
        self._labels = labels
        self._comm_seen: dict[str, float] = {}

    def set_comm_bytes(self, by_kind: Mapping[str, float]) -> None:
        """Advance ``loco_trainer_comm_bytes_sent_total{kind}`` to the comm layer's cumulative counts."""
        for kind, total in by_kind.items():
            delta = float(total) - self._comm_seen.get(kind, 0.0)
            if delta > 0:
                self._comm_bytes.labels(**self._labels, kind=kind).inc(delta)
                self._comm_seen[kind] = float(total)

    def set_algorithm_metrics(self, values: Mapping[str, float]) -> None:
        """Set ``loco_trainer_algorithm_metric{metric}`` from the strategy's ``metrics()``."""
        for name, value in values.items():
            self._algorithm.labels(**self._labels, metric=name).set(float(value))

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
