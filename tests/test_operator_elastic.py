"""Elastic resizing in the pure planner (docs/elastic.md): shrink when a worker cannot be placed,
wait at minReplicas, grow back on capacity, user resizes; and the capacity estimate it relies on."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from loco_operator.capacity import free_slots
from loco_detector import Verdict, VerdictKind
from loco_detector.live import FaultFinding, LiveDetectors
from loco_operator.planner import (
    CreatePod,
    DeletePod,
    EmitEvent,
    Observed,
    ObservedPod,
    PatchPodLabels,
    PostMembership,
    plan,
)
from loco_operator.render import JobRef, config_json, render_pod
from loco_contract.protocol import ProgressReport
from loco_operator.spec import TrainingJobSpec
from loco_operator.validation import validate_job

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
REF = JobRef("j", "ns", "uid-1")
# The coordinated-restart tests turn live resizing off (it is on by default for the DiLoCo family);
# the "live" section below turns it on.
ELASTIC = {"minReplicas": 2, "maxReplicas": 4, "scaleUpDelaySeconds": 30, "placementTimeoutSeconds": 15, "liveResize": False}
UNSCHED = "0/3 nodes are available: 1 node(s) had untolerated taint, 2 Insufficient cpu"


def spec_of(replicas: int = 3, **extra: Any) -> dict[str, Any]:
    return {"replicas": replicas, "elastic": dict(ELASTIC), **extra}


def job(spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": "uid-1", "generation": 1}, "spec": spec,
    }
    if status is not None:
        body["status"] = status
    return body


def pod(rank: int, epoch: int = 0, phase: str = "Running", **kw: Any) -> ObservedPod:
    return ObservedPod(name=f"j-worker-{rank}", rank=rank, epoch=epoch, phase=phase, node_name=f"n{rank}", **kw)


def stuck(rank: int, epoch: int, since: datetime = NOW) -> ObservedPod:
    return ObservedPod(name=f"j-worker-{rank}", rank=rank, epoch=epoch, phase="Pending",
                       unschedulable=UNSCHED, unschedulable_since=since.strftime("%Y-%m-%dT%H:%M:%SZ"))


def seen(spec: dict[str, Any], *pods: ObservedPod, free: int | None = None) -> Observed:
    cfg = config_json(REF, TrainingJobSpec.model_validate(spec))
    return Observed(pods=pods, service_exists=True, membership_token="tok", configmap_data=cfg, free_slots=free)


def step(body: dict[str, Any], observed: Observed, now: datetime = NOW) -> tuple[dict[str, Any], Any]:
    result = plan(body, observed, now)
    return {**body, "status": result.status}, result


def running(spec: dict[str, Any], size: int, epoch: int = 0, status: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job with all ``size`` workers of ``epoch`` running (planned to that state)."""
    body = job(spec, status)
    for phase in ("Pending", "Running"):
        body, _ = step(body, seen(spec, *(pod(r, epoch, phase) for r in range(size))))
    assert body["status"]["phase"] == "Running", body["status"]
    return body


def resize_events(result: Any) -> list[str]:
    return [a.message for a in result.actions if isinstance(a, EmitEvent) and a.reason == "Resizing"]


def env_of(action: CreatePod) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in action.body["spec"]["containers"][0]["env"]}


def test_failed_worker_whose_replacement_cannot_be_placed_shrinks_the_job():
    spec = spec_of(3)
    body = running(spec, 3)
    # worker-2's node died: the pod failed -> an ordinary restart (counted), same size
    body, result = step(body, seen(spec, pod(0), pod(1), pod(2, phase="Failed", exit_code=137)))
    assert (body["status"]["phase"], body["status"]["restarts"], body["status"]["membershipEpoch"]) == ("Restarting", 1, 1)
    assert body["status"]["workers"]["desired"] == 3
    body, _ = step(body, seen(spec))  # old pods gone: three new ones are created
    # the replacement stays Unschedulable: within placementTimeoutSeconds nothing happens but a requeue
    pending = seen(spec, pod(0, 1), pod(1, 1), stuck(2, 1))
    body, result = step(body, pending, NOW + timedelta(seconds=10))
    assert not [a for a in result.actions if isinstance(a, DeletePod)]
    assert result.requeue_after_s is not None and result.requeue_after_s <= 5.0
    # past the timeout: shrink to 2 in a new epoch, not counted as a restart
    body, result = step(body, pending, NOW + timedelta(seconds=16))
    st = body["status"]
    assert (st["phase"], st["membershipEpoch"], st["restarts"], st["resizes"]) == ("Restarting", 2, 1, 1)
    assert st["workers"]["desired"] == 2 and st["targetReplicas"] == 3
    # the resize names the root cause: which pod failed on which node, then why its replacement is missing
    failure = "j-worker-2 exited with code 137 on node n2"
    expected = f"Resized 3→2 ({failure}; its replacement cannot be placed: {UNSCHED}), resuming from scratch (no checkpoint yet)"
    assert resize_events(result) == [expected]
    assert st["message"] == expected
    assert next(c for c in st["conditions"] if c["type"] == "Restarting")["message"] == expected
    assert st["lastFailure"] == {"reason": "WorkerFailed", "message": failure, "pods": ["j-worker-2"], "nodes": ["n2"],
                                 "epoch": 0, "time": "2026-01-01T12:00:00Z"}
    assert {a.name for a in result.actions if isinstance(a, DeletePod)} == {"j-worker-0", "j-worker-1", "j-worker-2"}
    # the new epoch has two workers that know the world is 2
    body, result = step(body, seen(spec))
    created = [a for a in result.actions if isinstance(a, CreatePod)]
    assert [(a.rank, a.epoch) for a in created] == [(0, 2), (1, 2)]
    assert {env_of(a)["LOCO_NUM_REPLICAS"] for a in created} == {"2"}
    body, _ = step(body, seen(spec, pod(0, 2, "Pending"), pod(1, 2, "Pending")))
    body, _ = step(body, seen(spec, pod(0, 2), pod(1, 2)))
    assert body["status"]["phase"] == "Running" and body["status"]["workersReady"].endswith("/2")
    # and stays at 2 (no resize back without capacity)
    body, result = step(body, seen(spec, pod(0, 2), pod(1, 2), free=0), NOW + timedelta(minutes=5))
    assert resize_events(result) == [] and body["status"]["workers"]["desired"] == 2


