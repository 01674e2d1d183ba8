"""The training loop: nanoGPT-plain and identical for every algorithm.

One :class:`Trainer` per process. :meth:`Trainer.run` is, in order::

    resume (newest committed checkpoint, else fresh init)  ->  strategy.setup()
    for step in range(start_step, steps):
        inject faults (crash / delay)
        set lr (pure function of step: linear warm-up, cosine to minLrRatio)
        x, y = this rank's slice of the global batch at the data position
        forward + backward (autocast when dtype is bfloat16)
        strategy.after_backward(step); clip; inner_optimizer.step(); strategy.after_inner_step(step)
            (a step the strategy does not take, algorithm.adaptiveSteps: only strategy.after_inner_step(step))
        eval every evalEvery; log every logEvery
        note a finished background save; checkpoint every checkpoint.everySteps (Checkpointer, loco_trainer.ucp),
            or at the logEvery boundary the ranks agree on after the operator asked (POST /checkpoint, before a stop)
        live resize: after a lost peer or at a membership update, regroup (LiveMembership)
    strategy.finish(); final eval; final checkpoint

With ``nprocPerWorker > 1`` the pod's processes shard the model and inner optimizer with FSDP2 and
the algorithm runs across pods on the shards (``loco_trainer.sharding``, docs/algorithms.md).

The loop talks to the algorithm only through :class:`loco_trainer.algorithms.base.Strategy` and to
the other ranks only through ``torch.distributed`` (the strategy's :class:`~loco_trainer.comm.Comm`
for the algorithm's traffic; plain ``torch.distributed`` for the small control traffic: eval-loss
average, checkpoint barriers, resume agreement).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from loco_trainer import sharding, ucp
from loco_trainer.algorithms.base import Strategy
from loco_trainer.checkpointer import Checkpointer, replicas_diverge, seed_everything
from loco_trainer.live_membership import LiveMembership
from loco_contract.config import BatchRule, LrScaling, RuntimeEnv, TrainerConfig, TrainingSpec
from loco_trainer.failures import NonFiniteLoss, configuration_errors
from loco_trainer.faults import InjectedCrash, comm_faults, crash_step, nan_loss_step, slow_step_delay_s, step_delay_s
from loco_trainer.data import Dataset, DataPosition, rank_slice
from loco_trainer.metrics import TrainerMetrics
from loco_trainer.model import build_model, num_params
from loco_trainer.progress import ProgressState
from loco_contract.protocol import WorkerState
from loco_trainer.rendezvous import RankInfo

log = logging.getLogger("loco_trainer")

#: (spec, model, inner_optimizer, comm) -> Strategy; the default is algorithms.make_strategy
StrategyFactory = Callable[[Any, torch.nn.Module, torch.optim.Optimizer, Any], Any]


# ----------------------------------------------------------------------------- pure helpers


def lr_at(step: int, training: TrainingSpec, peak_lr: float | None = None) -> float:
    """Learning rate of 0-based inner step ``step``, with lr = ``peak_lr`` (default ``training.lr``;
    the loop passes :func:`effective_lr`):
    1) linear warm-up from lr/warmup to lr over ``warmupSteps``;
    2) cosine decay from lr to lr*minLrRatio until ``scheduleSteps`` (default ``steps``);
    3) lr*minLrRatio afterwards."""
    peak = training.lr if peak_lr is None else peak_lr
    floor = peak * training.min_lr_ratio
    horizon = training.schedule_steps or training.steps
    if step < training.warmup_steps:
        return peak * (step + 1) / training.warmup_steps
    if step >= horizon:
        return floor
    span = max(1, horizon - training.warmup_steps)
    progress = (step - training.warmup_steps) / span
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def resolve_device(training: TrainingSpec, local_rank: int) -> torch.device:
    """``training.device`` made concrete: auto -> cuda:<local_rank> if CUDA is present, else cpu."""
    if training.device == "cuda" or (training.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("training.device is 'cuda' but no CUDA device is visible: set training.device to auto or cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


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
    return nproc_per_worker if replicas_diverge(algorithm) else world_size


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
    if training.batch_rule == BatchRule.keep_global_batch or replicas_diverge(algorithm):
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


@dataclass
class _Run:
    """One run's moving parts and where it stands: what the pieces of the loop share.

    Live resize: ``lost`` is a peer loss in the strategy's own exchange this step (``interrupted``: it broke that
    exchange). ``deferred`` is one seen outside it (eval, probe, save, the boundary agreement), or in an exchange the
    strategy drops: such a collective can complete on some survivors and fail on others, so stopping there would
    leave the survivors at different steps; the worker trains on, without those collectives, to the strategy's next
    exchange, where every survivor stops (or, where the strategy drops lost exchanges, to its next boundary)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: Dataset
    strategy: Any
    autocast: Any
    reference_world: int
    wrapped: Any = None
    sz: _Sizing = None  # type: ignore[assignment]  # set by Trainer._start
    start_step: int = 0
    position: DataPosition = field(default_factory=lambda: DataPosition(0))
    resumed_from: str | None = None
    losses: list[float] = field(default_factory=list)
    interval_losses: list[float] = field(default_factory=list)
    interval_start: float = 0.0
    loop_start: float = 0.0
    eval_loss: float | None = None
    lost: BaseException | None = None
    interrupted: bool = False
    deferred: BaseException | None = None

    @property
    def quiet(self) -> bool:
        """A peer is lost (this step, or deferred): no collective but the strategy's exchange until the regroup."""
        return self.lost is not None or self.deferred is not None


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
        self.device = device
        self.progress = progress
        self.metrics = metrics
        self.history_path = history_path if info.rank == 0 else None
        if strategy_factory is None:
            from loco_trainer.algorithms import make_strategy

            strategy_factory = make_strategy
        self.strategy_factory = strategy_factory
        self.members = LiveMembership(env, info, progress, device, comm=lambda: self._comm, report=self._set_progress)
        self.ckpt = Checkpointer(config, env, info, metrics=metrics, report=self._set_progress,
                                 epoch=lambda: self.members.epoch)
        self._view: sharding.LocalView | None = None
        self._mesh: Any = None
        self._comm: Any = None

    @property
    def info(self) -> RankInfo:
        """This process's rank; it changes at a live membership change (:class:`LiveMembership` joins the group)."""
        return self.members.info

    # ---------------------------------------------------------------- collective helpers

    def _barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def _mean_over_ranks(self, value: float) -> float:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return value
        if self.members.live:  # through the Comm (one process per pod: its group is the default group), so an interrupt ends the wait
            return float(self._comm.agree(torch.tensor([value], dtype=torch.float64), "avg").item())
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / dist.get_world_size()

    # ------------------------------------------------------------------------ resume

    # --------------------------------------------------------------------------- run

    def run(self) -> TrainResult:
        """Train from the start point to ``training.steps`` (the module docstring has the outline), then finish."""
        tr, faults = self.config.training, self.config.fault_injection
        with configuration_errors():  # a value the run cannot be built with is the spec's fault: exit code 2
            run = self._build()
        self._start(run)
        self._announce(run)
        crash_at = crash_step(faults, self.info.rank, self.env.restart_count)
        nan_at = nan_loss_step(faults, self.info.rank, self.env.restart_count)
        delay_s, slow_s = step_delay_s(faults), slow_step_delay_s(faults, self.info.rank)
        run.interval_start = run.loop_start = time.perf_counter()
        step = run.start_step
        run.model.train()
        for step in range(run.start_step, tr.steps):
            if step == crash_at:
                log.error("fault injection: rank %d crashes at step %d with exit code %d", self.info.rank, step,
                          faults.exit_code)
                raise InjectedCrash(faults.exit_code)
            step_start = time.perf_counter()
            if run.strategy.takes_step(step):
                if delay_s:
                    time.sleep(delay_s)  # fault injection: a slow trainer (outside the step's own time)
                    step_start = time.perf_counter()
                if slow_s:
                    time.sleep(slow_s)  # fault injection: slow hardware (inside it)
                loss, lr = self._train_step(run, step)
                loss = math.nan if step == nan_at else loss  # fault injection: a diverged run
            else:
                loss, lr = self._pass_step(run, step)
            completed = step + 1
            is_last = completed == tr.steps
            self._record_step(run, completed, loss, lr, time.perf_counter() - step_start)
            self._evaluate_and_record(run, completed, is_last, loss, lr)
            self._log_interval(run, completed, is_last)
            self._maybe_checkpoint(run, completed, is_last)
            self._regroup_if_needed(run, completed, is_last)
        return self._finish(run, step)

    # ------------------------------------------------------------------ the run's parts

    def _build(self) -> "_Run":
        """Data, model (sharded inside the pod when it runs several processes), inner optimizer, comm, algorithm
        and checkpoint engine."""
        cfg, tr, info = self.config, self.config.training, self.info
        self._set_progress(state=WorkerState.starting, total_steps=tr.steps, message="loading data and model")
        data = Dataset(cfg.data, tr.seq_len, tr.seed, self.env.resolve_path)
        torch.manual_seed(tr.seed)  # identical init on every rank
        model = build_model(cfg.model).to(self.device)
        nproc, num_replicas = info.nproc_per_worker, info.world_size // info.nproc_per_worker
        sharding.check_shardable(cfg.algorithm.name.value, nproc)
        if nproc > 1 and cfg.algorithm.adaptive_steps is not None:
            raise ValueError("algorithm.adaptiveSteps needs nprocPerWorker 1 (a sharded pod's processes would have to "
                             "skip the same steps): remove adaptiveSteps or set nprocPerWorker to 1")
        if nproc > 1:  # FSDP2 inside the pod, the algorithm across pods (loco_trainer.sharding)
            self._mesh = sharding.Mesh(self.device.type, num_replicas, nproc)
            sharding.shard_model(model, self._mesh)
            self._view = sharding.LocalView(model)
        if cfg.model.name == "gpt" and data.max_token >= cfg.model.gpt.vocab_size:
            raise ValueError(
                f"the data holds token id {data.max_token} but model.gpt.vocabSize is {cfg.model.gpt.vocab_size}: "
                f"raise vocabSize above {data.max_token}"
            )
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=tr.lr, betas=(tr.beta1, tr.beta2), weight_decay=tr.weight_decay
        )
        self._comm = self._make_comm()
        strategy = self.strategy_factory(cfg.algorithm, self._view or model, optimizer, self._comm)
        self.members.live, self.members.strategy = self._live_capable(strategy), strategy
        if self.members.live and self.progress is not None:
            self.progress.on_membership(self.members.on_update)
        self.ckpt.view = self._view
        self.ckpt.open(num_replicas, nproc)
        seed_everything(tr.seed + info.rank)  # dropout etc. differ per rank
        autocast = (torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
                    if tr.dtype == "bfloat16" else nullcontext())
        return _Run(model=model, optimizer=optimizer, data=data, strategy=strategy, autocast=autocast,
                    reference_world=info.world_size)

    def _start(self, run: "_Run") -> None:
        """Where this worker starts: the running workers' state (a joiner of a live grow), else the newest committed
        checkpoint, else step 0. Then one common clock for the collectives' records, shipped on the progress channel."""
        cfg, tr = self.config, self.config.training
        if self.env.join:  # a live grow: step, data position and global state come from the running workers
            if not self.members.live:
                raise ValueError(f"LOCO_JOIN=1 but {cfg.algorithm.name.value} with {self.info.nproc_per_worker} "
                                 f"processes per pod cannot join a running job (docs/elastic.md, Live resizing)")
            self._comm.sync_clock()
            run.start_step, run.position, run.reference_world = self.members.agree(
                0, DataPosition(0), run.reference_world, joining=True, interrupted=False, planned=True)
            seed_everything(tr.seed + self.info.rank + 1_000_003 * run.start_step)
            run.wrapped = run.strategy.wrap(run.model)
            self._set_progress(step=run.start_step)
        else:
            chosen = self.ckpt.choose()
            if chosen is not None:
                resumed, storage = chosen
                run.start_step, run.position, run.reference_world = self.ckpt.restore(
                    resumed, storage, run.model, run.optimizer, run.strategy)
                run.resumed_from = resumed.url
                self._set_progress(last_checkpoint=self.ckpt.ref(resumed), step=run.start_step)
            run.wrapped = run.model if self._view is not None else run.strategy.wrap(run.model)  # sharded: FSDP wraps
            run.strategy.setup()
            self._comm.sync_clock()
        self._publish_records(self._comm)
        run.sz = self._sizing(run.reference_world)

    def _announce(self, run: "_Run") -> None:
        cfg, tr, algorithm = self.config, self.config.training, self.config.algorithm.name.value
        self._set_progress(state=WorkerState.running, step=run.start_step, algorithm=algorithm, message="")
        if self.metrics:
            self.metrics.total_steps.set(tr.steps)
            self.metrics.step.set(run.start_step)
            self.metrics.set_info(algorithm, self.device.type)
            if self.ckpt.last_committed is not None:
                self.metrics.checkpoint_step.set(self.ckpt.last_committed.step)
        log.info(
            "training %s: %d params, %d ranks, global batch %d x %d tokens, steps %d..%d, algorithm %s, device %s",
            cfg.model.name, num_params(run.model), self.info.world_size, run.sz.global_batch, tr.seq_len, run.start_step,
            tr.steps, algorithm, self.device,
        )

    def _train_step(self, run: "_Run", step: int) -> tuple[float, float]:
        """One inner step: this rank's slice of the global batch, forward, backward, the algorithm's hooks, the
        inner optimizer, the algorithm's exchange. Returns (loss, lr)."""
        tr, sz, info = self.config.training, run.sz, self.info
        lr = lr_at(step, tr, sz.peak_lr)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        x, y = run.data.train_batch(run.position, sz.global_batch, info.rank, info.world_size)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with run.autocast:
            _, loss = run.wrapped(x, y)
        (loss * sz.loss_weight if sz.loss_weight != 1.0 else loss).backward()
        if self._view is not None:
            self._view.pull_grads()  # the algorithm reduces this process's gradient shards
        run.strategy.after_backward(step)
        if tr.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), tr.grad_clip)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        self._exchange(run, step)
        run.position = run.position.advance(sz.global_batch)
        return float(loss.detach().float().item()), lr

    def _pass_step(self, run: "_Run", step: int) -> tuple[None, float]:
        """A step this worker does not compute (``algorithm.adaptiveSteps`` gave it fewer per round): no batch, no
        forward or backward, but the algorithm's exchange and the data position move on as on every worker.
        Returns (None, lr)."""
        self._exchange(run, step)
        run.position = run.position.advance(run.sz.global_batch)
        return None, lr_at(step, self.config.training, run.sz.peak_lr)

    def _exchange(self, run: "_Run", step: int) -> None:
        """The algorithm's communication after the inner step (an outer step, a fragment, a gossip round), timed as
        an outer sync when it issued collectives. A peer lost in it is noted in ``run`` (see :class:`_Run`)."""
        run.lost, run.interrupted = None, False
        calls_before = _comm_calls(self._comm) if self.metrics else 0
        started = time.perf_counter()
        try:
            run.strategy.after_inner_step(step)
        except Exception as exc:
            if not self.members.peer_lost(exc):
                raise
            if run.strategy.drop_lost_exchange():  # Streaming DiLoCo: train on to the next boundary
                self._defer(run, exc, step + 1)
            else:
                run.lost, run.interrupted = exc, True
        if self.metrics and not run.quiet and _comm_calls(self._comm) != calls_before:  # an outer step
            self.metrics.outer_sync_seconds.observe(time.perf_counter() - started)

    def _outside_exchange(self, run: "_Run", completed: int, collective: Callable[[], None]) -> None:
        """Run ``collective`` (eval, probe, save, the boundary agreement: anything but the strategy's exchange); a peer
        lost in it is deferred (see :class:`_Run`)."""
        try:
            collective()
        except Exception as exc:
            if not self.members.peer_lost(exc):
                raise
            self._defer(run, exc, completed)

    def _defer(self, run: "_Run", exc: BaseException, completed: int) -> None:
        if run.deferred is None:
            run.deferred = self.members.leave_after_loss(exc, completed)

    def _record_step(self, run: "_Run", completed: int, loss: float | None, lr: float, seconds: float) -> None:
        """Note a step's loss and time (``loss`` None: a step this worker passed over, which counts only as progress)."""
        if loss is not None:
            if not math.isfinite(loss):  # every later step would train on garbage: stop with exit code 80
                raise NonFiniteLoss(completed, loss)
            run.losses.append(loss)
            run.interval_losses.append(loss)
        if self.metrics:
            if loss is not None:
                self.metrics.step_seconds.observe(seconds)
                self.metrics.tokens.inc(run.sz.tokens_per_step_local)
            self.metrics.step.set(completed)
            self.metrics.lr.set(lr)

    def _evaluate_and_record(self, run: "_Run", completed: int, is_last: bool, loss: float | None, lr: float) -> None:
        """Evaluate every ``evalEvery`` steps (the last step's eval is the final one); one history line per step."""
        tr = self.config.training
        eval_due = bool(tr.eval_every) and completed % tr.eval_every == 0 and not is_last
        if eval_due and not run.quiet:
            def evaluate() -> None:
                run.eval_loss = self.evaluate(run.model, run.data, run.autocast)

            self._outside_exchange(run, completed, evaluate)
        record: dict[str, Any] = {"step": completed, "loss": loss, "lr": lr,
                                  "wallS": round(time.perf_counter() - run.loop_start, 6)}
        if eval_due:
            record["evalLoss"] = run.eval_loss
            if getattr(run.strategy, "adaptive", None) is not None:  # every worker's share (the benchmark's plot)
                record["localSteps"] = list(run.strategy.local_steps)
                record["stepSeconds"] = [round(t, 6) for t in run.strategy.step_seconds]
        if self.history_path and hasattr(self._comm, "stats"):  # cumulative bytes this rank sent (convergence benchmark)
            record["bytesSent"] = int(self._comm.stats().get("bytes_sent", 0))
        self._append_history(record)

    def _log_interval(self, run: "_Run", completed: int, is_last: bool) -> None:
        """Every ``logEvery`` steps: the progress line, the report and metrics, and the probe that fills the
        connection matrix (docs/fault-detection.md; every rank at the same step)."""
        tr = self.config.training
        if completed % tr.log_every != 0 and not is_last:
            self._set_progress(step=completed)
            return
        # steps this worker computed in the interval (fewer than logEvery when adaptive steps pass some over)
        elapsed, steps = time.perf_counter() - run.interval_start, len(run.interval_losses)
        mean_loss = sum(run.interval_losses) / steps if steps else None
        local_tps = run.sz.tokens_per_step_local * steps / elapsed
        if self.info.rank == 0 and steps:
            global_tps = run.sz.global_batch * tr.seq_len * steps / elapsed
            log.info(format_progress_line(completed, tr.steps, mean_loss, run.eval_loss, global_tps, 1000 * elapsed / steps))
        self._report_interval(completed, mean_loss, run.eval_loss, local_tps, run.strategy, self._comm)
        if not is_last and not run.quiet:
            self._outside_exchange(run, completed, lambda: self._comm.probe(
                self.config.probes.probe_bytes, links=not run.strategy.p2p_covers_links(self._comm.world_size)))
        run.interval_losses, run.interval_start = [], time.perf_counter()

    def _maybe_checkpoint(self, run: "_Run", completed: int, is_last: bool) -> None:
        """Note a background save that finished; start one when the checkpointer says one is due, or when the
        operator asked for one before it stops the workers."""
        self.ckpt.poll()
        asked = self._asked_to_save(run, completed, is_last)
        if not (asked or self.ckpt.due(completed, is_last)) or run.quiet:
            return

        def save() -> None:
            self.ckpt.save(completed, run.model, run.optimizer, run.strategy, run.position, run.reference_world)

        self._outside_exchange(run, completed, save)

    def _asked_to_save(self, run: "_Run", completed: int, is_last: bool) -> bool:
        """Whether some rank was asked for a checkpoint (``POST /checkpoint``: the operator is about to stop the
        workers). Every ``training.logEvery`` steps the ranks agree on it with one 8-byte MAX all-reduce over every
        process of the job, so they all save at the same step. Only under an operator (it alone can ask)."""
        if (is_last or run.quiet or not self.env.membership_token_file
                or completed % self.config.training.log_every != 0):
            return False
        request = self.progress.take_checkpoint_request() if self.progress is not None else None
        flag = torch.tensor([1 if request is not None else 0], dtype=torch.int64)

        def agree() -> None:
            if self._mesh is not None:  # sharded: the comm spans one rank per pod; the request reached local rank 0
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            else:
                self._comm.agree(flag, "max")

        self._outside_exchange(run, completed, agree)
        asked = not run.quiet and bool(flag.item())
        if asked and (self.info.rank == 0 or request is not None):
            log.info("saving at step %d: the operator asked for a checkpoint%s", completed,
                     f" ({request.reason})" if request is not None and request.reason else "")
        return asked

    def _regroup_if_needed(self, run: "_Run", completed: int, is_last: bool) -> None:
        """Live resize (docs/elastic.md), the one place a lost peer is acted on: after a lost peer, regroup with the
        survivors now; on a membership update, switch at this outer-step boundary."""
        strategy, update = run.strategy, None
        if self.members.live and not run.quiet and not is_last and strategy.at_membership_boundary():
            def agree() -> None:
                nonlocal update
                update = self.members.agreed_update()

            self._outside_exchange(run, completed, agree)
        if run.deferred is not None and run.lost is None and (is_last or strategy.at_membership_boundary()):
            run.lost = run.deferred  # a round boundary passed without an exchange to stop at: stop here
        if run.lost is None and update is None:
            return
        run.deferred = None
        if run.lost is not None:
            update = self.members.await_update(run.lost, completed, self.ckpt.settle)
        else:
            self.ckpt.finish()  # the old group is still whole: commit first
            strategy.before_membership_change()  # ... and complete what is in flight on it
        run.position, run.reference_world = self._enter_epoch(update, completed, run.position, run.reference_world,
                                                              interrupted=run.interrupted, planned=run.lost is None)[1:]
        run.sz = self._sizing(run.reference_world)

    def _finish(self, run: "_Run", step: int) -> TrainResult:
        """The end: the last save committed, the algorithm's final exchange, the final eval, and the final state in
        the job's directory."""
        tr = self.config.training
        self.ckpt.finish()
        self._comm.finish_probe()
        run.strategy.finish()
        final_step = max(step + 1, run.start_step) if tr.steps > run.start_step else run.start_step
        eval_loss = self.evaluate(run.model, run.data, run.autocast)
        final_record: dict[str, Any] = {"step": final_step, "evalLoss": eval_loss, "final": True}
        if self.history_path and hasattr(self._comm, "stats"):
            final_record["bytesSent"] = int(self._comm.stats().get("bytes_sent", 0))
        self._append_history(final_record)
        if self.info.rank == 0:
            log.info("final eval loss %.4f at step %d", eval_loss, final_step)
        # the job's directory always ends with its final state (also after resuming from a checkpoint elsewhere)
        last = self.ckpt.last_committed
        in_job_dir = last is not None and os.path.dirname(os.path.normpath(last.url)) == os.path.normpath(self.ckpt.dir)
        if last is None or last.step != final_step or not in_job_dir:
            self.ckpt.save_async(final_step, run.model, run.optimizer, run.strategy, run.position, run.reference_world)
            self.ckpt.finish()
        self.ckpt.close()
        loss = run.losses[-1] if run.losses else None
        self._set_progress(step=final_step, eval_loss=eval_loss, loss=loss)
        return TrainResult(final_step, loss, eval_loss, self.ckpt.last_committed, run.resumed_from, run.losses)

    # ------------------------------------------------------- per-epoch sizing, comm, live membership

    def _make_comm(self) -> Any:
        """This rank's :class:`~loco_trainer.comm.Comm` over the current group (the pods' replicate
        group when sharded), with the fault-injection hook of its rank."""
        from loco_trainer.comm import Comm

        return Comm(self._mesh.replicate_group if self._mesh else None, stall_after_s=self.config.probes.stall_after_s,
                    ring_p2p=self.config.probes.ring_all_reduce, interruptible=self.env.live_resize,
                    probe_interval_s=self.config.probes.probe_interval_s,
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

    def _enter_epoch(self, update: Any, completed: int, position: DataPosition, reference_world: int, *,
                     interrupted: bool, planned: bool) -> tuple[int, DataPosition, int]:
        """Leave the current group and go on in ``update``'s epoch (survivors; joiners enter through
        :meth:`run`): join its group, rebuild the comm and the checkpoint engine, agree on the
        position with the other members and hand the new group to the strategy. Returns rank 0's
        ``(step, data position, reference world)``."""
        old = self._comm
        started = time.perf_counter()
        self.members.begin_regroup()
        self.ckpt.leave_group(planned)
        update = self.members.join_newest(update)
        self._comm = self._make_comm()
        self._comm.carry_counters(old)  # bytes and calls stay cumulative for the metrics
        self.ckpt.rejoin(self.info)
        self._comm.sync_clock()
        agreed = self.members.agree(completed, position, reference_world, joining=False, interrupted=interrupted,
                                    planned=planned)
        self.members.entered(update.epoch)
        self.ckpt.engine.raise_fence()  # the old epoch's writers (a member lost but alive) may no longer commit
        self._publish_records(self._comm)
        self._set_progress(epoch=update.epoch, replica_index=self.info.rank, message="")
        if self.info.rank == 0:
            log.info("membership epoch %d: %d workers, continuing at step %d (%s, regrouped in %.2fs)", update.epoch,
                     self.info.world_size, agreed[0], "planned, at an outer-step boundary" if planned
                     else "after a lost peer", time.perf_counter() - started)
        return agreed

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

    def _set_progress(self, **fields: Any) -> None:
        if self.progress is not None:
            self.progress.update(**fields)

    def _report_interval(self, step: int, loss: float | None, eval_loss: float | None, local_tps: float, strategy,
                         comm) -> None:
        """The interval's report: metrics and the progress fields (``loss`` None: this worker computed no step in the
        interval, its last loss stands)."""
        stats = comm.stats() if hasattr(comm, "stats") else {}
        algorithm_metrics = getattr(strategy, "metrics", None)
        gauges = algorithm_metrics() if callable(algorithm_metrics) else {}
        if self.metrics:
            if loss is not None:
                self.metrics.loss.set(loss)
            self.metrics.tokens_per_second.set(local_tps)
            self.metrics.set_comm_stats(stats)
            if hasattr(comm, "records"):
                self.metrics.observe_collectives(comm.records())
            if self.device.type == "cuda":
                self.metrics.set_gpu_memory(torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device),
                                            torch.cuda.max_memory_allocated(self.device))
            self.metrics.set_algorithm_metrics(gauges)
        fields: dict[str, Any] = {"loss": loss} if loss is not None else {}
        if "local_steps" in gauges:  # algorithm.adaptiveSteps: this worker's share of each round, for the operator
            fields["local_steps"] = int(gauges["local_steps"])
            fields["step_seconds"] = gauges.get("step_seconds")
        self._set_progress(
            step=step, eval_loss=eval_loss,
            # the pod leader speaks for its pod: its ranks run the same steps and collectives
            tokens_per_second=local_tps * self.info.nproc_per_worker,
            bytes_sent=int(stats.get("bytes_sent", 0)) * self.info.nproc_per_worker,
            **fields,
        )

    def _append_history(self, record: dict[str, Any]) -> None:
        if not self.history_path:
            return
        with open(self.history_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def _comm_calls(comm: Any) -> int:
    """Collectives issued so far by ``comm`` (0 for a stand-in without ``stats()``)."""
    stats = getattr(comm, "stats", None)
    return int(stats()["calls"]) if callable(stats) else 0
