"""A small asyncio client for the Kubernetes API, used by the local kubelet, scheduler and node controller.

They talk to the API server only over HTTP, exactly as real components do, so they work against
the embedded :class:`loco_local.apiserver.APIServer` and would work against any other server that
speaks the API. Only what these controllers need is here: JSON requests, merge patches, events,
and an :class:`Informer` (list + watch into a local cache, with change notification).

Errors: every non-2xx answer raises :class:`ApiError` carrying the HTTP status and the server's
``Status`` message; callers treat 404 on delete and 409 on create as success where that is the
idempotent meaning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import yaml

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
Obj = dict[str, Any]


def now_rfc3339() -> str:
    """The current UTC time as Kubernetes writes timestamps (``2024-01-02T03:04:05Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_rfc3339_micro() -> str:
    """The current UTC time with microseconds (``MicroTime``, used by events)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, message: str, method: str = "", path: str = "") -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.message = message


class ApiClient:
    """JSON over HTTP to one API server. Create it inside a running event loop; ``await close()``."""

    def __init__(self, url: str, *, timeout_s: float = 30.0, ssl_context: ssl.SSLContext | None = None,
                 token: str | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        connector = aiohttp.TCPConnector(ssl=ssl_context) if ssl_context is not None else None
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout_s),
                                              headers=headers, connector=connector)
        self._timeout_s = timeout_s

    @classmethod
    def from_kubeconfig(cls, path: str | Path, **kwargs: Any) -> "ApiClient":
        """A client for the current context of a kubeconfig: its server, CA, client certificate or token
        (file references, as the kubeconfigs Loco writes hold)."""
        doc = yaml.safe_load(Path(path).read_text())
        context = next(c["context"] for c in doc["contexts"] if c["name"] == doc["current-context"])
        cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == context["cluster"])
        user = next((u.get("user") or {} for u in doc.get("users") or [] if u["name"] == context.get("user")), {})
        ssl_context = None
        if cluster["server"].startswith("https:"):
            ssl_context = ssl.create_default_context(cafile=cluster.get("certificate-authority"))
            if user.get("client-certificate"):
                ssl_context.load_cert_chain(user["client-certificate"], user.get("client-key"))
        return cls(cluster["server"], ssl_context=ssl_context, token=user.get("token"), **kwargs)

    async def close(self) -> None:
        await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        """One request; returns the decoded JSON body (``{}`` when empty); raises :class:`ApiError`."""
        data = None if body is None else json.dumps(body)
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        async with self._session.request(
            method,
            self.url + path,
            data=data,
            params=params,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
        ) as resp:
            text = await resp.text()
            if resp.status >= 300:
                message = text
                with contextlib.suppress(ValueError):
                    message = json.loads(text).get("message", text)
                raise ApiError(resp.status, message, method, path)
            return json.loads(text) if text.strip() else {}

    async def get(self, path: str, **params: str) -> Obj:
        return await self.request("GET", path, params=params or None)

    async def create(self, path: str, obj: Obj) -> Obj:
        return await self.request("POST", path, obj)

    async def merge_patch(self, path: str, patch: Obj) -> Obj:
        return await self.request("PATCH", path, patch, content_type=MERGE_PATCH)

    async def delete(self, path: str, body: Obj | None = None) -> Obj | None:
        """DELETE; a missing object counts as deleted (returns None)."""
        try:
            return await self.request("DELETE", path, body)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def patch_status(self, path: str, status: Obj) -> Obj:
        """Merge-patch ``status`` through the ``/status`` subresource (falls back to the object)."""
        try:
            return await self.merge_patch(path + "/status", {"status": status})
        except ApiError as exc:
            if exc.status not in (404, 405):
                raise
            return await self.merge_patch(path, {"status": status})

    async def watch(self, path: str, resource_version: str, timeout_s: int = 60,
                    params: dict[str, str] | None = None) -> AsyncIterator[Obj]:
        """Yield watch events (``{"type", "object"}``) from ``resource_version`` until the server ends the stream."""
        params = {**(params or {}), "watch": "true", "resourceVersion": resource_version,
                  "timeoutSeconds": str(timeout_s), "allowWatchBookmarks": "true"}
        async with self._session.get(
            self.url + path, params=params, timeout=aiohttp.ClientTimeout(total=timeout_s + 30, sock_read=timeout_s + 30)
        ) as resp:
            if resp.status >= 300:
                raise ApiError(resp.status, await resp.text(), "WATCH", path)
            async for raw in resp.content:
                line = raw.strip()
                if line:
                    yield json.loads(line)

    async def event(
        self,
        obj: Obj,
        reason: str,
        message: str,
        *,
        type_: str = "Normal",
        component: str = "kubelet",
        host: str = "",
    ) -> None:
        """Record a core/v1 Event about ``obj`` (best effort: failures are logged, never raised)."""
        meta = obj.get("metadata", {})
        namespace = meta.get("namespace") or "default"
        stamp = now_rfc3339()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name', 'object')}.{secrets.token_hex(8)}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", "v1"),
                "kind": obj.get("kind", "Pod"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": component, **({"host": host} if host else {})},
            "reportingComponent": component,
            "reportingInstance": host or component,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self.create(f"/api/v1/namespaces/{namespace}/events", event)
        except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.debug("could not record event %s on %s: %s", reason, meta.get("name"), exc)


class Controller:
    """A component driven by one background loop, :meth:`_run`, on the running event loop (the
    scheduler, the node controller, the kubelet): :meth:`start` launches it, :meth:`stop` cancels
    it and waits until it has finished."""

    #: name of the asyncio task (shows in task dumps and logs)
    task_name = "controller"
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        raise NotImplementedError


def key_of(obj: Obj) -> str:
    """``namespace/name`` (or ``name`` for cluster-scoped objects)."""
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]


class Informer:
    """A list+watch cache of one resource collection (e.g. ``/api/v1/pods``).

    ``cache`` maps :func:`key_of` -> latest object. Every change bumps the version and wakes
    whoever awaits :meth:`changed`, so controllers are level-triggered: wake, read the whole cache,
    converge. The watch restarts from a fresh list on any error (410 Gone included).
    """

    def __init__(self, api: ApiClient, path: str, *, field_selector: str | None = None) -> None:
        self.api = api
        self.path = path
        # a node agent may only list its own pods and node (the Node authorizer's selector rule)
        self.params = {"fieldSelector": field_selector} if field_selector else {}
        self.cache: dict[str, Obj] = {}
        self._synced = asyncio.Event()
        self._changed = asyncio.Event()  # set (and replaced) on every change
        self._version = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"informer {self.path}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_synced(self) -> None:
        await self._synced.wait()

    @property
    def version(self) -> int:
        """A counter bumped on every change of the cache."""
        return self._version

    async def changed(self, since: int, timeout_s: float) -> int:
        """Wait until the cache changes after ``since`` or ``timeout_s`` passes; return the version."""
        if self._version == since:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)
        return self._version

    async def _bump(self) -> None:
        self._version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def _run(self) -> None:
        while True:
            try:
                listing = await self.api.get(self.path, **self.params)
                self.cache = {key_of(item): item for item in listing.get("items", [])}
                self._synced.set()
                await self._bump()
                rv = listing.get("metadata", {}).get("resourceVersion", "0")
                while True:
                    async for event in self.api.watch(self.path, rv, params=self.params):
                        kind, obj = event.get("type"), event.get("object", {})
                        if kind == "ERROR":
                            raise ApiError(int(obj.get("code", 500)), obj.get("message", "watch error"), "WATCH", self.path)
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if kind == "BOOKMARK":
                            continue
                        if kind == "DELETED":
                            self.cache.pop(key_of(obj), None)
                        else:
                            self.cache[key_of(obj)] = obj
                        await self._bump()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: relist after a short pause
                log.debug("informer %s restarts after: %s", self.path, exc)
                await asyncio.sleep(0.5)


async def wait_any(*awaitables: Any, timeout_s: float | None = None) -> None:
    """Wait until the first of ``awaitables`` completes (or ``timeout_s``); the others are cancelled,
    also when the caller is cancelled, so no task outlives the wait."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
