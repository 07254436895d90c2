"""The self-check: is any face still recognisable in the output?

After anonymizing, the detector runs again on the output and dlib's 128-d
descriptor (independent of the ArcFace that drives generation) compares each
original face with what is now at its place: the output at the original's
landmarks, and any face the detector finds overlapping it. A distance under
dlib's 0.6 means the same person is still there. A region is compared only if
it is a face to begin with: a second detector must confirm the original region
(the descriptor embeds anything it is given, a badge included, and two crops of
one badge are always "the same person").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .detect import DetectedFace, FaceDetector
from .detectors import DetectorUnavailableError
from .verify import SAME_PERSON_THRESHOLD, DlibVerifier

CONFIRM_THRESHOLD = 0.3  # lenient: the confirmer only has to see *a* face in the region
CONFIRM_SIDE = 96  # px: the region is scaled so the face is about this wide for the confirmer

Box = tuple[float, float, float, float]


@dataclass
class Verdict:
    distances: dict[int, float] = field(default_factory=dict)  # by face index: smallest descriptor distance found
    recognisable: list[int] = field(default_factory=list)  # face indices under SAME_PERSON_THRESHOLD
    new_faces: list[DetectedFace] = field(default_factory=list)  # output faces overlapping no original face


def iou(a: Box, b: Box) -> float:
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _overlaps(a: Box, b: Box) -> bool:
    """Same face: boxes overlap well, or one's centre lies inside the other (detectors differ in box style)."""
    if iou(a, b) >= 0.3:
        return True
    for inner, outer in ((a, b), (b, a)):
        cx, cy = (inner[0] + inner[2]) / 2, (inner[1] + inner[3]) / 2
        if outer[0] <= cx <= outer[2] and outer[1] <= cy <= outer[3]:
            return True
    return False


class SelfCheck:
    """Thread-safe: the detectors' backends and the verifier's dlib models are per-thread or documented safe."""

    def __init__(self, detector: FaceDetector):
        self.detector = detector
        self.verifier = DlibVerifier()
        try:
            self.confirmer = detector if detector.kind == "centerface" else FaceDetector("centerface")
        except DetectorUnavailableError:
            self.confirmer = detector

    def is_face(self, rgb: np.ndarray, box: Box) -> bool:
        """Does the confirmer see a face at ``box``? Runs on a small crop around it."""
        import cv2

        height, width = rgb.shape[:2]
        side = max(box[2] - box[0], box[3] - box[1], 1.0)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        x0, y0 = int(max(cx - side, 0)), int(max(cy - side, 0))
        x1, y1 = int(min(cx + side, width)), int(min(cy + side, height))
        if x1 - x0 < 4 or y1 - y0 < 4:
            return False
        scale = CONFIRM_SIDE / side
        crop = cv2.resize(
            rgb[y0:y1, x0:x1],
            (max(int((x1 - x0) * scale), 1), max(int((y1 - y0) * scale), 1)),
            interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
        )
        found = self.confirmer.backend.find(np.ascontiguousarray(crop), CONFIRM_THRESHOLD)
        local = ((box[0] - x0) * scale, (box[1] - y0) * scale, (box[2] - x0) * scale, (box[3] - y0) * scale)
        return any(_overlaps(local, tuple(b)) for b in found.boxes)

    def describe_originals(self, original: np.ndarray, faces: list[tuple[Box, np.ndarray]]) -> list[np.ndarray | None]:
        """Each face's descriptor, or None where there is nothing to compare (no landmarks, not a face)."""
        descriptors = []
        for box, landmarks in faces:
            if landmarks.shape != (68, 2) or not self.is_face(original, box):
                descriptors.append(None)
            else:
                descriptors.append(self.verifier.descriptor(original, landmarks))
        return descriptors

    def inspect(
        self,
        output: np.ndarray,
        faces: list[tuple[Box, np.ndarray]],
        originals: list[np.ndarray | None],
        threshold: float,
        look_for_new: bool = True,
    ) -> Verdict:
        verdict = Verdict()
        found = [f for f in self.detector.detect(output, threshold, small_faces=False) if f.landmarks.shape == (68, 2)]
        described: dict[int, np.ndarray] = {}
        for index, ((box, landmarks), descriptor) in enumerate(zip(faces, originals)):
            if descriptor is None:
                continue
            # What is now at the original's landmarks, and any detected face on top of it.
            distances = [self.verifier.distance(descriptor, self.verifier.descriptor(output, landmarks))]
            eye_distance = max(float(np.linalg.norm(landmarks[36:42].mean(0) - landmarks[42:48].mean(0))), 1.0)
            for number, face in enumerate(found):
                # A face found where the original's landmarks already are is the measurement above.
                same_place = np.linalg.norm(face.landmarks - landmarks, axis=1).mean() < 0.1 * eye_distance
                if _overlaps(box, face.box) and not same_place:
                    if number not in described:
                        described[number] = self.verifier.descriptor(output, face.landmarks)
                    distances.append(self.verifier.distance(descriptor, described[number]))
            verdict.distances[index] = min(distances)
            if verdict.distances[index] < SAME_PERSON_THRESHOLD:
                verdict.recognisable.append(index)
        if look_for_new:
            verdict.new_faces = [f for f in found if not any(_overlaps(box, f.box) for box, _ in faces)]
        return verdict
