"""The merge plan: what happens to each parameter, checked against every input before any
tensor data is read.

Layer rule (for filters with a ``depth``): a parameter's layer index is the first purely numeric
component of its dotted name (``encoder.layer.3.attention.self.query.weight`` -> 3,
``model.layers.10.mlp.up_proj.weight`` -> 10). With L distinct indices, layer i sits at depth
fraction (i + 1) / L. A name without an index takes its position from the checkpoint's order:
before the first indexed parameter (embeddings) it is on the input side, fraction 0, filtered
whenever depth > 0; after it (final norm, pooler, head) it is on the output side, fraction 1,
filtered only at depth 1. A model with no indexed names puts everything at fraction 1.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

import torch

from pactmerge.config import MergeConfig
from pactmerge.errors import PactMergeError
from pactmerge.finite import check_input_finite
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
    ignored_extra: dict[str, list[str]]  # model label -> names it has that the base lacks (extra_parameters: drop)
    copied_from: dict[str, int] = field(default_factory=dict)  # extra name -> model index (extra_parameters: copy)

    def describe(self, filters_with_depth: list[tuple[str, float]]) -> str:
        """A human-readable table: parameter, shape, kind, layer, which filters apply."""
        lines = [f"{len(self.params)} parameters, {self.num_layers} indexed layers"]
        for p in self.params:
            applied = [n for n, d in filters_with_depth if p.is_matrix and p.in_depth(d)] if p.kind != "copy" else []
            layer = "-" if p.layer is None else str(p.layer)
            filt = ",".join(applied) if applied else "-"
            lines.append(f"  {p.name:<60} {str(list(p.shape)):<16} {p.kind:<6} layer={layer:<4} filters={filt}")
        for label, names in self.ignored_extra.items():
            lines.append(
                f"  note: {label} has {len(names)} parameter(s) the base lacks, dropped (extra_parameters: drop;"
                f" e.g. {names[0]!r})"
            )
        for name, i in self.copied_from.items():
            lines.append(f"  note: {name!r} is not in the base: copied from models[{i}] (extra_parameters: copy)")
        return "\n".join(lines)


def build_plan(cfg: MergeConfig, base: Source, models: list[Source]) -> Plan:
    """Check every model against the base (keys, shapes, dtypes) and classify each parameter."""
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
                    f" {base.dtype(name)}"
                )
    copied_from, ignored = extra_parameters(cfg.extra_parameters, base, models)

    indices = [layer_index(n) for n in names]
    distinct = sorted({i for i in indices if i is not None})
    rank = {i: r for r, i in enumerate(distinct)}
    first_indexed = next((pos for pos, i in enumerate(indices) if i is not None), None)
    params = []
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
        params.append(ParamInfo(name, tuple(shape), dtype, kind, idx, frac))
    for name, i in copied_from.items():  # after the base's parameters, copied as they are
        params.append(ParamInfo(name, tuple(models[i].shape(name)), models[i].dtype(name), "copy", None, 1.0))
    return Plan(params, len(distinct), ignored, copied_from)


def extra_parameters(mode: str, base: Source, models: list[Source]) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Parameters some model has and the base lacks, handled as ``extra_parameters`` says.

    ``error`` (the default): a :class:`PactMergeError` naming them (a merge would silently drop
    them: a fine-tune's new head, a renamed layer). ``copy``: each is written to the output as
    the one model holding it has it; held by several models, it is an error (which one?).
    ``drop``: left out, as the dry run notes.

    Returns:
        ``({name: model index}`` to copy, ``{model label: names}`` dropped).
    """
    extra = {i: [n for n in src.names() if n not in base] for i, src in enumerate(models)}
    extra = {i: names for i, names in extra.items() if names}
    if mode == "drop" or not extra:
        return {}, {models[i].label: names for i, names in extra.items()}
    if mode == "error":
        i, names = next(iter(extra.items()))
        shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise PactMergeError(
            f"{models[i].label}: {len(names)} parameter(s) not in the base model {base.label}: {shown}; set"
            " extra_parameters: copy to copy them from this model into the output, or extra_parameters: drop"
            " to leave them out"
        )
    owner: dict[str, int] = {}
    for i, names in extra.items():
        for name in names:
            if name in owner:
                raise PactMergeError(
                    f"{models[i].label}: parameter {name!r} is not in the base model, and {models[owner[name]].label}"
                    " has it too: extra_parameters: copy takes each extra parameter from the one model that has it"
                    " (remove it from all but one model, or set extra_parameters: drop)"
                )
            owner[name] = i
    return owner, {}


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
    """Refuse an input tensor holding NaN/Inf (one reduction; see :mod:`pactmerge.finite`)."""
    check_input_finite(t, label, name)
