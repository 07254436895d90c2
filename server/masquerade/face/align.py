"""Face alignment: the "whole face" crop of DESIGN section 1 step 1, ArcFace's
five-point crop, and pasting a processed crop back.

The crop geometry is the research code's (its extractor is DeepFaceLab's):
a similarity fit of 33 landmarks to DeepFaceLab's mean face, the "whole face"
square around it, a bilinear warp with a white border. All geometry is 2x3
affine matrices mapping *original pixel coordinates* to the target space
(crop pixels, template units, ...), composed in numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

# DeepFaceLab's mean face (``landmarks_2D_new``): where the 68-point landmarks
# 17..48 and 54 (``landmarks[17:49]`` + ``landmarks[54]``: brows, nose, eyes
# and the two mouth corners; the jaw and inner lips move too much with pose and
# expression to anchor a similarity fit) sit in the unit square. These are the
# published numbers the research code's extractor aligns to. (x, y), y down.
ALIGNMENT_TEMPLATE = np.array(
    [
        [0.000213256, 0.106454],  # 17-21 right brow (image left)
        [0.0752622, 0.038915],
        [0.18113, 0.0187482],
        [0.29077, 0.0344891],
        [0.393397, 0.0773906],
        [0.586856, 0.0773906],  # 22-26 left brow
        [0.689483, 0.0344891],
        [0.799124, 0.0187482],
        [0.904991, 0.038915],
        [0.98004, 0.106454],
        [0.490127, 0.203352],  # 27-30 nose bridge and tip
        [0.490127, 0.307009],
        [0.490127, 0.409805],
        [0.490127, 0.515625],
        [0.36688, 0.587326],  # 31-35 nostrils
        [0.426036, 0.609345],
        [0.490127, 0.628106],
        [0.554217, 0.609345],
        [0.613373, 0.587326],
        [0.121737, 0.216423],  # 36-41 right eye
        [0.187122, 0.178758],
        [0.265825, 0.179852],
        [0.334606, 0.231733],
        [0.260918, 0.245099],
        [0.182743, 0.244077],
        [0.645647, 0.231733],  # 42-47 left eye
        [0.714428, 0.179852],
        [0.793132, 0.178758],
        [0.858516, 0.216423],
        [0.79751, 0.244077],
        [0.719335, 0.245099],
        [0.254149, 0.780233],  # 48 mouth corner
        [0.726104, 0.780233],  # 54 mouth corner
    ],
    dtype=np.float64,
)  # [33, 2]

# "Whole face" crop geometry (DESIGN section 1 step 1), in template units: the
# unit square's half-diagonal grown by padding*sqrt2 diagonals, the centre moved
# up by 7 % of the square's height (more forehead). Same numbers as the research
# extractor's WHOLE_FACE type at scale 1.
WHOLE_FACE_PADDING = 0.40
WHOLE_FACE_FOREHEAD_SHIFT = 0.07  # fraction of the template square's height

# The face itself (forehead to chin, ear to ear) as an ellipse in template
# units: where classical covers go and what a neighbour's paste-back must not
# overwrite. Measured by fitting dlib's 68-point mean shape (the initial shape
# in shape_predictor_68_face_landmarks.dat) to the template above: jaw points
# span x -0.12..1.10, the chin is at y 1.19; the hairline sits about one
# facial third (~0.5) above the brows. A margin of ~0.07 is added everywhere.
FACE_ELLIPSE_CENTRE = (0.49, 0.427)
FACE_ELLIPSE_AXES = (0.675, 0.937)  # semi-axes (x, y)

# ArcFace's 112x112 five-point destination (insightface's published reference
# points: eye centres, nose tip, mouth corners).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ARCFACE_SIZE = 112

WHITE = (255, 255, 255)


@dataclass
class AlignedFace:
    crop: np.ndarray = field(repr=False)  # [S, S, 3] uint8
    matrix: np.ndarray  # [2, 3] float64: original pixel coords -> crop pixel coords


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> np.ndarray:
    """Least-squares similarity ``dst ~ s R src + t`` (Umeyama, PAMI 1991).

    src, dst: [N, 2]. Returns the [2, 3] matrix.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"umeyama needs two [N>=2, 2] point sets, got {src.shape} and {dst.shape}")
    mean_src, mean_dst = src.mean(0), dst.mean(0)
    src_c, dst_c = src - mean_src, dst - mean_dst
    covariance = dst_c.T @ src_c / len(src)
    u, d, vt = np.linalg.svd(covariance)
    reflect = np.ones(2)
    # Eq. 39 of the paper: force a proper rotation when the best orthogonal fit is a reflection.
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        reflect[-1] = -1.0
    rotation = u @ np.diag(reflect) @ vt
    scale = 1.0
    if with_scale:
        variance_src = (src_c**2).sum() / len(src)
        if variance_src <= 0:
            raise ValueError("umeyama: source points are all identical")
        scale = float((d * reflect).sum() / variance_src)
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mean_dst - scale * rotation @ mean_src
    return matrix


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The [2,3] affine applying ``inner`` first, then ``outer``."""
    a = np.vstack([outer, [0.0, 0.0, 1.0]])
    b = np.vstack([inner, [0.0, 0.0, 1.0]])
    return (a @ b)[:2]


def invert(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def _check_landmarks(landmarks68: np.ndarray) -> np.ndarray:
    landmarks = np.asarray(landmarks68, dtype=np.float64)
    if landmarks.shape != (68, 2) or not np.isfinite(landmarks).all():
        raise ValueError(f"expected finite [68, 2] landmarks, got shape {landmarks.shape}")
    return landmarks


def template_matrix(landmarks68: np.ndarray) -> np.ndarray:
    """[2,3] similarity mapping original pixels to mean-face template units."""
    landmarks = _check_landmarks(landmarks68)
    points = np.concatenate([landmarks[17:49], landmarks[54:55]])
    return umeyama(points, ALIGNMENT_TEMPLATE)


def _whole_face_square() -> tuple[float, float, float]:
    """Centre (x, y) and half side of the whole-face crop square, in template units."""
    # Growing the unit square's half-diagonal (sqrt2/2) by padding*sqrt2 times
    # the diagonal (sqrt2) gives a half side of 0.5 + padding*sqrt2.
    half_side = 0.5 + WHOLE_FACE_PADDING * math.sqrt(2.0)
    return 0.5, 0.5 - WHOLE_FACE_FOREHEAD_SHIFT, half_side


def crop_from_template(size: int) -> np.ndarray:
    """[2,3] mapping template units to whole-face crop pixels for an S x S crop."""
    cx, cy, half_side = _whole_face_square()
    scale = size / (2.0 * half_side)
    return np.array([[scale, 0.0, scale * (half_side - cx)], [0.0, scale, scale * (half_side - cy)]])


def align_face(rgb: np.ndarray, landmarks68: np.ndarray, size: int) -> AlignedFace:
    """Whole-face crop (DESIGN section 1 step 1): bilinear warp, white border.

    Bilinear because that is what the research code gets: it passes
    ``cv2.INTER_LANCZOS4`` where ``cv2.warpAffine`` expects ``dst``, so OpenCV
    uses its default interpolation.
    """
    if size < 8:
        raise ValueError(f"crop size must be at least 8, got {size}")
    matrix = compose(crop_from_template(size), template_matrix(landmarks68))
    crop = cv2.warpAffine(
        np.ascontiguousarray(rgb),
        matrix,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=WHITE,
    )
    return AlignedFace(crop=crop, matrix=matrix)


def arcface_five_points(landmarks68: np.ndarray) -> np.ndarray:
    """[5,2]: eye centres (image left first), nose tip (30), mouth corners (48, 54)."""
    landmarks = _check_landmarks(landmarks68)
    return np.stack(
        [landmarks[36:42].mean(0), landmarks[42:48].mean(0), landmarks[30], landmarks[48], landmarks[54]]
    ).astype(np.float32)


def template_five_points(size: int) -> np.ndarray:
    """[5,2] ArcFace's five points where the mean face puts them in an S x S whole-face crop.

    For an input that is already aligned and whose landmarks cannot be found.
    """
    rows = ALIGNMENT_TEMPLATE  # landmarks 17..48 are rows 0..31, landmark 54 is row 32
    five = np.stack([rows[19:25].mean(0), rows[25:31].mean(0), rows[13], rows[31], rows[32]])
    matrix = crop_from_template(size)
    return (five @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def arcface_crop(rgb: np.ndarray, five_points: np.ndarray) -> np.ndarray:
    """[112,112,3] uint8 ArcFace input: similarity fit to the reference points."""
    points = np.asarray(five_points, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"expected [5, 2] points, got {points.shape}")
    matrix = umeyama(points, ARCFACE_TEMPLATE_112)
    return cv2.warpAffine(
        np.ascontiguousarray(rgb),
        matrix,
        (ARCFACE_SIZE, ARCFACE_SIZE),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )


# ---------------------------------------------------------------- masks


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def ellipse_mask(shape: tuple[int, ...], to_unit: np.ndarray, feather: float) -> np.ndarray:
    """[H,W] float32 mask of the unit disc in the space ``to_unit`` maps pixels to.

    1 inside radius 1 - feather, a smooth ramp to exactly 0 at radius 1, and
    exactly 0 beyond. Only the disc's bounding box is evaluated.
    """
    mask = np.zeros(shape[:2], dtype=np.float32)
    y0, x0, window = ellipse_mask_window(shape, to_unit, feather)
    mask[y0 : y0 + window.shape[0], x0 : x0 + window.shape[1]] = window
    return mask


def ellipse_mask_window(shape: tuple[int, ...], to_unit: np.ndarray, feather: float) -> tuple[int, int, np.ndarray]:
    """``ellipse_mask`` on the disc's bounding box only: (top, left, [h, w] float32), zero outside it.

    A cover needs no more: a whole-image mask is 48 MB at 12 Mpx, allocated and scanned per face."""
    height, width = shape[:2]
    feather = float(np.clip(feather, 1e-3, 1.0))
    # Bounding box of the disc in pixels: the image of the unit circle under the inverse map.
    from_unit = invert(to_unit)
    theta = np.linspace(0.0, 2.0 * np.pi, 64, endpoint=False)
    # A 64-gon inscribed in the circle misses a sliver; scale it to circumscribe.
    ring = np.stack([np.cos(theta), np.sin(theta)], 1) / math.cos(math.pi / 64)
    corners = transform_points(from_unit, ring)
    x0, y0 = np.floor(corners.min(0)).astype(int) - 1
    x1, y1 = np.ceil(corners.max(0)).astype(int) + 2
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x0 >= x1 or y0 >= y1:
        return 0, 0, np.zeros((0, 0), dtype=np.float32)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    u = to_unit[0, 0] * xs + to_unit[0, 1] * ys + to_unit[0, 2]
    v = to_unit[1, 0] * xs + to_unit[1, 1] * ys + to_unit[1, 2]
    radius = np.sqrt(u * u + v * v)
    return int(y0), int(x0), _smoothstep((1.0 - radius) / feather).astype(np.float32)


def _unit_from_template() -> np.ndarray:
    (cx, cy), (ax, ay) = FACE_ELLIPSE_CENTRE, FACE_ELLIPSE_AXES
    return np.array([[1.0 / ax, 0.0, -cx / ax], [0.0, 1.0 / ay, -cy / ay]])


def face_ellipse_from_template(template_from_image: np.ndarray) -> np.ndarray:
    """[2,3] mapping original pixels to the face ellipse's unit-disc coords."""
    return compose(_unit_from_template(), template_from_image)


