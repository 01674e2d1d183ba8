"""Fuzz the TrainingJob API: specs generated from the CRD's schema plus mutations, POSTed to the embedded API server.

Each spec is drawn from the CRD's ``openAPIV3Schema`` (every property present or not, numbers
anywhere between and just past their bounds, enums, unicode strings, free-form objects) and half of
them are then mutated at one to three random places: a value of the wrong type, a huge or non-finite
number, unicode (control characters, surrogates, right-to-left marks, 10^5 characters), deep nesting,
an unknown field. The testers' reports are explicit cases (:func:`known_cases`).

What must hold:

* the API server answers every POST with 201 or a 4xx ``Status`` that names the field (a
  ``details.causes[].field`` or a message under ``spec``); never a 5xx;
* the operator's planner, given each accepted job as stored, returns a plan (no exception); a job it
  cannot run ends ``Failed`` with a condition naming the field, or creates children that the operator's
  own client and the API take (dry run); a worker pod the API refuses ends the job ``Failed`` through
  ``plan_pod_refused``. Planner errors that are known operator bugs (:data:`OPERATOR_BUGS`) are counted
  apart.

``tests/test_fuzz_trainingjob.py`` runs 1,000 specs in CI (and the real operator on the known cases,
then a good job); this script runs more and writes its section of docs/benchmarks.md::

    .venv/bin/python bench/fuzz_trainingjob.py --specs 5000
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import math
import os
import platform
import random
import re
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests
from loco_contract.detection import DetectorConfig
from pydantic.alias_generators import to_snake

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz_apiserver import Running, running_server  # noqa: E402

DOC_NAME = "fuzz_trainingjob"
NS = "default"
API = "loco.dev/v1alpha1"
COLLECTION = f"/apis/{API}/namespaces/{NS}/trainingjobs"
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
CHECKED_PODS = 2  # worker pods of each plan dry-run through the API

UNICODE = ["", "é", "日本語", "🚀🔥", "\u202eevil", "\x00", "a\nb", "\ud800", "Ω" * 70, "x" * 100_000, " ", "null",
           "../../etc/passwd", "${HOME}", "'; DROP TABLE jobs; --"]
HUGE = [2**63 - 1, 2**63, -2**63, -2**63 - 1, 10**30, -10**30, 1e308, -1e308, 1.7976931348623157e308, 5e-324, -0.0,
        2**53 + 1, 0, -1, math.nan, math.inf, -math.inf]  # json.dumps writes the last three as NaN, Infinity


def crd_spec_schema() -> dict[str, Any]:
    from loco_operator.crd import build_crd

    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


# ---------------------------------------------------------------------------------------------- generation


def _junk(rng: random.Random, depth: int = 0) -> Any:
    """A free-form JSON value (for x-kubernetes-preserve-unknown-fields)."""
    roll = rng.random()
    if depth < 3 and roll < 0.3:
        return {rng.choice(["a", "name", "value", "memory", "cpu", "nvidia.com/gpu", "é"]): _junk(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    if depth < 3 and roll < 0.45:
        return [_junk(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return rng.choice([rng.randint(-5, 5), rng.random() * 10, rng.choice(UNICODE[:6]), True, None, "1Gi", "500m"])


def _number(schema: dict[str, Any], rng: random.Random, integer: bool, strict: bool) -> int | float:
    """Mostly small values near the lower bound (real specs), now and then (not when ``strict``) the bounds
    themselves or just past them."""
    lo, hi = schema.get("minimum"), schema.get("maximum")
    roll = 1.0 if strict else rng.random()
    if roll < 0.015 and lo is not None:
        return lo - 1 if integer else lo - 1e-9  # just below
    if roll < 0.03 and hi is not None:
        return hi + 1 if integer else hi * 1.000001 + 1e-9  # just above
    if roll < 0.06:
        return rng.choice([b for b in (lo, hi) if b is not None] or [0])  # a bound (invalid when exclusive)
    low = lo if lo is not None else 0
    high = hi if hi is not None else low + 1000
    if integer:
        span = 100_000 if rng.random() < 0.03 else rng.choice([1, 4, 16, 256])  # thousands of replicas: rarely
        low += 1 if schema.get("exclusiveMinimum") else 0
        return rng.randint(int(low), int(min(high, low + span)))
    value = rng.uniform(low, min(high, low + rng.choice([1.0, 10.0, 1e6])))
    if strict and ((schema.get("exclusiveMinimum") and value <= low) or (schema.get("exclusiveMaximum") and value >= high)):
        value = (low + min(high, low + 1.0)) / 2
    return value


def generate(schema: dict[str, Any], rng: random.Random, depth: int = 0, strict: bool = False) -> Any:
    """A value for ``schema``: mostly valid, now and then (not when ``strict``) just outside a bound."""
    if schema.get("nullable") and rng.random() < 0.05:
        return None
    if "enum" in schema:
        return rng.choice(schema["enum"]) if strict or rng.random() < 0.99 else "not-" + str(schema["enum"][0])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties")
        if props:
            required = set(schema.get("required") or [])
            return {name: generate(sub, rng, depth + 1, strict) for name, sub in props.items()
                    if name in required or rng.random() < (0.5 if depth else 0.6)}
        if isinstance(schema.get("additionalProperties"), dict):
            return {rng.choice(["a", "team", "é", "x" * 10]) + str(i): generate(schema["additionalProperties"], rng, depth + 1, strict)
                    for i in range(rng.randint(0, 3))}
        return {f"k{i}": _junk(rng) for i in range(rng.randint(0, 3))}
    if kind == "array":
        low = schema.get("minItems", 0)
        items = [generate(schema.get("items") or {}, rng, depth + 1, strict)
                 for _ in range(rng.randint(low, min(max(low, 3), schema.get("maxItems", 3))))]
        if schema.get("x-kubernetes-list-type") == "set":  # a set never repeats an item
            items = [x for i, x in enumerate(items) if x not in items[:i]]
        return items
    if kind == "integer":
        return int(_number(schema, rng, True, strict))
    if kind == "number":
        return _number(schema, rng, False, strict)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "string":
        options = ["ok", "value-1", "gpt", *UNICODE[:5]]
        if "pattern" in schema or "minLength" in schema:  # a constrained string (checkpoint.path): a valid one
            options = [o for o in options + ["/checkpoints", "/data/ck-1"] if _fits(schema, o)] or options
        return rng.choice(options)
    return _junk(rng)


def _fits(schema: dict[str, Any], text: str) -> bool:
    return (schema.get("minLength", 0) <= len(text) <= schema.get("maxLength", len(text))
            and re.search(schema.get("pattern", ""), text) is not None)


def algorithm_fields(schema: dict[str, Any]) -> dict[str, set[str]]:
    """spec.algorithm field -> the algorithms it applies to, read from the CRD's rule messages."""
    fields: dict[str, set[str]] = {}
    for rule in schema["properties"]["algorithm"].get("x-kubernetes-validations") or []:
        found = re.search(r"spec\.algorithm\.(\w+) applies only to algorithm ([a-z0-9| -]+):", rule.get("message", ""))
        if found:
            fields[found.group(1)] = {a.strip() for a in found.group(2).split("|")}
    return fields


