"""Which job a checkpoint directory's checkpoints belong to, and what a new job of the same name does with them.

A TrainingJob writes under ``<path>/<namespace>/<name>``, so a job deleted and created again under the same
name finds its predecessor's checkpoints there. Resuming from them silently would be wrong (the new job may
train something else, and a finished predecessor would make it "succeed" at once without training), and
deleting them would lose data. The directory's fence (:mod:`.fence`) names the job that wrote last; when a
job with another uid starts, rank 0, before it raises the fence:

* by default sets the predecessor's checkpoints aside, into ``previous-job-<uid>/`` beside them (renames on
  the same filesystem: nothing is copied or lost), and the job starts from step 0;
* with ``checkpoint.adoptPreviousJob`` leaves them in place, and the job resumes from the newest one.

Either way the trainer reports what it did and the operator says so in a condition. Moving is idempotent:
a crash halfway leaves the fence naming the predecessor, so the next start moves the rest.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from .fence import read_fence
from .format import LATEST_FILE, parse_step_dir
from .storage import REPLACED_PREFIX, Storage

log = logging.getLogger(__name__)

PREVIOUS_PREFIX = "previous-job-"
#: a uid as Kubernetes makes them (and nothing that could name another directory)
_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}")


@dataclass(frozen=True)
class PreviousJob:
    """An earlier job's checkpoints found in this job's directory, and what was done with them."""

    uid: str
    steps: tuple[int, ...]
    adopted: bool
    #: the directory that holds them now, relative to the job's checkpoint directory ("" when adopted)
    kept_in: str


def _belongs_to_predecessor(name: str) -> bool:
    if name == LATEST_FILE or parse_step_dir(name) is not None:
        return True
    # a predecessor's commit interrupted between its two renames (Storage.commit): its copy, not ours
    return name.startswith(REPLACED_PREFIX) and parse_step_dir(name[len(REPLACED_PREFIX):]) is not None


def take_over(storage: Storage, job_uid: str, adopt: bool) -> PreviousJob | None:
    """Rank 0, before raising the fence for ``job_uid``: deal with an earlier job's checkpoints (module doc).
    None when the directory is this job's own, new, or holds no checkpoint of another job."""
    fence = read_fence(storage)
    if fence is None or not fence.job_uid or not job_uid or fence.job_uid == job_uid:
        return None
    theirs = sorted(name for name in storage.listdir("") if _belongs_to_predecessor(name))
    steps = tuple(sorted(s for s in (parse_step_dir(n) for n in theirs) if s is not None))
    if not steps:
        return None
    if adopt:
        log.warning("checkpoint directory %s holds the checkpoints of an earlier job (uid %s, steps %s): "
                    "adopted (checkpoint.adoptPreviousJob), resuming from them", storage.path(), fence.job_uid, list(steps))
        return PreviousJob(fence.job_uid, steps, adopted=True, kept_in="")
    if not _UID.fullmatch(fence.job_uid):
        raise ValueError(f"the checkpoint directory's fence names a job uid that is not one: {fence.job_uid!r}")
    kept_in = PREVIOUS_PREFIX + fence.job_uid
    storage.makedirs(kept_in)
    for name in theirs:
        storage.rename(name, f"{kept_in}/{name}")
    storage.sync_dir(kept_in)
    storage.sync_dir("")
    log.warning("checkpoint directory %s held the checkpoints of an earlier job (uid %s, steps %s): kept in %s; "
                "this job starts from step 0 (set checkpoint.adoptPreviousJob to resume from them)",
                storage.path(), fence.job_uid, list(steps), storage.path(kept_in))
    return PreviousJob(fence.job_uid, steps, adopted=False, kept_in=kept_in)
