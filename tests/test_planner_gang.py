"""Gang start (issue 24 #2): the workers of an epoch are created behind the scheduling gate loco.dev/gang and
released together once all exist and the cluster has room for all; a gang that waits past scheduleTimeoutSeconds
gets GangScheduled=False naming the short resource. Elastic jobs and joiners start ungated."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from loco_operator.capacity import shortage
from loco_operator.planner import CreatePod, EmitEvent, Observed, UngatePods, plan
from loco_operator.render import GANG_GATE

from test_operator_elastic import ELASTIC, bound, node, worker
from test_operator_planner import NOW, children, job, pod

CREATED = "2026-01-01T12:00:00Z"
SHORT = "cpu: 2 workers request 3 each, room for 1 (free on usable nodes: n0 1, n1 3)"


def gated(rank: int) -> object:
    return pod(rank, phase="Pending", gated=True, created=CREATED)


def with_shortage(observed: Observed, why: str | None) -> Observed:
    return replace(observed, gang_shortage=why)


def condition(status: dict, type_: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


def test_workers_of_a_fixed_size_job_are_created_behind_the_gang_gate():
    creates = [a for a in plan(job(), Observed(), NOW).actions if isinstance(a, CreatePod)]
    assert [a.name for a in creates] == ["j-worker-0", "j-worker-1"]
    assert all(a.body["spec"]["schedulingGates"] == [{"name": GANG_GATE}] for a in creates)


def test_gang_off_and_elastic_jobs_create_ungated_workers():
    for spec in ({"runPolicy": {"schedulingPolicy": {"gang": False}}}, {"elastic": ELASTIC}):
        creates = [a for a in plan(job(spec), Observed(), NOW).actions if isinstance(a, CreatePod)]
        assert creates and all("schedulingGates" not in a.body["spec"] for a in creates), spec


def test_a_complete_gang_with_room_is_released_together_with_a_condition_and_an_event():
    body = job(status=plan(job(), Observed(), NOW).status)
    result = plan(body, children(gated(0), gated(1)), NOW)
    assert [a for a in result.actions if isinstance(a, UngatePods)] == [UngatePods(("j-worker-0", "j-worker-1"))]
    released = condition(result.status, "GangScheduled")
    assert (released["status"], released["reason"]) == ("True", "GangReleased")
    assert released["message"] == "Released 2 workers of epoch 0 to the scheduler together"
    assert EmitEvent("Normal", "GangReleased", released["message"]) in result.actions


def test_an_incomplete_gang_is_not_released():
    body = job(status=plan(job(), Observed(), NOW).status)
    result = plan(body, children(gated(0)), NOW)  # worker 1 is not created yet (recreated this round)
    assert not [a for a in result.actions if isinstance(a, UngatePods)]
    assert [a.name for a in result.actions if isinstance(a, CreatePod)] == ["j-worker-1"]


def test_a_gang_without_room_waits_then_says_which_resource_is_short_once():
    spec = {"runPolicy": {"schedulingPolicy": {"scheduleTimeoutSeconds": 60}}}
    body = job(spec)
    body = {**body, "status": plan(body, Observed(), NOW).status}
    waiting = with_shortage(children(gated(0), gated(1), spec=spec), SHORT)
    early = plan(body, waiting, NOW + timedelta(seconds=30))
    assert not [a for a in early.actions if isinstance(a, (UngatePods, EmitEvent))]
    assert early.status["message"] == f"Waiting for room for all 2 workers of epoch 0 (gang start): {SHORT}"
    assert condition(early.status, "GangScheduled") is None
    assert early.requeue_after_s is not None and early.requeue_after_s <= 5.0
    late = plan({**body, "status": early.status}, waiting, NOW + timedelta(seconds=61))
    short = condition(late.status, "GangScheduled")
    assert (short["status"], short["reason"]) == ("False", "InsufficientCapacity")
    assert short["message"] == f"2 workers of epoch 0 have waited 61s for room (gang start): {SHORT}"
    assert [a.reason for a in late.actions if isinstance(a, EmitEvent)] == ["InsufficientCapacity"]
    assert not [a for a in late.actions if isinstance(a, UngatePods)]
    again = plan({**body, "status": late.status}, waiting, NOW + timedelta(seconds=90))
    assert not [a for a in again.actions if isinstance(a, EmitEvent)]  # one warning, not one per reconcile
    # room appears (another job finished): released, and the condition turns True
    freed = plan({**body, "status": again.status}, with_shortage(waiting, None), NOW + timedelta(seconds=95))
    assert [a for a in freed.actions if isinstance(a, UngatePods)]
    assert condition(freed.status, "GangScheduled")["status"] == "True"


def test_shortage_names_the_short_resource_with_the_room_on_each_usable_node():
    nodes = [node("n0"), node("n1"), node("n2", ready=False)]
    pods = [bound("n0", "3"), bound("n1", "1")]
    assert shortage(worker(), nodes, pods, count=1) is None  # n1 has 3 cpu left
    assert shortage(worker(), nodes, pods, count=2) == SHORT
    big = worker(resources={"requests": {"cpu": "1", "memory": "12Gi"}})
    assert shortage(big, nodes, pods, count=3) == (
        "memory: 3 workers request 12Gi each, room for 2 (free on usable nodes: n0 16Gi, n1 16Gi)")
    gpu = worker(resources={"limits": {"nvidia.com/gpu": 1}})
    assert shortage(gpu, nodes, pods, count=1).startswith("nvidia.com/gpu: 1 workers request 1 each, room for 0 "
                                                          "(free on usable nodes: n0 none, n1 none)")
    assert shortage(worker(), [node("n2", ready=False)], [], count=1).startswith("no node can take a worker")


def test_a_gated_pod_as_the_api_returns_it_is_observed_gated_and_not_unschedulable():
    from loco_operator.planner import ObservedPod

    manifest = next(a for a in plan(job(), Observed(), NOW).actions if isinstance(a, CreatePod)).body
    manifest["metadata"]["creationTimestamp"] = CREATED
    manifest["status"] = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]}
    seen = ObservedPod.from_manifest(manifest)
    assert seen.gated and seen.created == CREATED and seen.unschedulable is None
    manifest["spec"].pop("schedulingGates")
    assert not ObservedPod.from_manifest(manifest).gated
