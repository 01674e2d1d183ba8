"""The HTTP face of the embedded control plane: an aiohttp app speaking the Kubernetes REST API.

URL layout (as kube-apiserver)::

    /api/v1[/namespaces/{ns}]/{plural}[/{name}[/{subresource}]]
    /apis/{group}/{version}[/namespaces/{ns}]/{plural}[/{name}[/{subresource}]]
    /api, /api/v1, /apis, /apis/{group}[/{version}]        discovery (legacy documents)
    /version, /healthz, /livez, /readyz, /openapi/v2, /openapi/v3[/...]

One generic handler serves every kind of the :class:`~.resources.Registry`; the verbs are in
:class:`~.operations.Operations`. Responses are JSON (protobuf requests get JSON too); a Table is
returned when the Accept header asks ``as=Table``. Watches stream JSON lines.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import ssl
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from . import apply as applying, auth, errors, openapi, openapi_pb, patch, protobuf, table
from .errors import APIError
from .operations import Operations
from .resources import Registry, ResourceType
from .store import Change, Store

log = logging.getLogger(__name__)

DEFAULT_WATCH_TIMEOUT_S = 1800
#: how long a list waits for a resourceVersion not reached yet (kube-apiserver's blockTimeout)
LIST_WAIT_S = 3.0
INITIAL_EVENTS_END = "k8s.io/initial-events-end"
JSON_TYPE = "application/json"
_NO_NAMESPACE_SUBPATHS = ("status", "finalize")


def _json(body: Any, status: int = 200, warnings: list[str] | None = None) -> web.Response:
    response = web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status,
                            content_type=JSON_TYPE)
    for warning in warnings or []:  # RFC 7234 warn-code 299, as kube-apiserver sends them
        response.headers.add("Warning", f'299 - {json.dumps(warning)}')
    return response


def _error(exc: APIError) -> web.Response:
    return _json(exc.status(), exc.code)


def _accept_table(request: web.Request) -> bool:
    """Whether the client's first acceptable media type is a ``meta.k8s.io`` Table."""
    for media in request.headers.get("Accept", "").split(","):
        params = dict(p.strip().split("=", 1) for p in media.split(";")[1:] if "=" in p)
        kind = media.split(";")[0].strip()
        if kind in ("application/json", "*/*", "application/vnd.kubernetes.protobuf", "application/yaml"):
            return params.get("as") == "Table"
    return False


