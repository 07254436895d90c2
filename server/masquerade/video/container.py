"""Video containers through PyAV (FFmpeg's libraries, bundled in its wheel; no system ffmpeg).

Knows containers, streams, packets and frames; never faces. Reading checks the
limits from the header before any frame is decoded and again while decoding
(a header can lie). Writing goes to a hidden partial file beside the target
and is renamed into place only when the last packet is written, so a failed or
cancelled run leaves no output. Audio packets are copied as they are (never
decoded or re-encoded), interleaved with the video by time.

Metadata rule, the same as for images: by default nothing of the input's
container or stream tags is written (title, device, creation time, location,
encoder), and the muxer runs bit-exact so it adds no encoder tag of its own;
``keep_metadata`` keeps every tag except location ones.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from masquerade.errors import InvalidRequestError

if TYPE_CHECKING:
    from fractions import Fraction  # imported where used: the CLI builds its flags from this module

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
# Our codec names -> FFmpeg encoders in PyAV's wheel.
ENCODERS = {"h264": "libx264", "hevc": "libx265", "vp9": "libvpx-vp9", "av1": "libsvtav1"}
DEFAULT_CRF = {"h264": 20, "hevc": 24, "vp9": 32, "av1": 32}
CRF_RANGE = {"h264": (0, 51), "hevc": (0, 51), "vp9": (0, 63), "av1": (0, 63)}
# Output container by suffix, and the codecs each can hold.
_MUXERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}
_CODECS_IN = {
    ".mp4": ("h264", "hevc", "vp9", "av1"),
    ".mov": ("h264", "hevc"),
    ".mkv": ("h264", "hevc", "vp9", "av1"),
    ".webm": ("vp9", "av1"),
    ".avi": ("h264",),
}
# Tags never kept, even with keep_metadata (matched as substrings of the lower-cased key).
LOCATION_TAGS = ("location", "gps", "xyz", "geo")


class VideoError(InvalidRequestError):
    """A video that cannot be read or written as asked; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__("video", f"{Path(path).name}: {problem}")
        self.path = str(path)


@dataclass(frozen=True)
class VideoLimits:
    """What a video may cost; checked from the header and again while decoding."""

    max_seconds: float = 600.0
    max_pixels: int = 3840 * 2160  # per frame: 4K UHD; an 8K clip is refused before any frame is decoded

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise ValueError(f"max_seconds must be a positive number, got {self.max_seconds!r}")
        if self.max_pixels < 64 * 64:
            raise ValueError(f"max_pixels must be at least 4096, got {self.max_pixels!r}")


@dataclass(frozen=True)
class EncodeOptions:
    codec: str = "h264"
    crf: int | None = None  # None: DEFAULT_CRF[codec]
    audio: bool = True  # copy the audio streams packet for packet
    keep_metadata: bool = False  # keep container/stream tags, except location ones

    def __post_init__(self) -> None:
        if self.codec not in ENCODERS:
            raise InvalidRequestError("output.codec", f"must be one of {', '.join(ENCODERS)}, got {self.codec!r}")
        if self.crf is not None:
            low, high = CRF_RANGE[self.codec]
            if not low <= int(self.crf) <= high:
                raise InvalidRequestError("output.crf", f"must be in [{low}, {high}] for {self.codec}, got {self.crf}")

    @property
    def effective_crf(self) -> int:
        return DEFAULT_CRF[self.codec] if self.crf is None else int(self.crf)


@dataclass(frozen=True)
class VideoInfo:
    path: str
    format: str  # the demuxer's name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    codec: str
    width: int  # stored size (before rotation)
    height: int
    frames: int  # from the header; 0 when it does not say
    duration_seconds: float  # 0 when unknown
    fps: float  # average frame rate
    rotation: int  # display rotation in degrees, counter-clockwise (0, 90, 180, 270)
    audio_streams: int
    time_base: Fraction = field(repr=False)
    start_pts: int = field(default=0, repr=False)


def _av():
    import av  # deferred: only video work needs FFmpeg's libraries

    return av


