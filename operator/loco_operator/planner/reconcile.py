"""The planner's entry points: :func:`plan` (one reconcile of one job), :func:`plan_pod_refused` (the API
refused a worker for good), and the order in which a live job's decisions are taken (:func:`reconcile`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from ..spec import CleanPodPolicy, Phase, TrainingJobSpec, WorkersStatus
from ..validation import validate_job
from .actions import Plan
from .context import Planner
from .elastic import elastic_shrink, epoch_size, grow_back, resize_to_spec
from .faults import act_on_findings, expire_avoided_nodes
from .init_from import hold_for_init_source
from .lifecycle import act_on_failures, deadline_passed, finished, invalid, resume, succeed, suspend
from .membership import membership_updates, switching
from .observe import Observed, ObservedPod, lost_with_their_nodes
from .progress import fold_progress, summarise
from .vocabulary import NODE_LOST_GRACE_S, TERMINAL, Reason
from .queue import finish_workload, hold_until_admitted
from .workers import create_missing, ensure_children, phase_from_workers, release_gang, wait_for_stale


def plan(job: Mapping[str, Any], observed: Observed, now: datetime, *,
         node_lost_grace_s: float = NODE_LOST_GRACE_S, cordon_nodes: bool = False,
         network_policy_peers: Sequence[Mapping[str, Any]] | None = None) -> Plan:
    """Decide what to do for one TrainingJob. Pure: same inputs, same plan.

    ``job`` is the TrainingJob body (camelCase dict with metadata, spec, status); ``observed`` the
    job's children and progress reports; ``now`` an aware datetime; ``node_lost_grace_s`` how long a
    pod's node may be not Ready before the pod counts as lost (:func:`lost_with_their_nodes`);
    ``cordon_nodes`` whether the cluster operator lets a job's ``faultDetection.cordonNodes`` cordon a
    blamed node (``--cordon-nodes``; off, the request is answered with a ``CordonNotEnabled`` Warning);
    ``network_policy_peers``: who besides the job's own pods may reach its workers (``--network-policy``;
    None: no NetworkPolicy is made).
    Returns the ordered actions and the complete new status (write the status if it changed, then
    apply the actions).
    """
    observed, force_deletions = lost_with_their_nodes(observed, now, node_lost_grace_s)
    p = Planner(job, observed, now, cordon_nodes=cordon_nodes, network_policy_peers=network_policy_peers)
    p.actions += force_deletions
    st = p.status
    meta = job.get("metadata") or {}
    st.observed_generation = meta.get("generation", st.observed_generation)
    st.selector = p.ref.selector
    errors = validate_job(job)
    spec = None if errors else TrainingJobSpec.model_validate(job.get("spec") or {})

    if spec is None and st.phase not in TERMINAL:
        invalid(p, errors)
    elif st.phase in TERMINAL:
        finished(p, spec)
    else:
        assert spec is not None
        reconcile(p, spec)
    finish_workload(p)
    desired = spec.replicas if spec else 0
    if st.workers is None:
        st.workers = WorkersStatus(desired=desired, ready=0)
    summarise(p, spec)
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
    p = Planner({**job, "status": dict(status)}, Observed(), now)
    try:
        policy = TrainingJobSpec.model_validate(job.get("spec") or {}).run_policy.clean_pod_policy
    except ValidationError:
        policy = CleanPodPolicy.all
    p.fail(Reason.pod_refused, f"{by} refused worker pod {pod}: {message}", policy)
    summarise(p, None)
    return Plan(actions=tuple(p.actions), status=p.status.to_wire())


def reconcile(p: Planner, spec: TrainingJobSpec) -> None:
    """A live job's decisions, in order. The first that acts ends the reconcile: a later one would decide on a
    world the earlier one is changing (the next reconcile sees the result)."""
    st = p.status
    st.algorithm = spec.algorithm.name.value
    size, desired_before = _size_of_this_epoch(p, spec)
    current, stale = _this_epoch(p, size)
    fold_progress(p, spec, current)
    expire_avoided_nodes(p, spec)
    if spec.run_policy.suspend:
        suspend(p, spec)
        return
    if hold_until_admitted(p, spec):
        return
    st.checkpoint_before_stop = None  # unsuspended (or the eviction withdrawn) while the workers were saving
    if st.phase is Phase.suspended:
        resume(p)
        current, stale = [], list(p.observed.pods)
    if deadline_passed(p, spec.run_policy):
        return
    if hold_for_init_source(p, spec):
        return
    ensure_children(p, spec)
    if (resize_to_spec(p, spec, current, desired_before, size)
            or act_on_failures(p, spec, current, stale, size)
            or (spec.elastic is not None and elastic_shrink(p, spec, current, size))
            or act_on_findings(p, spec, current, size)
            or grow_back(p, spec, current, size)
            or succeed(p, spec, current, size)
            or wait_for_stale(p, spec, stale, size)):
        return
    missing = create_missing(p, spec, current, size)
    if missing is not None:
        release_gang(p, spec, current, missing)
        phase_from_workers(p, current, missing, size)
        membership_updates(p, spec, current, size)  # the survivors of a live resize learn their place


def _size_of_this_epoch(p: Planner, spec: TrainingJobSpec) -> tuple[int, int]:
    """(this epoch's worker count, the count the status last asked for). ``spec.replicas`` changed during a live
    switch waits for the switch: the count stays, and the target is not moved yet."""
    st = p.status
    size = epoch_size(spec, st)  # below spec.replicas while an elastic job is shrunk
    desired_before = st.workers.desired if st.workers else 0
    if (desired_before and size != desired_before and st.phase is Phase.running and switching(
            p, spec, [pod for pod in p.observed.pods if pod.epoch == st.membership_epoch and pod.rank < desired_before])):
        return desired_before, desired_before
    st.target_replicas = spec.replicas
    return size, desired_before


def _this_epoch(p: Planner, size: int) -> tuple[list[ObservedPod], list[ObservedPod]]:
    """(the workers of this epoch within its size, every other pod of the job)."""
    epoch = p.status.membership_epoch
    current = [pod for pod in p.observed.pods if pod.epoch == epoch and pod.rank < size]
    return current, [pod for pod in p.observed.pods if pod not in current]
