"""The PATCH content types: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and strategic merge.

Pure functions from ``(original, patch) -> patched``; a malformed patch or a failed JSON-patch
``test`` op raises :class:`~.errors.APIError` (422 for a failed test, like the real server, so
kopf's ``test /metadata/resourceVersion`` guard reports a conflict-like failure and retries).
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from .errors import APIError, bad_request

MERGE = "application/merge-patch+json"
JSON = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"
PATCH_TYPES = (MERGE, JSON, STRATEGIC, APPLY)


def merge_patch(original: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, ``null`` deletes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(original) if isinstance(original, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(original: dict[str, Any], operations: Any) -> dict[str, Any]:
    """RFC 6902 with ``test`` ops; a failed test is 422 Invalid (as kube-apiserver answers)."""
    if not isinstance(operations, list):
        raise bad_request("json patch must be a list of operations")
    try:
        return jsonpatch.apply_patch(original, operations, in_place=False)
    except jsonpatch.JsonPatchTestFailed as exc:
        raise APIError(422, "Invalid", f"the server rejected our request due to an error in our request: {exc}") from exc
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, KeyError, TypeError, IndexError) as exc:
        raise APIError(422, "Invalid", f"the server rejected our request due to an error in our request: {exc}") from exc


# Merge keys of the built-in list fields kubectl touches (from the Kubernetes API's patchMergeKey tags).
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "ownerReferences": "uid",
    "conditions": "type",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "secrets": "name",
    "subsets": None,
}
PRIMITIVE_SET_LISTS = {"finalizers"}


def merge_key(field: str, items: list[Any]) -> str | None:
    if field == "ports":
        # container ports merge on containerPort, service ports on port
        sample = next((i for i in items if isinstance(i, dict)), {})
        return "containerPort" if "containerPort" in sample else "port"
    return _MERGE_KEYS.get(field)


def strategic_merge_patch(original: Any, patch: Any) -> Any:
    """Strategic merge: like merge patch, but lists with a merge key merge element-wise.

    Supports the directives ``$patch: replace|delete|merge`` (in maps and list elements),
    ``$deleteFromPrimitiveList/<field>``, ``$setElementOrder/<field>`` (accepted, order kept) and
    ``$retainKeys``.
    """
    return _smp_map(original if isinstance(original, dict) else {}, patch)


def _smp_map(original: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any] | None:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "delete":
        return None
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = copy.deepcopy(original)
    retain = patch.get("$retainKeys")
    if retain is not None:
        result = {k: v for k, v in result.items() if k in retain}
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [v for v in result.get(field) or [] if v not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            merged = _smp_map(result.get(key) if isinstance(result.get(key), dict) else {}, value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            result[key] = _smp_list(key, result.get(key) if isinstance(result.get(key), list) else [], value)
        else:
            result[key] = value
    return result


def _smp_list(field: str, original: list[Any], patch: list[Any]) -> list[Any]:
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in patch):
        return [copy.deepcopy(i) for i in patch if not (isinstance(i, dict) and i.get("$patch") == "replace")]
    if field in PRIMITIVE_SET_LISTS:
        return list(original) + [v for v in patch if v not in original]
    key = merge_key(field, original + patch)
    if key is None or not all(isinstance(i, dict) for i in patch):
        return copy.deepcopy(patch)
    result = copy.deepcopy(original)
    for item in patch:
        if key not in item:
            raise bad_request(f"map: {item} does not contain declared merge key: {key}")
        index = next((n for n, cur in enumerate(result) if isinstance(cur, dict) and cur.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
            continue
        if index is None:
            result.append({k: v for k, v in item.items() if k != "$patch"})
        else:
            merged = _smp_map(result[index], item)
            result[index] = merged
    return result


def check_content_type(content_type: str) -> None:
    """415 for a PATCH body this server cannot apply, before anything else is looked at (kube-apiserver answers
    415 even when the object does not exist). Server-side apply is :mod:`.apply`'s."""
    if content_type not in PATCH_TYPES:
        raise APIError(415, "UnsupportedMediaType",
                       f"the body of the request was in an unknown format - accepted media types include: {', '.join(PATCH_TYPES[:3])}")


def apply_patch(original: dict[str, Any], content_type: str, patch: Any, custom: bool) -> dict[str, Any]:
    """Dispatch on the PATCH ``Content-Type``; strategic merge on a custom resource is 415 as in Kubernetes."""
    if content_type == MERGE:
        if not isinstance(patch, dict):
            raise bad_request("merge patch must be a JSON object")
        return merge_patch(original, patch)
    if content_type == JSON:
        return json_patch(original, patch)
    if content_type == STRATEGIC:
        if custom:
            raise APIError(415, "UnsupportedMediaType",
                           "strategic merge patch is not supported for custom resources; use --type merge or json")
        if not isinstance(patch, dict):
            raise bad_request("strategic merge patch must be a JSON object")
        return strategic_merge_patch(original, patch)
    raise APIError(415, "UnsupportedMediaType",
                   f"the body of the request was in an unknown format - accepted media types include: {', '.join(PATCH_TYPES[:3])}")
