"""Storage and image codecs: list inputs, read and decode safely, encode and write atomically.

Every URI goes through fsspec, so local paths, ``file://``, ``s3://`` and ``gs://`` work the same way, and every
read, write and delete goes through a ``storage.Storage``: a key is a plain path under its prefix, never syntax.
S3-compatible endpoints are taken from the environment (``AWS_ENDPOINT_URL``), credentials from the
usual AWS variables or instance roles; nothing here logs them.
"""

from __future__ import annotations

import io
import posixpath
import re
from dataclasses import dataclass, field

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageOps, UnidentifiedImageError

from .listing import (LISTING_BATCH, LISTING_SCHEMA, InputFile, list_inputs, list_inputs_table,  # noqa: F401
                      listing_base)
from .storage import (NOT_REGULAR, PARTIAL_WRITE, PARTIAL_WRITE_SUFFIX, SYMLINK_BROKEN, SYMLINK_OUTSIDE,  # noqa: F401
                      InputError, Storage, locate, walk_local)

# Formats we decode (the extensions of ``input.extensions``); MPO is the multi-frame JPEG of phone cameras,
# which PIL's JPEG opener returns. Any other format PIL knows (EPS, PSD, ICO, GIF, ...) is refused before
# its parser runs: less decoder attack surface.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
_RESULT_FORMATS = ACCEPTED_FORMATS + ("MPO",)
DEFAULT_MAX_PIXELS = 64_000_000  # InputConfig.max_pixels' default

# PIL's own decompression-bomb check stays on, at our cap: ``decode_image`` sets it to ``input.max_pixels``
# (PIL raises above 2x the limit and only warns between 1x and 2x; our own check on the header size,
# before any pixel is decoded, refuses everything above 1x).
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``uri`` and the path inside it, read strictly (``storage.locate``: no ``::``
    chains, no query; a local path comes back absolute)."""
    fs, path, _ = locate(uri)
    return fs, path


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path) if not isinstance(fs, LocalFileSystem) else path


def normalize_prefix(uri: str) -> str:
    """An object-store prefix with ``.``, ``..`` and ``//`` resolved (object keys keep them verbatim);
    local paths are left as given (the OS resolves them)."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        return uri
    return fs.unstrip_protocol(posixpath.normpath(path))


def join_uri(root: str, rel_path: str) -> str:
    """``root``/``rel_path``, refusing any relative path that would leave ``root``."""
    rel = rel_path.replace("\\", "/")
    norm = posixpath.normpath(rel)
    if rel.startswith("/") or norm.startswith("..") or norm in (".", "") or "\x00" in rel:
        raise InputError(f"unsafe relative path {rel_path!r}: outputs must stay under the output prefix")
    return root.rstrip("/") + "/" + norm


def input_storage(input_uri: str) -> Storage:
    """The storage that the input listing's URIs lie under: the input folder or prefix, or the folder of the
    single file the user named (which is read even through a link: they named it)."""
    fs, root = filesystem(input_uri)
    base, single = listing_base(fs, root)
    return Storage(_unstrip(fs, base), follow_links_out=single)


def listed_storage(uri: str, rel_path: str) -> Storage | None:
    """The storage of the listing ``uri`` came from: ``uri`` less its relative path (text, nothing parsed);
    None when ``uri`` does not end with it."""
    tail = "/" + rel_path
    return Storage(uri[:-len(tail)]) if rel_path and uri.endswith(tail) and len(uri) > len(tail) else None


def _storage_of(uri: str, storage: Storage | None) -> tuple[Storage, str]:
    """The storage ``uri`` lies under (the job's prefix when given, else the object's own folder) and its key."""
    if storage is not None:
        return storage, storage.key_of(uri)
    return Storage.around(uri)


def read_bytes(uri: str, max_bytes: int, storage: Storage | None = None) -> bytes:
    """The bytes at ``uri`` (``InputError`` above ``max_bytes`` or when empty). ``storage``: the prefix ``uri``
    lies under (the job's input); without it, the object's own folder (``Storage.around``)."""
    store, key = _storage_of(uri, storage)
    return store.read(key, max_bytes)


@dataclass
class DecodedImage:
    rgb: np.ndarray  # HxWx3 uint8, EXIF orientation applied
    alpha: np.ndarray | None  # HxW uint8, when the source had transparency
    format: str  # PIL format name of the source: JPEG, PNG, ...
    notes: list[str] = field(default_factory=list)  # conversions applied, for the manifest
    orientation: int = 1  # the EXIF orientation of the stored pixels (1: stored upright), undone in ``rgb``


def _to_uint8_rgb(im: Image.Image, notes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    mode = im.mode
    alpha = None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        if mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) / (hi - lo or 1.0) * 255.0
            notes.append("converted float image to 8-bit")
        else:
            peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
            arr = arr * (255.0 / peak)
            notes.append(f"converted {mode} ({'16' if peak > 255 else '8'}-bit) to 8-bit")
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2), None
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
        notes.append("palette with transparency expanded")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        arr = np.asarray(rgba)
        alpha = np.ascontiguousarray(arr[:, :, 3])
        notes.append("alpha channel kept aside")
        return np.ascontiguousarray(arr[:, :, :3]), alpha
    if mode != "RGB":
        notes.append(f"converted {mode} to RGB")
        im = im.convert("RGB")
    return np.asarray(im).copy(), None


def _pil_formats() -> dict:
    if not Image.OPEN or any(f not in Image.OPEN for f in ACCEPTED_FORMATS):
        Image.init()
    return Image.OPEN


