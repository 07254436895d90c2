"""Engine-side request, parameter, event and result types.

The API layer converts protos to and from these; nothing here knows gRPC.
Reprs never include pixels, embeddings or face crops: a privacy server must
not leak through its own logs.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

from masquerade.engine.job_state import Phase, Priority
from masquerade.errors import (  # noqa: F401  (re-exported: the engine's callers name them here)
    DeadlineUnmeetableError,
    EngineNotAcceptingError,
    InvalidRequestError,
    MethodUnavailableError,
    QueueFullError,
    QuotaExceededError,
    RetryLaterError,
)
from masquerade.face.image_io import OUTPUT_FORMATS

COVER_SHAPES = ("ellipse", "box")  # face/classical.py's CoverStyle.shape
MOSAIC_SIZES = (2, 4096)  # pixels: CoverStyle.mosaic_size's range


class Method(enum.Enum):
    REVERSE_PERSONALIZATION = "reverse_personalization"
    BLUR = "blur"
    PIXELATE = "pixelate"
    SOLID = "solid"

    @property
    def is_classical(self) -> bool:
        return self is not Method.REVERSE_PERSONALIZATION


MAX_STEPS = 1000
MAX_MIN_FACE_SIZE = 100_000
# How a face's inversion noise is drawn (engine/noise.py, which needs torch: named here so that
# validating a request does not import it).
NOISE_MODES = ("per_face", "research")


@dataclass(frozen=True)
class ReversePersonalizationParams:
    """The algorithm's parameters (docs/design.md section 1), with the paper's defaults."""

    skip: float = 0.7
    steps: int = 100
    guidance_scale: float = -10.0
    id_emb_scale: float = 1.0
    ip_adapter_scale: float = 1.0
    # None: no prompt (the all-zeros conditioning c_zero); "" is encoded like any prompt (c_empty), as in the research code.
    attribute_prompt: str | None = None
    seed: int = 0
    noise: str = "per_face"  # engine/noise.py: "per_face" (default) or "research" (the research code's exact draws)

    def __post_init__(self) -> None:
        """The one range check of the algorithm's parameters: every path (wire, CLI, config) builds this type."""
        if not (isinstance(self.skip, (int, float)) and 0.0 <= self.skip < 1.0):
            raise InvalidRequestError("params.skip", f"must be in [0, 1), got {self.skip!r}")
        if not (1 <= int(self.steps) <= MAX_STEPS):
            raise InvalidRequestError("params.steps", f"must be in [1, {MAX_STEPS}], got {self.steps!r}")
        from masquerade.engine.trajectory import inversion_timesteps

        try:
            inversion_timesteps(int(self.steps), float(self.skip))
        except ValueError as error:
            raise InvalidRequestError("params.steps", str(error)) from None
        for name in ("guidance_scale", "id_emb_scale", "ip_adapter_scale"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise InvalidRequestError(f"params.{name}", f"must be finite, got {value!r}")
        if abs(self.guidance_scale) > 100:
            raise InvalidRequestError("params.guidance_scale", f"must be within [-100, 100], got {self.guidance_scale}")
        if abs(self.id_emb_scale) > 100:
            raise InvalidRequestError("params.id_emb_scale", f"must be within [-100, 100], got {self.id_emb_scale}")
        if not 0 <= self.ip_adapter_scale <= 10:
            raise InvalidRequestError("params.ip_adapter_scale", f"must be within [0, 10], got {self.ip_adapter_scale}")
        if self.attribute_prompt is not None and len(self.attribute_prompt) > 1000:
            raise InvalidRequestError("params.attribute_prompt", "must be at most 1000 characters")
        if self.noise not in NOISE_MODES:
            raise InvalidRequestError("params.noise", f"must be one of {', '.join(NOISE_MODES)}, got {self.noise!r}")
        if not 0 <= int(self.seed) < 2**63:
            raise InvalidRequestError("params.seed", f"must be in [0, 2^63), got {self.seed}")


@dataclass(frozen=True)
class DetectionOptions:
    """Per-request detection options; None takes the server's setting (face/front_end DetectionDefaults)."""

    aligned: bool = False
    score_threshold: float | None = None  # calibrated detector score in [0, 1]
    min_face_size: int | None = None  # smaller faces are covered classically
    # Faces that take the generative path; the rest are covered classically (FALLBACK), never refused.
    # The server's own limit (EngineConfig.max_faces) is checked at admission.
    max_faces: int | None = None
    mask_scale: float | None = None  # classical covers' ellipse size, relative to the face

    def __post_init__(self) -> None:
        if self.score_threshold is not None and not (
            math.isfinite(self.score_threshold) and 0.0 <= self.score_threshold <= 1.0
        ):
            raise InvalidRequestError(
                "detection.score_threshold", f"must be a number in [0, 1], got {self.score_threshold!r}"
            )
        if self.min_face_size is not None and not 0 <= self.min_face_size <= MAX_MIN_FACE_SIZE:
            raise InvalidRequestError(
                "detection.min_face_size", f"must be in [0, {MAX_MIN_FACE_SIZE}] pixels, got {self.min_face_size}"
            )
        if self.max_faces is not None and self.max_faces < 1:
            raise InvalidRequestError("detection.max_faces", f"must be at least 1, got {self.max_faces}")
        if self.mask_scale is not None and not (math.isfinite(self.mask_scale) and 0.5 <= self.mask_scale <= 3.0):
            raise InvalidRequestError("detection.mask_scale", f"must be in [0.5, 3], got {self.mask_scale!r}")


@dataclass(frozen=True)
class OutputOptions:
    format: str | None = None  # "jpeg" | "png" | "webp"; None keeps the input's format
    quality: int = 95

    def __post_init__(self) -> None:
        if self.format not in (None, *OUTPUT_FORMATS):
            raise InvalidRequestError(
                "output.format", f"must be one of {', '.join(OUTPUT_FORMATS)} or unset, got {self.format!r}"
            )
        if not 1 <= self.quality <= 100:
            raise InvalidRequestError("output.quality", f"must be in [1, 100], got {self.quality}")


@dataclass(frozen=True)
class GivenFace:
    """A face the caller already located (a video tracker), with what stays fixed along its track."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the request's pixels
    landmarks: np.ndarray = field(repr=False)  # [68, 2] float32; [0, 2]: known by its box only (covered classically)
    score: float = 1.0
    # Generate with this [512] unit identity instead of the crop's own ArcFace (a track's mean).
    identity: np.ndarray | None = field(default=None, repr=False)
    # Draw the inversion noise from (params.seed, noise_index) instead of (seed, face index): a track's stream.
    noise_index: int | None = None


@dataclass
class EngineRequest:
    request_id: str
    image: bytes = field(repr=False)
    method: Method = Method.REVERSE_PERSONALIZATION
    params: ReversePersonalizationParams = field(default_factory=ReversePersonalizationParams)
    classical_strength: float = 1.0
    # How classical covers look for this request (ClassicalParams.shape and .mosaic_size); None: the
    # front end's (the CLI's --shape and --mosaic-size; a server's: ellipse, squares of face width / 8).
    cover_shape: str | None = None
    mosaic_size: int | None = None
    detection: DetectionOptions = field(default_factory=DetectionOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    # Who asks and how urgently (the API layer resolves both from the caller's token): the
    # scheduler and the preprocess pool serve interactive work first; clients take turns.
    priority: Priority = Priority.INTERACTIVE
    client: str = ""
    deadline: float | None = None  # time.monotonic() by which the caller needs the result; None: none
    # Video frames (masquerade.video): pixels instead of encoded bytes (the result's image is then the raw
    # RGB bytes, format "raw"), faces given by the caller's tracker instead of detected, and the
    # self-check left to the caller's sampling.
    pixels: np.ndarray | None = field(default=None, repr=False)  # [H, W, 3] uint8 RGB
    given_faces: tuple[GivenFace, ...] | None = None
    self_check: bool = True

    def __post_init__(self) -> None:
        if not self.image and self.pixels is None:
            raise InvalidRequestError("image", "is empty; send the encoded JPEG, PNG or WebP bytes")
        if not (math.isfinite(self.classical_strength) and 0.0 < self.classical_strength <= 10.0):
            raise InvalidRequestError(
                "classical.strength", f"must be a finite number in (0, 10], got {self.classical_strength!r}"
            )
        if self.cover_shape not in (None, *COVER_SHAPES):
            raise InvalidRequestError(
                "classical.shape", f"must be one of {', '.join(COVER_SHAPES)}, got {self.cover_shape!r}"
            )
        if self.mosaic_size is not None:
            low, high = MOSAIC_SIZES
            if not low <= self.mosaic_size <= high:
                raise InvalidRequestError(
                    "classical.mosaic_size", f"must be in [{low}, {high}] pixels, got {self.mosaic_size}"
                )
            if self.method is not Method.PIXELATE:
                raise InvalidRequestError(
                    "classical.mosaic_size", f"is for method PIXELATE only; this request's method is {self.method.name}"
                )


class FaceStatus(enum.Enum):
    ANONYMIZED = "anonymized"
    FALLBACK = "fallback"
    SKIPPED = "skipped"


@dataclass
class FaceRecord:
    """What was done to one face. Landmarks and box are geometry, not pixels."""

    index: int
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in input pixels
    landmarks: np.ndarray = field(repr=False)  # [68, 2] float32, or [0, 2] in aligned mode
    score: float
    method_applied: Method
    status: FaceStatus
    reason: str = ""
    identity_similarity_before: float | None = None
    identity_similarity_after: float | None = None
    verifier_distance: float | None = None

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "box": [round(float(v), 2) for v in self.box],
            "score": round(float(self.score), 4),
            "method_applied": self.method_applied.value,
            "status": self.status.value,
            "reason": self.reason,
            "identity_similarity_before": self.identity_similarity_before,
            "identity_similarity_after": self.identity_similarity_after,
            "verifier_distance": self.verifier_distance,
        }


@dataclass
class Timings:
    queued_seconds: float = 0.0
    preprocess_seconds: float = 0.0
    inversion_seconds: float = 0.0
    generation_seconds: float = 0.0
    postprocess_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass
class AnonymizeResult:
    request_id: str
    image: bytes = field(repr=False)
    format: str
    width: int
    height: int
    faces: list[FaceRecord]
    timings: Timings
    model_versions: dict[str, str] = field(default_factory=dict)
    residual_recognisable: int = 0  # faces the self-check still recognised after every re-cover

    @property
    def no_faces(self) -> bool:
        return not self.faces

    @property
    def complete(self) -> bool:
        """True only when every detected face was covered and the self-check recognised none."""
        return self.residual_recognisable == 0 and all(face.status is not FaceStatus.SKIPPED for face in self.faces)


@dataclass(frozen=True)
class QueuedEvent:
    request_id: str
    position: int


@dataclass(frozen=True)
class FacesFoundEvent:
    request_id: str
    boxes: tuple[tuple[float, float, float, float], ...]


@dataclass(frozen=True)
class ProgressEvent:
    request_id: str
    phase: Phase
    step: int
    total: int


@dataclass(frozen=True)
class ResultEvent:
    request_id: str
    result: AnonymizeResult


@dataclass(frozen=True)
class FailedEvent:
    """Terminal failure of a whole request; ``error`` is the exception to map to a status."""

    request_id: str
    error: BaseException


EngineEvent = QueuedEvent | FacesFoundEvent | ProgressEvent | ResultEvent | FailedEvent
