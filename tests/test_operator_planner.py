"""The pure planner: exact ordered actions and status for each lifecycle situation."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from loco_operator.planner import (
    CreateConfigMap,
    CreateMembershipSecret,
    CreateNetworkPolicy,
    CreatePod,
    CreateService,
    DeleteJob,
    DeletePod,
    EmitEvent,
    ForceDeletePod,
    Observed,
    ObservedPod,
    UpdateConfigMap,
    plan,
)
from loco_operator.render import JobRef, config_json
from loco_operator.spec import TrainingJobSpec
from loco_contract.protocol import ProgressReport

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
REF = JobRef("j", "ns", "uid-1")


def job(spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "loco.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": "uid-1", "generation": 1},
        "spec": {"replicas": 2, **(spec or {})},
    }
    if status is not None:
        body["status"] = status
    return body


def cfg(spec: dict[str, Any] | None = None) -> str:
    return config_json(REF, TrainingJobSpec.model_validate({"replicas": 2, **(spec or {})}))


def pod(rank: int, epoch: int = 0, phase: str = "Running", **kw: Any) -> ObservedPod:
    return ObservedPod(name=f"j-worker-{rank}", rank=rank, epoch=epoch, phase=phase, **kw)


def report(rank: int, step: int, ckpt: int | None = None, **kw: Any) -> ProgressReport:
    data: dict[str, Any] = {"jobName": "j", "replicaIndex": rank, "state": "running", "step": step, "totalSteps": 200, **kw}
    if ckpt is not None:
        data["lastCheckpoint"] = {"step": ckpt, "path": f"/ckpt/ns/j/step-{ckpt}", "time": "2026-01-01T11:59:00Z"}
    return ProgressReport.model_validate(data)


def children(*pods: ObservedPod, reports: dict[str, ProgressReport] | None = None, spec: dict | None = None) -> Observed:
    return Observed(pods=tuple(pods), service_exists=True, membership_token="tok", configmap_data=cfg(spec), reports=reports or {})


def settle(body: dict[str, Any], observed: Observed, now: datetime = NOW) -> dict[str, Any]:
    """Plan once and return the job with the planned status stored (as the handler would)."""
    return {**body, "status": plan(body, observed, now).status}


def running_status(**extra: Any) -> dict[str, Any]:
    body = settle(job(), children(pod(0, phase="Pending"), pod(1, phase="Pending")))
    body = settle(body, children(pod(0), pod(1)))
    return {**body["status"], **extra}


def test_plan_creates_service_configmap_and_pods_from_scratch():
    result = plan(job(), Observed(), NOW)
    assert list(result.actions) == [
        CreateService(),
        CreateMembershipSecret(),
        CreateConfigMap(),
        CreatePod("j-worker-0", 0, 0),
        CreatePod("j-worker-1", 1, 0),
        EmitEvent("Normal", "WorkersCreated", "Created 2 worker pods for epoch 0"),
    ]
    st = result.status
    assert st["phase"] == "Pending"
    assert st["startTime"] == "2026-01-01T12:00:00Z"
    assert st["workersReady"] == "0/2"
    assert st["selector"] == "loco.dev/job=j"
    assert [c["type"] for c in st["conditions"]] == ["Created"]
    assert json.loads(result.actions[2].body["data"]["config.json"])["jobName"] == "j"


def test_plan_is_empty_when_children_match():
    body = settle(job(), children(pod(0, phase="Pending"), pod(1, phase="Pending")))
    again = plan(body, children(pod(0, phase="Pending"), pod(1, phase="Pending")), NOW + timedelta(seconds=5))
    assert again.actions == ()
    assert again.status == body["status"]


def test_all_running_moves_to_running_once():
    body = settle(job(), children(pod(0, phase="Pending"), pod(1, phase="Pending")))
    reports = {"j-worker-0": report(0, 5, loss=4.0, tokensPerSecond=100.0), "j-worker-1": report(1, 4, tokensPerSecond=50.0)}
    result = plan(body, children(pod(0), pod(1), reports=reports), NOW)
    assert list(result.actions) == [EmitEvent("Normal", "Running", "All 2 workers running (epoch 0)")]
    st = result.status
    assert st["phase"] == "Running"
    assert (st["step"], st["loss"], st["tokensPerSecond"], st["workersReady"]) == (4, 4.0, 150.0, "2/2")
    running = next(c for c in st["conditions"] if c["type"] == "Running")
    assert running["status"] == "True"
    # the next reconcile with the same world does nothing and keeps lastTransitionTime
    later = plan({**body, "status": st}, children(pod(0), pod(1), reports=reports), NOW + timedelta(minutes=1))
    assert later.actions == ()
    assert later.status == st


def test_worker_failure_restarts_with_next_epoch_and_resume_path():
    status = running_status(lastCheckpoint={"step": 40, "path": "/ckpt/ns/j/step-40", "time": "t"})
    failed = pod(1, phase="Failed", exit_code=3, node_name="n2")
    result = plan(job(status=status), children(pod(0), failed), NOW)
    msg = "j-worker-1 exited with code 3 on node n2"
    assert list(result.actions) == [
        EmitEvent("Warning", "WorkerFailed", msg),
        EmitEvent("Warning", "Restarting", f"Restarting from step 40 (restart 1/3): {msg}"),
        DeletePod("j-worker-0", "Restarting: epoch 1"),
        DeletePod("j-worker-1", "Restarting: epoch 1"),
    ]
    st = result.status
    assert (st["phase"], st["restarts"], st["membershipEpoch"]) == ("Restarting", 1, 1)
    # old pods still terminating: wait, create nothing
    body = job(status=st)
    waiting = plan(body, children(pod(0, deleting=True), failed), NOW)
    assert [a for a in waiting.actions if not isinstance(a, DeletePod)] == []
    assert waiting.status["phase"] == "Restarting"
    # all gone: recreate both with epoch 1, resuming from the checkpoint
    body = {**body, "status": waiting.status}
    recreate = plan(body, children(), NOW)
    assert list(recreate.actions) == [
        CreatePod("j-worker-0", 0, 1),
        CreatePod("j-worker-1", 1, 1),
        EmitEvent("Normal", "WorkersCreated", "Created 2 worker pods for epoch 1, resuming from step 40"),
    ]
    env = {e["name"]: e.get("value") for e in recreate.actions[0].body["spec"]["containers"][0]["env"]}
    assert env["LOCO_RESUME_FROM"] == "/ckpt/ns/j/step-40"
    assert env["LOCO_EPOCH"] == "1" and env["LOCO_RESTART_COUNT"] == "1"
    assert recreate.actions[0].body["metadata"]["labels"]["loco.dev/epoch"] == "1"
    # back to Running
    body = {**body, "status": recreate.status}
    back = plan(body, children(pod(0, epoch=1), pod(1, epoch=1)), NOW)
    assert back.status["phase"] == "Running"
    assert {c["type"]: c["status"] for c in back.status["conditions"]}["Restarting"] == "False"


def test_a_worker_on_a_node_lost_past_the_grace_fails_and_its_stuck_pod_is_force_deleted():
    """Real clusters: a node whose kubelet died leaves its pods Running (not Ready), and once deleted
    Terminating forever. Past the grace the worker counts as lost; a stuck deletion is forced, with an Event."""
    status = running_status(lastCheckpoint={"step": 40, "path": "/ckpt/ns/j/step-40", "time": "t"})
    since = "2026-01-01T11:58:50Z"  # 70 s before NOW
    stranded = pod(1, node_name="n2", ready=False, node_lost_since=since)
    # within the grace: nothing happens yet (a short network blip must not restart the job)
    early = plan(job(status=status), children(pod(0, ready=True), stranded), NOW, node_lost_grace_s=120)
    assert [a for a in early.actions if not isinstance(a, EmitEvent) or a.reason != "Running"] == []
    assert early.status["restarts"] == 0
    # past it: the worker failed as NodeLost, and the job restarts from its checkpoint
    result = plan(job(status=status), children(pod(0, ready=True), stranded), NOW, node_lost_grace_s=60)
    msg = "j-worker-1 failed on node n2: NodeLost: node not Ready since 2026-01-01T11:58:50Z (70s, grace 60s)"
    assert list(result.actions) == [
        EmitEvent("Warning", "WorkerFailed", msg),
        EmitEvent("Warning", "Restarting", f"Restarting from step 40 (restart 1/3): {msg}"),
        DeletePod("j-worker-0", "Restarting: epoch 1"),
        DeletePod("j-worker-1", "Restarting: epoch 1"),
    ]
    # the deletion sticks on the lost node: forced, said why, and the job does not wait forever
    body = job(status=result.status)
    terminating = pod(1, node_name="n2", ready=False, deleting=True, node_lost_since=since)
    forced = plan(body, children(terminating), NOW, node_lost_grace_s=60)
    why = ("Force-deleted pod j-worker-1: stuck Terminating on node n2, not Ready since 2026-01-01T11:58:50Z "
           "(70s, grace 60s); no kubelet will confirm its end")
    assert list(forced.actions) == [ForceDeletePod("j-worker-1", why), EmitEvent("Warning", "ForceDeleted", why)]
    assert forced.status["restarts"] == 1
    # a pod Terminating on a healthy node is left to its kubelet
    healthy = plan(body, children(pod(1, node_name="n1", deleting=True)), NOW, node_lost_grace_s=60)
    assert not [a for a in healthy.actions if isinstance(a, ForceDeletePod)]


def test_pod_vanishing_while_running_counts_as_failure():
    status = running_status()
    result = plan(job(status=status), children(pod(0)), NOW)
    assert result.actions[0] == EmitEvent("Warning", "WorkerFailed", "j-worker-1 disappeared while the job was Running")
    assert result.status["phase"] == "Restarting"


def test_backoff_exhausted_fails_and_cleans_running_pods():
    status = running_status(restarts=1)
    failed = pod(1, phase="Failed", exit_code=1, node_name="n1")
    result = plan(job({"runPolicy": {"backoffLimit": 1}}, status=status), children(pod(0), failed), NOW)
    msg = "j-worker-1 exited with code 1 on node n1"
    final = f"{msg}; backoffLimit (1) reached after 1 restarts"
    assert list(result.actions) == [
        EmitEvent("Warning", "WorkerFailed", msg),
        EmitEvent("Warning", "BackoffLimitExceeded", final),
        DeletePod("j-worker-0", "CleanPodPolicy=Running"),
    ]
    st = result.status
    assert st["phase"] == "Failed" and st["completionTime"] == "2026-01-01T12:00:00Z"
    conds = {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}
    assert conds["Failed"] == ("True", "BackoffLimitExceeded")
    assert conds["Running"][0] == "False"


def test_backoff_exhausted_with_clean_pod_policy_all_deletes_every_pod():
    status = running_status()
    failed = pod(1, phase="Failed", exit_code=1)
    result = plan(job({"runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "All"}}, status=status), children(pod(0), failed), NOW)
    deletes = [a for a in result.actions if isinstance(a, DeletePod)]
    assert deletes == [DeletePod("j-worker-0", "CleanPodPolicy=All"), DeletePod("j-worker-1", "CleanPodPolicy=All")]


def test_all_exited_zero_succeeds_with_final_numbers_from_termination_messages():
    status = running_status()
    final = [report(r, 200, ckpt=200, state="finished", loss=1.5 + r) for r in range(2)]
    pods = [pod(r, phase="Succeeded", exit_code=0, termination_report=final[r]) for r in range(2)]
    result = plan(job(status=status), children(*pods), NOW)
    assert list(result.actions) == [
        EmitEvent("Normal", "CheckpointCommitted", "Checkpoint committed at step 200: /ckpt/ns/j/step-200"),
        EmitEvent("Normal", "Succeeded", "All 2 workers finished at step 200"),
    ]
    st = result.status
    assert (st["phase"], st["step"], st["loss"], st["lastCheckpoint"]["step"]) == ("Succeeded", 200, 1.5, 200)
    # finished: nothing more to do until the TTL
    assert plan(job(status=st), children(*pods), NOW + timedelta(hours=1)).actions == ()


def test_ttl_deletes_the_finished_job():
    status = running_status(phase="Succeeded", completionTime="2026-01-01T12:00:00Z")
    spec = {"runPolicy": {"ttlSecondsAfterFinished": 60}}
    early = plan(job(spec, status=status), children(spec=spec), NOW + timedelta(seconds=30))
    assert early.actions == () and early.requeue_after_s == pytest.approx(30)
    late = plan(job(spec, status=status), children(spec=spec), NOW + timedelta(seconds=61))
    assert list(late.actions) == [DeleteJob("TTLExpired: finished 60s ago")]


def test_suspend_deletes_pods_and_unsuspend_resumes_from_checkpoint():
    status = running_status(lastCheckpoint={"step": 40, "path": "/c/40", "time": "t"})
    spec = {"runPolicy": {"suspend": True}}
    result = plan(job(spec, status=status), children(pod(0), pod(1), spec=spec), NOW)
    assert list(result.actions) == [
        EmitEvent("Normal", "Suspended", "Job suspended: deleting 2 workers"),
        DeletePod("j-worker-0", "Suspended"),
        DeletePod("j-worker-1", "Suspended"),
    ]
    st = result.status
    assert st["phase"] == "Suspended" and st["lastCheckpoint"]["step"] == 40 and st["restarts"] == 0
    # pods gone, still suspended: nothing to do
    assert plan(job(spec, status=st), children(spec=spec), NOW).actions == ()
    # unsuspend: new epoch, pods recreated from the checkpoint
    resumed = plan(job(status=st), children(), NOW)
    assert list(resumed.actions) == [
        EmitEvent("Normal", "Resumed", "Resumed: recreating workers from step 40"),
        CreatePod("j-worker-0", 0, 1),
        CreatePod("j-worker-1", 1, 1),
        EmitEvent("Normal", "WorkersCreated", "Created 2 worker pods for epoch 1, resuming from step 40"),
    ]
    assert resumed.status["phase"] == "Pending" and resumed.status["restarts"] == 0


def test_active_deadline_fails_the_job():
    status = running_status()
    spec = {"runPolicy": {"activeDeadlineSeconds": 600}}
    ok = plan(job(spec, status=status), children(pod(0), pod(1), spec=spec), NOW + timedelta(seconds=599))
    assert ok.actions == () and ok.requeue_after_s == pytest.approx(1)
    late = plan(job(spec, status=status), children(pod(0), pod(1), spec=spec), NOW + timedelta(seconds=600))
    assert list(late.actions) == [
        EmitEvent("Warning", "DeadlineExceeded", "Job ran longer than activeDeadlineSeconds (600s)"),
        DeletePod("j-worker-0", "CleanPodPolicy=Running"),
        DeletePod("j-worker-1", "CleanPodPolicy=Running"),
    ]
    assert late.status["phase"] == "Failed"


def test_last_checkpoint_never_goes_backwards():
    status = running_status(lastCheckpoint={"step": 80, "path": "/c/80", "time": "t"})
    reports = {"j-worker-0": report(0, 90, ckpt=40), "j-worker-1": report(1, 90, ckpt=40)}
    result = plan(job(status=status), children(pod(0), pod(1), reports=reports), NOW)
    assert result.status["lastCheckpoint"]["step"] == 80
    assert not any(isinstance(a, EmitEvent) and a.reason == "CheckpointCommitted" for a in result.actions)
    newer = {"j-worker-0": report(0, 130, ckpt=120), "j-worker-1": report(1, 125, ckpt=80)}
    result = plan(job(status=status), children(pod(0), pod(1), reports=newer), NOW)
    assert result.status["lastCheckpoint"]["step"] == 120 and result.status["step"] == 125
    assert list(result.actions) == [EmitEvent("Normal", "CheckpointCommitted", "Checkpoint committed at step 120: /ckpt/ns/j/step-120")]


def test_step_never_reads_0_while_the_workers_of_a_restart_start():
    """Issue 30 #7: during a restart the starting workers report step 0 for a few seconds; the job's step
    stays where it was until they report from the resumed checkpoint."""
    status = running_status(step=150, membershipEpoch=1, lastCheckpoint={"step": 100, "path": "/c/100", "time": "t"})
    starting = {f"j-worker-{r}": report(r, 0, state="starting", epoch=1) for r in (0, 1)}
    result = plan(job(status=status), children(pod(0, epoch=1), pod(1, epoch=1), reports=starting), NOW)
    assert result.status["step"] == 150
    resumed = {**starting, "j-worker-1": report(1, 101, epoch=1)}
    result = plan(job(status=result.status), children(pod(0, epoch=1), pod(1, epoch=1), reports=resumed), NOW)
    assert result.status["step"] == 101  # the resumed checkpoint's work is redone: the step says where it is
    # a fresh job's first reports are its step
    fresh = plan(job(), children(pod(0), pod(1), reports={"j-worker-0": report(0, 0, state="starting")}), NOW)
    assert fresh.status["step"] == 0


@pytest.mark.parametrize("adopted", [False, True])
def test_a_previous_jobs_checkpoints_are_named_in_a_condition_and_one_event(adopted):
    """Issue 30 #6: a job created under a deleted job's name says whether it started fresh or resumed from
    the predecessor's checkpoints, and where they are."""
    where = "/ckpt/ns/j/previous-job-old" if not adopted else "/ckpt/ns/j"
    prev = {"uid": "old", "steps": [100, 200], "adopted": adopted, "path": where}
    reports = {"j-worker-0": report(0, 0, state="starting", previousJob=prev), "j-worker-1": report(1, 0, state="starting")}
    result = plan(job(status=running_status()), children(pod(0), pod(1), reports=reports), NOW)
    cond = next(c for c in result.status["conditions"] if c["type"] == "ResumedFromPreviousJob")
    assert cond["status"] == ("True" if adopted else "False")
    assert cond["reason"] == ("PreviousJobAdopted" if adopted else "PreviousJobKept")
    assert "uid old, steps 100, 200" in cond["message"] and where in cond["message"]
    assert result.status["previousJob"] == prev
    events = [a for a in result.actions if isinstance(a, EmitEvent) and a.reason == cond["reason"]]
    assert [e.type for e in events] == ["Normal" if adopted else "Warning"]
    again = plan(job(status=result.status), children(pod(0), pod(1), reports=reports), NOW)
    assert not any(isinstance(a, EmitEvent) and a.reason == cond["reason"] for a in again.actions)  # said once


