"""The base of every config section (unknown keys are errors), a stage's Ray resources, and how a setting
declares that it cannot change an exported face (``outside_fingerprint``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


FINGERPRINT_OUT = "outside_fingerprint"  # json_schema_extra key: why the setting cannot change an exported face
FINGERPRINT_WHEN_SET = "in_fingerprint_when_set"  # json_schema_extra key: in the fingerprint only when not None

RESOURCES = "resources (actors, CPUs, GPUs, batch rows): where and how fast, never what"
EXECUTION = "how the work runs on the device: results differ by float rounding only (tests/test_diffusion.py)"
PATH_BY_DIGEST = "a path: the files' bytes are in the fingerprint (settings['models'], by sha256), not where they lie"


def outside_fingerprint(why: str) -> dict:
    """``json_schema_extra`` of a setting that cannot change an exported face, with the reason: it is left out of
    the settings fingerprint (``config.fingerprint``), and tests/test_fingerprint.py holds every setting to its
    declaration (changing one that is in must change the fingerprint; one that is out must not)."""
    return {FINGERPRINT_OUT: why}


# A setting added after fingerprints were first recorded: in the fingerprint only when set, so the fingerprints
# of configs that do not set it stay what they were.
WHEN_SET = {FINGERPRINT_WHEN_SET: True}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class StageResources(_Section):
    """Ray resources of one stage: a pool of ``concurrency`` actors, each with these resources.

    ``concurrency: 8`` is a fixed pool; ``concurrency: [2, 8]`` an autoscaling one (Ray Data grows it from 2
    to 8 actors while inputs queue and the cluster has room, e.g. as KubeRay adds GPU nodes).
    """

    concurrency: int | tuple[int, int] = Field(1, description="actors: N, or [min, max] to autoscale")
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0, ge=0)
    batch_size: int = Field(4, ge=1, description="rows per Ray Data batch")

    @field_validator("concurrency")
    @classmethod
    def _pool(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1 or hi < lo:
            raise ValueError(f"must be N >= 1 or [min, max] with 1 <= min <= max (got {v})")
        return v

    @property
    def pool_bounds(self) -> tuple[int, int]:
        """(min, max) actors."""
        c = self.concurrency
        return (c, c) if isinstance(c, int) else (c[0], c[1])