def _problem(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.split(": '", 1)[0]  # PyAV appends the file name, which the VideoError already names


def probe_video(path: str | Path, limits: VideoLimits = VideoLimits()) -> VideoInfo:
    """Open ``path``, check it against ``limits`` and decode its first frame; raises VideoError."""
    av = _av()
    path = Path(path)
    if not path.is_file():
        raise VideoError(path, "no such file")
    if path.stat().st_size == 0:
        raise VideoError(path, "is empty (0 bytes)")
    try:
        container = av.open(str(path))
    except av.FFmpegError as error:
        raise VideoError(path, f"is not a readable video file ({_problem(error)})") from None
    with container:
        if not container.streams.video:
            raise VideoError(path, "has no video stream")
        stream = container.streams.video[0]
        context = stream.codec_context
        if context is None or context.name in (None, "", "none"):
            raise VideoError(path, "its video codec is not supported by this build")
        width, height = int(context.width or 0), int(context.height or 0)
        if width <= 0 or height <= 0:
            raise VideoError(path, f"its video stream has no frame size ({width}x{height})")
        if width * height > limits.max_pixels:
            raise VideoError(
                path,
                f"frames are {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels} "
                "(--max-video-pixels); downscale the video first",
            )
        from fractions import Fraction

        time_base = stream.time_base or Fraction(1, 90000)
        duration = 0.0
        if stream.duration is not None:
            duration = float(stream.duration * time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        if duration > limits.max_seconds:
            raise VideoError(
                path, f"is {duration:.1f} s long, over the limit of {limits.max_seconds:g} s (--max-video-seconds)"
            )
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        first = None
        try:
            for frame in container.decode(stream):
                first = frame
                break
        except av.FFmpegError as error:
            raise VideoError(path, f"its first video frame cannot be decoded ({_problem(error)})") from None
        if first is None:
            raise VideoError(path, "its video stream decodes to no frames")
        return VideoInfo(
            path=str(path),
            format=container.format.name,
            codec=context.name,
            width=width,
            height=height,
            frames=int(stream.frames or 0),
            duration_seconds=duration,
            fps=fps if fps > 0 else 25.0,
            rotation=_rotation(first),
            audio_streams=len(container.streams.audio),
            time_base=time_base,
            start_pts=int(stream.start_time or 0),
        )


def _rotation(frame) -> int:
    try:
        degrees = float(frame.rotation or 0)
    except (AttributeError, TypeError, ValueError):
        return 0
    return int(round(degrees / 90.0)) % 4 * 90


@dataclass
class DecodedFrame:
    index: int
    rgb: np.ndarray = field(repr=False)  # [H, W, 3] uint8, as stored (rotation not applied)
    pts: int  # in VideoInfo.time_base; strictly increasing along the clip
    timestamp: float  # seconds from the stream's start


def read_frames(info: VideoInfo, limits: VideoLimits = VideoLimits()) -> Iterator[DecodedFrame]:
    """Every frame of ``info``'s video stream in presentation order; raises VideoError for a corrupt or
    truncated stream, or one past the limits. A frame without a timestamp gets the previous one plus
    one frame at the average rate; a repeated timestamp is nudged forward so the output keeps every frame."""
    av = _av()
    path = Path(info.path)
    step = max(int(round(1.0 / (info.fps * float(info.time_base)))), 1) if info.fps > 0 else 1
    index = 0
    previous: int | None = None
    try:
        container = av.open(str(path))
    except av.FFmpegError as error:
        raise VideoError(path, f"is not a readable video file ({_problem(error)})") from None
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if frame.width * frame.height > limits.max_pixels:
                    raise VideoError(path, f"frame {index} is {frame.width}x{frame.height}, over the pixel limit")
                pts = frame.pts if frame.pts is not None else (0 if previous is None else previous + step)
                if previous is not None and pts <= previous:
                    pts = previous + 1
                timestamp = float((pts - info.start_pts) * info.time_base)
                if timestamp > limits.max_seconds:
                    raise VideoError(
                        path, f"runs past the limit of {limits.max_seconds:g} s (--max-video-seconds) at frame {index}"
                    )
                yield DecodedFrame(index, frame.to_ndarray(format="rgb24"), int(pts), timestamp)
                previous = pts
                index += 1
        except av.FFmpegError as error:
            raise VideoError(path, f"is corrupt or truncated at frame {index} ({_problem(error)})") from None
    if index == 0:
        raise VideoError(path, "its video stream decodes to no frames")
    if info.frames and index < info.frames:
        raise VideoError(path, f"is truncated: its header lists {info.frames} frames, only {index} decode")


def upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """The frame as it is displayed (faces are found upright); ``stored`` undoes it exactly."""
    return np.rot90(rgb, k=rotation // 90) if rotation else rgb


def stored(rgb: np.ndarray, rotation: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(rgb, k=-(rotation // 90))) if rotation else rgb


def kept_tags(tags: dict[str, str]) -> dict[str, str]:
    """--keep-metadata: every tag except location ones (the image rule)."""
    return {key: value for key, value in tags.items() if not any(word in key.lower() for word in LOCATION_TAGS)}


class VideoWriter:
    """Encodes frames to ``target`` (atomically) with the source's timestamps, rotation flag and audio packets.

    Call ``write`` for every frame in order, then ``finish``; ``abort`` (or an exception inside a
    ``with`` block) removes the partial file.
    """

    def __init__(self, target: str | Path, info: VideoInfo, options: EncodeOptions = EncodeOptions()):
        av = _av()
        self.target = Path(target)
        suffix = self.target.suffix.lower()
        if suffix not in _MUXERS:
            raise VideoError(self.target, f"output must end in one of {', '.join(VIDEO_SUFFIXES)}")
        if options.codec not in _CODECS_IN[suffix]:
            raise VideoError(
                self.target, f"a {suffix} file cannot hold {options.codec}; use one of {', '.join(_CODECS_IN[suffix])}"
            )
        if ENCODERS[options.codec] not in av.codecs_available:
            raise VideoError(self.target, f"this build has no {options.codec} encoder ({ENCODERS[options.codec]})")
        self.info = info
        self.options = options
        self.frames_written = 0
        self.audio_packets = 0
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.target.with_name(f".{self.target.name}.partial")
        container_options = {} if options.keep_metadata else {"fflags": "+bitexact"}
        self._out = av.open(str(self.partial), "w", format=_MUXERS[suffix], container_options=container_options)
        self._source = None
        try:
            self._video = self._add_video_stream()
            self._audio: dict[int, object] = {}
            self._audio_packets = iter(())
            self._pending_audio = None
            self._source = av.open(info.path)
            if options.keep_metadata:
                self._out.metadata.update(kept_tags(dict(self._source.metadata)))
                self._video.metadata.update(kept_tags(dict(self._source.streams.video[0].metadata)))
            if options.audio and self._source.streams.audio:
                self._add_audio_streams(suffix)
        except BaseException:
            self.abort()
            raise

    def _add_video_stream(self):
        from fractions import Fraction

        info, options = self.info, self.options
        rate = Fraction(info.fps).limit_denominator(1001) if info.fps > 0 else Fraction(25)
        stream = self._out.add_stream(ENCODERS[options.codec], rate=rate)
        stream.width, stream.height = info.width, info.height
        # 4:2:0 needs even sizes; an odd-sized clip keeps its size in 4:4:4 instead of being cropped.
        even = info.width % 2 == 0 and info.height % 2 == 0
        stream.pix_fmt = "yuv420p" if even else "yuv444p"
        stream.time_base = info.time_base
        stream.codec_context.time_base = info.time_base
        crf = str(options.effective_crf)
        if options.codec in ("vp9",):
            stream.codec_context.options = {"crf": crf, "b": "0", "row-mt": "1", "deadline": "good", "cpu-used": "4"}
        elif options.codec == "hevc":
            stream.codec_context.options = {"crf": crf, "x265-params": "log-level=error"}
        else:
            stream.codec_context.options = {"crf": crf}
        if not options.keep_metadata:
            stream.codec_context.flags |= _av().codec.context.Flags.bitexact
        if info.rotation:
            stream.set_display_rotation(info.rotation)
        return stream

    def _add_audio_streams(self, suffix: str) -> None:
        for source_stream in self._source.streams.audio:
            try:
                out_stream = self._out.add_stream_from_template(source_stream)
            except (ValueError, _av().FFmpegError) as error:
                raise VideoError(
                    self.info.path,
                    f"its {source_stream.codec_context.name} audio cannot be copied into a {suffix} file "
                    f"({_problem(error)}); use --no-audio or another output container",
                ) from None
            if self.options.keep_metadata:
                out_stream.metadata.update(kept_tags(dict(source_stream.metadata)))
            self._audio[source_stream.index] = out_stream
        self._audio_packets = self._source.demux(*self._source.streams.audio)

    def write(self, rgb: np.ndarray, pts: int) -> None:
        av = _av()
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = int(pts)
        frame.time_base = self.info.time_base
        try:
            for packet in self._video.encode(frame):
                self._out.mux(packet)
        except av.FFmpegError as error:
            raise VideoError(
                self.target, f"encoding failed at frame {self.frames_written} ({_problem(error)})"
            ) from None
        self.frames_written += 1
        self._copy_audio_until(float((pts - self.info.start_pts) * self.info.time_base))

    def _copy_audio_until(self, seconds: float | None) -> None:
        """Audio packets up to ``seconds`` (all of them for None), as they are: interleaved by time."""
        while True:
            packet = self._pending_audio
            if packet is None:
                packet = next(self._audio_packets, None)
                if packet is None:
                    return
            if packet.dts is None:  # the demuxer's end-of-stream marker carries no data
                self._pending_audio = None
                continue
            if seconds is not None and packet.time_base is not None and float(packet.dts * packet.time_base) > seconds:
                self._pending_audio = packet
                return
            self._pending_audio = None
            packet.stream = self._audio[packet.stream_index]
            self._out.mux(packet)
            self.audio_packets += 1

    def finish(self) -> Path:
        """Flush the encoder, copy the rest of the audio, close, and move the file into place."""
        av = _av()
        try:
            for packet in self._video.encode(None):
                self._out.mux(packet)
            self._copy_audio_until(None)
            self._out.close()
        except av.FFmpegError as error:
            self.abort()
            raise VideoError(self.target, f"could not be finished ({_problem(error)})") from None
        except BaseException:
            self.abort()
            raise
        self._close_source()
        os.replace(self.partial, self.target)
        return self.target

    def abort(self) -> None:
        for closer in (self._out.close, self._close_source):
            try:
                closer()
            except Exception:
                pass
        self.partial.unlink(missing_ok=True)

    def _close_source(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
