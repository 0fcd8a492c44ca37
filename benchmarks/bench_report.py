"""``report`` and ``inspect`` over a big manifest: wall time and peak RSS (bounded memory).

Writes a synthetic manifest with ``manifest.SCHEMA`` as a run writes it (parts of ``--part-rows`` rows, zstd):
run A processed every input (about 3 rows an input: 15% no face, 1.3% error, 0.7% withheld, the rest 1 + Poisson(2.4)
faces; reverse personalization with 1-3 tries, 3% ladder fallbacks, realistic strings and timings), then a resumed
run B redid the failed inputs and the 3% written under other settings, so the latest view has rows to leave out.
The latest view's decision alone (``view``: the run-id pass and the key pass), ``report`` (``report.write_report``,
gallery included: its output images do not exist, so the gallery says so) and ``inspect --failed`` then run each in a
fresh process that reports its wall time and peak RSS.

    python benchmarks/bench_report.py --inputs 10000000 --root /work/tmp/report-bench   # 30M face rows
    python benchmarks/bench_report.py --inputs 100000                                   # a temp dir

Prints one JSON line per measurement; results go in BENCHMARKS.md with the machine named.
``tests/test_report_streaming.py`` builds its manifests with ``write_manifest``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

RUN_A, RUN_B = "20260301T080000-a1b2c3", "20260302T093000-d4e5f6"
FINGERPRINT, OLD_FINGERPRINT = "5be1e1d2c0a4f711", "0c2f00d9e81b4a37"
IN_PREFIX = "s3://lab-archive/street-scenes-2024/"
PARAMS = json.dumps({"num_inversion_steps": 100, "guidance_scale": -10.0, "ip_adapter_scale": 1.0, "resolution": 1024,
                     "face_size": 1024, "blend": "poisson", "mask_dilate": 0.08, "prompt_mode": "attributes"})
MODEL = json.dumps({"model": "/models/sdxl-base-1.0", "revision": "462165984030d82259a11f4367a4eed129e94a7b",
                    "ip_adapter": "/models/IP-Adapter-FaceID", "ip_adapter_weight_name": "ip-adapter-faceid_sdxl.bin",
                    "arcface": "/models/antelopev2/glintr100.onnx", "dtype": "float16"})
PROMPTS = [f"a photo of a {age}{who}, {light}" for age in ("young ", "middle-aged ", "old ", "")
           for who in ("woman", "man", "person") for light in ("daylight", "indoor light", "at night")]
IMAGE_ERRORS = ["empty file (0 bytes)", "cannot decode image: broken data stream when reading image file",
                "image too large: 96000000 pixels > decode.max_pixels 64000000", "unsupported format: HEIC"]
WITHHELD = ["face 1: fallback failed: ValueError: empty crop", "faces not all anonymized: merge failed"]
FACE_ERRORS = ["identity embedding failed: ValueError: no face in the aligned crop",
               "re-identification check could not run: no face descriptor in the crop"]


def _strings(values: np.ndarray, width: int) -> pa.Array:
    return pc.utf8_lpad(pc.cast(pa.array(values), pa.string()), width=width, padding="0")


def _join(*parts) -> pa.Array:
    return pc.binary_join_element_wise(*parts, "")


def _tries_json(rng, n: int, tries: np.ndarray, d: list[np.ndarray]) -> pa.Array:
    ladder = ["-10.0", "-15.0", "-20.0"]
    text = [_join(f'{{"guidance": {ladder[k]}, "reid_distance": ', pc.cast(pa.array(np.round(d[k], 4)), pa.string()),
                  "}") for k in range(3)]
    two, three = pa.array(tries >= 2), pa.array(tries >= 3)
    body = _join("[", text[0], pc.if_else(two, _join(", ", text[1]), ""), pc.if_else(three, _join(", ", text[2]), ""),
                 "]")
    return pc.if_else(pa.array(tries > 0), body, "[]")


def _image_kinds(rng, n: int, resumed: bool) -> np.ndarray:
    """0 faces written, 1 no face, 2 error, 3 withheld."""
    p = [0.88, 0.115, 0.004, 0.001] if resumed else [0.83, 0.15, 0.013, 0.007]
    return rng.choice(4, size=n, p=p)


def part_table(rng, ids: np.ndarray, run_id: str, out_prefix: str,
               resumed: bool = False, in_prefix: str = IN_PREFIX) -> tuple[pa.Table, np.ndarray]:
    """The manifest rows of inputs ``ids`` (consecutive image rows, as a run writes them; inputs under ``in_prefix``,
    outputs under ``out_prefix``), and the inputs a resumed run redoes (failed, or written under other settings)."""
    kind = _image_kinds(rng, len(ids), resumed)
    faces = np.where((kind == 0) | (kind == 3), 1 + np.minimum(rng.poisson(2.4, len(ids)), 29), 0)
    rows = np.maximum(faces, 1)
    img = np.repeat(np.arange(len(ids)), rows)
    n = len(img)
    first = np.repeat(np.cumsum(rows) - rows, rows)
    has_face = np.repeat(faces > 0, rows)
    face_index = np.where(has_face, np.arange(n) - first, -1)
    k = kind[img]
    rel = _join("shard-", _strings(ids // 1000, 5), "/img_", _strings(ids, 8), ".jpg").take(pa.array(img))
    changed = rng.random(len(ids)) < (0.0 if resumed else 0.03)  # written under other settings: redone by run B
    fp = np.where(changed, OLD_FINGERPRINT, FINGERPRINT)
    written = (k == 0) | (k == 1)
    tries = np.where(has_face & (k == 0), rng.choice([1, 2, 3], n, p=[0.9, 0.07, 0.03]), 0)
    d = [rng.normal(0.85, 0.12, n).clip(0.05, 1.6) for _ in range(3)]
    fell_back = (tries == 3) & (rng.random(n) < 0.9)
    face_err = np.where(fell_back, "still re-identified after 3 tries (last guidance -20.0)",
                        np.where(rng.random(n) < 0.003, rng.choice(FACE_ERRORS, n), ""))
    final = rng.normal(0.9, 0.1, n).clip(0.05, 1.6)
    m = len(ids)  # image-level fields: one value an image, on each of its rows
    w, h = rng.choice([4000, 1920, 1280], m)[img], rng.choice([3000, 1080, 960], m)[img]
    x0, y0 = rng.uniform(0, 900, n), rng.uniform(0, 700, n)
    side = rng.lognormal(np.log(120), 0.6, n).clip(12, 900)
    face = pa.array(has_face)
    in_uri = _join(in_prefix, rel)
    unreadable = pa.array(((kind == 2) & (rng.random(m) < 0.2))[img])  # a reason naming the input: one per input
    cols = {
        "run_id": pa.array([run_id] * n), "input_uri": in_uri, "rel_path": rel,
        "output_uri": pc.if_else(pa.array(written), _join(out_prefix, rel), None),
        "status": pa.array(np.array(["ok", "no_face", "error", "withheld"])[k]),
        "error": pc.if_else(unreadable, _join("cannot read ", in_uri, ": TimeoutError: read timed out"), pa.array(
            np.where(k == 2, rng.choice(IMAGE_ERRORS, m)[img], np.where(k == 3, rng.choice(WITHHELD, m)[img], None)))),
        "notes": pa.array(np.where(rng.random(m) < 0.05, "EXIF orientation 6 applied", None)[img]),
        "settings_fingerprint": pa.array(fp[img]),
        "image_width": pa.array(w, pa.int32()), "image_height": pa.array(h, pa.int32()),
        "num_faces": pa.array(faces[img], pa.int32()),
        "face_index": pa.array(face_index, pa.int32(), mask=~has_face),
        "box_x0": pa.array(x0, pa.float32()), "box_y0": pa.array(y0, pa.float32()),
        "box_x1": pa.array(x0 + side, pa.float32()), "box_y1": pa.array(y0 + side * 1.2, pa.float32()),
        "det_score": pa.array(rng.uniform(0.55, 1.0, n), pa.float32()), "face_size_px": pa.array(side, pa.float32()),
        "detector": pa.array(["centerface"] * n), "method": pa.array(["reverse_personalization"] * n),
        "method_applied": pa.array(np.where(fell_back, "blur", np.where(face_err != "", "blur",
                                                                         "reverse_personalization"))),
        "face_error": pa.array(np.where(face_err == "", None, face_err)), "params": pa.array([PARAMS] * n),
        "attribute_prompt": pa.array(rng.choice(PROMPTS, n)), "id_keypoints": pa.array(["detector"] * n),
        "model": pa.array([MODEL] * n), "seed": pa.array(rng.integers(0, 2**62, n)),
        "guidance_final": pa.array(np.array([0.0, -10.0, -15.0, -20.0])[tries], pa.float32()),
        "tries": pa.array(tries, pa.int32()), "tries_json": _tries_json(rng, n, tries, d),
        "unet_evals": pa.array(400 * tries), "reid_distance": pa.array(final, pa.float32()),
        "reidentified": pa.array(final < 0.6), "reid_threshold": pa.array(np.full(n, 0.6), pa.float32()),
        "identity_exported": pa.array(np.zeros(n, bool)),
        "score_error": pa.array(np.where(rng.random(n) < 0.001, FACE_ERRORS[1], None)),
        "face_still_detected": pa.array(rng.random(n) < 0.97),
        "pose_diff_deg": pa.array(rng.lognormal(np.log(3.0), 0.7, n), pa.float32()),
        "landmark_displacement": pa.array(rng.lognormal(np.log(0.05), 0.6, n), pa.float32()),
        "t_read_s": pa.array(rng.lognormal(np.log(0.05), 0.8, m)[img], pa.float32()),
        "t_detect_s": pa.array(rng.lognormal(np.log(0.4), 0.5, m)[img], pa.float32()),
        "t_anonymize_s": pa.array(rng.lognormal(np.log(4.2), 0.3, n) * np.maximum(tries, 1), pa.float32()),
        "t_merge_s": pa.array(rng.lognormal(np.log(0.3), 0.5, m)[img], pa.float32()),
        "found_by": pa.array(["centerface"] * n), "low_confidence": pa.array(rng.random(n) < 0.002),
        "audit": pa.array(rng.random(n) < 0.001), "audit_faces": pa.array(np.zeros(n), pa.int32()),
        "detect_passes": pa.array(np.full(n, 2), pa.int32()),
        "detect_mpix": pa.array(w * h / 1e6 * 1.5, pa.float32()), "t_audit_s": pa.array(rng.uniform(0.05, 0.2, m)[img],
                                                                                        pa.float32()),
    }
    face_only = {"box_x0", "box_y0", "box_x1", "box_y1", "det_score", "face_size_px", "detector", "method",
                 "method_applied", "face_error", "params", "attribute_prompt", "id_keypoints", "model", "seed",
                 "guidance_final", "tries", "tries_json", "unet_evals", "reid_distance", "reidentified",
                 "reid_threshold", "identity_exported", "score_error", "face_still_detected", "pose_diff_deg",
                 "landmark_displacement", "t_anonymize_s", "found_by", "low_confidence", "audit"}
    for name in face_only:  # an image-level row (no face, error) has no face fields
        cols[name] = pc.if_else(face, cols[name], pa.scalar(None, cols[name].type))
    from rp_distributed import manifest

    table = pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in manifest.SCHEMA}).cast(manifest.SCHEMA)
    return table, ids[(kind >= 2) | changed]


def write_manifest(mdir: Path, inputs: int, part_rows: int = 100_000, seed: int = 0,
                   resume: bool = True, in_prefix: str = IN_PREFIX) -> dict:
    """Run A over ``inputs`` inputs, then (``resume``) run B over the failed and the changed-settings ones; parts of
    about ``part_rows`` rows in ``mdir``; the inputs under ``in_prefix``. Returns counts."""
    rng = np.random.default_rng(seed)
    mdir.mkdir(parents=True, exist_ok=True)
    # The output prefix is the manifest's own (local) folder; no image is there, so the gallery says it cannot read
    # them (at once: an object store without credentials would take seconds per image to say so).
    out = f"{mdir.resolve().parent}/"
    per_part = max(1, part_rows // 3)
    redo, rows, parts = [], 0, 0
    for n, start in enumerate(range(0, inputs, per_part)):
        ids = np.arange(start, min(start + per_part, inputs))
        table, again = part_table(rng, ids, RUN_A, out, in_prefix=in_prefix)
        pq.write_table(table, mdir / f"part-{RUN_A}-{n:05d}.parquet", compression="zstd")
        redo.append(again)
        rows, parts = rows + table.num_rows, parts + 1
    redone = np.concatenate(redo) if redo else np.zeros(0, np.int64)
    if resume:
        for n, start in enumerate(range(0, len(redone), per_part)):
            table, _ = part_table(rng, redone[start:start + per_part], RUN_B, out, resumed=True, in_prefix=in_prefix)
            pq.write_table(table, mdir / f"part-{RUN_B}-{n:05d}.parquet", compression="zstd")
            rows, parts = rows + table.num_rows, parts + 1
    return {"inputs": inputs, "redone": int(len(redone)) if resume else 0, "rows": rows, "parts": parts}


MEASURE = r"""
import json, resource, sys, time
from rp_distributed import report
what, out = sys.argv[1], sys.argv[2]
extra = {}
t0 = time.perf_counter()
if what == "report":
    report.write_report(out)
