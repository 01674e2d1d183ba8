"""``RealCluster``: the real Kubernetes control plane plus Loco's process kubelets, on one machine.

:class:`loco_local.controlplane.ControlPlane` runs etcd, kube-apiserver, kube-controller-manager and
kube-scheduler; this adds what a small real cluster has besides, each with its own credential:

* one **node agent** process per node (:mod:`loco_local.nodeagent`, ``system:node:<name>``);
* a **volume provisioner** (``loco.dev/local-path``, the default StorageClass ``loco-local``): a claim
  gets a hostPath PersistentVolume at ``<state>/volumes/<ns>/<claim>``, which the real PV controller
  binds (on the embedded cluster the kubelet maps the claim to the same directory);
* **cluster DNS**: the hosts file (``<state>/hosts``, ``LOCO_LOCAL_HOSTS`` of every pod) with the
  records CoreDNS would answer for the pods behind each headless Service;
* the bootstrap: Loco's CRDs (waiting until they are served), the default namespace labelled to
  enforce Pod Security ``restricted``, and the RBAC of the two controllers above.

It has the same surface as :class:`loco_local.cluster.LocalCluster` (``kubeconfig``, ``state_dir``,
``pod_dir``, ``cordon``, a context manager), plus :meth:`kill_node_agent` to lose a node for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from loco_local.apiclient import ApiClient, ApiError, Controller, Informer, Obj, wait_any
from loco_local.cluster import LocalCluster, claim_octet
from loco_local.controlplane import Component, ControlPlane
from loco_local.kubelet import atomic_write, hosts_lines
from loco_local.nodes import NodeSpec, node_address
from loco_local.pki import Identity, node_identity

log = logging.getLogger(__name__)

CONTROLLERS = Identity("local-controllers", "loco:local-controllers")
PROVISIONER = "loco.dev/local-path"
STORAGE_CLASS = "loco-local"
PROVISIONER_ANNOTATION = "volume.kubernetes.io/storage-provisioner"
POD_SECURITY_LABELS = ("enforce", "audit", "warn")

#: what the bootstrap creates besides the CRDs: the two controllers' RBAC and the default StorageClass
BOOTSTRAP_OBJECTS: list[Obj] = [
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": CONTROLLERS.user},
     "rules": [
         {"apiGroups": [""], "resources": ["pods", "services"], "verbs": ["get", "list", "watch"]},
         {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get", "list", "watch"]},
         {"apiGroups": [""], "resources": ["persistentvolumes"], "verbs": ["get", "list", "watch", "create", "delete"]},
         {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
     ]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": CONTROLLERS.user},
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CONTROLLERS.user},
     "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": CONTROLLERS.user}]},
    {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
     "metadata": {"name": STORAGE_CLASS, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
     "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"},
]


def persistent_volume(claim: Obj, path: Path) -> Obj:
    """The hostPath PersistentVolume the provisioner creates for ``claim`` (pre-bound to it)."""
    meta, spec = claim["metadata"], claim.get("spec") or {}
    storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": f"pvc-{meta['uid']}", "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
        "spec": {
            "capacity": {"storage": storage},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": spec.get("storageClassName") or STORAGE_CLASS,
            "volumeMode": spec.get("volumeMode") or "Filesystem",
            "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                         "name": meta["name"], "uid": meta["uid"]},
        },
    }


def wants_volume(claim: Obj) -> bool:
    """A claim the real PV controller handed to this provisioner and that is not bound yet."""
    meta, spec = claim["metadata"], claim.get("spec") or {}
    return ((meta.get("annotations") or {}).get(PROVISIONER_ANNOTATION) == PROVISIONER
            and not spec.get("volumeName") and not meta.get("deletionTimestamp"))


class LocalPathProvisioner(Controller):
    """Provisions a hostPath volume per claim of the ``loco-local`` class; deletes released volumes' objects
    (the data stays: deleting a claim never deletes checkpoints on the host)."""

    task_name = "local-path-provisioner"

    def __init__(self, api: ApiClient, claims: Informer, volumes: Informer, volumes_dir: Path) -> None:
        self.api, self.claims, self.volumes, self.volumes_dir = api, claims, volumes, volumes_dir

    async def _run(self) -> None:
        await self.claims.wait_synced()
        await self.volumes.wait_synced()
        while True:
            claims, volumes = self.claims.version, self.volumes.version
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("provisioner round failed")
            await wait_any(self.claims.changed(claims, 2.0), self.volumes.changed(volumes, 2.0))

    async def reconcile(self) -> None:
        existing = {v["metadata"]["name"] for v in self.volumes.cache.values()}
        for claim in list(self.claims.cache.values()):
            if not wants_volume(claim):
                continue
            meta = claim["metadata"]
            path = self.volumes_dir / meta["namespace"] / meta["name"]
            pv = persistent_volume(claim, path)
            if pv["metadata"]["name"] in existing:
                continue
            path.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(ApiError):
                await self.api.create("/api/v1/persistentvolumes", pv)
        for volume in list(self.volumes.cache.values()):
            meta, status = volume["metadata"], volume.get("status") or {}
            if ((meta.get("annotations") or {}).get("pv.kubernetes.io/provisioned-by") == PROVISIONER
                    and status.get("phase") == "Released"):
                await self.api.delete(f"/api/v1/persistentvolumes/{meta['name']}")


class ClusterDNS(Controller):
    """Writes the hosts file: a record per pod with ``hostname`` and ``subdomain`` whose subdomain names
    a headless Service of its namespace (what CoreDNS answers; the pods find it via ``LOCO_LOCAL_HOSTS``)."""

    task_name = "cluster-dns"

    def __init__(self, pods: Informer, services: Informer, hosts_file: Path) -> None:
        self.pods, self.services, self.hosts_file = pods, services, hosts_file

    def lines(self) -> list[str]:
        headless = {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in self.services.cache.values()
                    if (s.get("spec") or {}).get("clusterIP") == "None"}
        return hosts_lines([p for p in self.pods.cache.values()
                            if (p["metadata"].get("namespace"), (p.get("spec") or {}).get("subdomain")) in headless])

    async def _run(self) -> None:
        await self.pods.wait_synced()
        await self.services.wait_synced()
        current = None
        while True:
            pods, services = self.pods.version, self.services.version
            text = "".join(line + "\n" for line in self.lines())
            if text != current:
                atomic_write(self.hosts_file, text)
                current = text
            await wait_any(self.pods.changed(pods, 2.0), self.services.changed(services, 2.0))


class RealCluster(LocalCluster):
    """The real control plane with process node agents (see the module docstring).

    Args:
        state_dir, nodes: as for :class:`LocalCluster`.
        pod_security: the Pod Security level the ``default`` namespace enforces (None: no label).
        node_monitor_grace_s: how long before a silent node is marked unreachable.
        heartbeat_s: the node agents' Lease renewal period.
        apiserver_args: more kube-apiserver flags.
    """

    def __init__(self, state_dir: Path, nodes: Sequence[NodeSpec], *, crd_paths: Sequence[Path] | None = None,
                 pod_security: str | None = "restricted", node_monitor_grace_s: int = 20,
                 heartbeat_s: float = 5.0, binary: Path | None = None, apiserver_args: Sequence[str] = ()) -> None:
        super().__init__(state_dir, nodes, crd_paths=crd_paths, heartbeat_s=heartbeat_s)
        self.pod_security = pod_security
        self.control_plane = ControlPlane(self.state_dir, binary=binary, node_monitor_grace_s=node_monitor_grace_s,
                                          apiserver_args=apiserver_args)
        self.kubeconfig = self.control_plane.kubeconfig
        self.agents: dict[str, Component] = {}
        self._clients: list[ApiClient] = []
        self._octet2 = 0

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)  # kubeconfigs, keys, pod roots and volumes: the owner's only
        (self.state_dir / "pods").mkdir(exist_ok=True)
        try:
            await asyncio.to_thread(self.control_plane.start, [n.name for n in self.node_specs])
            self.url = self.control_plane.url
            self._octet2, self._octet_lock = claim_octet(urlsplit(self.url).port or 0)
            api = self.api = ApiClient.from_kubeconfig(self.kubeconfig)
            await self._bootstrap(api)
            await self._start_controllers()
            for index, spec in enumerate(self.node_specs):
                self.start_node_agent(spec.name, index)
            await self._wait_nodes_ready(api, timeout_s=60)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for name in list(self.agents):
            await asyncio.to_thread(self.stop_node_agent, name)
        for part in reversed(self._parts):
            with contextlib.suppress(Exception):
                await part.stop()
        self._parts = []
        for client in self._clients:
            await client.close()
        self._clients = []
        if self.api is not None:
            await self.api.close()
            self.api = None
        await asyncio.to_thread(self.control_plane.stop)
        if self._octet_lock is not None:
            self._octet_lock.close()
            self._octet_lock = None

    # ------------------------------------------------------------------------------ bootstrap

    async def _bootstrap(self, api: ApiClient) -> None:
        await self._register_crds(api)
        for obj in BOOTSTRAP_OBJECTS:
            group_version = obj["apiVersion"]
            plural = {"ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings",
                      "StorageClass": "storageclasses"}[obj["kind"]]
            with contextlib.suppress(ApiError):  # 409: kept from an earlier start on this state dir
                await api.create(f"/apis/{group_version}/{plural}", obj)
        if self.pod_security:
            labels = {f"pod-security.kubernetes.io/{mode}": self.pod_security for mode in POD_SECURITY_LABELS}
            await api.merge_patch("/api/v1/namespaces/default", {"metadata": {"labels": labels}})
        # the CRDs are served, and the ServiceAccount admission plugin finds the namespace's default account
        await self._wait_for(api, "/apis/loco.dev/v1alpha1/trainingjobs", "the TrainingJob API to be served")
        await self._wait_for(api, "/api/v1/namespaces/default/serviceaccounts/default",
                             "the default ServiceAccount (made by the controller manager)")

    async def _wait_for(self, api: ApiClient, path: str, what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await api.get(path)
                return
            except ApiError as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"timed out waiting for {what}: {exc}") from None
            self.control_plane.check()
            await asyncio.sleep(0.3)

    async def _start_controllers(self) -> None:
        api = ApiClient.from_kubeconfig(self.control_plane.kubeconfig_for(CONTROLLERS))
        self._clients = [api]
        pods, services = Informer(api, "/api/v1/pods"), Informer(api, "/api/v1/services")
        claims, volumes = Informer(api, "/api/v1/persistentvolumeclaims"), Informer(api, "/api/v1/persistentvolumes")
        self._parts = [pods, services, claims, volumes,
                       LocalPathProvisioner(api, claims, volumes, self.state_dir / "volumes"),
                       ClusterDNS(pods, services, self.hosts_file)]
        atomic_write(self.hosts_file, "")
        for part in self._parts:
            part.start()

    async def _wait_nodes_ready(self, api: ApiClient, timeout_s: float) -> None:
        from loco_local.scheduler import node_is_ready

        names = {n.name for n in self.node_specs}
        deadline = time.monotonic() + timeout_s
        while True:
            nodes = (await api.get("/api/v1/nodes")).get("items", [])
            ready = {n["metadata"]["name"] for n in nodes if node_is_ready(n)}
            if names <= ready:
                return
            for name, agent in self.agents.items():
                if not agent.alive():
                    raise RuntimeError(f"the node agent of {name} exited; its log ends:\n{agent.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes {sorted(names - ready)} did not become Ready in {timeout_s:.0f}s")
            await asyncio.sleep(0.3)

    # ------------------------------------------------------------------------------ node agents

    def start_node_agent(self, name: str, index: int | None = None) -> None:
        """Start (or restart) the node agent of ``name``: the node comes back."""
        if index is None:
            index = next(i for i, n in enumerate(self.node_specs) if n.name == name)
        spec = self.node_specs[index]
        kubeconfig = self.control_plane.kubeconfig_for(node_identity(name))
        agent = Component(f"node-{name}", [
            sys.executable, "-m", "loco_local.nodeagent", "--kubeconfig", str(kubeconfig),
            "--state-dir", str(self.state_dir), "--node", json.dumps(dataclasses.asdict(spec)),
            "--address", node_address(index, self._octet2), "--octet2", str(self._octet2),
            "--pod-ip-block", str(index + 1), "--heartbeat", str(self.heartbeat_s),
        ], self.state_dir / "logs" / f"node-{name}.log")
        agent.start()
        self.agents[name] = agent

    def kill_node_agent(self, name: str) -> None:
        """Lose node ``name`` as a power cut would: SIGKILL its agent; its pods die with it."""
        agent = self.agents.pop(name)
        if agent.proc is not None:
            agent.proc.kill()
            agent.proc.wait(timeout=10)

    def stop_node_agent(self, name: str) -> None:
        """Stop node ``name``'s agent gracefully (it stops its pods first)."""
        agent = self.agents.pop(name, None)
        if agent is not None:
            agent.stop(grace_s=20)

    def set_node_ready(self, name: str, ready: bool) -> None:
        """Fail a node for real (``ready=False``: its agent is killed, its pods die with it, the node
        lifecycle controller notices) or bring it back (its agent starts again). Blocking; any thread."""
        if name not in {n.name for n in self.node_specs}:
            raise ValueError(f"no node named {name!r}; nodes are {[n.name for n in self.node_specs]}")
        if not ready and name in self.agents:
            self.kill_node_agent(name)
        elif ready and name not in self.agents:
            self.start_node_agent(name)

