"""The report and ``inspect`` stream the manifest: memory bounded in its size, and the same facts as the
per-row computation they replace.

Manifests are synthetic (``benchmarks/bench_report.py``): a run over every input, then a resumed run that redid
some of them, with every column filled as the job fills it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.bench_report import write_manifest
from rp_distributed import manifest, report
from rp_distributed.report.latest import KeyHash, LatestView
from rp_distributed.summary import summarize
from tests.conftest import REPO

MEASURE = r"""
import json, sys, tracemalloc
import matplotlib.figure  # imported before measuring: the same for any manifest
import pyarrow as pa
from rp_distributed import report
out = sys.argv[1]
tracemalloc.start()  # Python objects and numpy arrays
report.inspect_text(report.load(out), out, failed=True)
report.write_report(out)
print(json.dumps({"python_mib": tracemalloc.get_traced_memory()[1] / 2**20,
                  "arrow_mib": pa.default_memory_pool().max_memory() / 2**20}))
"""


def _peaks(out) -> dict:
    """Peak bytes allocated while ``inspect`` and ``report`` run on ``out`` in a fresh process: by Python and numpy
    (tracemalloc), and by Arrow's memory pool."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(out)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_report_memory_does_not_grow_with_the_manifest(tmp_path):
    """The peak memory of ``inspect`` and ``report`` over a manifest of 24 parts (230K rows, two runs) is that of one
    of 3 parts (27K rows, one run), to a few MiB: what is held is a batch at a time, fixed-size figures and 16 bytes
    an input seen in two runs, not the rows. (Holding the rows as Python objects grows by more than 2 GiB here.)"""
    small, big = tmp_path / "small", tmp_path / "big"
    write_manifest(small / "_manifest", inputs=9_000, part_rows=10_000, resume=False)
    counts = write_manifest(big / "_manifest", inputs=72_000, part_rows=10_000)
    assert counts["rows"] > 200_000 and counts["parts"] >= 24 and counts["redone"] > 3000
    base, peak = _peaks(small), _peaks(big)
    assert peak["python_mib"] < base["python_mib"] + 6, (base, peak)
    assert peak["arrow_mib"] < base["arrow_mib"] + 6, (base, peak)


# -- the same facts as the per-row computation ----------------------------------------------------------------

def _old_latest_view(table: pa.Table) -> pa.Table:
    """The rule as the report applied it on the whole table: rows of each input's greatest run id."""
    last = table.group_by("input_uri", use_threads=False).aggregate([("run_id", "max")])
    last = last.rename_columns(["input_uri", "run_id"])
    view = table.join(last, keys=["input_uri", "run_id"], join_type="inner", use_threads=False)
    return view.select(table.column_names).sort_by([("rel_path", "ascending"), ("face_index", "ascending")])


