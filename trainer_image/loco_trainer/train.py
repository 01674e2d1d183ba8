"""The training loop: nanoGPT-plain and identical for every algorithm.

One :class:`Trainer` per process. :meth:`Trainer.run` is, in order::

    resume (newest committed checkpoint, else fresh init)  ->  strategy.setup()
    for step in range(start_step, steps):
        inject faults (crash / delay)
        set lr (pure function of step: linear warm-up, cosine to minLrRatio)
        x, y = this rank's slice of the global batch at the data position
        forward + backward (autocast when dtype is bfloat16)
        strategy.after_backward(step); clip; inner_optimizer.step(); strategy.after_inner_step(step)
        eval every evalEvery; log every logEvery
        note a finished background save; checkpoint every checkpoint.everySteps (universal format, loco_trainer.ucp)
    strategy.finish(); final eval; final checkpoint

With ``nprocPerWorker > 1`` the pod's processes shard the model and inner optimizer with FSDP2 and
the algorithm runs across pods on the shards (``loco_trainer.sharding``, docs/algorithms.md).

The loop talks to the algorithm only through :class:`loco_trainer.algorithms.base.Strategy` and to
the other ranks only through ``torch.distributed`` (the strategy's :class:`~loco_trainer.comm.Comm`
for the algorithm's traffic; plain ``torch.distributed`` for the small control traffic: eval-loss
average, checkpoint barriers, resume agreement).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from loco_trainer import sharding, ucp
from loco_trainer.algorithms.base import Strategy
from loco_trainer.config import BatchRule, LrScaling, RuntimeEnv, TrainerConfig, TrainingSpec
from loco_trainer.faults import InjectedCrash, comm_faults, crash_step, step_delay_s
from loco_trainer.data import Dataset, DataPosition, rank_slice
from loco_trainer.metrics import TrainerMetrics
from loco_trainer.model import build_model, num_params
from loco_trainer.progress import ProgressState
from loco_trainer.protocol import (
    MAX_PREVIOUS_STEPS_REPORTED, MAX_SKIPPED_REPORTED, CheckpointRef, PreviousJobReport, SkippedCheckpoint, WorkerState,
)
from loco_trainer.rendezvous import RankInfo

log = logging.getLogger("loco_trainer")

CHECKPOINT_STATE_VERSION = 1

#: (spec, model, inner_optimizer, comm) -> Strategy; the default is algorithms.make_strategy
StrategyFactory = Callable[[Any, torch.nn.Module, torch.optim.Optimizer, Any], Any]


# ----------------------------------------------------------------------------- pure helpers


def lr_at(step: int, training: TrainingSpec, peak_lr: float | None = None) -> float:
    """Learning rate of 0-based inner step ``step``, with lr = ``peak_lr`` (default ``training.lr``;
    the loop passes :func:`effective_lr`):
    1) linear warm-up from lr/warmup to lr over ``warmupSteps``;
    2) cosine decay from lr to lr*minLrRatio until ``steps``;
    3) lr*minLrRatio afterwards."""
    peak = training.lr if peak_lr is None else peak_lr
    floor = peak * training.min_lr_ratio
    if step < training.warmup_steps:
        return peak * (step + 1) / training.warmup_steps
    if step >= training.steps:
        return floor
    span = max(1, training.steps - training.warmup_steps)
    progress = (step - training.warmup_steps) / span
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def resolve_device(training: TrainingSpec, local_rank: int) -> torch.device:
    """``training.device`` made concrete: auto -> cuda:<local_rank> if CUDA is present, else cpu."""
    if training.device == "cuda" or (training.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("training.device is 'cuda' but no CUDA device is visible: set training.device to auto or cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


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


def global_batch_size(training: TrainingSpec, world_size: int, reference_world_size: int) -> int:
    """Sequences per step over all ranks. keepWorkerBatch: batchSize per rank; keepGlobalBatch:
    batchSize x the world size the job started with, split over the current ranks."""
    if training.batch_rule == BatchRule.keep_global_batch:
        return training.batch_size * reference_world_size
    return training.batch_size * world_size


def inner_batch_ranks(algorithm: str, world_size: int, nproc_per_worker: int) -> int:
    """How many ranks' sequences one inner optimizer step averages over: every rank for DDP (the
    gradient is all-reduced over the world), one replica's ``nprocPerWorker`` processes for the
    DiLoCo family (FSDP inside the pod; replicas step on their own batches between syncs)."""
    return nproc_per_worker if _replicas_diverge(algorithm) else world_size


def effective_lr(training: TrainingSpec, algorithm: str, world_size: int, reference_world_size: int) -> float:
    """The peak lr at ``world_size``: ``training.lr`` scaled by ``training.lrScaling`` for the change k
    of the number of sequences one inner optimizer step sees, now versus at the reference world size
    (the one the job started with, carried in checkpoints). sqrt: lr*sqrt(k), the square-root rule
    for adaptive optimizers (Malladi et al. 2022, arXiv:2205.10287); linear: lr*k (Goyal et al. 2017,
    arXiv:1706.02677); none: lr.

    k = world_size / reference_world_size for DDP with keepWorkerBatch (its optimizer steps on the
    global batch, batchSize x world size). k = 1 for DDP with keepGlobalBatch (the global batch is
    kept) and for the DiLoCo family with keepWorkerBatch (each replica's inner optimizer sees only its
    replica's batchSize x nprocPerWorker, whatever the replica count; the outer step averages over the
    replicas there are). The DiLoCo family with keepGlobalBatch is not scaled either, although each
    replica's share of the global batch follows 1 / replicas (docs/elastic.md)."""
    if training.batch_rule == BatchRule.keep_global_batch or _replicas_diverge(algorithm):
        return training.lr
    k = world_size / reference_world_size
    if training.lr_scaling == LrScaling.linear:
        return training.lr * k
    if training.lr_scaling == LrScaling.sqrt:
        return training.lr * math.sqrt(k)
    return training.lr


