"""Fault detection end to end: a straggler injected into one worker's communication layer ->
the operator's live detector blames that worker's node -> FaultDetected event, status.faults,
the node on status.avoidNodes (and, as the job asks and the cluster operator allows, cordoned) -> the job
restarts from its last checkpoint with every pod away from that node -> Succeeded."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest

from e2e.conftest import dump_debug
from loco_local.scenario import CHECKPOINT_CLAIM, small_job
from loco_local.stack import LocalStack, default_nodes

TIMEOUT_S = 420
CONTROL_PLANES = ("embedded", "kubernetes")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, control_plane: str) -> Iterator[LocalStack]:
    """conftest's stack, with cordoning enabled by the cluster operator: `--cordon-nodes`, and on the real
    control plane the chart value faultIsolation.cordonNodes, whose RBAC alone lets the operator patch nodes."""
    state = tmp_path_factory.mktemp(f"loco-e2e-faults-{control_plane}")
    env = {"LOCO_NODE_LOST_GRACE_SECONDS": "5"} if control_plane == "kubernetes" else {}
    with LocalStack(state, default_nodes(3), control_plane=control_plane, operator_env=env, cordon_nodes=True) as s:
        s.apply(copy.deepcopy(CHECKPOINT_CLAIM))
        yield s
        assert not s.rbac_denials(), "the API refused the operator (a chart RBAC bug):\n" + "\n".join(s.rbac_denials())


def _status(stack: LocalStack, name: str) -> dict:
    return (stack.get_job(name) or {}).get("status") or {}


def test_straggler_is_blamed_isolated_and_the_job_resumes_from_checkpoint(stack: LocalStack) -> None:
    name = "straggler"
    stack.apply(small_job(
        name, replicas=3, steps=40, algorithm="ddp", checkpoint__everySteps=5,
        # worker 1 enters every collective 1.5 s late, on the first attempt only
        faultInjection={"collectiveDelayS": 1.5, "ranks": [1], "onlyFirstAttempt": True},
        # judge only after the first checkpoint (step 5: ~6 collectives with the probe); thresholds well
        # above the scheduling noise of a loaded 2-core machine (checkpoint writes stall ranks ~0.5 s)
        faultDetection={"warmupCollectives": 8, "consecutive": 3, "minLatenessSeconds": 0.8, "cordonNodes": True},
    ))
    try:
        stack.wait_for(lambda: _status(stack, name).get("phase") == "Running", timeout_s=TIMEOUT_S, what="Running")
        placed = {p["metadata"]["name"]: (p.get("spec") or {}).get("nodeName") for p in stack.list_pods(name)}
        straggler_node = placed[f"{name}-worker-1"]
        assert straggler_node, placed
        job = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(dump_debug(stack, name)) from None
    status = job["status"]
    assert status["phase"] == "Succeeded", dump_debug(stack, name)
    assert status["restarts"] == 1 and status["step"] == 40, dump_debug(stack, name)

    # status tells the story
    (fault,) = status["faults"]
    assert fault["kind"] == "slow-noncomm" and fault["ranks"] == [1], fault
    assert fault["pods"] == [f"{name}-worker-1"] and fault["nodes"] == [straggler_node], (fault, placed)
    assert fault["epoch"] == 0 and fault["evidence"], fault
    assert status["avoidNodes"] == [straggler_node]
    assert fault["cordoned"] is True, fault
    # the blamed node is cordoned through the API (on the real control plane: with the RBAC of the chart's
    # faultIsolation.cordonNodes; without it the ClusterRole cannot patch nodes)
    node = stack.resource("v1", "Node").get(name=straggler_node).to_dict()
    assert node["spec"].get("unschedulable") is True, node["spec"]
    assert any(t["key"] == "loco.dev/fault" and t["effect"] == "NoSchedule" for t in node["spec"].get("taints") or []), node["spec"]
    stack.kubectl("uncordon", straggler_node)  # the module's other scenarios get the node back
    stack.resource("v1", "Node").patch(name=straggler_node, body={"spec": {"taints": [
        t for t in node["spec"].get("taints") or [] if t["key"] != "loco.dev/fault"]}},
        content_type="application/merge-patch+json")

    # events tell the story: detected (naming the node), restarted from a checkpoint, succeeded
    events = stack.events(name)
    detected = [e for e in events if e["reason"] == "FaultDetected"]
    assert detected and detected[0]["type"] == "Warning" and straggler_node in detected[0]["message"], events
    restarts = [e["message"] for e in events if e["reason"] == "Restarting"]
    assert restarts and "from step" in restarts[0] and "scratch" not in restarts[0], restarts
    assert "slow-noncomm" in restarts[0], restarts

    # the replacement pods of epoch 1 ran away from the blamed node
    pods = stack.list_pods(name)
    epoch1 = [p for p in pods if p["metadata"]["labels"].get("loco.dev/epoch") == "1"]
    assert len(epoch1) == 3, [p["metadata"]["name"] for p in pods]
    for p in epoch1:
        assert p["spec"]["nodeName"] != straggler_node, (p["metadata"]["name"], p["spec"]["nodeName"])
        terms = p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": [straggler_node]} in terms[0]["matchExpressions"]


# -------------------------------------------------------------------- a slow worker under adaptive steps

#: Worker 2 is about 4x slower than the others on every attempt (slower hardware, not a fault): every computed step
#: sleeps 0.1 s, worker 2's 0.4 s more. Under a fixed H = 10 it reaches each probe (every 5 steps) and each outer
#: step ~2 s after the others.
SLOW_WORKER = {"stepDelayS": 0.1, "slowStepDelayS": 0.4, "ranks": [2]}
#: Late collectives past 0.8 s (2 s is a clear case), judged after about the first round of 10 steps (some 5
#: collectives a round): adaptive steps measure the slow worker in that round and plan from it.
#: A hang inside the warm-up is judged after warmupHangTimeoutSeconds (default 300 s): 45 s keeps the scenario short.
SLOW_DETECTION = {"warmupCollectives": 12, "consecutive": 3, "minLatenessSeconds": 0.8, "warmupHangTimeoutSeconds": 45}


def test_a_slow_worker_under_fixed_h_is_blamed_as_a_straggler(stack: LocalStack) -> None:
    """The control for the next scenario: without adaptiveSteps the same slow worker is a straggler."""
    name = "slow-fixed"
    stack.apply(small_job(name, replicas=3, steps=60, faultInjection=dict(SLOW_WORKER), faultDetection=SLOW_DETECTION,
                          runPolicy={"backoffLimit": 0}))

    def detected_or_done() -> list[dict] | str | None:
        found = [e for e in stack.events(name) if e["reason"] == "FaultDetected"]
        return found or ("finished" if _status(stack, name).get("phase") in ("Succeeded", "Failed") else None)

    try:
        detected = stack.wait_for(detected_or_done, timeout_s=TIMEOUT_S, what=f"a FaultDetected event of {name}")
    except TimeoutError:
        raise AssertionError(dump_debug(stack, name)) from None
    assert detected != "finished", "the job finished and no fault was detected:\n" + dump_debug(stack, name)
    assert detected[0]["message"].startswith("slow-noncomm") and "rank(s) 2" in detected[0]["message"], detected
    stack.kubectl("delete", "trainingjob", name, "--wait=true", timeout_s=120)


def test_a_slow_worker_under_adaptive_steps_is_healthy_and_a_hang_is_still_blamed(stack: LocalStack) -> None:
    """algorithm.adaptiveSteps gives the slow worker fewer inner steps per round, so it reaches every outer step with
    the others: the detector sees a healthy worker, the job never evicts it, and status shows each worker's share.
    The same worker hanging (first attempt only) is still blamed, and the restarted job succeeds."""
    name = "slow-adaptive"
    stack.apply(small_job(
        name, replicas=3, steps=60, algorithm__adaptiveSteps={}, checkpoint__everySteps=10,
        faultInjection={**SLOW_WORKER, "hangBeforeCollective": 20, "onlyFirstAttempt": True},
        faultDetection=SLOW_DETECTION))
    try:
        job = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(dump_debug(stack, name)) from None
    status = job["status"]
    assert status["phase"] == "Succeeded" and status["restarts"] == 1, dump_debug(stack, name)
    # the one fault is the hang; the slow worker was never blamed for being slow, before or after the restart
    (fault,) = status["faults"]
    assert fault["kind"] == "hang-noncomm" and fault["ranks"] == [2], fault
    shares = {w["worker"]: w["steps"] for w in status["localSteps"]}
    assert shares[0] == shares[1] == 10 and 2 <= shares[2] < 10, status["localSteps"]
    changed = [e["message"] for e in stack.events(name) if e["reason"] == "LocalStepsChanged"]
    assert any(m.startswith("Worker 2 now takes ") and "of 10 inner steps per round, was 10" in m for m in changed), changed
