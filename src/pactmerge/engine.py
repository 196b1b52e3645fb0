"""The streaming merge engine: one parameter at a time through filters and a method.

For each parameter of the plan::

    Delta_t = theta_t - theta_0          (compute dtype, on the device)
    Delta_t <- filter(...)               for each configured "pre" filter, in order
    merged  = method(theta_0, Delta_1..T)
    merged  <- filter(...)               for each configured "post" filter (e.g. csp), in order
    theta   = theta_0 + alpha * merged   (cast to the output dtype, moved to the CPU)

Only ``T + 1`` input tensors of one parameter (plus the method's workspace) are in memory at a
time; the sources are read lazily and the writer flushes shards as they fill. Parameters that
are excluded or not floating point are copied from the base. A weight the architecture stores
``(in, out)`` (GPT-2's ``Conv1D``; :mod:`pactmerge.io.architectures`) goes through the filters and
the method as its ``(out, in)`` view and is written back in its stored layout.

LoRA adapters (``pactmerge.io.lora``): an adapter's ``Delta_t`` of a 2-D weight is a
:class:`~pactmerge.lowrank.LowRankDelta` (its factors); filters and methods registered with
``lowrank=True`` receive it as is, every other one the dense matrix (formed per parameter).

Task-specific methods (TALL masks, TSV-C; :mod:`pactmerge.modulators`) return the shared merged
task vector plus one modulator per task: post filters run on the shared vector and on every
replacement; the shared vector is what the engine yields, and the modulators go to the
``on_modulators`` callback of :func:`iter_merged_deltas` (the API writes them beside the model).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pactmerge.config import DTYPES, MergeConfig
from pactmerge.errors import PactMergeError
from pactmerge.finite import check_merged_finite, check_output_finite
from pactmerge.io.architectures import transpose_delta
from pactmerge.io.sources import Source
from pactmerge.io.vocab import VocabPlan, resolve_vocabulary
from pactmerge.lowrank import Delta, add_to, densify, tensors_of
from pactmerge.modulators import MethodResult, Modulator, map_updates, split_result, transpose_modulator
from pactmerge.pipeline import Pipeline, Stage
from pactmerge.plan import Plan, build_plan, check_finite, make_context
from pactmerge.registry import ParamContext, ParamInfo
from pactmerge.stats import Calibration, ModelData, plan_calibration


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PactMergeError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


@dataclass
class MergeInputs:
    """Opened sources plus the checked plan."""

    cfg: MergeConfig
    base: Source
    models: list[Source]
    plan: Plan
    vocab: VocabPlan | None = None  # the output vocabulary when the inputs' differ (io/vocab.py)
    calibration: Calibration | None = None  # the data-aware stages' statistics (pactmerge.stats)

    def close(self) -> None:
        if self.calibration is not None:
            self.calibration.close()
        for s in [self.base, *self.models]:
            s.close()


def open_inputs(cfg: MergeConfig, calibration_data: Sequence[ModelData] | None = None) -> MergeInputs:
    """Open and check every input. ``calibration_data``: one :class:`pactmerge.stats.ModelData` per
    model, for the stages that need statistics (checked here, computed on the first merge pass)."""
    from pactmerge.io.lora import is_adapter, open_adapter
    from pactmerge.io.sources import open_source

    opened: list[Source] = []
    try:
        base = open_source(cfg.base_model, "<in-memory base model>")
        opened.append(base)
        models = []
        for i, entry in enumerate(cfg.models):
            # A PEFT adapter folder is read over the base (its update is s B A; see io/lora.py).
            src = (
                open_adapter(entry.model, base)
                if is_adapter(entry.model)
                else open_source(entry.model, f"<in-memory model {i}>")
            )
            opened.append(src)
            models.append(src)
        # Differing vocabularies: every input is seen with the output vocabulary from here on.
        vocab = resolve_vocabulary(cfg, base, models)
        if vocab is not None:
            base, models = vocab.wrap(base, models)
        plan = build_plan(cfg, base, models)
        inputs = MergeInputs(
            cfg, base, models, plan, vocab, plan_calibration(cfg.pipeline, cfg.calibration, models, calibration_data)
        )
        check_plan(inputs)
        return inputs
    except BaseException:
        for s in opened:
            s.close()
        raise


def check_plan(inputs: MergeInputs) -> None:
    """Let every method/filter reject parameters up front (e.g. a rank out of range)."""
    stages = inputs.cfg.pipeline.stages
    for info in inputs.plan.params:
        if info.kind == "copy":
            continue
        for stage in stages:
            if stage.spec.check is not None:
                stage.spec.check(stage.params, info)


def read_deltas(
    inputs: MergeInputs, info: ParamInfo, device: torch.device, lowrank: bool = False
) -> tuple[Tensor, list[Delta]]:
    """``(theta_0, [Delta_t])`` of one parameter in the compute dtype on ``device``. An adapter's
    update of a 2-D weight is a :class:`LowRankDelta` when ``lowrank``, else dense. A weight stored
    ``(in, out)`` (``info.transposed``) is returned as its ``(out, in)`` view, the layout every
    filter and method assumes (:mod:`pactmerge.io.architectures`)."""
    from pactmerge.io.lora import LoraSource

    dtype = inputs.cfg.compute_dtype
    strict = not inputs.cfg.allow_nonfinite  # NaN/Inf in an input is an error (pactmerge.finite)
    raw = inputs.base.get(info.name)
    if strict:
        check_finite(raw, inputs.base.file_of(info.name), info.name)
    base = raw.to(device=device, dtype=dtype)
    del raw
    deltas: list[Delta] = []
    for src in inputs.models:
        if isinstance(src, LoraSource):
            d = src.lowrank_delta(info.name, device, dtype)
            if d is None:  # a parameter LoRA does not touch (bias, norm): zero update
                deltas.append(torch.zeros_like(base))
                continue
            for f in tensors_of(d) if strict else ():
                check_finite(f, src.file_of(info.name), info.name)
            deltas.append(d if lowrank else d.dense())
            continue
        t = src.get(info.name)
        if strict:
            check_finite(t, src.file_of(info.name), info.name)
        # get() returns a private copy, so subtracting in place is safe even when .to() is a no-op.
        deltas.append(t.to(device=device, dtype=dtype).sub_(base))
        del t
    if info.transposed:
        return base.mT, [transpose_delta(d) for d in deltas]
    return base, deltas


def accepted(stage: Stage, deltas: list[Delta]) -> list[Delta]:
    """Task vectors as ``stage`` accepts them: dense unless it was registered ``lowrank=True``."""
    return deltas if stage.spec.lowrank else list(densify(deltas))


def apply_filters(stages: Sequence[Stage], base: Tensor, deltas: list[Delta], ctx: ParamContext) -> list[Delta]:
    """Run filter ``stages`` in order on one parameter's task vectors."""
    for stage in stages:
        deltas = stage.spec.fn(base, accepted(stage, deltas), ctx, stage.params)
    return deltas


