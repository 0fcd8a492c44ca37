import json

import pyarrow.parquet as pq
import pytest

from rp_distributed import manifest, manifest_writer, summary


def _face(uri, i, status="ok", reid=False, tries=None, **kw):
    return {"run_id": "r", "input_uri": uri, "rel_path": uri, "output_uri": f"out/{uri}", "status": status,
            "face_index": i, "reidentified": reid, "identity_exported": reid, "reid_distance": 0.3 if reid else 0.8, "reid_threshold": 0.6,
            "tries_json": json.dumps(tries) if tries else None, **kw}


def test_parts_round_trip_with_one_schema(tmp_path):
    rows_a = [_face("a.jpg", 0), _face("a.jpg", 1, error=None)]
    rows_b = [{"run_id": "r", "input_uri": "b.jpg", "rel_path": "b.jpg", "status": "error", "error": "empty file",
               "output_uri": float("nan")}]  # NaN is how Ray hands back a missing value
    manifest_writer.write_part(str(tmp_path), "_manifest", "r", 0, rows_a)
    manifest_writer.write_part(str(tmp_path), "_manifest", "r", 1, rows_b)
    table = manifest.read_manifest(str(tmp_path), "_manifest")
    assert table.schema == manifest.SCHEMA and table.num_rows == 3
    files = sorted((tmp_path / "_manifest").iterdir())
    assert [f.name for f in files] == ["part-r-00000.parquet", "part-r-00001.parquet"]
    assert pq.read_schema(files[1]).equals(manifest.SCHEMA, check_metadata=False)
    assert table.to_pylist()[2]["output_uri"] is None


def test_unknown_columns_are_refused(tmp_path):
    with pytest.raises(KeyError, match="outside the schema"):
        manifest_writer.write_part(str(tmp_path), "_manifest", "r", 0, [{"input_uri": "x", "bogus": 1}])


def test_latest_outcomes_take_the_last_row_of_each_input_across_parts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # An old part written before settings_fingerprint existed: the column reads as null.
    (tmp_path / "_manifest").mkdir()
    old = pa.table({"input_uri": ["a.jpg", "c.jpg"], "status": ["ok", "ok"], "output_uri": ["out/a.jpg", "out/c.jpg"]})
    pq.write_table(old, tmp_path / "_manifest" / "part-20260101T000000-aaaaaa-00000.parquet")
    manifest_writer.write_part(str(tmp_path), "_manifest", "20260201T000000-bbbbbb", 0, [
        {"input_uri": "b.jpg", "status": "error", "output_uri": None},
        {"input_uri": "c.jpg", "status": "no_face", "output_uri": "out/c.jpg", "settings_fingerprint": "f1"},
        {"input_uri": "c.jpg", "status": "withheld", "output_uri": None, "settings_fingerprint": "f2"}])
    latest = {r["input_uri"]: r for r in manifest.latest_outcomes(str(tmp_path), "_manifest").to_pylist()}
    assert latest["a.jpg"] == {"input_uri": "a.jpg", "status": "ok", "output_uri": "out/a.jpg",
                               "settings_fingerprint": None, "input_size": None, "input_version": None}
    assert latest["b.jpg"]["status"] == "error"
    assert latest["c.jpg"]["status"] == "withheld" and latest["c.jpg"]["settings_fingerprint"] == "f2"
    assert manifest.latest_outcomes(str(tmp_path / "none"), "_manifest").num_rows == 0
    # Hashed (what resume holds at 10M inputs): the same rows, each input by its hash in this process.
    hashed = {r.pop("input_hash"): r for r in manifest.latest_outcomes(str(tmp_path), "_manifest", hashed=True).to_pylist()}
    assert hashed == {hash(uri): {k: v for k, v in r.items() if k != "input_uri"} for uri, r in latest.items()}
    assert manifest.latest_outcomes(str(tmp_path / "none"), "_manifest", hashed=True).column_names[0] == "input_hash"


