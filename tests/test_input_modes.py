"""Input modes (issue 10): aligned face datasets, bring-your-own detections, attribute prompts per face from a
side table. The stages run in this process as the actors run them (one Ray job at the end), on the offline
photos, with the tiny random model at 64 px and 4 inversion steps where diffusion is needed."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rp_distributed import annotations, compose, manifest
from rp_distributed.anonymizer import Anonymizer
from rp_distributed.config import anonymization_fingerprint, load_config
from rp_distributed.faces.align import template_in_crop
from rp_distributed.records import ImageRow
from rp_distributed.stages.anonymize import AnonymizeFaces
from rp_distributed.stages.batch import columns as _columns
from rp_distributed.stages.batch import rows as _rows
from rp_distributed.stages.detect import DetectFaces, DetectSettings
from rp_distributed.stages.merge import MergeAndWrite
from tests.conftest import FAST_DETECTION, insightface_image

STEPS = 4


def _blur_cfg(*extra):
    return load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=png", "alignment.face_size=128", *extra])


def _rp_cfg(tiny_dir, *extra):
    return load_config(None, [*FAST_DETECTION, 
        "anonymizer.method=reverse_personalization", f"diffusion.model={tiny_dir}/sdxl",
        f"diffusion.ip_adapter={tiny_dir}/ip-adapter", f"diffusion.arcface={tiny_dir}/arcface/w600k_r50.onnx",
        "diffusion.device=cpu", "diffusion.dtype=float32", f"diffusion.num_inversion_steps={STEPS}",
        "alignment.face_size=64", "anonymizer.face_batch_size=3", "privacy.escalate=false", "output.format=png",
        *extra])


def _row(path, out=None, rel=None, **cols) -> dict:
    return {"input_uri": str(path), "rel_path": rel or path.name, "output_uri": str(out) if out else "x",
            "error": None, "notes": None, "stale_output_uri": None, **cols}


def _through(stage, row):
    (out,) = _rows(stage(_columns([row])))
    return out


@pytest.fixture(scope="module")
def merge():
    """One merge stage for every test here (its checks load dlib's models once); it reads only settings these
    tests share (privacy, feather, output encoding), and the payload says whether the input was aligned."""
    cfg = _blur_cfg()
    return MergeAndWrite.from_config(cfg, "run", anonymization_fingerprint(cfg)).process


@pytest.fixture(scope="module")
def rp_anonymizer(tiny_dir):
    """One tiny-model anonymizer (64 px, no escalation, mask fallback) for every diffusion test here."""
    return Anonymizer.from_config(_rp_cfg(tiny_dir, "anonymizer.fallback=mask"))


@pytest.fixture(scope="module")
def t1_rp(tiny_dir, t1_path):
    """t1.jpg's faces as reverse personalization's first stage makes them at 64 px (crops, embeddings)."""
    row = DetectFaces.from_config(_rp_cfg(tiny_dir)).process(ImageRow.of(_row(t1_path)))
    assert len(row.payload.faces) == 6
    return row.payload.faces


def _with_table(cfg, path, rel) -> dict:
    """The plan row of one input with the side tables the config names joined in, as the plan does."""
    listing = pa.table({"input_uri": [str(path)], "rel_path": [rel]})
    table, orphans = annotations.attach(cfg, listing)
    assert not orphans
    return table.to_pylist()[0]


# -- aligned mode -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aligned_crops(tmp_path_factory, t1_path):
    """128 px crops of t1.jpg's three largest faces, cut by our own aligner (the pipeline's first stage)."""
    folder = tmp_path_factory.mktemp("aligned")
    faces = DetectFaces.from_config(_blur_cfg()).process(ImageRow.of(_row(t1_path))).payload.faces
    paths = []
    for f in faces[:3]:
        paths.append(folder / f"face{f.face_index}.png")
        Image.fromarray(f.crop).save(paths[-1])
    return paths, [f.kps5 for f in faces[:3]]


def test_aligned_mode_on_our_own_aligned_crops(tmp_path, aligned_crops, merge):
    cfg = _blur_cfg("input.mode=aligned")
    template = template_in_crop(128, cfg.alignment.padding, cfg.alignment.shift)
    by_detector = DetectFaces.from_config(_blur_cfg("input.mode=aligned", "input.aligned_keypoints=detector"))
    paths, kps = aligned_crops
    for path, cut_at in zip(paths, kps):
        image = np.asarray(Image.open(path))
        row = DetectFaces.from_config(cfg).process(ImageRow.of(_row(path, tmp_path / path.name)))
        (face,) = row.payload.faces
        # The crop is the image itself (already face_size): no detection, no warp.
        assert np.array_equal(face.crop, image) and np.allclose(face.matrix, [[1, 0, 0], [0, 1, 0]])
        assert face.id_keypoints == "template" and np.allclose(face.kps5, template)
        assert row.payload.faces_from == "aligned"
        # The detector run in the crop finds the face where our aligner put it (the keypoints the crop was cut
        # at, within 5 px of 128: dlib refits its landmarks); the template is the mean face's: near, not equal (a least-squares fit).
        (det,) = by_detector.process(ImageRow.of(_row(path))).payload.faces
        assert det.id_keypoints == "detector"
        assert np.linalg.norm(det.kps5 - cut_at, axis=1).mean() < 5.0
        assert np.linalg.norm(det.kps5 - template, axis=1).mean() < 0.1 * 128
        # No paste-back: the anonymized crop is the written image, at the input's size, all of it changed.
        rows = merge(_through(AnonymizeFaces.from_config(cfg), row))
        assert [r["status"] for r in rows] == ["ok"] and rows[0]["id_keypoints"] == "template"
        assert rows[0]["detector"] == "aligned" and rows[0]["method_applied"].startswith("blur")
        written = np.asarray(Image.open(tmp_path / path.name))
        assert written.shape == image.shape and not np.array_equal(written, image)
        assert np.abs(written.astype(int) - image.astype(int))[:16].mean() > 2  # far from the face box too

    # A non-square aligned image (128 wide, 100 high) at face_size 64: centre-padded in, the output keeps its size.
    cut = tmp_path / "wide.png"
    Image.fromarray(np.asarray(Image.open(paths[0]))[14:114]).save(cut)
    cfg64 = _blur_cfg("input.mode=aligned", "alignment.face_size=64")
    row = DetectFaces.from_config(cfg64).process(ImageRow.of(_row(cut, tmp_path / "out-wide.png")))
    assert row.payload.faces[0].crop.shape == (64, 64, 3)
    merge(_through(AnonymizeFaces.from_config(cfg64), row))
    assert np.asarray(Image.open(tmp_path / "out-wide.png")).shape == (100, 128, 3)


def test_aligned_mode_on_tom_hanks_with_reverse_personalization(tmp_path, tiny_dir, rp_anonymizer, merge):
    """insightface's bundled 112 px ArcFace-aligned crop, anonymized as one aligned face."""
    src = insightface_image("Tom_Hanks_54745.png")
    image = np.asarray(Image.open(src).convert("RGB"))
    cfg = _rp_cfg(tiny_dir, "input.mode=aligned", "input.aligned_keypoints=detector")
    stage = DetectFaces.from_config(cfg)
    row = stage.process(ImageRow.of(_row(src, tmp_path / "tom.png")))
    (face,) = row.payload.faces
    assert face.crop.shape == (64, 64, 3) and face.id_keypoints == "detector"
    # The detector's keypoints, back in image px, sit at ArcFace's own 112 px template (how it was aligned).
    from insightface.utils.face_align import arcface_dst

    assert np.linalg.norm(face.kps5 * 112 / 64 - arcface_dst, axis=1).mean() < 6.0
    # The identity embedding was made here, on the CPU stage: unit norm, the embedder's own result.
    assert face.id_embedding.shape == (512,) and abs(np.linalg.norm(face.id_embedding) - 1) < 1e-4
    assert np.allclose(face.id_embedding, stage.embedder.embed(face.crop, face.kps5), atol=1e-5)
    rp_anonymizer(row.payload.faces)
    (r,) = merge(row)
    assert r["status"] == "ok" and r["method_applied"].startswith("reverse_personalization")
    assert r["id_keypoints"] == "detector" and r["image_width"] == 112
    written = np.asarray(Image.open(tmp_path / "tom.png"))
    assert written.shape == image.shape and np.abs(written.astype(int) - image.astype(int)).mean() > 10


