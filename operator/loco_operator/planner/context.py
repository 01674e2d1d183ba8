"""The one object a plan is built in: the job, what was observed, the clock, and the actions and status
changes so far, with the small verbs every decision uses (an event, a condition, deleting pods, failing)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ..render import JobRef
from ..spec import CleanPodPolicy, Condition, Phase
from .actions import Action, DeletePod, EmitEvent
from .observe import Observed, ObservedPod, parse_status, rfc3339
from .vocabulary import ConditionType, EventType, Reason


class Planner:
    """Accumulates actions and status changes for one :func:`plan` call (never outlives it)."""

    def __init__(self, body: Mapping[str, Any], observed: Observed, now: datetime, *, cordon_nodes: bool = False,
                 network_policy_peers: Sequence[Mapping[str, Any]] | None = None):
        self.body = body
        #: The cluster operator lets jobs cordon blamed nodes (``loco operator run --cordon-nodes``).
        self.cordon_nodes = cordon_nodes
        self.network_policy_peers = network_policy_peers
        self.ref = JobRef.from_body(dict(body))
        self.observed = observed
        self.now = now
        self.status = parse_status(body.get("status"))
        self.actions: list[Action] = []
        self.requeue_after_s: float | None = None

    # -- status helpers
    def event(self, type_: EventType, reason: Reason, message: str) -> None:
        self.actions.append(EmitEvent(type_.value, reason.value, message))

    def condition(self, type_: ConditionType, status: bool, reason: Reason, message: str, *, record_false: bool = False) -> None:
        """Set a condition; lastTransitionTime changes only when its status does. A condition that never held
        is recorded as False only with ``record_false`` (when False is itself the news)."""
        value = "True" if status else "False"
        conditions = list(self.status.conditions)
        for i, cond in enumerate(conditions):
            if cond.type == type_.value:
                if cond.status == value and cond.reason == reason.value and cond.message == message:
                    return
                changed = cond.status != value
                conditions[i] = Condition(
                    type=type_.value, status=value, reason=reason.value, message=message,
                    last_transition_time=rfc3339(self.now) if changed else cond.last_transition_time,
                    last_update_time=rfc3339(self.now),
                )
                break
        else:
            if not status and not record_false:
                return  # a condition that never held is not worth recording as False
            conditions.append(
                Condition(type=type_.value, status=value, reason=reason.value, message=message,
                          last_transition_time=rfc3339(self.now), last_update_time=rfc3339(self.now))
            )
        self.status.conditions = conditions

    def resized(self, before: int, after: int, message: str) -> None:
        """Count a change of the worker count (``status.resizes``; never against backoffLimit) and say it in the
        ``Resized`` condition: the last resize, from → to and why."""
        self.status.resizes += 1
        self.status.last_resize_time = rfc3339(self.now)
        self.condition(ConditionType.resized, True, Reason.scaled_up if after > before else Reason.scaled_down, message)

    def delete_pods(self, pods: Sequence[ObservedPod], reason: str) -> None:
        for pod in sorted(pods, key=lambda p: (p.rank, p.name)):
            if not pod.deleting:
                self.actions.append(DeletePod(pod.name, reason))

    def cleanup(self, policy: CleanPodPolicy) -> None:
        """Delete pods of a finished job per runPolicy.cleanPodPolicy (idempotent)."""
        pods = self.observed.pods
        if policy is CleanPodPolicy.all:
            self.delete_pods(pods, f"{Reason.cleanup.value}=All")
        elif policy is CleanPodPolicy.running:
            self.delete_pods([p for p in pods if p.live], f"{Reason.cleanup.value}=Running")

    def fail(self, reason: Reason, message: str, policy: CleanPodPolicy) -> None:
        self.status.phase = Phase.failed
        self.status.completion_time = rfc3339(self.now)
        self.status.message = message
        self.condition(ConditionType.failed, True, reason, message)
        for cond_type in (ConditionType.running, ConditionType.restarting):
            if any(c.type == cond_type.value and c.status == "True" for c in self.status.conditions):
                self.condition(cond_type, False, reason, "Job failed")
        self.event(EventType.warning, reason, message)
        self.cleanup(policy)

def requeue(p: Planner, after_s: float) -> None:
    """Reconcile again within ``after_s`` seconds (the earliest of all requests wins)."""
    after_s = max(after_s, 0.5)
    p.requeue_after_s = after_s if p.requeue_after_s is None else min(p.requeue_after_s, after_s)
