"""Video calls: ``AnonymizeVideo`` (a whole file, in chunks) and ``AnonymizeFrames`` (live frames).

Used through ``AnonymizerClient.anonymize_video`` and ``AnonymizerClient.stream_frames``; the
request builders here are public for callers that drive the stubs themselves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masquerade_client.fields import FORMATS, detection_fields, enum_value, set_fields
from masquerade_client.v1 import anonymizer_pb2 as pb2

DEFAULT_CHUNK_BYTES = 1024 * 1024
"""Upload chunk size: well under the 64 MiB message limit, large enough that per-message cost is noise."""

# ---------------------------------------------------------------- AnonymizeVideo


@dataclass
class VideoResult:
    """What AnonymizeVideo returned: the anonymized file, its tracks and the full report."""

    video: bytes = field(repr=False)
    tracks: list[pb2.TrackRecord]
    report: dict  # the per-video report (the document `masquerade anonymize` writes), parsed
    summary: pb2.VideoReport = field(repr=False)  # the report message itself (frames, complete, ...)

    @property
    def complete(self) -> bool:
        return self.summary.complete


def video_start(
    *,
    request_id: str = "",
    filename: str = "",
    size_bytes: int | None = None,
    method: int | str | None = None,
    strength: float | None = None,
    score_threshold: float | None = None,
    min_face_size: int | None = None,
    max_faces: int | None = None,
    detect_every: int | None = None,
    hold_frames: int | None = None,
    look_ahead_frames: int | None = None,
    codec: str | None = None,
    crf: int | None = None,
    keep_audio: bool = True,
    keep_metadata: bool = False,
    report_frames: bool = False,
    steps: int | None = None,
    seed: int | None = None,
    attribute_prompt: str | None = None,
    priority: int | str | None = None,
) -> pb2.VideoStart:
    """AnonymizeVideo's first message. Unset (None) options take the server's defaults; ``priority``:
    "interactive" | "bulk" (as ``build_request``'s)."""
    start = pb2.VideoStart(request_id=request_id, filename=filename)
    if size_bytes is not None:
        start.size_bytes = size_bytes
    set_fields(
        start,
        method=method,
        priority=priority,
        params={"steps": steps, "seed": seed, "attribute_prompt": attribute_prompt},
        classical={"strength": strength},
        detection=detection_fields(score_threshold=score_threshold, min_face_size=min_face_size, max_faces=max_faces),
        tracking={"detect_every": detect_every, "hold_frames": hold_frames, "look_ahead_frames": look_ahead_frames},
    )
    if codec:
        start.output.codec = codec
    if crf is not None:
        start.output.crf = crf
    start.output.drop_audio = not keep_audio
    start.output.keep_metadata = keep_metadata
    start.output.report_frames = report_frames
    return start


def video_requests(start: pb2.VideoStart, chunks: Iterable[bytes]) -> Iterator[pb2.AnonymizeVideoRequest]:
    """The upload stream: ``start``, then each chunk with its offset."""
    yield pb2.AnonymizeVideoRequest(start=start)
    offset = 0
    for data in chunks:
        if data:
            yield pb2.AnonymizeVideoRequest(chunk=pb2.VideoChunk(offset=offset, data=data))
            offset += len(data)


def file_chunks(path: str | os.PathLike, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """The file, read lazily: a large clip is never held in memory whole."""
    with open(path, "rb") as source:
        while data := source.read(chunk_bytes):
            yield data


def bytes_chunks(data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


def collect_video(
    responses: Iterable[pb2.AnonymizeVideoResponse],
    on_progress: Callable[[pb2.VideoProgress], None] | None = None,
    output: Any = None,
) -> VideoResult:
    """Reads AnonymizeVideo's answer: progress to ``on_progress``, the file (checked in order), the report.

    With ``output`` (a writable binary file), the file goes there and ``VideoResult.video`` is empty.
    """
    import io

    sink = output if output is not None else io.BytesIO()
    received = 0
    for response in responses:
        kind = response.WhichOneof("event")
        if kind == "progress":
            if on_progress is not None:
                on_progress(response.progress)
        elif kind == "output":
            if response.output.offset != received:
                raise RuntimeError(f"AnonymizeVideo: output chunk at {response.output.offset}, expected {received}")
            sink.write(response.output.data)
            received += len(response.output.data)
        elif kind == "report":
            report = response.report
            if report.output_bytes != received:
                raise RuntimeError(f"AnonymizeVideo: received {received} bytes, the report says {report.output_bytes}")
            video = sink.getvalue() if output is None else b""
            return VideoResult(
                video=video,
                tracks=list(report.tracks),
                report=json.loads(report.report_json) if report.report_json else {},
                summary=report,
            )
    raise RuntimeError("AnonymizeVideo: the stream ended without a report")


def video_source(data_or_path: bytes | str | os.PathLike, filename: str | None, chunk_bytes: int):
    """(chunks, size, filename) of bytes or a path."""
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        data = bytes(data_or_path)
        return bytes_chunks(data, chunk_bytes), len(data), filename or "video.mp4"
    path = Path(data_or_path)
    return file_chunks(path, chunk_bytes), path.stat().st_size, filename or path.name


# ---------------------------------------------------------------- AnonymizeFrames


@dataclass
class FrameOutput:
    """One live frame, covered. ``image`` is an HxWx3 uint8 RGB array (None when ``error`` is set)."""

    sequence: int
    timestamp: float
    image: Any
    faces: list[pb2.FrameFace]
    detector_ran: bool
    latency_seconds: float  # server-side: from reading the frame to handing its result to gRPC
    error: pb2.Error | None = None


def frame_options(
    *,
    stream_id: str = "",
    method: int | str | None = None,
    window: int | None = None,
    strength: float | None = None,
    score_threshold: float | None = None,
    min_face_size: int | None = None,
    max_faces: int | None = None,
    detect_every: int | None = None,
    hold_frames: int | None = None,
    output_format: int | str | None = None,
    quality: int | None = None,
    steps: int | None = None,
    seed: int | None = None,
    priority: int | str | None = None,
) -> pb2.FrameStreamOptions:
    """AnonymizeFrames' options (its first message). Unset (None) options take the server's defaults."""
    options = pb2.FrameStreamOptions(stream_id=stream_id)
    set_fields(
        options,
        method=method,
        priority=priority,
        params={"steps": steps, "seed": seed},
        classical={"strength": strength},
        detection=detection_fields(score_threshold=score_threshold, min_face_size=min_face_size, max_faces=max_faces),
        tracking={"detect_every": detect_every, "hold_frames": hold_frames},
    )
    if window is not None:
        options.window = window
    if output_format is not None:
        options.format = enum_value("output_format", output_format, FORMATS)
    if quality is not None:
        options.quality = quality
    return options


def raw_frame(image) -> pb2.RawFrame:
    """A numpy HxWx3 uint8 RGB array as a RawFrame."""
    import numpy as np

    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"frames must be HxWx3 uint8 RGB arrays, got {array.dtype} {array.shape}")
    height, width = array.shape[:2]
    return pb2.RawFrame(rgb=np.ascontiguousarray(array).tobytes(), width=width, height=height)


def frame_request(
    options: pb2.FrameStreamOptions, sequence: int, frame: Any, timestamp: float | None = None
) -> pb2.FrameRequest:
    """Frame ``sequence`` (a numpy array is sent raw; bytes as an encoded image); the options go on the first.

    ``frame`` may be a ``(frame, capture_time_s)`` pair. The time is the frame's capture time, which the
    tracker moves boxes by; a frame without one is sent unstamped (0), and the server places it 1/30 s after the one before.
    """
    if timestamp is None:
        frame, timestamp = frame if isinstance(frame, tuple) else (frame, 0.0)
    message = pb2.FrameRequest(sequence=sequence, timestamp=timestamp)
    if sequence == 0:
        message.options.CopyFrom(options)
    if isinstance(frame, (bytes, bytearray)):
        message.encoded = bytes(frame)
    else:
        message.raw.CopyFrom(raw_frame(frame))
    return message


def frame_requests(options: pb2.FrameStreamOptions, frames: Iterable[Any]) -> Iterator[pb2.FrameRequest]:
    """One FrameRequest per frame (or ``(frame, capture_time_s)`` pair), read from ``frames`` only as gRPC can
    send: never stamped with the time it is sent, which says nothing of when it was captured."""
    for sequence, frame in enumerate(frames):
        yield frame_request(options, sequence, frame)


def frame_output(result: pb2.FrameResult) -> FrameOutput:
    image = None
    kind = result.WhichOneof("pixels")
    if kind == "raw":
        import numpy as np

        raw = result.raw
        image = np.frombuffer(raw.rgb, np.uint8).reshape(raw.height, raw.width, 3)
    elif kind == "encoded":
        image = _decode(result.encoded)
    return FrameOutput(
        sequence=result.sequence,
        timestamp=result.timestamp,
        image=image,
        faces=list(result.faces),
        detector_ran=result.detector_ran,
        latency_seconds=result.latency_seconds,
        error=result.error if result.HasField("error") else None,
    )


def _decode(data: bytes):
    import io

    import numpy as np

    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - the encoded form is opt-in (output_format=...)
        raise RuntimeError("decoding encoded frames needs Pillow (pip install pillow)") from None
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))