def face_region_mask(shape: tuple[int, ...], matrix: np.ndarray, size: int, feather: float = 0.1) -> np.ndarray:
    """[H,W] float32 feathered face ellipse (forehead to chin, ear to ear) for a whole-face crop's ``matrix``."""
    template_from_image = compose(invert(crop_from_template(size)), matrix)
    return ellipse_mask(shape, face_ellipse_from_template(template_from_image), feather)


def blend_masked(original: np.ndarray, replacement: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """original + mask*(replacement - original), rounded; exact original where mask == 0."""
    out = original.copy()
    inside = mask > 0
    if not inside.any():
        return out
    weight = mask[inside][:, None]
    base = original[inside].astype(np.float32)
    mixed = base + weight * (replacement[inside].astype(np.float32) - base)
    out[inside] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out


def square_mask(shape: tuple[int, ...], matrix: np.ndarray, size: int, feather: float = 0.05) -> np.ndarray:
    """[H,W] float32: the whole S x S crop square warped back, feathered only at its border.

    1 where the square's border is more than ``feather`` * S away (in crop
    pixels), a smooth ramp to 0 at the border, exactly 0 outside.
    """
    height, width = shape[:2]
    mask = np.zeros((height, width), dtype=np.float32)
    corners = transform_points(invert(matrix), np.array([[0.0, 0.0], [size, 0.0], [size, size], [0.0, size]]))
    x0, y0 = np.floor(corners.min(0)).astype(int) - 1
    x1, y1 = np.ceil(corners.max(0)).astype(int) + 2
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x0 >= x1 or y0 >= y1:
        return mask
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    # Pixel centres in crop coordinates; the square is [-0.5, S - 0.5]^2 there.
    u = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2] + 0.5
    v = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2] + 0.5
    inside = np.minimum(np.minimum(u, size - u), np.minimum(v, size - v))
    mask[y0:y1, x0:x1] = _smoothstep(inside / max(float(feather) * size, 1e-6))
    return mask


