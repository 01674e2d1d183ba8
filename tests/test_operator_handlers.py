"""Handler helpers that need no cluster: progress polling and the status merge patch."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from loco_operator.handlers import OperatorContext, _merge_patch, poll_reports
from loco_operator.planner import ObservedPod


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on a free loopback port: (its runner, to clean up, and the port)."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


async def test_poll_reports_reads_answering_workers_and_skips_silent_ones():
    async def status(_request):
        return web.json_response({"jobName": "j", "replicaIndex": 0, "state": "running", "step": 3})

    app = web.Application()
    app.router.add_get("/status", status)
    runner, port = await serve(app)
    ctx = OperatorContext(api_client=None, status_port=port, poll_timeout_s=2.0)
    ctx.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
    try:
        pods = [
            ObservedPod("j-worker-0", 0, 0, phase="Running", pod_ip="127.0.0.1"),
            ObservedPod("j-worker-1", 1, 0, phase="Running", pod_ip="127.0.0.2"),  # nothing listens there
            ObservedPod("j-worker-2", 2, 0, phase="Pending", pod_ip="127.0.0.1"),  # not running: not polled
        ]
        reports = await poll_reports(ctx, pods)
        assert list(reports) == ["j-worker-0"] and reports["j-worker-0"].step == 3
    finally:
        await ctx.http.close()
        await runner.cleanup()


def test_merge_patch_sets_changes_and_nulls_removed_keys():
    old = {"phase": "Running", "startTime": "t0", "step": 5}
    new = {"phase": "Pending", "step": 5, "restarts": 1}
    assert _merge_patch(old, new) == {"phase": "Pending", "restarts": 1, "startTime": None}
    assert _merge_patch(new, new) == {}


async def test_metrics_are_served_over_http():
    from loco_operator.metrics import OperatorMetrics

    metrics = OperatorMetrics()
    port = metrics.serve(0, addr="127.0.0.1")
    try:
        metrics.observe_job("ns/a", None, "Running")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
        assert 'loco_operator_jobs{phase="Running"} 1.0' in text
        assert "loco_operator_reconcile_duration_seconds_bucket" in text
    finally:
        metrics.close()


def test_operator_run_refuses_namespace_with_all_namespaces():
    from click.testing import CliRunner

    from loco_operator.cli import operator

    result = CliRunner().invoke(operator, ["run", "--namespace", "a", "--all-namespaces"])
    assert result.exit_code == 2 and "either --namespace or --all-namespaces" in result.output


# ------------------------------------------------------------------------------ live membership


async def test_apply_posts_membership_and_never_raises_on_a_refusal_or_a_dead_worker(caplog):
    from loco_operator.handlers import apply
    from loco_operator.planner import PostMembership

    received: list[dict] = []

    async def membership(request):
        received.append(await request.json())
        return web.json_response({"accepted": True}, status=202)

    async def refuse(request):
        return web.json_response({"error": "epoch: must be newer"}, status=400)

    app = web.Application()
    app.router.add_post("/membership", membership)
    refusing = web.Application()
    refusing.router.add_post("/membership", refuse)
    runners, ports = [], []
    for application in (app, refusing):
        runner, port = await serve(application)
        runners.append(runner)
        ports.append(port)
    body = {"epoch": 4, "rank": 1, "worldSize": 2, "masterAddr": "j-worker-2.j.ns.svc", "masterPort": 29505}
    job = {"metadata": {"name": "j", "namespace": "ns", "uid": "u"}}
    try:
        for port, ip in ((ports[0], "127.0.0.1"), (ports[1], "127.0.0.1"), (ports[0], "127.0.0.9")):
            ctx = OperatorContext(api_client=None, status_port=port, poll_timeout_s=1.0)
            ctx.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
            try:
                errors = await apply(ctx, job, [PostMembership("j-worker-1", ip, body)])
            finally:
                await ctx.http.close()
            assert errors == []
        assert received == [body]  # the JSON body as given, once (the other two never reached it)
        assert "HTTP 400" in caplog.text and "epoch: must be newer" in caplog.text
        assert "retrying on the next reconcile" in caplog.text
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_apply_asks_a_worker_for_a_checkpoint_with_the_token_and_never_raises(caplog):
    from loco_operator.handlers import apply
    from loco_operator.planner import RequestCheckpoint

    caplog.set_level("INFO", logger="loco_operator")
    received: list[tuple[dict, str]] = []

    async def checkpoint(request):
        received.append((await request.json(), request.headers.get("Authorization", "")))
        return web.json_response({"accepted": True}, status=202 if len(received) == 1 else 401)

    app = web.Application()
    app.router.add_post("/checkpoint", checkpoint)
    runner, port = await serve(app)
    body = {"id": "e0-s37", "reason": "runPolicy.suspend"}
    job = {"metadata": {"name": "j", "namespace": "ns", "uid": "u"}}
    try:
        ctx = OperatorContext(api_client=None, status_port=port, poll_timeout_s=1.0)
        ctx.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        try:
            for _ in range(2):
                assert await apply(ctx, job, [RequestCheckpoint("j-worker-0", "127.0.0.1", body, token="tok")]) == []
        finally:
            await ctx.http.close()
        assert received == [(body, "Bearer tok"), (body, "Bearer tok")]
        assert "asked j-worker-0 for a checkpoint (runPolicy.suspend)" in caplog.text
        assert "j-worker-0 refused the checkpoint request e0-s37: HTTP 401" in caplog.text
    finally:
        await runner.cleanup()


async def test_apply_patches_pod_labels_on_the_embedded_api_server(tmp_path):
    """PatchPodLabels through the official client (a strategic-merge patch of metadata.labels) is
    accepted by the embedded API server; a vanished pod is not an error."""
    kubernetes = pytest.importorskip("kubernetes")
    from loco_local.apiserver import APIServer, write_kubeconfig
    from loco_operator.handlers import apply
    from loco_operator.planner import PatchPodLabels

    srv = APIServer(port=0, log_root=tmp_path / "logs")
    await srv.start()
    try:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", srv.url, token=srv.token)
        client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        core = kubernetes.client.CoreV1Api(client)
        labels = {"loco.dev/job": "j", "loco.dev/rank": "2", "loco.dev/epoch": "3"}
        await asyncio.to_thread(core.create_namespaced_pod, "default", {
            "metadata": {"name": "j-worker-2", "labels": labels},
            "spec": {"containers": [{"name": "trainer", "image": "x"}]}})
        ctx = OperatorContext(api_client=client)
        job = {"metadata": {"name": "j", "namespace": "default", "uid": "u"}}
        errors = await apply(ctx, job, [PatchPodLabels("j-worker-2", {"loco.dev/rank": "1", "loco.dev/epoch": "4"}),
                                        PatchPodLabels("j-worker-9", {"loco.dev/rank": "0", "loco.dev/epoch": "4"})])
        assert errors == []
        pod = await asyncio.to_thread(core.read_namespaced_pod, "j-worker-2", "default")
        assert pod.metadata.labels == {"loco.dev/job": "j", "loco.dev/rank": "1", "loco.dev/epoch": "4"}
    finally:
        await srv.stop()


def test_kopf_logs_in_with_the_token_of_a_token_kubeconfig(tmp_path):
    """Found on the real control plane: with a ServiceAccount token in the kubeconfig, the official client
    files it under api_key['BearerToken'], and Kopf was handed no token at all (every request 401)."""
    from loco_local.apiserver.kubeconfig import write_tls_kubeconfig
    from loco_operator.cli import load_api_client
    from loco_operator.handlers import bearer_token

    (tmp_path / "ca.crt").write_text("")
    path = write_tls_kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443", ca=tmp_path / "ca.crt", token="tok-123")
    configuration = load_api_client(str(path)).configuration
    assert bearer_token(configuration.api_key) == "tok-123"
    assert bearer_token({"authorization": "Bearer old-style"}) == "old-style"
    assert bearer_token({}) is None


def test_a_node_is_lost_since_its_ready_condition_stopped_being_true():
    from loco_operator.handlers import node_not_ready_since

    def node(status: str) -> dict:
        return {"status": {"conditions": [
            {"type": "MemoryPressure", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Ready", "status": status, "lastTransitionTime": "2026-01-01T00:05:00Z"}]}}

    assert node_not_ready_since(node("True")) is None
    assert node_not_ready_since(node("Unknown")) == "2026-01-01T00:05:00Z"  # kubelet stopped posting
    assert node_not_ready_since(node("False")) == "2026-01-01T00:05:00Z"
    assert node_not_ready_since({"status": {}}) is None
