"""Server-side apply and field ownership (``metadata.managedFields``), a subset of Kubernetes' structured merge.

Every write records which field manager set which fields, as kube-apiserver does: an entry per
(manager, operation, subresource) holding a FieldsV1 set. An apply (PATCH ``application/apply-patch+yaml``)
merges the applier's configuration into the object, removes the fields that manager applied before and no
longer does (unless someone else owns them too), and answers 409 Conflict naming every field whose value
another manager set differently, unless ``force=true`` takes them over.

The sets are built from the object's shape: maps by key, lists with a merge key (the strategic-merge keys of
:mod:`.patch`: containers by name, conditions by type, ...) element by element, ``finalizers`` as a set, any
other list as one atomic value. kube-apiserver reads list types from each type's OpenAPI schema; where the two
disagree (a list this table misses is atomic here) the difference is listed in docs/local-cluster.md.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from .errors import APIError
from .patch import PRIMITIVE_SET_LISTS, merge_key

Path = tuple[str, ...]
Obj = dict[str, Any]

#: metadata nobody owns (the server sets or keeps them)
_SERVER_METADATA = {"name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
                    "deletionGracePeriodSeconds", "managedFields", "selfLink", "generateName"}
#: the manager of writes this server's own components make without saying who they are
DEFAULT_MANAGER = "loco-local"
MAX_MANAGER_LENGTH = 128


def manager_from(field_manager: str | None, user_agent: str | None) -> str:
    """The request's field manager: ``fieldManager``, else the User-Agent up to its first '/' (kube-apiserver's
    default), else :data:`DEFAULT_MANAGER`. 422 for a name kube-apiserver refuses."""
    if field_manager is not None:
        if len(field_manager) > MAX_MANAGER_LENGTH or not field_manager.isprintable():
            raise APIError(422, "Invalid", f"fieldManager: Invalid value: \"{field_manager[:140]}\": must be at most "
                           f"{MAX_MANAGER_LENGTH} printable characters")
        return field_manager
    prefix = (user_agent or "").split("/", 1)[0].strip()
    return prefix[:MAX_MANAGER_LENGTH] if prefix and prefix.isprintable() else DEFAULT_MANAGER


# ---- field sets ---------------------------------------------------------------------------------


def field_set(obj: Obj, subresource: str | None = None) -> set[Path]:
    """The fields ``obj`` sets, as FieldsV1 paths: the status alone for the status subresource, everything but
    the status and the server's metadata otherwise."""
    out: set[Path] = set()
    for key, value in obj.items():
        if key in ("apiVersion", "kind"):
            continue
        if (key == "status") != (subresource == "status"):
            continue
        if key == "metadata" and isinstance(value, dict):
            for mkey, mvalue in value.items():
                if mkey not in _SERVER_METADATA:
                    _walk(mvalue, ("f:metadata", f"f:{mkey}"), mkey, out)
            continue
        _walk(value, (f"f:{key}",), key, out)
    return out


def _item_key(item: Any, key: str) -> str:
    return "k:" + json.dumps({key: item[key]}, separators=(",", ":"), sort_keys=True)


def _list_kind(field: str, items: list[Any]) -> tuple[str, str | None]:
    """("set", None), ("map", merge key) or ("atomic", None) for the list ``field``."""
    if field in PRIMITIVE_SET_LISTS and all(not isinstance(i, (dict, list)) for i in items):
        return "set", None
    key = merge_key(field, items) if items else None
    if key and all(isinstance(i, dict) and key in i for i in items):
        return "map", key
    return "atomic", None


def _walk(value: Any, path: Path, field: str, out: set[Path]) -> None:
    if isinstance(value, dict) and value:
        for key, child in value.items():
            _walk(child, (*path, f"f:{key}"), key, out)
    elif isinstance(value, list) and value:
        kind, key = _list_kind(field, value)
        if kind == "set":
            out.update((*path, "v:" + json.dumps(v, separators=(",", ":"))) for v in value)
        elif kind == "map":
            for item in value:
                element = (*path, _item_key(item, key))
                out.add((*element, "."))
                for child_key, child in item.items():
                    _walk(child, (*element, f"f:{child_key}"), child_key, out)
        else:
            out.add(path)
    else:
        out.add(path)  # a scalar, an empty map or list, an atomic list: one value


