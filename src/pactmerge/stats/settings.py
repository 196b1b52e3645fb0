"""The ``calibration:`` block of a merge config: how the calibration pass runs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CalibrationSettings(BaseModel):
    """How many examples each model sees, in what batches, where the statistics are cached.

    The data themselves (each model's examples, how to load and run it) come from the caller:
    :class:`pactmerge.stats.ModelData`, one per model (``pactmerge.merge(..., calibration=[...])``).
    """

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(512, ge=1, description="N: calibration examples per model (the first N of its data)")
    allow_fewer: bool = Field(
        False, description="a model with fewer than N examples uses all it has (default: an error)"
    )
    batch_size: int = Field(16, ge=1, description="examples per forward pass of the covariance pass")
    cache_dir: str | None = Field(None, description="where statistics are cached; default ~/.cache/pactmerge/stats")
    device: str = Field("cpu", description="where the calibration forward passes run: cpu, cuda, auto")
    dtype: Literal["float32", "float64"] = Field(
        "float32", description="storage precision of the statistics (accumulated in float64 either way)"
    )
