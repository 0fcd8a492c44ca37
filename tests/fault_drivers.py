"""Drivers and fault injection for ``tests/test_faults_cluster.py`` (issue 8). Nothing here is imported by
the package; the tests run these as ``python -m tests.fault_drivers ...`` in their own process group.

- ``install``: Ray's ``worker_process_setup_hook``. ``RP_TEST_ANONYMIZE_DELAY_S`` (seconds) makes every
  ``AnonymizeFaces`` batch sleep that long first, so a small job lasts long enough to break things mid-job.
- ``cluster``: a three-node ``ray.cluster_utils.Cluster`` on 127.0.0.1 (head + two workers), the real job
  on it, and a chaos thread that SIGKILLs an anonymizer actor's process and then removes a worker node that
  hosts stage actors, each while the job still has unfinished inputs. Prints ``RESULT {json}``.

Process helpers read ``/proc`` (Linux), so leftovers are found by pid, never by ``ray stop``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

# -- fault injection (in every Ray worker) ----------------------------------------------------------------


def install() -> None:
    delay = float(os.environ.get("RP_TEST_ANONYMIZE_DELAY_S") or 0)
    if delay > 0:
        from rp_distributed.stages import anonymize as anonymize_stage

        call = anonymize_stage.AnonymizeFaces.__call__

        def slow_call(self, batch):
            time.sleep(delay)
            return call(self, batch)

        anonymize_stage.AnonymizeFaces.__call__ = slow_call


# -- processes, by pid (/proc) ----------------------------------------------------------------------------


def proc_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None when there is no such live process; a zombie
    counts as gone. (pid, start) names a process even if its pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def alive(procs: dict[int, int | None]) -> dict[int, int | None]:
    """The ones of ``procs`` (pid -> start time or None for any) that still run."""
    out = {}
    for pid, start in procs.items():
        now = proc_start(pid)
        if now is not None and (start is None or now == start):
            out[pid] = now
    return out


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _ppid_pgid(pid: int) -> tuple[int, int] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[2])


def descendants(root: int) -> dict[int, int | None]:
    """Every live descendant of ``root`` (pid -> start time)."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        pp = _ppid_pgid(pid)
        if pp:
            children.setdefault(pp[0], []).append(pid)
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            start = proc_start(child)
            if start is not None:
                out[child] = start
                todo.append(child)
    return out


def ray_processes_of(raylet_pids: set[int], pgids: set[int] = frozenset()) -> dict[int, int | None]:
    """Live processes whose environment names one of ``raylet_pids`` (Ray sets RAY_RAYLET_PID in every worker
    and agent it starts), plus every live process in one of ``pgids`` (raylet, GCS, ... of a driver)."""
    out = {}
    wanted = {str(p).encode() for p in raylet_pids}
    for pid in _all_pids():
        if pid == os.getpid():
            continue
        pp = _ppid_pgid(pid)
        hit = pp is not None and pp[1] in pgids
        if not hit and wanted:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            hit = any(e.startswith(b"RAY_RAYLET_PID=") and e.split(b"=", 1)[1] in wanted for e in env)
        if hit:
            start = proc_start(pid)
            if start is not None:
                out[pid] = start
    return out


def kill_all(procs: dict[int, int | None]) -> None:
    """SIGKILL each of ``procs`` that still runs, one pid at a time (never by name)."""
    for pid in alive(procs):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_gone(procs: dict[int, int | None], timeout: float) -> dict[int, int | None]:
    """Wait up to ``timeout`` s for ``procs`` to end; returns the ones still running."""
    deadline = time.monotonic() + timeout
    left = alive(procs)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = alive(left)
    return left


# -- the outputs so far -----------------------------------------------------------------------------------


def output_files(out: Path, manifest_dir: str = "_manifest") -> list[str]:
    """Relative paths of every file under ``out`` outside the manifest folder."""
    if not out.exists():
        return []
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.is_file() and p.relative_to(out).parts[0] != manifest_dir)


