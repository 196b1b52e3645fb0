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
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pactmerge.config import MergeConfig
from pactmerge.errors import PactMergeError
from pactmerge.finite import check_input_finite
from pactmerge.io.architectures import in_out_weights, is_optional_buffer, read_model_config
from pactmerge.io.sources import Source
from pactmerge.pipeline import Stage
from pactmerge.registry import ParamContext, ParamInfo

_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def layer_index(name: str) -> int | None:
    m = _INDEX.search(name)
    return int(m.group(1)) if m else None


@dataclass
class Plan:
    params: list[ParamInfo]
    num_layers: int
    ignored_extra: dict[str, list[str]]  # model label -> names it has that the base lacks (left out)
    from_base: dict[str, list[str]] = field(default_factory=dict)  # name -> labels of the models lacking it
    copied_from: dict[str, int] = field(default_factory=dict)  # extra name -> model index (extra_parameters: copy)
    # model label -> {(model dtype, base dtype): names} for parameters stored in another float dtype
    mixed_dtypes: dict[str, dict[tuple[torch.dtype, torch.dtype], list[str]]] = field(default_factory=dict)
    compute_dtype: torch.dtype = torch.float32

    def describe(self, filters: Sequence[Stage]) -> str:
        """A human-readable table: parameter, shape, kind, layer, which ``filters`` apply; then notes
        (parameters a filter bypasses and why, (in, out) weights, parameters copied from the base)."""
        lines = [f"{len(self.params)} parameters, {self.num_layers} indexed layers"]
        bypassed: list[str] = []
        for p in self.params:
            applied = []
            for stage in filters if p.is_matrix else ():
                if not p.in_depth(stage.depth):
                    continue
                reason = stage.bypass(p)
                if reason is None:
                    applied.append(stage.name)
                else:
                    bypassed.append(f"  note: {stage.name} bypasses {p.name!r} {list(p.shape)}: {reason}")
            layer = "-" if p.layer is None else str(p.layer)
            filt = ",".join(applied) if applied else "-"
            stored = " (in,out)" if p.transposed else ""
            lines.append(f"  {p.name:<60} {str(list(p.shape)):<16} {p.kind:<6} layer={layer:<4} filters={filt}{stored}")
        lines += bypassed
        transposed = [p.name for p in self.params if p.transposed]
        if transposed:
            lines.append(
                f"  note: {len(transposed)} weight(s) stored (in, out) (e.g. {transposed[0]!r}): filters and the"
                " method see them as (out, in)"
            )
        for name, labels in self.from_base.items():
            lines.append(f"  note: {name!r} is missing from {', '.join(labels)}: copied from the base")
        for label, names in self.ignored_extra.items():
            lines.append(
                f"  note: {label} has {len(names)} parameter(s) the base lacks, dropped (extra_parameters: drop;"
                f" e.g. {names[0]!r})"
            )
        for name, i in self.copied_from.items():
            lines.append(f"  note: {name!r} is not in the base: copied from models[{i}] (extra_parameters: copy)")
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
    """Check every model against the base (keys, shapes, dtype kinds) and classify each parameter.

    A base parameter a model lacks is an error, unless it is ``exclude``d or an optional buffer
    (:func:`pactmerge.io.architectures.is_optional_buffer`): then it is copied from the base.
    2-D weights the architecture stores ``(in, out)`` are marked ``transposed``; mixed
    floating-point dtypes are recorded (see the module doc).
    """
    excludes = [re.compile(p) for p in cfg.exclude]
    names = base.names()
    if not names:
        raise PactMergeError(f"{base.label}: the base model has no parameters")
    arch_config = read_model_config(base.folder)
    from_base: dict[str, list[str]] = {}  # name -> labels of the models that lack it
    for src in models:
        for name in names:
            if any(r.search(name) for r in excludes):
                continue  # copied from the base: the models need not have it (e.g. a base's own task head)
            if name not in src:
                if any(r.search(name) for r in excludes) or is_optional_buffer(name, arch_config):
                    from_base.setdefault(name, []).append(src.label)
                    continue
                raise PactMergeError(
                    f"{src.label}: missing parameter {name!r} (present in the base model {base.label};"
                    " list it in 'exclude' to keep the base's value)"
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
    in_out = in_out_weights(arch_config, {n: tuple(base.shape(n)) for n in names})
    copied_from, ignored = extra_parameters(cfg.extra_parameters, base, models, arch_config)

    indices = [layer_index(n) for n in names]
    distinct = sorted({i for i in indices if i is not None})
    rank = {i: r for r, i in enumerate(distinct)}
    first_indexed = next((pos for pos, i in enumerate(indices) if i is not None), None)
    params = []
    mixed: dict[str, dict[tuple[torch.dtype, torch.dtype], list[str]]] = {}
    for pos, (name, idx) in enumerate(zip(names, indices)):
        shape, dtype = base.shape(name), base.dtype(name)
        if not dtype.is_floating_point or name in from_base or any(r.search(name) for r in excludes):
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
        model_dtypes = tuple(src.dtype(name) if name in src else dtype for src in models)
        for src, mine in zip(models, model_dtypes):
            if kind != "copy" and mine != dtype:
                mixed.setdefault(src.label, {}).setdefault((mine, dtype), []).append(name)
        params.append(
            ParamInfo(
                name,
                tuple(shape),
                dtype,
                kind,
                idx,
                frac,
                transposed=name in in_out,
                num_models=len(models),
                layer_rank=None if idx is None else rank[idx],
                num_layers=len(distinct),
                model_dtypes=model_dtypes,
            )
        )
    for name, i in copied_from.items():  # after the base's parameters, copied as they are
        params.append(ParamInfo(name, tuple(models[i].shape(name)), models[i].dtype(name), "copy", None, 1.0))
    return Plan(params, len(distinct), ignored, from_base, copied_from, mixed, cfg.compute_dtype)


def extra_parameters(
    mode: str, base: Source, models: list[Source], arch_config: dict | None = None
) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Parameters some model has and the base lacks, handled as ``extra_parameters`` says.

    ``error`` (the default): a :class:`PactMergeError` naming them (a merge would silently drop
    them: a fine-tune's new head, a renamed layer). ``copy``: each is written to the output as
    the one model holding it has it; held by several models, it is an error (which one?).
    ``drop``: left out, as the dry run notes. An optional buffer the base lacks (``position_ids``
    saved by an older transformers, see :func:`pactmerge.io.architectures.is_optional_buffer`) is
    always left out: the output follows the base.

    Returns:
        ``({name: model index}`` to copy, ``{model label: names}`` left out).
    """
    extra = {i: [n for n in src.names() if n not in base] for i, src in enumerate(models)}
    optional = {i: [n for n in names if is_optional_buffer(n, arch_config)] for i, names in extra.items()}
    extra = {i: [n for n in names if n not in optional[i]] for i, names in extra.items()}
    extra = {i: names for i, names in extra.items() if names}
    left_out = {models[i].label: names for i, names in optional.items() if names}
    if mode == "drop" or not extra:
        for i, names in extra.items():
            left_out.setdefault(models[i].label, []).extend(names)
        return {}, left_out
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
    return owner, left_out


def param_seed(seed: int, name: str) -> int:
    """A per-parameter seed independent of processing order."""
    return (seed * 2_654_435_761 + zlib.crc32(name.encode())) % (2**62)


def make_context(cfg: MergeConfig, info: ParamInfo, stats: dict | None = None) -> ParamContext:
    return ParamContext(
        info=info,
        seed=param_seed(cfg.seed, info.name),
        weights=[m.weight for m in cfg.models],
        model_params=[dict(p) for p in cfg.pipeline.model_params],
        stats=stats if stats is not None else {},
    )


def check_finite(t: torch.Tensor, label: str, name: str) -> None:
    """Refuse an input tensor holding NaN/Inf (one reduction; see :mod:`pactmerge.finite`)."""
    check_input_finite(t, label, name)
