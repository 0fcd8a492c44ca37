"""The config sections the anonymizer stage is built from: no more of the job's config travels to its actors."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AlignmentConfig, AnonymizerConfig, DetectionConfig, DiffusionConfig, PrivacyConfig


@dataclass(frozen=True)
class AnonymizerSettings:
    anonymizer: AnonymizerConfig
    diffusion: DiffusionConfig
    privacy: PrivacyConfig
    detection: DetectionConfig  # the face budget and sizes a fallback reason names
    alignment: AlignmentConfig  # the crop size the diffusion stage runs at

    @classmethod
    def of(cls, cfg) -> "AnonymizerSettings":
        return cls(cfg.anonymizer, cfg.diffusion, cfg.privacy, cfg.detection, cfg.alignment)
