"""The job's children while it runs: the shared ones (Service, Secret, NetworkPolicy, ConfigMap), stale
workers cleared, missing workers created, and the phase the workers add up to."""

from __future__ import annotations

from collections.abc import Sequence

from ..render import config_json, render_configmap, render_network_policy, render_pod, render_service
from ..spec import Phase, TrainingJobSpec, WorkersStatus
from .actions import (
    CreateConfigMap, CreateMembershipSecret, CreateNetworkPolicy, CreatePod, CreateService, UngatePods, UpdateConfigMap
)
from .context import Planner, requeue
from .membership import live_capable, pod_names, render_joiner
from .observe import ObservedPod, parse_time, rfc3339
from .queue import placement_of
from .vocabulary import ConditionType, EventType, Reason


def ensure_children(p: Planner, spec: TrainingJobSpec) -> None:
    """The job's shared children: its Service, membership Secret, NetworkPolicy (when the operator makes them) and
    trainer-config ConfigMap, created when missing; the ConfigMap replaced when the spec changed it."""
    observed = p.observed
    if not observed.service_exists:
        p.actions.append(CreateService(render_service(p.ref)))
    if observed.membership_token is None:
        p.actions.append(CreateMembershipSecret())
    if p.network_policy_peers is not None and not observed.network_policy_exists:
        p.actions.append(CreateNetworkPolicy(render_network_policy(p.ref, p.network_policy_peers)))
    if observed.configmap_data is None:
        p.actions.append(CreateConfigMap(render_configmap(p.ref, spec)))
    elif observed.configmap_data != config_json(p.ref, spec):
        p.actions.append(UpdateConfigMap(render_configmap(p.ref, spec)))
        p.event(EventType.normal, Reason.config_updated, "Trainer config changed; workers pick it up on their next restart")


def wait_for_stale(p: Planner, spec: TrainingJobSpec, stale: Sequence[ObservedPod], size: int) -> bool:
    """Workers of an old epoch, or ranks beyond the size, are deleted; they must be gone before new ones start
    (True: wait), except in a live job, which runs on while the pods it left behind terminate."""
    if not stale:
        return False
    st = p.status
    p.delete_pods(stale, f"{Reason.stale_epoch.value}: epoch is {st.membership_epoch}")
    if live_capable(p, spec):
        return False
    st.phase = st.phase or Phase.pending
    st.message = f"Waiting for {len(stale)} old workers to terminate before starting epoch {st.membership_epoch}"
    st.workers = WorkersStatus(desired=size, ready=0)
    return True


def create_missing(p: Planner, spec: TrainingJobSpec, current: Sequence[ObservedPod], size: int) -> list[int] | None:
    """Create this epoch's missing workers (joiners of the running membership in a live job, else resuming
    from the last checkpoint); returns their ranks, or None while a pod of someone else holds a name."""
    st, epoch = p.status, p.status.membership_epoch
    by_rank = {pod.rank: pod for pod in current}
    missing = [r for r in range(size) if r not in by_rank]
    names = pod_names(p, missing)
    blocked = [r for r in missing if names[r] in p.observed.foreign_pods]
    if blocked:
        st.phase = st.phase or Phase.pending
        st.message = (f"Waiting for pod {names[blocked[0]]}, which is not owned by this TrainingJob, "
                      "to be deleted before creating workers")
        st.workers = WorkersStatus(desired=size, ready=0)
        return None
    resume = st.last_checkpoint.path if st.last_checkpoint else ""
    init_from = st.initialized_from.path if st.initialized_from and not resume else ""
    joining = live_capable(p, spec) and 0 in by_rank  # the membership runs: a new pod joins it
    # a new epoch of a fixed-size job starts all or nothing; an elastic job starts with what fits
    gated = spec.run_policy.scheduling_policy.gang and spec.elastic is None and not joining
    for rank in missing:
        if joining:
            body = render_joiner(p, spec, rank, size, names[rank], by_rank[0].name)
        else:
            body = render_pod(p.ref, spec, rank, epoch, restarts=st.restarts + st.ignored_failures, resume_from=resume,
                              avoid_nodes=st.avoid_nodes, num_replicas=size, name=names[rank], gated=gated,
                              init_from=init_from)
        _admitted_placement(p, body)
        p.actions.append(CreatePod(names[rank], rank, epoch, body))
    if missing or current:
        st.start_time = st.start_time or rfc3339(p.now)  # workers exist (or are about to) from now on
    if missing:
        message = f"Created {len(missing)} worker pods for epoch {epoch}" + (
            f", resuming from step {st.last_checkpoint.step}" if st.last_checkpoint
            else f", starting from {st.initialized_from.job_name}'s step {st.initialized_from.step}" if init_from else "")
        p.condition(ConditionType.created, True, Reason.workers_created, f"Workers created for epoch {epoch}")
        p.event(EventType.normal, Reason.workers_created, message)
    return missing


