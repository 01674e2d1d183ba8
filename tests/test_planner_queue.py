"""Kueue admission (issue 24 #1): a job labelled with a queue is one Workload, all its workers or none; it waits
Suspended until admitted, its workers go where the admitted flavors say, an eviction stops them and clears the
admission as Kueue's own integrations do, re-admission resumes from the checkpoint, and a finished job frees its
quota."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from loco_operator.planner import (
    CreatePod, CreateWorkload, DeletePod, DeleteWorkload, EmitEvent, ObservedWorkload, PatchWorkloadStatus, plan
)

from test_operator_elastic import env_of
from test_operator_planner import NOW, children, job, pod, report

QUEUED = {"kueue.x-k8s.io/queue-name": "lq"}
FLAVOR = {"spot": {"spec": {"nodeLabels": {"pool": "spot"},
                            "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]}}}


def queued_job(status: dict | None = None, **labels: str) -> dict:
    body = job(status=status)
    body["metadata"]["labels"] = {**QUEUED, **labels}
    return body


def workload(count: int = 2, *, admitted: bool = False, evicted: str | None = None, pending: str | None = None,
             finished: bool = False) -> ObservedWorkload:
    conditions = []
    if pending:
        conditions.append({"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": pending,
                           "lastTransitionTime": "2026-01-01T11:00:00Z"})
    if admitted:
        conditions += [{"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": "ok",
                        "lastTransitionTime": "2026-01-01T11:00:00Z"},
                       {"type": "Admitted", "status": "True", "reason": "Admitted", "message": "admitted",
                        "lastTransitionTime": "2026-01-01T11:00:00Z"}]
    if evicted:
        conditions.append({"type": "Evicted", "status": "True", "reason": "Preempted", "message": evicted,
                           "lastTransitionTime": "2026-01-01T11:30:00Z"})
    if finished:
        conditions.append({"type": "Finished", "status": "True", "reason": "Succeeded", "message": "done",
                           "lastTransitionTime": "2026-01-01T11:30:00Z"})
    manifest = {"metadata": {"name": "j-loco"}, "spec": {"queueName": "lq", "podSets": [{"name": "workers",
                                                                                          "count": count}]},
                "status": {"conditions": conditions}}
    if admitted:
        manifest["status"]["admission"] = {"clusterQueue": "cq", "podSetAssignments": [
            {"name": "workers", "flavors": {"cpu": "spot", "memory": "spot"}, "count": count}]}
    return ObservedWorkload.from_manifest(manifest, FLAVOR)


def seen(*pods, wl: ObservedWorkload | None = None, priorities=None, **kw):
    return replace(children(*pods, **kw), workload=wl, workload_priorities=priorities or {})


def step(body: dict, observed, now=NOW):
    result = plan(body, observed, now)
    return {**body, "status": result.status}, result


def of(result, kind):
    return [a for a in result.actions if isinstance(a, kind)]


def condition(status: dict, type_: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


def test_a_queued_job_is_one_workload_and_has_no_worker_until_admitted():
    body, result = step(queued_job(), seen())
    [create] = of(result, CreateWorkload)
    spec = create.body["spec"]
    assert create.body["apiVersion"] == "kueue.x-k8s.io/v1beta2" and create.body["metadata"]["name"] == "j-loco"
    assert create.body["metadata"]["ownerReferences"][0]["kind"] == "TrainingJob"
    assert spec["queueName"] == "lq" and [ps["name"] for ps in spec["podSets"]] == ["workers"]
    assert spec["podSets"][0]["count"] == 2 and "priorityClassRef" not in spec
    template = spec["podSets"][0]["template"]["spec"]
    assert template["containers"][0]["name"] and "schedulingGates" not in template and "hostname" not in template
    assert not of(result, CreatePod)
    assert body["status"]["phase"] == "Suspended"
    queued = condition(body["status"], "Suspended")
    assert (queued["status"], queued["reason"]) == ("True", "Queued")
    # Kueue says why it waits: the job says it too, without a pod
    body, result = step(body, seen(wl=workload(pending="insufficient unused quota for cpu in flavor default")))
    assert not of(result, CreatePod) and not of(result, CreateWorkload)
    assert body["status"]["message"] == "Queued in LocalQueue lq: insufficient unused quota for cpu in flavor default"


def test_the_priority_class_label_becomes_the_workloads_priority():
    _, result = step(queued_job(**{"kueue.x-k8s.io/priority-class": "high"}), seen(priorities={"high": 1000}))
    spec = of(result, CreateWorkload)[0].body["spec"]
    assert spec["priorityClassRef"] == {"group": "kueue.x-k8s.io", "kind": "WorkloadPriorityClass", "name": "high"}
    assert spec["priority"] == 1000


def test_admitted_workers_go_where_the_admitted_flavor_is():
    body, _ = step(queued_job(), seen())
    body, result = step(body, seen(wl=workload(admitted=True)))
    assert EmitEvent("Normal", "Admitted", "Admitted by Kueue: ClusterQueue cq, flavors cpu=spot, memory=spot") \
        in result.actions
    creates = of(result, CreatePod)
    assert len(creates) == 2
    for create in creates:
        assert create.body["spec"]["nodeSelector"] == {"pool": "spot"}
        assert {"key": "spot", "operator": "Exists", "effect": "NoSchedule"} in create.body["spec"]["tolerations"]
    assert body["status"]["phase"] == "Pending"


def test_an_evicted_job_stops_clears_its_admission_and_resumes_from_its_checkpoint_when_admitted_again():
    body, _ = step(queued_job(), seen())
    body, _ = step(body, seen(wl=workload(admitted=True)))
    epoch = body["status"]["membershipEpoch"]
    running = seen(pod(0, epoch), pod(1, epoch), wl=workload(admitted=True),
                   reports={"j-worker-0": report(0, 30, ckpt=20), "j-worker-1": report(1, 30)})
    body, _ = step(body, running)
    assert body["status"]["phase"] == "Running"
    preempted = "Preempted to accommodate a workload (UID: x) due to prioritization in the ClusterQueue"
    body, result = step(body, seen(pod(0, epoch), pod(1, epoch), wl=workload(admitted=True, evicted=preempted)),
                        NOW + timedelta(seconds=10))
    assert sorted(a.name for a in of(result, DeletePod)) == ["j-worker-0", "j-worker-1"]
    assert not of(result, PatchWorkloadStatus)  # the admission stays until the workers are gone
    evicted = condition(body["status"], "Suspended")
    assert (evicted["status"], evicted["reason"]) == ("True", "Evicted") and preempted in evicted["message"]
    assert body["status"]["restarts"] == 0
    body, result = step(body, seen(wl=workload(admitted=True, evicted=preempted)), NOW + timedelta(seconds=20))
    [clear] = of(result, PatchWorkloadStatus)
    assert clear.name == "j-loco" and clear.status["admission"] is None
    conditions = {c["type"]: c for c in clear.status["conditions"]}
    assert (conditions["QuotaReserved"]["status"], conditions["QuotaReserved"]["reason"]) == ("False", "Pending")
    assert conditions["Admitted"]["status"] == "False" and conditions["Requeued"]["status"] == "True"
    assert conditions["Evicted"]["status"] == "True"  # Kueue's own, kept
    # admitted again: a new epoch resumes from the checkpoint it had reached
    body, result = step(body, seen(wl=workload(admitted=True)), NOW + timedelta(seconds=60))
    creates = of(result, CreatePod)
    assert len(creates) == 2 and body["status"]["membershipEpoch"] == epoch + 1
    assert env_of(creates[0])["LOCO_RESUME_FROM"] == "/ckpt/ns/j/step-20"
    assert body["status"]["restarts"] == 0


def test_a_finished_job_marks_its_workload_finished_once():
    body, _ = step(queued_job(), seen())
    body, _ = step(body, seen(wl=workload(admitted=True)))
    epoch = body["status"]["membershipEpoch"]
    done = {"exit_code": 0, "phase": "Succeeded"}
    body, result = step(body, seen(pod(0, epoch, **done), pod(1, epoch, **done), wl=workload(admitted=True)))
    assert body["status"]["phase"] == "Succeeded"
    [finish] = of(result, PatchWorkloadStatus)
    finished = next(c for c in finish.status["conditions"] if c["type"] == "Finished")
    assert (finished["status"], finished["reason"]) == ("True", "Succeeded")
    _, again = step(body, seen(wl=workload(admitted=True, finished=True)))
    assert not of(again, PatchWorkloadStatus)


def test_a_new_size_is_a_new_workload():
    body, _ = step(queued_job(), seen())
    body["spec"]["replicas"] = 3
    _, result = step(body, seen(wl=workload(count=2, admitted=True)))
    assert of(result, DeleteWorkload) == [DeleteWorkload("j-loco")] and not of(result, CreatePod)


def test_an_unqueued_job_has_no_workload():
    _, result = step(job(), seen())
    assert not of(result, CreateWorkload) and of(result, CreatePod)
