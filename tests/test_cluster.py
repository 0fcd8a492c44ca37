"""The README's cluster path for real: `ray start --head`, then `ray job submit` of jobs/anonymize.py.

The head runs in its own process group (``ray start --block``) and the test ends it with a signal to
that group only: ``ray stop`` would also stop every other Ray on the machine (the test session's)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from rp_distributed import manifest
from tests.conftest import REPO, _free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def ray_head(tmp_path):
    dashboard = _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token",  # a head started here uses token auth
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
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def test_ray_job_submit_runs_the_job_on_a_cluster(ray_head, tmp_path, t1_path):
    url, env = ray_head
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(t1_path, src / "t1.jpg")
    out = tmp_path / "out"
    cmd = ["ray", "job", "submit", "--address", url, "--working-dir", str(REPO), "--",
           "python", "jobs/anonymize.py", str(src), str(out), "--no-progress",
           "--set", "anonymizer.method=blur", "--set", "output.format=png",
           "--set", "detection.resources.num_cpus=0.25", "--set", "anonymizer.resources.num_cpus=0.25",
           "--set", "merge.resources.num_cpus=0.25"]
    for _ in range(24):  # the job agent may start after the dashboard answers: Ray says to try again
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        if "No available agent to submit job" not in job.stdout + job.stderr:
            break
        time.sleep(5)
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]
    assert "Connecting to existing Ray cluster" in job.stdout + job.stderr  # it joined, it did not start one
    rows = manifest.read_manifest(str(out), "_manifest").to_pylist()
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"} and (out / "t1.png").exists()
