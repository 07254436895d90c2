"""An independent identity check: dlib's 128-d ResNet face descriptor.

dlib cuts the face chip; the network runs in onnxruntime (dlib_net.py: the same weights and
layers, 25x faster than the BLAS-less dlib wheel, and it releases the GIL), or in dlib itself
where the model file cannot be rebuilt.

Used for the per-face receipt ("verifier_distance"): the distance between a
face before and after anonymization. dlib's model is not the ArcFace that
drives generation, so a large distance here is evidence, not self-grading.
"""

from __future__ import annotations

import threading

import numpy as np

from .detect import _check_rgb, _dlib, box_to_rectangle, load_shape_predictor
from .dlib_net import CHIP_PADDING, CHIP_SIZE, shared_descriptor_net

# dlib's documented operating point: descriptors closer than 0.6 are the same
# person (99.38% on LFW).
SAME_PERSON_THRESHOLD = 0.6


# dlib documents no thread-safety for face_recognition_model_v1: one instance per thread.
_thread_models = threading.local()


def _load_recognizer():
    recognizer = getattr(_thread_models, "recognizer", None)
    if recognizer is None:
        import face_recognition_models

        recognizer = _dlib().face_recognition_model_v1(face_recognition_models.face_recognition_model_location())
        _thread_models.recognizer = recognizer
    return recognizer


def _descriptor_net():
    import face_recognition_models

    return shared_descriptor_net(face_recognition_models.face_recognition_model_location())


class DlibVerifier:
    """128-d descriptors and their Euclidean distance. Models load on first use, once per thread."""

    @staticmethod
    def _models():
        return load_shape_predictor(), _load_recognizer()

    def descriptor(self, rgb: np.ndarray, landmarks) -> np.ndarray:
        """[128] float32 for the face with ``landmarks``: a [68, 2] array or a dlib full_object_detection."""
        return self.descriptors(rgb, [landmarks])[0]

    def descriptors(self, rgb: np.ndarray, landmarks_list: list) -> list[np.ndarray]:
        """``descriptor`` for several faces of one image: one network run for all of them."""
        if not landmarks_list:
            return []
        rgb = _check_rgb(rgb)
        shapes = [
            landmarks if not isinstance(landmarks, np.ndarray) else _to_object_detection(landmarks)
            for landmarks in landmarks_list
        ]
        net = _descriptor_net()
        if net is None:
            _, recognizer = self._models()
            return [np.asarray(recognizer.compute_face_descriptor(rgb, shape), dtype=np.float32) for shape in shapes]
        chips = [_dlib().get_face_chip(rgb, shape, size=CHIP_SIZE, padding=CHIP_PADDING) for shape in shapes]
        return list(net.describe(np.stack(chips)))

    def descriptor_in_box(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray | None:
        """Re-fit the 68 landmarks inside ``box`` and describe that face; None if the box is empty.

        The predictor always places 68 points in a box, so this works even on a
        blurred or pixelated face, where a detector would find nothing.
        """
        rgb = _check_rgb(rgb)
        height, width = rgb.shape[:2]
        x0, y0, x1, y1 = box
        if min(x1, width) - max(x0, 0) < 2 or min(y1, height) - max(y0, 0) < 2:
            return None
        return self.descriptor(rgb, load_shape_predictor()(rgb, box_to_rectangle(box)))

    @staticmethod
    def distance(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))

    def same_person(self, a: np.ndarray, b: np.ndarray) -> bool:
        return self.distance(a, b) < SAME_PERSON_THRESHOLD


def _to_object_detection(landmarks68: np.ndarray):
    dlib = _dlib()
    points = np.asarray(landmarks68, dtype=np.float64)
    if points.shape != (68, 2):
        raise ValueError(f"expected [68, 2] landmarks, got {points.shape}")
    x0, y0 = np.floor(points.min(0)).astype(int)
    x1, y1 = np.ceil(points.max(0)).astype(int)
    parts = dlib.points([dlib.point(int(round(x)), int(round(y))) for x, y in points])
    return dlib.full_object_detection(dlib.rectangle(int(x0), int(y0), int(x1), int(y1)), parts)
