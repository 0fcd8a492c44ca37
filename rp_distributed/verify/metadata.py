"""Metadata read back from an output's bytes: what a viewer or an EXIF tool would find besides the pixels.

The job writes none (``io.encode_image``), so anything here was added afterwards (or by a bug): EXIF (with its
GPS block and its thumbnail), XMP, IPTC (Photoshop's APP13), ICC profiles (a profile carries free text: its
description and copyright tags, often a device or a person's name), comments, text chunks, and JFIF thumbnails.
Each format's container is walked segment by segment or chunk by chunk, so nothing depends on what a decoder
chooses to surface; formats without such a walk (TIFF, BMP, other) are read through PIL's tags and info.
"""

from __future__ import annotations

import io
import struct

# JPEG markers that carry no metadata: start/end, frame and scan headers, tables, restart markers.
_JPEG_APP_NAMES = {0xE1: "APP1 (EXIF or XMP)", 0xE2: "APP2 (ICC profile or FlashPix)", 0xED: "APP13 (IPTC)",
                   0xFE: "COM (comment)"}
_JPEG_ADOBE = 0xEE  # APP14 "Adobe": the colour transform flag, no text
_PNG_METADATA = {b"tEXt": "tEXt (text)", b"zTXt": "zTXt (compressed text)", b"iTXt": "iTXt (international text, "
                 "XMP)", b"eXIf": "eXIf (EXIF)", b"iCCP": "iCCP (ICC profile)", b"tIME": "tIME (modification time)"}
_WEBP_METADATA = {b"EXIF": "EXIF", b"XMP ": "XMP", b"ICCP": "ICC profile"}
# TIFF tags that hold metadata rather than the image's structure.
_TIFF_METADATA = {270: "ImageDescription", 271: "Make", 272: "Model", 305: "Software", 306: "DateTime",
                  315: "Artist", 316: "HostComputer", 33432: "Copyright", 34665: "EXIF IFD", 34853: "GPS IFD",
                  700: "XMP", 33723: "IPTC", 34377: "Photoshop (IPTC)", 34675: "ICC profile", 37510: "UserComment"}
_PIL_INFO = ("exif", "xmp", "XML:com.adobe.xmp", "icc_profile", "comment", "photoshop", "iptc", "thumbnail")


def metadata_found(data: bytes) -> list[str]:
    """The metadata blocks in the encoded image ``data`` (empty: none). Raises ``ValueError`` on bytes that are not
    an image this check can walk."""
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data)
    return _pil(data)


def _jpeg(data: bytes) -> list[str]:
    found, i = [], 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError(f"JPEG: no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA or marker == 0xD9:  # start of scan: the entropy-coded data follows, no more headers
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        body = data[i + 4:i + 2 + length]
        if marker == 0xE0:
            if body.startswith(b"JFIF\x00") and len(body) >= 14 and (body[12] or body[13]):
                found.append("JFIF thumbnail")
            elif not body.startswith(b"JFIF\x00"):
                found.append("APP0 (JFXX thumbnail or other)")
        elif (0xE1 <= marker <= 0xEF and marker != _JPEG_ADOBE) or marker == 0xFE:
            label = _JPEG_APP_NAMES.get(marker, f"APP{marker - 0xE0}")
            if body.startswith(b"Exif\x00"):
                label = "EXIF"
            elif body.startswith(b"http://ns.adobe.com/xap/1.0/"):
                label = "XMP"
            elif body.startswith(b"ICC_PROFILE"):
                label = "ICC profile"
            elif body.startswith(b"Photoshop 3.0"):
                label = "IPTC (Photoshop)"
            found.append(label)
        i += 2 + length
    return found


def _png(data: bytes) -> list[str]:
    found, i = [], 8
    while i + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        if kind in _PNG_METADATA:
            found.append(_PNG_METADATA[kind])
        if kind == b"IEND":
            break
        i += 12 + length
    return found


def _webp(data: bytes) -> list[str]:
    found, i = [], 12
    while i + 8 <= len(data):
        kind, length = data[i:i + 4], struct.unpack("<I", data[i + 4:i + 8])[0]
        if kind in _WEBP_METADATA:
            found.append(_WEBP_METADATA[kind])
        i += 8 + length + (length & 1)
    return found


def _pil(data: bytes) -> list[str]:
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"not an image: {exc}") from None
    found = [f"{key}" for key in _PIL_INFO if im.info.get(key)]
    tags = getattr(im, "tag_v2", None)
    if tags is not None:
        found += [f"TIFF tag {_TIFF_METADATA[t]}" for t in tags if t in _TIFF_METADATA]
    return found
