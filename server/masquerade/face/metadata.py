"""What `--keep-metadata` carries from an input photo to its output, and what it never carries.

Kept: EXIF (camera, exposure, date, copyright...), the ICC profile and XMP. Never kept: GPS and
other location fields (EXIF's GPS IFD; XMP's GPS, city, country, location properties), and any
embedded image: EXIF's thumbnail (IFD1), the maker note (where cameras hide previews), XMP
thumbnails. An embedded thumbnail is a small copy of the original photo, faces included.

The EXIF written is built afresh from an allow-by-construction copy of IFD0 and the Exif IFD, so
IFD1 and anything not copied cannot leak through. Orientation is set to 1: the pixels are upright.
"""

from __future__ import annotations

import io
import re

from PIL import ExifTags, Image, ImageCms

_GPS_IFD = ExifTags.IFD.GPSInfo  # 0x8825
_EXIF_IFD = ExifTags.IFD.Exif  # 0x8769
_INTEROP_IFD = ExifTags.IFD.Interop  # 0xA005
_ORIENTATION = 0x0112
_MAKER_NOTE = 0x927C
# IFD0/Exif tags that point at or hold images or location.
_DROPPED_TAGS = {
    _GPS_IFD,
    _EXIF_IFD,  # re-added below from the filtered copy
    _INTEROP_IFD,
    _MAKER_NOTE,
    0x0201,  # JPEGInterchangeFormat (a thumbnail's offset)
    0x0202,  # JPEGInterchangeFormatLength
    0x0111,  # StripOffsets (uncompressed thumbnail data)
    0x0117,  # StripByteCounts
    0x0144,  # TileOffsets
    0x0145,  # TileByteCounts
    0x014A,  # SubIFDs (TIFF/DNG previews)
    0xC612,  # DNGVersion: raw previews live behind it
    0x83BB,  # IPTC-NAA (may hold city and location)
    0x8773,  # InterColorProfile (the ICC profile travels separately, converted)
    0x02BC,  # XMP inside EXIF (filtered and written separately)
}
_XMP_DROPPED_NAMES = (
    r"(?:GPS\w*|Location\w*|City|State|Country\w*|Sublocation|ProvinceState|WorldRegion|Thumbnails?|PreviewImage)"
)
# prefix:Name="..." attributes, and <prefix:Name ...>...</prefix:Name> or <prefix:Name .../> elements.
_XMP_ATTRIBUTE = re.compile(r"\s[\w.-]+:" + _XMP_DROPPED_NAMES + r'\s*=\s*"[^"]*"')
_XMP_ELEMENT = re.compile(r"<([\w.-]+):(" + _XMP_DROPPED_NAMES + r")\b[^>]*?(?:/>|>.*?</\1:\2\s*>)", re.S)


def exif_kept(original: Image.Image) -> bytes | None:
    """EXIF bytes without location, thumbnail or maker note; None when the input had none."""
    source = original.getexif()
    if not source:
        return None
    kept = Image.Exif()
    for tag, value in source.items():
        if tag not in _DROPPED_TAGS:
            kept[tag] = value
    exif_ifd = {tag: value for tag, value in source.get_ifd(_EXIF_IFD).items() if tag not in _DROPPED_TAGS}
    if exif_ifd:
        kept_ifd = kept.get_ifd(_EXIF_IFD)
        kept_ifd.update(exif_ifd)
    kept[_ORIENTATION] = 1
    return kept.tobytes()


def xmp_kept(original: Image.Image) -> bytes | None:
    """The XMP packet with every location and thumbnail property removed (elements and attributes)."""
    xmp = original.info.get("xmp") or original.info.get("XML:com.adobe.xmp")
    if not xmp:
        return None
    text = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else str(xmp)
    text = _XMP_ATTRIBUTE.sub("", text)
    text = _XMP_ELEMENT.sub("", text)
    return text.encode("utf-8")


def with_metadata(lossless: bytes, original_bytes: bytes, format: str, quality: int = 95) -> bytes:
    """``lossless`` (our metadata-free output, as PNG) encoded once as ``format`` with what --keep-metadata
    keeps of the input.

    The pixels were converted to sRGB on decoding; with the input's ICC profile kept they are
    converted back to it, so the profile describes them.
    """
    with Image.open(io.BytesIO(original_bytes)) as original:
        exif = exif_kept(original)
        xmp = xmp_kept(original)
        icc = original.info.get("icc_profile")
    with Image.open(io.BytesIO(lossless)) as output:
        image = output.convert("RGB")
    extra: dict = {}
    if icc:
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            if profile.profile.xcolor_space.strip() == "RGB":
                image = ImageCms.profileToProfile(image, srgb, profile, outputMode="RGB")
                extra["icc_profile"] = icc
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # an unusable profile: the output stays sRGB, untagged
    if exif is not None:
        extra["exif"] = exif
    buffer = io.BytesIO()
    if format == "jpeg":
        image.save(buffer, "JPEG", quality=int(quality), optimize=True, **extra, **({"xmp": xmp} if xmp else {}))
    elif format == "png":
        if xmp:
            from PIL import PngImagePlugin

            text = PngImagePlugin.PngInfo()
            text.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8"))
            extra["pnginfo"] = text
        image.save(buffer, "PNG", compress_level=6, **extra)
    elif format == "webp":
        image.save(buffer, "WEBP", quality=int(quality), method=4, **extra, **({"xmp": xmp} if xmp else {}))
    elif format == "tiff":
        image.save(buffer, "TIFF", compression="tiff_lzw", **extra)
    else:  # bmp holds no metadata
        image.save(buffer, "BMP")
    return buffer.getvalue()
