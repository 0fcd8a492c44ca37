"""``rp-anonymize``: one obvious command with good defaults and a progress bar.

    rp-anonymize run INPUT_URI OUTPUT_URI [--config FILE] [--set key=value ...] [--overwrite]
    rp-anonymize models make-tiny DIR
    rp-anonymize models pull --config FILE --to DEST [--write-config FILE]
    rp-anonymize demo [OUTPUT_DIR] [--config FILE]
    rp-anonymize config show [--config FILE] [--set key=value ...]
    rp-anonymize estimate INPUT_URI [--config FILE] [--sample N] [--device H100|A100|L4]
    rp-anonymize inspect OUTPUT_URI [--failed]
    rp-anonymize report OUTPUT_URI [--include-originals]
    rp-anonymize verify OUTPUT_URI [--json] [--dry-run] [--audit-faces] [--sign-key FILE] [--check-record RECORD]
    rp-anonymize subjects INPUT_URI --out TABLE [--config FILE] [--method chinese_whispers|components]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import arrow_pool  # noqa: F401  (first: it chooses Arrow's allocator, before anything imports pyarrow)
from .config import ConfigError, config_to_dict, load_config
from .driver_memory import limit_arenas
from .job.lease import LeaseHeld
from .job.plan import PlanError
from .preflight import PreflightError
from .quiet import VERBOSE_ENV, quiet_dependencies
from .summary import summary_text


def _cmd_run(args) -> int:
    overrides = list(args.set or [])
    if args.overwrite:
        overrides.append("output.overwrite=true")
    cfg = load_config(args.config, overrides)
    from . import preflight

    preflight.check(cfg)  # every model file the stages will load is there, before Ray starts
    from .job.run import run_job

    result = run_job(cfg, args.input_uri, args.output_uri, progress=not args.no_progress, verbose=args.verbose)
    print(summary_text(result, cfg, args.input_uri, args.output_uri))
    return 0


def _manifest_dir(args) -> str:
    if args.manifest_dir:
        return args.manifest_dir
    return load_config(args.config, []).output.manifest_dir if args.config else "_manifest"


def _cmd_report(args) -> int:
    from . import manifest, report

    mdir = _manifest_dir(args)
    if not manifest.part_uris(args.output_uri, mdir):
        raise FileNotFoundError(f"no manifest under {args.output_uri.rstrip('/')}/{mdir}/ (has a run written one?)")
    print(report.write_report(args.output_uri, mdir, include_originals=bool(args.include_originals)))
    return 0


def _cmd_inspect(args) -> int:
    from . import report

    facts = report.load(args.output_uri, _manifest_dir(args))
    print(report.inspect_text(facts, args.output_uri, failed=args.failed))
    return 0


def _cmd_verify(args) -> int:
    """Exit 0: safe to share; 1: findings (or a record that does not match); 2: the export cannot be verified."""
    from . import verify

    try:
        key = verify.record.read_key(args.sign_key) if args.sign_key else None
        if args.check_record:
            matches, problems, now = verify.check_record(args.output_uri, args.check_record, _manifest_dir(args), key)
            if args.json:
                print(json.dumps({"matches": matches, "problems": problems, "now": now.record}, indent=2))
            else:
                print(("RECORD MATCHES" if matches else "RECORD DOES NOT MATCH") + f": {args.check_record}")
                print("\n".join(f"  {p}" for p in problems) or f"  the export is as recorded; {now.text()}")
            return now.verdict.exit_code if matches else max(1, now.verdict.exit_code)
        audit = verify.AuditFaces(config_path=args.config) if args.audit_faces else None
        outcome = verify.verify(args.output_uri, _manifest_dir(args), dry_run=args.dry_run, sign_key=key, audit=audit)
    except verify.RecordError as exc:
        print(f"rp-anonymize: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({**outcome.record, "record_uri": outcome.record_uri, "record_error": outcome.record_error},
                     indent=2) if args.json else outcome.text())
    return outcome.verdict.exit_code


def _cmd_estimate(args) -> int:
    from . import estimate

    cfg = load_config(args.config, args.set or [])
    e = estimate.estimate(cfg, args.input_uri, sample=args.sample, device=args.device, utilization=args.utilization)
    print(json.dumps(e, indent=2) if args.json else estimate.estimate_text(e))
    return 0


def _cmd_make_tiny(args) -> int:
    from .diffusion.tiny import make_tiny

    paths = make_tiny(args.dir)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def _cmd_pull(args) -> int:
    from .pull import main_pull

    return main_pull(args)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.output, args.config, args.set or [])


def _cmd_config_show(args) -> int:
    cfg = load_config(args.config, args.set or [])
    import yaml

    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return 0


def _cmd_subjects(args) -> int:
    from .subjects.job import run_subjects

    if not args.out.lower().endswith((".parquet", ".pq")):
        print(f"rp-anonymize: --out {args.out}: the subject table is Parquet (name it .parquet)", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.set or [])
    result = run_subjects(cfg, args.input_uri, args.out, recognizer=args.recognizer, threshold=args.threshold,
                          method=args.method, neighbors=args.neighbors, work_dir=args.work_dir,
                          progress=not args.no_progress, verbose=args.verbose)
    print(result.text())
    return 0


def _add_subjects(sub) -> None:
    from .subjects import METHODS
    from .subjects.describe import RECOGNIZERS

    p = sub.add_parser("subjects", help="detect and describe every face under INPUT_URI, cluster them into subjects "
                       "(one per person) and write the subject table (path, face_index, box, subject)")
    p.add_argument("input_uri", help="folder, file or fsspec URI, as for run")
    p.add_argument("--out", required=True, metavar="TABLE", help="the subject table to write (.parquet, file or URI)")
    p.add_argument("--config", "-c", help="YAML config: detection, input, privacy (dlib's files and threshold)")
    p.add_argument("--set", "-s", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--recognizer", default="dlib", choices=list(RECOGNIZERS),
                   help="dlib: 128-d, privacy.reid_threshold; arcface: diffusion.arcface, privacy.report_threshold")
    p.add_argument("--threshold", type=float, metavar="D",
                   help="euclidean distance below which two faces may be one person (default: the recognizer's)")
    p.add_argument("--method", default="chinese_whispers", choices=list(METHODS), help="graph clustering")
    p.add_argument("--neighbors", type=int, default=16, metavar="K", help="nearest faces looked at per face")
    p.add_argument("--work-dir", metavar="DIR", help="local folder for the spooled descriptors (default: the "
                   "system's temporary folder; about 0.6 KB a face)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", "-v", action="store_true", help="Ray's own output")
    p.set_defaults(func=_cmd_subjects)


def _add_verify(sub) -> None:
    ver = sub.add_parser("verify", help="check that the export under OUTPUT_URI is safe to share (exit 0), from its "
                         "bytes and its manifest; writes a record beside the manifest")
    ver.add_argument("output_uri")
    ver.add_argument("--json", action="store_true", help="print the verification record as JSON")
    ver.add_argument("--dry-run", action="store_true", help="write no record (nothing is modified)")
    ver.add_argument("--audit-faces", action="store_true",
                     help="run the run's detectors (or --config's) over every output on Ray: list faces outside "
                     "every recorded anonymized box")
    ver.add_argument("--sign-key", metavar="FILE",
                     help="HMAC-SHA256 key file: sign the record (with --check-record: check its signature)")
    ver.add_argument("--check-record", metavar="RECORD", help="check a verification record against the export now")
    ver.add_argument("--config", "-c", help="the run's config (output.manifest_dir; the detectors of --audit-faces)")
    ver.add_argument("--manifest-dir", help="manifest folder under OUTPUT_URI (default _manifest)")
    ver.set_defaults(func=_cmd_verify)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rp-anonymize", description="Anonymize faces in image datasets on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="anonymize every image under INPUT_URI into OUTPUT_URI")
    run.add_argument("input_uri", help="folder, file or fsspec URI (s3://bucket/prefix, gs://...)")
    run.add_argument("output_uri", help="output folder or fsspec URI; the manifest goes under it")
    run.add_argument("--config", "-c", help="YAML config (default: built-in defaults)")
    run.add_argument("--set", "-s", action="append", metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--overwrite", action="store_true", help="redo inputs that are already done")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--verbose", "-v", action="store_true", help="show Ray's own start-up and log output, and the notices of transformers, diffusers and "
                     "insightface")
    run.set_defaults(func=_cmd_run)

    models = sub.add_parser("models", help="model utilities")
    msub = models.add_subparsers(dest="models_command", required=True)
    tiny = msub.add_parser("make-tiny", help="write a tiny random-weight SDXL + FaceID adapter + ArcFace")
    tiny.add_argument("dir")
    tiny.set_defaults(func=_cmd_make_tiny)
    pull = msub.add_parser(
        "pull", help="fetch the models CONFIG needs (pinned revisions, its weights variant) into DEST, with "
        "models.lock.json; prints the config lines that point the job at DEST")
    pull.add_argument("--config", "-c", required=True, help="the job's config (its model sources and revisions)")
    pull.add_argument("--to", required=True, metavar="DEST", help="local folder or object-store prefix (s3://...)")
    pull.add_argument("--set", "-s", action="append", metavar="KEY=VALUE", help="override a config key")
    pull.add_argument("--hf-cache", metavar="DIR", help="huggingface_hub cache (default: HF_HUB_CACHE / HF_HOME)")
    pull.add_argument("--write-config", metavar="FILE", help="also write CONFIG with those lines merged in")
    pull.set_defaults(func=_cmd_pull)

    demo = sub.add_parser("demo", help="run the main job on sample photos (tiny model if no real one)")
    demo.add_argument("output", nargs="?", default="demo-output")
    demo.add_argument("--config", "-c", help="default: configs/local.yaml")
    demo.add_argument("--set", "-s", action="append", metavar="KEY=VALUE")
    demo.set_defaults(func=_cmd_demo)

    est = sub.add_parser("estimate", help="count faces on a sample and estimate UNet evaluations and GPU-hours")
    est.add_argument("input_uri")
    est.add_argument("--config", "-c", help="YAML config (default: built-in defaults)")
    est.add_argument("--set", "-s", action="append", metavar="KEY=VALUE", help="override a config key")
    est.add_argument("--sample", type=int, default=20, metavar="N", help="inputs to detect faces on (default 20)")
    est.add_argument("--device", default="H100", choices=["H100", "A100", "L4"], help="GPU for the time estimate")
    est.add_argument("--utilization", type=float, default=0.5, metavar="U",
                     help="assumed fraction of the device's peak matmul rate (default 0.5)")
    est.add_argument("--json", action="store_true", help="print the figures as JSON")
    est.set_defaults(func=_cmd_estimate)

    ins = sub.add_parser("inspect", help="summary of a finished or partial run, from its manifest")
    ins.add_argument("output_uri")
    ins.add_argument("--failed", action="store_true", help="also list failed inputs and fallback reasons")
    ins.add_argument("--config", "-c", help="the run's config (for output.manifest_dir)")
    ins.add_argument("--manifest-dir", help="manifest folder under OUTPUT_URI (default _manifest)")
    ins.set_defaults(func=_cmd_inspect)

    rep = sub.add_parser("report", help="(re)build report.html beside the manifest of OUTPUT_URI")
    rep.add_argument("output_uri")
    rep.add_argument("--include-originals", action="store_true",
                     help="embed the ORIGINAL face next to each anonymized one (identifiable; off by default)")
    rep.add_argument("--config", "-c", help="the run's config (for output.manifest_dir)")
    rep.add_argument("--manifest-dir", help="manifest folder under OUTPUT_URI (default _manifest)")
    rep.set_defaults(func=_cmd_report)

    _add_verify(sub)
    _add_subjects(sub)

    conf = sub.add_parser("config", help="config utilities")
    csub = conf.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the effective config")
    show.add_argument("--config", "-c")
    show.add_argument("--set", "-s", action="append", metavar="KEY=VALUE")
    show.set_defaults(func=_cmd_config_show)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    limit_arenas()  # first, before any thread pool: the driver's threads then share two malloc arenas
    if getattr(args, "verbose", False):  # the job's Ray workers inherit it
        os.environ[VERBOSE_ENV] = "1"
    quiet_dependencies()
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"rp-anonymize: {exc}", file=sys.stderr)
        return 2
    except PreflightError as exc:  # one line: the key, what is wrong, the fix
        print(f"rp-anonymize: error: {exc.line()}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PlanError, LeaseHeld) as exc:
        print(f"rp-anonymize: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
