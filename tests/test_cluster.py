"""The README's cluster path for real: `ray start --head`, then `ray job submit` of jobs/anonymize.py.

The head runs in its own process group (``ray start --block``) and the test ends it with a signal to
that group only: ``ray stop`` would also stop every other Ray on the machine (the test session's)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from rp_distributed import manifest
from tests.conftest import FAST_DETECTION, REPO, _free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture
def ray_head(tmp_path, s3_server):
    dashboard = _free_port()
    # The head (and the job's driver and workers it starts) get the S3 endpoint and credentials of moto.
    # A head started here uses token auth, and refuses to start without a token: on a fresh machine there is no
    # ~/.ray/auth_token (`ray get-auth-token --generate` writes one), so the head, its job and the client share one.
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(_free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
         # Free ports for the node's agents: the test session's own Ray already holds the defaults (52365),
         # and a head whose job agent cannot bind answers "No available agent to submit job" forever.
         "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
         "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
         "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "head.log", "w"))
    url = f"http://127.0.0.1:{dashboard}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (token auth may refuse an anonymous client)
                break
            except OSError:
                assert head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
                time.sleep(1)
        else:
            pytest.fail("the Ray head's job server did not come up: " + (tmp_path / "head.log").read_text()[-2000:])
        yield url, env
    finally:
        # A head asked to stop drains for half a minute; the job is over and its outputs checked, so it gets 10 s.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)


def test_ray_job_submit_runs_the_job_on_a_cluster(ray_head, tmp_path, t1_path):
    """S3 in and out (moto), submitted to a real head. Blur: the stages are the same whatever the method; reverse
    personalization with detection.max_faces on a Ray job is tests/test_fail_closed.py's poison/device-fault run."""
    import yaml

    from rp_distributed.config import config_to_dict, load_config
    from tests.conftest import upload_folder

    url, env = ray_head
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(t1_path, src / "t1.jpg")
    upload_folder(src, "s3://cluster-in/photos")
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    fs.mkdir("cluster-out")
    # The first pass's 1x CenterFace only: what is tested here is the cluster and S3, not the detection default.
    cfg = load_config(None, [FAST_DETECTION[0], "anonymizer.method=blur", "output.format=png",
                             "detection.resources.num_cpus=0.25",
                             "anonymizer.resources.num_cpus=0.25", "merge.resources.num_cpus=0.25"])
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    cmd = ["ray", "job", "submit", "--address", url, "--working-dir", str(REPO), "--",
           "python", "jobs/anonymize.py", "s3://cluster-in/photos", "s3://cluster-out/anon", "-c", str(config),
           "--no-progress", "--verbose"]  # verbose: Ray says whether it joined or started a cluster
    for _ in range(24):  # the job agent may start after the dashboard answers: Ray says to try again
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
        said = job.stdout + job.stderr
        # A head under load may also drop the connection before the job exists (nothing was submitted).
        if "No available agent to submit job" not in said and not (
                "Remote end closed connection" in said and "submitted successfully" not in said):
            break
        time.sleep(5)
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]
    assert "Connecting to existing Ray cluster" in job.stdout + job.stderr  # it joined, it did not start one
    rows = sorted(manifest.read_manifest("s3://cluster-out/anon", "_manifest").to_pylist(),
                  key=lambda r: r["face_index"])
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    assert rows[0]["output_uri"] == "s3://cluster-out/anon/t1.png"
    assert [r["method_applied"] for r in rows] == ["blur"] * 6 and not any(r["identity_exported"] for r in rows)
    fs.invalidate_cache()
    assert fs.exists("cluster-out/anon/t1.png")
