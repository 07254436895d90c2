"""Classical covers (blur, pixelate, solid) on a feathered face ellipse.

These are the fallback when reverse personalization cannot run on a face, so
their defaults are tuned to defeat an independent recogniser (dlib's 128-d
descriptor, see verify.py), not just to look covered. Strength scales with
the face's size, so a face is covered the same whatever the image resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .align import blend_masked, ellipse_mask_window, face_ellipse_from_template, invert, template_matrix
from .detect import DetectedFace

CLASSICAL_METHODS = ("blur", "pixelate", "solid")

# Measured on insightface's t1.jpg (six faces) with dlib's verifier: at
# strength 1.0 every blurred face is > 0.6 from its original (see the face
# tests and the package report for the numbers).
BLUR_SIGMA_PER_FACE_WIDTH = 0.12
PIXELATE_BLOCKS_PER_FACE_WIDTH = 8.0
SOLID_COLOUR = (128, 128, 128)  # fixed, so the cover carries nothing of the face (not even its tone)
FEATHER = 0.1  # soft edge, as a fraction of the ellipse radius (or of the box's smaller side)
COVER_SHAPES = ("ellipse", "box")


@dataclass(frozen=True)
class CoverStyle:
    """How covers look, beyond the method and strength (the CLI's --shape, --mosaic-size, --replace-with)."""

    shape: str = "ellipse"
    """"ellipse": the feathered face ellipse; "box": the rectangle around that ellipse."""
    mosaic_size: int | None = None
    """pixelate: side of the squares in pixels; None: the face width / 8 (times the strength)."""
    replacement: np.ndarray | None = None
    """[h, w, 4] uint8 RGBA drawn instead of the solid colour; its transparent parts show the solid
    colour, never the face."""

    def __post_init__(self) -> None:
        if self.shape not in COVER_SHAPES:
            raise ValueError(f"shape must be one of {COVER_SHAPES}, got {self.shape!r}")
        if self.mosaic_size is not None and not 2 <= self.mosaic_size <= 4096:
            raise ValueError(f"mosaic size must be in [2, 4096] pixels, got {self.mosaic_size}")
        if self.replacement is not None and (self.replacement.ndim != 3 or self.replacement.shape[2] != 4):
            raise ValueError("the replacement image must be [h, w, 4] RGBA")


DEFAULT_STYLE = CoverStyle()


def apply_classical(
    rgb: np.ndarray,
    face: DetectedFace,
    method: str,
    strength: float = 1.0,
    *,
    mask_scale: float = 1.0,
    style: CoverStyle = DEFAULT_STYLE,
    in_place: bool = False,
) -> np.ndarray:
    """Cover ``face`` in ``rgb`` (uint8 [H,W,3]); pixels outside the feathered ellipse are unchanged.
    A new array, or ``rgb`` itself with ``in_place`` (a copy of a 12 Mpx image is 10 ms a face).

    The ellipse spans forehead to chin and ear to ear: it is fitted through the
    landmarks' mean-face similarity when there are 68 landmarks, otherwise
    derived from the box. ``strength`` multiplies the blur sigma and the
    pixel block size (solid ignores it: a partial solid would leak the face).
    ``mask_scale`` grows (or shrinks) the ellipse about its centre; the cover's strength
    still follows the face's own size.
    """
    _check_method(method, strength)
    landmarks = np.asarray(face.landmarks)
    if landmarks.shape == (68, 2):
        to_unit = face_ellipse_from_template(template_matrix(landmarks))
    else:
        to_unit = _ellipse_from_box(face.box)
    # The ellipse's width in pixels: the unit disc's x diameter mapped back.
    from_unit = invert(to_unit)
    face_width = 2.0 * math.hypot(from_unit[0, 0], from_unit[1, 0])
    scaled = to_unit / _check_scale(mask_scale)
    if style.shape == "box":
        x0, y0, x1, y1 = _ellipse_bounds(scaled)
        # cover_region feathers inwards: widen by the feather so the fully covered part is the whole
        # rectangle around the ellipse, not less than the ellipse covers.
        rim = FEATHER * min(x1 - x0, y1 - y0) / (1.0 - 2.0 * FEATHER)
        bounds = (x0 - rim, y0 - rim, x1 + rim, y1 + rim)
        return cover_region(rgb, bounds, method, strength, style=style, face_width=face_width, in_place=in_place)
    top, left, mask = ellipse_mask_window(rgb.shape, scaled, FEATHER)
    return _cover(rgb, mask, method, strength, face_width, style, (top, left), in_place)


def _ellipse_bounds(to_unit: np.ndarray) -> tuple[float, float, float, float]:
    """The axis-aligned box around the ellipse that ``to_unit`` maps onto the unit disc."""
    from_unit = invert(to_unit)
    centre = from_unit[:, 2]
    half = np.hypot(from_unit[:, 0], from_unit[:, 1])  # extent of the mapped unit circle along x and y
    return (
        float(centre[0] - half[0]),
        float(centre[1] - half[1]),
        float(centre[0] + half[0]),
        float(centre[1] + half[1]),
    )


def cover_region(
    rgb: np.ndarray,
    box: tuple[float, float, float, float],
    method: str,
    strength: float = 1.0,
    *,
    mask_scale: float = 1.0,
    style: CoverStyle = DEFAULT_STYLE,
    face_width: float | None = None,
    in_place: bool = False,
) -> np.ndarray:
    """Cover the whole ``box`` (a face known only by its box; for an aligned input, the whole image).
    A new array, or ``rgb`` itself with ``in_place``.

    The edge is feathered inwards, except along the image border, so the box is
    covered entirely and nothing outside it changes.
    """
    _check_method(method, strength)
    height, width = rgb.shape[:2]
    grow = (_check_scale(mask_scale) - 1.0) / 2.0
    box = (
        box[0] - grow * (box[2] - box[0]),
        box[1] - grow * (box[3] - box[1]),
        box[2] + grow * (box[2] - box[0]),
        box[3] + grow * (box[3] - box[1]),
    )
    x0, y0, x1, y1 = max(box[0], 0.0), max(box[1], 0.0), min(box[2], width), min(box[3], height)
    if x1 <= x0 or y1 <= y0:
        return rgb if in_place else rgb.copy()
    ramp = max(FEATHER * min(x1 - x0, y1 - y0), 1.0)
    # The profiles are zero outside [low, high]: evaluate them on the box's whole pixels only.
    left, top = int(math.floor(x0)), int(math.floor(y0))
    right, bottom = min(int(math.ceil(x1)) + 1, width), min(int(math.ceil(y1)) + 1, height)
    xs = np.arange(left, right, dtype=np.float64) + 0.5
    ys = np.arange(top, bottom, dtype=np.float64) + 0.5

    def profile(coords, low, high, size):
        inner = np.minimum(
            np.inf if low <= 0 else (coords - low) / ramp,
            np.inf if high >= size else (high - coords) / ramp,
        )
        inside = (coords >= low) & (coords <= high)
        return np.where(inside, np.clip(inner, 0.0, 1.0), 0.0)

    mask = np.outer(profile(ys, y0, y1, height), profile(xs, x0, x1, width))
    mask = (mask * mask * (3.0 - 2.0 * mask)).astype(np.float32)
    return _cover(rgb, mask, method, strength, face_width or (x1 - x0), style, (top, left), in_place)


def _check_method(method: str, strength: float) -> None:
    if method not in CLASSICAL_METHODS:
        raise ValueError(f"classical method must be one of {CLASSICAL_METHODS}, got {method!r}")
    if not (math.isfinite(strength) and strength > 0):
        raise ValueError(f"strength must be a positive number, got {strength!r}")


def _check_scale(mask_scale: float) -> float:
    if not (math.isfinite(mask_scale) and 0.5 <= mask_scale <= 3.0):
        raise ValueError(f"mask_scale must be in [0.5, 3], got {mask_scale!r}")
    return float(mask_scale)


def _ellipse_from_box(box: tuple[float, float, float, float]) -> np.ndarray:
    # Detector boxes (dlib's especially) run from brows to chin: extend upwards
    # for the forehead and a little sideways for the cheeks.
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0 - 0.15 * height
    ax, ay = 0.6 * width, 0.7 * height
    return np.array([[1.0 / ax, 0.0, -cx / ax], [0.0, 1.0 / ay, -cy / ay]])


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; wide kernels run on a downscaled copy (a 1024 px face has sigma ~120,
    a 700-tap kernel: seconds at full size, milliseconds at 1/30 size, same look)."""
    factor = sigma / 4.0
    if factor <= 2.0:
        return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    height, width = image.shape[:2]
    small_size = (max(int(round(width / factor)), 1), max(int(round(height / factor)), 1))
    small = cv2.resize(image, small_size, interpolation=cv2.INTER_AREA)
    # Area downscaling already averages over ~factor pixels; the rest of the blur happens small.
    small_sigma = math.sqrt(max(4.0**2 - 0.5**2, 1.0))
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=small_sigma, sigmaY=small_sigma, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def _cover(
    rgb: np.ndarray,
    mask: np.ndarray,
    method: str,
    strength: float,
    face_width: float,
    style: CoverStyle,
    origin: tuple[int, int] = (0, 0),
    in_place: bool = False,
) -> np.ndarray:
    """``mask``: a window of the cover's weights whose top-left pixel is ``origin`` (row, column) in ``rgb``."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if len(rows) == 0:
        return rgb if in_place else rgb.copy()
    mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    y0, x0 = origin[0] + rows[0], origin[1] + cols[0]
    y1, x1 = y0 + mask.shape[0], x0 + mask.shape[1]
    if method == "blur":
        sigma = max(BLUR_SIGMA_PER_FACE_WIDTH * face_width * strength, 0.5)
        # Blur with 3 sigma of real context around the masked box, so the
        # image edge, not a reflected copy of the face, feeds the kernel.
        pad = int(math.ceil(3 * sigma))
        py0, px0 = max(y0 - pad, 0), max(x0 - pad, 0)
        py1, px1 = min(y1 + pad, rgb.shape[0]), min(x1 + pad, rgb.shape[1])
        context = rgb[py0:py1, px0:px1].astype(np.float32)
        blurred = _gaussian_blur(context, sigma)
        covered = blurred[y0 - py0 : y1 - py0, x0 - px0 : x1 - px0]
    elif method == "pixelate":
        block = (
            float(style.mosaic_size)
            if style.mosaic_size is not None
            else max(face_width * strength / PIXELATE_BLOCKS_PER_FACE_WIDTH, 2.0)
        )
        region = rgb[y0:y1, x0:x1]
        small_w = max(int(round((x1 - x0) / block)), 1)
        small_h = max(int(round((y1 - y0) / block)), 1)
        small = cv2.resize(region, (small_w, small_h), interpolation=cv2.INTER_AREA)
        covered = cv2.resize(small, (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST)
    else:
        covered = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        covered[:] = SOLID_COLOUR
        if style.replacement is not None:
            drawn = cv2.resize(style.replacement, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
            alpha = drawn[..., 3:].astype(np.float32) / 255.0
            covered = np.rint(drawn[..., :3] * alpha + covered * (1.0 - alpha)).astype(np.uint8)
    out = rgb if in_place else rgb.copy()
    out[y0:y1, x0:x1] = blend_masked(rgb[y0:y1, x0:x1], covered, mask)  # blend_masked reads a copy first
    return out
