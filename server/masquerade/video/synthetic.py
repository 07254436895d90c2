"""Synthetic clips whose faces are known by construction, for the tests and benchmarks/video.py.

Real faces (insightface's t1.jpg, installed with the test extras) move in straight lines over a
smooth textured background; chosen frames make a face hard to detect: ``blur`` (a Gaussian of
0.11 face widths: the detector finds nothing), ``soft`` (0.07 widths: it scores below the 0.5
threshold), ``dark`` (10 % brightness with sensor noise, as in low light). A face moving past the
frame's edge is half out of frame on its own. Each clip can carry a sine-wave audio track,
container metadata (title, creation time, location), a rotation flag and variable frame timing.
The truth per frame and face is the face's detector box carried through the same placement.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

HARD_KINDS = ("blur", "soft", "dark")
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class MovingFace:
    source: int  # which face of t1.jpg (0-5)
    size: int  # px: side of the pasted square (the face box is about 0.6 of it)
    start: tuple[float, float]  # top-left corner at frame 0
    velocity: tuple[float, float] = (0.0, 0.0)  # px per frame


@dataclass(frozen=True)
class ClipSpec:
    width: int = 320
    height: int = 240
    frames: int = 24
    fps: int = 24
    faces: tuple[MovingFace, ...] = ()
    hard: dict[int, dict[int, str]] = field(default_factory=dict)  # frame -> {face number: kind}
    variable_rate: bool = False  # uneven frame durations (every third frame lasts twice as long)
    audio: bool = True  # a 440 Hz sine, AAC
    metadata: dict[str, str] = field(default_factory=dict)
    rotation: int = 0
    codec: str = "libx264"
    crf: int = 18
    seed: int = 0


@dataclass
class ClipTruth:
    boxes: list[list[Box | None]]  # [frame][face]: the face box clipped to the frame, None when out of it
    hard: list[dict[int, str]]  # [frame]: {face: kind}
    pts: list[int]
    time_base: Fraction


@functools.lru_cache(maxsize=1)
def face_sources() -> tuple[tuple[np.ndarray, Box], ...]:
    """(square crop, face box inside it) for each of t1.jpg's six faces."""
    from masquerade.face.detect import FaceDetector
    from masquerade.face.image_io import decode_image

    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("synthetic clips need insightface's sample photo: install the test extras (setup.sh --test)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "images" / "t1.jpg"
    rgb = decode_image(path.read_bytes()).rgb
    sources = []
    for face in sorted(FaceDetector("centerface").detect(rgb), key=lambda f: f.box[0]):
        x0, y0, x1, y1 = face.box
        side = int(1.6 * max(x1 - x0, y1 - y0))
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
        left, top = max(cx - side // 2, 0), max(cy - side // 2, 0)
        crop = rgb[top : top + side, left : left + side]
        sources.append((np.ascontiguousarray(crop), (x0 - left, y0 - top, x1 - left, y1 - top)))
    return tuple(sources)


def background(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 200, (6, 8, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, 4, (height, width, 3))
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


def _hard(face: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    side = face.shape[1]
    if kind == "blur":
        return cv2.GaussianBlur(face, (0, 0), 0.11 * side)
    if kind == "soft":
        return cv2.GaussianBlur(face, (0, 0), 0.07 * side)
    if kind == "dark":
        return np.clip(face * 0.1 + rng.normal(0, 16, face.shape), 0, 255).astype(np.uint8)
    raise ValueError(f"hard kind must be one of {HARD_KINDS}, got {kind!r}")


def render_frame(spec: ClipSpec, index: int, base: np.ndarray, rng: np.random.Generator):
    """One frame's pixels and its truth boxes."""
    frame = base.copy()
    boxes: list[Box | None] = []
    sources = face_sources()
    for number, moving in enumerate(spec.faces):
        crop, box = sources[moving.source]
        scale = moving.size / crop.shape[0]
        face = cv2.resize(crop, (moving.size, moving.size), interpolation=cv2.INTER_AREA)
        kind = spec.hard.get(index, {}).get(number)
        if kind is not None:
            face = _hard(face, kind, rng)
        x = int(round(moving.start[0] + moving.velocity[0] * index))
        y = int(round(moving.start[1] + moving.velocity[1] * index))
        fx0, fy0 = max(x, 0), max(y, 0)
        fx1, fy1 = min(x + moving.size, spec.width), min(y + moving.size, spec.height)
        if fx1 > fx0 and fy1 > fy0:
            frame[fy0:fy1, fx0:fx1] = face[fy0 - y : fy1 - y, fx0 - x : fx1 - x]
        bx0, by0 = x + box[0] * scale, y + box[1] * scale
        bx1, by1 = x + box[2] * scale, y + box[3] * scale
        clipped = (max(bx0, 0.0), max(by0, 0.0), min(bx1, float(spec.width)), min(by1, float(spec.height)))
        boxes.append(clipped if clipped[2] - clipped[0] >= 4 and clipped[3] - clipped[1] >= 4 else None)
    return frame, boxes


def make_clip(path: str | Path, spec: ClipSpec) -> ClipTruth:
    """Write ``spec`` to ``path`` (the container from its suffix) and return the truth."""
    import av

    time_base = Fraction(1, spec.fps * 100)
    step = 100  # pts units per regular frame
    rng = np.random.default_rng(spec.seed + 1)
    base = background(spec.width, spec.height, spec.seed)
    truth = ClipTruth([], [], [], time_base)
    with av.open(str(path), "w") as out:
        out.metadata.update(spec.metadata)
        video = None
        if spec.frames:  # frames=0 writes an audio-only file
            video = out.add_stream(spec.codec, rate=spec.fps)
            video.width, video.height = spec.width, spec.height
            video.pix_fmt = "yuv420p"
            video.time_base = time_base
            video.codec_context.time_base = time_base
            video.codec_context.options = {"crf": str(spec.crf)} if spec.codec == "libx264" else {}
            if spec.rotation:
                video.set_display_rotation(spec.rotation)
        audio = out.add_stream("aac", rate=16000) if spec.audio else None
        if audio is not None:
            audio.layout = "mono"
        pts = 0
        for index in range(spec.frames):
            rgb, boxes = render_frame(spec, index, base, rng)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = pts, time_base
            for packet in video.encode(frame):
                out.mux(packet)
            truth.boxes.append(boxes)
            truth.hard.append(dict(spec.hard.get(index, {})))
            truth.pts.append(pts)
            pts += 2 * step if spec.variable_rate and index % 3 == 2 else step
        if video is not None:
            for packet in video.encode(None):
                out.mux(packet)
        if audio is not None:
            seconds = pts * float(time_base) or 1.0
            samples = int(seconds * 16000)
            wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / 16000)).astype(np.float32)[None]
            for start in range(0, samples, 1024):
                chunk = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(wave[:, start : start + 1024]), format="fltp", layout="mono"
                )
                chunk.sample_rate, chunk.pts, chunk.time_base = 16000, start, Fraction(1, 16000)
                for packet in audio.encode(chunk):
                    out.mux(packet)
            for packet in audio.encode(None):
                out.mux(packet)
    return truth
