"""Decoding the protobuf bodies kubectl's typed clients send (``application/vnd.kubernetes.protobuf``).

kubectl's ``create namespace|configmap|secret|serviceaccount|service`` post built-in objects as
protobuf, not JSON. A Kubernetes protobuf body is the 4-byte magic ``k8s\\0`` followed by a
``runtime.Unknown`` message (``typeMeta`` = 1, ``raw`` = 2) whose ``raw`` bytes are the object's own
message. This module reads the protobuf wire format directly and maps field numbers to JSON
names with small per-kind tables (from ``k8s.io/api/core/v1/generated.proto``); kinds without a
table are refused with 415 so the client sees a clear error rather than a wrong object.
"""

from __future__ import annotations

import base64
from typing import Any

from .errors import APIError

MAGIC = b"k8s\x00"
CONTENT_TYPE = "application/vnd.kubernetes.protobuf"

# A field spec: (json name, kind) where kind is "string", "bytes", "int", "bool", a nested table
# (dict), "map" (string->string), "bmap" (string->base64 bytes), "time" or "intorstring"; a
# list-valued field is marked by wrapping the kind in a 1-tuple.
Table = dict[int, tuple[str, Any]]

_OWNER_REFERENCE: Table = {1: ("kind", "string"), 3: ("name", "string"), 4: ("uid", "string"),
                           5: ("apiVersion", "string"), 6: ("controller", "bool"), 7: ("blockOwnerDeletion", "bool")}
_OBJECT_META: Table = {
    1: ("name", "string"), 2: ("generateName", "string"), 3: ("namespace", "string"), 5: ("uid", "string"),
    6: ("resourceVersion", "string"), 7: ("generation", "int"), 11: ("labels", "map"), 12: ("annotations", "map"),
    13: ("ownerReferences", (_OWNER_REFERENCE,)), 14: ("finalizers", ("string",)),
}
_LOCAL_REF: Table = {1: ("name", "string")}
_OBJECT_REF: Table = {1: ("kind", "string"), 2: ("namespace", "string"), 3: ("name", "string"), 4: ("uid", "string"),
                      5: ("apiVersion", "string"), 6: ("resourceVersion", "string"), 7: ("fieldPath", "string")}
_SERVICE_PORT: Table = {1: ("name", "string"), 2: ("protocol", "string"), 3: ("port", "int"),
                        4: ("targetPort", "intorstring"), 5: ("nodePort", "int"), 6: ("appProtocol", "string")}
_SERVICE_SPEC: Table = {
    1: ("ports", (_SERVICE_PORT,)), 2: ("selector", "map"), 3: ("clusterIP", "string"), 4: ("type", "string"),
    5: ("externalIPs", ("string",)), 7: ("sessionAffinity", "string"), 10: ("externalName", "string"),
    13: ("publishNotReadyAddresses", "bool"), 18: ("clusterIPs", ("string",)),
}
KINDS: dict[str, Table] = {
    "Namespace": {1: ("metadata", _OBJECT_META), 2: ("spec", {1: ("finalizers", ("string",))})},
    "ConfigMap": {1: ("metadata", _OBJECT_META), 2: ("data", "map"), 3: ("binaryData", "bmap"), 4: ("immutable", "bool")},
    "Secret": {1: ("metadata", _OBJECT_META), 2: ("data", "bmap"), 3: ("type", "string"), 4: ("stringData", "map"),
               5: ("immutable", "bool")},
    "ServiceAccount": {1: ("metadata", _OBJECT_META), 2: ("secrets", (_OBJECT_REF,)),
                       3: ("imagePullSecrets", (_LOCAL_REF,)), 4: ("automountServiceAccountToken", "bool")},
    "Service": {1: ("metadata", _OBJECT_META), 2: ("spec", _SERVICE_SPEC)},
}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def fields(data: bytes) -> list[tuple[int, int, Any]]:
    """The raw ``(field number, wire type, value)`` triples of one message (value: int or bytes)."""
    out, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 1:
            value, pos = int.from_bytes(data[pos:pos + 8], "little"), pos + 8
        elif wire == 5:
            value, pos = int.from_bytes(data[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, wire, value))
    return out


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _scalar(kind: Any, value: Any) -> Any:
    if isinstance(kind, dict):
        return decode_message(value, kind)
    if kind == "string":
        return value.decode()
    if kind == "bytes":
        return base64.b64encode(value).decode()
    if kind == "int":
        return _signed(value)
    if kind == "bool":
        return bool(value)
    if kind == "intorstring":
        parts = {n: v for n, _, v in fields(value)}
        return parts[3].decode() if parts.get(1) == 1 else _signed(parts.get(2, 0))
    raise ValueError(f"unknown field kind {kind!r}")


def decode_message(data: bytes, table: Table) -> dict[str, Any]:
    """Decode one message with ``table``; unknown field numbers are skipped."""
    obj: dict[str, Any] = {}
    for number, _, value in fields(data):
        if number not in table:
            continue
        name, kind = table[number]
        if kind in ("map", "bmap"):
            entry = {n: v for n, _, v in fields(value)}
            key = entry.get(1, b"").decode()
            raw = entry.get(2, b"")
            obj.setdefault(name, {})[key] = raw.decode() if kind == "map" else base64.b64encode(raw).decode()
        elif isinstance(kind, tuple):
            obj.setdefault(name, []).append(_scalar(kind[0], value))
        else:
            decoded = _scalar(kind, value)
            if decoded not in ("", 0, False):  # Go's JSON omitempty: zero values are absent
                obj[name] = decoded
    return obj


def decode(body: bytes) -> dict[str, Any]:
    """A Kubernetes protobuf body -> the JSON object; 415 for kinds this server cannot read as protobuf."""
    if not body.startswith(MAGIC):
        raise APIError(400, "BadRequest", "protobuf body without the k8s\\0 prefix")
    try:
        envelope = {n: v for n, _, v in fields(body[len(MAGIC):])}
        type_meta = {n: v.decode() for n, _, v in fields(envelope.get(1, b""))}
        api_version, kind = type_meta.get(1, ""), type_meta.get(2, "")
        table: Table | None = KINDS.get(kind) if api_version == "v1" else None
        if table is None:
            raise APIError(415, "UnsupportedMediaType",
                           f"this server reads {api_version} {kind} only as JSON: send application/json")
        obj = decode_message(envelope.get(2, b""), table)
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise APIError(400, "BadRequest", f"malformed protobuf body: {exc}") from exc
    return {"apiVersion": api_version, "kind": kind, **obj}

