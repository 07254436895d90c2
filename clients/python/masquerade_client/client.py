"""Python clients for masquerade.v1.Anonymizer: ``AnonymizerClient`` (blocking) and ``AsyncAnonymizerClient``.

Both apply a default deadline to every call, raise gRPC failures as ``MasqueradeError``
subclasses, and leave retries to gRPC itself: the channel's service config carries one
``retryPolicy`` (UNAVAILABLE only; see ``RetryPolicy``), the same in the TypeScript, Go and
C++ clients. TLS (``ca_file``, or ``tls=True`` for the system's roots), mutual TLS
(``cert_file`` + ``key_file``) and a bearer token (``token``, sent as
``authorization: Bearer <token>`` metadata on every call) are constructor options.
Responses are the generated protobuf messages (``masquerade_client.pb2``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from masquerade_client import video
from masquerade_client.errors import MasqueradeError, Unavailable, from_rpc_error, retry_delay
from masquerade_client.fields import FORMATS, SHAPES, detection_fields, enum_value, set_fields
from masquerade_client.v1 import anonymizer_pb2 as pb2
from masquerade_client.v1 import anonymizer_pb2_grpc as pb2_grpc

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["Anonymizer"].full_name  # "masquerade.v1.Anonymizer"

DEFAULT_TIMEOUT_S = 300.0
"""Deadline of a call when none is given: long enough for 100-step SDXL under load."""
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Matches the server's default; gRPC's own 4 MiB is too small for large photos."""


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retryPolicy for UNAVAILABLE (the project's one policy, in all four clients).

    gRPC retries a call only before any response arrived, waits a random time up to
    ``min(initial_backoff_s * multiplier**(n-1), max_backoff_s)`` before retry n, and never
    past the call's deadline. AnonymizeBatch is never retried: the server may already be
    running what was sent.

    RESOURCE_EXHAUSTED with a google.rpc.RetryInfo detail (a per-client quota, the server's
    queue) is retried by the client itself, the same in all four clients: it waits the delay
    the server gave and sends again, up to ``retry_info_attempts`` attempts in all, never
    past the call's deadline and never for a delay over ``max_retry_delay_s`` (then the
    ResourceExhausted error, whose ``retry_delay`` holds the advice, is raised at once).
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    retry_info_attempts: int = 4
    max_retry_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts={self.max_attempts}: gRPC retries take 1 (no retry) to 5 attempts")
        if self.initial_backoff_s <= 0 or self.max_backoff_s <= 0 or self.multiplier <= 0:
            raise ValueError("initial_backoff_s, max_backoff_s and multiplier must be positive")
        if self.retry_info_attempts < 1 or self.max_retry_delay_s < 0:
            raise ValueError("retry_info_attempts must be >= 1 and max_retry_delay_s >= 0")

    def wait_before_retry(self, error: grpc.RpcError, attempt: int, time_left: float) -> float | None:
        """Seconds to wait before sending again after ``attempt`` failed with ``error``; None: do not retry."""
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt >= self.retry_info_attempts:
            return None
        delay = retry_delay(error)
        if delay is None or delay > self.max_retry_delay_s or delay >= time_left:
            return None
        return delay

    def service_config(self) -> str:
        """The channel's service config (JSON), as the ``grpc.service_config`` channel option takes it."""
        if self.max_attempts == 1:
            return json.dumps({"methodConfig": [{"name": [{"service": SERVICE_NAME}]}]})
        retry = {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff_s:g}s",
            "maxBackoff": f"{self.max_backoff_s:g}s",
            "backoffMultiplier": self.multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
        return json.dumps(
            {
                "methodConfig": [
                    {"name": [{"service": SERVICE_NAME}], "retryPolicy": retry},
                    {"name": [{"service": SERVICE_NAME, "method": "AnonymizeBatch"}]},
                ]
            }
        )


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
    shape: int | str | None = None,
    mosaic_size: int | None = None,
    aligned: bool = False,
    score_threshold: float | None = None,
    min_face_size: int | None = None,
    max_faces: int | None = None,
    output_format: int | str | None = None,
    quality: int | None = None,
    priority: int | str | None = None,
) -> pb2.AnonymizeRequest:
    """An AnonymizeRequest. Unset (None) parameters take the server's defaults.

    ``method``: "reverse_personalization" | "blur" | "pixelate" | "solid" or a pb2.Method value;
    ``shape``: "ellipse" | "box" or a pb2.CoverShape value: the region classical covers fill (unset: ellipse);
    ``mosaic_size``: pixelate's square side in pixels (unset: face width / 8);
    ``output_format``: "jpeg" | "png" | "webp" or a pb2.ImageFormat value (unset keeps the input's);
    ``priority``: "interactive" | "bulk" or a pb2.Priority value (unset: the token's or the server's default).
    """
    request = pb2.AnonymizeRequest(request_id=request_id, image=image)
    set_fields(
        request,
        method=method,
        priority=priority,
        params={
            "skip": skip,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "id_emb_scale": id_emb_scale,
            "ip_adapter_scale": ip_adapter_scale,
            "attribute_prompt": attribute_prompt,
            "seed": seed,
        },
        classical={
            "strength": strength,
            "shape": None if shape is None else enum_value("shape", shape, SHAPES),
            "mosaic_size": mosaic_size,
        },
        detection=detection_fields(
            aligned=aligned, score_threshold=score_threshold, min_face_size=min_face_size, max_faces=max_faces
        ),
        output={
            "format": None if output_format is None else enum_value("output_format", output_format, FORMATS),
            "quality": quality,
        },
    )
    return request


