"""The checkpoint engine: sharded asynchronous save with an all-ranks commit, reshard-on-load.

Typical use from the training loop (every rank, same calls in the same order)::

    engine = CheckpointEngine(url, rank, world_size, layout=WorldLayout(2, 2, "hsdp"), keep=3,
                              algorithm="diloco")          # collective: creates its own gloo group
    info = engine.latest()                                 # newest committed checkpoint or None
    if info:
        loaded = engine.load(info, model, optimizer)       # any saved layout -> this one
        strategy.load_state_dict(loaded.algorithm_state or {})
    ...
    engine.save_async(step, model, optimizer, algorithm_state=strategy.state_dict(),
                      extra_state={...}, rank_state={"rng": ..., "data": ...})   # stalls for the copy only
    ...
    engine.close()                                         # waits for the last save

Save protocol (see ``docs/checkpoint-format.md``):
1. main thread, every rank: waits for the previous save; collects model and optimizer state keyed by
   FQN (``torch.distributed.checkpoint.state_dict.get_state_dict``); copies the blocks it writes into
   reused host buffers (the only stall); hands them to a background thread.
   With ``staging="lazy"`` (DataStates-LLM) parameters and optimizer states are copied by the
   background thread instead, while the next forward/backward runs (they change only inside
   ``optimizer.step()``); a one-shot optimizer step pre-hook makes the next ``step()`` wait until
   that copy is done, so the stall is only the part of the copy that compute did not hide.
2. background, every rank: writes ``.tmp-step-N/data/rank-R.safetensors`` and its fragment index.
3. background, every rank: all-gather of (success, fragment index) over the engine's own gloo group
   (never the training group, so the two threads never interleave collectives).
4. background, rank 0: only if every rank succeeded and the fragments tile every atom: writes
   ``manifest.json``, renames the directory to ``step-N`` (the commit), rewrites ``latest``,
   deletes checkpoints beyond ``keep``. Otherwise removes the temporary directory.
5. background, every rank: rank 0 broadcasts the outcome; each rank's :class:`SaveHandle` resolves
   to the same committed :class:`CheckpointInfo` or the same error.

A failed save is reported through ``on_event`` (reason ``CheckpointFailed``) and the
``loco_checkpoint_saves_total{outcome="failed"}`` metric; it never leaves a directory that looks
committed. ``SaveHandle.wait()`` raises it; the next ``save_async`` proceeds.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import tree
from .format import (
    LATEST_FILE, MANIFEST_FILE, TMP_PREFIX, Fragment, FormatError, Manifest, WorldLayout, atoms_from_fragments,
    data_file_name, index_file_name, replica_atom, step_dir_name, tmp_dir_name,
)
from .layout import FragmentReader, assign_owners, fill_tensor, is_dtensor, local_block
from .fence import StaleWriterError, check_fence, raise_fence
from .ownership import PreviousJob, take_over
from .catalog import CheckpointInfo, list_checkpoints, read_info
from .storage import Storage
from .tensorio import StagingPool, dtype_name, write_safetensors
from .verify import Selection, newest_valid


log = logging.getLogger("loco.ucp")

#: the fault hook's phases in the order a save passes them (see ``fault_hook``)
SAVE_PHASES = ("before_stage", "after_data", "before_commit", "moved_aside", "renamed", "root_synced", "committed",
               "latest_written", "retired", "before_broadcast")
#: the first phase at which the new checkpoint is the committed one
COMMIT_POINT = "renamed"


class Reason:
    """Event reasons passed to ``on_event`` (constants, like Kubernetes event reasons)."""

    COMMITTED = "CheckpointCommitted"
    FAILED = "CheckpointFailed"
    LOADED = "CheckpointLoaded"
    STATE_RESET = "CheckpointStateReset"
    INCOMPLETE_REMOVED = "IncompleteCheckpointRemoved"
    #: a committed checkpoint failed verification and was passed over (see :meth:`CheckpointEngine.newest_valid`)
    SKIPPED = "CheckpointSkipped"
    #: a replaced checkpoint was put back after a crash interrupted its replacement
    RESTORED = "CheckpointRestored"
    #: a commit refused: a newer membership epoch (or another job) writes to the directory now (:mod:`.fence`)
    FENCED = "CheckpointFenced"


class CheckpointSaveError(RuntimeError):
    """A save did not commit (the message says which rank failed and why)."""


class CheckpointLoadError(RuntimeError):
    """A checkpoint cannot be loaded into this model/optimizer (the message names the key)."""


@dataclass
class LoadedState:
    """What :meth:`CheckpointEngine.load` restored besides the model and optimizer."""

    step: int
    #: the algorithm state when the saved algorithm equals the current one (or was mapped), else None
    algorithm_state: Any
    #: the caller's extra state (rank 0's at save)
    extra_state: Any
    #: this rank's private state (RNG, data position) when the saved world had this rank, else None
    rank_state: Any
    #: human-readable notes: every reset, cast or mapping that happened, with its reason
    notes: list[str] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0


def map_algorithm_state(saved: str, current: str | None, state: Any) -> tuple[Any, str | None]:
    """``(state to give the strategy, reason for a reset or None)``.

    Same algorithm (or no current algorithm given): the state is kept. A different algorithm: its
    state (outer optimizer, global parameters, schedules) does not describe the new one, so it is
    reset; parameters and inner optimizer state are loaded either way.
    """
    if current is None or saved == current or state is None:
        return state, None
    return None, (
        f"algorithm changed from {saved or 'unknown'!r} to {current!r}: the saved algorithm state does not apply and "
        "is reset; parameters and inner optimizer state are kept"
    )


class CheckpointMetrics:
    """Prometheus metrics of the engine (own registry unless one is given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.saves = Counter("loco_checkpoint_saves_total", "Checkpoint saves by outcome.", ["outcome"], registry=r)
        self.stall = Histogram("loco_checkpoint_stall_seconds", "Training stall per save (state collection + copy to host).", registry=r)
        self.write = Histogram("loco_checkpoint_write_seconds", "Background write + commit time per save.", registry=r)
        self.bytes = Counter("loco_checkpoint_bytes_written_total", "Bytes this rank wrote to checkpoint data files.", registry=r)
        self.last_step = Gauge("loco_checkpoint_last_committed_step", "Step of the newest committed checkpoint.", registry=r)
        self.fenced = Counter("loco_checkpoint_fenced_total", "Commits refused because a newer writer holds the "
                              "checkpoint directory (a stale worker's).", registry=r)


class SaveHandle:
    """One save in flight. ``wait()`` returns the committed checkpoint or raises CheckpointSaveError."""

    def __init__(self, step: int, stall_s: float) -> None:
        self.step = step
        #: seconds the caller was blocked (state collection + copy to host)
        self.stall_s = stall_s
        #: seconds of background write + commit (set when done)
        self.write_s = 0.0
        self.bytes_written = 0
        #: seconds the next optimizer step waited for lazy staging (included in ``stall_s``)
        self.stage_wait_s = 0.0
        self._done = threading.Event()
        self._staged = threading.Event()
        self._info: CheckpointInfo | None = None
        self._error: BaseException | None = None

    def _finish(self, info: CheckpointInfo | None, error: BaseException | None) -> None:
        self._info, self._error = info, error
        self._staged.set()
        self._done.set()

    def staged(self) -> bool:
        """True once every tensor of this save is in host buffers (training may modify its state)."""
        return self._staged.is_set()

    def wait_staged(self) -> float:
        """Block until the host copy is complete; returns the seconds waited (added to ``stall_s``)."""
        t0 = time.perf_counter()
        self._staged.wait()
        waited = time.perf_counter() - t0
        self.stage_wait_s += waited
        self.stall_s += waited
        return waited

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def error(self) -> BaseException | None:
        return self._error if self.done() else None

    def wait(self, timeout_s: float | None = None) -> CheckpointInfo:
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"checkpoint step {self.step} still writing after {timeout_s}s")
        if self._error is not None:
            raise CheckpointSaveError(f"checkpoint step {self.step} was not committed: {self._error}") from self._error
        assert self._info is not None
        return self._info


