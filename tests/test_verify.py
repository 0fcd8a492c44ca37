"""The release gate (``rp-anonymize verify``) and the content hashes it rests on.

One real export (blur, one CenterFace pass, through Ray) of insightface's t1.jpg, scikit-image's astronaut and
camera is made once per module; each test copies it and plants one failure, and verify must name it by key. A
clean export passes (on moto S3: tests/test_pipeline.py). The plan's replaced-input rule and the metadata read-back are checked
without Ray."""

from __future__ import annotations

import hashlib
import io as _io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rp_distributed import cli, manifest
from rp_distributed.config import anonymization_fingerprint, load_config
from rp_distributed.verify import AuditFaces, Kind, Verdict, check_record, verify
from rp_distributed.verify.metadata import metadata_found
from tests.conftest import (
    FAST_DETECTION,
    insightface_image,
    skimage_image,
)
from tests.test_metadata import _with_metadata


def _cfg(*extra):
    return load_config(None, [*FAST_DETECTION, "anonymizer.method=blur", "output.format=png", *extra])


def _inputs(folder: Path) -> Path:
    (folder / "people").mkdir(parents=True)
    shutil.copy(insightface_image("t1.jpg"), folder / "people" / "t1.jpg")
    shutil.copy(skimage_image("astronaut.png"), folder / "astronaut.png")
    shutil.copy(skimage_image("camera.png"), folder / "camera.png")
    return folder


def _keys(outcome, kind: Kind) -> set[str]:
    return {f.key for f in outcome.facts.findings.kept if f.kind is kind}


# -- metadata read back (no Ray) --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_metadata_is_read_back_from_the_bytes(fmt):
    photo = Image.fromarray(np.asarray(Image.open(skimage_image("astronaut.png")).convert("RGB")))  # pixels only
    clean = _io.BytesIO()
    photo.save(clean, fmt)
    assert metadata_found(clean.getvalue()) == []
    found = metadata_found(_with_metadata(photo, fmt))
    expect = {"JPEG": {"EXIF", "XMP", "ICC profile", "IPTC (Photoshop)", "COM (comment)"},
              "PNG": {"tEXt (text)", "zTXt (compressed text)", "iTXt (international text, XMP)", "eXIf (EXIF)",
                      "iCCP (ICC profile)"},
              "WEBP": {"EXIF", "XMP", "ICC profile"},
              "TIFF": {"TIFF tag ImageDescription", "TIFF tag XMP", "TIFF tag IPTC", "TIFF tag ICC profile",
                       "TIFF tag Make", "TIFF tag GPS IFD"}}[fmt]
    assert expect <= set(found), found


def test_metadata_finds_a_jfif_thumbnail():
    photo = Image.open(skimage_image("camera.png")).convert("RGB")
    buf = _io.BytesIO()
    photo.save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    assert data[2:4] == b"\xff\xe0" and data[6:11] == b"JFIF\x00"
    data[18:20] = b"\x01\x01"  # Xthumbnail, Ythumbnail: a 1x1 thumbnail declared
    assert "JFIF thumbnail" in metadata_found(bytes(data))


# -- the gate on a real export (Ray) ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def export(ray_session, tmp_path_factory):
    from rp_distributed.job.run import run_job

    base = tmp_path_factory.mktemp("export")
    src = _inputs(base / "in")
    result = run_job(_cfg(), str(src), str(base / "out"), progress=False)
    assert result.summary["by_status"]["ok"] == 3, result.summary  # camera.png: the cameraman
    return base


@pytest.fixture
def out(export, tmp_path) -> Path:
    """A copy of the export (its manifest names the original prefix: verify maps keys through the run's config)."""
    shutil.copytree(export / "out", tmp_path / "out")
    return tmp_path / "out"


def _records(out: Path) -> list[Path]:
    return sorted((out / "_manifest").glob("verify-*.json"))


