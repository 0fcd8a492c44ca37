"""The Ray session of a run: join ``RAY_ADDRESS`` (or ``ray.address``) or start a local Ray in this process, quiet
unless ``--verbose``."""

from __future__ import annotations

import contextlib
import os

from ..config import JobConfig


def quiet_ray_data(verbose: bool = False) -> None:
    """Ray Data's console chatter (execution banners, 'progress bars disabled') off unless ``verbose``; its
    log file in the Ray session folder keeps everything."""
    import logging

    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = verbose
    for h in logging.getLogger("ray.data").handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(logging.INFO if verbose else logging.ERROR)


@contextlib.contextmanager
def _native_stderr_aside():
    """Send what native code writes on file descriptor 2 to a temporary file for the block, and show it only
    if the block raises (Ray's C++ start-up lines print there, below Python's logging)."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def ensure_ray(cfg: JobConfig, verbose: bool = False) -> None:
    """Join RAY_ADDRESS (or ``ray.address``) if set, else start a local Ray in this process.

    Quiet unless ``verbose``: Ray's Python logging at ERROR, its C++ log lines (the driver prints them on
    stderr) at fatal unless RAY_BACKEND_LOG_LEVEL is set, and what Ray's native code prints while starting
    is shown only if the start fails. ``--verbose`` keeps Ray's defaults and, on a local Ray, forwards the
    workers' output too."""
    import logging

    import ray

    quiet_ray_data(verbose)
    if ray.is_initialized():
        return
    level = logging.INFO if verbose else logging.ERROR
    if not verbose:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    address = os.environ.get("RAY_ADDRESS") or cfg.ray.address
    with contextlib.nullcontext() if verbose else _native_stderr_aside():
        if address:
            ray.init(address=address, log_to_driver=True, logging_level=level)
        else:
            # address="local": a new Ray in this process, never a cluster that `ray start` left on this machine.
            ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=verbose,
                     logging_level=level)
