"""Python clients for masquerade.v1.Anonymizer: ``AnonymizerClient`` (blocking) and ``AsyncAnonymizerClient``.

Both apply a default deadline to every call, retry UNAVAILABLE with bounded
exponential backoff (unary calls, and streams that have not yet produced an
event), and raise gRPC failures as ``MasqueradeError`` subclasses.
Responses are the generated protobuf messages (``masquerade.v1.anonymizer_pb2``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from masquerade.api.protos import SERVICE_NAME, pb2, pb2_grpc
from masquerade_client.errors import MasqueradeError, Unavailable, from_rpc_error

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 300.0
"""Deadline of a call when none is given: long enough for 100-step SDXL under load."""
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Matches the server's default; gRPC's own 4 MiB is too small for large photos."""

_METHODS = {name.lower(): number for name, number in pb2.Method.items()}
_FORMATS = {name.lower(): number for name, number in pb2.ImageFormat.items()}


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for UNAVAILABLE, bounded in attempts and by the call's deadline."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        """Sleep before attempt ``attempt + 1`` (attempt counts from 1), with full jitter."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


def _enum_value(field_name: str, value: int | str, table: dict[str, int]) -> int:
    if isinstance(value, str):
        try:
            return table[value.lower()]
        except KeyError:
            raise ValueError(f"{field_name}: unknown value {value!r}; use one of {sorted(table)}") from None
    return int(value)


def build_request(
    image: bytes,
    *,
    method: int | str | None = None,
    request_id: str = "",
    skip: float | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    id_emb_scale: float | None = None,
    ip_adapter_scale: float | None = None,
    attribute_prompt: str | None = None,
    seed: int | None = None,
    strength: float | None = None,
    aligned: bool = False,
    score_threshold: float | None = None,
    min_face_size: int | None = None,
    max_faces: int | None = None,
    output_format: int | str | None = None,
    quality: int | None = None,
) -> pb2.AnonymizeRequest:
    """An AnonymizeRequest. Unset (None) parameters take the server's defaults.

    ``method``: "reverse_personalization" | "blur" | "pixelate" | "solid" or a pb2.Method value;
    ``output_format``: "jpeg" | "png" | "webp" or a pb2.ImageFormat value (unset keeps the input's).
    """
    request = pb2.AnonymizeRequest(request_id=request_id, image=image)
    if method is not None:
        request.method = _enum_value("method", method, _METHODS)
    for name, value in (
        ("skip", skip),
        ("steps", steps),
        ("guidance_scale", guidance_scale),
        ("id_emb_scale", id_emb_scale),
        ("ip_adapter_scale", ip_adapter_scale),
        ("attribute_prompt", attribute_prompt),
        ("seed", seed),
    ):
        if value is not None:
            setattr(request.params, name, value)
    if strength is not None:
        request.classical.strength = strength
    if aligned:
        request.detection.aligned = True
    for name, value in (
        ("score_threshold", score_threshold),
        ("min_face_size", min_face_size),
        ("max_faces", max_faces),
    ):
        if value is not None:
            setattr(request.detection, name, value)
    if output_format is not None:
        request.output.format = _enum_value("output_format", output_format, _FORMATS)
    if quality is not None:
        request.output.quality = quality
    return request


def _channel_options(max_message_bytes: int, extra: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *extra,
    ]


class _Deadline:
    """One overall deadline across retries; each attempt gets what is left."""

    def __init__(self, timeout: float):
        self.end = time.monotonic() + timeout

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())


def _should_retry(error: grpc.RpcError, attempt: int, policy: RetryPolicy, deadline: _Deadline, pause: float) -> bool:
    return (
        error.code() == grpc.StatusCode.UNAVAILABLE and attempt < policy.max_attempts and deadline.remaining() > pause
    )


