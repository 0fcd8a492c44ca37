import json

import pyarrow.parquet as pq
import pytest

from rp_distributed import manifest


def _face(uri, i, status="ok", reid=False, tries=None, **kw):
    return {"run_id": "r", "input_uri": uri, "rel_path": uri, "output_uri": f"out/{uri}", "status": status,
            "face_index": i, "reidentified": reid, "identity_exported": reid, "reid_distance": 0.3 if reid else 0.8, "reid_threshold": 0.6,
            "tries_json": json.dumps(tries) if tries else None, **kw}


def test_parts_round_trip_with_one_schema(tmp_path):
    rows_a = [_face("a.jpg", 0), _face("a.jpg", 1, error=None)]
    rows_b = [{"run_id": "r", "input_uri": "b.jpg", "rel_path": "b.jpg", "status": "error", "error": "empty file",
               "output_uri": float("nan")}]  # NaN is how Ray hands back a missing value
    manifest.write_part(str(tmp_path), "_manifest", "r", 0, rows_a)
    manifest.write_part(str(tmp_path), "_manifest", "r", 1, rows_b)
    table = manifest.read_manifest(str(tmp_path), "_manifest")
    assert table.schema == manifest.SCHEMA and table.num_rows == 3
    files = sorted((tmp_path / "_manifest").iterdir())
    assert [f.name for f in files] == ["part-r-00000.parquet", "part-r-00001.parquet"]
    assert pq.read_schema(files[1]).equals(manifest.SCHEMA, check_metadata=False)
    assert table.to_pylist()[2]["output_uri"] is None


def test_unknown_columns_are_refused(tmp_path):
    with pytest.raises(KeyError, match="outside the schema"):
        manifest.write_part(str(tmp_path), "_manifest", "r", 0, [{"input_uri": "x", "bogus": 1}])


def test_done_inputs_follow_the_latest_row():
    import pyarrow as pa

    rows = [_face("a.jpg", 0), {"input_uri": "b.jpg", "status": "error", "output_uri": None},
            {"input_uri": "c.jpg", "status": "no_face", "output_uri": "out/c.jpg"},
            {"input_uri": "c.jpg", "status": "withheld", "output_uri": None}]
    table = pa.Table.from_pylist([manifest.normalize_row(r) for r in rows], schema=manifest.SCHEMA)
    assert manifest.done_inputs(table) == {"a.jpg": ("out/a.jpg", None)}


def test_summary_counts_and_escalation_rates():
    rows = [
        _face("a.jpg", 0, tries=[{"guidance": -10, "reid_distance": 0.5}, {"guidance": -15, "reid_distance": 0.7}]),
        _face("a.jpg", 1, tries=[{"guidance": -10, "reid_distance": 0.9}]),
        _face("b.jpg", 0, reid=True, face_error="still re-identified",
              tries=[{"guidance": -10, "reid_distance": 0.2}, {"guidance": -15, "reid_distance": 0.3}]),
        {"input_uri": "c.jpg", "status": "error"},
    ]
    s = manifest.summarize(rows)
    assert s["images"] == 3 and s["faces"] == 3 and s["failures"] == 1 and s["fallbacks"] == 1
    assert s["reid_rate"] == pytest.approx(1 / 3)
    assert s["reid_rate_first_try"] == pytest.approx(2 / 3) and s["escalated"] == 2
