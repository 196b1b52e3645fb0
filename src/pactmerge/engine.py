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
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pactmerge.backends.gpu import to_device
from pactmerge.config import DTYPES, MergeConfig
from pactmerge.errors import PactMergeError
from pactmerge.io.sources import Source
from pactmerge.linalg.cache import SubspaceCache
from pactmerge.lowrank import Delta, LowRankDelta, add_to, densify, tensors_of
from pactmerge.pipeline import Pipeline, Stage
from pactmerge.plan import Plan, build_plan, check_finite, make_context
from pactmerge.registry import ParamContext, ParamInfo


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
    cache: SubspaceCache | None = None  # base-model subspaces kept across runs (linalg/cache.py)

    def close(self) -> None:
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
        _REOPENED[key] = open_inputs(cfg, cache_dir)
    return _REOPENED[key]


def open_inputs(cfg: MergeConfig, cache_dir: str | os.PathLike | None = None) -> MergeInputs:
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
        inputs = MergeInputs(cfg, base, models, plan, SubspaceCache(cache_dir) if cache_dir else None)
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
    filters and methods may treat task vectors as their own -- but never ``base``.
    """
    from pactmerge.io.lora import LoraSource

    dtype = inputs.cfg.compute_dtype
    raw = inputs.base.get(info.name)
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
            for f in tensors_of(d):
                check_finite(f, src.file_of(info.name), info.name)
            deltas.append(d if lowrank else d.dense())
            continue
        t = src.get(info.name)
        check_finite(t, src.file_of(info.name), info.name)
        deltas.append(task_vector(t, base))
        del t
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
    update of a 2-D weight is a :class:`LowRankDelta` when ``lowrank``, else dense. ``theta_0``
    may share memory with the input: read-only (see :func:`read_parameter`)."""
    p = read_parameter(inputs, info, device, lowrank)
    return p.base, p.deltas


def context_for(inputs: MergeInputs, info: ParamInfo, stats: dict) -> ParamContext:
    """The parameter's :class:`ParamContext`, with the merge's subspace cache."""
    ctx = make_context(inputs.cfg, info, stats)
    ctx.cache = inputs.cache
    return ctx


def release_parameter(inputs: MergeInputs, name: str) -> None:
    """Let the sources drop ``name``'s mapped pages from the resident set."""
    for src in (inputs.base, *inputs.models):
        src.release(name)


def accepted(stage: Stage, deltas: list[Delta]) -> list[Delta]:
    """Task vectors as ``stage`` accepts them: dense unless it was registered ``lowrank=True``."""
    return deltas if stage.spec.lowrank else list(densify(deltas))


def apply_filters(stages: Sequence[Stage], base: Tensor, deltas: list[Delta], ctx: ParamContext) -> list[Delta]:
    """Run filter ``stages`` in order on one parameter's task vectors."""
    for stage in stages:
        deltas = stage.spec.fn(base, accepted(stage, deltas), ctx, stage.params)
    return deltas


