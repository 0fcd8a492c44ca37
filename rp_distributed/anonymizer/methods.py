"""The anonymization methods by name (``anonymizer.method``), each a class the stage builds once per actor: the
destructive ones destroy each aligned crop; reverse personalization (``ladder.ReversePersonalization``: torch
and SDXL are imported only when it is built) regenerates them.

A method gets the faces routed to it (``triage``) and a ``fallback(face, why)`` for any face it cannot anonymize;
it records ``anon_crop`` and ``method_applied`` on each face it does, and its parameters for the manifest."""

from __future__ import annotations

import time
from typing import Callable

from ..destructive import destroy
from ..faults import describe
from ..records import Applied, Face
from .contract import Fallback, Method
from .ladder import ReversePersonalization
from .settings import AnonymizerSettings


class DestroyCrops:
    """blur, pixelate or mask on each face's aligned crop."""

    def __init__(self, name: str, settings: AnonymizerSettings):
        self.name = name

    def params(self, settings: AnonymizerSettings) -> dict:
        a = settings.anonymizer
        return {"blur": {"blur_strength": a.blur_strength}, "pixelate": {"pixelate_blocks": a.pixelate_blocks},
                "mask": {"mask_color": list(a.mask_color)}}[self.name]

    def model_info(self) -> dict | None:
        return None

    def anonymize(self, faces: list[Face], settings: AnonymizerSettings, fallback: Fallback) -> None:
        for f in faces:
            t0 = time.perf_counter()
            try:
                f.anon_crop = destroy(self.name, f.crop, f.face_box, settings.anonymizer)
                f.method_applied = Applied(self.name)
            except Exception as exc:  # noqa: BLE001 - any failure must fall back
                fallback(f, describe(exc))
            f.t_anonymize_s = time.perf_counter() - t0


def _reverse_personalization(name: str, settings: AnonymizerSettings) -> Method:
    return ReversePersonalization(settings)  # torch and SDXL are imported only here, as it loads


METHODS: dict[str, Callable[[str, AnonymizerSettings], Method]] = {
    "blur": DestroyCrops, "pixelate": DestroyCrops, "mask": DestroyCrops,
    "reverse_personalization": _reverse_personalization,
}


def build_method(settings: AnonymizerSettings) -> Method:
    name = settings.anonymizer.method
    try:
        factory = METHODS[name]
    except KeyError:
        raise ValueError(f"anonymizer.method: unknown method {name!r}; known: {', '.join(METHODS)}") from None
    return factory(name, settings)
