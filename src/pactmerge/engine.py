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

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pactmerge.backends.gpu import to_device
from pactmerge.config import DTYPES, MergeConfig
from pactmerge.errors import PactMergeError
from pactmerge.finite import check_merged_finite, check_output_finite
from pactmerge.io.architectures import transpose_delta
from pactmerge.io.sources import Source
from pactmerge.io.vocab import VocabPlan, resolve_vocabulary
from pactmerge.linalg.cache import SubspaceCache
from pactmerge.lowrank import Delta, LowRankDelta, add_to, densify, tensors_of
from pactmerge.modulators import MethodResult, Modulator, map_updates, split_result, transpose_modulator
from pactmerge.pipeline import Pipeline, Stage
from pactmerge.plan import Plan, build_plan, check_finite, make_context
from pactmerge.registry import ParamContext, ParamInfo
from pactmerge.spill import FilteredSpill, spill_bytes, spill_dir, spill_fits
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
    cache: SubspaceCache | None = None  # base-model subspaces kept across runs (linalg/cache.py)

    def close(self) -> None:
        if self.calibration is not None:
            self.calibration.close()
        for s in [self.base, *self.models]:
            s.close()

    def __reduce__(self):
        # Sent to another process (the Ray backend's workers): reopened there from the config.
        return (reopen_inputs, (self.cfg, self.cache.folder if self.cache else None))


_REOPENED: dict[str, MergeInputs] = {}


def reopen_inputs(cfg: MergeConfig, cache_dir=None) -> MergeInputs:
    """:func:`open_inputs` once per process and config (a worker receives the same inputs often)."""
    from pactmerge.config import config_to_yaml

    key = config_to_yaml(cfg) + f"\ncache: {cache_dir}"
    if key not in _REOPENED:
        while _REOPENED:  # one merge at a time: close the previous one's files
            _REOPENED.popitem()[1].close()
        _REOPENED[key] = open_inputs(cfg, cache_dir=cache_dir)
    return _REOPENED[key]


