"""AnonymizerServicer: validate -> engine.submit -> engine events -> protos.

Thin on purpose: no batching, no model code. Every path that leaves an engine
request early (client cancel, deadline, a write failing) calls handle.cancel()
in a finally block, so the engine frees the job's scheduler slots at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from masquerade.api import convert
from masquerade.api.access_log import AccessRecord
from masquerade.api.batch_stream import error_response, serve_batch_stream
from masquerade.api.errors import ServerNotReadyError, engine_failure, retry_delay_s, status_for, status_trailers
from masquerade.api.protos import pb2, pb2_grpc
from masquerade.api.quota import ClientAdmission, client_name
from masquerade.api.security import current_principal
from masquerade.api.video_service import VideoConfig, VideoService
from masquerade.engine import request as et
from masquerade.engine.job_state import Priority

if TYPE_CHECKING:  # the engine is only called through its interface here
    from masquerade.engine.engine import Engine, RequestHandle

log = logging.getLogger(__name__)

DEADLINE_MARGIN_S = 0.25  # a cancel this close to the call's deadline is recorded as DEADLINE_EXCEEDED


class ProgressThrottle:
    """Rate-limits one request's PROGRESS events; the newest held-back one is always sent.

    A held-back event is flushed before the next event of any other kind or phase,
    so the client always sees each phase's last step before the RESULT.
    """

    def __init__(self, min_interval_s: float):
        self.min_interval_s = min_interval_s
        self._last_sent = -float("inf")
        self._pending: et.ProgressEvent | None = None

    def offer(self, event: et.EngineEvent, now: float | None = None) -> list[et.EngineEvent]:
        """Events to send now, in order, given the next engine event."""
        now = time.monotonic() if now is None else now
        out: list[et.EngineEvent] = []
        if isinstance(event, et.ProgressEvent):
            if self._pending is not None and self._pending.phase != event.phase:
                out.append(self._pending)
            self._pending = None
            if event.step >= event.total or now - self._last_sent >= self.min_interval_s:
                out.append(event)
                self._last_sent = now
            else:
                self._pending = event
            return out
        if self._pending is not None:
            out.append(self._pending)
            self._pending = None
        out.append(event)
        return out


def _certificate_name(context: grpc.aio.ServicerContext | None) -> str | None:
    """The common name of a mutual-TLS client's certificate, if any."""
    if context is None:
        return None
    names = context.auth_context().get("x509_common_name") or ()
    return names[0].decode("utf-8", "replace") if names else None


def _engine_request_id(client_request_id: str) -> str:
    # Clients choose ids freely and two clients may both send "1"; the engine gets a
    # unique one (prefixed by the client's for log correlation) and responses echo the client's.
    suffix = uuid.uuid4().hex[:12]
    return f"{client_request_id}~{suffix}" if client_request_id else suffix


