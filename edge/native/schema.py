"""JSON Schema of a protobuf message in its proto3 JSON form, so that the OpenAPI document of the native
routes describes their bodies and parameters (what /docs shows and what clients and fuzzers generate from)."""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor

FD = descriptor.FieldDescriptor
RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
SCALARS: dict[int, dict[str, Any]] = {
    FD.TYPE_DOUBLE: {"type": "number"},
    FD.TYPE_FLOAT: {"type": "number"},
    FD.TYPE_BOOL: {"type": "boolean"},
    FD.TYPE_STRING: {"type": "string"},
    FD.TYPE_BYTES: {"type": "string", "format": "byte"},
}


def message_schema(message: descriptor.Descriptor, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every field under its proto name (the JSON names are accepted too), none required (proto3)."""
    if message.full_name.startswith("google.protobuf.") or message.full_name in seen:
        return {}  # well-known types have JSON forms of their own; recursion stays open
    inner = (*seen, message.full_name)
    properties = {field.name: field_schema(field, inner) for field in message.fields}
    return {"type": "object", "properties": properties}


def field_schema(field: descriptor.FieldDescriptor, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": field_schema(value, seen)}
    one = _single(field, seen)
    return {"type": "array", "items": one} if field.is_repeated else one


def _single(field: descriptor.FieldDescriptor, seen: tuple[str, ...]) -> dict[str, Any]:
    if field.type in RANGES:
        low, high = RANGES[field.type]
        return {"type": "integer", "minimum": low, "maximum": high}
    if field.enum_type is not None:
        return {"type": "string", "enum": [value.name for value in field.enum_type.values]}
    if field.message_type is not None:
        return message_schema(field.message_type, seen)
    return dict(SCALARS[field.type])


def query_parameters(message: descriptor.Descriptor, exclude: set[str]) -> list[dict[str, Any]]:
    """OpenAPI query parameters for the scalar fields of a request sent without a body."""
    return [
        {"name": field.name, "in": "query", "required": False, "schema": _single(field, ())}
        for field in message.fields
        if field.name not in exclude and field.message_type is None and not field.is_repeated
    ]
