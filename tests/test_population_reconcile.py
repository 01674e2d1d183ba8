"""A Population's reconcile (pure): member jobs created once per round, rounds scored and advanced, lineage,
the run's end, failures, bad specs named by field, old rounds cleaned up, and an operator restarted mid-round
making the same decisions without duplicating a member."""

from __future__ import annotations

import copy

import pytest

from loco_operator.population.plan import LABEL_GENERATION, LABEL_POPULATION
from loco_operator.population.reconcile import plan_population, spec_errors

TEMPLATE = {"replicas": 2, "algorithm": {"name": "diloco", "syncEvery": 10}, "training": {"steps": 250, "evalEvery": 50}}
SEARCH = [{"field": "training.lr", "min": 1e-4, "max": 1e-2},
          {"field": "algorithm.outerLr", "min": 0.3, "max": 1.0, "scale": "linear"}]


def population(**spec) -> dict:
    return {"apiVersion": "loco.dev/v1alpha1", "kind": "Population",
            "metadata": {"name": "pbt", "namespace": "ml", "uid": "u-1"},
            "spec": {"size": 4, "template": TEMPLATE, "search": SEARCH, "exploitEverySteps": 100, **spec}}


def stored(body: dict, plan) -> dict:
    """The Population after the plan's status was written."""
    return {**body, "status": plan.status}


def finished(jobs: list[dict], scores: list[float], phase: str = "Succeeded") -> list[dict]:
    out = copy.deepcopy(jobs)
    for job, score in zip(out, scores):
        job["status"] = {"phase": phase, "evalLoss": score, "loss": score + 0.1}
    return out


def test_a_new_population_creates_its_members_once() -> None:
    body = population()
    first = plan_population(body, [])
    assert first.status["phase"] == "Running" and first.status["round"] == 0 and first.status["rounds"] == 3
    names = [j["metadata"]["name"] for j in first.create]
    assert names == ["pbt-m0-g0", "pbt-m1-g0", "pbt-m2-g0", "pbt-m3-g0"]
    job = first.create[0]
    assert job["metadata"]["labels"][LABEL_POPULATION] == "pbt" and job["metadata"]["namespace"] == "ml"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert job["spec"]["training"]["steps"] == 100 and job["spec"]["training"]["scheduleSteps"] == 250
    assert "initFrom" not in job["spec"].get("checkpoint", {})
    assert [e[1] for e in first.events] == ["MembersCreated"]
    again = plan_population(stored(body, first), first.create)  # the jobs exist: nothing more to create
    assert again.create == [] and again.events == [] and again.status["round"] == 0


def test_a_finished_round_exploits_explores_and_records_the_lineage() -> None:
    body = population()
    first = plan_population(body, [])
    jobs = finished(first.create, [3.0, 2.0, 4.0, 1.0])
    nxt = plan_population(stored(body, first), jobs)
    st = nxt.status
    assert st["round"] == 1 and st["phase"] == "Running"
    assert st["best"] == {"index": 3, "job": "pbt-m3-g0", "score": 1.0, "round": 0}
    assert st["medianScore"] == pytest.approx(2.5)
    # truncation 0.25 of 4: the worst (member 2) copies the best (member 3)
    assert [(r["member"], r["parent"], r["parentJob"], r["step"]) for r in st["lineage"]] == [(2, 3, "pbt-m3-g0", 100)]
    assert [m["parent"] for m in st["members"]] == ["pbt-m0-g0", "pbt-m1-g0", "pbt-m3-g0", "pbt-m3-g0"]
    assert [m["score"] for m in st["members"]] == [3.0, 2.0, 4.0, 1.0]
    created = {j["metadata"]["name"]: j for j in nxt.create}
    assert sorted(created) == ["pbt-m0-g1", "pbt-m1-g1", "pbt-m2-g1", "pbt-m3-g1"]
    assert created["pbt-m2-g1"]["spec"]["checkpoint"]["initFrom"] == {"jobName": "pbt-m3-g0", "step": 100}
    assert created["pbt-m0-g1"]["spec"]["checkpoint"]["initFrom"] == {"jobName": "pbt-m0-g0", "step": 100}
    assert created["pbt-m2-g1"]["spec"]["training"]["steps"] == 200
    old = {m["index"]: m["hyperparameters"] for m in first.status["members"]}
    new = st["members"][2]["hyperparameters"]
    assert new != old[2] and all(new[k] / old[3][k] in (pytest.approx(0.8), pytest.approx(1.2)) for k in new)
    assert created["pbt-m2-g1"]["spec"]["training"]["lr"] == new["training.lr"]
    assert [e[1] for e in nxt.events] == ["RoundFinished", "Exploited"]
    assert "Member 2" in nxt.events[1][2] and "member 3" in nxt.events[1][2]
    assert nxt.delete == []  # round 0's jobs are round 1's initFrom sources