class AnonymizerServicer(pb2_grpc.AnonymizerServicer):
    """The Anonymizer service over a running engine (``attach``-ed once models are loaded)."""

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        max_receive_message_bytes: int,
        max_send_message_bytes: int,
        batch_window: int = 32,
        progress_interval_s: float = 0.1,
        clients: ClientAdmission | None = None,
        video: VideoConfig | None = None,
    ):
        self.max_receive_message_bytes = max_receive_message_bytes
        self.max_send_message_bytes = max_send_message_bytes
        self.batch_window = batch_window  # requests of one AnonymizeBatch stream in flight before reading pauses
        self.progress_interval_s = progress_interval_s  # <= 10 PROGRESS events per second per request
        self._engine: Engine | None = None
        self._info = None
        self.draining = False  # set by the server when shutdown starts: requests on open streams are refused
        self.clients = clients or ClientAdmission()  # priorities and per-client quotas (api/quota.py)
        # AnonymizeVideo and AnonymizeFrames (api/video_service.py): same engine, same readiness and drain.
        self.video = VideoService(
            video or VideoConfig(),
            self._ready_engine,
            draining=lambda: self.draining,
            admit=self.admit_video_call,
            count_frames=self.count_video_frames,
        )
        if engine is not None:
            self.attach(engine)

    def attach(self, engine: Engine) -> None:
        """Called by the server once the engine is built; until then requests get UNAVAILABLE."""
        self._info = engine.info()
        self._engine = engine
        self.clients.quotas.faces_in_flight = engine.faces_in_flight
        self.clients.quotas.faces_retry_after = lambda client: engine.estimate_seconds(Priority.BULK) or 1.0
        self.video.start_warming(engine)  # with VideoConfig.warm_live (serve): the live path, in the background

    # ------------------------------------------------------------ shared pieces

    def _ready_engine(self) -> Engine:
        engine = self._engine
        if engine is None:
            raise ServerNotReadyError("the server is still loading its models; retry shortly")
        if self.draining:
            raise ServerNotReadyError("the server is draining for shutdown; retry on another replica")
        if not engine.ready:
            raise ServerNotReadyError("the server is warming up or shutting down; retry shortly")
        return engine

    def _submit(
        self, message: pb2.AnonymizeRequest, record: AccessRecord, context: grpc.aio.ServicerContext | None = None
    ) -> RequestHandle:
        """Validates and submits; raises InvalidRequestError, QueueFullError (QuotaExceededError: over the
        caller's quota), MethodUnavailableError, DeadlineUnmeetableError (``context``'s deadline cannot be met)."""
        engine = self._ready_engine()
        record.server_request_id = _engine_request_id(message.request_id)
        request = convert.request_from_proto(message, self._info, request_id=record.server_request_id)
        asked = convert.priority_from_proto(message.priority)
        principal = current_principal()
        token_policy = principal.policy if principal is not None else None
        request.client = client_name(
            principal.token_id if principal is not None else None, token_policy, _certificate_name(context)
        )
        request.priority = self.clients.admit(request.client, self.clients.policy_for(token_policy), asked)
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None:
            request.deadline = time.monotonic() + remaining
        return engine.submit(request)

    def admit_video_call(self, asked: int, context: grpc.aio.ServicerContext) -> Priority:
        """A video call's effective priority (``asked``: the proto's value), counted once against the
        caller's quota as one request; raises QuotaExceededError as ``_submit`` does."""
        client, policy = self._video_caller(context)
        return self.clients.admit(client, policy, convert.priority_from_proto(asked))

    def count_video_frames(self, context: grpc.aio.ServicerContext, frames: int, *, refuse: bool) -> None:
        """Video frames against the caller's requests-per-second quota (api/quota.py): a live frame is
        refused over it (``refuse``: QuotaExceededError, one frame); a file's decoded frames are charged."""
        client, policy = self._video_caller(context)
        if refuse:
            self.clients.admit(client, policy, None)
        else:
            self.clients.charge(client, policy, frames)

    def _video_caller(self, context: grpc.aio.ServicerContext):
        principal = current_principal()
        token_policy = principal.policy if principal is not None else None
        client = client_name(
            principal.token_id if principal is not None else None, token_policy, _certificate_name(context)
        )
        return client, self.clients.policy_for(token_policy)

    @staticmethod
    def _access(rpc: str, message: pb2.AnonymizeRequest | None, context: grpc.aio.ServicerContext) -> AccessRecord:
        """The access-log record of one request (counted in the metrics and logged by ``finish``)."""
        if message is None:
            return AccessRecord.from_context(rpc, context)
        return AccessRecord.from_context(
            rpc, context, request_id=message.request_id[:128], method=convert.method_label(message)
        )

    @staticmethod
    def _cancel_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
        # A client's deadline expires on its clock, a little before the server's copy of it (which starts
        # when the headers arrive), and the client then cancels the call: a cancel that close to the
        # deadline is the deadline.
        remaining = context.time_remaining()
        if remaining is not None and remaining <= DEADLINE_MARGIN_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED

    async def _run_to_result(
        self, message: pb2.AnonymizeRequest, record: AccessRecord, context: grpc.aio.ServicerContext | None = None
    ) -> pb2.AnonymizeResponse:
        """Runs one request to its result; raises the request's error. Cancels the job if left early."""
        handle = self._submit(message, record, context)
        finished = False
        try:
            async for event in handle:
                if isinstance(event, et.FailedEvent):
                    finished = True
                    raise engine_failure(event.error)
                if isinstance(event, et.ResultEvent):
                    finished = True
                    response = convert.result_to_proto(event.result, request_id=message.request_id)
                    response.priority = convert.PRIORITY_TO_PROTO[handle.priority]
                    record.set_result(response)
                    return response
            finished = True
            raise RuntimeError("the engine's event stream ended without a result")
        finally:
            if not finished:
                handle.cancel()

    # ------------------------------------------------------------ shared with the HTTP front end (api/http)

    # ``call`` stands where the RPCs pass their grpc context: an object with the two methods the servicer reads
    # from one, ``time_remaining()`` (the caller's deadline) and ``auth_context()`` (a client certificate's name).

    def submit(self, message: pb2.AnonymizeRequest, record: AccessRecord, call=None) -> RequestHandle:
        """Validates and submits one request, exactly as the RPCs do."""
        return self._submit(message, record, call)

    async def run_to_result(
        self, message: pb2.AnonymizeRequest, record: AccessRecord, call=None
    ) -> pb2.AnonymizeResponse:
        """Runs one request to its result, exactly as Anonymize does; raises the request's error."""
        return await self._run_to_result(message, record, call)

    def server_info(self) -> pb2.ServerInfo:
        """GetServerInfo's answer; raises ServerNotReadyError while the models load."""
        if self._engine is None:
            raise ServerNotReadyError("the server is still loading its models; retry shortly")
        response = convert.server_info_to_proto(
            self._engine.info(),
            max_receive_message_bytes=self.max_receive_message_bytes,
            max_send_message_bytes=self.max_send_message_bytes,
        )
        response.limits.MergeFrom(pb2.Limits(**self.video.limits()))
        response.estimated_waits.extend(convert.estimated_waits_to_proto(self._engine.estimated_waits()))
        response.default_priority = convert.PRIORITY_TO_PROTO[self.clients.server_priority]
        return response

    # ------------------------------------------------------------ RPCs

    async def Anonymize(
        self, request: pb2.AnonymizeRequest, context: grpc.aio.ServicerContext
    ) -> pb2.AnonymizeResponse:
        record = self._access("Anonymize", request, context)
        try:
            response = await self._run_to_result(request, record, context)
        except asyncio.CancelledError:
            record.finish(self._cancel_code(context))
            raise
        except Exception as exc:
            code, details = status_for(exc, request_id=request.request_id)
            record.finish(code)
            await context.abort(code, details, status_trailers(exc, code, details))
        record.finish(grpc.StatusCode.OK)
        return response

    # The streaming handlers write with context.write rather than being async generators:
    # a cancelled RPC then raises CancelledError inside the handler's own try/finally, so
    # handle.cancel() runs at once instead of whenever the generator is finalized.

    async def AnonymizeStream(self, request: pb2.AnonymizeRequest, context: grpc.aio.ServicerContext) -> None:
        record = self._access("AnonymizeStream", request, context)
        throttle = ProgressThrottle(self.progress_interval_s)
        failure: BaseException | None = None
        handle = None
        finished = False
        try:
            handle = self._submit(request, record, context)
            async for event in handle:
                if isinstance(event, et.FailedEvent):
                    finished = True
                    failure = engine_failure(event.error)
                    break
                for to_send in throttle.offer(event):
                    proto = convert.event_to_proto(to_send, request_id=request.request_id)
                    if proto.HasField("result"):
                        proto.result.priority = convert.PRIORITY_TO_PROTO[handle.priority]
                    await context.write(proto)
                if isinstance(event, et.ResultEvent):
                    finished = True
                    record.set_result(proto.result)
                    break
            else:
                finished = True
                failure = RuntimeError("the engine's event stream ended without a result")
        except asyncio.CancelledError:
            record.finish(self._cancel_code(context))
            raise
        except Exception as exc:
            failure = exc
        finally:
            if handle is not None and not finished:
                handle.cancel()
        if failure is not None:
            code, details = status_for(failure, request_id=request.request_id)
            record.finish(code)
            await context.abort(code, details, status_trailers(failure, code, details))
        record.finish(grpc.StatusCode.OK)

    async def AnonymizeBatch(
        self, request_iterator: AsyncIterator[pb2.AnonymizeRequest], context: grpc.aio.ServicerContext
    ) -> None:
        async def answer(message: pb2.AnonymizeRequest) -> pb2.AnonymizeBatchResponse:
            record = self._access("AnonymizeBatch", message, context)
            try:
                result = await self._run_to_result(message, record, context)
            except asyncio.CancelledError:
                record.finish(self._cancel_code(context))
                raise
            except Exception as exc:
                code, details = status_for(exc, request_id=message.request_id)
                record.finish(code)
                response = error_response(message.request_id, code, details)
                delay = retry_delay_s(exc)
                if delay is not None:
                    response.error.retry_delay_ms = max(1, math.ceil(delay * 1000))
                return response
            record.finish(grpc.StatusCode.OK)
            return pb2.AnonymizeBatchResponse(request_id=message.request_id, result=result)

        def on_rejected(message: pb2.AnonymizeRequest, code: grpc.StatusCode) -> None:
            self._access("AnonymizeBatch", message, context).finish(code)

        await serve_batch_stream(request_iterator, context, self.batch_window, answer, on_rejected)

    async def GetServerInfo(
        self, request: pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ServerInfo:
        record = self._access("GetServerInfo", None, context)
        try:
            response = self.server_info()
        except Exception as exc:
            code, details = status_for(exc)
            record.finish(code)
            await context.abort(code, details)
        record.finish(grpc.StatusCode.OK)
        return response

    async def AnonymizeVideo(
        self, request_iterator: AsyncIterator[pb2.AnonymizeVideoRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await self.video.anonymize_video(request_iterator, context)

    async def AnonymizeFrames(
        self, request_iterator: AsyncIterator[pb2.FrameRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await self.video.anonymize_frames(request_iterator, context)
