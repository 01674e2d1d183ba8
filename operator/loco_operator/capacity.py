"""Can the cluster place more worker pods? A pure, conservative estimate for elastic growth and gang start.

:func:`free_slots` answers "how many more copies of this worker pod would the scheduler bind right
now", from the Nodes and the Pods as the API returns them (camelCase dicts). It follows the
scheduler's filters that matter for a training job: the node is Ready and not cordoned, every
``NoSchedule``/``NoExecute`` taint is tolerated, ``spec.nodeSelector`` matches, the node is not on
the job's avoid list (``status.avoidNodes``), and the pod's resource requests (and one ``pods``
slot) fit into allocatable minus the requests of the non-terminated pods bound to the node.
Affinity other than the avoid list and topology spread are not evaluated, so the answer can be
optimistic; a wrong guess costs one resize attempt: the new pod stays Unschedulable and the
planner shrinks again after ``elastic.placementTimeoutSeconds``. :func:`shortage` says, for a gang
that does not fit, which resource is short and how much each usable node has left.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from kubernetes.utils.quantity import parse_quantity

HOSTNAME_LABEL = "kubernetes.io/hostname"


def _quantity(value: Any) -> Decimal:
    try:
        return Decimal(parse_quantity(value))
    except (ValueError, TypeError, ArithmeticError):
        return Decimal(0)


def pod_requests(pod: Mapping[str, Any]) -> dict[str, Decimal]:
    """Summed container requests of ``pod`` (limits stand in for missing requests, as in Kubernetes),
    plus ``pods: 1``."""
    total: dict[str, Decimal] = {"pods": Decimal(1)}
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        requests = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        for name, value in requests.items():
            total[name] = total.get(name, Decimal(0)) + _quantity(value)
    return total


def tolerates(tolerations: Sequence[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    """Whether one of ``tolerations`` tolerates ``taint`` (Kubernetes matching rules)."""
    for tol in tolerations:
        if tol.get("effect") and tol.get("effect") != taint.get("effect"):
            continue
        if tol.get("operator") == "Exists":
            if not tol.get("key") or tol.get("key") == taint.get("key"):
                return True
        elif tol.get("key") == taint.get("key") and (tol.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def node_usable(node: Mapping[str, Any], pod: Mapping[str, Any], avoid_nodes: Iterable[str] = ()) -> bool:
    """Ready, schedulable, every hard taint tolerated, nodeSelector matched, not avoided."""
    meta, spec, status = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
    labels = meta.get("labels") or {}
    avoid = set(avoid_nodes)
    if meta.get("name") in avoid or labels.get(HOSTNAME_LABEL) in avoid or spec.get("unschedulable"):
        return False
    if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []):
        return False
    pod_spec = pod.get("spec") or {}
    tolerations = pod_spec.get("tolerations") or []
    for taint in spec.get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(tolerations, taint):
            return False
    return all(labels.get(k) == v for k, v in (pod_spec.get("nodeSelector") or {}).items())


def _free_by_node(pod: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]],
                  avoid_nodes: Iterable[str]) -> dict[str, dict[str, Decimal | None]]:
    """For each node ``pod`` may use, what is left of each resource it requests (None: the node does not offer it;
    a missing ``pods`` limit counts as unlimited)."""
    used: dict[str, dict[str, Decimal]] = {}
    for other in pods:
        node = (other.get("spec") or {}).get("nodeName")
        if not node or (other.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        acc = used.setdefault(node, {})
        for name, value in pod_requests(other).items():
            acc[name] = acc.get(name, Decimal(0)) + value
    avoid = list(avoid_nodes)
    free: dict[str, dict[str, Decimal | None]] = {}
    for node in nodes:
        if not node_usable(node, pod, avoid):
            continue
        status, node_name = node.get("status") or {}, (node.get("metadata") or {}).get("name", "")
        allocatable = status.get("allocatable") or status.get("capacity") or {}
        taken = used.get(node_name, {})
        free[node_name] = {
            name: (_quantity(allocatable[name]) - taken.get(name, Decimal(0)) if name in allocatable
                   else (Decimal(1 << 30) if name == "pods" else None))
            for name, need in pod_requests(pod).items() if need > 0
        }
    return free


def _copies(free: Decimal | None, need: Decimal) -> int:
    return 0 if free is None else max(int(free // need), 0)


def free_slots(
    pod: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]],
    avoid_nodes: Iterable[str] = (),
) -> int:
    """How many more copies of ``pod`` the cluster can place now (see the module docstring).

    ``pods``: every pod in the cluster (those without ``spec.nodeName`` or already Succeeded/Failed
    hold nothing). A resource the pod requests but a node does not offer makes the node unusable.
    """
    return _room(pod, _free_by_node(pod, nodes, pods, avoid_nodes))


def _room(pod: Mapping[str, Any], free: Mapping[str, Mapping[str, Decimal | None]]) -> int:
    """Copies of ``pod`` that fit into ``free`` (:func:`_free_by_node`): per node, as many as its scarcest resource allows."""
    want = {k: v for k, v in pod_requests(pod).items() if v > 0}
    return sum(min((_copies(left[name], need) for name, need in want.items()), default=0) for left in free.values())


def shortage(pod: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]],
             count: int, avoid_nodes: Iterable[str] = ()) -> str | None:
    """Why ``count`` copies of ``pod`` cannot all be placed now, naming the resource that is short; None when they
    can (:func:`free_slots` >= ``count``). What a gang waiting for room tells its user."""
    free = _free_by_node(pod, nodes, pods, avoid_nodes)
    room = _room(pod, free)
    if room >= count:
        return None
    if not free:
        return (f"no node can take a worker: {len(nodes)} nodes, none Ready, schedulable, with every taint tolerated, "
                f"the nodeSelector matched and not avoided")
    short = []
    for name, need in sorted(pod_requests(pod).items()):
        if need <= 0 or name == "pods":
            continue
        fits = sum(_copies(left[name], need) for left in free.values())
        if fits < count:
            listed = ", ".join(f"{node} {'none' if left[name] is None else _show(name, left[name])}"
                               for node, left in sorted(free.items()))
            short.append(f"{name}: {count} workers request {_show(name, need)} each, room for {fits} "
                         f"(free on usable nodes: {listed})")
    return "; ".join(short) or f"room for {room} of {count} workers"


def _show(resource: str, value: Decimal) -> str:
    """A quantity as people write it: memory in Mi or Gi, the rest as a plain number."""
    if resource in ("memory", "ephemeral-storage") or resource.startswith("hugepages-"):
        gib = value / (1 << 30)
        return f"{gib.normalize():f}Gi" if gib >= 1 and gib == gib.to_integral() else f"{(value / (1 << 20)).quantize(Decimal(1))}Mi"
    return f"{value.normalize():f}"
