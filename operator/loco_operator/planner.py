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
    any -> Suspended  (runPolicy.suspend: pods deleted, status kept) -> Pending on unsuspend

Idempotence: when the children match the status, the plan has no actions and the same status.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any

from pydantic import ValidationError

from loco_trainer.protocol import MembershipUpdate, ProgressReport, WorkerState, epoch_master_port

from .faults.live import FaultFinding, blamed_nodes

from .render import (
    LABEL_EPOCH,
    LABEL_RANK,
    MASTER_PORT,
    JobRef,
    config_json,
    render_configmap,
    render_network_policy,
    render_pod,
    render_service,
)
from .spec import (
    CheckpointStatus,
    CleanPodPolicy,
    Condition,
    FailureRecord,
    FaultRecord,
    Phase,
    PreviousJobStatus,
    TrainingJobSpec,
    TrainingJobStatus,
    WorkersStatus,
)
from .validation import FieldError, validate_job

TERMINAL = (Phase.succeeded, Phase.failed)
#: How long a pod's node may be not Ready before the pod counts as lost (the operator's
#: ``--node-lost-grace-seconds``): after the node lifecycle controller's own grace (50 s by default).
NODE_LOST_GRACE_S = 60.0


class Reason(str, Enum):
    """Event and condition reasons (CamelCase, as Kubernetes expects)."""

    workers_created = "WorkersCreated"
    running = "Running"
    checkpoint_committed = "CheckpointCommitted"
    checkpoint_failed = "CheckpointFailed"
    checkpoint_skipped = "CheckpointSkipped"
    worker_failed = "WorkerFailed"
    restarting = "Restarting"
    resizing = "Resizing"
    succeeded = "Succeeded"
    backoff_limit_exceeded = "BackoffLimitExceeded"
    deadline_exceeded = "DeadlineExceeded"
    invalid_spec = "InvalidSpec"
    suspended = "Suspended"
    resumed = "Resumed"
    config_updated = "ConfigUpdated"
    ttl_expired = "TTLExpired"
    cleanup = "CleanPodPolicy"
    stale_epoch = "StaleEpoch"
    fault_detected = "FaultDetected"
    fault_suspected = "FaultSuspected"
    node_cordoned = "NodeCordoned"
    cordon_not_enabled = "CordonNotEnabled"
    waiting_for_capacity = "WaitingForCapacity"
    node_avoidance_expired = "NodeAvoidanceExpired"
    force_deleted = "ForceDeleted"
    pod_refused = "PodRefused"
    previous_job_kept = "PreviousJobKept"
    previous_job_adopted = "PreviousJobAdopted"


class ConditionType(str, Enum):
    created = "Created"
    running = "Running"
    restarting = "Restarting"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"
    resumed_from_previous_job = "ResumedFromPreviousJob"


class EventType(str, Enum):
    normal = "Normal"
    warning = "Warning"


# ------------------------------------------------------------------------------------ observed


@dataclass(frozen=True)
class ObservedPod:
    """What the planner needs to know about one worker pod."""

    name: str
    rank: int
    epoch: int
    phase: str = "Pending"  # Pending | Running | Succeeded | Failed | Unknown
    deleting: bool = False  # metadata.deletionTimestamp is set
    exit_code: int | None = None
    #: Why it terminated: the pod's status.reason when set (Evicted, NodeLost, Shutdown: it says more
    #: than the container's), else the container's terminated.reason (OOMKilled, Error).
    termination_reason: str | None = None
    termination_report: ProgressReport | None = None  # parsed termination message, if it was one
    #: Why the pod is being deleted, from its DisruptionTarget condition (e.g. "DeletionByTaintManager:
    #: Taint manager: deleting due to NoExecute taint"); None when the pod does not say.
    disruption: str | None = None
    node_name: str | None = None
    pod_ip: str | None = None
    #: The scheduler's message while the pod's PodScheduled condition is False/Unschedulable, and since when.
    unschedulable: str | None = None
    unschedulable_since: str | None = None
    #: The pod's Ready condition is True.
    ready: bool = False
    #: Since when the pod's node has not been Ready (its Ready condition's lastTransitionTime; set by the
    #: handlers from the Node, only for pods that are not Ready or are being deleted). On a real cluster
    #: a node that stops answering leaves its pods Running, or Terminating forever: no kubelet confirms.
    node_lost_since: str | None = None

    @classmethod
    def from_manifest(cls, pod: Mapping[str, Any]) -> "ObservedPod | None":
        """From a pod as the API returns it (camelCase dict); None when it is not a worker pod."""
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        try:
            rank, epoch = int(labels[LABEL_RANK]), int(labels[LABEL_EPOCH])
        except (KeyError, TypeError, ValueError):
            return None
        status = pod.get("status") or {}
        exit_code = reason = report = None
        for cs in status.get("containerStatuses") or []:
            terminated = (cs.get("state") or {}).get("terminated")
            if terminated:
                exit_code = terminated.get("exitCode")
                reason = terminated.get("reason")
                report = parse_report(terminated.get("message"))
                break
        reason = status.get("reason") or reason
        unschedulable = since = disruption = None
        ready = False
        for cond in status.get("conditions") or []:
            if cond.get("type") == "Ready":
                ready = cond.get("status") == "True"
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                unschedulable, since = cond.get("message") or "Unschedulable", cond.get("lastTransitionTime")
            if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
                disruption = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x) or None
        return cls(
            name=meta.get("name", ""),
            rank=rank,
            epoch=epoch,
            phase=status.get("phase") or "Pending",
            deleting=meta.get("deletionTimestamp") is not None,
            exit_code=exit_code,
            termination_reason=reason,
            termination_report=report,
            node_name=(pod.get("spec") or {}).get("nodeName"),
            pod_ip=status.get("podIP"),
            unschedulable=unschedulable,
            unschedulable_since=since,
            disruption=disruption,
            ready=ready,
        )

    @property
    def live(self) -> bool:
        """Running or about to run (not finished, not being deleted)."""
        return not self.deleting and self.phase in ("Pending", "Running", "Unknown")


def parse_report(text: Any) -> ProgressReport | None:
    """A ProgressReport from JSON text (a termination message or a /status body); None if it is not one."""
    if not text:
        return None
    try:
        data = json.loads(text) if isinstance(text, (str, bytes)) else text
        return ProgressReport.model_validate(data)
    except (ValueError, ValidationError, TypeError):
        return None


