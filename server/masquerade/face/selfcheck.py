"""The self-check: is any face still recognisable in the output?

After anonymizing, the detector runs again on the output and dlib's 128-d
descriptor (independent of the ArcFace that drives generation) compares each
original face with what is now at its place: the output at the original's
landmarks, and any face the detector finds overlapping it. A distance under
dlib's 0.6 means the same person is still there. A region is compared only if
it is a face to begin with: a second detector must confirm the original region
(the descriptor embeds anything it is given, a badge included, and two crops of
one badge are always "the same person").

The detector runs again only around what changed (``changed_regions``): outside
the covers the output's pixels are the input's, so the same detector, at the same
scales, finds there what the first pass found (docs/design.md, "The self-check
looks where the pixels changed"). Each changed region, and each original face, is
searched in a crop with a margin of context twice as wide as the region, at one scale
chosen for the region's size (``REGION_SIDE``): a face on top of a cover is about the
cover's size. A face found away from every changed pixel counts only if the whole
image's scales find it there too. A second inspect after a re-cover searches only
around what the re-cover changed, and descriptors are computed once per face and
pixel content.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import cv2
import numpy as np

from .detect import DetectedFace, FaceDetector
from .detectors import DetectorUnavailableError
from .verify import SAME_PERSON_THRESHOLD, DlibVerifier

CONFIRM_THRESHOLD = 0.3  # lenient: the confirmer only has to see *a* face in the region
CONFIRM_SIDE = 96  # px: the region is scaled so the face is about this wide for the confirmer
CHANGE_BLOCK = 16  # px: changed pixels are located to blocks of this side
CONTEXT_FACTOR = 2.0  # the margin of context around a changed region, in multiples of its size
MIN_CONTEXT = 64  # px at the detection scale: the least margin of context around a changed region
MAX_CROPS = 64  # crops per inspect, follow-ups for faces cut by a crop's edge included
WHOLE_IMAGE_SHARE = 0.6  # crops covering more than this share of the image: search the whole image instead
# A changed region is searched at the scale that makes it about this wide (never finer than the whole
# image's first level): a face on top of a cover is about the cover's size, which is where the
# detector's sweet spot is (FaceDetector keeps faces over 128 px from its half-scale level), and a
# face under a tenth of it (the detector's 12 px) lay in unchanged pixels, which the first pass searched.
REGION_SIDE = 128
SAME_SCALE = 1.5  # overlapping crops whose scales differ by less than this factor are searched as one

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


def changed_regions(original: np.ndarray, output: np.ndarray, block: int = CHANGE_BLOCK) -> list[Box]:
    """Boxes (to ``block`` px) around every connected group of pixels where ``output`` differs from ``original``."""
    if original.shape != output.shape:
        raise ValueError(f"original {original.shape} and output {output.shape} differ in size")
    height, width = original.shape[:2]
    # OpenCV throughout: numpy's reduction over the 3 channels of a 12 Mpx image takes 0.5 s. The
    # channels are folded into one before the padding and the block average: each changed channel
    # is 255 after the threshold, and grey weighs every channel above zero (the smallest, blue, at
    # 0.114 * 255 = 29), so a pixel is non-zero in grey exactly when one of its channels changed.
    # 12 Mpx: 15 ms to fold, against 35 for split-and-max and 500 for numpy.
    _, changed = cv2.threshold(cv2.absdiff(original, output), 0, 255, cv2.THRESH_BINARY)
    if changed.ndim == 3:
        _, changed = cv2.threshold(cv2.cvtColor(changed, cv2.COLOR_RGB2GRAY), 0, 255, cv2.THRESH_BINARY)
    cols, rows = -(-width // block), -(-height // block)
    padded = cv2.copyMakeBorder(changed, 0, rows * block - height, 0, cols * block - width, cv2.BORDER_CONSTANT, 0)
    # A block with one changed pixel in it averages to 255 / block**2 > 0.5: it rounds to 1, not 0.
    blocks = cv2.resize(padded, (cols, rows), interpolation=cv2.INTER_AREA).reshape(rows, cols, -1).max(axis=2)
    if not blocks.any():
        return []
    count, _, stats, _ = cv2.connectedComponentsWithStats((blocks > 0).astype(np.uint8), connectivity=8)
    regions = []
    for x, y, w, h, _area in stats[1:count]:
        regions.append((float(x * block), float(y * block), float(min((x + w) * block, width)),
                        float(min((y + h) * block, height))))  # fmt: skip
    return regions


def context_crops(
    regions: list[Box], shape: tuple[int, ...], min_margin: float, align: int = 1
) -> list[tuple[int, int, int, int]]:
    """Each region grown by a margin twice as wide as itself (at least ``min_margin``), overlapping crops merged.

    Twice: a neighbour as large as the covered face, up to a face's width away, lies wholly inside
    (the detector does not find a face the crop's edge cuts in half).

    Crop origins are multiples of ``align``, so that the detector's grid over a crop is its grid over
    the whole image (its strides reach 32 px, and the half-scale level doubles that).
    """
    height, width = shape[:2]
    crops = []
    for x0, y0, x1, y1 in regions:
        margin = max(CONTEXT_FACTOR * (x1 - x0), CONTEXT_FACTOR * (y1 - y0), min_margin)
        left, top = max(int(x0 - margin), 0) // align * align, max(int(y0 - margin), 0) // align * align
        crops.append([left, top, min(int(np.ceil(x1 + margin)), width), min(int(np.ceil(y1 + margin)), height)])
    merged = True
    while merged:  # union of overlapping crops, until none overlap
        merged = False
        for i in range(len(crops)):
            for j in range(i + 1, len(crops)):
                a, b = crops[i], crops[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    crops[i] = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
                    del crops[j]
                    merged = True
                    break
            if merged:
                break
    return [tuple(c) for c in crops]


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
        comparable = [
            index
            for index, (box, landmarks) in enumerate(faces)
            if landmarks.shape == (68, 2) and self.is_face(original, box)
        ]
        described = self.verifier.descriptors(original, [faces[index][1] for index in comparable])
        descriptors: list[np.ndarray | None] = [None] * len(faces)
        for index, descriptor in zip(comparable, described):
            descriptors[index] = descriptor
        return descriptors

    def inspect(
        self,
        output: np.ndarray,
        faces: list[tuple[Box, np.ndarray]],
        originals: list[np.ndarray | None],
        threshold: float,
        look_for_new: bool = True,
        *,
        original: np.ndarray | None = None,
        memo: dict | None = None,
    ) -> Verdict:
        """Distances and new faces in ``output``. ``original``: the input image, so the detector runs only
        around what changed (without it: on the whole output). ``memo``: one dict per request, passed to
        every inspect of that request, so work on pixels that did not change since is not done again.
        It keeps ``output`` itself, not a copy (a 12 Mpx copy is 30 ms): an array passed here must not be
        changed in place afterwards; covers return new arrays (face/classical.py)."""
        memo = {} if memo is None else memo
        verdict = Verdict()
        if original is None:
            found = self.detector.detect(output, threshold, small_faces=False)
        else:
            found = self._detect_around_changes(original, output, faces, threshold, memo)
        found = [f for f in found if f.landmarks.shape == (68, 2)]
        descriptors = memo.setdefault("descriptors", {})
        self._describe_at(
            output, [lm for (_, lm), original in zip(faces, originals) if original is not None], descriptors
        )
        for index, ((box, landmarks), descriptor) in enumerate(zip(faces, originals)):
            if descriptor is None:
                continue
            # What is now at the original's landmarks, and any detected face on top of it.
            distances = [self.verifier.distance(descriptor, self._descriptor(output, landmarks, descriptors))]
            eye_distance = max(float(np.linalg.norm(landmarks[36:42].mean(0) - landmarks[42:48].mean(0))), 1.0)
            for face in found:
                if min(distances) < SAME_PERSON_THRESHOLD:
                    break  # recognisable already: more descriptors would not change the verdict
                # A face found where the original's landmarks already are is the measurement above.
                same_place = np.linalg.norm(face.landmarks - landmarks, axis=1).mean() < 0.1 * eye_distance
                if _overlaps(box, face.box) and not same_place:
                    distances.append(
                        self.verifier.distance(descriptor, self._descriptor(output, face.landmarks, descriptors))
                    )
            verdict.distances[index] = min(distances)
            if verdict.distances[index] < SAME_PERSON_THRESHOLD:
                verdict.recognisable.append(index)
        if look_for_new:
            verdict.new_faces = [f for f in found if not any(_overlaps(box, f.box) for box, _ in faces)]
        return verdict

    def _descriptor(self, output: np.ndarray, landmarks: np.ndarray, cache: dict) -> np.ndarray:
        """The descriptor at ``landmarks``, reused while the pixels it is computed from are unchanged."""
        self._describe_at(output, [landmarks], cache)
        return cache[landmarks.tobytes()][1]

    def _describe_at(self, output: np.ndarray, landmarks_list: list[np.ndarray], cache: dict) -> None:
        """Fills ``cache`` with the descriptor at each of ``landmarks_list`` whose pixels changed since
        (or that is not there yet), all of them in one network run."""
        missing = []
        for landmarks in landmarks_list:
            window = _chip_window(output, landmarks)
            cached = cache.get(landmarks.tobytes())
            if cached is None or cached[0].shape != window.shape or not np.array_equal(cached[0], window):
                missing.append((landmarks, window))
        described = self.verifier.descriptors(output, [landmarks for landmarks, _ in missing])
        for (landmarks, window), descriptor in zip(missing, described):
            cache[landmarks.tobytes()] = (window.copy(), descriptor)  # the window: a request holds little extra

    def _detect_around_changes(
        self,
        original: np.ndarray,
        output: np.ndarray,
        faces: list[tuple[Box, np.ndarray]],
        threshold: float,
        memo: dict,
    ) -> list[DetectedFace]:
        """The self-check's detection, on crops around the changed pixels and the original faces only.

        A later inspect of the same request (after a re-cover) searches only around what changed since
        the one before, and keeps the faces found then everywhere else.
        """
        height, width = output.shape[:2]
        coarse = self.detector.coarse_scale(height, width)
        previous = memo.get("scan")
        if previous is None:
            regions, before = changed_regions(original, output) + [box for box, _ in faces], []
        else:
            snapshot, before = previous
            regions = changed_regions(snapshot, output)
            if not regions:
                return before
        plan = self._search_plan(regions, output.shape, coarse)
        if sum((x1 - x0) * (y1 - y0) * scale**2 for (x0, y0, x1, y1), scale in plan) > (
            WHOLE_IMAGE_SHARE * height * width * coarse**2
        ):
            found = self.detector.detect(output, threshold, small_faces=False)
            memo["scan"] = (output, found)
            return found
        found: list[DetectedFace] = []
        scanned: list[tuple[int, int, int, int]] = []
        pending = list(plan)
        while pending:
            crop, scale = pending.pop(0)
            scanned.append(crop)
            kept, cut = self._detect_in_crop(output, crop, threshold, scale)
            found += kept
            # A face cut by the crop's edge is searched again in a crop of its own, with context around it.
            if len(scanned) + len(pending) < MAX_CROPS:
                for more in self._search_plan(cut, output.shape, coarse):
                    if more[0] not in scanned and all(more[0] != p[0] for p in pending):
                        pending.append(more)
        # A face on top of an original is measured against it (a false one only adds a distance). Any
        # other would be covered as a face the first pass missed: it counts only if the whole image's
        # scales find it too, as the first pass would have (a hand, or the ear beside a box cover, seen
        # at a region's scale do not).
        counted = []
        for face in found:
            if not any(_overlaps(box, face.box) for box, _ in faces):
                face = self._at_whole_scale(output, face, threshold)
            if face is not None:
                counted.append(face)
        found = counted
        # Faces found before, away from everything searched now, are still there as they were.
        found += [f for f in before if not any(_intersects(f.box, crop) for crop in scanned)]
        found = _deduplicated(found)
        memo["scan"] = (output, found)
        return found

    def _at_whole_scale(self, output: np.ndarray, face: DetectedFace, threshold: float) -> DetectedFace | None:
        """``face`` as the whole image's levels see it (a crop around it on their grid), or None if they miss it."""
        height, width = output.shape[:2]
        coarse = self.detector.coarse_scale(height, width)
        align = max(int(round(64 / coarse)), 1)  # the detector's grid over the crop is its grid over the image
        x0, y0, x1, y1 = context_crops([face.box], output.shape, MIN_CONTEXT / coarse, align)[0]
        shift = np.array([x0, y0], np.float32)
        for seen in self.detector.detect(output[y0:y1, x0:x1], threshold, small_faces=False, levels_of=(height, width)):
            box = (seen.box[0] + x0, seen.box[1] + y0, seen.box[2] + x0, seen.box[3] + y0)
            if iou(box, face.box) >= 0.4:
                five = None if seen.five is None else seen.five + shift
                return DetectedFace(box=box, landmarks=seen.landmarks + shift, score=seen.score, five=five)
        return None

    def _search_plan(
        self, regions: list[Box], shape: tuple[int, ...], coarse: float
    ) -> list[tuple[tuple[int, int, int, int], float]]:
        """(crop, scale) for each region: the region with context, searched at a scale for its size.

        Regions mostly inside a larger one (an original face inside its cover) are searched with it.
        Detectors that cannot find small faces (dlib's) search every crop at the whole image's scale.
        """
        adaptive = self.detector.backend.native_min_face < 40
        merged: list[Box] = []
        for region in sorted(regions, key=lambda r: -(r[2] - r[0]) * (r[3] - r[1])):
            if not any(_mostly_inside(region, bigger) for bigger in merged):
                merged.append(region)
        plan = []
        for region in merged:
            side = max(region[2] - region[0], region[3] - region[1], 1.0)
            scale = min(coarse, REGION_SIDE / side) if adaptive else coarse
            crop = context_crops([region], shape, MIN_CONTEXT / scale)[0]
            plan.append((crop, scale))
        # Overlapping crops of about the same scale are searched as one, at the smaller scale: a crowd's
        # crops overlap a lot, and their union at that scale costs less than the sum of its parts.
        merged_any = True
        while merged_any:
            merged_any = False
            for i, j in itertools.combinations(range(len(plan)), 2):
                (a, scale_a), (b, scale_b) = plan[i], plan[j]
                if _intersects(a, b) and max(scale_a, scale_b) <= SAME_SCALE * min(scale_a, scale_b):
                    union = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    plan[i] = (union, min(scale_a, scale_b))
                    del plan[j]
                    merged_any = True
                    break
        return plan

    def _detect_in_crop(
        self, output: np.ndarray, crop: tuple[int, int, int, int], threshold: float, scale: float
    ) -> tuple[list[DetectedFace], list[Box]]:
        """Faces wholly inside ``crop`` (image coordinates), and the boxes of those its inner edges cut."""
        height, width = output.shape[:2]
        x0, y0, x1, y1 = crop
        kept, cut = [], []
        shift = np.array([x0, y0], np.float32)
        edge = 1.0 / scale + 1  # a pixel at the detection scale
        for face in self.detector.detect(output[y0:y1, x0:x1], threshold, small_faces=False, scale=scale):
            fx0, fy0, fx1, fy1 = face.box
            box = (fx0 + x0, fy0 + y0, fx1 + x0, fy1 + y0)
            if (
                (x0 > 0 and fx0 <= edge)
                or (y0 > 0 and fy0 <= edge)
                or (x1 < width and fx1 >= x1 - x0 - edge)
                or (y1 < height and fy1 >= y1 - y0 - edge)
            ):
                cut.append(box)
                continue
            five = None if face.five is None else face.five + shift
            kept.append(DetectedFace(box=box, landmarks=face.landmarks + shift, score=face.score, five=five))
        return kept, cut


def _chip_window(output: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The pixels dlib's chip at ``landmarks`` can read: their extent plus 25 % padding a side, maybe
    rotated; a full extent a side is safe."""
    height, width = output.shape[:2]
    (lx0, ly0), (lx1, ly1) = landmarks.min(0), landmarks.max(0)
    span = max(lx1 - lx0, ly1 - ly0, 1.0)
    x0, y0 = max(int(lx0 - span), 0), max(int(ly0 - span), 0)
    x1, y1 = min(int(lx1 + span) + 1, width), min(int(ly1 + span) + 1, height)
    return output[y0:y1, x0:x1]


def _mostly_inside(inner: Box, outer: Box) -> bool:
    """Is most of ``inner`` inside ``outer``, which is at most twice its side?"""
    w = max(min(inner[2], outer[2]) - max(inner[0], outer[0]), 0.0)
    h = max(min(inner[3], outer[3]) - max(inner[1], outer[1]), 0.0)
    area = max((inner[2] - inner[0]) * (inner[3] - inner[1]), 1e-6)
    inner_side = max(inner[2] - inner[0], inner[3] - inner[1])
    outer_side = max(outer[2] - outer[0], outer[3] - outer[1])
    return w * h / area > 0.8 and outer_side <= 2 * inner_side


def _intersects(box: Box, crop: tuple[int, int, int, int]) -> bool:
    return box[0] < crop[2] and crop[0] < box[2] and box[1] < crop[3] and crop[1] < box[3]


def _deduplicated(faces: list[DetectedFace]) -> list[DetectedFace]:
    """One face per place where crops overlapped: the best-scoring of boxes with IoU >= 0.4."""
    kept: list[DetectedFace] = []
    for face in sorted(faces, key=lambda f: -f.score):
        if all(iou(face.box, other.box) < 0.4 for other in kept):
            kept.append(face)
    return sorted(kept, key=lambda f: (f.box[0], f.box[1]))