def test_evicted_worker_shrinks_like_a_failed_one():
    spec = spec_of(3)
    body = running(spec, 3)
    body, _ = step(body, seen(spec, pod(0), pod(1), pod(2, phase="Failed", termination_reason="Evicted")))
    body, _ = step(body, seen(spec))
    body, result = step(body, seen(spec, pod(0, 1), stuck(1, 1), pod(2, 1)), NOW + timedelta(seconds=20))
    # another rank's replacement is the one left unplaced: the failure, then that pod by name
    assert resize_events(result)[0].startswith(
        f"Resized 3→2 (j-worker-2 failed on node n2: Evicted; j-worker-1 cannot be placed: {UNSCHED})")
    assert body["status"]["workers"]["desired"] == 2


def test_below_min_waits_in_restarting_and_resumes_when_placed():
    spec = spec_of(2)  # already at minReplicas
    body = running(spec, 2)
    body, _ = step(body, seen(spec, pod(0), pod(1, phase="Failed", exit_code=1)))
    body, _ = step(body, seen(spec))
    waiting = seen(spec, pod(0, 1), stuck(1, 1))
    body, result = step(body, waiting, NOW + timedelta(seconds=30))
    st = body["status"]
    assert st["phase"] == "Restarting" and st["workers"]["desired"] == 2 and st["membershipEpoch"] == 1
    assert not [a for a in result.actions if isinstance(a, DeletePod)]  # the pod keeps waiting for a node
    cond = next(c for c in st["conditions"] if c["type"] == "Restarting")
    assert cond["status"] == "True" and cond["reason"] == "WaitingForCapacity"
    assert "1 of 2 workers cannot be placed and elastic.minReplicas is 2" in cond["message"]
    assert cond["message"].endswith(f"(j-worker-1 exited with code 1 on node n1; its replacement cannot be placed: {UNSCHED})")
    assert [a.reason for a in result.actions if isinstance(a, EmitEvent)] == ["WaitingForCapacity"]
    body, result = step(body, waiting, NOW + timedelta(seconds=35))  # said once, not on every reconcile
    assert not [a for a in result.actions if isinstance(a, EmitEvent)]
    # a node comes back and the pod is bound: the job runs again at 2
    body, _ = step(body, seen(spec, pod(0, 1), pod(1, 1)), NOW + timedelta(seconds=40))
    assert body["status"]["phase"] == "Running" and body["status"]["membershipEpoch"] == 1


def test_worker_lost_with_its_node_names_the_node_in_the_resize():
    """A node goes NotReady: its pod is marked Failed/NodeLost (pod-level reason) or deleted by the
    taint manager (DisruptionTarget condition); the shrink that follows says so, with the node."""
    spec = spec_of(3)
    labels = {"loco.dev/job": "j", "loco.dev/rank": "2", "loco.dev/epoch": "0"}
    lost = ObservedPod.from_manifest({
        "metadata": {"name": "j-worker-2", "labels": labels}, "spec": {"nodeName": "n7"},
        "status": {"phase": "Failed", "reason": "NodeLost", "message": "Node n7 which was running pod j-worker-2 is unresponsive",
                   "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}]},
    })
    tainted = ObservedPod.from_manifest({
        "metadata": {"name": "j-worker-2", "labels": labels, "deletionTimestamp": "2026-01-01T11:59:00Z"},
        "spec": {"nodeName": "n7"},
        "status": {"phase": "Running", "conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
             "message": "Taint manager: deleting due to NoExecute taint"}]},
    })
    assert lost is not None and tainted is not None
    for gone, failure in ((lost, "j-worker-2 exited with code 137 on node n7: NodeLost"),
                          (tainted, "j-worker-2 was deleted while Running on node n7 "
                                    "(DeletionByTaintManager: Taint manager: deleting due to NoExecute taint)")):
        body = running(spec, 3)
        body, result = step(body, seen(spec, pod(0), pod(1), gone))
        assert [a.message for a in result.actions if isinstance(a, EmitEvent) and a.reason == "WorkerFailed"] == [failure]
        assert body["status"]["lastFailure"]["nodes"] == ["n7"]
        body, _ = step(body, seen(spec))
        body, result = step(body, seen(spec, pod(0, 1), pod(1, 1), stuck(2, 1)), NOW + timedelta(seconds=20))
        assert resize_events(result)[0].startswith(f"Resized 3→2 ({failure}; its replacement cannot be placed: {UNSCHED})")


def rank2_hang() -> FaultFinding:
    """The detector's verdict of epoch 0: rank 2 (j-worker-2 on n2) never entered collective #41."""
    verdict = Verdict(kind=VerdictKind.hang_comm, ranks=(2,), link=None, node="n2", seq=41,
                      evidence={"scope": "rank"}, message="rank 2 never entered collective #41")
    return FaultFinding(verdict=verdict, epoch=0, pods=("j-worker-2",), nodes=("n2",))


