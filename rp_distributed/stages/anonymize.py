"""The anonymizer stage (GPU actor pool for reverse personalization, CPU for the destructive methods): every face of
every pending image of a batch through one ``anonymizer.Anonymizer``, so faces of several images share the device's
batches. The input crops are dropped here: only the merge stage's anonymized crops go on."""

from __future__ import annotations

from ..anonymizer import Anonymizer, AnonymizerSettings
from ..faults import DeviceFault, describe, end_worker
from ..records import Status
from .batch import columns, rows


class AnonymizeFaces:
    def __init__(self, settings: AnonymizerSettings):
        self.anonymizer = Anonymizer(settings)

    @classmethod
    def from_config(cls, cfg) -> "AnonymizeFaces":
        return cls(AnonymizerSettings.of(cfg))

    def __call__(self, batch: dict) -> dict:
        items = rows(batch)
        try:
            self.anonymizer([f for r in items if r.pending for f in r.payload.faces])
        except DeviceFault as exc:
            end_worker(exc)
        except Exception as exc:  # noqa: BLE001 - faces not anonymized: withhold their images, say why
            for r in items:
                if r.pending:
                    r.status, r.error = Status.WITHHELD, f"anonymizer failed: {describe(exc)}"
        for r in items:  # lean boundary: the merge stage needs the anonymized crops, not the inputs
            for f in r.payload.faces:
                f.crop = None
        return columns(items)
