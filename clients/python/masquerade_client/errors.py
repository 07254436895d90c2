"""gRPC failures as exceptions, one class per status code that callers act on."""

from __future__ import annotations

import grpc


class MasqueradeError(Exception):
    """A failed call. ``code`` is the grpc.StatusCode, ``details`` the server's message, ``retry_delay``
    the seconds the server asked the caller to wait before retrying (google.rpc.RetryInfo), or None."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None, retry_delay: float | None = None):
        super().__init__(f"{(code or self.code).name}: {details}")
        if code is not None:
            self.code = code
        self.details = details
        self.retry_delay = retry_delay


class InvalidArgument(MasqueradeError):
    """Bad input; ``details`` names the request field (fix the request, do not retry)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(MasqueradeError):
    """The server's queue is full, the caller is over its quota, or a message exceeds its size limit;
    ``retry_delay`` (seconds) says when to come back where the server said (the clients wait that
    long and retry by themselves first; see ``RetryPolicy``)."""

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


def error_for(code: grpc.StatusCode, details: str, retry_delay: float | None = None) -> MasqueradeError:
    """The MasqueradeError subclass for a status (MasqueradeError itself for the rest)."""
    cls = _BY_CODE.get(code)
    return cls(details, retry_delay=retry_delay) if cls else MasqueradeError(details, code, retry_delay)


def error_for_code_number(number: int, details: str, retry_delay_ms: int = 0) -> MasqueradeError:
    """For AnonymizeBatchResponse.error, which carries the google.rpc.Code integer (and retry_delay_ms)."""
    delay = retry_delay_ms / 1000 if retry_delay_ms else None
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return error_for(code, details, delay)
    return MasqueradeError(details, grpc.StatusCode.UNKNOWN, delay)


STATUS_DETAILS_KEY = "grpc-status-details-bin"


def retry_delay(error: grpc.RpcError) -> float | None:
    """Seconds from the google.rpc.RetryInfo detail of a failed call's status, or None when it has none."""
    from google.rpc import error_details_pb2, status_pb2

    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key != STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # a malformed trailer is no advice, not a crash
            return None
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return max(0.0, info.retry_delay.ToNanoseconds() / 1e9)
    return None


def from_rpc_error(error: grpc.RpcError) -> MasqueradeError:
    return error_for(error.code(), error.details() or "", retry_delay(error))
