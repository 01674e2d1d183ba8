"""Custom resources against their CRD: defaults, unknown fields, OpenAPI schema and CEL rules.

:func:`prepare_custom_object` does what the real apiserver does on every write of a custom
resource, in the same order: apply schema ``default``s, reject (or with ``fieldValidation=Ignore``
/``Warn`` prune) fields the schema does not declare, validate with ``jsonschema``, then evaluate
each ``x-kubernetes-validations`` CEL rule (``celpy``). Every problem is collected with its field
path; the message matches kube-apiserver's, e.g.::

    TrainingJob.loco.dev "bad" is invalid: [spec.replicas: Invalid value: 0: spec.replicas in body
    should be greater than or equal to 1, spec: Invalid value: "object": elastic.minReplicas must be <= replicas]

:func:`validate_crd` checks a ``CustomResourceDefinition`` itself (names, versions, schema, rules).

:func:`pod_path_causes` checks the paths a pod names inside its volumes as kube-apiserver does.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from typing import Any, Iterator

import celpy
import jsonschema
from celpy import celtypes

from loco_local.podpaths import ITEM_SOURCES, entries, field_of, local_path_problems

from . import errors
from .resources import ResourceType

Cause = tuple[str, str]  # (field path, full message)
_ROOT_META = ("apiVersion", "kind", "metadata")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_LABEL_MESSAGE = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
                      "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
                      "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")


# ---- paths and values -----------------------------------------------------------------------
def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _go_value(value: Any) -> str:
    """How kube-apiserver prints a bad value (``0``, ``"text"``, ``"object"``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)
    kind = _type_name(value)
    return f'"{kind}"' if kind in ("object", "array") else "null"


def _type_name(value: Any) -> str:
    """The JSON-schema type of a decoded value (bool before int: a bool is an int in Python)."""
    for python_type, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                              (dict, "object"), (list, "array")):
        if isinstance(value, python_type):
            return name
    return "null"


def _prefix(path: str) -> str:
    return f"{path}: " if path else ""


# ---- schema walking -------------------------------------------------------------------------
def _children(schema: dict[str, Any], value: Any, path: str, root: bool = False
              ) -> Iterator[tuple[dict[str, Any], Any, str, str | int, Any]]:
    """(child schema, child value, child path, key, container) for each value the schema describes."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            if root and key in _ROOT_META:
                continue
            if key in props:
                yield props[key], child, _join(path, key), key, value
            elif isinstance(extra, dict):
                yield extra, child, _join(path, key), key, value
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, child in enumerate(value):
            yield schema["items"], child, _join(path, index), index, value


def apply_defaults(schema: dict[str, Any], value: Any, root: bool = True) -> None:
    """Fill in missing properties that declare a ``default`` (recursively, in place)."""
    if isinstance(value, dict):
        for key, prop in (schema.get("properties") or {}).items():
            if root and key in _ROOT_META:
                continue
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
    for child_schema, child, _, _, _ in _children(schema, value, "", root):
        apply_defaults(child_schema, child, root=False)


def unknown_fields(schema: dict[str, Any], value: Any, path: str = "", root: bool = True) -> list[str]:
    """Paths of fields the schema neither declares nor preserves."""
    found: list[str] = []
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
    embedded = schema.get("x-kubernetes-embedded-resource") is True
    if isinstance(value, dict) and not preserve:
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key in value:
            if (root or embedded) and key in _ROOT_META:
                continue
            if key not in props and not extra:
                found.append(_join(path, key))
    for child_schema, child, child_path, _, _ in _children(schema, value, path, root):
        found += unknown_fields(child_schema, child, child_path, root=False)
    return found


def _duplicate_set_items(schema: dict[str, Any], value: Any, path: str = "", root: bool = True) -> list[Cause]:
    """Items repeated in a list the schema marks ``x-kubernetes-list-type: set`` (kube-apiserver: Duplicate value)."""
    causes: list[Cause] = []
    if isinstance(value, list) and schema.get("x-kubernetes-list-type") == "set":
        seen: list[Any] = []
        for index, item in enumerate(value):
            if item in seen:
                field = _join(path, index)
                causes.append((field, f"{field}: Duplicate value: {_go_value(item)}"))
            seen.append(item)
    for child_schema, child, child_path, _, _ in _children(schema, value, path, root):
        causes += _duplicate_set_items(child_schema, child, child_path, root=False)
    return causes


def prune(schema: dict[str, Any], value: Any, root: bool = True) -> None:
    """Drop unknown fields in place (``fieldValidation=Ignore``/``Warn``, the real default)."""
    if isinstance(value, dict) and schema.get("x-kubernetes-preserve-unknown-fields") is not True:
        props = schema.get("properties") or {}
        if not schema.get("additionalProperties"):
            for key in [k for k in value if k not in props and not (root and k in _ROOT_META)]:
                del value[key]
    for child_schema, child, _, _, _ in _children(schema, value, "", root):
        prune(child_schema, child, root=False)


def _to_json_schema(schema: Any) -> Any:
    """OpenAPI v3 -> JSON Schema (draft 4): ``nullable`` becomes a ``null`` type; int-or-string allowed."""
    if isinstance(schema, list):
        return [_to_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _to_json_schema(v) for k, v in schema.items()
           if not k.startswith("x-kubernetes-") and k not in ("default", "example", "externalDocs")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if "properties" in out:
        out["properties"] = {k: _to_json_schema(v) for k, v in schema["properties"].items()}
    return out


_VALIDATORS: dict[int, tuple[dict[str, Any], jsonschema.Draft4Validator]] = {}


def _validator(schema: dict[str, Any]) -> jsonschema.Draft4Validator:
    """The body's validator for a CRD schema, built once per schema object (a re-registered CRD is a new one)."""
    cached = _VALIDATORS.get(id(schema))
    if cached is None or cached[0] is not schema:
        body_schema = dict(schema)
        body_schema["properties"] = {k: v for k, v in (schema.get("properties") or {}).items() if k not in _ROOT_META}
        if len(_VALIDATORS) > 256:
            _VALIDATORS.clear()
        cached = _VALIDATORS[id(schema)] = (schema, jsonschema.Draft4Validator(_to_json_schema(body_schema)))
    return cached[1]