def merge_parameter(pipeline: Pipeline, base: Tensor, deltas: list[Delta], ctx: ParamContext) -> MethodResult:
    """One parameter through the pipeline: pre filters, the method, post filters.

    Args:
        base: ``theta_0`` in the compute dtype.
        deltas: the ``T`` task vectors (dense, or :class:`LowRankDelta` for adapters).
        ctx: the parameter's context (:func:`pactmerge.plan.make_context`), with the prepare stats.

    Returns:
        The merged task vector (a :class:`LowRankDelta` only if every stage kept the factors), or,
        for a task-specific method, a :class:`~pactmerge.modulators.TaskSpecific` whose shared
        vector and replacements went through the post filters.
    """
    deltas = apply_filters(pipeline.pre, base, deltas, ctx)
    method = pipeline.method
    merged = method.spec.fn(base, accepted(method, deltas), ctx, method.params)
    del deltas
    return map_updates(merged, lambda update: apply_filters(pipeline.post, base, [update], ctx)[0])


def param_context(inputs: MergeInputs, info: ParamInfo, stats: dict, device: torch.device) -> ParamContext:
    """``make_context`` plus the parameter's calibration statistics (read when a stage asks)."""
    ctx = make_context(inputs.cfg, info, stats)
    cal = inputs.calibration
    if cal is not None and cal.store is not None:
        ctx.calibration = cal.store.view(info.name, device, inputs.cfg.compute_dtype)
    return ctx


class _Passes:
    """A re-iterable stream for ``prepare``: every iteration is one more full streaming pass."""

    def __init__(self, make_stream):
        self._make = make_stream

    def __iter__(self):
        return self._make()


def prepare_stats(inputs: MergeInputs, device: torch.device, progress: bool = False) -> dict:
    """Model-wide statistics for the stages that declare ``prepare`` (explicit first passes).

    A pre filter's ``prepare`` sees the task vectors after the pre filters before it; the method's
    and the post filters' see them after every pre filter. Returns ``{stage name: stats}``.
    """
    cfg = inputs.cfg
    if inputs.calibration is not None:
        inputs.calibration.ensure(inputs.models, progress)
    pre = cfg.pipeline.pre
    stats: dict = {}
    stages = [(i, f) for i, f in enumerate(pre) if f.spec.prepare is not None]
    stages += [(len(pre), s) for s in (cfg.pipeline.method, *cfg.pipeline.post) if s.spec.prepare is not None]
    merged_params = [info for info in inputs.plan.params if info.kind != "copy"]
    for position, stage in stages:

        def stream(position=position, stage=stage):
            # Each iteration over the stream is one full pass, with its own progress bar.
            desc = f"{stage.name}: statistics pass"
            for info in tqdm(
                merged_params, desc=desc, unit="param", disable=not progress, file=sys.stderr, leave=False
            ):
                ctx = param_context(inputs, info, stats, device)
                base, deltas = read_deltas(inputs, info, device, lowrank=True)
                yield ctx, base, accepted(stage, apply_filters(pre[:position], base, deltas, ctx))

        assert stage.spec.prepare is not None
        stats[stage.name] = stage.spec.prepare(_Passes(stream), stage.params)
    return stats