# -- driver: the job on a three-node cluster, with an actor kill and a node removal mid-job ---------------


STAGES = ("DetectFaces", "AnonymizeFaces", "MergeAndWrite")


def _state(api_url: str):
    """Ray's state API, asked at this cluster's dashboard only (never an address found on the machine: other
    Ray instances may run here)."""
    from ray.util import state

    class State:
        @staticmethod
        def actors(**kw):
            return state.list_actors(address=api_url, limit=10000, raise_on_missing_output=False, **kw)

        @staticmethod
        def running_tasks():
            return state.list_tasks(address=api_url, filters=[("state", "=", "RUNNING")], limit=10000,
                                    raise_on_missing_output=False)

    return State


JOB_DONE = threading.Event()  # set by the driver when run_job returns: nothing is mid-job any more


def _wait(what: str, cond, timeout: float, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if JOB_DONE.is_set():
            raise RuntimeError(f"the job finished before {what}")
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def _ours(pid: int, raylet_pids: set[int]) -> bool:
    """Whether ``pid`` is a worker of this cluster's raylets (never signal another Ray's process)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(e == f"RAY_RAYLET_PID={r}".encode() for r in raylet_pids for e in env)


def chaos(cluster, api_url: str, out: Path, total: int, raylet_pids: set[int], record: dict) -> None:
    """Mid-job: SIGKILL the process of an anonymizer actor that is running a batch; once Ray has restarted it
    and the job has made progress, remove a worker node whose stage actors are running batches. Records what
    it did, and how many outputs existed at each moment (``total`` inputs have one)."""
    st = _state(api_url)

    def live_actors() -> dict[int, object]:
        """pid -> alive stage actor of this cluster (the state API's view, checked against /proc)."""
        return {a.pid: a for a in st.actors(filters=[("state", "=", "ALIVE")])
                if any(s in a.class_name for s in STAGES) and a.pid and _ours(a.pid, raylet_pids)}

    def busy(stage: str = "") -> list[tuple[object, object]]:
        """(actor, task) for each live stage actor running a batch (the task list alone lags: a killed
        actor's batch can still show as running)."""
        actors = live_actors()
        return [(actors[t.worker_pid], t) for t in st.running_tasks()
                if t.worker_pid in actors and t.name.endswith(".submit")  # a batch, not the constructor
                and stage in t.name and any(s in t.name for s in STAGES)]

    try:
        actor, task = _wait("an anonymizer actor running a batch", lambda: busy("AnonymizeFaces"), 150)[0]
        pid, start = actor.pid, proc_start(actor.pid)
        done = len(output_files(out))
        os.kill(pid, signal.SIGKILL)
        kill = record["actor_kill"] = {"pid": pid, "existed": start is not None, "actor_id": actor.actor_id,
                                       "class_name": actor.class_name, "task": task.name, "node_id": actor.node_id,
                                       "outputs_before": done, "total": total, "t": time.time()}
        kill["pid_gone"] = not wait_gone({pid: start}, 15)
        again = _wait("the killed actor to be restarted", lambda: [
            a for a in live_actors().values() if a.actor_id == actor.actor_id and a.pid != pid], 150)
        kill["restarted_pid"] = again[0].pid

        # Progress after the restart, then a whole worker node goes, with the stage actors running on it.
        _wait("2 more outputs", lambda: len(output_files(out)) >= done + 2, 150)
        workers = {n.node_id: n for n in cluster.worker_nodes}

        def busy_worker_node():
            by_node: dict[str, list] = {}
            for a, t in busy():
                if a.node_id in workers:
                    by_node.setdefault(a.node_id, []).append((a, t))
            return max(by_node.items(), key=lambda kv: len(kv[1])) if by_node else None

        node_id, running = _wait("a worker node running stage batches", busy_worker_node, 60)
        actors = [a for a in live_actors().values() if a.node_id == node_id]
        done = len(output_files(out))
        cluster.remove_node(workers[node_id])
        record["node_removal"] = {"node_id": node_id, "running": sorted(t.name for _, t in running),
                                  "actors": sorted(a.class_name for a in actors),
                                  "actor_ids": sorted(a.actor_id for a in actors), "outputs_before": done,
                                  "total": total, "t": time.time()}
    except BaseException:  # noqa: BLE001 - reported in RESULT; the test fails on it
        record["error"] = traceback.format_exc()


def _node_processes(node) -> dict[int, int | None]:
    return {info.process.pid: proc_start(info.process.pid)
            for infos in node.all_processes.values() for info in infos if info.process is not None}


def run_on_cluster(config_json: str, input_uri: str, output_uri: str, total: str) -> None:
    """A head and two worker nodes on 127.0.0.1, the real job on them (``run_job``), and
    ``chaos`` in a thread. Needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray then keeps every address on
    127.0.0.1 instead of swapping in the machine's IP) and free ports in RP_TEST_DASHBOARD_PORT and
    RP_TEST_AGENT_PORT. Prints ``RESULT {json}``; shuts the cluster down however it ends."""
    import ray
    from ray.cluster_utils import Cluster

    from rp_distributed.config import JobConfig
    from rp_distributed.job.run import run_job

    cfg = JobConfig.model_validate(json.loads(config_json))
    # Cluster() records its address in Ray's per-machine file (what `ray.init()` without an address joins):
    # put back what was there, so other Ray users on this machine are not redirected to this cluster.
    address_file = Path("/tmp/ray/ray_current_cluster")
    previous = address_file.read_bytes() if address_file.exists() else None
    dashboard_port = int(os.environ["RP_TEST_DASHBOARD_PORT"])
    api_url = f"http://127.0.0.1:{dashboard_port}"
    # The head runs the driver only (no CPUs): every stage actor lives on a worker node, and either worker
    # alone can host all of them once the other is gone.
    common = dict(node_ip_address="127.0.0.1", object_store_memory=100 * 1024 * 1024)
    record: dict = {}
    cluster = ours = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            common, num_cpus=0, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
            dashboard_agent_listen_port=int(os.environ["RP_TEST_AGENT_PORT"])))
        ours = cluster.address
        for _ in range(2):
            cluster.add_node(num_cpus=2, **common)
        cluster.wait_for_nodes()
        nodes = cluster.list_all_nodes()
        raylets = {n.all_processes["raylet"][0].process.pid for n in nodes}
        record.update(head_node_id=cluster.head_node.node_id, nodes=[n.node_id for n in nodes],
                      raylet_pids=sorted(raylets),
                      node_processes={str(pid): start for n in nodes for pid, start in _node_processes(n).items()})
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": "tests.fault_drivers.install"})
        thread = threading.Thread(target=chaos, daemon=True,
                                  args=(cluster, api_url, Path(output_uri), int(total), raylets, record))
        thread.start()
        try:
            result = run_job(cfg, input_uri, output_uri, progress=False)
        finally:
            JOB_DONE.set()
        thread.join(timeout=60)
        record.update(run_id=result.run_id, skipped=result.skipped, isolated=result.isolated,
                      summary=result.summary, manifest_parts=len(result.manifest_parts), wall_s=result.wall_s)
        record["stage_actors"] = [{"actor_id": a.actor_id, "class_name": a.class_name, "state": a.state,
                                   "node_id": a.node_id, "num_restarts": a.num_restarts, "pid": a.pid}
                                  for a in _state(api_url).actors(detail=True)
                                  if any(s in a.class_name for s in STAGES)]
        print("RESULT " + json.dumps(record), flush=True)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        try:
            if ours and address_file.read_text().strip() == ours:  # still ours: put back what was there
                if previous is None:
                    address_file.unlink()
                else:
                    address_file.write_bytes(previous)
        except OSError:
            pass


if __name__ == "__main__":
    {"cluster": run_on_cluster}[sys.argv[1]](*sys.argv[2:])
