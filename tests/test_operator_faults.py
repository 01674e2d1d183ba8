"""Live fault detection in the operator: progress reports -> detector -> findings -> planner actions.

The feeding half (:class:`loco_detector.live.LiveDetectors`) gets synthetic progress reports
shaped exactly like the trainer's (``ProgressReport.collectives``); the acting half is the pure
planner: a finding becomes a ``FaultDetected`` Warning, a ``status.faults`` entry, the node on
``status.avoidNodes`` (a required node anti-affinity on the replacement pods), an optional cordon,
and a restart in a new epoch from the last checkpoint.
"""

from __future__ import annotations

from typing import Any

import pytest

from loco_detector import DetectorConfig, Verdict, VerdictKind
from loco_detector.live import FaultFinding, LiveDetectors, blamed_nodes
from loco_operator.planner import CordonNode, CreatePod, DeletePod, EmitEvent, Observed, plan
from loco_trainer.progress import ProgressState
from loco_contract.protocol import CollectiveSummary, LinkSummary, ProgressReport

from test_operator_planner import NOW, children, job, pod, running_status, settle

NODES = {0: "node-a", 1: "node-b", 2: "node-c"}
CONFIG = DetectorConfig(warmup_collectives=2, consecutive=3)


def _report(rank: int, collectives: list[dict[str, Any]] | None) -> ProgressReport:
    return ProgressReport.model_validate({"jobName": "j", "replicaIndex": rank, "state": "running",
                                          "collectives": collectives})


def _round(seqs: range, late_rank: int, lateness: float) -> dict[str, ProgressReport]:
    """One poll: every rank's all-reduces ``seqs`` (1 s apart), ``late_rank`` entering late."""
    out = {}
    for r in NODES:
        recs = []
        for s in seqs:
            enter = 1000.0 + s + (lateness if r == late_rank else 0.0) + 0.001 * r
            recs.append({"seq": s, "kind": "all_reduce", "nbytes": 4096, "enterS": enter,
                         "exitS": 1000.0 + s + lateness + 0.01})
        out[f"j-worker-{r}"] = _report(r, recs)
    return out


def test_live_detector_blames_the_straggler_pod_and_node_and_advances_cursors() -> None:
    live = LiveDetectors()
    placement = {r: (f"j-worker-{r}", node) for r, node in NODES.items()}
    assert live.cursor("ns/j", 0, "j-worker-1") == (-1, -1)
    findings: list[FaultFinding] = []
    for start in range(0, 12, 3):  # four polls of three collectives each
        findings += live.feed("ns/j", CONFIG, 0, placement, _round(range(start, start + 3), 1, 0.5), 1000.0 + start + 3)
        assert live.cursor("ns/j", 0, "j-worker-1") == (start + 2, -1)
    assert len(findings) == 1, findings
    f = findings[0]
    assert f.kind == "slow-noncomm" and f.verdict.ranks == (1,)
    assert f.pods == ("j-worker-1",) and f.nodes == ("node-b",) and f.epoch == 0
    assert f.verdict.seq is not None and f.verdict.seq <= CONFIG.warmup_collectives + CONFIG.consecutive
    # 0.5 s late on a 1 s collective interval: half the job's time, well worth acting on
    assert f.slowdown == pytest.approx(0.5, abs=0.05) and f.actionable
    # a new epoch starts a fresh detector with fresh cursors
    assert live.cursor("ns/j", 1, "j-worker-1") == (-1, -1)


def test_live_detector_waits_for_every_pod_to_be_scheduled_and_honours_enabled() -> None:
    live = LiveDetectors()
    unscheduled = {0: ("j-worker-0", "node-a"), 1: ("j-worker-1", None), 2: ("j-worker-2", "node-c")}
    assert live.feed("ns/j", CONFIG, 0, unscheduled, _round(range(0, 3), 1, 0.5), 1003.0) == []
    placement = {r: (f"j-worker-{r}", node) for r, node in NODES.items()}
    off = DetectorConfig(enabled=False)
    for start in range(0, 12, 3):
        assert live.feed("ns/j", off, 0, placement, _round(range(start, start + 3), 1, 0.5), 1000.0 + start + 3) == []


