"""Pseudonyms (ALGORITHM.md, "Pseudonyms"): the subject table joined into the plan, the key's derivations, the third
guidance branch of reverse personalization (tiny model) and its cost, and pseudonym_id in the manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from rp_distributed import annotations, manifest, pseudonyms
from rp_distributed.anonymizer import Anonymizer
from rp_distributed.config import load_config
from rp_distributed.diffusion import ReversePersonalizer
from rp_distributed.diffusion.conditioning import Conditioning
from rp_distributed.faces import annotated
from rp_distributed.records import ImageRow
from rp_distributed.stages.detect import DetectFaces
from tests.test_anonymize import STEPS as STAGE_STEPS
from tests.test_anonymize import _fresh, _rp_cfg
from tests.test_diffusion import SIZE, _cfg, rel

KEY = b"test-pseudonym-key-0123456789"
STEPS = 4  # the branches' algebra and batching need few steps: tests/test_diffusion.py runs the solver at 10


@pytest.fixture(scope="module")
def rp(tiny_dir, tmp_path_factory) -> ReversePersonalizer:
    tiny = {"model": tiny_dir / "sdxl", "ip_adapter": tiny_dir / "ip-adapter", "arcface": tiny_dir / "arcface" / "w600k_r50.onnx"}
    return ReversePersonalizer.from_config(_cfg(tiny, tmp_path_factory.mktemp("cache"), num_inversion_steps=STEPS))


@pytest.fixture(scope="module")
def crops(t1_faces) -> list[np.ndarray]:
    """Three real aligned faces of t1.jpg, at the diffusion tests' crop size."""
    from tests.test_diffusion import _resize

    return [_resize(f.crop, SIZE) for f in t1_faces[:3]]


@pytest.fixture(scope="module")
def t1_faces(tiny_dir, t1_path):
    row = DetectFaces.from_config(_rp_cfg(tiny_dir)).process(
        ImageRow.of({"input_uri": str(t1_path), "rel_path": "t1.jpg", "output_uri": "x"}))
    assert len(row.payload.faces) == 6
    return row.payload.faces


def _ids(faces) -> np.ndarray:
    return np.stack([f.id_embedding for f in faces]).astype(np.float32)


A, B = pseudonyms.subject_digest(KEY, "patient-0001"), pseudonyms.subject_digest(KEY, "patient-0002")


# --------------------------------------------------------------------------- the key's derivations

def test_subject_digest_and_embedding_are_fixed_functions_of_key_and_subject():
    assert A == hmac.new(KEY, b"patient-0001", hashlib.sha256).hexdigest()
    assert pseudonyms.pseudonym_id(A) == A[:16] and pseudonyms.pseudonym_id(None) is None
    p = pseudonyms.embedding(A)
    assert p.shape == (512,) and p.dtype == np.float32 and abs(np.linalg.norm(p) - 1) < 1e-6
    assert np.array_equal(p, pseudonyms.embedding(A))
    # Pinned: a changed stream would give every subject another person on a rerun (resume mixes both).
    np.testing.assert_allclose(p[:3], PINNED, atol=1e-7)
    # A standard Gaussian direction: uncorrelated with another subject's, about N(0, 1/512) per coordinate.
    q = pseudonyms.embedding(B)
    assert abs(float(p @ q)) < 0.2 and 0.8 < float(np.std(p) * np.sqrt(512)) < 1.2
    assert pseudonyms.subject_digest(KEY + b"x", "patient-0001") != A


PINNED = [0.018337201327085495, 0.0069374339655041695, 0.020932767540216446]  # embedding(A)[:3], first computed


def test_the_embedding_is_the_same_in_another_process():
    """Another actor, node or rerun computes the same p: nothing in it depends on the process (hash seeds, RNG)."""
    code = ("import sys; from rp_distributed.pseudonyms import embedding; "
            f"sys.stdout.write(embedding('{A}').tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", **__import__("os").environ}).stdout
    assert bytes.fromhex(out) == pseudonyms.embedding(A).tobytes()


