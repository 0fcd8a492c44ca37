"""What a data steward sees: report.html rendered in headless Chromium, `estimate` against a real run's
manifest, `inspect`, errors before Ray, and the progress bar's figures."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rp_distributed import cli, estimate, manifest, preflight, report
from rp_distributed.job import progress
from rp_distributed.config import load_config
from tests.conftest import FAST_DETECTION, REPO, skimage_image

STEPS = 2  # tiny model: real generations and re-ID scores at the least CPU
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio"]


def _rp_cfg(tiny_dir, *extra):
    return load_config(None, [*FAST_DETECTION, 
        "anonymizer.method=reverse_personalization", f"diffusion.model={tiny_dir}/sdxl",
        f"diffusion.ip_adapter={tiny_dir}/ip-adapter", f"diffusion.arcface={tiny_dir}/arcface/w600k_r50.onnx",
        "diffusion.device=cpu", "diffusion.dtype=float32", f"diffusion.num_inversion_steps={STEPS}",
        "alignment.face_size=128", "anonymizer.face_batch_size=4", *extra])


@pytest.fixture(scope="module")
def photos(tmp_path_factory, t1_path, astronaut_path) -> Path:
    """Six people (t1), the astronaut, a photo without a face, and an empty file (an error row)."""
    d = tmp_path_factory.mktemp("photos")
    shutil.copy(t1_path, d / "t1.jpg")
    shutil.copy(astronaut_path, d / "astronaut.png")
    shutil.copy(skimage_image("coffee.png"), d / "coffee.png")
    (d / "broken.jpg").write_bytes(b"")
    return d


# A threshold above some of the tiny model's first-try distances (about 0.4 to 0.8 on these photos), so the
# ladder has work to do: some faces pass at the second rung, others fall back.
ESCALATING = ["privacy.escalate=true", "privacy.reid_threshold=0.75", "privacy.guidance_ladder=[-15.0]",
              "privacy.max_tries=2"]


@pytest.fixture(scope="module")
def rp_run(ray_session, tiny_dir, photos, tmp_path_factory):
    """A real job: reverse personalization on the tiny model with the escalation ladder; returns
    (config, output folder, JobResult, stage states the progress bar saw)."""
    from rp_distributed.job.run import run_job

    seen = []
    observe = progress.Progress.observe

    def recording(self, executor):
        observe(self, executor)
        seen.append((self.stages, self.stage_error))

    progress.Progress.observe = recording
    try:
        cfg = _rp_cfg(tiny_dir, *ESCALATING, "output.format=png")  # PNG: untouched pixels compare exactly
        out = tmp_path_factory.mktemp("rp_out")
        result = run_job(cfg, str(photos), str(out), progress=True)
    finally:
        progress.Progress.observe = observe
    return cfg, out, result, seen


def _chromium(args: list[str], tmp: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    profile = tmp / f"chromium-profile-{time.monotonic_ns()}"
    profile.mkdir()
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_report_of_a_real_run_renders_in_chromium(rp_run, tmp_path):
    if CHROMIUM is None:
        pytest.skip("headless Chromium not installed (apt-get install chromium; .ci/run installs it)")
    cfg, out, result, _ = rp_run
    page = Path(result.report_uri)
    assert page == out / "_manifest" / "report.html" and page.is_file(), result.report_error
    assert (out / "_manifest" / f"config-{result.run_id}.json").is_file()
    html = page.read_text()

    # Self-contained: nothing is fetched from anywhere (only data: URIs), and a CSP forbids it anyway.
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:|#)""", html, re.I), "a resource outside the page"
    assert "url(" not in html and "<link" not in html and "@import" not in html
    assert "Content-Security-Policy" in html and "img-src data:" in html
    # Originals are not embedded, and the report says so.
    assert "Originals are <b>not embedded</b>" in html and "thumb original" not in html
    # What the run did is documented: fingerprint, models, config.
    assert result.settings_fingerprint in html and "ip-adapter-faceid_sdxl.bin" in html
    assert f"Config of run {result.run_id}" in html and '"num_inversion_steps": 2' in html
    # The failure is grouped with its reason.
    assert "empty file (0 bytes)" in html and "broken.jpg" in html

    rows = manifest.read_manifest(str(out), "_manifest").to_pylist()
    written_faces = [r for r in rows if r["face_index"] is not None and r["output_uri"]]
    assert len(written_faces) >= 7

    # The rendered page: every image decoded (naturalWidth > 0), the histograms and the gallery present,
    # nothing loaded from elsewhere, no CSP violation.
    dom = _chromium(["--virtual-time-budget=10000", "--dump-dom", page.as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    check = re.search(r'<p id="render-check"[^>]*data-images="(\d+)"[^>]*data-rendered="(\d+)"[^>]*'
                      r'data-external="(\d+)"[^>]*data-blocked="(\d+)"', dom.stdout)
    assert check, "the page's load script did not run"
    images, rendered, external, blocked = map(int, check.groups())
    plots = set(re.findall(r'data-plot="([\w-]+)"', dom.stdout))
    assert {"reid-histogram", "ladder", "utility", "timings"} <= plots
    thumbs = len(re.findall(r'<img class="thumb"', dom.stdout))
    assert thumbs == min(len(written_faces), cfg.report.gallery_size)
    assert images == len(plots) + thumbs and rendered == images, (images, rendered)
    assert external == 0 and blocked == 0
    assert "Failed to load resource" not in dom.stderr

    # A screenshot of it is not blank.
    shot = tmp_path / "report.png"
    res = _chromium(["--virtual-time-budget=10000", f"--screenshot={shot}", "--window-size=1280,4000",
                     page.as_uri()], tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), np.float32)
    assert pixels.shape == (4000, 1280)
    top = pixels[:2500]
    assert top.std() > 20 and (top < 200).mean() > 0.03, "the screenshot is (nearly) blank"
    if os.environ.get("RP_SAVE_REPORT_SCREENSHOT"):  # how docs/report.png was made
        Image.open(shot).crop((0, 0, 1280, 3000)).save(os.environ["RP_SAVE_REPORT_SCREENSHOT"], optimize=True)


@pytest.mark.slow
def test_the_run_reports_truthful_progress_and_its_figures(rp_run):
    cfg, out, result, seen = rp_run
    # The bar saw each stage's state from Ray Data's executor.
    assert seen and not any(err for _, err in seen), seen[-1]
    states = " ".join(s for s, _ in seen)
    for stage in ("detect", "anonymize", "merge"):
        assert re.search(rf"{stage} (\d+ busy \d+ queued|idle|done)", states), states[-500:]
    assert re.search(r"anonymize [1-9]\d* busy", states), "the anonymizer was never seen busy"
    # The report's facts are the manifest's latest view, and agree with the end-of-run summary.
    facts = report.load(str(out))
    assert facts.summary == result.summary
    assert facts.n_faces == result.summary["faces"] and facts.n_images == 4
    assert {k: (g.count, g.tags()) for k, g in facts.image_reasons.top()} == {"empty file (0 bytes)": (1, ["broken.jpg"])}
    faces = [r for r in manifest.read_manifest(str(out), "_manifest").to_pylist() if r["face_index"] is not None]
    assert len(facts.first_try) == sum(1 for r in faces if r["tries"]) > 0  # one run: its rows are the latest view
    assert facts.ladder and facts.ladder[0].run == len(facts.first_try)
    assert facts.unet_evals == 4 * STEPS * facts.tries


@pytest.mark.slow
def test_inspect_and_report_commands(rp_run, capsys):
    cfg, out, result, _ = rp_run
    assert cli.main(["inspect", str(out), "--failed"]) == 0
    text = capsys.readouterr().out
    assert f"images           4: ok 2, no_face 1, withheld 0, error 1" in text
    assert f"faces            {result.summary['faces']}:" in text
    assert "error    broken.jpg: empty file (0 bytes)" in text
    assert "identity exported 0.0%" in text
    assert f"first pass missed {result.summary['missed_by_first_pass']} faces" in text

    # Rebuilt on request, with originals only when asked for, and saying so.
    page = out / "_manifest" / "report.html"
    page.unlink()
    assert cli.main(["report", str(out), "--include-originals"]) == 0
    assert capsys.readouterr().out.strip() == str(page)
    html = page.read_text()
    assert "embeds ORIGINAL faces" in html
    assert html.count('class="thumb original"') == html.count('<img class="thumb"') > 0
    assert cli.main(["report", str(out)]) == 0
    assert "thumb original" not in page.read_text()


@pytest.mark.slow
def test_the_run_generates_every_face_and_touches_nothing_else(rp_run, t1_rgb):
    """The Ray job with reverse personalization (tiny model): every face of t1 changed, the method's parameters
    and models recorded, escalation bookkeeping consistent, the background byte for byte the input's."""
    cfg, out, result, _ = rp_run
    rows = sorted((r for r in manifest.read_manifest(str(out), "_manifest").to_pylist() if r["rel_path"] == "t1.jpg"),
                  key=lambda r: r["face_index"])
    written = np.asarray(Image.open(out / "t1.png").convert("RGB"))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    for r in rows:
        assert r["method"] == "reverse_personalization" and r["seed"] is not None and 1 <= r["tries"] <= 2
        assert r["method_applied"] in ("reverse_personalization", "reverse_personalization+mask", "blur", "blur+mask")
        if not r["method_applied"].startswith("reverse_personalization"):  # the ladder ran out: said so
            assert r["tries"] == 2 and "still re-identified after 2 tries" in r["face_error"]
        assert r["unet_evals"] == 4 * STEPS * r["tries"] and r["guidance_final"] == [-10.0, -15.0][r["tries"] - 1]
        params, model = json.loads(r["params"]), json.loads(r["model"])
        assert params["guidance_scale"] == -10.0 and params["num_inversion_steps"] == STEPS
        assert model["model"].endswith("sdxl") and model["ip_adapter_weight_name"] == "ip-adapter-faceid_sdxl.bin"
        x0, y0, x1, y1 = int(r["box_x0"]), int(r["box_y0"]), int(r["box_x1"]), int(r["box_y1"])
        assert np.abs(written[y0:y1, x0:x1].astype(int) - t1_rgb[y0:y1, x0:x1].astype(int)).mean() > 8
        assert r["identity_exported"] is False  # a recognizer match is only allowed on a box the mask covers
        assert r["reidentified"] is False or r["method_applied"].endswith("+mask"), r
    assert any(r["method_applied"].startswith("reverse_personalization") for r in rows)
    keep = np.ones(t1_rgb.shape[:2], bool)  # far from every face, the PNG output is the decoded input exactly
    for r in rows:
        w, h = r["box_x1"] - r["box_x0"], r["box_y1"] - r["box_y0"]
        keep[max(int(r["box_y0"] - h), 0):int(r["box_y1"] + h), max(int(r["box_x0"] - w), 0):int(r["box_x1"] + w)] = False
    assert keep.mean() > 0.2 and np.array_equal(written[keep], t1_rgb[keep])


@pytest.mark.slow
def test_estimate_equals_a_real_runs_manifest(tiny_dir, photos, rp_run, capsys):
    """Faces and UNet evaluations from `estimate` equal a real run's manifest on the same photos: exactly for
    escalation off (each generated face's first try, which the manifest records), and the escalating run lies in
    the estimated range."""
    esc_cfg, esc_out, _, _ = rp_run
    esc_faces = [r for r in manifest.read_manifest(str(esc_out), "_manifest").to_pylist() if r["face_index"] is not None]
    cfg = _rp_cfg(tiny_dir, "privacy.escalate=false")
    e = estimate.estimate(cfg, str(photos), sample=50, device="A100")
    assert e["images_listed"] == e["sampled"] == 4
    assert e["estimated_faces"] == len(esc_faces) >= 7
    first_tries = sum(4 * STEPS for r in esc_faces if (r["tries"] or 0) >= 1)
    assert first_tries > 0 and e["estimated_unet_evals"] == [first_tries] * 2
    assert e["unet_evals_per_try"] == 4 * STEPS and e["tries"] == [1, 1]

    # The escalating run: same faces, UNet evaluations inside [1 try, max_tries] per face.
    assert cli.main(["estimate", str(photos), "--json", "--sample", "50", *sum(
        (["--set", s] for s in [f"diffusion.model={tiny_dir}/sdxl", f"diffusion.ip_adapter={tiny_dir}/ip-adapter",
                                f"diffusion.arcface={tiny_dir}/arcface/w600k_r50.onnx", "diffusion.device=cpu",
                                f"diffusion.num_inversion_steps={STEPS}", "alignment.face_size=128",
                                "anonymizer.method=reverse_personalization", *FAST_DETECTION, *ESCALATING]), [])]) == 0
    esc = json.loads(capsys.readouterr().out)
    assert esc["estimated_faces"] == len(esc_faces)
    lo, hi = esc["estimated_unet_evals"]
    assert lo <= sum(r["unet_evals"] or 0 for r in esc_faces) <= hi and hi == 2 * lo


def test_cost_model_is_algorithm_md():
    # ALGORITHM.md "Cost": the measured sizes exactly; the reference face (100 steps, 1024 px) is 400 UNet
    # image evaluations, about 2.70 PFLOP plus VAE.
    assert estimate.tflop_at("unet", 1024) == pytest.approx(6.76)
    assert estimate.tflop_at("unet", 512) == pytest.approx(1.59)
    assert estimate.tflop_at("vae_decode", 1024) == pytest.approx(10.47)
    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=reverse_personalization"])
    assert estimate.unet_evals_per_try(cfg) == 400
    per_face = 400 * estimate.tflop_at("unet", 1024)
    assert per_face / 1000 == pytest.approx(2.70, abs=0.01)
    # On an A100 at the default 50% utilisation: ~17 s a face, the paper's ~13 s at ~67%.
    s = (per_face + 4.88 + 10.47) / (estimate.DEVICES["A100"].tflops * 0.5)
    assert 15 < s < 20
    assert estimate.tries_range(cfg) == (1, 3)
    assert estimate.tries_range(load_config(None, [*FAST_DETECTION, "anonymizer.method=blur"])) == (0, 0)
    assert estimate.sample_indices(10, 3) == [0, 4, 9] and estimate.sample_indices(3, 10) == [0, 1, 2]


def test_estimate_counts_faces_without_loading_the_identity_model(tmp_path, t1_path):
    """`estimate` only counts faces: it must not load ArcFace (on a cluster's submit host the model may not be
    there at all). An ArcFace path that does not exist is never opened."""
    (tmp_path / "in").mkdir()
    shutil.copy(t1_path, tmp_path / "in" / "t1.jpg")
    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=reverse_personalization", "privacy.escalate=false",
                             f"diffusion.arcface={tmp_path}/absent/w600k_r50.onnx"])
    e = estimate.estimate(cfg, str(tmp_path / "in"), sample=1)
    assert e["sample"]["faces"] == 6 and e["sample"]["diffusion_faces"] == 6 and e["sample"]["unreadable"] == 0


