"""Custom resources on the embedded API server: CRD registration, schema defaults and validation
(OpenAPI + CEL), status subresource, printer-column Tables, /scale, OpenAPI documents, and the
project's real TrainingJob CRD."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from loco_local.apiserver import APIServer

REPO = Path(__file__).resolve().parents[1]
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
WIDGETS = "/apis/example.dev/v1/namespaces/default/widgets"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.dev"},
    "spec": {
        "group": "example.dev",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wg"]},
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.replicas",
                                                     "statusReplicasPath": ".status.replicas",
                                                     "labelSelectorPath": ".status.selector"}},
            "additionalPrinterColumns": [
                {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "description": "A Widget is a test object.",
                "properties": {
                    "spec": {
                        "type": "object",
                        "description": "Desired state of the widget.",
                        "x-kubernetes-validations": [{
                            "rule": "!has(self.elastic) || !has(self.elastic.minReplicas) "
                                    "|| self.elastic.minReplicas <= self.replicas",
                            "message": "elastic.minReplicas must be <= replicas"}],
                        "properties": {
                            "replicas": {"type": "integer", "minimum": 1, "default": 1,
                                         "description": "Number of workers."},
                            "color": {"type": "string", "enum": ["red", "blue"], "default": "red"},
                            "elastic": {"type": "object", "properties": {"minReplicas": {"type": "integer"}}},
                            "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        },
                    },
                    "status": {"type": "object", "properties": {
                        "phase": {"type": "string"}, "replicas": {"type": "integer"}, "selector": {"type": "string"}}},
                },
            }},
        }],
    },
}


def widget(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
async def server():
    srv = APIServer(port=0)
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def call(server):
    async with aiohttp.ClientSession(headers=server.auth_headers) as session:
        async def request(method: str, path: str, body: Any = None, content_type: str = "application/json",
                          accept: str = "application/json") -> tuple[int, Any]:
            async with session.request(method, server.url + path, data=None if body is None else json.dumps(body),
                                       headers={"Content-Type": content_type, "Accept": accept}) as resp:
                return resp.status, await resp.json()
        yield request


@pytest.fixture
async def widgets(call):
    status, body = await call("POST", CRDS, WIDGET_CRD)
    assert status == 201, body
    return call


async def test_posting_a_crd_registers_its_kind_for_discovery(widgets):
    status, crd = await widgets("GET", f"{CRDS}/widgets.example.dev")
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions == {"NamesAccepted": "True", "Established": "True"}
    status, resources = await widgets("GET", "/apis/example.dev/v1")
    entries = {r["name"]: r for r in resources["resources"]}
    assert entries["widgets"]["kind"] == "Widget" and entries["widgets"]["shortNames"] == ["wg"]
    assert "widgets/status" in entries and entries["widgets/scale"]["kind"] == "Scale"
    status, groups = await widgets("GET", "/apis")
    assert "example.dev" in {g["name"] for g in groups["groups"]}


async def test_custom_resource_gets_schema_defaults(widgets):
    status, created = await widgets("POST", WIDGETS, widget("w", extra={"free": [1, 2]}))
    assert status == 201, created
    assert created["spec"] == {"replicas": 1, "color": "red", "extra": {"free": [1, 2]}}


async def test_schema_and_cel_errors_name_each_field_and_store_nothing(widgets):
    status, body = await widgets("POST", WIDGETS, widget("bad", replicas=0, elastic={"minReplicas": 3}))
    assert status == 422 and body["reason"] == "Invalid"
    assert body["message"] == (
        'Widget.example.dev "bad" is invalid: [spec.replicas: Invalid value: 0: spec.replicas in body should be '
        'greater than or equal to 1, spec: Invalid value: "object": elastic.minReplicas must be <= replicas]')
    assert [c["field"] for c in body["details"]["causes"]] == ["spec.replicas", "spec"]
    status, _ = await widgets("GET", f"{WIDGETS}/bad")
    assert status == 404


async def test_type_and_enum_errors(widgets):
    status, body = await widgets("POST", WIDGETS, widget("bad", replicas="two", color="green"))
    assert status == 422
    messages = [c["message"] for c in body["details"]["causes"]]
    assert any("must be of type integer" in m for m in messages)
    assert any('Unsupported value: "green"' in m for m in messages)


async def test_unknown_fields_are_rejected_when_strict_and_pruned_with_a_warning_otherwise(widgets, server):
    status, body = await widgets("POST", f"{WIDGETS}?fieldValidation=Strict", widget("bad", replicas=1, colour="red"))
    assert status == 400 and 'unknown field "spec.colour"' in body["message"]
    assert (await widgets("GET", f"{WIDGETS}/bad"))[0] == 404
    async with aiohttp.ClientSession(headers=server.auth_headers) as session:  # no fieldValidation: kube-apiserver's default (Warn)
        async with session.post(server.url + WIDGETS, json=widget("pruned", colour="red", extra={"kept": 1})) as resp:
            created = await resp.json()
            assert resp.status == 201 and resp.headers["Warning"] == '299 - "unknown field \\"spec.colour\\""'
    assert "colour" not in created["spec"] and created["spec"]["extra"] == {"kept": 1}


async def test_update_is_validated_too(widgets):
    await widgets("POST", WIDGETS, widget("w", replicas=2))
    status, body = await widgets("PATCH", f"{WIDGETS}/w", {"spec": {"elastic": {"minReplicas": 5}}},
                                 "application/merge-patch+json")
    assert status == 422 and body["details"]["causes"][0]["field"] == "spec"
    status, current = await widgets("GET", f"{WIDGETS}/w")
    assert "elastic" not in current["spec"]


async def test_status_subresource_isolation_and_generation(widgets):
    _, created = await widgets("POST", WIDGETS, {**widget("w", replicas=2), "status": {"phase": "Ignored"}})
    assert "status" not in created
    _, written = await widgets("PATCH", f"{WIDGETS}/w/status", {"status": {"phase": "Running"}, "spec": {"replicas": 9}},
                               "application/merge-patch+json")
    assert written["status"] == {"phase": "Running"} and written["spec"]["replicas"] == 2
    assert written["metadata"]["generation"] == 1
    _, updated = await widgets("PATCH", f"{WIDGETS}/w", {"spec": {"replicas": 3}, "status": {"phase": "X"}},
                               "application/merge-patch+json")
    assert updated["status"] == {"phase": "Running"} and updated["metadata"]["generation"] == 2
    status, _ = await widgets("PATCH", f"{WIDGETS}/w", {"spec": {"replicas": 4}},
                              "application/strategic-merge-patch+json")
    assert status == 415  # as in Kubernetes: custom resources take merge or JSON patches


async def test_table_uses_printer_columns(widgets):
    await widgets("POST", WIDGETS, widget("w", replicas=2))
    await widgets("PATCH", f"{WIDGETS}/w/status", {"status": {"phase": "Running"}}, "application/merge-patch+json")
    status, body = await widgets("GET", WIDGETS, accept=TABLE)
    assert [c["name"] for c in body["columnDefinitions"]] == ["Name", "Replicas", "Phase", "Age"]
    name, replicas, phase, age = body["rows"][0]["cells"]
    assert (name, replicas, phase) == ("w", 2, "Running") and age.endswith("s")


async def test_scale_subresource_maps_replica_paths(widgets):
    await widgets("POST", WIDGETS, widget("w", replicas=2))
    await widgets("PATCH", f"{WIDGETS}/w/status", {"status": {"replicas": 2, "selector": "app=w"}},
                  "application/merge-patch+json")
    status, scale = await widgets("GET", f"{WIDGETS}/w/scale")
    assert scale["kind"] == "Scale" and scale["apiVersion"] == "autoscaling/v1"
    assert scale["spec"] == {"replicas": 2} and scale["status"] == {"replicas": 2, "selector": "app=w"}
    scale["spec"]["replicas"] = 5
    status, scaled = await widgets("PUT", f"{WIDGETS}/w/scale", scale)
    assert status == 200 and scaled["spec"]["replicas"] == 5
    status, scaled = await widgets("PATCH", f"{WIDGETS}/w/scale", {"spec": {"replicas": 4}},
                                   "application/merge-patch+json")
    _, current = await widgets("GET", f"{WIDGETS}/w")
    assert current["spec"]["replicas"] == 4
    status, body = await widgets("PATCH", f"{WIDGETS}/w/scale", {"spec": {"replicas": 0}},
                                 "application/merge-patch+json")
    assert status == 422  # the custom resource's own schema still applies (minimum 1)


async def test_openapi_documents_describe_the_crd(widgets):
    status, root = await widgets("GET", "/openapi/v3")
    url = root["paths"]["apis/example.dev/v1"]["serverRelativeURL"]
    status, doc = await widgets("GET", url.split("?")[0])
    schema = doc["components"]["schemas"]["dev.example.v1.Widget"]
    assert schema["properties"]["spec"]["properties"]["replicas"]["description"] == "Number of workers."
    assert schema["x-kubernetes-group-version-kind"] == [{"group": "example.dev", "version": "v1", "kind": "Widget"}]
    patch_op = doc["paths"]["/apis/example.dev/v1/namespaces/{namespace}/widgets/{name}"]["patch"]
    assert any(p["name"] == "fieldValidation" for p in patch_op["parameters"])


async def test_deleting_the_crd_removes_its_kind_and_objects(widgets):
    await widgets("POST", WIDGETS, widget("w"))
    status, _ = await widgets("DELETE", f"{CRDS}/widgets.example.dev")
    assert status == 200
    status, _ = await widgets("GET", "/apis/example.dev/v1")
    assert status == 404
    status, _ = await widgets("POST", CRDS, WIDGET_CRD)
    status, listed = await widgets("GET", WIDGETS)
    assert listed["items"] == []


async def test_cluster_scoped_crd_serves_objects_without_namespace(call):
    crd = copy.deepcopy(WIDGET_CRD)
    crd["metadata"]["name"] = "gadgets.example.dev"
    crd["spec"]["scope"] = "Cluster"
    crd["spec"]["names"] = {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"}
    status, body = await call("POST", CRDS, crd)
    assert status == 201, body
    status, created = await call("POST", "/apis/example.dev/v1/gadgets",
                                 {"apiVersion": "example.dev/v1", "kind": "Gadget", "metadata": {"name": "g"},
                                  "spec": {"replicas": 2}})
    assert status == 201 and "namespace" not in created["metadata"]
    status, _ = await call("GET", "/apis/example.dev/v1/gadgets/g")
    assert status == 200
    status, _ = await call("GET", "/apis/example.dev/v1/namespaces/default/gadgets/g")
    assert status == 404


async def test_crd_with_a_broken_rule_is_rejected(call):
    crd = copy.deepcopy(WIDGET_CRD)
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"] = [
        {"rule": "self.replicas >", "message": "broken"}]
    status, body = await call("POST", CRDS, crd)
    assert status == 422 and "x-kubernetes-validations[0].rule" in body["message"]


async def test_crd_whose_metadata_schema_says_more_than_name_rules_is_rejected_as_kube_apiserver_does(call):
    # found against the real kube-apiserver: the TrainingJob CRD's metadata schema carried a description
    crd = copy.deepcopy(WIDGET_CRD)
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["metadata"] = {
        "type": "object", "description": "Standard object metadata."}
    status, body = await call("POST", CRDS, crd)
    assert status == 422
    assert "openAPIV3Schema.properties[metadata]: Forbidden: must not specify anything other than name and " \
           "generateName" in body["message"]
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["metadata"] = {"type": "object"}
    status, _ = await call("POST", CRDS, crd)
    assert status == 201


async def test_crd_whose_rule_fails_on_a_default_value_is_rejected_as_kube_apiserver_does(call):
    # kube-apiserver checks each default as written, nested defaults not applied (found with the TrainingJob CRD)
    crd = copy.deepcopy(WIDGET_CRD)
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["default"] = {}
    spec["x-kubernetes-validations"] = [{"rule": "self.replicas >= 1", "message": "needs replicas"}]
    status, body = await call("POST", CRDS, crd)
    assert status == 422
    assert "spec.validation.openAPIV3Schema.properties[spec].default" in body["message"], body["message"]
    spec["x-kubernetes-validations"] = [{"rule": "!has(self.replicas) || self.replicas >= 1", "message": "m"}]
    status, _ = await call("POST", CRDS, crd)
    assert status == 201


TRAININGJOB_CRD = REPO / "crds" / "trainingjob.yaml"
POPULATION_CRD = REPO / "crds" / "population.yaml"
QUICKSTART = REPO / "examples" / "quickstart.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.skipif(not TRAININGJOB_CRD.exists(), reason="crds/trainingjob.yaml not generated yet")
async def test_real_trainingjob_crd_accepts_the_example_and_rejects_a_bad_job(call):
    crd = yaml.safe_load(TRAININGJOB_CRD.read_text())
    status, body = await call("POST", CRDS, crd)
    assert status == 201, body
    jobs = "/apis/loco.dev/v1alpha1/namespaces/default/trainingjobs"
    example = next(d for d in yaml.safe_load_all(QUICKSTART.read_text()) if d and d["kind"] == "TrainingJob")
    status, created = await call("POST", jobs, example)
    assert status == 201, created
    bad = copy.deepcopy(example)
    bad["metadata"]["name"] = "bad"
    bad["spec"]["replicas"] = 0
    status, body = await call("POST", jobs, bad)
    assert status == 422 and "spec.replicas" in [c["field"] for c in body["details"]["causes"]]
    assert body["message"].startswith('TrainingJob.loco.dev "bad" is invalid: ')
    status, _ = await call("GET", f"{jobs}/bad")
    assert status == 404
    long_name = copy.deepcopy(example)
    long_name["metadata"]["name"] = "x" * 60  # root-level CEL rule on self.metadata.name
    status, body = await call("POST", jobs, long_name)
    assert status == 422 and "at most 51 characters" in body["message"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
async def test_every_example_trainingjob_is_accepted_by_the_real_crd(call, path):
    """What `kubectl apply -f examples/<file>` sends: the CRD's schema and CEL rules accept it."""
    for crd in (TRAININGJOB_CRD, POPULATION_CRD):
        status, body = await call("POST", CRDS, yaml.safe_load(crd.read_text()))
        assert status == 201, body
    plurals = {"TrainingJob": "trainingjobs", "Population": "populations"}
    objects = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] in plurals]
    assert objects, f"{path.name} holds no TrainingJob or Population"
    for obj in objects:
        status, created = await call("POST", f"/apis/loco.dev/v1alpha1/namespaces/default/{plurals[obj['kind']]}", obj)
        assert status == 201, created