class APIServer:
    """The embedded Kubernetes-compatible API server.

    ``port=0`` picks a free port; after :meth:`start` the address is :attr:`url`. Every request but the
    health probes needs ``Authorization: Bearer <token>`` (:attr:`token`, random unless given; see
    :mod:`.auth`). ``ssl_context`` serves HTTPS. Pod logs are read from
    ``<log_root>/<namespace>/<pod>/<container>.log``. ``history_size`` bounds the watch history (older
    resourceVersions get 410 Gone); ``bookmark_interval_s`` paces watch bookmarks. ``store_path``: a SQLite
    file that keeps every object across restarts (:class:`~.store.Store`).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, log_root: Path | None = None, *,
                 token: str | None = None, ssl_context: ssl.SSLContext | None = None,
                 store_path: Path | None = None, history_size: int = 10_000, bookmark_interval_s: float = 15.0):
        self.host = host
        self.port = port
        self.token = token or auth.new_token()
        self.ssl_context = ssl_context
        #: requests answered with an error, by status code (401s are the ones an attacker leaves)
        self.refused: collections.Counter[int] = collections.Counter()
        self.log_root = Path(log_root) if log_root is not None else None
        self.bookmark_interval_s = bookmark_interval_s
        self.store = Store(history_size=history_size, path=store_path)
        self.registry = Registry()
        self.ops = Operations(self.store, self.registry)
        for crd in self.store.list(("apiextensions.k8s.io", "customresourcedefinitions")):  # kept from a last run
            self.ops.register_crd(crd)
        self._runner: web.AppRunner | None = None
        self._gc_wakeup = asyncio.Event()
        self._gc_task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._bootstrap()

    # ---- lifecycle --------------------------------------------------------------------------
    def _bootstrap(self) -> None:
        namespaces = self.registry.get("", "v1", "namespaces")
        assert namespaces is not None
        for name in ("default", "kube-system", "kube-public", "kube-node-lease"):
            if self.store.get(namespaces.storage_key, "", name) is None:
                self.ops.create(namespaces, None, {"metadata": {"name": name}})

    @property
    def url(self) -> str:
        """Where clients on this machine reach it (a wildcard bind is reached on loopback)."""
        scheme = "https" if self.ssl_context is not None else "http"
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else "[::1]" if self.host == "::" else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        """The header every request needs."""
        return {"Authorization": f"Bearer {self.token}"}

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=auth.MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self) -> None:
        """Serve in the running event loop; returns once the socket listens (``url`` is then final)."""
        self._stopping.clear()
        auth.allow_max_depth()
        self.store.open()
        self._runner = web.AppRunner(self.build_app(), access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True, ssl_context=self.ssl_context)
        await site.start()
        server = site._server  # noqa: SLF001 - aiohttp exposes the bound port only here
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        self._gc_task = asyncio.create_task(self._garbage_collector(), name="loco-apiserver-gc")
        log.info("API server listening on %s", self.url)

    async def stop(self) -> None:
        """End watches and log streams, stop listening."""
        self._stopping.set()
        self.store.close()
        if self._gc_task is not None:
            self._gc_task.cancel()
            try:
                await self._gc_task
            except asyncio.CancelledError:
                pass
            self._gc_task = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> APIServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def _garbage_collector(self) -> None:
        """Background GC: runs passes after every write burst until nothing changes, and every second."""
        while True:
            try:
                await asyncio.wait_for(self._gc_wakeup.wait(), timeout=1.0)
            except TimeoutError:
                pass
            self._gc_wakeup.clear()
            try:
                for _ in range(20):
                    if not self.ops.collect_garbage():
                        break
                    await asyncio.sleep(0)
            except Exception:  # noqa: BLE001 - the GC must never die; the next pass retries
                log.exception("garbage collection pass failed")

    # ---- dispatch ---------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            auth.authenticate(request.path.rstrip("/") or "/", request.headers.get("Authorization"), self.token)
            response = await self._dispatch(request)
            log.debug("%s %s -> %s", request.method, request.path_qs, response.status)
            return response
        except APIError as exc:
            log.debug("%s %s -> %s %s", request.method, request.path_qs, exc.code, exc.message)
            self.refused[exc.code] += 1
            return _error(exc)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - any bug becomes a 500 Status, not a dropped connection
            log.exception("internal error serving %s %s", request.method, request.path)
            return _error(APIError(500, "InternalError", f"Internal error occurred: {exc}"))

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        parts = [p for p in path.split("/") if p]
        if request.method == "GET":
            fixed = self._fixed_document(path, parts, request)
            if fixed is not None:
                return fixed
        if len(parts) >= 3 and parts[0] == "api" and parts[1] == "v1":
            return await self._resource_request(request, "", "v1", parts[2:])
        if len(parts) >= 4 and parts[0] == "apis":
            return await self._resource_request(request, parts[1], parts[2], parts[3:])
        raise errors.APIError(404, "NotFound", "the server could not find the requested resource")

    def _fixed_document(self, path: str, parts: list[str], request: web.Request) -> web.StreamResponse | None:
        if path == "/version":
            return _json({"major": "1", "minor": "32", "gitVersion": openapi.KUBERNETES_VERSION + "-loco",
                          "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                          "goVersion": "python", "compiler": "loco", "platform": "linux/amd64"})
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if path == "/api":
            return _json({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}]})
        if path == "/api/v1":
            return _json(self.registry.resource_list("", "v1"))
        if path == "/apis":
            return _json(self.registry.api_group_list())
        if parts[:1] == ["apis"] and len(parts) == 2:
            group = self.registry.api_group(parts[1])
            if group is None:
                raise APIError(404, "NotFound", "the server could not find the requested resource")
            return _json(group)
        if parts[:1] == ["apis"] and len(parts) == 3:
            resources = self.registry.resource_list(parts[1], parts[2])
            if resources is None:
                raise APIError(404, "NotFound", "the server could not find the requested resource")
            return _json(resources)
        if path == "/openapi/v2":
            accept = request.headers.get("Accept", "")
            if "json" in accept or "*/*" in accept or not accept:
                return _json(openapi.v2_document(self.registry))
            if "protobuf" in accept:  # kubectl 1.27 and 1.28 ask for nothing else
                return web.Response(body=openapi_pb.document(openapi.v2_document(self.registry)),
                                    content_type=openapi_pb.CONTENT_TYPE)
            raise APIError(406, "NotAcceptable", "only application/json and the protobuf OpenAPI v2 are served")
        if path == "/openapi/v3":
            return _json(openapi.v3_root(self.registry))
        if parts[:2] == ["openapi", "v3"]:
            key = "/".join(parts[2:])
            types = openapi.group_versions(self.registry).get(key)
            if types is None:
                raise APIError(404, "NotFound", f"openapi document for {key} not found")
            return _json(openapi.v3_document(types))
        return None

    # ---- resources --------------------------------------------------------------------------
    def _resolve(self, group: str, version: str, rest: list[str]
                 ) -> tuple[ResourceType, str | None, str | None, str | None, bool]:
        """(type, namespace, name, subresource, legacy-watch) from the path after the group/version."""
        legacy_watch = False
        if rest and rest[0] == "watch":
            legacy_watch, rest = True, rest[1:]
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in _NO_NAMESPACE_SUBPATHS:
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        rt = self.registry.get(group, version, rest[0])
        if rt is None:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        if namespace is not None and not rt.namespaced:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) >= 2 else None
        subresource = rest[2] if len(rest) == 3 else None
        if subresource is not None and subresource not in rt.subresources:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        return rt, namespace, name, subresource, legacy_watch

    async def _body(self, request: web.Request) -> Any:
        """The decoded body; 415 for a media type Kubernetes does not read (checked before the body is), 413
        past the size limit, 400 when it does not parse."""
        # no Content-Type reads as JSON, as in kube-apiserver (the kubernetes Python client sends none)
        content_type = request.content_type if request.headers.get("Content-Type") else auth.BODY_TYPES[0]
        if request.method == "PATCH":
            patch.check_content_type(content_type)
        elif request.can_read_body:
            auth.check_body_type(content_type)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise auth.too_large() from exc
        if not raw:
            return None
        if content_type == protobuf.CONTENT_TYPE:
            return protobuf.decode(raw)
        try:
            doc = auth.load_yaml(raw) if "yaml" in content_type else json.loads(raw)
            auth.check_depth(doc)
            return doc
        except (ValueError, yaml.YAMLError) as exc:
            raise errors.bad_request(f"the request body is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise errors.bad_request("the request body is nested too deeply") from exc

    async def _resource_request(self, request: web.Request, group: str, version: str, rest: list[str]
                                ) -> web.StreamResponse:
        rt, namespace, name, sub, legacy_watch = self._resolve(group, version, rest)
        q = request.query
        method = request.method
        dry_run = bool(q.getall("dryRun", []))
        field_validation = q.get("fieldValidation")
        ops = self.ops
        warnings: list[str] = []
        if q.get("force") is not None and method == "PATCH" and request.content_type != patch.APPLY:
            raise errors.invalid("PatchOptions", "meta.k8s.io", "", [
                ("force", "force: Forbidden: may not be specified for non-apply patch")])
        manager = applying.manager_from(q.get("fieldManager"), request.headers.get("User-Agent"))

        if sub == "log" and method == "GET":
            return await self._pod_log(request, rt, namespace or "default", name or "")
        if sub == "binding":
            if method != "POST":
                raise errors.method_not_allowed()
            result = ops.bind(namespace or "default", name or "", await self._body(request))
            return _json(result, 201)
        if sub == "eviction":
            if method != "POST":
                raise errors.method_not_allowed()
            return _json(ops.evict(namespace or "default", name or "", await self._body(request)), 201)
        if sub == "scale":
            if method == "GET":
                return _json(ops.get_scale(rt, namespace, name or ""))
            if method == "PUT":
                return _json(ops.update_scale(rt, namespace, name or "", await self._body(request)))
            if method == "PATCH":
                return _json(ops.patch_scale(rt, namespace, name or "", request.content_type, await self._body(request)))
            raise errors.method_not_allowed()

        watch = legacy_watch or q.get("watch") in ("1", "true", "True")
        if name is None:
            if method == "GET" and watch:
                return await self._watch(request, rt, namespace)
            if method == "GET":
                await self._wait_for_version(q.get("resourceVersion"), q.get("resourceVersionMatch"))
                listed = ops.list(rt, namespace, q.get("labelSelector"), q.get("fieldSelector"))
                if _accept_table(request):
                    return _json(table.to_table(rt, listed["items"], listed["metadata"]["resourceVersion"],
                                                q.get("includeObject", "Metadata")))
                return _json(listed)
            if method == "POST":
                if not rt.namespaced or namespace is not None:
                    created = ops.create(rt, namespace, await self._body(request), dry_run=dry_run,
                                         field_validation=field_validation, warnings=warnings, manager=manager)
                    self._gc_wakeup.set()
                    return _json(created, 201, warnings)
                raise errors.method_not_allowed()
            if method == "DELETE":
                options = await self._delete_options(request)
                result = ops.delete_collection(rt, namespace, q.get("labelSelector"), q.get("fieldSelector"), options)
                self._gc_wakeup.set()
                return _json(result)
            raise errors.method_not_allowed()

        if method == "GET" and watch:
            return await self._watch(request, rt, namespace, name)
        if method == "GET":
            obj = ops.get(rt, namespace, name)
            if _accept_table(request):
                return _json(table.to_table(rt, [obj], obj["metadata"]["resourceVersion"], q.get("includeObject", "Metadata")))
            return _json(obj)
        if method == "PUT":
            result = ops.update(rt, namespace, name, await self._body(request), subresource=sub, dry_run=dry_run,
                                field_validation=field_validation, warnings=warnings, manager=manager)
            self._gc_wakeup.set()
            return _json(result, warnings=warnings)
        if method == "PATCH" and request.content_type == patch.APPLY:
            result, created = ops.apply(rt, namespace, name, await self._body(request), manager=q.get("fieldManager"),
                                        force=q.get("force") in ("true", "1", "True"), subresource=sub,
                                        dry_run=dry_run, field_validation=field_validation, warnings=warnings)
            self._gc_wakeup.set()
            return _json(result, 201 if created else 200, warnings)
        if method == "PATCH":
            result = ops.patch(rt, namespace, name, request.content_type, await self._body(request), subresource=sub,
                               dry_run=dry_run, field_validation=field_validation, warnings=warnings, manager=manager)
            self._gc_wakeup.set()
            return _json(result, warnings=warnings)
        if method == "DELETE" and sub is None:
            result = ops.delete(rt, namespace, name, await self._delete_options(request))
            self._gc_wakeup.set()
            lingering = self.store.get(rt.storage_key, result["metadata"].get("namespace", ""), name) is not None
            return _json(result, 202 if lingering else 200)
        raise errors.method_not_allowed()

    async def _wait_for_version(self, version: str | None, match: str | None) -> None:
        """A list from a resourceVersion this server has not reached waits for it, 3 s at most, then 504 (as
        kube-apiserver). Older versions get the current state, or 410 when asked for exactly that version:
        this server keeps no old snapshots (kube-apiserver's answer once etcd compacted them away)."""
        if version in (None, "", "0"):
            return
        try:
            wanted = int(version)
        except ValueError as exc:
            raise errors.bad_request(f"invalid resourceVersion {version!r}") from exc
        if not await self.store.wait_for(wanted, LIST_WAIT_S):
            raise errors.too_large_resource_version(wanted, self.store.resource_version)
        if match == "Exact" and wanted < self.store.resource_version:
            raise errors.gone("The resourceVersion for the provided list is too old.")

    async def _delete_options(self, request: web.Request) -> dict[str, Any]:
        body = await self._body(request) or {}
        if not isinstance(body, dict):
            raise errors.bad_request("DeleteOptions must be a JSON object")
        q = request.query
        if "gracePeriodSeconds" in q and body.get("gracePeriodSeconds") is None:
            try:
                body["gracePeriodSeconds"] = int(q["gracePeriodSeconds"])
            except ValueError as exc:
                raise errors.bad_request(f"gracePeriodSeconds must be an integer, got {q['gracePeriodSeconds']!r}") from exc
        if "propagationPolicy" in q and not body.get("propagationPolicy"):
            body["propagationPolicy"] = q["propagationPolicy"]
        if q.get("orphanDependents") in ("true", "false") and "orphanDependents" not in body:
            body["orphanDependents"] = q["orphanDependents"] == "true"
        if q.getall("dryRun", []):
            body["dryRun"] = q.getall("dryRun")
        return body

    # ---- watch ------------------------------------------------------------------------------
    async def _watch(self, request: web.Request, rt: ResourceType, namespace: str | None,
                     name: str | None = None) -> web.StreamResponse:
        q = request.query
        selected = self.ops.selector(rt, q.get("labelSelector"), q.get("fieldSelector"))

        def keep(obj: dict[str, Any] | None) -> bool:
            if obj is None:
                return False
            meta = obj["metadata"]
            if namespace is not None and meta.get("namespace") != namespace:
                return False
            if name is not None and meta.get("name") != name:
                return False
            return selected(obj)

        timeout_s = DEFAULT_WATCH_TIMEOUT_S
        if q.get("timeoutSeconds"):
            try:
                timeout_s = max(int(q["timeoutSeconds"]), 0)
            except ValueError as exc:
                raise errors.bad_request("timeoutSeconds must be an integer") from exc
        bookmarks = q.get("allowWatchBookmarks") in ("1", "true", "True")
        send_initial = q.get("sendInitialEvents") in ("true", "1")
        as_table = _accept_table(request)
        include_object = q.get("includeObject", "Metadata")
        version = q.get("resourceVersion") or ""
        since: int | None = None
        if version not in ("", "0") and not send_initial:
            try:
                since = int(version)
            except ValueError as exc:
                raise errors.bad_request(f"invalid resourceVersion {version!r}") from exc

        response = web.StreamResponse(status=200, headers={"Content-Type": JSON_TYPE, "Cache-Control": "no-cache"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        headers_sent = False

        async def send(event_type: str, obj: dict[str, Any]) -> None:
            nonlocal headers_sent
            if as_table and event_type not in ("BOOKMARK", "ERROR"):
                obj = table.to_table(rt, [obj], obj["metadata"].get("resourceVersion", ""), include_object,
                                     headers=not headers_sent)
                headers_sent = True
            line = json.dumps({"type": event_type, "object": obj}, separators=(",", ":")) + "\n"
            await response.write(line.encode())

        def bookmark(annotations: dict[str, str] | None = None) -> dict[str, Any]:
            meta: dict[str, Any] = {"resourceVersion": str(self.store.resource_version)}
            if annotations:
                meta["annotations"] = annotations
            return {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta}

        try:
            watcher, replay = self.store.watch(rt.storage_key, since)
        except APIError as exc:
            await send("ERROR", exc.status())
            await response.write_eof()
            return response
        try:
            if since is None:
                initial = self.ops.list(rt, namespace)["items"]
                for obj in initial:
                    if keep(obj):
                        await send("ADDED", obj)
                if send_initial:
                    await send("BOOKMARK", bookmark({INITIAL_EVENTS_END: "true"}))
            for change in replay:
                await self._send_change(change, rt, keep, send, since)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            next_bookmark = loop.time() + self.bookmark_interval_s
            while not self._stopping.is_set():
                now = loop.time()
                if now >= deadline:
                    break
                wait = deadline - now
                if bookmarks:
                    wait = min(wait, max(next_bookmark - now, 0))
                try:
                    change = await watcher.get(wait)
                except TimeoutError:
                    if bookmarks and loop.time() >= next_bookmark:
                        await send("BOOKMARK", bookmark())
                        next_bookmark = loop.time() + self.bookmark_interval_s
                    continue
                if change is None:
                    break
                await self._send_change(change, rt, keep, send, since)
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self.store.unwatch(watcher)
        return response

    async def _send_change(self, change: Change, rt: ResourceType, keep: Any, send: Any, since: int | None) -> None:
        """Translate a store change into what this watcher sees (selector transitions become ADDED/DELETED);
        nothing up to ``since``, a version the watch asked to start after."""
        if since is not None and change.resource_version <= since:
            return
        new = self.ops.present(rt, dict(change.object))
        new_match = keep(change.object)
        old_match = keep(change.old)
        if change.type == "DELETED":
            if old_match or new_match:
                await send("DELETED", new)
        elif new_match and old_match:
            await send("MODIFIED", new)
        elif new_match:
            await send("ADDED", new)
        elif old_match:
            await send("DELETED", new)

    # ---- logs -------------------------------------------------------------------------------
    async def _pod_log(self, request: web.Request, rt: ResourceType, namespace: str, name: str) -> web.StreamResponse:
        """``pods/log``: ``container``, ``tailLines``, ``limitBytes``, ``follow`` (streams while the container runs)."""
        pod = self.ops.get(rt, namespace, name)
        q = request.query
        spec = pod.get("spec") or {}
        containers = [c["name"] for c in spec.get("containers") or []]
        all_containers = containers + [c["name"] for c in spec.get("initContainers") or []]
        container = q.get("container")
        if not container:
            if len(containers) != 1:
                raise errors.bad_request(f"a container name must be specified for pod {name}, choose one of: "
                                         f"[{' '.join(containers)}]")
            container = containers[0]
        if container not in all_containers:
            raise errors.bad_request(f"container {container} is not valid for pod {name}")
        if self.log_root is None:
            raise errors.bad_request(f'container "{container}" in pod "{name}" has no logs: this server keeps none')
        path = self.log_root / namespace / name / f"{container}.log"
        if not path.exists():
            raise errors.bad_request(f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating')
        tail = q.get("tailLines")
        try:
            tail_lines = int(tail) if tail not in (None, "") else None
            limit_bytes = int(q["limitBytes"]) if q.get("limitBytes") else None
        except ValueError as exc:
            raise errors.bad_request(f"tailLines and limitBytes must be integers: {exc}") from exc
        data = path.read_bytes()
        offset = len(data)
        if tail_lines is not None:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-tail_lines:]) if tail_lines > 0 else b""
        if limit_bytes is not None:
            data = data[:limit_bytes]
        if q.get("follow") not in ("true", "1"):
            return web.Response(body=data, content_type="text/plain")
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            if data:
                await response.write(data)
            while not self._stopping.is_set():
                finished = self._container_finished(rt, namespace, name, pod["metadata"]["uid"], container)
                with path.open("rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
                if chunk:
                    offset += len(chunk)
                    await response.write(chunk)
                if finished:
                    break
                await asyncio.sleep(0.2)
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass
        return response

    def _container_finished(self, rt: ResourceType, namespace: str, name: str, uid: str, container: str) -> bool:
        pod = self.store.get(rt.storage_key, namespace, name)
        if pod is None or pod["metadata"]["uid"] != uid:
            return True
        status = pod.get("status") or {}
        if status.get("phase") in ("Succeeded", "Failed"):
            return True
        for cs in status.get("containerStatuses") or []:
            if cs.get("name") == container and (cs.get("state") or {}).get("terminated"):
                return True
        return False


__all__ = ["APIServer"]
