"""Generate ``docs/api.md`` (the TrainingJob reference) from the CRD schema, so the reference,
the CRD and the models cannot disagree. ``loco crds --docs`` writes it; a test fails on drift."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .crd import build_crd, write_if_changed
from .rules import RULES
from pydantic.alias_generators import to_camel

from .spec import API_VERSION, KIND, KUBERNETES_TYPE, TemplateSpec

API_DOC_PATH = Path("docs") / "api.md"

_INTRO = f"""# TrainingJob API reference (`{API_VERSION}`)

<!-- Generated from operator/loco_operator/spec.py by `loco crds --docs`: do not edit by hand. -->

A `{KIND}` trains a model on `spec.replicas` worker pods with a low-communication algorithm and
restarts it from the last committed checkpoint when a worker fails. Field names are camelCase.
`kubectl explain trainingjob.spec` shows the same descriptions.

```yaml
apiVersion: {API_VERSION}
kind: {KIND}
metadata:
  name: gpt-diloco
spec:
  replicas: 4
  algorithm: {{name: diloco, syncEvery: 50}}
  model: {{gpt: {{nLayer: 4, nHead: 4, nEmbd: 128}}}}
  training: {{steps: 1000, seqLen: 128}}
  checkpoint: {{path: /checkpoints, everySteps: 100}}
  runPolicy: {{backoffLimit: 3, cleanPodPolicy: Running}}
```
"""


def core_typed_fields() -> dict[str, str]:
    """``spec.template`` fields typed as Kubernetes core types: camelCase name -> type (``[]EnvVar``).
    The reference links them to Kubernetes' own instead of repeating a thousand lines of it."""
    out = {}
    for name, field in TemplateSpec.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        marker = extra.get("items", extra)
        if isinstance(marker, dict) and KUBERNETES_TYPE in marker:
            out[to_camel(name)] = ("[]" if "items" in extra else "") + str(marker[KUBERNETES_TYPE])
    return out


def _core_link(type_name: str) -> str:
    bare = type_name.removeprefix("[]")
    return f"{type_name[:len(type_name) - len(bare)]}[{bare}](https://kubernetes.io/docs/reference/kubernetes-api/)"


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    kind = node.get("type", "object")
    if kind == "array":
        kind = f"[]{_type(node.get('items', {}))}"
    elif kind == "object" and isinstance(node.get("additionalProperties"), dict):
        kind = f"map[string]{_type(node['additionalProperties'])}"
    if node.get("x-kubernetes-preserve-unknown-fields"):
        kind += " (free-form)"
    return kind


def _constraints(node: dict[str, Any]) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    if "minimum" in node:
        parts.append((">" if node.get("exclusiveMinimum") else ">=") + f" {node['minimum']}")
    if "maximum" in node:
        parts.append(("<" if node.get("exclusiveMaximum") else "<=") + f" {node['maximum']}")
    if node.get("nullable"):
        parts.append("optional")
    return "; ".join(parts)


def _default(node: dict[str, Any]) -> str:
    if "default" not in node or node["default"] == {}:
        return ""
    return f"`{json.dumps(node['default'])}`"


def _sections(node: dict[str, Any], path: str, out: list[str], shallow: frozenset[str] = frozenset()) -> None:
    """One table per object, then one per nested object (except the fields named in ``shallow``)."""
    props = node.get("properties") or {}
    if not props:
        return
    out.append(f"\n## `{path}`\n")
    if node.get("description"):
        out.append(node["description"] + "\n")
    out.append("| Field | Type | Default | Constraints | Description |")
    out.append("|---|---|---|---|---|")
    nested = []
    core = core_typed_fields() if path == "spec.template" else {}
    for name, prop in props.items():
        if name in core:
            desc = prop.get("description", "").replace("|", "\\|")
            out.append(f"| `{name}` | {_core_link(core[name])} (Kubernetes core/v1) | | | {desc} |")
            continue
        if name in shallow:
            pass
        elif prop.get("properties"):
            nested.append((name, prop))
        elif prop.get("type") == "array" and (prop.get("items") or {}).get("properties"):
            nested.append((name + "[]", prop["items"]))
        desc = prop.get("description", "").replace("|", "\\|")
        out.append(f"| `{name}` | {_type(prop)} | {_default(prop)} | {_constraints(prop)} | {desc} |")
    for name, prop in nested:
        _sections(prop, f"{path}.{name}", out)


