"""The base of every config section (unknown keys are errors) and a stage's Ray resources."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
