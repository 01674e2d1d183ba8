"""A checkpoint before the workers stop (issue 24 #1, "suspend, checkpointing first"): a suspend or a Kueue eviction
first asks the training workers for a checkpoint of where they are, keeps them until it commits, then stops them;
never longer than runPolicy.checkpointBeforeStopSeconds, and not at all when nothing would be saved."""

from __future__ import annotations

from datetime import timedelta

from loco_operator.planner import DeletePod, EmitEvent, PatchWorkloadStatus, RequestCheckpoint, plan

from test_operator_planner import NOW, children, job, pod, report, running_status
from test_planner_queue import queued_job, seen, workload

SUSPEND = {"runPolicy": {"suspend": True}}


def training(step: int, ckpt: int | None = 20, **pod_kw):
    """Two Running workers at ``step`` that report training, the last checkpoint at ``ckpt``."""
    pods = [pod(r, pod_ip=f"10.0.0.{r + 1}", **pod_kw) for r in (0, 1)]
    return pods, {p.name: report(p.rank, step, ckpt) for p in pods}


def of(result, kind):
    return [a for a in result.actions if isinstance(a, kind)]


def suspended_job(step: int, ckpt: int | None, spec: dict | None = None, **status):
    checkpoint = {"lastCheckpoint": {"step": ckpt, "path": f"/c/{ckpt}", "time": "t"}} if ckpt is not None else {}
    return job({**SUSPEND, **(spec or {})}, status=running_status(step=step, **checkpoint, **status))


def test_a_suspend_asks_the_training_workers_for_a_checkpoint_and_stops_them_once_it_commits():
    pods, reports = training(37)
    body = suspended_job(37, 20)
    asked = plan(body, children(*pods, reports=reports, spec=SUSPEND), NOW)
    assert not of(asked, DeletePod) and asked.status["phase"] == "Running"
    requests = of(asked, RequestCheckpoint)
    assert [(r.name, r.pod_ip) for r in requests] == [("j-worker-0", "10.0.0.1"), ("j-worker-1", "10.0.0.2")]
    assert requests[0].body == {"id": "e0-s37", "reason": "runPolicy.suspend"} and requests[0].token == "tok"
    assert asked.status["checkpointBeforeStop"] == {"id": "e0-s37", "askedAt": "2026-01-01T12:00:00Z",
                                                    "afterStep": 37, "reason": "runPolicy.suspend"}
    assert EmitEvent("Normal", "CheckpointBeforeStop", "Stopping the workers (runPolicy.suspend): first asking 2 for a "
                     "checkpoint at step 37 or later (up to 60s)") in asked.actions
    assert asked.requeue_after_s is not None and asked.requeue_after_s <= 1.0
    # a second later, still saving: the same request again (the worker takes one id once), no second event
    body = {**body, "status": asked.status}
    pods, reports = training(39)
    again = plan(body, children(*pods, reports=reports, spec=SUSPEND), NOW + timedelta(seconds=1))
    assert [r.body["id"] for r in of(again, RequestCheckpoint)] == ["e0-s37", "e0-s37"]
    assert not of(again, DeletePod) and not of(again, EmitEvent)
    # the checkpoint at step 40 committed: now the workers go, and the job resumes from step 40
    pods, reports = training(41, ckpt=40)
    done = plan({**body, "status": again.status}, children(*pods, reports=reports, spec=SUSPEND),
                NOW + timedelta(seconds=2))
    assert [d.name for d in of(done, DeletePod)] == ["j-worker-0", "j-worker-1"] and not of(done, RequestCheckpoint)
    assert done.status["phase"] == "Suspended" and done.status["lastCheckpoint"]["step"] == 40
    assert "checkpointBeforeStop" not in done.status


def test_workers_that_cannot_save_in_time_are_stopped_with_a_warning_naming_the_resume_point():
    pods, reports = training(37)
    spec = {"runPolicy": {"suspend": True, "checkpointBeforeStopSeconds": 30}}
    body = suspended_job(37, 20, spec)
    asked = plan(body, children(*pods, reports=reports, spec=spec), NOW)
    assert of(asked, RequestCheckpoint)
    body = {**body, "status": asked.status}
    waiting = plan(body, children(*pods, reports=reports, spec=spec), NOW + timedelta(seconds=29))
    assert of(waiting, RequestCheckpoint) and not of(waiting, DeletePod)
    late = plan(body, children(*pods, reports=reports, spec=spec), NOW + timedelta(seconds=30))
    assert EmitEvent("Warning", "CheckpointBeforeStopTimedOut", "No checkpoint at step 37 or later within 30s: stopping "
                     "the workers (runPolicy.suspend); the job will resume from step 20") in late.actions
    assert len(of(late, DeletePod)) == 2 and late.status["phase"] == "Suspended"


