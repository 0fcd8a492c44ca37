import os
import numpy as np
import pytest
from PIL import Image

from rp_distributed import io
from tests.conftest import write_bad_inputs


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    return d, write_bad_inputs(d)


def _decode(path, max_pixels=64_000_000):
    return io.decode_image(io.read_bytes(str(path), 10_000_000), max_pixels)


@pytest.mark.parametrize("name,reason", [
    ("empty.jpg", "empty file"),
    ("not_an_image.jpg", "not a recognised image format"),
    ("truncated.jpg", "truncated"),
    ("corrupt.jpg", "not a recognised image format|corrupt"),
    ("huge.png", "image too large"),
])
def test_unusable_inputs_raise_input_error_with_reason(bad_dir, name, reason):
    d, _ = bad_dir
    with pytest.raises(io.InputError, match=reason):
        _decode(d / name)


def test_unusual_but_valid_inputs_decode_to_rgb(bad_dir, astronaut_path):
    d, _ = bad_dir
    astro = np.asarray(Image.open(astronaut_path).convert("RGB")).astype(int)
    for name in ["sixteen_bit.png", "cmyk.jpg", "alpha.png", "palette.png", "exif_rotated.jpg"]:
        dec = _decode(d / name)
        assert dec.rgb.dtype == np.uint8 and dec.rgb.ndim == 3 and dec.rgb.shape[2] == 3, name
        assert dec.rgb.shape[:2] == astro.shape[:2], name  # the EXIF-rotated one comes back upright
        assert dec.notes, f"{name}: the conversion is recorded"
    sixteen = _decode(d / "sixteen_bit.png").rgb[:, :, 0].astype(int)
    gray = np.asarray(Image.open(astronaut_path).convert("L")).astype(int)
    assert np.abs(sixteen - gray).max() <= 1  # 16-bit scaled back down, not clipped
    upright = _decode(d / "exif_rotated.jpg").rgb.astype(int)
    assert np.abs(upright - astro).mean() < 4  # JPEG noise only: orientation was applied
    alpha = _decode(d / "alpha.png")
    assert alpha.alpha is not None and alpha.alpha[0, 0] == 255 and alpha.alpha[0, -1] == 60


def test_list_inputs_recursive_filters_and_excludes(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for p in ["x.jpg", "a/y.PNG", "a/b/z.jpeg", "a/readme.txt", ".hidden/q.jpg", "out/already.jpg"]:
        f = tmp_path / p
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"1")
    files = io.list_inputs(str(tmp_path), [".jpg", ".jpeg", ".png"], exclude_uri=str(tmp_path / "out"))
    assert [f.rel_path for f in files] == ["a/b/z.jpeg", "a/y.PNG", "x.jpg"]
    single = io.list_inputs(str(tmp_path / "x.jpg"), [".jpg"])
    assert [f.rel_path for f in single] == ["x.jpg"]
    with pytest.raises(FileNotFoundError):
        io.list_inputs(str(tmp_path / "nope"), [".jpg"])


@pytest.mark.parametrize("rel", ["../x.jpg", "a/../../x.jpg", "/etc/passwd", "", "."])
def test_output_keys_cannot_escape_the_prefix(rel):
    with pytest.raises(io.InputError, match="unsafe relative path"):
        io.join_uri("s3://bucket/out", rel)


def test_join_uri_normalizes():
    assert io.join_uri("s3://bucket/out/", "a/./b.jpg") == "s3://bucket/out/a/b.jpg"


def test_encode_strips_metadata_and_keeps_alpha(tmp_path, astronaut_path):
    rgb = np.asarray(Image.open(astronaut_path).convert("RGB"))
    jpg = io.encode_image(rgb, None, "a/b.jpg", 95)
    im = Image.open(__import__("io").BytesIO(jpg))
    assert im.format == "JPEG" and len(im.getexif()) == 0 and "exif" not in im.info
    alpha = np.full(rgb.shape[:2], 7, np.uint8)
    png = Image.open(__import__("io").BytesIO(io.encode_image(rgb, alpha, "c.png", 95)))
    assert png.mode == "RGBA" and np.asarray(png)[5, 5, 3] == 7
    assert np.array_equal(np.asarray(png)[:, :, :3], rgb)


def test_write_atomic_leaves_no_temp_files(tmp_path):
    target = tmp_path / "deep" / "f.bin"
    io.write_atomic(str(target), b"one")
    io.write_atomic(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]


def test_read_bytes_caps_size(tmp_path):
    f = tmp_path / "big.jpg"
    f.write_bytes(b"x" * 1000)
    with pytest.raises(io.InputError, match="too large"):
        io.read_bytes(str(f), 999)


# --------------------------------------------------------------------------- issue 7, hole 5: symlinks


