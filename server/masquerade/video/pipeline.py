"""A whole video file, anonymized: decode -> detect and track -> cover -> encode, frame by frame.

``anonymize_video`` is the one entry point (the CLI and the gRPC server both call it). Classical
methods take one pass, the whole loop in a worker thread. Reverse personalization takes two: the
first decodes, tracks and collects each track's ArcFace vectors (geometry and one vector sum per
track, no pixels kept), so that every track's identity is the mean over all its frames before the
first of them is generated; the second decodes again and sends each frame to the engine with its
tracked faces given, several frames in flight so their faces share UNet calls.

Frames held at once: the tracker's look-ahead window (look_ahead + 1), plus the frames in flight
(classical: DECODE_AHEAD decoded, 2 per detection worker, ENCODE_QUEUE encoding, CHECKS_QUEUED
original/output pairs self-checked beside the loop; reverse personalization: frames_in_flight at
the engine), plus one original/output pair per live track for its last-frame self-check. Never the
whole clip: memory is flat over clip length.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from masquerade.engine.request import Method, ReversePersonalizationParams
from masquerade.face.detect import DEFAULT_DETECTOR, DEFAULT_THRESHOLD, FaceDetector
from masquerade.video.container import (
    EncodeOptions,
    VideoError,
    VideoInfo,
    VideoLimits,
    VideoWriter,
    probe_video,
    read_frames,
    stored,
    upright,
)
from masquerade.video.frames import ClassicalFrameProcessor, FaceOutcome, TrackIdentities
from masquerade.video.report import ReportBuilder, TrackRecord
from masquerade.video.tracking import FrameFaces, TrackingOptions, WindowedFaceTracker

log = logging.getLogger(__name__)

# Frames decoded ahead of, and encoded behind, the classical loop: each is one more frame held.
DECODE_AHEAD = 2
ENCODE_QUEUE = 2
# Classical runs detect the next frames on this many workers (at most), each with its own one-thread
# ONNX session, while the loop tracks and covers the current one: one frame in flight per worker.
# The workers are process-wide (DetectorThreads): concurrent videos share them and their sessions.
MAX_DETECT_WORKERS = 4
# A worker's session keeps its arena for the largest frame it has served, up to this size (1080p:
# about 340 MB at ~160 bytes per pixel); larger frames give theirs back after each run.
VIDEO_ARENA_KEEP_LIMIT = 1920 * 1088
DETECT_AHEAD_PER_WORKER = 2
CHECKS_QUEUED = 2  # sampled self-checks waiting or running beside the loop, each holding its two frames
Progress = Callable[[int, int, int], None]  # (frames done, frames total or 0, tracks so far)


class VideoCancelled(Exception):
    """The caller's ``cancelled()`` said stop; nothing was left at the output path."""


@dataclass(frozen=True)
class VideoOptions:
    method: Method = Method.BLUR
    params: ReversePersonalizationParams = field(default_factory=ReversePersonalizationParams)
    classical_strength: float = 1.0
    mask_scale: float = 1.0
    detector: str = DEFAULT_DETECTOR
    threshold: float = DEFAULT_THRESHOLD
    max_faces: int | None = None  # faces per frame on the generative path; the rest fall back to blur
    tracking: TrackingOptions = field(default_factory=TrackingOptions)
    encode: EncodeOptions = field(default_factory=EncodeOptions)
    limits: VideoLimits = field(default_factory=VideoLimits)
    report_frames: bool = False
    self_check_every: int = 30  # self-check every N-th output frame plus each track's first and last; 0: off
    frames_in_flight: int = 8  # reverse personalization: frames submitted to the engine at once
    detect_workers: int | None = None  # classical: frames detected at once (None: the cores, at most 4; 0: inline;
    # never more than the process-wide detection threads, which every video shares)

    def __post_init__(self) -> None:
        from masquerade.errors import InvalidRequestError

        if self.self_check_every < 0:
            raise InvalidRequestError("self_check_every", f"must be >= 0, got {self.self_check_every}")
        if self.frames_in_flight < 1:
            raise InvalidRequestError("frames_in_flight", f"must be at least 1, got {self.frames_in_flight}")
        if self.detect_workers is not None and not 0 <= self.detect_workers <= 64:
            raise InvalidRequestError("detect_workers", f"must be in [0, 64], got {self.detect_workers}")