@dataclass(frozen=True)
class Observed:
    """The job's children as observed just now, plus the latest progress reports by pod name."""

    pods: tuple[ObservedPod, ...] = ()
    service_exists: bool = False
    configmap_data: str | None = None  # config.json of the ConfigMap, None when it does not exist
    #: The job's membership token (its Secret), None when the Secret does not exist yet.
    membership_token: str | None = None
    network_policy_exists: bool = False
    reports: Mapping[str, ProgressReport] = field(default_factory=dict)
    #: Names of pods that carry the job's label but belong to someone else (e.g. a deleted job of the
    #: same name whose pods are still terminating): a worker with such a name cannot be created yet.
    foreign_pods: frozenset[str] = frozenset()
    #: New verdicts of the live fault detector (loco_operator.faults.live), resolved to pods and nodes.
    findings: tuple[FaultFinding, ...] = ()
    #: How many more worker pods the cluster could place right now (:func:`loco_operator.capacity.free_slots`);
    #: None when not computed (only elastic jobs below their target size need it).
    free_slots: int | None = None


# ------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class CreateService:
    body: dict[str, Any] = field(default_factory=dict, compare=False, repr=False, hash=False)


@dataclass(frozen=True)
class CreateConfigMap:
    body: dict[str, Any] = field(default_factory=dict, compare=False, repr=False, hash=False)


@dataclass(frozen=True)
class CreateMembershipSecret:
    """Create the job's membership Secret with a fresh random token (made where the action is applied: the
    planner stays pure)."""


@dataclass(frozen=True)
class CreateNetworkPolicy:
    body: dict[str, Any] = field(default_factory=dict, compare=False, repr=False, hash=False)


@dataclass(frozen=True)
class UpdateConfigMap:
    """Replace the ConfigMap's data (a spec change; running workers see it after their next restart)."""

    body: dict[str, Any] = field(default_factory=dict, compare=False, repr=False, hash=False)


@dataclass(frozen=True)
class CreatePod:
    name: str
    rank: int
    epoch: int
    body: dict[str, Any] = field(default_factory=dict, compare=False, repr=False, hash=False)


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
class EmitEvent:
    type: str
    reason: str
    message: str


Action = (CreateService | CreateConfigMap | UpdateConfigMap | CreateMembershipSecret | CreateNetworkPolicy | CreatePod
          | DeletePod | ForceDeletePod | DeleteJob | EmitEvent | CordonNode | PatchPodLabels | PostMembership)

#: How many status.skippedCheckpoints paths are kept (oldest dropped first).
MAX_SKIPPED_RECORDS = 20
#: How many status.faults entries are kept (oldest dropped first).
MAX_FAULT_RECORDS = 20


@dataclass(frozen=True)
class Plan:
    """Ordered actions and the new status (camelCase wire dict).

    ``requeue_after_s``: reconcile again after this long at the latest (a TTL or deadline falls due).
    """

    actions: tuple[Action, ...]
    status: dict[str, Any]
    requeue_after_s: float | None = None


# ------------------------------------------------------------------------------------- helpers


def rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def parse_status(raw: Any) -> TrainingJobStatus:
    """The stored status, salvaging what can be read: unknown keys and unreadable fields (someone
    else's, or hand-edited) are dropped one by one, never the whole status, so the restart count
    and the last checkpoint survive."""
    if not isinstance(raw, Mapping):
        return TrainingJobStatus()
    known = {f.alias or name for name, f in TrainingJobStatus.model_fields.items()} | set(TrainingJobStatus.model_fields)
    data = {k: v for k, v in raw.items() if k in known}
    for _ in range(len(data) + 1):
        try:
            return TrainingJobStatus.model_validate(data)
        except ValidationError as exc:
            bad = {err["loc"][0] for err in exc.errors() if err["loc"]}
            if not bad & set(data):
                break
            data = {k: v for k, v in data.items() if k not in bad}
    return TrainingJobStatus()


class _Planner:
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
                )
                break
        else:
            if not status and not record_false:
                return  # a condition that never held is not worth recording as False
            conditions.append(
                Condition(type=type_.value, status=value, reason=reason.value, message=message,
                          last_transition_time=rfc3339(self.now))
            )
        self.status.conditions = conditions

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


def _progress(p: _Planner, spec: TrainingJobSpec, current: Sequence[ObservedPod]) -> None:
    """Fold the progress reports into the status: numbers from the current epoch's workers (the
    final termination message wins over a poll), checkpoints from any worker (never backwards)."""
    st = p.status
    st.total_steps = spec.training.steps
    reports: list[ProgressReport] = []
    for pod in current:
        report = pod.termination_report or p.observed.reports.get(pod.name)
        if report is not None:
            reports.append(report)
    if reports:
        # a worker still loading (a joiner of a live grow, the workers of a restart, state starting) reports
        # step 0 until it has resumed or adopted the running workers' step: the job's step comes from the
        # others, and while every worker is starting it stays where it was (a restart never shows step 0)
        counted = [r for r in reports if r.state != WorkerState.starting]
        if counted:
            st.step = min(r.step for r in counted)
        elif st.step is None:
            st.step = min(r.step for r in reports)
        st.total_steps = max([spec.training.steps, *(r.total_steps for r in reports)])
        by_rank = sorted(reports, key=lambda r: r.replica_index)
        # rounded for display (`kubectl get tj` prints numbers as stored)
        st.loss = next((round(r.loss, 4) for r in by_rank if r.loss is not None), st.loss)
        st.eval_loss = next((round(r.eval_loss, 4) for r in by_rank if r.eval_loss is not None), st.eval_loss)
        rates = [r.tokens_per_second for r in reports if r.tokens_per_second is not None]
        if rates:
            st.tokens_per_second = round(sum(rates), 1)
    candidates = [r.last_checkpoint for r in p.observed.reports.values() if r.last_checkpoint is not None]
    candidates += [pod.termination_report.last_checkpoint for pod in p.observed.pods
                   if pod.termination_report is not None and pod.termination_report.last_checkpoint is not None]
    if candidates:
        best = max(candidates, key=lambda c: c.step)
        if st.last_checkpoint is None or best.step > st.last_checkpoint.step:
            st.last_checkpoint = CheckpointStatus(step=best.step, path=best.path, time=best.time)
            p.event(EventType.normal, Reason.checkpoint_committed, f"Checkpoint committed at step {best.step}: {best.path}")
    # a committed checkpoint that failed verification at resume: the workers took an older one
    for report in p.observed.reports.values():
        for skipped in report.skipped_checkpoints or []:
            if skipped.path not in st.skipped_checkpoints:
                st.skipped_checkpoints = [*st.skipped_checkpoints, skipped.path][-MAX_SKIPPED_RECORDS:]
                p.event(EventType.warning, Reason.checkpoint_skipped,
                        f"Checkpoint {skipped.path} (step {skipped.step}) failed verification and was skipped "
                        f"({skipped.reason}): {skipped.message}")
    _previous_job(p)
    # a failed background save: the workers go on and the previous checkpoint stays the resume point
    errors = [r.checkpoint_error for r in p.observed.reports.values() if r.checkpoint_error]
    newest = max(errors, key=_checkpoint_error_order, default=None)
    if newest is not None and newest != st.last_checkpoint_error:
        st.last_checkpoint_error = newest
        p.event(EventType.warning, Reason.checkpoint_failed,
                f"Checkpoint save failed (training continues; resume point stays "
                f"{'step ' + str(st.last_checkpoint.step) if st.last_checkpoint else 'the start'}): {newest}")


