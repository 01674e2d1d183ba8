"""This rank's checkpoints, for the training loop (the universal format itself is :mod:`loco_trainer.ucp`): which
checkpoint to resume from, loading it at any layout, when to save, and the save in flight. A save stalls the loop
only to copy the state to host memory; the write and the all-ranks commit run in the background and are waited for
before the next save, at a membership change and at the end."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from loco_contract.config import RuntimeEnv, TrainerConfig
from loco_contract.protocol import (
    MAX_PREVIOUS_STEPS_REPORTED, MAX_SKIPPED_REPORTED, CheckpointRef, PreviousJobReport, SkippedCheckpoint,
)
from loco_trainer import sharding, ucp
from loco_trainer.data import DataPosition
from loco_trainer.failures import ConfigError
from loco_trainer.metrics import TrainerMetrics
from loco_trainer.rendezvous import RankInfo

log = logging.getLogger("loco_trainer")


class Checkpointer:
    """Args:
        config, env: the job's trainer config and this pod's runtime env (the checkpoint directory, resume hint).
        info: this process's rank (replaced at a membership change: :meth:`rejoin`).
        metrics: this process's metrics (optional).
        report: updates the pod's progress report (committed, skipped and failed checkpoints).
        epoch: the membership epoch this worker runs in now (the writer fence).
    ``view``: the pod's local view of a sharded model (set once the model is sharded).
    """

    def __init__(self, config: TrainerConfig, env: RuntimeEnv, info: RankInfo, *, metrics: TrainerMetrics | None,
                 report: Callable[..., None], epoch: Callable[[], int]) -> None:
        self.config, self.env, self.info, self.metrics = config, env, info, metrics
        self._report, self._epoch = report, epoch
        self.dir = checkpoint_dir(config, env)
        self.config_hash = config_hash(config)
        self.view: sharding.LocalView | None = None
        self.engine: ucp.CheckpointEngine | None = None  # built by open() (a collective)
        self._pending: ucp.SaveHandle | None = None
        #: the newest committed checkpoint this worker knows: the one it resumed from (:meth:`restore`) until it
        #: commits one itself
        self.last_committed: ucp.CheckpointInfo | None = None
        self._failures = 0

    def choose(self) -> tuple[ucp.CheckpointInfo, ucp.Storage] | None:
        """Rank 0 picks the newest committed checkpoint of this job that verifies (the operator's
        LOCO_RESUME_FROM is only a hint, used when the job's directory holds none); every rank gets
        the same answer. Newer checkpoints that fail verification are skipped: logged, counted in
        ``loco_trainer_checkpoint_skipped_total{reason}`` and reported in ``skippedCheckpoints``.
        Incomplete ``.tmp-*`` directories were removed when the engine was built."""
        assert self.engine is not None
        chosen: str | None = None
        if self.info.rank == 0:
            selection = self.engine.newest_valid()
            self._report_skipped(selection.skipped)
            newest = selection.info
            hint = self.env.resume_from
            if newest is not None:
                chosen = newest.url
                why = "newest committed checkpoint in " + self.dir
                if hint and os.path.normpath(self.env.resolve_path(hint)) != os.path.normpath(newest.url):
                    why += f" (the operator hinted {hint}; the directory holds a newer or different one)"
                log.info("resuming from %s: %s", newest.url, why)
            elif hint:
                try:
                    chosen = _verified(self.env.resolve_path(hint))
                    log.info("resuming from %s: LOCO_RESUME_FROM (no committed checkpoint in %s)", chosen, self.dir)
                except (ucp.FormatError, OSError) as exc:
                    log.warning("ignoring LOCO_RESUME_FROM=%s: %s; starting fresh", hint, exc)
            if chosen is None and self.env.init_from:
                chosen = self._init_from()
            elif chosen is None:
                log.info("no committed checkpoint in %s: starting from step 0", self.dir)
        # as a container path, which each pod resolves in its own filesystem (the embedded cluster gives every pod
        # its own root), so each reports the checkpoint it resumed from as the operator knows it
        chosen = agree_rank0(self.env.container_path(chosen) if isinstance(chosen, str) else chosen)
        if isinstance(chosen, ConfigError):  # rank 0's refusal, on every rank
            raise ConfigError(str(chosen))
        return _open_checkpoint(self.env.resolve_path(chosen)) if chosen else None

    def _init_from(self) -> "str | ConfigError":
        """``checkpoint.initFrom`` (``LOCO_INIT_FROM``, resolved by the operator): another job's committed checkpoint,
        read only; one that is missing or does not verify is a configuration error, never a fresh start."""
        source = self.env.resolve_path(self.env.init_from)
        try:
            chosen = _verified(source)
        except (ucp.FormatError, OSError) as exc:
            return ConfigError(f"spec.checkpoint.initFrom: cannot start from {self.env.init_from}: {exc} (a step that "
                               f"checkpoint.keep rotated out of the source job, or a volume this job does not mount)")
        log.info("starting from %s: checkpoint.initFrom (no committed checkpoint in %s yet)", chosen, self.dir)
        return chosen

    def _report_skipped(self, skipped: list[ucp.SkippedCheckpoint]) -> None:
        """Checkpoints passed over at resume (the engine logged a warning for each): the metric, and the
        progress report, from which the operator makes an Event per checkpoint."""
        if not skipped:
            return
        assert self.engine is not None
        if self.metrics:
            for s in skipped:
                self.metrics.checkpoint_skipped(s.reason)
        self._report(skipped_checkpoints=[
            SkippedCheckpoint(step=s.step, path=self.env.container_path(self.engine.storage.path(s.dir)),
                              reason=s.reason, message=s.message[:240])
            for s in skipped[:MAX_SKIPPED_REPORTED]
        ])

    def restore(self, info: ucp.CheckpointInfo, storage: ucp.Storage, model, optimizer, strategy) -> tuple[int, DataPosition, int]:
        """Load ``info`` (any saved layout) into this rank; returns (step, data position, reference world).

        Model and inner optimizer: resharded from the atoms. Algorithm state: kept when the
        algorithm is the same, else reset (logged, event). Replica-local state (algorithms whose
        replicas differ between syncs, sharded or not): replica ``j`` of ``M`` takes saved replica
        ``j mod N``'s own parameters and inner optimizer state (resharded to this layout); after an
        algorithm change every replica takes replica 0's. RNG: restored when the layout is the
        same, else reseeded from (seed, rank, step) and logged."""
        self.last_committed = info
        cfg, tr, me = self.config, self.config.training, self.info
        algorithm = cfg.algorithm.name.value
        saved, now = info.layout, (me.world_size // me.nproc_per_worker, me.nproc_per_worker)
        same_layout = (saved.num_replicas, saved.nproc_per_worker) == now
        src = 0
        if replicas_diverge(algorithm) and info.manifest.algorithm == algorithm:
            src = me.replica_index % saved.num_replicas
            if src not in info.manifest.saved_replicas():  # e.g. saved at a sync point by an older writer
                log.info("replica-local state: checkpoint holds no own state of replica %d, taking replica 0's", src)
                src = 0
        loaded = ucp.load_into(storage, info, model, optimizer, rank=me.rank, algorithm=algorithm,
                               on_event=self._on_event, replica=src)
        if replicas_diverge(algorithm) and (src != me.replica_index or not same_layout):
            log.info("replica-local state (parameters, inner optimizer) of replica %d taken from saved replica %d "
                     "(saved at %s, running at %dx%d)", me.replica_index, src, saved.describe(), *now)
        extra = loaded.extra_state or {}
        if loaded.algorithm_state is not None:
            state = loaded.algorithm_state
            strategy.load_state_dict(sharding.state_to_local(state, self.view) if self.view is not None else state)
        rank_state = loaded.rank_state if same_layout else None
        if rank_state is not None and "rng" in rank_state:
            set_rng_state(rank_state["rng"])
        else:
            seed_everything(tr.seed + me.rank + 1_000_003 * loaded.step)
            log.info("checkpoint saved at %s, running at %dx%d: RNG states reseeded from (seed, rank, step)",
                     saved.describe(), *now)
        if extra.get("configHash") not in (None, self.config_hash):
            log.warning("checkpoint %s was written with a different config (hash %s, now %s)",
                        info.url, extra.get("configHash"), self.config_hash)
        position = DataPosition.from_state_dict(extra["data"]) if "data" in extra else DataPosition(0)
        if self.metrics:
            self.metrics.checkpoint_step.set(loaded.step)
        log.info("resumed from %s (step %d, saved at %s, now %dx%d) in %.2fs", info.url, loaded.step,
                 saved.describe(), *now, loaded.seconds)
        return loaded.step, position, int(extra.get("referenceWorldSize", me.world_size))

    def open(self, num_replicas: int, nproc: int, register_metrics: bool = True) -> None:
        """Build the job's checkpoint engine (collective; rank 0 removes incomplete ``.tmp-*`` saves, and sets aside
        or adopts an earlier job's checkpoints). Replicas that may differ at save time (every algorithm but DDP)
        save rank 0's copy of the shared tensors; DDP spreads the writes of identical replicas over all ranks."""
        algorithm = self.config.algorithm.name.value
        self.engine = ucp.CheckpointEngine(
            self.dir, self.info.rank, self.info.world_size,
            layout=ucp.WorldLayout(num_replicas, nproc, "fsdp-in-pod" if nproc > 1 else "replicated"),
            keep=self.config.checkpoint.keep, algorithm=algorithm, on_event=self._on_event,
            metrics_registry=self.metrics.registry if self.metrics and register_metrics else None,
            balance_replicated_writes=not replicas_diverge(algorithm),
            dtensor_writer=self.info.replica_index == 0,  # sharded: every pod holds a copy, pod 0's is saved
            coordination_timeout_s=self.env.collective_timeout_s,  # a commit waits no longer than a collective
            # a worker of an earlier epoch (or job) that outlived its replacement may not commit (ucp.fence)
            job_uid=self.env.job_uid, epoch=self._epoch,
            # an earlier job of the same name: its checkpoints set aside (default) or resumed from (ucp.ownership)
            adopt_previous_job=self.config.checkpoint.adopt_previous_job,
        )
        self._report_previous_job(self.engine.previous_job)

    def leave_group(self, planned: bool) -> None:
        """A membership change: a planned one closes the engine (its saves committed); after a lost peer the engine
        is left as it is (its group is gone, see :meth:`settle`)."""
        if planned and self.engine is not None:
            self.engine.close()

    def rejoin(self, info: RankInfo) -> None:
        """The engine of the new group (one process per pod), its metrics going on where the old one's left off."""
        self.info = info
        previous_metrics = self.engine.metrics if self.engine is not None else None
        self.open(info.world_size, 1, register_metrics=previous_metrics is None)
        if previous_metrics is not None:
            self.engine.metrics = previous_metrics  # the registry holds them already; the counts go on

    def due(self, completed: int, is_last: bool) -> bool:
        """A periodic save falls at ``completed`` (every ``checkpoint.everySteps``; the last step's is the final one)."""
        every = self.config.checkpoint.every_steps
        return bool(every) and completed % every == 0 and not is_last

    def save(self, step: int, model, optimizer, strategy, position: DataPosition, reference_world: int) -> None:
        """:meth:`save_async`, and with ``checkpoint.asyncSave`` off, its commit waited for (then the CPU tensors are
        written in place: training waits for the save anyway)."""
        in_place = not self.config.checkpoint.async_save
        self.save_async(step, model, optimizer, strategy, position, reference_world, copy=not in_place)
        if in_place:
            self.finish()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def _report_previous_job(self, previous: ucp.PreviousJob | None) -> None:
        """An earlier job's checkpoints were found in this job's directory: the progress report says what was
        done with them, and the operator's ResumedFromPreviousJob condition repeats it."""
        if previous is None:
            return
        assert self.engine is not None
        self._report(previous_job=PreviousJobReport(
            uid=previous.uid, steps=list(previous.steps[-MAX_PREVIOUS_STEPS_REPORTED:]), adopted=previous.adopted,
            path=self.env.container_path(self.engine.storage.path(previous.kept_in))))

    def save_async(self, step: int, model, optimizer, strategy, position: DataPosition, reference_world: int,
                   copy: bool = True) -> None:
        """Start checkpoint ``step`` (collective). Waits for the previous save, stalls for the copy
        to host memory only; the write and the all-ranks commit run in the background (``copy=False``: no copy,
        the caller waits for the save before changing a tensor)."""
        assert self.engine is not None
        self.finish()
        algorithm = self.config.algorithm.name.value
        algo_state = strategy.state_dict()
        if self.view is not None:
            algo_state = sharding.state_to_dtensors(algo_state, self.view)
        rank_state: dict[str, Any] = {"rng": rng_state()}
        extra = {"data": position.state_dict(), "referenceWorldSize": reference_world, "configHash": self.config_hash,
                 "job": self.config.job_name, "namespace": self.config.namespace, "jobUid": self.env.job_uid}
        self._pending = self.engine.save_async(step, model, optimizer, algorithm_state=algo_state,
                                               extra_state=extra, rank_state=rank_state,
                                               per_replica=replicas_diverge(algorithm),  # replicas' own params/optim
                                               copy=copy)

    def poll(self) -> ucp.CheckpointInfo | None:
        """Record the save in flight if it has finished (no waiting); returns the last committed."""
        if self._pending is not None and self._pending.done():
            self._record()
        return self.last_committed

    def finish(self) -> ucp.CheckpointInfo | None:
        """Wait for the save in flight and record it; returns the last committed checkpoint."""
        if self._pending is not None:
            self._record()  # blocks until the background write and commit are done
        return self.last_committed

    def settle(self, timeout_s: float) -> None:
        """Record the save in flight if it ends within ``timeout_s``; else abandon it: its commit
        waits on the old group (a lost peer), fails at that group's timeout in its daemon thread and
        is never committed. The previous committed checkpoint stays the resume point."""
        handle = self._pending
        if handle is None:
            return
        try:
            handle.wait(timeout_s)
        except TimeoutError:
            log.warning("abandoning checkpoint step %d: its commit is waiting on the old group", handle.step)
            self._pending = None
            return
        except ucp.CheckpointSaveError:
            pass
        self._record()

    def _record(self) -> None:
        """Wait for the save in flight; a commit updates the metrics and the progress report."""
        handle, self._pending = self._pending, None
        assert handle is not None
        try:
            saved = handle.wait()
        except ucp.CheckpointSaveError as exc:  # reported by the engine's event; the previous one stays good
            log.error("%s", exc)
            return
        self.last_committed = saved
        if self.metrics:
            self.metrics.checkpoint_committed(saved.step, handle.stall_s + handle.write_s, handle.stall_s)
        if self.info.rank == 0:
            log.info("checkpoint step %d committed at %s (stall %.3fs, write %.2fs)", saved.step, saved.url,
                     handle.stall_s, handle.write_s)
        self._report(last_checkpoint=self.ref(saved))

    def _on_event(self, reason: str, message: str) -> None:
        """Engine events (any thread): a failed background save reaches the progress report."""
        if reason == ucp.Reason.FAILED:
            self._failures += 1
            self._report(checkpoint_failures=self._failures, checkpoint_error=message[:1000])

    def ref(self, saved: ucp.CheckpointInfo) -> CheckpointRef:
        return CheckpointRef(step=saved.step, path=self.env.container_path(saved.url), time=saved.manifest.time)


def checkpoint_dir(config: TrainerConfig, env: RuntimeEnv) -> str:
    """``<checkpoint.path>/<namespace>/<job>`` as this process sees it."""
    return os.path.join(env.resolve_path(config.checkpoint.path), config.namespace, config.job_name)

def config_hash(config: TrainerConfig) -> str:
    """Hash of what determines the training trajectory (fault injection excluded)."""
    wire = config.to_wire()
    wire.pop("faultInjection", None)
    return hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()[:16]

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state

def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

def replicas_diverge(algorithm: str) -> bool:
    """True when replicas hold different parameters/inner optimizer state between syncs (all but DDP)."""
    return algorithm != "ddp"

def _verified(path: str) -> str:
    """``path`` when it is a committed checkpoint that verifies; ``ucp.FormatError`` or ``OSError`` otherwise."""
    info, storage = _open_checkpoint(path)
    report = ucp.verify_checkpoint(storage, info)
    if not report.ok:
        raise ucp.FormatError(f"it does not verify ({report.reasons[0]}): {report.problems[0]}")
    return path


def _open_checkpoint(path: str) -> tuple[ucp.CheckpointInfo, ucp.Storage]:
    """The committed checkpoint at ``path`` (a ``step-N`` directory) and the storage of its parent."""
    parent, name = os.path.split(os.path.normpath(path))
    storage = ucp.Storage(parent)
    return ucp.read_info(storage, name), storage


def agree_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
