"""Covering the tracked faces of one frame: classical covers here, reverse personalization through the engine.

A frame processor takes an upright frame and its ``FrameFaces`` and returns the covered frame and
one ``FaceOutcome`` per face. The classical one is plain pixel work (call it in a worker thread);
the engine one submits the frame as one request whose faces are given (no detection), each with
its track's fixed identity and noise seed, so a track's frames join the step-level batching like
any other faces and the same person stays the same synthetic person from frame to frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from masquerade.face.classical import apply_classical
from masquerade.face.detect import DetectedFace
from masquerade.video.tracking import FrameFaces, TrackedFace


@dataclass
class FaceOutcome:
    """What was done to one tracked face on one frame."""

    track_id: int
    method_applied: str  # "blur" | "pixelate" | "solid" | "reverse_personalization"
    status: str  # "anonymized" | "fallback" | "skipped" (engine FaceStatus values)
    reason: str = ""


class ClassicalFrameProcessor:
    """Blur, pixelate or solid on every tracked face; thread-safe (no state)."""

    def __init__(self, method: str, strength: float = 1.0, mask_scale: float = 1.0):
        self.method = method
        self.strength = strength
        self.mask_scale = mask_scale

    def cover(self, rgb: np.ndarray, frame: FrameFaces) -> tuple[np.ndarray, list[FaceOutcome]]:
        output = rgb
        for face in frame.faces:
            output = cover_face(output, face, self.method, self.strength, self.mask_scale)
        return output, [FaceOutcome(face.track_id, self.method, "anonymized") for face in frame.faces]


def cover_face(rgb: np.ndarray, face: TrackedFace, method: str, strength: float, mask_scale: float) -> np.ndarray:
    """The face ellipse (from its landmarks, or its box) covered; the box-derived ellipse reaches past
    the box, so a face known only by its box is covered whole."""
    detected = DetectedFace(box=face.box, landmarks=face.landmarks, score=face.score)
    return apply_classical(rgb, detected, method, strength, mask_scale=mask_scale)


@dataclass
class TrackIdentities:
    """One synthetic identity per track: the normalised mean of the track's ArcFace vectors, and one seed."""

    vectors: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # track id -> [512] unit
    counts: dict[int, int] = field(default_factory=dict)

    def add(self, track_id: int, embedding: np.ndarray) -> None:
        embedding = np.asarray(embedding, np.float64).reshape(-1)
        norm = float(np.linalg.norm(embedding))
        if not np.isfinite(norm) or norm < 0.5:
            return  # the encoder could not embed this crop; the track's other frames decide
        total = self.vectors.get(track_id)
        self.vectors[track_id] = embedding / norm if total is None else total + embedding / norm
        self.counts[track_id] = self.counts.get(track_id, 0) + 1

    def identity(self, track_id: int) -> np.ndarray | None:
        total = self.vectors.get(track_id)
        if total is None:
            return None
        return (total / max(float(np.linalg.norm(total)), 1e-12)).astype(np.float32)
