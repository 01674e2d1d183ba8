"""Storage for universal checkpoints: one small interface over fsspec.

The format never touches a filesystem directly; the engine, the CLI and the tools go through
:class:`Storage`, so a local path, a mounted PVC (``/checkpoints``, ``file:///...``) and, later, an
object store (``s3://...`` with its fsspec driver installed) all work without format changes.

Call order of one save (ranks named; every path is relative to the storage root)::

    rank 0:      recover_replaced(), then remove the ``.tmp-*`` directories   # at engine start
    every rank:  makedirs(".tmp-step-N/data"), open_write(".tmp-step-N/data/rank-R.safetensors")
                 -> write, then close (fsync on local filesystems), sync_dir(".tmp-step-N/data")
                 write_bytes(".tmp-step-N/index/rank-R.json")  # fsyncs the file and index/
    rank 0:      (after every rank reported success)
                 write_bytes(".tmp-step-N/manifest.json")  # tmp name + rename, fsyncs .tmp-step-N
                 commit(".tmp-step-N", "step-N")           # rename: the commit point
                 write_bytes("latest")                     # tmp name + rename
                 retire("step-M") for retention            # rename to .tmp-retired-*, then delete

Every byte a manifest names is durable before the manifest is, and the manifest is durable before
the directory is renamed, so a crash (``kill -9``, power loss) at any point leaves each ``step-N``
either absent or complete. Replacing an existing ``step-N`` (the same step saved again) moves the
old copy aside to ``.replaced-step-N`` first and deletes it only after the new one is in place;
:meth:`Storage.recover_replaced` puts it back when a crash came between the two renames.

Call order of one load: ``read_bytes("step-N/manifest.json")``, then ``read_range`` per fragment.

On object stores a directory rename is not atomic; there the manifest itself is the commit marker
(a ``step-N`` directory without a readable manifest is never considered committed), which keeps
the rule "a checkpoint exists only when its manifest does" true on every backend.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import IO, Callable, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

#: prefix of a committed directory moved aside while a new copy of the same step replaces it
REPLACED_PREFIX = ".replaced-"
#: prefix a retired (to be deleted) checkpoint is renamed to first; starts with ``.tmp-`` so a
#: deletion a crash interrupted is finished by the next engine start
RETIRED_PREFIX = ".tmp-retired-"


class Storage:
    """A checkpoint root (``url``) on some fsspec filesystem.

    ``url`` is a local path or any fsspec URL; ``fs`` overrides the filesystem (tests pass an
    in-memory one). Paths given to the methods are relative to the root, ``/``-separated.
    """

    def __init__(self, url: str, fs: fsspec.AbstractFileSystem | None = None) -> None:
        if fs is None:
            fs, root = fsspec.core.url_to_fs(url)
        else:
            root = url
        self.fs = fs
        self.url = url
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(fs, LocalFileSystem)

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (what ``fs`` methods take)."""
        return posixpath.join(self.root, rel) if rel else self.root

    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``; empty when it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def open_write(self, rel: str) -> IO[bytes]:
        """A binary file for writing. Close it with :meth:`close_durable` so local data is fsynced."""
        return self.fs.open(self.path(rel), "wb")

    def close_durable(self, fh: IO[bytes]) -> None:
        """Flush, fsync (local filesystems) and close ``fh``."""
        fh.flush()
        if self.is_local:
            try:
                os.fsync(fh.fileno())
            except (OSError, AttributeError, ValueError):
                pass
        fh.close()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` under a temporary name, make it durable, then rename it to ``rel``: readers
        see the old content or the new, never a torn file."""
        tmp = f"{rel}.{uuid.uuid4().hex[:8]}.partial"
        fh = self.open_write(tmp)
        try:
            fh.write(data)
        finally:
            self.close_durable(fh)
        self.fs.mv(self.path(tmp), self.path(rel))
        self.sync_dir(posixpath.dirname(rel))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as fh:
            return fh.read()

    def read_range(self, rel: str, start: int, length: int) -> bytes:
        """``length`` bytes of ``rel`` from byte ``start``; raises OSError when the file is short."""
        with self.fs.open(self.path(rel), "rb") as fh:
            fh.seek(start)
            data = fh.read(length)
        if len(data) != length:
            raise OSError(f"{self.path(rel)}: wanted {length} bytes at offset {start}, the file ends after {len(data)}")
        return data

    def read_range_into(self, rel: str, start: int, buf: memoryview) -> None:
        """Fill ``buf`` with ``len(buf)`` bytes of ``rel`` from byte ``start`` (no intermediate copy
        where the file object supports ``readinto``); raises OSError when the file is short."""
        with self.fs.open(self.path(rel), "rb") as fh:
            fh.seek(start)
            got = 0
            readinto = getattr(fh, "readinto", None)
            while got < len(buf):
                if readinto is not None:
                    n = readinto(buf[got:])
                else:
                    chunk = fh.read(len(buf) - got)
                    n = len(chunk)
                    buf[got:got + n] = chunk
                if not n:
                    break
                got += n
        if got != len(buf):
            raise OSError(f"{self.path(rel)}: wanted {len(buf)} bytes at offset {start}, the file ends after {got}")

    def range_reader(self, rel: str) -> "RangeReader":
        """``rel`` kept open for reading many byte ranges (close it when done)."""
        return RangeReader(self, rel)

    def open_read(self, rel: str) -> IO[bytes]:
        return self.fs.open(self.path(rel), "rb")

    def commit(self, src: str, dst: str, hook: Callable[[str], None] | None = None) -> None:
        """Rename directory ``src`` to ``dst``: the commit point (atomic on POSIX filesystems).

        A ``dst`` that exists already is renamed to ``.replaced-<dst>`` first and deleted only
        after ``src`` is in its place, so a crash in between never loses both copies (see
        :meth:`recover_replaced`). ``hook`` (tests only) is called with ``"moved_aside"``,
        ``"renamed"`` and ``"root_synced"`` as each step is done.
        """
        def step(name: str) -> None:
            if hook is not None:
                hook(name)

        aside = REPLACED_PREFIX + dst
        moved = self.exists(dst)
        if moved:
            self.remove(aside)  # a leftover of an earlier crash: dst is the newer copy
            self._rename(dst, aside)
            step("moved_aside")
        try:
            self._rename(src, dst)
        except BaseException:
            if moved:  # the new copy did not make it: the old one is still the checkpoint
                self._rename(aside, dst)
            raise
        step("renamed")
        self.sync_dir("")
        step("root_synced")
        self.remove(aside)

    def rename(self, src: str, dst: str) -> None:
        """Move ``src`` to ``dst`` inside this root; never onto something that exists (FileExistsError)."""
        if self.exists(dst):
            raise FileExistsError(f"{self.path(dst)} exists: {self.path(src)} is not moved onto it")
        self._rename(src, dst)

    def _rename(self, src: str, dst: str) -> None:
        if self.is_local:
            os.replace(self.path(src), self.path(dst))
        else:
            self.fs.mv(self.path(src), self.path(dst), recursive=True)

    def recover_replaced(self) -> list[str]:
        """Finish or undo a replacement a crash interrupted; returns the ``step-N`` names restored.

        ``.replaced-step-N`` without ``step-N`` (the crash came between the two renames of
        :meth:`commit`): renamed back. With ``step-N`` present the new copy is committed and the old
        one is deleted. Call it only when no save of this root is running.
        """
        restored = []
        for name in self.listdir(""):
            if not name.startswith(REPLACED_PREFIX):
                continue
            dst = name[len(REPLACED_PREFIX):]
            if self.exists(posixpath.join(dst, "manifest.json")):
                self.remove(name)
            else:
                self.remove(dst)  # an incomplete directory cannot be there, but never rename onto one
                self._rename(name, dst)
                restored.append(dst)
        if restored:
            self.sync_dir("")
        return restored

    def retire(self, rel: str, hook: Callable[[str], None] | None = None) -> None:
        """Delete the committed directory ``rel``: renamed to ``.tmp-retired-<rel>`` first, so a crash
        during the (non-atomic) deletion never leaves a ``step-N`` with part of its files.
        ``hook`` (tests only) is called with ``"retired"`` between the rename and the deletion."""
        tmp = RETIRED_PREFIX + rel
        self.remove(tmp)
        self._rename(rel, tmp)
        self.sync_dir("")
        if hook is not None:
            hook("retired")
        self.remove(tmp)

    def resolves_inside(self, rel: str, base: str) -> bool:
        """False when ``rel`` is a symlink (or under one) whose target lies outside directory ``base``.
        Only local filesystems have symlinks here; elsewhere it is always True."""
        if not self.is_local:
            return True
        real_base = os.path.realpath(self.path(base))
        real = os.path.realpath(self.path(rel))
        return real == real_base or real.startswith(real_base.rstrip(os.sep) + os.sep)

    def remove(self, rel: str) -> None:
        """Delete ``rel`` (file or directory tree); missing is fine."""
        try:
            self.fs.rm(self.path(rel), recursive=True)
        except FileNotFoundError:
            pass

    def sync_dir(self, rel: str) -> None:
        """fsync a local directory so renames inside it survive a power loss (no-op elsewhere)."""
        if not self.is_local:
            return
        try:
            fd = os.open(self.path(rel), os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def walk_files(self, rel: str) -> Iterator[str]:
        """Relative paths of the files under ``rel``."""
        base = self.path(rel)
        for f in self.fs.find(base):
            yield posixpath.relpath(f, self.root)


class RangeReader:
    """Byte ranges of one file read straight into buffers, the file kept open between them: a load reads one
    fragment after another in file order, and the kernel's read-ahead, which an open per fragment would start
    again from a small window each time, carries over. Local files are read with ``os.preadv`` (no Python-level
    buffer, the GIL released); other filesystems through their file object's ``readinto``."""

    def __init__(self, storage: Storage, rel: str) -> None:
        self.name = storage.path(rel)
        self._fd: int | None = None
        self._fh: IO[bytes] | None = None
        if storage.is_local:
            self._fd = os.open(self.name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger read-ahead window
            except (AttributeError, OSError):
                pass
        else:
            self._fh = storage.fs.open(self.name, "rb")

    def read_into(self, start: int, buf: memoryview) -> None:
        """Fill ``buf`` from byte ``start``; OSError when the file is short."""
        got = 0
        while got < len(buf):
            if self._fd is not None:
                n = os.preadv(self._fd, [buf[got:]], start + got)
            else:
                assert self._fh is not None
                self._fh.seek(start + got)
                n = self._fh.readinto(buf[got:])  # type: ignore[attr-defined]
            if not n:
                break
            got += n
        if got != len(buf):
            raise OSError(f"{self.name}: wanted {len(buf)} bytes at offset {start}, the file ends after {got}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __del__(self) -> None:
        self.close()
