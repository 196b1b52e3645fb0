"""The merge configuration schema (pydantic), validated with errors that name the offending key.

A validated :class:`MergeConfig` carries its resolved :class:`~pactmerge.pipeline.Pipeline`
(``cfg.pipeline``): the method and filters are looked up and their options checked once, here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from pactmerge.pipeline import Pipeline, resolve_pipeline
from pactmerge.stats.settings import CalibrationSettings

ModelRef = str | os.PathLike | Mapping  # a path, or an in-memory state dict (Python API)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: Any  # ModelRef; pydantic can't validate a dict of tensors, so checked below
    weight: float = 1.0  # per-model weight for methods that have one (Task Arithmetic, weight_average, ...)
    parameters: dict[str, Any] = Field(default_factory=dict)  # per-model method options (e.g. a lambda)

    @field_validator("model")
    @classmethod
    def _ref(cls, v):
        if not isinstance(v, str | os.PathLike | Mapping):
            raise ValueError("must be a path or a state dict")
        return v


class MergeConfig(BaseModel):
    """See the README for every key. ``filters`` lists the filters in the order they run; a
    ``pact:`` block alone means ``filters: [pact]`` with those parameters."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    base_model: Any
    models: list[ModelEntry] = Field(min_length=1)
    method: str = "task_arithmetic"
    alpha: float = 1.0
    parameters: dict[str, Any] = Field(default_factory=dict)
    pact: dict[str, Any] | None = None
    filters: list[str | dict[str, dict[str, Any]]] | None = None
    exclude: list[str] = Field(default_factory=list)
    dtype: Literal["float32", "float64"] = "float32"
    out_dtype: Literal["float32", "float64", "float16", "bfloat16"] | None = None
    seed: int = 0
    max_shard_size: int | str = "2GB"
    # `adapter`: write the merged update as a PEFT LoRA adapter folder instead of dense weights
    # (pactmerge.io.adapter_writer); rank = the update's numerical rank, at most `adapter_rank`.
    output: Literal["dense", "adapter"] = "dense"
    adapter_rank: int | None = Field(None, ge=1)
    # Data-aware stages (PAVE, RegMean, Fisher): how the calibration pass runs (pactmerge.stats).
    calibration: CalibrationSettings | None = None

    _pipeline: Pipeline | None = PrivateAttr(default=None)

    @field_validator("models", mode="before")
    @classmethod
    def _shorthand(cls, v):
        # `models: [a, b]` is short for `models: [{model: a}, {model: b}]`.
        if isinstance(v, list):
            return [x if isinstance(x, dict | ModelEntry) and "model" in x else {"model": x} for x in v]
        return v

    @field_validator("base_model")
    @classmethod
    def _base_ref(cls, v):
        if not isinstance(v, str | os.PathLike | Mapping):
            raise ValueError("must be a path or a state dict")
        return v

    @field_validator("exclude")
    @classmethod
    def _regexes(cls, v):
        import re

        for pat in v:
            try:
                re.compile(pat)
            except re.error as e:
                raise ValueError(f"bad regex {pat!r}: {e}") from None
        return v

    @model_validator(mode="after")
    def _resolve(self):
        # Resolve now so an unknown method/filter/option fails at load time, and only once.
        self._pipeline = resolve_pipeline(self.method, self.parameters, self.filters, self.pact)
        return self

    @property
    def pipeline(self) -> Pipeline:
        """The resolved method and filters (see :mod:`pactmerge.pipeline`)."""
        if self._pipeline is None:  # a config built with model_construct(): resolve on first use
            self._pipeline = resolve_pipeline(self.method, self.parameters, self.filters, self.pact)
        return self._pipeline

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