@dataclass
class _Staged:
    """Everything the background thread needs (no reference to live training tensors)."""

    step: int
    tensors: list[tuple[str, torch.Tensor]]          # (fragment key, staged host tensor, or live for lazy ones)
    lazy: set[str]                                    # keys still to be copied by the background thread
    pieces: list[tuple[str, tuple[int, ...], str, str, tuple[int, ...], tuple[int, ...]]]  # atom, gshape, dtype, layout, offsets, shape
    rank_state: Any
    root_state: dict[str, Any]                          # rank 0 only: trees and param groups
    meta: dict[str, Any]


class CheckpointEngine:
    """Universal checkpoints of one job under ``root_url``.

    Args:
        root_url: local path or fsspec URL of the job's checkpoint directory (shared by all ranks).
        rank, world_size: this process's global rank and the world size. With ``world_size > 1``
            ``torch.distributed`` must be initialised; construction is then a collective call.
        layout: the world layout recorded in manifests (default: ``world_size`` x 1).
        keep: committed checkpoints to keep (older ones are deleted after each commit).
        fs: an fsspec filesystem to use instead of the one ``root_url`` names.
        algorithm: the running algorithm's name (recorded at save, compared at load).
        on_event: ``callback(reason, message)`` for commits, failures, resets (see :class:`Reason`).
        metrics_registry: prometheus registry for :class:`CheckpointMetrics` (default: a new one).
        coordination_timeout_s: how long the commit may wait for a slow or dead rank.
        balance_replicated_writes: spread whole (non-DTensor) tensors over ranks; set False when
            replicas may differ at save time so that rank 0's copy is the one saved.
        fault_hook: tests only: called in the background thread with the phase name, in this
            order (:data:`SAVE_PHASES`; rank 0 alone passes the commit phases): ``"before_stage"``,
            ``"after_data"``, ``"before_commit"``, ``"moved_aside"`` (only when the step exists
            already), ``"renamed"`` (the commit point), ``"root_synced"``, ``"committed"``,
            ``"latest_written"``, ``"retired"`` (once per checkpoint retired), ``"before_broadcast"``.
        staging: ``"eager"``: ``save_async`` returns after copying everything to host buffers;
            ``"lazy"``: parameters and optimizer states are copied in the background and the next
            ``optimizer.step()`` waits for that copy (needs the optimizer; parameters must change
            only inside ``optimizer.step()`` until then, which holds for every Loco strategy).
        dtensor_writer: False when this rank's DTensors are a copy of another rank's, on a mesh
            that does not span the replicas (FSDP inside each pod: only pod 0 writes its shards);
            True (default) when the DTensors' own Replicate placements say who writes.
        job_uid, epoch: fence the directory (:mod:`.fence`): ``epoch()`` is the membership epoch this writer
            runs in now; rank 0 raises the fence to ``(job_uid, epoch())`` at start (and at
            :meth:`raise_fence`) and refuses to commit once a newer epoch or another job holds it.
            ``epoch`` None: no fence (tools, tests).
        adopt_previous_job: what rank 0 does, before it raises the fence, with the checkpoints of an earlier
            job of another uid found in the directory (:mod:`.ownership`): False sets them aside into
            ``previous-job-<uid>/`` and the job starts fresh, True resumes from them. :attr:`previous_job`
            says what was found and done (rank 0; None elsewhere and when there was nothing).
    """

    def __init__(
        self,
        root_url: str,
        rank: int = 0,
        world_size: int = 1,
        layout: WorldLayout | None = None,
        keep: int = 3,
        fs: Any = None,
        algorithm: str = "",
        on_event: Callable[[str, str], None] | None = None,
        metrics_registry: CollectorRegistry | None = None,
        coordination_timeout_s: float = 600.0,
        balance_replicated_writes: bool = True,
        fault_hook: Callable[[str], None] | None = None,
        staging: str = "eager",
        dtensor_writer: bool = True,
        job_uid: str = "",
        epoch: Callable[[], int] | None = None,
        adopt_previous_job: bool = False,
    ) -> None:
        if staging not in ("eager", "lazy"):
            raise ValueError(f"staging must be 'eager' or 'lazy' (got {staging!r})")
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (got {keep}): it is the number of committed checkpoints kept")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the world of {world_size} ranks")
        self.storage = Storage(root_url, fs)
        self.rank, self.world_size = rank, world_size
        self.layout = layout or WorldLayout(world_size, 1)
        if self.layout.world_size != world_size:
            raise ValueError(f"layout {self.layout.describe()} has {self.layout.world_size} ranks, world_size is {world_size}")
        self.keep = keep
        self.algorithm = algorithm
        self.on_event = on_event
        self.metrics = CheckpointMetrics(metrics_registry)
        self.balance_replicated_writes = balance_replicated_writes
        self.fault_hook = fault_hook
        self.staging = staging
        self.dtensor_writer = dtensor_writer
        self.job_uid, self.epoch = job_uid, epoch
        self._pool = StagingPool()
        self._gate: Any = None
        self._pending: SaveHandle | None = None
        self._thread: threading.Thread | None = None
        self._group = None
        if world_size > 1:
            if not dist.is_initialized():
                raise RuntimeError("CheckpointEngine with world_size > 1 needs torch.distributed initialised first")
            self._group = dist.new_group(backend="gloo", timeout=dt.timedelta(seconds=coordination_timeout_s))
        self.previous_job: PreviousJob | None = None
        if rank == 0:
            self.storage.makedirs("")
            if epoch is not None:
                self.previous_job = take_over(self.storage, job_uid, adopt_previous_job)
            self.raise_fence()
            self.cleanup_incomplete()
        self._barrier()

    # ----------------------------------------------------------------------------- helpers

    def _barrier(self) -> None:
        if self._group is not None:
            dist.barrier(group=self._group)

    def _event(self, reason: str, message: str) -> None:
        warn = reason in (Reason.FAILED, Reason.STATE_RESET, Reason.SKIPPED, Reason.RESTORED, Reason.FENCED)
        (log.warning if warn else log.info)("%s: %s", reason, message)
        if self.on_event is not None:
            try:
                self.on_event(reason, message)
            except Exception:  # noqa: BLE001 - reporting must not break checkpointing
                log.exception("on_event callback failed")

    def raise_fence(self) -> None:
        """Rank 0: this writer's epoch begins; older writers of the job may no longer commit here."""
        if self.epoch is not None and self.rank == 0:
            fence = raise_fence(self.storage, self.job_uid, self.epoch(), writer=os.environ.get("POD_NAME", ""))
            log.info("checkpoint directory fenced: job uid %s, epoch %d", fence.job_uid or "<none>", fence.epoch)

    def _hook(self, phase: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(phase)

    # ------------------------------------------------------------------------------ listing

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints (a ``step-N`` directory with a readable manifest), oldest first."""
        return list_checkpoints(self.storage)

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint, or None (not verified: see :meth:`newest_valid`)."""
        found = self.list()
        return found[-1] if found else None

    def newest_valid(self, checksums: bool = True) -> "Selection":
        """The newest committed checkpoint that verifies (what a resume should load) and the newer
        ones skipped, each reported through ``on_event`` (reason ``CheckpointSkipped``).
        Reads the chosen checkpoint's data once with ``checksums``; call it on one rank."""
        selection = newest_valid(self.storage, checksums=checksums)
        for s in selection.skipped:
            self._event(Reason.SKIPPED, f"skipped checkpoint {s.dir} (step {s.step}, reason {s.reason}): {s.message}")
        return selection

    def cleanup_incomplete(self) -> list[str]:
        """Put back a checkpoint whose replacement a crash interrupted, then delete ``.tmp-*``
        directories (saves that never committed, retirements not finished) and stray ``*.partial``
        files; returns the names deleted. Called by rank 0 at construction; call it only when no
        save of this job is running."""
        for name in self.storage.recover_replaced():
            self._event(Reason.RESTORED, f"restored {self.storage.path(name)}: a crash interrupted its replacement")
        removed = []
        for name in self.storage.listdir(""):
            if name.startswith(TMP_PREFIX) or name.endswith(".partial"):
                self.storage.remove(name)
                removed.append(name)
                self._event(Reason.INCOMPLETE_REMOVED, f"removed incomplete checkpoint {self.storage.path(name)}")
        return removed

    # --------------------------------------------------------------------------------- save

    def wait(self) -> SaveHandle | None:
        """Wait for the save in flight (if any) and return its handle (its error is not raised)."""
        handle, thread = self._pending, self._thread
        if thread is not None:
            thread.join()
        return handle

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> CheckpointInfo:
        """Synchronous :meth:`save_async`: returns once the checkpoint is committed (or raises). Nothing changes the
        tensors meanwhile, so CPU tensors are written from where they are, without a copy to host buffers."""
        return self.save_async(step, model, optimizer, copy=False, **kwargs).wait()

    def save_async(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        algorithm_state: Any = None,
        extra_state: Any = None,
        rank_state: Any = None,
        meta: dict[str, Any] | None = None,
        per_replica: bool = False,
        copy: bool = True,
    ) -> SaveHandle:
        """Start saving checkpoint ``step`` (collective: every rank calls it with the same step).

        Blocks until the previous save finished and this rank's tensors are copied to host
        memory; the write and the commit happen in the background. ``algorithm_state`` and
        ``extra_state`` are taken from rank 0 (DTensors in them from every rank);
        ``rank_state`` from every rank.

        ``per_replica`` (every rank passes the same value): the replicas' model and inner optimizer
        state differ (DiLoCo & co. between syncs), so besides replica 0's copy in the shared
        ``model/*``, ``optim/*`` atoms, every replica ``k >= 1`` (ranks ``k*p .. k*p+p-1`` of the
        layout's ``p`` processes per replica) saves its own copy as ``replica/<k>/model/*``,
        ``replica/<k>/optim/*`` atoms (:func:`~loco_trainer.ucp.format.replica_atom`): sharded
        (DTensor) tensors in fragments from each of the replica's processes, whole tensors from its
        first process. :func:`load_into` with ``replica=k`` loads them into any layout.
        """
        previous = self.wait()
        self._remove_gate()
        if previous is not None and previous.error is not None:
            log.warning("previous checkpoint (step %d) failed: %s", previous.step, previous.error)
        t0 = time.perf_counter()
        lazy = self.staging == "lazy" and optimizer is not None and copy
        staged = self._stage(step, model, optimizer, algorithm_state, extra_state, rank_state, meta or {}, lazy,
                             per_replica, copy)
        stall = time.perf_counter() - t0
        handle = SaveHandle(step, stall)
        if staged.lazy:
            self._install_step_gate(optimizer, handle)
        else:
            handle._staged.set()
            self.metrics.stall.observe(stall)
        self._pending = handle
        self._thread = threading.Thread(target=self._write_and_commit, args=(staged, handle), name=f"ucp-save-{step}", daemon=True)
        self._thread.start()
        return handle

    def _install_step_gate(self, optimizer: torch.optim.Optimizer, handle: SaveHandle) -> None:
        """One-shot pre-hook: the next ``optimizer.step()`` waits until ``handle`` is staged.

        The hook cannot unregister itself while the optimizer iterates its hooks, so after its
        first call it does nothing; it is removed by the next save or by :meth:`close`.
        """
        fired = [False]

        def gate(*_: Any) -> None:
            if fired[0]:
                return
            fired[0] = True
            handle.wait_staged()
            self.metrics.stall.observe(handle.stall_s)

        self._gate = optimizer.register_step_pre_hook(gate)

    def _remove_gate(self) -> None:
        if self._gate is not None:
            self._gate.remove()
            self._gate = None

    def _stage(self, step, model, optimizer, algorithm_state, extra_state, rank_state, meta, lazy=False,
               per_replica=False, copy=True) -> _Staged:
        model_sd, optim_sd = collect_state(model, optimizer)
        param_ptrs = {_local(p).data_ptr() for p in model.parameters()} if lazy else set()
        optim_tree, optim_tensors = tree.encode(optim_sd.get("state", {}), "optim") if optim_sd else (None, {})
        model_tree, model_tensors = tree.encode(model_sd, "model")
        algo_tree, algo_tensors = tree.encode(algorithm_state, "algorithm")
        extra_tree, extra_tensors = tree.encode(extra_state, "extra")
        rank_tree, rank_tensors = tree.encode(rank_state, f"rank/{self.rank}")

        # who writes each whole (non-DTensor) tensor
        shared = {**model_tensors, **optim_tensors}
        plain = [(n, t.numel() * t.element_size()) for n, t in shared.items() if not is_dtensor(t)]
        owners = assign_owners(plain, self.world_size) if self.balance_replicated_writes else {n: 0 for n, _ in plain}
        for n, t in {**algo_tensors, **extra_tensors}.items():
            if not is_dtensor(t):
                owners[n] = 0
        for n in rank_tensors:
            owners[n] = self.rank
        # this replica's own copy of the shared tensors (replica 0's copy is the shared atoms)
        replica, local_rank = divmod(self.rank, self.layout.nproc_per_worker)
        own: dict[str, str] = {}  # replica atom -> shared atom
        if per_replica and replica > 0:
            own = {replica_atom(replica, n): n for n in shared}
            for n in own:
                owners[n] = self.rank if local_rank == 0 else -1
        own_tensors = {n: shared[base] for n, base in own.items()}

        tensors, pieces, keys, lazy_keys = [], [], set(), set()
        any_cuda = False
        for name, t in {**shared, **algo_tensors, **extra_tensors, **rank_tensors, **own_tensors}.items():
            block, writes = local_block(name, t)
            if block is None or not writes or (is_dtensor(t) and not self.dtensor_writer and name not in own):
                continue
            if not is_dtensor(t) and owners.get(name) != self.rank:
                continue
            if block.local.numel() == 0 and any(s > 0 for s in t.shape):
                continue
            key = f"{name}@" + ",".join(map(str, block.offsets))
            # lazily copied: tensors that change only inside optimizer.step() (parameters, optimizer state)
            base = own.get(name, name)
            if lazy and (base in optim_tensors or (base in model_tensors and block.local.data_ptr() in param_ptrs)):
                tensors.append((key, block.local))
                lazy_keys.add(key)
            elif not copy and block.local.device.type == "cpu":
                tensors.append((key, block.local))  # written in place: the caller waits for the save
            else:
                tensors.append((key, self._pool.stage(key, block.local)))
                any_cuda = any_cuda or block.local.is_cuda
            keys.add(key)
            pieces.append((name, tuple(t.shape), dtype_name(t.dtype), block.layout, block.offsets, block.shape))
        if any_cuda:  # the non_blocking copies into pinned buffers must land before we return
            torch.cuda.synchronize()
        if not lazy_keys and copy:  # an in-place save keeps the buffers for the next copying one
            self._pool.retain_only(keys)
        root_state: dict[str, Any] = {}
        if self.rank == 0:
            root_state = {
                "optim": optim_tree, "param_groups": optim_sd.get("param_groups", []) if optim_sd else [],
                "algorithm": algo_tree, "extra": extra_tree,
            }
            del model_tree  # every model entry is an atom
        return _Staged(step, tensors, lazy_keys, pieces, rank_tree, root_state, meta)

    def _write_and_commit(self, staged: _Staged, handle: SaveHandle) -> None:
        t0 = time.perf_counter()
        tmp = tmp_dir_name(staged.step)
        report: dict[str, Any] = {"rank": self.rank, "ok": True}
        try:
            self._hook("before_stage")
            if staged.lazy:
                try:
                    on_device = any(t.is_cuda for k, t in staged.tensors if k in staged.lazy)
                    staged.tensors = [(k, self._pool.stage(k, t) if k in staged.lazy else t) for k, t in staged.tensors]
                    if on_device:
                        torch.cuda.synchronize()
                    self._pool.retain_only({k for k, _ in staged.tensors})
                finally:
                    handle._staged.set()
            report.update(self._write_local(tmp, staged))
            handle.bytes_written = report["bytes"]
            self._hook("after_data")
        except Exception as exc:  # noqa: BLE001 - judged at the commit point
            log.exception("rank %d: writing checkpoint step %d failed", self.rank, staged.step)
            report = {"rank": self.rank, "ok": False, "error": f"rank {self.rank}: {type(exc).__name__}: {exc}"}
        info, error = None, None
        try:
            reports = self._all_gather(report)
            outcome: list[Any] = [None]
            if self.rank == 0:
                outcome[0] = self._commit(tmp, staged, reports)
            self._hook("before_broadcast")
            if self._group is not None:
                dist.broadcast_object_list(outcome, src=0, group=self._group)
            status, payload = outcome[0]
            if status == "ok":
                info = self._info(payload)
            else:
                error = CheckpointSaveError(payload)
        except Exception as exc:  # noqa: BLE001 - a dead rank or a broken group: the save failed
            error = exc
        handle.write_s = time.perf_counter() - t0
        self.metrics.write.observe(handle.write_s)
        if error is None:
            self.metrics.saves.labels("committed").inc()
            self.metrics.bytes.inc(handle.bytes_written)
            self.metrics.last_step.set(staged.step)
            if self.rank == 0:
                self._event(Reason.COMMITTED, f"checkpoint step {staged.step} committed at {self.storage.path(step_dir_name(staged.step))}")
        else:
            self.metrics.saves.labels("failed").inc()
            self._event(Reason.FAILED, f"checkpoint step {staged.step} failed: {error}")
        handle._finish(info, error)

    def _write_local(self, tmp: str, staged: _Staged) -> dict[str, Any]:
        data_rel = data_file_name(self.rank)
        self.storage.makedirs(f"{tmp}/data")
        self.storage.makedirs(f"{tmp}/index")
        fh = self.storage.open_write(f"{tmp}/{data_rel}")
        try:
            blocks = write_safetensors(fh, staged.tensors, {"format": "loco-ucp", "step": str(staged.step), "rank": str(self.rank)})
        finally:
            self.storage.close_durable(fh)
        self.storage.sync_dir(f"{tmp}/data")  # the file's directory entry, not only its bytes
        fragments = []
        for (name, gshape, dtype, layout, offsets, shape), b in zip(staged.pieces, blocks):
            frag = Fragment(data_rel, b.key, offsets, shape, b.byte_offset, b.nbytes, b.crc32, self.rank)
            fragments.append({"atom": name, "globalShape": list(gshape), "dtype": dtype, "layout": layout, "fragment": frag.to_json()})
        size = self.storage.size(f"{tmp}/{data_rel}")
        self.storage.write_bytes(f"{tmp}/{index_file_name(self.rank)}", json.dumps({"rank": self.rank, "fragments": fragments}).encode())
        return {"fragments": fragments, "file": data_rel, "bytes": size, "rank_state": staged.rank_state}

    def _all_gather(self, report: dict[str, Any]) -> list[dict[str, Any]]:
        if self._group is None:
            return [report]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, report, group=self._group)
        return out

    def _commit(self, tmp: str, staged: _Staged, reports: list[dict[str, Any]]) -> tuple[str, Any]:
        """Rank 0: write the manifest and commit if every rank succeeded. Returns (status, dir or error)."""
        failed = [r["error"] for r in reports if not r.get("ok")]
        if failed:
            self.storage.remove(tmp)
            return "error", "; ".join(failed)
        try:
            records = [
                (f["atom"], tuple(f["globalShape"]), f["dtype"], f["layout"], Fragment.from_json(f["fragment"]))
                for r in reports for f in r["fragments"]
            ]
            atoms = atoms_from_fragments(records)
            manifest = Manifest(
                step=staged.step, layout=self.layout, atoms=atoms, algorithm=self.algorithm,
                param_groups=_json_safe(staged.root_state["param_groups"]), optim_state=staged.root_state["optim"],
                algorithm_state=staged.root_state["algorithm"], extra=staged.root_state["extra"],
                rank_states={r["rank"]: r["rank_state"] for r in reports},
                files={r["file"]: r["bytes"] for r in reports},
                time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
                meta=staged.meta,
            )
            # every rank's data and index are durable (each synced its own); the entries of data/ and
            # index/ in the directory must be too before the manifest says the checkpoint is whole
            self.storage.sync_dir(tmp)
            self.storage.write_bytes(f"{tmp}/{MANIFEST_FILE}", manifest.dumps())
            self._hook("before_commit")
            if self.epoch is not None:
                check_fence(self.storage, self.job_uid, self.epoch())
            final = step_dir_name(staged.step)
            self.storage.commit(tmp, final, hook=self._hook)
            self._hook("committed")
            self.storage.write_bytes(LATEST_FILE, (final + "\n").encode())
            self._hook("latest_written")
            # checkpoints newer than this one predate a fallback past them (they failed verification): they
            # are neither counted nor retired here, and a save of their step replaces them
            kept = [c for c in self.list() if c.step <= staged.step]
            for old in kept[:-self.keep]:
                self.storage.retire(old.dir, hook=self._hook)
            return "ok", final
        except StaleWriterError as exc:
            self.storage.remove(tmp)
            self.metrics.fenced.inc()
            self._event(Reason.FENCED, f"checkpoint step {staged.step} not committed: {exc}")
            return "error", f"commit on rank 0 refused (stale writer): {exc}"
        except Exception as exc:  # noqa: BLE001
            log.exception("commit of checkpoint step %d failed", staged.step)
            self.storage.remove(tmp)
            return "error", f"commit on rank 0: {type(exc).__name__}: {exc}"

    def _info(self, rel: str) -> CheckpointInfo:
        return read_info(self.storage, rel)

    # --------------------------------------------------------------------------------- load

    def load(
        self,
        info: CheckpointInfo,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        algorithm: str | None = None,
        strict: bool = True,
        verify: bool = True,
    ) -> LoadedState:
        """Load ``info`` into ``model`` (and ``optimizer``) in their current layout; every rank calls it.

        ``algorithm`` (default: the engine's) decides whether the saved algorithm state applies
        (:func:`map_algorithm_state`). ``strict``: a model key missing from the checkpoint is an
        error (else a note). Raises :class:`CheckpointLoadError` naming the key on a shape
        mismatch or a missing key, and CorruptCheckpointError on a checksum mismatch.
        """
        return load_into(self.storage, info, model, optimizer, rank=self.rank,
                         algorithm=self.algorithm if algorithm is None else algorithm,
                         strict=strict, verify=verify, on_event=self._event)

    def close(self) -> None:
        """Wait for the save in flight; the engine can still be used afterwards."""
        self.wait()
        self._remove_gate()


