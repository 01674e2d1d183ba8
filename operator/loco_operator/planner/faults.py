"""Decisions about what the fault detector found: events and ``status.faults`` records, blamed nodes avoided
(and cordoned where the job asks and the cluster operator allows), the blamed workers dropped live or the job
restarted; avoided nodes forgiven after ``faultDetection.avoidNodeSeconds``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from loco_detector.live import FaultFinding, blamed_nodes

from ..spec import FailureRecord, FaultRecord, Phase, TrainingJobSpec, WorkersStatus
from .actions import CordonNode
from .context import Planner, requeue
from .lifecycle import restart
from .membership import live_shrink
from .observe import ObservedPod, parse_time, rfc3339
from .vocabulary import MAX_FAULT_RECORDS, EventType, Reason


def act_on_findings(p: Planner, spec: TrainingJobSpec, current: Sequence[ObservedPod], size: int) -> bool:
    """The live detector's verdicts of this epoch (only while Running): a straggler too mild to be worth a
    restart gets a ``FaultSuspected`` event and nothing else; the rest are acted on (:func:`act_on_faults`).
    True when it acted."""
    st = p.status
    findings = [f for f in p.observed.findings if f.epoch == st.membership_epoch] if st.phase is Phase.running else []
    for f in findings:
        if not f.actionable:
            p.event(EventType.warning, Reason.fault_suspected,
                    f"{f.kind}: {f.verdict.message}; it costs {f.slowdown:.0%} of the collective interval, below "
                    f"faultDetection.minSlowdownToAct ({f.min_slowdown:.0%}): not acted on")
    findings = [f for f in findings if f.actionable]
    if not findings:
        return False
    act_on_faults(p, spec, findings, current, size)
    return True


def act_on_faults(p: Planner, spec: TrainingJobSpec, findings: Sequence[FaultFinding],
                   current: Sequence[ObservedPod] = (), size: int | None = None) -> None:
    """Turn detector verdicts into actions: a ``FaultDetected`` Warning event and a
    ``status.faults`` entry per verdict, the blamed nodes onto ``status.avoidNodes`` (the new pods
    get a required node anti-affinity against them), a cordon when both the job asks for it and the
    operator allows it (:func:`_cordon`), and a restart of the job
    in a new epoch from the last committed checkpoint (which deletes the faulty pods). The restart
    counts against ``runPolicy.backoffLimit`` like any other. A live-capable job instead drops the
    blamed pods and continues with the others (:func:`live_shrink`, not a restart) when enough remain."""
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
    if live_shrink(p, spec, current, blamed_here, len(current) if size is None else size, "; ".join(causes)):
        return
    if st.restarts + 1 > spec.run_policy.backoff_limit:
        p.fail(Reason.backoff_limit_exceeded,
               f"{causes[0]}; backoffLimit ({spec.run_policy.backoff_limit}) reached after {st.restarts} restarts",
               spec.run_policy.clean_pod_policy)
        st.workers = WorkersStatus(desired=spec.replicas, ready=0)
        return
    restart(p, spec, [], cause="; ".join(causes))

def _cordon(p: Planner, node: str, kind: str, message: str) -> None:
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

def expire_avoided_nodes(p: Planner, spec: TrainingJobSpec) -> None:
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
        requeue(p, min((last_blamed[n] + timedelta(seconds=ttl) - p.now).total_seconds() for n in st.avoid_nodes))

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
