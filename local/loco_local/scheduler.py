"""The embedded cluster's scheduler: a pure placement function and a loop that binds pods.

:func:`schedule` decides where one pod goes from plain dicts (the pod, the nodes, the pods
already bound) with no I/O, so every rule is unit-testable. It applies the filters of the real
``default-scheduler`` that matter here, in this order per node:

1. ``spec.unschedulable`` (cordon) -> "node(s) were unschedulable";
2. the node's ``Ready`` condition is not ``True`` -> "node(s) were not ready";
3. ``spec.nodeSelector`` and required ``nodeAffinity`` (matchExpressions ``In``/``NotIn``/
   ``Exists``/``DoesNotExist``/``Gt``/``Lt``; matchFields ``metadata.name``)
   -> "node(s) didn't match Pod's node affinity/selector";
4. ``NoSchedule``/``NoExecute`` taints not tolerated -> "node(s) had untolerated taint {k: v}";
5. resources: requests of every container (limits stand in for missing requests, init containers
   count as the max of each) plus ``pods`` must fit in allocatable minus what bound, unfinished
   pods request -> "Insufficient cpu" / "Insufficient memory" / "Insufficient nvidia.com/gpu" /
   "Too many pods";
6. required pod affinity (the first pod of a self-affine group may go anywhere with the labels)
   -> "node(s) didn't match pod affinity rules";
7. ``DoNotSchedule`` topology spread constraints -> "node(s) didn't match pod topology spread constraints".

Feasible nodes are ranked first by placement preference (preferred pod-affinity weights met, fewer
matching pods in the domain of a ``ScheduleAnyway`` spread constraint), then by least-allocated (mean free share of cpu and memory, and GPUs when
requested, after placing the pod), ties broken by fewer pods then by name, so pods spread and
placement is deterministic. When nothing fits, the explanation reads like the real one:
``0/3 nodes are available: 3 Insufficient nvidia.com/gpu.``

:class:`Scheduler` binds pending pods (``schedulerName`` unset or ``default-scheduler``) through
``pods/NAME/binding`` (falling back to patching ``spec.nodeName``), sets ``PodScheduled=False``
(reason ``Unschedulable``) and records a ``FailedScheduling`` event when nothing fits, and retries
whenever pods or nodes change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from loco_local.apiclient import ApiClient, ApiError, Controller, Informer, Obj, now_rfc3339, wait_any

log = logging.getLogger(__name__)

SCHEDULER_NAME = "default-scheduler"
GPU = "nvidia.com/gpu"
#: resources the scheduler accounts for (besides the pod count)
RESOURCES = ("cpu", "memory", GPU)
DEFAULT_MAX_PODS = 110
TERMINAL_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Placement:
    """The outcome of :func:`schedule`: ``node`` when the pod fits somewhere, else ``message``
    explains why (and ``reasons`` maps each reason to the number of nodes it excluded)."""

    node: str | None
    message: str = ""
    reasons: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------- resources


def quantity(value: Any) -> Decimal:
    """A Kubernetes quantity (``"500m"``, ``"1Gi"``, ``2``) as a Decimal; raises ValueError when malformed."""
    return parse_quantity(value)


def container_requests(container: Obj) -> dict[str, Decimal]:
    """Requests of one container; a limit stands in for a missing request (as in Kubernetes)."""
    resources = container.get("resources") or {}
    requests = dict(resources.get("limits") or {})
    requests.update(resources.get("requests") or {})
    return {name: quantity(value) for name, value in requests.items()}


def pod_requests(pod: Obj) -> dict[str, Decimal]:
    """Effective requests of a pod: sum over containers, at least the max over init containers."""
    spec = pod.get("spec") or {}
    total: dict[str, Decimal] = {}
    for container in spec.get("containers") or []:
        for name, value in container_requests(container).items():
            total[name] = total.get(name, Decimal(0)) + value
    for container in spec.get("initContainers") or []:
        for name, value in container_requests(container).items():
            total[name] = max(total.get(name, Decimal(0)), value)
    return total


def _allocatable(node: Obj) -> dict[str, Decimal]:
    status = node.get("status") or {}
    raw = status.get("allocatable") or status.get("capacity") or {}
    return {name: quantity(value) for name, value in raw.items()}


def _is_active(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") not in TERMINAL_PHASES


# ------------------------------------------------------------------------------------- filters


def node_is_ready(node: Obj) -> bool:
    """True when the node's ``Ready`` condition is ``True``."""
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _match_expression(expr: Obj, value: str | None) -> bool:
    op = expr.get("operator")
    values = expr.get("values") or []
    if op == "In":
        return value is not None and value in values
    if op == "NotIn":
        return value is None or value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt"):
        try:
            left, right = int(value or ""), int(values[0])
        except (ValueError, IndexError):
            return False
        return left > right if op == "Gt" else left < right
    raise ValueError(f"nodeAffinity operator {op!r} is not one of In, NotIn, Exists, DoesNotExist, Gt, Lt")