def test_in_flight_records_are_asked_for_again() -> None:
    live = LiveDetectors()
    placement = {r: (f"j-worker-{r}", node) for r, node in NODES.items()}
    reports = _round(range(0, 4), 1, 0.0)
    last = reports["j-worker-0"].collectives[-1]
    reports["j-worker-0"] = _report(0, [c.to_wire() for c in reports["j-worker-0"].collectives[:-1]]
                                    + [{**last.to_wire(), "exitS": None}])
    live.feed("ns/j", CONFIG, 0, placement, reports, 1005.0)
    assert live.cursor("ns/j", 0, "j-worker-0") == (2, -1)  # seq 3 is in flight: fetch it again
    assert live.cursor("ns/j", 0, "j-worker-1") == (3, -1)


def test_progress_endpoint_serves_records_after_the_cursors_only_when_asked() -> None:
    state = ProgressState(_report(0, None))
    records = [CollectiveSummary(seq=s, kind="all_reduce", nbytes=8, enter_s=float(s), exit_s=s + 0.5) for s in range(5)]
    links = [LinkSummary(id=i, src=1, dst=0, seconds=0.001, nbytes=4096, at_s=float(i)) for i in range(3)]
    state.set_fault_source(lambda since_seq, since_link: ([r for r in records if r.seq > since_seq],
                                                           [x for x in links if x.id > since_link], 0.0002))
    assert state.snapshot().collectives is None  # a plain /status stays small
    snap = state.snapshot(since_seq=2, since_link=1)
    assert [c.seq for c in snap.collectives] == [3, 4] and [x.id for x in snap.links] == [2]
    assert snap.clock_error_s == pytest.approx(0.0002)


def _finding(epoch: int = 0, kind: VerdictKind = VerdictKind.slow_noncomm, rank: int = 1, **evidence: Any) -> FaultFinding:
    verdict = Verdict(kind=kind, ranks=(rank,), link=None, node=NODES[rank], seq=7,
                      evidence={"scope": "rank", "lateness_s": 0.5, **evidence},
                      message=f"rank {rank} entered 3 collectives late", at_s=1010.0)
    return FaultFinding(verdict=verdict, epoch=epoch, pods=(f"j-worker-{rank}",), nodes=(NODES[rank],))


def _with_findings(observed: Observed, *findings: FaultFinding) -> Observed:
    return Observed(pods=observed.pods, service_exists=True, membership_token="tok", configmap_data=observed.configmap_data,
                    reports=observed.reports, findings=findings)


def _running_job(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    status = running_status(lastCheckpoint={"step": 40, "path": "/ckpt/ns/j/step-40", "time": "t"})
    return job(spec, status)


def test_a_finding_records_the_fault_avoids_the_node_and_restarts_from_the_checkpoint() -> None:
    body = _running_job()
    result = plan(body, _with_findings(children(pod(0, node_name="node-a"), pod(1, node_name="node-b")), _finding()), NOW)
    st = result.status
    assert st["phase"] == "Restarting" and st["membershipEpoch"] == 1 and st["restarts"] == 1
    assert st["avoidNodes"] == ["node-b"]
    (fault,) = st["faults"]
    assert fault["kind"] == "slow-noncomm" and fault["pods"] == ["j-worker-1"] and fault["nodes"] == ["node-b"]
    assert fault["ranks"] == [1] and fault["seq"] == 7 and fault["evidence"]["lateness_s"] == 0.5
    assert fault["cordoned"] is False and fault["time"]
    events = [a for a in result.actions if isinstance(a, EmitEvent)]
    detected = [e for e in events if e.reason == "FaultDetected"]
    assert detected and detected[0].type == "Warning" and "node-b" in detected[0].message and "j-worker-1" in detected[0].message
    assert {a.name for a in result.actions if isinstance(a, DeletePod)} == {"j-worker-0", "j-worker-1"}
    assert not [a for a in result.actions if isinstance(a, CordonNode)]
    assert "step 40" in st["message"]

    # pods gone: the new epoch's pods avoid node-b and resume from the checkpoint
    body = {**body, "status": st}
    created = [a for a in plan(body, children(), NOW).actions if isinstance(a, CreatePod)]
    assert len(created) == 2
    for action in created:
        terms = action.body["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert terms == [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-b"]}]}]
        env = {e["name"]: e.get("value") for e in action.body["spec"]["containers"][0]["env"]}
        assert env["LOCO_RESUME_FROM"] == "/ckpt/ns/j/step-40" and env["LOCO_EPOCH"] == "1"


