"""Side tables (issue 10): reading Parquet, CSV and JSON lines, the join into the plan by path, and the checks of
each row (``rp_distributed/annotations.py``). No model and no Ray: fast."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rp_distributed import annotations as ann
from rp_distributed.config import load_config
from rp_distributed.faces import annotated

LISTING = pa.table({"input_uri": ["/data/in/a.jpg", "/data/in/sub/b.png", "/data/in/c.jpg"],
                    "rel_path": ["a.jpg", "sub/b.png", "c.jpg"]})
LM5 = [[10.0, 12.0], [20.0, 12.0], [15.0, 17.0], [11.0, 22.0], [19.0, 22.0]]


def _write(tmp_path, rows: list[dict], fmt: str):
    path = tmp_path / f"t.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:  # CSV: landmarks as text of numbers
        cols = list(rows[0])
        lines = [",".join(cols)]
        for r in rows:
            cells = []
            for c in cols:
                v = r.get(c)
                cells.append('"' + " ".join(str(x) for p in v for x in p) + '"' if c == "landmarks" and v
                             else ("" if v is None else str(v)))
            lines.append(",".join(cells))
        path.write_text("\n".join(lines) + "\n")
    return str(path)


ROWS = [{"path": "sub/b.png", "x0": 5.0, "y0": 5.0, "x1": 25.0, "y1": 30.0, "landmarks": LM5},
        {"path": "/data/in/a.jpg", "x0": 1.0, "y0": 2.0, "x1": 3.0, "y1": 4.0, "landmarks": None},  # full URI
        {"path": "./a.jpg", "x0": 10.0, "y0": 20.0, "x1": 30.0, "y1": 40.0, "landmarks": None},  # ./ prefix
        {"path": "gone.jpg", "x0": 1.0, "y0": 1.0, "x1": 2.0, "y1": 2.0, "landmarks": None},
        {"path": "gone.jpg", "x0": 3.0, "y0": 3.0, "x1": 4.0, "y1": 4.0, "landmarks": None}]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_each_format_joins_by_relative_path_and_full_uri(tmp_path, fmt):
    uri = _write(tmp_path, ROWS, fmt)
    cfg = load_config(None, ["input.mode=annotations", f"input.annotations={uri}"])
    table, orphans = ann.attach(cfg, LISTING)
    rows = table.to_pylist()
    a, b, c = (r["annotations"] for r in rows)
    assert c is None  # no row: null, not an empty list (input.annotations_missing decides)
    assert [r["row"] for r in a] == [1, 2] and [r["x0"] for r in a] == [1.0, 10.0]
    assert len(b) == 1 and b[0]["row"] == 0 and b[0]["landmarks"] == [v for p in LM5 for v in p]
    assert orphans == [{"path": "gone.jpg", "table": uri, "rows": [3, 4]}]
    row = ann.orphan_row(orphans[0], "/data/in", "run", "fp")
    assert row["status"] == "error" and row["input_uri"] == "/data/in/gone.jpg" and "row(s) 3, 4" in row["error"]


def test_landmarks_as_points_flat_or_text_read_the_same():
    flat = [v for p in LM5 for v in p]
    t = pa.table({"path": ["a.jpg"] * 4, "x0": [0.0] * 4, "y0": [0.0] * 4, "x1": [9.0] * 4, "y1": [9.0] * 4})
    as_points = ann.annotation_structs(t.append_column("landmarks", pa.array([LM5] * 4)))
    as_flat = ann.annotation_structs(t.append_column("landmarks", pa.array([flat] * 4)))
    as_text = ann.annotation_structs(t.append_column("landmarks", pa.array([json.dumps(LM5)] * 4)))
    got = [s.field("landmarks").to_pylist() for s in (as_points, as_flat, as_text)]
    assert got[0] == got[1] == got[2] == [flat] * 4


def test_bad_rows_are_reported_row_by_row(tmp_path):
    # CSV: a cell that is not a number keeps its column as text; each row is judged on its own.
    path = tmp_path / "bad.csv"
    path.write_text("path,x0,y0,x1,y1,landmarks\n"
                    "a.jpg,10,10,50,60,\n"            # 0: good, box only
                    "a.jpg,500,500,600,600,\n"        # 1: wholly outside the 100x100 image
                    "a.jpg,-10,80,30,120,\n"          # 2: partly outside: clipped
                    "a.jpg,oops,10,20,20,\n"          # 3: not a number: a face we cannot place
                    "a.jpg,60,10,40,30,\n"            # 4: x1 < x0: not a box
                    'a.jpg,20,20,70,80,"1 2 3"\n')    # 5: 3 landmark numbers: aligned from the box
    cfg = load_config(None, ["input.mode=annotations", f"input.annotations={path}"])
    table, orphans = ann.attach(cfg, LISTING)
    assert not orphans
    found = annotated.faces_from_rows(table["annotations"][0].as_py(), (100, 100, 3))
    assert len(found.faces) == 3  # rows 0, 2 (clipped), 5
    assert [f.box.tolist() for f in found.faces] == [[20, 20, 70, 80], [10, 10, 50, 60], [0, 80, 30, 100]]
    assert found.needs_landmarks == [True, True, True]
    notes = "\n".join(found.notes)
    assert "row 1: box [500, 500, 600, 600] lies outside the 100x100 image: ignored" in notes
    assert "row 2: box [-10, 80, 30, 120] clipped to the 100x100 image" in notes
    assert "row 5: landmarks have 3 values" in notes
    bad = "\n".join(found.unlocatable)
    assert "row 3: x0='oops' is not a number" in bad and "row 4: box [60.0, 10.0, 40.0, 30.0] is not a box" in bad
    assert all(f"row {i}" not in notes + bad for i in (0,))


def test_paths_not_in_the_input_are_listed_up_to_a_cap(monkeypatch):
    monkeypatch.setattr(ann, "MAX_ORPHAN_PATHS", 2)
    keys = pa.array(["x.jpg", "a.jpg", "y.jpg", "x.jpg", "z.jpg", None])
    structs = ann.annotation_structs(pa.table({"x0": [1.0] * 6, "y0": [1.0] * 6, "x1": [2.0] * 6, "y1": [2.0] * 6}))
    joined = ann.join(keys, structs, LISTING["rel_path"].combine_chunks(), LISTING["input_uri"].combine_chunks())
    assert joined.orphans == [("x.jpg", [0, 3]), ("y.jpg", [2])] and joined.more_orphans == 2  # z.jpg, the empty one
    assert [r["row"] for r in joined.column[0].as_py()] == [1]
    last = ann.orphan_row({"path": "y.jpg", "table": "t.csv", "rows": [2], "more": 2}, "/data/in", "run", "fp")
    assert last["error"].endswith("; 2 more paths of this table are not in the input (not listed one by one)")
    empty = ann.join(pa.array([], pa.string()), structs.slice(0, 0), pa.array([], pa.string()), pa.array([], pa.string()))
    assert len(empty.column) == 0 and not empty.orphans


def test_csv_paths_that_look_like_numbers_stay_text(tmp_path):
    (tmp_path / "t.csv").write_text("path,x0,y0,x1,y1\n007,1,1,2,2\n")
    listing = pa.table({"input_uri": ["/in/007"], "rel_path": ["007"]})
    cfg = load_config(None, ["input.mode=annotations", f"input.annotations={tmp_path}/t.csv"])
    table, orphans = ann.attach(cfg, listing)
    assert not orphans and table["annotations"][0].as_py()[0]["row"] == 0


def test_unreadable_or_keyless_tables_are_start_up_errors(tmp_path):
    cfg = load_config(None, ["input.mode=annotations", f"input.annotations={tmp_path}/none.parquet"])
    with pytest.raises(ann.TableError, match="input.annotations: cannot read"):
        ann.attach(cfg, LISTING)
    (tmp_path / "t.csv").write_text("file,x0,y0,x1,y1\na.jpg,1,1,2,2\n")
    cfg = load_config(None, ["input.mode=annotations", f"input.annotations={tmp_path}/t.csv"])
    with pytest.raises(ann.TableError, match="no 'path' column"):
        ann.attach(cfg, LISTING)
    cfg = load_config(None, ["input.mode=annotations", f"input.annotations={tmp_path}/t.csv",
                             "input.annotations_path_column=file"])
    table, _ = ann.attach(cfg, LISTING)
    assert table["annotations"][0].as_py()[0]["x1"] == 2.0


def test_prompt_rows_name_faces_by_index_by_box_or_the_whole_image(tmp_path):
    rows = [{"path": "a.jpg", "face_index": None, "x0": None, "y0": None, "x1": None, "y1": None,
             "age_group": "old", "sex": "man"},                      # 0: every face of a.jpg
            {"path": "a.jpg", "face_index": 2, "x0": None, "y0": None, "x1": None, "y1": None,
             "age_group": "young", "sex": "woman"},                  # 1: face 2
            {"path": "a.jpg", "face_index": None, "x0": 101.0, "y0": 0.0, "x1": 151.0, "y1": 50.0,
             "age_group": "middle-aged", "sex": "woman"},            # 2: the face at that box (face 1)
            {"path": "a.jpg", "face_index": 7, "x0": None, "y0": None, "x1": None, "y1": None,
             "age_group": "old", "sex": "woman"},                    # 3: no face 7
            {"path": "a.jpg", "face_index": None, "x0": 400.0, "y0": 400.0, "x1": 450.0, "y1": 450.0,
             "age_group": "old", "sex": "woman"},                    # 4: overlaps no face
            {"path": "a.jpg", "face_index": 0, "x0": None, "y0": None, "x1": None, "y1": None,
             "age_group": None, "sex": "woman"}]                     # 5: template field empty
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = load_config(None, ["anonymizer.method=reverse_personalization", f"prompts.table={path}",
                             "prompts.template=a photo of a {age_group} {sex}"])
    table, orphans = ann.attach(cfg, LISTING)
    assert not orphans and table["prompts"][1].as_py() is None
    boxes = [np.array(b, np.float32) for b in ([0, 0, 100, 100], [100, 0, 150, 50], [200, 0, 240, 40], [0, 200, 30, 230])]
    chosen, notes = annotated.prompts_for_faces(table["prompts"][0].as_py(), boxes, 0.5)
    assert chosen == ["a photo of a old man", "a photo of a middle-aged woman", "a photo of a young woman",
                      "a photo of a old man"]
    assert len(notes) == 3 and notes[0].startswith("prompts row 3: face_index 7 names no face")
    assert notes[1].startswith("prompts row 4: box [400, 400, 450, 450] overlaps no face")
    assert notes[2] == "prompts row 5: template field(s) ['age_group'] empty: ignored"
    # Without a row for the image, every face is left to the job's prompt.
    assert annotated.prompts_for_faces(None, boxes, 0.5) == ([annotated.UNSET] * 4, [])


def test_prompt_tables_need_a_prompt_column_or_a_template(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"path": "a.jpg", "text": "an old man"}) + "\n")
    cfg = load_config(None, ["anonymizer.method=reverse_personalization", f"prompts.table={path}"])
    with pytest.raises(ann.TableError, match="no 'prompt' column"):
        ann.attach(cfg, LISTING)
    cfg = load_config(None, ["anonymizer.method=reverse_personalization", f"prompts.table={path}",
                             "prompts.prompt_column=text"])
    table, _ = ann.attach(cfg, LISTING)
    assert table["prompts"][0].as_py()[0]["prompt"] == "an old man"


def test_config_refuses_an_annotations_mode_without_a_table_and_bad_templates():
    from rp_distributed.config import ConfigError, anonymization_fingerprint

    with pytest.raises(ConfigError, match="input.mode=annotations needs input.annotations"):
        load_config(None, ["input.mode=annotations"])
    with pytest.raises(ConfigError, match="named fields only"):
        load_config(None, ["prompts.template=a {} photo"])
    # Input modes and the prompt table are anonymization settings; the default mode keeps old fingerprints.
    base = load_config(None, ["anonymizer.method=reverse_personalization"])
    fps = {anonymization_fingerprint(base),
           anonymization_fingerprint(load_config(None, ["anonymizer.method=reverse_personalization",
                                                        "input.mode=aligned"])),
           anonymization_fingerprint(load_config(None, ["anonymizer.method=reverse_personalization",
                                                        "prompts.table=p.csv"]))}
    assert len(fps) == 3
    assert "input" not in __import__("rp_distributed.config", fromlist=["x"]).anonymization_settings(base)


def test_estimate_counts_the_faces_the_annotations_give(tmp_path, t1_path, astronaut_path):
    """``rp-anonymize estimate`` joins the table as the plan does: the faces counted are the table's."""
    import shutil

    from rp_distributed.estimate import estimate

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(t1_path, src / "t1.jpg")
    shutil.copy(astronaut_path, src / "astronaut.png")
    (tmp_path / "t.csv").write_text("path,x0,y0,x1,y1\nt1.jpg,100,100,200,200\nt1.jpg,300,100,400,200\n")
    cfg = load_config(None, ["input.mode=annotations", f"input.annotations={tmp_path}/t.csv",
                             "input.annotations_missing=skip"])
    got = estimate(cfg, str(src), sample=2)
    assert got["sample"]["faces"] == 2 and got["sample"]["with_faces"] == 1 and got["sample"]["without_faces"] == 1
