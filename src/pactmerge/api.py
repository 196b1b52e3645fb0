"""The Python API: merge from a config (YAML path, mapping or MergeConfig) to memory or disk."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from torch import Tensor

from pactmerge import __version__
from pactmerge.backends import make_backend
from pactmerge.backends.ray import RayBackend
from pactmerge.config import MergeConfig, config_to_yaml, load_config
from pactmerge.engine import iter_merged_params, open_inputs, output_layout, resolve_device
from pactmerge.errors import PactMergeError
from pactmerge.io.sources import Source
from pactmerge.io.writer import ShardedWriter, atomic_output_dir, copy_non_weight_files, parse_size


def merge(
    config: MergeConfig | dict | str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = False,
    backend: str = "local",
    workers: int = 1,
    threads: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> dict[str, Tensor] | Path:
    """Merge models as ``config`` says.

    Args:
        config: a :class:`MergeConfig`, a mapping with the YAML keys, or a YAML file path. Model
            references may be paths or in-memory ``dict[str, Tensor]`` state dicts.
        output_dir: if given, write an HF-style folder there (atomically) and return its path;
            otherwise return the merged state dict. With ``output: adapter`` in the config the
            folder is a PEFT LoRA adapter instead (docs/lora.md); the in-memory result stays dense.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        overwrite: replace an existing ``output_dir``.
        backend: ``"local"`` (this process) or ``"ray"`` (a Ray cluster; output to disk only, inputs
            given as paths). See docs/performance.md.
        workers: ``local``: 1 runs the plain loop; more runs a pool of that many worker threads with
            read-ahead and write-behind. ``ray``: parallel tasks (default: the cluster's CPUs).
        threads: torch intra-op threads per worker (default: unchanged for the plain loop,
            ``max(1, cores // workers)`` in a pool).
        cache_dir: keep base-model subspaces (PACT's ``V_{0,K}``) in this folder across runs
            (:mod:`pactmerge.linalg.cache`); default: no cache.
        **overrides: config keys given directly, e.g. ``merge(base_model=sd0, models=[sd1, sd2],
            method="iso_c", pact={"K": 15, "k": 8})``.

    Returns:
        ``dict[str, Tensor]`` (CPU tensors, in the output dtype) or the output folder's path.
    """
    if config is None:
        cfg = load_config(overrides)
    else:
        cfg = load_config(config)
        if overrides:
            cfg = load_config({**cfg.model_dump(), **overrides})
    dev = resolve_device(device)
    runner = make_backend(backend, workers, threads)
    if isinstance(runner, RayBackend) and (output_dir is None or cfg.output == "adapter"):
        raise PactMergeError("--backend ray writes a dense model folder: give an output folder (output: dense)")
    inputs = open_inputs(cfg, cache_dir)
    try:
        if output_dir is None:
            copied = {p.name for p in inputs.plan.params if p.kind == "copy"}
            # Copied tensors are the inputs' own memory: the result gets copies of its own.
            return {
                name: t.clone() if name in copied else t
                for name, t in iter_merged_params(inputs, dev, progress, runner)
            }
        if cfg.output == "adapter":
            return _write_adapter(inputs, Path(output_dir), dev, overwrite, progress, runner)
        return _write(inputs, Path(output_dir), dev, overwrite, progress, runner)
    finally:
        inputs.close()


def _write(inputs, output_dir: Path, device, overwrite: bool, progress: bool, runner=None) -> Path:
    cfg = inputs.cfg
    start = time.perf_counter()
    with atomic_output_dir(output_dir, overwrite) as tmp:
        if isinstance(runner, RayBackend):
            files = runner.write_model(inputs, tmp, device, progress)
        else:
            writer = ShardedWriter(tmp, output_layout(inputs), parse_size(cfg.max_shard_size))
            for name, tensor in iter_merged_params(inputs, device, progress, runner):
                writer.add(name, tensor)
            files = writer.close()
        copied = copy_non_weight_files(inputs.base.folder, tmp) if inputs.base.folder else []
        (tmp / "pactmerge_config.yaml").write_text(config_to_yaml(cfg))
        (tmp / "README.md").write_text(_merge_card(cfg, inputs, files, copied, time.perf_counter() - start))
    return output_dir


def _write_adapter(inputs, output_dir: Path, device, overwrite: bool, progress: bool, runner=None) -> Path:
    """``output: adapter``: the merged update ``alpha * merged`` as a PEFT LoRA adapter folder."""
    from pactmerge.config import DTYPES
    from pactmerge.engine import iter_merged_deltas
    from pactmerge.errors import PactMergeError
    from pactmerge.io.adapter_writer import write_adapter
    from pactmerge.io.lora import LoraSource
    from pactmerge.lowrank import scale_delta

    cfg = inputs.cfg
    layouts = {s.fan_in_fan_out for s in inputs.models if isinstance(s, LoraSource)}
    if len(layouts) > 1:
        raise PactMergeError("output: adapter: the input adapters disagree on fan_in_fan_out")
    out_dtype = DTYPES[cfg.out_dtype] if cfg.out_dtype else None
    base_name = str(cfg.base_model) if isinstance(cfg.base_model, (str, os.PathLike)) else None
    start = time.perf_counter()
    with atomic_output_dir(output_dir, overwrite) as tmp:
        updates = (
            (info, scale_delta(merged, cfg.alpha))
            for info, _, merged in iter_merged_deltas(inputs, device, progress, lowrank=True, backend=runner)
            if merged is not None
        )
        report = write_adapter(
            tmp,
            updates,
            max_rank=cfg.adapter_rank,
            fan_in_fan_out=layouts == {True},
            base_name=base_name,
            dtype_of=lambda info: out_dtype or info.dtype,
        )
        (tmp / "pactmerge_config.yaml").write_text(config_to_yaml(cfg))
        card = _merge_card(cfg, inputs, ["adapter_model.safetensors"], [], time.perf_counter() - start)
        (tmp / "README.md").write_text(card + _adapter_section(report, cfg.adapter_rank))
    return output_dir


def _adapter_section(report, max_rank) -> str:
    lines = [
        "## LoRA adapter",
        "",
        f"{len(report.modules)} target modules; "
        + (
            "exact: every update is written at its numerical rank."
            if report.exact
            else f"truncated to adapter_rank = {max_rank} where the update's rank is higher (energy kept below)."
        ),
        "",
        "| module | rank written | numerical rank | energy kept |",
        "|---|---|---|---|",
        *[f"| `{m}` | {r} | {q} | {e:.6f} |" for m, (r, q, e) in report.modules.items()],
        "",
    ]
    nonzero = {n: v for n, v in report.dropped.items() if v > 0}
    if nonzero:
        lines += ["Updates a LoRA adapter cannot carry (dropped; Frobenius norm):", ""]
        lines += [f"- `{n}`: {v:.4g}" for n, v in nonzero.items()] + [""]
    return "\n".join(lines)


def _merge_card(cfg: MergeConfig, inputs, files: list[str], copied: list[str], seconds: float) -> str:
    def label(src: Source) -> str:
        return src.label

    lines = [
        "---",
        "tags: [merge, pactmerge]",
        "---",
        "# Merged model",
        "",
        f"Merged with pactmerge {__version__}: `{cfg.pipeline.describe()}`, alpha = {cfg.alpha}.",
        "",
        f"- base model: `{label(inputs.base)}`",
        *[f"- model {i}: `{label(s)}` (weight {m.weight})" for i, (s, m) in enumerate(zip(inputs.models, cfg.models))],
        f"- {len(inputs.plan.params)} parameters in {len(files)} file(s); copied from the base folder:"
        f" {', '.join(copied) or 'none'}",
        f"- merge time: {seconds:.1f} s",
        "",
        "## Configuration",
        "",
        "```yaml",
        config_to_yaml(cfg).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def dry_run(config: MergeConfig | dict | str | os.PathLike, progress: bool = False) -> str:
    """Validate every input fully (keys, shapes, dtypes, and every tensor finite) and return the plan."""
    import sys

    from tqdm.auto import tqdm

    from pactmerge.plan import check_finite

    cfg = load_config(config)
    inputs = open_inputs(cfg)
    try:
        for info in tqdm(inputs.plan.params, desc="checking", unit="param", disable=not progress, file=sys.stderr):
            for src in [inputs.base, *inputs.models]:
                check_finite(src.get(info.name), src.file_of(info.name), info.name)
                src.release(info.name)  # mapped pages leave the resident set as they are checked
        depth = [(stage.name, stage.depth) for stage in cfg.pipeline.filters]
        return inputs.plan.describe(depth)
    finally:
        inputs.close()