def test_aligned_mode_fallbacks_cover_the_whole_image(tmp_path, tiny_dir, aligned_crops, rp_anonymizer, merge,
                                                     monkeypatch):
    path = aligned_crops[0][0]
    image = np.asarray(Image.open(path))
    cfg = _rp_cfg(tiny_dir, "input.mode=aligned", "anonymizer.fallback=mask")
    row = DetectFaces.from_config(cfg).process(ImageRow.of(_row(path, tmp_path / "gen-fails.png")))

    def broken(*a, **k):
        raise RuntimeError("generation exploded")

    monkeypatch.setattr(rp_anonymizer.method.rp, "generate", broken)
    rp_anonymizer(row.payload.faces)
    (r,) = merge(row)
    assert r["method_applied"].startswith("mask") and "generation exploded" in r["face_error"]
    written = np.asarray(Image.open(tmp_path / "gen-fails.png"))
    assert written.shape == image.shape and (written == 0).all()  # every pixel, not just the face box
    # No anonymized crop at all (merge's own fallback): the whole image, too.
    face = dataclasses.replace(row.payload.faces[0], anon_crop=None, face_error=None, method_applied=None)
    out = image.copy()
    assert compose.replace_whole(out, [face], cfg.anonymizer) is None
    assert str(face.method_applied) == "mask (whole image)" and (out == 0).all()


