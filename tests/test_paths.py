"""Paths are data, never syntax: a name in the input or output prefix cannot change which object is read,
written or deleted, and nothing leaves the prefixes through a symlink (swapped in before or during the job).

Most tests run the three stages in this process, exactly as the Ray actors run them; one Ray job runs the
attacks end to end. Also here: ``--overwrite`` keeps the manifest until its run completes, multi-frame
inputs, side-table rows for missing images written once, and the output prefix's lease.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from PIL import Image

from rp_distributed import annotations, io, manifest, manifest_writer
from rp_distributed.anonymizer import Anonymizer
from rp_distributed.config import anonymization_fingerprint, load_config
from rp_distributed.job.plan import make_plan
from rp_distributed.records import ImageRow
from rp_distributed.stages.detect import DetectFaces
from rp_distributed.stages.merge import MergeAndWrite
from tests.conftest import FAST_DETECTION


def _blur(*extra):
    return load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=same", *extra])


def _stages(cfg, row, **storages):
    """One plan row through the three stages in this process (``storages``: what the job passes them)."""
    inputs, outputs = storages.get("inputs"), storages.get("outputs")
    detect = DetectFaces.from_config(cfg, inputs=inputs) if inputs is not None else DetectFaces.from_config(cfg)
    row = detect.process(ImageRow.of(row))
    if row.pending:
        Anonymizer.from_config(cfg)(row.payload.faces)
    fp = anonymization_fingerprint(cfg)
    merge = (MergeAndWrite.from_config(cfg, "test-run", fp, outputs=outputs) if outputs is not None
             else MergeAndWrite.from_config(cfg, "test-run", fp))
    return merge.process(row)


def _plan_and_run(cfg, src, out, **storages):
    plan = make_plan(cfg, str(src), str(out), anonymization_fingerprint(cfg))
    return {r["rel_path"]: _stages(cfg, r, **storages) for r in plan.todo}


# -- hole 1: chained-URL syntax (and other characters) in local names -----------------------------------

def test_the_chained_url_attack_reads_and_writes_the_listed_name(tmp_path, t1_path, astronaut_path):
    """``in/z::cover.png`` is listed; ``in/z`` is a symlink to a photo outside the root. fsspec read the name
    as the chain ``in/z`` + ``cover.png``: the outside photo was processed and written to ``out/z``."""
    src, out, outside = tmp_path / "in", tmp_path / "out", tmp_path / "outside"
    src.mkdir()
    outside.mkdir()
    shutil.copy(astronaut_path, src / "z::cover.png")  # 512 x 512, one face
    shutil.copy(t1_path, outside / "t1.jpg")  # 1280 x 886, six faces
    os.symlink(outside / "t1.jpg", src / "z")
    rows = _plan_and_run(_blur(), src, out)
    assert list(rows) == ["z::cover.png"]
    row = rows["z::cover.png"][0]
    assert (row["image_width"], row["image_height"]) == (512, 512), "the file behind the symlink was read"
    assert row["output_uri"] == str(out / "z::cover.png") and (out / "z::cover.png").is_file()
    assert sorted(os.listdir(out)) == ["z::cover.png"], "the output landed at another name"
    assert Image.open(out / "z::cover.png").size == (512, 512)


NAMES = ["z::cover.png", "a|b.png", "{x}.png", "{a,b}.png", "a%20b.png", "a%2Fb.png", "back\\slash.png",
         "a[1].png", "a*b.png", "what?.png", "hash#1.png", "~tilde.png", "file:x.png", "s3:x.png"]


@pytest.mark.parametrize("name", NAMES)
def test_every_storage_call_treats_a_local_name_as_a_plain_name(tmp_path, name):
    """Write, exists, read, list and remove reach exactly the file of that name, and nothing else."""
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "z").write_bytes(b"a neighbour")  # what a chain or glob reading of the name would reach
    (folder / "a").write_bytes(b"a neighbour")
    uri = str(folder / name)
    io.write_atomic(uri, b"payload")
    assert sorted(os.listdir(folder)) == sorted(["z", "a", name])
    assert (folder / name).read_bytes() == b"payload"
    assert io.read_bytes(uri, 100) == b"payload"
    listed = io.list_inputs(str(folder), [".png"])
    assert [(f.rel_path, f.skip_reason) for f in listed] == [(name, None)]
    assert io.read_bytes(listed[0].uri, 100) == b"payload"
    io.remove(uri)
    assert sorted(os.listdir(folder)) == ["a", "z"]
    assert (folder / "z").read_bytes() == (folder / "a").read_bytes() == b"a neighbour"


# -- hole 2: characters the object store's client reads as syntax -----------------------------------------

def test_a_version_id_in_an_s3_key_cannot_delete_another_inputs_output(s3_server, t1_path, astronaut_path):
    """s3fs cuts a key at ``?versionId=``: the failing input's stale-output cleanup deleted ``out/a.jpg``."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="versions")
    s3.put_object(Bucket="versions", Key="in/a.jpg", Body=t1_path.read_bytes())
    s3.put_object(Bucket="versions", Key="in/a.jpg?versionId=1.jpg", Body=astronaut_path.read_bytes())
    cfg = _blur()
    rows = _plan_and_run(cfg, "s3://versions/in", "s3://versions/out")
    assert [r["status"] for r in rows["a.jpg"]] == ["ok"] * 6
    listed = s3.list_objects_v2(Bucket="versions", Prefix="out/").get("Contents", [])
    assert sorted(o["Key"] for o in listed) == ["out/a.jpg"], "another input's output was deleted"
    (bad,) = rows["a.jpg?versionId=1.jpg"]
    assert bad["status"] == "error" and bad["output_uri"] is None and "versionId" in bad["error"]
    # The storage calls themselves refuse such a key: nothing is read, written or deleted.
    for call in (lambda: io.remove("s3://versions/out/a.jpg?versionId=x"),
                 lambda: io.write_atomic("s3://versions/out/a.jpg?versionId=x", b"x"),
                 lambda: io.read_bytes("s3://versions/in/a.jpg?versionId=x", 10_000_000)):
        with pytest.raises(io.InputError, match="versionId"):
            call()
    assert s3.get_object(Bucket="versions", Key="out/a.jpg")["ContentLength"] > 0


