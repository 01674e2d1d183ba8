"""``/openapi/v2`` and ``/openapi/v3`` documents built from the registry.

They serve two kubectl needs: ``kubectl explain`` (schemas with descriptions, found through
``x-kubernetes-group-version-kind``) and ``kubectl apply``'s check that the server validates
fields itself (a PATCH operation per kind declaring the ``fieldValidation`` query parameter), so
kubectl sends ``fieldValidation=Strict`` and the server reports unknown fields.
Custom resources carry their CRD schema; built-in kinds a permissive object schema.

Each operation declares what kube-apiserver's documents declare, so that the document is a valid
OpenAPI description a generic client or fuzzer (schemathesis) can drive: its path parameters
(``namespace``, ``name``), its request body (the kind's schema for POST/PUT, a patch for PATCH),
its query parameters (watches are left out: a fuzzer must not open streams) and the bearer token
as a security scheme.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from .resources import Registry, ResourceType

KUBERNETES_VERSION = "v1.32.0"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJECT_META = {
    "type": "object",
    "description": "Standard object's metadata. More info: "
                   "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata",
    # the fields clients write (io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta has more, all server-set)
    "properties": {"name": {"type": "string"}, "generateName": {"type": "string"}, "namespace": {"type": "string"},
                   "labels": _STRING_MAP, "annotations": _STRING_MAP,
                   "finalizers": {"type": "array", "items": {"type": "string"}}},
    "x-kubernetes-preserve-unknown-fields": True,
}
BEARER = "BearerToken"
_SECURITY_SCHEME = {"type": "apiKey", "name": "authorization", "in": "header",
                    "description": "Bearer Token authentication"}
PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json",
               "application/strategic-merge-patch+json", "application/apply-patch+yaml")
_JSON_PATCH = {"type": "array", "items": {"type": "object", "required": ["op", "path"], "properties": {
    "op": {"type": "string", "enum": ["add", "remove", "replace", "move", "copy", "test"]},
    "path": {"type": "string"}, "from": {"type": "string"}, "value": {}}}}
# query parameters per action, as kube-apiserver declares them (watch and its companions left out)
_QUERY: dict[str, tuple[tuple[str, str], ...]] = {
    "list": (("labelSelector", "string"), ("fieldSelector", "string"), ("limit", "integer"),
             ("resourceVersion", "string")),
    "get": (("resourceVersion", "string"),),
    "post": (("dryRun", "string"), ("fieldManager", "string")),
    "put": (("dryRun", "string"), ("fieldManager", "string")),
    "patch": (("dryRun", "string"), ("fieldManager", "string"), ("force", "boolean")),
    "delete": (("dryRun", "string"), ("gracePeriodSeconds", "integer"), ("propagationPolicy", "string"),
               ("orphanDependents", "boolean")),
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
    """One v3 operation: parameters with ``schema``, the body as ``requestBody``."""
    op: dict[str, Any] = {
        "operationId": f"{action}{rt.kind}",
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": _gvk(rt),
        "responses": {"200": {"description": "OK"}, "401": {"description": "Unauthorized"}},
        "parameters": [{"name": name, "in": "query", "schema": {"type": kind}} for name, kind in _QUERY[action]],
    }
    if action == "post":
        op["responses"]["201"] = {"description": "Created"}
    if action == "delete":
        op["responses"]["202"] = {"description": "Accepted"}
    if with_field_validation:
        op["parameters"].append({
            "name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True},
            "description": "Ignore, Warn or Strict: how the server treats fields it does not know."})
    ref = {"$ref": f"#/components/schemas/{definition_name(rt)}"}
    if action in ("post", "put"):
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
    elif action == "patch":
        op["requestBody"] = {"required": True, "content": {
            kind: {"schema": _JSON_PATCH if kind == PATCH_TYPES[0] else {"type": "object"}} for kind in PATCH_TYPES}}
    return op


def _path_parameters(path: str) -> list[dict[str, Any]]:
    """The ``{namespace}`` and ``{name}`` parameters a templated path carries."""
    return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"},
             "description": f"{name} of the object"}
            for name in ("namespace", "name") if f"{{{name}}}" in path]


def _paths(rt: ResourceType) -> dict[str, Any]:
    base = f"/apis/{rt.group}/{rt.version}" if rt.group else "/api/v1"
    collection = f"{base}/namespaces/{{namespace}}/{rt.plural}" if rt.namespaced else f"{base}/{rt.plural}"
    item = f"{collection}/{{name}}"
    return {
        collection: {"get": _operation(rt, "list", False), "post": _operation(rt, "post", True),
                     "parameters": _path_parameters(collection)},
        item: {"get": _operation(rt, "get", False), "put": _operation(rt, "put", True),
               "patch": _operation(rt, "patch", True), "delete": _operation(rt, "delete", False),
               "parameters": _path_parameters(item)},
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
            "paths": paths, "components": {"schemas": schemas, "securitySchemes": {BEARER: _SECURITY_SCHEME}},
            "security": [{BEARER: []}]}


def _hash(document: dict[str, Any]) -> str:
    return hashlib.sha512(json.dumps(document, sort_keys=True).encode()).hexdigest()[:128].upper()


def v3_root(registry: Registry) -> dict[str, Any]:
    return {"paths": {path: {"serverRelativeURL": f"/openapi/v3/{path}?hash={_hash(v3_document(types))}"}
                      for path, types in sorted(group_versions(registry).items())}}


def _v2_parameter(param: dict[str, Any]) -> dict[str, Any]:
    """A v3 parameter in v2's form: the schema's type on the parameter itself."""
    out = {k: v for k, v in param.items() if k != "schema"}
    return out | {"type": param["schema"]["type"]} | ({"uniqueItems": True} if param["schema"].get("uniqueItems") else {})


def _v2_operation(op: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in op.items() if k not in ("parameters", "requestBody")}
    parameters = [_v2_parameter(p) for p in op["parameters"]]
    body = op.get("requestBody")
    if body is not None:
        content = body["content"]
        schema = content.get("application/json", {}).get("schema", {"type": "object"})
        if "$ref" in schema:
            schema = {"$ref": schema["$ref"].replace("#/components/schemas/", "#/definitions/")}
        parameters.insert(0, {"name": "body", "in": "body", "required": True, "schema": schema})
        out["consumes"] = sorted(content)
    return out | {"parameters": parameters}


def v2_document(registry: Registry) -> dict[str, Any]:
    definitions = {definition_name(rt): kind_schema(rt) for rt in registry.all()}
    paths: dict[str, Any] = {}
    for rt in registry.all():
        for path, ops in _paths(rt).items():
            paths[path] = {verb: [_v2_parameter(p) for p in op] if verb == "parameters" else _v2_operation(op)
                           for verb, op in ops.items()}
    return {"swagger": "2.0", "info": {"title": "Kubernetes", "version": KUBERNETES_VERSION},
            "produces": ["application/json"], "paths": paths, "definitions": definitions,
            "securityDefinitions": {BEARER: _SECURITY_SCHEME}, "security": [{BEARER: []}]}
