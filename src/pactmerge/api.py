"""The Python API: merge from a config (YAML path, mapping or MergeConfig) to memory or disk."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from pactmerge.backends import make_backend
from pactmerge.backends.ray import RayBackend
from pactmerge.config import MergeConfig, config_to_yaml, load_config
from pactmerge.engine import iter_merged_params, open_inputs, output_layout, resolve_device
from pactmerge.errors import PactMergeError
from pactmerge.io import card
from pactmerge.io.hf_files import check_chat_template, output_dtype, set_chat_template, set_config_dtype
from pactmerge.io.output_guard import atomic_output_dir, prepare_target
from pactmerge.io.writer import ShardedWriter, copy_non_weight_files, parse_size
from pactmerge.modulators import ModulatorWriter
from pactmerge.stats import ModelData


def merge(
    config: MergeConfig | dict | str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    overwrite: bool = False,
    force: bool = False,
    progress: bool = False,
    calibration_data: Sequence[ModelData] | None = None,
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
            A method with per-task outputs (``tall_masks``, ``tsv_c``) also writes
            ``task_modulators/`` there (:func:`pactmerge.materialize` rebuilds task t's model);
            in memory only the merged model is returned.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        overwrite: replace an existing ``output_dir`` that is an earlier pactmerge output (it carries
            the ``.pactmerge-output`` marker) or an empty folder.
        force: replace an existing ``output_dir`` whatever it is. The output may never be, contain
            or lie inside an input (see :mod:`pactmerge.io.output_guard`).
        calibration_data: for data-aware methods/filters (PAVE, RegMean, Fisher): one
            :class:`pactmerge.stats.ModelData` per model (its examples and how to load/run it);
            the statistics are computed once and cached (docs/data_aware.md).
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
    # The output may not touch an input, nor replace a folder pactmerge did not write: checked before any work.
    refs = [config, cfg.base_model, *(m.model for m in cfg.models)]
    guard: dict[str, Any] = {
        "overwrite": overwrite,
        "force": force,
        "inputs": [r for r in refs if isinstance(r, str | os.PathLike)],
    }
    if output_dir is not None:
        prepare_target(output_dir, **guard)
    runner = make_backend(backend, workers, threads)
    if isinstance(runner, RayBackend):
        _check_ray(cfg, output_dir)
    session = None
    if cfg.evaluation is not None:  # the tasks are read and checked, and the evaluator loaded, first
        from pactmerge.eval.session import MergeEvaluation

        session = MergeEvaluation(cfg, dev, progress)
        cfg = session.merge_config
        if calibration_data is None:  # data-aware stages: each model's task's training split
            calibration_data = session.calibration_data()
    inputs = open_inputs(cfg, calibration_data, cache_dir=cache_dir)
    try:
        check_output(inputs)
        if session is not None:
            session.run(inputs)  # one streamed merge; alpha chosen on the validation split
            if output_dir is None:
                return dict(session.params(inputs))
        if output_dir is None:
            copied = {p.name for p in inputs.plan.params if p.kind == "copy"}
            # Copied tensors are the inputs' own memory: the result gets copies of its own.
            return {
                name: t.clone() if name in copied else t
                for name, t in iter_merged_params(inputs, dev, progress, backend=runner)
            }
        if cfg.output == "adapter":
            return _write_adapter(inputs, Path(output_dir), dev, guard, progress, session, runner)
        return _write(inputs, Path(output_dir), dev, guard, progress, session, runner)
    finally:
        inputs.close()


def _check_ray(cfg: MergeConfig, output_dir) -> None:
    """What the Ray backend cannot do, refused before any work."""
    if output_dir is None or cfg.output == "adapter":
        raise PactMergeError("--backend ray writes a dense model folder: give an output folder (output: dense)")
    if cfg.evaluation is not None or cfg.pipeline.method.spec.task_specific:
        raise PactMergeError(
            "--backend ray: a merge with an evaluation: block or per-task outputs (task_modulators/) runs on the"
            " local backend (--backend local)"
        )
    if any(stage.spec.needs for stage in cfg.pipeline.stages):
        raise PactMergeError("--backend ray: data-aware stages (calibration statistics) run on the local backend")


def _path_or_none(ref) -> str | None:
    return os.path.abspath(ref) if isinstance(ref, (str, os.PathLike)) else None


def check_output(inputs) -> None:
    """Checks of what the output folder needs, run before any work (and by ``--dry-run``)."""
    if inputs.cfg.chat_template is not None:
        check_chat_template(inputs.base.folder)


def _card(
    cfg: MergeConfig,
    inputs,
    output_dir: Path,
    files: list[str],
    copied: list[str],
    seconds: float,
    evaluation: str | None = None,
) -> str:
    return card.model_card(
        cfg,
        base_label=inputs.base.label,
        model_labels=[s.label for s in inputs.models],
        base_folder=inputs.base.folder,
        num_params=len(inputs.plan.params),
        files=files,
        copied=copied,
        seconds=seconds,
        title=output_dir.name or None,
        evaluation=evaluation,
    )


def _write(inputs, output_dir: Path, device, guard: dict, progress: bool, session=None, runner=None) -> Path:
    cfg = session.output_config if session is not None else inputs.cfg
    start = time.perf_counter()
    layout = output_layout(inputs)
    with atomic_output_dir(output_dir, **guard) as tmp:
        writer = ShardedWriter(tmp, layout, parse_size(cfg.max_shard_size))
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
        if isinstance(runner, RayBackend):
            files = runner.write_model(inputs, tmp, device, progress)
        else:
            if session is not None:
                params = session.params(inputs)
            else:
                params = iter_merged_params(inputs, device, progress, on_modulators=sink, backend=runner)
            try:
                for name, tensor in params:
                    writer.add(name, tensor)
                files = writer.close()
            except BaseException:
                writer.abort()  # no file handle outlives a failed run
                raise
        if modulators is not None:
            modulators.close()
        copied = copy_non_weight_files(inputs.base.folder, tmp) if inputs.base.folder else []
        if inputs.vocab is not None:  # the output vocabulary's tokenizer and vocab_size
            inputs.vocab.write(tmp)
        # The merged tensors' dtype (copied ones keep the base's) goes into config.json.
        dtype = output_dtype([d for (_, _, d), p in zip(layout, inputs.plan.params) if p.kind != "copy"])
        if dtype is not None:
            set_config_dtype(tmp, dtype)
        if cfg.chat_template is not None:
            set_chat_template(tmp, cfg.chat_template)
        (tmp / "pactmerge_config.yaml").write_text(config_to_yaml(cfg))
        evaluation = None
        if session is not None:  # evaluation.{json,md,png}, per-task folders, the card's section
            session.write_files(tmp, files)
            evaluation = session.card_section()
        text = _card(cfg, inputs, output_dir, files, copied, time.perf_counter() - start, evaluation)
        if modulators is not None:
            text += _modulators_section(output_dir, len(inputs.models))
        (tmp / "README.md").write_text(text)
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


def _write_adapter(inputs, output_dir: Path, device, guard: dict, progress: bool, session=None, runner=None) -> Path:
    """``output: adapter``: the merged update ``alpha * merged`` as a PEFT LoRA adapter folder."""
    from pactmerge.config import DTYPES
    from pactmerge.engine import iter_merged_deltas
    from pactmerge.errors import PactMergeError
    from pactmerge.io.adapter_writer import write_adapter
    from pactmerge.io.lora import LoraSource
    from pactmerge.lowrank import scale_delta

    cfg = session.output_config if session is not None else inputs.cfg
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
    with atomic_output_dir(output_dir, **guard) as tmp:
        if session is not None:
            scaled = session.adapter_updates(inputs)
        else:
            scaled = (
                (info, scale_delta(merged, cfg.fixed_alpha))
                for info, _, merged in iter_merged_deltas(inputs, device, progress, lowrank=True, backend=runner)
                if merged is not None
            )
        updates = ((info, _finite_update(info.name, u, cfg.allow_nonfinite)) for info, u in scaled)
        report = write_adapter(
            tmp,
            updates,
            max_rank=cfg.adapter_rank,
            fan_in_fan_out=layouts == {True},
            base_name=base_name,
            dtype_of=lambda info: out_dtype or info.dtype,
        )
        (tmp / "pactmerge_config.yaml").write_text(config_to_yaml(cfg))
        evaluation = None
        if session is not None:
            session.write_files(tmp, [])
            evaluation = session.card_section()
        seconds = time.perf_counter() - start
        text = _card(cfg, inputs, output_dir, ["adapter_model.safetensors"], [], seconds, evaluation)
        (tmp / "README.md").write_text(text + "\n" + card.adapter_section(report, cfg.adapter_rank))
    return output_dir


def _finite_update(name: str, update, allow_nonfinite: bool):
    """``alpha * merged`` for an adapter, refused if it holds NaN/Inf (unless allowed)."""
    from pactmerge.finite import check_output_finite
    from pactmerge.lowrank import tensors_of

    for t in tensors_of(update) if not allow_nonfinite else ():
        check_output_finite(name, t)
    return update


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
    if cfg.evaluation is not None:  # the tasks' data, columns, labels, splits and the evaluated model
        from pactmerge.eval.session import MergeEvaluation

        session = MergeEvaluation(cfg, resolve_device("cpu"))
        cfg = session.merge_config
        if calibration_data is None:
            calibration_data = session.calibration_data()
    inputs = open_inputs(cfg, calibration_data)
    try:
        check_output(inputs)
        for info in tqdm(inputs.plan.params, desc="checking", unit="param", disable=not progress, file=sys.stderr):
            for src in [inputs.base, *inputs.models] if not cfg.allow_nonfinite else ():
                # A model may lack an optional buffer (plan.from_base) or an extra parameter
                # (extra_parameters: copy) that only one model has.
                if info.name in src:
                    check_finite(src.get(info.name), src.file_of(info.name), info.name)
                    src.release(info.name)  # mapped pages leave the resident set as they are checked
        plan = inputs.plan.describe(cfg.pipeline.filters)
        return plan if inputs.vocab is None else f"{plan}\n{inputs.vocab.describe()}"
    finally:
        inputs.close()