# -- errors a person can act on, before Ray --------------------------------------------------------------

def test_missing_tiny_model_is_one_line_before_ray(tmp_path):
    """A fresh clone before `make demo`: one line naming the key and the fix, exit 2, and Ray never started."""
    (tmp_path / "in").mkdir()
    shutil.copy(skimage_image("astronaut.png"), tmp_path / "in" / "astronaut.png")
    raytmp = tmp_path / "raytmp"
    env = {**os.environ, "RAY_TMPDIR": str(raytmp), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "rp_distributed.cli", "run", "in", "out", "-c",
                          str(REPO / "configs" / "local.yaml")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    elapsed = time.monotonic() - t0
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert lines == ["rp-anonymize: error: diffusion.model: model folder models/tiny/sdxl does not exist — create "
                     "the tiny model with: rp-anonymize models make-tiny models/tiny"], res.stderr[-3000:]
    assert not raytmp.exists() and "ray" not in res.stderr.lower().replace("rp-anonymize", "")
    assert not (tmp_path / "out").exists()
    assert elapsed < 120, elapsed


def test_preflight_names_the_key_and_the_fix(tmp_path, tiny_dir):
    cfg = _rp_cfg(tiny_dir)
    preflight.check(cfg, local=True)  # all there
    for key, override, fix in [
        ("diffusion.ip_adapter", f"diffusion.ip_adapter={tmp_path}/nope", "IP-Adapter-FaceID"),
        ("diffusion.arcface", f"diffusion.arcface={tmp_path}/nope.onnx", "w600k_r50.onnx"),
        ("detection.model_dir", f"detection.model_dir={tmp_path}/nope", "centerface.onnx"),
        ("privacy.report_recognizer", f"privacy.report_recognizer={tmp_path}/r.onnx", "glintr100"),
    ]:
        with pytest.raises(preflight.PreflightError) as err:
            preflight.check(_rp_cfg(tiny_dir, override), local=True)
        assert err.value.key == key and fix in err.value.fix, err.value.line()
        assert "\n" not in err.value.line()
    # The make-tiny hint only where the layout is make-tiny's.
    layout = tmp_path / "tiny"
    cfg = _rp_cfg(layout)
    with pytest.raises(preflight.PreflightError) as err:
        preflight.check(cfg, local=True)
    assert err.value.fix == f"create the tiny model with: rp-anonymize models make-tiny {layout}"
    # A destructive method needs no diffusion model at all.
    preflight.check(load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", f"diffusion.model={tmp_path}/nope"]), local=True)
    # Joining a cluster, local paths name the workers' disks: left to the stages; URIs are still checked.
    preflight.check(cfg, local=False)
    with pytest.raises(preflight.PreflightError) as err:
        preflight.check(_rp_cfg(tiny_dir, f"diffusion.arcface=file://{tmp_path}/nope.onnx"), local=False)
    assert err.value.key == "diffusion.arcface" and "does not exist" in err.value.problem


# -- the progress bar's figures --------------------------------------------------------------------------

def test_progress_rates_and_eta(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    p = progress.Progress(total=100, enabled=False, window_s=60)
    for _ in range(10):  # 10 images with 3 faces each, one image every 2 s
        clock[0] += 2
        p.add(images=1, faces=1)
        p.add(faces=2)
    img_rate, face_rate = p.rates()
    assert img_rate == pytest.approx(0.5) and face_rate == pytest.approx(1.5)
    assert p.eta_s() == pytest.approx(90 / 0.5)
    assert "ETA 03:00, 0.50 img/s, 1.50 faces/s, 30 faces" in p.postfix()
    for _ in range(60):  # then twice as fast: the window forgets the slow start
        clock[0] += 1
        p.add(images=1, faces=1)
    assert p.rates()[0] == pytest.approx(1.0, rel=0.05)
    clock[0] += 100  # nothing for 100 s: the rate decays, the ETA grows
    assert p.rates()[0] < 0.5

    class Op:
        def __init__(self, name, busy, finished=False):
            self.name, self.busy, self.finished = name, busy, finished

        def num_active_tasks(self):
            return self.busy

        def has_execution_finished(self):
            return self.finished

    class State:
        def __init__(self, queued):
            self.queued = queued

        def total_enqueued_input_blocks(self):
            return self.queued

    class Executor:
        _topology = {Op("Input", 0): State(0), Op("MapBatches(DetectFaces)", 0, True): State(0),
                     Op("MapBatches(AnonymizeFaces)", 2): State(5), Op("MapBatches(MergeAndWrite)", 0): State(0)}

    p.observe(Executor())
    assert p.stages == "detect done, anonymize 2 busy 5 queued, merge idle" and p.stage_error is None
    p.observe(object())  # an unexpected executor: no stage states, no exception
    assert p.stages == "" and p.stage_error
