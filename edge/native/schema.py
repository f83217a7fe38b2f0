"""JSON Schema of a protobuf message in its proto3 JSON form, so that the OpenAPI document of the native
routes describes their bodies, parameters and replies (what /docs shows, what clients and fuzzers generate
from, and what the fuzzer checks replies against). A request may give a 64-bit integer as a number or a
string; a reply gives it as a string, and non-finite floats as "NaN", "Infinity" or "-Infinity", as
protobuf's JSON printer does."""

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
WIDE = {FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64, FD.TYPE_UINT64, FD.TYPE_FIXED64}
FLOATS = {FD.TYPE_DOUBLE, FD.TYPE_FLOAT}
REPLY_FLOAT = {"anyOf": [{"type": "number"}, {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}]}
SCALARS: dict[int, dict[str, Any]] = {
    FD.TYPE_DOUBLE: {"type": "number"},
    FD.TYPE_FLOAT: {"type": "number"},
    FD.TYPE_BOOL: {"type": "boolean"},
    FD.TYPE_STRING: {"type": "string"},
    FD.TYPE_BYTES: {"type": "string", "format": "byte"},
}


def message_schema(
    message: descriptor.Descriptor, seen: tuple[str, ...] = (), *, reply: bool = False
) -> dict[str, Any]:
    """Every field under its proto name (a request may use the JSON names too), none required (proto3);
    `reply` describes the message as the edge prints it rather than as it accepts it."""
    if message.full_name.startswith("google.protobuf.") or message.full_name in seen:
        return {}  # well-known types have JSON forms of their own; recursion stays open
    inner = (*seen, message.full_name)
    properties = {field.name: field_schema(field, inner, reply=reply) for field in message.fields}
    return {"type": "object", "properties": properties}


def field_schema(
    field: descriptor.FieldDescriptor, seen: tuple[str, ...] = (), *, reply: bool = False
) -> dict[str, Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": field_schema(value, seen, reply=reply)}
    one = _single(field, seen, reply)
    return {"type": "array", "items": one} if field.is_repeated else one


def _single(field: descriptor.FieldDescriptor, seen: tuple[str, ...], reply: bool = False) -> dict[str, Any]:
    if reply and field.type in WIDE:
        return {"type": "string", "pattern": "^-?[0-9]+$"}
    if field.type in RANGES:
        low, high = RANGES[field.type]
        return {"type": "integer", "minimum": low, "maximum": high}
    if reply and field.type in FLOATS:
        return dict(REPLY_FLOAT)
    if field.enum_type is not None:
        return {"type": "string", "enum": [value.name for value in field.enum_type.values]}
    if field.message_type is not None:
        return message_schema(field.message_type, seen, reply=reply)
    return dict(SCALARS[field.type])


def query_parameters(message: descriptor.Descriptor, exclude: set[str]) -> list[dict[str, Any]]:
    """OpenAPI query parameters for the scalar fields of a request sent without a body."""
    return [
        {"name": field.name, "in": "query", "required": False, "schema": _single(field, ())}
        for field in message.fields
        if field.name not in exclude and field.message_type is None and not field.is_repeated
    ]