@pytest.mark.slow
def test_the_manifest_records_the_hashes_of_what_was_read_and_written(export):
    rows = manifest.read_manifest(str(export / "out"), "_manifest").to_pylist()
    for r in rows:
        src = export / "in" / r["rel_path"]
        assert r["input_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert r["input_size"] == src.stat().st_size and r["input_version"].startswith("mtime_ns:")
        written = Path(r["output_uri"]).read_bytes()
        assert r["output_sha256"] == hashlib.sha256(written).hexdigest()


@pytest.mark.slow
def test_a_clean_export_passes_and_writes_a_record(out, capsys):
    assert cli.main(["verify", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("SAFE: 3 outputs match")
    assert _records(out) == []  # --dry-run writes nothing
    assert cli.main(["verify", str(out)]) == 0
    (rec,) = _records(out)
    record = json.loads(rec.read_text())
    assert record["verdict"] == "safe" and record["counts"]["outputs_read"] == 3 and record["counts"]["faces"] >= 7
    (part,) = record["manifest_parts"]
    assert part["sha256"] == hashlib.sha256((out / part["key"]).read_bytes()).hexdigest()
    assert record["settings_fingerprints"] == [anonymization_fingerprint(_cfg())]
    assert cli.main(["verify", str(out), "--dry-run"]) == 0  # the record itself is no finding


@pytest.mark.slow
def test_each_planted_file_is_named(out, capsys):
    shutil.copy(insightface_image("t1.jpg"), out / "people" / "t1.jpg")  # an original copied in by hand
    (out / "astronaut.png.tmp-" f"{'0' * 32}").write_bytes(b"partial")  # a write cut short
    (out / ".cache").mkdir()
    shutil.copy(skimage_image("astronaut.png"), out / ".cache" / "a.png")  # a hidden folder is listed too
    (out.parent / "elsewhere").mkdir()
    os.symlink(out.parent / "elsewhere", out / "linked")  # a symlinked folder (could hold anything)
    outcome = verify(str(out), dry_run=True)
    assert outcome.verdict is Verdict.UNSAFE
    assert _keys(outcome, Kind.EXTRA) == {"people/t1.jpg", "astronaut.png.tmp-" + "0" * 32, ".cache/a.png", "linked"}
    assert cli.main(["verify", str(out), "--dry-run"]) == 1
    text = capsys.readouterr().out
    assert text.startswith("UNSAFE: not safe to share: 4 extra") and "people/t1.jpg" in text


@pytest.mark.slow
def test_altered_missing_and_metadata_outputs_are_named(out):
    im = Image.open(out / "astronaut.png")
    pixels = im.load()
    pixels[0, 0] = (0, 0, 0)
    im.save(out / "astronaut.png")  # altered after the run
    photo = Image.open(out / "camera.png")
    exif = Image.Exif()
    exif[0x010F] = "a camera maker"
    photo.save(out / "camera.png", exif=exif)  # EXIF added back
    (out / "people" / "t1.png").unlink()
    outcome = verify(str(out), dry_run=True)
    assert _keys(outcome, Kind.ALTERED) == {"astronaut.png", "camera.png"}
    assert _keys(outcome, Kind.METADATA) == {"camera.png"}
    assert _keys(outcome, Kind.MISSING) == {"people/t1.png"}
    assert outcome.verdict is Verdict.UNSAFE


@pytest.mark.slow
def test_a_report_with_originals_is_named(out):
    from rp_distributed.report import write_report

    write_report(str(out), include_originals=False)
    assert verify(str(out), dry_run=True).verdict is Verdict.SAFE
    write_report(str(out), include_originals=True)
    outcome = verify(str(out), dry_run=True)
    assert _keys(outcome, Kind.ORIGINALS) == {"_manifest/report.html"}
    shutil.copy(insightface_image("t1.jpg"), out / "_manifest" / "notes.dat")  # an image, whatever its name
    assert _keys(verify(str(out), dry_run=True), Kind.ORIGINALS) == {"_manifest/report.html", "_manifest/notes.dat"}


def _rewrite_part(out: Path, change) -> None:
    (part,) = (out / "_manifest").glob("part-*.parquet")
    pq.write_table(change(pq.read_table(part)), part)


@pytest.mark.slow
def test_rows_that_export_an_identity_or_leave_a_face_are_named(out):
    def leak(table):
        first = pc.equal(table["face_index"], 0)
        exported = pc.if_else(pc.and_(first, pc.equal(table["rel_path"], "astronaut.png")), True,
                              table["identity_exported"])
        applied = pc.if_else(pc.and_(first, pc.equal(table["rel_path"], "people/t1.jpg")), None,
                             table["method_applied"])
        table = table.set_column(table.schema.get_field_index("identity_exported"), "identity_exported", exported)
        return table.set_column(table.schema.get_field_index("method_applied"), "method_applied", applied)

    _rewrite_part(out, leak)
    outcome = verify(str(out), dry_run=True)
    assert {f.key.rsplit("/", 1)[-1] for f in outcome.facts.findings.kept if f.kind is Kind.IDENTITY_EXPORTED} == {
        "astronaut.png"}
    assert {f.key.rsplit("/", 1)[-1] for f in outcome.facts.findings.kept
            if f.kind is Kind.FACE_NOT_ANONYMIZED} == {"t1.png"}


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["no_manifest", "other_tool", "partial", "live_lease", "unreadable"])
def test_bad_input_is_a_one_line_verdict(out, capsys, damage):
    (part,) = (out / "_manifest").glob("part-*.parquet")
    if damage == "no_manifest":
        shutil.rmtree(out / "_manifest")
    elif damage == "other_tool":
        pq.write_table(pq.read_table(part).select(["input_uri", "status"]), part)
    elif damage == "partial":
        part.write_bytes(part.read_bytes()[:-100])
    elif damage == "live_lease":
        (out / "_manifest" / "lease-20990101T000000-bbbbbb.json").write_text(json.dumps(
            {"run_id": "20990101T000000-bbbbbb", "host": "elsewhere", "pid": 1, "heartbeat_at": time.time()}))
    else:  # an output that cannot be read: a link out of the export
        (out / "camera.png").unlink()
        os.symlink("/etc/hostname", out / "camera.png")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert cli.main(["verify", str(out)]) == 2
    text = capsys.readouterr()
    assert text.out.startswith("CANNOT_VERIFY: ") and "Traceback" not in text.out + text.err
    want = {"no_manifest": "no manifest", "other_tool": "not an rp-anonymize manifest", "partial": "partial or "
            "damaged", "live_lease": "still writing", "unreadable": "could not be read (e.g. camera.png"}[damage]
    assert want in text.out.splitlines()[0]
    after = sorted(p.relative_to(out) for p in out.rglob("*") if not p.name.startswith("verify-"))
    assert after == before  # nothing modified (a record, where one could be written, aside)
    if damage == "live_lease":
        assert _records(out) == []


@pytest.mark.slow
def test_a_signed_record_is_checked_against_the_export(out, tmp_path, capsys):
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    assert cli.main(["verify", str(out), "--sign-key", str(key)]) == 0
    (rec,) = _records(out)
    assert json.loads(rec.read_text())["signature"]["alg"] == "hmac-sha256"
    assert cli.main(["verify", str(out), "--check-record", str(rec), "--sign-key", str(key)]) == 0
    matches, problems, _ = check_record(str(out), str(rec), sign_key=None)
    assert not matches and "no --sign-key" in problems[0]
    other = tmp_path / "other"
    other.write_bytes(os.urandom(32))
    assert not check_record(str(out), str(rec), sign_key=other.read_bytes())[0]
    # An altered record fails its signature; an altered export no longer matches the record.
    forged = json.loads(rec.read_text())
    forged["counts"]["faces"] += 1
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    matches, problems, _ = check_record(str(out), str(tmp_path / "forged.json"), sign_key=key.read_bytes())
    assert not matches and any("signature does not match" in p for p in problems)
    shutil.copy(insightface_image("t1.jpg"), out / "extra.jpg")
    capsys.readouterr()
    assert cli.main(["verify", str(out), "--check-record", str(rec), "--sign-key", str(key)]) == 1
    assert "RECORD DOES NOT MATCH" in capsys.readouterr().out


# A replaced input redone on a rerun through Ray, and verify on S3 (ETags as versions, the record on the bucket):
# tests/test_pipeline.py's two jobs, which run those steps on their own exports.


@pytest.mark.slow
def test_audit_faces_names_a_face_pasted_into_an_output(out):
    clean = verify(str(out), dry_run=True, audit=AuditFaces(start_ray=False))
    assert clean.verdict is Verdict.SAFE, clean.text()  # the blurred faces are inside their recorded boxes
    assert clean.facts.counts["outputs_audited"] == 3
    face = Image.open(insightface_image("Tom_Hanks_54745.png")).convert("RGB").resize((160, 160))
    im = Image.open(out / "camera.png").convert("RGB")
    im.paste(face, (im.width - 170, 10))  # a face the pipeline never saw, in a corner of a written output
    im.save(out / "camera.png")
    outcome = verify(str(out), dry_run=True, audit=AuditFaces(start_ray=False))
    assert _keys(outcome, Kind.MISSED_FACE) == {"camera.png"}, outcome.text()
    assert _keys(outcome, Kind.ALTERED) == {"camera.png"}
