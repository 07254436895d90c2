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


class RetryLaterError(QueueFullError):
    """Refused for now, with advice on when to come back (``retry_after_s``; google.rpc.RetryInfo on the wire)."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = max(0.0, float(retry_after_s))


class QuotaExceededError(RetryLaterError):
    """The caller's token (or client certificate) is over its requests-per-second or concurrent-faces quota."""


class DeadlineUnmeetableError(RuntimeError):
    """Admission's estimate of when the request would finish is past its deadline: refused before any work."""

    def __init__(self, message: str, estimated_s: float):
        super().__init__(message)
        self.estimated_s = estimated_s


class ResourceLimitError(RuntimeError):
    """The request needs more of a server resource than the server has at all (its message names the limit);
    unlike QueueFullError, waiting would not help."""