# -- annotations mode ---------------------------------------------------------------------------------------

def _table_from(faces, path, landmarks=True, shuffle=True) -> str:
    rows = [{"path": "t1.jpg", "x0": float(f.box[0]), "y0": float(f.box[1]), "x1": float(f.box[2]),
             "y1": float(f.box[3]), "score": f.det_score,
             **({"landmarks": f.landmarks.tolist()} if landmarks else {})} for f in faces]
    if shuffle:
        random.Random(0).shuffle(rows)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_annotations_from_detect_modes_own_faces_reproduce_them(tmp_path, tiny_dir, t1_path, t1_rgb):
    """Fed detect mode's own boxes and landmarks (in another order), annotations mode gives the same faces: the
    same order, seeds, crops, keypoints and identity embeddings, and the same anonymized image. Detect mode runs
    dlib here: a box without landmarks gets dlib's 68-point predictor, the landmarks the dlib backend gives."""
    rp = _rp_cfg(tiny_dir, "alignment.face_size=128", "detection.backend=dlib")
    faces = DetectFaces.from_config(rp).process(ImageRow.of(_row(t1_path))).payload.faces
    assert len(faces) == 6
    blur = Anonymizer.from_config(_blur_cfg())
    images = []
    for landmarks, keypoints in ((True, "annotations"), (False, "predictor")):
        uri = _table_from(faces, tmp_path / f"ann-{landmarks}.parquet", landmarks=landmarks)
        cfg = _rp_cfg(tiny_dir, "alignment.face_size=128", "input.mode=annotations", f"input.annotations={uri}")
        row = DetectFaces.from_config(cfg).process(ImageRow.of(_with_table(cfg, t1_path, "t1.jpg") | _row(t1_path)))
        got = row.payload.faces
        assert row.payload.faces_from == "annotations" and not row.notes
        assert [g.face_index for g in got] == [f.face_index for f in faces]
        for f, g in zip(faces, got):
            assert np.array_equal(f.box, g.box) and f.seed == g.seed and f.det_score == g.det_score
            assert np.array_equal(f.landmarks, g.landmarks)  # box only: dlib's predictor, as the dlib backend
            assert np.array_equal(f.crop, g.crop) and np.array_equal(f.kps5, g.kps5)
            assert np.array_equal(f.id_embedding, g.id_embedding) and g.id_keypoints == keypoints
        # Anonymized and merged as the stages do it (blur: nothing of the anonymizer's own), the same image.
        for batch in ([dataclasses.replace(f) for f in faces], got) if landmarks else (got,):
            blur(batch)
            image = t1_rgb.copy()
            assert compose.apply_faces(image, batch, 0.08, _blur_cfg().anonymizer) is None
            images.append(image)
    assert not np.array_equal(images[0], t1_rgb)
    assert all(np.array_equal(images[0], im) for im in images[1:])


def test_images_without_annotation_rows_follow_annotations_missing(tmp_path, t1_path):
    table = tmp_path / "other.csv"
    table.write_text("path,x0,y0,x1,y1\nsomething_else.jpg,1,1,30,30\n")
    rows = {}
    for missing in ("detect", "skip", "withhold"):
        cfg = _blur_cfg("input.mode=annotations", f"input.annotations={table}", f"input.annotations_missing={missing}")
        listing = pa.table({"input_uri": [str(t1_path)], "rel_path": ["t1.jpg"]})
        planned, orphans = annotations.attach(cfg, listing)
        assert orphans[0]["rows"] == [0] and planned["annotations"][0].as_py() is None
        rows[missing] = DetectFaces.from_config(cfg).process(ImageRow.of(_row(t1_path, rel="t1.jpg")))
    detect, skip, withhold = rows["detect"], rows["skip"], rows["withhold"]
    assert detect.pending and len(detect.payload.faces) == 6 and detect.payload.faces_from == "ensemble"
    assert "no annotation rows: faces detected" in detect.notes
    assert skip.pending and skip.payload.faces == [] and "no annotation rows: no faces" in skip.notes
    assert withhold.status == "withheld" and "input.annotations_missing=withhold" in withhold.error
    assert withhold.payload.faces == [] and withhold.payload.source is None  # nothing to write from