def test_pod_blamed_by_the_fault_detector_whose_replacement_cannot_be_placed_names_the_fault():
    spec = spec_of(3)
    body = running(spec, 3)
    finding = rank2_hang()
    live = (pod(0), pod(1), pod(2))
    cfg = seen(spec, *live)
    body, result = step(body, Observed(pods=live, service_exists=True, membership_token="tok", configmap_data=cfg.configmap_data, findings=(finding,)))
    st = body["status"]
    assert (st["phase"], st["restarts"], st["avoidNodes"]) == ("Restarting", 1, ["n2"])
    assert st["lastFailure"]["reason"] == "FaultDetected"
    assert (st["lastFailure"]["pods"], st["lastFailure"]["nodes"], st["lastFailure"]["epoch"]) == (["j-worker-2"], ["n2"], 0)
    body, _ = step(body, seen(spec))
    # n2 is avoided and the others are full: the replacement stays Unschedulable -> shrink, naming the fault
    body, result = step(body, seen(spec, pod(0, 1), pod(1, 1), stuck(2, 1)), NOW + timedelta(seconds=20))
    assert resize_events(result) == [
        f"Resized 3→2 (hang-comm blamed j-worker-2 on n2; its replacement cannot be placed: {UNSCHED}), "
        "resuming from scratch (no checkpoint yet)"]
    assert body["status"]["message"] == resize_events(result)[0]


def test_unplaceable_pod_of_a_user_scale_up_does_not_blame_an_older_failure():
    spec = spec_of(3)
    body = running(spec, 3)
    body, _ = step(body, seen(spec, pod(0), pod(1), pod(2, phase="Failed", exit_code=137)))  # epoch 0 -> 1
    body, _ = step(body, seen(spec))
    body, _ = step(body, seen(spec, pod(0, 1), pod(1, 1), pod(2, 1)))
    assert body["status"]["phase"] == "Running" and body["status"]["lastFailure"]["epoch"] == 0
    up = spec_of(4)
    body = {**body, "spec": up}
    body, result = step(body, seen(up, pod(0, 1), pod(1, 1), pod(2, 1)))  # epoch 1 -> 2
    assert resize_events(result)[0].startswith("Resized 3→4 (spec.replicas changed)")
    body, _ = step(body, seen(up))
    body, result = step(body, seen(up, pod(0, 2), pod(1, 2), pod(2, 2), stuck(3, 2)), NOW + timedelta(seconds=20))
    assert resize_events(result)[0].startswith(f"Resized 4→3 (j-worker-3 cannot be placed: {UNSCHED}), resuming")


def test_two_unplaceable_workers_shrink_only_to_min():
    spec = spec_of(4)
    body = running(spec, 4)
    body, result = step(body, seen(spec, pod(0), pod(1), stuck(2, 0), stuck(3, 0)), NOW + timedelta(seconds=20))
    assert resize_events(result)[0].startswith("Resized 4→2 (j-worker-2 cannot be placed")
    spec3 = spec_of(4, elastic={**ELASTIC, "minReplicas": 3})
    body = running(spec3, 4)
    body, result = step(body, seen(spec3, pod(0), stuck(1, 0), stuck(2, 0), pod(3)), NOW + timedelta(seconds=20))
    assert resize_events(result)[0].startswith("Resized 4→3")
    assert body["status"]["workers"]["desired"] == 3


def _shrunk(spec: dict[str, Any]) -> dict[str, Any]:
    """A 3-worker job shrunk to 2 at NOW (epoch 1) and running again."""
    body = running(spec, 3)
    body, _ = step(body, seen(spec, pod(0), pod(1), stuck(2, 0, NOW - timedelta(seconds=20))))
    body, _ = step(body, seen(spec))
    body, _ = step(body, seen(spec, pod(0, 1, "Pending"), pod(1, 1, "Pending")))
    body, _ = step(body, seen(spec, pod(0, 1), pod(1, 1)))
    assert body["status"]["workers"]["desired"] == 2 and body["status"]["phase"] == "Running"
    return body


def test_capacity_back_grows_after_scale_up_delay():
    spec = spec_of(3)
    body = _shrunk(spec)
    live = (pod(0, 1), pod(1, 1))
    _, result = step(body, seen(spec, *live, free=None), NOW + timedelta(minutes=2))  # capacity unknown: stay
    assert resize_events(result) == []
    _, result = step(body, seen(spec, *live, free=1), NOW + timedelta(seconds=29))  # within scaleUpDelaySeconds
    assert resize_events(result) == [] and result.requeue_after_s is not None and result.requeue_after_s <= 5.0
    body, result = step(body, seen(spec, *live, free=5), NOW + timedelta(seconds=31))
    assert resize_events(result) == ["Resized 2→3 (capacity), resuming from scratch (no checkpoint yet)"]
    st = body["status"]
    assert (st["workers"]["desired"], st["restarts"], st["resizes"], st["membershipEpoch"]) == (3, 0, 2, 2)
    body, result = step(body, seen(spec))
    assert [a.rank for a in result.actions if isinstance(a, CreatePod)] == [0, 1, 2]


def test_a_shrunk_job_whose_workers_finished_succeeds_instead_of_growing():
    """Found on the real control plane: the run ended while shrunk, its finished pods freed their nodes, the
    capacity model saw room, and the job grew, restarted at its last step, shrank, grew... forever."""
    spec = spec_of(3)
    body = _shrunk(spec)
    done = (pod(0, 1, "Succeeded"), pod(1, 1, "Succeeded"))
    body, result = step(body, seen(spec, *done, free=5), NOW + timedelta(minutes=5))
    assert resize_events(result) == []
    assert body["status"]["phase"] == "Succeeded" and body["status"]["workers"]["desired"] == 2
    # one worker done, the other still on its last steps: no resize either
    _, result = step(_shrunk(spec), seen(spec, pod(0, 1, "Succeeded"), pod(1, 1), free=5), NOW + timedelta(minutes=5))
    assert resize_events(result) == []


