"""The whole job's config (``JobConfig``: one section per concern) and how YAML files and ``--set key=value``
overrides become one. Unknown keys and bad values are errors that name the key."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, model_validator

from .base import _Section
from .detection import DetectionConfig
from .diffusion import DiffusionConfig
from .pseudonyms import PseudonymsConfig
from .sections import (
    AlignmentConfig,
    AnonymizerConfig,
    InputConfig,
    MergeConfig,
    OutputConfig,
    PrivacyConfig,
    PromptsConfig,
    RayConfig,
    ReportConfig,
)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class JobConfig(_Section):
    input: InputConfig = InputConfig()
    output: OutputConfig = OutputConfig()
    detection: DetectionConfig = DetectionConfig()
    alignment: AlignmentConfig = AlignmentConfig()
    anonymizer: AnonymizerConfig = AnonymizerConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    merge: MergeConfig = MergeConfig()
    ray: RayConfig = RayConfig()
    report: ReportConfig = ReportConfig()
    prompts: PromptsConfig = PromptsConfig()
    pseudonyms: PseudonymsConfig = PseudonymsConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "JobConfig":
        if self.privacy.max_tries > 1 + len(self.privacy.guidance_ladder):
            raise ValueError(
                f"privacy.max_tries={self.privacy.max_tries} needs {self.privacy.max_tries - 1} rungs in "
                f"privacy.guidance_ladder, which has {len(self.privacy.guidance_ladder)}"
            )
        # Each escalation rung must be stronger (more negative) than the one before it, starting from
        # diffusion.guidance_scale: a weaker or non-negative rung would retry with less anonymization.
        ladder, g = self.privacy.guidance_ladder, self.diffusion.guidance_scale
        prev = g
        for i, rung in enumerate(ladder):
            if not math.isfinite(rung) or rung >= prev:
                what = "diffusion.guidance_scale" if i == 0 else f"rung {i - 1} ({ladder[i - 1]})"
                raise ValueError(
                    f"privacy.guidance_ladder={ladder} must grow strictly more negative, starting below "
                    f"diffusion.guidance_scale={g}: rung {i} ({rung}) is not below {what}"
                )
            prev = rung
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {exc}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
    if overrides:
        data = apply_overrides(data, list(overrides))
        source += " + overrides"
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def config_to_dict(cfg: JobConfig) -> dict:
    return cfg.model_dump(mode="json")
