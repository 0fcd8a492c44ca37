"""One run at a time writes an output prefix: the lease in the manifest folder.

Two drivers on one output prefix would each plan from the other's half-written manifest, delete the other's
writes in progress as cut short (``plan._existing_outputs``), redo or skip each other's inputs, and an
``--overwrite`` run would retire the other's parts. So a run holds a lease before it plans:
``<manifest_dir>/lease-<run_id>.json`` (run id, host, pid, start and heartbeat times), written by the run and
rewritten by a driver thread every ``heartbeat_s``. Taking it: write our own, then list the folder; if another
run's lease had a heartbeat within ``ttl_s``, ours is removed and the run refused (``LeaseHeld``, naming the
other run). Two runs starting at the same moment each see the other and both refuse: never both run. A lease
older than ``ttl_s`` is a killed driver's: it is deleted and does not block; so is at once the lease of a
driver on this machine (same host name and PID namespace) whose process is gone, so a rerun right after a
crash or a kill need not wait out the TTL. Each heartbeat lists the folder
again: a run whose own lease is gone (a driver frozen past the TTL, taken over) or that meets a younger live
lease stops (``LeaseLost``, raised at the next manifest row). Writes go through ``storage.Storage``, so the
lease works the same on a local folder and on S3/GCS (strong read-after-write and list consistency).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from ..storage import InputError, Storage

LEASE_PREFIX = "lease-"
HEARTBEAT_S = 30.0
TTL_S = 300.0  # ten missed heartbeats (and room for clock skew between drivers' machines)


class LeaseHeld(RuntimeError):
    """Another live run holds the output prefix."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over, or could not be renewed within its TTL."""


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")  # Linux: which pid numbering a pid belongs to
    except OSError:
        return None


def _gone(info: dict) -> bool:
    """Whether the lease ``info`` names a process of this machine and PID namespace that no longer exists
    (a reused pid reads as alive: then the TTL decides)."""
    ns = _pid_namespace()
    if ns is None or info.get("pid_ns") != ns or info.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return False


def live_leases(storage: Storage, manifest_dir: str, ttl_s: float = TTL_S) -> list[dict]:
    """The leases in ``manifest_dir`` whose heartbeat is younger than ``ttl_s`` and whose driver is not known to
    be gone: the runs writing this prefix now (one listing; read-only, nothing is deleted)."""
    live = []
    for key in storage.list(manifest_dir.strip("/")):
        name = key.rsplit("/", 1)[-1]
        if not (name.startswith(LEASE_PREFIX) and name.endswith(".json")):
            continue
        try:
            info = json.loads(storage.read(key, 1 << 16))
            age = time.time() - float(info["heartbeat_at"])
        except (FileNotFoundError, InputError, ValueError, KeyError, TypeError):
            continue  # released meanwhile, or not a live run's lease (writes are atomic)
        if age < ttl_s and not _gone(info):
            live.append({**info, "key": key, "age_s": age})
    return live


class Lease:
    """The lease of ``storage``'s output prefix for ``run_id``; a context manager (acquire, then release)."""

    def __init__(self, storage: Storage, manifest_dir: str, run_id: str, heartbeat_s: float = HEARTBEAT_S,
                 ttl_s: float = TTL_S):
        self.storage, self.folder, self.run_id = storage, manifest_dir.strip("/"), run_id
        self.key = f"{self.folder}/{LEASE_PREFIX}{run_id}.json"
        self.heartbeat_s, self.ttl_s = heartbeat_s, ttl_s
        self.started_at = time.time()
        self.removed_stale: list[str] = []  # run ids of killed drivers' leases deleted on the way in
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid_ns": _pid_namespace(),
                           "pid": os.getpid(), "started_at": self.started_at, "heartbeat_at": time.time(),
                           "ttl_s": self.ttl_s}).encode()

    def _scan(self) -> tuple[bool, list[dict]]:
        """Whether our lease is in the folder, and the other runs' leases there, each with its ``key`` and
        ``age_s`` (since its heartbeat): one listing."""
        mine, found = False, []
        for key in self.storage.list(self.folder):
            name = key.rsplit("/", 1)[-1]
            mine = mine or key == self.key
            if key == self.key or not (name.startswith(LEASE_PREFIX) and name.endswith(".json")):
                continue
            try:
                info = json.loads(self.storage.read(key, 1 << 16))
                beat = float(info["heartbeat_at"])
            except FileNotFoundError:  # released meanwhile
                continue
            except (InputError, ValueError, KeyError, TypeError):  # writes are atomic: not a live run's lease
                info, beat = {"run_id": name[len(LEASE_PREFIX):-5]}, 0.0
            if _gone(info):  # a driver of this machine that no longer runs: its heartbeat is as good as old
                beat = 0.0
            found.append({**info, "key": key, "age_s": time.time() - beat})
        return mine, found

    def acquire(self) -> Lease:
        self.storage.write(self.key, self._record())
        try:
            _, others = self._scan()
            live = [o for o in others if o["age_s"] < self.ttl_s]
            if live:
                o = min(live, key=lambda o: o["age_s"])
                raise LeaseHeld(
                    f"the output prefix {self.storage.uri} is being written by run {o.get('run_id')} on "
                    f"{o.get('host', '?')} (pid {o.get('pid', '?')}), whose lease had a heartbeat "
                    f"{max(o['age_s'], 0):.0f} s ago: one run at a time writes an output prefix. Wait for it; if "
                    f"that run is dead, its lease expires {self.ttl_s:.0f} s after its last heartbeat (or delete "
                    f"{self.storage.uri_of(o['key'])})")
            for o in others:  # killed drivers' leases
                self.storage.remove(o["key"])
                self.removed_stale.append(str(o.get("run_id")))
        except BaseException:
            self._remove_own()
            raise
        self._thread = threading.Thread(target=self._beat, name="output-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(self.heartbeat_s):
            try:
                mine, others = self._scan()
                younger = [o for o in others if o["age_s"] < self.ttl_s and float(o.get("started_at", 0)) > self.started_at]
                if not mine or younger:
                    how = (f"run {younger[0].get('run_id')} took the prefix over" if younger else "it was removed")
                    self._lost = (f"run {self.run_id} lost its lease on {self.storage.uri}: {how} (a lease without a "
                                  f"heartbeat for {self.ttl_s:.0f} s is taken over); stopped so that two runs never "
                                  "write one prefix")
                    return
                self.storage.write(self.key, self._record())
                renewed = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - a store hiccup: retried at the next beat, up to the TTL
                if time.monotonic() - renewed > self.ttl_s:
                    self._lost = f"run {self.run_id}'s lease could not be renewed for {self.ttl_s:.0f} s: {exc}"
                    return

    def check(self) -> None:
        """Raise ``LeaseLost`` if the heartbeat found the lease gone or could not renew it."""
        if self._lost:
            raise LeaseLost(self._lost)

    def _remove_own(self) -> None:
        try:
            self.storage.remove(self.key)
        except Exception:  # noqa: BLE001 - it expires on its own
            pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._remove_own()  # its own key (the run id is unique), even after a takeover rewrote it once more

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
