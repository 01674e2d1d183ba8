"""``LocalCluster``: the whole embedded cluster as one object you start and stop.

It runs, in one event loop: the API server (:class:`loco_local.apiserver.APIServer`), the
scheduler, the node controller and the local kubelet, which talk to the API server over HTTP only.
``start()`` also writes ``<state_dir>/kubeconfig``, registers the CRDs (the repository's
``crds/*.yaml`` by default) and the fake nodes.

Two ways to run it::

    # async (the caller owns the loop)
    cluster = LocalCluster(tmp_path, uniform_nodes(3))
    await cluster.start()
    ...
    await cluster.set_node_ready("node-1", False)
    await cluster.stop()

    # sync (tests, the CLI): the loop runs in a background thread
    with LocalCluster(tmp_path, uniform_nodes(3)) as cluster:
        subprocess.run(["kubectl", "--kubeconfig", cluster.kubeconfig, "get", "nodes"])
        cluster.set_node_ready("node-1", False)   # blocks until the API has it

The API server serves HTTPS (its CA in ``<state_dir>/pki``) and wants the bearer token that
``<state_dir>/kubeconfig`` (0600, in a 0700 state dir) holds. It listens on loopback only, unless
``allow_remote=True`` (docs/security.md).

The API objects persist in ``<state_dir>/apiserver.db``: a cluster started again on the same state dir (even
after ``kill -9``) serves them again, keeps its token, and first kills the container processes an earlier
run left behind.

State directory layout: ``kubeconfig``, ``pki/``, ``apiserver.db``, ``hosts`` (the DNS emulation), ``pods/<ns>/<pod>/`` (root,
volumes, ``<container>.log``), ``volumes/<ns>/<claim>/`` (persistent volume claims).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import ipaddress
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Awaitable, Coroutine, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import yaml

from loco_local import procs
from loco_local.apiclient import ApiClient, ApiError, Informer
from loco_local.kubelet import Kubelet
from loco_local.nodes import NodeController, NodeSpec, cordon_patch, node_address, ready_patch
from loco_local.pki import serving_context
from loco_local.scheduler import Scheduler

log = logging.getLogger(__name__)

T = TypeVar("T")
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
#: environment variable naming a directory of CRD manifests (overrides the repository's ``crds/``)
CRDS_DIR_ENV = "LOCO_CRDS_DIR"
#: the API server's objects, kept across restarts (SQLite)
STORE_FILE = "apiserver.db"


def kubeconfig_token(path: Path) -> str | None:
    """The bearer token of an existing kubeconfig (a restarted cluster keeps it, so handed-out copies stay
    valid), or None."""
    try:
        return yaml.safe_load(path.read_text())["users"][0]["user"].get("token") or None
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        return None


def default_crd_paths() -> list[Path]:
    """The CRD manifests to register by default: ``$LOCO_CRDS_DIR/*.yaml`` if set, else the
    ``crds/`` directory of the repository this package lives in (an editable install or a
    checkout), else none."""
    candidates = []
    if os.environ.get(CRDS_DIR_ENV):
        candidates.append(Path(os.environ[CRDS_DIR_ENV]))
    here = Path(__file__).resolve()
    candidates += [parent / "crds" for parent in here.parents[1:4]]
    for directory in candidates:
        if directory.is_dir():
            files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
            if files:
                return files
    return []


def octet_for_port(port: int) -> int:
    """The preferred second octet of this cluster's loopback addresses (1..254), from the API port."""
    return 1 + port % 254


def claim_octet(port: int, lock_dir: Path | None = None) -> tuple[int, IO[bytes]]:
    """Claim a second octet no other running cluster on this machine uses: the first free one from
    :func:`octet_for_port`, held by an exclusive ``flock`` on ``<tmp>/loco-local-<uid>/octet-N.lock``.
    Returns the octet and the open lock file (closing it releases the claim)."""
    lock_dir = lock_dir or Path(tempfile.gettempdir()) / f"loco-local-{os.getuid()}"
    lock_dir.mkdir(parents=True, exist_ok=True)
    first = octet_for_port(port)
    for i in range(254):
        octet = 1 + (first - 1 + i) % 254
        handle = open(lock_dir / f"octet-{octet}.lock", "ab")  # noqa: SIM115 - held while the cluster runs
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return octet, handle
        except OSError:
            handle.close()
    raise RuntimeError(f"all 254 loopback ranges are in use by other local clusters (locks in {lock_dir})")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LocalCluster:
    """An embedded Kubernetes-like cluster (see the module docstring).

    Args:
        state_dir: where kubeconfig, pod roots, logs and volumes go (created).
        nodes: the fake nodes.
        host, port: where the API server listens (port 0: a free port).
        allow_remote: required for a ``host`` off loopback.
        crd_paths: CRD manifests to register (None: :func:`default_crd_paths`).
        pod_eviction_timeout_s: how long after a node fails its pods are marked ``NodeLost``.
        heartbeat_s: node heartbeat period.
        restart_backoff_s: first container restart back-off (doubles, capped at 30 s).
    """

    def __init__(
        self,
        state_dir: Path,
        nodes: Sequence[NodeSpec],
        host: str = "127.0.0.1",
        port: int = 0,
        crd_paths: Sequence[Path] | None = None,
        *,
        pod_eviction_timeout_s: float = 10.0,
        heartbeat_s: float = 10.0,
        restart_backoff_s: float = 1.0,
        allow_remote: bool = False,
    ) -> None:
        if not is_loopback(host) and not allow_remote:
            raise ValueError(f"refusing to serve the API on {host!r}, off loopback: anyone who reaches it could run "
                             "commands as you. Pass --allow-remote (allow_remote=True) as well to serve it there "
                             "(HTTPS, with the bearer token of the kubeconfig)")
        if not nodes:
            raise ValueError("nodes is empty: a cluster needs at least one NodeSpec")
        names = [n.name for n in nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique, got {names}")
        self.state_dir = Path(state_dir).resolve()
        self.node_specs = list(nodes)
        self.host = host
        self.port = port
        self.crd_paths = list(crd_paths) if crd_paths is not None else default_crd_paths()
        self.pod_eviction_timeout_s = pod_eviction_timeout_s
        self.heartbeat_s = heartbeat_s
        self.restart_backoff_s = restart_backoff_s
        self.url = ""
        self.kubeconfig = self.state_dir / "kubeconfig"
        self._server: Any = None
        self.api: ApiClient | None = None
        self._parts: list[Any] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.kubelet: Kubelet | None = None
        self._octet_lock: IO[bytes] | None = None

    # ---------------------------------------------------------------------------------- async

    async def start(self) -> None:
        """Start everything; returns once the nodes are registered and the controllers run."""
        from loco_local.apiserver import APIServer
        from loco_local.apiserver.kubeconfig import write_kubeconfig

        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)  # it holds the kubeconfig, pod roots and volumes: the owner's only
        (self.state_dir / "pods").mkdir(exist_ok=True)
        reaped = procs.kill_pid_files(sorted((self.state_dir / "pods").glob("*/*/*.pid")))
        if reaped:  # a cluster killed with kill -9 before us left them (their parent-death signal missed them)
            log.warning("killed %d container process group(s) left by an earlier cluster in %s", reaped, self.state_dir)
        ca, ssl_context = serving_context(self.state_dir / "pki", [self.host, socket.gethostname()])
        self._server = APIServer(self.host, port=self.port, log_root=self.state_dir / "pods", ssl_context=ssl_context,
                                 token=kubeconfig_token(self.kubeconfig), store_path=self.state_dir / STORE_FILE)
        await self._server.start()
        try:
            self.url = self._server.url
            write_kubeconfig(self.kubeconfig, self.url, token=self._server.token, ca=ca)
            octet2, self._octet_lock = claim_octet(urlsplit(self.url).port or 0)
            api = self.api = ApiClient.from_kubeconfig(self.kubeconfig)
            await self._register_crds(api)
            pods, nodes = Informer(api, "/api/v1/pods"), Informer(api, "/api/v1/nodes")
            node_controller = NodeController(api, nodes, pods, self.node_specs, octet2=octet2,
                                             heartbeat_s=self.heartbeat_s,
                                             pod_eviction_timeout_s=self.pod_eviction_timeout_s)
            await node_controller.register()
            addresses = {spec.name: node_address(i, octet2) for i, spec in enumerate(self.node_specs)}
            self.kubelet = Kubelet(api, pods, nodes, self.state_dir, addresses, octet2=octet2,
                                   restart_backoff_s=self.restart_backoff_s)
            scheduler = Scheduler(api, pods, nodes)
            # stop order is the reverse: the kubelet (and its processes) first, informers last
            self._parts = [pods, nodes, node_controller, scheduler, self.kubelet]
            for part in self._parts:
                part.start()
            await pods.wait_synced()
            await nodes.wait_synced()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop the controllers (killing every pod process), then the API server. Idempotent."""
        for part in reversed(self._parts):
            with contextlib.suppress(Exception):
                await part.stop()
        self._parts = []
        if self.api is not None:
            await self.api.close()
            self.api = None
        if self._server is not None:
            await self._server.stop()
            self._server = None
        if self._octet_lock is not None:
            self._octet_lock.close()
            self._octet_lock = None

    @property
    def hosts_file(self) -> Path:
        """The hosts file standing in for cluster DNS (``LOCO_LOCAL_HOSTS`` of every pod)."""
        return self.state_dir / "hosts"

    def pod_dir(self, name: str, namespace: str = "default") -> Path:
        """Where pod ``namespace/name`` lives: ``root/`` (its container root), ``<container>.log``."""
        return self.state_dir / "pods" / namespace / name

    def set_node_ready(self, name: str, ready: bool) -> Awaitable[None] | None:
        """Fail (``ready=False``) or revive a node, through the API like ``loco local node``.

        Sync mode (``with LocalCluster(...)``, called from another thread): blocks until done.
        Async mode: returns an awaitable (``await cluster.set_node_ready(...)``).
        """
        return self._now_or_awaitable(self._patch_node(name, ready_patch(ready)))

    def cordon(self, name: str, cordoned: bool = True) -> Awaitable[None] | None:
        """Cordon (or uncordon with ``cordoned=False``) a node: the scheduler stops placing pods on it.
        Blocks or returns an awaitable like :meth:`set_node_ready`."""
        return self._now_or_awaitable(self._patch_node(name, cordon_patch(cordoned)))

    def _now_or_awaitable(self, coro: Coroutine[Any, Any, None]) -> Awaitable[None] | None:
        if self._loop is not None and threading.current_thread() is not self._thread:
            self.call(coro)
            return None
        return coro

    async def _patch_node(self, name: str, patch: dict[str, Any]) -> None:
        if self.api is None:
            raise RuntimeError("the cluster is not running: call start() (or use it as a context manager) first")
        if name not in {n.name for n in self.node_specs}:
            raise ValueError(f"no node named {name!r}; nodes are {[n.name for n in self.node_specs]}")
        await self.api.merge_patch(f"/api/v1/nodes/{name}", patch)

    async def _register_crds(self, api: ApiClient) -> None:
        for path in self.crd_paths:
            for doc in yaml.safe_load_all(Path(path).read_text()):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                name = doc["metadata"]["name"]
                try:
                    await api.create(CRD_PATH, doc)
                except ApiError as exc:
                    if exc.status != 409:
                        raise ValueError(f"{path}: CRD {name} was refused by the API server: {exc.message}") from exc
                    current = await api.get(f"{CRD_PATH}/{name}")
                    doc = {**doc, "metadata": {**doc["metadata"],
                                               "resourceVersion": current["metadata"].get("resourceVersion")}}
                    await api.request("PUT", f"{CRD_PATH}/{name}", doc)

    # ----------------------------------------------------------------------------------- sync

    def __enter__(self) -> "LocalCluster":
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="loco-local-cluster", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            self.call(self.start(), timeout_s=120)
        except BaseException:
            self._stop_thread()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._loop is not None:
                self.call(self.stop(), timeout_s=120)
        finally:
            self._stop_thread()

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = 60) -> T:
        """Run ``coro`` on the cluster's background loop (sync mode) and return its result."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("call() needs the cluster running as a context manager (`with LocalCluster(...)`)")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"cluster operation did not finish within {timeout_s}s") from None

    def _stop_thread(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=30)
        if not loop.is_running():
            loop.close()
