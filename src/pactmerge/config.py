"""The merge configuration (YAML or Python), validated with errors that name the offending key."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pactmerge.errors import PactMergeError
from pactmerge.registry import Spec, get_filter, get_method

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
        if not isinstance(v, (str, os.PathLike, Mapping)):
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

    @field_validator("models", mode="before")
    @classmethod
    def _shorthand(cls, v):
        # `models: [a, b]` is short for `models: [{model: a}, {model: b}]`.
        if isinstance(v, list):
            return [x if isinstance(x, (dict, ModelEntry)) and "model" in x else {"model": x} for x in v]
        return v

    @field_validator("base_model")
    @classmethod
    def _base_ref(cls, v):
        if not isinstance(v, (str, os.PathLike, Mapping)):
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
    def _check_names(self):
        # Resolve now so an unknown method/filter/parameter fails at load time.
        self.resolved_method()
        self.resolved_filters()
        return self

    # -- resolution into registry specs with validated parameter objects --------------------

    def resolved_method(self) -> tuple[Spec, BaseModel]:
        spec = get_method(self.method)
        return spec, _validate_params(spec, self.parameters, "parameters")

    def resolved_filters(self) -> list[tuple[Spec, BaseModel]]:
        entries: list[tuple[str, dict, str]] = []  # (filter name, its parameters, where they came from)
        if self.filters is None:
            if self.pact is not None:
                entries.append(("pact", self.pact, "pact"))
        else:
            for i, item in enumerate(self.filters):
                if isinstance(item, str):
                    # A bare `pact` takes its parameters from the top-level `pact:` block.
                    if item == "pact" and self.pact is not None:
                        entries.append((item, self.pact, "pact"))
                    else:
                        entries.append((item, {}, f"filters[{i}]"))
                elif isinstance(item, dict) and len(item) == 1:
                    ((name, params),) = item.items()
                    entries.append((name, params or {}, f"filters[{i}].{name}"))
                else:
                    raise PactMergeError("config key 'filters': each entry is a filter name or {name: {parameters}}")
        return [(spec := get_filter(name), _validate_params(spec, params, where)) for name, params, where in entries]

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _validate_params(spec: Spec, params: Mapping, where: str) -> BaseModel:
    try:
        return spec.params.model_validate(dict(params))
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise PactMergeError(f"config key '{where}.{loc}' ({spec.name}): {msg}") from None


def _format_validation_error(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "<root>"
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{source}: config key '{loc}': {msg}{more}"


def load_config(data: Mapping | str | os.PathLike | MergeConfig) -> MergeConfig:
    """A :class:`MergeConfig` from a mapping, a YAML file path, or an existing config."""
    if isinstance(data, MergeConfig):
        return data
    source = "config"
    base_dir = None
    if not isinstance(data, Mapping):
        path = Path(data)
        source = str(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise PactMergeError(f"{path}: cannot read config ({e.strerror})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PactMergeError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, Mapping):
            raise PactMergeError(f"{path}: the config must be a YAML mapping")
        base_dir = path.parent
        data = _resolve_paths(dict(data), base_dir)
    try:
        return MergeConfig.model_validate(dict(data))
    except ValidationError as e:
        raise PactMergeError(_format_validation_error(e, source)) from None
    except PactMergeError as e:
        raise PactMergeError(f"{source}: {e}") from None


def _resolve_paths(data: dict, base_dir: Path) -> dict:
    """Relative model paths are taken relative to the current directory if they exist there,
    else relative to the config file's folder."""

    def fix(p):
        if isinstance(p, str) and not os.path.isabs(p) and not os.path.exists(p) and (base_dir / p).exists():
            return str(base_dir / p)
        return p

    if "base_model" in data:
        data["base_model"] = fix(data["base_model"])
    if isinstance(data.get("models"), list):
        data["models"] = [
            {**m, "model": fix(m.get("model"))} if isinstance(m, dict) else fix(m) for m in data["models"]
        ]
    return data


def config_to_yaml(cfg: MergeConfig) -> str:
    """The config as YAML (in-memory state dicts written as a placeholder)."""
    d = cfg.model_dump(mode="python")

    def ref(x):
        return str(x) if isinstance(x, (str, os.PathLike)) else "<in-memory state dict>"

    d["base_model"] = ref(d["base_model"])
    for m in d["models"]:
        m["model"] = ref(m["model"])
    return yaml.safe_dump(d, sort_keys=False)
