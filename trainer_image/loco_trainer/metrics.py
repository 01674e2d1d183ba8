"""Prometheus metrics of one trainer process (served on ``/metrics`` by :mod:`loco_trainer.progress`).

Every metric carries ``job``, ``namespace``, ``replica`` and ``rank`` labels; values are in base
units (seconds, bytes) and counters end in ``_total``. ``loco_trainer_info{algorithm,device}`` (value
1) names the algorithm, so a query can split any series by it (``* on(namespace, job, replica, rank)
group_left(algorithm) loco_trainer_info``). Each :class:`TrainerMetrics` owns its own
``CollectorRegistry`` (no process-global state), so tests can build several side by side. Every
metric is listed, with its meaning, in ``docs/metrics.md`` (a test checks the list against a scrape).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: step-time buckets from 1 ms to 2 min
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: why a checkpoint is skipped at resume (``loco_trainer.ucp.SkipReason``; a test keeps the two equal, this
#: module stays torch-free): each exists at 0 from the start, so ``increase()`` sees the first skip
CHECKPOINT_SKIP_REASONS = ("manifest", "unsafe_path", "missing_file", "size", "checksum", "header")
#: collective-duration buckets from 10 µs to 2 min (the fault detector's latency scale)
COLLECTIVE_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)


class _Record(Protocol):
    """What :meth:`TrainerMetrics.observe_collectives` reads of ``loco_trainer.comm.CollectiveRecord``."""

    seq: int
    kind: str
    enter_ns: int
    exit_ns: int | None


class TrainerMetrics:
    """The trainer's metric families, already bound to this process's labels."""

    def __init__(self, job: str, namespace: str, replica: int, rank: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        names = ["job", "namespace", "replica", "rank"]
        labels = dict(job=job, namespace=namespace, replica=str(replica), rank=str(rank))
        r = self.registry

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, names, registry=r).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = STEP_BUCKETS) -> Any:
            return Histogram(name, doc, names, buckets=buckets, registry=r).labels(**labels)

        self.step = gauge("loco_trainer_step", "Inner steps completed.")
        self.total_steps = gauge("loco_trainer_total_steps", "Inner steps to run in all.")
        self.loss = gauge("loco_trainer_loss", "Training loss (mean over the last log interval).")
        self.eval_loss = gauge("loco_trainer_eval_loss", "Latest held-out loss (mean over ranks).")
        self.lr = gauge("loco_trainer_learning_rate", "Learning rate of the inner optimizer.")
        self.tokens_per_second = gauge("loco_trainer_tokens_per_second", "Tokens/s of this process over the last log interval.")
        self.step_seconds = histogram("loco_trainer_step_seconds", "Wall time of one inner step.")
        self.outer_sync_seconds = histogram(
            "loco_trainer_outer_sync_seconds",
            "Wall time of the algorithm's after-step hook on steps where it communicated (the outer synchronisation "
            "of DiLoCo-like algorithms; DDP communicates inside backward and never observes one).",
        )
        self.checkpoint_save_seconds = histogram(
            "loco_trainer_checkpoint_save_seconds",
            "Wall time of one checkpoint save, from snapshot to commit (all ranks, commit included).",
        )
        self.checkpoint_stall_seconds = histogram(
            "loco_trainer_checkpoint_stall_seconds",
            "Time one checkpoint blocked the training loop (the whole save when synchronous; snapshot plus "
            "waiting for the commit when asynchronous).",
        )
        self.checkpoint_step = gauge("loco_trainer_checkpoint_step", "Inner step of the last checkpoint this process committed or resumed from.")
        self.checkpoint_timestamp = gauge(
            "loco_trainer_checkpoint_last_commit_timestamp_seconds",
            "Unix time this process last committed a checkpoint (time() minus it is the checkpoint age).",
        )
        self._checkpoint_skipped = Counter(
            "loco_trainer_checkpoint_skipped",
            "Committed checkpoints passed over at resume because they failed verification, by reason "
            "(manifest, unsafe_path, missing_file, size, checksum, header).",
            names + ["reason"], registry=r,
        )
        for reason in CHECKPOINT_SKIP_REASONS:
            self._checkpoint_skipped.labels(**labels, reason=reason)
        self.tokens = Counter("loco_trainer_tokens", "Training tokens processed by this process.", names, registry=r).labels(**labels)
        self._comm_sent = Counter(
            "loco_trainer_comm_bytes_sent", "Bytes sent through collectives, by kind of exchange.", names + ["kind"], registry=r,
        )
        self._comm_received = Counter(
            "loco_trainer_comm_bytes_received", "Bytes received through collectives, by kind of exchange.",
            names + ["kind"], registry=r,
        )
        self._collective_seconds = Histogram(
            "loco_trainer_collective_seconds",
            "Duration of one collective from entry to completion, by kind (the timings the fault detector reads).",
            names + ["kind"], buckets=COLLECTIVE_BUCKETS, registry=r,
        )
        self._algorithm = Gauge(
            "loco_trainer_algorithm_metric", "Algorithm-specific gauges (Strategy.metrics(): outer rounds, spread, ...).",
            names + ["metric"], registry=r,
        )
        self._info = Gauge(
            "loco_trainer_info", "Always 1: the algorithm and device of this process, for joins.",
            names + ["algorithm", "device"], registry=r,
        )
        self._gpu = Gauge(
            "loco_trainer_gpu_memory_bytes",
            "CUDA memory of this process's device: allocated, reserved, max_allocated (only exported on GPU).",
            names + ["state"], registry=r,
        )
        # Unknown until the loop reports them: NaN (a gap on a graph), not a misleading 0 (e.g. a loss of 0
        # while a restarted worker loads its checkpoint).
        for unknown in (self.step, self.loss, self.eval_loss):
            unknown.set(float("nan"))
        self._labels = labels
        self._sent_seen: dict[str, float] = {}
        self._received_seen: dict[str, float] = {}
        self._collective_watermark = -1  # every seq <= this was observed (or skipped as unfinished forever)
        self._collective_done: set[int] = set()  # seqs above the watermark already observed

    # ---------------------------------------------------------------------------------- setters

    def set_info(self, algorithm: str, device: str) -> None:
        """Publish ``loco_trainer_info{algorithm,device} 1`` (call once the device is known)."""
        self._info.clear()
        self._info.labels(**self._labels, algorithm=algorithm, device=device).set(1)

    def set_comm_bytes(self, by_kind: Mapping[str, float]) -> None:
        """Advance ``loco_trainer_comm_bytes_sent_total{kind}`` to the comm layer's cumulative counts."""
        self._advance(self._comm_sent, self._sent_seen, by_kind)

    def set_comm_stats(self, stats: Mapping[str, Any]) -> None:
        """Advance the sent and received byte counters from ``Comm.stats()`` (cumulative ``by_kind``;
        kinds not used yet are exported at 0, so ``rate()``/``increase()`` see their first exchange)."""
        by_kind = stats.get("by_kind") or {}
        for kind in by_kind:
            self._comm_sent.labels(**self._labels, kind=kind)
            self._comm_received.labels(**self._labels, kind=kind)
            self._collective_seconds.labels(**self._labels, kind=kind)
        self._advance(self._comm_sent, self._sent_seen, {k: v.get("bytes_sent", 0) for k, v in by_kind.items()})
        self._advance(self._comm_received, self._received_seen, {k: v.get("bytes_received", 0) for k, v in by_kind.items()})

    def _advance(self, counter: Counter, seen: dict[str, float], totals: Mapping[str, float]) -> None:
        for kind, total in totals.items():
            delta = float(total) - seen.get(kind, 0.0)
            if delta > 0:
                counter.labels(**self._labels, kind=kind).inc(delta)
                seen[kind] = float(total)

    def observe_collectives(self, records: Iterable[_Record]) -> int:
        """Observe the duration of every completed collective not observed before (``Comm.records()``
        snapshots, oldest first; each seq counted once, in-flight ones when they complete). Returns
        how many were observed now."""
        observed = 0
        pending_below: int | None = None
        for rec in records:
            if rec.seq <= self._collective_watermark or rec.seq in self._collective_done:
                continue
            if rec.exit_ns is None:
                pending_below = rec.seq if pending_below is None else min(pending_below, rec.seq)
                continue
            self._collective_seconds.labels(**self._labels, kind=rec.kind).observe(max(0, rec.exit_ns - rec.enter_ns) / 1e9)
            self._collective_done.add(rec.seq)
            observed += 1
        # advance the watermark over the contiguous prefix of observed seqs (bounded memory)
        limit = pending_below if pending_below is not None else None
        while (self._collective_watermark + 1) in self._collective_done and (limit is None or self._collective_watermark + 1 < limit):
            self._collective_watermark += 1
            self._collective_done.discard(self._collective_watermark)
        if len(self._collective_done) > 100_000:  # records fell out of Comm's history: forget the oldest
            self._collective_watermark = min(self._collective_done) - 1
        return observed

    def set_algorithm_metrics(self, values: Mapping[str, float]) -> None:
        """Set ``loco_trainer_algorithm_metric{metric}`` from the strategy's ``metrics()``."""
        for name, value in values.items():
            self._algorithm.labels(**self._labels, metric=name).set(float(value))

    def checkpoint_committed(self, step: int, save_seconds: float, stall_seconds: float, when_s: float | None = None) -> None:
        """A checkpoint of ``step`` was committed: save and stall times, its step and commit time."""
        self.checkpoint_save_seconds.observe(save_seconds)
        self.checkpoint_stall_seconds.observe(stall_seconds)
        self.checkpoint_step.set(step)
        self.checkpoint_timestamp.set(time.time() if when_s is None else when_s)

    def checkpoint_skipped(self, reason: str) -> None:
        """A committed checkpoint failed verification at resume and an older one was taken
        (``reason``: ``loco_trainer.ucp.SkipReason``)."""
        self._checkpoint_skipped.labels(**self._labels, reason=reason).inc()

    def set_gpu_memory(self, allocated: float, reserved: float, max_allocated: float) -> None:
        """CUDA memory of this process's device in bytes (``torch.cuda.memory_allocated`` etc.)."""
        for state, value in (("allocated", allocated), ("reserved", reserved), ("max_allocated", max_allocated)):
            self._gpu.labels(**self._labels, state=state).set(float(value))

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
