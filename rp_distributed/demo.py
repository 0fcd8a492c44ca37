"""``rp-anonymize demo``: the main job on sample photos that ship with installed packages.

Uses the real diffusion models when the config points at them and they are present; otherwise writes
and uses the tiny random-weight model, and says so plainly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from .config import JobConfig, load_config

TINY_DIR = Path("models/tiny")
SAMPLES = [("insightface", "data/images/t1.jpg", "people/t1.jpg"),
           ("insightface", "data/images/mask_white.jpg", "people/mask_white.jpg"),
           ("skimage", "data/astronaut.png", "astronaut.png"),
           ("skimage", "data/coffee.png", "no_face/coffee.png")]


def copy_samples(folder: Path) -> list[Path]:
    """Public sample photos from installed packages (insightface, scikit-image) into ``folder``."""
    copied = []
    for package, rel, dest in SAMPLES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        src = Path(list(spec.submodule_search_locations)[0]) / rel
        if src.exists():
            target = folder / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            copied.append(target)
    return copied


def models_present(cfg: JobConfig) -> tuple[bool, str]:
    """Whether the diffusion models the config names can be loaded here without downloading."""
    from .diffusion import loading
    from .faces.arcface import resolve_arcface

    d = cfg.diffusion
    try:
        if loading.source_kind(d.model) == "hub":
            from huggingface_hub import snapshot_download

            snapshot_download(d.model, local_files_only=True)
        else:
            loading.resolve_model(d.model, d.cache_dir)
        if loading.source_kind(d.ip_adapter) == "hub":
            from huggingface_hub import hf_hub_download

            hf_hub_download(d.ip_adapter, d.ip_adapter_weight_name, local_files_only=True)
        else:
            loading.resolve_adapter_file(d.ip_adapter, d.ip_adapter_weight_name, d.cache_dir)
        resolve_arcface(d.arcface, d.cache_dir)
    except Exception as exc:  # noqa: BLE001 - any reason means "not usable here"
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def is_tiny(cfg: JobConfig) -> bool:
    from .diffusion import loading

    if loading.source_kind(cfg.diffusion.model) == "hub":
        return False
    unet = Path(loading.resolve_model(cfg.diffusion.model, cfg.diffusion.cache_dir)) / "unet" / "config.json"
    return json.loads(unet.read_text())["block_out_channels"][0] < 320


def tiny_config(cfg: JobConfig, tiny_dir: Path = TINY_DIR) -> JobConfig:
    """``cfg`` pointed at the tiny model (written first if missing), on CPU at its native 128 px."""
    from .diffusion.tiny import make_tiny

    if not (tiny_dir / "sdxl" / "model_index.json").exists():
        make_tiny(tiny_dir)
    data = cfg.model_dump()
    data["diffusion"].update(model=str(tiny_dir / "sdxl"), ip_adapter=str(tiny_dir / "ip-adapter"),
                             ip_adapter_weight_name="ip-adapter-faceid_sdxl.bin",
                             arcface=str(tiny_dir / "arcface" / "w600k_r50.onnx"), device="cpu", dtype="float32")
    data["alignment"]["face_size"] = 128
    data["anonymizer"]["resources"]["num_gpus"] = 0
    return JobConfig.model_validate(data)


def run_demo(output: str, config: str | None, overrides: list[str], input_dir: str = "demo-input") -> int:
    from .summary import summary_text
    from .job.run import run_job

    cfg = load_config(config or "configs/local.yaml", overrides)
    samples = copy_samples(Path(input_dir))
    print(f"demo: {len(samples)} sample photos in {input_dir}/")
    if cfg.anonymizer.method == "reverse_personalization":
        present, why = models_present(cfg)
        if not present:
            print(f"demo: the configured diffusion models are not here ({why.splitlines()[0][:200]})")
            cfg = tiny_config(cfg)
        if is_tiny(cfg):
            print("demo: running the TINY random-weight model (rp-anonymize models make-tiny): it runs the real\n"
                  "      code path end to end, but its faces are NOT realistic. Point configs/sdxl.yaml at\n"
                  "      SDXL + IP-Adapter-FaceID on a GPU machine for real anonymization.")
        else:
            print(f"demo: running the real models: {cfg.diffusion.model} + {cfg.diffusion.ip_adapter}")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    result = run_job(cfg, input_dir, output)
    print(summary_text(result, cfg, input_dir, output))
    if result.report_uri:
        print(f"\ndemo: open the report in a browser: {result.report_uri}")
    return 0