async def test_the_population_crd_refuses_a_bad_template_and_any_change_to_the_spec(call):
    for crd in (TRAININGJOB_CRD, POPULATION_CRD):
        status, body = await call("POST", CRDS, yaml.safe_load(crd.read_text()))
        assert status == 201, body
    pops = "/apis/loco.dev/v1alpha1/namespaces/default/populations"
    example = next(d for d in yaml.safe_load_all((REPO / "examples" / "population-local.yaml").read_text())
                   if d and d["kind"] == "Population")
    bad = copy.deepcopy(example)
    bad["metadata"]["name"] = "bad"
    bad["spec"]["template"]["nprocPerWorker"] = 2  # the TrainingJob's CEL rule, inside the template
    bad["spec"]["template"]["algorithm"]["name"] = "co2"
    status, body = await call("POST", pops, bad)
    assert status == 422 and "spec.template.nprocPerWorker" in [c["field"] for c in body["details"]["causes"]], body
    bad = copy.deepcopy(example)
    bad["metadata"]["name"] = "bad"
    bad["spec"]["size"] = 1
    status, body = await call("POST", pops, bad)
    assert status == 422 and "spec.size" in [c["field"] for c in body["details"]["causes"]], body
    for field, value in (("checkpoint", {"initFrom": {"jobName": "pretrained"}}),
                         ("runPolicy", {"ttlSecondsAfterFinished": 60})):
        bad = copy.deepcopy(example)
        bad["metadata"]["name"] = "bad"
        bad["spec"]["template"][field] = {**bad["spec"]["template"].get(field, {}), **value}
        status, body = await call("POST", pops, bad)
        assert status == 422 and f"spec.template.{field}.{next(iter(value))}" in \
            [c["field"] for c in body["details"]["causes"]], body
    bad = copy.deepcopy(example)
    bad["metadata"]["name"] = "p" * 42
    status, body = await call("POST", pops, bad)
    assert status == 422 and "at most 41 characters" in body["message"], body
    status, created = await call("POST", pops, example)
    assert status == 201, created
    changed = {"spec": {"size": 6}}
    status, body = await call("PATCH", f"{pops}/{example['metadata']['name']}", changed,
                              content_type="application/merge-patch+json")
    assert status == 422 and "spec is immutable" in body["message"], body



