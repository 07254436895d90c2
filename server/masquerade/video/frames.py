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
    """One identity per track for generation: the normalised mean of the track's ArcFace vectors.

    Files sum every detected frame's vector in a first pass (``add``), so the identity is fixed
    before the track's first frame is generated. A live stream cannot wait: ``for_live()`` fixes a
    track's identity at the first frame the processor sees it on.
    """

    vectors: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # track id -> sum of unit vectors
    counts: dict[int, int] = field(default_factory=dict)
    live: bool = False

    @classmethod
    def for_live(cls) -> TrackIdentities:
        return cls(live=True)

    def add(self, track_id: int, embedding: np.ndarray) -> None:
        embedding = np.asarray(embedding, np.float64).reshape(-1)
        norm = float(np.linalg.norm(embedding))
        if not np.isfinite(norm) or norm < 0.5:
            return  # the encoder could not embed this crop; the track's other frames decide
        if self.live and track_id in self.vectors:
            return  # fixed at the track's first frame
        total = self.vectors.get(track_id)
        self.vectors[track_id] = embedding / norm if total is None else total + embedding / norm
        self.counts[track_id] = self.counts.get(track_id, 0) + 1

    def identity(self, track_id: int) -> np.ndarray | None:
        total = self.vectors.get(track_id)
        if total is None:
            return None
        return (total / max(float(np.linalg.norm(total)), 1e-12)).astype(np.float32)


class EngineFrameProcessor:
    """Reverse personalization on a frame's tracked faces through the engine's step-level batching.

    Each frame is one engine request with its faces given (no detection); every face carries its
    track's identity and its track's noise stream, and the request carries the one attribute prompt,
    so a track keeps one synthetic identity from frame to frame. Faces past ``max_faces`` in a frame,
    or that cannot be embedded, fall back to blur as they do for images, and their outcome says so.
    Run several ``cover`` calls at once (in order of frames) so their faces share UNet calls.
    """

    QUEUE_FULL_RETRY_S = 0.05

    def __init__(
        self,
        engine,
        params,
        *,
        max_faces: int | None = None,
        classical_strength: float = 1.0,
        request_prefix: str = "frame",
    ):
        self.engine = engine
        self.params = params
        self.max_faces = max_faces
        self.classical_strength = classical_strength
        self.request_prefix = request_prefix

    def seed_for(self, track_id: int) -> int:
        """The generator seed of the track's inversion noise (engine/noise.py, stream = track id)."""
        from masquerade.engine.noise import face_noise_seed

        return face_noise_seed(self.params.seed, track_id) if self.params.noise == "per_face" else self.params.seed

    async def cover(
        self, rgb: np.ndarray, frame: FrameFaces, identities: TrackIdentities, *, self_check: bool = False
    ) -> tuple[np.ndarray, list[FaceOutcome]]:
        import asyncio

        from masquerade.engine.request import (
            DetectionOptions,
            EngineRequest,
            FailedEvent,
            GivenFace,
            Method,
            QueueFullError,
            ResultEvent,
        )

        if not frame.faces:
            return rgb, []
        if identities.live:
            await self._fix_live_identities(rgb, frame, identities)
        given = tuple(
            GivenFace(
                box=face.box,
                landmarks=face.landmarks,
                score=face.score,
                identity=identities.identity(face.track_id),
                noise_index=face.track_id,
            )
            for face in frame.faces
        )
        request = EngineRequest(
            request_id=f"{self.request_prefix}-{frame.index}",
            image=b"",
            pixels=np.ascontiguousarray(rgb),
            given_faces=given,
            method=Method.REVERSE_PERSONALIZATION,
            params=self.params,
            classical_strength=self.classical_strength,
            detection=DetectionOptions(max_faces=self.max_faces),
            self_check=self_check,
        )
        while True:
            try:
                handle = self.engine.submit(request)
                break
            except QueueFullError:  # other work fills the engine's queue: this frame waits its turn
                await asyncio.sleep(self.QUEUE_FULL_RETRY_S)
        try:
            async for event in handle:
                if isinstance(event, ResultEvent):
                    result = event.result
                    break
                if isinstance(event, FailedEvent):
                    raise event.error
        except asyncio.CancelledError:
            handle.cancel()
            raise
        output = np.frombuffer(result.image, np.uint8).reshape(result.height, result.width, 3)
        outcomes = [
            FaceOutcome(frame.faces[r.index].track_id, r.method_applied.value, r.status.value, r.reason)
            for r in result.faces
            if r.index < len(frame.faces)
        ]
        return output, outcomes

    async def _fix_live_identities(self, rgb: np.ndarray, frame: FrameFaces, identities: TrackIdentities) -> None:
        from masquerade.face.align import arcface_crop, arcface_five_points

        new = [f for f in frame.faces if f.track_id not in identities.vectors and f.landmarks.shape == (68, 2)]
        if not new or self.engine.core is None:
            return

        def embed():
            crops = np.stack([arcface_crop(rgb, arcface_five_points(face.landmarks)) for face in new])
            return [np.asarray(v, np.float32) for v in self.engine.core.embed_identity(crops)]

        for face, vector in zip(new, await self.engine.run_pixel_work(embed)):
            identities.add(face.track_id, vector)
