"""Errors shared by every layer; the bottom of the import graph (``face/`` may import it, it imports nothing).

The API layer maps each to a gRPC status code (``masquerade.api.errors``).
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """Bad client input. ``field`` names the offending request field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class QueueFullError(RuntimeError):
    """The engine's queue is at capacity; the client should retry later."""


class EngineNotAcceptingError(RuntimeError):
    """The engine is starting or shutting down; another replica (or a retry) can serve."""


class MethodUnavailableError(RuntimeError):
    """The requested method needs models this server has not loaded."""
