"""Cross-field rules of the TrainingJob API, written once and enforced twice.

Each :class:`CrossFieldRule` carries a CEL expression (rendered into the CRD as an
``x-kubernetes-validations`` entry, so the API server refuses a bad object before anything
stores it) and a Python mirror of the same predicate (used by :mod:`loco_operator.validation`,
so the operator refuses an object that slipped past an API server without CEL). A test evaluates
both on the same objects and checks they agree.

Both sides see the object *after* structural defaulting (the API server applies the CRD's
``default`` values before CEL runs; :func:`loco_operator.crd.apply_defaults` does the same for
the Python side). But kube-apiserver also runs every rule on each ``default`` value itself, as
written (``spec: {}``, ``model: {}``), without the defaults nested inside it, and refuses the CRD
when a rule errors there ("no such key"). So every rule reads its fields behind :func:`_present`
guards: a field that is absent only happens in that check, and the rule then holds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from loco_contract.config import ALGORITHM_DEFAULTS, ALGORITHM_PARAMETERS, SHARDABLE_ALGORITHMS

from pydantic.alias_generators import to_camel

#: Longest job name: pod names are ``<job>-worker-<index>`` (<= 63 chars, index up to 4 digits).
MAX_JOB_NAME_LENGTH = 63 - len("-worker-") - 4
_DNS_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_FACTORY = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"


@dataclass(frozen=True)
class CrossFieldRule:
    """One rule: where it sits, what it checks, and what the user is told.

    ``scope`` is the path from the object root to the schema node that holds the rule
    (``("spec", "model", "gpt")``); ``field`` is the camelCase path, relative to the scope, of the
    field the error names (rendered as the CEL ``fieldPath``). ``check`` gets the defaulted scope
    object and returns True when the rule holds; it may raise ``TypeError``/``KeyError``/
    ``AttributeError`` on badly typed input, which counts as "not applicable" (the field-level
    validation reports the type error).
    """

    scope: tuple[str, ...]
    field: str
    cel: str
    message: str
    check: Callable[[Mapping[str, Any]], bool]

    @property
    def path(self) -> str:
        """Dotted path of the field the rule names, e.g. ``spec.algorithm.syncEvery``."""
        return ".".join((*self.scope, self.field))

    def field_value(self, scope_obj: Mapping[str, Any]) -> Any:
        value: Any = scope_obj
        for part in self.field.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        return value

    def to_validation(self) -> dict[str, Any]:
        """The ``x-kubernetes-validations`` entry."""
        out: dict[str, Any] = {"rule": self.cel, "message": self.message, "reason": "FieldValueInvalid"}
        if self.scope:  # fieldPath is not allowed to point into metadata from the root
            out["fieldPath"] = "." + self.field
        return out


def _alg_rule(param: str) -> CrossFieldRule:
    alias = to_camel(param)
    users = sorted(name for name, params in ALGORITHM_PARAMETERS.items() if param in params)
    users_cel = ", ".join(f"'{u}'" for u in users)
    return CrossFieldRule(
        scope=("spec", "algorithm"),
        field=alias,
        cel=_present((alias, "name"), f"self.name in [{users_cel}]"),
        message=(
            f"spec.algorithm.{alias} applies only to algorithm {' | '.join(users)}: "
            f"remove spec.algorithm.{alias} or set spec.algorithm.name to "
            + (users[0] if len(users) == 1 else "one of those")
        ),
        check=lambda a, _alias=alias, _users=tuple(users): a.get(_alias) is None or a.get("name") in _users,
    )


def _present(fields: tuple[str, ...], cel: str) -> str:
    """``cel`` guarded by ``has()`` on every prefix of each dotted field (``model.gpt.blockSize`` needs
    ``self.model``, ``self.model.gpt`` and ``self.model.gpt.blockSize``), in order and without repeats."""
    checks: list[str] = []
    for dotted in fields:
        parts = dotted.split(".")
        for i in range(1, len(parts) + 1):
            check = "has(self." + ".".join(parts[:i]) + ")"
            if check not in checks:
                checks.append(check)
    return f"!({' && '.join(checks)}) || ({cel})"


def _elastic(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    return spec.get("elastic") or {}


RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        scope=(),
        field="metadata.name",
        # has(): only name/generateName of metadata are visible to root rules, and an API server
        # that hides metadata altogether must not turn this into an evaluation error.
        cel=f"!has(self.metadata) || !has(self.metadata.name) || (self.metadata.name.size() <= {MAX_JOB_NAME_LENGTH}"
        f" && self.metadata.name.matches('{_DNS_1035}'))",
        message=(
            f"metadata.name must be a DNS-1035 label of at most {MAX_JOB_NAME_LENGTH} characters (lowercase letters, "
            "digits and '-', starting with a letter): it names the headless Service and the worker pods; rename the job, e.g. 'gpt-diloco'"
        ),
        check=lambda o: len(o["metadata"]["name"]) <= MAX_JOB_NAME_LENGTH
        and re.match(_DNS_1035, o["metadata"]["name"]) is not None,
    ),
    CrossFieldRule(
        scope=(),
        field="spec.checkpoint.initFrom.jobName",
        cel="!has(self.metadata) || !has(self.metadata.name) || !has(self.spec) || !has(self.spec.checkpoint) "
        "|| !has(self.spec.checkpoint.initFrom) || self.spec.checkpoint.initFrom.jobName != self.metadata.name",
        message="spec.checkpoint.initFrom.jobName names this job itself: a job resumes from its own checkpoints "
        "anyway; name another TrainingJob, or remove initFrom",
        check=lambda o: (((o.get("spec") or {}).get("checkpoint") or {}).get("initFrom") or {}).get("jobName")
        != (o.get("metadata") or {}).get("name"),
    ),
    CrossFieldRule(
        scope=("spec",),
        field="elastic.minReplicas",
        cel="!has(self.elastic) || !has(self.elastic.minReplicas) || !has(self.elastic.maxReplicas) "
        "|| self.elastic.minReplicas <= self.elastic.maxReplicas",
        message="spec.elastic.minReplicas must be <= spec.elastic.maxReplicas: lower minReplicas or raise maxReplicas",
        check=lambda s: _elastic(s).get("minReplicas") is None
        or _elastic(s).get("maxReplicas") is None
        or _elastic(s)["minReplicas"] <= _elastic(s)["maxReplicas"],
    ),
    CrossFieldRule(
        scope=("spec",),
        field="replicas",
        cel=_present(("elastic.minReplicas", "replicas"), "self.elastic.minReplicas <= self.replicas"),
        message="spec.replicas must be >= spec.elastic.minReplicas: raise replicas or lower elastic.minReplicas",
        check=lambda s: _elastic(s).get("minReplicas") is None or _elastic(s)["minReplicas"] <= s["replicas"],
    ),
    CrossFieldRule(
        scope=("spec",),
        field="replicas",
        cel=_present(("elastic.maxReplicas", "replicas"), "self.replicas <= self.elastic.maxReplicas"),
        message="spec.replicas must be <= spec.elastic.maxReplicas: lower replicas or raise elastic.maxReplicas",
        check=lambda s: _elastic(s).get("maxReplicas") is None or s["replicas"] <= _elastic(s)["maxReplicas"],
    ),
    CrossFieldRule(
        scope=("spec",),
        field="training.seqLen",
        cel=_present(("model.name", "training.seqLen", "model.gpt.blockSize"),
                     "self.model.name != 'gpt' || self.training.seqLen <= self.model.gpt.blockSize"),
        message="spec.training.seqLen must be <= spec.model.gpt.blockSize: lower training.seqLen or raise model.gpt.blockSize",
        check=lambda s: s["model"]["name"] != "gpt" or s["training"]["seqLen"] <= s["model"]["gpt"]["blockSize"],
    ),
    CrossFieldRule(
        scope=("spec",),
        field="nprocPerWorker",
        cel=_present(("nprocPerWorker", "algorithm.name"), "self.nprocPerWorker <= 1 || self.algorithm.name in ["
                     + ", ".join(f"'{a}'" for a in SHARDABLE_ALGORITHMS) + "]"),
        message=(
            f"spec.nprocPerWorker > 1 (FSDP sharding inside a pod) requires spec.algorithm.name "
            f"{' | '.join(SHARDABLE_ALGORITHMS)}: set nprocPerWorker to 1 or algorithm.name to one of those"
        ),
        check=lambda s: s["nprocPerWorker"] <= 1 or s["algorithm"]["name"] in SHARDABLE_ALGORITHMS,
    ),
    CrossFieldRule(
        scope=("spec", "algorithm"),
        field="adaptiveSteps.minSteps",
        cel=_present(("adaptiveSteps.minSteps",), f"self.adaptiveSteps.minSteps <= (has(self.syncEvery) ? self.syncEvery "
                     f": {ALGORITHM_DEFAULTS['diloco']['sync_every']})"),
        message="spec.algorithm.adaptiveSteps.minSteps must be <= spec.algorithm.syncEvery (a round has syncEvery inner "
                "steps): lower minSteps or raise syncEvery",
        check=lambda a: (a.get("adaptiveSteps") or {}).get("minSteps") is None
        or a["adaptiveSteps"]["minSteps"] <= (a.get("syncEvery") or ALGORITHM_DEFAULTS["diloco"]["sync_every"]),
    ),
    CrossFieldRule(
        scope=("spec",),
        field="algorithm.adaptiveSteps",
        cel=_present(("algorithm.adaptiveSteps", "nprocPerWorker"), "self.nprocPerWorker <= 1"),
        message="spec.algorithm.adaptiveSteps needs spec.nprocPerWorker 1 (a sharded pod's processes would have to "
                "skip the same steps): remove adaptiveSteps or set nprocPerWorker to 1",
        check=lambda s: (s.get("algorithm") or {}).get("adaptiveSteps") is None or s["nprocPerWorker"] <= 1,
    ),
    CrossFieldRule(
        scope=("spec", "model", "gpt"),
        field="nEmbd",
        cel=_present(("nEmbd", "nHead"), "self.nEmbd % self.nHead == 0"),
        message="spec.model.gpt.nEmbd must be a multiple of spec.model.gpt.nHead: change nEmbd or nHead",
        check=lambda g: g["nEmbd"] % g["nHead"] == 0,
    ),
    CrossFieldRule(
        scope=("spec", "model"),
        field="factory",
        cel=_present(("name",), "self.name != 'custom' || (has(self.factory) && self.factory != '')"),
        message="spec.model.factory is required when spec.model.name is 'custom': set factory to 'package.module:callable'",
        check=lambda m: m["name"] != "custom" or bool(m.get("factory")),
    ),
    CrossFieldRule(
        scope=("spec", "model"),
        field="factory",
        cel=_present(("factory", "name"), "self.name == 'custom'"),
        message="spec.model.factory is set but spec.model.name is not 'custom': set name to 'custom' or remove factory",
        check=lambda m: m.get("factory") is None or m["name"] == "custom",
    ),
    CrossFieldRule(
        scope=("spec", "model"),
        field="factory",
        cel=f"!has(self.factory) || self.factory == '' || self.factory.matches('{_FACTORY}')",
        message="spec.model.factory must have the form 'package.module:callable', e.g. 'mypkg.models:build'",
        check=lambda m: not m.get("factory") or re.match(_FACTORY, m["factory"]) is not None,
    ),
    CrossFieldRule(
        scope=("spec", "data"),
        field="path",
        cel=_present(("source",), "self.source != 'shards' || (has(self.path) && self.path != '')"),
        message="spec.data.path is required when spec.data.source is 'shards': set it to the directory of *.bin token shards",
        check=lambda d: d["source"] != "shards" or bool(d.get("path")),
    ),
    CrossFieldRule(
        scope=("spec", "faultDetection"),
        field="consecutive",
        cel=_present(("consecutive", "window"), "self.consecutive <= self.window"),
        message="spec.faultDetection.consecutive must be <= spec.faultDetection.window: raise window or lower consecutive",
        check=lambda d: d["consecutive"] <= d["window"],
    ),
    CrossFieldRule(
        scope=("spec", "faultDetection"),
        field="warmupHangTimeoutSeconds",
        cel=_present(("warmupHangTimeoutSeconds", "hangTimeoutFloorSeconds"),
                     "self.warmupHangTimeoutSeconds >= self.hangTimeoutFloorSeconds"),
        message="spec.faultDetection.warmupHangTimeoutSeconds must be >= spec.faultDetection.hangTimeoutFloorSeconds: "
        "start-up is never judged more strictly than steady state",
        check=lambda d: d["warmupHangTimeoutSeconds"] >= d["hangTimeoutFloorSeconds"],
    ),
    CrossFieldRule(
        scope=("spec", "runPolicy", "failurePolicy"),
        field="rules",
        cel="!has(self.rules) || self.rules.all(r, has(r.onExitCodes) != (has(r.onPodConditions) && "
        "r.onPodConditions.size() > 0))",
        message="each rule of spec.runPolicy.failurePolicy.rules must set exactly one of onExitCodes and onPodConditions: "
        "keep the matcher the rule is for and remove the other",
        check=lambda fp: all((r.get("onExitCodes") is not None) != bool(r.get("onPodConditions"))
                             for r in fp.get("rules") or []),
    ),
    CrossFieldRule(
        scope=("spec", "placement"),
        field="spread",
        cel="!has(self.pack) || !has(self.spread) || self.pack == null || self.spread == null",
        message="spec.placement sets pack or spread, not both: keep the one you mean",
        check=lambda pl: pl.get("pack") is None or pl.get("spread") is None,
    ),
    *(
        _alg_rule(param)
        for param in sorted({p for params in ALGORITHM_PARAMETERS.values() for p in params})
    ),
)


def rules_at(scope: tuple[str, ...]) -> list[CrossFieldRule]:
    """The rules whose CEL sits on the schema node at ``scope``."""
    return [rule for rule in RULES if rule.scope == scope]