def gradient_weight(global_batch: int, rank: int, world_size: int, group_ranks: int) -> float:
    """Factor on ``rank``'s mean loss so that the uniform average of the gradients over its group
    (``group_ranks`` consecutive ranks, see :func:`inner_batch_ranks`) is the mean gradient over the
    group's sequences: group_ranks x count_rank / group_count. It is 1 for an even split; with an
    uneven one (keepGlobalBatch, ``data.rank_slice`` gives the remainder to the low ranks) a plain
    average of per-rank means would weight the sequences of the smaller slices more."""
    first = rank - rank % group_ranks
    counts = [rank_slice(global_batch, r, world_size)[1] for r in range(first, first + group_ranks)]
    total = sum(counts)
    if total == 0:
        return 1.0
    return group_ranks * counts[rank - first] / total


def format_progress_line(step: int, total: int, loss: float, eval_loss: float | None, tokens_per_s: float, ms_per_step: float) -> str:
    """``step 40/200 | loss 2.3456 | eval 2.4000 | 12,345 tok/s | 55 ms/step``."""
    parts = [f"step {step}/{total}", f"loss {loss:.4f}"]
    if eval_loss is not None:
        parts.append(f"eval {eval_loss:.4f}")
    parts += [f"{tokens_per_s:,.0f} tok/s", f"{ms_per_step:.0f} ms/step"]
    return " | ".join(parts)


# ---------------------------------------------------------------------------------- trainer


#: How long a survivor waits for the operator's new membership after losing a peer, and bounds the
#: rendezvous of a new epoch (docs/elastic.md, Live resizing); then it fails and the job restarts.
REGROUP_TIMEOUT_S = 120.0
#: A smaller membership arrived and the loop has not switched this long: abort the old group (see
#: Trainer._on_membership_update).
ABORT_OLD_GROUP_AFTER_S = 1.0
#: After losing a peer, how long the save in flight may take to end before it is abandoned.
SAVE_SETTLE_S = 5.0
#: How long a worker waits for a membership update a peer already holds (the operator posts to all at once).
MEMBERSHIP_WAIT_S = 30.0
#: Texts of gloo/NCCL/store errors that mean a peer process is gone.
PEER_LOSS_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
                     "ECONNRESET", "EPIPE", "Socket Timeout", "timed out", "Timed out", "communicator was aborted")


@dataclass(frozen=True)
class _Sizing:
    """What the batch rule gives at the current world size (:meth:`Trainer._sizing`)."""

    global_batch: int
    tokens_per_step_local: int
    peak_lr: float
    loss_weight: float


@dataclass
class TrainResult:
    """What one process's run ended with."""

    step: int
    loss: float | None
    eval_loss: float | None
    last_checkpoint: ucp.CheckpointInfo | None
    resumed_from: str | None = None
    losses: list[float] = field(default_factory=list)


