"""``runPolicy.failurePolicy``: how much a failed worker counts, by its trainer's exit code or its pod's conditions.

As the Job API's podFailurePolicy: rules in order, the first that matches a failed worker decides its action;
a worker no rule matches counts. Over the workers that failed together the strongest action wins (FailJob, then
Count, then Ignore): one configuration error fails the job even when its peers only lost it. A worker that exited
because it lost a peer (exit code 76) follows that peer's cause: when any worker failed otherwise, only those
decide (a drained worker's peers are not counted against the restart budget).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loco_contract.exits import ExitCode, describe

from ..spec import ExitCodeOperator, FailureAction, FailurePolicy, FailureRule, OnExitCodes, OnPodCondition
from .observe import ObservedPod

#: What an unset failurePolicy means (docs/api.md): a configuration error fails at once, a disruption is ignored.
DEFAULT_RULES = (
    FailureRule(action=FailureAction.fail_job, on_exit_codes=OnExitCodes(operator=ExitCodeOperator.in_,
                                                                          values=[int(ExitCode.CONFIG)])),
    FailureRule(action=FailureAction.ignore, on_pod_conditions=[OnPodCondition(type="DisruptionTarget")]),
)
_STRENGTH = {FailureAction.ignore: 0, FailureAction.count: 1, FailureAction.fail_job: 2}


@dataclass(frozen=True)
class Judgement:
    """What one failed worker does to the job, and which rule said so (for the condition and the events)."""

    pod: ObservedPod
    action: FailureAction
    rule: str


def judge(pod: ObservedPod, policy: FailurePolicy | None) -> Judgement:
    """The first rule that matches ``pod`` (the defaults when ``policy`` is None); Count when none does."""
    rules = DEFAULT_RULES if policy is None else tuple(policy.rules)
    where = "the default failure policy" if policy is None else "runPolicy.failurePolicy"
    for index, rule in enumerate(rules):
        matched = _matches(rule, pod)
        if matched:
            return Judgement(pod, rule.action, f"{where} rule {index} ({rule.action.value} on {matched})")
    return Judgement(pod, FailureAction.count, f"no rule of {where} matches: Count")


def decide(pods: Sequence[ObservedPod], policy: FailurePolicy | None) -> Judgement:
    """The judgement for workers that failed together: the first of the strongest action among the root causes."""
    judgements = [judge(pod, policy) for pod in pods]
    causes = [j for j in judgements if j.pod.exit_code != ExitCode.PEER_LOST] or judgements
    return max(causes, key=lambda j: _STRENGTH[j.action])


def _matches(rule: FailureRule, pod: ObservedPod) -> str | None:
    """What of ``pod`` the rule matched, in words, or None."""
    if rule.on_exit_codes is not None:
        code = pod.exit_code
        if code is None or code == 0:  # the container did not end (deleted, vanished) or ended well
            return None
        listed = code in rule.on_exit_codes.values
        if listed == (rule.on_exit_codes.operator is ExitCodeOperator.in_):
            return f"exit code {code}, {describe(code)}"
        return None
    present = set(pod.conditions)
    for want in rule.on_pod_conditions:
        if (want.type, want.status) in present:
            return f"pod condition {want.type}={want.status}" + (f" ({pod.disruption})" if pod.disruption else "")
    return None
