"""The simple checkpoint format: one ``torch.save`` file per rank, committed atomically.

Layout under ``<checkpoint.path>/<namespace>/<job>/``::

    step-00000040/          a committed checkpoint (exists only when complete)
        rank-00000.pt       everything rank 0 needs to resume (see train.py's rank_state)
        rank-00001.pt
        meta.json           step, world size, algorithm, time, files, config hash
    latest                  "step-00000040" (a hint for humans and tools; rewritten tmp + rename)
    .tmp-step-00000080/     a save in progress or abandoned by a crash (ignored, cleaned at start)

Call sequence of :func:`save` (every rank calls it with the same step): each rank writes its file
into ``.tmp-step-N/`` (tmp name, fsync, rename); barrier; rank 0 checks every file is there,
writes ``meta.json``, renames the directory to ``step-N`` (the commit), rewrites ``latest`` and
deletes all but the newest ``keep``; barrier. A crash at any point leaves either the previous
checkpoints or the new one committed, never a half one. :class:`AsyncSaver` splits the same
sequence in two (background write, then the collective commit one inner step later) for
``checkpoint.asyncSave``.

The universal sharded checkpoint (a later issue) replaces this module behind the same three
calls: :func:`save`, :func:`latest`, :func:`load`.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

FORMAT = "loco-simple-v1"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used (the message says which file and why)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint: its step, directory and ``meta.json`` contents."""

    step: int
    path: str
    meta: dict[str, Any]

    @property
    def world_size(self) -> int:
        return int(self.meta["worldSize"])


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def list_checkpoints(directory: str) -> list[CheckpointInfo]:
    """Committed checkpoints under ``directory``, oldest first (directories without a readable
    ``meta.json`` are skipped)."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _STEP_DIR.match(name)
        if not m:
            continue
        path = os.path.join(directory, name)
        try:
            with open(os.path.join(path, "meta.json"), encoding="utf-8") as fh:
                meta = json.load(fh)
        except (OSError, ValueError):
            continue
        found.append(CheckpointInfo(step=int(m.group(1)), path=path, meta=meta))
    return sorted(found, key=lambda c: c.step)


def latest(directory: str) -> CheckpointInfo | None:
    """The newest committed checkpoint under ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def info(path: str) -> CheckpointInfo:
    """The committed checkpoint at ``path`` (a ``step-N`` directory)."""
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    meta_path = os.path.join(path, "meta.json")
    if not m or not os.path.isfile(meta_path):
        raise CheckpointError(f"{path} is not a committed checkpoint (expected a step-NNNNNNNN directory with meta.json)")
    with open(meta_path, encoding="utf-8") as fh:
        return CheckpointInfo(step=int(m.group(1)), path=path, meta=json.load(fh))


def clean_incomplete(directory: str) -> list[str]:
    """Delete abandoned ``.tmp-*`` entries under ``directory``; returns what was deleted.
    Call on one rank only, before any rank starts saving."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        if name.startswith(".tmp-"):
            path = os.path.join(directory, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
    return removed


def write_rank_file(directory: str, step: int, state: dict[str, Any], rank: int) -> str:
    """Phase 1 (every rank, no communication): write this rank's file into ``.tmp-step-N/``."""
    tmp_dir = os.path.join(directory, ".tmp-" + step_dir_name(step))
    os.makedirs(tmp_dir, exist_ok=True)
    target = os.path.join(tmp_dir, rank_file_name(rank))
    partial = target + ".partial"
    with open(partial, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, target)
    return target


