"""The anonymizer: turns aligned face crops into anonymized crops, fail closed.

Each face is routed (``triage``): the requested method (``methods``: blur, pixelate, mask, or reverse
personalization with its privacy ladder), the destructive fallback on its crop, or no crop at all (the merge
stage then destroys its box in the image). Any failure on a face falls back, and the face record says why: a
``records.Face`` leaves this stage with ``anon_crop`` set, or with ``face_error`` set and no crop.
"""

from __future__ import annotations

import json

from ..destructive import destroy
from ..faults import describe
from ..records import Applied, Face
from .methods import build_method
from .settings import AnonymizerSettings
from .triage import Route, triage


class Anonymizer:
    """Built once per actor from its ``AnonymizerSettings``; ``__call__`` anonymizes face records in place. The
    settings a call uses are ``self.settings``; the method's models are loaded once, at construction."""

    def __init__(self, settings: AnonymizerSettings):
        self.settings = settings
        self.method = build_method(settings)

    @classmethod
    def from_config(cls, cfg) -> "Anonymizer":
        return cls(AnonymizerSettings.of(cfg))

    def __call__(self, faces: list[Face]) -> None:
        s = self.settings
        params, info = json.dumps(self.method.params(s)), self.method.model_info()
        model = json.dumps(info) if info is not None else None
        for f in faces:
            f.method, f.params, f.model = s.anonymizer.method, params, model
        routed = []
        for f in faces:
            decision = triage(f, s.anonymizer.generative, s.detection, s.anonymizer.fallback)
            if decision.route is Route.IMAGE_BOX:
                f.add_error(decision.why)
            elif decision.route is Route.FALLBACK:
                self.fallback(f, decision.why)
            else:
                routed.append(f)
        self.method.anonymize(routed, s, self.fallback)

    def fallback(self, f: Face, reason: str) -> None:
        """The destructive fallback on the crop; if even that fails, no crop (merge destroys the image box)."""
        f.add_error(reason)
        a = self.settings.anonymizer
        try:
            f.anon_crop = destroy(a.fallback, f.crop, f.face_box, a)
            f.method_applied = Applied(a.fallback)
        except Exception as exc:  # noqa: BLE001
            f.anon_crop = None
            f.add_error(f"fallback failed: {describe(exc)}")
