"""decode_image / encode_image: orientation, colour, limits and metadata stripping."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from masquerade.engine.request import InvalidRequestError
from masquerade.face import decode_image, encode_image

GPS_IFD = 0x8825
ORIENTATION = 0x0112
XMP_MARKER = "masquerade-secret-xmp-location"
XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    f'<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" dc:source="{XMP_MARKER}"/>'
    "</rdf:RDF></x:xmpmeta>"
)


def _gradient(height=48, width=64) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 4 % 256, ys * 5 % 256, (xs + ys) * 2 % 256], -1).astype(np.uint8)


def _save(array_or_image, fmt, **kwargs) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _exif_with_gps_and_thumbnail() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "SecretCameraMaker"  # Make
    exif[ORIENTATION] = 1
    gps = exif.get_ifd(GPS_IFD)
    gps[1] = "N"
    gps[2] = (48.0, 51.0, 29.0)
    gps[3] = "E"
    gps[4] = (2.0, 17.0, 40.0)
    raw = exif.tobytes()
    # Append a JPEG thumbnail by hand: IFD1 with JPEGInterchangeFormat(Length).
    thumbnail = _save(_gradient(8, 8), "JPEG", quality=50)
    assert raw.startswith(b"Exif\x00\x00")
    tiff = bytearray(raw[6:])
    byte_order = "<" if tiff[:2] == b"II" else ">"
    first_ifd = struct.unpack(byte_order + "I", tiff[4:8])[0]
    entries = struct.unpack(byte_order + "H", tiff[first_ifd : first_ifd + 2])[0]
    next_pointer_at = first_ifd + 2 + 12 * entries
    ifd1_at = len(tiff)
    tiff[next_pointer_at : next_pointer_at + 4] = struct.pack(byte_order + "I", ifd1_at)
    data_at = ifd1_at + 2 + 2 * 12 + 4
    tiff += struct.pack(byte_order + "H", 2)
    tiff += struct.pack(byte_order + "HHII", 0x0201, 4, 1, data_at)
    tiff += struct.pack(byte_order + "HHII", 0x0202, 4, 1, len(thumbnail))
    tiff += struct.pack(byte_order + "I", 0)
    tiff += thumbnail
    return b"Exif\x00\x00" + bytes(tiff)


def test_exif_rotated_jpeg_decodes_upright():
    pixels = _gradient()
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # stored pixels must be rotated 90 degrees clockwise to display
    data = _save(pixels, "JPEG", quality=100, subsampling=0, exif=exif.tobytes())
    decoded = decode_image(data)
    upright = np.rot90(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), k=-1)
    assert decoded.format == "jpeg"
    assert decoded.rgb.shape == (64, 48, 3)
    np.testing.assert_array_equal(decoded.rgb, upright)


def test_alpha_is_composited_on_white_and_grayscale_16bit_is_scaled():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    decoded = decode_image(_save(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(decoded.rgb[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(decoded.rgb[3, 0], [255, 255, 255])

    gray16 = Image.fromarray(np.full((3, 5), 65535 // 2, dtype=np.uint16))
    decoded = decode_image(_save(gray16, "PNG"))
    assert decoded.rgb.shape == (3, 5, 3) and abs(int(decoded.rgb[0, 0, 0]) - 127) <= 1


def test_icc_profile_runs_through_colour_management_and_a_broken_one_is_ignored():
    pixels = np.full((8, 8, 3), (200, 60, 40), dtype=np.uint8)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    # Pillow can only build sRGB/LAB/XYZ profiles, so the RGB case is sRGB -> sRGB: near identity.
    decoded = decode_image(_save(pixels, "PNG", icc_profile=srgb))
    assert np.abs(decoded.rgb.astype(int) - pixels).max() <= 2
    decoded = decode_image(_save(pixels, "PNG", icc_profile=b"not a profile" * 20))
    np.testing.assert_array_equal(decoded.rgb, pixels)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_metadata_is_stripped_on_reencode(fmt):
    exif = _exif_with_gps_and_thumbnail()
    pil_format = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    if fmt == "png":  # Pillow writes PNG XMP only as the standard iTXt chunk
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", XMP)
        info.add_text("Comment", "SecretCameraMaker was here")
        data = _save(_gradient(), pil_format, exif=exif, pnginfo=info)
    else:
        data = _save(_gradient(), pil_format, exif=exif, xmp=XMP.encode())
    assert XMP_MARKER.encode() in data and b"SecretCameraMaker" in data  # the input really carries it
    decoded = decode_image(data)
    assert decoded.format == fmt
    out = encode_image(decoded.rgb, fmt)
    for marker in (XMP_MARKER.encode(), b"SecretCameraMaker", b"Exif", b"xmpmeta", b"eXIf", b"iTXt", b"tEXt"):
        assert marker not in out, marker
    reread = Image.open(io.BytesIO(out))
    assert not reread.getexif() and "icc_profile" not in reread.info
    assert decode_image(out).rgb.shape == decoded.rgb.shape


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    )


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"definitely not an image" * 10, "not a recognised image"),
        (_png_header_only(100_000, 100_000), "too many pixels"),
        (_png_header_only(8_000, 8_000), "over the limit"),  # under Pillow's own bomb cap, over ours
    ],
    ids=["empty", "garbage", "pillow-bomb", "over-cap"],
)
def test_bad_input_is_rejected_naming_the_image_field(data, message):
    with pytest.raises(InvalidRequestError) as info:
        decode_image(data)
    assert info.value.field == "image" and message in str(info.value)


def test_truncated_and_unsupported_inputs_are_rejected():
    full = _save(_gradient(), "PNG")
    with pytest.raises(InvalidRequestError, match="truncated or corrupt"):
        decode_image(full[: len(full) // 2])
    with pytest.raises(InvalidRequestError, match="not supported"):
        decode_image(_save(_gradient(), "GIF"))
    with pytest.raises(InvalidRequestError, match="over the limit"):
        decode_image(full, max_pixels=100)
