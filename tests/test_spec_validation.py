"""TrainingJob validation: every problem reported, with the field's path, the value and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kubernetes.client import V1Pod
from pydantic import TypeAdapter

from loco_operator.render import JobRef, render_configmap, render_pod
from loco_operator.spec import TrainingJobSpec
from loco_contract.config import TrainerConfig
from loco_operator.validation import FieldError, InvalidSpecError, parse_spec, validate_job


def errors_of(spec, name: str = "job") -> dict[str, FieldError]:
    return {e.path: e for e in validate_job({"metadata": {"name": name}, "spec": spec})}


EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))


def example_jobs(docs: list[dict]) -> list[dict]:
    """The TrainingJobs a file makes: its own, and a Population's first-round members, as the operator renders them."""
    from loco_operator.population.reconcile import plan_population, spec_errors

    jobs = [d for d in docs if d["kind"] == "TrainingJob"]
    for population in (d for d in docs if d["kind"] == "Population"):
        assert spec_errors(population) == []
        jobs += plan_population(population, []).create
    return jobs


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_shipped_example_is_valid_and_mounts_only_claims_it_defines(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    jobs = example_jobs(docs)
    assert jobs, f"{path.name} holds no TrainingJob or Population"
    defined = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for job in jobs:
        assert validate_job(job) == [], path.name
        spec = parse_spec(job)
        used = {v["persistentVolumeClaim"]["claimName"] for v in spec.template.volumes if "persistentVolumeClaim" in v}
        assert used <= defined, f"{path.name}: claims {sorted(used - defined)} are mounted but not defined in the file"
        mounted = {m["name"] for m in spec.template.volume_mounts}
        assert mounted <= {v["name"] for v in spec.template.volumes}, path.name
        # what the operator renders: the trainer reads the ConfigMap back, the pod asks for the template's GPUs
        ref = JobRef(job["metadata"]["name"], "default", "uid")
        wire = json.loads(render_configmap(ref, spec)["data"]["config.json"])
        assert TrainerConfig.model_validate(wire).algorithm.name == spec.algorithm.name
        pod = render_pod(ref, spec, 0, 0)
        limits = pod["spec"]["containers"][0]["resources"].get("limits", {})
        gpus = spec.template.resources.get("limits", {}).get("nvidia.com/gpu")
        # a number in the example is sent as a string: the client (v37) refuses a pod whose quantity is a number
        assert limits.get("nvidia.com/gpu") == (None if gpus is None else str(gpus))
        TypeAdapter(V1Pod).validate_python(pod)  # what the client checks before sending it


def test_the_examples_cover_every_mode():
    """An example for every algorithm, and CPU ones for elastic, sharded (FSDP) and plain DDP training (each CPU
    example runs to Succeeded in e2e/test_examples_run.py, every one is dry-run in e2e/test_examples.py)."""
    jobs = {p.name: example_jobs([d for d in yaml.safe_load_all(p.read_text()) if d])[0]["spec"] for p in EXAMPLES}
    assert {"ddp", "diloco", "streaming-diloco", "noloco", "co2"} <= {j["algorithm"]["name"] for j in jobs.values()}
    cpu = [j for j in jobs.values() if "nvidia.com/gpu" not in (j["template"].get("resources") or {}).get("limits", {})]
    assert any(j.get("elastic") for j in cpu), "no local elastic example"
    assert any(j.get("nprocPerWorker", 1) > 1 for j in cpu), "no local FSDP (sharded) example"
    assert any(j["algorithm"]["name"] == "ddp" for j in cpu), "no plain DDP example"


def test_defaults_and_full_examples_are_valid():
    assert validate_job({"metadata": {"name": "job"}, "spec": {}}) == []
    full = {
        "replicas": 4, "nprocPerWorker": 1,
        "elastic": {"minReplicas": 2, "maxReplicas": 8},
        "template": {"image": "x:1", "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}},
                     "tolerations": [{"key": "gpu", "operator": "Exists"}], "nodeSelector": {"pool": "gpu"}},
        "algorithm": {"name": "streaming-diloco", "syncEvery": 20, "fragments": 4, "quantization": "e3m0"},
        "model": {"gpt": {"nLayer": 4, "nHead": 4, "nEmbd": 128, "blockSize": 256}},
        "training": {"steps": 100, "seqLen": 256},
        "data": {"source": "shards", "path": "/data"},
        "runPolicy": {"backoffLimit": 5, "cleanPodPolicy": "All", "ttlSecondsAfterFinished": 60},
    }
    assert validate_job({"metadata": {"name": "gpt-diloco"}, "spec": full}) == []
    assert parse_spec({"metadata": {"name": "gpt-diloco"}, "spec": full}).replicas == 4


@pytest.mark.parametrize(
    ("spec", "path", "words"),
    [
        ({"replicas": 0}, "spec.replicas", ["greater than or equal to 1"]),
        ({"replicas": "two"}, "spec.replicas", ["valid integer"]),
        ({"replica": 2}, "spec.replica", ["unknown field", "remove it"]),
        ({"algorithm": {"name": "adam"}}, "spec.algorithm.name", ["ddp", "diloco"]),
        ({"algorithm": {"name": "ddp", "syncEvery": 5}}, "spec.algorithm.syncEvery", ["applies only to", "remove"]),
        ({"algorithm": {"name": "diloco", "groupSize": 2}}, "spec.algorithm.groupSize", ["noloco", "remove"]),
        ({"algorithm": {"outerLr": 0}}, "spec.algorithm.outerLr", ["greater than 0"]),
        ({"elastic": {"minReplicas": 3}}, "spec.replicas", ["elastic.minReplicas", "raise replicas"]),
        ({"elastic": {"maxReplicas": 1}}, "spec.replicas", ["elastic.maxReplicas", "lower replicas"]),
        ({"training": {"seqLen": 1024}}, "spec.training.seqLen", ["blockSize", "lower"]),
        ({"model": {"gpt": {"nEmbd": 100, "nHead": 3}}}, "spec.model.gpt.nEmbd", ["multiple of", "nHead"]),
        ({"model": {"name": "custom"}}, "spec.model.factory", ["required", "package.module:callable"]),
        ({"model": {"factory": "a.b:c"}}, "spec.model.factory", ["set name to 'custom'"]),
        ({"data": {"source": "shards"}}, "spec.data.path", ["required", "directory"]),
        ({"nprocPerWorker": 2, "algorithm": {"name": "noloco"}}, "spec.nprocPerWorker",
         ["algorithm.name", "ddp | diloco", "set nprocPerWorker to 1"]),
        ({"algorithm": {"name": "co2", "adaptiveSteps": {}}}, "spec.algorithm.adaptiveSteps", ["applies only to", "diloco"]),
        ({"algorithm": {"syncEvery": 8, "adaptiveSteps": {"minSteps": 9}}}, "spec.algorithm.adaptiveSteps.minSteps",
         ["<= spec.algorithm.syncEvery", "lower minSteps"]),
        ({"algorithm": {"adaptiveSteps": {"minSteps": 51}}}, "spec.algorithm.adaptiveSteps.minSteps", ["syncEvery"]),
        ({"nprocPerWorker": 2, "algorithm": {"adaptiveSteps": {}}}, "spec.algorithm.adaptiveSteps",
         ["nprocPerWorker 1", "remove adaptiveSteps"]),
        ({"algorithm": {"adaptiveSteps": {"tolerance": 1.5}}}, "spec.algorithm.adaptiveSteps.tolerance",
         ["less than or equal to 1"]),
        ({"runPolicy": {"cleanPodPolicy": "Some"}}, "spec.runPolicy.cleanPodPolicy", ["All", "Running", "None"]),
        ({"template": {"nodeSelector": {"a": 1}}}, "spec.template.nodeSelector.a", ["valid string"]),
        ({"placement": {"pack": {}, "spread": {}}}, "spec.placement.spread", ["pack or spread, not both"]),
        ({"placement": {"spread": {"topologyKey": "bad key!"}}}, "spec.placement.spread.topologyKey",
         ["should match pattern"]),
    ],
)
def test_each_bad_input_names_the_field_and_the_fix(spec, path, words):
    errors = errors_of(spec)
    assert path in errors, errors
    text = str(errors[path])
    assert text.startswith(path + ":")
    for word in words:
        assert word in text, text


def test_every_problem_is_reported_at_once():
    spec = {
        "replicas": 0,
        "algorithm": {"name": "ddp", "syncEvery": 5, "outerLr": 0.5},
        "model": {"gpt": {"nEmbd": 100, "nHead": 3}},
        "data": {"source": "shards"},
        "bogus": True,
    }
    paths = set(errors_of(spec))
    assert paths == {
        "spec.replicas", "spec.algorithm.syncEvery", "spec.algorithm.outerLr", "spec.model.gpt.nEmbd",
        "spec.data.path", "spec.bogus",
    }


def test_value_is_carried_and_bad_name_is_refused():
    assert errors_of({"replicas": -3})["spec.replicas"].value == -3
    errors = errors_of({}, name="My_Job")
    assert errors["metadata.name"].value == "My_Job"
    assert "DNS-1035" in errors["metadata.name"].message
    assert "metadata.name" in errors_of({}, name="a" * 60)


def test_parse_spec_raises_with_all_errors():
    with pytest.raises(InvalidSpecError) as info:
        parse_spec({"metadata": {"name": "job"}, "spec": {"replicas": 0, "training": {"steps": 0}}})
    assert {e.path for e in info.value.errors} == {"spec.replicas", "spec.training.steps"}
    assert "spec.replicas" in str(info.value)


def test_spec_that_is_not_an_object_is_refused():
    (error,) = validate_job({"metadata": {"name": "job"}, "spec": [1, 2]})
    assert error.path == "spec" and "object" in error.message


def test_python_spec_model_agrees_on_cross_field_rules():
    with pytest.raises(ValueError, match="seqLen"):
        TrainingJobSpec.model_validate({"training": {"seqLen": 1024}})


def test_init_from_names_another_job_and_a_step_the_api_can_hold():
    assert errors_of({"checkpoint": {"initFrom": {"jobName": "parent", "step": 40}}}) == {}
    mine = errors_of({"checkpoint": {"initFrom": {"jobName": "job"}}}, name="job")
    assert "names this job itself" in mine["spec.checkpoint.initFrom.jobName"].message
    bad = errors_of({"checkpoint": {"initFrom": {"jobName": "Not_A_Name", "step": -1}}})
    assert set(bad) >= {"spec.checkpoint.initFrom.jobName", "spec.checkpoint.initFrom.step"}, bad