# ------------------------------------------------------------------------------ functions


def collect_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimizer state keyed by parameter FQN (DTensors stay sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=False, cpu_offload=False)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=options), {}
    return get_state_dict(model, optimizer, options=options)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return str(value)


def load_into(
    storage: Storage,
    info: CheckpointInfo,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    rank: int = 0,
    algorithm: str | None = None,
    strict: bool = True,
    verify: bool = True,
    on_event: Callable[[str, str], None] | None = None,
    replica: int = 0,
) -> LoadedState:
    """Reshard-on-load of ``info`` into ``model``/``optimizer`` (see :meth:`CheckpointEngine.load`).

    ``replica``: load saved replica ``replica``'s own model and inner optimizer state (saved with
    ``per_replica``; one of ``info.manifest.saved_replicas()``) instead of the shared copy
    (replica 0's). Raises :class:`CheckpointLoadError` when the checkpoint does not hold it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    t0 = time.perf_counter()
    m = info.manifest
    notes: list[str] = []
    if replica not in m.saved_replicas():
        raise CheckpointLoadError(
            f"{info.url}: holds no own state of replica {replica} (saved replicas: {m.saved_replicas()}); "
            "load replica 0's shared state (replica=0)"
        )
    # checksums run beside the reads; reader.finish() checks them all before the state reaches the optimizer
    reader = FragmentReader(storage, info.dir, m, verify=verify, overlap_checks=True)
    if optimizer is not None and not optimizer.state:
        _init_optimizer_state(optimizer)
    model_sd, optim_sd = collect_state(model, optimizer)

    for fqn, target in model_sd.items():
        atom = m.atoms.get(replica_atom(replica, f"model/{fqn}"))
        if atom is None:
            if strict:
                raise CheckpointLoadError(
                    f"model/{fqn}: not in checkpoint {info.url} (it has {len(m.model_atoms())} model tensors, e.g. "
                    f"{', '.join(sorted(m.model_atoms())[:3])}); pass strict=False to keep this tensor's current value"
                )
            notes.append(f"model/{fqn}: not in the checkpoint, kept its current value")
            continue
        try:
            fill_tensor(atom.name, target, atom, reader, notes.append)
        except FormatError:  # an unsafe file name: not a mismatch with the model
            raise
        except ValueError as exc:
            raise CheckpointLoadError(str(exc)) from exc
    extra_model = sorted(set(m.model_atoms()) - set(model_sd))
    if extra_model:
        notes.append(f"{len(extra_model)} checkpoint tensors have no place in the model and were ignored: {', '.join(extra_model[:5])}")

    if optimizer is not None:
        saved_state = tree.decode(m.optim_state, lambda name: _Lazy(replica_atom(replica, name))) if m.optim_state else {}
        for fqn, states in optim_sd.get("state", {}).items():
            saved = saved_state.get(fqn)
            if saved is None:
                notes.append(f"optim/{fqn}: no optimizer state in the checkpoint, starts fresh")
                continue
            for key, value in list(states.items()):
                stored = saved.get(key)
                if stored is None:
                    notes.append(f"optim/{fqn}/{key}: not in the checkpoint, starts fresh")
                elif isinstance(stored, _Lazy) and isinstance(value, torch.Tensor):
                    try:
                        fill_tensor(stored.name, value, m.atoms[stored.name], reader, notes.append)
                    except FormatError:
                        raise
                    except ValueError as exc:
                        raise CheckpointLoadError(str(exc)) from exc
                elif isinstance(stored, _Lazy):
                    states[key] = reader.read_full(stored.name)
                else:
                    states[key] = stored
        reader.finish()  # raises the first checksum mismatch
        _restore_param_groups(optim_sd, m.param_groups, notes)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=False, strict=False))
    else:
        reader.finish()  # raises the first checksum mismatch
        set_state_dict(model, (), model_state_dict=model_sd, optim_state_dict={},
                       options=StateDictOptions(full_state_dict=False, strict=False))

    algo_state = tree.decode(m.algorithm_state, reader.read_full)
    algo_state, reason = map_algorithm_state(m.algorithm, algorithm, algo_state)
    if reason:
        notes.append(reason)
        if on_event:
            on_event(Reason.STATE_RESET, reason)
    extra = tree.decode(m.extra, reader.read_full)
    if rank in m.rank_states:
        rank_state = tree.decode(m.rank_states[rank], reader.read_full)
    else:
        rank_state = None
        if not m.rank_states:  # a consolidated export or an import: no rank saved private state at all
            origin = f"imported from {m.meta['importedFrom']}" if m.meta.get("importedFrom") else "written without ranks"
            notes.append(f"the checkpoint holds no per-rank state ({origin}, {m.layout.describe()}): "
                         f"rank {rank}'s private state (RNG, data position) starts fresh")
        else:
            notes.append(f"rank {rank} did not exist at save ({m.layout.describe()}): its private state (RNG, data "
                         f"position) starts fresh")
    loaded = LoadedState(m.step, algo_state, extra, rank_state, notes, reader.bytes_read, time.perf_counter() - t0)
    if on_event:
        on_event(Reason.LOADED, f"loaded checkpoint step {m.step} saved at {m.layout.describe()} ({len(notes)} notes)")
    for n in notes:
        log.info("checkpoint load: %s", n)
    return loaded


def read_rank_state(storage: Storage, info: CheckpointInfo, rank: int, *, verify: bool = True) -> Any:
    """The private state saved by ``rank`` of ``info`` (any rank of the saved world, e.g. the
    replica a new rank maps to), or None when that rank did not exist at save."""
    m = info.manifest
    if rank not in m.rank_states:
        return None
    reader = FragmentReader(storage, info.dir, m, verify=verify)
    return tree.decode(m.rank_states[rank], reader.read_full)


@dataclass(frozen=True)
class _Lazy:
    """Placeholder for a stored optimizer tensor, resolved against the live template."""

    name: str


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors (so they have a layout to load into)."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    _init_optim_state(optimizer)


def _restore_param_groups(optim_sd: dict[str, Any], saved_groups: list[dict[str, Any]], notes: list[str]) -> None:
    """Copy saved hyperparameters into the current groups when both group the same parameters."""
    current = optim_sd.get("param_groups", [])
    if not saved_groups:
        return
    if [sorted(g["params"]) for g in current] != [sorted(g.get("params", [])) for g in saved_groups]:
        notes.append("optimizer parameter groups differ from the checkpoint's: kept the current hyperparameters")
        return
    for cur, saved in zip(current, saved_groups):
        for k, v in saved.items():
            if k == "params" or k not in cur:
                continue
            cur[k] = tuple(v) if isinstance(cur[k], tuple) and isinstance(v, list) else v


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor, the tensor itself otherwise."""
    return t.to_local() if is_dtensor(t) else t
