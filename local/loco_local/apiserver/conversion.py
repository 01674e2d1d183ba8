"""Conversion between the two representations of one stored kind.

Kubernetes keeps a single events collection served as core ``v1`` Events and as
``events.k8s.io/v1`` Events; an event posted through either API is listed by both (so
``kubectl describe``, which reads core events, shows what a client posted through
``events.k8s.io``). Objects are stored in the core form; these pure functions map field names.
"""

from __future__ import annotations

import copy
from typing import Any

# (core v1 field, events.k8s.io/v1 field)
_RENAMES = (
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
    ("reportingComponent", "reportingController"),
)
_SHARED = ("metadata", "eventTime", "series", "reportingInstance", "action", "reason", "related", "type")


def _renamed(event: dict[str, Any], api_version: str, renames: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """``event`` as an ``api_version`` Event: the shared fields copied, each (from, to) field renamed."""
    out: dict[str, Any] = {"apiVersion": api_version, "kind": "Event"}
    for key in _SHARED:
        if event.get(key) is not None:
            out[key] = copy.deepcopy(event[key])
    for source, target in renames:
        if event.get(source) is not None:
            out[target] = copy.deepcopy(event[source])
    return out


def core_event_to_events_v1(event: dict[str, Any]) -> dict[str, Any]:
    out = _renamed(event, "events.k8s.io/v1", _RENAMES)
    if "reportingController" not in out and (event.get("source") or {}).get("component"):
        out["reportingController"] = event["source"]["component"]
    return out


def events_v1_to_core_event(event: dict[str, Any]) -> dict[str, Any]:
    out = _renamed(event, "v1", tuple((v1, core) for core, v1 in _RENAMES))
    if "source" not in out and event.get("reportingController"):
        out["source"] = {"component": event["reportingController"]}
    return out