def _previous_job(p: _Planner) -> None:
    """A job created under the name of a deleted one found its checkpoints: say once what was done with them
    (set aside and started fresh, or resumed from: spec.checkpoint.adoptPreviousJob)."""
    st = p.status
    found = [r.previous_job for r in p.observed.reports.values() if r.previous_job is not None]
    found += [pod.termination_report.previous_job for pod in p.observed.pods
              if pod.termination_report is not None and pod.termination_report.previous_job is not None]
    if not found or st.previous_job is not None:
        return
    prev = found[0]
    st.previous_job = PreviousJobStatus(uid=prev.uid, steps=prev.steps, adopted=prev.adopted, path=prev.path)
    steps = ", ".join(map(str, prev.steps))
    if prev.adopted:
        reason, message = Reason.previous_job_adopted, (
            f"Resumed from the checkpoints of an earlier job of this name (uid {prev.uid}, steps {steps}) in {prev.path}, "
            f"as spec.checkpoint.adoptPreviousJob asks")
    else:
        reason, message = Reason.previous_job_kept, (
            f"Started from step 0: the checkpoints of an earlier job of this name (uid {prev.uid}, steps {steps}) are "
            f"kept in {prev.path}; set spec.checkpoint.adoptPreviousJob to resume from them instead")
    p.condition(ConditionType.resumed_from_previous_job, prev.adopted, reason, message, record_false=True)
    p.event(EventType.normal if prev.adopted else EventType.warning, reason, message)


def _checkpoint_error_order(message: str) -> tuple[int, str]:
    """Order of worker checkpoint errors: by the step in ``checkpoint step N failed: ...``, then text."""
    match = re.search(r"checkpoint step (\d+)", message)
    return (int(match.group(1)) if match else -1, message)


def _failure_message(pod: ObservedPod, phase: Phase | None) -> str:
    node = f" on node {pod.node_name}" if pod.node_name else ""
    if pod.deleting:
        return f"{pod.name} was deleted while {pod.phase}{node} ({pod.disruption or 'evicted or preempted?'})"
    if pod.phase == "Failed":
        code = f"exited with code {pod.exit_code}" if pod.exit_code is not None else "failed"
        detail = pod.termination_report.message if pod.termination_report and pod.termination_report.message else ""
        detail = detail or (pod.termination_reason or "")
        return f"{pod.name} {code}{node}" + (f": {detail}" if detail else "")
    return f"{pod.name} disappeared while the job was {phase.value if phase else 'starting'}"


def _summary(st: TrainingJobStatus, desired: int) -> None:
    ready = st.workers.ready if st.workers else 0
    st.workers_ready = f"{ready}/{desired}"


def plan(job: Mapping[str, Any], observed: Observed, now: datetime, *,
         node_lost_grace_s: float = NODE_LOST_GRACE_S, cordon_nodes: bool = False,
         network_policy_peers: Sequence[Mapping[str, Any]] | None = None) -> Plan:
    """Decide what to do for one TrainingJob. Pure: same inputs, same plan.

    ``job`` is the TrainingJob body (camelCase dict with metadata, spec, status); ``observed`` the
    job's children and progress reports; ``now`` an aware datetime; ``node_lost_grace_s`` how long a
    pod's node may be not Ready before the pod counts as lost (:func:`_lost_with_their_nodes`);
    ``cordon_nodes`` whether the cluster operator lets a job's ``faultDetection.cordonNodes`` cordon a
    blamed node (``--cordon-nodes``; off, the request is answered with a ``CordonNotEnabled`` Warning);
    ``network_policy_peers``: who besides the job's own pods may reach its workers (``--network-policy``;
    None: no NetworkPolicy is made).
    Returns the ordered actions and the complete new status (write the status if it changed, then
    apply the actions).
    """
    observed, force_deletions = _lost_with_their_nodes(observed, now, node_lost_grace_s)
    p = _Planner(job, observed, now, cordon_nodes=cordon_nodes, network_policy_peers=network_policy_peers)
    p.actions += force_deletions
    st = p.status
    meta = job.get("metadata") or {}
    st.observed_generation = meta.get("generation", st.observed_generation)
    st.selector = p.ref.selector
    errors = validate_job(job)
    spec = None if errors else TrainingJobSpec.model_validate(job.get("spec") or {})

    if spec is None and st.phase not in TERMINAL:
        _invalid(p, errors)
    elif st.phase in TERMINAL:
        _finished(p, spec)
    else:
        assert spec is not None
        _reconcile(p, spec)
    desired = spec.replicas if spec else 0
    if st.workers is None:
        st.workers = WorkersStatus(desired=desired, ready=0)
    _summary(st, st.workers.desired)
    return Plan(actions=tuple(p.actions), status=st.to_wire(), requeue_after_s=p.requeue_after_s)


def refusal_is_permanent(status: int, message: str) -> bool:
    """Whether the API's refusal of a worker pod will never change by itself: a body it cannot decode (400, e.g.
    a resources quantity that is not one), invalid (422), or forbidden (403) by admission such as Pod Security or
    by RBAC, but not a ResourceQuota that frees up as pods finish."""
    return status in (400, 422) or (status == 403 and "exceeded quota" not in message)


def plan_pod_refused(job: Mapping[str, Any], status: Mapping[str, Any], pod: str, message: str, now: datetime, *,
                     by: str = "The API") -> Plan:
    """The API (or, ``by``, the operator's own client, before sending it) permanently refused to create worker
    ``pod`` (:func:`refusal_is_permanent`): the job fails at once with a ``Failed`` condition quoting the refusal,
    instead of trying to create the pod again every reconcile. ``status`` is the status the last plan wrote; the
    job's other pods are cleaned up per its policy."""
    p = _Planner({**job, "status": dict(status)}, Observed(), now)
    try:
        policy = TrainingJobSpec.model_validate(job.get("spec") or {}).run_policy.clean_pod_policy
    except ValidationError:
        policy = CleanPodPolicy.all
    p.fail(Reason.pod_refused, f"{by} refused worker pod {pod}: {message}", policy)
    _summary(p.status, p.status.workers.desired if p.status.workers else 0)
    return Plan(actions=tuple(p.actions), status=p.status.to_wire())


