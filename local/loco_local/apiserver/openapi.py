"""``/openapi/v2`` and ``/openapi/v3`` documents built from the registry.

They serve two kubectl needs: ``kubectl explain`` (schemas with descriptions, found through
``x-kubernetes-group-version-kind``) and ``kubectl apply``'s check that the server validates
fields itself (a PATCH operation per kind declaring the ``fieldValidation`` query parameter), so
kubectl sends ``fieldValidation=Strict`` and the server reports unknown fields.
Custom resources carry their CRD schema; built-in kinds a permissive object schema.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from .resources import Registry, ResourceType

KUBERNETES_VERSION = "v1.32.0"
_OBJECT_META = {
    "type": "object",
    "description": "Standard object's metadata. More info: "
                   "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata",
    "x-kubernetes-preserve-unknown-fields": True,
}
_API_VERSION = {"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}
_KIND = {"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}


def definition_name(rt: ResourceType) -> str:
    """``io.k8s.api.core.v1.Pod`` for built-ins, reversed group for CRDs: ``dev.loco.v1alpha1.TrainingJob``."""
    if not rt.group:
        return f"io.k8s.api.core.v1.{rt.kind}"
    if rt.group.endswith(".k8s.io"):
        return f"io.k8s.api.{rt.group.split('.')[0]}.{rt.version}.{rt.kind}"
    return ".".join(reversed(rt.group.split("."))) + f".{rt.version}.{rt.kind}"


def _gvk(rt: ResourceType) -> dict[str, str]:
    return {"group": rt.group, "version": rt.version, "kind": rt.kind}


def kind_schema(rt: ResourceType) -> dict[str, Any]:
    if rt.schema:
        schema = copy.deepcopy(rt.schema)
        schema.setdefault("type", "object")
        props = schema.setdefault("properties", {})
        props.setdefault("apiVersion", _API_VERSION)
        props.setdefault("kind", _KIND)
        props["metadata"] = dict(_OBJECT_META)
    else:
        schema = {"type": "object", "description": f"{rt.kind} ({rt.api_version}).",
                  "properties": {"apiVersion": _API_VERSION, "kind": _KIND, "metadata": dict(_OBJECT_META)},
                  "x-kubernetes-preserve-unknown-fields": True}
    schema["x-kubernetes-group-version-kind"] = [_gvk(rt)]
    return schema


def _operation(rt: ResourceType, action: str, with_field_validation: bool) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": f"{action}{rt.kind}",
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": _gvk(rt),
        "responses": {"200": {"description": "OK"}},
        "parameters": [],
    }
    if with_field_validation:
        op["parameters"].append({
            "name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True},
            "description": "Ignore, Warn or Strict: how the server treats fields it does not know."})
    return op


def _paths(rt: ResourceType) -> dict[str, Any]:
    base = f"/apis/{rt.group}/{rt.version}" if rt.group else "/api/v1"
    collection = f"{base}/namespaces/{{namespace}}/{rt.plural}" if rt.namespaced else f"{base}/{rt.plural}"
    return {
        collection: {"get": _operation(rt, "list", False), "post": _operation(rt, "post", True)},
        f"{collection}/{{name}}": {"get": _operation(rt, "get", False), "put": _operation(rt, "put", True),
                                   "patch": _operation(rt, "patch", True), "delete": _operation(rt, "delete", False)},
    }


def group_versions(registry: Registry) -> dict[str, list[ResourceType]]:
    """``api/v1`` / ``apis/<g>/<v>`` -> its kinds."""
    result: dict[str, list[ResourceType]] = {}
    for rt in registry.all():
        key = f"apis/{rt.group}/{rt.version}" if rt.group else "api/v1"
        result.setdefault(key, []).append(rt)
    return result


def v3_document(types: list[ResourceType]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for rt in types:
        paths.update(_paths(rt))
        schemas[definition_name(rt)] = kind_schema(rt)
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": KUBERNETES_VERSION},
            "paths": paths, "components": {"schemas": schemas}}


def _hash(document: dict[str, Any]) -> str:
    return hashlib.sha512(json.dumps(document, sort_keys=True).encode()).hexdigest()[:128].upper()


def v3_root(registry: Registry) -> dict[str, Any]:
    return {"paths": {path: {"serverRelativeURL": f"/openapi/v3/{path}?hash={_hash(v3_document(types))}"}
                      for path, types in sorted(group_versions(registry).items())}}


def v2_document(registry: Registry) -> dict[str, Any]:
    definitions = {definition_name(rt): kind_schema(rt) for rt in registry.all()}
    paths: dict[str, Any] = {}
    for rt in registry.all():
        for path, ops in _paths(rt).items():
            paths[path] = {verb: {k: v for k, v in op.items() if k != "parameters"} | {
                "parameters": [{"name": p["name"], "in": "query", "type": "string", "uniqueItems": True}
                               for p in op["parameters"]]} for verb, op in ops.items()}
    return {"swagger": "2.0", "info": {"title": "Kubernetes", "version": KUBERNETES_VERSION},
            "paths": paths, "definitions": definitions}