def phase_from_workers(p: Planner, current: Sequence[ObservedPod], missing: Sequence[int], size: int) -> None:
    """Running once every worker of the epoch runs (or finished); Pending while some are missing; the ready
    count: workers answering /status in this epoch (a survivor of a live resize once it has regrouped)."""
    st, epoch, reports = p.status, p.status.membership_epoch, p.observed.reports
    running = [pod for pod in current if pod.phase == "Running" and not pod.deleting]
    ready = sum(1 for pod in running if pod.name in reports and reports[pod.name].epoch == epoch)
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


def _admitted_placement(p: Planner, body: dict) -> None:
    """A Kueue-admitted job's workers go where the admitted flavors are (their node labels and tolerations)."""
    selector, tolerations = placement_of(p.observed.workload)
    if selector:
        body["spec"]["nodeSelector"] = {**body["spec"].get("nodeSelector", {}), **selector}
    if tolerations:
        body["spec"]["tolerations"] = [*body["spec"].get("tolerations", []), *tolerations]


def release_gang(p: Planner, spec: TrainingJobSpec, current: Sequence[ObservedPod], missing: Sequence[int]) -> None:
    """Gang start: once every worker of the epoch exists, remove their scheduling gates together, if the cluster has
    room for all of them (``observed.gang_shortage`` is None); until then none is bound. Past
    ``scheduleTimeoutSeconds`` the ``GangScheduled`` condition turns False naming the resource that is short."""
    gated = sorted((pod for pod in current if pod.gated and pod.live), key=lambda pod: pod.rank)
    if not gated or missing:
        return
    st, epoch, shortage = p.status, p.status.membership_epoch, p.observed.gang_shortage
    if shortage is None:
        p.actions.append(UngatePods(tuple(pod.name for pod in gated)))
        message = f"Released {len(gated)} workers of epoch {epoch} to the scheduler together"
        p.condition(ConditionType.gang_scheduled, True, Reason.gang_released, message)
        p.event(EventType.normal, Reason.gang_released, message)
        return
    created = [t for t in (parse_time(pod.created) for pod in gated) if t is not None]
    waited = (p.now - min(created)).total_seconds() if created else 0.0
    timeout = spec.run_policy.scheduling_policy.schedule_timeout_seconds
    st.message = f"Waiting for room for all {len(gated)} workers of epoch {epoch} (gang start): {shortage}"
    if waited < timeout:
        requeue(p, min(5.0, timeout - waited))
        return
    message = f"{len(gated)} workers of epoch {epoch} have waited {waited:.0f}s for room (gang start): {shortage}"
    was_false = any(c.type == ConditionType.gang_scheduled.value and c.status == "False" for c in st.conditions)
    p.condition(ConditionType.gang_scheduled, False, Reason.insufficient_capacity, message, record_false=True)
    if not was_false:
        p.event(EventType.warning, Reason.insufficient_capacity, message)
    requeue(p, 5.0)