def test_aligned_mode_keeps_the_template_when_the_detector_fails(aligned_crops):
    stage = DetectFaces.from_config(_blur_cfg("input.mode=aligned", "input.aligned_keypoints=detector"))

    def broken(image):
        raise RuntimeError("detector down")

    stage.finder.detector.detect = broken
    row = stage.process(ImageRow.of(_row(aligned_crops[0][0])))
    (face,) = row.payload.faces
    assert row.pending and face.id_keypoints == "template" and "the detector failed" in row.notes


@pytest.mark.slow
def test_annotations_job_reports_bad_rows_missing_images_and_images_without_rows(ray_session, tmp_path, t1_path):
    """One Ray job: the annotations travel in the plan's blocks; every problem is a manifest entry, none fatal."""
    import shutil

    src = tmp_path / "in"
    (src / "people").mkdir(parents=True)
    shutil.copy(t1_path, src / "people" / "t1.jpg")
    shutil.copy(insightface_image("mask_white.jpg"), src / "no_rows.jpg")
    faces = DetectFaces.from_config(_blur_cfg()).process(ImageRow.of(_row(t1_path))).payload.faces
    lines = ["path,x0,y0,x1,y1,landmarks"]
    for f in faces:  # box only for even faces, 68 points as text for odd ones
        lm = " ".join(f"{v:g}" for v in f.landmarks.ravel()) if f.face_index % 2 else ""
        lines.append(f"people/t1.jpg,{','.join(f'{v:g}' for v in f.box)},\"{lm}\"")
    lines.append(f"{src}/people/t1.jpg,5000,5000,5100,5100,")  # row 6: outside the image, by full path
    lines.append("people/gone.jpg,1,1,20,20,")  # row 7: an image that is not in the input
    (tmp_path / "ann.csv").write_text("\n".join(lines) + "\n")
    cfg = _blur_cfg("input.mode=annotations", f"input.annotations={tmp_path / 'ann.csv'}",
                    "input.annotations_missing=withhold")
    from rp_distributed.job.run import run_job

    result = run_job(cfg, str(src), str(tmp_path / "out"), progress=False, report=False)
    rows = manifest.read_manifest(str(tmp_path / "out"), "_manifest").to_pylist()
    t1 = [r for r in rows if r["rel_path"] == "people/t1.jpg"]
    assert len(t1) == 6 and {r["status"] for r in t1} == {"ok"} and {r["detector"] for r in t1} == {"annotations"}
    assert {r["id_keypoints"] for r in t1} == {"annotations", "predictor"}
    assert "annotations row 6: box [5000, 5000, 5100, 5100] lies outside the 1280x886 image: ignored" in t1[0]["notes"]
    (nr,) = [r for r in rows if r["rel_path"] == "no_rows.jpg"]
    assert nr["status"] == "withheld" and "input.annotations_missing=withhold" in nr["error"]
    assert nr["output_uri"] is None and not (tmp_path / "out" / "no_rows.png").exists()
    (gone,) = [r for r in rows if r["rel_path"] == "people/gone.jpg"]
    assert gone["status"] == "error" and "row(s) 7 name an image that is not in the input" in gone["error"]
    assert result.summary["by_status"] == {"ok": 1, "no_face": 0, "withheld": 1, "error": 1}


# -- attribute prompts from a side table --------------------------------------------------------------------

JOB_PROMPT = "a photo of a person"
WANT = [JOB_PROMPT, "a photo of an old man", "a photo of an young woman"]