def test_user_scale_up_and_down_within_bounds():
    spec = spec_of(3)
    body = running(spec, 3)
    up = spec_of(4)
    body = {**body, "spec": up}
    body, result = step(body, seen(up, pod(0), pod(1), pod(2)))
    assert resize_events(result) == ["Resized 3→4 (spec.replicas changed), resuming from scratch (no checkpoint yet)"]
    assert body["status"]["workers"]["desired"] == 4 and body["status"]["restarts"] == 0
    # a shrunk job asked for 2 by the user: already 2, so no restart, and 2 is the new target
    body = _shrunk(spec)
    down = spec_of(2)
    body = {**body, "spec": down}
    body, result = step(body, seen(down, pod(0, 1), pod(1, 1), free=3), NOW + timedelta(minutes=5))
    assert resize_events(result) == [] and body["status"]["targetReplicas"] == 2
    assert body["status"]["workers"]["desired"] == 2 and body["status"]["phase"] == "Running"
    # a shrunk job whose user raises replicas goes straight to the new size
    body = _shrunk(spec)
    body = {**body, "spec": up}
    body, result = step(body, seen(up, pod(0, 1), pod(1, 1)))
    assert resize_events(result)[0].startswith("Resized 2→4 (spec.replicas changed)")


def test_above_max_or_below_min_is_refused_naming_the_field():
    errors = validate_job(job(spec_of(5)))
    assert any("elastic.maxReplicas" in str(e) for e in errors), errors
    errors = validate_job(job(spec_of(1)))
    assert any("elastic.minReplicas" in str(e) for e in errors), errors


def test_non_elastic_job_never_shrinks():
    spec = {"replicas": 3}
    body = running(spec, 3)
    body, result = step(body, seen(spec, pod(0), pod(1), stuck(2, 0)), NOW + timedelta(minutes=10))
    assert resize_events(result) == [] and body["status"]["workers"]["desired"] == 3


# ---------------------------------------------------------------------------------------- live
#
# A DiLoCo-family job with one process per pod and elastic.liveResize (the default) resizes without
# restarting the survivors: their labels are patched (new epoch, new rank; pods keep their names),
# the leavers are deleted, joiners are created under free names, and each survivor is POSTed its
# place in the new epoch once every worker of that epoch reports.

LIVE = {**ELASTIC, "liveResize": True}
DNS = "j-worker-{}.j.ns.svc"


def live_spec(replicas: int = 3, **extra: Any) -> dict[str, Any]:
    return {"replicas": replicas, "elastic": dict(LIVE), "algorithm": {"name": "diloco"}, **extra}


def wpod(i: int, rank: int, epoch: int, phase: str = "Running", **kw: Any) -> ObservedPod:
    """Pod ``j-worker-<i>`` holding ``rank`` of ``epoch`` (after a live resize name and rank differ)."""
    return ObservedPod(name=f"j-worker-{i}", rank=rank, epoch=epoch, phase=phase, node_name=f"n{i}",
                       pod_ip=f"10.0.0.{i}", **kw)


def report(pod: ObservedPod, epoch: int) -> ProgressReport:
    return ProgressReport(job_name="j", replica_index=pod.rank, epoch=epoch, state="running", step=10)


def live_seen(spec: dict[str, Any], *pods: ObservedPod, reported: dict[str, int] | None = None,
              free: int | None = None, findings: tuple = ()) -> Observed:
    """``reported``: pod name -> the epoch its /status names (pods left out did not answer)."""
    by_name = {x.name: x for x in pods}
    reports = {name: report(by_name[name], e) for name, e in (reported or {}).items()}
    return Observed(pods=pods, service_exists=True, membership_token="tok", configmap_data=seen(spec).configmap_data, reports=reports,
                    free_slots=free, findings=findings)


def of(result: Any, kind: type) -> list[Any]:
    return [a for a in result.actions if isinstance(a, kind)]


def patched(result: Any) -> dict[str, tuple[int, int]]:
    """Pod name -> (rank, epoch) its labels are patched to."""
    return {a.name: (int(a.labels["loco.dev/rank"]), int(a.labels["loco.dev/epoch"])) for a in of(result, PatchPodLabels)}


def posted(result: Any) -> dict[str, dict[str, Any]]:
    return {a.name: a.body for a in of(result, PostMembership)}


def live_running(spec: dict[str, Any], size: int) -> dict[str, Any]:
    body = running(spec, size)
    assert body["status"]["membershipEpoch"] == 0
    return body


def test_live_failure_shrinks_keeping_the_survivors_and_tells_them_their_new_place():
    spec = live_spec(3)
    body = live_running(spec, 3)
    # worker-0 (rank 0) dies: the survivors worker-1, worker-2 become ranks 0, 1 of epoch 1
    dead = wpod(0, 0, 0, "Failed", exit_code=137)
    body, result = step(body, live_seen(spec, dead, wpod(1, 1, 0), wpod(2, 2, 0),
                                        reported={"j-worker-1": 0, "j-worker-2": 0}))
    st = body["status"]
    assert (st["phase"], st["restarts"], st["resizes"], st["membershipEpoch"]) == ("Running", 0, 1, 1)
    assert (st["workers"]["desired"], st["targetReplicas"]) == (2, 3)
    assert st["lastResizeTime"] == "2026-01-01T12:00:00Z"
    failure = "j-worker-0 exited with code 137 on node n0"
    expected = f"Resized 3→2 ({failure}); 2 workers continue without restarting (epoch 1)"
    assert resize_events(result) == [expected] and st["message"] == expected
    assert [a.message for a in of(result, EmitEvent) if a.reason == "WorkerFailed"] == [failure]
    assert [a.type for a in of(result, EmitEvent) if a.reason == "Resizing"] == ["Normal"]
    assert (st["lastFailure"]["pods"], st["lastFailure"]["epoch"]) == (["j-worker-0"], 0)
    assert [a.name for a in of(result, DeletePod)] == ["j-worker-0"]
    assert patched(result) == {"j-worker-1": (0, 1), "j-worker-2": (1, 1)}
    assert not of(result, CreatePod) and not of(result, PostMembership)
    assert next(c for c in st["conditions"] if c["type"] == "Running")["status"] == "True"

    # next reconcile: the labels are patched, the survivors still run epoch 0 -> each gets its place
    survivors = (wpod(1, 0, 1), wpod(2, 1, 1))
    body, result = step(body, live_seen(spec, *survivors, reported={"j-worker-1": 0, "j-worker-2": 0}))
    port = 29500 + 1 + 1  # epoch_master_port(MASTER_PORT, 1)
    assert posted(result) == {
        "j-worker-1": {"epoch": 1, "rank": 0, "worldSize": 2, "masterAddr": DNS.format(1), "masterPort": port},
        "j-worker-2": {"epoch": 1, "rank": 1, "worldSize": 2, "masterAddr": DNS.format(1), "masterPort": port},
    }
    assert [a.pod_ip for a in of(result, PostMembership)] == ["10.0.0.1", "10.0.0.2"]
    assert result.requeue_after_s is not None and result.requeue_after_s <= 2.0
    assert body["status"]["phase"] == "Running" and not of(result, DeletePod) and not of(result, CreatePod)
    # one switched, one not yet: only the laggard is told again
    body, result = step(body, live_seen(spec, *survivors, reported={"j-worker-1": 1, "j-worker-2": 0}))
    assert list(posted(result)) == ["j-worker-2"]
    # both report epoch 1: nothing more to send, nothing else to do
    body, result = step(body, live_seen(spec, *survivors, reported={"j-worker-1": 1, "j-worker-2": 1}))
    assert result.actions == () and body["status"]["workersReady"] == "2/2"