class Trainer:
    """The training loop of one rank. ``torch.distributed`` must be initialised (any world size).

    Args:
        config: the job's trainer config.
        env: this pod's runtime env (checkpoint paths, restart count, resume hint).
        info: this process's rank.
        device: where the model lives.
        progress: the pod's progress state (pod leader only; None elsewhere).
        metrics: this process's metrics (optional).
        strategy_factory: builds the algorithm (default: ``loco_trainer.algorithms.make_strategy``).
        history_path: rank 0 appends one JSON line per step here: ``step`` (completed), ``loss``
            (rank 0's), ``lr``, ``wallS`` (seconds since the loop started), ``bytesSent`` (cumulative bytes rank 0 sent
            through the comm layer), ``evalLoss`` when evaluated;
            a last line ``{"step", "evalLoss", "final": true, "bytesSent"}``.
    """

    def __init__(
        self,
        config: TrainerConfig,
        env: RuntimeEnv,
        info: RankInfo,
        device: torch.device,
        *,
        progress: ProgressState | None = None,
        metrics: TrainerMetrics | None = None,
        strategy_factory: StrategyFactory | None = None,
        history_path: str | None = None,
    ) -> None:
        self.config = config
        self.env = env
        self.info = info
        self.device = device
        self.progress = progress
        self.metrics = metrics
        self.history_path = history_path if info.rank == 0 else None
        if strategy_factory is None:
            from loco_trainer.algorithms import make_strategy

            strategy_factory = make_strategy
        self.strategy_factory = strategy_factory
        self.ckpt_dir = checkpoint_dir(config, env)
        self.config_hash = config_hash(config)
        self.engine: ucp.CheckpointEngine | None = None  # built in run() (a collective)
        self._pending: ucp.SaveHandle | None = None
        self._last_committed: ucp.CheckpointInfo | None = None
        self._checkpoint_failures = 0
        self._view: sharding.LocalView | None = None
        self._mesh: Any = None
        self._comm: Any = None
        self._strategy: Any = None
        self._live = False
        self._epoch = env.epoch  # the membership epoch this worker runs in
        self._group_lock = threading.Lock()  # the loop's regroup vs the HTTP thread's abort of a stale group
        self._regrouping = False
        self._aborted_epoch: int | None = None

    # ---------------------------------------------------------------- collective helpers

    def _barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def _mean_over_ranks(self, value: float) -> float:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return value
        if self._live:  # through the Comm (one process per pod: its group is the default group), so an interrupt ends the wait
            return float(self._comm.agree(torch.tensor([value], dtype=torch.float64), "avg").item())
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / dist.get_world_size()

    def _agree(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------------ resume

    def choose_checkpoint(self) -> tuple[ucp.CheckpointInfo, ucp.Storage] | None:
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
                why = "newest committed checkpoint in " + self.ckpt_dir
                if hint and os.path.normpath(self.env.resolve_path(hint)) != os.path.normpath(newest.url):
                    why += f" (the operator hinted {hint}; the directory holds a newer or different one)"
                log.info("resuming from %s: %s", newest.url, why)
            elif hint:
                try:
                    hinted, hinted_storage = _open_checkpoint(self.env.resolve_path(hint))
                    report = ucp.verify_checkpoint(hinted_storage, hinted)
                    if not report.ok:
                        raise ucp.FormatError(f"it does not verify ({report.reasons[0]}): {report.problems[0]}")
                    chosen = self.env.resolve_path(hint)
                    log.info("resuming from %s: LOCO_RESUME_FROM (no committed checkpoint in %s)", chosen, self.ckpt_dir)
                except (ucp.FormatError, OSError) as exc:
                    log.warning("ignoring LOCO_RESUME_FROM=%s: %s; starting fresh", hint, exc)
            else:
                log.info("no committed checkpoint in %s: starting from step 0", self.ckpt_dir)
        chosen = self._agree(chosen)
        return _open_checkpoint(chosen) if chosen else None

    def _report_skipped(self, skipped: list[ucp.SkippedCheckpoint]) -> None:
        """Checkpoints passed over at resume (the engine logged a warning for each): the metric, and the
        progress report, from which the operator makes an Event per checkpoint."""
        if not skipped:
            return
        assert self.engine is not None
        if self.metrics:
            for s in skipped:
                self.metrics.checkpoint_skipped(s.reason)
        self._set_progress(skipped_checkpoints=[
            SkippedCheckpoint(step=s.step, path=self.env.container_path(self.engine.storage.path(s.dir)),
                              reason=s.reason, message=s.message[:240])
            for s in skipped[:MAX_SKIPPED_REPORTED]
        ])

    # --------------------------------------------------------------------------- run

    def run(self) -> TrainResult:
        cfg, tr, info = self.config, self.config.training, self.info
        self._set_progress(state=WorkerState.starting, total_steps=tr.steps, message="loading data and model")

        data = Dataset(cfg.data, tr.seq_len, tr.seed, self.env.resolve_path)
        torch.manual_seed(tr.seed)  # identical init on every rank
        model = build_model(cfg.model).to(self.device)
        nproc, num_replicas = info.nproc_per_worker, info.world_size // info.nproc_per_worker
        sharding.check_shardable(cfg.algorithm.name.value, nproc)
        mesh = None
        if nproc > 1:  # FSDP2 inside the pod, the algorithm across pods (loco_trainer.sharding)
            mesh = sharding.Mesh(self.device.type, num_replicas, nproc)
            sharding.shard_model(model, mesh)
            self._view = sharding.LocalView(model)
        if cfg.model.name == "gpt" and data.max_token >= cfg.model.gpt.vocab_size:
            raise ValueError(
                f"the data holds token id {data.max_token} but model.gpt.vocabSize is {cfg.model.gpt.vocab_size}: "
                f"raise vocabSize above {data.max_token}"
            )
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=tr.lr, betas=(tr.beta1, tr.beta2), weight_decay=tr.weight_decay
        )
        self._mesh = mesh
        comm = self._make_comm()
        strategy = self.strategy_factory(cfg.algorithm, self._view or model, optimizer, comm)
        self._comm, self._strategy = comm, strategy
        self._live = self._live_capable(strategy)
        if self._live and self.progress is not None:
            self.progress.on_membership(self._on_membership_update)
        self.engine = self._build_engine(num_replicas, nproc)
        self._report_previous_job(self.engine.previous_job)
        seed_everything(tr.seed + info.rank)  # dropout etc. differ per rank

        start_step, position, reference_world = 0, DataPosition(0), info.world_size
        last_ckpt: ucp.CheckpointInfo | None = None
        resumed_from = None
        if self.env.join:  # a live grow: step, data position and global state come from the running workers
            if not self._live:
                raise ValueError(f"LOCO_JOIN=1 but {cfg.algorithm.name.value} with {nproc} processes per pod cannot "
                                 f"join a running job (docs/elastic.md, Live resizing)")
            comm.sync_clock()
            start_step, position, reference_world = self._agree_membership(
                0, DataPosition(0), reference_world, joining=True, interrupted=False, planned=True)
            seed_everything(tr.seed + info.rank + 1_000_003 * start_step)
            wrapped = strategy.wrap(model)
            self._set_progress(step=start_step)
        else:
            chosen = self.choose_checkpoint()
            if chosen is not None:
                last_ckpt, storage = chosen
                start_step, position, reference_world = self.restore(last_ckpt, storage, model, optimizer, strategy)
                resumed_from = last_ckpt.url
                self._set_progress(last_checkpoint=self._ref(last_ckpt), step=start_step)

            wrapped = model if self._view is not None else strategy.wrap(model)  # sharded: FSDP is the wrapper
            strategy.setup()
            # Fault detection: one common clock for the records, and the records on the progress channel.
            comm.sync_clock()
        self._publish_records(comm)
        sz = self._sizing(reference_world)

        autocast = (
            torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
            if tr.dtype == "bfloat16" else nullcontext()
        )
        crash_at = crash_step(cfg.fault_injection, info.rank, self.env.restart_count)
        delay_s = step_delay_s(cfg.fault_injection)

        self._set_progress(state=WorkerState.running, step=start_step, algorithm=cfg.algorithm.name.value, message="")
        if self.metrics:
            self.metrics.total_steps.set(tr.steps)
            self.metrics.step.set(start_step)
            self.metrics.set_info(cfg.algorithm.name.value, self.device.type)
            if last_ckpt is not None:
                self.metrics.checkpoint_step.set(last_ckpt.step)
        log.info(
            "training %s: %d params, %d ranks, global batch %d x %d tokens, steps %d..%d, algorithm %s, device %s",
            cfg.model.name, num_params(model), info.world_size, sz.global_batch, tr.seq_len, start_step, tr.steps,
            cfg.algorithm.name.value, self.device,
        )

        losses: list[float] = []
        interval_losses: list[float] = []
        eval_loss: float | None = None
        interval_start, interval_steps = time.perf_counter(), 0
        loop_start = time.perf_counter()
        step = start_step
        # live resize: a peer loss seen outside the strategy's own exchange (eval, probe, save, the
        # boundary agreement). Such a collective can complete on some survivors and fail on others, so
        # stopping there would leave the survivors at different steps; the worker trains on instead,
        # without those collectives, to the strategy's next exchange, where every survivor stops (or,
        # where the strategy drops a lost exchange (Strategy.drop_lost_exchange), to its next boundary)
        deferred: BaseException | None = None
        model.train()
        for step in range(start_step, tr.steps):
            if step == crash_at:
                code = cfg.fault_injection.exit_code
                log.error("fault injection: rank %d crashes at step %d with exit code %d", info.rank, step, code)
                raise InjectedCrash(code)
            if delay_s:
                time.sleep(delay_s)
            step_start = time.perf_counter()

            lr = lr_at(step, tr, sz.peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = data.train_batch(position, sz.global_batch, info.rank, info.world_size)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast:
                _, loss = wrapped(x, y)
            (loss * sz.loss_weight if sz.loss_weight != 1.0 else loss).backward()
            if self._view is not None:
                self._view.pull_grads()  # the algorithm reduces this process's gradient shards
            strategy.after_backward(step)
            if tr.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            calls_before = _comm_calls(comm) if self.metrics else 0
            hook_start = time.perf_counter()
            lost: BaseException | None = None  # a peer was lost (live resize): the collective that noticed
            interrupted = False  # ... and it was the strategy's own exchange
            try:
                strategy.after_inner_step(step)
            except Exception as exc:
                if not self._peer_lost(exc):
                    raise
                if strategy.drop_lost_exchange():  # Streaming DiLoCo: train on to the next boundary
                    deferred = deferred or self._defer_peer_loss(exc, step + 1)
                else:
                    lost, interrupted = exc, True
            if self.metrics and not lost and not deferred and _comm_calls(comm) != calls_before:  # an outer step
                self.metrics.outer_sync_seconds.observe(time.perf_counter() - hook_start)
            position = position.advance(sz.global_batch)
            completed = step + 1

            loss_value = float(loss.detach().float().item())
            losses.append(loss_value)
            interval_losses.append(loss_value)
            interval_steps += 1
            step_seconds = time.perf_counter() - step_start
            if self.metrics:
                self.metrics.step_seconds.observe(step_seconds)
                self.metrics.tokens.inc(sz.tokens_per_step_local)
                self.metrics.step.set(completed)
                self.metrics.lr.set(lr)

            is_last = completed == tr.steps
            if tr.eval_every and completed % tr.eval_every == 0 and not is_last and not lost and not deferred:
                try:
                    eval_loss = self.evaluate(model, data, autocast)
                except Exception as exc:
                    if not self._peer_lost(exc):
                        raise
                    deferred = self._defer_peer_loss(exc, completed)
            record: dict[str, Any] = {"step": completed, "loss": loss_value, "lr": lr,
                                      "wallS": round(time.perf_counter() - loop_start, 6)}
            if tr.eval_every and completed % tr.eval_every == 0 and not is_last:
                record["evalLoss"] = eval_loss
            if self.history_path and hasattr(comm, "stats"):  # cumulative bytes this rank sent (convergence benchmark)
                record["bytesSent"] = int(comm.stats().get("bytes_sent", 0))
            self._append_history(record)

            if completed % tr.log_every == 0 or is_last:
                elapsed = time.perf_counter() - interval_start
                mean_loss = sum(interval_losses) / len(interval_losses)
                local_tps = sz.tokens_per_step_local * interval_steps / elapsed
                global_tps = sz.global_batch * tr.seq_len * interval_steps / elapsed
                if info.rank == 0:
                    log.info(format_progress_line(completed, tr.steps, mean_loss, eval_loss, global_tps,
                                                  1000 * elapsed / interval_steps))
                self._report_interval(completed, mean_loss, eval_loss, local_tps, strategy, comm)
                if not is_last and not lost and not deferred:  # fills the connection matrix (docs/fault-detection.md); every rank logs together
                    try:
                        comm.probe(self.env.probe_bytes, links=not strategy.p2p_covers_links(comm.world_size))
                    except Exception as exc:
                        if not self._peer_lost(exc):
                            raise
                        deferred = self._defer_peer_loss(exc, completed)
                interval_losses, interval_start, interval_steps = [], time.perf_counter(), 0
            else:
                self._set_progress(step=completed)

            last_ckpt = self._poll_save() or last_ckpt
            every = self.config.checkpoint.every_steps
            if every and completed % every == 0 and not is_last and not lost and not deferred:
                try:
                    self.save_async(completed, model, optimizer, strategy, position, reference_world)
                    if not self.config.checkpoint.async_save:
                        last_ckpt = self._finish_save() or last_ckpt
                except Exception as exc:
                    if not self._peer_lost(exc):
                        raise
                    deferred = self._defer_peer_loss(exc, completed)

            # live resize (docs/elastic.md): a lost peer -> regroup with the survivors now; a membership
            # update -> switch at this outer-step boundary
            update = None
            if self._live and not lost and not deferred and not is_last and strategy.at_membership_boundary():
                try:
                    update = self._agreed_update()
                except Exception as exc:
                    if not self._peer_lost(exc):
                        raise
                    deferred = self._defer_peer_loss(exc, completed)
            if deferred is not None and lost is None and (is_last or strategy.at_membership_boundary()):
                lost = deferred  # a round boundary passed without an exchange to stop at: stop here
            if lost is not None or update is not None:
                deferred = None
                if lost is not None:
                    update = self._await_update(lost, completed)
                else:
                    last_ckpt = self._finish_save() or last_ckpt  # the old group is still whole: commit first
                    strategy.before_membership_change()  # ... and complete what is in flight on it
                position, reference_world = self._enter_epoch(update, completed, position, reference_world,
                                                              interrupted=interrupted, planned=lost is None)[1:]
                info, comm, sz = self.info, self._comm, self._sizing(reference_world)

        last_ckpt = self._finish_save() or last_ckpt
        comm.finish_probe()
        strategy.finish()
        final_step = max(step + 1, start_step) if tr.steps > start_step else start_step
        eval_loss = self.evaluate(model, data, autocast)
        final_record: dict[str, Any] = {"step": final_step, "evalLoss": eval_loss, "final": True}
        if self.history_path and hasattr(comm, "stats"):
            final_record["bytesSent"] = int(comm.stats().get("bytes_sent", 0))
        self._append_history(final_record)
        if info.rank == 0:
            log.info("final eval loss %.4f at step %d", eval_loss, final_step)
        # the job's directory always ends with its final state (also after resuming from a checkpoint elsewhere)
        in_job_dir = last_ckpt is not None and os.path.dirname(os.path.normpath(last_ckpt.url)) == os.path.normpath(self.ckpt_dir)
        if last_ckpt is None or last_ckpt.step != final_step or not in_job_dir:
            self.save_async(final_step, model, optimizer, strategy, position, reference_world)
            last_ckpt = self._finish_save() or last_ckpt
        self.engine.close()
        self._set_progress(step=final_step, eval_loss=eval_loss,
                           loss=losses[-1] if losses else None)
        return TrainResult(final_step, losses[-1] if losses else None, eval_loss, last_ckpt, resumed_from, losses)

    # ------------------------------------------------------- per-epoch sizing, comm, live membership

    def _make_comm(self) -> Any:
        """This rank's :class:`~loco_trainer.comm.Comm` over the current group (the pods' replicate
        group when sharded), with the fault-injection hook of its rank."""
        from loco_trainer.comm import Comm

        return Comm(self._mesh.replicate_group if self._mesh else None, stall_after_s=self.env.stall_after_s,
                    ring_p2p=self.env.ring_all_reduce, interruptible=self.env.live_resize,
                    probe_interval_s=self.env.probe_interval_s,
                    fault_hook=comm_faults(self.config.fault_injection, self.info.rank, self.env.restart_count))

    def _publish_records(self, comm: Any) -> None:
        """Fault detection: the progress channel ships ``comm``'s records (docs/fault-detection.md)."""
        if self.progress is not None:
            self.progress.set_fault_source(
                lambda since_seq, since_link: (comm.export_records(since_seq), comm.export_links(since_link),
                                               comm.clock_error_s))

    def _sizing(self, reference_world: int) -> "_Sizing":
        """The batch rule (docs/elastic.md) at the current world size: the global batch, this rank's
        tokens per step, the peak lr for the batch the inner optimizer sees now, and this rank's loss
        weight so an uneven split still averages to the mean over the sequences."""
        tr, info = self.config.training, self.info
        global_batch = global_batch_size(tr, info.world_size, reference_world)
        if global_batch < info.world_size:
            raise ValueError(
                f"training.batchRule keepGlobalBatch: the global batch of {global_batch} sequences (batchSize "
                f"{tr.batch_size} x the start world size {reference_world}) leaves ranks of the {info.world_size}-rank "
                f"world without data: raise training.batchSize to at least {-(-info.world_size // reference_world)} "
                f"or use keepWorkerBatch"
            )
        algorithm = self.config.algorithm.name.value
        peak_lr = effective_lr(tr, algorithm, info.world_size, reference_world)
        if peak_lr != tr.lr and info.rank == 0:
            log.info("lr %g -> %g: training.lrScaling %s for %s at %d ranks (the job started with %d, batchRule %s)",
                     tr.lr, peak_lr, tr.lr_scaling.value, algorithm, info.world_size, reference_world,
                     tr.batch_rule.value)
        return _Sizing(
            global_batch=global_batch,
            tokens_per_step_local=rank_slice(global_batch, info.rank, info.world_size)[1] * tr.seq_len,
            peak_lr=peak_lr,
            loss_weight=gradient_weight(global_batch, info.rank, info.world_size,
                                        inner_batch_ranks(algorithm, info.world_size, info.nproc_per_worker)),
        )

    def _live_capable(self, strategy: Any) -> bool:
        """Live resizing is on (``LOCO_LIVE_RESIZE``), one process per pod, and the algorithm can go on
        after losing a peer (it overrides ``Strategy.continue_after_peer_loss``)."""
        supported = type(strategy).continue_after_peer_loss is not Strategy.continue_after_peer_loss
        if self.env.live_resize and not supported and self.info.rank == 0:
            log.warning("LOCO_LIVE_RESIZE=1 but %s cannot continue after a lost peer: resizes restart the job",
                        self.config.algorithm.name.value)
        return self.env.live_resize and self.info.nproc_per_worker == 1 and supported

    def _on_membership_update(self, update: Any) -> None:
        """(HTTP thread) A smaller membership means workers are gone. A survivor notices at its next
        collective, but one blocked in a collective with a survivor that has not noticed yet (one not
        connected to the lost peer) could wait out the group's timeout. So unless the loop has switched
        within :data:`ABORT_OLD_GROUP_AFTER_S`, the old group is aborted: its next or current collective
        fails and the loop regroups. A larger membership (a grow) waits for the next boundary."""
        if update.world_size >= self.info.world_size:
            return

        def abort_if_still_there() -> None:
            with self._group_lock:  # decide under the lock, abort outside it (an abort may take a while)
                stale = self._epoch < update.epoch and not self._regrouping
                if stale:
                    self._aborted_epoch = self._epoch
            if stale:
                log.warning("membership epoch %d has %d workers, this one still runs %d in epoch %d: aborting the "
                            "old group", update.epoch, update.world_size, self.info.world_size, self._epoch)
                if self._comm is not None:  # gloo's abort does not wake this process's own point-to-point waits
                    self._comm.interrupt()
                _abort_group()

        timer = threading.Timer(ABORT_OLD_GROUP_AFTER_S, abort_if_still_there)
        timer.daemon = True
        timer.start()

    def _peer_lost(self, exc: BaseException) -> bool:
        """Whether ``exc`` (raised by a collective) means a peer is gone and the live path applies."""
        if not self._live:
            return False
        if self._aborted_epoch == self._epoch:  # we aborted the group ourselves (a smaller membership arrived)
            return True
        text = str(exc)
        return isinstance(exc, RuntimeError) and (
            type(exc).__name__.startswith("Dist") or any(marker in text for marker in PEER_LOSS_MARKERS))

    def _agreed_update(self) -> Any:
        """At an outer-step boundary: the membership update every rank switches to now, or None.

        One 8-byte all-reduce (MAX of the newest epoch each rank was told about). A rank that has not
        received the update yet waits for it (the operator posts it to every pod at once)."""
        mine = self.progress.pending_membership() if self.progress is not None else None
        newest = mine.epoch if mine is not None else self._epoch
        if dist.is_initialized() and dist.get_world_size() > 1:
            newest = int(self._comm.agree(torch.tensor([newest], dtype=torch.int64), "max").item())
        if newest <= self._epoch:
            return None
        update = self.progress.wait_membership(newest, MEMBERSHIP_WAIT_S) if self.progress is not None else None
        if update is None:
            raise RuntimeError(f"a peer was told about membership epoch {newest}, this worker was not within "
                               f"{MEMBERSHIP_WAIT_S:.0f}s; the job restarts from its checkpoint")
        return update

    def _defer_peer_loss(self, exc: BaseException, completed: int) -> BaseException:
        """A peer loss seen outside the strategy's own exchange, or in one the strategy dropped (see
        ``deferred`` in :meth:`run`): leave the old group at once (interrupt this worker's waits on it,
        abort it, so peers waiting on this worker fail promptly) and train on to the strategy's next
        exchange, which then fails here at once, or, for a strategy that drops lost exchanges, to its
        next boundary: every survivor stops at the same step. Returns ``exc``."""
        log.warning("rank %d: a peer was lost at step %d (%s); training on to the next exchange or round "
                    "boundary of the algorithm, where the survivors regroup", self.info.rank, completed,
                    str(exc).splitlines()[0][:200])
        self._set_progress(message=f"a peer was lost at step {completed}: training on to where the survivors regroup")
        with self._group_lock:
            self._aborted_epoch = self._epoch
        if self._comm is not None:
            self._comm.interrupt()
        _abort_group()
        return exc

    def _await_update(self, lost: BaseException, completed: int) -> Any:
        """A peer was lost: wait for the operator's new membership (it shrinks the job to the survivors)."""
        with self._group_lock:
            self._regrouping = True
        log.warning("rank %d: a peer was lost at step %d (%s); waiting up to %.0fs for the new membership",
                    self.info.rank, completed, str(lost).splitlines()[0][:200], self._regroup_timeout_s())
        self._set_progress(message=f"a peer was lost at step {completed}: waiting for the new membership")
        # Leave the old group at once: closing its connections fails the collectives that survivors not
        # connected to the lost peer may still be blocked in (they would wait out the group's timeout),
        # so every survivor comes here within moments. The save in flight then fails (or has completed).
        _abort_group()
        self._settle_save(SAVE_SETTLE_S)
        timeout = self._regroup_timeout_s()
        update = self.progress.wait_membership(self._epoch + 1, timeout) if self.progress is not None else None
        if update is None:
            raise RuntimeError(f"a peer was lost at step {completed} and no membership update arrived within "
                               f"{timeout:.0f}s: {lost}") from lost
        return update

    def _regroup_timeout_s(self) -> float:
        """How long to wait for the membership update and at the new rendezvous: long enough for a
        survivor stuck in a collective of the old group to reach its timeout and come too."""
        return max(REGROUP_TIMEOUT_S, self.env.collective_timeout_s + 60.0)

    def _settle_save(self, timeout_s: float) -> None:
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
        self._record_save()

    def _enter_epoch(self, update: Any, completed: int, position: DataPosition, reference_world: int, *,
                     interrupted: bool, planned: bool) -> tuple[int, DataPosition, int]:
        """Leave the current group and go on in ``update``'s epoch (survivors; joiners enter through
        :meth:`run`): join its group, rebuild the comm and the checkpoint engine, agree on the
        position with the other members and hand the new group to the strategy. Returns rank 0's
        ``(step, data position, reference world)``."""
        old = self._comm
        started = time.perf_counter()
        with self._group_lock:
            self._regrouping = True
        if planned and self.engine is not None:
            self.engine.close()
        self.info, update = self._join_newest(update)
        self._comm = self._make_comm()
        self._comm.carry_counters(old)  # bytes and calls stay cumulative for the metrics
        previous_metrics = self.engine.metrics if self.engine is not None else None
        self.engine = self._build_engine(self.info.world_size, 1, register_metrics=previous_metrics is None)
        if previous_metrics is not None:
            self.engine.metrics = previous_metrics  # the registry holds them already; the counts go on
        self._comm.sync_clock()
        agreed = self._agree_membership(completed, position, reference_world, joining=False,
                                        interrupted=interrupted, planned=planned)
        with self._group_lock:
            self._epoch, self._regrouping = update.epoch, False
        self.engine.raise_fence()  # the old epoch's writers (a member lost but alive) may no longer commit
        self._publish_records(self._comm)
        self._set_progress(epoch=update.epoch, replica_index=self.info.rank, message="")
        if self.info.rank == 0:
            log.info("membership epoch %d: %d workers, continuing at step %d (%s, regrouped in %.2fs)", update.epoch,
                     self.info.world_size, agreed[0], "planned, at an outer-step boundary" if planned
                     else "after a lost peer", time.perf_counter() - started)
        return agreed

    def _join_newest(self, update: Any) -> tuple[RankInfo, Any]:
        """Join ``update``'s group (``rendezvous.join_epoch`` in a helper thread, so SIGTERM is honoured).
        If a newer update arrives while the rendezvous waits (e.g. a joiner of this epoch died and the
        operator shrank again), that rendezvous can never complete: it is left to time out in its daemon
        thread and the newer one is joined instead. Returns the new rank and the update joined."""
        from loco_trainer.launcher import Abandoned, _call_interruptibly
        from loco_trainer.rendezvous import join_epoch, pick_backend

        while True:
            def newer(epoch: int = update.epoch) -> Any:
                pending = self.progress.pending_membership() if self.progress is not None else None
                return pending if pending is not None and pending.epoch > epoch else None

            try:
                info = _call_interruptibly(join_epoch, self.env, update.rank, update.world_size, update.master_addr,
                                           update.master_port, pick_backend(self.device), self._regroup_timeout_s(),
                                           self.env.collective_timeout_s, abandon=lambda: newer() is not None)
                return info, update
            except Abandoned:
                arrived = newer()
                log.warning("membership epoch %d arrived while joining epoch %d: joining %d instead", arrived.epoch,
                            update.epoch, arrived.epoch)
                update = arrived

    def _agree_membership(self, completed: int, position: DataPosition, reference_world: int, *, joining: bool,
                          interrupted: bool, planned: bool) -> tuple[int, DataPosition, int]:
        """Every member of a new group, right after joining it: one all_gather of
        ``[joining, step, data position, reference world, interrupted]``. The survivors must agree
        (the same step and position: they left the old group at the same point; and whether the loss
        interrupted the strategy's exchange, unless ``Strategy.interruption_is_local``: then each
        survivor recovers its own); rank 0 must be a survivor; joiners adopt its values. Then the
        strategy takes the new group: with joiners (or at a planned boundary) ``on_membership_change``
        (rank 0 sends the global state), else ``continue_after_peer_loss``; survivors on which the
        strategy's last exchange completed and survivors on which it failed (the lost worker died in its
        final hops) reconcile through ``Strategy.adopt_completed_exchange``. Raises ``RuntimeError``
        (the job then restarts from its checkpoint) when the survivors disagree otherwise or a joiner
        arrives mid-round."""
        comm, strategy = self._comm, self._strategy
        mine = torch.tensor([int(joining), completed, position.sequences, reference_world, int(interrupted)],
                            dtype=torch.int64)
        rows = [row.tolist() for row in comm.all_gather(mine)] if comm.world_size > 1 else [mine.tolist()]
        local = strategy.interruption_is_local
        survivors = {tuple(row[1:4]) for row in rows if not row[0]}
        flags = {row[4] for row in rows if not row[0]}
        split = not local and len(flags) > 1  # the exchange completed on some survivors only
        reconcilable = type(strategy).adopt_completed_exchange is not Strategy.adopt_completed_exchange
        if rows[0][0]:
            raise RuntimeError("membership change: rank 0 of the new group is a joining worker; the operator must "
                               "order the survivors first")
        if len(survivors) != 1 or (split and not reconcilable):
            points = {tuple(row[1:4] if local or reconcilable else row[1:]) for row in rows if not row[0]}
            raise RuntimeError(f"membership change: the survivors left the old group at different points "
                               f"(step, position, reference world{'' if local or reconcilable else ', interrupted'}) "
                               f"{sorted(points)}")
        step, sequences, reference, was_interrupted = rows[0][1:]
        if local or split:
            was_interrupted = max(row[4] for row in rows)  # any survivor's: a joiner cannot come in then
        joiners = sum(row[0] for row in rows)
        if joiners and (was_interrupted or not (planned or joining)):
            raise RuntimeError("membership change: workers cannot join mid-round (after a lost peer)")
        if joiners or planned:
            strategy.on_membership_change(comm, 0)
        elif split:
            src = next(r for r, row in enumerate(rows) if not row[4])
            if self.info.rank == 0:
                log.warning("the exchange at step %d completed on ranks %s of the survivors only: the others adopt "
                            "its outcome from rank %d", step, [r for r, row in enumerate(rows) if not row[4]], src)
            strategy.adopt_completed_exchange(comm, src, completed=not interrupted)
        else:
            strategy.continue_after_peer_loss(comm, bool(interrupted if local else was_interrupted))
        return int(step), DataPosition(int(sequences)), int(reference)

    # --------------------------------------------------------------------- pieces

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, data: Dataset, autocast: Any) -> float:
        """Mean held-out loss over ``evalBatches`` batches, averaged over all ranks."""
        model.eval()
        total = 0.0
        for i in range(self.config.training.eval_batches):
            x, y = data.eval_batch(i, self.config.training.batch_size, self.info.rank, self.info.world_size)
            with autocast:
                _, loss = model(x.to(self.device), y.to(self.device))
            total += float(loss.float().item())
        model.train()
        value = self._mean_over_ranks(total / self.config.training.eval_batches)
        if self.metrics:
            self.metrics.eval_loss.set(value)
        self._set_progress(eval_loss=value)
        return value

    # ------------------------------------------------------------------ checkpoints (universal format)

    def _build_engine(self, num_replicas: int, nproc: int, register_metrics: bool = True) -> ucp.CheckpointEngine:
        """The job's checkpoint engine (collective; rank 0 removes incomplete ``.tmp-*`` saves).
        Replicas that may differ at save time (every algorithm but DDP) save rank 0's copy of the
        shared tensors; DDP spreads the writes of identical replicas over all ranks."""
        algorithm = self.config.algorithm.name.value
        return ucp.CheckpointEngine(
            self.ckpt_dir, self.info.rank, self.info.world_size,
            layout=ucp.WorldLayout(num_replicas, nproc, "fsdp-in-pod" if nproc > 1 else "replicated"),
            keep=self.config.checkpoint.keep, algorithm=algorithm, on_event=self._on_checkpoint_event,
            metrics_registry=self.metrics.registry if self.metrics and register_metrics else None,
            balance_replicated_writes=not _replicas_diverge(algorithm),
            dtensor_writer=self.info.replica_index == 0,  # sharded: every pod holds a copy, pod 0's is saved
            coordination_timeout_s=self.env.collective_timeout_s,  # a commit waits no longer than a collective
            # a worker of an earlier epoch (or job) that outlived its replacement may not commit (ucp.fence)
            job_uid=self.env.job_uid, epoch=lambda: self._epoch,
            # an earlier job of the same name: its checkpoints set aside (default) or resumed from (ucp.ownership)
            adopt_previous_job=self.config.checkpoint.adopt_previous_job,
        )

    def _report_previous_job(self, previous: ucp.PreviousJob | None) -> None:
        """An earlier job's checkpoints were found in this job's directory: the progress report says what was
        done with them, and the operator's ResumedFromPreviousJob condition repeats it."""
        if previous is None:
            return
        assert self.engine is not None
        self._set_progress(previous_job=PreviousJobReport(
            uid=previous.uid, steps=list(previous.steps[-MAX_PREVIOUS_STEPS_REPORTED:]), adopted=previous.adopted,
            path=self.env.container_path(self.engine.storage.path(previous.kept_in))))

    def _on_checkpoint_event(self, reason: str, message: str) -> None:
        """Engine events (any thread): a failed background save reaches the progress report."""
        if reason == ucp.Reason.FAILED:
            self._checkpoint_failures += 1
            self._set_progress(checkpoint_failures=self._checkpoint_failures, checkpoint_error=message[:1000])

    def restore(self, info: ucp.CheckpointInfo, storage: ucp.Storage, model, optimizer, strategy) -> tuple[int, DataPosition, int]:
        """Load ``info`` (any saved layout) into this rank; returns (step, data position, reference world).

        Model and inner optimizer: resharded from the atoms. Algorithm state: kept when the
        algorithm is the same, else reset (logged, event). Replica-local state (algorithms whose
        replicas differ between syncs, sharded or not): replica ``j`` of ``M`` takes saved replica
        ``j mod N``'s own parameters and inner optimizer state (resharded to this layout); after an
        algorithm change every replica takes replica 0's. RNG: restored when the layout is the
        same, else reseeded from (seed, rank, step) and logged."""
        cfg, tr, me = self.config, self.config.training, self.info
        algorithm = cfg.algorithm.name.value
        saved, now = info.layout, (me.world_size // me.nproc_per_worker, me.nproc_per_worker)
        same_layout = (saved.num_replicas, saved.nproc_per_worker) == now
        src = 0
        if _replicas_diverge(algorithm) and info.manifest.algorithm == algorithm:
            src = me.replica_index % saved.num_replicas
            if src not in info.manifest.saved_replicas():  # e.g. saved at a sync point by an older writer
                log.info("replica-local state: checkpoint holds no own state of replica %d, taking replica 0's", src)
                src = 0
        loaded = ucp.load_into(storage, info, model, optimizer, rank=me.rank, algorithm=algorithm,
                               on_event=self._on_checkpoint_event, replica=src)
        if _replicas_diverge(algorithm) and (src != me.replica_index or not same_layout):
            log.info("replica-local state (parameters, inner optimizer) of replica %d taken from saved replica %d "
                     "(saved at %s, running at %dx%d)", me.replica_index, src, saved.describe(), *now)
        extra = loaded.extra_state or {}
        if loaded.algorithm_state is not None:
            state = loaded.algorithm_state
            strategy.load_state_dict(sharding.state_to_local(state, self._view) if self._view is not None else state)
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

    def save_async(self, step: int, model, optimizer, strategy, position: DataPosition, reference_world: int) -> None:
        """Start checkpoint ``step`` (collective). Waits for the previous save, stalls for the copy
        to host memory only; the write and the all-ranks commit run in the background."""
        assert self.engine is not None
        self._finish_save()
        algorithm = self.config.algorithm.name.value
        algo_state = strategy.state_dict()
        if self._view is not None:
            algo_state = sharding.state_to_dtensors(algo_state, self._view)
        rank_state: dict[str, Any] = {"rng": rng_state()}
        extra = {"data": position.state_dict(), "referenceWorldSize": reference_world, "configHash": self.config_hash,
                 "job": self.config.job_name, "namespace": self.config.namespace, "jobUid": self.env.job_uid}
        self._pending = self.engine.save_async(step, model, optimizer, algorithm_state=algo_state,
                                               extra_state=extra, rank_state=rank_state,
                                               per_replica=_replicas_diverge(algorithm))  # replicas' own params/optim

    def _poll_save(self) -> ucp.CheckpointInfo | None:
        """Record the save in flight if it has finished (no waiting); returns the last committed."""
        if self._pending is not None and self._pending.done():
            self._record_save()
        return self._last_committed

    def _finish_save(self) -> ucp.CheckpointInfo | None:
        """Wait for the save in flight and record it; returns the last committed checkpoint."""
        if self._pending is not None:
            self._record_save()  # blocks until the background write and commit are done
        return self._last_committed

    def _record_save(self) -> None:
        """Wait for the save in flight; a commit updates the metrics and the progress report."""
        handle, self._pending = self._pending, None
        assert handle is not None
        try:
            saved = handle.wait()
        except ucp.CheckpointSaveError as exc:  # reported by the engine's event; the previous one stays good
            log.error("%s", exc)
            return
        self._last_committed = saved
        if self.metrics:
            self.metrics.checkpoint_committed(saved.step, handle.stall_s + handle.write_s, handle.stall_s)
        if self.info.rank == 0:
            log.info("checkpoint step %d committed at %s (stall %.3fs, write %.2fs)", saved.step, saved.url,
                     handle.stall_s, handle.write_s)
        self._set_progress(last_checkpoint=self._ref(saved))

    def _ref(self, saved: ucp.CheckpointInfo) -> CheckpointRef:
        return CheckpointRef(step=saved.step, path=self.env.container_path(saved.url), time=saved.manifest.time)

    def _set_progress(self, **fields: Any) -> None:
        if self.progress is not None:
            self.progress.update(**fields)

    def _report_interval(self, step: int, loss: float, eval_loss: float | None, local_tps: float, strategy, comm) -> None:
        stats = comm.stats() if hasattr(comm, "stats") else {}
        if self.metrics:
            self.metrics.loss.set(loss)
            self.metrics.tokens_per_second.set(local_tps)
            self.metrics.set_comm_stats(stats)
            if hasattr(comm, "records"):
                self.metrics.observe_collectives(comm.records())
            if self.device.type == "cuda":
                self.metrics.set_gpu_memory(torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device),
                                            torch.cuda.max_memory_allocated(self.device))
            algorithm_metrics = getattr(strategy, "metrics", None)
            if callable(algorithm_metrics):
                self.metrics.set_algorithm_metrics(algorithm_metrics())
        self._set_progress(
            step=step, loss=loss, eval_loss=eval_loss,
            # the pod leader speaks for its pod: its ranks run the same steps and collectives
            tokens_per_second=local_tps * self.info.nproc_per_worker,
            bytes_sent=int(stats.get("bytes_sent", 0)) * self.info.nproc_per_worker,
        )

    def _append_history(self, record: dict[str, Any]) -> None:
        if not self.history_path:
            return
        with open(self.history_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def _abort_group() -> None:
    """Abort the default process group and every subgroup: their connections close, so peers blocked
    in a collective with this process fail promptly instead of at the group's timeout."""
    if not dist.is_initialized():
        return
    try:
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()
    except Exception:  # noqa: BLE001 - an older torch or backend without abort: a plain destroy
        dist.destroy_process_group()


def _replicas_diverge(algorithm: str) -> bool:
    """True when replicas hold different parameters/inner optimizer state between syncs (all but DDP)."""
    return algorithm != "ddp"


def _open_checkpoint(path: str) -> tuple[ucp.CheckpointInfo, ucp.Storage]:
    """The committed checkpoint at ``path`` (a ``step-N`` directory) and the storage of its parent."""
    parent, name = os.path.split(os.path.normpath(path))
    storage = ucp.Storage(parent)
    return ucp.read_info(storage, name), storage


def _comm_calls(comm: Any) -> int:
    """Collectives issued so far by ``comm`` (0 for a stand-in without ``stats()``)."""
    stats = getattr(comm, "stats", None)
    return int(stats()["calls"]) if callable(stats) else 0