@pytest.fixture(scope="module")
def prompted(tmp_path_factory, tiny_dir, t1_path, t1_rp, rp_anonymizer):
    """t1.jpg's three largest faces through the first stage with a side table naming face 1 by index and face 2
    by box, then anonymized in one chunk (faces with different prompts share UNet calls); and the same faces with
    the job's prompt, anonymized the same way. Returns (plain faces, table faces, the stage's notes)."""
    b2 = t1_rp[2].box
    table = tmp_path_factory.mktemp("prompts") / "prompts.csv"
    table.write_text("path,face_index,x0,y0,x1,y1,age,sex\n"
                     "t1.jpg,1,,,,,old,man\n"                                        # face 1 by index
                     f"t1.jpg,,{b2[0] + 2:g},{b2[1] - 1:g},{b2[2]:g},{b2[3] + 3:g},young,woman\n"  # face 2 by box
                     "t1.jpg,9,,,,,old,woman\n")                                       # no such face
    cfg = _rp_cfg(tiny_dir, f"diffusion.attribute_prompt={JOB_PROMPT}", f"prompts.table={table}",
                  "prompts.template=a photo of an {age} {sex}")
    row = DetectFaces.from_config(cfg).process(ImageRow.of(_with_table(cfg, t1_path, "t1.jpg") | _row(t1_path)))
    got = row.payload.faces[:3]
    assert [f.prompt for f in got] == WANT  # chosen before anonymization
    plain = [dataclasses.replace(f, prompt=JOB_PROMPT) for f in t1_rp[:3]]  # the same faces, the job's prompt
    for batch in (plain, got):
        rp_anonymizer(batch)  # one chunk of 3 (anonymizer.face_batch_size=3)
    return plain, got, row.notes


def test_side_table_prompts_reach_exactly_the_faces_they_name(prompted):
    plain, got, notes = prompted
    assert [f.prompt for f in got] == WANT
    assert "prompts row 2: face_index 9 names no face" in notes
    for i, (f, g) in enumerate(zip(plain, got)):
        assert str(f.method_applied) == str(g.method_applied) == "reverse_personalization"
        if i in (1, 2):  # named: generated with their own prompt, so another face
            assert np.abs(f.anon_crop.astype(int) - g.anon_crop.astype(int)).mean() > 1, i
        else:  # not named: the job's prompt, byte for byte the face the run without a table makes
            assert np.array_equal(f.anon_crop, g.anon_crop), i
    # The manifest records the prompt each face was generated with.
    assert [manifest.face_row({"output_uri": "x"}, g, 0.6)["attribute_prompt"] for g in got] == WANT


def test_a_batch_mixing_prompts_equals_the_faces_run_one_by_one(prompted, rp_anonymizer):
    _, together, _ = prompted
    for t in together:
        alone = dataclasses.replace(t, anon_crop=None, method_applied=None, tries=None)
        rp_anonymizer([alone])
        assert alone.prompt == t.prompt and str(alone.method_applied) == "reverse_personalization"
        # As the stage's batch-independence test: equal up to float rounding across batch shapes (<= 1 level).
        # (The prompts do change the faces: the test above; so this comparison can fail.)
        assert np.abs(alone.anon_crop.astype(int) - t.anon_crop.astype(int)).max() <= 1


@pytest.mark.slow
def test_prompt_rows_survive_the_plans_blocks_through_ray(ray_session, tmp_path, tiny_dir, t1_path):
    """The prompts column crosses Ray's block conversion (list<struct> cells, null fields) intact: the detection
    stage run by Ray Data on the plan's own blocks gives each face the prompt the table names."""
    import ray

    from rp_distributed.job.dataset import put_blocks
    from rp_distributed.job.plan import make_plan
    from rp_distributed.records import STAGE_COLUMNS as KEYS_AFTER_DETECT
    from rp_distributed.stages.batch import unpack

    src = tmp_path / "in"
    src.mkdir()
    Image.open(t1_path).save(src / "t1.jpg")
    table = tmp_path / "prompts.jsonl"
    table.write_text('{"path": "t1.jpg", "face_index": 2, "prompt": "an old man"}\n'
                     '{"path": "t1.jpg", "prompt": "a person"}\n')
    cfg = _rp_cfg(tiny_dir, f"prompts.table={table}")
    plan = make_plan(cfg, str(src), str(tmp_path / "out"), anonymization_fingerprint(cfg))
    assert plan.table.column_names[-1] == "prompts" and not plan.orphans
    ds = ray.data.from_arrow_refs(put_blocks(plan.table)).map_batches(
        DetectFaces, fn_constructor_args=(DetectSettings.of(cfg),), compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5,
        batch_size=1, batch_format="numpy", zero_copy_batch=False)
    (row,) = ds.take_all()
    assert set(row) == set(KEYS_AFTER_DETECT)
    faces = unpack(row["payload"]).faces
    assert [f.prompt for f in faces] == ["a person", "a person", "an old man", "a person", "a person", "a person"]
    assert all(f.id_embedding is not None for f in faces)