def test_live_membership_update_waits_until_every_worker_reports():
    spec = live_spec(3)
    body = live_running(spec, 3)
    body, _ = step(body, live_seen(spec, wpod(0, 0, 0), wpod(1, 1, 0, "Failed", exit_code=1), wpod(2, 2, 0)))
    survivors = (wpod(0, 0, 1), wpod(2, 1, 1))
    # worker-2 did not answer this round: no update for anyone yet (worker-0 would wait for it)
    body, result = step(body, live_seen(spec, *survivors, reported={"j-worker-0": 0}))
    assert posted(result) == {} and result.requeue_after_s is not None and result.requeue_after_s <= 2.0
    body, result = step(body, live_seen(spec, *survivors, reported={"j-worker-0": 0, "j-worker-2": 0}))
    assert set(posted(result)) == {"j-worker-0", "j-worker-2"}
    # the failed pod still terminating (an old epoch) is deleted, and does not hold the survivors up
    old = wpod(1, 1, 0, "Failed", exit_code=1)
    body, result = step(body, live_seen(spec, *survivors, old, reported={"j-worker-0": 0, "j-worker-2": 0}))
    assert set(posted(result)) == {"j-worker-0", "j-worker-2"} and [a.name for a in of(result, DeletePod)] == ["j-worker-1"]
    assert body["status"]["phase"] == "Running"


def test_live_fault_verdict_drops_the_blamed_pod_and_avoids_its_node():
    spec = live_spec(3)
    body = live_running(spec, 3)
    finding = rank2_hang()
    pods = (wpod(0, 0, 0), wpod(1, 1, 0), wpod(2, 2, 0))
    body, result = step(body, live_seen(spec, *pods, findings=(finding,)))
    st = body["status"]
    assert (st["phase"], st["restarts"], st["resizes"], st["membershipEpoch"]) == ("Running", 0, 1, 1)
    assert st["avoidNodes"] == ["n2"] and st["faults"][0]["kind"] == "hang-comm"
    assert st["lastFailure"]["reason"] == "FaultDetected"
    assert [a.reason for a in of(result, EmitEvent)][:1] == ["FaultDetected"]
    assert resize_events(result) == ["Resized 3→2 (hang-comm blamed j-worker-2 on n2); 2 workers continue without "
                                     "restarting (epoch 1)"]
    assert [a.name for a in of(result, DeletePod)] == ["j-worker-2"]
    assert patched(result) == {"j-worker-0": (0, 1), "j-worker-1": (1, 1)}


def test_live_user_scale_down_keeps_the_lowest_ranks():
    spec = live_spec(4)
    body = live_running(spec, 4)
    down = live_spec(2)
    body = {**body, "spec": down}
    pods = (wpod(0, 0, 0), wpod(1, 1, 0), wpod(2, 2, 0), wpod(3, 3, 0))
    body, result = step(body, live_seen(down, *pods))
    assert resize_events(result) == ["Resized 4→2 (spec.replicas changed); 2 workers continue without restarting (epoch 1)"]
    assert sorted(a.name for a in of(result, DeletePod)) == ["j-worker-2", "j-worker-3"]
    assert patched(result) == {"j-worker-0": (0, 1), "j-worker-1": (1, 1)}
    st = body["status"]
    assert (st["phase"], st["restarts"], st["workers"]["desired"], st["targetReplicas"]) == ("Running", 0, 2, 2)
    # settled: the two run on at 2 and nothing is recreated
    body, result = step(body, live_seen(down, wpod(0, 0, 1), wpod(1, 1, 1), reported={"j-worker-0": 1, "j-worker-1": 1}))
    assert result.actions == () and body["status"]["workersReady"] == "2/2"


def test_live_user_scale_up_creates_a_joiner_when_every_worker_reports():
    spec = live_spec(3)
    body = live_running(spec, 3)
    up = live_spec(4)
    pods = (wpod(0, 0, 0), wpod(1, 1, 0), wpod(2, 2, 0))
    body, result = step({**body, "spec": up}, live_seen(up, *pods, reported={x.name: 0 for x in pods}))
    assert resize_events(result) == ["Resized 3→4 (spec.replicas changed); 1 worker joins at the next outer step, "
                                     "3 continue without restarting (epoch 1)"]
    assert [(a.name, a.rank, a.epoch) for a in of(result, CreatePod)] == [("j-worker-3", 3, 1)]
    assert patched(result) == {"j-worker-0": (0, 1), "j-worker-1": (1, 1), "j-worker-2": (2, 1)}
    assert not of(result, DeletePod) and body["status"]["phase"] == "Running"