def commit(
    directory: str,
    step: int,
    *,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    meta: dict[str, Any] | None = None,
    keep: int = 3,
) -> CheckpointInfo:
    """Phase 2 (collective, after every rank's :func:`write_rank_file` returned): barrier; rank 0
    checks the files, writes ``meta.json``, renames the directory (the commit), rewrites
    ``latest``, prunes to ``keep``; barrier. Returns the committed checkpoint on every rank."""
    final = os.path.join(directory, step_dir_name(step))
    tmp_dir = os.path.join(directory, ".tmp-" + step_dir_name(step))
    barrier()  # every rank's file is in place
    files = [rank_file_name(r) for r in range(world_size)]
    if rank == 0:
        missing = [f for f in files if not os.path.isfile(os.path.join(tmp_dir, f))]
        if missing:
            raise CheckpointError(f"checkpoint step {step}: {', '.join(missing)} missing in {tmp_dir} after the barrier")
        document = {
            "format": FORMAT,
            "step": step,
            "worldSize": world_size,
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "files": files,
            **(meta or {}),
        }
        _write_atomic(os.path.join(tmp_dir, "meta.json"), json.dumps(document, indent=2).encode())
        _fsync_dir(tmp_dir)
        if os.path.exists(final):  # left by an attempt that crashed after its commit: same step, replace it
            shutil.rmtree(final)
        os.replace(tmp_dir, final)  # the commit
        _write_atomic(os.path.join(directory, "latest"), (step_dir_name(step) + "\n").encode())
        _fsync_dir(directory)
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    barrier()  # the commit is visible to every rank
    return info(final)


def save(
    directory: str,
    step: int,
    state: dict[str, Any],
    *,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    meta: dict[str, Any] | None = None,
    keep: int = 3,
) -> CheckpointInfo:
    """Save this rank's ``state`` as part of checkpoint ``step`` (collective: every rank calls it
    with the same step): :func:`write_rank_file` then :func:`commit`.

    Returns the committed checkpoint on every rank. Raises :class:`CheckpointError` when a rank
    file is missing at commit time.
    """
    write_rank_file(directory, step, state, rank)
    return commit(directory, step, rank=rank, world_size=world_size, barrier=barrier, meta=meta, keep=keep)


def snapshot(state: Any) -> Any:
    """A deep copy of ``state`` with every tensor cloned to CPU memory: training may go on
    mutating the originals while the copy is written."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: snapshot(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        items = [snapshot(v) for v in state]
        return type(state)(items) if not hasattr(state, "_fields") else type(state)(*items)
    return copy.deepcopy(state)


class AsyncSaver:
    """Background checkpoint writes: :meth:`start` snapshots the state to CPU (the only stall)
    and writes the rank file on a thread; :meth:`finish` (collective, called by every rank at
    the same point of the loop -- the trainer calls it after the next inner step, before the
    next save and at the end) waits for the write and commits. A crash between the two leaves
    only an ignored ``.tmp-*`` directory: the previous checkpoint stays the newest."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending: tuple[str, int, dict[str, Any]] | None = None

    @property
    def pending_step(self) -> int | None:
        return self._pending[1] if self._pending else None

    def start(self, directory: str, step: int, state: dict[str, Any], rank: int, commit_kwargs: dict[str, Any]) -> None:
        if self._pending is not None:
            raise CheckpointError(f"checkpoint step {self._pending[1]} is still pending: call finish() first")
        staged = snapshot(state)
        self._error = None

        def write() -> None:
            try:
                write_rank_file(directory, step, staged, rank)
            except BaseException as exc:  # noqa: BLE001 - re-raised by finish()
                self._error = exc

        self._thread = threading.Thread(target=write, name=f"loco-ckpt-{step}", daemon=True)
        self._thread.start()
        self._pending = (directory, step, commit_kwargs)

    def finish(self) -> CheckpointInfo | None:
        """Wait for the pending write and commit it (collective); None when nothing is pending."""
        if self._pending is None:
            return None
        directory, step, kwargs = self._pending
        self._pending = None
        assert self._thread is not None
        self._thread.join()
        if self._error is not None:
            raise CheckpointError(f"writing checkpoint step {step} failed: {self._error}") from self._error
        return commit(directory, step, **kwargs)


def load(path: str, rank: int) -> dict[str, Any]:
    """This rank's state from the committed checkpoint at ``path``."""
    file = os.path.join(path, rank_file_name(rank))
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint {path} has no {rank_file_name(rank)} (was it saved with fewer ranks?)")
    # weights_only=False: the file holds RNG states (numpy arrays, Python tuples) we wrote ourselves.
    return torch.load(file, map_location="cpu", weights_only=False)
