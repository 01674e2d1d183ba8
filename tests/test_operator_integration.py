"""The real operator (Kopf + handlers), in-process, against the embedded API server.

No kubelet runs here, so pods stay Pending unless the test writes their status itself, as a
kubelet would: that is enough to see children created, a worker failure turn into a restart
(new epoch, pods recreated) and the status written through the status subresource.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client as k8s

from loco_operator.cli import load_api_client, run_operator
from loco_operator.crd import build_crd

apiserver = pytest.importorskip("loco_local.apiserver")

NS = "default"
TIMEOUT_S = 60.0


async def wait_for(what: str, probe: Callable[[], Any], timeout_s: float = TIMEOUT_S) -> Any:
    """Poll ``probe`` (a blocking call, run in a thread) until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(probe)
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last seen: {last!r}")


def strip_cel(node: Any) -> Any:
    """The schema without its CEL rules: an API server too old to evaluate them."""
    if isinstance(node, dict):
        return {k: strip_cel(v) for k, v in node.items() if k != "x-kubernetes-validations"}
    if isinstance(node, list):
        return [strip_cel(v) for v in node]
    return node


@pytest.fixture
async def fake_workers():
    """An HTTP server answering GET /status like a worker (one report, whatever the pod)."""
    from aiohttp import web

    report = {"jobName": "tiny", "replicaIndex": 0, "state": "running", "step": 7, "totalSteps": 200, "loss": 3.5,
              "tokensPerSecond": 100.0,
              "lastCheckpoint": {"step": 5, "path": "/checkpoints/default/tiny/step-5", "time": "2026-01-01T00:00:00Z"}}

    async def status(_request):
        return web.json_response(report)

    app = web.Application()
    app.router.add_get("/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield site._server.sockets[0].getsockname()[1]
    await runner.cleanup()


@pytest.fixture
async def cluster(tmp_path, request, fake_workers):
    server = apiserver.APIServer(host="127.0.0.1", port=0, log_root=tmp_path / "pods")
    await server.start()
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubeconfig", server.url, token=server.token)
    api_client = load_api_client(str(kubeconfig))
    crd = build_crd() if getattr(request, "param", {}).get("cel", True) else strip_cel(build_crd())
    await asyncio.to_thread(k8s.ApiextensionsV1Api(api_client).create_custom_resource_definition, crd)
    # The operator gets its own thread and event loop, as Kopf recommends for embedding: on exit
    # Kopf waits for every task of its loop, and the API server's tasks never end.
    ready, stop = threading.Event(), threading.Event()
    operator = threading.Thread(
        target=asyncio.run,
        args=(run_operator(api_client, namespaces=(NS,), metrics_port=None, status_port=fake_workers,
                           ready_flag=ready, stop_flag=stop),),
        name="operator", daemon=True,
    )
    operator.start()
    assert await asyncio.to_thread(ready.wait, TIMEOUT_S), "operator did not get ready"
    try:
        yield api_client
    finally:
        stop.set()
        await asyncio.to_thread(operator.join, 30)
        await server.stop()


def job_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "loco.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {"replicas": 2, "algorithm": {"name": "diloco", "syncEvery": 10}, "runPolicy": {"backoffLimit": 2}},
    }


