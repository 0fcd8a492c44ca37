"""Job configuration: YAML files loaded into typed, validated sections (plain data, as in diffusers); each stage
takes the sections it uses. Unknown keys and bad values are errors that name the key."""

from .base import StageResources
from .detection import (AUDIT_PASSES, BEFORE_SMALL_AT_3X, CENTERFACE_PASSES, DEFAULT_PASSES, AuditConfig,
                        DetectionConfig, PassConfig)
from .diffusion import DiffusionConfig
from .fingerprint import anonymization_fingerprint, anonymization_settings
from .pseudonyms import PseudonymsConfig
from .job import ConfigError, JobConfig, apply_overrides, config_to_dict, load_config
from .sections import (IMAGE_EXTENSIONS, AlignmentConfig, AnonymizerConfig, InputConfig, MergeConfig, OutputConfig,
                       PrivacyConfig, PromptsConfig, RayConfig, ReportConfig)

__all__ = ["StageResources", "AUDIT_PASSES", "BEFORE_SMALL_AT_3X", "CENTERFACE_PASSES", "DEFAULT_PASSES", "AuditConfig",
           "DetectionConfig", "PassConfig", "DiffusionConfig", "anonymization_fingerprint",
           "anonymization_settings", "ConfigError", "JobConfig", "apply_overrides", "config_to_dict",
           "load_config", "IMAGE_EXTENSIONS", "AlignmentConfig", "AnonymizerConfig", "InputConfig", "MergeConfig",
           "OutputConfig", "PrivacyConfig", "PromptsConfig", "RayConfig", "ReportConfig", "PseudonymsConfig"]
