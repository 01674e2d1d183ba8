"""Validate a TrainingJob body with the pydantic models and the cross-field rules.

The API server already enforces the CRD schema and its CEL rules; the operator validates again
(defence in depth: an old API server without CEL, a CRD installed by hand, an object stored
before the schema tightened). A job that fails here gets phase Failed, a Failed condition with
reason InvalidSpec naming every bad field, and no pods.

:func:`validate_job` returns *every* problem, each as a :class:`FieldError` whose ``path`` uses the
wire (camelCase) spelling, e.g. ``spec.algorithm.syncEvery``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from .crd import apply_defaults, openapi_schema
from .rules import RULES
from .spec import TrainingJobSpec

_MISSING = object()


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


def validate_job(body: Mapping[str, Any]) -> list[FieldError]:
    """Every problem of a TrainingJob body (empty when it is valid).

    Checks ``metadata.name`` (it names the Service and the pods), every ``spec`` field against the
    models (types, ranges, enums, unknown fields) and the cross-field rules of :mod:`.rules`, on the
    object as the API server would default it.
    """
    if not isinstance(body, Mapping):
        return [FieldError("", None, "a TrainingJob must be an object")]
    raw_spec = body.get("spec", {})
    if raw_spec is None:
        raw_spec = {}
    if not isinstance(raw_spec, Mapping):
        return [FieldError("spec", raw_spec, "spec must be an object")]
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
    return errors


def parse_spec(body: Mapping[str, Any]) -> TrainingJobSpec:
    """The validated spec of a TrainingJob body; raises :class:`InvalidSpecError` listing every problem."""
    errors = validate_job(body)
    if errors:
        raise InvalidSpecError(errors)
    return TrainingJobSpec.model_validate(body.get("spec") or {})
