"""Clips and frames for the video RPC tests, built on the spot: a real face (scikit-image's
astronaut) moving over a plain background, with a sine-wave AAC track. Small, so the tests stay fast."""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np


def face_patch(height: int) -> np.ndarray:
    """The astronaut's head, ``height`` pixels tall (a real face the detector finds)."""
    from skimage.data import astronaut

    crop = astronaut()[20:220, 130:310]  # 200 x 180: head with some margin
    width = round(height * crop.shape[1] / crop.shape[0])
    return cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)


@dataclass
class Scene:
    """Frames of a face moving left to right; ``boxes[i]`` is where the patch is on frame i."""

    width: int = 320
    height: int = 240
    frames: int = 24
    face_height: int = 120
    background: int = 90
    noise: bool = False  # a fresh random background per frame: large files, whatever the codec does

    def __post_init__(self) -> None:
        self.patch = face_patch(self.face_height)

    def box(self, index: int) -> tuple[int, int, int, int]:
        ph, pw = self.patch.shape[:2]
        span = max(1, self.width - pw - 8)
        x = 4 + (index * 4) % span
        y = (self.height - ph) // 2
        return x, y, x + pw, y + ph

    def frame(self, index: int) -> np.ndarray:
        rgb = np.full((self.height, self.width, 3), self.background, np.uint8)
        rgb[:, :, 2] = (self.background + 2 * index) % 256  # the background changes a little per frame
        if self.noise:
            rgb[:] = np.random.default_rng(index).integers(0, 256, rgb.shape, dtype=np.uint8)
        x0, y0, x1, y1 = self.box(index)
        rgb[y0:y1, x0:x1] = self.patch
        return rgb


def write_clip(path: Path, scene: Scene, *, fps: int = 12, audio: bool = True, crf: int = 23) -> Path:
    """An H.264 .mp4 of ``scene`` (with a 440 Hz AAC track when ``audio``)."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = scene.width, scene.height, "yuv420p"
        video.options = {"crf": str(crf), "preset": "ultrafast"}
        sound = container.add_stream("aac", rate=16000) if audio else None
        if sound is not None:
            sound.layout = "mono"
        for index in range(scene.frames):
            frame = av.VideoFrame.from_ndarray(scene.frame(index), format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            samples = int(16000 * scene.frames / fps)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / 16000)).astype(np.float32)
            for start in range(0, samples, 1024):
                block = tone[start : start + 1024]
                audio_frame = av.AudioFrame.from_ndarray(block[None, :], format="fltp", layout="mono")
                audio_frame.sample_rate = 16000
                audio_frame.pts = start
                for packet in sound.encode(audio_frame):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
    return path


def read_clip(path: Path) -> tuple[list[np.ndarray], list[bytes]]:
    """(RGB frames, audio packets' bytes) of a clip."""
    frames, audio = [], []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
    with av.open(str(path)) as container:
        if container.streams.audio:
            for packet in container.demux(audio=0):
                if packet.size:
                    audio.append(bytes(packet))
    return frames, audio


def region_changed(before: np.ndarray, after: np.ndarray, box, *, min_mean_abs: float = 6.0) -> bool:
    """Whether the inner half of ``box`` (the face itself) differs clearly between two frames."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    inner = (slice(y0 + h // 4, y1 - h // 4), slice(x0 + w // 4, x1 - w // 4))
    diff = np.abs(before[inner].astype(np.int16) - after[inner].astype(np.int16))
    return float(diff.mean()) >= min_mean_abs


def spool_files(root: Path) -> list[Path]:
    """Every file under the spool root (the server's own empty subfolder does not count)."""
    return [Path(folder) / name for folder, _, names in os.walk(root) for name in names]