def _lost_with_their_nodes(observed: Observed, now: datetime, grace_s: float) -> tuple[Observed, list[Action]]:
    """Pods whose node has not been Ready for ``grace_s``: a live one counts as failed (``NodeLost``, so the
    job restarts or shrinks as for any lost worker); one being deleted is force-deleted, with a Warning
    event saying why, since no kubelet will ever confirm it gone and the job would wait forever."""
    pods: list[ObservedPod] = []
    actions: list[Action] = []
    for pod in observed.pods:
        since = parse_time(pod.node_lost_since)
        if since is None or (now - since).total_seconds() < grace_s:
            pods.append(pod)
            continue
        lost_for = f"not Ready since {pod.node_lost_since} ({(now - since).total_seconds():.0f}s, grace {grace_s:.0f}s)"
        if pod.deleting:
            message = (f"Force-deleted pod {pod.name}: stuck Terminating on node {pod.node_name}, {lost_for}; "
                       "no kubelet will confirm its end")
            actions += [ForceDeletePod(pod.name, message), EmitEvent(EventType.warning.value, Reason.force_deleted.value, message)]
            pods.append(pod)
        elif pod.phase in ("Pending", "Running", "Unknown"):
            pods.append(dataclasses.replace(pod, phase="Failed", termination_reason=f"NodeLost: node {lost_for}"))
        else:
            pods.append(pod)
    return dataclasses.replace(observed, pods=tuple(pods)), actions


def _invalid(p: _Planner, errors: list[FieldError]) -> None:
    message = "invalid spec: " + "; ".join(str(e) for e in errors)
    p.status.workers = WorkersStatus(desired=0, ready=0)
    p.fail(Reason.invalid_spec, message, CleanPodPolicy.all)


def _finished(p: _Planner, spec: TrainingJobSpec | None) -> None:
    """Succeeded or Failed: keep cleaning up per policy, and delete the job once its TTL passed."""
    policy = spec.run_policy.clean_pod_policy if spec else CleanPodPolicy.all
    p.cleanup(policy)
    ttl = spec.run_policy.ttl_seconds_after_finished if spec else None
    done = parse_time(p.status.completion_time)
    if ttl is not None and done is not None:
        due = done + timedelta(seconds=ttl)
        if p.now >= due:
            p.actions.append(DeleteJob(f"{Reason.ttl_expired.value}: finished {ttl}s ago"))
        else:
            p.requeue_after_s = (due - p.now).total_seconds()
    if p.status.workers:
        ready = sum(1 for pod in p.observed.pods if pod.live and pod.phase == "Running" and pod.epoch == p.status.membership_epoch)
        p.status.workers = WorkersStatus(desired=p.status.workers.desired, ready=ready)


def _restart(
    p: _Planner, spec: TrainingJobSpec, failures: list[str], resize_from: int | None = None, cause: str | None = None,
    size: int | None = None,
) -> None:
    """Start a new membership epoch of ``size`` workers (default ``spec.replicas``): delete every
    worker; they are recreated once all are gone. ``resize_from``: the worker count changes (a
    ``Resizing`` event ``Resized 3→2 (cause)``; not counted against backoffLimit)."""
    st = p.status
    size = spec.replicas if size is None else size
    for message in failures:
        p.event(EventType.warning, Reason.worker_failed, message)
    ckpt = st.last_checkpoint
    origin = f"step {ckpt.step}" if ckpt else "scratch (no checkpoint yet)"
    if resize_from is not None:
        reason = Reason.resizing
        message = f"Resized {resize_from}→{size} ({cause or 'spec.replicas changed'}), resuming from {origin}"
        st.resizes += 1
        st.last_resize_time = rfc3339(p.now)
    else:
        st.restarts += 1
        reason = Reason.restarting
        message = f"Restarting from {origin} (restart {st.restarts}/{spec.run_policy.backoff_limit})"
        if failures or cause:
            message += f": {failures[0] if failures else cause}"
    st.membership_epoch += 1
    st.phase = Phase.restarting
    st.message = message
    p.condition(ConditionType.restarting, True, reason, message)
    p.condition(ConditionType.running, False, reason, message)
    p.event(EventType.warning if resize_from is None else EventType.normal, reason, message)
    p.delete_pods(p.observed.pods, f"{reason.value}: epoch {st.membership_epoch}")
    st.workers = WorkersStatus(desired=size, ready=0)


# ----------------------------------------------------------------------------- live membership
#
# A live-capable job (spec.live_membership) resizes without restarting its survivors: the operator
# starts epoch E+1, patches the survivors' rank/epoch labels (pods keep their names for life), deletes
# the leaving pods or creates joiners, and once every pod of E+1 answers /status it POSTs each
# survivor its place in E+1 (:func:`_membership_updates`) until the survivor reports E+1.


def _live(p: _Planner, spec: TrainingJobSpec) -> bool:
    """Whether a resize now may keep the survivors running: the job is live-capable and Running."""
    return spec.live_membership and p.status.phase is Phase.running


def _count(n: int, noun: str = "worker") -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _begin_live_epoch(p: _Planner, message: str) -> int:
    """Count a live resize (``status.resizes``, not restarts) and start its epoch; phase stays Running."""
    st = p.status
    st.membership_epoch += 1
    st.resizes += 1
    st.last_resize_time = rfc3339(p.now)
    st.message = message
    p.condition(ConditionType.running, True, Reason.resizing, message)
    p.event(EventType.normal, Reason.resizing, message)
    _requeue(p, 2.0)
    return st.membership_epoch


def _live_shrink(
    p: _Planner, spec: TrainingJobSpec, members: Sequence[ObservedPod], leaving: Sequence[ObservedPod],
    resize_from: int, cause: str, failures: Sequence[str] = (), keep_below: int | None = None,
) -> bool:
    """Shrink without restarting: the survivors (``members`` that are Running, not ``leaving`` and of
    rank below ``keep_below``) keep their relative order as ranks 0..k-1 of a new epoch; every other
    member is deleted. False (nothing done) when the job cannot resize live or fewer than
    max(1, minReplicas) would survive: the caller then restarts or waits as for any job."""
    if not _live(p, spec):
        return False
    gone = {pod.name for pod in leaving if pod in members}  # never a name made up for a vanished rank
    survivors = sorted((pod for pod in members if pod.live and pod.phase == "Running" and pod.name not in gone
                        and (keep_below is None or pod.rank < keep_below)), key=lambda x: (x.rank, x.name))
    size = len(survivors)
    if size < max(1, _min_replicas(spec)) or size >= resize_from:  # too few left, or nobody leaves
        return False
    for message in failures:
        p.event(EventType.warning, Reason.worker_failed, message)
    epoch = p.status.membership_epoch + 1
    _begin_live_epoch(p, f"Resized {resize_from}→{size} ({cause}); {_count(size)} "
                         f"{'continues' if size == 1 else 'continue'} without restarting (epoch {epoch})")
    keep = {pod.name for pod in survivors}
    p.delete_pods([pod for pod in members if pod.name not in keep], f"{Reason.resizing.value}: epoch {epoch}")
    for rank, pod in enumerate(survivors):
        p.actions.append(PatchPodLabels(pod.name, {LABEL_RANK: str(rank), LABEL_EPOCH: str(epoch)}))
    p.status.workers = WorkersStatus(desired=size, ready=0)  # ready again once they report the new epoch
    return True


