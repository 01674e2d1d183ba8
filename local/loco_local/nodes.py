"""Fake nodes of the embedded cluster and the node controller that keeps them alive (or not).

A node is a :class:`NodeSpec` (name, capacity, labels, taints). The :class:`NodeController`
registers each as a ``Node`` object and posts ``Ready`` heartbeats, like a kubelet plus the node
lifecycle controller would.

Simulated failures travel through the API, so a test, ``LocalCluster.set_node_ready()`` and
``loco local node not-ready NAME`` all do the same thing: they set the annotation
:data:`READY_ANNOTATION` (``"false"``) on the Node. The controller then

1. stops the heartbeats, sets ``Ready=False`` (reason ``NodeNotReady``) and adds the taints
   ``node.kubernetes.io/not-ready`` with effects ``NoSchedule`` and ``NoExecute``;
2. after ``pod_eviction_timeout_s`` marks every unfinished pod on the node ``Failed`` with reason
   ``NodeLost`` (the kubelet then kills their processes: the node is dead).

Setting the annotation back to ``"true"`` (``node ready``) removes the taints and resumes the
heartbeats; pods already lost stay failed. Cordon is ``spec.unschedulable`` (honoured by the
scheduler).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import re
import uuid
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes.utils.quantity import parse_quantity

from loco_local.apiclient import ApiClient, ApiError, Controller, Informer, Obj, now_rfc3339, now_rfc3339_micro
from loco_local.scheduler import GPU, node_is_ready

log = logging.getLogger(__name__)

READY_ANNOTATION = "loco.dev/simulated-ready"
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
HOSTNAME_LABEL = "kubernetes.io/hostname"
DEFAULT_MAX_PODS = 110
KUBELET_VERSION = "v1.32.0-loco"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_PATH = "/apis/coordination.k8s.io/v1/namespaces"

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


@dataclass(frozen=True)
class NodeSpec:
    """One fake node. ``cpu``/``memory`` are Kubernetes quantities; ``taints`` are dicts
    ``{"key", "value", "effect"}`` (or strings ``key=value:Effect``)."""

    name: str
    cpu: str = "8"
    memory: str = "32Gi"
    gpus: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)
    max_pods: int = DEFAULT_MAX_PODS

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"node name {self.name!r} is not a valid DNS subdomain (lowercase letters, digits, '-', '.')")
        for what, value in (("cpu", self.cpu), ("memory", self.memory)):
            try:
                parse_quantity(value)
            except ValueError:
                raise ValueError(
                    f"node {self.name}: {what} {value!r} is not a Kubernetes quantity (e.g. cpu '8' or '500m', memory '32Gi')"
                ) from None
        if not isinstance(self.gpus, int) or self.gpus < 0:
            raise ValueError(f"node {self.name}: gpus must be a non-negative integer, got {self.gpus!r}")
        object.__setattr__(self, "taints", [parse_taint(t, self.name) for t in self.taints])
        object.__setattr__(self, "labels", {str(k): str(v) for k, v in self.labels.items()})

    @property
    def instance_type(self) -> str:
        return f"loco-local-{self.cpu}cpu-{self.memory}" + (f"-{self.gpus}gpu" if self.gpus else "")

    def capacity(self) -> dict[str, str]:
        cap = {"cpu": str(self.cpu), "memory": str(self.memory), "pods": str(self.max_pods),
               "ephemeral-storage": "100Gi"}
        if self.gpus:
            cap[GPU] = str(self.gpus)
        return cap


def parse_taint(taint: dict[str, Any] | str, node: str = "") -> dict[str, str]:
    """A taint from a dict or ``key[=value]:Effect``; raises ValueError naming the node and the fix."""
    if isinstance(taint, str):
        m = re.match(r"^([^=:]+)(?:=([^:]*))?:(\w+)$", taint)
        if not m:
            raise ValueError(f"node {node}: taint {taint!r} is not of the form key[=value]:Effect")
        taint = {"key": m.group(1), "value": m.group(2) or "", "effect": m.group(3)}
    if not taint.get("key"):
        raise ValueError(f"node {node}: taint {taint!r} has no key")
    if taint.get("effect") not in _EFFECTS:
        raise ValueError(f"node {node}: taint effect {taint.get('effect')!r} must be one of {', '.join(_EFFECTS)}")
    out = {"key": str(taint["key"]), "effect": str(taint["effect"])}
    if taint.get("value"):
        out["value"] = str(taint["value"])
    return out


def uniform_nodes(count: int, *, cpu: str = "8", memory: str = "32Gi", gpus: int = 0, prefix: str = "node") -> list[NodeSpec]:
    """``count`` identical nodes named ``node-0``, ``node-1``, ... (what ``--nodes N`` builds)."""
    if count < 1:
        raise ValueError(f"--nodes must be at least 1, got {count}")
    return [NodeSpec(name=f"{prefix}-{i}", cpu=cpu, memory=memory, gpus=gpus) for i in range(count)]


def load_nodes_file(path: Path) -> list[NodeSpec]:
    """Nodes from a YAML file: a list (or ``{nodes: [...]}``) of mappings with the :class:`NodeSpec`
    fields (``name``, ``cpu``, ``memory``, ``gpus``, ``labels``, ``taints``, ``maxPods``) and an
    optional ``count`` that expands one entry into ``name-0..name-(count-1)``."""
    data = yaml.safe_load(Path(path).read_text())
    if isinstance(data, dict):
        data = data.get("nodes")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of nodes (or a mapping with key 'nodes')")
    known = {"name", "cpu", "memory", "gpus", "labels", "taints", "maxPods", "max_pods", "count"}
    nodes: list[NodeSpec] = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"{path}: nodes[{i}] must be a mapping with at least 'name'")
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"{path}: nodes[{i}] has unknown field(s) {sorted(unknown)}; allowed: {sorted(known)}")
        kwargs = {
            "cpu": str(entry.get("cpu", "8")),
            "memory": str(entry.get("memory", "32Gi")),
            "gpus": entry.get("gpus", 0),
            "labels": entry.get("labels") or {},
            "taints": entry.get("taints") or [],
            "max_pods": int(entry.get("maxPods", entry.get("max_pods", DEFAULT_MAX_PODS))),
        }
        try:
            count = entry.get("count")
            if count is None:
                nodes.append(NodeSpec(name=str(entry["name"]), **kwargs))
            else:
                nodes.extend(NodeSpec(name=f"{entry['name']}-{j}", **kwargs) for j in range(int(count)))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: nodes[{i}]: {exc}") from None
    names = [n.name for n in nodes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate node names {dupes}")
    return nodes


def node_address(index: int, octet2: int) -> str:
    """The fake InternalIP of the ``index``-th node: ``127.<octet2>.0.<index+1>``."""
    return f"127.{octet2}.0.{index + 1}"


def node_object(spec: NodeSpec, address: str) -> Obj:
    """The ``Node`` manifest for ``spec`` (Ready, heartbeat now)."""
    node_uid = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{spec.name}.{address}"))
    labels = {
        HOSTNAME_LABEL: spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        INSTANCE_TYPE_LABEL: spec.instance_type,
        "loco.dev/local-node": "true",
        **spec.labels,
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": spec.name, "labels": labels, "annotations": {READY_ANNOTATION: "true"}},
        "spec": {"taints": list(spec.taints), "unschedulable": False},
        "status": {
            "capacity": spec.capacity(),
            "allocatable": spec.capacity(),
            "addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": spec.name}],
            "conditions": ready_conditions(True),
            # every field: the official client refuses a NodeSystemInfo with one missing
            "nodeInfo": {"kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": KUBELET_VERSION,
                         "operatingSystem": "linux", "architecture": "amd64", "osImage": "loco local (host processes)",
                         "kernelVersion": platform.release(), "containerRuntimeVersion": "loco-local://process",
                         "machineID": node_uid, "systemUUID": node_uid, "bootID": node_uid},
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        },
    }


def ready_conditions(ready: bool, since: str | None = None) -> list[Obj]:
    """The node conditions for a ready or a failed node."""
    stamp = now_rfc3339()
    base = [
        {"type": t, "status": "False", "reason": r, "message": m, "lastHeartbeatTime": stamp,
         "lastTransitionTime": since or stamp}
        for t, r, m in (
            ("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        )
    ]
    if ready:
        base.append({"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
                     "lastHeartbeatTime": stamp, "lastTransitionTime": since or stamp})
    else:
        base.append({"type": "Ready", "status": "False", "reason": "NodeNotReady",
                     "message": "Kubelet stopped posting node status (simulated node failure).",
                     "lastHeartbeatTime": stamp, "lastTransitionTime": since or stamp})
    return base


def ready_patch(ready: bool) -> Obj:
    """The merge patch that asks the node controller to fail (``False``) or revive a node."""
    return {"metadata": {"annotations": {READY_ANNOTATION: "true" if ready else "false"}}}


def cordon_patch(cordoned: bool) -> Obj:
    """The merge patch that cordons or uncordons a node (like ``kubectl cordon``)."""
    return {"spec": {"unschedulable": cordoned}}


def wants_ready(node: Obj) -> bool:
    """Whether the node is meant to be alive (the :data:`READY_ANNOTATION` is not ``"false"``)."""
    return ((node.get("metadata") or {}).get("annotations") or {}).get(READY_ANNOTATION, "true") != "false"


class NodeController(Controller):
    """Registers the nodes, posts heartbeats, and plays node failures (see the module docstring)."""

    task_name = "node-controller"

    def __init__(
        self,
        api: ApiClient,
        nodes_informer: Informer,
        pods_informer: Informer,
        specs: list[NodeSpec],
        *,
        octet2: int,
        heartbeat_s: float = 10.0,
        pod_eviction_timeout_s: float = 10.0,
    ) -> None:
        self.api = api
        self.nodes = nodes_informer
        self.pods = pods_informer
        self.specs = list(specs)
        self.octet2 = octet2
        self.heartbeat_s = heartbeat_s
        self.pod_eviction_timeout_s = pod_eviction_timeout_s
        self._down_since: dict[str, float] = {}  # node -> monotonic time it went down

    async def register(self) -> None:
        """Create (or replace) every node object and its Lease. Call before the informers start."""
        for index, spec in enumerate(self.specs):
            obj = node_object(spec, node_address(index, self.octet2))
            try:
                created = await self.api.create("/api/v1/nodes", obj)
            except ApiError as exc:
                if exc.status != 409:
                    raise
                created = await self.api.merge_patch(f"/api/v1/nodes/{spec.name}", {k: obj[k] for k in ("metadata", "spec")})
            # the status is written through /status (a create may drop it, as a real API server does)
            await self.api.patch_status(f"/api/v1/nodes/{spec.name}", obj["status"])
            await self._create_lease(created)

    async def _create_lease(self, node: Obj) -> None:
        """The node's heartbeat Lease in ``kube-node-lease`` (best effort: skipped if the server lacks leases)."""
        name = node["metadata"]["name"]
        lease = {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": LEASE_NAMESPACE, "ownerReferences": [
                {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node["metadata"].get("uid")}]},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now_rfc3339_micro()},
        }
        with contextlib.suppress(ApiError):
            await self.api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                         "metadata": {"name": LEASE_NAMESPACE}})
        try:
            await self.api.create(f"{LEASE_PATH}/{LEASE_NAMESPACE}/leases", lease)
        except ApiError as exc:
            if exc.status == 409:
                await self._renew_lease(name)
            else:
                log.debug("no node lease for %s: %s", name, exc)

    async def _renew_lease(self, name: str) -> None:
        with contextlib.suppress(ApiError):
            await self.api.merge_patch(f"{LEASE_PATH}/{LEASE_NAMESPACE}/leases/{name}",
                                       {"spec": {"renewTime": now_rfc3339_micro()}})

    async def _run(self) -> None:
        await self.nodes.wait_synced()
        last_beat = 0.0
        version = -1
        while True:
            try:
                beat = time.monotonic() - last_beat >= self.heartbeat_s
                await self.reconcile(heartbeat=beat)
                if beat:
                    last_beat = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("node controller round failed")
            version = await self.nodes.changed(version, min(1.0, self.heartbeat_s))

    async def reconcile(self, *, heartbeat: bool) -> None:
        """One round over our nodes: heartbeat live ones, fail dead ones, evict after the timeout."""
        ours = {s.name for s in self.specs}
        for node in list(self.nodes.cache.values()):
            name = node["metadata"]["name"]
            if name not in ours:
                continue
            if wants_ready(node):
                self._down_since.pop(name, None)
                await self._keep_alive(node, heartbeat)
            else:
                down_since = self._down_since.setdefault(name, time.monotonic())
                await self._mark_down(node)
                if time.monotonic() - down_since >= self.pod_eviction_timeout_s:
                    await self._evict_pods(name)

    async def _keep_alive(self, node: Obj, heartbeat: bool) -> None:
        name = node["metadata"]["name"]
        taints = (node.get("spec") or {}).get("taints") or []
        kept = [t for t in taints if t.get("key") != NOT_READY_TAINT]
        if len(kept) != len(taints):
            await self.api.merge_patch(f"/api/v1/nodes/{name}", {"spec": {"taints": kept}})
        if heartbeat:
            await self._renew_lease(name)
        if heartbeat or not node_is_ready(node):
            since = None
            if node_is_ready(node):
                since = next((c.get("lastTransitionTime") for c in node["status"]["conditions"] if c["type"] == "Ready"), None)
            await self.api.patch_status(f"/api/v1/nodes/{name}", {"conditions": ready_conditions(True, since)})

    async def _mark_down(self, node: Obj) -> None:
        name = node["metadata"]["name"]
        if node_is_ready(node):
            await self.api.patch_status(f"/api/v1/nodes/{name}", {"conditions": ready_conditions(False)})
            await self._mark_pods_not_ready(name)
        taints = (node.get("spec") or {}).get("taints") or []
        have = {(t.get("key"), t.get("effect")) for t in taints}
        missing = [{"key": NOT_READY_TAINT, "effect": e, "timeAdded": now_rfc3339()}
                   for e in ("NoSchedule", "NoExecute") if (NOT_READY_TAINT, e) not in have]
        if missing:
            await self.api.merge_patch(f"/api/v1/nodes/{name}", {"spec": {"taints": taints + missing}})

    async def _mark_pods_not_ready(self, node_name: str) -> None:
        """Like the node lifecycle controller: pods on a failed node lose ``Ready`` at once."""
        stamp = now_rfc3339()
        for pod in self._unfinished_pods(node_name):
            status = pod.get("status") or {}
            conditions = [
                {**c, "status": "False", "reason": "NodeNotReady", "lastTransitionTime": stamp}
                if c.get("type") in ("Ready", "ContainersReady") and c.get("status") == "True" else c
                for c in status.get("conditions") or []
            ]
            meta = pod["metadata"]
            with contextlib.suppress(ApiError):
                await self.api.patch_status(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                                            {"conditions": conditions})

    def _unfinished_pods(self, node_name: str) -> list[Obj]:
        return [p for p in self.pods.cache.values()
                if (p.get("spec") or {}).get("nodeName") == node_name
                and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]

    async def _evict_pods(self, node_name: str) -> None:
        for pod in self._unfinished_pods(node_name):
            status = pod.get("status") or {}
            meta = pod["metadata"]
            path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
            message = f"Node {node_name} which was running pod {meta['name']} is unresponsive"
            conditions = [c for c in status.get("conditions") or [] if c.get("type") not in ("Ready", "ContainersReady")]
            stamp = now_rfc3339()
            conditions += [{"type": t, "status": "False", "reason": "NodeLost", "lastTransitionTime": stamp,
                            "lastProbeTime": None} for t in ("ContainersReady", "Ready")]
            container_statuses = []
            for cs in status.get("containerStatuses") or []:
                state = cs.get("state") or {}
                started = (state.get("running") or {}).get("startedAt")
                if "terminated" not in state:
                    state = {"terminated": {"exitCode": 137, "reason": "NodeLost", "message": message,
                                            "startedAt": started, "finishedAt": stamp}}
                container_statuses.append({**cs, "state": state, "ready": False, "started": False})
            try:
                await self.api.patch_status(path, {"phase": "Failed", "reason": "NodeLost", "message": message,
                                                   "conditions": conditions, "containerStatuses": container_statuses})
            except ApiError as exc:
                if exc.status != 404:
                    raise
                continue
            await self.api.event(pod, "NodeLost", message, type_="Warning", component="node-controller")
