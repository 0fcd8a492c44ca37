"""Dependencies' chatter stays out of the user's terminal unless asked for (``--verbose`` / RP_VERBOSE=1).

A fresh process loads the anonymizer's SDXL + FaceID pipeline (the tiny model) as an actor does; before the quiet
setting this printed transformers' torchvision notices, diffusers' progress bars and its dtype advice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHATTER = ("torchvision", "Loading pipeline components", "image_encoder is not loaded")

LOAD = """
import sys
from rp_distributed.config import load_config
from rp_distributed.diffusion.sdxl import load_pipeline
d = sys.argv[1]
cfg = load_config(None, [f"diffusion.model={d}/sdxl", f"diffusion.ip_adapter={d}/ip-adapter", "diffusion.device=cpu",
                         "diffusion.dtype=float32"])
load_pipeline(cfg.diffusion)
print("loaded")
"""


def _load(tiny_dir, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("RP_VERBOSE", "TRANSFORMERS_VERBOSITY",
                                                                  "DIFFUSERS_VERBOSITY")}
    proc = subprocess.run([sys.executable, "-c", LOAD, str(tiny_dir)], capture_output=True, text=True, timeout=300,
                          env={**environ, "PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_loading_the_pipeline_prints_nothing_of_its_dependencies(tiny_dir):
    out = _load(tiny_dir)
    assert not [c for c in CHATTER if c in out], out[-3000:]
    assert out.strip() == "loaded", out[-3000:]


def test_verbose_shows_them(tiny_dir):
    out = _load(tiny_dir, RP_VERBOSE="1")
    assert [c for c in CHATTER if c in out], out[-3000:]
