"""The HTTP contract derived from the proto: query fields and JSON models, never written by hand.

The proto is the one description of a request and a response. Here its descriptors become
(1) the query fields of ``POST /v1/anonymize`` (dotted names such as ``params.steps``, one per
scalar field of AnonymizeRequest but the image), and (2) pydantic models of the JSON bodies, so
FastAPI's OpenAPI document carries the proto's fields, types and enum names. JSON follows
protobuf's canonical JSON mapping with the proto's own field names (``json_format`` with
``preserving_proto_field_name``): 64-bit integers are strings, bytes are base64, enums are names.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from masquerade.api.protos import pb2

_INT32 = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32}
_UINT32 = {FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32}
_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED64,
}
_FLOAT = {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE}

QUERY_EXCLUDED = frozenset({"image"})
"""AnonymizeRequest fields that are not query fields: the image is the request body."""


def _is_repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


def _enum_literal(field: FieldDescriptor) -> Any:
    return Literal[tuple(value.name for value in field.enum_type.values)]


def _scalar_type(field: FieldDescriptor, *, for_query: bool) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_BOOL:
        return bool
    if kind == FieldDescriptor.TYPE_STRING:
        return str
    if kind == FieldDescriptor.TYPE_BYTES:
        return str  # base64 text in JSON
    if kind in _FLOAT:
        return float
    if kind in _INT32:
        return int
    if kind in _UINT32:
        return pydantic.NonNegativeInt
    if kind in _INT64:
        # Canonical JSON writes 64-bit integers as strings (JavaScript numbers lose precision past 2**53).
        return pydantic.NonNegativeInt if for_query else str
    if kind == FieldDescriptor.TYPE_ENUM:
        return _enum_literal(field)
    raise TypeError(f"{field.full_name}: no JSON type for proto type {kind}")


@dataclass(frozen=True)
class QueryField:
    """One scalar leaf of AnonymizeRequest as a query field: ``params.steps`` -> ("params", "steps")."""

    path: tuple[str, ...]
    field: FieldDescriptor

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def annotation(self) -> Any:
        return _scalar_type(self.field, for_query=True)


def _leaves(descriptor: Descriptor, prefix: tuple[str, ...] = ()) -> list[QueryField]:
    out: list[QueryField] = []
    for field in descriptor.fields:
        path = (*prefix, field.name)
        if not prefix and field.name in QUERY_EXCLUDED:
            continue
        if _is_repeated(field):
            continue  # AnonymizeRequest has none; a list does not fit a flat query string anyway
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            out.extend(_leaves(field.message_type, path))
        else:
            out.append(QueryField(path, field))
    return out


@functools.cache
def request_query_fields() -> tuple[QueryField, ...]:
    """Every query field of ``POST /v1/anonymize`` and ``/v1/anonymize:stream``, in proto order."""
    return tuple(_leaves(pb2.AnonymizeRequest.DESCRIPTOR))


@functools.cache
def video_query_fields() -> tuple[QueryField, ...]:
    """Every query field of ``POST /v1/anonymize-video``: VideoStart's scalar leaves (the body is the file)."""
    return tuple(_leaves(pb2.VideoStart.DESCRIPTOR))


def request_from_query(values: dict[str, Any], into: Message | None = None) -> Message:
    """Sets the given query fields (dotted names, already type-checked) on ``into`` (an AnonymizeRequest by default)."""
    nested: dict[str, Any] = {}
    for name, value in values.items():
        *parents, leaf = name.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    message = into if into is not None else pb2.AnonymizeRequest()
    json_format.ParseDict(nested, message)
    return message


def to_json(message: Message) -> dict[str, Any]:
    """Canonical protobuf JSON with the proto's field names; fields without presence are always written."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


_models: dict[str, type[pydantic.BaseModel]] = {}


def model_for(descriptor: Descriptor) -> type[pydantic.BaseModel]:
    """A pydantic model of ``descriptor``'s JSON form (for the OpenAPI document and for checking replies).

    Fields with presence (``optional``, messages, oneof members) may be absent; the rest are always written.
    """
    name = descriptor.name
    if name in _models:
        return _models[name]
    fields: dict[str, Any] = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            annotation: Any = dict[str, _json_type(value_field)]
        elif _is_repeated(field):
            annotation = list[_json_type(field)]
        else:
            annotation = _json_type(field)
        if field.has_presence:
            fields[field.name] = (annotation | None, pydantic.Field(default=None))
        else:
            fields[field.name] = (annotation, ...)
    model = pydantic.create_model(
        name,
        __config__=pydantic.ConfigDict(extra="forbid"),
        __doc__=f"The JSON form of the proto message {descriptor.full_name}.",
        **fields,
    )
    _models[name] = model
    return model


def _json_type(field: FieldDescriptor) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return model_for(field.message_type)
    return _scalar_type(field, for_query=False)


def event_name(event: pb2.AnonymizeEvent) -> str:
    """The SSE event name of an AnonymizeEvent: its oneof member (queued, faces_found, progress, result)."""
    return event.WhichOneof("event") or "unknown"
