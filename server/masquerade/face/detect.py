"""Face detection and 68-point landmarks (dlib HOG or MMOD CNN; optional SFD+FAN).

dlib's models ship offline in ``face_recognition_models``; they are loaded
lazily, once per process, the first time a detector or verifier needs them.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DETECTOR_KINDS = ("hog", "cnn", "sfd")


class DetectorUnavailableError(RuntimeError):
    """The configured detector kind cannot run here (missing package or weights)."""


@dataclass
class DetectedFace:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in input pixels, clipped to the image
    landmarks: np.ndarray = field(repr=False)  # [68, 2] float32, dlib's 68-point (iBUG 300-W) order
    score: float  # the detector's confidence; comparable only within one detector kind


def _dlib():
    import dlib  # deferred: importing dlib costs ~0.2 s and the API layer never needs it

    return dlib


@functools.cache
def load_shape_predictor():
    import face_recognition_models

    return _dlib().shape_predictor(face_recognition_models.pose_predictor_model_location())


def landmarks_in_box(rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """[68, 2] float32: the 68-point predictor run inside ``box`` (it always returns 68 points)."""
    return shape_to_array(load_shape_predictor()(rgb, box_to_rectangle(box)))


def box_to_rectangle(box: tuple[float, float, float, float]):
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    # dlib rectangles are inclusive of their right/bottom pixel.
    return _dlib().rectangle(x0, y0, max(x1 - 1, x0), max(y1 - 1, y0))


def shape_to_array(shape) -> np.ndarray:
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
        raise ValueError(f"expected a uint8 [H, W, 3] RGB array, got {getattr(rgb, 'shape', type(rgb))}")
    return np.ascontiguousarray(rgb)


class FaceDetector:
    """Finds faces and their 68 landmarks.

    kind: "hog" (dlib's frontal HOG detector: fast on CPU, frontal faces of
    ~80 px and up at upsample 0, ~40 px at upsample 1), "cnn" (dlib's MMOD
    CNN: handles more pose, slow on CPU) or "sfd" (face-alignment's SFD
    detector + FAN landmarks, only if that package and its weights are
    already installed). ``upsample`` doubles the image that many times before
    detecting, for small faces.
    """

    def __init__(self, kind: str = "hog", upsample: int = 1):
        if kind not in DETECTOR_KINDS:
            raise ValueError(f"detector kind must be one of {DETECTOR_KINDS}, got {kind!r}")
        if not 0 <= int(upsample) <= 4:
            raise ValueError(f"upsample must be in [0, 4], got {upsample!r}")
        self.kind = kind
        self.upsample = int(upsample)
        self._model = None
        self._lock = threading.Lock()
        if kind == "sfd":
            _check_sfd_available()

    def _load(self):
        with self._lock:
            if self._model is None:
                if self.kind == "hog":
                    self._model = _dlib().get_frontal_face_detector()
                elif self.kind == "cnn":
                    import face_recognition_models

                    self._model = _dlib().cnn_face_detection_model_v1(
                        face_recognition_models.cnn_face_detector_model_location()
                    )
                else:
                    self._model = _load_sfd()
            return self._model

    def detect(self, rgb: np.ndarray, score_threshold: float = 0.0) -> list[DetectedFace]:
        """Faces in ``rgb`` (uint8 [H, W, 3]) with score >= ``score_threshold``, sorted left to right.

        For "hog" a negative threshold lets dlib return weaker candidates too.
        """
        rgb = _check_rgb(rgb)
        model = self._load()
        if self.kind == "sfd":
            faces = _detect_sfd(model, rgb)
        else:
            if self.kind == "hog":
                rects, scores, _ = model.run(rgb, self.upsample, float(min(score_threshold, 0.0)))
                found = list(zip(rects, scores))
            else:
                found = [(d.rect, d.confidence) for d in model(rgb, self.upsample)]
            predictor = load_shape_predictor()
            faces = [
                DetectedFace(
                    box=_clip_box((r.left(), r.top(), r.right() + 1, r.bottom() + 1), rgb.shape),
                    landmarks=shape_to_array(predictor(rgb, r)),
                    score=float(score),
                )
                for r, score in found
            ]
        faces = [f for f in faces if f.score >= score_threshold and f.box[2] > f.box[0] and f.box[3] > f.box[1]]
        return sorted(faces, key=lambda f: (f.box[0], f.box[1]))


def _clip_box(box, shape) -> tuple[float, float, float, float]:
    height, width = shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))


# ---------------------------------------------------------------- optional SFD + FAN

_SFD_WEIGHT_PREFIXES = ("s3fd", "2DFAN4")


def _check_sfd_available() -> None:
    try:
        import face_alignment  # noqa: F401
        import torch
    except ImportError as exc:
        raise DetectorUnavailableError(
            "detector 'sfd' needs the face-alignment package, which is not installed; "
            "use kind 'hog' or 'cnn', or install face-alignment and its weights"
        ) from exc
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    missing = [p for p in _SFD_WEIGHT_PREFIXES if not any(checkpoints.glob(p + "*"))]
    if missing:
        # face-alignment would download them on first use; this server never fetches at run time.
        raise DetectorUnavailableError(
            f"detector 'sfd' needs face-alignment's weights {missing} in {checkpoints}; "
            "fetch them ahead of time or use kind 'hog' or 'cnn'"
        )


def _load_sfd():
    import face_alignment

    landmarks_type = getattr(face_alignment.LandmarksType, "TWO_D", None) or face_alignment.LandmarksType._2D
    return face_alignment.FaceAlignment(landmarks_type, device="cpu", face_detector="sfd", flip_input=False)


def _detect_sfd(model, rgb: np.ndarray) -> list[DetectedFace]:
    landmarks, _, boxes = model.get_landmarks_from_image(rgb, return_bboxes=True)
    faces = []
    for points, box in zip(landmarks or [], boxes or []):
        faces.append(
            DetectedFace(
                box=_clip_box(box[:4], rgb.shape),
                landmarks=np.asarray(points, dtype=np.float32)[:, :2],
                score=float(box[4]) if len(box) > 4 else 1.0,
            )
        )
    return faces