@dataclass
class VideoReport:
    input: str
    output: str
    frames: int
    width: int  # as displayed (rotation applied)
    height: int
    duration_seconds: float
    fps: float
    rotation: int
    method: str
    codec: str
    crf: int
    audio_packets_copied: int
    tracks: list[TrackRecord]
    residual_recognisable: int  # faces on the sampled output frames the self-check still recognised
    frames_checked: int
    uncovered_found: int  # faces the self-check found on sampled output frames that no track covered
    flicker: dict
    processing_seconds: float
    output_bytes: int
    tracking: dict
    frame_boxes: list[dict] | None = None

    @property
    def complete(self) -> bool:
        return (
            self.residual_recognisable == 0
            and self.uncovered_found == 0
            and all(track.status != "skipped" for track in self.tracks)
        )

    def to_json(self) -> dict:
        record = {
            "input": self.input,
            "output": self.output,
            "status": "anonymized",
            "kind": "video",
            "complete": self.complete,
            "frames": self.frames,
            "width": self.width,
            "height": self.height,
            "duration_seconds": round(self.duration_seconds, 4),
            "fps": round(self.fps, 4),
            "rotation": self.rotation,
            "method": self.method,
            "codec": self.codec,
            "crf": self.crf,
            "audio_packets_copied": self.audio_packets_copied,
            "tracks": [track.to_json() for track in self.tracks],
            "residual_recognisable": self.residual_recognisable,
            "frames_checked": self.frames_checked,
            "uncovered_found": self.uncovered_found,
            "flicker": self.flicker,
            "processing_seconds": round(self.processing_seconds, 3),
            "output_bytes": self.output_bytes,
            "tracking": self.tracking,
        }
        if self.frame_boxes is not None:
            record["frame_boxes"] = self.frame_boxes
        return record