def _channel_options(
    max_message_bytes: int, retry: RetryPolicy, extra: Iterable[tuple[str, Any]]
) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry.service_config()),
        *extra,
    ]


def channel_credentials(
    *,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
    tls: bool = False,
) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files, or None for plaintext (no file given and ``tls`` false).

    ``ca_file``: the CA that signed the server's certificate (the system's roots when omitted
    and ``tls`` is true); ``cert_file`` + ``key_file``: this client's certificate, for servers
    that require mutual TLS.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file: give both (mutual TLS) or neither")
    if ca_file is None and cert_file is None and not tls:
        return None

    def read(name: str, path: str | Path | None) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise ValueError(f"{name}: cannot read {path}: {error.strerror}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read("ca_file", ca_file),
        private_key=read("key_file", key_file),
        certificate_chain=read("cert_file", cert_file),
    )


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    if token is None:
        return ()
    token = token.strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError("token: empty or holds whitespace")
    return (("authorization", f"Bearer {token}"),)


class _Deadline:
    """One overall deadline for a wait loop."""

    def __init__(self, timeout: float):
        self.end = time.monotonic() + timeout

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())


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

    ``address``: "host:port". ``timeout``: the deadline of each call (retries included) unless
    the call gives its own. TLS: ``ca_file`` (or ``tls=True`` for the system's roots), plus
    ``cert_file`` and ``key_file`` for mutual TLS, or ready-made ``credentials``. ``token``:
    sent as ``authorization: Bearer <token>`` on every call.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        tls: bool = False,
        token: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Iterable[tuple[str, Any]] = (),
    ):
        self.target = address
        self.timeout = timeout
        self.retry = retry
        self._metadata = _auth_metadata(token)
        options = _channel_options(max_message_bytes, retry, channel_options)
        credentials = credentials or channel_credentials(
            ca_file=ca_file, cert_file=cert_file, key_file=key_file, tls=tls
        )
        self._channel = (
            grpc.secure_channel(address, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(address, options=options)
        )
        self._stub = pb2_grpc.AnonymizerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AnonymizerClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def anonymize(self, image: bytes, *, timeout: float | None = None, **options: Any) -> pb2.AnonymizeResponse:
        """Anonymizes every face in ``image``; ``options`` are ``build_request``'s keyword arguments
        (``method="blur"``, ``steps=50``, ``aligned=True``, ...)."""
        return self.anonymize_request(build_request(image, **options), timeout=timeout)

    def anonymize_request(
        self, request: pb2.AnonymizeRequest, *, timeout: float | None = None
    ) -> pb2.AnonymizeResponse:
        deadline = _Deadline(self._timeout(timeout))
        attempt = 1
        while True:
            try:
                return self._stub.Anonymize(request, timeout=max(0.001, deadline.remaining()), metadata=self._metadata)
            except grpc.RpcError as error:
                wait = self.retry.wait_before_retry(error, attempt, deadline.remaining())
                if wait is None:
                    raise from_rpc_error(error) from None
            time.sleep(wait)  # the server's RetryInfo delay
            attempt += 1

    def anonymize_stream(
        self, image: bytes, *, timeout: float | None = None, **options: Any
    ) -> Iterator[pb2.AnonymizeEvent]:
        """Yields QUEUED, FACES_FOUND, PROGRESS... then the RESULT event (``event.WhichOneof("event")``).

        Breaking out of the loop cancels the call, and the server frees the request's slots.
        A RESOURCE_EXHAUSTED with RetryInfo before any event is retried as ``anonymize_request`` does.
        """
        request = build_request(image, **options)
        deadline = _Deadline(self._timeout(timeout))
        attempt = 1
        while True:
            call = self._stub.AnonymizeStream(
                request, timeout=max(0.001, deadline.remaining()), metadata=self._metadata
            )
            started = False
            try:
                for event in call:
                    started = True
                    yield event
                return
            except grpc.RpcError as error:
                wait = None if started else self.retry.wait_before_retry(error, attempt, deadline.remaining())
                if wait is None:
                    raise from_rpc_error(error) from None
            finally:
                call.cancel()  # no-op once the stream has finished
            time.sleep(wait)
            attempt += 1

    def anonymize_batch(
        self, requests: Iterable[pb2.AnonymizeRequest], *, timeout: float | None = None
    ) -> BatchResponses:
        """Starts sending ``requests`` (each with a unique request_id; see ``build_request``) over one stream.

        Iterate the result for responses in completion order; a failed request is a
        response whose ``error`` is set (``masquerade_client.errors.error_for_code_number``
        turns it into an exception). ``close()`` cancels the stream and every request still
        running on it. Never retried: the server may already be running what was sent.
        """
        return BatchResponses(
            self._stub.AnonymizeBatch(iter(requests), timeout=self._timeout(timeout), metadata=self._metadata)
        )

    def anonymize_video(
        self,
        data_or_path: bytes | str | Path,
        *,
        method: int | str | None = None,
        timeout: float | None = None,
        on_progress: Callable[[pb2.VideoProgress], None] | None = None,
        output_path: str | Path | None = None,
        filename: str | None = None,
        chunk_bytes: int = video.DEFAULT_CHUNK_BYTES,
        **options: Any,
    ) -> video.VideoResult:
        """Anonymizes a whole video file (bytes, or a path read lazily) over AnonymizeVideo.

        Returns ``.video`` (the anonymized file's bytes; empty when ``output_path`` is given, where it
        is written instead), ``.tracks`` (one TrackRecord per tracked face) and ``.report`` (the
        per-video report as a dict). ``options`` are ``video.video_start``'s keyword arguments
        (``detect_every=``, ``codec=``, ``crf=``, ``keep_audio=``, ``keep_metadata=``, ...);
        ``on_progress`` gets each VideoProgress. The deadline covers upload, processing and download.
        """
        chunks, size, name = video.video_source(data_or_path, filename, chunk_bytes)
        start = video.video_start(method=method, size_bytes=size, filename=name, **options)
        call = self._stub.AnonymizeVideo(
            video.video_requests(start, chunks), timeout=self._timeout(timeout), metadata=self._metadata
        )
        try:
            if output_path is None:
                return video.collect_video(call, on_progress)
            partial = Path(f"{output_path}.partial")
            try:
                with open(partial, "wb") as output:
                    result = video.collect_video(call, on_progress, output)
                partial.replace(output_path)
            finally:
                partial.unlink(missing_ok=True)
            return result
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()  # no-op once the stream has finished; frees the server's spool at once otherwise

    def stream_frames(
        self,
        frames: Iterable[Any],
        *,
        method: int | str | None = None,
        window: int | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> Iterator[video.FrameOutput]:
        """Sends live frames over AnonymizeFrames and yields each one covered, in the order sent.

        ``frames``: numpy HxWx3 uint8 RGB arrays (sent raw) or encoded JPEG/PNG bytes, or ``(frame,
        capture_time_s)`` pairs (the tracker moves boxes by capture time; the server spaces bare frames
        1/30 s apart), consumed as
        the server takes them: at most ``window`` frames are in flight (server default 4), so a slow
        consumer of this generator slows the reading of ``frames``. Each result has ``.image`` (an
        HxWx3 uint8 array), ``.faces`` (FrameFace: track_id, box, detected...), ``.latency_seconds``.
        ``options``: ``video.frame_options``' keyword arguments (``detect_every=``, ``hold_frames=``,
        ``output_format="jpeg"`` to receive JPEG, ...). No deadline unless ``timeout`` is given: a live
        stream runs as long as its frames do. Closing the generator cancels the stream.
        """
        stream_options = video.frame_options(method=method, window=window, **options)
        call = self._stub.AnonymizeFrames(
            video.frame_requests(stream_options, frames), timeout=timeout, metadata=self._metadata
        )
        try:
            for result in call:
                yield video.frame_output(result)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    def server_info(self, *, timeout: float | None = None) -> pb2.ServerInfo:
        try:
            return self._stub.GetServerInfo(
                pb2.GetServerInfoRequest(), timeout=self._timeout(timeout), metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

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
    """asyncio client (grpc.aio); same options and calls as AnonymizerClient, awaited. ``async with`` closes it."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        tls: bool = False,
        token: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Iterable[tuple[str, Any]] = (),
    ):
        self.target = address
        self.timeout = timeout
        self.retry = retry
        self._metadata = _auth_metadata(token)
        options = _channel_options(max_message_bytes, retry, channel_options)
        credentials = credentials or channel_credentials(
            ca_file=ca_file, cert_file=cert_file, key_file=key_file, tls=tls
        )
        self._channel = (
            grpc.aio.secure_channel(address, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(address, options=options)
        )
        self._stub = pb2_grpc.AnonymizerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncAnonymizerClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    async def anonymize(self, image: bytes, *, timeout: float | None = None, **options: Any) -> pb2.AnonymizeResponse:
        return await self.anonymize_request(build_request(image, **options), timeout=timeout)

    async def anonymize_request(
        self, request: pb2.AnonymizeRequest, *, timeout: float | None = None
    ) -> pb2.AnonymizeResponse:
        deadline = _Deadline(self._timeout(timeout))
        attempt = 1
        while True:
            try:
                return await self._stub.Anonymize(
                    request, timeout=max(0.001, deadline.remaining()), metadata=self._metadata
                )
            except grpc.RpcError as error:
                wait = self.retry.wait_before_retry(error, attempt, deadline.remaining())
                if wait is None:
                    raise from_rpc_error(error) from None
            await asyncio.sleep(wait)  # the server's RetryInfo delay
            attempt += 1

    async def anonymize_stream(
        self, image: bytes, *, timeout: float | None = None, **options: Any
    ) -> AsyncIterator[pb2.AnonymizeEvent]:
        request = build_request(image, **options)
        deadline = _Deadline(self._timeout(timeout))
        attempt = 1
        while True:
            call = self._stub.AnonymizeStream(
                request, timeout=max(0.001, deadline.remaining()), metadata=self._metadata
            )
            started = False
            try:
                async for event in call:
                    started = True
                    yield event
                return
            except grpc.RpcError as error:
                wait = None if started else self.retry.wait_before_retry(error, attempt, deadline.remaining())
                if wait is None:
                    raise from_rpc_error(error) from None
            finally:
                call.cancel()
            await asyncio.sleep(wait)
            attempt += 1

    def anonymize_batch(
        self,
        requests: Iterable[pb2.AnonymizeRequest] | AsyncIterable[pb2.AnonymizeRequest],
        *,
        timeout: float | None = None,
    ) -> AsyncBatchResponses:
        """Starts the batch stream at once; ``async for`` over the result; ``close()`` cancels it."""
        return AsyncBatchResponses(
            self._stub.AnonymizeBatch(requests, timeout=self._timeout(timeout), metadata=self._metadata)
        )

    async def anonymize_video(
        self,
        data_or_path: bytes | str | Path,
        *,
        method: int | str | None = None,
        timeout: float | None = None,
        on_progress: Callable[[pb2.VideoProgress], None] | None = None,
        filename: str | None = None,
        chunk_bytes: int = video.DEFAULT_CHUNK_BYTES,
        **options: Any,
    ) -> video.VideoResult:
        """AnonymizerClient.anonymize_video, awaited (the result's ``.video`` holds the whole file)."""
        chunks, size, name = video.video_source(data_or_path, filename, chunk_bytes)
        start = video.video_start(method=method, size_bytes=size, filename=name, **options)
        call = self._stub.AnonymizeVideo(
            video.video_requests(start, chunks), timeout=self._timeout(timeout), metadata=self._metadata
        )
        try:
            return video.collect_video([response async for response in call], on_progress)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def stream_frames(
        self,
        frames: Iterable[Any] | AsyncIterable[Any],
        *,
        method: int | str | None = None,
        window: int | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> AsyncIterator[video.FrameOutput]:
        """AnonymizerClient.stream_frames for asyncio: ``frames`` may be an async iterable (a camera's
        frames as they come); results are yielded in the order sent."""
        stream_options = video.frame_options(method=method, window=window, **options)

        async def requests():
            sequence = 0
            if isinstance(frames, AsyncIterable):
                async for frame in frames:
                    yield video.frame_request(stream_options, sequence, frame)
                    sequence += 1
            else:
                for frame in frames:
                    yield video.frame_request(stream_options, sequence, frame)
                    sequence += 1

        call = self._stub.AnonymizeFrames(requests(), timeout=timeout, metadata=self._metadata)
        try:
            async for result in call:
                yield video.frame_output(result)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def server_info(self, *, timeout: float | None = None) -> pb2.ServerInfo:
        try:
            return await self._stub.GetServerInfo(
                pb2.GetServerInfoRequest(), timeout=self._timeout(timeout), metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

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
    "channel_credentials",
    "BatchResponses",
    "AsyncBatchResponses",
    "MasqueradeError",
    "DEFAULT_TIMEOUT_S",
    "SERVICE_NAME",
    "pb2",
    "pb2_grpc",
]
