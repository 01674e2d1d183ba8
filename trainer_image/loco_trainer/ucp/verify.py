"""Is a committed checkpoint whole? Verification on load, and the choice of the checkpoint to resume from.

A checkpoint is valid when its manifest parses (with every file name inside the checkpoint, see
:func:`~loco_trainer.ucp.format.check_file_names`), every data file it names exists, is no symlink
leading out, has the size the manifest records (manifests without ``files`` are checked against
their fragments' byte ranges), the fragments tile every atom, every data file's safetensors header
parses and names each fragment the manifest puts in it with the same dtype, shape and byte range (Loco
reads by the manifest's offsets, but every other safetensors reader trusts the header), and, with
``checksums``, every fragment's bytes match its crc32.

:func:`newest_valid` walks the ``step-N`` directories from the newest down and returns the first
valid one together with the ones it skipped and why (the trainer logs them, counts them in
``loco_trainer_checkpoint_skipped_total{reason}`` and reports them to the operator).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from .catalog import CheckpointInfo, read_info
from .format import DTYPES, FormatError, UnsafePathError, parse_step_dir
from .storage import Storage
from .tensorio import crc32

#: bytes read at once while checksumming (a fragment can be gigabytes)
_CHUNK = 8 << 20


class SkipReason:
    """Why a checkpoint was skipped (the ``reason`` label of the metric; constants, not free text)."""

    MANIFEST = "manifest"            # no manifest, not parseable, or its atoms do not tile
    UNSAFE_PATH = "unsafe_path"      # a file name or symlink leading out of the checkpoint
    MISSING_FILE = "missing_file"    # a data file the manifest names is not there
    SIZE = "size"                    # a data file is shorter/longer than the manifest says
    CHECKSUM = "checksum"            # a fragment's bytes do not match its crc32
    HEADER = "header"                # a data file's safetensors header does not parse or disagrees with the manifest

    ALL = (MANIFEST, UNSAFE_PATH, MISSING_FILE, SIZE, CHECKSUM, HEADER)


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_checkpoint` for one checkpoint; ``problems[i]`` has ``reasons[i]``."""

    dir: str
    step: int
    problems: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    fragments: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, reason: str, message: str) -> None:
        self.reasons.append(reason)
        self.problems.append(message)


@dataclass(frozen=True)
class SkippedCheckpoint:
    """A ``step-N`` directory :func:`newest_valid` passed over."""

    dir: str
    #: the step its directory name says
    step: int
    #: one of :class:`SkipReason`
    reason: str
    message: str


@dataclass(frozen=True)
class Selection:
    """The newest valid checkpoint (None when there is none) and the newer ones skipped, newest first."""

    info: CheckpointInfo | None
    skipped: list[SkippedCheckpoint]


def verify_checkpoint(storage: Storage, info: CheckpointInfo, checksums: bool = True) -> VerifyReport:
    """Check one checkpoint (see the module docstring); problems name the file, atom and fragment."""
    m = info.manifest
    report = VerifyReport(info.dir, info.step)
    by_file: dict[str, list] = {}
    for atom in m.atoms.values():
        for frag in atom.fragments:
            by_file.setdefault(frag.file, []).append((atom, frag))
    usable: dict[str, int] = {}  # file -> its size, for files that exist inside the checkpoint
    for rel in sorted(set(m.files) | set(by_file)):
        path = f"{info.dir}/{rel}"
        if not storage.resolves_inside(path, info.dir):
            report.add(SkipReason.UNSAFE_PATH, f"{storage.path(path)}: a symlink that resolves outside the checkpoint directory")
            continue
        if not storage.exists(path):
            report.add(SkipReason.MISSING_FILE, f"{storage.path(path)}: missing data file")
            continue
        size = storage.size(path)
        if rel in m.files and size != m.files[rel]:
            report.add(SkipReason.SIZE, f"{storage.path(path)}: {size} bytes, manifest says {m.files[rel]}")
            continue
        end = max((f.byte_offset + f.nbytes for _, f in by_file.get(rel, [])), default=0)
        if end > size:
            report.add(SkipReason.SIZE, f"{storage.path(path)}: {size} bytes, its fragments end at byte {end}")
            continue
        usable[rel] = size
    for atom in m.atoms.values():
        try:
            atom.check_tiling()
        except FormatError as exc:
            report.add(SkipReason.MANIFEST, f"{storage.path(info.dir)}: {exc}")
    for rel, frags in sorted(by_file.items()):
        if rel in usable:
            _check_header(storage, f"{info.dir}/{rel}", usable[rel], frags, report)
    if checksums:
        for rel, frags in sorted(by_file.items()):
            if rel in usable:
                _check_crcs(storage, f"{info.dir}/{rel}", frags, report)
    return report


