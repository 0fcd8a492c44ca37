"""Which faces get the requested method, and which a destructive one without it: decided per face from what
detection and alignment recorded. The anonymizer stage acts on it and ``estimate`` counts with it, so the
estimate's GPU faces are the job's."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Route(enum.Enum):
    METHOD = "method"  # the requested method
    FALLBACK = "fallback"  # anonymizer.fallback on its aligned crop (generation is not spent on it)
    IMAGE_BOX = "image box"  # no crop: the merge stage destroys its box in the image


@dataclass(frozen=True)
class Decision:
    route: Route
    why: str | None = None  # the face_error it records
    counted_as: str | None = None  # over_budget | align_failed | small | low_confidence


def triage(face, generative: bool, detection, fallback: str) -> Decision:
    """The route of one ``records.Face``. Faces beyond the budget and faces that could not be aligned have no crop;
    small and low-confidence faces are not worth a generation (a small face cannot be generated well, and a false
    detection would cost a GPU face): with a destructive method they get it like every other face."""
    if face.over_budget:
        return Decision(Route.IMAGE_BOX, f"beyond detection.max_faces={detection.max_faces} (largest first): "
                                         f"{fallback} on the image box", "over_budget")
    if face.align_error:
        return Decision(Route.IMAGE_BOX, face.align_error, "align_failed")
    if face.small and generative:
        return Decision(Route.FALLBACK, f"face smaller than detection.min_face_size={detection.min_face_size}px",
                        "small")
    if face.low_confidence and generative:
        return Decision(Route.FALLBACK, f"low-confidence detection (score {face.det_score:.2f} below "
                                        f"detection.generate_above={detection.generate_above}, one member): no GPU "
                                        "generation", "low_confidence")
    return Decision(Route.METHOD)
