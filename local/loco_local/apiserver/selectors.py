"""Label and field selectors (the ``labelSelector`` / ``fieldSelector`` query parameters).

Parsing turns a selector string into a list of requirements (pure functions); a bad selector is a
400 BadRequest naming the offending part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import bad_request

_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"


@dataclass(frozen=True)
class LabelRequirement:
    """``op`` is one of ``=``, ``!=``, ``in``, ``notin``, ``exists``, ``!``."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "=":
            return present and value == self.values[0]
        if self.op == "!=":
            return not present or value != self.values[0]
        if self.op == "in":
            return present and value in self.values
        if self.op == "notin":
            return not present or value not in self.values
        if self.op == "exists":
            return present
        return not present  # "!"


def _split_top_level(selector: str) -> list[str]:
    """Split on commas that are not inside ``( )``."""
    parts, depth, current = [], 0, []
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(selector: str | None) -> list[LabelRequirement]:
    """Parse ``a=b,c!=d,e in (x,y),f notin (z),g,!h``."""
    if not selector:
        return []
    requirements = []
    for part in _split_top_level(selector):
        match = re.fullmatch(rf"({_KEY})\s+(in|notin)\s+\((.*)\)", part)
        if match:
            values = tuple(v.strip() for v in match.group(4).split(",") if v.strip())
            requirements.append(LabelRequirement(match.group(1), match.group(3), values))
            continue
        match = re.fullmatch(rf"!\s*({_KEY})", part)
        if match:
            requirements.append(LabelRequirement(match.group(1), "!"))
            continue
        match = re.fullmatch(rf"({_KEY})\s*(==|!=|=)\s*({_VALUE})", part)
        if match:
            op = "=" if match.group(3) in ("=", "==") else "!="
            requirements.append(LabelRequirement(match.group(1), op, (match.group(4),)))
            continue
        if re.fullmatch(_KEY, part):
            requirements.append(LabelRequirement(part, "exists"))
            continue
        raise bad_request(f'unable to parse requirement: invalid label selector "{selector}": cannot parse "{part}"')
    return requirements


def matches_labels(requirements: list[LabelRequirement], obj: dict[str, Any]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(r.matches(labels) for r in requirements)


@dataclass(frozen=True)
class FieldRequirement:
    field: str
    equal: bool
    value: str


def parse_field_selector(selector: str | None, allowed: set[str]) -> list[FieldRequirement]:
    """Parse ``metadata.name=x,status.phase!=Running``; fields outside ``allowed`` are a 400 like the real server."""
    if not selector:
        return []
    requirements = []
    for part in _split_top_level(selector):
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(==|!=|=)\s*(.*)", part)
        if not match:
            raise bad_request(f'invalid field selector "{selector}": cannot parse "{part}"')
        name, op, value = match.groups()
        if name not in allowed:
            raise bad_request(f'field label not supported: {name}')
        requirements.append(FieldRequirement(name, op != "!=", value))
    return requirements


def field_value(obj: dict[str, Any], path: str) -> str:
    """The string form of a dotted path (``""`` when missing; booleans as ``true``/``false``)."""
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, dict):
            return ""
        value = value.get(part)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def matches_fields(requirements: list[FieldRequirement], paths: dict[str, str], obj: dict[str, Any]) -> bool:
    """``paths`` maps each selectable field label to its dotted path in the object."""
    return all((field_value(obj, paths[r.field]) == r.value) == r.equal for r in requirements)