def test_live_scale_waits_until_the_previous_live_change_is_done():
    """A user scale-down right after a live grow must not delete the joiner the survivors are still
    regrouping with (they would wait for it at the rendezvous): the resize waits for every worker
    to report the new epoch, and the joiner is not counted ready before the survivors are."""
    spec = live_spec(3)
    body = live_running(spec, 3)
    up = live_spec(4)
    pods = (wpod(0, 0, 0), wpod(1, 1, 0), wpod(2, 2, 0))
    body, _ = step({**body, "spec": up}, live_seen(up, *pods, reported={x.name: 0 for x in pods}))
    grown = (wpod(0, 0, 1), wpod(1, 1, 1), wpod(2, 2, 1), wpod(3, 3, 1))
    down = live_spec(2)
    body = {**body, "spec": down}
    # the survivors still report epoch 0 (switching), the joiner epoch 1: nothing is resized or deleted
    switching = {"j-worker-0": 0, "j-worker-1": 0, "j-worker-2": 0, "j-worker-3": 1}
    body, result = step(body, live_seen(down, *grown, reported=switching))
    assert not of(result, DeletePod) and not resize_events(result), result.actions
    assert sorted(posted(result)) == ["j-worker-0", "j-worker-1", "j-worker-2"]
    assert body["status"]["workers"] == {"desired": 4, "ready": 1} and body["status"]["targetReplicas"] == 4
    assert result.requeue_after_s is not None and result.requeue_after_s <= 2.0
    # everyone in epoch 1: now the scale-down runs, keeping ranks 0 and 1
    body, result = step(body, live_seen(down, *grown, reported={x.name: 1 for x in grown}))
    assert resize_events(result) == ["Resized 4→2 (spec.replicas changed); 2 workers continue without restarting (epoch 2)"]
    assert sorted(a.name for a in of(result, DeletePod)) == ["j-worker-2", "j-worker-3"]


def _live_shrunk(spec: dict[str, Any]) -> dict[str, Any]:
    """3 workers, worker-1 failed at NOW: worker-0 and worker-2 run on as ranks 0, 1 of epoch 1."""
    body = live_running(spec, 3)
    body, result = step(body, live_seen(spec, wpod(0, 0, 0), wpod(1, 1, 0, "Failed", exit_code=1), wpod(2, 2, 0)))
    assert patched(result) == {"j-worker-0": (0, 1), "j-worker-2": (1, 1)}
    return body


def test_live_grow_on_capacity_creates_a_joiner_under_a_free_name():
    spec = live_spec(3)
    body = _live_shrunk(spec)
    survivors = (wpod(0, 0, 1), wpod(2, 1, 1))
    reported = {"j-worker-0": 1, "j-worker-2": 1}
    _, result = step(body, live_seen(spec, *survivors, reported=reported, free=1), NOW + timedelta(seconds=29))
    assert resize_events(result) == []  # within scaleUpDelaySeconds
    body, result = step(body, live_seen(spec, *survivors, reported=reported, free=5), NOW + timedelta(seconds=31))
    assert resize_events(result) == ["Resized 2→3 (capacity); 1 worker joins at the next outer step, "
                                     "2 continue without restarting (epoch 2)"]
    st = body["status"]
    assert (st["phase"], st["restarts"], st["resizes"], st["membershipEpoch"]) == ("Running", 0, 2, 2)
    assert st["workers"]["desired"] == 3 and not of(result, DeletePod)
    assert patched(result) == {"j-worker-0": (0, 2), "j-worker-2": (1, 2)}  # same ranks, new epoch
    [joiner] = of(result, CreatePod)
    # worker-2 holds rank 1: the joiner (rank 2) takes the smallest free name, worker-1
    assert (joiner.name, joiner.rank, joiner.epoch) == ("j-worker-1", 2, 2)
    meta, pod_spec = joiner.body["metadata"], joiner.body["spec"]
    assert meta["name"] == pod_spec["hostname"] == "j-worker-1"
    assert (meta["labels"]["loco.dev/rank"], meta["labels"]["loco.dev/epoch"]) == ("2", "2")
    env = env_of(joiner)
    assert (env["LOCO_JOIN"], env["LOCO_LIVE_RESIZE"], env["LOCO_REPLICA_INDEX"], env["LOCO_NUM_REPLICAS"]) == ("1", "1", "2", "3")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["LOCO_EPOCH"]) == (DNS.format(0), str(29500 + 1 + 2), "2")

    # the joiner starts: no update while it does not report, then the survivors are told
    grown = (wpod(0, 0, 2), wpod(2, 1, 2))
    t = NOW + timedelta(seconds=40)
    body, result = step(body, live_seen(spec, *grown, wpod(1, 2, 2, "Pending"), reported=reported), t)
    assert posted(result) == {} and body["status"]["phase"] == "Running"
    body, result = step(body, live_seen(spec, *grown, wpod(1, 2, 2), reported=reported), t)
    assert posted(result) == {}
    body, result = step(body, live_seen(spec, *grown, wpod(1, 2, 2), reported={**reported, "j-worker-1": 2}), t)
    assert {name: (b["rank"], b["worldSize"], b["masterAddr"], b["masterPort"]) for name, b in posted(result).items()} == {
        "j-worker-0": (0, 3, DNS.format(0), 29503), "j-worker-2": (1, 3, DNS.format(0), 29503)}


