"""The streaming merge engine: one parameter at a time through filters and a method.

For each parameter of the plan::

    Delta_t = theta_t - theta_0          (compute dtype, on the device)
    Delta_t <- filter(...)               for each configured "pre" filter, in order
    merged  = method(theta_0, Delta_1..T)
    merged  <- filter(...)               for each configured "post" filter (e.g. csp), in order
    theta   = theta_0 + alpha * merged   (cast to the output dtype, moved to the CPU)

Only ``T + 1`` input tensors of one parameter (plus the method's workspace) are in memory at a
time; the sources are read lazily and the writer flushes shards as they fill. Parameters that
are excluded or not floating point are copied from the base.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pactmerge.config import DTYPES, MergeConfig
from pactmerge.errors import PactMergeError
from pactmerge.io.sources import Source
from pactmerge.lowrank import Delta, add_to, densify, tensors_of
from pactmerge.modulators import MethodResult, Modulator, map_updates, split_result
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
        plan = build_plan(cfg, base, models)
        inputs = MergeInputs(
            cfg, base, models, plan, plan_calibration(cfg.pipeline, cfg.calibration, models, calibration_data)
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
    update of a 2-D weight is a :class:`LowRankDelta` when ``lowrank``, else dense."""
    from pactmerge.io.lora import LoraSource

    dtype = inputs.cfg.compute_dtype
    raw = inputs.base.get(info.name)
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
            for f in tensors_of(d):
                check_finite(f, src.file_of(info.name), info.name)
            deltas.append(d if lowrank else d.dense())
            continue
        t = src.get(info.name)
        check_finite(t, src.file_of(info.name), info.name)
        # get() returns a private copy, so subtracting in place is safe even when .to() is a no-op.
        deltas.append(t.to(device=device, dtype=dtype).sub_(base))
        del t
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

    ``base`` and ``merged_delta`` are in the compute dtype on ``device``; ``merged_delta`` is None
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
        if info.kind == "copy":
            yield info, inputs.base.get(info.name), None
            continue
        ctx = param_context(inputs, info, stats, device)
        base, deltas = read_deltas(inputs, info, device, lowrank=True)
        merged, modulators = split_result(merge_parameter(cfg.pipeline, base, deltas, ctx))
        replacements = [m.replacement for m in modulators or [] if m.replacement is not None]
        for t in (t for d in [merged, *replacements] for t in tensors_of(d)):
            check_finite(t, f"method {cfg.method}", info.name)
        if modulators is not None and on_modulators is not None:
            on_modulators(info, modulators)
        yield info, base, merged if lowrank else densify([merged])[0]


def output_layout(inputs: MergeInputs) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(name, shape, dtype)`` of every tensor :func:`iter_merged_params` will yield, in order."""
    out_dtype = DTYPES[inputs.cfg.out_dtype] if inputs.cfg.out_dtype else None
    return [
        (p.name, p.shape, p.dtype if (p.kind == "copy" or out_dtype is None) else out_dtype) for p in inputs.plan.params
    ]


def iter_merged_params(
    inputs: MergeInputs,
    device: str | torch.device = "cpu",
    progress: bool = False,
    on_modulators: Callable[[ParamInfo, list[Modulator]], None] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, theta)`` with ``theta = theta_0 + alpha * merged`` in the output dtype, on the CPU
    (``on_modulators``: see :func:`iter_merged_deltas`)."""
    cfg = inputs.cfg
    out_dtype = DTYPES[cfg.out_dtype] if cfg.out_dtype else None
    for info, base, merged in iter_merged_deltas(inputs, device, progress, lowrank=True, on_modulators=on_modulators):
        if merged is None:
            yield info.name, base
            continue
        theta = add_to(base, merged, alpha=cfg.alpha)
        yield info.name, theta.to(dtype=out_dtype or info.dtype).cpu()
