"""Pseudonyms with a destructive method, through the stages in this process as the actors run them: every face of a
subject keeps its pseudonym_id, and the report's consistency section counts what the recognizer says of each
subject's written faces (checked here against dlib run on the written files)."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from rp_distributed import annotations, manifest, pseudonyms, report
from rp_distributed.config import anonymization_fingerprint, load_config
from rp_distributed.manifest_writer import write_part
from rp_distributed.records import ImageRow
from rp_distributed.scoring import ReidScorer
from rp_distributed.stages.anonymize import AnonymizeFaces
from rp_distributed.stages.batch import columns, rows
from rp_distributed.stages.detect import DetectFaces
from rp_distributed.stages.merge import MergeAndWrite
from tests.conftest import FAST_DETECTION

KEY = "test-pseudonym-key-0123456789"
THRESHOLD = 0.36  # between the subjects' pairs here: anna's at 0.375, ben's 0.15 to 0.343
# (image, face) -> subject: "anna" is one person twice, "ben" one person twice plus face 2 wrongly labelled ben,
# "carl" has one face only (no pair: not a subject of the section).
SUBJECTS = {("visit1/t1.jpg", 0): "anna", ("visit2/t1.jpg", 0): "anna", ("visit1/t1.jpg", 1): "ben",
            ("visit2/t1.jpg", 1): "ben", ("visit1/t1.jpg", 2): "ben", ("visit1/t1.jpg", 3): "carl"}


def _through(stage, row):
    (out,) = rows(stage(columns([row])))
    return out


@pytest.fixture(scope="module")
def blurred(tmp_path_factory, t1_path):
    """Two visits of t1.jpg (the second re-encoded at 0.85 scale: other pixels, the same people), a subject table,
    and the blur run through detection, anonymization and merge; the manifest written as the driver writes it."""
    root = tmp_path_factory.mktemp("pseu-report")
    src, out = root / "in", root / "out"
    (src / "visit1").mkdir(parents=True)
    (src / "visit2").mkdir()
    shutil.copy(t1_path, src / "visit1" / "t1.jpg")
    im = Image.open(t1_path)
    im.resize((round(im.width * 0.85), round(im.height * 0.85)), Image.LANCZOS).save(src / "visit2" / "t1.jpg",
                                                                                  quality=90)
    lines = ["path,face_index,subject"] + [f"{p},{i},{s}" for (p, i), s in SUBJECTS.items()]
    (root / "subjects.csv").write_text("\n".join(lines) + "\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("RP_PSEUDONYM_KEY", KEY)
    try:
        # A threshold below the default: dlib finds blurred faces alike (0.15 to 0.4 apart here, whoever they are), so
        # at 0.6 every subject would be consistent and the test could not tell the counts apart.
        cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=png",
                                 f"privacy.reid_threshold={THRESHOLD}", f"pseudonyms.table={root / 'subjects.csv'}"])
        rels = sorted({p for p, _ in SUBJECTS})
        plan, _ = annotations.attach(cfg, pa.table({"input_uri": [str(src / r) for r in rels], "rel_path": rels}))
        fp = anonymization_fingerprint(cfg)
    finally:
        mp.undo()
    detect, anonymize = DetectFaces.from_config(cfg), AnonymizeFaces.from_config(cfg)
    merge = MergeAndWrite.from_config(cfg, "20261201T000000-aaaaaa", fp)
    written = []
    for rel, cell in zip(rels, plan["subjects"].to_pylist()):
        row = detect.process(ImageRow.of({"input_uri": str(src / rel), "rel_path": rel,
                                          "output_uri": str(out / rel.replace(".jpg", ".png")), "subjects": cell}))
        written += merge.process(_through(anonymize, row))
    write_part(str(out), "_manifest", "20261201T000000-aaaaaa", 0, written)
    return src, out, written, cfg


def test_a_destructive_method_keeps_the_pseudonym_id(blurred):
    _, _, written, _ = blurred
    faces = [r for r in written if r["face_index"] is not None]
    assert {r["status"] for r in written} == {"ok"} and len(faces) == 12
    assert all(r["method_applied"].startswith("blur") for r in faces)
    ids = {(r["rel_path"], r["face_index"]): r["pseudonym_id"] for r in faces}
    for (rel, face), subject in SUBJECTS.items():
        assert ids[(rel, face)] == pseudonyms.subject_digest(KEY.encode(), subject)[:16]
    assert sum(v is not None for v in ids.values()) == len(SUBJECTS)
    # the written face's descriptor for linked faces that are not masked, for no other face
    for r in faces:
        has = r["anon_descriptor"] is not None
        assert has == (r["pseudonym_id"] is not None and "mask" not in r["method_applied"]
                       and r["reid_distance"] is not None)
        assert not has or len(np.frombuffer(r["anon_descriptor"], "<f4")) == 128
    # read back from the Parquet part as written
    table = manifest.read_manifest(str(blurred[1]), "_manifest")
    assert sorted(filter(None, table["pseudonym_id"].to_pylist())) == sorted(v for v in ids.values() if v)


def test_no_descriptor_of_a_face_still_re_identified_or_of_an_image_not_written(t1_path, t1_rgb):
    """The manifest keeps a linked face's written descriptor only for pixels that were published and no longer
    identify the person: a face the gate still re-identifies (the gate's fallback off) or a withheld image has none."""
    from rp_distributed.scoring import FaceChecks

    cfg = load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "privacy.fallback_if_reidentified=false"])
    row = DetectFaces.from_config(cfg).process(ImageRow.of({"input_uri": str(t1_path), "rel_path": "t1.jpg",
                                                            "output_uri": "o"}))
    faces = row.payload.faces[:2]
    for f in faces:
        f.pseudonym = "ab" * 32
    data, why = FaceChecks(cfg)(t1_rgb, t1_rgb.copy(), faces, _png)  # written as it was: every face is its person
    assert data is not None and why is None
    assert all(f.reidentified for f in faces) and all(f.anon_descriptor is None for f in faces)
    faces[0].anon_descriptor = np.ones(128, np.float32)  # as a face that passed the gate would hold it
    image = manifest.image_row("r", "fp", str(t1_path), "t1.jpg", "withheld", output_uri=None)
    assert manifest.face_row(image, faces[0], 0.6)["anon_descriptor"] is None
    written = manifest.image_row("r", "fp", str(t1_path), "t1.jpg", "ok", output_uri="o")
    assert len(manifest.face_row(written, faces[0], 0.6)["anon_descriptor"]) == 512


