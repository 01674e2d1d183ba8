"""Kubernetes core types (EnvVar, Volume, Toleration, ...) as structural CRD schemas.

``spec.template`` carries pieces of a Pod (env, resources, volumes, volumeMounts, tolerations,
affinity). Typed in the CRD, the API server refuses at ``kubectl apply`` what the kubelet's API would
refuse at pod creation (a number where a string belongs, an env item without a name, a negative
quantity), names the field, and prunes unknown keys as it does for a Pod, instead of the job failing
later with InvalidSpec.

The schemas are Kubernetes' own: the OpenAPI v3 document it publishes for ``/api/v1``
(``api/openapi-spec/v3/api__v1_openapi.json`` in ``k8s.io/kubernetes`` at the version
``local/kube/go.mod`` pins), trimmed to the types below and what they reference, and kept in
``schemas/core-v1.json`` so generating the CRD needs neither Go nor a network
(``loco crds --refresh-core-types`` rewrites it; a test compares it with the pinned module).

:func:`structural` turns one of them into what a CRD may hold, as controller-gen does for Go types:
references inlined, ``default`` dropped (the API server would write them into stored objects),
list and map merge annotations dropped (lists stay atomic, as they were), IntOrString and Quantity as
``x-kubernetes-int-or-string``, a nested ObjectMeta free-form.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

VENDORED = Path(__file__).with_name("schemas") / "core-v1.json"
#: where the document lives inside the k8s.io/kubernetes module
SOURCE_PATH = "api/openapi-spec/v3/api__v1_openapi.json"

CORE = "io.k8s.api.core.v1."
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
INT_OR_STRING = "io.k8s.apimachinery.pkg.util.intstr.IntOrString"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"

#: the core types ``spec.template`` uses (the roots of the trimmed document)
ROOTS = ("EnvVar", "ResourceRequirements", "Volume", "VolumeMount", "Toleration", "Affinity")

#: A non-negative quantity: Kubernetes' Quantity grammar without the minus sign. Pod validation refuses a
#: negative request, limit or size, so the CRD does too.
_NUMBER = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
NON_NEGATIVE_QUANTITY = rf"^\+?{_NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_NUMBER}))?$"

#: keywords kept from Kubernetes' schemas; everything else (default, x-kubernetes-list-type, patch strategies,
#: unions, group-version-kind) is dropped
_KEEP = ("type", "description", "format", "required", "properties", "items", "additionalProperties")
#: formats a CRD schema may carry (the others are dropped)
_FORMATS = {"int32", "int64", "float", "double", "byte", "date", "date-time", "password"}


def _ref_name(node: Mapping[str, Any]) -> str | None:
    """The schema a node refers to: ``$ref`` directly or Kubernetes' ``allOf: [{$ref}]`` wrapper."""
    if "$ref" in node:
        return str(node["$ref"]).rsplit("/", 1)[-1]
    all_of = node.get("allOf")
    if isinstance(all_of, list) and len(all_of) == 1 and "$ref" in all_of[0]:
        return str(all_of[0]["$ref"]).rsplit("/", 1)[-1]
    return None


