"""Validate a TrainingJob body with the pydantic models and the cross-field rules.

The API server already enforces the CRD schema and its CEL rules; the operator validates again
(defence in depth: an old API server without CEL, a CRD installed by hand, an object stored
before the schema tightened). A job that fails here gets phase Failed, a Failed condition with
reason InvalidSpec naming every bad field, and no pods.

:func:`validate_job` returns *every* problem, each as a :class:`FieldError` whose ``path`` uses the
wire (camelCase) spelling, e.g. ``spec.algorithm.syncEvery``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import TypeAdapter, ValidationError
from pydantic.alias_generators import to_camel

from .crd import apply_defaults, openapi_schema
from .rules import RULES
from .spec import TrainingJobSpec

_MISSING = object()

#: Deepest a free-form value (``model.kwargs``, ``template.affinity``, an env item...) may nest. The API
#: takes far deeper JSON (kube-apiserver: 10,000 levels), but the operator recurses over these values
#: (pydantic, json, the Kubernetes client) and a 1,000-deep one exceeded Python's recursion limit: the
#: job got no status and was retried forever.
MAX_FREE_FORM_DEPTH = 64

#: A Kubernetes resource quantity (k8s.io/apimachinery resource.Quantity): a signed decimal number with
#: an optional binary (Ki..Ei), decimal (n..E) or exponent (e3) suffix.
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_QUANTITY = re.compile(rf"^[+-]?{_NUMBER}(?:[KMGTPE]i|[numkMGTPE]|[eE][+-]?{_NUMBER})?$")


@dataclass(frozen=True)
class FieldError:
    """One problem: the field's path, the value found there, and what is wrong plus how to fix it."""

    path: str
    value: Any
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" + ("" if self.value is None else f" (got {self.value!r})")


class InvalidSpecError(ValueError):
    """Raised by :func:`parse_spec` when a body has field errors; carries all of them."""

    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return openapi_schema()


def _lookup(obj: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        if isinstance(obj, Mapping) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and isinstance(part, int) and 0 <= part < len(obj):
            obj = obj[part]
        else:
            return _MISSING
    return obj


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _hint(error_type: str) -> str:
    if error_type == "extra_forbidden":
        return "unknown field: remove it or fix its spelling (fields are camelCase, e.g. syncEvery)"
    if error_type == "missing":
        return "required field is missing: set it"
    return ""


def _depth(value: Any) -> int:
    """How deep ``value`` nests (a scalar: 0, ``{}`` or ``[]``: 1), walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, Mapping):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def too_deep(spec: Mapping[str, Any], limit: int = MAX_FREE_FORM_DEPTH) -> list[FieldError]:
    """The values of ``spec`` the CRD schema leaves free-form (or does not know) that nest deeper than
    ``limit``, each named by the field where the schema stops describing it (``spec.model.kwargs``).
    Walked without recursion, so any depth the API accepts is measured safely."""
    errors: list[FieldError] = []
    stack: list[tuple[str, Any, Any]] = [("spec", _schema()["properties"]["spec"], spec)]
    while stack:
        path, schema, value = stack.pop()
        props, items = schema.get("properties") or {}, schema.get("items")
        extra = schema.get("additionalProperties")
        if props and isinstance(value, Mapping):
            stack += [(f"{path}.{k}", props.get(k, {}), v) for k, v in value.items()]
        elif isinstance(extra, dict) and isinstance(value, Mapping):
            stack += [(f"{path}[{k}]", extra, v) for k, v in value.items()]
        elif isinstance(items, dict) and isinstance(value, list):
            stack += [(f"{path}[{i}]", items, v) for i, v in enumerate(value)]
        elif (depth := _depth(value)) > limit:
            errors.append(FieldError(path, None, f"nested {depth} levels deep; free-form values may nest at most "
                                                  f"{limit} levels: flatten it"))
    return sorted(errors, key=lambda e: e.path)


@lru_cache(maxsize=1)
def _client_models() -> dict[str, tuple[TypeAdapter, bool]]:
    """template field -> (the Kubernetes client's model of it, whether the field is a list of them). The
    client (v37, pydantic) refuses a pod whose free-form parts do not fit these, before sending it."""
    from kubernetes import client as k8s  # imported here: the models are only needed for a template

    return {"env": (TypeAdapter(k8s.V1EnvVar), True), "tolerations": (TypeAdapter(k8s.V1Toleration), True),
            "volumes": (TypeAdapter(k8s.V1Volume), True), "volumeMounts": (TypeAdapter(k8s.V1VolumeMount), True),
            "affinity": (TypeAdapter(k8s.V1Affinity), False),
            "resources": (TypeAdapter(k8s.V1ResourceRequirements), False)}


def quantity_error(value: Any) -> str | None:
    """Why ``value`` is not a non-negative Kubernetes quantity (``"1Gi"``, ``"500m"``, ``2``), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return f"must be a quantity such as '1Gi', '500m' or 2, not {type(value).__name__}"
    if isinstance(value, float):  # a fraction is the model's to refuse (int | str); 1.0 is 1
        return "must not be negative" if value < 0 else None
    text = str(value)
    if not _QUANTITY.match(text):
        return "is not a Kubernetes quantity (e.g. '1Gi', '500m', '2')"
    if text.startswith("-") and any(c in "123456789" for c in text.split("e")[0].split("E")[0]):
        return "must not be negative"
    return None


def _resources_errors(resources: Mapping[str, Any]) -> list[FieldError]:
    errors = []
    for section in ("limits", "requests"):
        values = resources.get(section)
        for name, value in (values.items() if isinstance(values, Mapping) else ()):
            problem = quantity_error(value)
            if problem:
                errors.append(FieldError(f"spec.template.resources.{section}[{name}]", value, problem))
    return errors


_CLIENT_HINTS = {"extra_forbidden": "unknown field: remove it or fix its spelling (Kubernetes fields are camelCase)",
                 "missing": "required field is missing: set it"}


def _client_errors(path: str, adapter: TypeAdapter, value: Any) -> list[FieldError]:
    try:
        adapter.validate_python(value)
    except ValidationError as exc:
        return [FieldError(path + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]),
                           None if err["type"] == "missing" else err.get("input"),
                           f"{err['msg']}: {_CLIENT_HINTS[err['type']]}" if err["type"] in _CLIENT_HINTS else err["msg"])
                for err in exc.errors(include_url=False)]
    return []


