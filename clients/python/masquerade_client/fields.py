"""The fields AnonymizeRequest, VideoStart and FrameStreamOptions share, set in one place.

The three messages carry the same ``method``, ``priority``, ``params``, ``classical`` and
``detection`` (the proto repeats them field for field, so the wire stays compatible); the
request builders in ``client`` and ``video`` take the same keyword arguments for them and set
them here, with one spelling of enum names and one error for a bad one.
"""

from __future__ import annotations

from typing import Any

from masquerade_client.v1 import anonymizer_pb2 as pb2

METHODS = {name.lower(): number for name, number in pb2.Method.items()}
FORMATS = {name.lower(): number for name, number in pb2.ImageFormat.items()}
PRIORITIES = {name.removeprefix("PRIORITY_").lower(): number for name, number in pb2.Priority.items()}
SHAPES = {name.removeprefix("COVER_SHAPE_").lower(): number for name, number in pb2.CoverShape.items()}


def enum_value(field_name: str, value: int | str, table: dict[str, int]) -> int:
    """A proto enum value from its lower-case name ("blur") or its number."""
    if isinstance(value, str):
        try:
            return table[value.lower()]
        except KeyError:
            raise ValueError(f"{field_name}: unknown value {value!r}; use one of {sorted(table)}") from None
    return int(value)


def set_fields(
    message,
    *,
    method: int | str | None = None,
    priority: int | str | None = None,
    **groups: dict[str, Any],
) -> None:
    """Sets ``message.method`` and ``message.priority`` from a name or number, then for each group
    (``params={"steps": 20}``, ``detection={...}``) the sub-message's fields whose value is not None.
    Unset (None) fields keep the server's defaults."""
    if method is not None:
        message.method = enum_value("method", method, METHODS)
    if priority is not None:
        message.priority = enum_value("priority", priority, PRIORITIES)
    for group, values in groups.items():
        target = getattr(message, group)
        for name, value in values.items():
            if value is not None:
                setattr(target, name, value)


def detection_fields(
    *, score_threshold: float | None, min_face_size: int | None, max_faces: int | None, aligned: bool = False
) -> dict[str, Any]:
    return {
        "aligned": True if aligned else None,
        "score_threshold": score_threshold,
        "min_face_size": min_face_size,
        "max_faces": max_faces,
    }