def coherent(spec: dict[str, Any], only: dict[str, set[str]]) -> dict[str, Any]:
    """``spec`` adjusted (in place) to the CRD's cross-field rules, so that mutations, not the generator's
    chance combinations, decide whether it is accepted. Absent fields count at their defaults."""
    def obj(key: str) -> dict[str, Any]:
        return spec[key] if isinstance(spec.get(key), dict) else {}

    def num(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    algorithm, model, training, elastic, data = obj("algorithm"), obj("model"), obj("training"), obj("elastic"), obj("data")
    name = algorithm.get("name", "diloco")
    for key in [k for k in algorithm if k in only and name not in only[k]]:
        del algorithm[key]
    if model.get("name", "gpt") == "custom":
        model["factory"] = "mypkg.models:build"
    else:
        model.pop("factory", None)
    gpt = model.get("gpt") if isinstance(model.get("gpt"), dict) else {}
    heads, width = gpt.get("nHead", 2), gpt.get("nEmbd", 64)
    if ("nHead" in gpt or "nEmbd" in gpt) and num(heads) and num(width) and heads > 0:
        gpt["nEmbd"] = heads * min(max(width // heads, -(-8 // heads)), 65536 // heads)
    block, seq = gpt.get("blockSize", 256), training.get("seqLen", 128)
    if model.get("name", "gpt") == "gpt" and num(block) and num(seq) and seq > block and "training" in spec:
        training["seqLen"] = block
    replicas = spec.get("replicas", 2)
    if num(replicas):
        if num(elastic.get("minReplicas")):
            elastic["minReplicas"] = min(elastic["minReplicas"], replicas)
        if num(elastic.get("maxReplicas")):
            elastic["maxReplicas"] = max(elastic["maxReplicas"], replicas)
    if num(spec.get("nprocPerWorker")) and spec["nprocPerWorker"] > 1 and name not in ("ddp", "diloco"):
        spec["nprocPerWorker"] = 1
    if data.get("source") == "shards" and not data.get("path"):
        data["path"] = "/data/shards"
    failure_policy = obj("runPolicy").get("failurePolicy")
    for rule in (failure_policy or {}).get("rules") or [] if isinstance(failure_policy, dict) else []:
        if isinstance(rule, dict) and rule.get("onExitCodes") and rule.get("onPodConditions"):  # exactly one matcher
            del rule["onPodConditions"]
        elif isinstance(rule, dict) and not rule.get("onExitCodes") and not rule.get("onPodConditions"):
            rule["onPodConditions"] = [{"type": "DisruptionTarget"}]
    detection, defaults = obj("faultDetection"), DetectorConfig.model_fields
    for low, high in (("consecutive", "window"), ("hangTimeoutFloorSeconds", "warmupHangTimeoutSeconds")):
        lo = detection.get(low, defaults[to_snake(low)].default)
        hi = detection.get(high, defaults[to_snake(high)].default)
        if (low in detection or high in detection) and isinstance(lo, (int, float)) and isinstance(hi, (int, float)) \
                and lo > hi:
            detection[high] = lo
    placement = spec.get("placement")
    if isinstance(placement, dict) and placement.get("pack") is not None and placement.get("spread") is not None:
        del placement["spread"]  # pack or spread, not both
    return spec


# ---------------------------------------------------------------------------------------------- mutation


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in ``value`` (dict keys and list indices), parents before children."""
    out = []
    if isinstance(value, dict):
        for key, sub in value.items():
            out.append(prefix + (key,))
            out += _paths(sub, prefix + (key,))
    elif isinstance(value, list):
        for index, sub in enumerate(value):
            out.append(prefix + (index,))
            out += _paths(sub, prefix + (index,))
    return out


def _nested(depth: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def _mutant(rng: random.Random, old: Any) -> tuple[str, Any]:
    kind = rng.choice(["type", "type", "huge", "unicode", "nested", "empty"])
    if kind == "type":
        options = [v for v in ("7", 7, 7.5, True, None, [], {}, ["x"], {"x": 1}) if type(v) is not type(old)]
        return kind, rng.choice(options)
    if kind == "huge":
        return kind, rng.choice(HUGE)
    if kind == "unicode":
        return kind, rng.choice(UNICODE)
    if kind == "nested":
        return kind, _nested(rng.choice([10, 50, 200]))
    return kind, rng.choice(["", [], {}])


def mutate(spec: dict[str, Any], rng: random.Random) -> tuple[dict[str, Any], list[str]]:
    """``spec`` with one to three mutations; returns it and what was done (``kind@spec.path``)."""
    spec = copy.deepcopy(spec)
    done = []
    for _ in range(rng.randint(1, 3)):
        places = _paths(spec)
        if not places or rng.random() < 0.15:  # an unknown field somewhere
            parent: Any = spec
            path: tuple = ()
            dicts = [p for p in places if isinstance(_get(spec, p), dict)]
            if dicts:
                path = rng.choice(dicts)
                parent = _get(spec, path)
            parent["unknownField" + rng.choice(["", "é", "-x"])] = _junk(rng)
            done.append("unknown@" + _dotted(path))
            continue
        path = rng.choice(places)
        kind, value = _mutant(rng, _get(spec, path))
        _get(spec, path[:-1])[path[-1]] = value
        done.append(f"{kind}@{_dotted(path)}")
    return spec, done


def _get(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


def _dotted(path: tuple) -> str:
    text = "spec"
    for key in path:
        text += f"[{key}]" if isinstance(key, int) else f".{key}"
    return text


# ---------------------------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    name: str
    raw: bytes  # the exact request body
    origin: str  # "generated", "mutated: ...", or the known case's label

    @staticmethod
    def of(name: str, spec: Any, origin: str) -> Case:
        body = {"apiVersion": API, "kind": "TrainingJob", "metadata": {"name": name}, "spec": spec}
        return Case(name, json.dumps(body).encode(), origin)


def _raw(name: str, spec_json: str) -> bytes:
    return (f'{{"apiVersion":"{API}","kind":"TrainingJob","metadata":{{"name":"{name}"}},"spec":{spec_json}}}').encode()


def _nested_json(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


#: The testers' reports, as explicit cases: label -> raw JSON of the spec.
KNOWN: dict[str, str] = {
    "kwargs-nested-1000": '{"model":{"kwargs":' + _nested_json(1000) + "}}",
    "kwargs-nested-100000": '{"model":{"kwargs":' + _nested_json(100_000) + "}}",
    "seed-below-int64": json.dumps({"training": {"seed": -2**63 - 1}}),
    "env-empty-name-int-value": json.dumps({"template": {"env": [{"name": "", "value": 1}]}}),
    "memory-limit-negative": json.dumps({"template": {"resources": {"limits": {"memory": -1}}}}),
    "nan-literal": '{"algorithm":{"name":"diloco","outerLr":NaN}}',
}


#: Cases this fuzzing found, kept as explicit regressions: label -> raw JSON of the spec.
FOUND: dict[str, str] = {
    "memory-limit-not-a-quantity": json.dumps({"template": {"resources": {"limits": {"memory": "lots"}}}}),
    "env-item-unknown-field": json.dumps({"template": {"env": [{"name": "A", "value": "1", "valu": "2"}]}}),
}


def known_cases() -> list[Case]:
    """The testers' cases, then the ones this fuzzing found."""
    return [Case(f"known-{label}"[:51], _raw(f"known-{label}"[:51], spec), label)
            for label, spec in (KNOWN | FOUND).items()]


def generated_cases(count: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    schema = crd_spec_schema()
    only = algorithm_fields(schema)
    cases = []
    for i in range(count):
        if rng.random() < 0.5:  # a valid spec, mutated: the mutation decides
            spec, done = mutate(coherent(generate(schema, rng, strict=True), only), rng)
            cases.append(Case.of(f"fuzz-{seed}-{i}", spec, "mutated: " + ", ".join(done)))
        else:
            spec = generate(schema, rng)
            if rng.random() < 0.8:
                spec = coherent(spec, only)
            cases.append(Case.of(f"fuzz-{seed}-{i}", spec, "generated"))
    return cases


# ---------------------------------------------------------------------------------------------- checks

#: Operator bugs this fuzzing found and not fixed yet, for the operator's owners (tests/test_fuzz_trainingjob.py
#: marks their explicit cases xfail(strict=True)): a signature of the planner's error -> the bug. The first three
#: it found are fixed: spec.model.kwargs nested ~1,000 deep made plan() raise "Maximum serialization depth
#: exceeded"; children the operator's client refused (a pydantic ValidationError "for CoreV1Api.create_namespaced_
#: pod": negative or numeric quantities, env values that are not strings, env/volumes/tolerations/affinity items of
#: the wrong shape) were retried forever; and a pod the API answered 400 (a quantity that is not one) was not taken
#: as refused for good. Such jobs now fail at once with InvalidSpec naming the field (validate_job), a client
#: refusal that slips past it is a PodRefused failure, and a 400 is permanent.
OPERATOR_BUGS: dict[str, str] = {}


def operator_bug(outcome: Outcome) -> str | None:
    """The known operator bug an outcome's planner error is, or None (a new finding)."""
    for signature, bug in OPERATOR_BUGS.items():
        if outcome.plan_error and signature in outcome.plan_error:
            return bug
    return None



def names_a_field(status: dict[str, Any]) -> bool:
    """Whether a refusal points at a field: a cause with a ``spec``/``metadata`` field, or such a path in its
    message (a body that does not parse has no field: its message must say where it failed)."""
    causes = (status.get("details") or {}).get("causes") or []
    if any(str(c.get("field", "")).startswith(("spec", "metadata")) for c in causes):
        return True
    message = str(status.get("message", ""))
    if status.get("code") == 400 and ("not valid JSON" in message or "nested too deeply" in message):
        return True
    return "spec." in message or "spec:" in message


@dataclasses.dataclass
class Outcome:
    case: Case
    status: int
    body: dict[str, Any]
    plan_error: str | None = None  # the planner's traceback
    phase: str | None = None  # after planning (and a refused child)
    message: str = ""


@dataclasses.dataclass
class Report:
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def by_status(self) -> collections.Counter:
        return collections.Counter(o.status for o in self.outcomes)

    def server_errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status >= 500 or o.status == 0]

    def unnamed_refusals(self) -> list[Outcome]:
        return [o for o in self.outcomes if 400 <= o.status < 500 and not names_a_field(o.body)]

    def planner_errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.plan_error]

    def new_planner_errors(self) -> list[Outcome]:
        """Planner errors that are none of the known :data:`OPERATOR_BUGS`."""
        return [o for o in self.planner_errors() if operator_bug(o) is None]

    def unnamed_failures(self) -> list[Outcome]:
        """Accepted jobs the operator failed without naming a field in the condition."""
        return [o for o in self.accepted() if o.phase == "Failed" and "spec." not in o.message]

    def accepted(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 201]


def post(session: requests.Session, running: Running, raw: bytes, timeout_s: float = 30) -> tuple[int, dict[str, Any]]:
    try:
        r = session.post(running.url + COLLECTION, data=raw, timeout=timeout_s,
                         headers=running.headers | {"Content-Type": "application/json"})
    except requests.RequestException as exc:
        return 0, {"message": f"no answer: {exc!r}"}
    try:
        return r.status_code, json.loads(r.text)  # Python's parser: a NaN an accepted job carries still loads
    except ValueError:
        return r.status_code, {"message": r.text[:500]}


_CLIENTS: dict[str, Any] = {}


def core_client(running: Running) -> Any:
    """The operator's own client (``loco_operator.cli.load_api_client``) for ``running``: children go through
    the same client-side model validation as in the handlers."""
    if running.url not in _CLIENTS:
        import tempfile

        from kubernetes import client as k8s

        from loco_local.apiserver import write_kubeconfig
        from loco_operator.cli import load_api_client

        path = Path(tempfile.mkdtemp(prefix="fuzz-tj-")) / "kubeconfig"
        _CLIENTS[running.url] = k8s.CoreV1Api(load_api_client(str(write_kubeconfig(path, running.url,
                                                                                     token=running.token))))
    return _CLIENTS[running.url]


def plan_accepted(running: Running, job: dict[str, Any]) -> tuple[str | None, str, str]:
    """The planner on an accepted job (no children yet), then its children created as the handlers create
    them (the operator's client, here with ``dryRun=All``). Returns (the error, or None; the phase; the Failed
    condition's message). An error is an exception out of the planner or out of a child's creation that the
    handlers do not turn into a status (:func:`loco_operator.handlers.apply` handles an ``ApiException``, and the
    client's own refusal of a worker pod, a pydantic ``ValidationError``, as final), or a refusal of a worker pod
    the operator does not take as final."""
    from kubernetes.client.exceptions import ApiException
    from pydantic import ValidationError

    from loco_operator.handlers import BY_CLIENT, api_message, client_message
    from loco_operator.planner import CreateConfigMap, CreatePod, CreateService, Observed, plan, plan_pod_refused, \
        refusal_is_permanent

    core = core_client(running)
    create = {CreateService: core.create_namespaced_service, CreateConfigMap: core.create_namespaced_config_map,
              CreatePod: core.create_namespaced_pod}
    try:
        result = plan(job, Observed(), NOW)
        status = result.status
        pods = 0
        for action in result.actions:
            if type(action) not in create:
                continue
            if isinstance(action, CreatePod):
                pods += 1
                if pods > CHECKED_PODS:
                    continue  # the workers share one template: the first ones stand for all
            try:
                create[type(action)](NS, action.body, dry_run="All")
            except ApiException as exc:
                message = api_message(exc)
                if exc.status >= 500:
                    return f"the API answered {exc.status} to a child the operator rendered: {message}", "", ""
                if not isinstance(action, CreatePod):
                    return f"the API refused {type(action).__name__} ({exc.status}): {message}", "", ""
                if not refusal_is_permanent(exc.status, message):
                    return f"the API refused worker pod {action.name} ({exc.status}), not for good: {message}", "", ""
                status = plan_pod_refused(job, status, action.name, message, NOW).status
                break
            except ValidationError as exc:  # the client refused it before sending: handlers.apply's safety net
                if not isinstance(action, CreatePod):
                    return f"the operator's client refused {type(action).__name__}: {client_message(exc)}", "", ""
                status = plan_pod_refused(job, status, action.name, client_message(exc), NOW, by=BY_CLIENT).status
                break
    except Exception:  # noqa: BLE001 - what this fuzzer looks for
        return traceback.format_exc(limit=-6), "", ""
    failed = [c for c in status.get("conditions") or [] if c.get("type") == "Failed" and c.get("status") == "True"]
    return None, status.get("phase", ""), failed[0]["message"] if failed else ""


def run(running: Running, cases: list[Case], *, planner: bool = True) -> Report:
    """POST every case; plan each accepted one; delete it again (the store stays small)."""
    report = Report()
    session = requests.Session()
    started = time.monotonic()
    for case in cases:
        status, body = post(session, running, case.raw)
        outcome = Outcome(case, status, body)
        if status == 201 and planner:
            outcome.plan_error, outcome.phase, outcome.message = plan_accepted(running, body)
        if status == 201:
            session.delete(f"{running.url}{COLLECTION}/{case.name}", headers=running.headers, timeout=30)
        report.outcomes.append(outcome)
    report.seconds = time.monotonic() - started
    return report


# ---------------------------------------------------------------------------------------------- doc


def render(result: dict[str, Any]) -> str:
    from benchdoc import markers

    start, end = markers(DOC_NAME)
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(result["statuses"].items()))
    lines = [
        start,
        "## TrainingJob API fuzzing",
        "",
        f"`{result['command']}` on {result['machine']}, {result['date']}.",
        "",
        "Specs drawn from the CRD's openAPIV3Schema, half of them mutated (wrong types, huge and non-finite "
        "numbers, unicode, deep nesting, unknown fields), plus the testers' known cases; each POSTed to the "
        "embedded API server (schema and CEL validation), each accepted one planned by the operator's planner "
        "with its children dry-run through the API. The CI pass (`tests/test_fuzz_trainingjob.py`) runs 1,000 "
        "specs with a fixed seed.",
        "",
        "| specs | accepted | refused (4xx) | refusals or Failed conditions not naming a field | 5xx | "
        "new planner exceptions | known operator bugs hit | accepted, then Failed by the operator | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {result['specs']} | {result['accepted']} | {result['refused']} | {result['unnamed']} | "
        f"{result['server_errors']} | {result['planner_errors']} | {sum(result['known_bugs'].values())} | "
        f"{result['failed']} | {result['seconds']:.0f} |",
        "",
        f"Answers by status: {statuses}.",
    ]
    if result["known_bugs"]:
        lines += ["", "Known operator bugs (not fixed here; their explicit cases are `xfail(strict=True)` in the test):", ""]
        lines += [f"- {n} spec(s): {bug}" for bug, n in result["known_bugs"].items()]
    if result["findings"]:
        lines += ["", "Failures (first 10):", ""] + [f"- {f}" for f in result["findings"][:10]]
    lines.append(end)
    return "\n".join(lines)


def summarize(report: Report, command: str) -> dict[str, Any]:
    from benchdoc import cpu_model

    findings = [f"`{o.case.origin[:120]}`: {o.status} {json.dumps(o.body)[:200]}"
                for o in report.server_errors() + report.unnamed_refusals()]
    findings += [f"`{o.case.origin[:120]}`: Failed without naming a field: {o.message[:200]}"
                 for o in report.unnamed_failures()]
    findings += [f"`{o.case.origin[:120]}`: planner raised `{o.plan_error.strip().splitlines()[-1][:200]}`"
                 for o in report.new_planner_errors()]
    bugs = collections.Counter(operator_bug(o) for o in report.planner_errors() if operator_bug(o))
    return {
        "command": command, "machine": f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"), "specs": len(report.outcomes), "accepted": len(report.accepted()),
        "refused": sum(1 for o in report.outcomes if 400 <= o.status < 500),
        "unnamed": len(report.unnamed_refusals()) + len(report.unnamed_failures()),
        "server_errors": len(report.server_errors()),
        "planner_errors": len(report.new_planner_errors()),
        "known_bugs": {bug: n for bug, n in bugs.most_common()},
        "failed": sum(1 for o in report.accepted() if o.phase == "Failed"),
        "seconds": report.seconds, "statuses": dict(report.by_status()), "findings": findings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", type=int, default=5000, help="generated specs (the known cases come on top)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-doc", action="store_true", help="print, do not write docs/benchmarks.md")
    args = parser.parse_args()
    cases = known_cases() + generated_cases(args.specs, args.seed)
    with running_server() as running:
        report = run(running, cases)
    result = summarize(report, f"python bench/fuzz_trainingjob.py --specs {args.specs} --seed {args.seed}")
    print(json.dumps({k: v for k, v in result.items() if k != "findings"}, indent=1))
    for line in result["findings"]:
        print("FAIL", line)
    if not args.no_doc:
        from benchdoc import markers, write_section

        write_section(render(result), *markers(DOC_NAME))


if __name__ == "__main__":
    main()