def _png(im: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(im).save(buf, "PNG")
    return buf.getvalue()


def _independent(out, written) -> dict:
    """The section's figures from dlib run on the written files (boxes from the manifest), and the subjects from
    the table: pairs of written faces of one subject, each face's distance to its original."""
    scorer = ReidScorer()
    faces = {(r["rel_path"], r["face_index"]): r for r in written if r["face_index"] is not None}
    pixels = {}
    by_subject: dict[str, list] = {}
    for key, subject in SUBJECTS.items():
        r = faces[key]
        if r["output_uri"] not in pixels:
            pixels[r["output_uri"]] = np.asarray(Image.open(r["output_uri"]).convert("RGB"))
        box = [r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"]]
        masked = "mask" in r["method_applied"]
        d = None if masked else scorer.descriptor(pixels[r["output_uri"]], box)
        by_subject.setdefault(subject, []).append((d, r["reid_distance"]))
    pairs, consistent, measured, undescribed, own = [], 0, 0, 0, []
    for subject, items in by_subject.items():
        if len(items) < 2:
            continue
        own += [dist for _, dist in items if dist is not None]
        ds = [d for d, _ in items if d is not None]
        undescribed += len(items) - len(ds)
        if len(ds) >= 2:
            p = [float(np.linalg.norm(a.astype(np.float64) - b)) for a, b in itertools.combinations(ds, 2)]
            pairs += p
            measured += 1
            consistent += all(v < THRESHOLD for v in p)
    return {"subjects": sum(len(v) >= 2 for v in by_subject.values()), "pairs": sorted(pairs), "own": sorted(own),
            "measured": measured, "consistent": consistent, "undescribed": undescribed}


def test_the_report_measures_each_subjects_consistency(blurred):
    _, out, written, _ = blurred
    want = _independent(out, written)
    # anna and ben (carl has one face); one of them consistent, so the counts tell "consistent" from "measured"
    assert want["subjects"] == 2 and want["measured"] == 2 and want["consistent"] == 1
    c = report.load(str(out)).consistency
    assert c.linked_faces == 6 and c.subjects == 2 and c.faces == 5 and not c.sampled and c.capped == 0
    assert (c.measured, c.consistent, c.undescribed) == (want["measured"], want["consistent"], want["undescribed"])
    assert len(c.between) == len(want["pairs"])
    assert c.between.lo == pytest.approx(want["pairs"][0], abs=1e-5)
    assert c.between.hi == pytest.approx(want["pairs"][-1], abs=1e-5)
    assert len(c.to_original) == len(want["own"]) and c.to_original.lo == pytest.approx(want["own"][0], abs=1e-6)
    assert c.reidentified == sum(v < THRESHOLD for v in want["own"])
    page = (out / "_manifest" / "report.html")
    report.write_report(str(out))
    text = page.read_text()
    assert "Pseudonym consistency" in text and 'data-plot="consistency"' in text
    assert f"({c.consistent} of {c.measured} measured)" in text
    assert "consistent subjects 50.0% (1 of 2 measured" in report.inspect_text(report.load(str(out)), str(out))
    print(json.dumps({"pairs": want["pairs"], "own": want["own"], "consistent": c.consistent,
                      "measured": c.measured}))


def _linked_batch(rng, subjects: np.ndarray, descriptors: dict) -> pa.Table:
    """Face rows of ``subjects`` (one row each) with descriptors near each subject's centre."""
    cells = []
    for s in subjects:
        d = descriptors.setdefault(int(s), rng.normal(0, 0.05, 128))
        cells.append((d + rng.normal(0, 0.02, 128)).astype("<f4").tobytes())
    ids = [f"{int(s):016x}" for s in subjects]
    return pa.table({"pseudonym_id": ids, "anon_descriptor": pa.array(cells, pa.binary()),
                     "reid_distance": pa.array(rng.uniform(0.6, 1.2, len(ids)), pa.float32())})


def test_the_consistency_sample_is_bounded_and_holds_whole_subjects():
    """Past the cap, what is held is every face of the subjects with the smallest ids and nothing else, and never
    more than the cap: the figures equal those computed directly on those subjects' rows."""
    from rp_distributed.report.consistency import Consistency

    rng = np.random.default_rng(0)
    subjects = rng.integers(0, 2**40, 3000) * 4096  # hex ids of equal length
    faces = np.repeat(subjects, rng.integers(1, 6, len(subjects)))  # 1 to 5 faces a subject
    rng.shuffle(faces)
    acc, descriptors, seen = Consistency(face_cap=500, per_subject=4), {}, []
    for chunk in np.array_split(faces, 40):
        batch = _linked_batch(rng, chunk, descriptors)
        seen.append(batch)
        acc.add(batch)
        assert acc.held.num_rows <= 500
    got = acc.result(0.6)
    assert got.sampled and got.linked_faces == len(faces)
    everything = pa.concat_tables(seen)
    ids = np.array(everything["pseudonym_id"].to_pylist())
    kept = np.array(sorted(set(acc.held["pseudonym_id"].to_pylist())))
    # the held subjects are the smallest ids, each with all its faces (up to per_subject)
    assert list(kept) == sorted(set(ids))[:len(kept)] and len(kept) > 100
    counts = {k: min(int((ids == k).sum()), 4) for k in kept}
    assert acc.held.num_rows == sum(counts.values())
    # a subject past per_subject keeps its first faces in manifest order
    cells = np.array(everything["anon_descriptor"].to_pylist(), dtype=object)
    held_ids, held_cells = acc.held["pseudonym_id"].to_pylist(), acc.held["anon_descriptor"].to_pylist()
    for k in kept:
        assert [c for i, c in zip(held_ids, held_cells) if i == k] == list(cells[ids == k][:4])
    assert got.capped >= sum(max(int((ids == k).sum()) - 4, 0) for k in kept) > 0
    # the figures, directly from those subjects' first rows
    pairs, subjects_2 = 0, 0
    for k, n in counts.items():
        if n >= 2:
            subjects_2 += 1
            pairs += n * (n - 1) // 2
    assert got.subjects == got.measured == subjects_2 and len(got.between) == pairs
    assert got.consistent == subjects_2  # faces of one subject lie 0.02 * sqrt(2 * 128) ~ 0.3 apart
