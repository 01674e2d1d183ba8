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
        commit the checkpoint started one step ago (asyncSave); checkpoint every checkpoint.everySteps
    strategy.finish(); final eval; final checkpoint

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
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from loco_trainer import checkpoint as ckpt
from loco_trainer.config import BatchRule, RuntimeEnv, TrainerConfig, TrainingSpec
from loco_trainer.faults import InjectedCrash, crash_step, step_delay_s
from loco_trainer.data import Dataset, DataPosition, rank_slice
from loco_trainer.metrics import TrainerMetrics
from loco_trainer.model import build_model, num_params
from loco_trainer.progress import ProgressState
from loco_trainer.protocol import CheckpointRef, WorkerState
from loco_trainer.rendezvous import RankInfo

log = logging.getLogger("loco_trainer")

CHECKPOINT_STATE_VERSION = 1

#: (spec, model, inner_optimizer, comm) -> Strategy; the default is algorithms.make_strategy
StrategyFactory = Callable[[Any, torch.nn.Module, torch.optim.Optimizer, Any], Any]


# ----------------------------------------------------------------------------- pure helpers


def lr_at(step: int, training: TrainingSpec) -> float:
    """Learning rate of 0-based inner step ``step``:
    1) linear warm-up from lr/warmup to lr over ``warmupSteps``;
    2) cosine decay from lr to lr*minLrRatio until ``steps``;
    3) lr*minLrRatio afterwards."""
    peak, floor = training.lr, training.lr * training.min_lr_ratio
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


def format_progress_line(step: int, total: int, loss: float, eval_loss: float | None, tokens_per_s: float, ms_per_step: float) -> str:
    """``step 40/200 | loss 2.3456 | eval 2.4000 | 12,345 tok/s | 55 ms/step``."""
    parts = [f"step {step}/{total}", f"loss {loss:.4f}"]
    if eval_loss is not None:
        parts.append(f"eval {eval_loss:.4f}")
    parts += [f"{tokens_per_s:,.0f} tok/s", f"{ms_per_step:.0f} ms/step"]
    return " | ".join(parts)


# ---------------------------------------------------------------------------------- trainer