def _cordon_plan(job_asks: bool, operator_allows: bool) -> Any:
    spec = {"faultDetection": {"cordonNodes": job_asks}}
    return plan(_running_job(spec), _with_findings(children(pod(0), pod(1), spec=spec), _finding()), NOW,
                cordon_nodes=operator_allows)


def test_a_jobs_cordon_request_is_honoured_when_the_operator_allows_cordoning() -> None:
    result = _cordon_plan(job_asks=True, operator_allows=True)
    cordons = [a for a in result.actions if isinstance(a, CordonNode)]
    assert [(c.node, c.kind) for c in cordons] == [("node-b", "slow-noncomm")] and "ns/j" in cordons[0].reason
    assert result.status["faults"][0]["cordoned"] is True
    assert any(isinstance(a, EmitEvent) and a.reason == "NodeCordoned" for a in result.actions)


def test_a_job_cannot_cordon_a_node_unless_the_cluster_operator_enabled_it() -> None:
    """Cordoning a node affects every tenant: a job's faultDetection.cordonNodes is only a request. Without
    the operator's --cordon-nodes (chart value faultIsolation.cordonNodes) it is answered with a Warning
    event, and the job keeps its own avoid-list."""
    result = _cordon_plan(job_asks=True, operator_allows=False)
    assert not [a for a in result.actions if isinstance(a, CordonNode)]
    assert not [a for a in result.actions if isinstance(a, EmitEvent) and a.reason == "NodeCordoned"]
    (warning,) = [a for a in result.actions if isinstance(a, EmitEvent) and a.reason == "CordonNotEnabled"]
    assert warning.type == "Warning" and "node-b" in warning.message
    assert "--cordon-nodes" in warning.message and "faultIsolation.cordonNodes" in warning.message
    st = result.status
    assert st["faults"][0]["cordoned"] is False and st["avoidNodes"] == ["node-b"] and st["restarts"] == 1
    created = [a for a in plan({**_running_job(), "status": st}, children(), NOW).actions if isinstance(a, CreatePod)]
    assert created and all("node-b" in str(a.body["spec"]["affinity"]) for a in created)  # the job's own avoid-list


def test_an_operator_that_may_cordon_leaves_jobs_that_did_not_ask_alone() -> None:
    result = _cordon_plan(job_asks=False, operator_allows=True)
    assert not [a for a in result.actions if isinstance(a, CordonNode)]
    assert not [a for a in result.actions if isinstance(a, EmitEvent) and a.reason in ("NodeCordoned", "CordonNotEnabled")]
    assert result.status["faults"][0]["cordoned"] is False


