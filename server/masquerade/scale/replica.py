"""One engine replica: the class Ray Serve runs once per replica (one GPU each on CUDA).

It holds one ``Engine`` (models plus step-level batching) and speaks plain bytes
and tuples to the front end, so nothing but the wire protos crosses processes:

- ``events(request)`` streams ``("event", AnonymizeEvent bytes)`` items and ends
  after the RESULT, or with one ``("error", google.rpc code, message)`` item;
  validation, status mapping and progress throttling are the single-process
  server's own (``convert``, ``status_for``, ``ProgressThrottle``).
- ``info()`` returns the engine's ``EngineInfo``.
- ``video(rpc, inbox, key, ...)`` serves one AnonymizeVideo or AnonymizeFrames call on this replica
  with the single-process server's ``VideoService`` (``masquerade.scale.video``).
- ``check_health()`` fails when the engine's step loop has stopped, so Serve replaces the replica.

Closing the stream (the client went away, its deadline passed) cancels the
engine request, which frees its scheduler rows at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator

from masquerade.api import convert
from masquerade.api.errors import code_number, engine_failure, status_for
from masquerade.api.protos import pb2
from masquerade.api.servicer import ProgressThrottle
from masquerade.engine import request as et
from masquerade.engine.engine import Engine, EngineConfig, EngineInfo

log = logging.getLogger(__name__)


def replica_device(device: str, gpu_ids: list) -> str:
    """The device a replica's engine uses. Ray narrows CUDA_VISIBLE_DEVICES to the replica's GPU,
    so any CUDA device becomes "cuda" (that one GPU); "auto" means CUDA exactly when Ray gave it a GPU."""
    if device == "auto":
        return "cuda" if gpu_ids else "cpu"
    if device.startswith("cuda"):
        return "cuda"
    return device


class EngineReplica:
    """Ray Serve deployment class (see ``masquerade.scale.app``); one engine per replica."""

    async def __init__(
        self,
        engine_config: EngineConfig,
        grace_seconds: float = 30.0,
        progress_interval_s: float = 0.1,
        frontend=None,
        video=None,
    ):
        import ray
        from ray import serve

        context = serve.get_replica_context()
        self.replica_id = f"{context.replica_id.unique_id}@{socket.gethostname()}:{os.getpid()}"
        self.grace_seconds = grace_seconds
        self.progress_interval_s = progress_interval_s
        config = dataclasses.replace(engine_config, device=replica_device(engine_config.device, ray.get_gpu_ids()))
        log.info("replica %s: loading models (%s) on %s", self.replica_id, config.models, config.device)
        self.engine = await asyncio.to_thread(Engine.build, config)
        await self.engine.start()
        self._info = self.engine.info()
        self._video = self._video_service(video)
        self._frontend = None
        if frontend is not None:  # the KubeRay layout: this node's pod answers the gRPC port too
            self._frontend = await asyncio.to_thread(_start_frontend, frontend)
        log.info("replica %s ready", self.replica_id)

    def info(self) -> EngineInfo:
        return self.engine.info()

    def _video_service(self, config):
        from masquerade.api.errors import ServerNotReadyError
        from masquerade.api.video_service import VideoConfig, VideoService

        def ready_engine() -> Engine:
            if not self.engine.ready:
                raise ServerNotReadyError("this engine replica is starting or stopping; retry shortly")
            return self.engine

        return VideoService(config or VideoConfig(), ready_engine)

    async def video(
        self, rpc: str, inbox, key: str, time_remaining_s: float | None = None, peer: str = ""
    ) -> AsyncIterator[tuple]:
        """One AnonymizeVideo or AnonymizeFrames call, pinned here: the client's messages come from ``inbox``
        under ``key``; yields ("message", bytes) items and at most one final ("error", code, details, trailers)."""
        from masquerade.scale.video import serve_on_replica

        async for item in serve_on_replica(self._video, rpc, inbox, key, time_remaining_s, peer):
            yield item

    def replica(self) -> str:
        return self.replica_id

    def check_health(self) -> None:
        if not self.engine.ready:
            raise RuntimeError(f"replica {self.replica_id}: the engine's step loop is not running")
        if self._frontend is not None and not self._frontend.alive:
            raise RuntimeError(f"replica {self.replica_id}: its gRPC front end stopped")

    async def events(self, request: bytes, progress: bool = True) -> AsyncIterator[tuple]:
        """The request's events as ("event", bytes) items, or a final ("error", code, message).

        ``progress=False`` (unary calls, AnonymizeBatch) sends only the RESULT.
        """
        message = pb2.AnonymizeRequest.FromString(request)
        throttle = ProgressThrottle(self.progress_interval_s)
        handle = None
        finished = False
        try:
            suffix = uuid.uuid4().hex[:12]
            engine_id = f"{message.request_id[:128]}~{suffix}" if message.request_id else suffix
            handle = self.engine.submit(convert.request_from_proto(message, self._info, request_id=engine_id))
            async for event in handle:
                if isinstance(event, et.FailedEvent):
                    finished = True
                    raise engine_failure(event.error)
                if isinstance(event, et.ResultEvent):
                    finished = True
                to_send = throttle.offer(event) if progress else ([event] if finished else [])
                for item in to_send:
                    proto = convert.event_to_proto(item, request_id=message.request_id, served_by=self.replica_id)
                    yield ("event", proto.SerializeToString())
                if finished:
                    return
            finished = True
            raise RuntimeError("the engine's event stream ended without a result")
        except Exception as exc:  # the caller going away raises GeneratorExit/CancelledError, not caught here
            code, details = status_for(exc, request_id=message.request_id)
            yield ("error", code_number(code), details)
        finally:
            if handle is not None and not finished:
                handle.cancel()

    async def __del__(self) -> None:
        """Serve calls this on a graceful stop, after routing has moved away: drain, then stop the engine."""
        frontend = getattr(self, "_frontend", None)
        if frontend is not None:
            await asyncio.to_thread(frontend.stop, self.grace_seconds + 10)
        video = getattr(self, "_video", None)
        if video is not None:
            video.close()  # the spool folder; every call's files went when the call ended
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.shutdown(self.grace_seconds)


def _start_frontend(server_config):
    """This node's gRPC front end, or None when another replica on the node already serves the port."""
    from masquerade.scale.app import FrontEndThread

    host = server_config.host.strip("[]") or "0.0.0.0"
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        probe.bind((host, server_config.port))
    except OSError:
        log.info("port %d is served by another replica on this node", server_config.port)
        return None
    finally:
        probe.close()
    return FrontEndThread(server_config)