def test_failed_checkpoint_save_emits_one_warning_and_keeps_the_resume_point():
    status = running_status(lastCheckpoint={"step": 40, "path": "/c/40", "time": "t"})
    error = "checkpoint step 60 failed: rank 1: OSError: [Errno 28] No space left on device"
    reports = {"j-worker-0": report(0, 61, ckpt=40, checkpoint_failures=1, checkpoint_error=error),
               "j-worker-1": report(1, 61, ckpt=40, checkpoint_failures=1, checkpoint_error=error)}
    result = plan(job(status=status), children(pod(0), pod(1), reports=reports), NOW)
    warnings = [a for a in result.actions if isinstance(a, EmitEvent) and a.reason == "CheckpointFailed"]
    assert len(warnings) == 1 and warnings[0].type == "Warning"
    assert "step 60" in warnings[0].message and "resume point stays step 40" in warnings[0].message
    assert result.status["lastCheckpoint"]["step"] == 40 and result.status["lastCheckpointError"] == error
    # the next reconcile sees the same reports: no second event
    again = plan(job(status=result.status), children(pod(0), pod(1), reports=reports), NOW)
    assert not any(isinstance(a, EmitEvent) and a.reason == "CheckpointFailed" for a in again.actions)


def test_operator_restart_plans_from_status_alone():
    """A fresh operator (no memory) given the stored status and the same world changes nothing."""
    status = running_status(restarts=2, membershipEpoch=2, lastCheckpoint={"step": 40, "path": "/c/40", "time": "t"})
    world = children(pod(0, epoch=2), pod(1, epoch=2))
    result = plan(job(status=status), world, NOW + timedelta(hours=3))
    assert result.actions == ()
    assert (result.status["restarts"], result.status["membershipEpoch"]) == (2, 2)
    # and a failure after the operator restart still counts against the stored budget
    failing = children(pod(0, epoch=2), pod(1, epoch=2, phase="Failed", exit_code=1))
    result = plan(job({"runPolicy": {"backoffLimit": 2}}, status=status), failing, NOW)
    assert result.status["phase"] == "Failed"