def merge_parameter(pipeline: Pipeline, base: Tensor, deltas: list[Delta], ctx: ParamContext) -> Delta:
    """One parameter through the pipeline: pre filters, the method, post filters.

    Args:
        base: ``theta_0`` in the compute dtype.
        deltas: the ``T`` task vectors (dense, or :class:`LowRankDelta` for adapters).
        ctx: the parameter's context (:func:`pactmerge.plan.make_context`), with the prepare stats.

    Returns:
        The merged task vector (a :class:`LowRankDelta` only if every stage kept the factors).
    """
    deltas = apply_filters(pipeline.pre, base, deltas, ctx)
    method = pipeline.method
    merged = method.spec.fn(base, accepted(method, deltas), ctx, method.params)
    del deltas
    (merged,) = apply_filters(pipeline.post, base, [merged], ctx)
    return merged


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
    workers, ahead of the statistics, in the plan's order.
    """
    from pactmerge.backends import sequential

    backend = backend or sequential()
    cfg = inputs.cfg
    pre = cfg.pipeline.pre
    stats: dict = {}
    stages = [(i, f) for i, f in enumerate(pre) if f.spec.prepare is not None]
    stages += [(len(pre), s) for s in (cfg.pipeline.method, *cfg.pipeline.post) if s.spec.prepare is not None]
    merged_params = [info for info in inputs.plan.params if info.kind != "copy"]
    for position, stage in stages:

        def filtered(info: ParamInfo, p: ParamInputs, position=position, stage=stage):
            ctx = context_for(inputs, info, stats)
            return ctx, p.base, accepted(stage, apply_filters(pre[:position], p.base, p.deltas, ctx))

        def stream(stage=stage, filtered=filtered):
            # Each iteration over the stream is one full pass, with its own progress bar.
            results = backend.imap(
                merged_params,
                lambda info: read_parameter(inputs, info, device, lowrank=True),
                filtered,
                cost=lambda info: param_cost(inputs, info),
            )
            desc = f"{stage.name}: statistics pass"
            bar = tqdm(total=len(merged_params), desc=desc, unit="param", disable=not progress, file=sys.stderr)
            with bar:
                for info, item in zip(merged_params, results):
                    yield item
                    release_parameter(inputs, info.name)
                    bar.update()

        assert stage.spec.prepare is not None
        stats[stage.name] = stage.spec.prepare(_Passes(stream), stage.params)
    return stats


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
        return inputs.base.get(info.name)
    if chunks and merges_in_chunks(inputs, info, device):
        return StoredParameter(inputs.base.get(info.name), [src.get(info.name) for src in inputs.models])
    return read_parameter(inputs, info, device, lowrank=True)


def merged_weight_chunked(inputs: MergeInputs, info: ParamInfo, stored: StoredParameter, stats: dict) -> Tensor:
    """:func:`merged_weight` for an elementwise pipeline, :data:`CHUNK` entries at a time.

    Each chunk goes through exactly the steps of the whole-tensor path -- conversion to the
    compute dtype, ``Delta_t = theta_t - theta_0``, :func:`merge_parameter`, ``theta_0 + alpha *
    merged``, the cast -- on reused chunk-sized buffers, so every entry gets the same arithmetic
    (chunks start at multiples of :data:`CHUNK`, keeping torch's vectorized and scalar loops on
    the same entries: the output bytes are the same). Inputs and output are checked finite chunk by
    chunk, with the same messages."""
    cfg = inputs.cfg
    out_dtype = DTYPES[cfg.out_dtype] if cfg.out_dtype else info.dtype
    sources = [inputs.base, *inputs.models]
    flat = [t.reshape(-1) for t in (stored.base, *stored.models)]
    n = flat[0].numel()
    out = torch.empty(n, dtype=out_dtype)
    buffers = [torch.empty(min(n, CHUNK), dtype=cfg.compute_dtype) for _ in flat]
    ctx = context_for(inputs, info, stats)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        for src, x in zip(sources, flat):
            check_finite(x[start:stop], src.file_of(info.name), info.name)
        base = buffers[0][: stop - start].copy_(flat[0][start:stop])
        deltas: list[Delta] = [b[: stop - start].copy_(x[start:stop]).sub_(base) for b, x in zip(buffers[1:], flat[1:])]
        merged = merge_parameter(cfg.pipeline, base, deltas, ctx)
        for t in tensors_of(merged):
            check_finite(t, f"method {cfg.method}", info.name)
        out[start:stop].copy_(add_to(base, merged, alpha=cfg.alpha))
    release_parameter(inputs, info.name)
    return out.view(info.shape)


def merge_read(inputs: MergeInputs, info: ParamInfo, p: ParamInputs, stats: dict) -> Delta:
    """Phase 2a: the parameter through the pipeline, the merged update checked finite."""
    cfg = inputs.cfg
    merged = merge_parameter(cfg.pipeline, p.base, p.deltas, context_for(inputs, info, stats))
    for t in tensors_of(merged):
        check_finite(t, f"method {cfg.method}", info.name)
    return merged


def merged_weight(
    inputs: MergeInputs, info: ParamInfo, p: ParamInputs | StoredParameter | Tensor, stats: dict
) -> Tensor:
    """Phase 2 of the unit of work: ``theta = theta_0 + alpha * merged`` of one parameter in the
    output dtype, on the CPU, from what :func:`read_for_merge` read. The same code wherever it runs,
    so the same bytes. A copied parameter is the base's tensor as read (read-only)."""
    if isinstance(p, Tensor):
        return p
    if isinstance(p, StoredParameter):
        return merged_weight_chunked(inputs, info, p, stats)
    cfg = inputs.cfg
    out_dtype = DTYPES[cfg.out_dtype] if cfg.out_dtype else info.dtype
    merged = merge_read(inputs, info, p, stats)
    del p.deltas[:]
    if isinstance(merged, LowRankDelta):
        theta = (
            add_to(p.base, merged, cfg.alpha)
            if p.base_owned
            else torch.addmm(p.base, merged.B, merged.A, alpha=cfg.alpha)
        )
    elif p.base_owned:
        theta = add_to(p.base, merged, alpha=cfg.alpha)
    elif merged.data_ptr() != p.base.data_ptr() and merged.is_contiguous():
        # base is an input's memory: the sum goes into the merged update's own buffer
        theta = torch.add(p.base, merged, alpha=cfg.alpha, out=merged)
    else:
        theta = torch.add(p.base, merged, alpha=cfg.alpha)
    del merged
    theta = theta.to(dtype=out_dtype).cpu()
    release_parameter(inputs, info.name)
    return theta