async def test_the_templates_kubernetes_objects_are_typed_so_the_api_refuses_what_pod_validation_would(call):
    """The failures of issue 30 (2): env, resources, volumes... were free-form, so the API took what every worker
    pod would be refused for, and the job only learnt of it at pod creation. Now the API names each field."""
    status, body = await call("POST", CRDS, yaml.safe_load(TRAININGJOB_CRD.read_text()))
    assert status == 201, body
    jobs = "/apis/loco.dev/v1alpha1/namespaces/default/trainingjobs"
    template = {"env": [{"name": "", "value": 1}, {"value": "x"}],
                "resources": {"limits": {"memory": -1, "cpu": "lots"}, "requests": {"memory": "-1Gi"}},
                "tolerations": [{"key": "k", "tolerationSeconds": "soon"}],
                "volumeMounts": [{"name": "data"}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": 7}}],
                "affinity": {"nodeAffinity": "anywhere"}}
    status, body = await call("POST", jobs, {"apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob",
                                             "metadata": {"name": "typed"}, "spec": {"template": template}})
    assert status == 422, body
    fields = {c["field"] for c in body["details"]["causes"]}
    assert {"spec.template.env[0].name", "spec.template.env[0].value", "spec.template.env[1].name",
            "spec.template.resources.limits.memory", "spec.template.resources.limits.cpu",
            "spec.template.resources.requests.memory", "spec.template.tolerations[0].tolerationSeconds",
            "spec.template.volumeMounts[0].mountPath", "spec.template.volumes[0].persistentVolumeClaim.claimName",
            "spec.template.affinity.nodeAffinity"} <= fields
    status, _ = await call("GET", f"{jobs}/typed")
    assert status == 404

    # what Pod validation takes, the API takes: quantities as numbers or strings, a real volume, a toleration
    good = {"env": [{"name": "A", "value": "1"}, {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
            "resources": {"limits": {"memory": "2Gi", "cpu": 2, "nvidia.com/gpu": "1"}, "requests": {"cpu": "500m"}},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30}],
            "volumes": [{"name": "data", "emptyDir": {"sizeLimit": "1Gi"}, "junk": True}],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}}
    status, created = await call("POST", jobs, {"apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob",
                                                "metadata": {"name": "typed"}, "spec": {"template": good}})
    assert status == 201, created
    # an unknown key inside a Kubernetes object is pruned, as kube-apiserver prunes it from a Pod
    assert created["spec"]["template"]["volumes"] == [{"name": "data", "emptyDir": {"sizeLimit": "1Gi"}}]