async def anonymize_video(
    in_path: str | Path,
    out_path: str | Path,
    options: VideoOptions = VideoOptions(),
    *,
    engine=None,
    detector: FaceDetector | None = None,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> VideoReport:
    """Anonymize ``in_path`` into ``out_path`` (written atomically; nothing is left there on any error).

    ``engine`` (a started masquerade Engine) is needed for REVERSE_PERSONALIZATION only; its
    detector is reused when ``detector`` is None. ``progress`` is called on the event loop's thread.
    ``cancelled`` is polled once per frame from a worker thread (keep it a cheap, thread-safe check);
    cancelling the awaiting task stops the work too. Raises VideoError (bad input or output, naming
    the file and the problem), VideoCancelled, or MethodUnavailableError.
    """
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    stop = threading.Event()

    def should_stop() -> bool:
        return stop.is_set() or (cancelled is not None and cancelled())

    def report_progress(done: int, total: int, tracks: int) -> None:
        if progress is not None:
            loop.call_soon_threadsafe(progress, done, total, tracks)

    if detector is None:
        detector = engine.front_end.detector if engine is not None else FaceDetector(options.detector)
    run = _Run(Path(in_path), Path(out_path), options, detector, should_stop, report_progress)
    try:
        if options.method is Method.REVERSE_PERSONALIZATION:
            if engine is None or engine.core is None:
                from masquerade.errors import MethodUnavailableError

                raise MethodUnavailableError("REVERSE_PERSONALIZATION on video needs an engine with its models loaded")
            await run.reverse_personalization(engine)
        else:
            await asyncio.to_thread(run.classical)
    except asyncio.CancelledError:
        stop.set()
        raise
    return run.report(time.perf_counter() - started)


class _Run:
    """One video's state: the reader, tracker, writer and report builder, for one call."""

    def __init__(self, source: Path, target: Path, options: VideoOptions, detector, should_stop, progress):
        self.source, self.target, self.options = source, target, options
        self.detector = detector
        self.should_stop = should_stop
        self.progress = progress
        self.builder = ReportBuilder(options.report_frames)
        self.info: VideoInfo | None = None
        self.writer: VideoWriter | None = None
        self.frames_done = 0
        self.seeds: dict[int, int] | None = None
        self._checked: set[int] = set()  # frame indices already self-checked
        self._last_seen: dict[int, tuple[int, np.ndarray, np.ndarray, FrameFaces]] = {}
        # Classical runs encode on their own thread, overlapping detection (FFmpeg releases the GIL).
        self._encoder: ThreadPoolExecutor | None = None
        self._encoding: deque[Future] = deque()
        # The sampled self-check runs on the process-wide check threads, so detection and covering go on meanwhile.
        self._checks: deque[Future] = deque()

    # ---- shared pieces ---------------------------------------------------------------

    def _open(self) -> None:
        if self.source.resolve() == self.target.resolve():
            raise VideoError(self.target, "would replace its own input")
        self.info = probe_video(self.source, self.options.limits)
        self.writer = VideoWriter(self.target, self.info, self.options.encode)

    def _tracker(self) -> WindowedFaceTracker:
        return WindowedFaceTracker(
            self.detector, self.options.tracking, threshold=self.options.threshold, frame_rate=self.info.fps
        )

    def _check_stop(self) -> None:
        if self.should_stop():
            raise VideoCancelled(f"{self.source.name}: cancelled")

    def _emit(self, pts: int, original: np.ndarray, output: np.ndarray, frame: FrameFaces, outcomes) -> None:
        """A finished frame: self-check if sampled, report, encode (rotated back), progress."""
        self._self_check_sampled(original, output, frame)
        self.builder.add(frame, outcomes, original, output, self.seeds)
        self._write(stored(output, self.info.rotation), pts)
        self.frames_done += 1
        self.progress(self.frames_done, self.info.frames, len(self.builder.tracks))

    def _write(self, rgb: np.ndarray, pts: int) -> None:
        if self._encoder is None:
            self.writer.write(rgb, pts)
            return
        self._encoding.append(self._encoder.submit(self.writer.write, rgb, pts))
        while len(self._encoding) > ENCODE_QUEUE or (self._encoding and self._encoding[0].done()):
            self._encoding.popleft().result()  # in order; an encoder error surfaces here

    def _stop_encoder(self) -> None:
        """Every queued frame written (or dropped on an error) and the encoder thread gone."""
        if self._encoder is not None:
            self._encoder.shutdown(wait=True)
            self._encoder = None
            pending, self._encoding = self._encoding, deque()
            for future in pending:
                future.result()

    def _stop_checks(self, collect: bool = True) -> None:
        """Every queued self-check done and counted (``collect``; else cancelled or waited for, uncounted)."""
        pending, self._checks = self._checks, deque()
        if collect:
            for future in pending:
                self._count_check(future.result())
        else:
            _cancel_and_wait(pending)

    def _finish(self) -> None:
        for track_id in list(self._last_seen):
            self._check_last(track_id)
        self._stop_checks()
        self._stop_encoder()
        self.writer.finish()

    # ---- the sampled self-check --------------------------------------------------------

    def _self_check_sampled(self, original: np.ndarray, output: np.ndarray, frame: FrameFaces) -> None:
        every = self.options.self_check_every
        if not every:
            return
        first_of_a_track = any(face.track_id not in self.builder.tracks for face in frame.faces)
        if frame.index % every == 0 or first_of_a_track:
            self._self_check(original, output, frame)
        # Each track's last frame: the latest frame it appeared on, checked once it is gone.
        present = {face.track_id for face in frame.faces}
        for face in frame.faces:
            self._last_seen[face.track_id] = (frame.index, original, output, frame)
        gone_after = self.options.tracking.hold_frames + self.options.tracking.look_ahead
        for track_id, (index, *_rest) in list(self._last_seen.items()):
            if track_id not in present and frame.index - index > gone_after:
                self._check_last(track_id)

    def _check_last(self, track_id: int) -> None:
        index, original, output, frame = self._last_seen.pop(track_id)
        if self.options.self_check_every and index not in self._checked:
            self._self_check(original, output, frame)

    def _self_check(self, original: np.ndarray, output: np.ndarray, frame: FrameFaces) -> None:
        """Queue the frame's check (at most CHECKS_QUEUED at once: each holds its two frames); count those done."""
        if frame.index in self._checked:
            return
        self._checked.add(frame.index)
        if not _CHECK_THREADS.available:
            return
        self._checks.append(_CHECK_THREADS.submit(self._check_frame, original, output, frame))
        while len(self._checks) > CHECKS_QUEUED or (self._checks and self._checks[0].done()):
            self._count_check(self._checks.popleft().result())

    def _check_frame(self, original: np.ndarray, output: np.ndarray, frame: FrameFaces):
        """(faces still recognisable, faces found that no track covered) on one frame, or None if it failed.
        Runs on a check thread, with that thread's own checker (its one-thread detector session)."""
        checker = _CHECK_THREADS.checker(self.detector)
        if checker is None:
            return None
        faces = [(face.box, face.landmarks) for face in frame.faces]
        try:
            originals = checker.describe_originals(original, faces)
            # Given the original, the detector looks again only around the pixels the covers changed.
            verdict = checker.inspect(output, faces, originals, self.options.threshold, original=original)
        except Exception:
            log.exception("self-check failed on frame %d of %s", frame.index, self.source.name)
            return None
        return len(verdict.recognisable), len(verdict.new_faces)

    def _count_check(self, counts: tuple[int, int] | None) -> None:
        if counts is not None:
            self.builder.frames_checked += 1
            self.builder.residual_recognisable += counts[0]
            self.builder.uncovered_found += counts[1]

    # ---- classical: one pass, in a worker thread ------------------------------------------

    def classical(self) -> None:
        options = self.options
        self._open()
        try:
            processor = ClassicalFrameProcessor(options.method.value, options.classical_strength, options.mask_scale)
            tracker = self._tracker()
            rotation = self.info.rotation

            def emit(released) -> None:
                for (pts, original), frame in released:
                    output, outcomes = processor.cover(original, frame)
                    self._emit(pts, original, output, frame, outcomes)

            self._encoder = ThreadPoolExecutor(1, thread_name_prefix="masquerade-video-encode")
            ahead = _DetectionAhead(self.detector, tracker.live, self._detect_workers(), self.info)
            waiting: deque[tuple[object, np.ndarray, Future | None]] = deque()

            def track_next() -> None:
                decoded, rgb, found = waiting.popleft()
                emit(
                    tracker.push((decoded.pts, rgb), rgb, decoded.timestamp, None if found is None else found.result())
                )

            try:
                with ThreadPoolExecutor(1, thread_name_prefix="masquerade-video-decode") as decoder:
                    for index, decoded in enumerate(_prefetched(read_frames(self.info, options.limits), decoder)):
                        self._check_stop()
                        rgb = upright(decoded.rgb, rotation)
                        waiting.append((decoded, rgb, ahead.submit(rgb, index)))
                        while len(waiting) > ahead.depth:
                            track_next()
                while waiting:
                    track_next()
            finally:
                ahead.close()
            emit(tracker.flush())
            self._finish()
        except BaseException:
            try:
                self._stop_checks(collect=False)
                self._stop_encoder()
            except Exception:
                pass  # the error that stopped the run is the one to report
            self.writer.abort()
            raise

    def _detect_workers(self) -> int:
        if self.options.detect_workers is not None:
            return self.options.detect_workers
        return max(1, min(os.cpu_count() or 1, MAX_DETECT_WORKERS))

    # ---- reverse personalization: two passes --------------------------------------------

    async def reverse_personalization(self, engine) -> None:
        await asyncio.to_thread(self._open)
        try:
            frames, identities = await asyncio.to_thread(self._analyse, engine)
            await self._generate(engine, frames, identities)
            await asyncio.to_thread(self._finish)
        except BaseException:
            await asyncio.to_thread(self._stop_checks, False)
            await asyncio.to_thread(self.writer.abort)
            raise

    def _analyse(self, engine) -> tuple[list[FrameFaces], TrackIdentities]:
        """Pass 1: track every face and sum each track's ArcFace vectors (its detected frames)."""
        from masquerade.face.align import arcface_crop, arcface_five_points

        tracker = self._tracker()
        identities = TrackIdentities()
        frames: list[FrameFaces] = []

        def keep(released) -> None:
            for _payload, frame in released:
                frames.append(frame)

        for decoded in read_frames(self.info, self.options.limits):
            self._check_stop()
            rgb = upright(decoded.rgb, self.info.rotation)
            released = tracker.push(None, rgb, decoded.timestamp)
            detected = [f for f in tracker.latest.faces if f.detected and f.landmarks.shape == (68, 2)]
            if detected:
                crops = np.stack([arcface_crop(rgb, arcface_five_points(face.landmarks)) for face in detected])
                for face, vector in zip(detected, engine.core.embed_identity(crops)):
                    identities.add(face.track_id, np.asarray(vector, np.float32))
            keep(released)
        keep(tracker.flush())
        return frames, identities

    async def _generate(self, engine, frames: list[FrameFaces], identities: TrackIdentities) -> None:
        """Pass 2: every frame through the engine with its tracks' identities and seeds, in order."""
        from masquerade.video.frames import EngineFrameProcessor

        options = self.options
        processor = EngineFrameProcessor(
            engine,
            options.params,
            max_faces=options.max_faces,
            classical_strength=options.classical_strength,
            request_prefix=self.source.name,
        )
        self.seeds = {track_id: processor.seed_for(track_id) for frame in frames for track_id in _ids(frame)}
        reader = read_frames(self.info, options.limits)
        in_flight: deque[tuple[int, np.ndarray, FrameFaces, asyncio.Task]] = deque()

        async def drain(limit: int) -> None:
            while len(in_flight) > limit:
                pts, original, frame, task = in_flight.popleft()
                output, outcomes = await task
                await asyncio.to_thread(self._emit, pts, original, output, frame, outcomes)

        try:
            for frame in frames:
                decoded = await asyncio.to_thread(next, reader, None)
                if decoded is None:
                    raise VideoError(self.source, "decoded to fewer frames on the second pass")
                self._check_stop()
                rgb = upright(decoded.rgb, self.info.rotation)
                task = asyncio.ensure_future(processor.cover(rgb, frame, identities))
                in_flight.append((decoded.pts, rgb, frame, task))
                await drain(options.frames_in_flight - 1)
            await drain(0)
        finally:
            for *_rest, task in in_flight:
                task.cancel()
            reader.close()

    # ---- the report ------------------------------------------------------------------------

    def report(self, seconds: float) -> VideoReport:
        info, options = self.info, self.options
        sideways = info.rotation in (90, 270)
        return VideoReport(
            input=str(self.source),
            output=str(self.target),
            frames=self.frames_done,
            width=info.height if sideways else info.width,
            height=info.width if sideways else info.height,
            duration_seconds=info.duration_seconds,
            fps=info.fps,
            rotation=info.rotation,
            method=options.method.value,
            codec=options.encode.codec,
            crf=options.encode.effective_crf,
            audio_packets_copied=self.writer.audio_packets,
            tracks=self.builder.finish_tracks(),
            residual_recognisable=self.builder.residual_recognisable,
            frames_checked=self.builder.frames_checked,
            uncovered_found=self.builder.uncovered_found,
            flicker=self.builder.flicker_summary(),
            processing_seconds=seconds,
            output_bytes=self.target.stat().st_size,
            tracking={
                "detect_every": options.tracking.detect_every,
                "track_hold": options.tracking.hold_frames,
                "look_ahead": options.tracking.look_ahead,
            },
            frame_boxes=self.builder.frames,
        )


class DetectorThreads:
    """A bounded set of threads, shared by every video in the process, each with its own one-thread
    CenterFace session (and, dlib's models being per thread, its own landmark and descriptor models).

    Detector memory is thus bounded by ``size``, not by the number of calls: N concurrent videos queue
    their frames on the same ``size`` threads and never create a session of their own. A thread's
    session is made on its first run for a detector's settings and kept while they stay the same
    (other settings replace it: at most one per thread); its arena is kept for the largest frame it
    has served, up to VIDEO_ARENA_KEEP_LIMIT. Other detector kinds run on the given detector (its
    sessions are shared and thread-safe, or per thread).
    """

    def __init__(self, size: int, name: str):
        self.size = max(1, int(size))
        self._name = name
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self.sessions_made = 0  # one-thread sessions constructed so far (<= size while settings stay the same)
        self.available = True  # False once a thread could not make what it needs (e.g. no dlib): callers skip

    def submit(self, fn, *args) -> Future:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.size, thread_name_prefix=self._name)
            return self._pool.submit(fn, *args)

    def detector(self, like: FaceDetector, arena_pixels: int = 0) -> FaceDetector:
        """This thread's one-thread session with ``like``'s settings, keeping its arena for ``arena_pixels``."""
        if like.kind != "centerface":
            return like
        key = _settings(like)
        held = getattr(self._local, "held", None)
        if held is None or held[0] != key:
            self._local.held = None  # the old session goes before the new one is made
            own = FaceDetector(
                "centerface",
                max_side=like.max_side,
                fine_pixels=like.fine_pixels,
                max_upscale=like.max_upscale,
                detect_scale=like.detect_scale,
                intra_op_threads=1,
            )
            with self._lock:
                self.sessions_made += 1
            held = self._local.held = (key, own, {})
        backend = held[1].backend
        backend.arena_keep_pixels = max(backend.arena_keep_pixels, min(int(arena_pixels), VIDEO_ARENA_KEEP_LIMIT))
        return held[1]

    def checker(self, like: FaceDetector):
        """This thread's SelfCheck on its own session, or None (and ``available`` False) without dlib."""
        try:
            from masquerade.face.selfcheck import SelfCheck

            if like.kind != "centerface":
                return SelfCheck(like)  # on the given detector's own (shared or per-thread) sessions
            detector = self.detector(like)
            extras = self._local.held[2]
            if "checker" not in extras:
                extras["checker"] = SelfCheck(detector)
            return extras["checker"]
        except Exception:
            if self.available:
                log.warning("dlib verifier unavailable: the video self-check is off", exc_info=True)
            self.available = False
            return None


