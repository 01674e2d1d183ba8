"""The local kubelet: runs every pod bound to its nodes as local processes.

One :class:`Kubelet` serves all fake nodes of a cluster (they share one host). For each pod bound to
one of them it starts a :class:`PodWorker` that does what a kubelet and a container runtime do:

* **network**: the pod gets its own loopback address ``127.<octet2>.<a>.<b>`` (never 127.0.0.1;
  ``octet2`` is chosen per cluster, so two clusters on one machine don't collide) as
  ``status.podIP``; the node's fake address is ``status.hostIP``;
* **DNS**: ``<state>/hosts`` lists ``IP <hostname>.<subdomain>.<ns>.svc.cluster.local
  <hostname>.<subdomain>.<ns>.svc <hostname>.<subdomain>`` for every unfinished pod with hostname
  and subdomain (what CoreDNS answers for a headless service), rewritten atomically on change;
  processes find it through ``LOCO_LOCAL_HOSTS``;
* **filesystem**: the emulated container root ``<state>/pods/<ns>/<pod>/root`` (``LOCO_LOCAL_ROOT``)
  with volumes mounted by symlink (configMap/secret/downwardAPI -> files, emptyDir -> dir, hostPath
  -> the host path, persistentVolumeClaim -> ``<state>/volumes/<ns>/<claim>``, shared), the working
  directory and the termination message file under it. Each volume keeps its own backing directory:
  a mount nested in another (an emptyDir at ``/data/checkpoints`` in a claim at ``/data``) wins, and
  nothing is written into the outer volume (:func:`loco_local.podpaths.plan_mounts`). Every path the
  pod names is checked first (no ``..``, no symlink leading out of the root or its volumes:
  :mod:`loco_local.podpaths`), else the container waits in ``CreateContainerConfigError``. Deleting
  the pod removes its root and its own volume backing (emptyDir, configMap, ...), never following a
  symlink; logs stay;
* **environment**: ``env`` (values with ``$(VAR)`` expansion, ``fieldRef``, ``configMapKeyRef``,
  ``secretKeyRef``, ``resourceFieldRef``), ``envFrom`` (configMap/secret, with prefix), plus
  ``HOSTNAME``, ``LOCO_LOCAL_ROOT``, ``LOCO_LOCAL_HOSTS`` and ``PATH`` (the cluster interpreter's
  directory first); ``python``/``python3`` as argv[0] run ``sys.executable``;
* **processes**: each container is a session leader (its process group is the container) that gets SIGKILL
  when the kubelet dies, however it dies (``PR_SET_PDEATHSIG``: a killed cluster or node agent leaves no pod), output to
  ``<state>/pods/<ns>/<pod>/<container>.log``; init containers run first, in order; restartPolicy
  Never/OnFailure/Always with exponential back-off (``restart_backoff_s`` doubling, capped);
* **status** like the real kubelet: phase Pending -> Running -> Succeeded/Failed, conditions
  PodScheduled/Initialized/ContainersReady/Ready (ready = running and, if present, the httpGet or
  tcpSocket readinessProbe passes), containerStatuses with waiting/running/terminated states,
  lastState and restartCount, the termination message (or the log tail for
  ``FallbackToLogsOnError``);
* **deletion**: on ``deletionTimestamp`` SIGTERM the groups, SIGKILL after the grace period, write
  the final status, then DELETE with ``gracePeriodSeconds=0``;
* **node failure**: pods on a node the node controller declared lost (phase ``Failed``, reason
  ``NodeLost``) have their processes killed; a dead node starts nothing and answers no deletion
  until its pods are lost;
* **events**: Created, Started, Killing, BackOff, Failed, FailedMount.

:meth:`Kubelet.stop` kills every process it started (no orphans).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from loco_local import procs
from loco_local.apiclient import ApiClient, ApiError, Controller, Informer, Obj, now_rfc3339, wait_any
from loco_local.nodes import wants_ready
from loco_local.podpaths import (PathError, claim_name, container_path, open_within, plan_mounts, pod_path_problems,
                                 remove_owned, resolve_within, show_entries, volume_path)
from loco_local.scheduler import quantity

log = logging.getLogger(__name__)

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MAX_TERMINATION_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
DEFAULT_GRACE_S = 30.0
MAX_BACKOFF_S = 30.0
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")
_PYTHON_NAMES = re.compile(r"^python(3(\.\d+)?)?$")


class ContainerConfigError(Exception):
    """The pod cannot start as specified (missing ConfigMap key, unknown volume, unsafe path, ...)."""


@contextlib.contextmanager
def config_error(what: str) -> Iterator[None]:
    """An unsafe path found inside the block becomes a ContainerConfigError about ``what``."""
    try:
        yield
    except PathError as exc:
        raise ContainerConfigError(f"{what}: {exc}") from None


def pod_dir(state_dir: Path, namespace: str, name: str) -> Path:
    return state_dir / "pods" / namespace / name


def teardown_pod_dirs(directory: Path) -> None:
    """What deleting a pod removes: its container root and its own volumes' backing (emptyDir,
    configMap, ...), never following a symlink into another volume; its logs stay."""
    for sub in ("root", "volumes"):
        try:
            remove_owned(directory / sub)
        except OSError as exc:  # e.g. a directory a container made unwritable: leave it, keep the kubelet going
            log.warning("pod directory %s not removed: %s", directory / sub, exc)


# ---------------------------------------------------------------------------------- pure helpers


def expand_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known variables are replaced, unknown references are kept,
    ``$$`` escapes a dollar."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(repl, text)


def field_ref(pod: Obj, path: str) -> str:
    """The value of a downward-API ``fieldRef.fieldPath`` for ``pod``; ValueError if unsupported."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
        "status.podIPs": status.get("podIP"),
        "status.hostIPs": status.get("hostIP"),
    }
    if path in simple:
        return str(simple[path] or "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ValueError(f"fieldRef.fieldPath {path!r} is not supported; use one of {sorted(simple)} or metadata.labels['KEY']")


def resource_field(container: Obj, ref: Obj, node_allocatable: dict[str, str]) -> str:
    """A ``resourceFieldRef`` value: ceil(quantity / divisor); limits fall back to the node's allocatable."""
    resource = ref.get("resource", "")
    kind, _, name = resource.partition(".")
    if kind not in ("limits", "requests") or name not in ("cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"):
        raise ValueError(f"resourceFieldRef.resource {resource!r} must be limits.cpu, requests.cpu, limits.memory, ...")
    res = container.get("resources") or {}
    value = (res.get(kind) or {}).get(name)
    if value is None and kind == "requests":
        value = (res.get("limits") or {}).get(name, "0")
    if value is None:
        value = node_allocatable.get(name, "0")
    divisor = quantity(ref.get("divisor") or "1")
    return str(math.ceil(quantity(value) / divisor)) if divisor else "0"


def hosts_lines(pods: list[Obj]) -> list[str]:
    """The hosts-file lines (sorted) for every unfinished pod that has an IP, hostname and subdomain."""
    lines = []
    for pod in pods:
        spec, status, meta = pod.get("spec") or {}, pod.get("status") or {}, pod.get("metadata") or {}
        ip, host, sub = status.get("podIP"), spec.get("hostname"), spec.get("subdomain")
        if not (ip and host and sub) or status.get("phase") in ("Succeeded", "Failed"):
            continue
        ns = meta.get("namespace") or "default"
        lines.append(f"{ip}\t{host}.{sub}.{ns}.svc.cluster.local {host}.{sub}.{ns}.svc {host}.{sub}")
    return sorted(lines)


def lost_containers_status(pod: Obj) -> Obj | None:
    """The status of a pod whose containers an earlier kubelet started and nobody runs any more (that kubelet
    died, and its processes with it: a node reboot, to the pod), or None when it is not such a pod.

    As the real kubelet after a reboot: a ``restartPolicy: Never`` pod fails, its containers terminated with
    ``ContainerStatusUnknown`` (exit code 137); other pods are started again, their restarts counted.
    """
    status = pod.get("status") or {}
    started = [cs for cs in status.get("containerStatuses") or []
               if set(cs.get("state") or {}) & {"running", "terminated"} or cs.get("restartCount")]
    if not started or (pod.get("spec") or {}).get("restartPolicy", "Always") != "Never":
        return None
    now = now_rfc3339()
    lost = {"exitCode": 137, "reason": "ContainerStatusUnknown", "finishedAt": now,
            "message": "The container could not be located when the pod was terminated"}
    containers = [{**cs, "ready": False, "started": False,
                   "state": {"terminated": (cs.get("state") or {}).get("terminated") or {**lost, "startedAt": (
                       (cs.get("state") or {}).get("running") or {}).get("startedAt")}}}
                  for cs in status.get("containerStatuses") or []]
    return {"phase": "Failed", "reason": "ContainerStatusUnknown", "containerStatuses": containers,
            "message": "The node's kubelet restarted and the pod's containers were gone",
            "conditions": [{"type": t, "status": "False", "lastTransitionTime": now}
                           for t in ("Ready", "ContainersReady")]}


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and rename (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def exit_reason(code: int) -> str:
    return "Completed" if code == 0 else "Error"


# ------------------------------------------------------------------------------------ containers


def next_readiness(probe: Obj, ready: bool, successes: int, failures: int, ok: bool) -> tuple[bool, int, int]:
    """A readinessProbe result folded into (ready, consecutive successes, consecutive failures), as the
    kubelet does: Ready after ``successThreshold`` (1) successes in a row, not Ready after
    ``failureThreshold`` (3) failures in a row; a container starts not Ready."""
    if ok:
        successes, failures = successes + 1, 0
        return (ready or successes >= int(probe.get("successThreshold", 1))), successes, failures
    successes, failures = 0, failures + 1
    return (ready and failures < int(probe.get("failureThreshold", 3))), successes, failures


@dataclass
class ContainerRun:
    """Runtime state of one container of a pod."""

    spec: Obj
    init: bool = False
    proc: asyncio.subprocess.Process | None = None
    wait_task: asyncio.Task[int] | None = None
    started_at: str | None = None
    terminated: Obj | None = None  # the current terminated state, if exited
    last_terminated: Obj | None = None
    waiting: Obj | None = field(default_factory=lambda: {"reason": "ContainerCreating"})
    restart_count: int = 0
    next_start_at: float | None = None  # monotonic time of the next (re)start when backing off
    ready: bool = False
    probe_at: float = 0.0
    probe_successes: int = 0  # consecutive readinessProbe results (successThreshold / failureThreshold)
    probe_failures: int = 0

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.terminated is None

    def status(self) -> Obj:
        if self.running:
            state: Obj = {"running": {"startedAt": self.started_at}}
        elif self.terminated is not None and self.next_start_at is None:
            state = {"terminated": self.terminated}
        else:
            state = {"waiting": self.waiting or {"reason": "ContainerCreating"}}
        out: Obj = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready and self.running,
            "started": self.running,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }
        if self.proc is not None:
            out["containerID"] = f"loco-local://{self.proc.pid}"
        return out


class PodWorker:
    """Runs one pod from start to final status (and deletion). Driven by :class:`Kubelet`."""

    def __init__(self, kubelet: "Kubelet", pod: Obj, ip: str, host_ip: str) -> None:
        self.kubelet = kubelet
        self.pod = pod
        self.ip = ip
        self.host_ip = host_ip
        meta = pod["metadata"]
        self.ns, self.name, self.uid = meta.get("namespace") or "default", meta["name"], meta.get("uid")
        self.path = f"/api/v1/namespaces/{self.ns}/pods/{self.name}"
        self.dir = pod_dir(kubelet.state_dir, self.ns, self.name)
        self.root = self.dir / "root"
        self._roots: list[Path] = [self.root]  # where container paths may lead: the root and mounted volumes
        spec = pod.get("spec") or {}
        self.restart_policy = spec.get("restartPolicy") or "Always"
        self.inits = [ContainerRun(c, init=True) for c in spec.get("initContainers") or []]
        self.mains = [ContainerRun(c) for c in spec.get("containers") or []]
        self.start_time = now_rfc3339()
        self.initialized = not self.inits
        self.phase = "Pending"
        self._transitions: dict[str, tuple[str, str]] = {}
        self._published: Obj | None = None
        self._wake = asyncio.Event()
        self._envs: dict[str, dict[str, str]] = {}
        self.task: asyncio.Task[None] | None = None
        self.gone = False  # the pod object was removed (force-deleted): stop without writing status

    # -------------------------------------------------------------- driven by the kubelet

    def update(self, pod: Obj) -> None:
        """A newer version of the pod object arrived (or :attr:`gone` changed): wake the worker."""
        if pod is not self.pod:
            self.pod = pod
            self._wake.set()

    def forget(self) -> None:
        """The pod object is gone from the API (force-deleted): kill its processes, report nothing."""
        self.gone = True
        self._wake.set()

    @property
    def deleting(self) -> bool:
        return bool(self.pod["metadata"].get("deletionTimestamp"))

    @property
    def node_lost(self) -> bool:
        return (self.pod.get("status") or {}).get("reason") == "NodeLost"

    def node_alive(self) -> bool:
        node = self.kubelet.nodes.cache.get(self.pod["spec"]["nodeName"])
        return node is None or wants_ready(node)

    async def kill_all(self, grace_s: float) -> None:
        """SIGTERM every running container group, wait up to ``grace_s``, SIGKILL the rest."""
        running = [c for c in self.inits + self.mains if c.proc is not None and c.terminated is None]
        for c in running:
            procs.signal_group(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in running:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(c.wait_task), max(0.0, deadline - time.monotonic()))
        for c in running:
            procs.signal_group(c.proc.pid, signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(c.wait_task), 10)
            self._record_exit(c)

    # -------------------------------------------------------------------------- main flow

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a broken pod must not take the kubelet down
            log.exception("pod %s/%s worker failed", self.ns, self.name)
        finally:
            await self.kill_all(grace_s=0)
            self.kubelet.worker_done(self)

    async def _run(self) -> None:
        self._reset_dirs()
        await self._publish()
        # 1. volumes and environments (retried until they resolve or the pod goes away)
        backoff = 0.5
        while True:
            if await self._stop_requested():
                return
            try:
                await self._prepare()
                break
            except ContainerConfigError as exc:
                for c in self.inits + self.mains:
                    c.waiting = {"reason": "CreateContainerConfigError", "message": str(exc)}
                await self.kubelet.api.event(self.pod, "Failed", f"Error: {exc}", type_="Warning", host=self._node)
                await self._publish()
                await self._sleep_or_wake(5.0)
            except (ApiError, aiohttp.ClientError) as exc:
                # as a real kubelet, a volume source the API would not give is retried, not the end of the pod: on a
                # real control plane the Node authorizer refuses a just-bound pod's ConfigMap and Secret (403, "no
                # relationship found between node ...") until its graph has seen the binding
                await self.kubelet.api.event(self.pod, "FailedMount", f"MountVolume.SetUp failed: {exc}",
                                             type_="Warning", host=self._node)
                await self._sleep_or_wake(backoff)
                backoff = min(backoff * 2, 30.0)
        # 2. init containers, in order
        for c in self.inits:
            while True:
                if await self._stop_requested():
                    return
                if not await self._start(c):
                    if self.restart_policy == "Never":
                        return await self._finish()
                else:
                    await self._publish()
                    while c.terminated is None:
                        await self._wait_events([c])
                        if await self._stop_requested():
                            return
                    await self._publish()
                    if c.terminated["exitCode"] == 0:
                        break
                    if self.restart_policy == "Never":
                        return await self._finish()
                await self._back_off(c)
                while (c.next_start_at or 0) > time.monotonic():
                    if await self._stop_requested():
                        return
                    await self._sleep_or_wake(max(0.0, (c.next_start_at or 0) - time.monotonic()))
                c.next_start_at = None
        self.initialized = True
        # 3. main containers
        for c in self.mains:
            await self._start(c)
        await self._publish()
        while True:
            if await self._stop_requested():
                return
            now = time.monotonic()
            for c in self.mains:
                if c.terminated is not None and c.next_start_at is None and self._restarts(c):
                    await self._back_off(c)
                if c.next_start_at is not None and now >= c.next_start_at:
                    c.next_start_at = None
                    await self._start(c)
            await self._probe()
            if all(c.terminated is not None and c.next_start_at is None for c in self.mains):
                return await self._finish()
            await self._publish()
            timeouts = [1.0] + [max(0.05, c.next_start_at - now) for c in self.mains if c.next_start_at]
            await self._wait_events(self.mains, min(timeouts))

    def _restarts(self, c: ContainerRun) -> bool:
        code = (c.terminated or {}).get("exitCode", 0)
        return self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and code != 0)

    async def _back_off(self, c: ContainerRun) -> None:
        delay = min(MAX_BACKOFF_S, self.kubelet.restart_backoff_s * (2 ** min(c.restart_count, 10)))
        c.next_start_at = time.monotonic() + delay
        c.last_terminated = c.terminated
        c.waiting = {"reason": "CrashLoopBackOff",
                     "message": f"back-off {delay:g}s restarting failed container={c.name} pod={self.name}_{self.ns}({self.uid})"}
        c.restart_count += 1
        if (c.terminated or {}).get("exitCode", 0) != 0:
            await self.kubelet.api.event(self.pod, "BackOff", f"Back-off restarting failed container {c.name} in pod {self.name}",
                                         type_="Warning", host=self._node)
        await self._publish()

    async def _stop_requested(self) -> bool:
        """Handle deletion / node loss; True when the worker must return."""
        if self.gone or self.node_lost:
            await self.kill_all(grace_s=0)
            return True
        if self.deleting and self.node_alive():
            grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
            if grace is None:
                grace = (self.pod.get("spec") or {}).get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
            for c in self.inits + self.mains:
                if c.running:
                    await self.kubelet.api.event(self.pod, "Killing", f"Stopping container {c.name}", host=self._node)
            await self.kill_all(grace_s=float(grace))
            for c in self.inits + self.mains:
                c.next_start_at = None
            await self._finish()
            teardown_pod_dirs(self.dir)
            await self.kubelet.api.delete(self.path, {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}})
            return True
        return False

    async def _finish(self) -> None:
        codes = [(c.terminated or {}).get("exitCode", 1) for c in self.mains if c.terminated or c.proc]
        if self.inits and not self.initialized:
            codes.append(1)
        self.phase = "Succeeded" if codes and all(code == 0 for code in codes) else "Failed"
        await self._publish()

    # -------------------------------------------------------------------------- processes

    @property
    def _node(self) -> str:
        return self.pod["spec"].get("nodeName", "")

    async def _start(self, c: ContainerRun) -> bool:
        """Start ``c``; False (with a StartError terminated state) when it cannot be executed."""
        spec = c.spec
        env = self._envs[c.name]
        argv = [expand_vars(a, env) for a in (spec.get("command") or []) + (spec.get("args") or [])]
        try:
            if not argv:
                raise FileNotFoundError(f"container {c.name} has no command: the embedded cluster has no image entrypoints; "
                                        f"set spec.containers[].command")
            argv[0] = self._resolve_exe(argv[0], env["PATH"])
            workdir = self._inside(spec.get("workingDir") or "/")
            workdir.mkdir(parents=True, exist_ok=True)
            self._reset_termination_file(c)
            with open(self.dir / f"{c.name}.log", "ab") as logf:
                c.proc = await asyncio.create_subprocess_exec(
                    *argv, cwd=workdir, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=logf,
                    stderr=asyncio.subprocess.STDOUT, start_new_session=True, preexec_fn=procs.die_with_parent,
                )
        except (OSError, ValueError) as exc:
            stamp = now_rfc3339()
            c.proc = None
            c.terminated = {"exitCode": 128, "reason": "StartError", "message": str(exc), "startedAt": stamp,
                            "finishedAt": stamp}
            await self.kubelet.api.event(self.pod, "Failed", f"Error: {exc}", type_="Warning", host=self._node)
            await self._publish()
            return False
        procs.write_pid_file(self.dir / f"{c.name}.pid", c.proc.pid)
        c.started_at = now_rfc3339()
        c.terminated = None
        c.waiting = None
        c.ready, c.probe_successes, c.probe_failures = False, 0, 0
        c.probe_at = time.monotonic() + float((spec.get("readinessProbe") or {}).get("initialDelaySeconds", 0))
        c.wait_task = asyncio.create_task(c.proc.wait())
        await self.kubelet.api.event(self.pod, "Created", f"Created container {c.name}", host=self._node)
        await self.kubelet.api.event(self.pod, "Started", f"Started container {c.name}", host=self._node)
        return True

    def _resolve_exe(self, exe: str, path: str) -> str:
        if _PYTHON_NAMES.match(exe):
            return sys.executable
        if "/" in exe:
            if os.path.isabs(exe) and not os.path.exists(exe) and self._container_path(exe).exists():
                return str(self._container_path(exe))
            return exe
        found = shutil.which(exe, path=path)
        if not found:
            raise FileNotFoundError(f'exec: "{exe}": executable file not found in $PATH')
        return found

    async def _wait_events(self, containers: list[ContainerRun], timeout: float | None = None) -> None:
        """Wait until a container exits, the pod object changes, or ``timeout`` passes."""
        waits = [asyncio.shield(c.wait_task) for c in containers if c.running and c.wait_task]
        await wait_any(*waits, self._wake.wait(), timeout_s=timeout)
        self._wake.clear()
        for c in containers:
            if c.running and c.wait_task and c.wait_task.done():
                self._record_exit(c)

    async def _sleep_or_wake(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    def _record_exit(self, c: ContainerRun) -> None:
        if c.proc is None or c.terminated is not None or c.proc.returncode is None:
            return
        rc = c.proc.returncode
        procs.signal_group(c.proc.pid, signal.SIGKILL, descendants=False)  # a container ends with its main process
        with contextlib.suppress(OSError):
            (self.dir / f"{c.name}.pid").unlink()
        code, sig = (128 - rc, -rc) if rc < 0 else (rc, None)
        state: Obj = {"exitCode": code, "reason": exit_reason(code), "startedAt": c.started_at,
                      "finishedAt": now_rfc3339(), "containerID": f"loco-local://{c.proc.pid}"}
        if sig:
            state["signal"] = sig
        message = self._termination_message(c, code)
        if message:
            state["message"] = message
        c.terminated = state
        c.ready = False

    def _termination_file(self, c: ContainerRun) -> Path:
        return self._inside(c.spec.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH)

    def _reset_termination_file(self, c: ContainerRun) -> None:
        """An empty termination message file; PathError if its path leads out of the pod."""
        term = self._termination_file(c)
        term.parent.mkdir(parents=True, exist_ok=True)
        fd = open_within(term, self._roots, os.O_WRONLY | os.O_CREAT)
        os.ftruncate(fd, 0)
        os.close(fd)

    def _termination_message(self, c: ContainerRun, code: int) -> str:
        try:
            # the container may have replaced the file by a link or a pipe: read only a file inside
            fd = open_within(self._termination_file(c), self._roots, os.O_RDONLY)
            with os.fdopen(fd, "rb") as f:
                message = f.read(MAX_TERMINATION_MESSAGE_BYTES).decode(errors="replace")
        except (OSError, ValueError):
            message = ""
        if not message and code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            try:
                lines = (self.dir / f"{c.name}.log").read_bytes().decode(errors="replace").splitlines()
            except OSError:
                lines = []
            message = "\n".join(lines[-FALLBACK_LOG_LINES:])[-2048:]
        return message

    # ------------------------------------------------------------------------------ probes

    async def _probe(self) -> None:
        for c in self.mains:
            if not c.running:
                continue
            probe = c.spec.get("readinessProbe")
            if not probe:
                c.ready = True
                continue
            if time.monotonic() < c.probe_at:
                continue
            c.probe_at = time.monotonic() + float(probe.get("periodSeconds", 10))
            c.ready, c.probe_successes, c.probe_failures = next_readiness(
                probe, c.ready, c.probe_successes, c.probe_failures, await self._probe_once(c, probe))

    async def _probe_once(self, c: ContainerRun, probe: Obj) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        ports = {p.get("name"): p.get("containerPort") for p in c.spec.get("ports") or []}

        def port_of(raw: Any) -> int:
            return int(ports.get(raw, raw))

        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                url = (f"{(get.get('scheme') or 'HTTP').lower()}://{get.get('host') or self.ip}:{port_of(get['port'])}"
                       f"{get.get('path') or '/'}")
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
                    async with session.get(url) as resp:
                        return 200 <= resp.status < 400
            if "tcpSocket" in probe:
                sock = probe["tcpSocket"]
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(sock.get("host") or self.ip, port_of(sock["port"])), timeout)
                writer.close()
                return True
        except (OSError, aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
            return False
        return True  # exec probes are not emulated: a running container counts as ready

    # -------------------------------------------------------------------------- filesystem

    def _container_path(self, path: str) -> Path:
        """A container path as a host path in the root (symlinks not resolved); PathError on ``..``."""
        return self.root / container_path(path)

    def _inside(self, path: str) -> Path:
        """A container path as a host path in the root; PathError unless, symlinks resolved, it stays in the
        root or a mounted volume."""
        host = self._container_path(path)
        resolve_within(host, self._roots)
        return host

    def _reset_dirs(self) -> None:
        teardown_pod_dirs(self.dir)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.dir / "volumes").mkdir(exist_ok=True)
        for c in self.inits + self.mains:
            (self.dir / f"{c.name}.log").write_bytes(b"")

    async def _prepare(self) -> None:
        """Check the pod's paths, materialise volumes and mounts, and build each container's environment."""
        spec = self.pod.get("spec") or {}
        problems = pod_path_problems(spec)
        if problems:
            raise ContainerConfigError("; ".join(problems))
        volumes = {vol["name"]: await self._materialise(vol) for vol in spec.get("volumes") or []}
        mounts: dict[PurePosixPath, Path] = {}
        for c in self.inits + self.mains:
            self._envs[c.name] = await self._environment(c)
            for mount in c.spec.get("volumeMounts") or []:
                mounts[container_path(mount["mountPath"])] = self._mount_source(c, mount, volumes)
        self._build_root(mounts)

    def _mount_source(self, c: ContainerRun, mount: Obj, volumes: dict[str, Path]) -> Path:
        """The host directory ``mount`` shows: its volume, or the (created) subPath inside it."""
        src = volumes.get(mount.get("name"))
        if src is None:
            raise ContainerConfigError(
                f"container {c.name}: volumeMounts {mount.get('name')!r} names no volume in spec.volumes")
        sub = mount.get("subPath") or expand_vars(mount.get("subPathExpr") or "", self._envs[c.name])
        if not sub:
            return src
        with config_error(f"container {c.name}: volumeMounts {mount['name']!r} subPath"):
            path = resolve_within(src / volume_path(sub), [src])  # a symlink in the volume may not lead out
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _build_root(self, mounts: dict[PurePosixPath, Path]) -> None:
        """Lay the container root out afresh for ``mounts`` (container path -> host source): a symlink per
        mount, directories showing the outer volume where mounts nest; nothing is written into a volume."""
        remove_owned(self.root)
        self.root.mkdir(parents=True)
        steps = plan_mounts(mounts)
        children: dict[PurePosixPath, set[str]] = defaultdict(set)
        for step in steps:
            children[step.path.parent].add(step.path.name)
        for step in steps:
            target = self.root / step.path
            if step.link:
                target.symlink_to(step.source)
                continue
            target.mkdir()
            if step.source is not None and step.within is not None:
                show_entries(target, step.source, step.within, children[step.path])
        if any(not step.link and step.source is not None for step in steps):
            log.info("pod %s/%s: volumes mounted inside others; entries created directly in the outer mount's "
                     "directory stay in the pod's root", self.ns, self.name)
        self._roots = [self.root, *mounts.values()]

    async def _get(self, kind: str, name: str, optional: bool) -> Obj | None:
        try:
            return await self.kubelet.api.get(f"/api/v1/namespaces/{self.ns}/{kind}s/{name}")
        except ApiError as exc:
            if exc.status == 404:
                if optional:
                    return None
                raise ContainerConfigError(f'{kind} "{name}" not found') from None
            raise

    @staticmethod
    def _data(kind: str, obj: Obj | None) -> dict[str, str]:
        if obj is None:
            return {}
        if kind == "secret":
            data = {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
            data.update(obj.get("stringData") or {})
            return data
        return dict(obj.get("data") or {})

    async def _materialise(self, vol: Obj) -> Path:
        name = vol["name"]
        target = self.dir / "volumes" / name
        if "emptyDir" in vol:
            target.mkdir(parents=True, exist_ok=True)
            return target
        if "hostPath" in vol:
            host = Path(vol["hostPath"]["path"])
            kind = vol["hostPath"].get("type") or ""
            if kind in ("DirectoryOrCreate",) and not host.exists():
                host.mkdir(parents=True, exist_ok=True)
            if kind in ("Directory", "File") and not host.exists():
                raise ContainerConfigError(f"volume {name}: hostPath {host} does not exist (type {kind})")
            return host
        if "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"].get("claimName")
            if not claim:
                raise ContainerConfigError(f"volume {name}: persistentVolumeClaim.claimName is empty")
            with config_error(f"volume {name}: persistentVolumeClaim.claimName"):
                shared = self.kubelet.state_dir / "volumes" / self.ns / claim_name(claim)
            shared.mkdir(parents=True, exist_ok=True)
            return shared
        for kind, key in (("configMap", "name"), ("secret", "secretName")):
            if kind in vol:
                src = vol[kind]
                resource = "configmap" if kind == "configMap" else "secret"
                data = self._data(resource, await self._get(resource, src.get(key, ""), bool(src.get("optional"))))
                mode = int(src.get("defaultMode", 0o644))
                items = src.get("items") or [{"key": k, "path": k} for k in data]
                target.mkdir(parents=True, exist_ok=True)
                for item in items:
                    if item["key"] not in data:
                        if src.get("optional"):
                            continue
                        raise ContainerConfigError(f'volume {name}: key "{item["key"]}" not found in {resource} "{src.get(key)}"')
                    self._write_item(target, item.get("path", item["key"]), data[item["key"]], int(item.get("mode", mode)))
                return target
        if "downwardAPI" in vol:
            target.mkdir(parents=True, exist_ok=True)
            for item in vol["downwardAPI"].get("items") or []:
                try:
                    value = field_ref(self._pod_with_status(), (item.get("fieldRef") or {}).get("fieldPath", ""))
                except ValueError as exc:
                    raise ContainerConfigError(f"volume {name}: {exc}") from None
                mode = item.get("mode", vol["downwardAPI"].get("defaultMode", 0o644))
                self._write_item(target, item["path"], value, int(mode))
            return target
        raise ContainerConfigError(
            f"volume {name}: only emptyDir, hostPath, persistentVolumeClaim, configMap, secret and downwardAPI "
            f"volumes are supported by the embedded cluster")

    @staticmethod
    def _write_item(volume: Path, path: str, text: str, mode: int) -> None:
        """One file of a configMap/secret/downwardAPI volume; ConfigError if ``path`` (an item path, or a
        key, which the embedded API server does not check) would leave the volume."""
        with config_error(f"volume {volume.name}: item path"):
            file = resolve_within(volume / volume_path(path, reserved=True), [volume])
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)
        file.chmod(mode & 0o777)  # permission bits only, as kube-apiserver allows

    def _pod_with_status(self) -> Obj:
        return {**self.pod, "status": {**(self.pod.get("status") or {}), "podIP": self.ip, "hostIP": self.host_ip}}

    async def _environment(self, c: ContainerRun) -> dict[str, str]:
        pod = self._pod_with_status()
        env: dict[str, str] = {}
        for src in c.spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind, ref_key in (("configmap", "configMapRef"), ("secret", "secretRef")):
                if ref_key in src:
                    ref = src[ref_key]
                    data = self._data(kind, await self._get(kind, ref.get("name", ""), bool(ref.get("optional"))))
                    env.update({prefix + k: v for k, v in data.items()})
        for var in c.spec.get("env") or []:
            name = var["name"]
            if "value" in var or "valueFrom" not in var:
                env[name] = expand_vars(str(var.get("value", "")), env)
                continue
            source = var["valueFrom"]
            try:
                if "fieldRef" in source:
                    env[name] = field_ref(pod, source["fieldRef"].get("fieldPath", ""))
                elif "resourceFieldRef" in source:
                    ref = source["resourceFieldRef"]
                    target = next((x.spec for x in self.inits + self.mains if x.name == ref.get("containerName")), c.spec)
                    env[name] = resource_field(target, ref, self.kubelet.node_allocatable(self._node))
                else:
                    for kind, ref_key in (("configmap", "configMapKeyRef"), ("secret", "secretKeyRef")):
                        if ref_key in source:
                            ref = source[ref_key]
                            optional = bool(ref.get("optional"))
                            data = self._data(kind, await self._get(kind, ref.get("name", ""), optional))
                            if ref.get("key") in data:
                                env[name] = data[ref["key"]]
                            elif not optional:
                                raise ContainerConfigError(
                                    f'couldn\'t find key {ref.get("key")} in {kind.replace("configmap", "ConfigMap").replace("secret", "Secret")} '
                                    f'{self.ns}/{ref.get("name")} (env {name})')
            except ValueError as exc:
                raise ContainerConfigError(f"container {c.name}: env {name}: {exc}") from None
        exe_dir = str(Path(sys.executable).parent)
        env["PATH"] = exe_dir + os.pathsep + env.get("PATH", os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"))
        env.setdefault("HOSTNAME", (self.pod.get("spec") or {}).get("hostname") or self.name)
        env.setdefault("HOME", os.environ.get("HOME", "/root"))
        for passthrough in ("LANG", "LC_ALL", "TMPDIR", "PYTHONPATH"):
            if passthrough in os.environ:
                env.setdefault(passthrough, os.environ[passthrough])
        env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"] = self.kubelet.api_host_port
        env["LOCO_LOCAL_ROOT"] = str(self.root)
        env["LOCO_LOCAL_HOSTS"] = str(self.kubelet.hosts_file)
        return env

    # ------------------------------------------------------------------------------ status

    def _condition(self, kind: str, ok: bool, reason: str | None = None) -> Obj:
        status = "True" if ok else "False"
        prev = self._transitions.get(kind)
        if prev is None or prev[0] != status:
            self._transitions[kind] = (status, now_rfc3339())
        cond: Obj = {"type": kind, "status": status, "lastProbeTime": None,
                     "lastTransitionTime": self._transitions[kind][1]}
        if reason and not ok:
            cond["reason"] = reason
        return cond

    def status(self) -> Obj:
        """The pod status as the kubelet reports it."""
        if self.phase not in ("Succeeded", "Failed"):
            running = any(c.running or c.next_start_at is not None for c in self.mains)
            self.phase = "Running" if self.initialized and running else "Pending"
        ready = self.initialized and bool(self.mains) and all(c.ready and c.running for c in self.mains)
        terminal = self.phase in ("Succeeded", "Failed")
        not_ready_reason = "PodCompleted" if terminal else "ContainersNotReady"
        status: Obj = {
            "phase": self.phase,
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "hostIP": self.host_ip,
            "hostIPs": [{"ip": self.host_ip}],
            "startTime": self.start_time,
            "conditions": [
                self._condition("Initialized", self.initialized, "ContainersNotInitialized"),
                self._condition("Ready", ready, not_ready_reason),
                self._condition("ContainersReady", ready, not_ready_reason),
                {"type": "PodScheduled", "status": "True", "lastProbeTime": None,
                 "lastTransitionTime": self._transitions.setdefault("PodScheduled", ("True", self.start_time))[1]},
            ],
            "containerStatuses": [c.status() for c in self.mains],
        }
        if self.inits:
            status["initContainerStatuses"] = [c.status() for c in self.inits]
        return status

    async def _publish(self) -> None:
        if self.gone or not self.node_alive():
            self._published = None  # a dead node's kubelet posts nothing; once revived, it posts again
            return
        status = self.status()
        if status == self._published:
            return
        try:
            await self.kubelet.api.patch_status(self.path, status)
            self._published = status
        except ApiError as exc:
            if exc.status != 404:
                log.warning("status of %s/%s not written: %s", self.ns, self.name, exc)
        self.kubelet.poke()


# --------------------------------------------------------------------------------------- kubelet


class Kubelet(Controller):
    """Runs the pods bound to ``node_names`` (see the module docstring)."""

    task_name = "kubelet"

    def __init__(
        self,
        api: ApiClient,
        pods: Informer,
        nodes: Informer,
        state_dir: Path,
        node_addresses: dict[str, str],
        *,
        octet2: int,
        restart_backoff_s: float = 1.0,
        stop_grace_s: float = 3.0,
        pod_ip_blocks: range = range(1, 256),
        write_hosts: bool = True,
    ) -> None:
        self.api = api
        self.pods = pods
        self.nodes = nodes
        self.state_dir = Path(state_dir)
        self.node_addresses = dict(node_addresses)
        self.octet2 = octet2
        self.restart_backoff_s = restart_backoff_s
        self.stop_grace_s = stop_grace_s
        self.hosts_file = self.state_dir / "hosts"
        # third octets of this kubelet's pod IPs (node agents of one cluster each get their own block)
        self.pod_ip_blocks = pod_ip_blocks
        # the embedded kubelet sees every pod and writes the DNS hosts file; a node agent of the real
        # control plane sees its own pods only, so the cluster's DNS controller writes it instead
        self.write_hosts = write_hosts
        self.workers: dict[str, PodWorker] = {}
        self._done: dict[str, Path] = {}  # uid -> directory of the pods whose worker finished: never started again
        self._ips: dict[str, str] = {}  # uid -> ip
        self._poke = asyncio.Event()

    @property
    def api_host_port(self) -> tuple[str, str]:
        parts = urlsplit(self.api.url)
        return parts.hostname or "127.0.0.1", str(parts.port or 80)

    def node_allocatable(self, node: str) -> dict[str, str]:
        obj = self.nodes.cache.get(node) or {}
        return (obj.get("status") or {}).get("allocatable") or {}

    def start(self) -> None:
        self.hosts_file.parent.mkdir(parents=True, exist_ok=True)
        if self.write_hosts and not self.hosts_file.exists():
            atomic_write(self.hosts_file, "")
        super().start()

    async def stop(self) -> None:
        """Stop syncing and kill every process started (SIGTERM, then SIGKILL after ``stop_grace_s``)."""
        await super().stop()
        workers = list(self.workers.values())
        await asyncio.gather(*(w.kill_all(self.stop_grace_s) for w in workers), return_exceptions=True)
        for w in workers:
            if w.task:
                w.task.cancel()
        await asyncio.gather(*(w.task for w in workers if w.task), return_exceptions=True)

    def poke(self) -> None:
        self._poke.set()

    def worker_done(self, worker: PodWorker) -> None:
        self.workers.pop(worker.uid, None)
        self._done[worker.uid] = worker.dir
        self.poke()

    async def _run(self) -> None:
        await self.pods.wait_synced()
        await self.nodes.wait_synced()
        version = -1
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("kubelet sync failed")
            self._poke.clear()
            seen = self.pods.version
            await wait_any(self.pods.changed(version, 2.0), self._poke.wait())
            version = seen

    def _allocate_ip(self, uid: str) -> str:
        used = set(self._ips.values()) | {(p.get("status") or {}).get("podIP") for p in self.pods.cache.values()}
        for block in self.pod_ip_blocks:
            for last in range(1, 255):
                ip = f"127.{self.octet2}.{block}.{last}"
                if ip not in used:
                    self._ips[uid] = ip
                    return ip
        raise RuntimeError(f"no free pod IP left in 127.{self.octet2}.{self.pod_ip_blocks}.0/24")

    async def sync(self) -> None:
        """Converge: start workers for new pods, pass updates, finish deletions, rewrite hosts."""
        pods = list(self.pods.cache.values())
        mine = [p for p in pods if (p.get("spec") or {}).get("nodeName") in self.node_addresses]
        live_uids = {p["metadata"].get("uid") for p in mine}
        self._tear_down_removed(live_uids)  # before a namesake of a removed pod starts in its directories
        for pod in mine:
            meta, spec = pod["metadata"], pod.get("spec") or {}
            uid = meta.get("uid")
            worker = self.workers.get(uid)
            if worker is not None:
                worker.update(pod)
                continue
            phase = (pod.get("status") or {}).get("phase")
            node = self.nodes.cache.get(spec["nodeName"])
            node_alive = node is None or wants_ready(node)
            if meta.get("deletionTimestamp"):
                # never started, already finished, or lost with its node: nothing left to stop
                if node_alive or phase in ("Succeeded", "Failed"):
                    teardown_pod_dirs(pod_dir(self.state_dir, meta.get("namespace") or "default", meta["name"]))
                    await self.api.delete(f"/api/v1/namespaces/{meta.get('namespace')}/pods/{meta['name']}",
                                          {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}})
                continue
            if uid in self._done or phase in ("Succeeded", "Failed") or not node_alive:
                continue
            lost = lost_containers_status(pod)
            if lost is not None:  # an earlier kubelet ran it and took its processes along when it died
                self._done[uid] = pod_dir(self.state_dir, meta.get("namespace") or "default", meta["name"])
                await self.api.patch_status(f"/api/v1/namespaces/{meta.get('namespace')}/pods/{meta['name']}", lost)
                continue
            if self._worker_named(meta.get("namespace") or "default", meta["name"]):
                continue  # a deleted namesake still tears down the directories it would use; next sync
            host_ip = self.node_addresses[spec["nodeName"]]
            ip = host_ip if spec.get("hostNetwork") else (self._ips.get(uid) or self._allocate_ip(uid))
            worker = PodWorker(self, pod, ip, host_ip)
            self.workers[uid] = worker
            worker.task = asyncio.create_task(worker.run(), name=f"pod {meta.get('namespace')}/{meta['name']}")
        for uid, worker in list(self.workers.items()):
            if uid not in live_uids:  # force-deleted: nobody waits for a status any more
                worker.forget()
        self._ips = {uid: ip for uid, ip in self._ips.items() if uid in live_uids}
        if self.write_hosts:
            self._write_hosts(pods)

    def _tear_down_removed(self, live_uids: set[str]) -> None:
        """Remove the directories of finished pods that are gone from the API (a finished pod is removed
        by the API server, not by its kubelet)."""
        for uid in [u for u in self._done if u not in live_uids]:
            teardown_pod_dirs(self._done.pop(uid))

    def _worker_named(self, namespace: str, name: str) -> bool:
        return any(w.ns == namespace and w.name == name for w in self.workers.values())

    def _write_hosts(self, pods: list[Obj]) -> None:
        text = "".join(line + "\n" for line in hosts_lines(pods))
        try:
            current = self.hosts_file.read_text()
        except OSError:
            current = None
        if text != current:
            atomic_write(self.hosts_file, text)
