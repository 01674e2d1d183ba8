"""Live membership: a live-capable job (``spec.live_membership``) resizes without restarting its survivors.
The operator starts epoch E+1, patches the survivors' rank/epoch labels (pods keep their names for life),
deletes the leaving pods or creates joiners, and once every pod of E+1 answers /status it POSTs each
survivor its place in E+1 (:func:`membership_updates`) until the survivor reports E+1."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loco_contract.protocol import MembershipUpdate, epoch_master_port

from ..render import LABEL_EPOCH, LABEL_RANK, MASTER_PORT, render_pod
from ..spec import Phase, TrainingJobSpec, WorkersStatus
from .actions import CreatePod, PatchPodLabels, PostMembership
from .context import Planner, requeue
from .observe import ObservedPod
from .vocabulary import ConditionType, EventType, Reason


def live_capable(p: Planner, spec: TrainingJobSpec) -> bool:
    """Whether a resize now may keep the survivors running: the job is live-capable and Running."""
    return spec.live_membership and p.status.phase is Phase.running

def _count(n: int, noun: str = "worker") -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"

def min_replicas(spec: TrainingJobSpec) -> int:
    el = spec.elastic
    return spec.replicas if el is None or el.min_replicas is None else min(el.min_replicas, spec.replicas)

def _begin_live_epoch(p: Planner, before: int, after: int, message: str) -> int:
    """Count a live resize (``status.resizes``, not restarts) and start its epoch; phase stays Running."""
    st = p.status
    st.membership_epoch += 1
    p.resized(before, after, message)
    st.message = message
    p.condition(ConditionType.running, True, Reason.resizing, message)
    p.event(EventType.normal, Reason.resizing, message)
    requeue(p, 2.0)
    return st.membership_epoch

def live_shrink(
    p: Planner, spec: TrainingJobSpec, members: Sequence[ObservedPod], leaving: Sequence[ObservedPod],
    resize_from: int, cause: str, failures: Sequence[str] = (), keep_below: int | None = None,
) -> bool:
    """Shrink without restarting: the survivors (``members`` that are Running, not ``leaving`` and of
    rank below ``keep_below``) keep their relative order as ranks 0..k-1 of a new epoch; every other
    member is deleted. False (nothing done) when the job cannot resize live or fewer than
    max(1, minReplicas) would survive: the caller then restarts or waits as for any job."""
    if not live_capable(p, spec):
        return False
    gone = {pod.name for pod in leaving if pod in members}  # never a name made up for a vanished rank
    survivors = sorted((pod for pod in members if pod.live and pod.phase == "Running" and pod.name not in gone
                        and (keep_below is None or pod.rank < keep_below)), key=lambda x: (x.rank, x.name))
    size = len(survivors)
    if size < max(1, min_replicas(spec)) or size >= resize_from:  # too few left, or nobody leaves
        return False
    for message in failures:
        p.event(EventType.warning, Reason.worker_failed, message)
    epoch = p.status.membership_epoch + 1
    _begin_live_epoch(p, resize_from, size, f"Resized {resize_from}→{size} ({cause}); {_count(size)} "
                         f"{'continues' if size == 1 else 'continue'} without restarting (epoch {epoch})")
    keep = {pod.name for pod in survivors}
    p.delete_pods([pod for pod in members if pod.name not in keep], f"{Reason.resizing.value}: epoch {epoch}")
    for rank, pod in enumerate(survivors):
        p.actions.append(PatchPodLabels(pod.name, {LABEL_RANK: str(rank), LABEL_EPOCH: str(epoch)}))
    p.status.workers = WorkersStatus(desired=size, ready=0)  # ready again once they report the new epoch
    return True

def live_grow(p: Planner, spec: TrainingJobSpec, members: Sequence[ObservedPod], resize_from: int, size: int,
               cause: str) -> bool:
    """Grow without restarting: the members keep ranks 0..n-1 in a new epoch and ``size - n`` joiners
    (``LOCO_JOIN=1``) are created under free names. Only when every member is Running and reporting
    (a joiner takes the state from rank 0); False (nothing done) otherwise."""
    ordered = sorted(members, key=lambda x: x.rank)
    if (not live_capable(p, spec) or not ordered or size <= len(ordered) or [x.rank for x in ordered] != list(range(len(ordered)))
            or not all(x.live and x.phase == "Running" and x.name in p.observed.reports for x in ordered)):
        return False
    n = len(ordered)
    epoch = p.status.membership_epoch + 1
    _begin_live_epoch(p, resize_from, size, f"Resized {resize_from}→{size} ({cause}); {_count(size - n)} {'joins' if size - n == 1 else 'join'} "
                         f"at the next outer step, {n} {'continues' if n == 1 else 'continue'} without restarting (epoch {epoch})")
    for pod in ordered:
        p.actions.append(PatchPodLabels(pod.name, {LABEL_RANK: str(pod.rank), LABEL_EPOCH: str(epoch)}))
    for rank, name in zip(range(n, size), _free_names(p, size - n)):
        p.actions.append(CreatePod(name, rank, epoch, render_joiner(p, spec, rank, size, name, ordered[0].name)))
    p.status.workers = WorkersStatus(desired=size, ready=n)
    return True

def switching(p: Planner, spec: TrainingJobSpec, current: Sequence[ObservedPod]) -> bool:
    """A live membership change is still under way: some Running worker of this epoch still reports
    an older one (it has not regrouped yet). Planned changes (grow, scale) wait for it, one at a time:
    a second change now could remove a joiner the survivors are already waiting for at the rendezvous.
    Failures are still acted on at once."""
    if not live_capable(p, spec):
        return False
    reports, epoch = p.observed.reports, p.status.membership_epoch
    behind = any(pod.live and pod.phase == "Running" and pod.name in reports and reports[pod.name].epoch < epoch
                 for pod in current)
    if behind:
        requeue(p, 2.0)
    return behind

def _free_names(p: Planner, count: int, taken: Sequence[str] = ()) -> list[str]:
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

def render_joiner(p: Planner, spec: TrainingJobSpec, rank: int, size: int, name: str, rank0: str) -> dict[str, Any]:
    """A pod joining the running membership of this epoch as ``rank`` of ``size``: it takes the state
    from rank 0 (the pod named ``rank0``), not from a checkpoint, at the epoch's rendezvous port."""
    st = p.status
    return render_pod(p.ref, spec, rank, st.membership_epoch, restarts=st.restarts + st.ignored_failures, resume_from="",
                      avoid_nodes=st.avoid_nodes, num_replicas=size, name=name, join=True,
                      master_addr=p.ref.pod_dns_by_name(rank0), master_port=epoch_master_port(MASTER_PORT, st.membership_epoch))

def membership_updates(p: Planner, spec: TrainingJobSpec, current: Sequence[ObservedPod], size: int) -> None:
    """Level-triggered: every Running worker of this epoch whose report still names an older epoch
    gets its place in this one (:class:`PostMembership`), once every worker of the epoch reports
    (joiners included: the survivors would otherwise wait for them at the rendezvous)."""
    if not live_capable(p, spec):
        return
    st, reports = p.status, p.observed.reports
    epoch = st.membership_epoch
    behind = [pod for pod in sorted(current, key=lambda x: x.rank)
              if pod.live and pod.phase == "Running" and pod.name in reports and reports[pod.name].epoch < epoch]
    if not behind:
        return
    requeue(p, 2.0)
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

def pod_names(p: Planner, ranks: Sequence[int]) -> dict[int, str]:
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
