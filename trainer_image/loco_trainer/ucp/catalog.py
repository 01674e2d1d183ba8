"""The committed checkpoints under a root: which ``step-N`` directories hold a readable manifest.

Read by the engine (what to resume from), by verify (what to check) and by the CLI tools; it builds on the
format and the storage only, so none of them needs another to know what is there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .format import MANIFEST_FILE, FormatError, Manifest, WorldLayout, parse_step_dir
from .storage import Storage

log = logging.getLogger("loco.ucp")


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint: its step, directory (relative to the root) and manifest."""

    step: int
    dir: str
    url: str
    manifest: Manifest

    @property
    def layout(self) -> WorldLayout:
        return self.manifest.layout



def read_info(storage: Storage, rel: str) -> CheckpointInfo:
    """The committed checkpoint at ``rel`` (a ``step-N`` directory); raises FormatError if it is not one."""
    step = parse_step_dir(rel.rstrip("/").rsplit("/", 1)[-1])
    try:
        data = storage.read_bytes(f"{rel}/{MANIFEST_FILE}")
    except FileNotFoundError as exc:
        raise FormatError(f"{storage.path(rel)} has no {MANIFEST_FILE}: it is not a committed checkpoint") from exc
    manifest = Manifest.loads(data, where=storage.path(f"{rel}/{MANIFEST_FILE}"))
    if step is not None and step != manifest.step:
        raise FormatError(f"{storage.path(rel)}: directory says step {step}, manifest says {manifest.step}")
    return CheckpointInfo(manifest.step, rel, storage.path(rel), manifest)


def list_checkpoints(storage: Storage) -> list[CheckpointInfo]:
    """Committed checkpoints under ``storage``'s root, oldest first; unreadable ones are skipped."""
    found = []
    for name in storage.listdir(""):
        if parse_step_dir(name) is None:
            continue
        try:
            found.append(read_info(storage, name))
        except (FormatError, OSError) as exc:
            log.debug("skipping %s: %s", name, exc)
    return sorted(found, key=lambda c: c.step)