def test_stale_epoch_pods_are_deleted_before_creating():
    status = running_status(membershipEpoch=1, phase="Restarting")
    result = plan(job(status=status), children(pod(0, epoch=0, phase="Succeeded")), NOW)
    assert [a for a in result.actions if not isinstance(a, EmitEvent)] == [DeletePod("j-worker-0", "StaleEpoch: epoch is 1")]


def test_invalid_spec_fails_with_named_fields_and_no_pods():
    body = job({"replicas": 0, "algorithm": {"name": "ddp", "syncEvery": 5}})
    result = plan(body, Observed(), NOW)
    assert [type(a) for a in result.actions] == [EmitEvent]
    event = result.actions[0]
    assert event.type == "Warning" and event.reason == "InvalidSpec"
    assert "spec.replicas" in event.message and "spec.algorithm.syncEvery" in event.message
    st = result.status
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert (st["phase"], failed["reason"]) == ("Failed", "InvalidSpec")


def test_spec_change_updates_configmap_and_resize_restarts_without_counting():
    status = running_status()
    spec = {"training": {"steps": 300}}
    result = plan(job(spec, status=status), children(pod(0), pod(1)), NOW)
    assert list(result.actions) == [
        UpdateConfigMap(),
        EmitEvent("Normal", "ConfigUpdated", "Trainer config changed; workers pick it up on their next restart"),
    ]
    resized = plan(job({"replicas": 3}, status=status), children(pod(0), pod(1), spec={"replicas": 3}), NOW)
    assert resized.status["phase"] == "Restarting"
    assert (resized.status["restarts"], resized.status["membershipEpoch"]) == (0, 1)
    assert resized.actions[0] == EmitEvent("Normal", "Resizing", "Resized 2→3 (spec.replicas changed), resuming from scratch (no checkpoint yet)")


