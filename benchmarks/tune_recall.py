"""How the ensemble's default passes and thresholds were chosen: on the TUNING split of the recall benchmark
(seed 1; ``bench_recall.py`` reports on seed 2, never seen here).

    python benchmarks/tune_recall.py run --seed 1 --images 30 --cache /tmp/passes-seed1.pkl   # every candidate pass
    python benchmarks/tune_recall.py eval --cache /tmp/passes-seed1.pkl                       # candidate ensembles

``run`` runs every candidate pass once (CenterFace at several magnifications and rotations, dlib's HOG) at a low
threshold and keeps its raw detections, mapped back to the image; ``eval`` then merges any subset at any
per-pass thresholds exactly as ``EnsembleDetector`` does, and prints recall per bucket, false detections and the
pass cost (megapixels the members see per image megapixel).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.recall_set import BUCKETS, composites, score_image  # noqa: E402
from rp_distributed.config.detection import DetectionConfig, PassConfig  # noqa: E402
from rp_distributed.faces.ensemble import EnsembleDetector, pass_name  # noqa: E402
from rp_distributed.faces.rotate import face_back, rotated  # noqa: E402

CANDIDATES = ([("centerface", 1.0, a) for a in (0, 90, -90, 45, -45)]
              + [("centerface", s, 0) for s in (2.0, 1.5)])
FLOOR = {"centerface": 0.1, "dlib_hog": -0.3}


def run(seed: int, images: int, cache: str) -> None:
    comps = composites(seed, images)
    det = EnsembleDetector(DetectionConfig(passes=[PassConfig(member="centerface"), PassConfig(member="dlib_hog")]))
    raw = {}
    for member, scale, angle in CANDIDATES:
        key = pass_name(member, scale, angle)
        det.cost.mpix = 0.0
        per_image = []
        for c in comps:
            copy, m = (c.image, None) if angle == 0 else rotated(c.image, angle)
            faces = det._run_pass(det.members[member], copy, scale, FLOOR[member])
            if m is not None:
                faces = [face_back(f, m, c.image.shape) for f in faces]
            per_image.append([replace(f, found_by=(key,)) for f in faces])
        raw[key] = {"faces": per_image, "mpix_ratio": det.cost.mpix / sum(c.image.size / 3e6 for c in comps)}
        print(key, f"{raw[key]['mpix_ratio']:.2f} MP per image MP", flush=True)
    with open(cache, "wb") as f:
        pickle.dump({"truth": [(c.boxes, c.buckets, c.image.shape) for c in comps], "raw": raw}, f)


def evaluate(data: dict, passes: dict[str, float], generate_above: float = 0.5) -> dict:
    """Recall per bucket, false detections per image and cost of the ensemble of ``passes`` (key: threshold)."""
    det = EnsembleDetector.__new__(EnsembleDetector)
    det.merge_iou, det.generate_above = 0.3, generate_above
    found, buckets, false, low = [], [], 0, 0
    for i, (truth, bucket, shape) in enumerate(data["truth"]):
        faces = [f for k, t in passes.items() for f in data["raw"][k]["faces"][i] if f.score >= t]
        merged = det.merge(faces)
        boxes = np.array([f.box for f in merged], np.float32).reshape(-1, 4)
        s = score_image(truth, boxes, np.array([f.score for f in merged]), shape)
        found += s.found
        buckets += bucket
        false += s.false
        low += sum(not f.confident for f in merged)
    found, buckets = np.array(found), np.array(buckets)
    return {"recall": found.mean(), "false": false / len(data["truth"]), "low": low,
            "buckets": {b: found[buckets == b].mean() for b in BUCKETS},
            "cost": sum(data["raw"][k]["mpix_ratio"] for k in passes)}


def line(name: str, r: dict) -> str:
    cells = " ".join(f"{100 * v:5.1f}" for v in r["buckets"].values())
    return f"{name:60s} {100 * r['recall']:5.1f} | {cells} | fp/img {r['false']:.2f} low {r['low']:3d} cost {r['cost']:.1f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["run", "eval"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--cache", default="/tmp/passes-seed1.pkl")
    ap.add_argument("--ensembles", help="python file defining ENSEMBLES = {name: {pass key: threshold}}")
    args = ap.parse_args(argv)
    if args.what == "run":
        return run(args.seed, args.images, args.cache)
    with open(args.cache, "rb") as f:
        data = pickle.load(f)
    print(f"{'ensemble':60s} total | " + " ".join(b[:5] for b in BUCKETS))
    scope: dict = {}
    exec(Path(args.ensembles).read_text(), scope)  # noqa: S102 - a local file of candidate dicts
    for name, passes in scope["ENSEMBLES"].items():
        print(line(name, evaluate(data, passes)), flush=True)


if __name__ == "__main__":
    main()