@dataclass
class TrainResult:
    """What one process's run ended with."""

    step: int
    loss: float | None
    eval_loss: float | None
    last_checkpoint: ckpt.CheckpointInfo | None
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
            (rank 0's), ``lr``, ``wallS`` (seconds since the loop started), ``evalLoss`` when evaluated;
            a last line ``{"step", "evalLoss", "final": true}``.
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
        self.saver = ckpt.AsyncSaver()
        self._save_stall_s = 0.0

    # ---------------------------------------------------------------- collective helpers

    def _barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def _mean_over_ranks(self, value: float) -> float:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return value
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

    def choose_checkpoint(self) -> ckpt.CheckpointInfo | None:
        """Rank 0 picks the newest committed checkpoint (the operator's LOCO_RESUME_FROM is only a
        hint) and cleans abandoned ``.tmp-*`` directories; every rank gets the same answer."""
        chosen_path = None
        if self.info.rank == 0:
            for removed in ckpt.clean_incomplete(self.ckpt_dir):
                log.info("removed incomplete checkpoint %s", removed)
            newest = ckpt.latest(self.ckpt_dir)
            hint = self.env.resume_from
            if newest is not None:
                chosen_path = newest.path
                why = "newest committed checkpoint in " + self.ckpt_dir
                if hint and os.path.normpath(self.env.resolve_path(hint)) != os.path.normpath(newest.path):
                    why += f" (the operator hinted {hint}; the directory holds a newer or different one)"
                log.info("resuming from %s: %s", newest.path, why)
            elif hint:
                try:
                    chosen_path = ckpt.info(self.env.resolve_path(hint)).path
                    log.info("resuming from %s: LOCO_RESUME_FROM (no committed checkpoint in %s)", chosen_path, self.ckpt_dir)
                except ckpt.CheckpointError as exc:
                    log.warning("ignoring LOCO_RESUME_FROM=%s: %s; starting fresh", hint, exc)
            else:
                log.info("no committed checkpoint in %s: starting from step 0", self.ckpt_dir)
        chosen_path = self._agree(chosen_path)
        return ckpt.info(chosen_path) if chosen_path else None

    # --------------------------------------------------------------------------- run

    def run(self) -> TrainResult:
        cfg, tr, info = self.config, self.config.training, self.info
        self._set_progress(state=WorkerState.starting, total_steps=tr.steps, message="loading data and model")

        data = Dataset(cfg.data, tr.seq_len, tr.seed, self.env.resolve_path)
        torch.manual_seed(tr.seed)  # identical init on every rank
        model = build_model(cfg.model).to(self.device)
        if cfg.model.name == "gpt" and data.max_token >= cfg.model.gpt.vocab_size:
            raise ValueError(
                f"the data holds token id {data.max_token} but model.gpt.vocabSize is {cfg.model.gpt.vocab_size}: "
                f"raise vocabSize above {data.max_token}"
            )
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=tr.lr, betas=(tr.beta1, tr.beta2), weight_decay=tr.weight_decay
        )
        from loco_trainer.comm import Comm

        comm = Comm()
        strategy = self.strategy_factory(cfg.algorithm, model, optimizer, comm)
        seed_everything(tr.seed + info.rank)  # dropout etc. differ per rank

        start_step, position, reference_world = 0, DataPosition(0), info.world_size
        last_ckpt = self.choose_checkpoint()
        resumed_from = None
        if last_ckpt is not None:
            if last_ckpt.world_size != info.world_size:
                raise ckpt.CheckpointError(
                    f"checkpoint {last_ckpt.path} was saved by {last_ckpt.world_size} ranks but this run has "
                    f"{info.world_size}; the simple checkpoint format cannot reshard: run with "
                    f"{last_ckpt.world_size} ranks, or start fresh in a new checkpoint.path"
                )
            state = ckpt.load(last_ckpt.path, info.rank)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            strategy.load_state_dict(state["strategy"])
            set_rng_state(state["rng"])
            position = DataPosition.from_state_dict(state["data"])
            start_step = int(state["step"])
            reference_world = int(state.get("reference_world_size", info.world_size))
            if state.get("config_hash") != self.config_hash:
                log.warning("checkpoint %s was written with a different config (hash %s, now %s)",
                            last_ckpt.path, state.get("config_hash"), self.config_hash)
            resumed_from = last_ckpt.path
            self._set_progress(last_checkpoint=self._ref(last_ckpt), step=start_step)

        wrapped = strategy.wrap(model)
        strategy.setup()
        global_batch = global_batch_size(tr, info.world_size, reference_world)
        tokens_per_step_local = rank_slice(global_batch, info.rank, info.world_size)[1] * tr.seq_len

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
        log.info(
            "training %s: %d params, %d ranks, global batch %d x %d tokens, steps %d..%d, algorithm %s, device %s",
            cfg.model.name, num_params(model), info.world_size, global_batch, tr.seq_len, start_step, tr.steps,
            cfg.algorithm.name.value, self.device,
        )

        losses: list[float] = []
        interval_losses: list[float] = []
        eval_loss: float | None = None
        interval_start, interval_steps = time.perf_counter(), 0
        loop_start = time.perf_counter()
        step = start_step
        model.train()
        for step in range(start_step, tr.steps):
            if step == crash_at:
                code = cfg.fault_injection.exit_code
                log.error("fault injection: rank %d crashes at step %d with exit code %d", info.rank, step, code)
                raise InjectedCrash(code)
            if delay_s:
                time.sleep(delay_s)
            step_start = time.perf_counter()

            lr = lr_at(step, tr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = data.train_batch(position, global_batch, info.rank, info.world_size)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast:
                _, loss = wrapped(x, y)
            loss.backward()
            strategy.after_backward(step)
            if tr.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            strategy.after_inner_step(step)
            position = position.advance(global_batch)
            completed = step + 1

            loss_value = float(loss.detach().float().item())
            losses.append(loss_value)
            interval_losses.append(loss_value)
            interval_steps += 1
            step_seconds = time.perf_counter() - step_start
            if self.metrics:
                self.metrics.step_seconds.observe(step_seconds)
                self.metrics.tokens.inc(tokens_per_step_local)
                self.metrics.step.set(completed)
                self.metrics.lr.set(lr)

            is_last = completed == tr.steps
            if tr.eval_every and completed % tr.eval_every == 0 and not is_last:
                eval_loss = self.evaluate(model, data, autocast)
            record: dict[str, Any] = {"step": completed, "loss": loss_value, "lr": lr,
                                      "wallS": round(time.perf_counter() - loop_start, 6)}
            if tr.eval_every and completed % tr.eval_every == 0 and not is_last:
                record["evalLoss"] = eval_loss
            self._append_history(record)

            if completed % tr.log_every == 0 or is_last:
                elapsed = time.perf_counter() - interval_start
                mean_loss = sum(interval_losses) / len(interval_losses)
                local_tps = tokens_per_step_local * interval_steps / elapsed
                global_tps = global_batch * tr.seq_len * interval_steps / elapsed
                if info.rank == 0:
                    log.info(format_progress_line(completed, tr.steps, mean_loss, eval_loss, global_tps,
                                                  1000 * elapsed / interval_steps))
                self._report_interval(completed, mean_loss, eval_loss, local_tps, strategy, comm)
                interval_losses, interval_start, interval_steps = [], time.perf_counter(), 0
            else:
                self._set_progress(step=completed)

            if self.saver.pending_step is not None:  # started one step ago: commit it now
                last_ckpt = self._commit_async()
            every = self.config.checkpoint.every_steps
            if every and completed % every == 0 and not is_last:
                if self.config.checkpoint.async_save:
                    self.save_async(completed, model, optimizer, strategy, position, reference_world)
                else:
                    last_ckpt = self.save(completed, model, optimizer, strategy, position, reference_world)

        if self.saver.pending_step is not None:
            last_ckpt = self._commit_async()
        strategy.finish()
        final_step = max(step + 1, start_step) if tr.steps > start_step else start_step
        eval_loss = self.evaluate(model, data, autocast)
        self._append_history({"step": final_step, "evalLoss": eval_loss, "final": True})
        if info.rank == 0:
            log.info("final eval loss %.4f at step %d", eval_loss, final_step)
        if last_ckpt is None or last_ckpt.step != final_step:
            last_ckpt = self.save(final_step, model, optimizer, strategy, position, reference_world)
        self._set_progress(step=final_step, eval_loss=eval_loss,
                           loss=losses[-1] if losses else None)
        return TrainResult(final_step, losses[-1] if losses else None, eval_loss, last_ckpt, resumed_from, losses)

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

    def rank_state(self, step: int, model, optimizer, strategy, position: DataPosition, reference_world: int) -> dict[str, Any]:
        """Everything this rank needs to continue exactly where it is after ``step`` inner steps."""
        return {
            "version": CHECKPOINT_STATE_VERSION,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "strategy": strategy.state_dict(),
            "rng": rng_state(),
            "data": position.state_dict(),
            "config_hash": self.config_hash,
            "world_size": self.info.world_size,
            "reference_world_size": reference_world,
        }

    def _commit_kwargs(self) -> dict[str, Any]:
        meta = {"algorithm": self.config.algorithm.name.value, "configHash": self.config_hash,
                "job": self.config.job_name, "namespace": self.config.namespace}
        return dict(rank=self.info.rank, world_size=self.info.world_size, barrier=self._barrier, meta=meta,
                    keep=self.config.checkpoint.keep)

    def save_async(self, step: int, model, optimizer, strategy, position: DataPosition, reference_world: int) -> None:
        """Snapshot the state to CPU now, write it in the background; committed after the next step."""
        start = time.perf_counter()
        state = self.rank_state(step, model, optimizer, strategy, position, reference_world)
        self.saver.start(self.ckpt_dir, step, state, self.info.rank, self._commit_kwargs())
        self._save_stall_s = time.perf_counter() - start

    def _commit_async(self) -> ckpt.CheckpointInfo:
        start = time.perf_counter()
        saved = self.saver.finish()
        assert saved is not None
        return self._saved(saved, self._save_stall_s + time.perf_counter() - start)

    def save(self, step: int, model, optimizer, strategy, position: DataPosition, reference_world: int) -> ckpt.CheckpointInfo:
        """Collective, synchronous checkpoint of every rank's full state after ``step`` inner steps."""
        start = time.perf_counter()
        state = self.rank_state(step, model, optimizer, strategy, position, reference_world)
        saved = ckpt.save(self.ckpt_dir, step, state, **self._commit_kwargs())
        return self._saved(saved, time.perf_counter() - start)

    def _saved(self, saved: ckpt.CheckpointInfo, seconds: float) -> ckpt.CheckpointInfo:
        step = saved.step
        if self.metrics:
            self.metrics.checkpoint_save_seconds.observe(seconds)
        if self.info.rank == 0:
            log.info("checkpoint step %d committed at %s (%.2fs)", step, saved.path, seconds)
        self._set_progress(last_checkpoint=self._ref(saved))
        return saved

    def _ref(self, saved: ckpt.CheckpointInfo) -> CheckpointRef:
        return CheckpointRef(step=saved.step, path=self.env.container_path(saved.path), time=str(saved.meta.get("time", "")))

    def _set_progress(self, **fields: Any) -> None:
        if self.progress is not None:
            self.progress.update(**fields)

    def _report_interval(self, step: int, loss: float, eval_loss: float | None, local_tps: float, strategy, comm) -> None:
        stats = comm.stats() if hasattr(comm, "stats") else {}
        if self.metrics:
            self.metrics.loss.set(loss)
            self.metrics.tokens_per_second.set(local_tps)
            by_kind = {k: v.get("bytes_sent", 0) for k, v in stats.get("by_kind", {}).items()}
            self.metrics.set_comm_bytes(by_kind)
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
