"""A reconcile whose status write fails, then is retried (Kopf's TemporaryError), counts its restart once.

The real handlers (:func:`loco_operator.handlers.reconcile`) against the embedded API server, with the
status subresource refusing the first write (an API server hiccup, a webhook timeout). The retry must
leave exactly one restart in ``status.restarts``, in ``loco_operator_job_restarts_total`` and in the
``Restarting`` events, and a live resize must not turn into a rollback to the old epoch.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from loco_operator.cli import load_api_client
from loco_operator.crd import build_crd
from loco_operator.handlers import OperatorContext, reconcile

apiserver = pytest.importorskip("loco_local.apiserver")

NS, NAME = "default", "j"


@pytest.fixture
async def api(tmp_path):
    server = apiserver.APIServer(host="127.0.0.1", port=0, log_root=tmp_path / "pods")
    await server.start()
    token = getattr(server, "token", None)  # the embedded API server may ask for a bearer token
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubeconfig", server.url, **({"token": token} if token else {}))
    client = load_api_client(str(kubeconfig))
    await asyncio.to_thread(k8s.ApiextensionsV1Api(client).create_custom_resource_definition, build_crd())
    try:
        yield client
    finally:
        await server.stop()


def _events(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The reasons of the events the handlers post (``kopf.event`` needs a running operator)."""
    reasons: list[str] = []
    monkeypatch.setattr(kopf, "event", lambda _obj, *, type, reason, message: reasons.append(reason))
    return reasons


async def _running_job(client: Any, spec: dict[str, Any], phases: dict[int, str]) -> None:
    """The TrainingJob Running in epoch 0 with one pod per rank, each in ``phases[rank]``."""
    custom, core = k8s.CustomObjectsApi(client), k8s.CoreV1Api(client)
    body = {"apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": NAME}, "spec": spec}
    job = await asyncio.to_thread(custom.create_namespaced_custom_object, "loco.dev", "v1alpha1", NS, "trainingjobs", body)
    n = spec["replicas"]
    status = {"phase": "Running", "membershipEpoch": 0, "restarts": 0, "workers": {"desired": n, "ready": n},
              "targetReplicas": n, "startTime": "2026-01-01T00:00:00Z", "algorithm": spec["algorithm"]["name"]}
    await asyncio.to_thread(custom.patch_namespaced_custom_object_status, "loco.dev", "v1alpha1", NS, "trainingjobs",
                            NAME, {"status": status})
    owner = {"apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob", "name": NAME, "uid": job["metadata"]["uid"],
             "controller": True}
    for rank, phase in phases.items():
        name = f"{NAME}-worker-{rank}"
        labels = {"loco.dev/job": NAME, "loco.dev/rank": str(rank), "loco.dev/epoch": "0"}
        await asyncio.to_thread(core.create_namespaced_pod, NS, {
            "metadata": {"name": name, "labels": labels, "ownerReferences": [owner]},
            "spec": {"containers": [{"name": "trainer", "image": "x"}]}})
        state = {"terminated": {"exitCode": 137, "reason": "Error"}} if phase == "Failed" else {"running": {}}
        await asyncio.to_thread(core.patch_namespaced_pod_status, name, NS, {"status": {
            "phase": phase, "podIP": f"127.0.0.{rank + 1}",
            "containerStatuses": [{"name": "trainer", "ready": phase == "Running", "restartCount": 0, "image": "x",
                                   "imageID": "", "state": state}]}})