def protected_faces_mask(
    shape: tuple[int, ...], matrix: np.ndarray, size: int, others: Sequence[np.ndarray]
) -> np.ndarray:
    """[H,W] float32: the other faces' ellipses (given by their [68, 2] landmarks), minus this face's own.

    A whole-face square is about twice a face wide; in a group photo it holds
    copies of the neighbours that its own generation did not anonymize. Those
    pixels must come from the neighbour's own result (or cover), never from
    this crop; where two faces' ellipses overlap, either crop may write.
    """
    protect = np.zeros(shape[:2], dtype=np.float32)
    for landmarks in others:
        np.maximum(
            protect, ellipse_mask(shape, face_ellipse_from_template(template_matrix(landmarks)), 0.1), out=protect
        )
    if protect.any():
        own = face_region_mask(shape, matrix, size)
        protect *= 1.0 - own
    return protect


# Largest colour correction paste_back applies with ``colour_match`` (8-bit levels).
MAX_COLOUR_SHIFT = 24.0


def paste_back(
    original_rgb: np.ndarray,
    crop_rgb: np.ndarray,
    matrix: np.ndarray,
    feather: float = 0.05,
    *,
    protect: Sequence[np.ndarray] = (),
    colour_match: bool = False,
) -> np.ndarray:
    """Warp the whole ``crop_rgb`` square back (bilinear) and blend it in, feathered only at its border.

    The research code pastes the whole regenerated square hard-edged with
    nearest-neighbour sampling; this does the same with a soft edge of
    ``feather`` * S crop pixels, so hair, ears and jaw come from the crop and
    no seam shows. ``protect`` lists the [68, 2] landmarks of the image's other
    faces, whose ellipses this crop must not write (see protected_faces_mask).
    ``colour_match`` (off by default: it can undo an attribute prompt's change
    of skin tone) adds the per-channel median difference between original and
    crop over the feather band, clipped to MAX_COLOUR_SHIFT. Pixels outside
    the mask are returned bit for bit.
    """
    original_rgb = np.ascontiguousarray(original_rgb)
    size = crop_rgb.shape[0]
    if crop_rgb.shape[:2] != (size, size) or crop_rgb.ndim != 3:
        raise ValueError(f"crop must be [S, S, 3], got {crop_rgb.shape}")
    mask = square_mask(original_rgb.shape, matrix, size, feather)
    if len(protect):
        mask *= 1.0 - protected_faces_mask(original_rgb.shape, matrix, size, protect)
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if len(rows) == 0:
        return original_rgb.copy()
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    # Warp only into the mask's bounding box: shift the inverse by the box origin.
    roi_from_crop = invert(matrix)
    roi_from_crop[:, 2] -= (x0, y0)
    warped = cv2.warpAffine(
        np.ascontiguousarray(crop_rgb).astype(np.float32),
        roi_from_crop,
        (int(x1 - x0), int(y1 - y0)),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    roi_original = original_rgb[y0:y1, x0:x1]
    roi_mask = mask[y0:y1, x0:x1]
    if colour_match:
        band = (roi_mask > 0) & (roi_mask < 1)
        if band.sum() >= 16:
            shift = np.median(roi_original[band].astype(np.float32) - warped[band], axis=0)
            warped = warped + np.clip(shift, -MAX_COLOUR_SHIFT, MAX_COLOUR_SHIFT)
    out = original_rgb.copy()
    out[y0:y1, x0:x1] = blend_masked(roi_original, np.clip(warped, 0, 255), roi_mask)
    return out
