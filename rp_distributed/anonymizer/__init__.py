"""Aligned face crops in, anonymized crops out (the anonymizer stage's work, without Ray)."""

from .anonymizer import Anonymizer
from .settings import AnonymizerSettings

__all__ = ["Anonymizer", "AnonymizerSettings"]
