"""PEFT LoRA adapter folders as merge inputs.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` or
``adapter_model.bin``) fine-tunes the config's ``base_model``. :class:`LoraSource` presents it as a
full checkpoint with the base's names, shapes and dtypes (so the plan checks it like any model,
and ``get`` returns ``theta_0 + Delta``), and gives the engine each weight's update as factors
(:meth:`LoraSource.lowrank_delta`) without forming it.

Update of a targeted weight ``W`` (PEFT's LoRA, Hu et al. 2022)::

    Delta W = s * B A,      s = alpha / r   (alpha / sqrt(r) with use_rslora)

``r`` and ``alpha`` are ``rank_pattern`` / ``alpha_pattern`` entries whose key matches the module
name (the key is a regex matched against the end of the name at a dot boundary, as PEFT does), else
the config's ``r`` / ``lora_alpha``. With ``fan_in_fan_out`` the base stores ``W`` transposed
(``(in, out)``, GPT-2's Conv1D) and the update is ``(s B A)^T = (s A^T) B^T``. Untargeted weights
have a zero update.

Key names. A PEFT key ``[base_model.model.]<module>.lora_{A,B}[.<adapter>].weight`` targets the
base parameter ``<module>.weight``. When the base was saved with a different prefix (e.g. without
the ``model.`` of a causal-LM wrapper, or with a ``bert.`` the adapter's model lacks), the rule is:
a base weight ``<p>.weight`` matches when ``<p>`` and ``<module>`` are equal or one is a dotted
suffix of the other; the match must be unique, and every key of one adapter must need the same
prefix rewrite (strip ``x.`` from the adapter name, prepend ``y.``). Anything else is an error.

Unsupported (a :class:`PactMergeError` at plan time, naming the option): ``peft_type`` other than
``LORA``, ``use_dora``, ``bias`` other than ``"none"``, ``lora_bias``, ``modules_to_save``,
``target_parameters``, embedding LoRA (``lora_embedding_A/B``), convolution LoRA (4-D ``lora_A``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated

import torch
from pydantic import ConfigDict, Field, ValidationError, field_validator
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.io.hub import local_reference
from pactmerge.io.sources import Source, _open_file
from pactmerge.lowrank import LowRankDelta
from pactmerge.validation import StrictModel, describe_validation_error

ADAPTER_CONFIG = "adapter_config.json"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+?)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


class AdapterConfigKeys(StrictModel):
    """The ``adapter_config.json`` keys the merge reads, type-checked (PEFT writes many more, allowed)."""

    model_config = ConfigDict(extra="allow")

    peft_type: str | None = None
    r: int | None = Field(None, ge=1)
    lora_alpha: float | None = None
    rank_pattern: dict[str, Annotated[int, Field(ge=1)]] | None = None
    alpha_pattern: dict[str, float] | None = None
    use_rslora: bool | None = None
    fan_in_fan_out: bool | None = None

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _regex_keys(cls, v):
        for key in v or {}:
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"{key!r} is not a valid regular expression ({e})") from None
        return v


def is_adapter(ref) -> bool:
    """Whether a model reference is a PEFT adapter folder (a path, or a Hub id in the local cache)."""
    if not isinstance(ref, (str, Path)):
        return False
    return (Path(local_reference(ref)).expanduser() / ADAPTER_CONFIG).is_file()


def pattern_value(patterns: dict | None, module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the end of the
    module name at a dot boundary (``(.*\\.)?key$``), else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(?:.*\.)?(?:{key})$", module):
            return value
    return default


def _dotted_suffix(long: str, short: str) -> bool:
    return long == short or long.endswith("." + short)


class LoraSource(Source):
    """A PEFT LoRA adapter over ``base``, seen as a full checkpoint (see module doc)."""

    def __init__(self, folder: Path, base: Source):
        folder = Path(folder).expanduser()
        super().__init__(str(folder), None)  # folder=None: the adapter's files are not the output's
        self.base = base
        cfg = self._read_config(folder)
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            weights = folder / "adapter_model.bin"
        if not weights.is_file():
            raise PactMergeError(f"{folder}: adapter folder without adapter_model.safetensors or adapter_model.bin")
        self._file = _open_file(weights)
        self.weights_file = str(weights)
        try:
            self._targets = self._map_keys(cfg)
        except BaseException:
            self._file.close()
            raise
        for name in base.names():
            self._meta[name] = (base.shape(name), base.dtype(name))

    # -- checks -----------------------------------------------------------------------------

    def _read_config(self, folder: Path) -> dict:
        path = folder / ADAPTER_CONFIG
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise PactMergeError(f"{path}: cannot read the adapter config ({e.strerror})") from None
        except (ValueError, RecursionError) as e:
            raise PactMergeError(f"{path}: cannot read the adapter config ({str(e).splitlines()[0][:200]})") from None
        if not isinstance(cfg, dict):
            raise PactMergeError(f"{path}: the adapter config must be a JSON object, not a {type(cfg).__name__}")
        try:
            AdapterConfigKeys.model_validate(cfg)
        except ValidationError as e:
            key, msg = describe_validation_error(e)
            raise PactMergeError(f"{path}: key '{key}': {msg} (fix the adapter config)") from None
        where = f"{path}:"
        if str(cfg.get("peft_type", "")).upper() != "LORA":
            raise PactMergeError(f"{where} peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
        unsupported = [
            ("use_dora", bool(cfg.get("use_dora")), "DoRA (use_dora: true) is not supported"),
            (
                "bias",
                cfg.get("bias", "none") not in ("none", None),
                f"bias {cfg.get('bias')!r} is not supported (only 'none')",
            ),
            ("lora_bias", bool(cfg.get("lora_bias")), "lora_bias: true is not supported"),
            (
                "modules_to_save",
                bool(cfg.get("modules_to_save")),
                "modules_to_save is not supported (fully trained modules)",
            ),
            ("target_parameters", bool(cfg.get("target_parameters")), "target_parameters is not supported"),
        ]
        for _, bad, msg in unsupported:
            if bad:
                raise PactMergeError(f"{where} {msg}")
        return cfg

    def _map_keys(self, cfg: dict) -> dict[str, tuple[str, str, float]]:
        """base weight name -> (key of A, key of B, scale s), with every check of the module doc."""
        label = self.weights_file
        pairs: dict[str, dict[str, str]] = {}
        adapters = set()
        for key in self._file.names():
            if "lora_embedding_" in key:
                raise PactMergeError(f"{label}: embedding LoRA ({key!r}) is not supported (only Linear-layer LoRA)")
            m = _KEY.match(key)
            if m is None:
                raise PactMergeError(
                    f"{label}: unsupported adapter key {key!r} (only lora_A / lora_B weights are supported)"
                )
            if m["adapter"]:
                adapters.add(m["adapter"])
            pairs.setdefault(m["mod"], {})[m["ab"]] = key
        if len(adapters) > 1:
            raise PactMergeError(
                f"{label}: holds several adapters ({', '.join(sorted(adapters))}); save one per folder"
            )
        if not pairs:
            raise PactMergeError(f"{label}: no lora_A / lora_B weights")
        base_weights = [n for n in self.base.names() if n.endswith(".weight")]
        targets: dict[str, tuple[str, str, float]] = {}
        rewrite = None
        for mod, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                missing = "lora_B" if "B" not in ab else "lora_A"
                raise PactMergeError(f"{label}: module {mod!r} has no {missing} weight")
            name, rule = self._match(mod, base_weights, label)
            if rewrite is None:
                rewrite = rule
            elif rule != rewrite:
                raise PactMergeError(
                    f"{label}: inconsistent key prefixes: {mod!r} -> {name!r} needs {rule}, earlier keys needed"
                    f" {rewrite}"
                )
            a_shape, b_shape = self._file.shape(ab["A"]), self._file.shape(ab["B"])
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise PactMergeError(
                    f"{label}: {mod!r} has a {len(a_shape)}-D lora_A: convolution LoRA is not supported (only"
                    " Linear layers)"
                )
            r = a_shape[0]
            if b_shape[1] != r:
                raise PactMergeError(
                    f"{label}: {mod!r}: lora_A {list(a_shape)} and lora_B {list(b_shape)} disagree on the rank"
                )
            want = (b_shape[0], a_shape[1])
            if self.fan_in_fan_out:
                want = want[::-1]
            if tuple(self.base.shape(name)) != want:
                raise PactMergeError(
                    f"{label}: {mod!r}: lora_B @ lora_A is"
                    f" {list(want)}{' (transposed: fan_in_fan_out)' if self.fan_in_fan_out else ''}"
                    f", the base weight {name!r} is {list(self.base.shape(name))}"
                )
            r_cfg = int(pattern_value(cfg.get("rank_pattern"), mod, r if cfg.get("r") is None else cfg["r"]))
            if r_cfg != r:
                raise PactMergeError(f"{label}: {mod!r}: lora_A has rank {r}, the adapter config says r = {r_cfg}")
            alpha = float(
                pattern_value(cfg.get("alpha_pattern"), mod, r if cfg.get("lora_alpha") is None else cfg["lora_alpha"])
            )
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            if name in targets:
                raise PactMergeError(f"{label}: two modules target the base weight {name!r}")
            targets[name] = (ab["A"], ab["B"], scale)
        return targets

    def _match(self, mod: str, base_weights: list[str], label: str) -> tuple[str, tuple[str, str]]:
        """The base weight for module ``mod`` and the prefix rewrite used (strip, prepend)."""
        exact = mod + ".weight"
        if exact in self.base:
            return exact, ("", "")
        cands = [
            n
            for n in base_weights
            if _dotted_suffix(n[: -len(".weight")], mod) or _dotted_suffix(mod, n[: -len(".weight")])
        ]
        if not cands:
            raise PactMergeError(
                f"{label}: the adapter targets {mod!r}, but the base model {self.base.label} has no weight {exact!r}"
                " (nor one differing only by a leading prefix)"
            )
        if len(cands) > 1:
            raise PactMergeError(
                f"{label}: the adapter module {mod!r} matches several base weights: {', '.join(cands[:4])}"
            )
        p = cands[0][: -len(".weight")]
        rule = (mod[: len(mod) - len(p)], "") if len(mod) > len(p) else ("", p[: len(p) - len(mod)])
        return cands[0], rule

    # -- reading ------------------------------------------------------------------------------

    @property
    def targets(self) -> list[str]:
        """Base weight names this adapter updates."""
        return list(self._targets)

    def file_of(self, name: str) -> str:
        return self.weights_file if name in self._targets else self.base.file_of(name)

    def lowrank_delta(self, name: str, device=None, dtype=None) -> LowRankDelta | None:
        """The update of weight ``name`` as factors (scale folded into ``B``), a rank-0 factor pair
        for an untargeted 2-D weight, ``None`` for other parameters (a zero update)."""
        if name not in self._targets:
            shape = self.shape(name)
            if len(shape) != 2:
                return None
            z = torch.zeros((), device=device, dtype=dtype)
            return LowRankDelta(z.new_zeros((shape[0], 0)), z.new_zeros((0, shape[1])))
        ka, kb, s = self._targets[name]
        a = self._file.get(ka).to(device=device, dtype=dtype)
        b = self._file.get(kb).to(device=device, dtype=dtype)
        if self.fan_in_fan_out:  # (s B A)^T = (s A^T) B^T; the row factor stays unscaled
            return LowRankDelta(a.mT.contiguous() * s, b.mT.contiguous())
        return LowRankDelta(b * s, a)

    def get(self, name: str) -> Tensor:
        base = self.base.get(name)
        if name not in self._targets:
            return base
        d = self.lowrank_delta(name, dtype=torch.float64)
        assert d is not None  # name is a target
        return (base.to(torch.float64) + d.dense()).to(base.dtype)

    def close(self) -> None:
        self._file.close()  # the base is closed by its owner


def open_adapter(ref, base: Source) -> LoraSource:
    return LoraSource(Path(local_reference(ref)), base)
