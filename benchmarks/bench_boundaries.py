"""Bytes per row at each stage boundary of the job (issue 8: lean stage boundaries).

Builds a 12 MP photo with 3 faces from insightface's t1.jpg (its top-left 667x500 with three people,
scaled up 6x to 4000x3000, JPEG quality 95), runs the real stages in this process (``DetectFaces.process`` ->
``AnonymizeFaces`` -> ``MergeAndWrite``) with 1024 px crops, and measures each row as Ray stores it
between stages: pickled with protocol 5 (Ray keeps a row's ``ImagePayload`` as one pickled object).

    python benchmarks/bench_boundaries.py                    # blur (no diffusion), 1024 px crops
    python benchmarks/bench_boundaries.py --face-size 512

Prints one JSON line; results go in BENCHMARKS.md with the machine named. Works on the code of any
commit since face records became ``records.Face`` and on the dict records before that (for the "before"
row: run it from a worktree of the older commit).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pickle
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_photo(path: Path) -> None:
    t1 = Path(list(importlib.util.find_spec("insightface").submodule_search_locations)[0]) / "data/images/t1.jpg"
    im = Image.open(t1).convert("RGB")
    left = im.crop((0, 0, 667, 500))  # three of the six people, 4:3
    left.resize((4000, 3000), Image.LANCZOS).save(path, "JPEG", quality=95)


def size(obj) -> int:
    return len(pickle.dumps(obj, protocol=5))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--face-size", type=int, default=1024)
    args = p.parse_args()

    from rp_distributed.config import load_config
    from rp_distributed.stages.anonymize import AnonymizeFaces
    from rp_distributed.stages.detect import DetectFaces
    from rp_distributed.stages.merge import MergeAndWrite
    from rp_distributed.stages.batch import columns as _columns, rows as _rows

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "photo.jpg", Path(tmp) / "out.jpg"
        make_photo(src)
        jpeg_bytes = src.stat().st_size
        cfg = load_config(None, ["anonymizer.method=blur", f"alignment.face_size={args.face_size}",
                                 "detection.upsample=0"])
        row = {"input_uri": str(src), "rel_path": "photo.jpg", "output_uri": str(out), "stale_output_uri": None,
               "error": None, "notes": None}
        plan_bytes = size(row)
        t0 = time.perf_counter()
        detected = DetectFaces.from_config(cfg).process(row)
        t_detect = time.perf_counter() - t0
        payload = detected.payload
        assert detected.pending and len(payload.faces) == 3, (detected.status, len(payload.faces))
        after_detect = size(detected)
        (anonymized,) = _rows(AnonymizeFaces.from_config(cfg)(_columns([detected])))
        after_anonymize = size(anonymized)
        t1 = time.perf_counter()
        rows = _rows(MergeAndWrite.from_config(cfg, "bench")(_columns([anonymized])))
        t_merge = time.perf_counter() - t1
        assert {r["status"] for r in rows} == {"ok"}, rows
        after_merge = sum(size(r) for r in rows)
    total = plan_bytes + after_detect + after_anonymize + after_merge
    print(json.dumps({
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "photo": "4000x3000 JPEG q95", "jpeg_bytes": jpeg_bytes,
        "face_size": args.face_size, "faces": 3,
        "bytes": {"plan->detect": plan_bytes, "detect->anonymize": after_detect,
                  "anonymize->merge": after_anonymize, "merge->driver": after_merge, "total": total},
        "t_detect_s": round(t_detect, 2), "t_merge_s": round(t_merge, 2),
    }))


if __name__ == "__main__":
    main()
