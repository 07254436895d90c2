"""A request's pixel work around the diffusion: find faces, prepare crops, merge results.

Runs on the preprocess/postprocess threads. Fails closed: a face the
generative path cannot handle is covered with a classical method and its
record says which and why; a face is never returned untouched without the
result saying so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from masquerade.engine.request import (
    EngineRequest,
    FaceRecord,
    FaceStatus,
    InvalidRequestError,
    Method,
)
from masquerade.face.align import align_face, arcface_crop, arcface_five_points, paste_back, template_five_points
from masquerade.face.classical import apply_classical, cover_region
from masquerade.face.detect import DetectedFace, FaceDetector
from masquerade.face.image_io import decode_image, encode_image

log = logging.getLogger(__name__)

FALLBACK_METHOD = Method.BLUR


@dataclass
class FaceWork:
    """One face on its way through the generative path."""

    record: FaceRecord
    detected: DetectedFace | None = field(repr=False)  # None for an already-aligned input
    crop: np.ndarray = field(repr=False)  # [S, S, 3] uint8 aligned face
    matrix: np.ndarray = field(repr=False)  # [2, 3] original -> crop
    five_points: np.ndarray = field(repr=False)  # [5, 2] in crop coordinates
    identity: torch.Tensor | None = field(default=None, repr=False)  # [512] unit embedding
    clean_latent: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class PreparedRequest:
    rgb: np.ndarray = field(repr=False)  # the decoded input, EXIF orientation applied
    output_format: str
    records: list[FaceRecord]  # every face found, in order
    works: list[FaceWork]  # faces going through diffusion (a subset of records)


class FaceFrontEnd:
    """Detection, alignment, identity and merging for whole requests."""

    def __init__(self, *, detector: str = "hog", face_size: int | None = None, core=None, max_image_pixels: int):
        self.detector = FaceDetector(kind=detector)
        self.face_size = face_size
        self.core = core  # DiffusionCore, or None on a classical-only server
        self.max_image_pixels = max_image_pixels
        self._verifier = None

    # ---- preprocess ------------------------------------------------------------

    def prepare(self, request: EngineRequest) -> PreparedRequest:
        decoded = decode_image(request.image, max_pixels=self.max_image_pixels)
        rgb = decoded.rgb
        output_format = request.output.format or decoded.format
        options = request.detection
        if options.aligned:
            detected_faces = [None]
        else:
            detected_faces = self.detector.detect(rgb, score_threshold=options.score_threshold)
            if len(detected_faces) > options.max_faces:
                raise InvalidRequestError(
                    "detection.max_faces",
                    f"the image has {len(detected_faces)} faces, more than max_faces={options.max_faces}",
                )
        records, works = [], []
        for index, face in enumerate(detected_faces):
            record = FaceRecord(
                index=index,
                box=(0.0, 0.0, float(rgb.shape[1]), float(rgb.shape[0])) if face is None else face.box,
                landmarks=np.zeros((0, 2), np.float32) if face is None else face.landmarks,
                score=1.0 if face is None else float(face.score),
                method_applied=request.method,
                status=FaceStatus.ANONYMIZED,
            )
            records.append(record)
            if request.method.is_classical:
                continue
            side = min(record.box[2] - record.box[0], record.box[3] - record.box[1])
            if face is not None and side < options.min_face_size:
                self._mark_fallback(record, f"face is {side:.0f} px, below min_face_size={options.min_face_size}")
                continue
            works.append(self._align(rgb, face, record))
        if works:
            self._encode_identities(rgb, works)
        return PreparedRequest(
            rgb=rgb,
            output_format=output_format,
            records=records,
            works=[w for w in works if w.record.status is FaceStatus.ANONYMIZED],
        )

    def _align(self, rgb: np.ndarray, face: DetectedFace | None, record: FaceRecord) -> FaceWork:
        size = self.face_size
        if face is None:
            height, width = rgb.shape[:2]
            crop = (
                cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LANCZOS4)
                if (height, width) != (size, size)
                else rgb.copy()
            )
            matrix = np.array([[size / width, 0.0, 0.0], [0.0, size / height, 0.0]])
            return FaceWork(record, None, crop, matrix, self._aligned_five_points(crop))
        aligned = align_face(rgb, face.landmarks, size)
        five = arcface_five_points(face.landmarks)
        five_in_crop = five @ aligned.matrix[:, :2].T + aligned.matrix[:, 2]
        return FaceWork(record, face, aligned.crop, aligned.matrix, five_in_crop)

    def _aligned_five_points(self, crop: np.ndarray) -> np.ndarray:
        """ArcFace's five points on an already-aligned crop: from its landmarks when one face is
        found, else where the alignment template puts them."""
        faces = self.detector.detect(crop)
        if len(faces) == 1:
            return arcface_five_points(faces[0].landmarks)
        return template_five_points(crop.shape[0])

    def _encode_identities(self, rgb: np.ndarray, works: list[FaceWork]) -> None:
        arcface_inputs = np.stack([arcface_crop(work.crop, work.five_points) for work in works])
        embeddings = self.core.embed_identity(arcface_inputs)
        latents = self.core.encode(np.stack([work.crop for work in works]))
        for work, embedding, latent in zip(works, embeddings, latents):
            norm = float(embedding.norm())
            if not np.isfinite(norm) or norm < 0.5:
                self._mark_fallback(work.record, "the identity encoder could not embed this face")
                continue
            work.identity = embedding
            work.clean_latent = latent

    # ---- postprocess -----------------------------------------------------------

    def finish(
        self,
        request: EngineRequest,
        prepared: PreparedRequest,
        generated: dict[int, np.ndarray],
        failures: dict[int, str] | None = None,
    ) -> tuple[bytes, int, int]:
        """Merge generated crops (by face index), cover every other face, encode.

        ``failures`` gives, by face index, why a face's diffusion failed; it goes in the record.
        """
        rgb = prepared.rgb
        output = rgb.copy()
        works_by_index = {work.record.index: work for work in prepared.works}
        for record in prepared.records:
            work = works_by_index.get(record.index)
            if request.method.is_classical:
                output = self._cover(output, record, request.method, request.classical_strength)
            elif work is not None and record.index in generated:
                output = self._merge(output, work, generated[record.index])
            else:
                if record.status is FaceStatus.ANONYMIZED:
                    reason = (failures or {}).get(record.index) or "generation did not complete for this face"
                    self._mark_fallback(record, reason)
                output = self._cover(output, record, record.method_applied, request.classical_strength)
        self._receipts(rgb, output, prepared, generated)
        height, width = output.shape[:2]
        return encode_image(output, prepared.output_format, request.output.quality), width, height

    def _merge(self, output: np.ndarray, work: FaceWork, generated_crop: np.ndarray) -> np.ndarray:
        if work.detected is None:
            height, width = output.shape[:2]
            if generated_crop.shape[:2] == (height, width):
                return generated_crop.copy()
            return cv2.resize(generated_crop, (width, height), interpolation=cv2.INTER_LANCZOS4)
        return paste_back(output, generated_crop, work.matrix)

    def _cover(self, output: np.ndarray, record: FaceRecord, method: Method, strength: float) -> np.ndarray:
        if record.landmarks.shape[0] == 68:
            face = DetectedFace(box=record.box, landmarks=record.landmarks, score=record.score)
            return apply_classical(output, face, method.value, strength)
        return cover_region(output, record.box, method.value, strength)

    @staticmethod
    def _mark_fallback(record: FaceRecord, reason: str) -> None:
        record.status = FaceStatus.FALLBACK
        record.method_applied = FALLBACK_METHOD
        record.reason = reason

    def _receipts(self, original: np.ndarray, output: np.ndarray, prepared: PreparedRequest, generated: dict) -> None:
        """Identity similarity before/after (ArcFace) and the independent dlib verifier distance."""
        if self.core is not None and prepared.works:
            measured = [w for w in prepared.works if w.record.index in generated and w.identity is not None]
            if measured:
                # Baseline: the VAE round trip of each face, i.e. what reconstruction alone keeps.
                round_trips = self.core.decode(torch.stack([w.clean_latent for w in measured]))
                crops = [arcface_crop(crop, w.five_points) for w, crop in zip(measured, round_trips)]
                for work in measured:
                    if work.detected is None:
                        out_crop = cv2.resize(
                            output, (self.face_size, self.face_size), interpolation=cv2.INTER_LANCZOS4
                        )
                    else:
                        out_crop = align_face(output, work.detected.landmarks, self.face_size).crop
                    crops.append(arcface_crop(out_crop, work.five_points))
                embeddings = self.core.embed_identity(np.stack(crops))
                before, after = embeddings[: len(measured)], embeddings[len(measured) :]
                for work, round_trip, anonymized in zip(measured, before, after):
                    work.record.identity_similarity_before = float(torch.dot(work.identity, round_trip))
                    work.record.identity_similarity_after = float(torch.dot(work.identity, anonymized))
        verifier = self._get_verifier()
        if verifier is None:
            return
        for record in prepared.records:
            if record.landmarks.shape[0] != 68:
                continue
            try:
                before = verifier.descriptor(original, record.landmarks)
                after_desc = verifier.descriptor_in_box(output, record.box)
                if before is not None and after_desc is not None:
                    record.verifier_distance = float(verifier.distance(before, after_desc))
            except Exception:  # a receipt is best effort; never fail the request over it
                log.exception("verifier failed on face %d", record.index)

    def _get_verifier(self):
        if self._verifier is None:
            try:
                from masquerade.face.verify import DlibVerifier

                self._verifier = DlibVerifier()
            except Exception:
                log.warning("dlib verifier unavailable; verifier distances are not reported")
                self._verifier = False
        return self._verifier or None