def test_a_worker_that_stops_training_while_the_others_save_ends_the_wait_at_once():
    pods, reports = training(37)
    body = suspended_job(37, 20)
    asked = plan(body, children(*pods, reports=reports, spec=SUSPEND), NOW)
    failed = {**reports, "j-worker-1": report(1, 37, 20, state="failed")}
    pods = [pods[0], pod(1, phase="Failed", pod_ip="10.0.0.2", exit_code=76)]
    stopped = plan({**body, "status": asked.status}, children(*pods, reports=failed, spec=SUSPEND),
                   NOW + timedelta(seconds=1))
    assert EmitEvent("Warning", "CheckpointBeforeStopTimedOut", "No checkpoint at step 37 or later (a worker stopped "
                     "training): stopping the workers (runPolicy.suspend); the job will resume from step 20"
                     ) in stopped.actions
    assert stopped.status["phase"] == "Suspended" and not of(stopped, RequestCheckpoint)
    assert [d.name for d in of(stopped, DeletePod)] == ["j-worker-0", "j-worker-1"]


def test_nothing_to_save_stops_at_once():
    pods, reports = training(40, ckpt=40)
    # the last checkpoint is at the job's step already
    result = plan(suspended_job(40, 40), children(*pods, reports=reports, spec=SUSPEND), NOW)
    assert len(of(result, DeletePod)) == 2 and not of(result, RequestCheckpoint)
    # no worker is training yet (still starting): nothing could save
    starting = {name: report(r, 0, state="starting") for r, name in enumerate(reports)}
    result = plan(suspended_job(37, 20), children(*pods, reports=starting, spec=SUSPEND), NOW)
    assert len(of(result, DeletePod)) == 2 and not of(result, RequestCheckpoint)
    # asked not to wait
    spec = {"runPolicy": {"suspend": True, "checkpointBeforeStopSeconds": 0}}
    pods, reports = training(37)
    result = plan(suspended_job(37, 20, spec), children(*pods, reports=reports, spec=spec), NOW)
    assert len(of(result, DeletePod)) == 2 and not of(result, RequestCheckpoint)


def test_unsuspended_while_saving_the_job_runs_on_and_forgets_the_request():
    pods, reports = training(37)
    asked = plan(suspended_job(37, 20), children(*pods, reports=reports, spec=SUSPEND), NOW)
    assert asked.status["checkpointBeforeStop"]
    resumed = plan(job(status=asked.status), children(*pods, reports=reports), NOW + timedelta(seconds=1))
    assert not of(resumed, DeletePod) and not of(resumed, RequestCheckpoint)
    assert "checkpointBeforeStop" not in resumed.status and resumed.status["phase"] == "Running"


def test_a_kueue_eviction_saves_first_then_stops_the_workers_and_clears_the_admission():
    pods, reports = training(37)
    status = running_status(step=37, lastCheckpoint={"step": 20, "path": "/c/20", "time": "t"})
    body = queued_job(status)
    evicted = workload(admitted=True, evicted="Preempted to accommodate a workload (UID: x) due to prioritization")
    asked = plan(body, seen(*pods, reports=reports, wl=evicted), NOW)
    requests = of(asked, RequestCheckpoint)
    assert [r.body["reason"] for r in requests] == ["evicted by Kueue: Preempted"] * 2
    assert not of(asked, DeletePod) and not of(asked, PatchWorkloadStatus)
    pods, reports = training(41, ckpt=40)
    body = {**body, "status": asked.status}
    stopping = plan(body, seen(*pods, reports=reports, wl=evicted), NOW + timedelta(seconds=3))
    assert len(of(stopping, DeletePod)) == 2 and stopping.status["phase"] == "Suspended"
    assert any(e.reason == "Evicted" for e in of(stopping, EmitEvent))
    # the workers gone, the admission is cleared; the job resumes from step 40 once admitted again
    gone = plan({**body, "status": stopping.status}, seen(wl=evicted), NOW + timedelta(seconds=4))
    assert of(gone, PatchWorkloadStatus) and gone.status["lastCheckpoint"]["step"] == 40
