"""Face detection at bounded cost, and the 68 landmarks that drive alignment.

``FaceDetector`` runs one backend (detectors.py: centerface, scrfd, hog, cnn) on a
copy of the image whose longest side is at most ``max_side`` px, plus, for small
faces in large photos, on overlapping tiles of a finer copy whose pixel count is
at most ``fine_pixels``; boxes and points are mapped back to the input and merged.
The 68-point predictor (dlib, offline in ``face_recognition_models``) then runs
on the full-resolution input inside each face's box, converted to the box
convention the predictor was trained on (dlib's HOG boxes).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..cancellation import check as check_cancelled
from .detectors import DetectorUnavailableError, RawFaces, make_backend, nms

DETECTOR_KINDS = ("centerface", "scrfd", "hog", "cnn")
DEFAULT_DETECTOR = "centerface"
# The operating point every backend's calibrated score is tuned to (see benchmarks/detection.py).
DEFAULT_THRESHOLD = 0.5
MAX_DETECTIONS = 1024  # faces that get 68 landmarks; any past it are still covered, by their box

__all__ = [
    "DEFAULT_DETECTOR",
    "DEFAULT_THRESHOLD",
    "DETECTOR_KINDS",
    "MAX_DETECTIONS",
    "DetectedFace",
    "DetectorUnavailableError",
    "FaceDetector",
    "load_shape_predictor",
]


@dataclass
class DetectedFace:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in input pixels, clipped to the image
    landmarks: np.ndarray = field(repr=False)  # [68, 2] float32 (iBUG 300-W order), or [0, 2] past MAX_DETECTIONS
    score: float  # calibrated to [0, 1], comparable across detector kinds
    five: np.ndarray | None = field(default=None, repr=False)  # [5, 2] the detector's own points, if it has them


def _dlib():
    import dlib  # deferred: importing dlib costs ~0.2 s and the API layer never needs it

    return dlib


# dlib documents no thread-safety for shape_predictor: one instance per thread (loaded once per thread).
_thread_models = threading.local()


def load_shape_predictor():
    predictor = getattr(_thread_models, "shape_predictor", None)
    if predictor is None:
        import face_recognition_models

        predictor = _dlib().shape_predictor(face_recognition_models.pose_predictor_model_location())
        _thread_models.shape_predictor = predictor
    return predictor


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


# The 68-point predictor was trained on dlib's HOG boxes (brows to chin, square). From the
# five points (any detector's: same semantics), a least-squares fit on faces both detectors
# found (median over 24 faces of t1.jpg, the astronaut and Tom_Hanks at 0.6x/1x/1.5x): centre
# and side in units of the eye-to-mouth distance, from the midpoint of the eye and mouth
# centres. It puts the 68 points within 1.5 % of the eye distance of their HOG-box fit
# (median), against 3.5 % (up to 60 %) on CenterFace's own box.
_PREDICTOR_BOX_FROM_FIVE = (0.0, -0.04, 2.19)  # (dx, dy, side) in eye-mouth units; +dy towards the mouth


def predictor_box(box: tuple[float, float, float, float], five: np.ndarray | None) -> tuple[float, float, float, float]:
    """The box, in dlib's HOG convention, to run the 68-point predictor in."""
    if five is None:
        return box
    eyes, mouth = five[:2].mean(0), five[3:5].mean(0)
    unit = max(float(np.hypot(*(mouth - eyes))), 0.25 * float(np.hypot(*(five[1] - five[0]))), 1.0)
    dx, dy, side = _PREDICTOR_BOX_FROM_FIVE
    # The face's own up direction, so a rotated face gets a box centred on it.
    up = (mouth - eyes) / max(float(np.hypot(*(mouth - eyes))), 1e-6)
    right = np.array([-up[1], up[0]])
    centre = (eyes + mouth) / 2 + unit * (dx * right + dy * up)
    half = side * unit / 2
    return (float(centre[0] - half), float(centre[1] - half), float(centre[0] + half), float(centre[1] + half))


