"""Kueue admission: a TrainingJob labelled ``kueue.x-k8s.io/queue-name`` is ONE Workload (all its workers or none),
created by the operator and owned by the job. No worker exists until Kueue admits it; the workers then go where the
admitted flavors say (their node labels and tolerations). When Kueue evicts it (preemption, a deactivated
Workload), the workers first save a checkpoint of where they are (:mod:`.stop`), then are deleted,
the admission is cleared as Kueue's own job integrations do, and the job waits, Suspended, to be admitted again;
then it resumes from its checkpoint. A finished job marks its Workload Finished, which frees the quota.

Sizes: the Workload asks for ``spec.replicas`` workers. An elastic job may run fewer (a shrink stays within what was
admitted) but never more; a new ``spec.replicas`` is a new Workload (pod sets are immutable), queued again."""

from __future__ import annotations

from typing import Any

from ..render import PRIORITY_LABEL, QUEUE_LABEL, render_workload
from ..spec import Phase, TrainingJobSpec, WorkersStatus
from .actions import CreateWorkload, DeleteWorkload, PatchWorkloadStatus
from .context import Planner
from .observe import ObservedWorkload, rfc3339
from .stop import stopped_after_checkpoint
from .vocabulary import TERMINAL, ConditionType, EventType, Reason

#: Evictions after which Kueue's own integrations mark the Workload Requeued (it goes back to its queue at once).
_REQUEUED_BY = ("Preempted", "NodeFailures")


def queue_of(p: Planner) -> str | None:
    """The LocalQueue the job is queued in (its ``kueue.x-k8s.io/queue-name`` label), or None."""
    return ((p.body.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL) or None


def hold_until_admitted(p: Planner, spec: TrainingJobSpec) -> bool:
    """For a queued job: create (or renew) its Workload and keep it Suspended without workers until Kueue admits it,
    and through an eviction. True when the job waits (the reconcile ends here)."""
    queue = queue_of(p)
    if queue is None:
        return False
    wl = p.observed.workload
    if wl is None or wl.count != spec.replicas or wl.queue != queue:
        if wl is not None:  # pod sets are immutable: a new size is a new Workload
            p.actions.append(DeleteWorkload(wl.name))
        else:
            p.actions.append(CreateWorkload(render_workload(p.ref, spec, queue, spec.replicas, _priority(p))))
        _hold(p, spec, Reason.queued, f"Waiting for Kueue to admit {spec.replicas} workers (LocalQueue {queue})")
        return True
    if wl.evicted is not None:
        why = f"evicted by Kueue: {wl.evicted_reason or 'Evicted'}"
        if p.status.phase is not Phase.suspended and not stopped_after_checkpoint(p, spec, why):
            return True
        _hold(p, spec, Reason.evicted, f"Evicted by Kueue ({wl.evicted_reason or 'Evicted'}): {wl.evicted}; "
              "workers stopped, resuming from the last checkpoint once admitted again")
        if not any(pod.live or pod.deleting for pod in p.observed.pods):
            p.actions.append(PatchWorkloadStatus(wl.name, _cleared(p, wl)))
        return True
    if not wl.admitted:
        _hold(p, spec, Reason.queued, f"Queued in LocalQueue {queue}: {wl.pending or 'waiting for admission'}")
        return True
    if p.status.phase is Phase.suspended or p.status.phase is None:
        p.event(EventType.normal, Reason.admitted, f"Admitted by Kueue: {wl.admitted_by}")
    return False


def finish_workload(p: Planner) -> None:
    """A finished job's Workload is marked Finished (Kueue frees its quota), once."""
    wl = p.observed.workload
    if wl is None or wl.finished or p.status.phase not in TERMINAL:
        return
    succeeded = p.status.phase is Phase.succeeded
    finished = _condition(p, "Finished", "True", "Succeeded" if succeeded else "Failed",
                          p.status.message or ("The job succeeded" if succeeded else "The job failed"))
    p.actions.append(PatchWorkloadStatus(wl.name, {"conditions": _merge(wl, finished)}))


def placement_of(wl: ObservedWorkload | None) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The node selector and tolerations the admitted flavors add to every worker."""
    if wl is None or not wl.admitted:
        return {}, []
    return dict(wl.node_selector), [dict(t) for t in wl.tolerations]


def _hold(p: Planner, spec: TrainingJobSpec, reason: Reason, message: str) -> None:
    """Suspended while Kueue has not admitted the job: no workers, the status and checkpoint kept."""
    st = p.status
    if st.phase is not Phase.suspended or st.message != message:
        p.event(EventType.normal if reason is Reason.queued else EventType.warning, reason, message)
    st.phase, st.message = Phase.suspended, message
    p.condition(ConditionType.suspended, True, reason, message)
    p.condition(ConditionType.running, False, reason, message)
    p.delete_pods(p.observed.pods, reason.value)
    st.workers = WorkersStatus(desired=spec.replicas, ready=0)


def _priority(p: Planner) -> tuple[str, int] | None:
    name = ((p.body.get("metadata") or {}).get("labels") or {}).get(PRIORITY_LABEL)
    value = p.observed.workload_priorities.get(name) if name else None
    return (name, value) if name and value is not None else None


def _condition(p: Planner, kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message[:32768],
            "lastTransitionTime": rfc3339(p.now)}


def _merge(wl: ObservedWorkload, *new: dict[str, Any]) -> list[dict[str, Any]]:
    """The Workload's conditions with ``new`` replacing those of their types (a merge patch replaces the list);
    a condition whose status does not change keeps its lastTransitionTime."""
    out = [dict(c) for c in wl.conditions]
    for cond in new:
        old = next((c for c in out if c.get("type") == cond["type"]), None)
        if old is None:
            out.append(cond)
        else:
            keep = old.get("lastTransitionTime") if old.get("status") == cond["status"] else cond["lastTransitionTime"]
            old.update({**cond, "lastTransitionTime": keep})
    return out


def _cleared(p: Planner, wl: ObservedWorkload) -> dict[str, Any]:
    """What Kueue's job integrations write once an evicted job's workers are gone: no admission, QuotaReserved and
    Admitted False, Requeued True after a preemption or node failures."""
    why = wl.evicted or "evicted"
    return {"admission": None, "conditions": _merge(
        wl,
        _condition(p, "QuotaReserved", "False", "Pending", why),
        _condition(p, "Admitted", "False", "NoReservation", "The workload has no reservation"),
        _condition(p, "Requeued", "True" if wl.evicted_reason in _REQUEUED_BY else "False",
                   wl.evicted_reason or "Evicted", why),
    )}