def _num(values) -> np.ndarray:
    return np.array([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)


def _old_facts(rows: list[dict]) -> dict:
    """The figures as the report computed them from the rows as Python objects (its code before streaming)."""
    images = [r for r in rows if r.get("face_index") in (None, 0)]
    faces = [r for r in rows if r.get("face_index") is not None]
    tag = lambda r: r["rel_path"] if r.get("face_index") is None else f"{r['rel_path']}#{r['face_index']}"  # noqa
    image_reasons, face_reasons, score_reasons = defaultdict(list), defaultdict(list), defaultdict(list)
    for r in images:
        if r["status"] in ("error", "withheld"):
            image_reasons[r.get("error") or "(no reason recorded)"].append(r["rel_path"])
    for r in faces:
        if r.get("face_error"):
            face_reasons[r["face_error"]].append(tag(r))
        if r.get("score_error"):
            score_reasons[r["score_error"]].append(tag(r))
    first, rungs, fell_back = [], defaultdict(lambda: [0, 0, 0]), 0
    for r in faces:
        tries = json.loads(r["tries_json"]) if r.get("tries_json") else []
        if tries and tries[0].get("reid_distance") is not None:
            first.append(tries[0]["reid_distance"])
        for k, t in enumerate(tries):
            rung = rungs[(k, t.get("guidance"))]
            rung[0] += 1
            d, thr = t.get("reid_distance"), r.get("reid_threshold")
            if d is not None and thr is not None:
                rung[1] += 1
                rung[2] += d >= thr
        if tries and "still re-identified after" in (r.get("face_error") or ""):
            fell_back += 1
    thresholds = Counter(r["reid_threshold"] for r in faces if r.get("reid_threshold") is not None)
    return dict(
        n_images=len(images), n_faces=len(faces), runs=dict(Counter(r["run_id"] for r in images)),
        by_method=dict(Counter(r.get("method_applied") or "none (no crop: image-level fallback)" for r in faces)),
        reasons=[{k: (len(v), v[:3]) for k, v in d.items()} for d in (image_reasons, face_reasons, score_reasons)],
        ladder=sorted((k + 1, g, *v) for (k, g), v in rungs.items()), fell_back=fell_back,
        threshold=thresholds.most_common(1)[0][0], first_try=_num(first),
        final=_num(r.get("reid_distance") for r in faces if r.get("output_uri")),
        pose=_num(r.get("pose_diff_deg") for r in faces), drift=_num(r.get("landmark_displacement") for r in faces),
        timings={col: _num(r.get(col) for r in (faces if col == "t_anonymize_s" else images))
                 for col in ("t_read_s", "t_detect_s", "t_anonymize_s", "t_merge_s")},
        fingerprints=dict(Counter(r.get("settings_fingerprint") for r in images)),
        models=dict(Counter(r["model"] for r in faces if r.get("model"))),
        params=dict(Counter(r["params"] for r in faces if r.get("params"))),
        prompts=dict(Counter(r["attribute_prompt"] for r in faces if r.get("attribute_prompt"))),
        unet_evals=int(sum(r.get("unet_evals") or 0 for r in faces)),
        tries=int(sum(r.get("tries") or 0 for r in faces)),
        failed=[(r["rel_path"], r["status"], r["error"]) for r in images if r["status"] in ("error", "withheld")][:200],
        eligible={(r["rel_path"], r["face_index"]) for r in faces
                  if r.get("output_uri") and r.get("box_x0") is not None},
        summary=summarize(rows))


def _odd_parts(mdir, rng) -> None:
    """What a real manifest can also hold: a third run redoing inputs of both earlier runs (its rows spread over two
    parts), an old part without the columns added later, a row without a run id, a row without an input."""
    from benchmarks.bench_report import RUN_A, RUN_B, part_table

    run_c, out = "20260303T120000-0a0b0c", f"{mdir.resolve().parent}/"
    table, _ = part_table(rng, np.array([3, 5, 8, 13, 21, 34, 2500, 2501]), run_c, out)
    pq.write_table(table.slice(0, 9), mdir / f"part-{run_c}-00000.parquet")
    pq.write_table(table.slice(9), mdir / f"part-{run_c}-00001.parquet")
    old, _ = part_table(rng, np.array([9000, 9001, 9002]), RUN_A, out)
    pq.write_table(old.drop_columns(["found_by", "low_confidence", "audit", "audit_faces", "detect_passes",
                                     "detect_mpix", "t_audit_s"]), mdir / f"part-{RUN_A}-99999.parquet")
    odd, _ = part_table(rng, np.array([9100, 9101]), RUN_B, out)
    odd = odd.set_column(0, "run_id", pa.array([None] + [RUN_B] * (odd.num_rows - 1), pa.string()))
    odd = odd.set_column(1, "input_uri", pa.array(odd["input_uri"].to_pylist()[:-1] + [None], pa.string()))
    pq.write_table(odd, mdir / f"part-{RUN_B}-99999.parquet")


def test_facts_equal_the_per_row_computation(tmp_path):
    out = tmp_path / "out"
    write_manifest(out / "_manifest", inputs=3_000, part_rows=2_000, seed=7)
    _odd_parts(out / "_manifest", np.random.default_rng(1))
    table = manifest.read_manifest(str(out), "_manifest")
    old_view = _old_latest_view(table)
    view = LatestView.open(str(out), "_manifest")
    assert len(view.runs) == 3 and view.superseded is not None and len(view.superseded.h0) > 80
    new_view = pa.Table.from_batches(list(view.batches(manifest.SCHEMA.names)))
    order = [("rel_path", "ascending"), ("face_index", "ascending"), ("run_id", "ascending")]
    assert new_view.num_rows == old_view.num_rows < table.num_rows - 300
    assert new_view.sort_by(order).to_pylist() == old_view.sort_by(order).to_pylist()

    old = _old_facts(old_view.to_pylist())
    f = report.load(str(out))
    assert f.summary == old["summary"]
    assert (f.n_images, f.n_faces, f.runs) == (old["n_images"], old["n_faces"], old["runs"])
    assert dict(f.by_method.counts) == old["by_method"] and f.fingerprints.counts == old["fingerprints"]
    assert (f.models.counts, f.params.counts, f.prompts.counts) == (old["models"], old["params"], old["prompts"])
    for new, want in zip((f.image_reasons, f.face_reasons, f.score_reasons), old["reasons"]):
        assert {k: (g.count, g.tags()) for k, g in new.top()} == want
    assert [(r.number, r.guidance, r.run, r.checked, r.passed) for r in f.ladder] == old["ladder"]
    assert (f.fell_back_after_ladder, f.unet_evals, f.tries) == (old["fell_back"], old["unet_evals"], old["tries"])
    assert f.threshold == old["threshold"]
    assert [(r["rel_path"], r["status"], r["error"]) for r in f.failed] == old["failed"]
    sample = {(r["rel_path"], r["face_index"]) for r in f.gallery}
    assert len(sample) == len(f.gallery) == min(1000, len(old["eligible"])) and sample <= old["eligible"]
    # Distributions: the same counts and extremes; quantiles within a bin (0.001 for distances and pose bins of
    # 0.1 degree, 0.0001 inter-ocular, 1.2% for seconds).
    for sketch, values, tol in ((f.first_try, old["first_try"], 0.002), (f.final, old["final"], 0.002),
                                (f.pose, old["pose"], 0.2), (f.drift, old["drift"], 0.002)):
        assert len(sketch) == len(values) > 100 and (sketch.lo, sketch.hi) == (values.min(), values.max())
        for q in (0.1, 0.5, 0.9):
            assert abs(sketch.quantile(q) - np.quantile(values, q)) <= tol, (q, sketch.quantile(q))
    for col, values in old["timings"].items():
        s = f.timings[col]
        assert len(s) == len(values) > 1000 and s.total == pytest.approx(values.sum(), rel=1e-9)
        for q in (0.05, 0.25, 0.5, 0.9, 0.95):
            assert s.quantile(q) == pytest.approx(np.quantile(values, q), rel=0.012), (col, q)


def test_input_keys_tell_names_apart_and_do_not_depend_on_the_batch():
    """The latest view's 128-bit keys: distinct names get distinct keys (names that differ in one byte anywhere, in
    trailing NUL bytes, in length only, in a 5,000-byte tail), and a name's key is the same in any batch, slice or
    string type."""
    base = "s3://other-bucket/set/shard-0001/img_00000001.jpg"
    names = [f"s3://bucket/set/shard-{i // 1000:04d}/img_{i:08d}.jpg" for i in range(40_000)]
    names += [base[:k] + chr(ord(base[k]) ^ 1) + base[k + 1:] for k in range(len(base))]
    names += ["", "a", "a\x00", "a\x00\x00", "\x00", "é", "e\u0301", "名前/画像.jpg", "x" * 5000, "x" * 4999 + "y",
              "x" * 5001, base + "\x00" * 8]
    assert len(set(names)) == len(names)
    hasher = KeyHash(seed=3)
    h0, h1 = hasher(pa.array(names))
    assert len(set(zip(h0.tolist(), h1.tolist()))) == len(names)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(names))
    shuffled = pa.array([names[i] for i in order])
    for lo, hi in ((0, 7), (7, 20_000), (20_000, len(names))):
        part = shuffled.slice(lo, hi - lo)  # an offset into the buffers
        for arr in (part, part.cast(pa.large_string())):
            g0, g1 = hasher(arr)
            assert np.array_equal(g0, h0[order[lo:hi]]) and np.array_equal(g1, h1[order[lo:hi]])
