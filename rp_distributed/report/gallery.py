"""The gallery's thumbnails: each sampled face cut from the written output image by its box (and from the input,
only when the invocation asks for originals), as base64 JPEG."""

from __future__ import annotations

import base64
import io as _io
from collections import defaultdict

import numpy as np

from .. import io


def tag(rel_path: str, face_index: int | None) -> str:
    return rel_path if face_index is None else f"{rel_path}#{face_index}"


def crop_box(r: dict, shape) -> tuple[int, int, int, int]:
    """A square around the face box, 1.4x its side, inside the image."""
    h, w = shape[:2]
    x0, y0, x1, y1 = (float(r[k]) for k in ("box_x0", "box_y0", "box_x1", "box_y1"))
    cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, 1.4 * max(x1 - x0, y1 - y0, 8.0)
    a, b = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    c, d = int(min(w, cx + side / 2)), int(min(h, cy + side / 2))
    return a, b, max(c, a + 1), max(d, b + 1)


def thumbnail(rgb: np.ndarray, r: dict, px: int) -> str:
    """Base64 JPEG of the face of row ``r`` (its box) in ``rgb``, ``px`` on its longer side."""
    from PIL import Image

    a, b, c, d = crop_box(r, rgb.shape)
    im = Image.fromarray(np.ascontiguousarray(rgb[b:d, a:c]))
    if max(im.size) > px:
        im.thumbnail((px, px), Image.LANCZOS)
    elif max(im.size) < px:  # small faces: enlarge so the gallery is readable
        scale = px / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    buf = _io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


def _decode(uri: str, max_pixels: int = 64_000_000) -> np.ndarray:
    data = io.read_bytes(uri, 1 << 31)
    return io.decode_image(data, max_pixels).rgb


def gallery(sample: list[dict], size: int, px: int, include_originals: bool) -> list[dict]:
    """The first ``size`` faces of ``sample`` (a random sample of written faces), in (rel_path, face_index) order:
    {tag, method, distance, reidentified, face_error, after, before?, error?}. Each image is decoded once."""
    chosen = sorted(sample[:size], key=lambda r: (r["rel_path"], r["face_index"]))
    by_output: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(chosen):
        by_output[r["output_uri"]].append(i)
    items: dict[int, dict] = {}
    for uri, rows in by_output.items():
        try:
            out = _decode(uri)
            src = _decode(chosen[rows[0]]["input_uri"]) if include_originals else None
        except Exception as exc:  # noqa: BLE001 - a moved or deleted output: say so in the gallery
            for i in rows:
                items[i] = {"error": f"cannot read {uri}: {type(exc).__name__}: {exc}"[:200]}
            continue
        for i in rows:
            item = {"after": thumbnail(out, chosen[i], px)}
            if src is not None and src.shape[:2] == out.shape[:2]:
                item["before"] = thumbnail(src, chosen[i], px)
            items[i] = item
    result = []
    for i, r in enumerate(chosen):
        item = items[i]
        item.update(tag=tag(r["rel_path"], r["face_index"]), method=r.get("method_applied") or "-",
                    distance=r.get("reid_distance"), reidentified=r.get("reidentified"), face_error=r.get("face_error"))
        result.append(item)
    return result
