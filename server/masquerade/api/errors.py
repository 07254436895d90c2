"""The one place that maps exceptions to gRPC status codes.

Client faults name the field they are about; anything unexpected becomes INTERNAL
with a generic message, and its traceback is logged here, server-side only.
Messages never carry pixels, embeddings or image bytes.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from masquerade.engine.request import (
    DeadlineUnmeetableError,
    EngineNotAcceptingError,
    InvalidRequestError,
    MethodUnavailableError,
    QueueFullError,
    RetryLaterError,
)
from masquerade.errors import ResourceLimitError

log = logging.getLogger(__name__)


class ServerNotReadyError(RuntimeError):
    """The server is still loading models or is shutting down."""


class ServerCancelledError(RuntimeError):
    """The engine cancelled a request the client still waits for (shutdown past its grace period).

    Kept apart from asyncio.CancelledError, which in a handler means *this* RPC was cancelled.
    """


def engine_failure(error: BaseException) -> Exception:
    """The exception to raise for a FailedEvent's error inside a handler."""
    if isinstance(error, asyncio.CancelledError):
        return ServerCancelledError("the server cancelled the request while shutting down; retry on another replica")
    if isinstance(error, Exception):
        return error
    return RuntimeError(f"engine failure: {type(error).__name__}")


def status_for(exc: BaseException, *, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """(status code, client-facing message) for an exception raised while serving a request.

    Called by the servicer for every failed request; logs unexpected faults with their traceback.
    """
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)  # "field: what is wrong"
    if isinstance(exc, RetryLaterError):  # a quota, or the queue with advice: the message says when
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, DeadlineUnmeetableError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, QueueFullError):  # the one place the advice is added: engine messages say only what is full
        detail = (str(exc) or "the server's queue is full").removesuffix("; retry with backoff")
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{detail}; retry later with backoff"
    if isinstance(exc, ResourceLimitError):  # can never fit: the message names the limit, retrying would not help
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, MethodUnavailableError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc) or "the requested method is not available on this server"
    if isinstance(exc, (ServerNotReadyError, EngineNotAcceptingError)):
        return grpc.StatusCode.UNAVAILABLE, str(exc) or "the server is not ready; retry later"
    if isinstance(exc, ServerCancelledError):
        # UNAVAILABLE, the one code clients retry: the request was not at fault, another replica can serve it.
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "the request was cancelled"
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is an alias since Python 3.11
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the request did not finish before its deadline"
    log.error("internal error serving request %r", request_id, exc_info=exc)
    suffix = f" (request_id {request_id!r})" if request_id else ""
    return grpc.StatusCode.INTERNAL, f"internal server error{suffix}; the server logged the details"


def retry_delay_s(exc: BaseException) -> float | None:
    """When a refused caller should come back (RetryLaterError), else None."""
    return exc.retry_after_s if isinstance(exc, RetryLaterError) else None


def status_trailers(exc: BaseException, code: grpc.StatusCode, details: str) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata for a failed call: a google.rpc.Status with a RetryInfo detail
    (``grpc-status-details-bin``, built by grpcio-status) when the error says when to retry."""
    delay = retry_delay_s(exc)
    if delay is None:
        return ()
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    retry_info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=0))
    retry_info.retry_delay.FromNanoseconds(round(delay * 1e9))
    detail = any_pb2.Any()
    detail.Pack(retry_info)
    status = status_pb2.Status(code=code.value[0], message=details, details=[detail])
    return tuple(rpc_status.to_status(status).trailing_metadata)


def code_number(code: grpc.StatusCode) -> int:
    """The google.rpc.Code integer of a status, as AnonymizeBatchResponse.error.code carries it."""
    return code.value[0]
