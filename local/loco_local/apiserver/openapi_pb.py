"""``/openapi/v2`` as protobuf, for kubectl 1.27 and 1.28.

Those kubectl releases ask for the OpenAPI v2 document only as protobuf (the gnostic ``openapi.v2.Document``
message); without it ``kubectl apply``,
``explain`` and ``diff`` fail. This module writes the JSON document of :func:`.openapi.v2_document` in that
message's wire format. What kubectl reads is the definitions (the schemas, with their
``x-kubernetes-group-version-kind`` extensions), the title and the version; the paths are left out (kubectl
finds resources through discovery, not through the OpenAPI paths).

Field numbers are those of gnostic's ``openapiv2/OpenAPIv2.proto``; values gnostic keeps as ``Any`` (defaults,
enums, examples, vendor extensions) are its YAML text.
"""

from __future__ import annotations

import struct
from typing import Any

import yaml

#: the media type served (kubectl asks with the older ``...spec.v2@v1.0+protobuf``, which Go's mime parser
#: cannot read back as a response's type)
CONTENT_TYPE = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"

# Schema: JSON key -> (field number, kind)
_SCHEMA_FIELDS: dict[str, tuple[int, str]] = {
    "$ref": (1, "string"), "format": (2, "string"), "title": (3, "string"), "description": (4, "string"),
    "default": (5, "any"), "multipleOf": (6, "double"), "maximum": (7, "double"), "exclusiveMaximum": (8, "bool"),
    "minimum": (9, "double"), "exclusiveMinimum": (10, "bool"), "maxLength": (11, "int"), "minLength": (12, "int"),
    "pattern": (13, "string"), "maxItems": (14, "int"), "minItems": (15, "int"), "uniqueItems": (16, "bool"),
    "maxProperties": (17, "int"), "minProperties": (18, "int"), "required": (19, "strings"), "enum": (20, "anys"),
    "additionalProperties": (21, "additional"), "type": (22, "type"), "items": (23, "items"),
    "allOf": (24, "schemas"), "properties": (25, "properties"), "discriminator": (26, "string"),
    "readOnly": (27, "bool"), "example": (30, "any"),
}
_VENDOR_EXTENSION = 31


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64: ten bytes, as protobuf writes them
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bytes(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def _string(number: int, text: str) -> bytes:
    return _bytes(number, text.encode())


def _any(number: int, value: Any) -> bytes:
    """gnostic's Any: the value as YAML (field 2)."""
    return _bytes(number, _string(2, yaml.safe_dump(value, default_flow_style=True).strip()))


def _named_any(number: int, name: str, value: Any) -> bytes:
    return _bytes(number, _string(1, name) + _any(2, value))


def schema(doc: dict[str, Any]) -> bytes:
    """One gnostic ``Schema`` message from a JSON schema object (keys gnostic has no field for, and that are not
    vendor extensions, are left out as gnostic's own compiler does)."""
    out = bytearray()
    for key, value in doc.items():
        if key.startswith("x-"):
            out += _named_any(_VENDOR_EXTENSION, key, value)
            continue
        if key not in _SCHEMA_FIELDS:
            continue
        number, kind = _SCHEMA_FIELDS[key]
        if kind == "string":
            out += _string(number, str(value))
        elif kind == "double":
            out += _field(number, 1, struct.pack("<d", float(value)))
        elif kind in ("bool", "int"):
            out += _field(number, 0, _varint(int(value)))
        elif kind == "any":
            out += _any(number, value)
        elif kind == "strings":
            out += b"".join(_string(number, str(v)) for v in value)
        elif kind == "anys":
            out += b"".join(_any(number, v) for v in value)
        elif kind == "additional":  # AdditionalPropertiesItem: schema = 1 | boolean = 2
            inner = _bytes(1, schema(value)) if isinstance(value, dict) else _field(2, 0, _varint(int(bool(value))))
            out += _bytes(number, inner)
        elif kind == "type":  # TypeItem: repeated string value = 1
            out += _bytes(number, b"".join(_string(1, t) for t in ([value] if isinstance(value, str) else value)))
        elif kind == "items":  # ItemsItem: repeated Schema schema = 1
            out += _bytes(number, b"".join(_bytes(1, schema(s)) for s in ([value] if isinstance(value, dict) else value)))
        elif kind == "schemas":
            out += b"".join(_bytes(number, schema(s)) for s in value)
        elif kind == "properties":  # Properties: repeated NamedSchema additional_properties = 1
            out += _bytes(number, _named_schemas(value))
    return bytes(out)


def _named_schemas(schemas: dict[str, Any]) -> bytes:
    return b"".join(_bytes(1, _string(1, name) + _bytes(2, schema(s))) for name, s in schemas.items())


def document(doc: dict[str, Any]) -> bytes:
    """The gnostic ``openapi.v2.Document`` of a JSON OpenAPI v2 document (swagger, info, produces, definitions)."""
    info = doc.get("info") or {}
    out = bytearray(_string(1, doc.get("swagger", "2.0")))
    out += _bytes(2, _string(1, info.get("title", "")) + _string(2, info.get("version", "")))
    out += b"".join(_string(7, p) for p in doc.get("produces") or [])
    out += _bytes(8, b"")  # Paths: left out (module docstring)
    out += _bytes(9, _named_schemas(doc.get("definitions") or {}))
    return bytes(out)
