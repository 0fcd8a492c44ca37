"""How the ensemble's default passes and thresholds were chosen: on the TUNING split of the recall benchmark
(seed 1; ``bench_recall.py`` reports on seed 2, never seen here).

    python benchmarks/tune_recall.py run --seed 1 --images 60 --cache /tmp/passes-seed1.pkl \\
        --passes centerface@1x,centerface@1x/rot+90,centerface@1x/rot-90,centerface@2x,centerface@3x
    python benchmarks/tune_recall.py eval --cache /tmp/passes-seed1.pkl --ensembles candidates.py
    python benchmarks/tune_recall.py faces --cache /tmp/passes-seed1.pkl --bucket "upright <=24px"

``run`` runs each named pass (``member@SCALEx[/rotANGLE]``, as ``pass_name`` writes it) once over the split at a low
threshold, keeps its raw detections mapped back to the image and its seconds, and adds them to the cache (passes
already there are not run again). ``eval`` merges any subset at any per-pass thresholds exactly as
``EnsembleDetector`` does (candidates: a python file defining ``ENSEMBLES = {name: {pass key: threshold}}``, or
``{name: ({pass key: threshold}, {"generate_above": 0.5, "corroborate": {pass key: floor}})}``, corroboration as
``PassConfig.corroborate`` keeps it; a key ``mtcnn@2x<=40`` keeps that pass's detections of
at most 40 px, as ``PassConfig.max_face_px``), and prints recall per bucket, false detections per
image, the pass cost (megapixels the members see per image megapixel) and seconds per image megapixel (the sum of
the passes' own times, on this machine under its load). ``faces`` prints, per true face of a bucket, the best
score of a detection matching it in each pass: where a threshold would find it and where no pass sees it.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.recall_set import BUCKETS, composites, iou_matrix, score_image  # noqa: E402
from rp_distributed.config.detection import DetectionConfig, PassConfig  # noqa: E402
from rp_distributed.faces.ensemble import EnsembleDetector, corroborated, inside  # noqa: E402
from rp_distributed.faces.rotate import face_back, rotated  # noqa: E402

FLOOR = {"centerface": 0.05, "dlib_hog": -0.5, "dlib_cnn": -1.0, "mtcnn": 0.5}  # raw passes keep detections down to this


def parse_pass(key: str) -> tuple[str, float, float]:
    """``centerface@2x/rot+90`` -> ("centerface", 2.0, 90.0): the inverse of ``pass_name``."""
    member, rest = key.split("@")
    scale, _, angle = rest.partition("/rot")
    return member, float(scale.rstrip("x")), float(angle or 0.0)


def run(seed: int, images: int, cache: str, keys: list[str]) -> None:
    comps = composites(seed, images)
    data = {"seed": seed, "images": images, "raw": {},
            "truth": [(c.boxes, c.buckets, c.image.shape, c.sources) for c in comps]}
    if Path(cache).is_file():
        with open(cache, "rb") as f:
            old = pickle.load(f)
        if (old.get("seed"), old.get("images")) == (seed, images):
            data["raw"] = old["raw"]
    members = sorted({parse_pass(k)[0] for k in keys})
    det = EnsembleDetector(DetectionConfig(passes=[PassConfig(member=m) for m in members]))
    image_mpix = sum(c.image.shape[0] * c.image.shape[1] / 1e6 for c in comps)
    for key in keys:
        if key in data["raw"]:
            continue
        member, scale, angle = parse_pass(key)
        det.cost.mpix, t0, per_image = 0.0, time.perf_counter(), []
        for c in comps:
            copy, m = (c.image, None) if angle == 0 else rotated(c.image, angle)
            faces = det._run_pass(det.members[member], copy, scale, FLOOR[member])
            if m is not None:  # as EnsembleDetector.detect: none centred on the mirrored border, no empty box
                faces = [g for g in (face_back(f, m, c.image.shape) for f in faces if inside(f.box, m, c.image.shape))
                         if g.box[2] > g.box[0] and g.box[3] > g.box[1]]
            per_image.append([replace(f, found_by=(key,)) for f in faces])
        seconds = time.perf_counter() - t0
        data["raw"][key] = {"faces": per_image, "mpix_ratio": det.cost.mpix / image_mpix,
                            "s_per_mpix": seconds / image_mpix}
        print(f"{key}: {data['raw'][key]['mpix_ratio']:.2f} MP per image MP, {seconds / image_mpix:.2f} s/MP",
              flush=True)
        with open(cache, "wb") as f:  # after every pass: a long run keeps what it did
            pickle.dump(data, f)


def evaluate(data: dict, passes: dict[str, float], generate_above: float = 0.5,
             corroborate: dict[str, float] | None = None) -> dict:
    """Recall per bucket, false detections per image and cost of the ensemble of ``passes`` (key: threshold), with
    the weak detections of the passes in ``corroborate`` (key: floor) kept where two members agree."""
    det = EnsembleDetector.__new__(EnsembleDetector)
    det.merge_iou, det.generate_above = 0.3, generate_above
    found, buckets, false, low = [], [], 0, 0
    floors = {k: PassConfig(member=_raw(k).split("@")[0], threshold=passes.get(k, 1.0), corroborate=v)
              for k, v in (corroborate or {}).items()}  # a key only here: a pass run for corroboration alone
    for i, (truth, bucket, shape, *_) in enumerate(data["truth"]):
        faces = [f for k, t in passes.items() for f in data["raw"][_raw(k)]["faces"][i]
                 if f.score >= t and f.size <= _cap(k)]
        split = {True: [], False: []}  # sure (at the pass's threshold) or weak, as EnsembleDetector.detect splits them
        for k, p in floors.items():
            for f in data["raw"][_raw(k)]["faces"][i]:
                if f.size <= _cap(k):
                    split[f.score >= p.threshold].append((f, p, 0.0))
        merged = det.merge(faces + corroborated(split[False], split[True], det.merge_iou))
        boxes = np.array([f.box for f in merged], np.float32).reshape(-1, 4)
        s = score_image(truth, boxes, np.array([f.score for f in merged]), shape)
        found += s.found
        buckets += bucket
        false += s.false
        low += sum(not f.confident for f in merged)
    found, buckets = np.array(found), np.array(buckets)
    return {"recall": found.mean(), "false": false / len(data["truth"]), "low": low,
            "buckets": {b: found[buckets == b].mean() for b in BUCKETS},
            "cost": sum(data["raw"][_raw(k)]["mpix_ratio"] for k in {*passes, *floors}),
            "s_per_mpix": sum(data["raw"][_raw(k)].get("s_per_mpix", float("nan")) for k in {*passes, *floors})}


def _raw(key: str) -> str:
    """``mtcnn@2x<=40``: the raw pass ``mtcnn@2x``, its detections of at most 40 px (``PassConfig.max_face_px``)."""
    return key.partition("<=")[0]


def _cap(key: str) -> float:
    return float(key.partition("<=")[2] or "inf")


def line(name: str, r: dict) -> str:
    cells = " ".join(f"{100 * v:5.1f}" for v in r["buckets"].values())
    return (f"{name:58s} {100 * r['recall']:5.1f} | {cells} | fp/img {r['false']:.2f} low {r['low']:3d} "
            f"cost {r['cost']:4.1f} {r['s_per_mpix']:5.1f} s/MP")


def faces(data: dict, bucket: str) -> None:
    """Per true face of ``bucket``: its source and size, and each pass's best score on it (IoU >= 0.3)."""
    keys = list(data["raw"])
    print(f"{'face':28s} " + " ".join(f"{k[:16]:>16s}" for k in keys))
    for i, (truth, bucket_of, _shape, sources) in enumerate(data["truth"]):
        for j, b in enumerate(bucket_of):
            if b != bucket:
                continue
            side = float(max(truth[j, 2] - truth[j, 0], truth[j, 3] - truth[j, 1]))
            cells = []
            for k in keys:
                dets = data["raw"][k]["faces"][i]
                boxes = np.array([f.box for f in dets], np.float32).reshape(-1, 4)
                ious = iou_matrix(boxes, truth[j:j + 1])[:, 0] if len(dets) else np.zeros(0)
                best = max((f.score for f, u in zip(dets, ious) if u >= 0.3), default=None)
                cells.append(f"{best:16.2f}" if best is not None else f"{'-':>16s}")
            print(f"{i:3d}/{j} {sources[j][:14]:14s} {side:5.1f}px " + " ".join(cells))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["run", "eval", "faces"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--cache", default="/tmp/passes-seed1.pkl")
    ap.add_argument("--passes", default="centerface@1x,centerface@1x/rot+90,centerface@1x/rot-90,centerface@2x",
                    help="run: comma-separated pass keys")
    ap.add_argument("--ensembles", help="eval: python file defining ENSEMBLES")
    ap.add_argument("--bucket", default="upright <=24px", help="faces: the bucket to list")
    args = ap.parse_args(argv)
    if args.what == "run":
        assert args.seed != 2, "seed 2 is the reported split: never tune on it"
        return run(args.seed, args.images, args.cache, [k.strip() for k in args.passes.split(",")])
    with open(args.cache, "rb") as f:
        data = pickle.load(f)
    if args.what == "faces":
        return faces(data, args.bucket)
    print(f"{'ensemble':58s} total | " + " ".join(b[:5] for b in BUCKETS))
    scope: dict = {}
    exec(Path(args.ensembles).read_text(), scope)  # noqa: S102 - a local file of candidate dicts
    for name, spec in scope["ENSEMBLES"].items():
        passes, opts = spec if isinstance(spec, tuple) else (spec, {})
        print(line(name, evaluate(data, passes, **opts)), flush=True)


if __name__ == "__main__":
    main()