#: a safetensors header larger than this is refused unread (the format's own readers cap it at 100 MB)
MAX_HEADER_BYTES = 100_000_000


def _check_header(storage: Storage, path: str, size: int, frags: list, report: VerifyReport) -> None:
    """The file's safetensors header parses and agrees with the manifest on every fragment in the file."""
    where = storage.path(path)
    head = storage.read_range(path, 0, 8) if size >= 8 else b""
    length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
        report.add(SkipReason.HEADER, f"{where}: the safetensors header length ({length}) does not fit the file ({size} bytes)")
        return
    try:
        header = json.loads(storage.read_range(path, 8, length))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        report.add(SkipReason.HEADER, f"{where}: the safetensors header does not parse: {exc}")
        return
    base = 8 + length
    for atom, frag in sorted(frags, key=lambda af: af[1].byte_offset):
        entry = header.get(frag.key)
        expected = {"dtype": DTYPES.get(atom.dtype), "shape": list(frag.shape),
                    "data_offsets": [frag.byte_offset - base, frag.byte_offset - base + frag.nbytes]}
        found = {k: entry.get(k) for k in expected} if isinstance(entry, dict) else entry
        if found != expected:
            report.add(SkipReason.HEADER, f"{where}: the safetensors header says {frag.key} of {atom.name} is "
                       f"{json.dumps(found)}, the manifest {json.dumps(expected)}")


def _check_crcs(storage: Storage, path: str, frags: list, report: VerifyReport) -> None:
    with storage.open_read(path) as fh:
        for atom, frag in sorted(frags, key=lambda af: af[1].byte_offset):
            fh.seek(frag.byte_offset)
            crc, got = 0, 0
            while got < frag.nbytes:
                chunk = fh.read(min(_CHUNK, frag.nbytes - got))
                if not chunk:
                    break
                crc = crc32(chunk, crc)
                got += len(chunk)
            report.fragments += 1
            report.bytes_checked += got
            if got != frag.nbytes or crc != frag.crc32:
                report.add(SkipReason.CHECKSUM,
                           f"{storage.path(path)}: fragment {frag.key} of {atom.name} is corrupt "
                           f"(crc32 {crc:#010x}, manifest {frag.crc32:#010x}, {got}/{frag.nbytes} bytes)")


def check_one(storage: Storage, name: str, checksums: bool = True) -> tuple[CheckpointInfo | None, SkippedCheckpoint | None]:
    """``(info, None)`` when ``step-N`` directory ``name`` is valid, else ``(None, why it is skipped)``."""
    step = parse_step_dir(name)
    assert step is not None, name

    def skip(reason: str, message: str) -> tuple[None, SkippedCheckpoint]:
        return None, SkippedCheckpoint(name, step, reason, message)

    try:
        info = read_info(storage, name)
    except UnsafePathError as exc:
        return skip(SkipReason.UNSAFE_PATH, str(exc))
    except (FormatError, OSError) as exc:
        return skip(SkipReason.MANIFEST, f"{storage.path(name)}: {exc}" if name not in str(exc) else str(exc))
    report = verify_checkpoint(storage, info, checksums)
    if report.ok:
        return info, None
    more = f" (and {len(report.problems) - 3} more problems)" if len(report.problems) > 3 else ""
    return skip(report.reasons[0], "; ".join(report.problems[:3]) + more)


def newest_valid(storage: Storage, checksums: bool = True) -> Selection:
    """The newest valid committed checkpoint under ``storage`` and the newer ones skipped (newest first).

    Reads every byte of the chosen checkpoint once when ``checksums`` (a corrupt newest checkpoint
    is then caught here, before any rank loads it, rather than half-way through a load).
    """
    names = sorted((n for n in storage.listdir("") if parse_step_dir(n) is not None), key=parse_step_dir, reverse=True)
    skipped: list[SkippedCheckpoint] = []
    for name in names:
        info, why = check_one(storage, name, checksums)
        if info is not None:
            return Selection(info, skipped)
        assert why is not None
        skipped.append(why)
    return Selection(None, skipped)
