"""Handler helpers that need no cluster: progress polling and the status merge patch."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from loco_operator.handlers import OperatorContext, _merge_patch, poll_reports
from loco_operator.planner import ObservedPod


async def test_poll_reports_reads_answering_workers_and_skips_silent_ones():
    async def status(_request):
        return web.json_response({"jobName": "j", "replicaIndex": 0, "state": "running", "step": 3})

    app = web.Application()
    app.router.add_get("/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
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