def _live_grow(p: _Planner, spec: TrainingJobSpec, members: Sequence[ObservedPod], resize_from: int, size: int,
               cause: str) -> bool:
    """Grow without restarting: the members keep ranks 0..n-1 in a new epoch and ``size - n`` joiners
    (``LOCO_JOIN=1``) are created under free names. Only when every member is Running and reporting
    (a joiner takes the state from rank 0); False (nothing done) otherwise."""
    ordered = sorted(members, key=lambda x: x.rank)
    if (not _live(p, spec) or not ordered or size <= len(ordered) or [x.rank for x in ordered] != list(range(len(ordered)))
            or not all(x.live and x.phase == "Running" and x.name in p.observed.reports for x in ordered)):
        return False
    n = len(ordered)
    epoch = p.status.membership_epoch + 1
    _begin_live_epoch(p, f"Resized {resize_from}→{size} ({cause}); {_count(size - n)} {'joins' if size - n == 1 else 'join'} "
                         f"at the next outer step, {n} {'continues' if n == 1 else 'continue'} without restarting (epoch {epoch})")
    for pod in ordered:
        p.actions.append(PatchPodLabels(pod.name, {LABEL_RANK: str(pod.rank), LABEL_EPOCH: str(epoch)}))
    for rank, name in zip(range(n, size), _free_names(p, size - n)):
        p.actions.append(CreatePod(name, rank, epoch, _render_joiner(p, spec, rank, size, name, ordered[0].name)))
    p.status.workers = WorkersStatus(desired=size, ready=n)
    return True


def _switching(p: _Planner, spec: TrainingJobSpec, current: Sequence[ObservedPod]) -> bool:
    """A live membership change is still under way: some Running worker of this epoch still reports
    an older one (it has not regrouped yet). Planned changes (grow, scale) wait for it, one at a time:
    a second change now could remove a joiner the survivors are already waiting for at the rendezvous.
    Failures are still acted on at once."""
    if not _live(p, spec):
        return False
    reports, epoch = p.observed.reports, p.status.membership_epoch
    behind = any(pod.live and pod.phase == "Running" and pod.name in reports and reports[pod.name].epoch < epoch
                 for pod in current)
    if behind:
        _requeue(p, 2.0)
    return behind


def _free_names(p: _Planner, count: int, taken: Sequence[str] = ()) -> list[str]:
    """``count`` pod names ``<job>-worker-<i>`` with the smallest ``i`` no observed pod (ours, being
    deleted, or someone else's) nor ``taken`` uses."""
    used = {pod.name for pod in p.observed.pods} | set(p.observed.foreign_pods) | set(taken)
    names: list[str] = []
    i = 0
    while len(names) < count:
        if p.ref.pod_name(i) not in used:
            names.append(p.ref.pod_name(i))
        i += 1
    return names


def _render_joiner(p: _Planner, spec: TrainingJobSpec, rank: int, size: int, name: str, rank0: str) -> dict[str, Any]:
    """A pod joining the running membership of this epoch as ``rank`` of ``size``: it takes the state
    from rank 0 (the pod named ``rank0``), not from a checkpoint, at the epoch's rendezvous port."""
    st = p.status
    return render_pod(p.ref, spec, rank, st.membership_epoch, restarts=st.restarts, resume_from="",
                      avoid_nodes=st.avoid_nodes, num_replicas=size, name=name, join=True,
                      master_addr=p.ref.pod_dns_by_name(rank0), master_port=epoch_master_port(MASTER_PORT, st.membership_epoch))


def _membership_updates(p: _Planner, spec: TrainingJobSpec, current: Sequence[ObservedPod], size: int) -> None:
    """Level-triggered: every Running worker of this epoch whose report still names an older epoch
    gets its place in this one (:class:`PostMembership`), once every worker of the epoch reports
    (joiners included: the survivors would otherwise wait for them at the rendezvous)."""
    if not _live(p, spec):
        return
    st, reports = p.status, p.observed.reports
    epoch = st.membership_epoch
    behind = [pod for pod in sorted(current, key=lambda x: x.rank)
              if pod.live and pod.phase == "Running" and pod.name in reports and reports[pod.name].epoch < epoch]
    if not behind:
        return
    _requeue(p, 2.0)
    by_rank = {pod.rank: pod for pod in current if pod.live}
    if sorted(by_rank) != list(range(size)) or any(pod.name not in reports for pod in by_rank.values()):
        return
    master = p.ref.pod_dns_by_name(by_rank[0].name)
    for pod in behind:
        if pod.pod_ip:
            update = MembershipUpdate(epoch=epoch, rank=pod.rank, world_size=size, master_addr=master,
                                      master_port=epoch_master_port(MASTER_PORT, epoch))
            p.actions.append(PostMembership(pod.name, pod.pod_ip, update.model_dump(by_alias=True),
                                            token=p.observed.membership_token or ""))


def _pod_names(p: _Planner, ranks: Sequence[int]) -> dict[int, str]:
    """Names for new pods of ``ranks``: ``<job>-worker-<rank>`` unless one of our pods (a survivor of
    a live resize, which keeps its name) already has it, then the smallest free name."""
    ours = {pod.name for pod in p.observed.pods}
    names: dict[int, str] = {}
    for rank in ranks:
        name = p.ref.pod_name(rank)
        if name in ours or name in names.values():
            name = _free_names(p, 1, taken=list(names.values()))[0]
        names[rank] = name
    return names


def _requeue(p: _Planner, after_s: float) -> None:
    """Reconcile again within ``after_s`` seconds (the earliest of all requests wins)."""
    after_s = max(after_s, 0.5)
    p.requeue_after_s = after_s if p.requeue_after_s is None else min(p.requeue_after_s, after_s)


def _min_replicas(spec: TrainingJobSpec) -> int:
    el = spec.elastic
    return spec.replicas if el is None or el.min_replicas is None else min(el.min_replicas, spec.replicas)


def _size(spec: TrainingJobSpec, st: TrainingJobStatus) -> int:
    """The current epoch's worker count: ``spec.replicas``, except while an elastic job is shrunk
    (``status.workers.desired`` below it, never below minReplicas). A change of ``spec.replicas``
    by the user (``status.targetReplicas`` differs) always moves the job to the new value."""
    if spec.elastic is None or st.workers is None or not st.workers.desired:
        return spec.replicas
    target_before = st.target_replicas if st.target_replicas is not None else st.workers.desired
    if target_before != spec.replicas:
        return spec.replicas
    return max(min(st.workers.desired, spec.replicas), _min_replicas(spec))