def iter_merged_deltas(
    inputs: MergeInputs,
    device: str | torch.device = "cpu",
    progress: bool = False,
    lowrank: bool = False,
    backend=None,
) -> Iterator[tuple[ParamInfo, Tensor, Delta | None]]:
    """Yield ``(info, base, merged_delta)`` per parameter, in the plan's order.

    ``base`` and ``merged_delta`` are in the compute dtype on ``device``; ``merged_delta`` is None
    for copied parameters. ``base`` may share memory with the input: read-only. The caller forms
    ``base + alpha * merged_delta`` (so one pass serves a whole grid of alpha values). With
    ``lowrank`` a merged delta may be a :class:`LowRankDelta` (a low-rank-aware method on
    adapters); otherwise it is always dense. ``backend``: see :mod:`pactmerge.backends`.
    """
    from pactmerge.backends import sequential

    backend = backend or sequential()
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    stats = prepare_stats(inputs, device, progress, backend)

    def finish(info: ParamInfo, p) -> tuple[ParamInfo, Tensor, Delta | None]:
        if isinstance(p, Tensor):
            return info, p, None
        merged = merge_read(inputs, info, p, stats)
        return info, p.base, merged if lowrank else densify([merged])[0]

    params = inputs.plan.params
    results = backend.imap(
        params, lambda info: read_for_merge(inputs, info, device), finish, cost=lambda info: param_cost(inputs, info)
    )
    yield from tqdm(results, total=len(params), desc="merging", unit="param", disable=not progress, file=sys.stderr)


def output_layout(inputs: MergeInputs) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(name, shape, dtype)`` of every tensor :func:`iter_merged_params` will yield, in order."""
    out_dtype = DTYPES[inputs.cfg.out_dtype] if inputs.cfg.out_dtype else None
    return [
        (p.name, p.shape, p.dtype if (p.kind == "copy" or out_dtype is None) else out_dtype) for p in inputs.plan.params
    ]


def iter_merged_params(
    inputs: MergeInputs, device: str | torch.device = "cpu", progress: bool = False, backend=None
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, theta)`` with ``theta = theta_0 + alpha * merged`` in the output dtype, on the CPU.

    A copied parameter may share memory with the input (read-only). ``backend`` (default: the
    plain loop) runs the unit of work (:func:`read_for_merge`, :func:`merged_weight`) per
    parameter; every backend yields the same bytes.
    """
    from pactmerge.backends import sequential

    backend = backend or sequential()
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    stats = prepare_stats(inputs, device, progress, backend)
    params = inputs.plan.params
    results = backend.imap(
        params,
        lambda info: read_for_merge(inputs, info, device, chunks=True),
        lambda info, p: merged_weight(inputs, info, p, stats),
        cost=lambda info: param_cost(inputs, info),
    )
    bar = tqdm(results, total=len(params), desc="merging", unit="param", disable=not progress, file=sys.stderr)
    for info, theta in zip(params, bar):
        yield info.name, theta
        if info.kind == "copy":
            release_parameter(inputs, info.name)