def _fail_first_status_write(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The first status write is refused with HTTP 500 (nothing stored); later ones go through."""
    real = k8s.CustomObjectsApi.patch_namespaced_custom_object_status
    calls: list[int] = []

    def patch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ApiException(status=500, reason="Internal Server Error")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(k8s.CustomObjectsApi, "patch_namespaced_custom_object_status", patch)
    return calls


async def _reconcile_with_retry(ctx: OperatorContext) -> None:
    with pytest.raises(kopf.TemporaryError, match="patching status: 500"):
        await reconcile(ctx, NS, NAME)
    await reconcile(ctx, NS, NAME)  # Kopf's retry


async def _state(client: Any) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    custom, core = k8s.CustomObjectsApi(client), k8s.CoreV1Api(client)
    job = await asyncio.to_thread(custom.get_namespaced_custom_object, "loco.dev", "v1alpha1", NS, "trainingjobs", NAME)
    pods = await asyncio.to_thread(core.list_namespaced_pod, NS, label_selector=f"loco.dev/job={NAME}")
    return job["status"], {p.metadata.name: (p.metadata.labels["loco.dev/rank"], p.metadata.labels["loco.dev/epoch"])
                           for p in pods.items if not p.metadata.deletion_timestamp}


async def test_a_restart_whose_status_write_failed_is_counted_once_after_the_retry(api, monkeypatch):
    spec = {"replicas": 2, "algorithm": {"name": "diloco"}, "runPolicy": {"backoffLimit": 3}}
    await _running_job(api, spec, {0: "Running", 1: "Failed"})
    events = _events(monkeypatch)
    writes = _fail_first_status_write(monkeypatch)
    ctx = OperatorContext(api_client=api)

    await _reconcile_with_retry(ctx)

    status, pods = await _state(api)
    assert len(writes) == 2
    assert (status["restarts"], status["membershipEpoch"], status["phase"]) == (1, 1, "Restarting")
    assert pods == {}  # the epoch-0 workers are gone; epoch 1 is created once they are
    restarts = ctx.metrics.registry.get_sample_value("loco_operator_job_restarts_total", {"namespace": NS, "job": NAME})
    assert restarts == 1
    assert ctx.metrics.registry.get_sample_value("loco_operator_restarts_total") == 1
    reasons = events
    assert reasons.count("Restarting") == 1 and reasons.count("WorkerFailed") == 1, reasons
    assert ctx.metrics.registry.get_sample_value(
        "loco_operator_faults_total", {"namespace": NS, "job": NAME, "kind": "worker-exit"}) == 1


async def test_a_live_shrink_whose_status_write_failed_is_not_rolled_back_by_the_retry(api, monkeypatch):
    """The survivors' labels say epoch 1 only once the status does: the retry must not find them
    "stale" against the old epoch 0, delete them and recreate the whole job in epoch 0."""
    spec = {"replicas": 3, "algorithm": {"name": "diloco"}, "elastic": {"minReplicas": 1, "liveResize": True},
            "runPolicy": {"backoffLimit": 3}}
    await _running_job(api, spec, {0: "Failed", 1: "Running", 2: "Running"})
    events = _events(monkeypatch)
    _fail_first_status_write(monkeypatch)
    ctx = OperatorContext(api_client=api)

    await _reconcile_with_retry(ctx)

    status, pods = await _state(api)
    assert (status["phase"], status["restarts"], status["resizes"], status["membershipEpoch"]) == ("Running", 0, 1, 1)
    assert pods == {f"{NAME}-worker-1": ("0", "1"), f"{NAME}-worker-2": ("1", "1")}
    assert events.count("Resizing") == 1
    assert ctx.metrics.registry.get_sample_value("loco_operator_resizes_total", {"namespace": NS, "job": NAME}) == 1


async def test_a_status_write_stored_although_the_client_saw_it_fail_counts_its_restart_once(api, monkeypatch):
    """The write reached the API server but its answer was lost (a timeout): the handler acts on nothing,
    and the retry, planning from the stored new epoch, removes the old epoch's pods as stale. The restart
    counter follows the stored ``status.restarts``, so it is counted once, not lost."""
    spec = {"replicas": 2, "algorithm": {"name": "diloco"}, "runPolicy": {"backoffLimit": 3}}
    await _running_job(api, spec, {0: "Running", 1: "Failed"})
    _events(monkeypatch)
    real = k8s.CustomObjectsApi.patch_namespaced_custom_object_status
    calls: list[int] = []

    def patch(self, *args, **kwargs):
        calls.append(1)
        answer = real(self, *args, **kwargs)
        if len(calls) == 1:
            raise ApiException(status=504, reason="Gateway Timeout")
        return answer

    monkeypatch.setattr(k8s.CustomObjectsApi, "patch_namespaced_custom_object_status", patch)
    ctx = OperatorContext(api_client=api)
    with pytest.raises(kopf.TemporaryError, match="patching status: 504"):
        await reconcile(ctx, NS, NAME)
    assert len((await _state(api))[1]) == 2  # not acted on
    await reconcile(ctx, NS, NAME)

    status, pods = await _state(api)
    assert (status["restarts"], status["membershipEpoch"]) == (1, 1) and pods == {}
    assert ctx.metrics.registry.get_sample_value("loco_operator_job_restarts_total", {"namespace": NS, "job": NAME}) == 1
    await reconcile(ctx, NS, NAME)
    assert ctx.metrics.registry.get_sample_value("loco_operator_job_restarts_total", {"namespace": NS, "job": NAME}) == 1