class BatchResponses(Iterator[pb2.AnonymizeBatchResponse]):
    """AnonymizeBatch responses of a call already in flight; ``close()`` (or ``with``) cancels it."""

    def __init__(self, call):
        self._call = call

    def __next__(self) -> pb2.AnonymizeBatchResponse:
        try:
            return next(self._call)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def close(self) -> None:
        self._call.cancel()  # no-op once the stream has finished

    def __enter__(self) -> BatchResponses:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncBatchResponses(AsyncIterator[pb2.AnonymizeBatchResponse]):
    """The asyncio counterpart of BatchResponses."""

    def __init__(self, call):
        self._call = call
        self._responses = call.__aiter__()

    async def __anext__(self) -> pb2.AnonymizeBatchResponse:
        try:
            return await self._responses.__anext__()
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def close(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> AsyncBatchResponses:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()


class AnonymizerClient:
    """Blocking client. Use as a context manager or call ``close()``.

    >>> with AnonymizerClient("localhost:50051") as client:
    ...     client.wait_ready(timeout=60)
    ...     response = client.anonymize(open("photo.jpg", "rb").read(), method="blur")
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy = RetryPolicy(),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Iterable[tuple[str, Any]] = (),
    ):
        self.target = target
        self.timeout = timeout
        self.retry = retry
        options = _channel_options(max_message_bytes, channel_options)
        self._channel = (
            grpc.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(target, options=options)
        )
        self._stub = pb2_grpc.AnonymizerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AnonymizerClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _unary(self, call: Callable[..., T], request, timeout: float | None) -> T:
        deadline = _Deadline(self.timeout if timeout is None else timeout)
        attempt = 1
        while True:
            try:
                return call(request, timeout=deadline.remaining())
            except grpc.RpcError as error:
                pause = self.retry.backoff(attempt)
                if not _should_retry(error, attempt, self.retry, deadline, pause):
                    raise from_rpc_error(error) from None
            time.sleep(pause)
            attempt += 1

    def anonymize(self, image: bytes, *, timeout: float | None = None, **options: Any) -> pb2.AnonymizeResponse:
        """Anonymizes every face in ``image``; ``options`` are ``build_request``'s keyword arguments."""
        return self.anonymize_request(build_request(image, **options), timeout=timeout)

    def anonymize_request(
        self, request: pb2.AnonymizeRequest, *, timeout: float | None = None
    ) -> pb2.AnonymizeResponse:
        return self._unary(self._stub.Anonymize, request, timeout)

    def anonymize_stream(
        self, image: bytes, *, timeout: float | None = None, **options: Any
    ) -> Iterator[pb2.AnonymizeEvent]:
        """Yields QUEUED, FACES_FOUND, PROGRESS... then the RESULT event (``event.WhichOneof("event")``).

        Breaking out of the loop cancels the call, and the server frees the request's slots.
        """
        request = build_request(image, **options)
        deadline = _Deadline(self.timeout if timeout is None else timeout)
        attempt = 1
        while True:
            call = self._stub.AnonymizeStream(request, timeout=deadline.remaining())
            received = False
            try:
                for event in call:
                    received = True
                    yield event
                return
            except grpc.RpcError as error:
                pause = self.retry.backoff(attempt)
                # Only a stream that produced nothing is safe to restart.
                if received or not _should_retry(error, attempt, self.retry, deadline, pause):
                    raise from_rpc_error(error) from None
            finally:
                call.cancel()  # no-op once the stream has finished
            time.sleep(pause)
            attempt += 1

    def anonymize_batch(
        self, requests: Iterable[pb2.AnonymizeRequest], *, timeout: float | None = None
    ) -> BatchResponses:
        """Starts sending ``requests`` (each with a unique request_id; see ``build_request``) over one stream.

        Iterate the result for responses in completion order; a failed request is a
        response whose ``error`` is set (``masquerade_client.errors.error_for_code_number``
        turns it into an exception). ``close()`` cancels the stream and every request still
        running on it. Not retried: the request iterable is consumed once.
        """
        return BatchResponses(
            self._stub.AnonymizeBatch(iter(requests), timeout=self.timeout if timeout is None else timeout)
        )

    def server_info(self, *, timeout: float | None = None) -> pb2.ServerInfo:
        return self._unary(self._stub.GetServerInfo, pb2.GetServerInfoRequest(), timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Blocks until the server's health check says SERVING; raises Unavailable after ``timeout``."""
        deadline = _Deadline(timeout)
        last = "no answer"
        pause = 0.05
        while True:
            try:
                reply = self._health.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                    timeout=max(0.01, min(deadline.remaining(), 5.0)),
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as error:
                last = f"{error.code().name}: {error.details()}"
            if deadline.remaining() <= pause:
                raise Unavailable(f"server at {self.target} not SERVING within {timeout}s (last: {last})")
            time.sleep(pause)
            pause = min(pause * 2, 1.0)


class AsyncAnonymizerClient:
    """asyncio client (grpc.aio); same calls as AnonymizerClient, awaited. ``async with`` closes it."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy = RetryPolicy(),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Iterable[tuple[str, Any]] = (),
    ):
        self.target = target
        self.timeout = timeout
        self.retry = retry
        options = _channel_options(max_message_bytes, channel_options)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=options)
        )
        self._stub = pb2_grpc.AnonymizerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncAnonymizerClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def _unary(self, call, request, timeout: float | None):
        deadline = _Deadline(self.timeout if timeout is None else timeout)
        attempt = 1
        while True:
            try:
                return await call(request, timeout=deadline.remaining())
            except grpc.RpcError as error:
                pause = self.retry.backoff(attempt)
                if not _should_retry(error, attempt, self.retry, deadline, pause):
                    raise from_rpc_error(error) from None
            await asyncio.sleep(pause)
            attempt += 1

    async def anonymize(self, image: bytes, *, timeout: float | None = None, **options: Any) -> pb2.AnonymizeResponse:
        return await self.anonymize_request(build_request(image, **options), timeout=timeout)

    async def anonymize_request(
        self, request: pb2.AnonymizeRequest, *, timeout: float | None = None
    ) -> pb2.AnonymizeResponse:
        return await self._unary(self._stub.Anonymize, request, timeout)

    async def anonymize_stream(
        self, image: bytes, *, timeout: float | None = None, **options: Any
    ) -> AsyncIterator[pb2.AnonymizeEvent]:
        request = build_request(image, **options)
        deadline = _Deadline(self.timeout if timeout is None else timeout)
        attempt = 1
        while True:
            call = self._stub.AnonymizeStream(request, timeout=deadline.remaining())
            received = False
            try:
                async for event in call:
                    received = True
                    yield event
                return
            except grpc.RpcError as error:
                pause = self.retry.backoff(attempt)
                if received or not _should_retry(error, attempt, self.retry, deadline, pause):
                    raise from_rpc_error(error) from None
            finally:
                call.cancel()
            await asyncio.sleep(pause)
            attempt += 1

    def anonymize_batch(
        self,
        requests: Iterable[pb2.AnonymizeRequest] | AsyncIterable[pb2.AnonymizeRequest],
        *,
        timeout: float | None = None,
    ) -> AsyncBatchResponses:
        """Starts the batch stream at once; ``async for`` over the result; ``close()`` cancels it."""
        return AsyncBatchResponses(
            self._stub.AnonymizeBatch(requests, timeout=self.timeout if timeout is None else timeout)
        )

    async def server_info(self, *, timeout: float | None = None) -> pb2.ServerInfo:
        return await self._unary(self._stub.GetServerInfo, pb2.GetServerInfoRequest(), timeout)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = _Deadline(timeout)
        last = "no answer"
        pause = 0.05
        while True:
            try:
                reply = await self._health.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                    timeout=max(0.01, min(deadline.remaining(), 5.0)),
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as error:
                last = f"{error.code().name}: {error.details()}"
            if deadline.remaining() <= pause:
                raise Unavailable(f"server at {self.target} not SERVING within {timeout}s (last: {last})")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)


__all__ = [
    "AnonymizerClient",
    "AsyncAnonymizerClient",
    "RetryPolicy",
    "build_request",
    "BatchResponses",
    "AsyncBatchResponses",
    "MasqueradeError",
    "DEFAULT_TIMEOUT_S",
]