def _term_matches(term: Obj, node: Obj) -> bool:
    labels = (node.get("metadata") or {}).get("labels") or {}
    exprs = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not exprs and not fields:
        return False  # an empty term matches no node (Kubernetes semantics)
    if not all(_match_expression(e, labels.get(e.get("key"))) for e in exprs):
        return False
    for f in fields:
        if f.get("key") != "metadata.name":
            return False
        if not _match_expression(f, node["metadata"]["name"]):
            return False
    return True


def matches_node_selector(pod: Obj, node: Obj) -> bool:
    """``spec.nodeSelector`` (all labels equal) and required node affinity (any term matches)."""
    spec = pod.get("spec") or {}
    labels = (node.get("metadata") or {}).get("labels") or {}
    for key, value in (spec.get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return False
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required:
        terms = required.get("nodeSelectorTerms") or []
        if not any(_term_matches(term, node) for term in terms):
            return False
    return True


def tolerates(toleration: Obj, taint: Obj) -> bool:
    """Whether one toleration matches one taint (key/operator/value/effect rules of Kubernetes)."""
    effect = toleration.get("effect")
    if effect and effect != taint.get("effect"):
        return False
    key = toleration.get("key")
    op = toleration.get("operator") or "Equal"
    if not key:
        return op == "Exists"  # empty key + Exists tolerates everything
    if key != taint.get("key"):
        return False
    if op == "Exists":
        return True
    return (toleration.get("value") or "") == (taint.get("value") or "")


def untolerated_taint(pod: Obj, node: Obj) -> Obj | None:
    """The first NoSchedule/NoExecute taint of ``node`` that ``pod`` does not tolerate, or None."""
    tolerations = (pod.get("spec") or {}).get("tolerations") or []
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if not any(tolerates(t, taint) for t in tolerations):
            return taint
    return None


def _used_by_bound_pods(node_name: str, bound_pods: list[Obj]) -> tuple[dict[str, Decimal], int]:
    used: dict[str, Decimal] = {}
    count = 0
    for pod in bound_pods:
        if (pod.get("spec") or {}).get("nodeName") != node_name or not _is_active(pod):
            continue
        count += 1
        for name, value in pod_requests(pod).items():
            used[name] = used.get(name, Decimal(0)) + value
    return used, count


def filter_node(pod: Obj, node: Obj, bound_pods: list[Obj]) -> list[str]:
    """Why ``pod`` cannot go to ``node`` (empty list: it can)."""
    if (node.get("spec") or {}).get("unschedulable"):
        return ["node(s) were unschedulable"]
    if not node_is_ready(node):
        return ["node(s) were not ready"]
    if not matches_node_selector(pod, node):
        return ["node(s) didn't match Pod's node affinity/selector"]
    taint = untolerated_taint(pod, node)
    if taint is not None:
        return [f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value') or ''}}}"]
    allocatable = _allocatable(node)
    used, count = _used_by_bound_pods(node["metadata"]["name"], bound_pods)
    reasons = []
    max_pods = allocatable.get("pods", Decimal(DEFAULT_MAX_PODS))
    if count + 1 > max_pods:
        reasons.append("Too many pods")
    for name, want in sorted(pod_requests(pod).items()):
        if want <= 0:
            continue
        free = allocatable.get(name, Decimal(0)) - used.get(name, Decimal(0))
        if want > free:
            reasons.append(f"Insufficient {name}")
    return reasons


# ------------------------------------------------------------------------ pods relative to pods


def _labels(obj: Obj) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def selector_matches(selector: Obj | None, labels: dict[str, str]) -> bool:
    """A label selector (``matchLabels`` and ``matchExpressions``); a missing selector matches nothing, an empty
    one everything (Kubernetes' rules for affinity terms and spread constraints)."""
    if selector is None:
        return False
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    return all(_match_expression(e, labels.get(e.get("key"))) for e in selector.get("matchExpressions") or [])


def _peers(pod: Obj, selector: Obj | None, bound_pods: list[Obj]) -> list[Obj]:
    """Active bound pods of ``pod``'s namespace that ``selector`` matches (a term's namespaces and
    namespaceSelector are not read: a training job's workers share one namespace)."""
    namespace = (pod.get("metadata") or {}).get("namespace")
    return [p for p in bound_pods if _is_active(p) and (p.get("spec") or {}).get("nodeName")
            and (p.get("metadata") or {}).get("namespace") == namespace and selector_matches(selector, _labels(p))]


def _pod_affinity(pod: Obj) -> Obj:
    return ((pod.get("spec") or {}).get("affinity") or {}).get("podAffinity") or {}


def pod_affinity_fits(pod: Obj, node: Obj, nodes: dict[str, Obj], bound_pods: list[Obj]) -> bool:
    """Required pod affinity, as kube-scheduler's InterPodAffinity filter: the node has every term's topology label
    and shares each value with a matching pod; when no pod matches any term and the pod matches all of its own
    terms, it may go first (the first worker of a packed job)."""
    terms = _pod_affinity(pod).get("requiredDuringSchedulingIgnoredDuringExecution") or []
    if not terms:
        return True
    labels = _labels(node)
    if any(term.get("topologyKey") not in labels for term in terms):
        return False
    found_any, all_found = False, True
    for term in terms:
        key = term["topologyKey"]
        peers = _peers(pod, term.get("labelSelector"), bound_pods)
        found_any = found_any or bool(peers)
        all_found = all_found and any(_labels(nodes.get(p["spec"]["nodeName"]) or {}).get(key) == labels[key]
                                      for p in peers)
    if all_found:
        return True
    return not found_any and all(selector_matches(t.get("labelSelector"), _labels(pod)) for t in terms)


def _spread_counts(pod: Obj, constraint: Obj, nodes: dict[str, Obj], bound_pods: list[Obj]) -> dict[str, int]:
    """Matching pods per domain of ``constraint.topologyKey``, over the nodes the pod's node selector and affinity
    allow (nodeAffinityPolicy Honor; taints are ignored: nodeTaintsPolicy Ignore, the defaults)."""
    key = constraint.get("topologyKey")
    eligible = {name: _labels(n)[key] for name, n in nodes.items() if key in _labels(n) and matches_node_selector(pod, n)}
    counts = {domain: 0 for domain in eligible.values()}
    for peer in _peers(pod, constraint.get("labelSelector"), bound_pods):
        domain = eligible.get(peer["spec"]["nodeName"])
        if domain is not None:
            counts[domain] += 1
    return counts


def spread_fits(pod: Obj, node: Obj, nodes: dict[str, Obj], bound_pods: list[Obj]) -> bool:
    """Every ``DoNotSchedule`` topology spread constraint holds with the pod on ``node``: its domain would have at
    most ``maxSkew`` more matching pods than the emptiest eligible domain (kube-scheduler's PodTopologySpread)."""
    for constraint in (pod.get("spec") or {}).get("topologySpreadConstraints") or []:
        if constraint.get("whenUnsatisfiable", "DoNotSchedule") != "DoNotSchedule":
            continue
        domain = _labels(node).get(constraint.get("topologyKey"))
        if domain is None:
            return False
        counts = _spread_counts(pod, constraint, nodes, bound_pods)
        itself = 1 if selector_matches(constraint.get("labelSelector"), _labels(pod)) else 0
        if counts.get(domain, 0) + itself - min(counts.values(), default=0) > int(constraint.get("maxSkew", 1)):
            return False
    return True


def _placement_preference(pod: Obj, node: Obj, nodes: dict[str, Obj], bound_pods: list[Obj]) -> int:
    """Higher is better: the weights of preferred pod-affinity terms the node satisfies, less the matching pods
    already in its domain of each ``ScheduleAnyway`` spread constraint."""
    labels, score = _labels(node), 0
    for weighted in _pod_affinity(pod).get("preferredDuringSchedulingIgnoredDuringExecution") or []:
        term = weighted.get("podAffinityTerm") or {}
        key = term.get("topologyKey")
        if key in labels and any(_labels(nodes.get(p["spec"]["nodeName"]) or {}).get(key) == labels[key]
                                 for p in _peers(pod, term.get("labelSelector"), bound_pods)):
            score += int(weighted.get("weight", 1))
    for constraint in (pod.get("spec") or {}).get("topologySpreadConstraints") or []:
        if constraint.get("whenUnsatisfiable") == "ScheduleAnyway" and constraint.get("topologyKey") in labels:
            score -= _spread_counts(pod, constraint, nodes, bound_pods).get(labels[constraint["topologyKey"]], 0)
    return score


def _score(pod: Obj, node: Obj, bound_pods: list[Obj]) -> tuple[Decimal, int, str]:
    allocatable = _allocatable(node)
    used, count = _used_by_bound_pods(node["metadata"]["name"], bound_pods)
    want = pod_requests(pod)
    names = ["cpu", "memory"] + ([GPU] if want.get(GPU, 0) > 0 else [])
    shares = []
    for name in names:
        cap = allocatable.get(name, Decimal(0))
        if cap <= 0:
            shares.append(Decimal(0))
            continue
        shares.append((cap - used.get(name, Decimal(0)) - want.get(name, Decimal(0))) / cap)
    free_share = sum(shares, Decimal(0)) / len(shares)
    # higher free share first, then fewer pods, then name: sort key ascending
    return (-free_share, count, node["metadata"]["name"])


def schedule(pod: Obj, nodes: list[Obj], bound_pods: list[Obj]) -> Placement:
    """Pick the node for ``pod`` among ``nodes`` given ``bound_pods`` (pods with ``spec.nodeName``;
    finished ones are ignored). Pure: no I/O, no clock.

    Raises ValueError only for a malformed pod (a bad quantity or affinity operator), whose message
    names the field.
    """
    reasons: Counter[str] = Counter()
    feasible = []
    by_name = {n["metadata"]["name"]: n for n in nodes}
    for node in nodes:
        why = filter_node(pod, node, bound_pods)
        if not why and not pod_affinity_fits(pod, node, by_name, bound_pods):
            why = ["node(s) didn't match pod affinity rules"]
        if not why and not spread_fits(pod, node, by_name, bound_pods):
            why = ["node(s) didn't match pod topology spread constraints"]
        if why:
            reasons.update(why)
        else:
            feasible.append(node)
    if feasible:
        best = min(feasible, key=lambda n: (-_placement_preference(pod, n, by_name, bound_pods),
                                            *_score(pod, n, bound_pods)))
        return Placement(node=best["metadata"]["name"])
    parts = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    message = f"0/{len(nodes)} nodes are available" + (f": {parts}." if parts else ".")
    return Placement(node=None, message=message, reasons=dict(reasons))


def wants_default_scheduler(pod: Obj) -> bool:
    """A pending pod this scheduler should place: unbound, not being deleted, default scheduler."""
    spec = pod.get("spec") or {}
    meta = pod.get("metadata") or {}
    return (
        not spec.get("nodeName")
        and not meta.get("deletionTimestamp")
        and (spec.get("schedulerName") or SCHEDULER_NAME) == SCHEDULER_NAME
        and (pod.get("status") or {}).get("phase", "Pending") == "Pending"
    )


# ---------------------------------------------------------------------------------------- loop


class Scheduler(Controller):
    """Binds pending pods to nodes; runs until :meth:`stop`.

    Reads the shared pod and node :class:`Informer` caches and wakes on any change (plus a
    ``resync_s`` safety tick). Pods bound in this round are counted immediately (an "assumed"
    cache), so a burst of pods spreads across nodes.
    """

    task_name = "scheduler"

    def __init__(self, api: ApiClient, pods: Informer, nodes: Informer, *, resync_s: float = 2.0) -> None:
        self.api = api
        self.pods = pods
        self.nodes = nodes
        self.resync_s = resync_s
        self._assumed: dict[str, str] = {}  # pod uid -> node name, until the cache shows the binding
        self._reported: dict[str, str] = {}  # pod uid -> last unschedulable message reported

    async def _run(self) -> None:
        await self.pods.wait_synced()
        await self.nodes.wait_synced()
        pods_v = nodes_v = -1
        while True:
            try:
                await self.schedule_pending()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a controller keeps going; the next round retries
                log.exception("scheduling round failed")
            # wake on a change of either cache (or after resync_s)
            await wait_any(self.pods.changed(pods_v, self.resync_s), self.nodes.changed(nodes_v, self.resync_s))
            pods_v, nodes_v = self.pods.version, self.nodes.version

    async def schedule_pending(self) -> None:
        """One round: try to place every pending pod, oldest first."""
        all_pods = list(self.pods.cache.values())
        live_uids = {p["metadata"].get("uid") for p in all_pods}
        self._assumed = {uid: n for uid, n in self._assumed.items() if uid in live_uids}
        self._reported = {uid: m for uid, m in self._reported.items() if uid in live_uids}
        bound = []
        pending = []
        for pod in all_pods:
            uid = pod["metadata"].get("uid")
            if (pod.get("spec") or {}).get("nodeName"):
                bound.append(pod)
                self._assumed.pop(uid, None)
            elif uid in self._assumed:
                bound.append({**pod, "spec": {**pod.get("spec", {}), "nodeName": self._assumed[uid]}})
            elif wants_default_scheduler(pod):
                pending.append(pod)
        nodes = sorted(self.nodes.cache.values(), key=lambda n: n["metadata"]["name"])
        pending.sort(key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]))
        for pod in pending:
            if (pod.get("spec") or {}).get("schedulingGates"):
                continue  # as kube-scheduler: not tried until ungated (the API server said SchedulingGated)
            try:
                placement = schedule(pod, nodes, bound)
            except ValueError as exc:
                placement = Placement(node=None, message=f"invalid pod spec: {exc}")
            if placement.node:
                if await self._bind(pod, placement.node):
                    uid = pod["metadata"].get("uid")
                    self._assumed[uid] = placement.node
                    bound.append({**pod, "spec": {**pod.get("spec", {}), "nodeName": placement.node}})
            else:
                await self._report_unschedulable(pod, placement.message)

    async def _bind(self, pod: Obj, node: str) -> bool:
        meta = pod["metadata"]
        ns, name = meta.get("namespace", "default"), meta["name"]
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": ns, "uid": meta.get("uid")},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        path = f"/api/v1/namespaces/{ns}/pods/{name}"
        try:
            try:
                await self.api.create(path + "/binding", binding)
            except ApiError as exc:
                if exc.status not in (404, 405):
                    raise
                # no binding subresource (or the pod is gone: the patch then fails too)
                await self.api.merge_patch(path, {"spec": {"nodeName": node}})
        except ApiError as exc:
            log.info("binding %s/%s to %s failed: %s", ns, name, node, exc)
            return False
        conditions = [c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") != "PodScheduled"]
        conditions.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339(),
                           "lastProbeTime": None})
        with contextlib.suppress(ApiError):
            await self.api.patch_status(path, {"conditions": conditions})
        await self.api.event(pod, "Scheduled", f"Successfully assigned {ns}/{name} to {node}",
                             component=SCHEDULER_NAME)
        return True

    async def _report_unschedulable(self, pod: Obj, message: str) -> None:
        uid = pod["metadata"].get("uid")
        if self._reported.get(uid) == message:
            return
        self._reported[uid] = message
        meta = pod["metadata"]
        path = f"/api/v1/namespaces/{meta.get('namespace', 'default')}/pods/{meta['name']}"
        conditions = [c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") != "PodScheduled"]
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                           "lastTransitionTime": now_rfc3339(), "lastProbeTime": None})
        with contextlib.suppress(ApiError):
            await self.api.patch_status(path, {"phase": "Pending", "conditions": conditions})
        await self.api.event(pod, "FailedScheduling", message, type_="Warning", component=SCHEDULER_NAME)