def test_symlinks_outside_the_input_root_are_not_followed(tmp_path):
    import os

    root, outside = tmp_path / "in", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "a.jpg").write_bytes(b"inside")
    (root / "sub" / "b.jpg").write_bytes(b"inside too")
    (outside / "secret.jpg").write_bytes(b"not yours")
    (outside / "deep.jpg").write_bytes(b"not yours either")
    os.symlink(root / "a.jpg", root / "link_in.jpg")  # a link to a file inside the root: followed
    os.symlink(outside / "secret.jpg", root / "link_out.jpg")  # a link to a file outside: not followed
    os.symlink(root / "sub" / ".." / ".." / "outside" / "secret.jpg", root / "sub" / "sneaky.jpg")
    os.symlink(outside, root / "dir_out")  # a directory link to outside: not descended
    os.symlink(root / "sub", root / "sub" / "loop")  # a directory link loop: not descended, listing ends
    os.symlink(root, root / "rootloop")
    os.symlink(tmp_path / "nowhere.jpg", root / "dangling.jpg")

    files = io.list_inputs(str(root), [".jpg"])
    by_rel = {f.rel_path: f for f in files}
    assert sorted(by_rel) == ["a.jpg", "dangling.jpg", "link_in.jpg", "link_out.jpg", "sub/b.jpg", "sub/sneaky.jpg"]
    assert [f.rel_path for f in files] == sorted(by_rel)
    for rel in ("a.jpg", "sub/b.jpg", "link_in.jpg"):
        assert by_rel[rel].skip_reason is None, rel
    assert io.read_bytes(by_rel["link_in.jpg"].uri, 100) == b"inside"
    for rel in ("link_out.jpg", "sub/sneaky.jpg"):
        assert by_rel[rel].skip_reason == "symlink to a file outside the input root: not followed", rel
    assert "symlink" in by_rel["dangling.jpg"].skip_reason
    assert not any("secret" in f.uri or "deep" in f.uri for f in files)


def test_input_root_given_through_a_symlink_is_listed(tmp_path):
    import os

    real = tmp_path / "real"
    real.mkdir()
    (real / "x.jpg").write_bytes(b"1")
    os.symlink(real / "x.jpg", real / "y.jpg")
    os.symlink(real, tmp_path / "alias")
    files = io.list_inputs(str(tmp_path / "alias"), [".jpg"])
    assert [(f.rel_path, f.skip_reason) for f in files] == [("x.jpg", None), ("y.jpg", None)]
    # a single-file URI that is a link to a file elsewhere is what the user named: it is read
    single = io.list_inputs(str(real / "y.jpg"), [".jpg"])
    assert [(f.rel_path, f.skip_reason) for f in single] == [("y.jpg", None)]


# --------------------------------------------------------------------------- issue 7, hole 11: PIL's own checks


def _encoded(im, fmt, **kw) -> bytes:
    buf = __import__("io").BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_pil_bomb_check_is_live_at_our_cap(bad_dir, astronaut_path, monkeypatch):
    d, _ = bad_dir
    assert Image.MAX_IMAGE_PIXELS is not None  # importing io leaves PIL's own check on
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after this test
    small = astronaut_path.read_bytes()  # 512 x 512 = 262144 px
    io.decode_image(small, 300_000)
    assert Image.MAX_IMAGE_PIXELS == 300_000  # PIL's check sits at our cap while we decode
    # Above 2x the cap PIL itself refuses in Image.open, before any pixel is decoded; we report our reason.
    with pytest.raises(io.InputError, match=r"image too large: 144000000 pixels > input.max_pixels=64000000 "
                                            r"\(refused by PIL's decompression-bomb check"):
        _decode(d / "huge.png")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(d / "huge.png")  # anyone else in the process opening it now meets the same cap
    # Between 1x and 2x PIL only warns: our own check (on the header size, before decoding) refuses.
    with pytest.raises(io.InputError, match=r"image too large: 512x512 = 262144 pixels > input.max_pixels=200000"):
        with pytest.warns(Image.DecompressionBombWarning):
            io.decode_image(small, 200_000)


@pytest.mark.parametrize("fmt,kw,reason", [
    ("GIF", {}, r"not a supported image format \(looks like GIF\)"),
    ("ICO", {"sizes": [(64, 64)]}, r"not a supported image format \(looks like ICO\)"),
    ("EPS", {}, r"not a supported image format \(looks like EPS\)"),
    ("PPM", {}, r"not a supported image format \(looks like PPM\)"),
    # TGA has no magic bytes (an uncompressed one starts like a CUR cursor): refused, whatever it looks like
    ("TGA", {}, "not a supported image format|not a recognised image format"),
])
def test_formats_we_do_not_accept_are_refused_before_decoding(astronaut_path, fmt, kw, reason):
    data = _encoded(Image.open(astronaut_path).convert("RGB"), fmt, **kw)
    assert Image.open(__import__("io").BytesIO(data)).format == fmt  # PIL itself would open it
    with pytest.raises(io.InputError, match=reason) as err:
        io.decode_image(data, 64_000_000)
    assert "accepted: JPEG, PNG, WEBP, BMP, TIFF" in str(err.value) or fmt == "TGA"


