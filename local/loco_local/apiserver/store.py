"""Object storage with one global resourceVersion counter and a bounded watch history.

The store knows nothing about API semantics (generation, finalizers, validation live in
:mod:`.operations`); it keeps JSON objects per collection, stamps each write with the next
resourceVersion, records the change in a bounded history and fans it out to watchers.

All methods are synchronous and never await, so in the single-threaded asyncio server every
write, and every "replay history then subscribe", is atomic.

With a ``path`` the objects and the resourceVersion counter also live in a SQLite file (stdlib
``sqlite3``, write-ahead log), written through before each write returns, so a server killed with
``kill -9`` and started again on the same file serves every object it had acknowledged, and its
resourceVersions keep growing from where they were. The watch history is not kept: a watch from a
version before the restart gets 410 Gone and relists, as after an etcd compaction.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import sqlite3
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import gone

Key = tuple[str, str]  # (group, plural): one stored collection


@dataclass(frozen=True)
class Change:
    """One write: ``type`` is ADDED, MODIFIED or DELETED; ``old`` is the object before it (None on ADDED)."""

    resource_version: int
    key: Key
    type: str
    object: dict[str, Any]
    old: dict[str, Any] | None


class Watcher:
    """A subscription to the changes of one collection; :meth:`get` yields them in order.

    A ``None`` from the queue means the store closed the watch (server stopping).
    """

    def __init__(self, key: Key):
        self.key = key
        self.queue: asyncio.Queue[Change | None] = asyncio.Queue()

    async def get(self, timeout_s: float | None) -> Change | None:
        """The next change; raises ``TimeoutError`` after ``timeout_s``; ``None`` when closed."""
        return await asyncio.wait_for(self.queue.get(), timeout_s)


class Persistence:
    """The SQLite file behind a :class:`Store`: one row per object, one for the resourceVersion counter."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if not path.exists():  # owner-only from the start: it holds every Secret (and -wal/-shm inherit it)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # WAL without fsync per commit: every acknowledged write survives the process being killed;
        # only a power loss may take the last few (a development cluster's trade, as etcd's --unsafe-no-fsync)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS objects (grp TEXT, plural TEXT, namespace TEXT, name TEXT, "
                         "body TEXT NOT NULL, PRIMARY KEY (grp, plural, namespace, name))")
        self._db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")

    def load(self) -> tuple[int, dict[Key, dict[tuple[str, str], dict[str, Any]]]]:
        """(the resourceVersion counter, every collection) as last written."""
        row = self._db.execute("SELECT value FROM counters WHERE name = 'resourceVersion'").fetchone()
        collections: dict[Key, dict[tuple[str, str], dict[str, Any]]] = {}
        for group, plural, namespace, name, body in self._db.execute(
                "SELECT grp, plural, namespace, name, body FROM objects"):
            collections.setdefault((group, plural), {})[(namespace, name)] = json.loads(body)
        return (row[0] if row else 0), collections

    def write(self, version: int, key: Key, namespace: str, name: str, obj: dict[str, Any] | None) -> None:
        """Store ``obj`` (or delete it, when None) and the counter, in one transaction."""
        with self._db:
            self._db.execute("BEGIN")
            if obj is None:
                self._db.execute("DELETE FROM objects WHERE grp = ? AND plural = ? AND namespace = ? AND name = ?",
                                 (*key, namespace, name))
            else:
                self._db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?)",
                                 (*key, namespace, name, json.dumps(obj, separators=(",", ":"))))
            self._db.execute("INSERT OR REPLACE INTO counters VALUES ('resourceVersion', ?)", (version,))

    def close(self) -> None:
        self._db.close()


