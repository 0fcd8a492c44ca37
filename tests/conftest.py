"""Shared fixtures: the real photos that ship offline, a zoo of bad inputs, Ray, and an S3 server."""

from __future__ import annotations

import io
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Detection for tests that test something else (the pipeline, the stages, fail-closed layers): one upright CenterFace
# pass, and an audit of one CenterFace pass at half size (on t1: the same six faces; ~1.3 passes of cost instead of
# the default ensemble's ~20). tests/test_ensemble.py, test_audit.py and test_recall.py test the defaults.
FAST_DETECTION = ["detection.passes=[{member: centerface}]", "merge.audit.passes=[{member: centerface, scale: 0.5}]"]


def insightface_image(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("insightface")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "images" / name


def skimage_image(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / name


@pytest.fixture(scope="session")
def t1_path() -> Path:
    return insightface_image("t1.jpg")


@pytest.fixture(scope="session")
def t1_rgb(t1_path) -> np.ndarray:
    return np.asarray(Image.open(t1_path).convert("RGB"))


@pytest.fixture(scope="session")
def astronaut_path() -> Path:
    return skimage_image("astronaut.png")


GROUPS_LOST = pytest.StashKey[str]()


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Group the tests for ``pytest -n 2 --dist loadgroup`` (``make test``): every test that starts Ray runs on one
    worker, one at a time and first (a second Ray on 2 cores would starve both clusters' actors, and the Ray tests
    are the longest chain), while the other worker runs the in-process tests a module at a time (a module's fixtures
    are built once). xdist's own hook reads the groups inside this wrapper; after it, a Ray test's id must carry
    its group, or the groups were lost (as with pytest 9.2 and xdist 3.8) and every Ray test fails."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        group = "ray" if item.get_closest_marker("ray") else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: item.get_closest_marker("ray") is None)  # stable: collection order otherwise
    result = yield
    if getattr(config.option, "loadgroup", False):
        lost = [item.nodeid for item in items if item.get_closest_marker("ray") and not item.nodeid.endswith("@ray")]
        if lost:  # each Ray test fails, saying why (an error raised here would reach xdist as an internal error)
            config.stash[GROUPS_LOST] = lost[0]
    return result


@pytest.fixture(autouse=True)
def _ray_only_in_marked_tests(request):
    """A test that starts Ray in this process without the ``ray`` mark would run beside the Ray group on the other
    worker: fail it, naming the mark. (A Ray started in a child process cannot be seen from here: mark those by
    hand, as test_cluster.py does.)"""
    import sys

    def running() -> bool:
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    if request.node.get_closest_marker("ray") and GROUPS_LOST in request.config.stash:
        pytest.fail(f"pytest-xdist did not group the Ray tests (e.g. {request.config.stash[GROUPS_LOST]}): two Ray "
                    "clusters would run at once. Use the pytest this project pins (pyproject.toml).")
    before = running()
    yield
    if request.node.get_closest_marker("ray") is None and not before and running():
        sys.modules["ray"].shutdown()
        pytest.fail("this test started Ray: mark it @pytest.mark.ray (tests/conftest.py groups Ray tests)")


RAY_WORKER_NICENESS = 15  # Ray starts its worker processes (every stage actor) at this niceness


@pytest.fixture(autouse=True)
def _in_process_tests_yield_to_ray(request):
    """Under ``make test`` the in-process tests' worker runs beside the Ray tests, whose stage actors Ray starts at
    niceness 15: at niceness 0 and with a thread per core the in-process worker took ~28 times their CPU share and
    both cores, and the Ray tests (the longest chain) ran 3-4 times slower than alone. The first in-process test
    of a worker puts it at Ray's niceness and on one thread (torch, and the ONNX sessions: ``onnx_threads``). A
    worker runs its Ray group, if any, before any other test, so no Ray test runs after this."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER") and request.node.get_closest_marker("ray") is None:
        if os.environ.get("OMP_NUM_THREADS") != "1":
            import torch

            os.environ["OMP_NUM_THREADS"] = "1"
            torch.set_num_threads(1)
            os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))
    yield


def write_bad_inputs(folder: Path) -> dict[str, str]:
    """Bad and unusual inputs built from the real photos; returns rel_path -> what it is."""
    folder.mkdir(parents=True, exist_ok=True)
    astro = Image.open(skimage_image("astronaut.png")).convert("RGB")
    t1_bytes = insightface_image("t1.jpg").read_bytes()
    kinds = {}

    def put(name, data, kind):
        (folder / name).write_bytes(data)
        kinds[name] = kind

    def encode(im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    put("empty.jpg", b"", "empty")
    put("not_an_image.jpg", b"this is a text file, not a JPEG\n" * 20, "non-image")
    put("truncated.jpg", t1_bytes[: len(t1_bytes) // 3], "truncated")
    corrupt = bytearray(t1_bytes)
    corrupt[2:400] = os.urandom(398)  # destroy the header segments
    put("corrupt.jpg", bytes(corrupt), "corrupt")
    put("huge.png", encode(Image.new("1", (12000, 12000)), "PNG"), "huge")  # 144 Mpx bomb, ~20 KB
    gray16 = (np.asarray(astro.convert("L"), np.uint16) * 257).astype(np.uint16)
    put("sixteen_bit.png", encode(Image.fromarray(gray16), "PNG"), "16-bit")
    put("cmyk.jpg", encode(astro.convert("CMYK"), "JPEG", quality=92), "cmyk")
    rgba = astro.convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:, :, 3] = np.linspace(255, 60, a.shape[1]).astype(np.uint8)[None, :]
    put("alpha.png", encode(Image.fromarray(a), "PNG"), "alpha")
    put("palette.png", encode(astro.quantize(colors=64), "PNG"), "palette")
    # EXIF orientation 6 (rotate 90° CW to display): store the pixels rotated the other way.
    exif = Image.Exif()
    exif[0x0112] = 6
    put("exif_rotated.jpg", encode(astro.rotate(90, expand=True), "JPEG", quality=95, exif=exif), "exif-rotated")
    coffee = Image.open(skimage_image("coffee.png")).convert("RGB")
    put("no_face.jpg", encode(coffee, "JPEG", quality=92), "no face")
    return kinds


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny random-weight SDXL + FaceID adapter + ArcFace, written once per test session."""
    from rp_distributed.diffusion import make_tiny

    d = tmp_path_factory.mktemp("tiny")
    make_tiny(d)
    return d


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the test session (2 CPUs, as on CI), started after the S3 endpoint's env is
    set (``s3_server``), so every Ray worker sees it."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's ThreadedMotoServer on 127.0.0.1, with credentials and endpoint in the environment.

    Session-scoped and requested before ``ray_session`` by S3 tests, so Ray workers inherit the env.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def upload_folder(local: Path, bucket_uri: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    bucket = bucket_uri[len("s3://"):].split("/")[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.put(str(local).rstrip("/") + "/", bucket_uri.rstrip("/") + "/", recursive=True)


@pytest.fixture
def photos_dir(tmp_path, t1_path, astronaut_path) -> Path:
    """A small input tree of real photos, with a nested folder."""
    d = tmp_path / "in"
    (d / "people").mkdir(parents=True)
    shutil.copy(t1_path, d / "people" / "t1.jpg")
    shutil.copy(astronaut_path, d / "astronaut.png")
    shutil.copy(insightface_image("mask_white.jpg"), d / "people" / "mask_white.jpg")
    return d
