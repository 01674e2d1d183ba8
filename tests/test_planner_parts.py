"""The planner in parts (issue 23 #2): each module decides one thing and is tested on its own here; the ordered
plans of the whole stay in test_operator_planner.py and test_operator_elastic.py."""

from __future__ import annotations

import ast
from datetime import timedelta
from pathlib import Path

import numpy as np

from loco_operator.planner import EmitEvent, ForceDeletePod, Observed
from loco_operator.planner.context import Planner
from loco_operator.planner.elastic import epoch_size
from loco_operator.planner.faults import _plain
from loco_operator.planner.lifecycle import deadline_passed, succeed
from loco_operator.planner.observe import lost_with_their_nodes, rfc3339
from loco_operator.planner.progress import fold_progress
from loco_operator.planner.workers import wait_for_stale
from loco_operator.spec import TrainingJobSpec, TrainingJobStatus, WorkersStatus

from test_operator_planner import NOW, job, pod, report

PLANNER = Path(__file__).resolve().parents[1] / "operator" / "loco_operator" / "planner"


def planner(spec: dict | None = None, status: dict | None = None, observed: Observed = Observed()) -> tuple[Planner, TrainingJobSpec]:
    body = job(spec, status)
    return Planner(body, observed, NOW), TrainingJobSpec.model_validate(body["spec"])


def test_every_part_is_a_page_or_two_and_no_function_over_60_lines():
    for path in PLANNER.glob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 300, path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 60, f"{path.name}: {node.name}"


# -- observe
def test_a_live_pod_on_a_node_lost_past_the_grace_counts_as_failed_and_a_terminating_one_is_force_deleted():
    lost = rfc3339(NOW - timedelta(seconds=90))
    observed = Observed(pods=(pod(0, node_lost_since=lost, node_name="n1"), pod(1, node_lost_since=lost, node_name="n1",
                                                                              deleting=True), pod(2, node_lost_since=rfc3339(NOW))))
    result, actions = lost_with_their_nodes(observed, NOW, grace_s=60)
    first, second, third = result.pods
    assert first.phase == "Failed" and first.termination_reason.startswith("NodeLost: node not Ready since")
    assert second.phase == "Running" and third.phase == "Running"  # one being deleted, one within the grace
    assert [type(a) for a in actions] == [ForceDeletePod, EmitEvent] and actions[0].name == "j-worker-1"


# -- progress
def test_the_step_comes_from_workers_past_starting_and_checkpoints_never_go_back():
    reports = {"j-worker-0": report(0, 40, ckpt=30), "j-worker-1": report(1, 0, ckpt=20, state="starting")}
    p, spec = planner(status={"lastCheckpoint": {"step": 35, "path": "/c/35", "time": "2026-01-01T11:00:00Z"}},
                      observed=Observed(reports=reports))
    fold_progress(p, spec, [pod(0), pod(1)])
    assert p.status.step == 40  # the starting worker's 0 is not the job's step
    assert p.status.last_checkpoint.step == 35 and not p.actions  # 30 < 35: nothing committed since


def test_each_workers_local_steps_are_in_status_and_a_change_is_an_event():
    spec = {"algorithm": {"name": "diloco", "syncEvery": 40, "adaptiveSteps": {}}}
    first = {"j-worker-0": report(0, 40, localSteps=40, stepSeconds=0.1), "j-worker-1": report(1, 40, localSteps=40)}
    p, parsed = planner(spec, observed=Observed(reports=first))
    fold_progress(p, parsed, [pod(0), pod(1)])
    assert [(w.worker, w.steps) for w in p.status.local_steps] == [(0, 40), (1, 40)]
    assert not p.actions  # a worker's first count is no change
    later = {"j-worker-0": report(0, 80, localSteps=40, stepSeconds=0.1),
             "j-worker-1": report(1, 80, localSteps=20, stepSeconds=0.2)}
    p, parsed = planner(spec, status=p.status.to_wire(), observed=Observed(reports=later))
    fold_progress(p, parsed, [pod(0), pod(1)])
    assert [(w.worker, w.steps, w.step_seconds) for w in p.status.local_steps] == [(0, 40, 0.1), (1, 20, 0.2)]
    (event,) = [a for a in p.actions if isinstance(a, EmitEvent)]
    assert event.reason == "LocalStepsChanged"
    assert event.message == "Worker 1 now takes 20 of 40 inner steps per round, was 40 (0.2 s per step, 2x the fastest worker's)"
    p, parsed = planner(status=p.status.to_wire(), observed=Observed(reports={"j-worker-0": report(0, 90)}))
    fold_progress(p, parsed, [pod(0)])
    assert len(p.status.local_steps) == 2 and not p.actions  # reports without it (no adaptiveSteps) change nothing


# -- elastic
def test_a_shrunk_elastic_job_keeps_its_size_until_the_user_changes_replicas():
    spec = TrainingJobSpec.model_validate({"replicas": 4, "algorithm": {"name": "diloco"}, "elastic": {"minReplicas": 2}})
    shrunk = TrainingJobStatus(workers=WorkersStatus(desired=3, ready=3), target_replicas=4)
    assert epoch_size(spec, shrunk) == 3
    assert epoch_size(spec, TrainingJobStatus(workers=WorkersStatus(desired=1, ready=1), target_replicas=4)) == 2
    assert epoch_size(spec, TrainingJobStatus(workers=WorkersStatus(desired=3, ready=3), target_replicas=5)) == 4


# -- lifecycle
def test_the_deadline_fails_the_job_once_due_and_asks_for_a_reconcile_when_it_will_be():
    p, spec = planner({"runPolicy": {"activeDeadlineSeconds": 60}}, {"startTime": rfc3339(NOW - timedelta(seconds=20))})
    assert not deadline_passed(p, spec.run_policy) and p.requeue_after_s == 40
    p, spec = planner({"runPolicy": {"activeDeadlineSeconds": 60}}, {"startTime": rfc3339(NOW - timedelta(seconds=61))})
    assert deadline_passed(p, spec.run_policy) and p.status.phase.value == "Failed"


def test_success_needs_every_rank_of_the_epoch_finished():
    p, spec = planner()
    assert not succeed(p, spec, [pod(0, phase="Succeeded")], 2) and p.status.phase is None
    assert succeed(p, spec, [pod(0, phase="Succeeded"), pod(1, phase="Succeeded")], 2)
    assert p.status.phase.value == "Succeeded"


# -- workers
def test_stale_workers_are_deleted_and_a_restarting_job_waits_for_them():
    p, spec = planner(observed=Observed(pods=(pod(0, epoch=0), pod(1, epoch=0))), status={"membershipEpoch": 1})
    assert wait_for_stale(p, spec, list(p.observed.pods), 2)
    assert [a.name for a in p.actions] == ["j-worker-0", "j-worker-1"]
    assert p.status.message == "Waiting for 2 old workers to terminate before starting epoch 1"


# -- faults
def test_evidence_is_made_plain_json():
    assert _plain({"a": np.float64(1.5), "b": (np.int64(2), float("inf")), 3: None}) == {"a": 1.5, "b": [2, "inf"], "3": None}