async def test_a_rule_on_number_fields_written_as_integers_compares_them_as_numbers(call):
    """kube-apiserver's CEL types a `number` field as a double whatever the JSON wrote: `5 >= 6.0` is a verdict,
    not "no matching overload" (the embedded server compared an int with a double and failed the rule's evaluation)."""
    status, body = await call("POST", CRDS, yaml.safe_load(TRAININGJOB_CRD.read_text()))
    assert status == 201, body
    jobs = "/apis/loco.dev/v1alpha1/namespaces/default/trainingjobs"

    def job(name: str, detection: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
                "spec": {"faultDetection": detection}}

    status, body = await call("POST", jobs, job("early", {"warmupHangTimeoutSeconds": 5, "hangTimeoutFloorSeconds": 6}))
    assert status == 422 and "evaluation error" not in body["message"], body["message"]
    assert [c["field"] for c in body["details"]["causes"]] == ["spec.faultDetection.warmupHangTimeoutSeconds"]
    status, body = await call("POST", jobs, job("fine", {"warmupHangTimeoutSeconds": 300, "hangTimeoutFloorSeconds": 10}))
    assert status == 201, body
    status, body = await call("POST", jobs, job("greedy", {"consecutive": 40, "window": 32}))
    assert status == 422 and [c["field"] for c in body["details"]["causes"]] == ["spec.faultDetection.consecutive"]