# --------------------------------------------------------------------------- the third branch

def test_h_zero_is_the_plain_method(rp, crops, t1_faces):
    """h = 0: exactly the plain method (the faces run as without pseudonyms); h -> 0 through the three-branch calls:
    the plain method to rounding; h > 0: another face, pulled by p (another p, another face)."""
    inv, ids = rp.invert(crops[:2], [0, 1]), _ids(t1_faces[:2])
    ps = np.stack([pseudonyms.embedding(d) for d in (A, B)])
    plain_img, plain = rp.generate(inv, ids, [None, "an old man"], return_latents=True)
    zero_img, zero = rp.generate(inv, ids, [None, "an old man"], return_latents=True, pseudonyms=ps,
                                 pseudonym_scales=[0.0] * 2)
    assert torch.equal(zero, plain) and all(np.array_equal(a, b) for a, b in zip(zero_img, plain_img))
    # one call: faces 0, 1 at h -> 0 and at h = 3 with their own p, face 0 at h = 3 with face 1's p
    _, var = rp.generate(inv.select([0, 1, 0, 1, 0]), ids[[0, 1, 0, 1, 0]], [None, "an old man", None, "an old man", None],
                         return_latents=True, pseudonyms=ps[[0, 1, 0, 1, 1]], pseudonym_scales=[1e-7] * 2 + [3.0] * 3)
    assert rel(var[:2], plain[:2]) < 1e-3  # the batch-composition tolerance (tests/test_diffusion.py)
    assert rel(var[2], plain[0]) > 1e-2 and rel(var[3], plain[1]) > 1e-2  # h pulls
    assert rel(var[4], var[2]) > 1e-2  # another p, another face


def test_three_branch_call_is_the_contract_formula(rp, t1_faces):
    """One UNet call: eps_neg + g (eps_pos - eps_neg) + h (eps_pseu - eps_neg), the pseudonym branch being the
    negative branch's text with identity p (its difference to the negative branch is the identity alone)."""
    x = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 150)
    ids = torch.from_numpy(_ids(t1_faces[:2]))
    ps = torch.from_numpy(np.stack([pseudonyms.embedding(A), pseudonyms.embedding(B)]))
    g, h = torch.tensor([-10.0, -12.0]).view(2, 1, 1, 1), torch.tensor([2.0, 5.0]).view(2, 1, 1, 1)
    prompts = ["an old man", None]
    cond = rp.build_conditioning(prompts, ids, (SIZE, SIZE), ps)
    assert cond.branches == 3 and cond.ids.shape[0] == 6
    assert torch.equal(cond.text[4:], cond.text[:2]) and torch.equal(cond.pooled[4:], cond.pooled[:2])
    three = rp.guided.eps(x, t, cond, g, h)
    two = rp.build_conditioning(prompts, ids, (SIZE, SIZE))
    neg, pos = rp.guided.raw(x, t, two).chunk(2)
    # built apart: the negative branch's rows (the prompt's text, or zeros) with p as their identity
    alone = Conditioning(text=two.text[:2], pooled=two.pooled[:2], ids=ps.view(2, 1, 1, 512),
                         time_ids=two.time_ids[:2], branches=1)
    pseu = rp.guided.raw(x, t, alone)
    expect = neg + g * (pos - neg) + h * (pseu - neg)
    assert rel(pseu, neg) > 1e-3  # the identity changes the branch
    assert rel(three, expect) < 3e-5


