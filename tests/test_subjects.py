"""``rp-anonymize subjects``: the clustering on its own (graphs whose answer is known), the per-image descriptors and
clustering on real photos with real dlib (t1.jpg's six people under scale, rotation, JPEG and crop, package photos
as distractors: benchmarks/subjects_set.py), and one small Ray run of the command."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from benchmarks.subjects_set import VARIANTS, described_set, sources
from rp_distributed.config import load_config
from rp_distributed.subjects import ClusterParams, cluster, scores, subject_names
from tests.conftest import FAST_DETECTION, insightface_image, skimage_image


def test_scores_of_a_known_labelling():
    s = scores([0, 0, 1, 1], ["a", "a", "a", "b"])
    assert (s.pairwise_precision, s.pairwise_recall) == (0.5, pytest.approx(1 / 3))
    assert (s.bcubed_precision, s.bcubed_recall) == (0.75, pytest.approx(2 / 3))
    perfect = scores([5, 5, 7], ["x", "x", "y"])
    assert perfect.bcubed_f1 == perfect.pairwise_precision == perfect.pairwise_recall == 1.0


def _bridge() -> tuple[np.ndarray, np.ndarray]:
    """Two tight groups of eight 0.8 apart and one face between them, 0.4 from each: one chance edge per side."""
    rng = np.random.default_rng(3)
    a = np.zeros((8, 128), np.float32) + rng.normal(0, 0.005, (8, 128)).astype(np.float32)
    b = a.copy()
    b[:, 0] += 0.8
    mid = np.zeros((1, 128), np.float32)
    mid[0, 0] = 0.4
    return np.concatenate([a, mid, b]), np.array([0] * 8 + [2] + [1] * 8)


def test_chinese_whispers_keeps_two_people_a_chance_edge_joins_apart():
    x, truth = _bridge()
    whispers = cluster(x, ClusterParams(threshold=0.6, method="chinese_whispers"))
    components = cluster(x, ClusterParams(threshold=0.6, method="components"))
    assert len(set(components.tolist())) == 1  # the chain merges everyone
    assert len(set(whispers[:8].tolist())) == 1 and len(set(whispers[9:].tolist())) == 1
    assert whispers[0] != whispers[9]


def test_numbering_follows_the_rows_and_the_partition_not_the_order():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 0.0625, (40, 128)).astype(np.float32)
    truth = rng.integers(0, 40, 600)
    x = centres[truth] + rng.normal(0, 0.02, (600, 128)).astype(np.float32)
    labels = cluster(x, ClusterParams(threshold=0.6))
    assert scores(labels, truth).bcubed_f1 == 1.0
    assert labels[0] == 0 and np.all(np.diff(np.maximum.accumulate(labels)) <= 1)  # numbered as first seen
    perm = rng.permutation(600)
    assert scores(cluster(x[perm], ClusterParams(threshold=0.6)), labels[perm]).bcubed_f1 == 1.0
    # The inverted-file search (large sets) finds the same graph here.
    ivf = cluster(x, ClusterParams(threshold=0.6, exact_below=100, nprobe=8))
    assert np.array_equal(ivf, labels)
    assert subject_names(np.array([0, 41, 3])) == ["s000000", "s000041", "s000003"]
    assert subject_names(np.array([1_234_567])) == ["s1234567"]


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="unknown clustering method"):
        ClusterParams(threshold=0.6, method="kmeans")
    with pytest.raises(ValueError, match="threshold"):
        ClusterParams(threshold=0)


def test_the_listing_does_not_read_the_subject_table_it_is_about_to_write(tmp_path, monkeypatch):
    """One config for both commands: `subjects` lists the inputs while its own output (the config's subject table)
    does not exist yet, and without the pseudonym key, which it never uses."""
    from rp_distributed.subjects.job import _listing

    shutil.copy(insightface_image("t1.jpg"), tmp_path / "t1.jpg")
    monkeypatch.delenv("RP_PSEUDONYM_KEY", raising=False)
    cfg = load_config(None, [f"pseudonyms.table={tmp_path / 'subjects.parquet'}"])
    plan = _listing(cfg, str(tmp_path))
    assert plan["rel_path"].to_pylist() == ["t1.jpg"] and "subjects" not in plan.column_names


def test_no_face_at_all_is_an_empty_table(tmp_path):
    from rp_distributed.subjects.job import TABLE_SCHEMA, Spool, SubjectsResult, cluster_spool, write_table

    spool = Spool(str(tmp_path), 128)
    spool.close()
    result = SubjectsResult(table_uri=str(tmp_path / "s.parquet"))
    table = cluster_spool(str(tmp_path), 128, ClusterParams(threshold=0.6), result)
    write_table(table, result.table_uri)
    assert pq.read_table(result.table_uri).schema == TABLE_SCHEMA and result.faces == result.subjects == 0


def test_spooled_rows_delivered_twice_count_once_and_missing_inputs_are_lost(tmp_path):
    """A retried task may deliver an input's rows again; an input no row came back for was lost with its worker."""
    import pyarrow as pa

    from rp_distributed.records import Status
    from rp_distributed.subjects.describe import DescribedFace, DescribedImage, to_columns
    from rp_distributed.subjects.job import Spool, SubjectsResult, _outcomes, cluster_spool

    rng = np.random.default_rng(0)
    faces = [DescribedFace(i, np.array([i, 0, i + 9, 9], np.float32), rng.normal(0, 1, 8).astype(np.float32))
             for i in range(2)]
    images = [DescribedImage("b.jpg", Status.OK, faces=faces), DescribedImage("a.jpg", Status.NO_FACE),
              DescribedImage("c.jpg", Status.ERROR, "cannot decode")]
    spool = Spool(str(tmp_path), 8)
    spool.add(to_columns(images, 8))
    spool.add(to_columns(images[:1], 8))  # b.jpg again
    spool.close()
    plan = pa.table({"rel_path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]})
    assert spool.unfinished(plan)["rel_path"].to_pylist() == ["d.jpg"]
    result = SubjectsResult(table_uri="unused")
    _outcomes(str(tmp_path), plan, result)
    assert (result.with_faces, result.no_face, result.errors) == (1, 1, 2)
    assert [p for p, _ in result.error_rows] == ["c.jpg", "d.jpg"] and "lost" in result.error_rows[1][1]
    table = cluster_spool(str(tmp_path), 8, ClusterParams(threshold=0.1), result)
    assert [(r["path"], r["face_index"], r["x0"]) for r in table.to_pylist()] == [("b.jpg", 0, 0.0), ("b.jpg", 1, 1.0)]
    assert result.faces == 2 and result.subjects == 2


def test_arcface_recognizer_describes_the_aligned_crops(tiny_dir, t1_path):
    """The plumbing of --recognizer arcface (the tiny random ArcFace: its embeddings say nothing of identity)."""
    from rp_distributed.records import ImageRow
    from rp_distributed.subjects.describe import ArcFaceRecognizer, DescribeFaces, SubjectSettings

    cfg = load_config(None, [*FAST_DETECTION, f"diffusion.arcface={tiny_dir}/arcface/w600k_r50.onnx"])
    image = DescribeFaces(SubjectSettings.of(cfg), recognizer="arcface").describe(ImageRow(str(t1_path), "t1.jpg"))
    d = np.stack([f.descriptor for f in image.faces])
    assert d.shape == (6, 512) and np.allclose(np.linalg.norm(d, axis=1), 1, atol=1e-4)
    assert ArcFaceRecognizer.threshold(cfg) == pytest.approx(np.sqrt(2 * 0.7))


@pytest.fixture(scope="module")
def photo_faces(tmp_path_factory):
    from rp_distributed.subjects.describe import DescribeFaces, SubjectSettings

    stage = DescribeFaces(SubjectSettings.of(load_config(None, FAST_DETECTION)))
    return described_set(stage, tmp_path_factory.mktemp("subjects"))


@pytest.mark.slow
def test_t1_people_under_variations_come_out_as_the_right_clusters(photo_faces):
    truth = np.array([f.identity for f in photo_faces])
    x = np.stack([f.descriptor for f in photo_faces])
    people = sorted({t for t in truth if t.startswith("t1#")})
    assert len(people) == 6 and all((truth == p).sum() >= 7 for p in people)  # six people, found in most variants
    labels = cluster(x, ClusterParams(threshold=0.6))  # dlib's threshold, Chinese whispers: the defaults
    got = scores(labels, truth)
    print("subjects on photos:", got.line())
    for p in people:  # each person is one cluster, and that cluster is that person's alone
        mine = set(labels[truth == p].tolist())
        assert len(mine) == 1, (p, mine)
        assert set(truth[labels == mine.pop()].tolist()) == {p}
    assert got.pairwise_precision == got.pairwise_recall == 1.0
    # The same checks fail where the threshold is wrong: too strict splits a person, too loose merges people.
    assert scores(cluster(x, ClusterParams(threshold=0.45)), truth).pairwise_recall < 1.0
    assert scores(cluster(x, ClusterParams(threshold=0.8)), truth).pairwise_precision < 1.0
    # Connected components at the same threshold chain people together (one close pair is enough).
    assert scores(cluster(x, ClusterParams(threshold=0.6, method="components")), truth).pairwise_precision < 1.0


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_the_command_on_ray_writes_the_subject_table(tmp_path):
    """One Ray run of the command (its own local Ray, workers with tests/faults.py's hook): a poison input kills its
    worker every time and is reported lost, alone; a broken file is an error; the rest make the table."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    folder = tmp_path / "in"
    (folder / "visit2").mkdir(parents=True)
    shutil.copy(insightface_image("t1.jpg"), folder / "t1.jpg")
    small = next(v for v in VARIANTS if v.name == "t1/small.jpg")
    Image.fromarray(small.render(sources()["t1"])).save(folder / "visit2" / "t1 small.jpg", quality=95)
    shutil.copy(skimage_image("astronaut.png"), folder / "astronaut.png")
    Image.open(skimage_image("coffee.png")).convert("RGB").save(folder / "coffee.jpg")  # no face
    (folder / "broken.jpg").write_bytes(insightface_image("t1.jpg").read_bytes()[:2000])  # cannot be read
    marker = "rp-test-poison-subjects"
    Image.open(skimage_image("camera.png")).convert("RGB").save(folder / "poison.jpg", comment=marker.encode())
    out = tmp_path / "subjects.parquet"
    sets = [a for s in [*FAST_DETECTION, "ray.max_task_retries=1"] for a in ("--set", s)]
    driver = ("import sys, ray; ray.init(address='local', num_cpus=2, include_dashboard=False, log_to_driver=False, "
              "runtime_env={'worker_process_setup_hook': 'tests.faults.install'}); "
              "from rp_distributed.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", driver, "subjects", str(folder), "--out", str(out), "--no-progress",
                           *sets], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), RP_TEST_POISON=marker,
                                                   RAY_raylet_start_wait_time_s="180"),  # a loaded machine
                          capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "inputs listed 6: with faces 3, no face 1, errors 2" in text, text
    assert "error: broken.jpg: error: " in text and "error: poison.jpg: lost: its worker died" in text, text
    table = pq.read_table(out)
    assert table.column_names == ["path", "face_index", "x0", "y0", "x1", "y1", "subject"]
    rows = table.to_pylist()
    assert {r["path"] for r in rows} == {"t1.jpg", "visit2/t1 small.jpg", "astronaut.png"}
    by_path = {p: sorted((r for r in rows if r["path"] == p), key=lambda r: r["face_index"]) for p in
               ("t1.jpg", "visit2/t1 small.jpg")}
    assert [r["face_index"] for r in by_path["t1.jpg"]] == list(range(6))
    for r in by_path["t1.jpg"]:  # the same person in the small copy (its box, scaled back) has the same subject
        twin = min(by_path["visit2/t1 small.jpg"],
                   key=lambda s: abs(s["x0"] / 0.6 - r["x0"]) + abs(s["y0"] / 0.6 - r["y0"]))
        assert twin["subject"] == r["subject"]
    assert len({r["subject"] for r in by_path["t1.jpg"]}) == 6
    astronaut = [r["subject"] for r in rows if r["path"] == "astronaut.png"]
    assert len(astronaut) == 1 and astronaut[0] not in {r["subject"] for r in by_path["t1.jpg"]}
    assert rows[0]["subject"] == "s000000" and all(r["subject"].startswith("s") for r in rows)
