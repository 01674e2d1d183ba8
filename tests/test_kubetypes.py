"""The template's Kubernetes core types: the vendored schemas are Kubernetes' own, and the CRD carries them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loco_operator import kubetypes
from loco_operator.crd import openapi_schema

REPO = Path(__file__).resolve().parents[1]
KUBE_MODULE = REPO / "local" / "kube"


def pinned_version() -> str:
    match = re.search(r"^\s*k8s\.io/kubernetes (v\S+)", (KUBE_MODULE / "go.mod").read_text(), re.M)
    assert match, "local/kube/go.mod pins no k8s.io/kubernetes"
    return match.group(1)


def test_the_vendored_schemas_come_from_the_kubernetes_version_the_control_plane_is_built_from():
    assert kubetypes.vendored()["source"] == f"k8s.io/kubernetes@{pinned_version()} {kubetypes.SOURCE_PATH}"


def test_the_vendored_schemas_are_exactly_the_trimmed_document_of_the_pinned_module():
    """`make kube` puts the module in Go's cache; bumping Kubernetes without `loco crds --refresh-core-types` fails here."""
    module_dir, version = kubetypes.pinned_module(KUBE_MODULE)
    assert version == pinned_version()
    assert kubetypes.VENDORED.read_text() == kubetypes.fresh(module_dir, version), \
        "operator/loco_operator/schemas/core-v1.json is stale: run `loco crds --refresh-core-types`"


def test_trim_keeps_what_the_roots_reach_and_nothing_else():
    ref = "#/components/schemas/"
    document = {"components": {"schemas": {
        kubetypes.CORE + root: {"type": "object", "properties": {"x": {"allOf": [{"$ref": ref + "dep"}]}}}
        for root in kubetypes.ROOTS} | {"dep": {"type": "string"}, "unrelated": {"type": "string"}}}}
    trimmed = kubetypes.trim(document, "test")
    assert set(trimmed["schemas"]) == {kubetypes.CORE + r for r in kubetypes.ROOTS} | {"dep"}


@pytest.mark.parametrize("quantity,ok", [("1Gi", True), ("500m", True), ("2", True), ("1e3", True), ("+1", True),
                                         ("0.5", True), ("-1Gi", False), ("-1", False), ("lots", False), ("1 Gi", False),
                                         ("", False)])
def test_a_quantity_must_be_a_non_negative_kubernetes_quantity(quantity, ok):
    assert bool(re.match(kubetypes.NON_NEGATIVE_QUANTITY, quantity)) is ok


def test_structural_inlines_references_and_drops_what_a_crd_may_not_hold():
    volume = kubetypes.structural("Volume")
    keys, stack = set(), [volume]
    while stack:
        node = stack.pop()
        keys |= set(node)
        stack += list(node.get("properties", {}).values())
        stack += [node[k] for k in ("items", "additionalProperties") if isinstance(node.get(k), dict)]
    assert keys <= {"type", "description", "format", "required", "properties", "items", "additionalProperties",
                    "minLength", "maxLength", "minimum", "pattern", "x-kubernetes-int-or-string",
                    "x-kubernetes-preserve-unknown-fields"}, keys
    assert volume["required"] == ["name"] and volume["properties"]["name"]["minLength"] == 1
    assert volume["properties"]["name"]["pattern"] == kubetypes.DNS_LABEL  # Pod validation: a DNS label
    pvc = volume["properties"]["persistentVolumeClaim"]
    assert pvc["required"] == ["claimName"] and pvc["properties"]["readOnly"]["type"] == "boolean"
    size = volume["properties"]["emptyDir"]["properties"]["sizeLimit"]
    assert size["x-kubernetes-int-or-string"] is True and size["pattern"] == kubetypes.NON_NEGATIVE_QUANTITY
    # a nested ObjectMeta (an ephemeral volume's claim template) is free-form, as controller-gen makes it
    meta = volume["properties"]["ephemeral"]["properties"]["volumeClaimTemplate"]["properties"]["metadata"]
    assert meta["x-kubernetes-preserve-unknown-fields"] is True
    assert "claims" not in kubetypes.structural("ResourceRequirements")["properties"]


def test_the_crd_carries_the_core_types_under_the_template():
    template = openapi_schema()["properties"]["spec"]["properties"]["template"]["properties"]
    assert template["env"]["items"]["required"] == ["name"]
    assert template["env"]["description"].startswith("Extra container environment variables")
    assert template["volumeMounts"]["items"]["properties"]["mountPath"]["minLength"] == 1
    assert template["resources"]["properties"]["limits"]["additionalProperties"]["minimum"] == 0
    assert template["affinity"]["nullable"] is True