elif what == "inspect":
    text = report.inspect_text(report.load(out), out, failed=True)
else:  # the latest view alone: the run-id pass and the key pass
    from rp_distributed.report.latest import LatestView
    view = LatestView.open(out, "_manifest")
    extra = {"runs": len(view.runs), "inputs_in_two_runs": len(view.superseded.h0) if view.superseded else 0}
print(json.dumps({"command": what, "wall_s": round(time.perf_counter() - t0, 1),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, **extra}))
"""


def measure(out: Path, what: str) -> dict:
    """``report`` or ``inspect`` in a fresh process: its wall time and peak RSS (imports included)."""
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", MEASURE, what, str(out)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=repo))
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--inputs", type=int, default=1_000_000)
    p.add_argument("--part-rows", type=int, default=100_000)
    p.add_argument("--root", default=None, help="write the manifest here (reused when it exists) and keep it")
    args = p.parse_args()
    tmp = None if args.root else tempfile.TemporaryDirectory()
    root = Path(args.root or tmp.name)
    out = root / "out"
    t0 = time.perf_counter()
    if (out / "_manifest" / "counts.json").exists():
        counts = json.loads((out / "_manifest" / "counts.json").read_text())
    else:
        shutil.rmtree(out, ignore_errors=True)
        counts = write_manifest(out / "_manifest", args.inputs, args.part_rows)
        (out / "_manifest" / "counts.json").write_text(json.dumps(counts))
    counts["layout_s"] = round(time.perf_counter() - t0, 1)
    counts["manifest_mib"] = sum(f.stat().st_size for f in (out / "_manifest").glob("part-*")) // 2**20
    machine = f"{platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    for what in ("view", "report", "inspect"):
        print(json.dumps({**counts, **measure(out, what), "machine": machine}), flush=True)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