def to_fields_v1(paths: set[Path]) -> dict[str, Any]:
    """The FieldsV1 trie of ``paths`` (what managedFields[].fieldsV1 holds)."""
    root: dict[str, Any] = {}
    for path in sorted(paths):
        node = root
        for part in path:
            node = node.setdefault(part, {})
    return root


def from_fields_v1(trie: Any, prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    if not isinstance(trie, dict):
        return out
    for part, child in trie.items():
        path = (*prefix, part)
        if part == "." or not child:
            out.add(path)
        else:
            out |= from_fields_v1(child, path)
    return out


def _lookup(obj: Any, path: Path) -> tuple[bool, Any]:
    """(found, value) at ``path``; a list element's "." is the element itself."""
    node = obj
    for part in path:
        if part == ".":
            return True, node
        kind, _, rest = part.partition(":")
        if kind == "f" and isinstance(node, dict) and rest in node:
            node = node[rest]
        elif kind == "k" and isinstance(node, list):
            (key, want), = json.loads(rest).items()
            node = next((i for i in node if isinstance(i, dict) and i.get(key) == want), _ABSENT)
            if node is _ABSENT:
                return False, None
        elif kind == "v" and isinstance(node, list):
            value = json.loads(rest)
            return (value in node), value
        else:
            return False, None
    return True, node


_ABSENT = object()


def _remove(obj: Any, path: Path) -> None:
    """Delete the field (or list element, or set value) at ``path`` if it is there."""
    if path and path[-1] == ".":
        path = path[:-1]
    found, parent = _lookup(obj, path[:-1])
    if not found:
        return
    kind, _, rest = path[-1].partition(":")
    if kind == "f" and isinstance(parent, dict):
        parent.pop(rest, None)
    elif kind == "k" and isinstance(parent, list):
        (key, want), = json.loads(rest).items()
        parent[:] = [i for i in parent if not (isinstance(i, dict) and i.get(key) == want)]
    elif kind == "v" and isinstance(parent, list):
        value = json.loads(rest)
        parent[:] = [i for i in parent if i != value]


# ---- merging ------------------------------------------------------------------------------------


def merge(live: Any, applied: Any, field: str = "") -> Any:
    """The applier's configuration over the live object: maps merge, keyed lists merge element by element,
    sets take the union, anything else is replaced."""
    if isinstance(applied, dict) and isinstance(live, dict):
        result = copy.deepcopy(live)
        for key, value in applied.items():
            result[key] = merge(live.get(key), value, key)
        return result
    if isinstance(applied, list) and isinstance(live, list):
        kind, key = _list_kind(field, live + applied)
        if kind == "set":
            return list(live) + [v for v in applied if v not in live]
        if kind == "map":
            result = [copy.deepcopy(i) for i in live]
            for item in applied:
                index = next((n for n, cur in enumerate(result) if cur.get(key) == item[key]), None)
                if index is None:
                    result.append(copy.deepcopy(item))
                else:
                    result[index] = merge(result[index], item, field)
            return result
    return copy.deepcopy(applied)


# ---- ownership ----------------------------------------------------------------------------------


def _entries(obj: Obj) -> list[Obj]:
    entries = (obj.get("metadata") or {}).get("managedFields")
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _owned(entry: Obj) -> set[Path]:
    return from_fields_v1(entry.get("fieldsV1"))


def _same_entry(entry: Obj, manager: str, operation: str, subresource: str | None) -> bool:
    return (entry.get("manager"), entry.get("operation"), entry.get("subresource")) == (manager, operation, subresource)


def _set_entries(entries: list[Obj], owner: tuple[str, str, str | None], owned: set[Path], api_version: str,
                 stamp: str, others: dict[int, set[Path]]) -> list[Obj]:
    """``entries`` with the other entries' sets replaced by ``others`` (index -> set) and ``owner``'s set
    replaced by ``owned`` (its time restamped when the set changed); empty entries dropped."""
    manager, operation, subresource = owner
    result: list[Obj] = []
    found = False
    for index, entry in enumerate(entries):
        if _same_entry(entry, manager, operation, subresource):
            found = True
            if owned:
                changed = owned != _owned(entry) or entry.get("apiVersion") != api_version
                result.append({**entry, "apiVersion": api_version, "fieldsType": "FieldsV1",
                               "fieldsV1": to_fields_v1(owned), **({"time": stamp} if changed else {})})
        elif index in others:
            if others[index]:
                result.append({**entry, "fieldsV1": to_fields_v1(others[index])})
        else:
            result.append(entry)
    if not found and owned:
        entry = {"manager": manager, "operation": operation, "apiVersion": api_version, "time": stamp,
                 "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(owned)}
        if subresource:
            entry["subresource"] = subresource
        result.append(entry)
    return result


def record_update(old: Obj | None, new: Obj, manager: str, api_version: str, stamp: str,
                  subresource: str | None = None) -> list[Obj]:
    """The managedFields after a create, update or non-apply patch by ``manager``: it owns what it changed,
    which the others no longer own; a removed field is no one's."""
    before = field_set(old, subresource) if old is not None else set()
    after = field_set(new, subresource)
    # a list element's "." is its existence: it changes hands only when the element is new
    changed = {p for p in after if p not in before or (p[-1] != "." and _lookup(old, p)[1] != _lookup(new, p)[1])}
    removed = before - after
    entries = _entries(old) if old is not None else []
    if not changed and not removed:
        return entries
    others = {}
    for index, entry in enumerate(entries):
        if not _same_entry(entry, manager, "Update", subresource) and entry.get("subresource") == subresource:
            owned = _owned(entry)
            if owned & (changed | removed):
                others[index] = owned - changed - removed
    mine = next((_owned(e) for e in entries if _same_entry(e, manager, "Update", subresource)), set())
    return _set_entries(entries, (manager, "Update", subresource), (mine | changed) - removed, api_version, stamp, others)


def apply(live: Obj | None, applied: Obj, manager: str, force: bool, api_version: str, stamp: str,
          subresource: str | None = None) -> Obj:
    """The object after ``manager`` applies ``applied`` to ``live`` (None: it is created), its managedFields
    set; 409 Conflict listing every field another manager set to another value, unless ``force``."""
    base: Obj = copy.deepcopy(live) if live is not None else {}
    entries = _entries(base)
    wanted = field_set(applied, subresource)
    conflicts: list[tuple[str, Obj]] = []
    others: dict[int, set[Path]] = {}
    for index, entry in enumerate(entries):
        if _same_entry(entry, manager, "Apply", subresource) or entry.get("subresource") != subresource:
            continue
        owned = _owned(entry)
        contested = {p for p in owned & wanted if p[-1] != "." and _lookup(base, p) != _lookup(applied, p)}
        if contested and not force:
            conflicts += [(_dotted(p), entry) for p in sorted(contested)]
        elif contested:
            others[index] = owned - contested
    if conflicts:
        raise _conflict(conflicts)
    before = next((_owned(e) for e in entries if _same_entry(e, manager, "Apply", subresource)), set())
    shared = set().union(*(others.get(i, _owned(e)) for i, e in enumerate(entries)
                           if not _same_entry(e, manager, "Apply", subresource) and e.get("subresource") == subresource))
    body = {k: v for k, v in applied.items() if k != "metadata"}
    body["metadata"] = {k: v for k, v in (applied.get("metadata") or {}).items() if k not in _SERVER_METADATA}
    new = merge(base, body)
    for path in sorted(before - wanted - shared, key=len, reverse=True):
        _remove(new, path)
    meta = new.setdefault("metadata", {})
    meta["managedFields"] = _set_entries(entries, (manager, "Apply", subresource), wanted, api_version, stamp, others)
    return new


def _dotted(path: Path) -> str:
    """A field path as kube-apiserver prints it in a conflict: ``.spec.replicas``, ``.spec.containers[name="c"].image``."""
    out = ""
    for part in path:
        kind, _, rest = part.partition(":")
        if kind == "f":
            out += "." + rest
        elif kind == "k":
            out += "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in json.loads(rest).items()) + "]"
        elif kind == "v":
            out += f"[{rest}]"
    return out


def _conflict(conflicts: list[tuple[str, Obj]]) -> APIError:
    def who(entry: Obj) -> str:
        using = f" using {entry.get('apiVersion')}" if entry.get("operation") == "Update" else ""
        return f'conflict with "{entry.get("manager")}"{using}'

    n = len(conflicts)
    lines = [f"{who(e)}: {f}" for f, e in conflicts]
    message = (f"Apply failed with {n} conflict{'s' if n > 1 else ''}: " + lines[0] if n == 1 else
               f"Apply failed with {n} conflicts: " + "\n".join(lines))
    causes = [{"reason": "FieldManagerConflict", "message": who(e), "field": f} for f, e in conflicts]
    return APIError(409, "Conflict", message, {"causes": causes})
