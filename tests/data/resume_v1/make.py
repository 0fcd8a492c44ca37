"""Writes this folder's fixture with the code of the commit named in README.md (the layout before the package was
split into stages/ and job/): the settings fingerprints of a spread of configs, and a real run's manifest parts and
outputs over two photos. tests/test_resume_compat.py checks that the current code computes the same fingerprints
and resumes that run with zero inputs redone. Run from the repository root: python tests/data/resume_v1/make.py
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from rp_distributed.config import anonymization_fingerprint, load_config  # noqa: E402

TINY = "/models/tiny"  # paths need not exist: a missing model file is fingerprinted as unresolved, by folder
RP = ["anonymizer.method=reverse_personalization", f"diffusion.model={TINY}/sdxl",
      f"diffusion.ip_adapter={TINY}/ip-adapter", f"diffusion.arcface={TINY}/arcface/w600k_r50.onnx"]
CONFIGS = {
    "defaults": [],
    "pixelate_dlib": ["anonymizer.method=pixelate", "detection.backend=dlib", "alignment.padding=0.3"],
    "mask_audit_off": ["anonymizer.method=mask", "merge.audit.enabled=false", "merge.feather=0.1"],
    "reverse_personalization": RP,
    "rp_prompts_and_ladder": RP + ["prompts.table=/data/p.csv", "prompts.template=a photo of {age}",
                                   "privacy.guidance_ladder=[-12.0, -14.0]", "diffusion.attribute_prompt=an old man",
                                   "diffusion.model_revision=abc", "diffusion.variant=fp16"],
    "annotations": ["input.mode=annotations", "input.annotations=/data/a.parquet", "input.annotations_frame=stored",
                    "input.annotations_missing=skip"],
    "aligned_detector": ["input.mode=aligned", "input.aligned_keypoints=detector"],
    "insightface": ["detection.backend=insightface", "detection.model=buffalo_l", "detection.model_dir=/nowhere"],
}
FAST = ["detection.passes=[{member: centerface, scale: 1.0, rotations: [0.0], threshold: 0.35}]",
        "merge.audit.max_pass_px=1024"]


def main() -> None:
    from rp_distributed.pipeline import run_job

    fps = {name: {"overrides": over, "fingerprint": anonymization_fingerprint(load_config(None, over))}
           for name, over in CONFIGS.items()}
    (HERE / "fingerprints.json").write_text(json.dumps(fps, indent=1) + "\n")
    run = HERE / "run"
    shutil.rmtree(run, ignore_errors=True)
    inp = run / "in"
    inp.mkdir(parents=True)
    import insightface
    import skimage

    shutil.copy(Path(insightface.__file__).parent / "data/images/t1.jpg", inp / "t1.jpg")
    shutil.copy(Path(skimage.__file__).parent / "data/coffee.png", inp / "coffee.png")
    cfg = load_config(None, ["anonymizer.method=blur", *FAST])
    result = run_job(cfg, str(inp), str(run / "out"), progress=False, report=False)
    (HERE / "run.json").write_text(json.dumps({"overrides": ["anonymizer.method=blur", *FAST],
                                               "prefix": str(run), "summary": result.summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
