"""The generated CRD: structural, described, with subresources, columns and CEL rules that agree
with the operator's own validation; and the committed file matches the models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from click.testing import CliRunner

from loco_operator.cli import crds
from loco_operator.crd import CRD_PATH, apply_defaults, build_crd, openapi_schema, render_crd_yaml
from loco_operator.rules import RULES
from loco_operator.validation import validate_job

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {
    "type", "description", "default", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "minItems", "maxItems", "format", "required", "nullable", "properties",
    "items", "additionalProperties", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
    "x-kubernetes-validations", "x-kubernetes-list-type",
}


def walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for name, prop in node.get("properties", {}).items():
        yield from walk(prop, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural_and_described():
    schema = openapi_schema()
    for path, node in walk(schema):
        assert set(node) <= ALLOWED, f"{path}: unsupported keywords {set(node) - ALLOWED}"
        free = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
        assert node.get("type") or free, f"{path}: no type"
        assert not ("properties" in node and "additionalProperties" in node), f"{path}: properties + additionalProperties"
        if path == ".metadata":
            # kube-apiserver refuses any keyword but type here (kubectl explain describes ObjectMeta itself)
            assert node == {"type": "object"}, f"{path}: {node}"
        elif path.count(".") >= 1 and not path.endswith("]") and not path.endswith("}"):
            assert node.get("description"), f"{path}: no description (kubectl explain would be empty)"
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(bound, True), bool), f"{path}: {bound} must be boolean in OpenAPI v3.0"


def test_schema_translates_optionals_enums_defaults_and_free_form():
    spec = openapi_schema()["properties"]["spec"]["properties"]
    alg = spec["algorithm"]["properties"]
    assert alg["name"]["enum"] == ["ddp", "diloco", "streaming-diloco", "noloco", "co2"]
    assert alg["name"]["default"] == "diloco"
    assert alg["syncEvery"] == {
        "type": "integer", "description": alg["syncEvery"]["description"], "minimum": 1, "nullable": True,
    }
    assert alg["outerLr"]["minimum"] == 0.0 and alg["outerLr"]["exclusiveMinimum"] is True
    assert spec["replicas"]["default"] == 2
    assert spec["model"]["default"] == {} and spec["model"]["properties"]["gpt"]["default"] == {}
    assert spec["elastic"].get("nullable") is True and "default" not in spec["elastic"]
    tpl = spec["template"]["properties"]
    assert spec["model"]["properties"]["kwargs"]["x-kubernetes-preserve-unknown-fields"] is True
    # the template's Kubernetes objects carry Kubernetes' own schemas (typed, not free-form)
    assert tpl["affinity"]["nullable"] is True and "nodeAffinity" in tpl["affinity"]["properties"]
    assert tpl["tolerations"]["items"]["properties"]["tolerationSeconds"] == {
        "type": "integer", "description": tpl["tolerations"]["items"]["properties"]["tolerationSeconds"]["description"],
        "format": "int64"}
    assert tpl["nodeSelector"]["additionalProperties"] == {"type": "string"}
    # API-server defaulting fills the whole tree from an empty spec
    defaulted = apply_defaults(openapi_schema(), {"spec": {}})["spec"]
    assert defaulted["model"]["gpt"]["blockSize"] == 256 and defaulted["runPolicy"]["backoffLimit"] == 3


def test_crd_names_subresources_and_columns():
    crd = build_crd()
    assert crd["metadata"]["name"] == "trainingjobs.loco.dev"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("TrainingJob", "trainingjobs", ["tj"])
    assert crd["spec"]["scope"] == "Namespaced"
    (version,) = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {
        "status": {},
        "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.workers.ready",
                  "labelSelectorPath": ".status.selector"},
    }
    cols = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(cols) == ["Phase", "Workers", "Step", "Progress", "ETA", "Loss", "Algorithm", "Restarts", "Age", "Checkpoint",
                          "Tokens/s"]
    assert cols["Workers"]["jsonPath"] == ".status.workersReady"
    assert cols["Checkpoint"]["priority"] == 1 and cols["Tokens/s"]["priority"] == 1
    # every column's JSONPath points at a field of the schema
    schema = version["schema"]["openAPIV3Schema"]
    for col in cols.values():
        if col["jsonPath"].startswith(".metadata"):
            continue
        node = schema
        for part in col["jsonPath"].strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == col["type"] or (col["type"] == "number" and node["type"] == "number")


def test_cel_rules_are_in_the_crd_with_field_and_fix():
    schema = openapi_schema()
    found = {}
    for path, node in walk(schema):
        for rule in node.get("x-kubernetes-validations", []):
            found[(path, rule["rule"])] = rule
    assert len(found) == len(RULES)
    gpt_rules = [r for (p, _), r in found.items() if p == ".spec.model.gpt"]
    assert gpt_rules[0]["rule"] == "!(has(self.nEmbd) && has(self.nHead)) || (self.nEmbd % self.nHead == 0)"
    assert gpt_rules[0]["fieldPath"] == ".nEmbd"
    for rule in found.values():
        assert ":" in rule["message"], rule  # "<field> must ...: <fix>"


CASES = [
    {},
    {"replicas": 3, "elastic": {"minReplicas": 2, "maxReplicas": 4}},
    {"replicas": 5, "elastic": {"maxReplicas": 4}},
    {"replicas": 1, "elastic": {"minReplicas": 2}},
    {"elastic": {"minReplicas": 4, "maxReplicas": 3}, "replicas": 4},
    {"training": {"seqLen": 512}},
    {"training": {"seqLen": 512}, "model": {"gpt": {"blockSize": 512}}},
    {"model": {"gpt": {"nEmbd": 66, "nHead": 4}}},
    {"model": {"name": "custom"}},
    {"model": {"name": "custom", "factory": "pkg.mod:build"}},
    {"model": {"name": "custom", "factory": "not a factory"}},
    {"model": {"factory": "pkg.mod:build"}},
    {"data": {"source": "shards"}},
    {"data": {"source": "shards", "path": "/data"}},
    {"algorithm": {"name": "ddp", "syncEvery": 10}},
    {"algorithm": {"name": "diloco", "groupSize": 2, "fragments": 3}},
    {"algorithm": {"name": "streaming-diloco", "fragments": 3, "quantization": "bf16"}},
    {"algorithm": {"name": "co2", "stalenessPenalty": 0.5, "nesterov": True}},
    {"algorithm": {"name": "co2", "stalenessPenalty": 0.5, "fragments": 2}},
    {"nprocPerWorker": 2},
    {"nprocPerWorker": 2, "algorithm": {"name": "ddp"}},
    {"nprocPerWorker": 2, "algorithm": {"name": "noloco"}},
    {"nprocPerWorker": 4, "algorithm": {"name": "streaming-diloco"}},
    {"nprocPerWorker": 1, "algorithm": {"name": "co2"}},
    {"algorithm": {"adaptiveSteps": {}}},
    {"algorithm": {"syncEvery": 8, "adaptiveSteps": {"minSteps": 8}}},
    {"algorithm": {"syncEvery": 8, "adaptiveSteps": {"minSteps": 9}}},
    {"algorithm": {"adaptiveSteps": {"minSteps": 51, "tolerance": 0.2}}},
    {"algorithm": {"name": "co2", "adaptiveSteps": {}}},
    {"nprocPerWorker": 2, "algorithm": {"adaptiveSteps": {"minSteps": 3}}},
    {"faultDetection": {}},
    {"faultDetection": {"consecutive": 40, "window": 32}},
    {"faultDetection": {"consecutive": 32, "window": 32}},
    {"faultDetection": {"warmupHangTimeoutSeconds": 5.0}},
    {"faultDetection": {"warmupHangTimeoutSeconds": 20.0, "hangTimeoutFloorSeconds": 20.0}},
]


def test_every_rule_holds_on_the_bare_default_values_as_kube_apiserver_checks_them():
    """kube-apiserver evaluates each rule on every ``default`` value as written (``spec: {}``, without
    the defaults nested in it) and refuses the CRD when one errors; found against the real server."""
    env = celpy.Environment()
    schema = openapi_schema()
    checked = 0
    for path, node in walk(schema):
        if "default" not in node:
            continue
        for rule in node.get("x-kubernetes-validations", []):
            verdict = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(node["default"])})
            assert isinstance(verdict, celpy.celtypes.BoolType), f"{path}: {rule['rule']} -> {verdict!r}"
            assert bool(verdict), f"{path}: {rule['rule']} fails on the default {node['default']!r}"
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("spec", CASES)
def test_cel_rules_agree_with_python_validation(spec):
    """Each CEL rule, evaluated by a real CEL interpreter on the defaulted object, gives the same
    verdict as its Python mirror; and the model validation agrees on valid vs invalid."""
    env = celpy.Environment()
    body = apply_defaults(openapi_schema(), {"metadata": {"name": "job"}, "spec": spec})
    cel_failures = set()
    for rule in RULES:
        scope = body
        for part in rule.scope:
            scope = scope.get(part) if isinstance(scope, dict) else None
        if scope is None:
            continue  # an optional section left out: its rules are not evaluated
        verdict = env.program(env.compile(rule.cel)).evaluate({"self": celpy.json_to_cel(scope)})
        assert bool(verdict) == rule.check(scope), rule.cel
        if not verdict:
            cel_failures.add(rule.path)
    errors = validate_job({"metadata": {"name": "job"}, "spec": spec})
    assert {e.path for e in errors} == cel_failures


def test_sharding_rule_mirrors_the_trainer_and_names_both_fields():
    """The API refuses ``nprocPerWorker > 1`` for exactly the algorithms the trainer cannot shard."""
    from loco_trainer.sharding import check_shardable
    for name in ("ddp", "diloco", "streaming-diloco", "noloco", "co2"):
        errors = validate_job({"metadata": {"name": "job"}, "spec": {"nprocPerWorker": 2, "algorithm": {"name": name}}})
        try:
            check_shardable(name, 2)
            trainer_ok = True
        except ValueError:
            trainer_ok = False
        assert (errors == []) == trainer_ok, (name, errors)
        if errors:
            (error,) = errors
            assert error.path == "spec.nprocPerWorker" and error.value == 2
            assert "algorithm.name" in error.message and "set nprocPerWorker to 1" in error.message


async def test_embedded_api_server_refuses_sharding_with_an_unsupported_algorithm():
    """The committed CRD's CEL rule, evaluated by the embedded API server, refuses the object and
    stores nothing; a shardable algorithm with the same nprocPerWorker is accepted."""
    import json

    import aiohttp

    from loco_local.apiserver import APIServer

    srv = APIServer(port=0)
    await srv.start()
    try:
        async with aiohttp.ClientSession(headers=srv.auth_headers) as session:
            async def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
                async with session.request(method, srv.url + path, data=None if body is None else json.dumps(body),
                                           headers={"Content-Type": "application/json"}) as resp:
                    return resp.status, await resp.json()

            status, body = await call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                                      yaml.safe_load((REPO / CRD_PATH).read_text()))
            assert status == 201, body
            jobs = "/apis/loco.dev/v1alpha1/namespaces/default/trainingjobs"

            def job(name: str, algorithm: str) -> dict[str, Any]:
                return {"apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
                        "spec": {"replicas": 2, "nprocPerWorker": 2, "algorithm": {"name": algorithm}}}

            status, body = await call("POST", jobs, job("sharded-co2", "co2"))
            assert status == 422, body
            assert [c["field"] for c in body["details"]["causes"]] == ["spec.nprocPerWorker"]
            assert "algorithm.name" in body["message"] and "set nprocPerWorker to 1" in body["message"]
            status, _ = await call("GET", f"{jobs}/sharded-co2")
            assert status == 404
            status, body = await call("POST", jobs, job("sharded-diloco", "diloco"))
            assert status == 201, body
    finally:
        await srv.stop()


def test_committed_crd_file_matches_the_models():
    committed = (REPO / CRD_PATH).read_text()
    assert committed == render_crd_yaml(), "crds/trainingjob.yaml is stale: run `loco crds --write`"
    assert yaml.safe_load(committed) == build_crd()


def test_committed_population_crd_file_matches_the_models():
    from loco_operator.population import crd as population_crd

    committed = (REPO / population_crd.CRD_PATH).read_text()
    assert committed == population_crd.render_crd_yaml(), "crds/population.yaml is stale: run `loco crds --write`"
    crd = yaml.safe_load(committed)
    assert crd["metadata"]["name"] == "populations.loco.dev" and crd["spec"]["names"]["shortNames"] == ["pop"]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    # the member template is a TrainingJob spec, the same schema as the TrainingJob's own
    assert schema["spec"]["properties"]["template"]["properties"] == openapi_schema()["properties"]["spec"]["properties"]
    assert schema["spec"]["x-kubernetes-validations"][0]["rule"] == "self == oldSelf"


def test_loco_crds_prints_and_writes(tmp_path):
    runner = CliRunner()
    printed = runner.invoke(crds, [])
    assert printed.exit_code == 0
    assert [d["spec"]["names"]["kind"] for d in yaml.safe_load_all(printed.output)] == ["TrainingJob", "Population"]
    target = tmp_path / "crd.yaml"
    written = runner.invoke(crds, ["--write", "-o", str(target)])
    assert written.exit_code == 0 and "wrote" in written.output
    assert target.read_text() == render_crd_yaml()
    again = runner.invoke(crds, ["--write", "-o", str(target)])
    assert "unchanged" in again.output


def test_committed_api_reference_matches_the_models():
    from loco_operator.apidoc import API_DOC_PATH, render_api_markdown

    committed = (REPO / API_DOC_PATH).read_text()
    assert committed == render_api_markdown(), "docs/api.md is stale: run `loco crds --docs`"
    assert "| `syncEvery` | integer |" in committed and "spec.algorithm.syncEvery applies only to" in committed