def test_a_batch_mixing_subjects_equals_faces_one_by_one(rp, crops, t1_faces):
    seeds, prompts, ids = [0, 11, 22], [None, "an old man", None], _ids(t1_faces[:3])
    digests = [A, None, B]
    ps, _ = pseudonyms.embeddings(digests)
    hs = [4.0, 0.0, 4.0]
    inv = rp.invert(crops, seeds)
    imgs, lats = rp.generate(inv, ids, prompts, return_latents=True, pseudonyms=ps, pseudonym_scales=hs)
    for i in range(3):
        img1, lat1 = rp.generate(rp.invert([crops[i]], [seeds[i]]), ids[i:i + 1], prompts[i:i + 1], return_latents=True,
                                 pseudonyms=ps[i:i + 1], pseudonym_scales=hs[i:i + 1])
        assert rel(lat1, lats[i:i + 1]) < 1e-3
        assert np.abs(img1[0].astype(int) - imgs[i].astype(int)).max() <= 1


def test_calls_carry_two_thirds_as_many_samples_with_three_branches(rp, crops, t1_faces):
    """A three-branch call holds as many UNet rows as the two-branch batch (the memory probe's measure); the faces
    without a subject run two-branch calls of their own; a compiled (padded) call pads to that capacity."""
    inv, ids = rp.invert(crops, [0, 1, 2]), _ids(t1_faces[:3])
    ps, _ = pseudonyms.embeddings([A, B, None])
    rows = []
    hook = rp.unet.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    old = rp.guided.batch_size
    try:
        rp.guided.batch_size = 3  # 6 rows a call: 3 two-branch samples or 2 three-branch samples
        rp.generate(inv, ids, [None] * 3, pseudonyms=ps, pseudonym_scales=[2.0, 2.0, 0.0])
        assert rows == [2] * STEPS + [6] * STEPS  # the face without a subject (2 x 1), the subjects' (3 x 2)
        rows.clear()
        rp.guided.compiled = True  # padding only (the module is not compiled): every call has the same rows
        _, padded = rp.generate(inv, ids, [None] * 3, pseudonyms=ps, pseudonym_scales=[2.0, 2.0, 0.0], return_latents=True)
        assert set(rows) == {6}
    finally:
        rp.guided.batch_size, rp.guided.compiled = old, False
        hook.remove()
    _, unpadded = rp.generate(inv, ids, [None] * 3, pseudonyms=ps, pseudonym_scales=[2.0, 2.0, 0.0], return_latents=True)
    assert rel(padded, unpadded) < 1e-3
    assert rp.unet_evals_per_face(tries=2, pseudonym=True) == 5 * STEPS * 2


def test_generate_refuses_bad_pseudonym_inputs(rp, crops, t1_faces):
    inv, ids = rp.invert(crops[:1], [0]), _ids(t1_faces[:1])
    with pytest.raises(ValueError, match="pseudonym scales"):
        rp.generate(inv, ids, pseudonyms=ids, pseudonym_scales=[-1.0])
    with pytest.raises(ValueError, match="generation needs pseudonyms"):
        rp.generate(inv, ids, pseudonym_scales=[1.0])
    with pytest.raises(ValueError, match="non-finite"):
        rp.generate(inv, ids, pseudonyms=np.full((1, 512), np.nan, np.float32), pseudonym_scales=[1.0])


# --------------------------------------------------------------------------- the anonymizer stage

def test_the_stage_gives_a_subjects_faces_their_pseudonym_in_any_batch(tiny_dir, t1_faces):
    """Faces of two subjects and one without share the stage's calls; each equals its run alone (another batch,
    another actor: p comes from the digest only); the face without a subject is the plain method's face."""
    cfg = _rp_cfg(tiny_dir, "privacy.escalate=false", "pseudonyms.scale=4.0", "pseudonyms.table=/t.parquet")
    anonymizer = Anonymizer.from_config(cfg)
    together = _fresh(t1_faces, 3)
    for f, d in zip(together, [A, None, B]):
        f.pseudonym = d
    anonymizer(together)
    for f in together:
        alone = dataclasses.replace(f, anon_crop=None, tries=None, unet_evals=None)
        anonymizer([alone])
        assert np.abs(alone.anon_crop.astype(int) - f.anon_crop.astype(int)).max() <= 1
    assert [f.unet_evals for f in together] == [5 * STAGE_STEPS, 4 * STAGE_STEPS, 5 * STAGE_STEPS]
    plain = _fresh(t1_faces, 3)
    Anonymizer.from_config(_rp_cfg(tiny_dir, "privacy.escalate=false"))(plain)
    # no subject: today's face (it ran in a two-branch call of its own here, with two others there: batch rounding)
    assert np.abs(plain[1].anon_crop.astype(int) - together[1].anon_crop.astype(int)).max() <= 1
    assert np.abs(plain[0].anon_crop.astype(int) - together[0].anon_crop.astype(int)).mean() > 2  # h pulls
    assert '"pseudonym_scale": 4.0' in together[0].params


