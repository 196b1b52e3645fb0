"""``analyze``: the data-free LBW diagnostics for the checkpoints of a merge config."""

from __future__ import annotations

import math
import os
from pathlib import Path

from pactmerge.analysis.components import classify
from pactmerge.analysis.metrics import ParamMetrics
from pactmerge.analysis.stream import analysis_setup, iter_param_metrics, select
from pactmerge.analysis.summary import summarize
from pactmerge.config import MergeConfig, load_config
from pactmerge.engine import open_inputs, resolve_device
from pactmerge.errors import PactMergeError

SCHEMA_VERSION = 1


def json_clean(x):
    """Nested dicts/lists with every NaN/inf float replaced by None (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_clean(v) for v in x]
    return x


def _ref(x) -> str:
    return str(x) if isinstance(x, (str, os.PathLike)) else "<in-memory state dict>"


def task_labels(refs: list) -> list[str]:
    """Short, unique task names from the config's model references: a path's last component
    (``.../task3`` -> ``task3``), ``model{i}`` for an in-memory state dict."""
    short = [
        Path(_ref(r)).name or _ref(r) if isinstance(r, (str, os.PathLike)) else f"model{i}" for i, r in enumerate(refs)
    ]
    return [f"{s}#{i}" if short.count(s) > 1 else s for i, s in enumerate(short)]


def param_entry(info, m: ParamMetrics) -> dict:
    """One ``parameters[name]`` entry of metrics.json (see docs/analysis.md)."""
    return json_clean(
        {
            "intrusion_energy": m.intrusion_energy.tolist(),
            "core_axis_energy": m.core_axis_energy.tolist(),
            "sim": m.sim.tolist(),
            "inf": m.inf.tolist(),
            "protect_dim": m.protect_dim.tolist(),
            "removed_energy": m.removed_energy.tolist(),
            "core_residual": m.core_residual.tolist(),
            "core_protected": m.core_protected.tolist(),
            "lbw_rank": m.lbw_rank.tolist(),
            "pact_applied": m.pact_applied,
            "layer": info.layer,
            "depth_fraction": info.depth_fraction,
            "component": classify(info.name),
            "shape": list(info.shape),
        }
    )


def analyze(
    config: MergeConfig | dict | str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    layers: str | None = None,
    worst_n: int = 5,
    device: str = "cpu",
    progress: bool = False,
    overwrite: bool = False,
    task_names: list[str] | None = None,
) -> dict:
    """Compute PACT's load-bearing-wall diagnostics for every 2-D parameter of a merge config.

    Args:
        config: a merge config (YAML path, mapping or :class:`MergeConfig`); its sources, plan,
            compute dtype, seed and ``pact`` parameters (K, k, svd, depth, orth_rtol) are used as
            the merge would use them. Without a pact filter, :class:`PactParams` defaults apply.
        out_dir: if given, write metrics.json, CSV tables, PNG plots and report.md there, atomically.
        layers: regex; only parameters whose name it matches (``re.search``) are analyzed.
        worst_n: length of the worst-by-Inf / worst-by-E_in lists (and of the worst-N heatmaps).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        progress: show a progress bar over parameters.
        overwrite: replace an existing ``out_dir``.
        task_names: labels of the config's models, in order (default: their folder names).

    Returns:
        ``{"parameters": {name: {...}}, "summary": {...}, "tasks": [...], "config": {...}}``
        with NaN written as None (the metrics.json content; schema in docs/analysis.md).

    Raises:
        PactMergeError: bad config/inputs, K or k = 0, nothing to analyze, ``out_dir`` exists.
    """
    if worst_n < 1:
        raise PactMergeError(f"--worst-n {worst_n}: must be >= 1")
    cfg = load_config(config)
    setup = analysis_setup(cfg)
    dev = resolve_device(device)
    if out_dir is not None and Path(out_dir).exists() and not overwrite:
        # Fail before the (long) pass, not after it.
        raise PactMergeError(f"{out_dir}: output folder already exists (pass --overwrite to replace it)")
    inputs = open_inputs(cfg)
    try:
        chosen, skipped = select(inputs, setup, layers)
        tasks = list(task_names) if task_names is not None else task_labels([m.model for m in cfg.models])
        if len(tasks) != len(cfg.models):
            raise PactMergeError(f"analyze: {len(tasks)} task names for {len(cfg.models)} models")
        params = {
            info.name: param_entry(info, m) for info, m in iter_param_metrics(inputs, setup, chosen, dev, progress)
        }
        config_block = {
            "base_model": _ref(cfg.base_model),
            "models": [_ref(m.model) for m in cfg.models],
            "pact": setup.pact.model_dump(),
            "pact_configured": setup.pact_configured,
            "pre_filters": [stage.name for stage in setup.pre_filters],
            "dtype": cfg.dtype,
            "seed": cfg.seed,
            "exclude": list(cfg.exclude),
            "layers": layers,
            "worst_n": worst_n,
            "device": str(dev),
            "num_layers": inputs.plan.num_layers,
            "schema_version": SCHEMA_VERSION,
        }
    finally:
        inputs.close()
    summary = summarize(params, tasks, worst_n)
    summary["skipped"] = skipped
    result = json_clean({"parameters": params, "summary": summary, "tasks": tasks, "config": config_block})
    if out_dir is not None:
        from pactmerge.analysis.report import write_outputs

        write_outputs(result, Path(out_dir), overwrite=overwrite)
    return result