def test_observed_pod_from_manifest_reads_exit_code_and_termination_report():
    final = report(1, 7, state="failed", message="boom").to_wire()
    manifest = {
        "metadata": {"name": "j-worker-1", "labels": {"loco.dev/job": "j", "loco.dev/rank": "1", "loco.dev/epoch": "2"},
                     "deletionTimestamp": None},
        "spec": {"nodeName": "n2"},
        "status": {"phase": "Failed", "podIP": "127.0.0.9", "containerStatuses": [
            {"name": "trainer", "state": {"terminated": {"exitCode": 3, "reason": "Error", "message": json.dumps(final)}}}]},
    }
    observed = ObservedPod.from_manifest(manifest)
    assert observed is not None
    assert (observed.rank, observed.epoch, observed.exit_code, observed.node_name) == (1, 2, 3, "n2")
    assert observed.termination_report is not None and observed.termination_report.message == "boom"
    assert ObservedPod.from_manifest({"metadata": {"name": "other", "labels": {}}}) is None


def test_pod_name_held_by_someone_else_blocks_creation():
    observed = Observed(service_exists=True, membership_token="tok", configmap_data=cfg(), foreign_pods=frozenset({"j-worker-1"}))
    result = plan(job(), observed, NOW)
    assert result.actions == ()
    assert "j-worker-1" in result.status["message"] and "not owned" in result.status["message"]