class Store:
    """Collections of objects keyed by ``(namespace, name)``; namespace is ``""`` for cluster-scoped kinds.

    ``path``: the SQLite file that keeps them across restarts (None: memory only)."""

    def __init__(self, history_size: int = 10_000, path: Path | None = None):
        self._collections: dict[Key, dict[tuple[str, str], dict[str, Any]]] = {}
        self._resource_version = 0
        self._history: deque[Change] = deque(maxlen=history_size)
        self._watchers: set[Watcher] = set()
        self._closed = False
        self._persistence = Persistence(path) if path is not None else None
        if self._persistence is not None:
            self._resource_version, self._collections = self._persistence.load()

    # ---- reads ------------------------------------------------------------------------------
    @property
    def resource_version(self) -> int:
        """The resourceVersion of the latest write (a list's ``metadata.resourceVersion``)."""
        return self._resource_version

    def get(self, key: Key, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self._collections.get(key, {}).get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, key: Key, namespace: str | None = None) -> list[dict[str, Any]]:
        """Objects of a collection (one namespace, or all when ``namespace`` is None), sorted by namespace/name."""
        items = self._collections.get(key, {})
        return [copy.deepcopy(obj) for (ns, _), obj in sorted(items.items()) if namespace is None or ns == namespace]

    def scan(self) -> list[tuple[Key, dict[str, Any]]]:
        """Every stored object, NOT copied: for read-only scans (garbage collection); never mutate them."""
        return [(key, obj) for key, items in self._collections.items() for obj in items.values()]

    def keys(self) -> list[Key]:
        return list(self._collections)

    def find_by_uid(self, uid: str) -> tuple[Key, dict[str, Any]] | None:
        for key, items in self._collections.items():
            for obj in items.values():
                if obj["metadata"].get("uid") == uid:
                    return key, copy.deepcopy(obj)
        return None

    def uids(self) -> set[str]:
        return {obj["metadata"]["uid"] for items in self._collections.values() for obj in items.values()}

    # ---- writes -----------------------------------------------------------------------------
    def put(self, key: Key, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace ``obj``; stamps ``metadata.resourceVersion`` and returns a copy of what is stored."""
        meta = obj["metadata"]
        ident = (meta.get("namespace", ""), meta["name"])
        collection = self._collections.setdefault(key, {})
        old = collection.get(ident)
        self._resource_version += 1
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = str(self._resource_version)
        if self._persistence is not None:  # written through first: a write answered is a write kept
            self._persistence.write(self._resource_version, key, *ident, stored)
        collection[ident] = stored
        self._emit(Change(self._resource_version, key, "MODIFIED" if old else "ADDED", stored, old))
        return copy.deepcopy(stored)

    def remove(self, key: Key, namespace: str, name: str) -> dict[str, Any] | None:
        """Delete an object; the DELETED event carries a fresh resourceVersion (as etcd's delete revision)."""
        old = self._collections.get(key, {}).pop((namespace, name), None)
        if old is None:
            return None
        self._resource_version += 1
        if self._persistence is not None:
            self._persistence.write(self._resource_version, key, namespace, name, None)
        final = copy.deepcopy(old)
        final["metadata"]["resourceVersion"] = str(self._resource_version)
        self._emit(Change(self._resource_version, key, "DELETED", final, old))
        return copy.deepcopy(final)

    def drop_collection(self, key: Key) -> list[dict[str, Any]]:
        """Remove every object of a collection (a deleted CRD), emitting DELETED for each."""
        removed = []
        for namespace, name in list(self._collections.get(key, {})):
            obj = self.remove(key, namespace, name)
            if obj is not None:
                removed.append(obj)
        self._collections.pop(key, None)
        return removed

    # ---- watch ------------------------------------------------------------------------------
    def watch(self, key: Key, since: int | None) -> tuple[Watcher, list[Change]]:
        """Subscribe to ``key``; returns the watcher and the recorded changes after resourceVersion ``since``.

        Raises 410 Gone when ``since`` is older than the history still held. A ``since`` not reached yet
        replays nothing: the caller passes on only the changes after it, as kube-apiserver waits for it.
        ``since=None`` replays nothing (the caller sends the current state as synthetic ADDED events).
        """
        replay: list[Change] = []
        if since is not None and since < self._resource_version:
            oldest = self._history[0].resource_version if self._history else self._resource_version + 1
            if since < oldest - 1:
                raise gone(f"too old resource version: {since} ({oldest - 1})")
            replay = [c for c in self._history if c.resource_version > since and c.key == key]
        watcher = Watcher(key)
        if self._closed:
            watcher.queue.put_nowait(None)
        else:
            self._watchers.add(watcher)
        return watcher, replay

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def open(self) -> None:
        """Accept watches again after :meth:`close` (a restarted server keeps its objects)."""
        self._closed = False

    def close(self) -> None:
        """End every watch (server shutdown)."""
        self._closed = True
        for watcher in self._watchers:
            watcher.queue.put_nowait(None)
        self._watchers.clear()

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)

    async def wait_for(self, version: int, timeout_s: float) -> bool:
        """Wait until ``version`` is reached (True) or ``timeout_s`` passes (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._resource_version < version and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return self._resource_version >= version

    def _emit(self, change: Change) -> None:
        self._history.append(change)
        for watcher in self._watchers:
            if watcher.key == change.key:
                watcher.queue.put_nowait(change)
