"""Server-side ``Table`` output (``Accept: application/json;as=Table;g=meta.k8s.io;v=v1``).

kubectl prints whatever columns the server sends. Custom resources use their CRD's
``additionalPrinterColumns`` (``jsonPath`` evaluated with ``jsonpath-ng``; ``date`` columns shown
as an age, like kube-apiserver); built-in kinds get the columns kubectl users know.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any, Callable

from jsonpath_ng.ext import parse as parse_jsonpath

from .resources import PrinterColumn, ResourceType

Obj = dict[str, Any]
Column = tuple[str, str, str, int, Callable[[Obj, dt.datetime], Any]]  # name, type, description, priority, cell


def human_duration(seconds: float) -> str:
    """kubectl's ``HumanDuration``: 45s, 5m3s, 3h10m, 4d, 2y."""
    seconds = max(int(seconds), 0)
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    days = hours // 24
    if days < 365 * 2:
        return f"{days}d"
    return f"{days // 365}y"


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def age(value: Any, now: dt.datetime) -> str:
    moment = _parse_time(value)
    return human_duration((now - moment).total_seconds()) if moment else "<unknown>"


def _get(obj: Any, *path: str, default: Any = None) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return default
        obj = obj.get(key)
    return default if obj is None else obj


def _name(obj: Obj, now: dt.datetime) -> str:
    return obj["metadata"]["name"]


def _age(obj: Obj, now: dt.datetime) -> str:
    return age(obj["metadata"].get("creationTimestamp"), now)


# ---- built-in kinds -------------------------------------------------------------------------
def _pod_ready(pod: Obj, now: dt.datetime) -> str:
    statuses = _get(pod, "status", "containerStatuses", default=[])
    return f"{sum(1 for s in statuses if s.get('ready'))}/{len(_get(pod, 'spec', 'containers', default=[]))}"


def _pod_status(pod: Obj, now: dt.datetime) -> str:
    """kubectl's STATUS: reason of a waiting/terminated container wins over the phase."""
    reason = _get(pod, "status", "reason") or _get(pod, "status", "phase", default="Unknown")
    for status in reversed(_get(pod, "status", "containerStatuses", default=[])):
        state = status.get("state") or {}
        if state.get("waiting", {}).get("reason"):
            reason = state["waiting"]["reason"]
        elif state.get("terminated"):
            terminated = state["terminated"]
            reason = terminated.get("reason") or (
                f"Signal:{terminated['signal']}" if terminated.get("signal") else f"ExitCode:{terminated.get('exitCode')}")
    if pod["metadata"].get("deletionTimestamp"):
        reason = "Terminating"
    return reason


def _pod_restarts(pod: Obj, now: dt.datetime) -> int:
    return sum(s.get("restartCount", 0) for s in _get(pod, "status", "containerStatuses", default=[]))


def _node_status(node: Obj, now: dt.datetime) -> str:
    ready = next((c for c in _get(node, "status", "conditions", default=[]) if c.get("type") == "Ready"), None)
    status = "Ready" if ready and ready.get("status") == "True" else "NotReady" if ready else "Unknown"
    if _get(node, "spec", "unschedulable"):
        status += ",SchedulingDisabled"
    return status


def _node_roles(node: Obj, now: dt.datetime) -> str:
    labels = node["metadata"].get("labels") or {}
    roles = sorted(k.split("/", 1)[1] for k in labels if k.startswith("node-role.kubernetes.io/"))
    return ",".join(roles) or "<none>"


def _node_ip(node: Obj, now: dt.datetime) -> str:
    return next((a["address"] for a in _get(node, "status", "addresses", default=[]) if a.get("type") == "InternalIP"),
                "<none>")


def _service_ports(svc: Obj, now: dt.datetime) -> str:
    ports = _get(svc, "spec", "ports", default=[])
    return ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in ports) or "<none>"


def _event_object(event: Obj, now: dt.datetime) -> str:
    involved = event.get("involvedObject") or event.get("regarding") or {}
    return f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}"


def _event_last_seen(event: Obj, now: dt.datetime) -> str:
    when = (event.get("lastTimestamp") or event.get("deprecatedLastTimestamp") or event.get("eventTime") or _get(event, "series", "lastObservedTime")
            or event["metadata"].get("creationTimestamp"))
    return age(when, now)


_NAME: Column = ("Name", "string", "Name must be unique within a namespace.", 0, _name)
_AGE: Column = ("Age", "string", "CreationTimestamp of the object.", 0, _age)