def _refs(node: Any) -> Iterable[str]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "$ref":
                yield str(value).rsplit("/", 1)[-1]
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def trim(document: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The part of Kubernetes' ``/api/v1`` OpenAPI v3 document that :data:`ROOTS` reach."""
    schemas = document["components"]["schemas"]
    keep: dict[str, Any] = {}
    todo = [CORE + name for name in ROOTS]
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = schemas[name]
        if name != OBJECT_META:  # a nested ObjectMeta becomes free-form: what it references is not needed
            todo.extend(_refs(schemas[name]))
    return {"source": source, "schemas": dict(sorted(keep.items()))}


def dump(trimmed: Mapping[str, Any]) -> str:
    return json.dumps(trimmed, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


@lru_cache(maxsize=1)
def vendored() -> dict[str, Any]:
    return json.loads(VENDORED.read_text())


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _convert(node: Mapping[str, Any], schemas: Mapping[str, Any]) -> dict[str, Any]:
    ref = _ref_name(node)
    if ref is not None:
        target = _special(ref, schemas)
        # the referring node's description says what this field is; the target's, what the type is
        return {**target, **({"description": _one_line(node["description"])} if "description" in node else {})}
    out: dict[str, Any] = {}
    for key in _KEEP:
        if key not in node:
            continue
        value = node[key]
        if key == "properties":
            value = {name: _convert(prop, schemas) for name, prop in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, Mapping):
            value = _convert(value, schemas)
        elif key == "description":
            value = _one_line(value)
        elif key == "format" and value not in _FORMATS:
            continue
        elif key == "required":
            value = list(value)
        out[key] = value
    return out


def _special(name: str, schemas: Mapping[str, Any]) -> dict[str, Any]:
    if name == QUANTITY:
        return {"description": "A Kubernetes quantity such as 500m, 1Gi or 2 (not negative).",
                "x-kubernetes-int-or-string": True, "minimum": 0, "pattern": NON_NEGATIVE_QUANTITY}
    if name == INT_OR_STRING:
        return {"description": _one_line(schemas[name].get("description", "")), "x-kubernetes-int-or-string": True}
    if name == OBJECT_META:
        return {"type": "object", "description": "Standard object metadata.", "x-kubernetes-preserve-unknown-fields": True}
    return _convert(schemas[name], schemas)


#: Top-level properties the template cannot use: a container's resource ``claims`` name entries of the
#: pod's ``resourceClaims``, which the template does not set.
DROPPED: dict[str, tuple[str, ...]] = {"ResourceRequirements": ("claims",)}

#: What Pod validation refuses that the published schema does not say: empty names and mount paths.
NON_EMPTY: dict[str, tuple[str, ...]] = {"EnvVar": ("name",), "Volume": ("name",), "VolumeMount": ("name", "mountPath")}


#: Names Pod validation holds to a pattern the published schema does not carry: a volume's name is a DNS label.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_LABELS: dict[str, tuple[str, ...]] = {"Volume": ("name",)}


def structural(type_name: str) -> dict[str, Any]:
    """The structural CRD schema of core type ``type_name`` (one of :data:`ROOTS`, e.g. ``"EnvVar"``)."""
    schema = copy.deepcopy(_special(CORE + type_name, vendored()["schemas"]))
    props = schema.get("properties", {})
    for name in DROPPED.get(type_name, ()):
        props.pop(name, None)
    for name in NON_EMPTY.get(type_name, ()):
        props[name]["minLength"] = 1
    for name in DNS_LABELS.get(type_name, ()):
        props[name].update(maxLength=63, pattern=DNS_LABEL)
    return schema


def pinned_module(go_module_dir: Path) -> tuple[Path, str]:
    """(directory, version) of the k8s.io/kubernetes module that ``go_module_dir``'s go.mod pins
    (``local/kube``), from the Go module cache (``make kube`` fills it; otherwise Go fetches it)."""
    result = subprocess.run(["go", "mod", "download", "-json", "k8s.io/kubernetes"], cwd=go_module_dir,
                            capture_output=True, text=True, check=True, timeout=600)
    info = json.loads(result.stdout)
    return Path(info["Dir"]), str(info["Version"])


def fresh(module_dir: Path, version: str) -> str:
    """The text :data:`VENDORED` should hold, made from the k8s.io/kubernetes module at ``module_dir``."""
    document = json.loads((module_dir / SOURCE_PATH).read_text())
    return dump(trim(document, f"k8s.io/kubernetes@{version} {SOURCE_PATH}"))


def refresh(module_dir: Path, version: str, target: Path = VENDORED) -> bool:
    """Rewrite the vendored document from the k8s.io/kubernetes module at ``module_dir``; True when it changed."""
    text = fresh(module_dir, version)
    if target.exists() and target.read_text() == text:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return True