def test_a_local_name_that_an_s3_output_key_would_misread_is_an_error_row():
    """A local file ``a.jpg?versionId=1.jpg`` written to S3 would land at ``out/a.jpg``, another input's key."""
    from rp_distributed.job.plan import output_keys

    keys = output_keys(["a.jpg", "a.jpg?versionId=1.jpg", "what?.jpg"], "s3://b/out", "same", "_manifest")
    assert keys["a.jpg"] == ("s3://b/out/a.jpg", None, None)
    key, error, _ = keys["a.jpg?versionId=1.jpg"]
    assert key is None and "'?versionId='" in error and "s3 client reads as syntax" in error
    assert keys["what?.jpg"] == ("s3://b/out/what?.jpg", None, None)  # a plain "?" is a character of an S3 key


# -- hole 6: symlinked folders inside the output prefix ----------------------------------------------------

def test_writes_and_deletes_never_go_through_a_symlinked_output_folder(tmp_path, astronaut_path):
    from rp_distributed.storage import Storage

    src, out, elsewhere = tmp_path / "in", tmp_path / "out", tmp_path / "elsewhere"
    (src / "sub").mkdir(parents=True)
    out.mkdir()
    elsewhere.mkdir()
    shutil.copy(astronaut_path, src / "sub" / "a.png")
    shutil.copy(astronaut_path, src / "fine.png")
    os.symlink(elsewhere, out / "sub")  # planted inside the output prefix
    (elsewhere / "old.png").write_bytes(b"not ours")
    cfg = _blur()
    plan = make_plan(cfg, str(src), str(out), anonymization_fingerprint(cfg))
    by_rel = {r["rel_path"]: r for r in plan.todo}
    outputs = Storage(str(out))
    rows = _stages(cfg, {**by_rel["sub/a.png"], "stale_output_uri": str(out / "sub" / "old.png")}, outputs=outputs)
    row = rows[0]  # one row per face, all alike here
    assert {r["status"] for r in rows} == {"error"} and row["output_uri"] is None
    assert "symlink" in row["error"] and "old.png" in row["error"]
    assert sorted(os.listdir(elsewhere)) == ["old.png"] and (elsewhere / "old.png").read_bytes() == b"not ours"
    assert _stages(cfg, by_rel["fine.png"], outputs=outputs)[0]["status"] == "ok"
    # The storage itself: no write, delete or read through the link; the link itself is no output.
    for call in (lambda: outputs.write("sub/x.png", b"x"), lambda: outputs.remove("sub/old.png"),
                 lambda: outputs.read("sub/old.png", 100)):
        with pytest.raises(io.InputError, match="symlink"):
            call()
    assert sorted(os.listdir(elsewhere)) == ["old.png"]