@pytest.mark.parametrize("enabled", [False, True], ids=["operator-default", "operator-cordon-nodes"])
async def test_reconcile_cordons_only_with_the_operators_permission(tmp_path, monkeypatch, enabled: bool) -> None:
    """The handlers hand the operator's --cordon-nodes to the planner: a job asking for a cordon gets the
    node cordoned through the API only when the operator runs with it."""
    import asyncio

    import kopf
    from kubernetes import client as k8s

    from loco_operator import handlers
    from loco_operator.cli import load_api_client
    from loco_operator.crd import build_crd

    apiserver = pytest.importorskip("loco_local.apiserver")
    server = apiserver.APIServer(host="127.0.0.1", port=0, log_root=tmp_path / "pods")
    await server.start()
    try:
        token = getattr(server, "token", None)
        kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubeconfig", server.url, **({"token": token} if token else {}))
        api_client = load_api_client(str(kubeconfig))
        core, custom = k8s.CoreV1Api(api_client), k8s.CustomObjectsApi(api_client)
        await asyncio.to_thread(k8s.ApiextensionsV1Api(api_client).create_custom_resource_definition, build_crd())
        await asyncio.to_thread(core.create_node, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b"}})
        body = {"apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "j"},
                "spec": {"replicas": 2, "faultDetection": {"cordonNodes": True}}}
        job = await asyncio.to_thread(custom.create_namespaced_custom_object, "loco.dev", "v1alpha1", "default",
                                      "trainingjobs", body)
        owner = {"apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob", "name": "j", "uid": job["metadata"]["uid"]}
        for rank in (0, 1):
            await asyncio.to_thread(core.create_namespaced_pod, "default", {
                "metadata": {"name": f"j-worker-{rank}", "ownerReferences": [owner],
                             "labels": {"loco.dev/job": "j", "loco.dev/rank": str(rank), "loco.dev/epoch": "0"}},
                "spec": {"containers": [{"name": "trainer", "image": "x"}]}})
            await asyncio.to_thread(core.patch_namespaced_pod_status, f"j-worker-{rank}", "default",
                                    {"status": {"phase": "Running"}})
        status = {"phase": "Running", "membershipEpoch": 0, "workers": {"desired": 2, "ready": 2}, "targetReplicas": 2}
        await asyncio.to_thread(custom.patch_namespaced_custom_object_status, "loco.dev", "v1alpha1", "default",
                                "trainingjobs", "j", {"status": status})
        monkeypatch.setattr(handlers, "feed_detector", lambda *_args: [_finding()])
        reasons: list[str] = []
        monkeypatch.setattr(kopf, "event", lambda _obj, *, type, reason, message: reasons.append(reason))
        ctx = handlers.OperatorContext(api_client=api_client, cordon_nodes=enabled)
        await handlers.reconcile(ctx, "default", "j")
        node = api_client.sanitize_for_serialization(await asyncio.to_thread(core.read_node, "node-b"))
        assert bool((node.get("spec") or {}).get("unschedulable")) is enabled
        assert ("NodeCordoned" in reasons) is enabled and ("CordonNotEnabled" in reasons) is not enabled
        job = await asyncio.to_thread(custom.get_namespaced_custom_object, "loco.dev", "v1alpha1", "default", "trainingjobs", "j")
        assert job["status"]["avoidNodes"] == ["node-b"] and job["status"]["faults"][0]["cordoned"] is enabled
    finally:
        await server.stop()


def test_operator_run_takes_cordon_nodes_from_a_flag_or_the_environment(monkeypatch) -> None:
    from loco_operator.cli import operator

    run = operator.commands["run"]
    assert run.make_context("run", []).params["cordon_nodes"] is False  # off unless the cluster operator says so
    assert run.make_context("run", ["--cordon-nodes"]).params["cordon_nodes"] is True
    monkeypatch.setenv("LOCO_CORDON_NODES", "true")
    assert run.make_context("run", []).params["cordon_nodes"] is True


def test_a_mild_straggler_is_reported_but_not_acted_on() -> None:
    import dataclasses

    mild = dataclasses.replace(_finding(), slowdown=0.05, min_slowdown=0.2)
    assert not mild.actionable
    result = plan(_running_job(), _with_findings(children(pod(0), pod(1)), mild), NOW)
    assert result.status["phase"] == "Running" and not result.status.get("faults")
    assert not result.status.get("avoidNodes") and not [a for a in result.actions if isinstance(a, DeletePod)]
    (event,) = [a for a in result.actions if isinstance(a, EmitEvent) and a.reason == "FaultSuspected"]
    assert event.type == "Warning" and "5%" in event.message and "minSlowdownToAct" in event.message


def test_findings_of_another_epoch_or_outside_running_are_ignored() -> None:
    body = _running_job()
    stale = plan(body, _with_findings(children(pod(0), pod(1)), _finding(epoch=5)), NOW)
    assert stale.status["phase"] == "Running" and not stale.status.get("faults")
    assert not [a for a in stale.actions if isinstance(a, DeletePod)]


def test_ambiguous_node_verdicts_replace_pods_but_avoid_no_node() -> None:
    finding = _finding(scope="ambiguous-nodes")
    assert blamed_nodes(finding) == ()
    result = plan(_running_job(), _with_findings(children(pod(0), pod(1)), finding), NOW)
    assert result.status["phase"] == "Restarting" and not result.status.get("avoidNodes")


def test_a_fault_with_no_restarts_left_fails_the_job() -> None:
    body = _running_job({"runPolicy": {"backoffLimit": 0}})
    result = plan(body, _with_findings(children(pod(0), pod(1), spec={"runPolicy": {"backoffLimit": 0}}), _finding()), NOW)
    assert result.status["phase"] == "Failed" and "slow-noncomm" in result.status["message"]
    assert result.status["faults"][0]["nodes"] == ["node-b"]


def test_faults_survive_an_operator_restart_in_the_status() -> None:
    body = _running_job()
    st = plan(body, _with_findings(children(pod(0), pod(1)), _finding()), NOW).status
    again = settle({**body, "status": st}, children())  # a fresh operator: no findings, status only
    assert again["status"]["faults"] == st["faults"] and again["status"]["avoidNodes"] == ["node-b"]


def test_an_avoided_node_is_released_after_avoid_node_seconds() -> None:
    """status.avoidNodes is not forever: once no fault has blamed a node for
    faultDetection.avoidNodeSeconds, new pods may land there again (an event says so); until then
    the planner asks to be woken at the expiry; 0 keeps the node avoided for the job's life."""
    from datetime import timedelta

    def status_after(spec: dict[str, Any] | None, later_s: float):
        body = _running_job(spec)
        st = plan(body, _with_findings(children(pod(0), pod(1), spec=spec), _finding()), NOW).status
        assert st["avoidNodes"] == ["node-b"]
        return plan({**body, "status": st}, children(spec=spec), NOW + timedelta(seconds=later_s))

    before = status_after({"faultDetection": {"avoidNodeSeconds": 600}}, 599)
    assert before.status["avoidNodes"] == ["node-b"]
    assert before.requeue_after_s is not None and before.requeue_after_s <= 1.0  # woken at the expiry
    assert not [a for a in before.actions if isinstance(a, EmitEvent) and a.reason == "NodeAvoidanceExpired"]

    after = status_after({"faultDetection": {"avoidNodeSeconds": 600}}, 600)
    assert not after.status.get("avoidNodes")
    (event,) = [a for a in after.actions if isinstance(a, EmitEvent) and a.reason == "NodeAvoidanceExpired"]
    assert "node-b" in event.message and "avoidNodeSeconds" in event.message
    created = [a for a in after.actions if isinstance(a, CreatePod)]
    assert created and all("affinity" not in a.body["spec"] or "NotIn" not in str(a.body["spec"]["affinity"]) for a in created)

    forever = status_after({"faultDetection": {"avoidNodeSeconds": 0}}, 10 * 365 * 86400)
    assert forever.status["avoidNodes"] == ["node-b"]


async def test_cordon_node_marks_the_node_keeps_its_taints_and_tolerates_forbidden(tmp_path) -> None:
    import asyncio

    from kubernetes import client as k8s

    from loco_operator.cli import load_api_client
    from loco_operator.handlers import FAULT_TAINT, OperatorContext, cordon_node

    apiserver = pytest.importorskip("loco_local.apiserver")
    server = apiserver.APIServer(host="127.0.0.1", port=0, log_root=tmp_path / "pods")
    await server.start()
    try:
        api_client = load_api_client(str(apiserver.write_kubeconfig(tmp_path / "kubeconfig", server.url, token=server.token)))
        core = k8s.CoreV1Api(api_client)
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b"},
                "spec": {"taints": [{"key": "gpu", "value": "a100", "effect": "NoSchedule"}]}}
        await asyncio.to_thread(core.create_node, node)
        ctx = OperatorContext(api_client=api_client)
        await cordon_node(ctx, CordonNode("node-b", "slow-noncomm", "ns/j: slow-noncomm: rank 1 late"))
        got = api_client.sanitize_for_serialization(await asyncio.to_thread(core.read_node, "node-b"))
        assert got["spec"]["unschedulable"] is True
        taints = {(t["key"], t.get("value"), t["effect"]) for t in got["spec"]["taints"]}
        assert taints == {("gpu", "a100", "NoSchedule"), (FAULT_TAINT, "slow-noncomm", "NoSchedule")}
        assert "rank 1 late" in got["metadata"]["annotations"][FAULT_TAINT]
        await cordon_node(ctx, CordonNode("node-b", "hang-noncomm", "again"))  # idempotent: one loco taint
        got = api_client.sanitize_for_serialization(await asyncio.to_thread(core.read_node, "node-b"))
        assert [t["value"] for t in got["spec"]["taints"] if t["key"] == FAULT_TAINT] == ["hang-noncomm"]
        await cordon_node(ctx, CordonNode("no-such-node", "slow-noncomm", "gone"))  # logged, not raised
    finally:
        await server.stop()
