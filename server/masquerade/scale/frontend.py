"""The masquerade.v1.Anonymizer front end over Ray Serve deployment handles.

Thin on purpose: each RPC becomes one streaming handle call per image
(``EngineReplica.events``), so Ray's router picks, per request, a replica with
room (``max_ongoing_requests``) and queues the rest (``max_queued_requests``,
then RESOURCE_EXHAUSTED). Validation and status mapping happen on the replica
with the single-process server's own code; the front end maps only what Ray
itself raises:

- the replica died or its node went away (``RayActorError`` and kin): UNAVAILABLE,
  for exactly the requests that replica had in flight; clients retry it;
- the queue in front of the replicas is full (``BackPressureError``): RESOURCE_EXHAUSTED;
- no replica could be deployed (``DeploymentUnavailableError``): UNAVAILABLE.

Leaving an RPC early (client cancel, deadline) cancels its handle call, which
closes the replica's stream and cancels the engine request.

AnonymizeVideo and AnonymizeFrames are pinned to one replica for the whole call (the spooled
file, the live stream's tracker); ``masquerade.scale.video`` says how their messages travel.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from masquerade import metrics
from masquerade.api import convert
from masquerade.api.batch_stream import error_response, serve_batch_stream
from masquerade.api.errors import status_for
from masquerade.api.protos import pb2, pb2_grpc

log = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class RemoteStatus(Exception):
    """A status an engine replica decided (validation, overload, engine failure), passed on unchanged."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def ray_status(exc: BaseException, *, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """(status, message) for an exception met while calling the engine replicas."""
    if isinstance(exc, RemoteStatus):
        return exc.code, exc.details
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    if isinstance(exc, serve_errors.RequestCancelledError):
        return grpc.StatusCode.CANCELLED, "the request was cancelled"
    if isinstance(
        exc,
        (
            ray_errors.RayActorError,  # ActorDiedError, ActorUnavailableError
            ray_errors.WorkerCrashedError,
            ray_errors.NodeDiedError,
            ray_errors.OutOfMemoryError,
            serve_errors.ReplicaUnavailableError,
        ),
    ):
        return grpc.StatusCode.UNAVAILABLE, (
            "the engine replica serving this request stopped before it finished "
            f"({type(exc).__name__}); retry: another replica takes it"
        )
    if isinstance(exc, serve_errors.BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, (
            "every engine replica is busy and the queue in front of them is full; retry later with backoff"
        )
    if isinstance(exc, serve_errors.DeploymentUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, "no engine replica could be started; the server log says why"
    return status_for(exc, request_id=request_id)


def _decode(item: tuple) -> pb2.AnonymizeEvent:
    """One item of ``EngineReplica.events``; raises RemoteStatus for its error item."""
    kind = item[0]
    if kind == "event":
        return pb2.AnonymizeEvent.FromString(item[1])
    if kind == "error":
        return_code = _CODES.get(int(item[1]), grpc.StatusCode.UNKNOWN)
        raise RemoteStatus(return_code, str(item[2]))
    raise RemoteStatus(grpc.StatusCode.INTERNAL, f"unexpected item from an engine replica: {kind!r}")


class FrontEndServicer(pb2_grpc.AnonymizerServicer):
    """The four RPCs over the Engine deployment's handle."""

    def __init__(
        self,
        handle: Any = None,
        *,
        running_replicas: Callable[[], int],
        max_receive_message_bytes: int,
        max_send_message_bytes: int,
        batch_window: int = 32,
        video=None,
    ):
        from masquerade.api.video_service import VideoConfig

        self._handle = None
        self._stream = None
        self.video = video or VideoConfig()  # the replicas enforce it; the front end counts the window
        self._inbox = None
        self._running_replicas = running_replicas
        self.max_receive_message_bytes = max_receive_message_bytes
        self.max_send_message_bytes = max_send_message_bytes
        self.batch_window = batch_window
        self.draining = False
        if handle is not None:
            self.attach(handle)

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def attach(self, handle: Any) -> None:
        """The Engine deployment's handle, once its replicas are up; until then requests get UNAVAILABLE."""
        self._stream = handle.options(stream=True)
        self._handle = handle

    # ------------------------------------------------------------ shared pieces

    @staticmethod
    def _record(rpc: str, method: str, code: grpc.StatusCode) -> None:
        metrics.REQUESTS.labels(rpc=rpc, method=method, status=code.name).inc()

    @staticmethod
    def _cancel_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED

    def _ready_handle(self) -> Any:
        if self._handle is None:
            raise RemoteStatus(grpc.StatusCode.UNAVAILABLE, "the engine replicas are still starting; retry shortly")
        if self.draining:
            raise RemoteStatus(grpc.StatusCode.UNAVAILABLE, "the server is draining for shutdown; retry shortly")
        return self._handle

    def _call(self, message: pb2.AnonymizeRequest, progress: bool):
        self._ready_handle()
        return self._stream.events.remote(message.SerializeToString(), progress)

    async def _result(self, message: pb2.AnonymizeRequest) -> pb2.AnonymizeResponse:
        """Runs one request on some replica; raises its failure. Cancels the handle call if left early."""
        responses = self._call(message, progress=False)
        finished = False
        try:
            async for item in responses:
                event = _decode(item)
                if event.HasField("result"):
                    finished = True
                    return event.result
            finished = True
            raise RemoteStatus(grpc.StatusCode.INTERNAL, "an engine replica's stream ended without a result")
        except RemoteStatus:
            finished = True
            raise
        finally:
            if not finished:
                responses.cancel()

    # ------------------------------------------------------------ RPCs

    async def Anonymize(
        self, request: pb2.AnonymizeRequest, context: grpc.aio.ServicerContext
    ) -> pb2.AnonymizeResponse:
        method = convert.method_label(request)
        try:
            response = await self._result(request)
        except asyncio.CancelledError:
            self._record("Anonymize", method, self._cancel_code(context))
            raise
        except Exception as exc:
            code, details = ray_status(exc, request_id=request.request_id)
            self._record("Anonymize", method, code)
            await context.abort(code, details)
        self._record("Anonymize", method, grpc.StatusCode.OK)
        return response

    async def AnonymizeStream(self, request: pb2.AnonymizeRequest, context: grpc.aio.ServicerContext) -> None:
        method = convert.method_label(request)
        failure: BaseException | None = None
        responses = None
        finished = False
        try:
            responses = self._call(request, progress=True)
            async for item in responses:
                event = _decode(item)
                await context.write(event)
                if event.HasField("result"):
                    finished = True
                    break
            else:
                raise RemoteStatus(grpc.StatusCode.INTERNAL, "an engine replica's stream ended without a result")
        except asyncio.CancelledError:
            self._record("AnonymizeStream", method, self._cancel_code(context))
            raise
        except Exception as exc:
            finished = isinstance(exc, RemoteStatus)
            failure = exc
        finally:
            if responses is not None and not finished:
                responses.cancel()
        if failure is not None:
            code, details = ray_status(failure, request_id=request.request_id)
            self._record("AnonymizeStream", method, code)
            await context.abort(code, details)
        self._record("AnonymizeStream", method, grpc.StatusCode.OK)

    async def AnonymizeBatch(
        self, request_iterator: AsyncIterator[pb2.AnonymizeRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """Each request of the stream is routed on its own, so one stream spreads over every replica."""

        async def answer(message: pb2.AnonymizeRequest) -> pb2.AnonymizeBatchResponse:
            method = convert.method_label(message)
            try:
                result = await self._result(message)
            except asyncio.CancelledError:
                self._record("AnonymizeBatch", method, self._cancel_code(context))
                raise
            except Exception as exc:
                code, details = ray_status(exc, request_id=message.request_id)
                self._record("AnonymizeBatch", method, code)
                return error_response(message.request_id, code, details)
            self._record("AnonymizeBatch", method, grpc.StatusCode.OK)
            return pb2.AnonymizeBatchResponse(request_id=message.request_id, result=result)

        def on_rejected(message: pb2.AnonymizeRequest, code: grpc.StatusCode) -> None:
            self._record("AnonymizeBatch", convert.method_label(message), code)

        await serve_batch_stream(request_iterator, context, self.batch_window, answer, on_rejected)

    async def GetServerInfo(
        self, request: pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ServerInfo:
        try:
            info = await self._ready_handle().info.remote()
            replicas = await asyncio.to_thread(self._running_replicas)
        except Exception as exc:
            code, details = ray_status(exc)
            self._record("GetServerInfo", "none", code)
            await context.abort(code, details)
        self._record("GetServerInfo", "none", grpc.StatusCode.OK)
        response = convert.server_info_to_proto(
            info,
            max_receive_message_bytes=self.max_receive_message_bytes,
            max_send_message_bytes=self.max_send_message_bytes,
            replicas=replicas,
        )
        response.limits.MergeFrom(
            pb2.Limits(
                max_video_bytes=self.video.max_video_bytes,
                max_video_seconds=self.video.max_video_seconds,
                max_video_pixels=self.video.max_video_pixels,
                max_frame_window=self.video.max_frame_window,
                max_video_streams=self.video.max_video_streams,  # per replica
            )
        )
        return response

    # ------------------------------------------------------------ video: one replica per call

    async def AnonymizeVideo(
        self, request_iterator: AsyncIterator[pb2.AnonymizeVideoRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await self._pinned("AnonymizeVideo", request_iterator, context, pb2.AnonymizeVideoResponse)

    async def AnonymizeFrames(
        self, request_iterator: AsyncIterator[pb2.FrameRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await self._pinned("AnonymizeFrames", request_iterator, context, pb2.FrameResult)

    def _video_inbox(self):
        """The front end's Inbox actor, started on the first video call (no CPU reserved: it only moves bytes)."""
        if self._inbox is None:
            import ray

            from masquerade.scale.video import Inbox

            self._inbox = ray.remote(num_cpus=0)(Inbox).remote()
        return self._inbox

    async def _pinned(self, rpc: str, request_iterator, context: grpc.aio.ServicerContext, response_type) -> None:
        """One video call on one replica: the client's messages go through the inbox, the replica's answers
        come back on the handle call's stream; each answer returns a credit once gRPC has taken it."""
        from masquerade.scale import video

        messages = aiter(request_iterator)
        method = "unspecified"
        failure: BaseException | None = None
        trailers: tuple = ()
        key = uuid.uuid4().hex
        inbox = responses = forward = None
        finished = False
        try:
            self._ready_handle()
            first = await anext(messages, None)
            if first is None and rpc == "AnonymizeVideo":
                raise RemoteStatus(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "start: the first AnonymizeVideo message must carry `start` (the options), before any chunk",
                )
            if first is None:
                self._record(rpc, method, grpc.StatusCode.OK)
                return  # an empty live stream: nothing to answer
            options = first.start if rpc == "AnonymizeVideo" else first.options
            method = _video_method_label(options.method)
            window = None
            if rpc == "AnonymizeFrames":
                window = asyncio.Semaphore(
                    video.frame_window(first, self.video.max_frame_window, video_default_window())
                )
            inbox = self._video_inbox()
            capacity = self.video.max_frame_window + 1 if window is not None else video.UPLOAD_QUEUE
            await inbox.open.remote(key, capacity)
            await inbox.open.remote(video.credit_key(key), video.CREDIT + 1)
            responses = self._stream.video.remote(rpc, inbox, key, context.time_remaining(), context.peer())
            forward = asyncio.create_task(self._forward(first, messages, inbox, key, window), name=f"{rpc}-forward")
            # A failed client stream ends the call at once (the replica's stream would wait for more input).
            forward.add_done_callback(lambda task: task.cancelled() or task.exception() is None or responses.cancel())
            async for item in responses:
                if item[0] == "error":
                    finished = True
                    _, code, details, trailers = item
                    raise _remote_status(code, details)
                await context.write(response_type.FromString(item[1]))
                inbox.put.remote(video.credit_key(key), 1)  # gRPC has taken it: the replica may send one more
                if window is not None:
                    window.release()
            finished = True
            if await forward == "drained":
                raise RemoteStatus(
                    grpc.StatusCode.UNAVAILABLE,
                    "the server is draining for shutdown; reconnect the stream (to another replica)",
                )
        except asyncio.CancelledError:
            self._record(rpc, method, self._cancel_code(context))
            raise
        except Exception as exc:
            failure = exc
            if forward is not None and forward.done() and not forward.cancelled() and forward.exception() is not None:
                failure = forward.exception()  # the cause, rather than the cancelled handle call
        finally:
            if forward is not None:
                forward.cancel()
            if responses is not None and not finished:
                responses.cancel()
            if inbox is not None:
                inbox.close.remote(key, video.credit_key(key))
        if failure is not None and context.cancelled():
            self._record(rpc, method, self._cancel_code(context))
            return
        if failure is not None:
            code, details = ray_status(failure)
            self._record(rpc, method, code)
            await context.abort(code, details, trailers if isinstance(failure, RemoteStatus) else ())
        self._record(rpc, method, grpc.StatusCode.OK)

    async def _forward(self, first, messages, inbox, key: str, window: asyncio.Semaphore | None) -> str:
        """Puts the client's messages into the call's queue, in order (a live frame only once the window has
        room), then the end; if the client's stream fails, ABORT. A live stream has no end of its own: at a
        drain it ends after the frames already taken in, and returns "drained"."""
        from masquerade.scale import video

        outcome = "done"
        try:
            pending = [first]
            while True:
                message = pending.pop() if pending else await anext(messages, None)
                if message is None:
                    break
                if window is not None and message.WhichOneof("pixels") is not None:
                    await window.acquire()
                    if self.draining:
                        outcome = "drained"
                        break
                if not await inbox.put.remote(key, ("message", message.SerializeToString())):
                    return outcome  # the call has ended
            await inbox.put.remote(key, video.END)
            return outcome
        except asyncio.CancelledError:
            raise
        except Exception:
            inbox.put.remote(key, video.ABORT)
            raise


def _remote_status(code: int, details: str) -> RemoteStatus:
    return RemoteStatus(_CODES.get(int(code), grpc.StatusCode.UNKNOWN), str(details))


def _video_method_label(value: int) -> str:
    if value == pb2.METHOD_UNSPECIFIED:
        return "unspecified"
    method = convert.METHOD_FROM_PROTO.get(value)
    return method.value if method else "unknown"


def video_default_window() -> int:
    from masquerade.api.video_service import DEFAULT_FRAME_WINDOW

    return DEFAULT_FRAME_WINDOW
