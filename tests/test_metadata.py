"""No metadata of an input survives into any output, through the stages and every output format.

A photo with a face (scikit-image's astronaut) and one without (coffee) are written as JPEG, PNG, WebP and TIFF
carrying every kind of metadata their format holds: EXIF with GPS and an embedded thumbnail, XMP, IPTC, a JPEG
comment, an ICC profile, PNG text chunks. Each text carries a marker; each input is checked to carry it. Then
each goes through the three stages (in this process) to JPEG, PNG, WebP, TIFF and BMP outputs, and the output
bytes are searched for every marker and parsed for every metadata structure of their format."""

from __future__ import annotations

import copy
import dataclasses
import io as _io
import struct

import pytest
from PIL import Image, ImageCms, PngImagePlugin

from rp_distributed.anonymizer import Anonymizer
from rp_distributed.config import anonymization_fingerprint, load_config
from rp_distributed.records import ImageRow
from rp_distributed.stages.detect import DetectFaces
from rp_distributed.stages.merge import MergeAndWrite
from tests.conftest import FAST_DETECTION, skimage_image

MARK = b"RPMARK"


def _exif(photo: Image.Image) -> bytes:
    """EXIF (little-endian TIFF) with Make, a GPS IFD (latitude and a text datum) and IFD1 holding a JPEG thumbnail."""
    thumb = _io.BytesIO()
    small = photo.copy()
    small.thumbnail((64, 64))
    small.save(thumb, "JPEG", comment=MARK + b"-THUMB")
    thumb = thumb.getvalue()
    make, datum = MARK + b"-EXIF-MAKE\x00", MARK + b"-GPS-DATUM\x00"

    def ifd(entries, next_ifd):  # entries: (tag, type, count, value-or-offset as 4 bytes)
        out = struct.pack("<H", len(entries))
        for tag, typ, count, value in entries:
            out += struct.pack("<HHI", tag, typ, count) + value
        return out + struct.pack("<I", next_ifd)

    size = lambda n: 2 + 12 * n + 4  # noqa: E731
    ifd0 = 8
    gps = ifd0 + size(2)
    ifd1 = gps + size(3)
    data = ifd1 + size(2)
    make_at, lat_at, datum_at = data, data + len(make), data + len(make) + 24
    thumb_at = datum_at + len(datum)
    blob = b"II*\x00" + struct.pack("<I", ifd0)
    blob += ifd([(0x010F, 2, len(make), struct.pack("<I", make_at)), (0x8825, 4, 1, struct.pack("<I", gps))], ifd1)
    blob += ifd([(0x0001, 2, 2, b"N\x00\x00\x00"), (0x0002, 5, 3, struct.pack("<I", lat_at)),
                 (0x0012, 2, len(datum), struct.pack("<I", datum_at))], 0)
    blob += ifd([(0x0201, 4, 1, struct.pack("<I", thumb_at)), (0x0202, 4, 1, struct.pack("<I", len(thumb)))], 0)
    blob += make + struct.pack("<6I", 48, 1, 51, 1, 30, 1) + datum + thumb
    return b"Exif\x00\x00" + blob


XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" dc:creator="' + MARK + b'-XMP"/>'
       b"</rdf:RDF></x:xmpmeta>")
IPTC = b"\x1c\x02\x78" + struct.pack(">H", len(MARK) + 5) + MARK + b"-IPTC"  # 2:120 caption
ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes() + MARK + b"-ICC\x00"


def _app13(iptc: bytes) -> bytes:
    body = b"Photoshop 3.0\x00" + b"8BIM\x04\x04\x00\x00" + struct.pack(">I", len(iptc)) + iptc + b"\x00" * (len(iptc) % 2)
    return b"\xff\xed" + struct.pack(">H", len(body) + 2) + body


def _with_metadata(photo: Image.Image, fmt: str) -> bytes:
    buf = _io.BytesIO()
    exif = _exif(photo)
    if fmt == "JPEG":
        photo.save(buf, "JPEG", quality=92, exif=exif, icc_profile=ICC, comment=MARK + b"-COMMENT", xmp=XMP)
        data = buf.getvalue()
        return data[:2] + _app13(IPTC) + data[2:]
    if fmt == "PNG":
        text = PngImagePlugin.PngInfo()
        text.add_text("Author", (MARK + b"-PNG-TEXT").decode())
        text.add_text("Comment", (MARK + b"-PNG-ZTXT").decode(), zip=True)
        text.add_itxt("XML:com.adobe.xmp", XMP.decode())
        text.add_text("Raw profile type iptc", IPTC.hex())
        photo.save(buf, "PNG", pnginfo=text, exif=exif, icc_profile=ICC)
    elif fmt == "WEBP":
        photo.save(buf, "WEBP", quality=92, exif=exif, icc_profile=ICC, xmp=XMP)
    else:  # TIFF: EXIF's tags live in the file's own IFD (Make) and a GPS IFD; no thumbnail IFD
        tags = Image.Exif()
        tags.load(exif[6:])
        photo.save(buf, "TIFF", icc_profile=ICC, tiffinfo={270: (MARK + b"-TIFF-DESCRIPTION").decode(), 700: XMP,
                                                           33723: IPTC, 271: tags[271], 34853: tags.get_ifd(0x8825)})
    return buf.getvalue()