def _settings(detector: FaceDetector) -> tuple:
    return (detector.kind, detector.max_side, detector.fine_pixels, detector.max_upscale, detector.detect_scale)


def _cancel_and_wait(futures) -> None:
    """Queued ones cancelled, running ones finished (their errors dropped: the caller is already failing)."""
    futures = list(futures)
    for future in futures:
        future.cancel()
    for future in futures:
        if not future.cancelled():
            try:
                future.result()
            except BaseException:
                pass


_DETECT_THREADS = DetectorThreads(min(os.cpu_count() or 1, MAX_DETECT_WORKERS), "masquerade-video-detect")
# Self-checks: one thread for the process (one per video before). dlib's descriptor holds the GIL, so a
# second thread added ~300 MB (its session and dlib models) and no speed: 6 concurrent 720p calls on 2
# cores took 24.5 s with one check thread and 22.7 s with two.
_CHECK_THREADS = DetectorThreads(1, "masquerade-video-selfcheck")


class _DetectionAhead:
    """The next frames' detector runs, on up to ``workers`` of the shared DetectorThreads while the loop
    tracks and covers earlier frames.

    Each worker thread runs a one-thread session: frames in flight are the parallelism, which costs less
    CPU per frame than one session's threads working on one frame at a time (and spinning between runs
    while decode, cover and encode want the cores).
    """

    def __init__(self, detector: FaceDetector, tracker, workers: int, info: VideoInfo, threads=None):
        self.detector, self.tracker = detector, tracker
        self.threads = threads or _DETECT_THREADS
        self.workers = min(int(workers), self.threads.size)
        self.depth = self.workers * DETECT_AHEAD_PER_WORKER  # frames submitted and not yet tracked
        self._arena_pixels = (-(-info.width // 32) * 32) * (-(-info.height // 32) * 32)
        self._submitted: deque[Future] = deque()

    def submit(self, rgb: np.ndarray, index: int) -> Future | None:
        """A future of frame ``index``'s raw faces, or None (no run on this frame, or no workers: inline)."""
        if not self.workers or not self.tracker.runs_detector(index):
            return None
        while self._submitted and self._submitted[0].done():
            self._submitted.popleft()
        future = self.threads.submit(self._find, rgb, index)
        self._submitted.append(future)
        return future

    def _find(self, rgb: np.ndarray, index: int):
        return self.tracker.find(rgb, index, self.threads.detector(self.detector, self._arena_pixels))

    def close(self) -> None:
        _cancel_and_wait(self._submitted)
        self._submitted.clear()


def _prefetched(frames, pool: ThreadPoolExecutor, depth: int = DECODE_AHEAD):
    """``frames`` decoded ``depth`` frames ahead on ``pool``'s one thread (FFmpeg releases the GIL)."""
    pending = deque(pool.submit(next, frames, None) for _ in range(depth))
    try:
        while True:
            item = pending.popleft().result()
            if item is None:
                return
            pending.append(pool.submit(next, frames, None))
            yield item
    finally:
        for future in pending:
            future.cancel()
        for future in pending:
            if not future.cancelled():
                try:
                    future.result()
                except Exception:
                    pass
        frames.close()


def _ids(frame: FrameFaces) -> list[int]:
    return [face.track_id for face in frame.faces]


__all__ = ["FaceOutcome", "VideoCancelled", "VideoOptions", "VideoReport", "anonymize_video"]
