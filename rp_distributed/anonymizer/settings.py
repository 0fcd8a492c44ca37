"""The config sections the anonymizer stage is built from: no more of the job's config travels to its actors."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import (AlignmentConfig, AnonymizerConfig, DetectionConfig, DiffusionConfig, PrivacyConfig,
                      PseudonymsConfig)


@dataclass(frozen=True)
class AnonymizerSettings:
    anonymizer: AnonymizerConfig
    diffusion: DiffusionConfig
    privacy: PrivacyConfig
    detection: DetectionConfig  # the face budget and sizes a fallback reason names
    alignment: AlignmentConfig  # the crop size the diffusion stage runs at
    pseudonyms: PseudonymsConfig = field(default_factory=PseudonymsConfig)  # h, the pseudonym guidance of faces with a subject

    @classmethod
    def of(cls, cfg) -> "AnonymizerSettings":
        return cls(cfg.anonymizer, cfg.diffusion, cfg.privacy, cfg.detection, cfg.alignment, cfg.pseudonyms)