def test_summary_counts_and_escalation_rates():
    rows = [
        _face("a.jpg", 0, tries=[{"guidance": -10, "reid_distance": 0.5}, {"guidance": -15, "reid_distance": 0.7}]),
        _face("a.jpg", 1, tries=[{"guidance": -10, "reid_distance": 0.9}]),
        _face("b.jpg", 0, reid=True, face_error="still re-identified",
              tries=[{"guidance": -10, "reid_distance": 0.2}, {"guidance": -15, "reid_distance": 0.3}]),
        {"input_uri": "c.jpg", "status": "error"},
    ]
    s = summary.summarize(rows)
    assert s["images"] == 3 and s["faces"] == 3 and s["failures"] == 1 and s["fallbacks"] == 1
    assert s["reid_rate"] == pytest.approx(1 / 3)
    assert s["reid_rate_first_try"] == pytest.approx(2 / 3) and s["escalated"] == 2


def _timer_writes_one_part(out, rows: list[dict]) -> None:
    """No row arrives after ``rows``: the timer thread still writes them, once they are flush_s old."""
    import time

    timed = manifest_writer.PartWriter(str(out), "_manifest", "r", 10**6, 10**9, 0.4)
    for r in rows:
        timed.add(r)
    deadline = time.monotonic() + 10
    while not timed.parts and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(timed.parts) == 1 and manifest.read_manifest(str(out), "_manifest").num_rows == len(rows)
    timed.close()
    assert len(timed.parts) == 1


def test_part_writer_cuts_parts_by_rows_and_bytes_and_flushes_old_rows_on_a_timer(tmp_path):
    def row(i):
        return {"run_id": "r", "input_uri": f"in/{i}.jpg", "rel_path": f"{i}.jpg", "status": "no_face",
                "error": "x" * 100}

    by_rows = manifest_writer.PartWriter(str(tmp_path / "a"), "_manifest", "r", 3, 10**9, 3600)
    for i in range(7):
        by_rows.add(row(i))
    assert len(by_rows.parts) == 2
    by_rows.close()
    assert len(by_rows.parts) == 3 and manifest.read_manifest(str(tmp_path / "a"), "_manifest").num_rows == 7
    by_bytes = manifest_writer.PartWriter(str(tmp_path / "b"), "_manifest", "r", 10**6, 200, 3600)
    for i in range(4):
        by_bytes.add(row(i))
    assert len(by_bytes.parts) == 2  # ~120 bytes a row: a part every 2 rows
    by_bytes.close()
    _timer_writes_one_part(tmp_path / "c", [row(0)])


def test_a_part_never_ends_inside_an_image(tmp_path):
    """Cut every 2 rows, an image of 3 faces still lands in one part: a driver killed after that part
    must not leave an 'ok' image with faces missing, which resume would skip."""
    writer = manifest_writer.PartWriter(str(tmp_path), "_manifest", "r", 2, 10**9, 3600)
    for i in range(3):
        writer.add({"run_id": "r", "input_uri": "in/crowd.jpg", "rel_path": "crowd.jpg", "status": "ok",
                    "num_faces": 3, "face_index": i})
        assert len(writer.parts) == (1 if i == 2 else 0)
    writer.add({"run_id": "r", "input_uri": "in/empty.jpg", "rel_path": "empty.jpg", "status": "no_face",
                "num_faces": 0})
    writer.close()
    parts = [pq.read_table(p).to_pylist() for p in writer.parts]
    assert [[r["rel_path"] for r in part] for part in parts] == [["crowd.jpg"] * 3, ["empty.jpg"]]


def test_an_image_cut_short_at_close_is_left_out_so_resume_redoes_it(tmp_path):
    writer = manifest_writer.PartWriter(str(tmp_path), "_manifest", "r", 100, 10**9, 3600)
    writer.add({"run_id": "r", "input_uri": "in/a.jpg", "rel_path": "a.jpg", "status": "no_face", "num_faces": 0})
    for i in range(2):  # 2 of 3 face rows arrived, then the job was interrupted
        writer.add({"run_id": "r", "input_uri": "in/b.jpg", "rel_path": "b.jpg", "status": "ok", "num_faces": 3,
                    "face_index": i, "output_uri": "out/b.jpg"})
    writer.close()
    assert writer.dropped == 2
    assert manifest.latest_outcomes(str(tmp_path), "_manifest")["input_uri"].to_pylist() == ["in/a.jpg"]