def test_h_zero_in_the_stage_is_the_plain_method(tiny_dir, t1_faces):
    plain, linked = _fresh(t1_faces, 2), _fresh(t1_faces, 2)
    for f in linked:
        f.pseudonym = A
    Anonymizer.from_config(_rp_cfg(tiny_dir, "privacy.escalate=false"))(plain)
    Anonymizer.from_config(_rp_cfg(tiny_dir, "privacy.escalate=false", "pseudonyms.table=/t.parquet"))(linked)
    for p, q in zip(plain, linked):
        assert np.array_equal(p.anon_crop, q.anon_crop) and p.unet_evals == q.unet_evals == 4 * STAGE_STEPS


def test_escalation_keeps_h_and_counts_five_n_per_try(tiny_dir, t1_faces):
    """A threshold no face passes: every rung runs, each with the pseudonym branch; the UNet rows the stage ran
    are exactly the faces' unet_evals (5 N per try with a subject, 4 N without)."""
    cfg = _rp_cfg(tiny_dir, "privacy.reid_threshold=5.0", "privacy.guidance_ladder=[-14.0, -18.0]",
                  "privacy.max_tries=3", "pseudonyms.scale=2.0", "pseudonyms.table=/t.parquet")
    anonymizer = Anonymizer.from_config(cfg)
    faces = _fresh(t1_faces, 3)
    faces[0].pseudonym, faces[2].pseudonym = A, A
    rows = []
    unet = anonymizer.method.rp.unet
    hook = unet.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    try:
        anonymizer(faces)
    finally:
        hook.remove()
    assert [len(f.tries) for f in faces] == [3, 3, 3]
    assert [f.unet_evals for f in faces] == [5 * STAGE_STEPS * 3, 4 * STAGE_STEPS * 3, 5 * STAGE_STEPS * 3]
    assert sum(rows) == sum(f.unet_evals for f in faces)


# --------------------------------------------------------------------------- the subject table

def _listing(*rel_paths: str) -> pa.Table:
    return pa.table({"input_uri": [f"/in/{p}" for p in rel_paths], "rel_path": list(rel_paths)})