class FaceDetector:
    """Finds faces, with calibrated scores and 68 landmarks, at a cost bounded for any image size.

    kind: "centerface" (default, offline ONNX), "scrfd" (buffalo_l's det_10g.onnx, needs
    ``model_dir``), "hog" or "cnn" (dlib; ``upsample`` doubles small images for faces
    under ~80 px). Thread-safe: backends hold per-thread or documented thread-safe models.
    """

    def __init__(
        self,
        kind: str = DEFAULT_DETECTOR,
        upsample: int = 1,
        *,
        model_dir=None,
        max_side: int = 2048,
        fine_pixels: int = 16_000_000,
        max_upscale: float = 1.0,
        detect_scale: float = 1.0,
        intra_op_threads: int | None = None,
        arena_keep_pixels: int | None = None,
    ):
        """``detect_scale`` < 1 runs detection on smaller copies only (landmarks and covers stay at full
        resolution): faster, at the cost of the smallest faces. ``intra_op_threads``: an ONNX session of
        this detector's own with that many threads (one per worker of a pool), else the shared one.
        ``arena_keep_pixels``: the ONNX backends keep their working memory between inputs up to this
        size (detectors.ARENA_KEEP_PIXELS by default: a long-lived server's bound)."""
        if kind not in DETECTOR_KINDS:
            raise ValueError(f"detector kind must be one of {DETECTOR_KINDS}, got {kind!r}")
        if not 0 <= int(upsample) <= 2:
            raise ValueError(f"upsample must be in [0, 2], got {upsample!r}")
        self.kind = kind
        self.max_side = int(max_side)
        self.fine_pixels = int(fine_pixels)
        self.max_upscale = float(max_upscale)
        if not (math.isfinite(detect_scale) and 0.05 <= detect_scale <= 1.0):
            raise ValueError(f"detect_scale must be in [0.05, 1], got {detect_scale!r}")
        self.detect_scale = float(detect_scale)
        self.backend = make_backend(
            kind,
            model_dir=model_dir,
            upsample=upsample,
            intra_op_threads=intra_op_threads,
            arena_keep_pixels=arena_keep_pixels,
        )

    def coarse_scale(self, height: int, width: int) -> float:
        """The scale of the first (coarse) level for a whole image of ``height`` x ``width``."""
        return min(1.0, self.max_side / max(height, width)) * self.detect_scale

    # ---- detection ------------------------------------------------------------------

    def find(
        self,
        rgb: np.ndarray,
        score_threshold: float = DEFAULT_THRESHOLD,
        small_faces: bool = True,
        levels_of: tuple[int, int] | None = None,
        *,
        large_faces: bool = True,
        scale: float | None = None,
    ) -> RawFaces:
        """Boxes, scores and five points (if the backend has them) in ``rgb``'s pixels, merged over levels.

        ``small_faces=False`` skips the fine tiles (the self-check: a face too small for the
        coarse copy is too small for the identity descriptor too). ``levels_of``: the (height,
        width) of the whole image when ``rgb`` is a crop of it, so the crop is searched at the
        scales the whole image would be (the self-check's crops around what changed).
        ``large_faces=False`` skips the half-scale level (video: tracking carries large faces
        between the frames that run it). ``scale``: one level only, ``rgb`` resized by this factor
        (the self-check searches each covered region at a scale that suits the region's size).
        """
        rgb = _check_rgb(rgb)
        if scale is not None:
            check_cancelled()
            return _merge([_scaled(self.backend.find(_resize(rgb, scale), score_threshold), scale)])
        height, width = rgb.shape[:2]
        whole_h, whole_w = levels_of or (height, width)
        coarse = self.coarse_scale(whole_h, whole_w)
        check_cancelled()
        found = [_scaled(self.backend.find(_resize(rgb, coarse), score_threshold), coarse)]
        # Large faces (a third of the image and up) are found more reliably at half that scale.
        if (
            large_faces
            and self.backend.native_min_face < 40
            and min(whole_h, whole_w) * coarse >= 256
            and min(height, width) >= 8
        ):
            check_cancelled()
            raw = _scaled(self.backend.find(_resize(rgb, coarse / 2), score_threshold), coarse / 2)
            sides = np.minimum(raw.boxes[:, 2] - raw.boxes[:, 0], raw.boxes[:, 3] - raw.boxes[:, 1])
            found.append(_select(raw, sides * coarse >= 128))
        # Small faces: a finer copy in tiles, when the backend can use it (the dlib ones are
        # too slow per pixel). Only faces the coarse copy is too small to see are kept from it.
        fine = min(self.max_upscale, math.sqrt(self.fine_pixels / (height * width))) * self.detect_scale
        if small_faces and self.backend.native_min_face < 40 and fine > 1.4 * coarse:
            small_limit = 3.0 * self.backend.native_min_face / coarse
            for tile, (x, y) in _tiles(_resize(rgb, fine), size=1024, overlap=128):
                check_cancelled()  # a cancelled request's detection stops between tiles
                raw = _scaled(self.backend.find(tile, score_threshold), fine, (x, y))
                sides = np.minimum(raw.boxes[:, 2] - raw.boxes[:, 0], raw.boxes[:, 3] - raw.boxes[:, 1])
                found.append(_select(raw, sides < small_limit))
        return _merge(found)

    def detect(
        self,
        rgb: np.ndarray,
        score_threshold: float = DEFAULT_THRESHOLD,
        max_landmarked: int = MAX_DETECTIONS,
        small_faces: bool = True,
        levels_of: tuple[int, int] | None = None,
        *,
        scale: float | None = None,
    ) -> list[DetectedFace]:
        """Faces in ``rgb`` (uint8 [H, W, 3]) with score >= ``score_threshold``, sorted left to right.

        The ``max_landmarked`` best get 68 landmarks; any others get an empty [0, 2] array.
        ``small_faces``, ``levels_of`` and ``scale``: as in ``find``.
        """
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold!r}")
        rgb = _check_rgb(rgb)
        raw = self.find(rgb, score_threshold, small_faces, levels_of, scale=scale)
        order = np.argsort(-raw.scores, kind="stable")
        # Loaded on the first face only: reading the 100 MB model is most of a face-free image's time.
        predictor = load_shape_predictor() if len(order) else None
        faces = []
        for rank, i in enumerate(order):
            check_cancelled()
            box = _clip_box(raw.boxes[i], rgb.shape)
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                continue
            five = None if raw.five is None else raw.five[i]
            if rank < max_landmarked:
                rect = box_to_rectangle(predictor_box(box, five))
                landmarks = shape_to_array(predictor(rgb, rect))
            else:
                landmarks = np.zeros((0, 2), np.float32)
            faces.append(DetectedFace(box=box, landmarks=landmarks, score=float(raw.scores[i]), five=five))
        return sorted(faces, key=lambda f: (f.box[0], f.box[1]))


