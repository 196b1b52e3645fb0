"""The merge configuration schema (pydantic), validated with errors that name the offending key.

A validated :class:`MergeConfig` carries its resolved :class:`~pactmerge.pipeline.Pipeline`
(``cfg.pipeline``): the method and filters are looked up and their options checked once, here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from pactmerge.config.evaluation import EvaluationConfig, check_model_tasks
from pactmerge.errors import PactMergeError
from pactmerge.io.writer import parse_size
from pactmerge.pipeline import Pipeline, resolve_pipeline
from pactmerge.stats.settings import CalibrationSettings
from pactmerge.validation import StrictModel, check_fits_dtype

ModelRef = str | os.PathLike | Mapping  # a path, or an in-memory state dict (Python API)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelEntry(StrictModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: Any  # ModelRef; pydantic can't validate a dict of tensors, so checked below
    weight: float = 1.0  # per-model weight for methods that have one (Task Arithmetic, weight_average, ...)
    # Per-model options of the method/filters (e.g. TIES's density), checked by pactmerge.pipeline.
    parameters: dict[str, Any] = Field(default_factory=dict)
    task: str | None = None  # the evaluation task this model was fine-tuned for (evaluation.tasks)

    @model_validator(mode="before")
    @classmethod
    def _weight_in_parameters(cls, v):
        # `parameters: {weight: w}` (mergekit's spelling) is the model's weight.
        if isinstance(v, Mapping) and isinstance(v.get("parameters"), Mapping) and "weight" in v["parameters"]:
            params = dict(v["parameters"])
            w = params.pop("weight")
            if "weight" in v and v["weight"] != w:
                raise ValueError(f"weight is given twice ({v['weight']!r} and parameters.weight {w!r}); keep one")
            v = {**v, "weight": w, "parameters": params}
        return v

    @field_validator("model")
    @classmethod
    def _ref(cls, v):
        if not isinstance(v, str | os.PathLike | Mapping):
            raise ValueError("must be a path or a state dict")
        return v


class MergeConfig(StrictModel):
    """See the README for every key. ``filters`` lists the filters in the order they run; a
    ``pact:`` block alone means ``filters: [pact]`` with those parameters. Validation is strict
    (:mod:`pactmerge.validation`): a bool is not a number, floats are finite."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    base_model: Any
    models: list[ModelEntry] = Field(min_length=1)
    method: str = "task_arithmetic"
    alpha: float | Literal["search"] = 1.0  # "search": chosen on the validation split (needs `evaluation`)
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
    # The output vocabulary when the inputs' vocabularies differ (pactmerge.io.vocab): "base",
    # "union", or the path of one of the models. None: differing vocabularies are an error.
    tokenizer_source: str | None = None
    # A Jinja chat template written into the output's tokenizer_config.json (pactmerge.io.hf_files).
    chat_template: str | None = None
    # A NaN/Inf in any input or output tensor is an error unless this is set (pactmerge.finite).
    allow_nonfinite: bool = False
    # Parameters a model has and the base lacks: an error (default), copied from the one model
    # that has them, or dropped (pactmerge.plan.extra_parameters).
    extra_parameters: Literal["error", "copy", "drop"] = "error"
    evaluation: EvaluationConfig | None = None  # the user's tasks (pactmerge.eval.session, docs/evaluate.md)
    # Data-aware stages (PAVE, RegMean, Fisher): how the calibration pass runs (pactmerge.stats).
    calibration: CalibrationSettings | None = None

    _pipeline: Pipeline | None = PrivateAttr(default=None)
    # The YAML text the config was loaded from (the model card quotes it), None for in-memory configs.
    _source_text: str | None = PrivateAttr(default=None)

    @field_validator("models", mode="before")
    @classmethod
    def _shorthand(cls, v):
        # `models: [a, b]` is short for `models: [{model: a}, {model: b}]`.
        if isinstance(v, list | tuple):
            return [x if isinstance(x, dict | ModelEntry) and "model" in x else {"model": x} for x in v]
        return v

    @field_validator("base_model")
    @classmethod
    def _base_ref(cls, v):
        if not isinstance(v, str | os.PathLike | Mapping):
            raise ValueError("must be a path or a state dict")
        return v

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha(cls, v):
        if isinstance(v, str) and v != "search":
            raise ValueError(f"must be a number or 'search', not {v!r}")
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

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v):
        parse_size(v)  # a ValueError naming the accepted forms
        return v

    @model_validator(mode="after")
    def _numbers_fit(self):
        # alpha and the weights multiply tensors of the compute dtype: beyond its range torch
        # refuses the product (float32: |x| <= 3.4e38).
        if self.alpha != "search":
            check_fits_dtype(self.alpha, self.compute_dtype, "alpha", "lower it or set dtype: float64")
        for i, m in enumerate(self.models):
            check_fits_dtype(m.weight, self.compute_dtype, f"models[{i}].weight", "lower it or set dtype: float64")
        if self.output == "adapter" and self.extra_parameters == "copy":
            raise PactMergeError(
                "config key 'extra_parameters': copy cannot be used with output: adapter (an adapter holds"
                " only updates of the base's weights)"
            )
        return self

    @model_validator(mode="after")
    def _evaluation(self):
        if self.alpha == "search" and self.evaluation is None:
            raise ValueError("alpha: search chooses alpha on validation data; it needs an `evaluation:` block")
        check_model_tasks([m.task for m in self.models], self.evaluation)
        return self

    @model_validator(mode="after")
    def _resolve(self):
        # Resolve now so an unknown method/filter/option fails at load time, and only once.
        self._pipeline = self._resolve_pipeline()
        return self

    def _resolve_pipeline(self) -> Pipeline:
        models = [(m.weight, m.parameters) for m in self.models]
        return resolve_pipeline(self.method, self.parameters, self.filters, self.pact, models)

    @property
    def pipeline(self) -> Pipeline:
        """The resolved method and filters (see :mod:`pactmerge.pipeline`)."""
        if self._pipeline is None:  # a config built with model_construct(): resolve on first use
            self._pipeline = self._resolve_pipeline()
        return self._pipeline

    @property
    def source_text(self) -> str | None:
        """The YAML text this config was loaded from, verbatim (None if it was built in memory)."""
        return self._source_text

    @property
    def fixed_alpha(self) -> float:
        """``alpha`` as a number; ``alpha: search`` has none until an evaluation has chosen it."""
        if isinstance(self.alpha, str):
            raise PactMergeError(
                "alpha: search is chosen on validation data by pactmerge.merge / `pactmerge merge` (the"
                " evaluation block); this code path needs a number"
            )
        return float(self.alpha)

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
