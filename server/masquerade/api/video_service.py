"""Video over gRPC: AnonymizeVideo (a whole file, in chunks) and AnonymizeFrames (live frames, bidi).

The pixel work is the video package's (``masquerade.video``): the file pipeline, the live tracker and
the per-frame covers. This module only moves bytes and frames between gRPC and that work, within
bounds that hold whatever the client does:

- AnonymizeVideo spools the upload to a bounded folder (``api/video_spool.py``), runs the file
  pipeline on it, streams the output back from disk, and deletes both files however the call ends.
- AnonymizeFrames keeps at most ``window`` frames of a stream in flight, from the moment the server
  reads a frame to the moment gRPC has taken its result. A client that stops reading therefore
  stops the server reading its frames (gRPC flow control then stops the client's sends): nothing
  queues without bound. A stream's frames are tracked one at a time in order (the tracker's state is
  the stream's), while decoding, covering and encoding of several frames overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np

from masquerade import metrics
from masquerade.api import convert
from masquerade.api.access_log import AccessRecord
from masquerade.api.errors import code_number, status_for, status_trailers
from masquerade.api.protos import pb2
from masquerade.api.video_spool import DEFAULT_MAX_VIDEO_BYTES, SpoolEntry, VideoSpool
from masquerade.engine import request as et
from masquerade.engine.job_state import Priority
from masquerade.errors import InvalidRequestError, MethodUnavailableError, QueueFullError

if TYPE_CHECKING:
    from masquerade.engine.engine import Engine

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_FRAME_WINDOW = 4
PROGRESS_INTERVAL_S = 0.1
DEADLINE_MARGIN_S = 0.25  # the servicer's (api/servicer.py), which imports this module


@dataclass
class VideoConfig:
    """The server's video settings (``serve --video-*`` / ``--max-video-*`` flags)."""

    spool_dir: str | None = None
    """Folder for uploads and outputs in flight; None: <tmp>/masquerade-video-spool."""
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES
    """Largest upload to AnonymizeVideo."""
    spool_bytes: int | None = None
    """Bytes the spool may hold over every call at once (inputs and outputs); None: 4 x max_video_bytes."""
    max_video_seconds: float = 600.0
    """Longest clip (as the CLI's --max-video-seconds)."""
    max_video_pixels: int = 3840 * 2160
    """Largest frame, width x height (as the CLI's --max-video-pixels); live frames too."""
    max_frame_window: int = 16
    """Largest FrameStreamOptions.window a client may ask for."""
    max_video_streams: int = 8
    """AnonymizeVideo and AnonymizeFrames calls served at once; one more is RESOURCE_EXHAUSTED."""
    live_detect_max_side: int = 960
    """Live frames: the detector runs on a copy whose longest side is at most this (0: the full frame, as
    for files). Live streams trade the smallest faces for latency; files never do."""
    chunk_bytes: int = 1 * MIB
    """Size of the output chunks AnonymizeVideo sends."""
    warm_live: bool = False
    """Ready the live path once the engine is attached, in the background (``serve`` does): the live
    detector's session and first run, and the landmark predictor on every pixel thread (dlib's is one
    per thread, ~0.3 s of CPU to load), so a server's first stream does not pay them frame by frame."""

    def __post_init__(self) -> None:
        checks = [
            (self.max_video_bytes >= 1, f"max_video_bytes must be positive, got {self.max_video_bytes}"),
            (self.max_video_seconds > 0, f"max_video_seconds must be positive, got {self.max_video_seconds}"),
            (self.max_video_pixels >= 1, f"max_video_pixels must be positive, got {self.max_video_pixels}"),
            (self.max_frame_window >= 1, f"max_frame_window must be at least 1, got {self.max_frame_window}"),
            (self.max_video_streams >= 1, f"max_video_streams must be at least 1, got {self.max_video_streams}"),
            (
                self.live_detect_max_side == 0 or self.live_detect_max_side >= 320,
                f"live_detect_max_side must be 0 (full frame) or at least 320, got {self.live_detect_max_side}",
            ),
            (4096 <= self.chunk_bytes <= 16 * MIB, f"chunk_bytes must be in [4 KiB, 16 MiB], got {self.chunk_bytes}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class StreamError(Exception):
    """Ends a whole AnonymizeFrames stream with ``code`` (frames answered before it still went out)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


def _status(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, StreamError):
        return exc.code, exc.details
    return status_for(exc, request_id=request_id)


def _cover_settings(detection_message, classical_message, info, defaults, kind: str) -> tuple[float, dict]:
    """Both RPCs' classical strength and detection settings (mask_scale, threshold, max_faces; unset ones from
    the engine's ``defaults``), checked against this server's limits."""
    detection = convert.detection_from_proto(detection_message, info.max_faces)
    if detection.aligned:
        raise InvalidRequestError("detection.aligned", f"is not supported for {kind}; leave it unset")
    if detection.max_faces is not None and detection.max_faces > info.max_faces:
        raise InvalidRequestError(
            "detection.max_faces", f"must be at most {info.max_faces} (this server's limit), got {detection.max_faces}"
        )
    strength = convert.classical_strength_from_proto(classical_message)
    if not (np.isfinite(strength) and 0.0 < strength <= 10.0):
        raise InvalidRequestError("classical.strength", f"must be a finite number in (0, 10], got {strength!r}")
    return strength, {
        "mask_scale": detection.mask_scale if detection.mask_scale is not None else defaults.mask_scale,
        "threshold": detection.score_threshold if detection.score_threshold is not None else defaults.threshold,
        "max_faces": detection.max_faces,
    }


def _method_label(value: int) -> str:
    if value == pb2.METHOD_UNSPECIFIED:
        return "unspecified"
    method = convert.METHOD_FROM_PROTO.get(value)
    return method.value if method else "unknown"


def _tracking(message: pb2.TrackingOptions, *, live: bool):
    """The video package's TrackingOptions (it checks the ranges, naming the fields); unset fields keep its defaults."""
    from masquerade.video.tracking import TrackingOptions

    overrides = {}
    if message.HasField("detect_every"):
        overrides["detect_every"] = message.detect_every
    if message.HasField("hold_frames"):
        overrides["track_hold"] = message.hold_frames
    if message.HasField("look_ahead_frames"):
        overrides["look_ahead"] = message.look_ahead_frames
    if live:
        if overrides.get("look_ahead"):
            raise InvalidRequestError(
                "tracking.look_ahead_frames", "must be unset or 0 on a live stream: it cannot see future frames"
            )
        overrides["look_ahead"] = 0
    return TrackingOptions(**overrides)


class _Slots:
    """At most ``limit`` video calls at once, over both RPCs."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0

    @contextlib.contextmanager
    def take(self, rpc: str):
        if self.in_use >= self.limit:
            raise QueueFullError(
                f"{self.in_use} video calls are being served, this server's limit (--max-video-streams)"
            )
        self.in_use += 1
        metrics.ACTIVE_VIDEO_STREAMS.labels(rpc).inc()
        try:
            yield
        finally:
            self.in_use -= 1
            metrics.ACTIVE_VIDEO_STREAMS.labels(rpc).dec()


class VideoService:
    """Serves the two video RPCs for ``AnonymizerServicer`` (which owns the engine and its readiness)."""

    def __init__(
        self,
        config: VideoConfig,
        ready_engine: Callable[[], Engine],
        *,
        draining: Callable[[], bool] = lambda: False,
        admit: Callable[[int, grpc.aio.ServicerContext], Priority] | None = None,
        count_frames: Callable[..., None] | None = None,
    ):
        self.config = config
        self._ready_engine = ready_engine
        self._draining = draining
        # The caller's effective priority, and one request counted against its quota (api/quota.py).
        self._admit = admit or (lambda asked, context: Priority.INTERACTIVE)
        # Frames against the same quota: ``count_frames(call, n, refuse=...)`` (api/quota.py says the rule).
        self._count_frames = count_frames or (lambda call, frames, *, refuse: None)
        self.spool = VideoSpool(
            config.spool_dir, max_file_bytes=config.max_video_bytes, max_total_bytes=config.spool_bytes
        )
        self._slots = _Slots(config.max_video_streams)
        self._live_detector = None
        self._warming: asyncio.Task | None = None

    def close(self) -> None:
        if self._warming is not None:
            self._warming.cancel()
        self.spool.close()

    def start_warming(self, engine: Engine) -> None:
        """With ``config.warm_live``: readies the live path in the background (called once the engine is up)."""
        if not self.config.warm_live or self._warming is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # attached outside the server's loop: the first stream warms as it goes
            return
        self._warming = loop.create_task(self._warm_live(engine), name="video-warm-live")

    async def _warm_live(self, engine: Engine) -> None:
        """Measured on a server's first stream (720p, 12 fps): its first frames waited ~1 s and frames
        around the 30th ~0.7 s, each pixel thread loading dlib's landmark predictor (holding the GIL) the
        first time it tracked a face. Here every pixel thread loads it once, before any stream."""
        from masquerade.face.detect import load_shape_predictor
        from masquerade.video import frames, tracking  # noqa: F401 (imported here, not on the first frame)

        started = time.perf_counter()
        try:
            detector = self._detector_for_live(engine)
            # The detector session's first run sizes its buffers.
            await engine.run_pixel_work(detector.find, np.zeros((720, 1280, 3), np.uint8), trim=False)
            await asyncio.gather(*map(asyncio.wrap_future, engine.on_every_pixel_thread(load_shape_predictor)))
            log.info("live video path warmed in %.1f s", time.perf_counter() - started)
        except asyncio.CancelledError:
            raise
        except Exception:  # a warm-up never stops the server: the first stream loads what is missing
            log.warning("warming the live video path failed; streams will load it as they go", exc_info=True)

    def limits(self) -> dict:
        """The video fields of GetServerInfo's Limits."""
        return {
            "max_video_bytes": self.config.max_video_bytes,
            "max_video_seconds": self.config.max_video_seconds,
            "max_video_pixels": self.config.max_video_pixels,
            "max_frame_window": self.config.max_frame_window,
            "max_video_streams": self.config.max_video_streams,
        }

    def _engine_for(self, method: et.Method) -> Engine:
        engine = self._ready_engine()
        if method is et.Method.REVERSE_PERSONALIZATION and engine.core is None:
            raise MethodUnavailableError(f"REVERSE_PERSONALIZATION is unavailable: {engine.unavailable_reason}")
        return engine

    @staticmethod
    def _cancel_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
        # As the servicer's: a client cancels when its deadline passes on its own clock, a little before
        # the server's copy of it, so a cancel that close to the deadline is the deadline.
        remaining = context.time_remaining()
        if remaining is not None and remaining <= DEADLINE_MARGIN_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED

    # ------------------------------------------------------------------ AnonymizeVideo

    @contextlib.contextmanager
    def video_call(self, rpc: str = "AnonymizeVideo") -> Iterator[SpoolEntry]:
        """One AnonymizeVideo call's slot (``--max-video-streams``) and spool entry: the slot is freed and the
        call's files deleted on exit, whatever ended the call. gRPC holds it for the handler; HTTP until its
        response has been sent."""
        with self._slots.take(rpc), self.spool.entry() as entry:
            yield entry

    async def _serve_call(
        self, rpc: str, context: grpc.aio.ServicerContext, serve: Callable[[AccessRecord], Awaitable[None]]
    ) -> None:
        """``serve(record)`` as one ``rpc`` call: its access record finished and its failure made the call's
        status, however it ends."""
        record = AccessRecord.from_context(rpc, context)
        failure: BaseException | None = None
        try:
            await serve(record)
        except asyncio.CancelledError:
            record.finish(self._cancel_code(context))
            raise
        except Exception as exc:
            failure = exc
        if failure is not None and context.cancelled():
            # A write failing because the client went away (cancel, deadline, a dropped connection).
            record.finish(self._cancel_code(context))
            return
        if failure is not None:
            code, details = _status(failure, record.request_id)
            record.finish(code)
            await context.abort(code, details, status_trailers(failure, code, details))
        record.finish(grpc.StatusCode.OK)

    async def anonymize_video(
        self, request_iterator: AsyncIterator[pb2.AnonymizeVideoRequest], context: grpc.aio.ServicerContext
    ) -> None:
        async def serve(record: AccessRecord) -> None:
            with self.video_call() as entry:
                await self._serve_video(request_iterator, context, record, entry)

        await self._serve_call("AnonymizeVideo", context, serve)

    async def _serve_video(
        self,
        request_iterator: AsyncIterator[pb2.AnonymizeVideoRequest],
        context: grpc.aio.ServicerContext,
        record: AccessRecord,
        entry: SpoolEntry,
    ) -> None:
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("part") != "start":
            raise InvalidRequestError(
                "start", "the first AnonymizeVideo message must carry `start` (the options), before any chunk"
            )
        start = first.start

        async def chunks() -> AsyncIterator[bytes]:
            offset = 0
            async for message in messages:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidRequestError(
                        "start", "only the first message may carry `start`; later ones carry `chunk`"
                    )
                chunk = message.chunk
                if chunk.offset != offset:
                    raise InvalidRequestError(
                        "chunk.offset",
                        f"expected {offset} (where the previous chunk ended), got {chunk.offset}: "
                        "chunks must be sent in order",
                    )
                offset += len(chunk.data)
                yield chunk.data

        async def send_progress(progress: pb2.VideoProgress) -> None:
            await context.write(pb2.AnonymizeVideoResponse(request_id=start.request_id, progress=progress))

        report = await self.run_video(start, chunks(), entry, record, context, on_progress=send_progress)
        await self._send_output(entry, context, start.request_id)
        await context.write(pb2.AnonymizeVideoResponse(request_id=start.request_id, report=report))

    async def run_video(
        self,
        start: pb2.VideoStart,
        upload: AsyncIterator[bytes],
        entry: SpoolEntry,
        record: AccessRecord,
        call,
        *,
        on_progress: Callable[[pb2.VideoProgress], Awaitable[None]] | None = None,
    ) -> pb2.VideoReport:
        """AnonymizeVideo's work, for gRPC and HTTP alike: checks ``start``, spools ``upload`` (the file's bytes,
        in order) into ``entry`` within the limits, runs the file pipeline and returns the report; the output
        is then at ``entry.output_path`` until the caller closes the entry. ``call`` is the gRPC context or
        anything with its ``time_remaining`` and ``auth_context`` (quotas by certificate). ``on_progress`` gets
        at most 10 VideoProgress a second. Cancelling this coroutine stops the pipeline."""
        from masquerade.video.pipeline import anonymize_video

        record.request_id = start.request_id[: convert.MAX_REQUEST_ID_CHARS]
        record.method = _method_label(start.method)
        options = self._video_options(start)
        engine = self._engine_for(options.method)
        self._admit(start.priority, call)
        filename = start.filename or "video.mp4"
        self._check_container(filename)
        if start.HasField("size_bytes"):
            entry.check_size(start.size_bytes)
        entry.open_input(filename)
        upload_started = time.perf_counter()
        async for data in upload:
            entry.append(data)
        entry.finish_input()
        record.durations_ms["upload"] = round((time.perf_counter() - upload_started) * 1000.0, 3)
        if start.HasField("size_bytes") and entry.input_bytes != start.size_bytes:
            raise InvalidRequestError(
                "chunk", f"the upload ended at {entry.input_bytes} bytes, but start.size_bytes said {start.size_bytes}"
            )
        if entry.input_bytes == 0:
            raise InvalidRequestError("chunk", "no video bytes were sent")

        processing_started = time.perf_counter()
        report = await self._run_pipeline(
            anonymize_video,
            entry,
            options,
            engine,
            on_progress,
            start.request_id,
            charge=lambda frames: self._count_frames(call, frames, refuse=False),
        )
        processing_seconds = time.perf_counter() - processing_started
        record.durations_ms["process"] = round(processing_seconds * 1000.0, 3)

        entry.charge_output()
        output_bytes = entry.output_path.stat().st_size
        metrics.VIDEO_FRAMES.labels("AnonymizeVideo").inc(report.frames)
        report_json = report.to_json()
        report_json["input"] = filename  # the client's name, never the spool's paths
        report_json.pop("output", None)
        record.faces = len(report_json.get("tracks", []))
        record.complete = bool(report_json.get("complete"))
        return self._report_to_proto(report_json, output_bytes, processing_seconds)

    def _video_options(self, start: pb2.VideoStart):
        from masquerade.video.container import EncodeOptions, VideoLimits
        from masquerade.video.pipeline import VideoOptions

        if len(start.request_id) > convert.MAX_REQUEST_ID_CHARS:
            raise InvalidRequestError("start.request_id", f"must be at most {convert.MAX_REQUEST_ID_CHARS} characters")
        info = self._ready_engine().info()
        method = convert.method_from_proto(start.method, info.default_method)
        defaults = self._ready_engine().front_end.defaults
        strength, detection = _cover_settings(start.detection, start.classical, info, defaults, "video")
        output = start.output
        encode = EncodeOptions(
            codec=output.codec or "h264",
            crf=output.crf if output.HasField("crf") else None,
            audio=not output.drop_audio,
            keep_metadata=output.keep_metadata,
        )
        return VideoOptions(
            method=method,
            params=convert.params_from_proto(start.params, info.defaults),
            classical_strength=strength,
            **detection,
            tracking=_tracking(start.tracking, live=False),
            encode=encode,
            limits=VideoLimits(max_seconds=self.config.max_video_seconds, max_pixels=self.config.max_video_pixels),
            report_frames=output.report_frames,
        )

    @staticmethod
    def _check_container(filename: str) -> None:
        from masquerade.video.container import VIDEO_SUFFIXES

        suffix = Path(filename).suffix.lower()
        if suffix not in VIDEO_SUFFIXES:
            raise InvalidRequestError(
                "start.filename",
                f"{suffix or 'no extension'} is not a supported container; use one of {', '.join(VIDEO_SUFFIXES)}",
            )

    async def _run_pipeline(
        self, anonymize_video, entry: SpoolEntry, options, engine, on_progress, request_id: str, *, charge=None
    ):
        """Runs the file pipeline while progress goes to ``on_progress`` (at most 10 a second, the newest one).
        ``charge(n)`` counts the frames decoded after the first (which the call's admission paid for) as they
        are decoded, against the caller's quota."""
        latest: list[tuple[int, int, int]] = []
        changed = asyncio.Event()
        started = time.perf_counter()
        stop = False
        charged = [1]

        def settle(frames_done: int) -> None:
            if charge is not None and frames_done > charged[0]:
                charge(frames_done - charged[0])
                charged[0] = frames_done

        def note_progress(frames_done: int, frames_total: int, tracks: int) -> None:
            latest[:] = [(frames_done, frames_total, tracks)]
            changed.set()

        task = asyncio.create_task(
            anonymize_video(
                entry.input_path,
                entry.output_path,
                options,
                engine=engine,
                progress=note_progress,
                cancelled=lambda: stop,
            ),
            name=f"video-{request_id}",
        )
        task.add_done_callback(lambda _: changed.set())
        try:
            while not task.done():
                await changed.wait()  # new progress, or the pipeline's end
                changed.clear()
                entry.charge_output()  # the encoder's partial file counts against the spool's budget
                if latest:
                    settle(latest[0][0])
                if on_progress is not None and latest and not task.done():
                    done, total, tracks = latest[0]
                    elapsed = time.perf_counter() - started
                    await on_progress(
                        pb2.VideoProgress(
                            frames_done=done,
                            frames_total=total,
                            fps=done / elapsed if elapsed > 0 else 0.0,
                            tracks=tracks,
                        )
                    )
                    await asyncio.sleep(PROGRESS_INTERVAL_S)
            report = task.result()
            settle(report.frames)
            return report
        finally:
            if latest:
                settle(latest[0][0])  # a failed or cancelled run still decoded these
            if not task.done():
                stop = True  # the pipeline polls it per frame; cancelling also wakes it from any await
                task.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(task), timeout=30)

    async def _send_output(self, entry: SpoolEntry, context, request_id: str) -> int:
        """Streams the output file in order; each write waits for gRPC flow control, so a client that
        does not read holds one chunk of the server's memory, not the file."""
        entry.charge_output()
        sent = 0
        with open(entry.output_path, "rb") as output:
            while data := await asyncio.to_thread(output.read, self.config.chunk_bytes):
                await context.write(
                    pb2.AnonymizeVideoResponse(request_id=request_id, output=pb2.VideoChunk(offset=sent, data=data))
                )
                sent += len(data)
        return sent

    @staticmethod
    def _report_to_proto(report: dict, output_bytes: int, processing_seconds: float) -> pb2.VideoReport:
        import json

        tracks = []
        for track in report.get("tracks", []):
            method = track.get("method_applied") or track.get("method") or ""
            status = track.get("status") or ""
            tracks.append(
                pb2.TrackRecord(
                    track_id=int(track.get("track_id", track.get("id", 0))),
                    first_frame=int(track.get("first_frame", 0)),
                    last_frame=int(track.get("last_frame", 0)),
                    frames_detected=int(track.get("frames_detected", 0)),
                    frames_filled=int(track.get("frames_filled", 0)),
                    method_applied=convert.METHOD_TO_PROTO.get(_enum(et.Method, method), pb2.METHOD_UNSPECIFIED),
                    status=convert.FACE_STATUS_TO_PROTO.get(_enum(et.FaceStatus, status), pb2.FACE_STATUS_UNSPECIFIED),
                    reason=str(track.get("reason", "")),
                )
            )
        return pb2.VideoReport(
            frames=int(report.get("frames", 0)),
            width=int(report.get("width", 0)),
            height=int(report.get("height", 0)),
            duration_seconds=float(report.get("duration_seconds", 0.0)),
            tracks=tracks,
            residual_recognisable=int(report.get("residual_recognisable", 0)),
            complete=bool(report.get("complete", False)),
            output_bytes=output_bytes,
            processing_seconds=processing_seconds,
            report_json=json.dumps(report, default=str),
            served_by=convert.process_id(),
        )

    # ------------------------------------------------------------------ AnonymizeFrames

    async def anonymize_frames(
        self, request_iterator: AsyncIterator[pb2.FrameRequest], context: grpc.aio.ServicerContext
    ) -> None:
        async def serve(record: AccessRecord) -> None:
            with self._slots.take("AnonymizeFrames"):
                await self._serve_frames(request_iterator, context, record)

        await self._serve_call("AnonymizeFrames", context, serve)

    async def _serve_frames(
        self, request_iterator: AsyncIterator[pb2.FrameRequest], context: grpc.aio.ServicerContext, record: AccessRecord
    ) -> None:
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None:
            return  # an empty stream: nothing to answer
        if not first.HasField("options"):
            raise InvalidRequestError("options", "the first AnonymizeFrames message must carry the stream's options")
        options = first.options
        record.request_id = options.stream_id[: convert.MAX_REQUEST_ID_CHARS]
        record.method = _method_label(options.method)
        priority = self._admit(options.priority, context)
        stream = self._live_stream(options, priority)
        window_size = (
            options.window if options.HasField("window") else min(DEFAULT_FRAME_WINDOW, self.config.max_frame_window)
        )
        if not 1 <= window_size <= self.config.max_frame_window:
            raise InvalidRequestError(
                "options.window",
                f"must be in [1, {self.config.max_frame_window}] (this server's limit), got {window_size}",
            )
        window = asyncio.Semaphore(window_size)
        # Bounded by the window: an entry is added only after a window slot is taken.
        in_order: asyncio.Queue = asyncio.Queue()

        async def read_frames() -> None:
            last_sequence = -1
            try:
                if first.WhichOneof("pixels") is not None:
                    pending = [first]
                else:
                    pending = []

                async def frames():
                    for message in pending:
                        yield message
                    async for message in messages:
                        yield message

                paid = 1  # the stream's admission paid for its first frame; every later one takes a request
                async for message in frames():
                    await window.acquire()
                    if paid:
                        paid -= 1
                    else:
                        self._count_frames(context, 1, refuse=True)  # QuotaExceededError ends the stream
                    if self._draining():
                        # A live stream has no end of its own: at a drain it ends here, after the frames
                        # already taken in, and the client reconnects (UNAVAILABLE is what clients retry).
                        raise StreamError(
                            grpc.StatusCode.UNAVAILABLE,
                            "the server is draining for shutdown; reconnect the stream (to another replica)",
                        )
                    received = time.perf_counter()
                    if message is not first and message.HasField("options"):
                        raise StreamError(
                            grpc.StatusCode.INVALID_ARGUMENT, "options: only the stream's first message may carry them"
                        )
                    if message.sequence <= last_sequence:
                        raise StreamError(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"sequence: must increase along the stream; got {message.sequence} after {last_sequence}",
                        )
                    last_sequence = message.sequence
                    in_order.put_nowait((message.sequence, message.timestamp, received, stream.submit(message)))
                in_order.put_nowait(None)
            except StreamError as error:
                in_order.put_nowait(error)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the request stream itself failed
                in_order.put_nowait(error)

        reader = asyncio.create_task(read_frames(), name="frames-reader")
        try:
            while (item := await in_order.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                sequence, timestamp, received, pending = item
                result = await pending
                result.sequence = sequence
                result.timestamp = timestamp
                latency = time.perf_counter() - received
                result.latency_seconds = latency
                await context.write(result)
                window.release()  # only now: gRPC has taken the result, so the slot's bytes have left
                metrics.VIDEO_FRAMES.labels("AnonymizeFrames").inc()
                metrics.FRAME_LATENCY_SECONDS.observe(latency)
            await reader
        finally:
            reader.cancel()
            stream.close()
            record.faces = stream.tracks_seen

    def _detector_for_live(self, engine: Engine):
        """The engine's detector at a bounded size: the coarse level at most ``live_detect_max_side`` and no
        fine tiles (those find faces of a few pixels in large photos at several times the cost), in an ONNX
        session of one thread: frames in flight are the parallelism, and a session spinning a thread per
        core against the pool's other work measured twice the CPU per 720p frame (docs/design.md section 8).
        Shared by every stream (FaceDetector is thread-safe)."""
        if not self.config.live_detect_max_side:
            return engine.front_end.detector
        if self._live_detector is None:
            from masquerade.engine.front_end import detector_model_dir
            from masquerade.face.detect import FaceDetector

            self._live_detector = FaceDetector(
                engine.front_end.detector.kind,
                model_dir=detector_model_dir(engine.config.models),
                max_side=self.config.live_detect_max_side,
                fine_pixels=0,
                intra_op_threads=1,
            )
        return self._live_detector

    def _live_stream(self, options: pb2.FrameStreamOptions, priority: Priority) -> LiveStream:
        info = self._ready_engine().info()
        method = convert.method_from_proto(options.method, info.default_method)
        engine = self._engine_for(method)
        defaults = engine.front_end.defaults
        strength, detection = _cover_settings(options.detection, options.classical, info, defaults, "frames")
        if options.format not in convert.FORMAT_FROM_PROTO:
            raise InvalidRequestError("options.format", f"unknown value {options.format}")
        quality = options.quality if options.HasField("quality") else 90
        if not 1 <= quality <= 100:
            raise InvalidRequestError("options.quality", f"must be in [1, 100], got {quality}")
        return LiveStream(
            engine,
            detector=self._detector_for_live(engine),
            method=method,
            params=convert.params_from_proto(options.params, info.defaults),
            strength=strength,
            **detection,
            tracking=_tracking(options.tracking, live=True),
            output_format=convert.FORMAT_FROM_PROTO[options.format],
            quality=quality,
            max_pixels=self.config.max_video_pixels,
            priority=priority,
        )


def _enum(enum_type, value: str):
    try:
        return enum_type(value)
    except ValueError:
        return None


class StreamClock:
    """One clock per live stream for its tracker. A frame's time is the client's capture timestamp where it
    sends one. A frame with none (proto3 cannot tell 0.0 from unset) comes ``1 / NOMINAL_FPS`` s after the
    frame before it, or at 0.0 if it is the stream's first: the time the server happens to read or track a
    frame follows the server's load and the client's window bursts, not the scene, and the tracker would
    move held boxes by it (a face walked out of its held box under load). Mixing in the server's own clock
    (monotonic seconds since boot) would send the tracker back or forward by hours between two frames."""

    NOMINAL_FPS = 30.0  # the unit the tracker's lost-track buffer counts in (file videos' default too)

    def __init__(self):
        self._last: float | None = None

    def __call__(self, stamp: float) -> float:
        if stamp > 0:
            self._last = stamp
        else:
            self._last = 0.0 if self._last is None else self._last + 1.0 / self.NOMINAL_FPS
        return self._last


@dataclass
class _DecodedFrame:
    rgb: np.ndarray
    format: str | None  # the encoded input's format; None for raw frames


class LiveStream:
    """One AnonymizeFrames stream: its tracker (forward only) and how its frames are covered.

    ``submit`` returns at once with a task for the frame's FrameResult (sequence, timestamp and
    latency are the caller's to set). Tracking runs one frame at a time in submission order; the
    decode before it and the cover and encode after it overlap across frames, on the engine's
    preprocess threads like every other request's pixel work.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        method: et.Method,
        params: et.ReversePersonalizationParams,
        strength: float,
        mask_scale: float,
        threshold: float,
        max_faces: int | None,
        tracking,
        output_format: str | None,
        quality: int,
        max_pixels: int,
        detector=None,
        priority: Priority = Priority.INTERACTIVE,
    ):
        from masquerade.video.frames import ClassicalFrameProcessor
        from masquerade.video.tracking import LiveFaceTracker

        self.engine = engine
        self.method = method
        self.output_format = output_format
        self.quality = quality
        self.max_pixels = max_pixels
        self.priority = priority  # the stream's turn in the engine's preprocess pool
        self.tracker = LiveFaceTracker(detector or engine.front_end.detector, tracking, threshold=threshold)
        if method.is_classical:
            self._classical = ClassicalFrameProcessor(method.value, strength, mask_scale)
            self._generative = None
            self._identities = None
        else:
            from masquerade.video.frames import EngineFrameProcessor, TrackIdentities

            self._classical = None
            self._generative = EngineFrameProcessor(engine, params, max_faces=max_faces, classical_strength=strength)
            self._identities = TrackIdentities.for_live()
        self._previous_tracked: asyncio.Future | None = None
        self._tasks: set[asyncio.Task] = set()
        self._track_ids: set[int] = set()
        self._closed = False
        self._clock = StreamClock()

    @property
    def tracks_seen(self) -> int:
        return len(self._track_ids)

    def submit(self, message: pb2.FrameRequest) -> asyncio.Task:
        loop = asyncio.get_running_loop()
        tracked_turn = loop.create_future()
        previous, self._previous_tracked = self._previous_tracked, tracked_turn
        task = asyncio.create_task(self._process(message, previous, tracked_turn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        self.engine.return_memory()

    async def _process(
        self, message: pb2.FrameRequest, previous: asyncio.Future | None, tracked_turn: asyncio.Future
    ) -> pb2.FrameResult:
        try:
            try:
                frame = await self._in_pool(self._decode, message)
            except InvalidRequestError as error:
                return pb2.FrameResult(
                    error=pb2.Error(code=code_number(grpc.StatusCode.INVALID_ARGUMENT), message=str(error))
                )
            if previous is not None:
                await asyncio.shield(previous)  # tracking follows the stream's order
            # The tracker moves held boxes by time: the client's capture time, else a nominal frame rate.
            timestamp = self._clock(float(message.timestamp))
            faces = await self._in_pool(self.tracker.track, frame.rgb, timestamp)
        finally:
            if not tracked_turn.done():
                tracked_turn.set_result(None)
        self._track_ids.update(face.track_id for face in faces.faces)
        if self._classical is not None:
            covered, outcomes = await self._in_pool(self._classical.cover, frame.rgb, faces)
        else:
            covered, outcomes = await self._generative.cover(frame.rgb, faces, self._identities)
        return await self._in_pool(self._result, message, frame, covered, faces, outcomes)

    async def _in_pool(self, fn, *args):
        # No heap trim per frame (engine.run_pixel_work): at 720p and 12 fps trims made every frame fault its
        # pages back in (17 ms/frame of kernel time, p99 308 -> 219 ms without); one trim when the stream ends.
        return await self.engine.run_pixel_work(fn, *args, priority=self.priority, trim=False)

    def _decode(self, message: pb2.FrameRequest) -> _DecodedFrame:
        from masquerade.face.image_io import decode_image

        kind = message.WhichOneof("pixels")
        if kind == "raw":
            raw = message.raw
            width, height = raw.width, raw.height
            if width < 1 or height < 1:
                raise InvalidRequestError("raw", f"width and height must be positive, got {width}x{height}")
            if width * height > self.max_pixels:
                raise InvalidRequestError(
                    "raw", f"{width}x{height} is over this server's limit of {self.max_pixels} pixels per frame"
                )
            if len(raw.rgb) != width * height * 3:
                raise InvalidRequestError(
                    "raw.rgb", f"holds {len(raw.rgb)} bytes; {width}x{height} RGB needs {width * height * 3}"
                )
            return _DecodedFrame(np.frombuffer(raw.rgb, np.uint8).reshape(height, width, 3), None)
        if kind == "encoded":
            decoded = decode_image(message.encoded, max_pixels=self.max_pixels)
            return _DecodedFrame(decoded.rgb, decoded.format)
        raise InvalidRequestError("pixels", "the frame carries no pixels; set `encoded` or `raw`")

    def _result(self, message, frame: _DecodedFrame, covered: np.ndarray, faces, outcomes) -> pb2.FrameResult:
        from masquerade.face.image_io import encode_image

        result = pb2.FrameResult(detector_ran=bool(faces.detector_ran))
        output_format = self.output_format or frame.format
        if output_format is None:
            height, width = covered.shape[:2]
            result.raw.CopyFrom(pb2.RawFrame(rgb=np.ascontiguousarray(covered).tobytes(), width=width, height=height))
        else:
            result.encoded = encode_image(covered, output_format, self.quality)
            result.format = convert.FORMAT_TO_PROTO[output_format]
        outcome_by_track = {outcome.track_id: outcome for outcome in outcomes}
        for face in faces.faces:
            outcome = outcome_by_track.get(face.track_id)
            if outcome is None:  # every face gets an outcome; if one did not, say so rather than guess
                method, status, reason = self.method, et.FaceStatus.SKIPPED, "no outcome for this face"
            else:
                method, status, reason = (
                    et.Method(outcome.method_applied),
                    et.FaceStatus(outcome.status),
                    outcome.reason,
                )
            result.faces.append(
                pb2.FrameFace(
                    track_id=int(face.track_id),
                    box=convert._box(face.box),
                    score=float(face.score),
                    detected=bool(face.detected),
                    method_applied=convert.METHOD_TO_PROTO[method],
                    status=convert.FACE_STATUS_TO_PROTO[status],
                    reason=reason,
                )
            )
        return result
