"""Generate the TrainingJob CustomResourceDefinition from the pydantic models in :mod:`.spec`.

Pydantic emits JSON Schema (draft 2020-12, with ``$defs``/``$ref``, ``anyOf`` for optionals,
numeric ``exclusiveMinimum``). Kubernetes wants a *structural* OpenAPI v3 schema: every node
typed, no ``$ref``, nullability as ``nullable: true``, boolean ``exclusiveMinimum``, and no
``additionalProperties`` next to ``properties``. :func:`structural_schema` does that translation;
:func:`build_crd` adds the status schema, the CEL rules of :mod:`.rules`, the ``status`` and
``scale`` subresources and the printer columns.

``crds/trainingjob.yaml`` is this module's output (``loco crds --write``); a test fails when the
file and the models drift. :func:`apply_defaults` performs the API server's structural defaulting
so the operator's own validation sees objects exactly as the API server would.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from . import kubetypes
from . import spec as api
from .rules import rules_at

#: Keywords a structural schema may carry (anything else pydantic emits is dropped).
_KEEP = {
    "type", "description", "default", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "minItems", "maxItems", "format", "required", "nullable",
    "properties", "items", "additionalProperties",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-validations", "x-kubernetes-list-type",
}
PRESERVE = "x-kubernetes-preserve-unknown-fields"

HEADER = (
    "# Generated from operator/loco_operator/spec.py by `loco crds --write`: do not edit by hand.\n"
    "# A test fails when this file and the models drift.\n"
)

#: Default output path, relative to the repository root.
CRD_PATH = Path("crds") / "trainingjob.yaml"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model (camelCase field names)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _convert(raw, defs)


def _convert(node: Mapping[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    node = dict(node)
    # 0. a Kubernetes core type (spec.core_type): its own schema, with the field's description
    if api.KUBERNETES_TYPE in node:
        core = kubetypes.structural(node[api.KUBERNETES_TYPE])
        if "description" in node:
            core["description"] = _one_line(node["description"])
        if any(option.get("type") == "null" for option in node.get("anyOf", ())):
            core["nullable"] = True
        return core
    # 1. inline $ref: the target's keywords, overridden by the referring node's (description, default).
    #    The target is converted once: converting its output again would treat Kubernetes' schemas as pydantic's.
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        return {**_convert(target, defs), **_convert(node, defs)}
    # 2. optionals: anyOf [X, null] -> X + nullable; int|str -> int-or-string; anything else free-form.
    if "anyOf" in node:
        options = node.pop("anyOf")
        non_null = [o for o in options if o.get("type") != "null"]
        nullable = len(non_null) < len(options)
        if len(non_null) == 1:
            node = {**_convert(non_null[0], defs), **node}
        elif sorted(o.get("type", "") for o in non_null) == ["integer", "string"]:
            node["x-kubernetes-int-or-string"] = True
        else:
            node[PRESERVE] = True
        if nullable:
            node["nullable"] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    # 3. draft 2020-12 numeric exclusive bounds -> OpenAPI v3.0 boolean form.
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if exclusive in node and not isinstance(node[exclusive], bool):
            node[bound] = node.pop(exclusive)
            node[exclusive] = True
    if node.get("default", 0) is None:
        del node["default"]
    # 4. free-form objects: dict[str, Any] (model.kwargs...).
    additional = node.get("additionalProperties")
    if additional is True or additional == {}:
        node[PRESERVE] = True
    if node.get(PRESERVE):
        node.setdefault("type", "object")
        node.pop("additionalProperties", None)
        node.pop("properties", None)
    elif isinstance(additional, Mapping):
        node["additionalProperties"] = _convert(additional, defs)
    if "properties" in node:
        node.pop("additionalProperties", None)  # structural: properties and additionalProperties exclude each other
        props = {}
        for name, prop in node["properties"].items():
            converted = _convert(prop, defs)
            # Sub-objects built by default_factory: default {} lets the API server fill their own defaults.
            if "properties" in converted and "default" not in converted and not converted.get("nullable"):
                converted["default"] = {}
            props[name] = converted
        node["properties"] = props
    if "items" in node:
        node["items"] = _convert(node["items"], defs)
    if "description" in node:
        node["description"] = _one_line(node["description"])
    order = {key: i for i, key in enumerate(("type", "description"))}
    out = {k: node[k] for k in sorted(node, key=lambda k: order.get(k, 2)) if k in _KEEP}
    if not out.get("required"):
        out.pop("required", None)
    return out


def _attach_rules(schema: dict[str, Any], scope: tuple[str, ...], root: dict[str, Any]) -> None:
    node = root
    for part in scope:
        node = node["properties"][part]
    rules = rules_at(scope)
    if rules:
        node["x-kubernetes-validations"] = [rule.to_validation() for rule in rules]
    for name, child in node.get("properties", {}).items():
        if "properties" in child:
            _attach_rules(child, (*scope, name), root)


def openapi_schema() -> dict[str, Any]:
    """The ``openAPIV3Schema`` of the TrainingJob resource (spec, status and CEL rules)."""
    spec_schema = structural_schema(api.TrainingJobSpec)
    spec_schema["description"] = "Desired state of the TrainingJob: workers, algorithm, model, data, training, checkpoints, run policy."
    spec_schema["default"] = {}
    status_schema = structural_schema(api.TrainingJobStatus)
    status_schema["description"] = "Observed state, written by the operator (a restarted operator carries on from it)."
    root: dict[str, Any] = {
        "type": "object",
        "description": (
            "A TrainingJob trains a model with a low-communication, fault-tolerant algorithm "
            "(DDP, DiLoCo, Streaming DiLoCo, NoLoCo, CO2) on replicas worker pods, restarting from "
            "the last checkpoint when a worker fails."
        ),
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object: loco.dev/v1alpha1."},
            "kind": {"type": "string", "description": "Kind of this object: TrainingJob."},
            # a real API server refuses anything but type (and name/generateName rules) under metadata
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    _attach_rules(root, (), root)
    return root


def printer_columns() -> list[dict[str, Any]]:
    """``kubectl get trainingjobs`` columns (priority 1 ones show with ``-o wide``)."""
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
        {"name": "Workers", "type": "string", "jsonPath": ".status.workersReady", "description": "Ready/desired workers."},
        {"name": "Step", "type": "integer", "jsonPath": ".status.step", "description": "Inner steps completed."},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress", "description": "Steps done of the total."},
        {"name": "ETA", "type": "string", "jsonPath": ".status.eta", "description": "Time left at the recent step rate."},
        {"name": "Loss", "type": "number", "jsonPath": ".status.loss", "description": "Latest training loss."},
        {"name": "Algorithm", "type": "string", "jsonPath": ".spec.algorithm.name", "description": "Distributed algorithm."},
        {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "description": "Restarts so far."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {
            "name": "Checkpoint", "type": "integer", "jsonPath": ".status.lastCheckpoint.step", "priority": 1,
            "description": "Step of the last committed checkpoint.",
        },
        {
            "name": "Tokens/s", "type": "number", "jsonPath": ".status.tokensPerSecond", "priority": 1,
            "description": "Tokens per second over all workers.",
        },
    ]


def build_crd() -> dict[str, Any]:
    """The complete ``apiextensions.k8s.io/v1`` CustomResourceDefinition."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "loco", "app.kubernetes.io/part-of": "loco"},
        },
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["loco", "all"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.workers.ready",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": printer_columns(),
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    """The CRD as the YAML text of ``crds/trainingjob.yaml``."""
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=120, allow_unicode=True)


def write_crd(path: Path) -> bool:
    """Write the CRD to ``path``; returns True when the file changed."""
    return write_if_changed(path, render_crd_yaml())


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` unless it already holds it; True when the file changed."""
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True


def apply_defaults(schema: Mapping[str, Any], obj: Any) -> Any:
    """A copy of ``obj`` with the schema's ``default`` values filled in, as the API server does.

    Structural defaulting: a missing property with a ``default`` gets it, then defaulting recurses
    into every present property, list item and additionalProperties value. Badly typed values are
    left as they are (validation reports them).
    """
    obj = copy.deepcopy(obj)
    _default_in_place(schema, obj)
    return obj


def _default_in_place(schema: Mapping[str, Any], obj: Any) -> None:
    if isinstance(obj, dict):
        for name, prop in schema.get("properties", {}).items():
            if name not in obj and "default" in prop:
                obj[name] = copy.deepcopy(prop["default"])
            if name in obj:
                _default_in_place(prop, obj[name])
        additional = schema.get("additionalProperties")
        if isinstance(additional, Mapping):
            for value in obj.values():
                _default_in_place(additional, value)
    elif isinstance(obj, list) and isinstance(schema.get("items"), Mapping):
        for item in obj:
            _default_in_place(schema["items"], item)
