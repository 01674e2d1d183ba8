"""What a plan asks the handlers to do, in order (they apply each; the planner never does I/O), and the plan
itself: those actions plus the new status."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def body_field() -> Any:
    """An object body an action carries: compared, hashed and printed by the action's other fields only (the
    ordered-action tests compare what is done to what, not the manifests)."""
    return field(default_factory=dict, compare=False, repr=False, hash=False)


@dataclass(frozen=True)
class CreateService:
    body: dict[str, Any] = body_field()

@dataclass(frozen=True)
class CreateConfigMap:
    body: dict[str, Any] = body_field()

@dataclass(frozen=True)
class CreateMembershipSecret:
    """Create the job's membership Secret with a fresh random token (made where the action is applied: the
    planner stays pure)."""

@dataclass(frozen=True)
class CreateNetworkPolicy:
    body: dict[str, Any] = body_field()

@dataclass(frozen=True)
class UpdateConfigMap:
    """Replace the ConfigMap's data (a spec change; running workers see it after their next restart)."""

    body: dict[str, Any] = body_field()

@dataclass(frozen=True)
class CreatePod:
    name: str
    rank: int
    epoch: int
    body: dict[str, Any] = body_field()

@dataclass(frozen=True)
class DeletePod:
    name: str
    reason: str

@dataclass(frozen=True)
class ForceDeletePod:
    """Delete with grace period 0: the pod's node is lost, so no kubelet will ever confirm its end."""

    name: str
    reason: str

@dataclass(frozen=True)
class DeleteJob:
    reason: str

@dataclass(frozen=True)
class CordonNode:
    """Mark ``node`` unschedulable, taint it ``loco.dev/fault=<kind>:NoSchedule`` and annotate it
    with ``reason`` (spec.faultDetection.cordonNodes, honoured only under ``--cordon-nodes``)."""

    node: str
    kind: str
    reason: str

@dataclass(frozen=True)
class PatchPodLabels:
    """Merge ``labels`` into the pod's labels: a survivor of a live resize takes its rank in, and
    the epoch of, the new membership (``loco.dev/rank``, ``loco.dev/epoch``)."""

    name: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)

@dataclass(frozen=True)
class UngatePods:
    """Remove the gang's scheduling gate from these pods, all at once: the scheduler may bind them now."""

    names: tuple[str, ...]

@dataclass(frozen=True)
class CreateWorkload:
    """Create the job's Kueue Workload (one pod set of its workers), owned by the TrainingJob."""

    body: dict[str, Any] = body_field()

@dataclass(frozen=True)
class DeleteWorkload:
    """Delete the job's Workload (its pod sets are immutable: a new size is a new Workload)."""

    name: str

@dataclass(frozen=True)
class PatchWorkloadStatus:
    """Merge ``status`` into the Workload's status: clear an evicted admission once the workers are gone, or
    say the job finished (Kueue then frees its quota)."""

    name: str
    status: dict[str, Any] = field(default_factory=dict, hash=False)

@dataclass(frozen=True)
class PostMembership:
    """``POST /membership`` to a running worker (``body``: a :class:`MembershipUpdate` on the wire):
    its place in the new membership epoch of a live resize. Sent again on every reconcile until the
    worker reports the new epoch; a failed POST is logged, never retried within the reconcile."""

    name: str
    pod_ip: str
    body: dict[str, Any] = field(default_factory=dict, hash=False)
    #: the job's membership token, sent as a bearer token (the worker refuses an update without it)
    token: str = field(default="", compare=False, repr=False, hash=False)

@dataclass(frozen=True)
class RequestCheckpoint:
    """``POST /checkpoint`` to a running worker (``body``: a :class:`CheckpointRequest` on the wire): save where you
    are, the workers are about to be stopped. Sent again on every reconcile until the checkpoint commits (the worker
    takes one id once); a failed POST is logged, never retried within the reconcile."""

    name: str
    pod_ip: str
    body: dict[str, Any] = field(default_factory=dict, hash=False)
    token: str = field(default="", compare=False, repr=False, hash=False)

@dataclass(frozen=True)
class EmitEvent:
    type: str
    reason: str
    message: str

Action = (CreateService | CreateConfigMap | UpdateConfigMap | CreateMembershipSecret | CreateNetworkPolicy | CreatePod
          | DeletePod | ForceDeletePod | DeleteJob | EmitEvent | CordonNode | PatchPodLabels | PostMembership | RequestCheckpoint | UngatePods
          | CreateWorkload | DeleteWorkload | PatchWorkloadStatus)

@dataclass(frozen=True)
class Plan:
    """Ordered actions and the new status (camelCase wire dict).

    ``requeue_after_s``: reconcile again after this long at the latest (a TTL or deadline falls due).
    """

    actions: tuple[Action, ...]
    status: dict[str, Any]
    requeue_after_s: float | None = None