def test_a_subject_table_is_joined_and_its_bad_rows_reported_row_by_row(tmp_path, monkeypatch, t1_faces, tiny_dir,
                                                                       t1_path):
    box = [f"{v:.1f}" for v in t1_faces[1].box]
    far = ["1.0", "1.0", "9.0", "9.0"]
    lines = ["path,face_index,x0,y0,x1,y1,subject",
             "t1.jpg,0,,,,,alice",                 # 0: face 0
             f"t1.jpg,,{','.join(box)},bob",      # 1: face 1 by its box
             "t1.jpg,x,,,,,carol",                 # 2: not a face number
             "t1.jpg,9,,,,,dave",                  # 3: names no face
             f"t1.jpg,,{','.join(far)},erin",      # 4: overlaps no face
             "t1.jpg,2,,,,,",                      # 5: no subject
             "missing.jpg,0,,,,,frank",            # 6: not in the input
             "t1.jpg,3,,,,,alice"]                 # 7: face 3, alice again
    (tmp_path / "subjects.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("RP_PSEUDONYM_KEY", KEY.decode())
    cfg = _rp_cfg(tiny_dir, f"pseudonyms.table={tmp_path / 'subjects.csv'}", "anonymizer.method=blur")
    plan, orphans = annotations.attach(cfg, _listing("t1.jpg", "other.jpg"))
    assert orphans == [{"path": "missing.jpg", "table": str(tmp_path / "subjects.csv"), "rows": [6]}]
    cells = plan["subjects"].to_pylist()
    assert cells[1] is None and len(cells[0]) == 7
    text = str(cells)
    assert not any(name in text for name in ("alice", "bob", "carol", "erin")), "a subject left the driver"
    row = DetectFaces.from_config(cfg).process(ImageRow.of({"input_uri": str(t1_path), "rel_path": "t1.jpg",
                                                            "output_uri": "x", "subjects": cells[0]}))
    faces = row.payload.faces
    alice, bob = (pseudonyms.subject_digest(KEY, s) for s in ("alice", "bob"))
    assert [f.pseudonym for f in faces] == [alice, bob, None, alice, None, None]
    notes = row.notes.split("; ")
    assert "subjects row 2: face_index='x' is not a face number (0, 1, ...): ignored" in notes
    assert any(n.startswith("subjects row 3: face_index 9 names no face") for n in notes)
    assert any(n.startswith("subjects row 4: box [1, 1, 9, 9] overlaps no face") for n in notes)
    assert "subjects row 5: subject is empty: ignored" in notes
    assert not any("row 0" in n or "row 1" in n or "row 7" in n for n in notes)
    # the manifest's face rows: pseudonym_id, never the subject; with a destructive method too
    image = manifest.image_row("r", "fp", str(t1_path), "t1.jpg", "ok", output_uri="o")
    ids = [manifest.face_row(image, f, 0.6)["pseudonym_id"] for f in faces]
    assert ids == [alice[:16], bob[:16], None, alice[:16], None, None]


def test_a_subject_table_without_its_columns_or_key_stops_the_job(tmp_path, monkeypatch):
    table = tmp_path / "s.csv"
    table.write_text("path,person\nt1.jpg,alice\n")
    monkeypatch.setenv("RP_PSEUDONYM_KEY", KEY.decode())
    with pytest.raises(annotations.TableError, match="no 'subject' column"):
        annotations.attach(load_config(None, [f"pseudonyms.table={table}"]), _listing("t1.jpg"))
    plan, _ = annotations.attach(load_config(None, [f"pseudonyms.table={table}", "pseudonyms.subject_column=person"]),
                                 _listing("t1.jpg"))
    assert plan["subjects"][0].as_py()[0]["pseudonym"] == pseudonyms.subject_digest(KEY, "alice")
    monkeypatch.delenv("RP_PSEUDONYM_KEY")
    with pytest.raises(pseudonyms.PseudonymKeyError):
        annotations.attach(load_config(None, [f"pseudonyms.table={table}", "pseudonyms.subject_column=person"]),
                           _listing("t1.jpg"))


def test_a_subject_table_that_cannot_be_parsed_is_named_without_its_rows(tmp_path, monkeypatch):
    table = tmp_path / "s.csv"
    table.write_text("path,subject\nt1.jpg,alice\nt1.jpg,bob-the-patient,extra-cell\n")
    monkeypatch.setenv("RP_PSEUDONYM_KEY", KEY.decode())
    with pytest.raises(annotations.TableError) as err:
        annotations.attach(load_config(None, [f"pseudonyms.table={table}"]), _listing("t1.jpg"))
    assert "pseudonyms.table: cannot read" in str(err.value) and "bob-the-patient" not in str(err.value)


def test_the_estimate_counts_the_pseudonym_branch():
    from rp_distributed import estimate

    assert estimate.unet_evals_per_try(load_config(None, [])) == 400
    assert estimate.unet_evals_per_try(load_config(None, ["pseudonyms.table=s.parquet", "pseudonyms.scale=2"])) == 500
    assert estimate.unet_evals_per_try(load_config(None, ["pseudonyms.table=s.parquet"])) == 400  # h = 0
