"""The Population CustomResourceDefinition, generated from the models in :mod:`.spec` the way the TrainingJob's is
(:mod:`loco_operator.crd`): ``crds/population.yaml`` is this module's output (``loco crds --write``), and a test
fails when the file and the models drift."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .. import spec as job_api
from .. import crd as job_crd
from ..crd import structural_schema
from ..rules import _DNS_1035 as DNS_1035
from .plan import MAX_POPULATION_NAME_LENGTH
from .spec import (
    KIND, PLURAL, SHORT_NAMES, SINGULAR, TEMPLATE_INIT_FROM, TEMPLATE_TTL, PopulationSpec, PopulationStatus
)

CRD_PATH = Path("crds") / "population.yaml"
HEADER = (
    "# Generated from operator/loco_operator/population/spec.py by `loco crds --write`: do not edit by hand.\n"
    "# A test fails when this file and the models drift.\n"
)


def openapi_schema() -> dict[str, Any]:
    spec_schema = structural_schema(PopulationSpec)
    # The member template is a TrainingJob spec, with its CEL rules: a bad template is refused at create, naming the
    # field, rather than when the first member job is created.
    template = copy.deepcopy(job_crd.openapi_schema()["properties"]["spec"])
    template["description"] = spec_schema["properties"]["template"]["description"]
    template.pop("default", None)
    spec_schema["properties"]["template"] = template
    spec_schema["description"] = ("Desired state of the Population: the members' TrainingJob template, the search "
                                  "space and the exploit/explore schedule. Fixed once created (a round's decisions "
                                  "depend on it): create a new Population to change it.")
    # The rounds already trained were decided from this spec: a change would make a restarted operator decide
    # differently from the status it stored.
    spec_schema["x-kubernetes-validations"] = [
        {"rule": "self == oldSelf", "message": "spec is immutable: create a new Population to change it"},
        {"rule": "!has(self.template.checkpoint) || !has(self.template.checkpoint.initFrom)",
         "message": f"spec.{TEMPLATE_INIT_FROM}", "fieldPath": ".template.checkpoint.initFrom",
         "reason": "FieldValueForbidden"},
        {"rule": "!has(self.template.runPolicy) || !has(self.template.runPolicy.ttlSecondsAfterFinished)",
         "message": f"spec.{TEMPLATE_TTL}", "fieldPath": ".template.runPolicy.ttlSecondsAfterFinished",
         "reason": "FieldValueForbidden"}]
    status_schema = structural_schema(PopulationStatus)
    status_schema["description"] = "Observed state, written by the operator (a restarted operator resumes the round)."
    return {
        "type": "object",
        "description": ("A Population trains size TrainingJobs side by side and, every exploitEverySteps steps, "
                        "has the worst copy the best ones' checkpoints with perturbed hyper-parameters "
                        "(population-based training, docs/population.md)."),
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object: loco.dev/v1alpha1."},
            "kind": {"type": "string", "description": "Kind of this object: Population."},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "required": ["spec"],
        # only name and generateName of metadata are visible to root rules
        "x-kubernetes-validations": [{
            "rule": f"!has(self.metadata) || !has(self.metadata.name) || (self.metadata.name.size() <= "
                    f"{MAX_POPULATION_NAME_LENGTH} && self.metadata.name.matches('{DNS_1035}'))",
            "message": f"metadata.name must be a DNS-1035 label of at most {MAX_POPULATION_NAME_LENGTH} characters "
                       "(lowercase letters, digits and '-', starting with a letter): member jobs are named "
                       "<name>-m<index>-g<round>",
            "reason": "FieldValueInvalid"}],
    }


def printer_columns() -> list[dict[str, Any]]:
    """``kubectl get populations`` columns."""
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Running | Succeeded | Failed."},
        {"name": "Round", "type": "integer", "jsonPath": ".status.round", "description": "The round trained now, from 0."},
        {"name": "Rounds", "type": "integer", "jsonPath": ".status.rounds", "description": "Rounds in the run."},
        {"name": "Best", "type": "string", "jsonPath": ".status.best.job",
         "description": "The best member's job at the end of the last finished round."},
        {"name": "Score", "type": "number", "jsonPath": ".status.best.score", "description": "Its metric."},
        {"name": "Median", "type": "number", "jsonPath": ".status.medianScore", "description": "The members' median."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Metric", "type": "string", "jsonPath": ".spec.metric", "priority": 1,
         "description": "What ranks the members."},
    ]


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{job_api.GROUP}",
                     "labels": {"app.kubernetes.io/name": "loco", "app.kubernetes.io/part-of": "loco"}},
        "spec": {
            "group": job_api.GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": list(SHORT_NAMES), "categories": ["loco", "all"]},
            "scope": "Namespaced",
            "versions": [{
                "name": job_api.VERSION, "served": True, "storage": True,
                "schema": {"openAPIV3Schema": openapi_schema()},
                "subresources": {"status": {}},
                "additionalPrinterColumns": printer_columns(),
            }],
        },
    }


def render_crd_yaml() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=120, allow_unicode=True)
