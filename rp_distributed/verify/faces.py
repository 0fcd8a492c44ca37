"""``verify --audit-faces``: the run's detectors look at every output again, and a face outside every recorded
anonymized box is listed (``missed_face``): the recall check a steward can run on someone else's export.

The detectors are the strongest ensemble the run configured: the union of ``detection.passes`` and
``merge.audit.passes`` (from the latest run's recorded config, or ``--config``), run as an ensemble on each
output's pixels as written. A detection counts as one of the anonymized faces by the merge stage's own rule
(``audit.is_anonymized``: mostly inside a recorded box, or centred in one at about its size).

The outputs are checked on Ray: a few actors (each holds the detectors, loaded once) take tasks of
``IMAGES_PER_TASK`` outputs, each given as its key and its recorded boxes; the driver streams the latest view and
keeps at most two tasks per actor in flight, so memory does not grow with the export.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .. import io, manifest
from ..audit import is_anonymized
from ..config import JobConfig, load_config
from ..faults import describe
from ..report.latest import LatestView
from .export import MAX_OBJECT_BYTES, ExportFacts, ViewCheck
from .findings import CannotVerify, Kind

IMAGES_PER_TASK = 16
BOX_COLUMNS = ["box_x0", "box_y0", "box_x1", "box_y1"]
AUDIT_COLUMNS = ["input_uri", "run_id", "output_uri", "status", "face_index", *BOX_COLUMNS]


def audit_config(facts: ExportFacts, config_path: str | None) -> JobConfig:
    """``--config`` when given, else the config the latest run recorded beside the manifest."""
    if config_path:
        return load_config(config_path, [])
    if not facts.run_infos:
        raise CannotVerify("--audit-faces needs the run's detectors: no config-<run_id>.json beside the manifest "
                           "(pass --config)")
    latest = facts.run_infos[max(facts.run_infos)]
    try:
        return JobConfig.model_validate(latest["config"])
    except Exception as exc:  # noqa: BLE001
        raise CannotVerify(f"the latest run's recorded config cannot be used ({describe(exc)}): pass --config") from None


def strongest_passes(cfg: JobConfig) -> list:
    """The union of the first pass's and the output audit's detector passes."""
    passes = list(cfg.detection.passes)
    return passes + [p for p in cfg.merge.audit.passes if p not in passes]


class FaceAuditor:
    """One actor's detectors; ``__call__`` checks a task of (key, recorded boxes) outputs."""

    def __init__(self, cfg: JobConfig, output_uri: str):
        from ..faces.ensemble import EnsembleDetector

        audit = cfg.merge.audit
        self.detector = EnsembleDetector(cfg.detection, passes=strongest_passes(cfg), max_pass_px=audit.max_pass_px,
                                         providers=audit.providers)
        self.covered, self.max_pixels = audit.covered, cfg.input.max_pixels
        self.storage = io.Storage(output_uri)

    def __call__(self, items: list[tuple[str, list[list[float]]]]) -> list[tuple[str, list[tuple] | str]]:
        """Per output: the detections outside every recorded box as (x0, y0, x1, y1, score), or why it could not
        be audited."""
        out = []
        for key, boxes in items:
            try:
                decoded = io.decode_image(self.storage.read(key, MAX_OBJECT_BYTES), self.max_pixels)
                found = self.detector.detect(decoded.rgb)
            except Exception as exc:  # noqa: BLE001 - recorded as unreadable: the export cannot be vouched for
                out.append((key, f"could not be audited: {describe(exc)}"))
                continue
            anonymized = [np.asarray(b, np.float32) for b in boxes]
            out.append((key, [(*(round(float(v), 1) for v in d.box), round(float(d.score), 3)) for d in found
                              if not is_anonymized(np.asarray(d.box, np.float32), anonymized, self.covered)]))
        return out


def _outputs(view: LatestView, rows: ViewCheck) -> Iterator[tuple[str, list[list[float]]]]:
    """(key, recorded face boxes) of each written output of the view, in the parts' order (an image's rows are
    contiguous: a part never splits an image)."""
    current: tuple = (None, [])
    for batch in view.batches(AUDIT_COLUMNS):
        cols = [batch.column(c).to_pylist() for c in AUDIT_COLUMNS]
        for _inp, run, uri, status, face, *box in zip(*cols):
            if status not in manifest.DONE_STATUSES or uri is None:
                continue
            key = rows.key_of(uri, run)
            if key is None:
                continue  # named as ``outside`` by the row checks
            if key != current[0]:
                if current[0] is not None:
                    yield current
                current = (key, [])
            if face is not None and None not in box:
                current[1].append(box)
    if current[0] is not None:
        yield current


def audit_faces(view: LatestView, rows: ViewCheck, facts: ExportFacts, cfg: JobConfig, actors: int = 2) -> None:
    """Run the detectors over every written output on Ray; add a ``missed_face`` finding per face found outside
    every recorded box (an output that cannot be audited is ``unreadable``)."""
    import ray

    remote = ray.remote(num_cpus=0.5)(FaceAuditor)
    pool = [remote.remote(cfg, facts.output_uri) for _ in range(actors)]
    in_flight: dict = {}

    def collect(block: bool) -> None:
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=None if block else 0)
        for ref in ready:
            in_flight.pop(ref)
            for key, result in ray.get(ref):
                facts.counts["outputs_audited"] = facts.counts.get("outputs_audited", 0) + 1
                if isinstance(result, str):
                    facts.findings.add(Kind.UNREADABLE, key, result)
                for *box, score in result if not isinstance(result, str) else []:
                    facts.findings.add(Kind.MISSED_FACE, key, f"a face (score {score}) at {box}, outside every "
                                       "recorded anonymized box")

    task, turn = [], 0
    for key, boxes in _outputs(view, rows):
        task.append((key, boxes))
        if len(task) == IMAGES_PER_TASK:
            while len(in_flight) >= 2 * actors:
                collect(block=True)
            in_flight[pool[turn % actors].__call__.remote(task)] = True
            task, turn = [], turn + 1
    if task:
        in_flight[pool[turn % actors].__call__.remote(task)] = True
    while in_flight:
        collect(block=True)
    for actor in pool:
        ray.kill(actor)