def _schema_causes(schema: dict[str, Any], obj: dict[str, Any]) -> list[Cause]:
    body = {k: v for k, v in obj.items() if k not in _ROOT_META}
    validator = _validator(schema)
    causes = []
    for error in sorted(validator.iter_errors(body), key=lambda e: [str(p) for p in e.absolute_path]):
        path = ""
        for key in error.absolute_path:
            path = _join(path, key)
        causes.append(_describe(error, path))
    return causes


def _describe(error: jsonschema.ValidationError, path: str) -> Cause:
    kind, limit, value = error.validator, error.validator_value, error.instance
    where = f"{path} in body" if path else "body"
    bad = f"{_prefix(path)}Invalid value: {_go_value(value)}: "
    if kind == "required":
        missing = error.message.split("'")[1] if "'" in error.message else str(limit)
        field = _join(path, missing)
        return field, f"{field}: Required value"
    if kind == "type":
        expected = limit if isinstance(limit, str) else " or ".join(limit)
        return path, (f'{_prefix(path)}Invalid value: "{_type_name(value)}": {where} must be of type {expected}: '
                      f'"{_type_name(value)}"')
    if kind == "enum":
        supported = ", ".join(json.dumps(v) for v in limit)
        return path, f"{_prefix(path)}Unsupported value: {_go_value(value)}: supported values: {supported}"
    exclusive = error.schema.get("exclusiveMinimum" if kind == "minimum" else "exclusiveMaximum") is True
    texts = {
        "minimum": f"should be greater than {'' if exclusive else 'or equal to '}{limit}",
        "maximum": f"should be less than {'' if exclusive else 'or equal to '}{limit}",
        "pattern": f"should match '{limit}'",
        "minLength": f"should be at least {limit} chars long",
        "maxLength": f"may not be longer than {limit}",
        "minItems": f"should have at least {limit} items",
        "maxItems": f"must have at most {limit} items",
        "minProperties": f"should have at least {limit} properties",
        "maxProperties": f"must have at most {limit} properties",
        "multipleOf": f"should be a multiple of {limit}",
        "uniqueItems": "shouldn't contain duplicates",
    }
    if kind in texts:
        return path, f"{bad}{where} {texts[kind]}"
    return path, f"{bad}{error.message}"