def _elastic_shrink(p: _Planner, spec: TrainingJobSpec, current: Sequence[ObservedPod], size: int) -> bool:
    """Workers the scheduler has not placed for ``elastic.placementTimeoutSeconds``: restart the job
    without them (a resize, down to minReplicas at most); at minReplicas wait in phase Restarting
    with a ``WaitingForCapacity`` condition until they are placed. True when it acted."""
    assert spec.elastic is not None
    st = p.status
    timeout = timedelta(seconds=spec.elastic.placement_timeout_seconds)
    stuck: list[ObservedPod] = []
    for pod in current:
        if pod.deleting or pod.phase != "Pending" or not pod.unschedulable:
            continue
        due = (parse_time(pod.unschedulable_since) or p.now) + timeout
        if p.now >= due:
            stuck.append(pod)
        else:
            _requeue(p, (due - p.now).total_seconds())
    if not stuck:
        return False
    first = min(stuck, key=lambda pod: pod.rank)
    why = _unplaceable_cause(st, first)
    lo = _min_replicas(spec)
    if _live_shrink(p, spec, current, stuck, size, why):
        return True
    new = max(size - len(stuck), lo)
    if new < size:
        _restart(p, spec, [], resize_from=size, size=new, cause=why)
        return True
    message = (f"Waiting for capacity: {len(stuck)} of {size} workers cannot be placed and elastic.minReplicas is {lo} "
               f"({why})")
    if st.message != message:
        p.event(EventType.warning, Reason.waiting_for_capacity, message)
    st.phase, st.message = Phase.restarting, message
    p.condition(ConditionType.restarting, True, Reason.waiting_for_capacity, message)
    p.condition(ConditionType.running, False, Reason.waiting_for_capacity, message)
    ready = sum(1 for pod in current if pod.phase == "Running" and not pod.deleting and pod.name in p.observed.reports)
    st.workers = WorkersStatus(desired=size, ready=ready)
    _requeue(p, 5.0)
    return True


def _unplaceable_cause(st: TrainingJobStatus, pod: ObservedPod) -> str:
    """Why ``pod`` is missing from the job: when the failure or fault that started this epoch
    (``status.lastFailure``) took it, that failure first, e.g. ``job-worker-2 exited with code 137 on
    node n7: NodeLost; its replacement cannot be placed: 0/3 nodes are available: ...``; else (a
    user scale-up, a grow) only ``job-worker-3 cannot be placed: ...``."""
    placed = f"cannot be placed: {pod.unschedulable}"
    failure = st.last_failure
    if failure is None or failure.epoch != st.membership_epoch - 1:
        return f"{pod.name} {placed}"
    return f"{failure.message}; {'its replacement' if failure.pods == [pod.name] else pod.name} {placed}"


def _elastic_grow(p: _Planner, spec: TrainingJobSpec, size: int, current: Sequence[ObservedPod] = ()) -> bool:
    """A shrunk elastic job grows back towards ``spec.replicas`` once the cluster can place more
    workers (``observed.free_slots``) and ``scaleUpDelaySeconds`` passed since the last resize:
    live (joiners) when it can, else by a coordinated restart."""
    assert spec.elastic is not None
    st = p.status
    _requeue(p, 5.0)  # keep looking at the cluster's capacity while shrunk
    slots = p.observed.free_slots or 0
    if slots <= 0:
        return False
    last = parse_time(st.last_resize_time)
    due = last + timedelta(seconds=spec.elastic.scale_up_delay_seconds) if last else p.now
    if p.now < due:
        _requeue(p, (due - p.now).total_seconds())
        return False
    new = min(spec.replicas, size + slots)
    if not _live_grow(p, spec, current, size, new, "capacity"):
        _restart(p, spec, [], resize_from=size, size=new, cause="capacity")
    return True


