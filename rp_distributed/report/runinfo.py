"""Where the report lives, and the config of each run beside the manifest (``config-<run_id>.json``, written by
``run_job`` at the start of a run and rewritten with its wall time at the end)."""

from __future__ import annotations

import json

from .. import io, manifest

REPORT_NAME = "report.html"
RUN_INFO_PREFIX = "config-"


def run_info_uri(output_uri: str, manifest_dir: str, run_id: str) -> str:
    return io.join_uri(manifest.manifest_uri(output_uri, manifest_dir), f"{RUN_INFO_PREFIX}{run_id}.json")


def write_run_info(output_uri: str, manifest_dir: str, run_id: str, info: dict) -> str:
    """``config-<run_id>.json``: the run's config and facts (written at start, rewritten at the end)."""
    uri = run_info_uri(output_uri, manifest_dir, run_id)
    io.write_atomic(uri, json.dumps(info, indent=2, sort_keys=False, default=str).encode())
    return uri


def read_run_info(output_uri: str, manifest_dir: str, run_id: str) -> dict | None:
    uri = run_info_uri(output_uri, manifest_dir, run_id)
    fs, path = io.filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None


def report_uri(output_uri: str, manifest_dir: str) -> str:
    return io.join_uri(manifest.manifest_uri(io.normalize_prefix(output_uri), manifest_dir), REPORT_NAME)