def render_api_markdown() -> str:
    """The Markdown text of docs/api.md."""
    version = build_crd()["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    out = [_INTRO]
    _sections(schema["properties"]["spec"], "spec", out)
    out.append("\n## Cross-field rules\n")
    out.append("Enforced by the API server (CEL `x-kubernetes-validations`) and again by the operator.\n")
    out.append("| Field | Rule (CEL) | Message |")
    out.append("|---|---|---|")
    for rule in RULES:
        cel, message = rule.cel.replace("|", r"\|"), rule.message.replace("|", r"\|")
        out.append(f"| `{rule.path}` | `{cel}` | {message} |")
    out += _failure_policy_section()
    out += _scheduling_section()
    _sections(schema["properties"]["status"], "status", out)
    out += _conditions_section()
    out.append("\n## `kubectl get trainingjobs` columns\n")
    out.append("| Column | JSONPath | Shown |")
    out.append("|---|---|---|")
    for col in version["additionalPrinterColumns"]:
        out.append(f"| {col['name']} | `{col['jsonPath']}` | {'-o wide' if col.get('priority') else 'always'} |")
    out.append(
        "\nThe `scale` subresource maps `spec.replicas` and `status.workers.ready` "
        "(`kubectl scale trainingjob/NAME --replicas=N`); a change of replicas starts a new membership "
        "epoch without counting as a restart.\n"
    )
    out += _population_section()
    return "\n".join(out)


def _population_section() -> list[str]:
    from .population import crd as population_crd
    from .population.spec import KIND as POPULATION_KIND

    version = population_crd.build_crd()["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    out = [f"\n# Population API reference (`{API_VERSION}`)\n",
           f"A `{POPULATION_KIND}` (short name `pop`) trains `spec.size` TrainingJobs side by side and, every "
           "`exploitEverySteps` inner steps, has the bottom members start over from a top member's checkpoint with "
           "perturbed hyper-parameters (population-based training; docs/population.md). Its spec is fixed once "
           "created. `spec.template` is a TrainingJob `spec` (above), with the same checks.\n",
           "```yaml", f"apiVersion: {API_VERSION}", f"kind: {POPULATION_KIND}", "metadata:", "  name: pbt", "spec:",
           "  size: 4", "  exploitEverySteps: 100", "  search:",
           "  - {field: training.lr, min: 0.0003, max: 0.01}",
           "  - {field: algorithm.outerLr, min: 0.3, max: 1.0, scale: linear}",
           "  template:", "    replicas: 2", "    algorithm: {name: diloco, syncEvery: 20}",
           "    training: {steps: 400, evalEvery: 100}", "```"]
    _sections(schema["properties"]["spec"], "spec", out, shallow=frozenset({"template"}))
    _sections(schema["properties"]["status"], "status", out)
    out.append("\n## `kubectl get populations` columns\n")
    out.append("| Column | JSONPath | Shown |")
    out.append("|---|---|---|")
    for col in version["additionalPrinterColumns"]:
        out.append(f"| {col['name']} | `{col['jsonPath']}` | {'-o wide' if col.get('priority') else 'always'} |")
    return out


def _scheduling_section() -> list[str]:
    """Gang start and placement: what the scheduler is told, and what the user sees while workers wait."""
    from .render import GANG_GATE

    return ["\n## Scheduling: gang start and placement\n",
            f"**Gang start** (`spec.runPolicy.schedulingPolicy.gang`, on by default): the workers of each epoch of a "
            f"fixed-size job are created with the scheduling gate `{GANG_GATE}`; the API server marks them "
            "`PodScheduled=False` (reason `SchedulingGated`) and no scheduler binds them. When every worker exists and "
            "the operator's capacity check finds room for all of them (Ready, schedulable nodes whose taints they "
            "tolerate and whose labels match `template.nodeSelector`, with their requests free), it removes the gate "
            "from all of them at once: condition `GangScheduled=True` (reason `GangReleased`) and an Event. A gang that "
            "has not fitted within `scheduleTimeoutSeconds` gets `GangScheduled=False` (reason `InsufficientCapacity`) "
            "naming the short resource and what each usable node has free, e.g. `cpu: 4 workers request 3 each, room "
            "for 3 (free on usable nodes: node-0 4, node-1 4, node-2 4)`, and keeps waiting; lowering `replicas` or "
            "freeing room releases it. The check does not reserve: two gangs released in the same instant may still "
            "compete for the same room (all-or-nothing across jobs is a queue's work: label the job "
            "`kueue.x-k8s.io/queue-name` and Kueue admits it as one Workload, `docs/kueue.md`). Elastic jobs "
            "(`spec.elastic`) start ungated with what fits, and live-resize joiners are never gated.\n",
            "**Placement** (`spec.placement`, one of): `pack` puts the workers in one domain of `topologyKey` "
            "(default `topology.kubernetes.io/zone`; `kubernetes.io/hostname` for one node) with a pod affinity to "
            "the job's own workers (`loco.dev/job`), required or preferred (weight 100); the first worker may go "
            "anywhere, the rest follow it. `spread` adds a topology spread constraint over the job's workers "
            "(`maxSkew`, default 1, on `kubernetes.io/hostname` by default: one worker per node while nodes last), "
            "`DoNotSchedule` when `required` (the default) or `ScheduleAnyway`. Both merge with `template.affinity`, "
            "`template.nodeSelector` and `template.tolerations` (the worker is the job's one role, so its node "
            "selector and tolerations are the template's) and with the nodes the fault detector made the job avoid. "
            "The real kube-scheduler and the embedded cluster's scheduler honour them "
            "(`e2e/test_foundation.py::test_placement_packs_or_spreads_the_workers_as_the_scheduler_is_told`).\n"]


def _failure_policy_section() -> list[str]:
    """How a failed worker counts: the defaults, the rules, and the trainer's exit codes they match."""
    from loco_contract.exits import ExitCode

    out = ["\n## Failure policy (`spec.runPolicy.failurePolicy`)\n",
           "As the Job API's `podFailurePolicy`: each failed worker is matched against the rules in order and the first "
           "match decides: `FailJob` fails the job at once (condition `Failed`, reason `FailurePolicy`, quoting the "
           "worker's exit and the trainer's own message), `Ignore` restarts from the last checkpoint without counting "
           "against `backoffLimit` (`status.ignoredFailures`), `Count` restarts and counts. A worker no rule matches "
           "counts. Over workers that failed together the strongest action wins (FailJob, Count, Ignore); a worker "
           "that exited because it lost a peer (76) follows that peer's cause when another worker failed otherwise.\n",
           "Unset, the policy is: a configuration error (exit code 2) fails the job; a pod with the condition "
           "`DisruptionTarget=True` (an eviction: `kubectl drain`, preemption, a taint-based eviction) is ignored; "
           "anything else counts. Rules given replace these defaults. Example:\n",
           "```yaml", "runPolicy:", "  backoffLimit: 3", "  failurePolicy:", "    rules:",
           "    - action: FailJob", "      onExitCodes: {operator: In, values: [2, 65]}     # configuration or data error",
           "    - action: Ignore", "      onPodConditions: [{type: DisruptionTarget}]",
           "    - action: Ignore", "      onExitCodes: {operator: In, values: [81]}        # out of memory: retry as is",
           "```\n",
           "The trainer's exit codes (`loco_contract.exits.ExitCode`); 128+N is death by signal N:\n",
           "| Code | Meaning |", "|---|---|"]
    out += [f"| {int(code)} | {code.meaning} |" for code in ExitCode]
    return out


def _conditions_section() -> list[str]:
    from .planner.vocabulary import ConditionType

    meanings = {
        "Created": "the workers were created", "Running": "every worker of the epoch runs",
        "Restarting": "a restart or a resize is under way (reason and message say why)",
        "Succeeded": "every worker finished", "Failed": "the job failed (reason: BackoffLimitExceeded, FailurePolicy, "
        "DeadlineExceeded, InvalidSpec, PodRefused)", "Suspended": "runPolicy.suspend: workers deleted, status kept",
        "ResumedFromPreviousJob": "checkpoints of an earlier job of this name were adopted (True) or set aside (False)",
        "Degraded": "True while running with fewer workers than spec.replicas (an elastic shrink), with how many and why",
        "Resized": "the last change of the worker count: from -> to and why (ScaledUp, ScaledDown)",
        "Checkpointed": "the last committed checkpoint: step, commit time, path",
        "GangScheduled": "gang start (runPolicy.schedulingPolicy.gang): True when the epoch's workers were released to "
        "the scheduler together (GangReleased); False when they waited past scheduleTimeoutSeconds, naming the short "
        "resource (InsufficientCapacity)",
    }
    out = ["\n## Conditions\n",
           "Each has `status`, `reason`, `message`, `lastTransitionTime` (when the status last changed) and "
           "`lastUpdateTime` (when the reason or message last changed); `kubectl describe tj` lists them.\n",
           "| Type | Meaning |", "|---|---|"]
    out += [f"| {c.value} | {meanings[c.value]} |" for c in ConditionType]
    return out


def write_api_doc(path: Path) -> bool:
    """Write docs/api.md; returns True when the file changed."""
    return write_if_changed(path, render_api_markdown())
