"""Pseudonyms: one synthetic identity per real person (shared/ALGORITHM.md, "Pseudonyms").

A subject table names each face's ``subject`` (a person's key in the user's records); a job secret, the
pseudonym key, maps each subject to its pseudonym. The key is read from an environment variable or a secret
file on the driver only (``rp_distributed/pseudonyms.py``): it is never in the YAML, the config JSON, a log or
an output, and only its HMAC digest enters the settings fingerprint."""

from __future__ import annotations

from pydantic import Field, field_validator

from .base import _Section, outside_fingerprint

KEY_SOURCE = ("where the key is read from: the key's own HMAC digest is in the fingerprint (settings "
              "['pseudonym_key']), so the same key read elsewhere changes nothing and another key redoes the job")


class PseudonymsConfig(_Section):
    """Subjects from a side table joined into the plan like ``prompts.table``: each row names an image
    (``path_column``) and optionally one face of it by ``face_index`` (this job's numbering: largest first) or
    by a box ``x0, y0, x1, y1`` (the detected face overlapping it most, IoU at least ``box_iou``); a row naming
    neither applies to every face of the image. Faces no row names get no subject (a fresh per-face result)."""

    table: str | None = Field(None, description="Parquet, CSV or JSON-lines subject table (file or URI); null: "
                              "no subjects. Needs the pseudonym key (key_env or key_file)")
    path_column: str = "path"
    subject_column: str = "subject"
    box_iou: float = Field(0.5, gt=0, le=1, description="least IoU between a row's box and the face it names")
    scale: float = Field(0.0, ge=0, le=20, allow_inf_nan=False, description="h, the pseudonym guidance of "
                         "reverse personalization (the third branch); 0: generation as without subjects, the "
                         "manifest still links faces by pseudonym_id. No default is measured: run the sweep in "
                         "README 'Pseudonyms' on real weights")
    key_env: str = Field("RP_PSEUDONYM_KEY", description="environment variable holding the pseudonym key (at "
                         "least 16 bytes), read on the driver", json_schema_extra=outside_fingerprint(KEY_SOURCE))
    key_file: str | None = Field(None, description="file holding the pseudonym key (a mounted secret); wins over "
                                 "key_env", json_schema_extra=outside_fingerprint(KEY_SOURCE))

    @field_validator("key_env")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "=" in v or "\0" in v:
            raise ValueError("must be the name of an environment variable (the key itself never goes in the config)")
        return v