def test_an_operator_killed_mid_round_resumes_it_without_duplicating_members() -> None:
    body = population()
    first = plan_population(body, [])
    jobs0 = finished(first.create, [3.0, 2.0, 4.0, 1.0])
    nxt = plan_population(stored(body, first), jobs0)
    # killed after the status was written and two of the four jobs were created
    resumed = plan_population(stored(body, nxt), jobs0 + nxt.create[:2])
    assert [j["metadata"]["name"] for j in resumed.create] == ["pbt-m2-g1", "pbt-m3-g1"]
    assert resumed.create == nxt.create[2:] and resumed.status["lineage"] == nxt.status["lineage"]
    assert resumed.events == []
    # killed before the status was written: the same decisions again, the same jobs
    replay = plan_population(stored(body, first), jobs0 + nxt.create[:2])
    assert replay.status == nxt.status and replay.create == nxt.create[2:]


def test_the_last_round_ends_the_run_and_old_rounds_are_deleted() -> None:
    body = population()
    plan = plan_population(body, [])
    jobs = []
    for round_, scores in enumerate([[3.0, 2.0, 4.0, 1.0], [2.5, 1.5, 0.9, 0.8], [2.0, 1.2, 0.7, 0.6]]):
        jobs = [j for j in jobs if j["metadata"]["name"] not in plan.delete] + plan.create
        current = [j for j in jobs if j["metadata"]["labels"][LABEL_GENERATION] == str(round_)]
        others = [j for j in jobs if j not in current]
        if round_ == 2:
            assert plan.delete == ["pbt-m0-g0", "pbt-m1-g0", "pbt-m2-g0", "pbt-m3-g0"]
        jobs = others + finished(current, scores)
        plan = plan_population(stored(body, plan), jobs)
    st = plan.status
    assert st["phase"] == "Succeeded" and st["round"] == 2 and plan.create == []
    assert st["best"] == {"index": 3, "job": "pbt-m3-g2", "score": 0.6, "round": 2}
    assert [m["score"] for m in st["members"]] == [2.0, 1.2, 0.7, 0.6]
    assert len(st["lineage"]) == 2 and [e[1] for e in plan.events] == ["PopulationSucceeded"]
    assert plan_population(stored(body, plan), jobs).status == st  # finished: nothing more happens


def test_a_failed_member_fails_the_population_naming_it() -> None:
    body = population()
    first = plan_population(body, [])
    jobs = finished(first.create, [1.0, 1.0, 1.0, 1.0])
    jobs[1]["status"] = {"phase": "Failed", "message": "worker 0 ran out of memory"}
    plan = plan_population(stored(body, first), jobs)
    assert plan.status["phase"] == "Failed" and plan.create == []
    assert "pbt-m1-g0" in plan.status["message"] and "out of memory" in plan.status["message"]


def test_a_member_without_the_metric_fails_the_population_naming_it() -> None:
    body = population(metric="evalLoss")
    first = plan_population(body, [])
    jobs = finished(first.create, [1.0, 2.0, 3.0, 4.0])
    del jobs[2]["status"]["evalLoss"]
    plan = plan_population(stored(body, first), jobs)
    assert plan.status["phase"] == "Failed" and "pbt-m2-g0" in plan.status["message"]
    assert "evalLoss" in plan.status["message"]


def test_ranking_by_training_loss_uses_it() -> None:
    body = population(metric="loss")
    first = plan_population(body, [])
    jobs = finished(first.create, [1.0, 2.0, 3.0, 4.0])
    jobs[0]["status"]["loss"] = 9.0  # worst by training loss, best by evalLoss
    plan = plan_population(stored(body, first), jobs)
    assert plan.status["best"]["index"] == 1 and plan.status["lineage"][0]["member"] == 0


@pytest.mark.parametrize("spec, field", [
    ({"search": [{"field": "training.lr", "min": 0.1, "max": 0.01}]}, "spec.search[0]"),
    ({"exploitEverySteps": 500}, "spec"),
    ({"template": {**TEMPLATE, "training": {"steps": 0}}}, "spec.template.training.steps"),
    ({"template": {**TEMPLATE, "replicas": "two"}}, "spec.template.replicas"),
    ({"size": 1}, "spec.size"),
    ({"template": {**TEMPLATE, "checkpoint": {"initFrom": {"jobName": "pretrained"}}}}, "spec"),
    ({"template": {**TEMPLATE, "runPolicy": {"ttlSecondsAfterFinished": 60}}}, "spec"),
])
def test_bad_specs_fail_with_the_field_named(spec: dict, field: str) -> None:
    body = population(**spec)
    errors = spec_errors(body)
    assert errors and any(e.path == field for e in errors), errors
    plan = plan_population(body, [])
    assert plan.status["phase"] == "Failed" and field in plan.status["message"] and plan.create == []
    assert plan.events[0][1] == "InvalidSpec"
    template = spec.get("template", {})
    if "initFrom" in template.get("checkpoint", {}):
        assert "template.checkpoint.initFrom: a Population starts its members itself" in plan.status["message"]
    if "ttlSecondsAfterFinished" in template.get("runPolicy", {}):
        assert "template.runPolicy.ttlSecondsAfterFinished" in plan.status["message"]


def test_a_name_too_long_for_member_jobs_is_refused() -> None:
    body = population()
    body["metadata"]["name"] = "p" * 60
    assert [e.path for e in spec_errors(body)] == ["metadata.name"]