def test_live_joiner_still_loading_does_not_pull_the_job_step_back():
    """A joiner reports step 0 while it loads (state starting) until it adopts the survivors' step:
    ``status.step`` comes from the running workers meanwhile, so a dashboard never sees it drop."""
    spec = live_spec(3)
    body = _live_shrunk(spec)
    survivors = (wpod(0, 0, 1), wpod(2, 1, 1))
    body, result = step(body, live_seen(spec, *survivors, reported={"j-worker-0": 1, "j-worker-2": 1}, free=5),
                        NOW + timedelta(seconds=31))
    assert body["status"]["membershipEpoch"] == 2 and len(of(result, CreatePod)) == 1
    pods = (wpod(0, 0, 2), wpod(2, 1, 2), wpod(1, 2, 2))
    reports = {"j-worker-0": ProgressReport(job_name="j", replica_index=0, epoch=1, state="running", step=40),
               "j-worker-2": ProgressReport(job_name="j", replica_index=1, epoch=1, state="running", step=41),
               "j-worker-1": ProgressReport(job_name="j", replica_index=2, epoch=2, state="starting", step=0)}
    observed = Observed(pods=pods, service_exists=True, membership_token="tok", configmap_data=seen(spec).configmap_data, reports=reports)
    body, _ = step(body, observed, NOW + timedelta(seconds=32))
    assert body["status"]["step"] == 40
    # once it runs, it counts like any worker (a restarted job's workers all start together: min of all)
    reports["j-worker-1"] = ProgressReport(job_name="j", replica_index=2, epoch=2, state="running", step=39)
    body, _ = step(body, observed, NOW + timedelta(seconds=33))
    assert body["status"]["step"] == 39


def test_live_joiner_that_cannot_be_placed_is_dropped_live():
    spec = live_spec(3)
    body = _live_shrunk(spec)
    survivors = (wpod(0, 0, 1), wpod(2, 1, 1))
    body, result = step(body, live_seen(spec, *survivors, reported={"j-worker-0": 1, "j-worker-2": 1}, free=1),
                        NOW + timedelta(seconds=31))
    assert [a.name for a in of(result, CreatePod)] == ["j-worker-1"]
    since = NOW + timedelta(seconds=32)
    joiner = ObservedPod(name="j-worker-1", rank=2, epoch=2, phase="Pending", unschedulable=UNSCHED,
                         unschedulable_since=since.strftime("%Y-%m-%dT%H:%M:%SZ"))
    grown = (wpod(0, 0, 2), wpod(2, 1, 2), joiner)
    body, result = step(body, live_seen(spec, *grown, reported={"j-worker-0": 1, "j-worker-2": 1}), since + timedelta(seconds=16))
    assert resize_events(result) == [f"Resized 3→2 (j-worker-1 cannot be placed: {UNSCHED}); 2 workers continue "
                                     "without restarting (epoch 3)"]
    assert [a.name for a in of(result, DeletePod)] == ["j-worker-1"]
    assert patched(result) == {"j-worker-0": (0, 3), "j-worker-2": (1, 3)}
    assert (body["status"]["restarts"], body["status"]["phase"]) == (0, "Running")


def test_live_grow_falls_back_to_a_restart_while_a_worker_does_not_report():
    spec = live_spec(3)
    body = _live_shrunk(spec)
    body, result = step(body, live_seen(spec, wpod(0, 0, 1), wpod(2, 1, 1), reported={"j-worker-0": 1}, free=1),
                        NOW + timedelta(seconds=31))
    assert resize_events(result) == ["Resized 2→3 (capacity), resuming from scratch (no checkpoint yet)"]
    assert body["status"]["phase"] == "Restarting" and not of(result, PatchPodLabels)


def test_live_below_min_replicas_restarts_as_before():
    spec = live_spec(2)  # minReplicas 2: losing one leaves too few to continue
    body = live_running(spec, 2)
    body, result = step(body, live_seen(spec, wpod(0, 0, 0), wpod(1, 1, 0, "Failed", exit_code=1)))
    st = body["status"]
    assert (st["phase"], st["restarts"], st["membershipEpoch"], st.get("resizes", 0)) == ("Restarting", 1, 1, 0)
    assert not of(result, PatchPodLabels) and {a.name for a in of(result, DeletePod)} == {"j-worker-0", "j-worker-1"}


def test_jobs_that_cannot_resize_live_restart_exactly_as_before():
    variants = {
        "ddp": live_spec(3, algorithm={"name": "ddp"}),
        "liveResize false": {**live_spec(3), "elastic": {**LIVE, "liveResize": False}},
        "nprocPerWorker 2": live_spec(3, nprocPerWorker=2),
    }
    for what, spec in variants.items():
        assert not validate_job(job(spec)), what
        body = live_running(spec, 3)
        body, result = step(body, live_seen(spec, wpod(0, 0, 0), wpod(1, 1, 0), wpod(2, 2, 0, "Failed", exit_code=1),
                                            reported={"j-worker-0": 0, "j-worker-1": 0}))
        st = body["status"]
        assert (st["phase"], st["restarts"], st["membershipEpoch"]) == ("Restarting", 1, 1), what
        assert not of(result, PatchPodLabels) and len(of(result, DeletePod)) == 3, what
        body, result = step(body, seen(spec))
        assert [a.name for a in of(result, CreatePod)] == ["j-worker-0", "j-worker-1", "j-worker-2"], what
        assert {env_of(a)["LOCO_LIVE_RESIZE"] for a in of(result, CreatePod)} == {"0"}, what
        assert {env_of(a)["LOCO_JOIN"] for a in of(result, CreatePod)} == {"0"}, what


def test_live_job_pods_carry_live_resize_and_restart_names_stay_by_rank():
    spec = live_spec(3)
    _, result = step(job(spec), seen(spec))
    created = of(result, CreatePod)
    assert [a.name for a in created] == ["j-worker-0", "j-worker-1", "j-worker-2"]
    assert {(env_of(a)["LOCO_LIVE_RESIZE"], env_of(a)["LOCO_JOIN"]) for a in created} == {("1", "0")}
    assert {env_of(a)["MASTER_ADDR"] for a in created} == {DNS.format(0)}