def test_unreadable_status_fields_are_dropped_but_the_restart_budget_survives():
    status = running_status(restarts=2, membershipEpoch=2, someoneElses={"x": 1}, step="not a number")
    result = plan(job(status=status), children(pod(0, epoch=2), pod(1, epoch=2)), NOW)
    assert (result.status["restarts"], result.status["membershipEpoch"]) == (2, 2)
    assert "someoneElses" not in result.status and result.actions == ()


def test_a_worker_pod_the_api_refuses_for_good_fails_the_job_quoting_the_api():
    from loco_operator.planner import plan_pod_refused, refusal_is_permanent

    psa = ('pods "j-worker-0" is forbidden: violates PodSecurity "restricted:latest": restricted volume types '
           '(volume "data" uses restricted volume type "hostPath")')
    assert refusal_is_permanent(403, psa) and refusal_is_permanent(422, "spec.containers[0].image: Required value")
    assert not refusal_is_permanent(403, 'pods "j-worker-0" is forbidden: exceeded quota: team, requested: cpu=2')
    assert not refusal_is_permanent(500, "etcdserver: request timed out")
    created = plan(job(), Observed(), NOW)
    result = plan_pod_refused(job(), created.status, "j-worker-0", psa, NOW)
    message = f"The API refused worker pod j-worker-0: {psa}"
    assert list(result.actions) == [EmitEvent("Warning", "PodRefused", message)]
    st = result.status
    assert st["phase"] == "Failed" and st["message"] == message and st["completionTime"]
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"], failed["message"]) == ("True", "PodRefused", message)
    # and it stays failed: the next reconcile creates nothing
    again = plan(job(status=st), Observed(service_exists=True, membership_token="tok", configmap_data=cfg()), NOW)
    assert not [a for a in again.actions if isinstance(a, CreatePod)]


