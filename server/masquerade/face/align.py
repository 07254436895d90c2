"""Face alignment: the "whole face" crop of DESIGN section 1 step 1, ArcFace's
five-point crop, and pasting a processed crop back with a feathered mask.

All geometry is 2x3 affine matrices mapping *original pixel coordinates* to
the target space (crop pixels, template units, ...), composed in numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

# Canonical mean face for the alignment points (68-point indices 17..48 and 54,
# i.e. ``landmarks[17:49]`` + ``landmarks[54]``: brows, nose, eyes and the two
# mouth corners — the jaw and inner lips move too much with pose and
# expression to anchor a similarity fit).
#
# Where the numbers come from: the initial shape (the training-set mean shape
# of iBUG 300-W) stored in dlib's ``shape_predictor_68_face_landmarks.dat``
# (first matrix after the version number), restricted to points 17..67 and
# rescaled so those 51 points span exactly [0,1]^2 — the usual normalisation
# of the "mean face" used by whole-face aligners. tests/face/test_align.py
# re-derives it from the model file. Coordinates are (x, y), y pointing down.
ALIGNMENT_TEMPLATE = np.array(
    [
        [0.000000, 0.098984],
        [0.076576, 0.022731],
        [0.184660, 0.000005],  # 17-19 right brow
        [0.296584, 0.017637],
        [0.401376, 0.065814],  # 20-21
        [0.598618, 0.065808],
        [0.703411, 0.017631],
        [0.815337, 0.000000],  # 22-24 left brow
        [0.923422, 0.022725],
        [1.000000, 0.098982],  # 25-26
        [0.499995, 0.207347],
        [0.499990, 0.323774],
        [0.499989, 0.439173],  # 27-29 nose bridge
        [0.499983, 0.557943],  # 30 nose tip
        [0.374596, 0.638254],
        [0.434816, 0.662776],
        [0.499985, 0.683726],  # 31-33 nostrils
        [0.565159, 0.662779],
        [0.625383, 0.638260],  # 34-35
        [0.124314, 0.221901],
        [0.191113, 0.179426],
        [0.271341, 0.180676],  # 36-38 right eye
        [0.341602, 0.239313],
        [0.266384, 0.254143],
        [0.186515, 0.252976],  # 39-41
        [0.658390, 0.239308],
        [0.728651, 0.180671],
        [0.808877, 0.179421],  # 42-44 left eye
        [0.875674, 0.221899],
        [0.813472, 0.252972],
        [0.733606, 0.254139],  # 45-47
        [0.259852, 0.854252],  # 48 mouth corner
        [0.740124, 0.854252],  # 54 mouth corner
    ],
    dtype=np.float64,
)  # [33, 2]

# "Whole face" crop geometry (DESIGN section 1 step 1), in template units.
WHOLE_FACE_PADDING = 0.40
WHOLE_FACE_FOREHEAD_SHIFT = 0.07  # fraction of the template square's height

# The face itself (forehead to chin, ear to ear) as an ellipse in template
# units. Measured on the same dlib mean shape: jaw points span x -0.12..1.12,
# the chin is at y 1.32; the hairline sits about one facial third (~0.55)
# above the brows. A margin of ~0.1 is added everywhere.
FACE_ELLIPSE_CENTRE = (0.5, 0.45)
FACE_ELLIPSE_AXES = (0.72, 1.0)  # semi-axes (x, y)

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
    """Whole-face crop (DESIGN section 1 step 1): Lanczos warp, white border."""
    if size < 8:
        raise ValueError(f"crop size must be at least 8, got {size}")
    matrix = compose(crop_from_template(size), template_matrix(landmarks68))
    crop = cv2.warpAffine(
        np.ascontiguousarray(rgb),
        matrix,
        (size, size),
        flags=cv2.INTER_LANCZOS4,
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
    height, width = shape[:2]
    mask = np.zeros((height, width), dtype=np.float32)
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
        return mask
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    u = to_unit[0, 0] * xs + to_unit[0, 1] * ys + to_unit[0, 2]
    v = to_unit[1, 0] * xs + to_unit[1, 1] * ys + to_unit[1, 2]
    radius = np.sqrt(u * u + v * v)
    mask[y0:y1, x0:x1] = _smoothstep((1.0 - radius) / feather)
    return mask


def _unit_from_template() -> np.ndarray:
    (cx, cy), (ax, ay) = FACE_ELLIPSE_CENTRE, FACE_ELLIPSE_AXES
    return np.array([[1.0 / ax, 0.0, -cx / ax], [0.0, 1.0 / ay, -cy / ay]])


def face_ellipse_from_template(template_from_image: np.ndarray) -> np.ndarray:
    """[2,3] mapping original pixels to the face ellipse's unit-disc coords."""
    return compose(_unit_from_template(), template_from_image)


def face_region_mask(shape: tuple[int, ...], matrix: np.ndarray, size: int, feather: float = 0.1) -> np.ndarray:
    """[H,W] float32 feathered face ellipse for a whole-face crop's ``matrix``.

    The ellipse (not the whole crop square) is what gets pasted: the square is
    about twice the face's width and in group photos overlaps the neighbours,
    whose pixels must not be overwritten with this crop's copy of them.
    """
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


# Largest colour correction paste_back applies (8-bit levels): enough for a
# VAE's tint drift, too small to undo an intended edit.
MAX_COLOUR_SHIFT = 24.0


def paste_back(original_rgb: np.ndarray, crop_rgb: np.ndarray, matrix: np.ndarray, feather: float = 0.1) -> np.ndarray:
    """Warp ``crop_rgb`` back with the inverse of ``matrix`` and blend it into the face ellipse.

    ``feather`` is the soft edge's width as a fraction of the ellipse radius.
    Colour consistency: the per-channel median difference between original and
    warped crop over the feather ring is added to the crop (clipped to
    MAX_COLOUR_SHIFT), so a global tint from the generator does not show as a
    halo. Pixels outside the mask are returned bit for bit.
    """
    original_rgb = np.ascontiguousarray(original_rgb)
    size = crop_rgb.shape[0]
    if crop_rgb.shape[:2] != (size, size) or crop_rgb.ndim != 3:
        raise ValueError(f"crop must be [S, S, 3], got {crop_rgb.shape}")
    mask = face_region_mask(original_rgb.shape, matrix, size, feather)
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
        flags=cv2.INTER_LANCZOS4,
        borderMode=cv2.BORDER_REPLICATE,
    )
    roi_original = original_rgb[y0:y1, x0:x1]
    roi_mask = mask[y0:y1, x0:x1]
    ring = (roi_mask > 0) & (roi_mask < 1)
    if ring.sum() >= 16:
        shift = np.median(roi_original[ring].astype(np.float32) - warped[ring], axis=0)
        warped = warped + np.clip(shift, -MAX_COLOUR_SHIFT, MAX_COLOUR_SHIFT)
    out = original_rgb.copy()
    out[y0:y1, x0:x1] = blend_masked(roi_original, np.clip(warped, 0, 255), roi_mask)
    return out
