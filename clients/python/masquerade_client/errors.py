"""gRPC failures as exceptions, one class per status code that callers act on."""

from __future__ import annotations

import grpc


class MasqueradeError(Exception):
    """A failed call. ``code`` is the grpc.StatusCode, ``details`` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None):
        super().__init__(f"{(code or self.code).name}: {details}")
        if code is not None:
            self.code = code
        self.details = details


class InvalidArgument(MasqueradeError):
    """Bad input; ``details`` names the request field (fix the request, do not retry)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(MasqueradeError):
    """The server's queue is full or a message exceeds its size limit; retry later or send less."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(MasqueradeError):
    """The method needs models the server has not loaded (see server_info().methods)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(MasqueradeError):
    """The server cannot be reached, is loading or shutting down (retried with backoff first)."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(MasqueradeError):
    """The server wants a bearer token (``token=``) and got none or a wrong one."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MasqueradeError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(MasqueradeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(MasqueradeError):
    code = grpc.StatusCode.CANCELLED


class Internal(MasqueradeError):
    code = grpc.StatusCode.INTERNAL


class Unimplemented(MasqueradeError):
    code = grpc.StatusCode.UNIMPLEMENTED


class NotFound(MasqueradeError):
    code = grpc.StatusCode.NOT_FOUND


_BY_CODE: dict[grpc.StatusCode, type[MasqueradeError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        ResourceExhausted,
        FailedPrecondition,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        DeadlineExceeded,
        Cancelled,
        Internal,
        Unimplemented,
        NotFound,
    )
}


def error_for(code: grpc.StatusCode, details: str) -> MasqueradeError:
    """The MasqueradeError subclass for a status (MasqueradeError itself for the rest)."""
    cls = _BY_CODE.get(code)
    return cls(details) if cls else MasqueradeError(details, code)


def error_for_code_number(number: int, details: str) -> MasqueradeError:
    """For AnonymizeBatchResponse.error, which carries the google.rpc.Code integer."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return error_for(code, details)
    return MasqueradeError(details, grpc.StatusCode.UNKNOWN)


def from_rpc_error(error: grpc.RpcError) -> MasqueradeError:
    return error_for(error.code(), error.details() or "")
