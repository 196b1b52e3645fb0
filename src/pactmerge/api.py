"""The Python API: merge from a config (YAML path, mapping or MergeConfig) to memory or disk."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from pactmerge import __version__
from pactmerge.config import MergeConfig, config_to_yaml, load_config
from pactmerge.engine import iter_merged_params, open_inputs, output_layout, resolve_device
from pactmerge.io.sources import Source
from pactmerge.io.writer import ShardedWriter, atomic_output_dir, copy_non_weight_files, parse_size
from pactmerge.modulators import ModulatorWriter
from pactmerge.stats import ModelData


def merge(
    config: MergeConfig | dict | str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = False,
    calibration_data: Sequence[ModelData] | None = None,
    **overrides: Any,
) -> dict[str, Tensor] | Path:
    """Merge models as ``config`` says.

    Args:
        config: a :class:`MergeConfig`, a mapping with the YAML keys, or a YAML file path. Model
            references may be paths or in-memory ``dict[str, Tensor]`` state dicts.
        output_dir: if given, write an HF-style folder there (atomically) and return its path;
            otherwise return the merged state dict. With ``output: adapter`` in the config the
            folder is a PEFT LoRA adapter instead (docs/lora.md); the in-memory result stays dense.
            A method with per-task outputs (``tall_masks``, ``tsv_c``) also writes
            ``task_modulators/`` there (:func:`pactmerge.materialize` rebuilds task t's model);
            in memory only the merged model is returned.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        overwrite: replace an existing ``output_dir``.
        calibration_data: for data-aware methods/filters (PAVE, RegMean, Fisher): one
            :class:`pactmerge.stats.ModelData` per model (its examples and how to load/run it);
            the statistics are computed once and cached (docs/data_aware.md).
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
    inputs = open_inputs(cfg, calibration_data)
    try:
        if output_dir is None:
            return dict(iter_merged_params(inputs, dev, progress))
        if cfg.output == "adapter":
            return _write_adapter(inputs, Path(output_dir), dev, overwrite, progress)
        return _write(inputs, Path(output_dir), dev, overwrite, progress)
    finally:
        inputs.close()


def _path_or_none(ref) -> str | None:
    return os.path.abspath(ref) if isinstance(ref, (str, os.PathLike)) else None


def _write(inputs, output_dir: Path, device, overwrite: bool, progress: bool) -> Path:
    cfg = inputs.cfg
    start = time.perf_counter()
    with atomic_output_dir(output_dir, overwrite) as tmp:
        writer = ShardedWriter(tmp, output_layout(inputs), parse_size(cfg.max_shard_size))
        modulators = None
        if cfg.pipeline.method.spec.task_specific:
            # Per-task outputs (TALL masks, TSV-C) go beside the model: pactmerge.modulators.
            modulators = ModulatorWriter(
                tmp,
                [_path_or_none(m.model) or src.label for m, src in zip(cfg.models, inputs.models)],
                method=cfg.method,
                alpha=cfg.alpha,
                base_model=_path_or_none(cfg.base_model),
            )
        sink = (lambda info, mods: modulators.add(info.name, info.shape, mods)) if modulators else None
        for name, tensor in iter_merged_params(inputs, device, progress, on_modulators=sink):
            writer.add(name, tensor)
        files = writer.close()
        if modulators is not None:
            modulators.close()
        copied = copy_non_weight_files(inputs.base.folder, tmp) if inputs.base.folder else []
        (tmp / "pactmerge_config.yaml").write_text(config_to_yaml(cfg))
        card = _merge_card(cfg, inputs, files, copied, time.perf_counter() - start)
        if modulators is not None:
            card += _modulators_section(output_dir, len(inputs.models))
        (tmp / "README.md").write_text(card)
    return output_dir


def _modulators_section(output_dir: Path, num_tasks: int) -> str:
    return "\n".join(
        [
            "## Per-task models",
            "",
            f'`task_modulators/` holds one modulator file per task (docs/methods.md, "Per-task outputs"). Task t\'s'
            " own model (t = 0 .."
            f" {num_tasks - 1}, the models' order above):",
            "",
            "```",
            f"pactmerge materialize {output_dir} t DEST",
            "```",
            "",
        ]
    )


def _write_adapter(inputs, output_dir: Path, device, overwrite: bool, progress: bool) -> Path:
    """``output: adapter``: the merged update ``alpha * merged`` as a PEFT LoRA adapter folder."""
    from pactmerge.config import DTYPES
    from pactmerge.engine import iter_merged_deltas
    from pactmerge.errors import PactMergeError
    from pactmerge.io.adapter_writer import write_adapter
    from pactmerge.io.lora import LoraSource
    from pactmerge.lowrank import scale_delta

    cfg = inputs.cfg
    if cfg.pipeline.method.spec.task_specific:
        raise PactMergeError(
            f"output: adapter cannot carry the per-task outputs of method {cfg.method!r}; use output: dense"
        )
    layouts = {s.fan_in_fan_out for s in inputs.models if isinstance(s, LoraSource)}
    if len(layouts) > 1:
        raise PactMergeError("output: adapter: the input adapters disagree on fan_in_fan_out")
    out_dtype = DTYPES[cfg.out_dtype] if cfg.out_dtype else None
    base_name = str(cfg.base_model) if isinstance(cfg.base_model, (str, os.PathLike)) else None
    start = time.perf_counter()
    with atomic_output_dir(output_dir, overwrite) as tmp:
        updates = (
            (info, scale_delta(merged, cfg.alpha))
            for info, _, merged in iter_merged_deltas(inputs, device, progress, lowrank=True)
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


def dry_run(
    config: MergeConfig | dict | str | os.PathLike,
    progress: bool = False,
    calibration_data: Sequence[ModelData] | None = None,
) -> str:
    """Validate every input fully (keys, shapes, dtypes, and every tensor finite) and return the plan."""
    import sys

    from tqdm.auto import tqdm

    from pactmerge.plan import check_finite

    cfg = load_config(config)
    inputs = open_inputs(cfg, calibration_data)
    try:
        for info in tqdm(inputs.plan.params, desc="checking", unit="param", disable=not progress, file=sys.stderr):
            for src in [inputs.base, *inputs.models]:
                check_finite(src.get(info.name), src.file_of(info.name), info.name)
        depth = [(stage.name, stage.depth) for stage in cfg.pipeline.filters]
        return inputs.plan.describe(depth)
    finally:
        inputs.close()