BUILTIN_COLUMNS: dict[tuple[str, str], list[Column]] = {
    ("", "pods"): [
        _NAME,
        ("Ready", "string", "The aggregate readiness state of this pod for accepting traffic.", 0, _pod_ready),
        ("Status", "string", "The aggregate status of the containers in this pod.", 0, _pod_status),
        ("Restarts", "string", "The number of times the containers in this pod have been restarted.", 0, _pod_restarts),
        _AGE,
        ("IP", "string", "IP address allocated to the pod.", 1, lambda o, n: _get(o, "status", "podIP", default="<none>")),
        ("Node", "string", "Name of the node the pod is assigned to.", 1,
         lambda o, n: _get(o, "spec", "nodeName", default="<none>")),
    ],
    ("", "nodes"): [
        _NAME,
        ("Status", "string", "The status of the node", 0, _node_status),
        ("Roles", "string", "The roles of the node", 0, _node_roles),
        _AGE,
        ("Version", "string", "Kubelet Version reported by the node.", 0,
         lambda o, n: _get(o, "status", "nodeInfo", "kubeletVersion", default="")),
        ("Internal-IP", "string", "List of internal IPs for the node.", 1, _node_ip),
    ],
    ("", "services"): [
        _NAME,
        ("Type", "string", "The type of service.", 0, lambda o, n: _get(o, "spec", "type", default="ClusterIP")),
        ("Cluster-IP", "string", "The cluster IP of the service.", 0,
         lambda o, n: _get(o, "spec", "clusterIP", default="<none>")),
        ("External-IP", "string", "The external IP of the service.", 0,
         lambda o, n: ",".join(_get(o, "spec", "externalIPs", default=[])) or "<none>"),
        ("Port(s)", "string", "The ports of the service.", 0, _service_ports),
        _AGE,
        ("Selector", "string", "The label selector of the service.", 1,
         lambda o, n: ",".join(f"{k}={v}" for k, v in _get(o, "spec", "selector", default={}).items()) or "<none>"),
    ],
    ("", "events"): [
        ("Last Seen", "string", "Time since the event was last seen.", 0, _event_last_seen),
        ("Type", "string", "Event type (Normal or Warning).", 0, lambda o, n: o.get("type", "")),
        ("Reason", "string", "Why the event was emitted.", 0, lambda o, n: o.get("reason", "")),
        ("Object", "string", "The object the event is about.", 0, _event_object),
        ("Message", "string", "A human-readable description.", 0, lambda o, n: o.get("message") or o.get("note", "")),
    ],
    ("", "namespaces"): [
        _NAME, ("Status", "string", "The status of the namespace", 0, lambda o, n: _get(o, "status", "phase", default="")),
        _AGE,
    ],
    ("", "configmaps"): [
        _NAME, ("Data", "string", "Number of data items.", 0,
                lambda o, n: len(o.get("data") or {}) + len(o.get("binaryData") or {})), _AGE,
    ],
    ("", "secrets"): [
        _NAME, ("Type", "string", "The type of the secret.", 0, lambda o, n: o.get("type", "Opaque")),
        ("Data", "string", "Number of data items.", 0, lambda o, n: len(o.get("data") or {})), _AGE,
    ],
    ("", "serviceaccounts"): [
        _NAME, ("Secrets", "string", "Number of secrets.", 0, lambda o, n: len(o.get("secrets") or [])), _AGE,
    ],
    ("", "persistentvolumeclaims"): [
        _NAME, ("Status", "string", "Phase of the claim.", 0, lambda o, n: _get(o, "status", "phase", default="Pending")),
        _AGE,
    ],
    ("coordination.k8s.io", "leases"): [
        _NAME, ("Holder", "string", "The holder of the lease.", 0,
                lambda o, n: _get(o, "spec", "holderIdentity", default="")), _AGE,
    ],
    ("apiextensions.k8s.io", "customresourcedefinitions"): [
        _NAME, ("Created At", "date", "When the CRD was created.", 0,
                lambda o, n: o["metadata"].get("creationTimestamp", "")),
    ],
}
BUILTIN_COLUMNS[("events.k8s.io", "events")] = BUILTIN_COLUMNS[("", "events")]


@functools.lru_cache(maxsize=256)
def _compiled(json_path: str) -> Any:
    """Compile a CRD ``jsonPath`` (``.status.phase``, ``.spec.items[0].name``); pure, cached by text."""
    expression = json_path.strip()
    if expression.startswith("{") and expression.endswith("}"):
        expression = expression[1:-1]
    if not expression.startswith("$"):
        expression = "$" + expression
    return parse_jsonpath(expression)


def _printer_column(column: PrinterColumn) -> Column:
    def cell(obj: Obj, now: dt.datetime) -> Any:
        try:
            matches = [m.value for m in _compiled(column.json_path).find(obj)]
        except Exception:  # noqa: BLE001 - an unparsable path prints as missing, as kubectl does
            matches = []
        if not matches:
            return None
        value = matches[0]
        if column.type == "date":
            return age(value, now)
        if isinstance(value, (dict, list)):
            import json

            return json.dumps(value, separators=(",", ":"))
        return value

    column_type = "string" if column.type == "date" else column.type
    return (column.name, column_type, column.description, column.priority, cell)


def columns_for(rt: ResourceType) -> list[Column]:
    if rt.is_custom:
        if rt.printer_columns is None:
            return [_NAME, _AGE]
        return [_NAME] + [_printer_column(c) for c in rt.printer_columns]
    return BUILTIN_COLUMNS.get(rt.storage_key, [_NAME, _AGE])


def partial_metadata(obj: Obj) -> Obj:
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}


def to_table(rt: ResourceType, objects: list[Obj], resource_version: str, include_object: str = "Metadata",
             now: dt.datetime | None = None, headers: bool = True) -> Obj:
    """A ``meta.k8s.io/v1`` Table of ``objects``; ``include_object`` is None | Metadata | Object."""
    now = now or dt.datetime.now(dt.timezone.utc)
    columns = columns_for(rt)
    rows = []
    for obj in objects:
        row: Obj = {"cells": [fn(obj, now) for *_, fn in columns]}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = partial_metadata(obj)
        rows.append(row)
    table: Obj = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
                  "columnDefinitions": [], "rows": rows}
    if headers:
        table["columnDefinitions"] = [
            {"name": name, "type": ctype, "format": "name" if name == "Name" else "", "description": desc,
             "priority": priority}
            for name, ctype, desc, priority, _ in columns]
    return table
