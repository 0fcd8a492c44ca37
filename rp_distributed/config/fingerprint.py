"""The settings fingerprint: a digest of the settings that decide what an exported face looks like, recorded on
every manifest row and compared on resume (an input done under another fingerprint is redone).

Every setting is in it unless its field declares otherwise (``outside_fingerprint(why)``, next to the field), and
the model files outside the diffusion tree enter by content (``modelfiles.identity``). Three sections count only
where they act, which also keeps the fingerprints of configs written before they existed: ``diffusion`` with a
generative method, ``prompts`` when it names a table (its URI, not its content), ``input`` outside detect mode,
``pseudonyms`` when it names a table (with the pseudonym key's HMAC digest, never the key).
"""

from __future__ import annotations

import hashlib
import json
import typing

from pydantic import BaseModel

from .base import FINGERPRINT_OUT, FINGERPRINT_WHEN_SET
from .job import JobConfig


def _section_model(annotation) -> type[BaseModel] | None:
    """The config section a field holds (itself or a list of them), if it holds one."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def declared(model: type[BaseModel], data):
    """``data`` (a section as JSON) keeping only what its fields declare in the fingerprint, recursively."""
    if isinstance(data, list):
        return [declared(model, item) for item in data]
    kept = {}
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra or {}
        if FINGERPRINT_OUT in extra or (extra.get(FINGERPRINT_WHEN_SET) and data[name] is None):
            continue
        sub = _section_model(field.annotation)
        kept[name] = declared(sub, data[name]) if sub is not None and data[name] is not None else data[name]
    return kept


def _acting(cfg: JobConfig) -> dict[str, bool]:
    return {"diffusion": cfg.anonymizer.generative, "prompts": cfg.anonymizer.generative and bool(cfg.prompts.table),
            "input": cfg.input.mode != "detect", "pseudonyms": bool(cfg.pseudonyms.table)}


def anonymization_settings(cfg: JobConfig) -> dict:
    """The settings that decide what an exported face looks like, as JSON data (see the module's docstring)."""
    from ..modelfiles import identity  # the detector's and the gate's weights by content digest, not their paths

    dumped, acting = cfg.model_dump(mode="json"), _acting(cfg)
    settings = {}
    for name, field in JobConfig.model_fields.items():
        section = declared(field.annotation, dumped[name])
        if section and acting.get(name, True):
            settings[name] = section
    if acting["pseudonyms"]:  # the key by its HMAC digest: another key is another job (read here: fails early)
        from ..pseudonyms import key_digest, read_key

        settings["pseudonym_key"] = key_digest(read_key(cfg.pseudonyms))
    if models := identity(cfg):  # none when they are the shipped dlib files: earlier fingerprints stay valid
        settings["models"] = models
    return settings


def anonymization_fingerprint(cfg: JobConfig) -> str:
    """A short digest of ``anonymization_settings``: recorded per manifest row, compared on resume."""
    blob = json.dumps(anonymization_settings(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
