"""What an anonymization method is to the anonymizer: built once per actor from the settings, it anonymizes the
faces routed to it and hands any face it cannot anonymize to the ``Fallback`` with the reason."""

from __future__ import annotations

from typing import Callable, Protocol

from ..records import Face
from .settings import AnonymizerSettings

Fallback = Callable[[Face, str], None]


class Method(Protocol):
    name: str

    def params(self, settings: AnonymizerSettings) -> dict: ...

    def model_info(self) -> dict | None: ...

    def anonymize(self, faces: list[Face], settings: AnonymizerSettings, fallback: Fallback) -> None: ...