def _reconcile(p: _Planner, spec: TrainingJobSpec) -> None:
    st = p.status
    st.algorithm = spec.algorithm.name.value
    policy = spec.run_policy
    epoch = st.membership_epoch
    size = _size(spec, st)  # this epoch's worker count (below spec.replicas while an elastic job is shrunk)
    desired_before = st.workers.desired if st.workers else 0
    if (desired_before and size != desired_before and st.phase is Phase.running
            and _switching(p, spec, [pod for pod in p.observed.pods if pod.epoch == epoch and pod.rank < desired_before])):
        size = desired_before  # spec.replicas changed during a live switch: resize once it is done
    else:
        st.target_replicas = spec.replicas
    current = [pod for pod in p.observed.pods if pod.epoch == epoch and pod.rank < size]
    stale = [pod for pod in p.observed.pods if pod not in current]
    _progress(p, spec, current)
    _expire_avoided_nodes(p, spec)

    # 1. suspension
    if policy.suspend:
        if st.phase is not Phase.suspended:
            st.phase = Phase.suspended
            st.message = "Suspended: workers deleted, status and checkpoint kept"
            p.condition(ConditionType.suspended, True, Reason.suspended, st.message)
            p.condition(ConditionType.running, False, Reason.suspended, st.message)
            p.event(EventType.normal, Reason.suspended, f"Job suspended: deleting {sum(not x.deleting for x in p.observed.pods)} workers")
        p.delete_pods(p.observed.pods, Reason.suspended.value)
        st.workers = WorkersStatus(desired=spec.replicas, ready=0)
        return
    if st.phase is Phase.suspended:
        st.membership_epoch = epoch = epoch + 1
        st.phase = Phase.pending
        st.start_time = None  # activeDeadlineSeconds counts from the resumed start, like a Job
        ckpt = st.last_checkpoint
        st.message = f"Resumed: recreating workers from {'step %d' % ckpt.step if ckpt else 'scratch'}"
        p.condition(ConditionType.suspended, False, Reason.resumed, st.message)
        p.event(EventType.normal, Reason.resumed, st.message)
        current, stale = [], list(p.observed.pods)

    # 2. deadline
    started = parse_time(st.start_time)
    if policy.active_deadline_seconds is not None and started is not None:
        due = started + timedelta(seconds=policy.active_deadline_seconds)
        if p.now >= due:
            p.fail(Reason.deadline_exceeded,
                   f"Job ran longer than activeDeadlineSeconds ({policy.active_deadline_seconds}s)", policy.clean_pod_policy)
            return
        p.requeue_after_s = (due - p.now).total_seconds()

    # 3. shared children
    if not p.observed.service_exists:
        p.actions.append(CreateService(render_service(p.ref)))
    if p.observed.membership_token is None:
        p.actions.append(CreateMembershipSecret())
    if p.network_policy_peers is not None and not p.observed.network_policy_exists:
        p.actions.append(CreateNetworkPolicy(render_network_policy(p.ref, p.network_policy_peers)))
    if p.observed.configmap_data is None:
        p.actions.append(CreateConfigMap(render_configmap(p.ref, spec)))
    elif p.observed.configmap_data != config_json(p.ref, spec):
        p.actions.append(UpdateConfigMap(render_configmap(p.ref, spec)))
        p.event(EventType.normal, Reason.config_updated, "Trainer config changed; workers pick it up on their next restart")

    # 4. resize (spec.replicas changed under live workers)
    if desired_before and desired_before != size and any(pod.live for pod in current):
        members = [pod for pod in p.observed.pods if pod.epoch == epoch]
        if size < desired_before:  # keep the lowest ranks
            live = _live_shrink(p, spec, members, [], desired_before, "spec.replicas changed", keep_below=size)
        else:
            live = _live_grow(p, spec, members, desired_before, size, "spec.replicas changed")
        if not live:
            _restart(p, spec, [], resize_from=desired_before, size=size)
        return

    # 5. failures of the current epoch
    by_rank = {pod.rank: pod for pod in current}
    failed = [pod for pod in sorted(current, key=lambda x: x.rank)
              if pod.phase == "Failed" or (pod.deleting and pod.phase != "Succeeded")]
    if st.phase is Phase.running and not stale:
        failed += [ObservedPod(p.ref.pod_name(r), r, epoch) for r in range(size) if r not in by_rank]
    failures = [_failure_message(pod, st.phase) for pod in failed]
    if failures:
        st.last_failure = FailureRecord(
            reason=Reason.worker_failed.value, message="; ".join(failures), pods=[pod.name for pod in failed],
            nodes=list(dict.fromkeys(pod.node_name for pod in failed if pod.node_name)), epoch=epoch, time=rfc3339(p.now),
        )
        if _live_shrink(p, spec, current, failed, size, "; ".join(failures), failures=failures):
            return
        if st.restarts + 1 > policy.backoff_limit:
            for message in failures:
                p.event(EventType.warning, Reason.worker_failed, message)
            p.fail(Reason.backoff_limit_exceeded,
                   f"{failures[0]}; backoffLimit ({policy.backoff_limit}) reached after {st.restarts} restarts",
                   policy.clean_pod_policy)
            st.workers = WorkersStatus(desired=spec.replicas, ready=0)
        else:
            _restart(p, spec, failures, size=size)
        return

    # 5a. elastic: workers that cannot be placed -> shrink, or wait at minReplicas
    if spec.elastic is not None and _elastic_shrink(p, spec, current, size):
        return

    # 5b. faults the live detector found in this epoch: record, isolate the node, restart
    findings = [f for f in p.observed.findings if f.epoch == epoch] if st.phase is Phase.running else []
    for f in findings:
        if not f.actionable:  # a straggler too mild to be worth a restart: say so, do nothing
            p.event(EventType.warning, Reason.fault_suspected,
                    f"{f.kind}: {f.verdict.message}; it costs {f.slowdown:.0%} of the collective interval, below "
                    f"faultDetection.minSlowdownToAct ({f.min_slowdown:.0%}): not acted on")
    findings = [f for f in findings if f.actionable]
    if findings:
        _act_on_faults(p, spec, findings, current, size)
        return

    # 5c. elastic: grow back when the cluster can place more workers (never once a worker finished the run:
    # its pod frees room that growing would only fill with a restart at the last step, again and again)
    if (spec.elastic is not None and size < spec.replicas and st.phase is Phase.running and not _switching(p, spec, current)
            and not any(pod.phase == "Succeeded" for pod in current) and _elastic_grow(p, spec, size, current)):
        return

    # 6. success: every worker of this epoch exited 0
    if len(by_rank) == size and all(pod.phase == "Succeeded" for pod in by_rank.values()):
        st.phase = Phase.succeeded
        st.completion_time = rfc3339(p.now)
        st.message = f"All {size} workers finished at step {st.step if st.step is not None else '?'}"
        p.condition(ConditionType.succeeded, True, Reason.succeeded, st.message)
        for cond_type in (ConditionType.running, ConditionType.restarting):
            if any(c.type == cond_type.value and c.status == "True" for c in st.conditions):
                p.condition(cond_type, False, Reason.succeeded, st.message)
        p.event(EventType.normal, Reason.succeeded, st.message)
        p.cleanup(policy.clean_pod_policy)
        st.workers = WorkersStatus(desired=size, ready=0)
        return

    # 7. stale workers (an old epoch, or ranks beyond replicas) must be gone before new ones start
    if stale:
        p.delete_pods(stale, f"{Reason.stale_epoch.value}: epoch is {epoch}")
    if stale and not _live(p, spec):  # a live job runs on while the pods it left behind terminate
        st.phase = st.phase or Phase.pending
        st.message = f"Waiting for {len(stale)} old workers to terminate before starting epoch {epoch}"
        st.workers = WorkersStatus(desired=size, ready=0)
        return

    # 8. create missing workers
    missing = [r for r in range(size) if r not in by_rank]
    names = _pod_names(p, missing)
    blocked = [r for r in missing if names[r] in p.observed.foreign_pods]
    if blocked:
        st.phase = st.phase or Phase.pending
        st.message = (f"Waiting for pod {names[blocked[0]]}, which is not owned by this TrainingJob, "
                      "to be deleted before creating workers")
        st.workers = WorkersStatus(desired=size, ready=0)
        return
    resume = st.last_checkpoint.path if st.last_checkpoint else ""
    joining = _live(p, spec) and 0 in by_rank  # the membership runs: a new pod joins it
    for rank in missing:
        if joining:
            body = _render_joiner(p, spec, rank, size, names[rank], by_rank[0].name)
        else:
            body = render_pod(p.ref, spec, rank, epoch, restarts=st.restarts, resume_from=resume, avoid_nodes=st.avoid_nodes,
                              num_replicas=size, name=names[rank])
        p.actions.append(CreatePod(names[rank], rank, epoch, body))
    if missing or current:
        st.start_time = st.start_time or rfc3339(p.now)  # workers exist (or are about to) from now on
    if missing:
        message = f"Created {len(missing)} worker pods for epoch {epoch}" + (f", resuming from step {st.last_checkpoint.step}" if st.last_checkpoint else "")
        p.condition(ConditionType.created, True, Reason.workers_created, f"Workers created for epoch {epoch}")
        p.event(EventType.normal, Reason.workers_created, message)

    # 9. phase from the workers
    running = [pod for pod in current if pod.phase == "Running" and not pod.deleting]
    # ready: answering /status in this epoch (a survivor of a live resize counts once it has regrouped)
    ready = sum(1 for pod in running if pod.name in p.observed.reports and p.observed.reports[pod.name].epoch == epoch)
    st.workers = WorkersStatus(desired=size, ready=ready)
    if not missing and len(running) + sum(pod.phase == "Succeeded" for pod in current) == size and running:
        if st.phase is not Phase.running:
            st.phase = Phase.running
            st.message = f"All {size} workers running (epoch {epoch})"
            p.condition(ConditionType.running, True, Reason.running, st.message)
            p.condition(ConditionType.restarting, False, Reason.running, st.message)
            p.event(EventType.normal, Reason.running, st.message)
    elif st.phase is None or (missing and st.phase is not Phase.restarting):
        st.phase = Phase.pending
        st.message = f"Waiting for {size - len(running)} of {size} workers to start"
    elif st.phase is Phase.restarting:
        st.message = st.message or f"Waiting for workers of epoch {epoch} to start"

    # 10. live membership: tell the survivors of a live resize their place in this epoch
    _membership_updates(p, spec, current, size)


