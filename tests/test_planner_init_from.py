"""spec.checkpoint.initFrom (issue 26 #1): a new job starts from another job's committed checkpoint. Resolved once from
the source TrainingJob as observed; a source that is not there or unreadable fails the job, one still training
towards the step holds it Pending, and the workers get the path until the job commits a checkpoint of its own."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from loco_operator.planner import CreatePod, EmitEvent, ObservedSource, plan

from test_operator_planner import NOW, children, job, pod, report

INIT = {"checkpoint": {"initFrom": {"jobName": "parent"}}}


def source(*, found: bool = True, phase: str = "Running", step: int | None = 40, path: str = "/checkpoints"):
    return ObservedSource("parent", found, phase if found else None, path, step,
                          None if step is None else f"/checkpoints/ns/parent/step-{step:08d}")


def seen(*pods, src: ObservedSource | None, spec: dict | None = None):
    return replace(children(*pods, spec=spec or INIT), init_source=src)


def env_of(action: CreatePod) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in action.body["spec"]["containers"][0]["env"]}


def test_a_job_starts_from_the_sources_newest_checkpoint_and_its_workers_are_told_where_it_is():
    result = plan(job(INIT), seen(src=source()), NOW)
    st = result.status
    assert st["initializedFrom"] == {"jobName": "parent", "step": 40, "path": "/checkpoints/ns/parent/step-00000040"}
    assert EmitEvent("Normal", "InitializedFrom", "Starting from parent's checkpoint at step 40 "
                     "(/checkpoints/ns/parent/step-00000040)") in result.actions
    creates = [a for a in result.actions if isinstance(a, CreatePod)]
    assert len(creates) == 2
    assert {env_of(c)["LOCO_INIT_FROM"] for c in creates} == {"/checkpoints/ns/parent/step-00000040"}
    assert EmitEvent("Normal", "WorkersCreated", "Created 2 worker pods for epoch 0, starting from parent's "
                     "step 40") in result.actions
    # the workers report the source's checkpoint as the one they resumed from: it is not this job's
    running = plan(job(INIT, status=st), replace(seen(pod(0), pod(1), src=None), reports={
        f"j-worker-{r}": report(r, 41, lastCheckpoint={"step": 40, "path": "/checkpoints/ns/parent/step-00000040",
                                                 "time": "2026-01-01T11:00:00Z"}) for r in (0, 1)}),
                   NOW + timedelta(seconds=2))
    assert "lastCheckpoint" not in running.status and running.status["step"] == 41
    assert not [a for a in running.actions if isinstance(a, EmitEvent) and a.reason == "CheckpointCommitted"]
    # a restart before the job's first checkpoint starts from the source again, without reading it
    later = plan(job(INIT, status={**st, "membershipEpoch": 1}), seen(src=None), NOW + timedelta(seconds=5))
    assert {env_of(c)["LOCO_INIT_FROM"] for c in later.actions if isinstance(c, CreatePod)} == {
        "/checkpoints/ns/parent/step-00000040"}
    # once the job has its own checkpoint, restarts resume from that
    own = {**st, "membershipEpoch": 2, "lastCheckpoint": {"step": 50, "path": "/checkpoints/ns/j/step-00000050",
                                                          "time": "t"}}
    resumed = plan(job(INIT, status=own), seen(src=None), NOW + timedelta(seconds=9))
    envs = [env_of(c) for c in resumed.actions if isinstance(c, CreatePod)]
    assert envs and all(e["LOCO_INIT_FROM"] == "" and e["LOCO_RESUME_FROM"].endswith("step-00000050") for e in envs)


def test_a_named_step_is_that_step_of_the_source_and_waits_while_the_source_trains_towards_it():
    spec = {"checkpoint": {"initFrom": {"jobName": "parent", "step": 60}}}
    waiting = plan(job(spec), seen(src=source(step=40), spec=spec), NOW)
    assert waiting.status["phase"] == "Pending" and not [a for a in waiting.actions if isinstance(a, CreatePod)]
    message = "Waiting for parent to commit step 60 (spec.checkpoint.initFrom): it has committed up to step 40"
    assert waiting.status["message"] == message and waiting.requeue_after_s == 10.0
    assert EmitEvent("Normal", "InitSourceNotReady", message) in waiting.actions
    created = next(c for c in waiting.status["conditions"] if c["type"] == "Created")
    assert (created["status"], created["reason"]) == ("False", "InitSourceNotReady")
    # the source commits step 80: this job starts from step 60 (its own path; kept by the source's rotation or not)
    ready = plan(job(spec, status=waiting.status), seen(src=source(step=80), spec=spec), NOW + timedelta(seconds=10))
    assert ready.status["initializedFrom"]["path"] == "/checkpoints/ns/parent/step-00000060"
    assert [a for a in ready.actions if isinstance(a, CreatePod)]


def test_a_source_that_is_missing_finished_without_the_step_or_elsewhere_fails_the_job_naming_the_field():
    for src, reason, text in (
        (source(found=False), "InitSourceNotFound", "spec.checkpoint.initFrom: TrainingJob parent not found in "
                                                    "namespace ns"),
        (source(phase="Failed", step=None), "InitSourceUnusable", "spec.checkpoint.initFrom: parent finished "
                                                                  "(Failed) and has no committed checkpoint"),
        (source(path="/other"), "InitSourceUnusable", "parent keeps its checkpoints under /other, this job under "
                                                      "/checkpoints"),
    ):
        result = plan(job(INIT), seen(src=src), NOW)
        failed = next(c for c in result.status["conditions"] if c["type"] == "Failed")
        assert result.status["phase"] == "Failed" and failed["reason"] == reason and text in failed["message"], failed
        assert not [a for a in result.actions if isinstance(a, CreatePod)]
    # a source that is still running but has nothing committed yet is waited for
    pending = plan(job(INIT), seen(src=source(step=None)), NOW)
    assert pending.status["phase"] == "Pending" and "to commit a checkpoint" in pending.status["message"]


def test_a_job_without_init_from_never_reads_a_source():
    result = plan(job(), seen(pod(0, phase="Pending"), pod(1, phase="Pending"), src=None, spec={}), NOW)
    assert "initializedFrom" not in result.status and result.status["phase"] == "Pending"
