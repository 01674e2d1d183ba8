"""runPolicy.failurePolicy (issue 24 #3): a configuration error fails the job within one attempt, quoting the
trainer; a disruption (drain, preemption) restarts without counting; the rest count; user rules replace the defaults
and are checked as the Job API checks podFailurePolicy."""

from __future__ import annotations

import json

import pytest

from loco_contract.exits import ExitCode
from loco_operator.planner import ObservedPod, plan
from loco_operator.planner.failure_policy import judge
from loco_operator.spec import FailurePolicy
from loco_operator.validation import validate_job

from test_operator_planner import NOW, children, job, pod, running_status

DISRUPTED = {"conditions": (("Ready", "False"), ("DisruptionTarget", "True")),
             "disruption": "EvictionByEvictionAPI: Eviction API: evicting"}


def _report(message: str) -> dict:
    return {"jobName": "j", "replicaIndex": 1, "state": "failed", "message": message}


def failed(rank: int, code: int, message: str = "", **kw) -> ObservedPod:
    from loco_operator.planner import parse_report
    report = parse_report(json.dumps(_report(message))) if message else None
    return pod(rank, phase="Failed", exit_code=code, termination_report=report, node_name="n1", **kw)


def test_a_configuration_error_fails_the_job_at_once_quoting_the_trainer():
    body = job(status=running_status())
    why = "rank 1: configuration error: ConfigError: the data holds token id 125 but model.gpt.vocabSize is 100"
    result = plan(body, children(pod(0), failed(1, ExitCode.CONFIG, why)), NOW)
    st = result.status
    assert st["phase"] == "Failed" and st["restarts"] == 0
    failed_condition = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed_condition["reason"] == "FailurePolicy"
    assert failed_condition["message"] == (
        f"j-worker-1 exited with code 2 on node n1: {why} (the default failure policy rule 0 (FailJob on exit code 2, "
        f"configuration error))")


def test_a_disrupted_worker_restarts_the_job_without_counting():
    body = job(status=running_status())
    result = plan(body, children(pod(0), pod(1, deleting=True, node_name="n1", **DISRUPTED)), NOW)
    st = result.status
    assert st["phase"] == "Restarting" and st["restarts"] == 0 and st["ignoredFailures"] == 1
    assert "not counted against backoffLimit: the default failure policy rule 1 (Ignore on pod condition " \
           "DisruptionTarget=True (EvictionByEvictionAPI: Eviction API: evicting))" in st["message"], st["message"]
    # the next attempt is still a new attempt for the workers (fault injection's onlyFirstAttempt reads it)
    body = {**body, "status": st}
    created = plan(body, children(), NOW).actions
    env = {e["name"]: e.get("value") for e in created[0].body["spec"]["containers"][0]["env"]}
    assert env["LOCO_RESTART_COUNT"] == "1"


def test_other_failures_count_and_the_strongest_action_wins():
    body = job(status=running_status())
    counted = plan(body, children(pod(0), failed(1, ExitCode.PEER_LOST)), NOW).status
    assert counted["phase"] == "Restarting" and counted["restarts"] == 1
    # one worker's configuration error fails the job even when its peer only lost it
    both = plan(body, children(failed(0, ExitCode.PEER_LOST), failed(1, ExitCode.CONFIG)), NOW).status
    assert both["phase"] == "Failed" and "j-worker-1 exited with code 2" in both["message"]


def test_a_worker_that_lost_its_peer_follows_the_peers_cause():
    body = job(status=running_status())
    # worker 1 was drained; worker 0 noticed first and exited 76: the restart is not counted
    drained = plan(body, children(failed(0, ExitCode.PEER_LOST), pod(1, deleting=True, **DISRUPTED)), NOW).status
    assert (drained["phase"], drained["restarts"], drained["ignoredFailures"]) == ("Restarting", 0, 1)
    # alone, a lost peer counts
    alone = plan(body, children(failed(0, ExitCode.PEER_LOST), pod(1)), NOW).status
    assert (alone["phase"], alone["restarts"]) == ("Restarting", 1)


def test_user_rules_replace_the_defaults():
    rules = {"rules": [
        {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [int(ExitCode.OUT_OF_MEMORY), 137]}},
        {"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [1, 76, 143]}},
    ]}
    body = job({"runPolicy": {"failurePolicy": rules}}, status=running_status())
    oom = plan(body, children(pod(0), failed(1, ExitCode.OUT_OF_MEMORY)), NOW).status
    assert (oom["phase"], oom["restarts"], oom["ignoredFailures"]) == ("Restarting", 0, 1)
    nan = plan(body, children(pod(0), failed(1, ExitCode.NON_FINITE_LOSS)), NOW).status
    assert nan["phase"] == "Failed" and "runPolicy.failurePolicy rule 1 (FailJob on exit code 80, non-finite loss)" \
        in nan["message"]
    peer = plan(body, children(pod(0), failed(1, ExitCode.PEER_LOST)), NOW).status
    assert (peer["phase"], peer["restarts"]) == ("Restarting", 1)  # NotIn does not match a listed code: Count
    # the defaults are gone: a disruption now counts, as no rule matches it
    disrupted = plan(body, children(pod(0), pod(1, deleting=True, **DISRUPTED)), NOW).status
    assert (disrupted["phase"], disrupted["restarts"]) == ("Restarting", 1)


def test_a_worker_without_an_exit_code_matches_no_exit_code_rule():
    policy = FailurePolicy.model_validate({"rules": [{"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [1]}}]})
    assert judge(pod(1, deleting=True), policy).action.value == "Count"
    assert judge(failed(1, 0), policy).action.value == "Count"


@pytest.mark.parametrize("rule, field", [
    ({"action": "FailJob"}, "spec.runPolicy.failurePolicy.rules"),
    ({"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]},
      "onPodConditions": [{"type": "DisruptionTarget"}]}, "spec.runPolicy.failurePolicy.rules"),
    ({"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2, 2]}}, "spec.runPolicy.failurePolicy.rules"),
    ({"action": "FailJob", "onExitCodes": {"operator": "In", "values": [0]}}, "spec.runPolicy.failurePolicy.rules"),
    ({"action": "Retry", "onExitCodes": {"operator": "In", "values": [2]}}, "spec.runPolicy.failurePolicy.rules"),
])
def test_a_rule_the_job_api_would_refuse_is_refused_naming_the_field(rule, field):
    errors = validate_job(job({"runPolicy": {"failurePolicy": {"rules": [rule]}}}))
    assert errors and all(str(e).startswith(field) for e in errors), [str(e) for e in errors]