def template_errors(template: Mapping[str, Any]) -> list[FieldError]:
    """Problems of ``spec.template``'s free-form fields (Kubernetes objects the CRD does not describe) that
    would make the operator's client or the API refuse every worker pod: quantities that are not
    non-negative quantities, env items without a name or with a value that is not a string, and items of
    env, tolerations, volumes, volumeMounts, affinity and resources that do not fit their Kubernetes type."""
    fields = {to_camel(k): v for k, v in template.items()}
    errors: list[FieldError] = []
    resources = fields.get("resources")
    if isinstance(resources, Mapping):
        errors += _resources_errors(resources)
        # numbers are quantities too: render sends them as strings, which is what the client wants
        fields["resources"] = {k: {n: str(q) for n, q in v.items()} if isinstance(v, Mapping) else v
                               for k, v in resources.items()}
    for name, (adapter, many) in _client_models().items():
        value = fields.get(name)
        if many and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    errors += _client_errors(f"spec.template.{name}[{i}]", adapter, item)
        elif not many and isinstance(value, Mapping):
            errors += _client_errors(f"spec.template.{name}", adapter, value)
    for i, item in enumerate(fields.get("env") if isinstance(fields.get("env"), list) else []):
        if isinstance(item, Mapping) and item.get("name") == "":
            errors.append(FieldError(f"spec.template.env[{i}].name", "", "must not be empty"))
    return errors


def validate_job(body: Mapping[str, Any]) -> list[FieldError]:
    """Every problem of a TrainingJob body (empty when it is valid).

    Checks ``metadata.name`` (it names the Service and the pods), every ``spec`` field against the
    models (types, ranges, enums, unknown fields) and the cross-field rules of :mod:`.rules`, on the
    object as the API server would default it, and the template's free-form Kubernetes objects as the
    client and the API would (:func:`template_errors`). A free-form value nested deeper than
    :data:`MAX_FREE_FORM_DEPTH` is reported alone: the other checks would recurse into it.
    """
    if not isinstance(body, Mapping):
        return [FieldError("", None, "a TrainingJob must be an object")]
    raw_spec = body.get("spec", {})
    if raw_spec is None:
        raw_spec = {}
    if not isinstance(raw_spec, Mapping):
        return [FieldError("spec", raw_spec, "spec must be an object")]
    deep = too_deep(raw_spec)
    if deep:
        return deep
    defaulted = apply_defaults(_schema(), {"metadata": dict(body.get("metadata") or {}), "spec": dict(raw_spec)})
    errors: list[FieldError] = []

    # 1. cross-field rules (the CEL rules' Python mirror), each reported separately.
    for rule in RULES:
        scope_obj = _lookup(defaulted, rule.scope)
        if not isinstance(scope_obj, Mapping):
            continue
        try:
            holds = rule.check(scope_obj)
        except (TypeError, KeyError, AttributeError, ZeroDivisionError):
            continue  # a badly typed field: the model validation below names it
        if not holds:
            errors.append(FieldError(rule.path, rule.field_value(scope_obj), rule.message))

    # 2. field-level validation by the models. Model-level (cross-field) errors are already covered
    #    by the rules above, so they are kept only when no rule named a field in that section.
    try:
        TrainingJobSpec.model_validate(defaulted["spec"])
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = ("spec", *err["loc"])
            path = _path(loc)
            value = _lookup(defaulted, loc)
            if err["type"] == "value_error":
                if any(e.path == path or e.path.startswith(path + ".") for e in errors):
                    continue
                message = str(err["msg"]).removeprefix("Value error, ")
            else:
                message = err["msg"]
                hint = _hint(err["type"])
                message = f"{message}: {hint}" if hint else message
            errors.append(FieldError(path, None if value is _MISSING else value, message))

    # 3. the template's free-form Kubernetes objects, as the client and the API will see them.
    template = defaulted["spec"].get("template")
    if isinstance(template, Mapping):
        errors += template_errors(template)
    return errors


def parse_spec(body: Mapping[str, Any]) -> TrainingJobSpec:
    """The validated spec of a TrainingJob body; raises :class:`InvalidSpecError` listing every problem."""
    errors = validate_job(body)
    if errors:
        raise InvalidSpecError(errors)
    return TrainingJobSpec.model_validate(body.get("spec") or {})