def _sniff_format(data: bytes) -> str | None:
    """The format PIL would see in ``data``'s magic bytes (its plugins' prefix checks only: no parser runs),
    for the reason of a refused file."""
    prefix = data[:16]
    for fmt, (_factory, accept) in list(_pil_formats().items()):
        try:
            result = accept(prefix) if accept is not None else None
        except Exception:  # noqa: BLE001 - a prefix check that cannot handle these bytes
            continue
        if result and not isinstance(result, str):  # a str is PIL's "looks like X but unsupported" note
            return fmt
    return None


def _one_picture(im: Image.Image, notes: list[str]) -> None:
    """Refuse an image of several frames (TIFF pages, WebP or PNG animation frames): decoding frame 0 alone
    would drop the other frames' faces from the export while calling the image done. An MPO (phone cameras'
    JPEG) is one picture: its further frames are the camera's previews, stereo or depth views of the same
    scene; the primary picture is anonymized and written alone, and the manifest says so."""
    frames = int(getattr(im, "n_frames", 1) or 1)
    if frames <= 1:
        return
    if im.format == "MPO":
        notes.append(f"MPO: the primary picture is anonymized and written; its {frames - 1} further frame(s) "
                     "(the camera's previews, stereo or depth views of the same scene) are not written")
        return
    raise InputError(f"multi-frame {im.format} ({frames} frames): only single-frame images are anonymized "
                     "(writing the first frame alone would drop the faces of the others); split it into one "
                     "file per frame")


def decode_image(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode image bytes to RGB uint8 with EXIF orientation applied; refuse decompression bombs and
    formats other than ``ACCEPTED_FORMATS``.

    Two pixel caps, both at ``max_pixels``: PIL's own (``Image.MAX_IMAGE_PIXELS``, process-wide, set here;
    it raises in ``Image.open`` above 2x) and ours on the header size right after (refuses above 1x, where
    PIL only warns). Both run before any pixel data is decoded.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        im = Image.open(io.BytesIO(data), formats=[f for f in ACCEPTED_FORMATS if f in _pil_formats()])
    except UnidentifiedImageError:
        known = _sniff_format(data)
        if known is not None:
            raise InputError(f"not a supported image format (looks like {known}); accepted: "
                             f"{', '.join(ACCEPTED_FORMATS)}") from None
        raise InputError("not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        m = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{m.group(1)} pixels" if m else "more than 2x the cap"
        raise InputError(f"image too large: {size} > input.max_pixels={max_pixels} "
                         "(refused by PIL's decompression-bomb check before decoding)") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken headers
        raise InputError(f"unreadable image header: {exc}") from None
    if im.format not in _RESULT_FORMATS:  # defensive: an opener returning another format class
        raise InputError(f"not a supported image format ({im.format}); accepted: {', '.join(ACCEPTED_FORMATS)}")
    w, h = im.size
    if w <= 0 or h <= 0:
        raise InputError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise InputError(f"image too large: {w}x{h} = {w * h} pixels > input.max_pixels={max_pixels}")
    fmt = im.format or "PNG"
    notes: list[str] = []
    try:
        _one_picture(im, notes)
        im.load()
        orientation = im.getexif().get(0x0112, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            im = ImageOps.exif_transpose(im)
            notes.append(f"EXIF orientation {orientation} applied")
        rgb, alpha = _to_uint8_rgb(im, notes)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt streams surface here
        raise InputError(f"corrupt or truncated image data: {exc}") from None
    return DecodedImage(rgb=rgb, alpha=alpha, format=fmt, notes=notes,
                        orientation=orientation if orientation in (2, 3, 4, 5, 6, 7, 8) else 1)


_EXT_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
               ".tif": "TIFF", ".tiff": "TIFF"}
_FORMAT_EXT = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}


def output_rel_path(rel_path: str, out_format: str) -> str:
    """The output's relative path: the input's, with the extension changed if the format is forced."""
    if out_format == "same":
        return rel_path
    stem, _ = posixpath.splitext(rel_path)
    return stem + _FORMAT_EXT[out_format]


def encode_image(rgb: np.ndarray, alpha: np.ndarray | None, rel_path: str, jpeg_quality: int) -> bytes:
    """Encode for ``rel_path``'s extension. No metadata (EXIF, GPS, XMP, comments) is written."""
    fmt = _EXT_FORMAT.get(posixpath.splitext(rel_path)[1].lower(), "PNG")
    if alpha is not None and fmt in ("PNG", "WEBP", "TIFF"):
        im = Image.fromarray(np.dstack([rgb, alpha]))
    else:
        im = Image.fromarray(rgb)
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, "JPEG", quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
    elif fmt == "WEBP":
        im.save(buf, "WEBP", quality=jpeg_quality)
    else:
        im.save(buf, fmt)
    return buf.getvalue()


def write_atomic(uri: str, data: bytes, storage: Storage | None = None) -> None:
    """Write ``data`` at ``uri`` so readers see the old object or the whole new one, never a part
    (``Storage.write``). ``storage``: the prefix ``uri`` lies under (the job's output prefix: no folder below
    it is followed through a symlink); without it, the object's own folder."""
    store, key = _storage_of(uri, storage)
    store.write(key, data)


def remove(uri: str, storage: Storage | None = None) -> None:
    """Delete the object at ``uri`` if there is one (a missing one is fine). Other errors propagate."""
    store, key = _storage_of(uri, storage)
    store.remove(key)
