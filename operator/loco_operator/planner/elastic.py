"""Resizing: to a changed ``spec.replicas``, and for an elastic job (``spec.elastic``) down when workers cannot
be placed and back up when the cluster has room; live (see :mod:`.membership`) when the job can, else by a
coordinated restart from the last checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from ..spec import Phase, TrainingJobSpec, TrainingJobStatus, WorkersStatus
from .context import Planner, requeue
from .lifecycle import restart
from .membership import live_grow, live_shrink, min_replicas, switching
from .observe import ObservedPod, parse_time
from .vocabulary import ConditionType, EventType, Reason


def epoch_size(spec: TrainingJobSpec, st: TrainingJobStatus) -> int:
    """The current epoch's worker count: ``spec.replicas``, except while an elastic job is shrunk
    (``status.workers.desired`` below it, never below minReplicas). A change of ``spec.replicas``
    by the user (``status.targetReplicas`` differs) always moves the job to the new value."""
    if spec.elastic is None or st.workers is None or not st.workers.desired:
        return spec.replicas
    target_before = st.target_replicas if st.target_replicas is not None else st.workers.desired
    if target_before != spec.replicas:
        return spec.replicas
    return max(min(st.workers.desired, spec.replicas), min_replicas(spec))

def elastic_shrink(p: Planner, spec: TrainingJobSpec, current: Sequence[ObservedPod], size: int) -> bool:
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
            requeue(p, (due - p.now).total_seconds())
    if not stuck:
        return False
    first = min(stuck, key=lambda pod: pod.rank)
    why = _unplaceable_cause(st, first)
    lo = min_replicas(spec)
    if live_shrink(p, spec, current, stuck, size, why):
        return True
    new = max(size - len(stuck), lo)
    if new < size:
        restart(p, spec, [], resize_from=size, size=new, cause=why)
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
    requeue(p, 5.0)
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

def elastic_grow(p: Planner, spec: TrainingJobSpec, size: int, current: Sequence[ObservedPod] = ()) -> bool:
    """A shrunk elastic job grows back towards ``spec.replicas`` once the cluster can place more
    workers (``observed.free_slots``) and ``scaleUpDelaySeconds`` passed since the last resize:
    live (joiners) when it can, else by a coordinated restart."""
    assert spec.elastic is not None
    st = p.status
    requeue(p, 5.0)  # keep looking at the cluster's capacity while shrunk
    slots = p.observed.free_slots or 0
    if slots <= 0:
        return False
    last = parse_time(st.last_resize_time)
    due = last + timedelta(seconds=spec.elastic.scale_up_delay_seconds) if last else p.now
    if p.now < due:
        requeue(p, (due - p.now).total_seconds())
        return False
    new = min(spec.replicas, size + slots)
    if not live_grow(p, spec, current, size, new, "capacity"):
        restart(p, spec, [], resize_from=size, size=new, cause="capacity")
    return True


def resize_to_spec(p: Planner, spec: TrainingJobSpec, current: Sequence[ObservedPod], desired_before: int, size: int) -> bool:
    """``spec.replicas`` changed under live workers: resize live when the job can (a shrink keeps the lowest
    ranks), else by a coordinated restart. True when it acted."""
    if not desired_before or desired_before == size or not any(pod.live for pod in current):
        return False
    members = [pod for pod in p.observed.pods if pod.epoch == p.status.membership_epoch]
    if size < desired_before:
        live = live_shrink(p, spec, members, [], desired_before, "spec.replicas changed", keep_below=size)
    else:
        live = live_grow(p, spec, members, desired_before, size, "spec.replicas changed")
    if not live:
        restart(p, spec, [], resize_from=desired_before, size=size)
    return True


def grow_back(p: Planner, spec: TrainingJobSpec, current: Sequence[ObservedPod], size: int) -> bool:
    """A shrunk elastic job grows when the cluster can place more workers: never during a live switch, and never
    once a worker finished the run (its pod frees room that growing would only fill with a restart at the last
    step, again and again). True when it acted."""
    return (spec.elastic is not None and size < spec.replicas and p.status.phase is Phase.running
            and not switching(p, spec, current) and not any(pod.phase == "Succeeded" for pod in current)
            and elastic_grow(p, spec, size, current))