# ---- CEL ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=512)
def compile_rule(rule: str) -> celpy.Runner:
    """Compile a CEL expression once (pure; cached by its text). Raises ``celpy.CELParseError``."""
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _schema_typed(schema: dict[str, Any], value: Any) -> Any:
    """``value`` with its numbers typed as the schema types them: kube-apiserver's CEL sees a ``number`` field as
    a double even when the JSON wrote ``300``, so ``self.a >= self.b`` compares two doubles, not an int with one."""
    if isinstance(value, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        return {k: _schema_typed(props[k] if k in props else extra if isinstance(extra, dict) else {}, v)
                for k, v in value.items()}
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return [_schema_typed(items, v) for v in value]
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _evaluate(rule: str, value: Any, old: Any) -> Any:
    activation = {"self": celpy.json_to_cel(value)}
    if old is not None:
        activation["oldSelf"] = celpy.json_to_cel(old)
    return compile_rule(rule).evaluate(activation)


def _cel_causes(schema: dict[str, Any], value: Any, old: Any, path: str, root: bool = True) -> list[Cause]:
    causes: list[Cause] = []
    for rule_spec in schema.get("x-kubernetes-validations") or []:
        rule = rule_spec.get("rule", "")
        if "oldSelf" in rule and old is None:
            continue  # transition rules only apply to updates of an existing value
        field = path
        if rule_spec.get("fieldPath"):
            field = path + rule_spec["fieldPath"] if rule_spec["fieldPath"].startswith(("[", ".")) \
                else _join(path, rule_spec["fieldPath"])
            field = field.lstrip(".")
        try:
            result = _evaluate(rule, value, old)
            failed_eval = isinstance(result, celpy.CELEvalError)
        except Exception as exc:  # noqa: BLE001 - any evaluation failure is reported on the field
            result, failed_eval = exc, True
        if failed_eval:
            causes.append((field, f"{_prefix(field)}Invalid value: {_go_value(value)}: "
                                  f"rule evaluation error: {rule}: {_short(result)}"))
            continue
        if result is True or (isinstance(result, celtypes.BoolType) and bool(result)):
            continue
        message = rule_spec.get("message") or f"failed rule: {rule}"
        if rule_spec.get("messageExpression"):
            try:
                message = str(_evaluate(rule_spec["messageExpression"], value, old))
            except Exception:  # noqa: BLE001 - the static message is the fallback, as in Kubernetes
                pass
        causes.append((field, _rule_message(field, rule_spec.get("reason"), value, message)))
    for child_schema, child, child_path, key, _ in _children(schema, value, path, root):
        old_child = None
        if isinstance(old, dict) and isinstance(key, str):
            old_child = old.get(key)
        causes += _cel_causes(child_schema, child, old_child, child_path, root=False)
    return causes


def _rule_message(field: str, reason: str | None, value: Any, message: str) -> str:
    """A failed rule's message in the form its ``reason`` selects (default FieldValueInvalid)."""
    if reason == "FieldValueRequired":
        return f"{_prefix(field)}Required value: {message}"
    if reason == "FieldValueForbidden":
        return f"{_prefix(field)}Forbidden: {message}"
    if reason == "FieldValueDuplicate":
        return f"{_prefix(field)}Duplicate value: {message}"
    return f"{_prefix(field)}Invalid value: {_go_value(value)}: {message}"


def _short(error: Any) -> str:
    text = str(error.args[0] if getattr(error, "args", None) else error)
    return text.splitlines()[0] if text else type(error).__name__


# ---- entry points ---------------------------------------------------------------------------
def prepare_custom_object(rt: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None,
                          field_validation: str | None) -> list[str]:
    """Default, check unknown fields, validate schema and CEL rules of a custom resource (in place).

    Unknown fields are a 400 BadRequest naming them with ``field_validation=Strict`` (what kubectl
    sends); otherwise they are pruned, as kube-apiserver does (its default is ``Warn``), and their paths
    are returned so the caller can send ``Warning`` headers. Schema and rule violations are one 422
    Invalid listing every cause.
    """
    name = obj.get("metadata", {}).get("name", "")
    schema = rt.schema
    if not schema:
        return []
    apply_defaults(schema, obj)
    unknown = unknown_fields(schema, obj)
    if unknown:
        if field_validation != "Strict":
            prune(schema, obj)
        else:
            listed = ", ".join(f'unknown field "{u}"' for u in unknown)
            raise errors.APIError(400, "BadRequest", (
                f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: strict decoding error: '
                f"{listed} (remove it, or fix its spelling; `kubectl explain {rt.plural}` lists the fields)"))
    causes = _int64_causes(obj) + _schema_causes(schema, obj) + _duplicate_set_items(schema, obj)
    if any(_blocks_rules(message) for _, message in causes):
        # as kube-apiserver: rules are not evaluated on values of the wrong type (CEL would fail on every
        # rule that reads them, blaming fields that are fine)
        causes.append(("<nil>", f"<nil>: Invalid value: null: {_RULES_NOT_CHECKED}"))  # kube-apiserver's words
    else:
        causes += _cel_causes(schema, _schema_typed(schema, _cel_root(obj)),
                              _schema_typed(schema, _cel_root(old)) if old else None, "")
    if causes:
        raise errors.invalid(rt.kind, rt.group, name, causes)
    return unknown if field_validation != "Ignore" else []


INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
_OUT_OF_INT64 = f"must fit in a 64-bit integer ({INT64_MIN} to {INT64_MAX})"
_RULES_NOT_CHECKED = ("some validation rules were not checked because the object was invalid; correct the existing "
                      "errors to complete validation")


def _int64_causes(obj: dict[str, Any]) -> list[Cause]:
    """Integers anywhere in the object (free-form fields too) that no Kubernetes client can hold: past int64.
    Walked without recursion: a body may nest as deep as the JSON parser allows."""
    causes: list[Cause] = []
    stack: list[tuple[str, Any]] = [(k, v) for k, v in obj.items() if k != "metadata"]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((_join(path, str(k)), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((_join(path, i), v) for i, v in enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            causes.append((path, f"{path}: Invalid value: {value}: {path} in body {_OUT_OF_INT64}"))
    return sorted(causes)


def _blocks_rules(message: str) -> bool:
    return " must be of type " in message or _OUT_OF_INT64 in message


def _cel_root(obj: dict[str, Any]) -> dict[str, Any]:
    """``self`` of root-level rules: the object, with only ``metadata.name``/``generateName`` visible."""
    root = {k: v for k, v in obj.items() if k != "metadata"}
    meta = obj.get("metadata") or {}
    root["metadata"] = {k: meta[k] for k in ("name", "generateName") if k in meta}
    return root


def validate_crd(crd: dict[str, Any]) -> list[Cause]:
    """Problems of a CustomResourceDefinition (empty when it can be registered)."""
    causes: list[Cause] = []
    spec = crd.get("spec")
    if not isinstance(spec, dict):
        return [("spec", "spec: Required value")]
    group = spec.get("group") or ""
    names = spec.get("names") or {}
    if not group or "." not in group:
        causes.append(("spec.group", f'spec.group: Invalid value: "{group}": should be a domain with at least one dot'))
    for key in ("plural", "kind"):
        if not names.get(key):
            causes.append((f"spec.names.{key}", f"spec.names.{key}: Required value"))
    if names.get("plural") and group and crd["metadata"].get("name") != f"{names['plural']}.{group}":
        causes.append(("metadata.name", f'metadata.name: Invalid value: "{crd["metadata"].get("name")}": '
                                        f'must be spec.names.plural+"."+spec.group'))
    if spec.get("scope", "Namespaced") not in ("Namespaced", "Cluster"):
        causes.append(("spec.scope", f'spec.scope: Unsupported value: "{spec.get("scope")}": '
                                     f'supported values: "Cluster", "Namespaced"'))
    versions = spec.get("versions") or []
    if not versions:
        causes.append(("spec.versions", "spec.versions: Invalid value: []: must have exactly one version marked as storage version"))
    elif sum(1 for v in versions if v.get("storage")) != 1:
        causes.append(("spec.versions", "spec.versions: Invalid value: \"array\": must have exactly one version marked as storage version"))
    for index, version in enumerate(versions):
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        where = f"spec.versions[{index}].schema.openAPIV3Schema"
        if schema is None:
            continue
        meta_schema = (schema.get("properties") or {}).get("metadata")
        if isinstance(meta_schema, dict) and (set(meta_schema) - {"type", "properties"}
                                              or set(meta_schema.get("properties") or {}) - {"name", "generateName"}):
            # kube-apiserver's wording and path (it names spec.validation even for per-version schemas)
            causes.append(("spec.validation.openAPIV3Schema.properties[metadata]",
                           "spec.validation.openAPIV3Schema.properties[metadata]: Forbidden: must not specify anything "
                           "other than name and generateName, but metadata is implicitly specified"))
        try:
            jsonschema.Draft4Validator.check_schema(_to_json_schema(schema))
        except jsonschema.SchemaError as exc:
            causes.append((where, f"{where}: Invalid value: \"object\": {exc.message}"))
        compiled = True
        for rule_path, rule in _rules(schema, where):
            try:
                compile_rule(rule)
            except Exception as exc:  # noqa: BLE001 - report any compile failure on the rule's path
                compiled = False
                causes.append((rule_path, f"{rule_path}: Invalid value: {json.dumps(rule)}: compilation failed: {_short(exc)}"))
        if compiled:
            causes += _default_causes(schema, "spec.validation.openAPIV3Schema")
    return causes


def _default_causes(schema: Any, path: str) -> list[Cause]:
    """kube-apiserver runs each node's rules on its ``default`` as written (nested defaults not applied)
    and refuses the CRD when one fails or errors."""
    if not isinstance(schema, dict):
        return []
    causes: list[Cause] = []
    if "default" in schema:
        for _, message in _cel_causes(schema, schema["default"], None, f"{path}.default"):
            causes.append((f"{path}.default", f"{path}.default: Invalid value: \"object\": {message}"))
    for key, child in (schema.get("properties") or {}).items():
        causes += _default_causes(child, f"{path}.properties[{key}]")
    for key in ("items", "additionalProperties"):
        causes += _default_causes(schema.get(key), f"{path}.{key}")
    return causes


def _rules(schema: Any, path: str) -> Iterator[tuple[str, str]]:
    if not isinstance(schema, dict):
        return
    for index, rule in enumerate(schema.get("x-kubernetes-validations") or []):
        yield f"{path}.x-kubernetes-validations[{index}].rule", rule.get("rule", "")
    for key, child in (schema.get("properties") or {}).items():
        yield from _rules(child, f"{path}.properties[{key}]")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _rules(schema[key], f"{path}.{key}")


# ---- pods -----------------------------------------------------------------------------------
def _invalid(field: str, value: Any, why: str) -> Cause:
    return field, f"{field}: Invalid value: {_go_value(value)}: {why}"


def _local_path_causes(field: str, path: Any, *, reserved: bool = False) -> list[Cause]:
    if not path:
        return []
    return [_invalid(field, path, why) for why in local_path_problems(path, reserved=reserved)]


def pod_path_causes(pod: dict[str, Any]) -> list[Cause]:
    """kube-apiserver's checks on the paths and names a pod uses inside its volumes: item paths of
    configMap/secret/downwardAPI volumes, volume names, ``subPath``/``subPathExpr``. Fields and
    messages are its own, down to ``volumeMounts.subPath`` naming the list, not the mount
    (``ValidateVolumeMounts`` passes the list's path). It checks neither mountPath nor workingDir nor
    terminationMessagePath for ``..`` (a runtime confines them to the container); the kubelet does."""
    spec = field_of(pod, "spec")
    causes: list[Cause] = []
    for v, vol in entries(spec.get("volumes")):
        where = f"spec.volumes[{v}]"
        name = vol.get("name")
        if not name:
            causes.append((f"{where}.name", f"{where}.name: Required value"))
        elif not isinstance(name, str) or len(name) > 63 or not _DNS_LABEL.fullmatch(name):
            causes.append(_invalid(f"{where}.name", name, _DNS_LABEL_MESSAGE))
        for kind in ITEM_SOURCES:
            for i, item in entries(field_of(vol, kind).get("items")):
                causes += _local_path_causes(f"{where}.{kind}.items[{i}].path", item.get("path"), reserved=True)
    for group in ("initContainers", "containers"):
        for c, container in entries(spec.get(group)):
            mounts = f"spec.{group}[{c}].volumeMounts"
            for m, mount in entries(container.get("volumeMounts")):
                if mount.get("subPathExpr") and mount.get("subPath"):
                    causes.append(_invalid(f"{mounts}[{m}].subPathExpr", mount["subPathExpr"],
                                           "subPathExpr and subPath are mutually exclusive"))
                for key in ("subPath", "subPathExpr"):
                    causes += _local_path_causes(f"{mounts}.{key}", mount.get(key))
    return causes
