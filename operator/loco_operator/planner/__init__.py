"""The pure reconcile function: ``plan(job, observed, now) -> Plan``.

No I/O, no clock, no randomness: the planner takes the TrainingJob body (metadata, spec, status),
what the handler observed (the job's pods, whether its Service and ConfigMap exist, the progress
reports polled from the workers) and the current time, and returns the ordered actions to take
plus the new status. :mod:`loco_operator.handlers` observes, calls :func:`plan`, writes the
status, then applies the actions (so a failed status write acts on nothing). Everything the
planner needs to carry on lives in ``status`` (the phase, the membership epoch, the restart count,
the last checkpoint), so a restarted operator continues from the object alone.

Lifecycle (``status.phase``)::

    (new) -> Pending -> Running -> Succeeded
                \\         |
                 \\        v  a worker failed / vanished / was evicted (restarts < backoffLimit)
                  +--> Restarting: epoch += 1, delete every worker, wait until all are gone,
                         |          recreate them with LOCO_RESUME_FROM = status.lastCheckpoint.path
                         +--> Running ...
    Running --> Running: a live resize (spec.live_membership: elastic DiLoCo family, one process per
                pod): epoch += 1, the survivors' rank/epoch labels are patched, leavers deleted, joiners
                created under free names; each survivor is POSTed its new place (/membership)
    any -> Failed     (backoffLimit exhausted, activeDeadlineSeconds passed, invalid spec)
    any -> Suspended  (runPolicy.suspend: the workers save where they are, then pods deleted, status kept)
                      -> Pending on unsuspend
    (new) -> Suspended (queued in Kueue: no worker until its Workload is admitted; again when evicted) -> Pending

Idempotence: when the children match the status, the plan has no actions and the same status.

The package, by what each part decides (every part pure; one :class:`.context.Planner` carries a plan
while it is being made):

- :mod:`.observe`: what was observed, as typed values (pods, reports, findings; the stored status salvaged).
- :mod:`.progress`: what the status says of training (step, losses, checkpoints).
- :mod:`.lifecycle`: invalid, finished, suspended, past the deadline, failed workers, restart, succeeded.
- :mod:`.elastic` and :mod:`.membership`: resizing, by restart or live.
- :mod:`.faults`: what the detector found.
- :mod:`.workers`: the children of a running job and the phase they add up to.
- :mod:`.queue`: Kueue admission (one Workload per queued job).
- :mod:`.init_from`: which other job's checkpoint a new job starts from (spec.checkpoint.initFrom).
- :mod:`.stop`: a checkpoint of where the workers are before a suspend or an eviction stops them.
- :mod:`.actions`: the ordered actions a plan returns; :mod:`.reconcile`: the order of the decisions.
"""

from .actions import (
    Action, CordonNode, CreateConfigMap, CreateMembershipSecret, CreateNetworkPolicy, CreatePod,
    CreateService, CreateWorkload, DeleteJob, DeletePod, DeleteWorkload, EmitEvent, ForceDeletePod, PatchPodLabels,
    PatchWorkloadStatus, Plan, PostMembership, RequestCheckpoint, UngatePods, UpdateConfigMap
)
from .observe import Observed, ObservedPod, ObservedSource, ObservedWorkload, parse_report, parse_status, parse_time, rfc3339
from .reconcile import plan, plan_pod_refused, refusal_is_permanent
from .vocabulary import MAX_FAULT_RECORDS, MAX_SKIPPED_RECORDS, NODE_LOST_GRACE_S, TERMINAL, ConditionType, EventType, Reason

__all__ = [
    "Action", "CordonNode", "CreateConfigMap", "CreateMembershipSecret", "CreateNetworkPolicy", "CreatePod", "CreateService",
    "DeleteJob", "DeletePod", "EmitEvent", "ForceDeletePod", "PatchPodLabels", "Plan", "PostMembership", "RequestCheckpoint",
    "UngatePods",
    "UpdateConfigMap", "CreateWorkload", "DeleteWorkload", "PatchWorkloadStatus",
    "Observed", "ObservedPod", "ObservedSource", "ObservedWorkload", "parse_report", "parse_status", "parse_time", "rfc3339",
    "plan", "plan_pod_refused", "refusal_is_permanent",
    "MAX_FAULT_RECORDS", "MAX_SKIPPED_RECORDS", "NODE_LOST_GRACE_S", "TERMINAL", "ConditionType", "EventType", "Reason",
]
