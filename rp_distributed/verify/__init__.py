"""The release gate: ``rp-anonymize verify OUTPUT_URI`` says whether an export is safe to hand over, from its bytes.

Safe (exit 0) only when every object outside the manifest folder is the output of a latest manifest row with status
``ok`` or ``no_face`` and hashes to that row's ``output_sha256``, no row says an identity was exported, every face
of a written image has a method that destroys or regenerates it, no output carries metadata (read back from its
bytes), and no file in the manifest folder embeds original faces. Findings name their keys (exit 1). An export that
cannot be checked as a whole is a one-line verdict (exit 2). Nothing is modified except the record it writes
(``record``), and not even that with ``dry_run``. Rooms: ``findings`` (verdicts, kinds), ``export`` (the checks),
``metadata`` (read-back of metadata), ``record`` (the signed record), ``faces`` (``--audit-faces``: the detectors
run again over every output).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from .. import io
from ..faults import describe
from ..job.lease import live_leases
from ..report.latest import LatestView
from . import record
from .export import (
    VIEW_COLUMNS,
    Expected,
    ExportFacts,
    ListingCheck,
    ViewCheck,
    read_manifest_facts,
)
from .findings import CannotVerify, ExportBusy, Finding, Findings, Kind, Verdict
from .record import RecordError

__all__ = ["AuditFaces", "CannotVerify", "Finding", "Findings", "Kind", "Outcome", "RecordError", "Verdict", "check_record",
           "verify"]


@dataclass
class Outcome:
    verdict: Verdict
    reason: str  # the one-line verdict
    facts: ExportFacts
    record: dict  # what the record holds (written or not)
    record_uri: str | None = None
    record_error: str | None = None

    def text(self, examples: int = 20) -> str:
        lines = [f"{self.verdict.value.upper()}: {self.reason}"]
        shown: dict[str, int] = {}
        for f in self.facts.findings.kept:
            shown[f.kind.value] = shown.get(f.kind.value, 0) + 1
            if shown[f.kind.value] <= examples:
                lines.append(f"  {f.kind.value:<20} {f.key}" + (f"  ({f.detail})" if f.detail else ""))
        for kind, n in self.facts.findings.counts.items():
            if n > min(shown.get(kind, 0), examples):
                lines.append(f"  {kind:<20} ... {n - min(shown.get(kind, 0), examples)} more")
        if self.record_uri:
            lines.append(f"record: {self.record_uri}")
        if self.record_error:
            lines.append(f"record not written: {self.record_error}")
        return "\n".join(lines)


def _summary(findings: Findings) -> str:
    return ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in sorted(findings.counts.items()))


def _check(storage: io.Storage, folder: str, facts: ExportFacts, audit: AuditFaces | None) -> tuple[Verdict, str]:
    live = live_leases(storage, folder)
    if live:
        lease = live[0]
        raise ExportBusy(f"run {lease.get('run_id')} is still writing this export (its lease had a heartbeat "
                           f"{max(lease['age_s'], 0):.0f} s ago): verify once it has finished")
    read_manifest_facts(storage, folder, facts)
    try:
        view = LatestView.open(storage.uri, folder)
    except Exception as exc:  # noqa: BLE001 - a part that reads but whose rows do not
        raise CannotVerify(f"the manifest's rows cannot be read: {describe(exc)}") from None
    expected, rows = Expected(), ViewCheck(facts, storage)
    for batch in view.batches(VIEW_COLUMNS):
        rows.rows(batch, expected)
    expected.freeze()
    ListingCheck(facts, storage, folder, expected).run()
    if not expected.seen.all():
        rows.missing(view, expected)
    if audit is not None:
        from .faces import audit_config, audit_faces

        cfg = audit_config(facts, audit.config_path)
        if audit.start_ray:
            from ..job.ray_session import ensure_ray

            ensure_ray(cfg)
        audit_faces(view, rows, facts, cfg, audit.actors)
    findings = facts.findings
    if findings.blocking():
        unreadable = next(f for f in findings.kept if f.kind.blocks_verification)
        return Verdict.CANNOT_VERIFY, (f"{findings.counts[Kind.UNREADABLE.value]} objects could not be read (e.g. "
                                       f"{unreadable.key}: {unreadable.detail}); also: {_summary(findings)}")
    if findings:
        return Verdict.UNSAFE, f"not safe to share: {_summary(findings)}"
    counts = facts.counts
    return Verdict.SAFE, (f"{counts.get('outputs_read', 0)} outputs match their manifest rows and hashes, carry no "
                          f"metadata; {counts.get('faces', 0)} faces anonymized; no originals beside the manifest")


@dataclass(frozen=True)
class AuditFaces:
    """``--audit-faces``: run the detectors over every output (``faces``). ``config_path``: the detectors' config
    (default: the latest run's recorded one); ``start_ray``: join or start Ray as a job would (``ensure_ray``)."""

    config_path: str | None = None
    actors: int = 2
    start_ray: bool = True


def verify(output_uri: str, manifest_dir: str = "_manifest", dry_run: bool = False,
           sign_key: bytes | None = None, audit: AuditFaces | None = None) -> Outcome:
    """Check the export under ``output_uri``; write ``<manifest_dir>/verify-<time>.json`` unless ``dry_run`` (or
    when the export has no readable manifest, or a run is still writing it). Never raises for a bad export."""
    output_uri = io.normalize_prefix(output_uri)
    facts = ExportFacts(output_uri)
    folder = posixpath.normpath(manifest_dir).strip("/")
    storage, busy = None, False
    try:
        storage = io.Storage(output_uri)
        verdict, reason = _check(storage, folder, facts, audit)
    except CannotVerify as exc:
        verdict, reason, busy = Verdict.CANNOT_VERIFY, str(exc), isinstance(exc, ExportBusy)
    except Exception as exc:  # noqa: BLE001 - a bad export is a verdict, never a traceback
        verdict, reason = Verdict.CANNOT_VERIFY, f"the export could not be read: {describe(exc)}"
    outcome = Outcome(verdict, reason, facts, record.build(facts, verdict, reason))
    if not dry_run and facts.parts and not busy:
        try:
            outcome.record_uri = record.write(storage, folder, outcome.record, sign_key)
        except Exception as exc:  # noqa: BLE001 - a read-only export: the verdict stands, the record is missing
            outcome.record_error = describe(exc)
    return outcome


def check_record(output_uri: str, record_path: str, manifest_dir: str = "_manifest",
                 sign_key: bytes | None = None) -> tuple[bool, list[str], Outcome]:
    """Whether the record at ``record_path`` describes the export as it is now (signature checked with
    ``sign_key``): (matches, what differs, the fresh read-only verification)."""
    stored = record.load(record_path)
    now = verify(output_uri, manifest_dir, dry_run=True)
    problems = record.compare(stored, now.record, sign_key)
    return not problems, problems, now
