"""The writer fence of a checkpoint directory: who may commit there now.

A worker on a partitioned node and its replacement can both be alive and write to the same shared
directory. Every start of the job's workers (a restart, a resize, a new job of the same name) is a
new membership epoch, so the fence records the newest writer: the job's uid and its epoch, in
``<root>/fence``. Rank 0 raises it when its epoch begins and checks it again right before each
commit: a writer whose job was replaced (another uid took the directory) or whose epoch is older
is refused (:class:`StaleWriterError`), so it can never replace the newer writers' checkpoints.

The check and the commit's rename are two steps on a shared filesystem, not one transaction: a stale
writer must reach its rename within the instant between them, after the new epoch began, to slip
through. The operator starts a new epoch only after the old one's pods are gone or their node is
lost (``--node-lost-grace-seconds``), which leaves a stale writer that instant long before then.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from .storage import Storage

FENCE_FILE = "fence"


class StaleWriterError(RuntimeError):
    """This writer's epoch is over: a newer one (or another job) writes to the directory now."""


@dataclass(frozen=True)
class Fence:
    """The newest writer of a checkpoint directory."""

    job_uid: str
    epoch: int

    def refuses(self, job_uid: str, epoch: int) -> str | None:
        """Why a writer of ``(job_uid, epoch)`` may not commit under this fence, or None when it may."""
        if job_uid != self.job_uid:
            return (f"another job (uid {self.job_uid or '<none>'}, epoch {self.epoch}) writes to this checkpoint "
                    f"directory now; this writer is of job uid {job_uid or '<none>'}")
        if epoch < self.epoch:
            return f"membership epoch {self.epoch} writes to this checkpoint directory now; this writer is of epoch {epoch}"
        return None


def read_fence(storage: Storage) -> Fence | None:
    """The directory's fence, None when there is none yet (or it cannot be read: the next raise rewrites it)."""
    try:
        doc = json.loads(storage.read_bytes(FENCE_FILE))
        return Fence(str(doc["jobUid"]), int(doc["epoch"]))
    except (OSError, FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def raise_fence(storage: Storage, job_uid: str, epoch: int, writer: str = "") -> Fence:
    """Make ``(job_uid, epoch)`` the newest writer: a new job takes the directory over, an epoch of the same
    job only moves it forward. Raises :class:`StaleWriterError` when a newer epoch of this job holds it."""
    current = read_fence(storage)
    if current is not None and current.job_uid == job_uid:
        why = current.refuses(job_uid, epoch)
        if why is not None:
            raise StaleWriterError(why)
        if current.epoch == epoch:
            return current
    fence = Fence(job_uid, epoch)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    storage.write_bytes(FENCE_FILE, json.dumps({"jobUid": job_uid, "epoch": epoch, "writer": writer,
                                                "time": stamp}).encode())
    return fence


def check_fence(storage: Storage, job_uid: str, epoch: int) -> None:
    """Right before a commit: :class:`StaleWriterError` unless ``(job_uid, epoch)`` still holds the directory."""
    current = read_fence(storage)
    why = current.refuses(job_uid, epoch) if current is not None else None
    if why is not None:
        raise StaleWriterError(why)