async def test_a_failure_policy_the_job_api_would_refuse_is_refused_naming_the_field(call):
    crd = yaml.safe_load(TRAININGJOB_CRD.read_text())
    assert (await call("POST", CRDS, crd))[0] == 201
    jobs = "/apis/loco.dev/v1alpha1/namespaces/default/trainingjobs"
    example = next(d for d in yaml.safe_load_all(QUICKSTART.read_text()) if d and d["kind"] == "TrainingJob")
    rules_path = "spec.runPolicy.failurePolicy.rules"
    for name, rule, field, words in [
        ("dup", {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2, 80, 2]}},
         f"{rules_path}[0].onExitCodes.values[2]", "Duplicate value: 2"),  # x-kubernetes-list-type: set
        ("both", {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [2]},
                  "onPodConditions": [{"type": "DisruptionTarget"}]}, rules_path, "exactly one of onExitCodes"),
        ("none", {"action": "Count"}, rules_path, "exactly one of onExitCodes"),
    ]:
        job = copy.deepcopy(example)
        job["metadata"]["name"] = name
        job["spec"].setdefault("runPolicy", {})["failurePolicy"] = {"rules": [rule]}
        status, body = await call("POST", jobs, job)
        assert status == 422 and [c["field"] for c in body["details"]["causes"]] == [field], body
        assert words in body["message"], body["message"]
    good = copy.deepcopy(example)
    good["spec"].setdefault("runPolicy", {})["failurePolicy"] = {"rules": [
        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2, 65]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}
    status, body = await call("POST", jobs, good)
    assert status == 201, body
    assert body["spec"]["runPolicy"]["failurePolicy"]["rules"][1]["onPodConditions"] == [
        {"type": "DisruptionTarget", "status": "True"}]  # defaulted
