"""The conditions and columns users read (issue 24 #4): Checkpointed, Resized and Degraded beside the lifecycle
ones, each with a reason and a message, and the Progress and ETA printer columns from the recent step rate."""

from __future__ import annotations

from datetime import timedelta

import pytest

from loco_operator.planner import Observed, plan
from loco_operator.planner.progress import RATE_WINDOW_S, STALLED_AFTER_S, human_duration

from test_operator_elastic import NOW, UNSCHED, pod, running, seen, spec_of, step, stuck
from test_operator_planner import children, job, report, running_status, settle


def condition(status: dict, type_: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


def test_a_commit_sets_checkpointed_with_the_step_its_time_and_path_and_a_newer_one_updates_it():
    body = job(status=running_status())
    body = settle(body, children(pod(0), pod(1), reports={"j-worker-0": report(0, 12, ckpt=10), "j-worker-1": report(1, 12)}))
    first = condition(body["status"], "Checkpointed")
    assert first["status"] == "True" and first["reason"] == "CheckpointCommitted"
    assert first["message"] == "Step 10 committed at 2026-01-01T11:59:00Z: /ckpt/ns/j/step-10"
    later = NOW + timedelta(seconds=30)
    body = settle(body, children(pod(0), pod(1), reports={"j-worker-0": report(0, 22, ckpt=20), "j-worker-1": report(1, 22)}), later)
    second = condition(body["status"], "Checkpointed")
    assert second["message"].startswith("Step 20 committed")
    # still True since the first commit: the transition stays, the update moves
    assert second["lastTransitionTime"] == first["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    assert second["lastUpdateTime"] == "2026-01-01T12:00:30Z"


def test_an_elastic_shrink_is_resized_and_degraded_and_growing_back_clears_degraded():
    spec = spec_of(3)
    body = running(spec, 3)
    body, _ = step(body, seen(spec, pod(0), pod(1), pod(2, phase="Failed", exit_code=137)))
    assert condition(body["status"], "Degraded") is None  # a restart at full size is not a degradation
    body, _ = step(body, seen(spec))
    pending = seen(spec, pod(0, 1), pod(1, 1), stuck(2, 1))
    body, _ = step(body, pending, NOW + timedelta(seconds=16))  # past placementTimeoutSeconds: 3 -> 2
    resized = condition(body["status"], "Resized")
    assert resized["status"] == "True" and resized["reason"] == "ScaledDown"
    assert resized["message"].startswith("Resized 3→2 (j-worker-2 exited with code 137 on node n2; its replacement "
                                         f"cannot be placed: {UNSCHED})")
    degraded = condition(body["status"], "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "FewerWorkers"
    assert degraded["message"].startswith("Running 2 of 3 workers: Resized 3→2")
    body, _ = step(body, seen(spec))
    body, _ = step(body, seen(spec, pod(0, 2), pod(1, 2)), NOW + timedelta(seconds=20))
    assert body["status"]["phase"] == "Running" and condition(body["status"], "Degraded")["status"] == "True"
    # capacity is back after scaleUpDelaySeconds: grow to 3, and once running at 3 it is no longer degraded
    later = NOW + timedelta(minutes=2)
    body, _ = step(body, seen(spec, pod(0, 2), pod(1, 2), free=4), later)
    grown = condition(body["status"], "Resized")
    assert grown["reason"] == "ScaledUp" and grown["message"].startswith("Resized 2→3")
    assert body["status"]["resizes"] == 2
    epoch = body["status"]["membershipEpoch"]
    body, _ = step(body, seen(spec), later)
    body, _ = step(body, seen(spec, pod(0, epoch), pod(1, epoch), pod(2, epoch)), later)
    assert body["status"]["phase"] == "Running"
    degraded = condition(body["status"], "Degraded")
    assert (degraded["status"], degraded["reason"], degraded["message"]) == ("False", "AllWorkers", "Running all 3 workers")


def test_a_job_that_never_shrank_has_no_degraded_condition():
    body = job(status=running_status())
    body = settle(body, children(pod(0), pod(1), reports={"j-worker-0": report(0, 5), "j-worker-1": report(1, 5)}))
    assert condition(body["status"], "Degraded") is None and condition(body["status"], "Resized") is None


def _at(body: dict, step_: int, seconds: float) -> dict:
    reports = {"j-worker-0": report(0, step_), "j-worker-1": report(1, step_)}
    return settle(body, children(pod(0), pod(1), reports=reports), NOW + timedelta(seconds=seconds))


def test_progress_is_a_percentage_and_the_eta_comes_from_the_recent_step_rate():
    body = _at(job(status=running_status()), 20, 0)
    st = body["status"]
    assert st["progress"] == "10%" and "eta" not in st  # 20 of 200; no rate measured yet
    body = _at(body, 25, RATE_WINDOW_S / 2)  # too short a window: the sample stays
    assert body["status"]["stepRate"]["step"] == 20 and "eta" not in body["status"]
    body = _at(body, 50, RATE_WINDOW_S)  # 30 steps in 30 s: 1 step/s, 150 left
    st = body["status"]
    assert st["stepRate"]["stepsPerSecond"] == 1.0 and st["eta"] == "2m30s" and st["progress"] == "25%"
    body = _at(body, 110, 2 * RATE_WINDOW_S)  # 60 steps in 30 s: the average moves halfway, to 1.5 step/s
    st = body["status"]
    assert st["stepRate"]["stepsPerSecond"] == 1.5 and st["eta"] == "1m"
    # no step for minutes: the ETA is unknown rather than a guess
    body = _at(body, 110, 2 * RATE_WINDOW_S + STALLED_AFTER_S)
    assert "eta" not in body["status"] and body["status"]["progress"] == "55%"


def test_a_restart_clears_the_eta_and_measures_the_rate_afresh():
    body = _at(_at(job(status=running_status()), 20, 0), 50, RATE_WINDOW_S)
    assert body["status"]["eta"]
    restarted = plan(body, children(pod(0), pod(1, phase="Failed", exit_code=1)), NOW + timedelta(seconds=40)).status
    assert restarted["phase"] == "Restarting" and "eta" not in restarted and "stepRate" not in restarted
    assert restarted["progress"] == "25%"  # the step does not go back, nor the progress


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.6, "1m"), (250, "4m10s"), (3600, "1h"), (7500, "2h5m"),
                                           (90000, "1d1h"), (172800, "2d")])
def test_durations_read_as_kubectl_prints_ages(seconds, text):
    assert human_duration(seconds) == text


def test_finished_and_invalid_jobs_still_get_the_summary_columns():
    result = plan(job({"replicas": 0}), Observed(), NOW)
    assert result.status["phase"] == "Failed" and result.status["workersReady"] == "0/0"