def _act_on_faults(p: _Planner, spec: TrainingJobSpec, findings: Sequence[FaultFinding],
                   current: Sequence[ObservedPod] = (), size: int | None = None) -> None:
    """Turn detector verdicts into actions: a ``FaultDetected`` Warning event and a
    ``status.faults`` entry per verdict, the blamed nodes onto ``status.avoidNodes`` (the new pods
    get a required node anti-affinity against them), a cordon when both the job asks for it and the
    operator allows it (:func:`_cordon`), and a restart of the job
    in a new epoch from the last committed checkpoint (which deletes the faulty pods). The restart
    counts against ``runPolicy.backoffLimit`` like any other. A live-capable job instead drops the
    blamed pods and continues with the others (:func:`_live_shrink`, not a restart) when enough remain."""
    st = p.status
    cordon = spec.detector.cordon_nodes and p.cordon_nodes
    causes = []
    blamed_pods: list[str] = []
    blamed: list[str] = []
    for finding in findings:
        v = finding.verdict
        nodes = list(blamed_nodes(finding))
        where = ", ".join(f"{pod} on {node}" for pod, node in zip(finding.pods, finding.nodes)) or "unknown pods"
        at = f" at collective #{v.seq}" if v.seq is not None else ""
        text = f"{v.kind.value}{at}: blamed rank(s) {', '.join(map(str, v.ranks))} ({where}): {v.message}"
        if nodes:
            text += f"; avoiding node(s) {', '.join(nodes)} for the replacement pods"
        p.event(EventType.warning, Reason.fault_detected, text)
        for node in nodes:
            if node not in st.avoid_nodes:
                st.avoid_nodes = [*st.avoid_nodes, node]
            if spec.detector.cordon_nodes:
                _cordon(p, node, v.kind.value, v.message)
        record = FaultRecord(
            kind=v.kind.value, ranks=list(v.ranks), pods=list(finding.pods), nodes=nodes, epoch=finding.epoch,
            seq=v.seq, message=v.message, evidence=_plain(v.evidence), cordoned=cordon and bool(nodes),
            time=rfc3339(p.now),
        )
        st.faults = [*st.faults, record][-MAX_FAULT_RECORDS:]
        causes.append(f"{v.kind.value} blamed {where}")
        blamed_pods += [pod for pod in finding.pods if pod not in blamed_pods]
        blamed += [node for node in finding.nodes if node and node not in blamed]
    st.last_failure = FailureRecord(
        reason=Reason.fault_detected.value, message="; ".join(causes), pods=blamed_pods, nodes=blamed,
        epoch=st.membership_epoch, time=rfc3339(p.now),
    )
    blamed_here = [pod for pod in current if pod.name in blamed_pods]
    if _live_shrink(p, spec, current, blamed_here, len(current) if size is None else size, "; ".join(causes)):
        return
    if st.restarts + 1 > spec.run_policy.backoff_limit:
        p.fail(Reason.backoff_limit_exceeded,
               f"{causes[0]}; backoffLimit ({spec.run_policy.backoff_limit}) reached after {st.restarts} restarts",
               spec.run_policy.clean_pod_policy)
        st.workers = WorkersStatus(desired=spec.replicas, ready=0)
        return
    _restart(p, spec, [], cause="; ".join(causes))


def _cordon(p: _Planner, node: str, kind: str, message: str) -> None:
    """The job asked to cordon ``node`` (``faultDetection.cordonNodes``). A cordon takes the node from every
    tenant, so only the cluster operator may allow it (``--cordon-nodes``); otherwise a Warning event answers
    the request and the node stays only on this job's avoid-list."""
    if p.cordon_nodes:
        p.actions.append(CordonNode(node, kind, f"{p.ref.namespace}/{p.ref.name}: {kind}: {message}"))
        p.event(EventType.warning, Reason.node_cordoned, f"Cordoned node {node}: {kind} blamed it")
        return
    p.event(EventType.warning, Reason.cordon_not_enabled,
            f"Not cordoning node {node} ({kind} blamed it) as faultDetection.cordonNodes asks: the cluster operator has "
            "not enabled cordoning (loco operator run --cordon-nodes, chart value faultIsolation.cordonNodes); "
            "the node stays on this job's avoid-list only")


def _expire_avoided_nodes(p: _Planner, spec: TrainingJobSpec) -> None:
    """Drop from ``status.avoidNodes`` the nodes no fault record has blamed for
    ``faultDetection.avoidNodeSeconds`` (0: never): new pods may be placed there again. Pods already
    running are not touched. A node whose records rolled out of ``status.faults`` (the last
    MAX_FAULT_RECORDS) counts as blamed long ago."""
    st = p.status
    ttl = spec.detector.avoid_node_seconds
    if not ttl or not st.avoid_nodes:
        return
    last_blamed: dict[str, datetime] = {}
    for record in st.faults:
        at = parse_time(record.time)
        for node in record.nodes:
            if at is not None and (node not in last_blamed or at > last_blamed[node]):
                last_blamed[node] = at
    expired = [n for n in st.avoid_nodes if n not in last_blamed or p.now >= last_blamed[n] + timedelta(seconds=ttl)]
    if expired:
        st.avoid_nodes = [n for n in st.avoid_nodes if n not in expired]
        p.event(EventType.normal, Reason.node_avoidance_expired,
                f"No longer avoiding node(s) {', '.join(expired)}: no fault blamed them for faultDetection.avoidNodeSeconds "
                f"({ttl:g}s); new worker pods may be placed there again")
    if st.avoid_nodes:
        _requeue(p, min((last_blamed[n] + timedelta(seconds=ttl) - p.now).total_seconds() for n in st.avoid_nodes))


def _plain(value: Any) -> Any:
    """JSON-safe copy of verdict evidence (numpy scalars, tuples, inf/nan -> plain JSON values)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if number != number or number in (float("inf"), float("-inf")):
        return str(number)
    return int(number) if float(number).is_integer() and not isinstance(value, float) else number
