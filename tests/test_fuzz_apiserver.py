"""The embedded API server fuzzed by schemathesis against its own OpenAPI document (a bounded, derandomized
pass of bench/fuzz_apiserver.py): no 5xx, no hangs; plus regression tests for what the fuzzing found.

Found and fixed (each with a test below):

- the served documents declared neither the ``{namespace}``/``{name}`` path parameters nor request bodies,
  so they were not valid OpenAPI and a fuzzer could not build a request (openapi.py);
- a ``NaN`` or ``Infinity`` in a JSON body (Python's parser reads both) was stored and served back as
  ``NaN``, which is not JSON: every client of the kind (kubectl, the operator's Go-like clients) then
  failed to read the list (operations.py: 400 naming the field);
- an integer past int64 in a custom resource made every CEL rule fail with ``overflow``, each refusal
  blaming a field that was fine (validation.py: a 422 naming the field; rules are not evaluated on an
  object of the wrong types, as kube-apiserver does);
- metadata of the wrong type (a number for ``generateName`` or ``name``, labels that are not a string map)
  was a 500 (``'float' object is not subscriptable``), or was stored and broke later lists and garbage
  collection (operations.py: a 400, as kube-apiserver's decoder);
- a pod whose env value is not a string or whose resource quantity is negative or not a quantity was
  accepted (operations.py: 400 / 422 as kube-apiserver).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import requests

pytest.importorskip("schemathesis")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import fuzz_apiserver as fa  # noqa: E402

EXAMPLES = 4  # per operation, path variant and mode: ~350 cases, about 10 s on 2 busy cores
CMS = "/api/v1/namespaces/default/configmaps"
PODS = "/api/v1/namespaces/default/pods"
TJS = "/apis/loco.dev/v1alpha1/namespaces/default/trainingjobs"


@pytest.fixture(scope="module")
def running():
    with fa.running_server() as running:
        yield running


def send(running: fa.Running, method: str, path: str, raw: bytes | str | None = None,
         content_type: str = "application/json") -> tuple[int, dict]:
    r = requests.request(method, running.url + path, data=raw, timeout=10,
                         headers=running.headers | {"Content-Type": content_type})
    assert "NaN" not in r.text and "Infinity" not in r.text.replace('"Infinity', ""), r.text[:300]
    return r.status_code, r.json()


# ---- the document ------------------------------------------------------------------------------


def test_the_served_documents_are_openapi_a_fuzzer_can_drive(running):
    import schemathesis

    for group_version in fa.served_group_versions(running.url, running.headers):
        doc = requests.get(f"{running.url}/openapi/v3/{group_version}", headers=running.headers, timeout=10).json()
        assert doc["components"]["securitySchemes"]["BearerToken"]["in"] == "header"
        for path, item in doc["paths"].items():
            for verb, op in item.items():  # no watch: a fuzzer must not open streams (its requests time out anyway)
                assert verb == "parameters" or not {"watch", "follow"} & {p["name"] for p in op["parameters"]}
            declared = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
            assert declared == {n for n in ("namespace", "name") if f"{{{n}}}" in path}, path
            for verb in ("post", "put"):
                if verb in item:
                    ref = item[verb]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                    assert ref.split("/")[-1] in doc["components"]["schemas"], (path, ref)
    v2 = requests.get(f"{running.url}/openapi/v2", headers=running.headers, timeout=10).json()
    body = v2["paths"][f"{TJS.replace('/default/', '/{namespace}/')}"]["post"]["parameters"][0]
    assert body["in"] == "body" and body["schema"]["$ref"] == "#/definitions/dev.loco.v1alpha1.TrainingJob"
    for document in (fa.merged_document(running.url, running.headers), v2):
        schema = schemathesis.openapi.from_dict(document)
        operations = [result.ok() for result in schema.get_all_operations()]  # raises on an invalid operation
        assert len(operations) >= 24


def test_kubectl_still_finds_field_validation_on_patch(running):
    doc = requests.get(f"{running.url}/openapi/v3/apis/loco.dev/v1alpha1", headers=running.headers, timeout=10).json()
    patch = doc["paths"]["/apis/loco.dev/v1alpha1/namespaces/{namespace}/trainingjobs/{name}"]["patch"]
    assert any(p["name"] == "fieldValidation" for p in patch["parameters"])
    assert "application/merge-patch+json" in patch["requestBody"]["content"]


# ---- the fuzzing ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_fuzzing_configmaps_pods_namespaces_and_trainingjobs_finds_no_5xx_and_no_hang(running):
    schema = fa.load_schema(running, fa.CORE_KINDS)
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert {"POST /api/v1/namespaces/{namespace}/configmaps", "GET /api/v1/namespaces/{namespace}/pods/{name}",
            "DELETE /api/v1/namespaces/{name}",
            "PATCH /apis/loco.dev/v1alpha1/namespaces/{namespace}/trainingjobs/{name}"} <= labels
    started = time.monotonic()
    report = fa.fuzz(running, schema, EXAMPLES, request_timeout_s=5.0)
    assert [f.line() for f in report.findings] == []
    assert report.cases >= 300, report.cases
    assert report.slowest_s < 5.0
    assert {200, 404, 422} <= set(report.statuses), report.statuses  # the cases reached past the door
    print(f"{report.cases} cases, {report.operations} operations, {time.monotonic() - started:.1f} s, "
          f"statuses {dict(report.statuses)}")


# ---- regressions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_non_finite_number_is_a_400_naming_the_field_and_never_stored(running, literal):
    raw = f'{{"metadata":{{"name":"nan"}},"data":{{"k":"v"}},"binaryData":null,"x":{{"y":[1,{literal}]}}}}'
    status, body = send(running, "POST", CMS, raw)
    assert status == 400 and "x.y[1]" in body["message"] and "not a JSON number" in body["message"]
    raw = ('{"apiVersion":"loco.dev/v1alpha1","kind":"TrainingJob","metadata":{"name":"nan"},'
           f'"spec":{{"algorithm":{{"name":"diloco","outerLr":{literal}}}}}}}')
    status, body = send(running, "POST", TJS, raw)
    assert status == 400 and "spec.algorithm.outerLr" in body["message"]
    status, _ = send(running, "POST", CMS, json.dumps({"metadata": {"name": "finite"}, "data": {"k": "v"}}))
    assert status in (201, 409)
    for content_type, patch in (("application/merge-patch+json", f'{{"data":{{"n":{literal}}}}}'),
                                ("application/json-patch+json", f'[{{"op":"add","path":"/x","value":{literal}}}]')):
        status, body = send(running, "PATCH", f"{CMS}/finite", patch, content_type)
        assert status == 400 and "not a JSON number" in body["message"], body
    status, listed = send(running, "GET", CMS)  # send() asserts the answer is JSON without NaN
    assert status == 200


@pytest.mark.parametrize("value", [-2**63 - 1, 2**63, 10**30])
def test_an_integer_past_int64_is_refused_on_its_own_field_not_by_every_rule(running, value):
    spec = {"training": {"seed": value}}
    status, body = send(running, "POST", TJS, json.dumps(
        {"apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "big"}, "spec": spec}))
    assert status == 422
    fields = [c["field"] for c in body["details"]["causes"]]
    assert "spec.training.seed" in fields and "64-bit" in body["message"]
    assert "rule evaluation error" not in body["message"] and "overflow" not in body["message"]
    status, body = send(running, "POST", TJS, json.dumps(
        {"apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "huge"},
         "spec": {"model": {"kwargs": {"n": value}}}}))  # free-form fields too: no Go client could read it back
    assert status == 422 and [c["field"] for c in body["details"]["causes"]][0] == "spec.model.kwargs.n"


def test_a_wrong_type_skips_the_rules_as_kube_apiserver_does(running):
    status, body = send(running, "POST", TJS, json.dumps(
        {"apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "typed"},
         "spec": {"replicas": "two", "elastic": {"minReplicas": 3, "maxReplicas": 1}}}))
    assert status == 422
    messages = [c["message"] for c in body["details"]["causes"]]
    assert any("spec.replicas in body must be of type integer" in m for m in messages)
    assert not any("minReplicas must be <=" in m for m in messages)
    assert any("some validation rules were not checked" in m for m in messages)
    # the causes as kube-apiserver words them (e2e/test_api_differential.py holds the two side by side)
    reasons = {c["field"]: c["reason"] for c in body["details"]["causes"]}
    assert reasons["spec.replicas"] == "FieldValueTypeInvalid" and reasons["<nil>"] == "FieldValueInvalid"


def pod(name: str, **container: object) -> str:
    return json.dumps({"metadata": {"name": name},
                       "spec": {"containers": [{"name": "main", "image": "loco", **container}]}})


@pytest.mark.parametrize("container, status, where", [
    ({"env": [{"name": "A", "value": 1}]}, 400, "spec.containers[0].env[0].value"),
    ({"env": ["A=1"]}, 400, "spec.containers[0].env[0]"),
    ({"env": [{"name": "", "value": "x"}]}, 422, "spec.containers[0].env[0].name: Required value"),
    ({"resources": {"limits": {"memory": -1}}}, 422, "spec.containers[0].resources.limits[memory]"),
    ({"resources": {"requests": {"cpu": "-500m"}}}, 422, "spec.containers[0].resources.requests[cpu]"),
    ({"resources": {"limits": {"memory": "lots"}}}, 400, "spec.containers[0].resources.limits[memory]"),
    ({"resources": {"limits": {"memory": True}}}, 400, "spec.containers[0].resources.limits[memory]"),
])
def test_pods_kube_apiserver_would_refuse_are_refused(running, container, status, where):
    code, body = send(running, "POST", f"{PODS}?dryRun=All", pod("bad", **container))
    assert (code, where in body["message"]) == (status, True), body["message"]


def test_pods_with_ordinary_env_and_quantities_are_still_accepted(running):
    container = {"env": [{"name": "A", "value": "1"}, {"name": "B", "valueFrom": {"fieldRef": {"fieldPath": "x"}}},
                         {"name": "C"}],
                 "resources": {"limits": {"memory": "1Gi", "cpu": 2, "nvidia.com/gpu": 1, "ephemeral-storage": "1e3"},
                               "requests": {"memory": "512Mi", "cpu": "500m", "x": 0.5}}}
    code, body = send(running, "POST", f"{PODS}?dryRun=All", pod("good", **container))
    assert code == 201, body


@pytest.mark.parametrize("meta", [{"generateName": 1.5}, {"name": 5}, {"name": "m", "labels": {"a": 1}},
                                  {"name": "m", "labels": ["a"]}, {"name": "m", "annotations": {"a": 2}},
                                  {"name": "m", "finalizers": "x"}, {"name": "m", "ownerReferences": [{"uid": 1}]},
                                  {"name": "m", "namespace": ["default"]}])
def test_metadata_of_the_wrong_type_is_a_400_not_a_500(running, meta):
    for path in (CMS, PODS, TJS, "/api/v1/namespaces"):
        status, body = send(running, "POST", path, json.dumps({"metadata": meta, "spec": {}}))
        assert status == 400 and "ObjectMeta.metadata." in body["message"], (path, body)
    send(running, "POST", CMS, json.dumps({"metadata": {"name": "labelled"}}))
    status, body = send(running, "PATCH", f"{CMS}/labelled", json.dumps({"metadata": {"labels": {"a": 1}}}),
                        "application/merge-patch+json")
    assert status == 400, body
    assert send(running, "GET", f"{CMS}?labelSelector=a%3D1")[0] == 200
