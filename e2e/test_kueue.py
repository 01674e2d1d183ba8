"""The real Kueue (v0.17.0, ``make kube``) beside the real Kubernetes control plane: it admits a Workload that
fits its ClusterQueue's quota, holds one that does not, and admits that one once quota is freed; its conversion
webhook serves the older API version. The first step towards Loco's TrainingJobs queued by Kueue."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from loco_local.controlplane import ControlPlane, KubeBinaryMissing, kube_binary
from loco_local.kueue import Kueue, KueueBinaryMissing, kueue_binary

CONTROL_PLANES = ("kubernetes",)  # Kueue needs the real control plane: runs with --control-plane kubernetes|both
GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
WAIT_S = 90  # two cores shared with other suites: generous


@pytest.fixture(scope="module")
def kueue(tmp_path_factory: pytest.TempPathFactory, control_plane: str) -> Iterator[tuple[client.CustomObjectsApi, Kueue]]:
    try:
        kube_binary(), kueue_binary()
    except (KubeBinaryMissing, KueueBinaryMissing) as exc:
        pytest.skip(str(exc))
    state = tmp_path_factory.mktemp("kueue")
    plane = ControlPlane(state / "plane")
    plane.start()
    try:
        with Kueue(plane.kubeconfig, state / "kueue") as k:
            api = client.CustomObjectsApi(config.new_client_from_config(config_file=str(plane.kubeconfig)))
            _create_queues(api)
            yield api, k
            k.check()
        # stopped means gone: no manager process left behind
        assert not [p for p in psutil.process_iter(["cmdline"]) if str(k.state_dir) in " ".join(p.info["cmdline"] or [])]
    finally:
        plane.stop()


def _create_queues(api: client.CustomObjectsApi) -> None:
    api.create_cluster_custom_object(GROUP, VERSION, "resourceflavors", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ResourceFlavor", "metadata": {"name": "default"}, "spec": {}})
    api.create_cluster_custom_object(GROUP, VERSION, "clusterqueues", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterQueue", "metadata": {"name": "cq"},
        "spec": {"namespaceSelector": {}, "resourceGroups": [{
            "coveredResources": ["cpu", "memory"],
            "flavors": [{"name": "default", "resources": [{"name": "cpu", "nominalQuota": "4"},
                                                          {"name": "memory", "nominalQuota": "8Gi"}]}]}]}})
    api.create_namespaced_custom_object(GROUP, VERSION, "default", "localqueues", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "LocalQueue", "metadata": {"name": "lq", "namespace": "default"},
        "spec": {"clusterQueue": "cq"}})


def _workload(name: str, cpu: str, count: int = 2) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Workload", "metadata": {"name": name, "namespace": "default"},
            "spec": {"queueName": "lq", "podSets": [{"name": "workers", "count": count, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "worker", "image": "loco-trainer",
                                "resources": {"requests": {"cpu": cpu, "memory": "1Gi"}}}]}}}]}}


def _get(api: client.CustomObjectsApi, name: str, version: str = VERSION) -> dict:
    return api.get_namespaced_custom_object(GROUP, version, "default", "workloads", name)


def _condition(wl: dict, kind: str) -> dict:
    return next((c for c in (wl.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def _admitted(api: client.CustomObjectsApi, name: str) -> dict | None:
    """The Workload once its Admitted condition is True, else None."""
    wl = _get(api, name)
    return wl if _condition(wl, "Admitted").get("status") == "True" else None


def _wait(what: str, probe: Callable[[], Any], kueue: Kueue, timeout_s: float = WAIT_S) -> Any:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` with Kueue's log tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        kueue.check()
        if found := probe():
            return found
        time.sleep(0.5)
    pytest.fail(f"{what} within {timeout_s} s; kueue's log ends:\n{kueue.component.log_tail() if kueue.component else ''}")


def test_kueue_admits_within_quota_holds_over_it_and_admits_once_quota_is_freed(
        kueue: tuple[client.CustomObjectsApi, Kueue]) -> None:
    api, k = kueue
    # the ClusterQueue is Active once Kueue has seen its flavor: before that nothing is admitted
    _wait("ClusterQueue cq Active", lambda: _condition(
        api.get_cluster_custom_object(GROUP, VERSION, "clusterqueues", "cq"), "Active").get("status") == "True", k)

    api.create_namespaced_custom_object(GROUP, VERSION, "default", "workloads", _workload("small", "1"))
    small = _wait("Workload small admitted", lambda: _admitted(api, "small"), k)
    admission = small["status"]["admission"]
    assert admission["clusterQueue"] == "cq", admission
    assignment = admission["podSetAssignments"][0]
    assert assignment["name"] == "workers" and assignment["count"] == 2, assignment
    assert assignment["flavors"]["cpu"] == "default" and assignment["resourceUsage"]["cpu"] == "2", assignment

    # 2 x 1.5 CPUs: within the quota of 4, not within the 2 that small leaves
    api.create_namespaced_custom_object(GROUP, VERSION, "default", "workloads", _workload("big", "1500m"))
    reserved = _wait("Workload big evaluated by Kueue", lambda: _condition(_get(api, "big"), "QuotaReserved") or None, k)
    assert reserved["status"] == "False", reserved
    assert "insufficient unused quota for cpu in flavor default, 1 more needed" in reserved["message"], reserved
    assert "admission" not in _get(api, "big")["status"]

    # freeing the quota: big is admitted
    api.delete_namespaced_custom_object(GROUP, VERSION, "default", "workloads", "small")
    big = _wait("Workload big admitted after small was deleted", lambda: _admitted(api, "big"), k)
    assert big["status"]["admission"]["podSetAssignments"][0]["resourceUsage"]["cpu"] == "3"
    assert big["status"]["admission"]["podSetAssignments"][0]["flavors"]["cpu"] == "default"


def test_the_conversion_webhook_serves_the_older_api_version(kueue: tuple[client.CustomObjectsApi, Kueue]) -> None:
    """Reading v1beta1 makes the API server call Kueue's webhook server on loopback, trusting the CA Kueue
    injected into the CRD: Kueue's own certificate management works out of cluster."""
    api, k = kueue
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, "default", "workloads", _workload("converted", "1", count=1))
    except ApiException as exc:
        pytest.fail(f"creating a Workload failed: {exc.body}")
    old = _get(api, "converted", "v1beta1")
    assert old["apiVersion"] == f"{GROUP}/v1beta1"
    assert old["spec"]["podSets"][0]["name"] == "workers" and old["spec"]["queueName"] == "lq", old["spec"]
    assert Path(k.state_dir / "webhook-certs" / "tls.crt").is_file()
