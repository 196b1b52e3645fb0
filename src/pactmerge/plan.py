"""The merge plan: what happens to each parameter, checked against every input before any
tensor data is read.

Layer rule (for filters with a ``depth``): a parameter's layer index is the first purely numeric
component of its dotted name (``encoder.layer.3.attention.self.query.weight`` -> 3,
``model.layers.10.mlp.up_proj.weight`` -> 10). With L distinct indices, layer i sits at depth
fraction (i + 1) / L. A name without an index takes its position from the checkpoint's order:
before the first indexed parameter (embeddings) it is on the input side, fraction 0, filtered
whenever depth > 0; after it (final norm, pooler, head) it is on the output side, fraction 1,
filtered only at depth 1. A model with no indexed names puts everything at fraction 1.

Dtype rule: a model may store a parameter in another floating-point dtype than the base (a
bfloat16 fine-tune of a float32 base). That is allowed: every tensor is cast to the compute dtype
(``dtype:``) before ``Delta_t = theta_t - theta_0``, the output keeps the base's dtype (or
``out_dtype``), each parameter's :attr:`ParamInfo.model_dtypes` records the models' storage dtypes
(PACT's rank-revealing tolerance uses the coarsest one per task), and :meth:`Plan.describe` (``--dry-run``)
reports every such mismatch. A floating-point parameter against an integer/bool one is an error.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

import torch

from pactmerge.config import MergeConfig
from pactmerge.errors import PactMergeError
from pactmerge.io.sources import Source
from pactmerge.registry import ParamContext, ParamInfo

_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def layer_index(name: str) -> int | None:
    m = _INDEX.search(name)
    return int(m.group(1)) if m else None


@dataclass
class Plan:
    params: list[ParamInfo]
    num_layers: int
    ignored_extra: dict[str, list[str]]  # model label -> names it has that the base lacks
    # model label -> {(model dtype, base dtype): names} for parameters stored in another float dtype
    mixed_dtypes: dict[str, dict[tuple[torch.dtype, torch.dtype], list[str]]] = field(default_factory=dict)
    compute_dtype: torch.dtype = torch.float32

    def describe(self, filters_with_depth: list[tuple[str, float]]) -> str:
        """A human-readable table: parameter, shape, kind, layer, which filters apply."""
        lines = [f"{len(self.params)} parameters, {self.num_layers} indexed layers"]
        for p in self.params:
            applied = [n for n, d in filters_with_depth if p.is_matrix and p.in_depth(d)] if p.kind != "copy" else []
            layer = "-" if p.layer is None else str(p.layer)
            filt = ",".join(applied) if applied else "-"
            lines.append(f"  {p.name:<60} {str(list(p.shape)):<16} {p.kind:<6} layer={layer:<4} filters={filt}")
        for label, names in self.ignored_extra.items():
            lines.append(f"  note: {label} has {len(names)} parameter(s) the base lacks, ignored (e.g. {names[0]!r})")
        lines.extend(self.dtype_notes())
        return "\n".join(lines)

    def dtype_notes(self) -> list[str]:
        """One line per (model, model dtype, base dtype) whose storage dtypes differ."""
        compute = _dtype_name(self.compute_dtype)
        lines = []
        for label, groups in self.mixed_dtypes.items():
            for (mine, theirs), names in groups.items():
                coarser = torch.finfo(mine).eps > torch.finfo(theirs).eps
                lines.append(
                    f"  note: {label} stores {len(names)} parameter(s) as {_dtype_name(mine)}, the base as"
                    f" {_dtype_name(theirs)} (e.g. {names[0]!r}); task vectors are computed in {compute}"
                    + (f", and carry the base's rounding to {_dtype_name(mine)}" if coarser else "")
                )
        return lines


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_plan(cfg: MergeConfig, base: Source, models: list[Source]) -> Plan:
    """Check every model against the base (keys, shapes, dtype kinds) and classify each parameter;
    mixed floating-point dtypes are recorded (see the module doc)."""
    excludes = [re.compile(p) for p in cfg.exclude]
    names = base.names()
    if not names:
        raise PactMergeError(f"{base.label}: the base model has no parameters")
    for src in models:
        for name in names:
            if name not in src:
                raise PactMergeError(
                    f"{src.label}: missing parameter {name!r} (present in the base model {base.label})"
                )
            if src.shape(name) != base.shape(name):
                raise PactMergeError(
                    f"{src.label}: parameter {name!r} has shape {list(src.shape(name))}, the base model has"
                    f" {list(base.shape(name))}"
                )
            if base.dtype(name).is_floating_point != src.dtype(name).is_floating_point:
                raise PactMergeError(
                    f"{src.label}: parameter {name!r} has dtype {src.dtype(name)}, the base model has"
                    f" {base.dtype(name)} (a floating-point tensor cannot be merged with an integer or bool one)"
                )
    ignored = {}
    for src in models:
        extra = [n for n in src.names() if n not in base]
        if extra:
            ignored[src.label] = extra

    indices = [layer_index(n) for n in names]
    distinct = sorted({i for i in indices if i is not None})
    rank = {i: r for r, i in enumerate(distinct)}
    first_indexed = next((pos for pos, i in enumerate(indices) if i is not None), None)
    params = []
    mixed: dict[str, dict[tuple[torch.dtype, torch.dtype], list[str]]] = {}
    for pos, (name, idx) in enumerate(zip(names, indices)):
        shape, dtype = base.shape(name), base.dtype(name)
        if not dtype.is_floating_point or any(r.search(name) for r in excludes):
            kind = "copy"
        elif len(shape) == 2:
            kind = "matrix"
        else:
            kind = "vector"
        if idx is not None:
            frac = (rank[idx] + 1) / len(distinct)
        elif first_indexed is not None and pos < first_indexed:
            frac = 0.0
        else:
            frac = 1.0
        model_dtypes = tuple(src.dtype(name) for src in models)
        for src, mine in zip(models, model_dtypes):
            if kind != "copy" and mine != dtype:
                mixed.setdefault(src.label, {}).setdefault((mine, dtype), []).append(name)
        params.append(ParamInfo(name, tuple(shape), dtype, kind, idx, frac, model_dtypes=model_dtypes))
    return Plan(params, len(distinct), ignored, mixed, cfg.compute_dtype)


def param_seed(seed: int, name: str) -> int:
    """A per-parameter seed independent of processing order."""
    return (seed * 2_654_435_761 + zlib.crc32(name.encode())) % (2**62)


def make_context(cfg: MergeConfig, info: ParamInfo, stats: dict | None = None) -> ParamContext:
    return ParamContext(
        info=info,
        seed=param_seed(cfg.seed, info.name),
        weights=[m.weight for m in cfg.models],
        model_params=[dict(m.parameters) for m in cfg.models],
        stats=stats if stats is not None else {},
    )


def check_finite(t: torch.Tensor, label: str, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise PactMergeError(f"{label}: parameter {name!r} contains {bad}")