def test_an_output_key_that_is_a_symlink_is_replaced_not_followed(tmp_path):
    from rp_distributed.storage import Storage

    out, target = tmp_path / "out", tmp_path / "target.png"
    out.mkdir()
    target.write_bytes(b"not ours")
    os.symlink(target, out / "a.png")
    Storage(str(out)).write("a.png", b"ours")
    assert target.read_bytes() == b"not ours" and not (out / "a.png").is_symlink()
    assert (out / "a.png").read_bytes() == b"ours"
    os.symlink(target, out / "b.png")
    Storage(str(out)).remove("b.png")  # the link goes, its target stays
    assert not os.path.lexists(out / "b.png") and target.read_bytes() == b"not ours"


# -- hole 7: an input swapped for a symlink between listing and reading -------------------------------------

@pytest.mark.parametrize("swap", ["file", "folder"])
def test_an_input_swapped_for_a_symlink_after_listing_is_not_read(tmp_path, t1_path, astronaut_path, swap):
    src, out, outside = tmp_path / "in", tmp_path / "out", tmp_path / "outside"
    (src / "sub").mkdir(parents=True)
    (outside / "sub").mkdir(parents=True)
    shutil.copy(astronaut_path, src / "sub" / "a.jpg")
    shutil.copy(t1_path, outside / "sub" / "a.jpg")
    cfg = _blur()
    (row,) = make_plan(cfg, str(src), str(out), anonymization_fingerprint(cfg)).todo
    assert row["error"] is None
    if swap == "file":  # the listed file becomes a link to a photo outside the root
        (src / "sub" / "a.jpg").unlink()
        os.symlink(outside / "sub" / "a.jpg", src / "sub" / "a.jpg")
    else:  # a folder on its path becomes a link to a folder outside the root
        shutil.rmtree(src / "sub")
        os.symlink(outside / "sub", src / "sub")
    for jobs in (False, True):  # without a storage (the prefix the row spells), then the job's input storage
        storages = {"inputs": io.input_storage(str(src))} if jobs else {}
        rows = _stages(cfg, row, **storages)
        assert len(rows) == 1, f"{len(rows)} faces read from the file outside the root"
        (r,) = rows
        assert r["status"] == "error" and r["image_width"] is None and "symlink" in r["error"], storages
        assert not os.path.exists(out / "sub" / "a.jpg")


