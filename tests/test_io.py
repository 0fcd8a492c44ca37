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