def _full_row(i: int) -> dict:
    """A face row with every manifest column filled, as the merge stage sends them (strings of typical length)."""
    import pyarrow as pa

    def value(f):
        if pa.types.is_string(f.type):
            return f"{f.name}-{i:08d}-" + "x" * 24
        if pa.types.is_binary(f.type):
            return bytes(64)
        if pa.types.is_boolean(f.type):
            return bool(i % 2)
        if pa.types.is_integer(f.type):
            return i % 7
        return 0.25 + i
    row = {f.name: value(f) for f in manifest.SCHEMA}
    return {**row, "input_uri": f"in/{i}.jpg", "num_faces": 1, "face_index": 0}


def test_the_rows_a_part_buffers_cost_the_driver_little_memory(tmp_path):
    """A part buffers up to manifest_flush_s of rows on the driver: ~72K rows at 1,000 GPUs' rate. As Python dicts
    a row with every column filled held ~7.7 KB (over 500 MB); all but the newest rows are held as Arrow (~1.1 KB)."""
    import tracemalloc

    import pyarrow as pa

    n = 6000
    warm = manifest_writer.PartWriter(str(tmp_path / "warm"), "_manifest", "r", 10**6, 10**12, 3600)
    warm.add(_full_row(0))
    warm.close()  # what writing a part imports, imported before counting
    writer = manifest_writer.PartWriter(str(tmp_path), "_manifest", "r", 10**6, 10**12, 3600)
    tracemalloc.start()
    arrow_before = pa.total_allocated_bytes()
    for i in range(n):
        writer.add(_full_row(i))  # a row as it arrives from Ray: its own dict and values, the writer's to keep
    held = tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes() - arrow_before
    tracemalloc.stop()
    assert held / n < 3000, f"{held / n:.0f} bytes of driver memory a buffered row"
    assert not writer.parts  # all still buffered when counted
    writer.close()
    assert len(writer.parts) == 1
    back = manifest.read_manifest(str(tmp_path), "_manifest")
    assert back.num_rows == n and back["input_uri"].to_pylist() == [f"in/{i}.jpg" for i in range(n)]


def test_rows_held_as_arrow_are_cut_and_flushed_as_rows_were(tmp_path, monkeypatch):
    """With rows converted to Arrow every 2 rows: parts still cut at rows_per_file and never inside an image (an
    image of 3 faces straddles a conversion), the timer flushes rows held only as Arrow, and an image cut short
    at close is still left out."""
    monkeypatch.setattr(manifest_writer, "ROWS_AS_DICTS", 2)

    def image(name, faces):
        if not faces:
            return [{"run_id": "r", "input_uri": f"in/{name}", "rel_path": name, "status": "no_face", "num_faces": 0}]
        return [{"run_id": "r", "input_uri": f"in/{name}", "rel_path": name, "status": "ok", "num_faces": faces,
                 "face_index": i} for i in range(faces)]

    writer = manifest_writer.PartWriter(str(tmp_path / "a"), "_manifest", "r", 4, 10**9, 3600)
    for rows in (image("a.jpg", 0), image("b.jpg", 0), image("c.jpg", 0), image("crowd.jpg", 3), image("d.jpg", 0)):
        for r in rows:
            writer.add(r)
    writer.add(image("cut.jpg", 2)[0])  # 1 of 2 face rows, then the run ends
    writer.close()
    parts = [[r["rel_path"] for r in pq.read_table(p).to_pylist()] for p in writer.parts]
    assert parts == [["a.jpg", "b.jpg", "c.jpg", "crowd.jpg", "crowd.jpg", "crowd.jpg"], ["d.jpg"]]
    assert writer.dropped == 1
    _timer_writes_one_part(tmp_path / "b", image("e.jpg", 0) + image("f.jpg", 0))  # both rows held as Arrow