@pytest.mark.parametrize("fmt,kw", [("JPEG", {}), ("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}),
                                    ("TIFF", {}), ("MPO", {"save_all": True})])
def test_accepted_formats_decode(astronaut_path, fmt, kw):
    im = Image.open(astronaut_path).convert("RGB")
    if fmt == "MPO":  # phone cameras' JPEG with a second (e.g. depth or stereo) frame
        kw = {"save_all": True, "append_images": [im.resize((64, 64))]}
    dec = io.decode_image(_encoded(im, fmt, **kw), 64_000_000)
    assert dec.format == fmt and dec.rgb.shape == (512, 512, 3)


def test_extensions_and_cap_defaults_match_the_decoder():
    from rp_distributed.config import (
        IMAGE_EXTENSIONS,
        ConfigError,
        InputConfig,
        load_config,
    )

    assert io.DEFAULT_MAX_PIXELS == InputConfig().max_pixels
    assert {io._EXT_FORMAT[e] for e in IMAGE_EXTENSIONS} == set(io.ACCEPTED_FORMATS)
    assert load_config(None, ["input.extensions=[JPG, .png]"]).input.extensions == [".jpg", ".png"]
    with pytest.raises(ConfigError, match="input.extensions.*unsupported extension"):
        load_config(None, ["input.extensions=[.jpg, .gif]"])


def test_a_self_referencing_link_is_listed_as_broken_not_dropped(tmp_path):
    import os

    (tmp_path / "a.jpg").write_bytes(b"x")
    os.symlink("loop.jpg", tmp_path / "loop.jpg")  # ELOOP when followed
    by_rel = {f.rel_path: f for f in io.list_inputs(str(tmp_path), [".jpg"])}
    assert sorted(by_rel) == ["a.jpg", "loop.jpg"]
    assert by_rel["loop.jpg"].skip_reason and "symlink" in by_rel["loop.jpg"].skip_reason


def test_the_listing_keeps_exactly_the_visible_files_with_an_accepted_extension(tmp_path, monkeypatch):
    """What is listed is decided in Arrow a batch at a time (hidden parts, extension, the excluded output prefix);
    the rule, written plainly here per path, must give the same set, across batch boundaries and in any script."""
    import posixpath

    from rp_distributed import listing

    names = ["a.jpg", "b.JPG", "c.Png", "d.jpeg.txt", "e.tar.jpg", "noext", "jpg", "f.", "sub/g.jpg",
             "sub/.h.jpg", ".i.jpg", "..j.jpg", "...k.jpg", "sub/..dots/l.jpg", "sub/.hid/m.jpg", "x.jpg/n.png",
             "é/ü.Jpg", "漢字/写真.jpeg", "sp ace/o .jpg", "out/p.jpg", "outer/q.jpg", "a%2Fb.jpg", "t\\u.jpg"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    exts = [".jpg", ".jpeg", ".png"]

    def listed_by_rule(rel: str) -> bool:
        parts = rel.split("/")
        hidden = any(p.startswith(".") and p not in (".", "..") for p in parts)
        return not hidden and posixpath.splitext(rel)[1].lower() in exts and not rel.startswith("out/")

    want = sorted(n for n in names if listed_by_rule(n))
    monkeypatch.setattr(listing, "LISTING_BATCH", 4)  # many batches, some ending inside a folder
    table = listing.list_inputs_table(str(tmp_path), exts, exclude_uri=str(tmp_path / "out"))
    assert table["rel_path"].to_pylist() == want
    assert table["uri"].to_pylist() == [f"{tmp_path}/{n}" for n in want]
    assert table["size"].to_pylist() == [1] * len(want)
    assert all(v.startswith("mtime_ns:") for v in table["version"].to_pylist())


def test_a_file_name_that_is_not_utf8_is_listed_as_an_error_not_a_crash(tmp_path):
    """A name the file system holds as bytes that are not UTF-8 (a Latin-1 camera folder) crashed the whole listing
    when it was an image's: the job could not start. It is listed, never read, with the reason; other files are
    listed as before, and a non-image with such a name is left out like any non-image."""
    from rp_distributed import listing

    (tmp_path / "ok.jpg").write_bytes(b"x")
    raw = os.fsencode(str(tmp_path))
    for name in (b"caf\xe9.jpg", b"caf\xe9.txt", b"sub\xff"):
        open(raw + b"/" + name, "wb").close() if not name.startswith(b"sub") else os.mkdir(raw + b"/" + name)
    open(raw + b"/sub\xff/in.jpg", "wb").close()
    table = listing.list_inputs_table(str(tmp_path), [".jpg"])
    rows = {r["rel_path"]: r for r in table.to_pylist()}
    assert set(rows) == {"ok.jpg", "caf\\xe9.jpg", "sub\\xff/in.jpg"}
    assert rows["ok.jpg"]["skip_reason"] is None and rows["ok.jpg"]["size"] == 1
    for rel in ("caf\\xe9.jpg", "sub\\xff/in.jpg"):
        assert rows[rel]["skip_reason"] == listing.NOT_UTF8 and rows[rel]["size"] is None