async def test_operator_creates_children_and_restarts_a_failed_worker(cluster):
    core, custom = k8s.CoreV1Api(cluster), k8s.CustomObjectsApi(cluster)
    await asyncio.to_thread(custom.create_namespaced_custom_object, "loco.dev", "v1alpha1", NS, "trainingjobs", job_body("tiny"))

    def pods() -> list[Any]:
        return core.list_namespaced_pod(NS, label_selector="loco.dev/job=tiny").items

    created = await wait_for("two worker pods", lambda: len(pods()) == 2 and pods())
    assert sorted(p.metadata.name for p in created) == ["tiny-worker-0", "tiny-worker-1"]
    assert {p.metadata.labels["loco.dev/epoch"] for p in created} == {"0"}
    assert await asyncio.to_thread(core.read_namespaced_service, "tiny", NS)
    cm = await asyncio.to_thread(core.read_namespaced_config_map, "tiny-trainer", NS)
    assert '"syncEvery": 10' in cm.data["config.json"]

    def job() -> dict[str, Any]:
        return custom.get_namespaced_custom_object("loco.dev", "v1alpha1", NS, "trainingjobs", "tiny")

    status = await wait_for("status Pending", lambda: job().get("status", {}).get("phase") == "Pending" and job()["status"])
    assert status["workersReady"] == "0/2" and status["selector"] == "loco.dev/job=tiny"

    # act as the kubelet: both workers run (their /status is the fake worker server)
    for pod in created:
        running = {"status": {"phase": "Running", "podIP": "127.0.0.1", "hostIP": "127.0.0.1"}}
        await asyncio.to_thread(core.patch_namespaced_pod_status, pod.metadata.name, NS, running)
    status = await wait_for(
        "phase Running with polled progress",
        lambda: (s := job().get("status", {})).get("phase") == "Running" and s.get("workersReady") == "2/2" and s,
    )
    assert (status["step"], status["loss"], status["tokensPerSecond"]) == (7, 3.5, 200.0)
    assert status["lastCheckpoint"]["step"] == 5

    # worker 1 exits with code 3
    failed = {"status": {"phase": "Failed", "containerStatuses": [{
        "name": "trainer", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
        "state": {"terminated": {"exitCode": 3, "reason": "Error"}}}]}}
    await asyncio.to_thread(core.patch_namespaced_pod_status, "tiny-worker-1", NS, failed)

    restarted = await wait_for(
        "pods of epoch 1",
        lambda: len(pods()) == 2 and {p.metadata.labels["loco.dev/epoch"] for p in pods()} == {"1"} and pods(),
    )
    env = {e.name: e.value for e in restarted[0].spec.containers[0].env}
    assert env["LOCO_EPOCH"] == "1" and env["LOCO_RESTART_COUNT"] == "1"
    assert env["LOCO_RESUME_FROM"] == "/checkpoints/default/tiny/step-5"
    status = (await asyncio.to_thread(job))["status"]
    assert (status["restarts"], status["membershipEpoch"]) == (1, 1)
    events = await asyncio.to_thread(core.list_namespaced_event, NS)
    reasons = {e.reason for e in events.items if e.involved_object.name == "tiny"}
    assert {"WorkersCreated", "Running", "CheckpointCommitted", "WorkerFailed", "Restarting"} <= reasons


@pytest.mark.parametrize("cluster", [{"cel": False}], indirect=True)
async def test_invalid_job_fails_without_pods(cluster):
    """Defence in depth: a spec an API server without CEL accepted, but the models refuse."""
    core, custom = k8s.CoreV1Api(cluster), k8s.CustomObjectsApi(cluster)
    body = job_body("bad")
    body["spec"]["model"] = {"gpt": {"nEmbd": 100, "nHead": 3}}

    def job() -> dict[str, Any]:
        return custom.get_namespaced_custom_object("loco.dev", "v1alpha1", NS, "trainingjobs", "bad")

    await asyncio.to_thread(custom.create_namespaced_custom_object, "loco.dev", "v1alpha1", NS, "trainingjobs", body)
    status = await wait_for("phase Failed", lambda: job().get("status", {}).get("phase") == "Failed" and job()["status"])
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.model.gpt.nEmbd" in failed["message"]
    pods = await asyncio.to_thread(core.list_namespaced_pod, NS, label_selector="loco.dev/job=bad")
    assert pods.items == []


async def test_api_server_refuses_what_the_cel_rules_forbid(cluster):
    custom = k8s.CustomObjectsApi(cluster)
    body = job_body("bad")
    body["spec"]["algorithm"] = {"name": "ddp", "syncEvery": 5}
    with pytest.raises(k8s.ApiException) as info:
        await asyncio.to_thread(custom.create_namespaced_custom_object, "loco.dev", "v1alpha1", NS, "trainingjobs", body)
    assert info.value.status == 422 and "spec.algorithm.syncEvery applies only to algorithm" in info.value.body
