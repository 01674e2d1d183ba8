"""What the planner is given, as typed values: the job's worker pods (from their manifests), its other
children, the workers' progress reports and the detector's findings; the stored status, salvaged; and the
first judgement on them (a pod whose node is lost counts as failed)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from loco_contract.protocol import ProgressReport
from loco_detector.live import FaultFinding

from ..render import GANG_GATE, LABEL_EPOCH, LABEL_RANK
from ..spec import TrainingJobStatus
from .actions import Action, EmitEvent, ForceDeletePod
from .vocabulary import EventType, Reason


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
    #: The pod's conditions as (type, status) pairs (what runPolicy.failurePolicy's onPodConditions match).
    conditions: tuple[tuple[str, str], ...] = ()
    #: The pod still carries the gang's scheduling gate (created, not yet released to the scheduler).
    gated: bool = False
    #: metadata.creationTimestamp.
    created: str | None = None

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
            conditions=tuple((str(c.get("type")), str(c.get("status"))) for c in status.get("conditions") or []
                             if isinstance(c, Mapping)),
            gated=any(isinstance(g, Mapping) and g.get("name") == GANG_GATE
                      for g in (pod.get("spec") or {}).get("schedulingGates") or []),
            created=meta.get("creationTimestamp"),
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
class ObservedSource:
    """The TrainingJob another job starts from (spec.checkpoint.initFrom), as the handlers read it."""

    name: str
    found: bool = False
    phase: str | None = None
    #: its spec.checkpoint.path: where its checkpoints are, <path>/<namespace>/<name>/step-NNNNNNNN
    checkpoint_path: str = ""
    #: its status.lastCheckpoint: the newest checkpoint it committed
    last_step: int | None = None
    last_path: str | None = None

    @classmethod
    def from_manifest(cls, name: str, job: Mapping[str, Any] | None) -> "ObservedSource":
        if job is None:
            return cls(name)
        spec, status = job.get("spec") or {}, job.get("status") or {}
        last = status.get("lastCheckpoint") or {}
        return cls(name, True, status.get("phase"), str((spec.get("checkpoint") or {}).get("path") or "/checkpoints"),
                   last.get("step") if isinstance(last.get("step"), int) else None, last.get("path"))


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
    #: New verdicts of the live fault detector (loco_detector.live), resolved to pods and nodes.
    findings: tuple[FaultFinding, ...] = ()
    #: How many more worker pods the cluster could place right now (:func:`loco_operator.capacity.free_slots`);
    #: None when not computed (only elastic jobs below their target size need it).
    free_slots: int | None = None
    #: Why the gated workers do not fit (:func:`loco_operator.capacity.shortage`), when they do not.
    gang_shortage: str | None = None
    #: The job's Kueue Workload (None: not queued, or not created yet).
    workload: ObservedWorkload | None = None
    #: Values of the WorkloadPriorityClasses the job names (its kueue.x-k8s.io/priority-class label).
    workload_priorities: Mapping[str, int] = field(default_factory=dict)
    #: The TrainingJob spec.checkpoint.initFrom names, read while this job has not started from it yet (None:
    #: not read; ``found`` False: not there).
    init_source: ObservedSource | None = None

@dataclass(frozen=True)
class ObservedWorkload:
    """The job's Kueue Workload as the handlers read it (only for a job labelled with a queue name)."""

    name: str
    queue: str
    #: workers its one pod set asks for
    count: int
    #: Kueue admitted it (condition Admitted True and status.admission set)
    admitted: bool = False
    #: "ClusterQueue cq, flavors cpu=default": what admitted it, in words
    admitted_by: str = ""
    #: why Kueue evicted it (condition Evicted True: preempted, deactivated...), while its admission is still set
    evicted: str | None = None
    evicted_reason: str = ""
    #: why it waits (condition QuotaReserved False), e.g. "insufficient unused quota for cpu ..."
    pending: str | None = None
    finished: bool = False
    #: node labels and tolerations of the admitted flavors: the workers must go where the quota is
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    #: the Workload's conditions as read (a status patch replaces the list)
    conditions: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_manifest(cls, wl: Mapping[str, Any], flavors: Mapping[str, Mapping[str, Any]] | None = None
                      ) -> "ObservedWorkload":
        """From the Workload and the ResourceFlavors by name (``spec.nodeLabels``, ``spec.tolerations``)."""
        spec, status = wl.get("spec") or {}, wl.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, Mapping)}

        def holds(kind: str) -> bool:
            return (conditions.get(kind) or {}).get("status") == "True"

        admission = status.get("admission") or None
        assigned = {resource: flavor for ps in (admission or {}).get("podSetAssignments") or []
                    for resource, flavor in (ps.get("flavors") or {}).items()}
        selector: dict[str, str] = {}
        tolerations: list[Mapping[str, Any]] = []
        for name in sorted(set(assigned.values())):
            flavor = (flavors or {}).get(name, {}).get("spec") or {}
            selector.update(flavor.get("nodeLabels") or {})
            tolerations += [t for t in flavor.get("tolerations") or [] if t not in tolerations]
        reserved = conditions.get("QuotaReserved") or {}
        pod_sets = spec.get("podSets") or [{}]
        return cls(
            name=(wl.get("metadata") or {}).get("name", ""),
            queue=spec.get("queueName", ""),
            count=int(pod_sets[0].get("count") or 0),
            admitted=admission is not None and holds("Admitted"),
            admitted_by=(f"ClusterQueue {admission.get('clusterQueue')}, flavors "
                         + ", ".join(f"{r}={f}" for r, f in sorted(assigned.items()))) if admission else "",
            evicted=((conditions.get("Evicted") or {}).get("message") or "evicted")
            if holds("Evicted") and admission is not None else None,
            evicted_reason=(conditions.get("Evicted") or {}).get("reason") or "",
            pending=reserved.get("message") if reserved.get("status") == "False" else None,
            finished=holds("Finished"),
            node_selector=selector,
            tolerations=tuple(tolerations),
            conditions=tuple(c for c in status.get("conditions") or [] if isinstance(c, Mapping)),
        )


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

def lost_with_their_nodes(observed: Observed, now: datetime, grace_s: float) -> tuple[Observed, list[Action]]:
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