def _resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    if abs(scale - 1.0) < 1e-6:
        return rgb
    height, width = rgb.shape[:2]
    size = (max(int(round(width * scale)), 1), max(int(round(height * scale)), 1))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def _tiles(rgb: np.ndarray, size: int, overlap: int):
    """Tiles of at most ``size`` px, overlapping by ``overlap``, as few and as even as possible."""
    height, width = rgb.shape[:2]

    def spans(length):
        if length <= size:
            return [(0, length)]
        count = math.ceil((length - overlap) / (size - overlap))
        side = math.ceil((length + (count - 1) * overlap) / count)
        return [(int(round(v)), side) for v in np.linspace(0, length - side, count)]

    for y, tile_h in spans(height):
        for x, tile_w in spans(width):
            yield rgb[y : y + tile_h, x : x + tile_w], (x, y)


def _scaled(raw: RawFaces, scale: float, origin: tuple[int, int] = (0, 0)) -> RawFaces:
    shift = np.array(origin, np.float32)
    boxes = (raw.boxes + np.tile(shift, 2)) / scale
    five = None if raw.five is None else (raw.five + shift) / scale
    return RawFaces(boxes.astype(np.float32), raw.scores, five)


def _select(raw: RawFaces, keep: np.ndarray) -> RawFaces:
    return RawFaces(raw.boxes[keep], raw.scores[keep], None if raw.five is None else raw.five[keep])


def _merge(parts: list[RawFaces]) -> RawFaces:
    boxes = np.concatenate([p.boxes for p in parts])
    scores = np.concatenate([p.scores for p in parts])
    five = None if any(p.five is None for p in parts) else np.concatenate([p.five for p in parts])
    raw = _select(RawFaces(boxes, scores, five), nms(boxes, scores, 0.4))
    # A face cut by a tile edge, or half a face seen at the finer scale, leaves a partial box
    # mostly inside the whole one: drop boxes mostly inside a larger box (the larger covers more).
    keep = np.ones(len(raw.boxes), bool)
    x0, y0, x1, y1 = raw.boxes.T
    areas = np.maximum(x1 - x0, 1e-6) * np.maximum(y1 - y0, 1e-6)
    for i in np.argsort(-areas, kind="stable"):
        if not keep[i]:
            continue
        w = np.maximum(np.minimum(x1[i], x1) - np.maximum(x0[i], x0), 0)
        h = np.maximum(np.minimum(y1[i], y1) - np.maximum(y0[i], y0), 0)
        inside = (w * h / areas > 0.7) & (areas < areas[i]) & (areas > areas[i] / 4)
        keep &= ~inside
    return _select(raw, keep)


def _clip_box(box, shape) -> tuple[float, float, float, float]:
    height, width = shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))