def test_the_membership_secret_and_the_network_policy_are_made_once():
    first = plan(job(), Observed(), NOW, network_policy_peers=[{"podSelector": {"matchLabels": {"app": "op"}}}])
    made = [a for a in first.actions if isinstance(a, (CreateMembershipSecret, CreateNetworkPolicy))]
    assert made[0] == CreateMembershipSecret()
    policy = made[1].body
    assert policy["kind"] == "NetworkPolicy" and policy["metadata"]["name"] == "j-workers"
    assert policy["spec"]["ingress"][1] == {"from": [{"podSelector": {"matchLabels": {"app": "op"}}}]}
    # both exist: nothing more; without --network-policy, no NetworkPolicy at all
    existing = Observed(service_exists=True, membership_token="tok", network_policy_exists=True, configmap_data=cfg())
    again = plan(job(), existing, NOW, network_policy_peers=[])
    assert not [a for a in again.actions if isinstance(a, (CreateMembershipSecret, CreateNetworkPolicy))]
    assert not [a for a in plan(job(), Observed(), NOW).actions if isinstance(a, CreateNetworkPolicy)]


def test_a_checkpoint_skipped_at_resume_is_a_warning_event_once():
    skipped = {"step": 40, "path": "/ckpt/ns/j/step-00000040", "reason": "checksum", "message": "data/rank-00000 crc"}
    reports = {"j-worker-0": report(0, 20, skippedCheckpoints=[skipped]), "j-worker-1": report(1, 20)}
    body = job(status=running_status())
    first = plan(body, children(pod(0), pod(1), reports=reports), NOW)
    events = [a for a in first.actions if isinstance(a, EmitEvent) and a.reason == "CheckpointSkipped"]
    assert len(events) == 1 and events[0].type == "Warning"
    assert "/ckpt/ns/j/step-00000040" in events[0].message and "checksum" in events[0].message
    assert first.status["skippedCheckpoints"] == ["/ckpt/ns/j/step-00000040"]
    again = plan({**body, "status": first.status}, children(pod(0), pod(1), reports=reports), NOW)
    assert not [a for a in again.actions if isinstance(a, EmitEvent) and a.reason == "CheckpointSkipped"]