# The markers each format carries readably (PNG's zTXt and iCCP, and its IPTC as hex, are compressed or encoded:
# _structures finds those).
CARRIED = {"JPEG": {"COMMENT", "EXIF-MAKE", "GPS-DATUM", "ICC", "IPTC", "THUMB", "XMP"},
           "PNG": {"EXIF-MAKE", "GPS-DATUM", "PNG-TEXT", "THUMB", "XMP"},
           "WEBP": {"EXIF-MAKE", "GPS-DATUM", "ICC", "THUMB", "XMP"},
           "TIFF": {"EXIF-MAKE", "GPS-DATUM", "ICC", "IPTC", "TIFF-DESCRIPTION", "XMP"}}


def _markers(data: bytes) -> set[str]:
    import re

    return {m.decode() for m in re.findall(MARK + rb"-([A-Z]+(?:-[A-Z]+)?)", data)} & set().union(*CARRIED.values())


def _structures(data: bytes) -> list[str]:
    """The metadata structures found in an image file's bytes."""
    im = Image.open(_io.BytesIO(data))
    found = [k for k in ("exif", "icc_profile", "xmp", "comment", "XML:com.adobe.xmp", "Author", "Comment",
                         "Raw profile type iptc", "photoshop") if k in im.info]
    found += ["EXIF tags"] if len(im.getexif()) and im.format != "TIFF" else []
    if im.format == "JPEG":
        i = 2
        while i < len(data) and data[i + 1] != 0xDA:  # segments up to the scan
            marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
            if 0xE1 <= marker <= 0xEF or marker == 0xFE:
                found.append(f"JPEG segment {marker:#x}")
            i += 2 + length
    elif im.format == "PNG":
        i = 8
        while i < len(data):
            length, kind = struct.unpack(">I4s", data[i:i + 8])
            if kind not in (b"IHDR", b"IDAT", b"IEND", b"PLTE", b"tRNS"):
                found.append(f"PNG chunk {kind.decode()}")
            i += 12 + length
    elif im.format == "WEBP":
        i = 12
        while i < len(data):
            kind, length = struct.unpack("<4sI", data[i:i + 8])
            if kind not in (b"VP8 ", b"VP8L", b"VP8X", b"ALPH"):
                found.append(f"WebP chunk {kind.decode()}")
            elif kind == b"VP8X" and data[i + 8] & 0b00101100:  # ICC, EXIF or XMP flag
                found.append("WebP VP8X metadata flag")
            i += 8 + length + length % 2
    elif im.format == "TIFF":
        found += [f"TIFF tag {t}" for t in im.tag_v2 if t in (270, 271, 272, 305, 315, 700, 33432, 33723, 34665, 34675, 34853)]
    return found


@pytest.fixture(scope="module")
def stages():
    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur"])
    return DetectFaces.from_config(cfg), Anonymizer.from_config(cfg), MergeAndWrite.from_config(cfg, "run", anonymization_fingerprint(cfg))


@pytest.mark.parametrize("source_format", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_no_metadata_survives_any_output_format(tmp_path, stages, source_format):
    detect, anonymize, merge = stages
    ext = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif"}[source_format]
    for photo, status in (("astronaut.png", "ok"), ("coffee.png", "no_face")):
        src = tmp_path / (photo.split(".")[0] + ext)
        data = _with_metadata(Image.open(skimage_image(photo)).convert("RGB"), source_format)
        src.write_bytes(data)
        assert _markers(data) == CARRIED[source_format] and _structures(data), "the input carries its metadata"
        row = detect.process(ImageRow.of({"input_uri": str(src), "rel_path": src.name, "output_uri": "x", "error": None,
                              "notes": None, "stale_output_uri": None}))
        anonymize(row.payload.faces)
        assert (len(row.payload.faces) > 0) == (status == "ok")
        for out_ext in (".jpg", ".png", ".webp", ".tif", ".bmp"):  # output.format same/jpeg/png/webp, and the rest
            out = tmp_path / "out" / (src.stem + ext.lstrip(".") + out_ext)
            rows = merge.process(dataclasses.replace(copy.deepcopy(row), output_uri=str(out)))
            assert {r["status"] for r in rows} == {status}
            written = out.read_bytes()
            assert MARK not in written, (src.name, out_ext, written[written.find(MARK) - 20:written.find(MARK) + 30])
            assert _structures(written) == [], (src.name, out_ext)