def test_missing_rank_of_a_live_membership_never_takes_a_survivors_name():
    """worker-1 holds rank 0 after a live shrink; rank 1 is missing while an old pod (worker-0) is
    still terminating: the new pod is neither worker-1 (a survivor) nor worker-0 (still there)."""
    spec = live_spec(3)
    body = live_running(spec, 3)
    body, _ = step(body, live_seen(spec, wpod(0, 0, 0, "Failed", exit_code=1), wpod(1, 1, 0), wpod(2, 2, 0)))
    old = wpod(0, 0, 0, "Failed", exit_code=1, deleting=True)
    body, result = step(body, live_seen(spec, wpod(1, 0, 1), old, reported={"j-worker-1": 1}))
    [created] = of(result, CreatePod)
    assert (created.name, created.rank, created.epoch) == ("j-worker-2", 1, 1)
    assert env_of(created)["LOCO_JOIN"] == "1" and env_of(created)["MASTER_ADDR"] == DNS.format(1)


def test_live_detector_hears_a_survivor_of_the_old_epoch_but_ignores_its_records():
    """Until a survivor switches, its reports name the old epoch: the detector of the new epoch
    counts it as alive but takes none of its (old-membership) collectives, nor moves its cursor."""
    from loco_contract.detection import DetectorConfig

    live = LiveDetectors()
    config = DetectorConfig(warmup_collectives=2, consecutive=3)
    placement = {0: ("j-worker-0", "n0"), 1: ("j-worker-2", "n2"), 2: ("j-worker-1", "n1")}
    findings = []
    for start in range(0, 12, 3):
        reports = {}
        for rank, (name, _) in placement.items():
            late = 0.5 if rank == 1 else 0.0  # the old-epoch one would be a straggler if it counted
            recs = [{"seq": s, "kind": "all_reduce", "nbytes": 4096, "enterS": 1000.0 + s + late + 0.001 * rank,
                     "exitS": 1000.0 + s + 0.51} for s in range(start, start + 3)]
            reports[name] = ProgressReport.model_validate({"jobName": "j", "replicaIndex": rank, "state": "running",
                                                           "epoch": 0 if rank == 1 else 1, "collectives": recs})
        findings += live.feed("ns/j", config, 1, placement, reports, 1000.0 + start + 3)
        assert live.cursor("ns/j", 1, "j-worker-2") == (-1, -1)
        assert live.cursor("ns/j", 1, "j-worker-0") == (start + 2, -1)
    assert not any(1 in f.verdict.ranks for f in findings), findings
    assert live._jobs["ns/j"].heard[1] == 1012.0


# ------------------------------------------------------------------------------------ capacity


def node(name: str, cpu: str = "4", ready: bool = True, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "pool": "a"}}, "spec": spec,
            "status": {"allocatable": {"cpu": cpu, "memory": "16Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def bound(node_name: str, cpu: str, phase: str = "Running") -> dict[str, Any]:
    return {"spec": {"nodeName": node_name, "containers": [{"resources": {"requests": {"cpu": cpu}}}]},
            "status": {"phase": phase}}


def worker(cpu: str = "3", **template: Any) -> dict[str, Any]:
    spec = TrainingJobSpec.model_validate({"replicas": 3, "template": {"resources": {"requests": {"cpu": cpu}}, **template}})
    return render_pod(REF, spec, 0, 0)


def test_free_slots_counts_only_usable_nodes_with_room():
    nodes = [node("n0"), node("n1"), node("n2", ready=False), node("n3", unschedulable=True),
             node("n4", taints=[{"key": "loco.dev/fault", "value": "hang", "effect": "NoSchedule"}])]
    pods = [bound("n0", "3"), bound("n1", "3", phase="Succeeded")]
    assert free_slots(worker(), nodes, pods) == 1  # n0 is full, n1's pod finished; the rest are out
    assert free_slots(worker(), nodes, pods, avoid_nodes=["n1"]) == 0
    assert free_slots(worker("1"), nodes, pods) == 1 + 4  # 1 left on n0, 4 on n1
    tolerant = worker(tolerations=[{"key": "loco.dev/fault", "operator": "Exists"}])
    assert free_slots(tolerant, nodes, pods) == 2  # n4 accepts it now
    assert free_slots(worker(nodeSelector={"pool": "b"}), nodes, pods) == 0
    gpu = worker(resources={"limits": {"nvidia.com/gpu": 1}})
    assert free_slots(gpu, nodes, pods) == 0  # no node offers GPUs


# ------------------------------------------------------------------------ data across a resize


def test_resize_neither_skips_nor_repeats_data():
    """A checkpoint stores the global DataPosition; resuming it at another world size (both batch
    rules) continues the global sequence stream exactly where it stopped."""
    import numpy as np

    from loco_contract.config import BatchRule, TrainingSpec
    from loco_trainer.data import DataPosition, TokenWindows, TrainSampler, rank_slice
    from loco_trainer.train import global_batch_size

    windows = TokenWindows(np.arange(4 * 200 + 1, dtype=np.uint16) % 256, seq_len=4)  # 200 windows
    sampler = TrainSampler(windows, seed=7)
    for rule in BatchRule:
        training = TrainingSpec(batch_size=4, batch_rule=rule)
        consumed: list[int] = []
        position = DataPosition()
        for world, steps in ((3, 5), (2, 4), (3, 3)):  # 3 workers, shrink to 2, grow back to 3
            position = DataPosition.from_state_dict(position.state_dict())  # the checkpoint round trip
            for _ in range(steps):
                batch = global_batch_size(training, world, reference_world_size=3)
                for rank in range(world):
                    offset, count = rank_slice(batch, rank, world)
                    consumed += sampler.window_ids(position.sequences + offset, count).tolist()
                position = position.advance(batch)
        expected = sampler.window_ids(0, position.sequences).tolist()
        assert consumed == expected, rule  # the exact global stream: nothing skipped, nothing twice
        assert len(set(consumed)) == len(consumed) and len(consumed) < windows.num_windows