def iter_merged_deltas(
    inputs: MergeInputs,
    device: str | torch.device = "cpu",
    progress: bool = False,
    lowrank: bool = False,
    on_modulators: Callable[[ParamInfo, list[Modulator]], None] | None = None,
) -> Iterator[tuple[ParamInfo, Tensor, Delta | None]]:
    """Yield ``(info, base, merged_delta)`` per parameter, in the plan's order.

    ``base`` and ``merged_delta`` are in the compute dtype on ``device``, in the checkpoint's stored
    layout (an ``(in, out)`` weight is merged as its ``(out, in)`` view and turned back); ``merged_delta`` is None
    for copied parameters. The caller forms ``base + alpha * merged_delta`` (so one pass serves a
    whole grid of alpha values). With ``lowrank`` a merged delta may be a :class:`LowRankDelta`
    (a low-rank-aware method on adapters); otherwise it is always dense. A task-specific method's
    merged delta is its shared vector; its per-task modulators are passed to ``on_modulators``
    (before the parameter is yielded) when given.
    """
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    cfg = inputs.cfg
    stats = prepare_stats(inputs, device, progress)
    for info in tqdm(inputs.plan.params, desc="merging", unit="param", disable=not progress, file=sys.stderr):
        if info.kind == "copy":  # from the base, or an extra parameter from the model that has it
            yield info, copied_value(inputs, info), None
            continue
        ctx = param_context(inputs, info, stats, device)
        base, deltas = read_deltas(inputs, info, device, lowrank=True)
        try:
            merged, modulators = split_result(merge_parameter(cfg.pipeline, base, deltas, ctx))
        except torch.linalg.LinAlgError as e:  # e.g. an SVD that does not converge in float32
            raise PactMergeError(
                f"parameter {info.name!r}: {cfg.pipeline.describe()} failed in {cfg.dtype}"
                f" ({str(e).splitlines()[0][:160]}); set dtype: float64, or exclude the parameter"
            ) from None
        replacements = [m.replacement for m in modulators or [] if m.replacement is not None]
        for t in (t for d in [merged, *replacements] for t in tensors_of(d)) if not cfg.allow_nonfinite else ():
            check_merged_finite(t, cfg.method, info.name)
        if info.transposed:  # back to the stored (in, out) layout
            base, merged = base.mT, transpose_delta(merged)
            modulators = [transpose_modulator(m) for m in modulators] if modulators is not None else None
        if modulators is not None and on_modulators is not None:
            on_modulators(info, modulators)
        yield info, base, merged if lowrank else densify([merged])[0]


def output_layout(inputs: MergeInputs) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(name, shape, dtype)`` of every tensor :func:`iter_merged_params` will yield, in order."""
    out_dtype = DTYPES[inputs.cfg.out_dtype] if inputs.cfg.out_dtype else None
    return [
        (p.name, p.shape, p.dtype if (p.kind == "copy" or out_dtype is None) else out_dtype) for p in inputs.plan.params
    ]


def copied_value(inputs: MergeInputs, info: ParamInfo) -> Tensor:
    """A ``copy`` parameter's tensor: the base's, or an extra parameter's from the model holding it."""
    owner = inputs.plan.copied_from.get(info.name)
    return (inputs.base if owner is None else inputs.models[owner]).get(info.name)


def output_params(
    inputs: MergeInputs, merged: Iterable[tuple[ParamInfo, Tensor, Delta | None]], alpha: float
) -> Iterator[tuple[str, Tensor]]:
    """``(name, theta)`` with ``theta = theta_0 + alpha * merged`` in the output dtype, on the CPU,
    from a stream of ``(info, base, merged_delta)`` as :func:`iter_merged_deltas` yields it (or a
    replay of one kept in memory, as the alpha search does).

    Unless ``allow_nonfinite``, every yielded tensor is finite (a :class:`PactMergeError` naming
    the parameter otherwise, see :mod:`pactmerge.finite`)."""
    cfg = inputs.cfg
    out_dtype = DTYPES[cfg.out_dtype] if cfg.out_dtype else None
    for info, base, d in merged:
        if d is None:
            if not cfg.allow_nonfinite:
                check_output_finite(info.name, base)
            yield info.name, base
            continue
        theta = add_to(base, d, alpha=alpha)
        out = theta.to(dtype=out_dtype or info.dtype)
        if not cfg.allow_nonfinite:  # one reduction; a float16/bfloat16 overflow on the cast is named as such
            check_output_finite(info.name, out, theta)
        yield info.name, out.cpu()


def iter_merged_params(
    inputs: MergeInputs,
    device: str | torch.device = "cpu",
    progress: bool = False,
    on_modulators: Callable[[ParamInfo, list[Modulator]], None] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, theta)`` with ``theta = theta_0 + alpha * merged`` in the output dtype, on the CPU
    (``on_modulators``: see :func:`iter_merged_deltas`; the checks: see :func:`output_params`)."""
    stream = iter_merged_deltas(inputs, device, progress, lowrank=True, on_modulators=on_modulators)
    return output_params(inputs, stream, inputs.cfg.fixed_alpha)