def test_a_symlink_inside_the_root_is_still_read_and_a_fifo_never_blocks(tmp_path, astronaut_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(astronaut_path, src / "real.png")
    os.symlink(src / "real.png", src / "alias.png")
    inputs = io.input_storage(str(src))
    assert inputs.read("alias.png", 10_000_000) == astronaut_path.read_bytes()
    os.mkfifo(src / "pipe.png")  # listed as not regular; swapped in later, the read must not hang
    with pytest.raises(io.InputError, match="not a regular file"):
        inputs.read("pipe.png", 100)


# -- hole 10: multi-frame images ----------------------------------------------------------------------------

def _frames(astronaut_path, fmt, **kw) -> bytes:
    import io as _io

    im = Image.open(astronaut_path).convert("RGB")
    buf = _io.BytesIO()
    im.save(buf, fmt, save_all=True, append_images=[im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,kw", [("TIFF", {}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_a_multi_frame_image_is_refused_not_cut_to_its_first_frame(astronaut_path, fmt, kw):
    data = _frames(astronaut_path, fmt, **kw)
    assert getattr(Image.open(__import__("io").BytesIO(data)), "n_frames", 1) == 2
    with pytest.raises(io.InputError, match=f"multi-frame {fmt} \\(2 frames\\)"):
        io.decode_image(data, 64_000_000)


def test_a_multi_frame_input_is_an_error_row_with_nothing_written(tmp_path, astronaut_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "pages.tif").write_bytes(_frames(astronaut_path, "TIFF"))
    (row,) = _plan_and_run(_blur(), src, out)["pages.tif"]
    assert row["status"] == "error" and "multi-frame TIFF" in row["error"] and not (out / "pages.tif").exists()


def test_an_mpo_keeps_its_primary_picture_and_says_its_previews_are_not_written(astronaut_path):
    data = _frames(astronaut_path, "MPO")
    dec = io.decode_image(data, 64_000_000)
    assert dec.format == "MPO" and dec.rgb.shape == (512, 512, 3)
    assert any("MPO" in n and "1 further frame" in n for n in dec.notes), dec.notes
    written = Image.open(__import__("io").BytesIO(io.encode_image(dec.rgb, None, "a.jpg", 95)))
    assert written.format == "JPEG" and getattr(written, "n_frames", 1) == 1


# -- hole 12: side-table rows for images not in the input ----------------------------------------------------

def test_rows_for_paths_not_in_the_input_are_written_once_across_resumes(tmp_path, t1_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    shutil.copy(t1_path, src / "t1.jpg")
    table = tmp_path / "ann.csv"
    table.write_text("path,x0,y0,x1,y1\nt1.jpg,1,1,50,50\ngone.jpg,1,1,20,20\n")
    cfg = _blur("input.mode=annotations", f"input.annotations={table}")
    fp = anonymization_fingerprint(cfg)

    def record(plan, run_id):  # what run_job writes for the plan's orphans
        rows = [annotations.orphan_row(o, str(src), run_id, fp) for o in plan.orphans]
        if rows:
            manifest_writer.write_part(str(out), "_manifest", run_id, 0, rows)
        return len(rows)

    assert record(make_plan(cfg, str(src), str(out), fp), "20250101T000000-aaaaaa") == 1
    assert record(make_plan(cfg, str(src), str(out), fp), "20250101T000001-bbbbbb") == 0, "recorded again"
    table.write_text("path,x0,y0,x1,y1\nt1.jpg,1,1,50,50\nt1.jpg,2,2,40,40\ngone.jpg,1,1,20,20\n")
    assert record(make_plan(cfg, str(src), str(out), fp), "20250101T000002-cccccc") == 1  # new facts: row 2
    over = _blur("input.mode=annotations", f"input.annotations={table}", "output.overwrite=true")
    assert len(make_plan(over, str(src), str(out), fp).orphans) == 1  # the new run's manifest holds them too


# -- hole 9: --overwrite keeps the manifest until its run completes -------------------------------------------

def test_an_overwrite_plan_deletes_no_manifest_part(tmp_path, t1_path):
    cfg = _blur()
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    shutil.copy(t1_path, src / "t1.jpg")
    (row,) = make_plan(cfg, str(src), str(out), anonymization_fingerprint(cfg)).todo
    manifest_writer.write_part(str(out), "_manifest", "20250101T000000-aaaaaa", 0, _stages(cfg, row))
    parts = manifest.part_uris(str(out), "_manifest")
    over = _blur("output.overwrite=true")
    plan = make_plan(over, str(src), str(out), anonymization_fingerprint(over))
    assert plan.num_todo == 1 and manifest.part_uris(str(out), "_manifest") == parts
    assert manifest.latest_outcomes(str(out), "_manifest")["status"].to_pylist() == ["ok"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_input_folder_without_images_plans_nothing(tmp_path, overwrite):
    """An empty input (or one with no image) is a plan with nothing to do, not a crash in the resume columns."""
    cfg = _blur(f"output.overwrite={str(overwrite).lower()}")
    src = tmp_path / "in"
    src.mkdir()
    (src / "notes.txt").write_text("no image here")
    plan = make_plan(cfg, str(src), str(tmp_path / "out"), anonymization_fingerprint(cfg))
    assert (plan.num_todo, plan.skipped, plan.unrecorded, plan.refused) == (0, 0, 0, 0)


# -- two runs into one output prefix: the lease ------------------------------------------------------------

def _lease_file(out, run_id, age_s, **who):
    d = out / "_manifest"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"lease-{run_id}.json").write_text(json.dumps({"run_id": run_id, "host": "elsewhere", "pid": 1, **who,
                                                        "started_at": time.time() - age_s,
                                                        "heartbeat_at": time.time() - age_s}))


def test_a_second_run_into_a_leased_output_prefix_is_refused(tmp_path, capsys):
    from rp_distributed.cli import main
    from rp_distributed.job.lease import LeaseHeld
    from rp_distributed.job.run import run_job

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _lease_file(out, "20250101T000000-aaaaaa", age_s=5)
    with pytest.raises(LeaseHeld, match="20250101T000000-aaaaaa.*elsewhere"):
        run_job(_blur(), str(src), str(out), progress=False)
    assert sorted(os.listdir(out / "_manifest")) == ["lease-20250101T000000-aaaaaa.json"]
    assert main(["run", str(src), str(out), "--no-progress"]) == 2  # one line, no traceback
    assert "is being written by run 20250101T000000-aaaaaa on elsewhere" in capsys.readouterr().err


def test_a_stale_lease_does_not_block_and_a_live_one_beats_and_notices_its_loss(tmp_path):
    from rp_distributed.job.lease import Lease, LeaseHeld, LeaseLost
    from rp_distributed.storage import Storage

    out = tmp_path / "out"
    _lease_file(out, "20250101T000000-aaaaaa", age_s=10_000)  # a killed driver's
    storage = Storage(str(out))
    first = Lease(storage, "_manifest", "20250101T000001-bbbbbb", heartbeat_s=0.1, ttl_s=2.0)
    first.acquire()
    assert sorted(os.listdir(out / "_manifest")) == ["lease-20250101T000001-bbbbbb.json"]
    second = Lease(storage, "_manifest", "20250101T000002-cccccc", heartbeat_s=0.1, ttl_s=2.0)
    with pytest.raises(LeaseHeld, match="20250101T000001-bbbbbb"):
        second.acquire()
    assert sorted(os.listdir(out / "_manifest")) == ["lease-20250101T000001-bbbbbb.json"]
    path = out / "_manifest" / "lease-20250101T000001-bbbbbb.json"
    beat = json.loads(path.read_text())["heartbeat_at"]
    time.sleep(0.5)
    assert json.loads(path.read_text())["heartbeat_at"] > beat  # the heartbeat keeps it fresh
    first.check()
    # Taken over (this driver was frozen past the TTL): its lease deleted, a younger run's written.
    path.unlink()
    _lease_file(out, "20250101T000003-dddddd", age_s=0)
    time.sleep(0.5)
    with pytest.raises(LeaseLost, match="20250101T000001-bbbbbb lost its lease"):
        first.check()
    first.release()
    assert sorted(os.listdir(out / "_manifest")) == ["lease-20250101T000003-dddddd.json"]


def test_a_fresh_lease_of_a_driver_gone_from_this_machine_does_not_block(tmp_path):
    """A driver killed a moment ago (SIGKILL, OOM) on this machine: the rerun need not wait out the TTL."""
    import socket
    import subprocess

    from rp_distributed.job.lease import Lease, LeaseHeld
    from rp_distributed.storage import Storage

    out = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = {"host": socket.gethostname(), "pid_ns": os.readlink("/proc/self/ns/pid")}
    _lease_file(out, "20250101T000000-aaaaaa", age_s=1, pid=dead.pid, **here)
    lease = Lease(Storage(str(out)), "_manifest", "20250101T000001-bbbbbb").acquire()
    assert lease.removed_stale == ["20250101T000000-aaaaaa"]
    lease.release()
    _lease_file(out, "20250101T000002-cccccc", age_s=1, pid=os.getpid(), **here)  # alive: it blocks
    with pytest.raises(LeaseHeld):
        Lease(Storage(str(out)), "_manifest", "20250101T000003-dddddd").acquire()


# -- the attacks through the real job on Ray -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_job_on_ray_reads_and_writes_names_as_data_and_never_through_links(ray_session, tmp_path, t1_path,
                                                                         astronaut_path):
    from rp_distributed.job.run import run_job

    src, out, outside, elsewhere = (tmp_path / n for n in ("in", "out", "outside", "elsewhere"))
    (src / "sub").mkdir(parents=True)
    outside.mkdir()
    (out / "_manifest").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copy(astronaut_path, src / "z::cover.png")
    shutil.copy(t1_path, outside / "t1.jpg")
    os.symlink(outside / "t1.jpg", src / "z")
    shutil.copy(astronaut_path, src / "sub" / "a.png")
    os.symlink(elsewhere, out / "sub")
    result = run_job(_blur(), str(src), str(out), progress=False, report=False)
    rows = {r["rel_path"]: r for r in manifest.read_manifest(str(out), "_manifest").to_pylist()}
    assert rows["z::cover.png"]["status"] == "ok" and rows["z::cover.png"]["image_width"] == 512
    assert Image.open(out / "z::cover.png").size == (512, 512) and not os.path.lexists(out / "z")
    assert rows["sub/a.png"]["status"] == "error" and "symlink" in rows["sub/a.png"]["error"]
    assert os.listdir(elsewhere) == []
    assert result.summary["by_status"] == {"ok": 1, "no_face": 0, "withheld": 0, "error": 1}
    assert not [n for n in os.listdir(out / "_manifest") if n.startswith("lease-")], "the lease was released"


# --overwrite through Ray (the old manifest retired only when the new run completes): tests/test_pipeline.py's
# local job, on its own export.