def open_inputs(
    cfg: MergeConfig,
    calibration_data: Sequence[ModelData] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> MergeInputs:
    """Open and check every input. ``calibration_data``: one :class:`pactmerge.stats.ModelData` per
    model, for the stages that need statistics (checked here, computed on the first merge pass).
    ``cache_dir``: where base-model subspaces are kept across runs (:mod:`pactmerge.linalg.cache`)."""
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
            cfg,
            base,
            models,
            plan,
            vocab,
            plan_calibration(cfg.pipeline, cfg.calibration, models, calibration_data),
            SubspaceCache(cache_dir) if cache_dir else None,
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


@dataclass
class ParamInputs:
    """One parameter's inputs in the compute dtype: ``theta_0``, the ``T`` task vectors, and
    whether ``base`` is the engine's own buffer (else it may be an input's memory: read-only)."""

    base: Tensor
    deltas: list[Delta]
    base_owned: bool


def read_parameter(inputs: MergeInputs, info: ParamInfo, device: torch.device, lowrank: bool = False) -> ParamInputs:
    """Read one parameter without defensive copies (sources hand out read-only views).

    ``theta_0`` is converted only when the dtype or device differs; every dense ``Delta_t`` is a
    fresh tensor (the subtraction writes into the conversion's buffer, or allocates one), so
    filters and methods may treat task vectors as their own -- but never ``base``. A weight stored
    ``(in, out)`` (``info.transposed``) is returned as its ``(out, in)`` view, the layout every
    filter and method assumes (:mod:`pactmerge.io.architectures`).
    """
    from pactmerge.io.lora import LoraSource

    dtype = inputs.cfg.compute_dtype
    strict = not inputs.cfg.allow_nonfinite  # NaN/Inf in an input is an error (pactmerge.finite)
    raw = inputs.base.get(info.name)
    if strict:
        check_finite(raw, inputs.base.file_of(info.name), info.name)
    base = to_device(raw, device, dtype)  # CUDA: through pinned memory on a copy stream
    owned = base is not raw
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
        deltas.append(task_vector(t, base))
        del t
    if info.transposed:
        return ParamInputs(base.mT, [transpose_delta(d) for d in deltas], owned)
    return ParamInputs(base, deltas, owned)


def task_vector(t: Tensor, base: Tensor) -> Tensor:
    """``t - base`` as a new tensor in ``base``'s dtype and device; ``t`` is never written to.

    (A mixed-dtype ``torch.sub(t, base)`` is no faster on the CPU: torch converts into a
    temporary first; measured.)"""
    converted = to_device(t, base.device, base.dtype)
    # In place only into a conversion's own buffer: `t` itself may be the caller's memory.
    return torch.sub(converted, base) if converted is t else converted.sub_(base)


def read_deltas(
    inputs: MergeInputs, info: ParamInfo, device: torch.device, lowrank: bool = False
) -> tuple[Tensor, list[Delta]]:
    """``(theta_0, [Delta_t])`` of one parameter in the compute dtype on ``device``. An adapter's
    update of a 2-D weight is a :class:`LowRankDelta` when ``lowrank``, else dense; an ``(in, out)``
    weight comes as its ``(out, in)`` view. ``theta_0`` may share memory with the input: read-only
    (see :func:`read_parameter`)."""
    p = read_parameter(inputs, info, device, lowrank)
    return p.base, p.deltas


def release_parameter(inputs: MergeInputs, name: str) -> None:
    """Let the sources drop ``name``'s mapped pages from the resident set."""
    for src in (inputs.base, *inputs.models):
        if name in src:  # a model may lack an optional buffer or an extra parameter
            src.release(name)


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
    """``make_context`` plus the merge's subspace cache and the parameter's calibration statistics
    (read when a stage asks)."""
    ctx = make_context(inputs.cfg, info, stats)
    ctx.cache = inputs.cache
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


def prepare_stats(inputs: MergeInputs, device: torch.device, progress: bool = False, backend=None) -> dict:
    """Model-wide statistics for the stages that declare ``prepare`` (explicit first passes).

    A pre filter's ``prepare`` sees the task vectors after the pre filters before it; the method's
    and the post filters' see them after every pre filter. Returns ``{stage name: stats}``. With a
    ``backend`` (:mod:`pactmerge.backends`) the reads and pre filters of each pass run in its
    workers, ahead of the statistics, in the plan's order. After a stage's first full pass, its
    later passes read the filtered task vectors from a spill on disk instead of running the pre
    filters again (:mod:`pactmerge.spill`; only when it fits on the disk).
    """
    from pactmerge.backends import sequential

    backend = backend or sequential()
    cfg = inputs.cfg
    if inputs.calibration is not None:
        inputs.calibration.ensure(inputs.models, progress)
    pre = cfg.pipeline.pre
    stats: dict = {}
    stages = [(i, f) for i, f in enumerate(pre) if f.spec.prepare is not None]
    stages += [(len(pre), s) for s in (cfg.pipeline.method, *cfg.pipeline.post) if s.spec.prepare is not None]
    merged_params = [info for info in inputs.plan.params if info.kind != "copy"]
    for position, stage in stages:

        def filtered(info: ParamInfo, p: ParamInputs, position=position, stage=stage):
            ctx = param_context(inputs, info, stats, device)
            return ctx, p.base, accepted(stage, apply_filters(pre[:position], p.base, p.deltas, ctx))

        # Later passes read the filtered task vectors back instead of filtering again (pactmerge.spill).
        where = _spill_dir(inputs, merged_params) if position > 0 else None
        spill = FilteredSpill(where) if where is not None else None

        def stream(stage=stage, filtered=filtered, spill=spill):
            # Each iteration over the stream is one full pass, with its own progress bar.
            desc = f"{stage.name}: statistics pass"
            bar = tqdm(total=len(merged_params), desc=desc, unit="param", disable=not progress, file=sys.stderr)
            with bar:
                if spill is not None and spill.complete and not spill.disabled:
                    for info in merged_params:
                        ctx = param_context(inputs, info, stats, device)
                        yield ctx, read_base(inputs, info, device), spill.get(info.name, device)
                        release_parameter(inputs, info.name)
                        bar.update()
                    return
                results = backend.imap(
                    merged_params,
                    lambda info: read_parameter(inputs, info, device, lowrank=True),
                    filtered,
                    cost=lambda info: param_cost(inputs, info),
                )
                for info, item in zip(merged_params, results):
                    if spill is not None:
                        spill.put(info.name, item[2])
                    yield item
                    release_parameter(inputs, info.name)
                    bar.update()
                if spill is not None:
                    spill.complete = True  # only once every parameter went through

        assert stage.spec.prepare is not None
        try:
            stats[stage.name] = stage.spec.prepare(_Passes(stream), stage.params)
        finally:
            if spill is not None:
                spill.close()
    return stats


def _spill_dir(inputs: MergeInputs, params: Sequence[ParamInfo]) -> Path | None:
    """Where to spill the filtered task vectors of ``params``; None: off, or not enough disk."""
    where = spill_dir()
    nbytes = spill_bytes([info.shape for info in params], len(inputs.models), inputs.cfg.compute_dtype)
    return where if where is not None and spill_fits(nbytes, where) else None


def read_base(inputs: MergeInputs, info: ParamInfo, device: torch.device) -> Tensor:
    """``theta_0`` of one parameter as :func:`read_parameter` returns it (compute dtype, on ``device``,
    an ``(in, out)`` weight as its ``(out, in)`` view), without the task vectors or the finite check."""
    base = to_device(inputs.base.get(info.name), device, inputs.cfg.compute_dtype)
    return base.mT if info.transposed else base


def param_cost(inputs: MergeInputs, info: ParamInfo) -> int:
    """Bytes one parameter holds while it is merged, roughly: its ``T + 1`` inputs in the compute
    dtype, the output and a method's workspace of about as much again (the backends' memory bound)."""
    numel = 1
    for s in info.shape:
        numel *= s
    itemsize = torch.empty((), dtype=inputs.cfg.compute_dtype).element_size()
    return numel * itemsize * (2 * len(inputs.models) + 4)


CHUNK = 1 << 18  # elements per chunk of an elementwise merge: 1 MiB per float32 buffer, a multiple of every SIMD width


@dataclass
class StoredParameter:
    """A parameter to merge in chunks: its inputs as stored (read-only views), nothing converted yet."""

    base: Tensor
    models: list[Tensor]


def merges_in_chunks(inputs: MergeInputs, info: ParamInfo, device: torch.device) -> bool:
    """Whether :func:`merged_weight` runs this parameter chunk by chunk: on the CPU, dense inputs,
    and every stage of the pipeline elementwise (registry doc). A merge that is only elementwise
    passes over each entry once per operation; in cache-sized chunks those passes stay in the CPU
    cache instead of streaming every intermediate tensor through memory (measured 4.7x on a
    task-arithmetic merge, the same bytes)."""
    from pactmerge.io.lora import LoraSource

    return (
        device.type == "cpu"
        and info.kind != "copy"
        and all(stage.elementwise for stage in inputs.cfg.pipeline.stages)
        and not any(isinstance(src, LoraSource) for src in inputs.models)
    )


def read_for_merge(
    inputs: MergeInputs, info: ParamInfo, device: torch.device, chunks: bool = False
) -> ParamInputs | StoredParameter | Tensor:
    """Phase 1 of the unit of work: a copied parameter's tensor, or a merged one's inputs (as
    stored, when ``chunks`` and :func:`merges_in_chunks` allow: they are read chunk by chunk)."""
    if info.kind == "copy":
        return copied_value(inputs, info)
    if chunks and merges_in_chunks(inputs, info, device):
        return StoredParameter(inputs.base.get(info.name), [src.get(info.name) for src in inputs.models])
    return read_parameter(inputs, info, device, lowrank=True)


def merged_weight_chunked(
    inputs: MergeInputs, info: ParamInfo, stored: StoredParameter, stats: dict, device: torch.device
) -> Tensor:
    """:func:`merged_weight` for an elementwise pipeline, :data:`CHUNK` entries at a time.

    Each chunk goes through exactly the steps of the whole-tensor path -- conversion to the
    compute dtype, ``Delta_t = theta_t - theta_0``, :func:`merge_parameter`, ``theta_0 + alpha *
    merged``, the cast -- on reused chunk-sized buffers, so every entry gets the same arithmetic
    (chunks start at multiples of :data:`CHUNK`, keeping torch's vectorized and scalar loops on
    the same entries: the output bytes are the same). Inputs and output are checked finite chunk by
    chunk, with the same messages. Elementwise, so an ``(in, out)`` weight needs no transposing."""
    cfg = inputs.cfg
    strict = not cfg.allow_nonfinite
    alpha = cfg.fixed_alpha
    out_dtype = DTYPES[cfg.out_dtype] if cfg.out_dtype else info.dtype
    sources = [inputs.base, *inputs.models]
    flat = [t.reshape(-1) for t in (stored.base, *stored.models)]
    n = flat[0].numel()
    out = torch.empty(n, dtype=out_dtype)
    buffers = [torch.empty(min(n, CHUNK), dtype=cfg.compute_dtype) for _ in flat]
    ctx = param_context(inputs, info, stats, device)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        for src, x in zip(sources, flat) if strict else ():
            check_finite(x[start:stop], src.file_of(info.name), info.name)
        base = buffers[0][: stop - start].copy_(flat[0][start:stop])
        deltas: list[Delta] = [b[: stop - start].copy_(x[start:stop]).sub_(base) for b, x in zip(buffers[1:], flat[1:])]
        merged = merge_parameter(cfg.pipeline, base, deltas, ctx)
        assert isinstance(merged, Tensor)  # an elementwise method is not task-specific
        if strict:
            check_merged_finite(merged, cfg.method, info.name)
        theta = add_to(base, merged, alpha=alpha)
        out[start:stop].copy_(theta)
        if strict:
            check_output_finite(info.name, out[start:stop], theta)
    release_parameter(inputs, info.name)
    return out.view(info.shape)


def merge_read(
    inputs: MergeInputs, info: ParamInfo, p: ParamInputs, stats: dict, device: torch.device
) -> tuple[Delta, list[Modulator] | None]:
    """Phase 2a: the parameter through the pipeline, the merged update (and a task-specific
    method's replacements) checked finite; returns the merged update and the per-task modulators
    (None for a method without them), in the ``(out, in)`` layout filters and methods see."""
    cfg = inputs.cfg
    try:
        merged, modulators = split_result(
            merge_parameter(cfg.pipeline, p.base, p.deltas, param_context(inputs, info, stats, device))
        )
    except torch.linalg.LinAlgError as e:  # e.g. an SVD that does not converge in float32
        raise PactMergeError(
            f"parameter {info.name!r}: {cfg.pipeline.describe()} failed in {cfg.dtype}"
            f" ({str(e).splitlines()[0][:160]}); set dtype: float64, or exclude the parameter"
        ) from None
    replacements = [m.replacement for m in modulators or [] if m.replacement is not None]
    for t in (t for d in [merged, *replacements] for t in tensors_of(d)) if not cfg.allow_nonfinite else ():
        check_merged_finite(t, cfg.method, info.name)
    return merged, modulators


def stored_layout(
    info: ParamInfo, base: Tensor, merged: Delta, modulators: list[Modulator] | None
) -> tuple[Tensor, Delta, list[Modulator] | None]:
    """``base``, ``merged`` and the modulators back in the checkpoint's stored layout (an ``(in, out)``
    weight was merged as its ``(out, in)`` view)."""
    if not info.transposed:
        return base, merged, modulators
    mods = [transpose_modulator(m) for m in modulators] if modulators is not None else None
    return base.mT, transpose_delta(merged), mods


def merged_weight(
    inputs: MergeInputs, info: ParamInfo, p: ParamInputs | StoredParameter | Tensor, stats: dict, device: torch.device
) -> Tensor:
    """Phase 2 of the unit of work: ``theta = theta_0 + alpha * merged`` of one parameter in the
    output dtype, on the CPU, from what :func:`read_for_merge` read. The same code wherever it runs,
    so the same bytes. A copied parameter is the tensor as read (read-only). Unless
    ``allow_nonfinite``, the output is checked finite (see :func:`output_params`)."""
    cfg = inputs.cfg
    if isinstance(p, Tensor):
        if not cfg.allow_nonfinite:
            check_output_finite(info.name, p)
        return p
    if isinstance(p, StoredParameter):
        return merged_weight_chunked(inputs, info, p, stats, device)
    alpha = cfg.fixed_alpha
    out_dtype = DTYPES[cfg.out_dtype] if cfg.out_dtype else info.dtype
    merged_view, _ = merge_read(inputs, info, p, stats, device)
    base, merged, _ = stored_layout(info, p.base, merged_view, None)
    del p.deltas[:], merged_view
    if isinstance(merged, LowRankDelta):
        theta = add_to(base, merged, alpha) if p.base_owned else torch.addmm(base, merged.B, merged.A, alpha=alpha)
    elif p.base_owned:
        theta = add_to(base, merged, alpha=alpha)
    elif merged.data_ptr() != base.data_ptr() and merged.is_contiguous() and base.is_contiguous():
        # base is an input's memory: the sum goes into the merged update's own buffer
        theta = torch.add(base, merged, alpha=alpha, out=merged)
    else:
        theta = torch.add(base, merged, alpha=alpha)
    del merged
    out = theta.to(dtype=out_dtype)
    if not cfg.allow_nonfinite:  # one reduction; a float16/bfloat16 overflow on the cast is named as such
        check_output_finite(info.name, out, theta)
    release_parameter(inputs, info.name)
    return out.cpu()


def iter_merged_deltas(
    inputs: MergeInputs,
    device: str | torch.device = "cpu",
    progress: bool = False,
    lowrank: bool = False,
    on_modulators: Callable[[ParamInfo, list[Modulator]], None] | None = None,
    backend=None,
) -> Iterator[tuple[ParamInfo, Tensor, Delta | None]]:
    """Yield ``(info, base, merged_delta)`` per parameter, in the plan's order.

    ``base`` and ``merged_delta`` are in the compute dtype on ``device``, in the checkpoint's stored
    layout (an ``(in, out)`` weight is merged as its ``(out, in)`` view and turned back); ``merged_delta`` is None
    for copied parameters. ``base`` may share memory with the input: read-only. The caller forms
    ``base + alpha * merged_delta`` (so one pass serves a whole grid of alpha values). With
    ``lowrank`` a merged delta may be a :class:`LowRankDelta` (a low-rank-aware method on
    adapters); otherwise it is always dense. A task-specific method's merged delta is its shared
    vector; its per-task modulators are passed to ``on_modulators`` (before the parameter is
    yielded, in the plan's order) when given. ``backend``: see :mod:`pactmerge.backends`.
    """
    from pactmerge.backends import sequential

    backend = backend or sequential()
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    from pactmerge.backends import sequential

    backend = backend or sequential()
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    stats = prepare_stats(inputs, device, progress, backend)

    def finish(info: ParamInfo, p) -> tuple[ParamInfo, Tensor, Delta | None, list[Modulator] | None]:
        if isinstance(p, Tensor):
            return info, p, None, None
        merged, modulators = merge_read(inputs, info, p, stats, device)
        base, merged, modulators = stored_layout(info, p.base, merged, modulators)
        return info, base, merged if lowrank else densify([merged])[0], modulators

    params = inputs.plan.params
    results = backend.imap(
        params, lambda info: read_for_merge(inputs, info, device), finish, cost=lambda info: param_cost(inputs, info)
    )
    bar = tqdm(results, total=len(params), desc="merging", unit="param", disable=not progress, file=sys.stderr)
    for info, base, merged, modulators in bar:
        if modulators is not None and on_modulators is not None:
            on_modulators(info, modulators)
        yield info, base, merged


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
        # Never in place: base may be an input's memory (a mapped file, the caller's state dict).
        theta = (
            torch.addmm(base, d.B, d.A, alpha=alpha) if isinstance(d, LowRankDelta) else torch.add(base, d, alpha=alpha)
        )
        out = theta.to(dtype=out_dtype or info.dtype)
        if not cfg.allow_nonfinite:  # one reduction; a float16/bfloat16 overflow on the cast is named as such
            check_output_finite(info.name, out, theta)
        yield info.name, out.cpu()


def iter_merged_params(
    inputs: MergeInputs,
    device: str | torch.device = "cpu",
    progress: bool = False,
    on_modulators: Callable[[ParamInfo, list[Modulator]], None] | None = None,
    backend=None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, theta)`` with ``theta = theta_0 + alpha * merged`` in the output dtype, on the CPU
    (``on_modulators``: see :func:`iter_merged_deltas`; the checks: see :func:`output_params`).

    A copied parameter may share memory with the input (read-only). ``backend`` (default: the
    plain loop) runs the unit of work (:func:`read_for_merge`, :func:`merged_weight`) per
    parameter; every backend yields the same bytes.
    """
    from pactmerge.backends import sequential

    if on_modulators is not None and inputs.cfg.pipeline.method.spec.task_specific:
        # Per-task outputs travel with the merged deltas, in the plan's order.
        stream = iter_merged_deltas(
            inputs, device, progress, lowrank=True, on_modulators=on_modulators, backend=backend
        )
        yield from output_params(inputs, stream, inputs.cfg.fixed_alpha)
        return
    backend = backend or sequential()
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    stats = prepare_stats(inputs, device, progress, backend)
    params = inputs.plan.params
    results = backend.imap(
        params,
        lambda info: read_for_merge(inputs, info, device, chunks=True),
        lambda info, p: merged_weight(inputs, info, p, stats, device),
        cost=lambda info: param_cost(inputs, info),
    )
    bar = tqdm(results, total=len(params), desc="merging", unit="param", disable=not progress, file=sys.stderr)
    for info, theta in zip(params, bar):
        yield info.name, theta
        if info.kind == "copy":
            release_parameter(inputs, info.name)
