"""A request's pixel work around the diffusion: find faces, prepare crops, merge results.

Runs on the preprocess/postprocess threads. Fails closed: a face the
generative path cannot handle is covered with a classical method and its
record says which and why; a face is never returned untouched without the
result saying so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import cv2
import numpy as np

from masquerade.cancellation import check as check_cancelled
from masquerade.engine.request import (
    EngineRequest,
    FaceRecord,
    FaceStatus,
    Method,
)
from masquerade.face.align import align_face, arcface_crop, arcface_five_points, paste_back, template_five_points
from masquerade.face.classical import DEFAULT_STYLE, CoverStyle, apply_classical, cover_region
from masquerade.face.detect import DEFAULT_DETECTOR, DEFAULT_THRESHOLD, DetectedFace, FaceDetector
from masquerade.face.image_io import decode_image, encode_image
from masquerade.face.selfcheck import SelfCheck

if TYPE_CHECKING:  # tensors exist only on an engine with weights; the classical path never loads torch
    import torch

log = logging.getLogger(__name__)

FALLBACK_METHOD = Method.BLUR
# Stronger covers for a face the self-check still recognises: blur at full strength, then solid.
RECOVER_STRENGTH = 1.0


@dataclass(frozen=True)
class DetectionDefaults:
    """The server's detection settings (``serve``/CLI flags); a request's unset options take these."""

    detector: str = DEFAULT_DETECTOR
    threshold: float = DEFAULT_THRESHOLD
    min_face_size: int = 16
    max_faces: int = 16  # faces per request that take the generative path; the rest are covered classically
    mask_scale: float = 1.0
    self_check: bool = True

    def validated(self) -> DetectionDefaults:
        checks = [
            (0.0 <= self.threshold <= 1.0, f"threshold must be in [0, 1], got {self.threshold}"),
            (self.min_face_size >= 0, f"min_face_size must be >= 0, got {self.min_face_size}"),
            (self.max_faces >= 1, f"max_faces must be at least 1, got {self.max_faces}"),
            (0.5 <= self.mask_scale <= 3.0, f"mask_scale must be in [0.5, 3], got {self.mask_scale}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


@dataclass
class FaceWork:
    """One face on its way through the generative path."""

    record: FaceRecord
    detected: DetectedFace | None = field(repr=False)  # None for an already-aligned input
    crop: np.ndarray = field(repr=False)  # [S, S, 3] uint8 aligned face
    matrix: np.ndarray = field(repr=False)  # [2, 3] original -> crop
    five_points: np.ndarray = field(repr=False)  # [5, 2] in crop coordinates
    identity: torch.Tensor | None = field(default=None, repr=False)  # [512] unit embedding
    noise_index: int | None = None  # GivenFace.noise_index: the inversion noise stream, if not the face index
    clean_latent: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class PreparedRequest:
    # The decoded input, EXIF orientation applied. None while its faces diffuse: the engine drops it
    # then and ``finish`` decodes the request's bytes again (docs/design.md section 10).
    rgb: np.ndarray | None = field(repr=False)
    output_format: str
    records: list[FaceRecord]  # every face found, in order
    works: list[FaceWork]  # faces going through diffusion (a subset of records)
    threshold: float = DEFAULT_THRESHOLD  # the detection score threshold this request used
    mask_scale: float = 1.0
    cover_style: CoverStyle = DEFAULT_STYLE  # the front end's, with the request's shape and mosaic size
    residual_recognisable: int = 0  # set by finish(): faces the self-check still recognised


class FaceFrontEnd:
    """Detection, alignment, identity and merging for whole requests."""

    def __init__(
        self,
        *,
        detector: str | DetectionDefaults = DEFAULT_DETECTOR,
        face_size: int | None = None,
        core=None,
        max_image_pixels: int,
        model_dir=None,
        face_detector: FaceDetector | None = None,
        cover_style: CoverStyle = DEFAULT_STYLE,
    ):
        """``face_detector``: one made by the caller (the CLI's workers: a session each); ``cover_style``:
        the CLI's --shape, --mosaic-size and --replace-with for every classical cover."""
        self.defaults = (
            detector if isinstance(detector, DetectionDefaults) else DetectionDefaults(detector)
        ).validated()
        self.detector = face_detector or FaceDetector(kind=self.defaults.detector, model_dir=model_dir)
        self.cover_style = cover_style
        self.face_size = face_size
        self.core = core  # DiffusionCore, or None on a classical-only server
        self.max_image_pixels = max_image_pixels
        self._self_check = None

    # ---- preprocess ------------------------------------------------------------

    def prepare(self, request: EngineRequest) -> PreparedRequest:
        if request.pixels is not None:  # a video frame: raw pixels in, raw pixels out
            rgb, output_format = request.pixels, "raw"
        else:
            decoded = decode_image(request.image, max_pixels=self.max_image_pixels)
            rgb = decoded.rgb
            output_format = request.output.format or decoded.format
        options = request.detection
        threshold = self.defaults.threshold if options.score_threshold is None else options.score_threshold
        min_face_size = self.defaults.min_face_size if options.min_face_size is None else options.min_face_size
        max_faces = options.max_faces or self.defaults.max_faces
        mask_scale = self.defaults.mask_scale if getattr(options, "mask_scale", None) is None else options.mask_scale
        if request.given_faces is not None:
            detected_faces = [DetectedFace(g.box, g.landmarks, g.score) for g in request.given_faces]
        else:
            detected_faces = [None] if options.aligned else self.detector.detect(rgb, score_threshold=threshold)
        records = [
            FaceRecord(
                index=index,
                box=(0.0, 0.0, float(rgb.shape[1]), float(rgb.shape[0])) if face is None else face.box,
                landmarks=np.zeros((0, 2), np.float32) if face is None else face.landmarks,
                score=1.0 if face is None else float(face.score),
                method_applied=request.method,
                status=FaceStatus.ANONYMIZED,
            )
            for index, face in enumerate(detected_faces)
        ]
        works = []
        if not request.method.is_classical:
            # Crowds are never refused: the max_faces largest faces take the generative path,
            # every other face is covered classically and says why.
            by_size = sorted(range(len(records)), key=lambda i: -_side(records[i].box))
            for rank, index in enumerate(by_size):
                record, face = records[index], detected_faces[index]
                side = _side(record.box)
                if face is not None and record.landmarks.shape[0] != 68:
                    self._mark_fallback(record, "past the detection cap of faces with landmarks")
                elif face is not None and side < min_face_size:
                    self._mark_fallback(record, f"face is {side:.0f} px, below min_face_size={min_face_size}")
                elif rank >= max_faces:
                    self._mark_fallback(
                        record, f"beyond max_faces={max_faces} faces per request on the generative path"
                    )
                else:
                    check_cancelled()
                    works.append(self._align(rgb, face, record))
            works.sort(key=lambda work: work.record.index)
        if works:
            self._encode_identities(rgb, works)
            if request.given_faces is not None:
                for work in works:
                    given = request.given_faces[work.record.index]
                    work.noise_index = given.noise_index
                    if given.identity is not None and work.identity is not None:
                        work.identity = work.identity.new_tensor(given.identity)
        return PreparedRequest(
            rgb=rgb,
            output_format=output_format,
            records=records,
            works=[w for w in works if w.record.status is FaceStatus.ANONYMIZED],
            threshold=threshold,
            mask_scale=mask_scale,
            cover_style=self._cover_style(request),
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
        faces = self.detector.detect(crop, self.defaults.threshold)
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
        if rgb is None:
            rgb = (
                request.pixels if request.pixels is not None else decode_image(request.image, self.max_image_pixels).rgb
            )
        output = rgb.copy()  # this pass's own: its covers work in place (the self-check's re-covers do not)
        works_by_index = {work.record.index: work for work in prepared.works}
        for record in prepared.records:
            check_cancelled()
            work = works_by_index.get(record.index)
            if request.method.is_classical:
                output = self._cover(
                    output,
                    record,
                    request.method,
                    request.classical_strength,
                    prepared.mask_scale,
                    prepared.cover_style,
                    in_place=True,
                )
            elif work is not None and record.index in generated:
                # The whole regenerated square goes back, except over the other faces (align.paste_back).
                others = [r.landmarks for r in prepared.records if r.index != record.index and len(r.landmarks) == 68]
                output = self._merge(output, work, generated[record.index], others)
            else:
                if record.status is FaceStatus.ANONYMIZED:
                    reason = (failures or {}).get(record.index) or "generation did not complete for this face"
                    self._mark_fallback(record, reason)
                output = self._cover(
                    output,
                    record,
                    record.method_applied,
                    request.classical_strength,
                    prepared.mask_scale,
                    prepared.cover_style,
                    in_place=True,
                )
        self._identity_receipts(output, prepared, generated)
        check_cancelled()
        if self.defaults.self_check and request.self_check and not request.detection.aligned:
            output = self._check_and_recover(rgb, output, prepared, request.classical_strength)
        height, width = output.shape[:2]
        if prepared.output_format == "raw":
            return np.ascontiguousarray(output).tobytes(), width, height
        return encode_image(output, prepared.output_format, request.output.quality), width, height

    def _merge(self, output: np.ndarray, work: FaceWork, generated_crop: np.ndarray, others=()) -> np.ndarray:
        if work.detected is None:
            height, width = output.shape[:2]
            if generated_crop.shape[:2] == (height, width):
                return generated_crop.copy()
            return cv2.resize(generated_crop, (width, height), interpolation=cv2.INTER_LANCZOS4)
        return paste_back(output, generated_crop, work.matrix, protect=others)

    def _cover_style(self, request: EngineRequest) -> CoverStyle:
        """The front end's cover style (the CLI's flags) with what the request sets (ClassicalParams)."""
        if request.cover_shape is None and request.mosaic_size is None:
            return self.cover_style
        return replace(
            self.cover_style,
            shape=request.cover_shape or self.cover_style.shape,
            mosaic_size=request.mosaic_size if request.mosaic_size is not None else self.cover_style.mosaic_size,
        )

    def _cover(
        self,
        output: np.ndarray,
        record: FaceRecord,
        method: Method,
        strength: float,
        mask_scale: float = 1.0,
        style: CoverStyle | None = None,
        in_place: bool = False,
    ) -> np.ndarray:
        style = style or self.cover_style
        if record.landmarks.shape[0] == 68:
            face = DetectedFace(box=record.box, landmarks=record.landmarks, score=record.score)
            return apply_classical(
                output, face, method.value, strength, mask_scale=mask_scale, style=style, in_place=in_place
            )
        return cover_region(
            output, record.box, method.value, strength, mask_scale=mask_scale, style=style, in_place=in_place
        )

    @staticmethod
    def _mark_fallback(record: FaceRecord, reason: str) -> None:
        record.status = FaceStatus.FALLBACK
        record.method_applied = FALLBACK_METHOD
        record.reason = reason

    def _identity_receipts(self, output: np.ndarray, prepared: PreparedRequest, generated: dict) -> None:
        """ArcFace identity similarity before/after, for the faces that went through generation."""
        if self.core is None or not prepared.works:
            return
        measured = [w for w in prepared.works if w.record.index in generated and w.identity is not None]
        if not measured:
            return
        import torch  # already loaded with the DiffusionCore

        # Baseline: the VAE round trip of each face, i.e. what reconstruction alone keeps.
        round_trips = self.core.decode(torch.stack([w.clean_latent for w in measured]))
        crops = [arcface_crop(crop, w.five_points) for w, crop in zip(measured, round_trips)]
        for work in measured:
            if work.detected is None:
                out_crop = cv2.resize(output, (self.face_size, self.face_size), interpolation=cv2.INTER_LANCZOS4)
            else:
                out_crop = align_face(output, work.detected.landmarks, self.face_size).crop
            crops.append(arcface_crop(out_crop, work.five_points))
        embeddings = self.core.embed_identity(np.stack(crops))
        before, after = embeddings[: len(measured)], embeddings[len(measured) :]
        for work, round_trip, anonymized in zip(measured, before, after):
            work.record.identity_similarity_before = float(torch.dot(work.identity, round_trip))
            work.record.identity_similarity_after = float(torch.dot(work.identity, anonymized))

    # ---- self-check ------------------------------------------------------------

    def _check_and_recover(
        self, original: np.ndarray, output: np.ndarray, prepared: PreparedRequest, strength: float
    ) -> np.ndarray:
        """Detector + dlib descriptor on the output: re-cover what is still recognisable, cover what was missed.

        Sets each record's verifier_distance (for regions the descriptor can embed as a face)
        and ``prepared.residual_recognisable`` (what is left after the stronger covers).
        """
        check = self._get_self_check()
        if check is None:
            return output
        records = prepared.records
        faces = [(r.box, r.landmarks) for r in records]
        try:
            originals = check.describe_originals(original, faces)
        except Exception:  # the verifier failing must not fail the request; the result says nothing was checked
            log.exception("self-check could not describe the original faces")
            return output
        memo: dict = {}  # work on pixels that a re-cover leaves unchanged is not done twice
        for _attempt in range(2):
            verdict = check.inspect(output, faces, originals, prepared.threshold, original=original, memo=memo)
            for index, distance in verdict.distances.items():
                records[index].verifier_distance = distance
            for found in verdict.new_faces:  # missed by the first pass (e.g. next to a cover)
                record = FaceRecord(
                    index=len(records),
                    box=found.box,
                    landmarks=found.landmarks,
                    score=found.score,
                    method_applied=FALLBACK_METHOD,
                    status=FaceStatus.FALLBACK,
                    reason="found by the self-check on the output; covered classically",
                )
                records.append(record)
                faces.append((record.box, record.landmarks))
                originals.append(None)
                output = self._cover(
                    output, record, FALLBACK_METHOD, RECOVER_STRENGTH, prepared.mask_scale, prepared.cover_style
                )
            if not verdict.recognisable:
                prepared.residual_recognisable = 0
                return output
            for index in verdict.recognisable:
                record = records[index]
                applied = record.method_applied
                # Stronger than what was applied: full-strength blur after generation or a weak
                # classical cover; solid after a full-strength one.
                weak = applied is Method.REVERSE_PERSONALIZATION or (
                    applied is not Method.SOLID and strength < RECOVER_STRENGTH
                )
                stronger = (
                    FALLBACK_METHOD if weak and not record.reason.startswith("still recognisable") else Method.SOLID
                )
                record.reason = (
                    f"still recognisable after {applied.value} (dlib distance {verdict.distances[index]:.2f}); "
                    f"covered again with {stronger.value}"
                )
                record.status = FaceStatus.FALLBACK
                record.method_applied = stronger
                output = self._cover(
                    output, record, stronger, RECOVER_STRENGTH, prepared.mask_scale, prepared.cover_style
                )
        verdict = check.inspect(
            output, faces, originals, prepared.threshold, look_for_new=False, original=original, memo=memo
        )
        for index, distance in verdict.distances.items():
            records[index].verifier_distance = distance
        prepared.residual_recognisable = len(verdict.recognisable)
        return output

    def _get_self_check(self) -> SelfCheck | None:
        if self._self_check is None:
            try:
                self._self_check = SelfCheck(self.detector)
            except Exception:
                log.warning("dlib verifier unavailable; the self-check and verifier distances are off")
                self._self_check = False
        return self._self_check or None


def detector_model_dir(models: str):
    """Where a detector's weights (buffalo_l/det_10g.onnx) live for an EngineConfig.models value."""
    from pathlib import Path

    from masquerade.models.layout import default_model_dir, tiny_model_dir

    if models == "default":
        return default_model_dir()
    if models == "tiny":
        return tiny_model_dir()
    return Path(models).expanduser()


def _side(box: tuple[float, float, float, float]) -> float:
    return min(box[2] - box[0], box[3] - box[1])
