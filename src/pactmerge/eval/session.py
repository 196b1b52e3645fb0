"""A merge config's ``evaluation:`` block at work: ``alpha: search`` during ``pactmerge merge``, and
``pactmerge evaluate``.

:class:`MergeEvaluation` reads and checks the tasks and loads the evaluator *before* the merge
starts (bad data fail first, nothing written), adds the kind's automatic exclusions (task heads, a
frozen text tower) to the merge, streams ONE merge keeping its merged task vector, scores
``theta_0 + alpha * merged`` on the validation split for every alpha of the search, then scores the
test split at the chosen alpha. The writer (``pactmerge.api``) then writes the model at that alpha
from the kept task vector -- the same bytes as a merge with ``alpha`` fixed to that value -- with
``evaluation.{json,md,png}``.

:func:`evaluate` scores the base model, each fine-tune on its own task and any merged folder on the
test split, with the bench's table (absolute and normalized by each task's fine-tune).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pactmerge.config import MergeConfig, load_config
from pactmerge.config.evaluation import SearchConfig
from pactmerge.errors import PactMergeError
from pactmerge.eval.alpha import AlphaSearch
from pactmerge.eval.harness import add_averages, evaluate_merge, mean, result_row
from pactmerge.eval.kinds import prepare
from pactmerge.eval.kinds.common import EvalSpec, ModelEvaluator, hf_folder
from pactmerge.eval.report import alpha_chart, calibration_line, evaluation_markdown, jsonable, score_format
from pactmerge.lowrank import Delta, LowRankDelta
from pactmerge.stats import ModelData


def alpha_search(search: SearchConfig) -> AlphaSearch:
    """The ``evaluation.search`` block as the harness's search rule."""
    start, stop, step = search.grid
    return AlphaSearch(
        start=start,
        stop=stop,
        step=step,
        patience=search.patience,
        extend=search.extend,
        extend_step=search.extend_step,
        max_alpha=search.max,
        min_alpha=search.min,
        coarse_step=search.coarse,
    )


def eval_spec(cfg: MergeConfig, device: torch.device | str = "cpu", progress: bool = False) -> EvalSpec:
    """What the kind is built from: the base folder and ``task -> fine-tune`` of ``cfg``."""
    if cfg.evaluation is None:
        raise PactMergeError("the config has no `evaluation:` block (docs/evaluate.md)")
    base = hf_folder(cfg.base_model, "base_model")
    finetuned = {m.task: m.model for m in cfg.models if m.task is not None}
    dev = torch.device(device) if isinstance(device, str) else device
    return EvalSpec(cfg.evaluation, base, finetuned, dev, progress)


def _cpu(d: Delta) -> Delta:
    return LowRankDelta(d.B.cpu(), d.A.cpu()) if isinstance(d, LowRankDelta) else d.cpu()


def _to(d: Delta, device: torch.device) -> Delta:
    return LowRankDelta(d.B.to(device), d.A.to(device)) if isinstance(d, LowRankDelta) else d.to(device)


class MergeEvaluation:
    """The evaluation of one merge config (see the module docstring).

    Args:
        cfg: a config with an ``evaluation`` block; ``alpha`` a number (scored there) or ``"search"``.
        device: where the merge and the forward passes run.
    """

    def __init__(self, cfg: MergeConfig, device: torch.device, progress: bool = False):
        assert cfg.evaluation is not None
        if cfg.pipeline.method.spec.task_specific:  # the search below scores one shared model
            raise PactMergeError(
                f"config key 'evaluation': method {cfg.method!r} writes per-task models (task_modulators/), which"
                " the evaluation block cannot score yet; remove the block, give alpha a number, and evaluate each"
                " `pactmerge materialize`d task model with `pactmerge evaluate`"
            )
        self.cfg, self.device, self.progress = cfg, device, progress
        self.prepared = prepare(eval_spec(cfg, device, progress))
        self.evaluator: ModelEvaluator = self.prepared.evaluator()
        auto = [f"^{re.escape(n)}$" for n in self.evaluator.excluded]
        # The merge runs with the kind's exclusions; the written config stays the user's.
        self.merge_config = cfg.model_copy(update={"exclude": [*cfg.exclude, *auto]})
        self.merged: dict[str, Delta] = {}
        self.result: dict[str, Any] = {}
        self.calibration_from_tasks = False  # True once calibration_data() built the data-aware stages' data

    def calibration_data(self) -> list[ModelData] | None:
        """Each model's calibration data from its task's training split, when a stage of the merge needs
        statistics (PAVE, RegMean, Fisher); None otherwise (:mod:`pactmerge.eval.task_calibration`)."""
        from pactmerge.eval.task_calibration import task_calibration_data

        data = task_calibration_data(self.merge_config, self.prepared, self.evaluator)
        self.calibration_from_tasks = data is not None
        return data

    # -- the merge and the search ----------------------------------------------------------------------

    def run(self, inputs: Any) -> float:
        """Stream the merge of ``inputs`` (opened from :attr:`merge_config`), choose alpha; returns it."""
        from pactmerge.engine import iter_merged_deltas

        names = [p.name for p in inputs.plan.params if p.kind != "copy"]
        missing = self.evaluator.weights.missing(names)
        if missing:
            raise PactMergeError(
                f"{inputs.base.label}: parameter {missing[0]!r} would be merged, but the evaluated model has no"
                " such tensor (add it to `exclude`, or see docs/evaluate.md#models)"
            )
        t0 = time.perf_counter()
        for info, _, d in iter_merged_deltas(inputs, self.device, self.progress, lowrank=True):
            if d is not None:
                self.merged[info.name] = _cpu(d)
        merge_s = time.perf_counter() - t0
        dense = {n: d.dense() if isinstance(d, LowRankDelta) else d for n, d in self.merged.items()}
        ev = self.cfg.evaluation
        assert ev is not None
        fixed = None if self.cfg.alpha == "search" else float(self.cfg.alpha)
        t1 = time.perf_counter()
        scored = evaluate_merge(self.evaluator, dense, fixed, alpha_search(ev.search), self.progress)
        del dense
        choice = scored.choice
        self.alpha = choice.alpha
        self.result = {
            "kind": ev.kind,
            "metric": ev.metric_name,
            "tasks": list(self.evaluator.tasks),
            "searched": fixed is None,
            "alpha": choice.alpha,
            "alpha_label": choice.label(),
            "alpha_edge": choice.edge,
            "alpha_extended": choice.extended,
            "search": ev.search.model_dump(mode="json"),
            "trace": choice.trace,
            "validation": scored.validation,
            "test": scored.test,
            "average": {"validation": mean(scored.validation.values()), "test": mean(scored.test.values())},
            "sizes": self.prepared.sizes,
            "excluded": list(self.evaluator.excluded),
            "merge_seconds": round(merge_s, 2),
            "eval_seconds": round(time.perf_counter() - t1, 2),
            "calibration": self._calibration_summary(inputs.calibration),
        }
        return choice.alpha

    def _calibration_summary(self, calibration: Any) -> dict[str, Any] | None:
        """What the data-aware stages were calibrated on (None without such a stage)."""
        if calibration is None or calibration.store is None:
            return None
        return {
            "statistics": list(calibration.kinds),
            "data": "each model's task, train split" if self.calibration_from_tasks else "calibration_data (Python)",
            "tasks": [m.task for m in self.cfg.models],
            "examples": list(calibration.store.examples),
            "seconds": round(calibration.seconds, 2),
        }

    @property
    def output_config(self) -> MergeConfig:
        """The user's config with alpha fixed to the chosen value (``pactmerge_config.yaml``, the card)."""
        return self.cfg.model_copy(update={"alpha": self.alpha})

    def params(self, inputs: Any) -> Iterator[tuple[str, Tensor]]:
        """``(name, theta)``, theta = theta_0 + alpha * merged in the output dtype on the CPU -- what
        ``engine.iter_merged_params`` yields for a merge with this alpha, from the kept task vector."""
        from pactmerge.engine import copied_value, output_params

        cfg = inputs.cfg

        def replay():
            for info in inputs.plan.params:
                if info.kind == "copy":
                    yield info, copied_value(inputs, info), None
                    continue
                base = inputs.base.get(info.name).to(device=self.device, dtype=cfg.compute_dtype)
                yield info, base, _to(self.merged[info.name], self.device)

        return output_params(inputs, replay(), self.alpha)

    def adapter_updates(self, inputs: Any) -> Iterator[tuple[Any, Delta]]:
        """``(info, alpha * merged)`` per merged parameter, for ``output: adapter``."""
        from pactmerge.lowrank import scale_delta

        for info in inputs.plan.params:
            if info.kind != "copy":
                yield info, scale_delta(_to(self.merged[info.name], self.device), self.alpha)

    # -- outputs ---------------------------------------------------------------------------------------

    def write_files(self, folder: Path, weight_files: list[str]) -> list[str]:
        """``evaluation.json``, ``evaluation.md``, ``evaluation.png`` and the kind's per-task folders."""
        self.result["task_folders"] = self.prepared.write_task_folders(folder, weight_files)
        (folder / "evaluation.json").write_text(json.dumps(jsonable(self.result), indent=1))
        written = ["evaluation.json", "evaluation.md"]
        note = ""
        try:
            alpha_chart(self.result, folder / "evaluation.png")
            written.append("evaluation.png")
        except ImportError:
            note = "\n(evaluation.png not written: matplotlib is not installed)\n"
        (folder / "evaluation.md").write_text(evaluation_markdown(self.result) + note)
        return written

    def card_section(self) -> str:
        """The model card's evaluation section, without its heading (markdown)."""
        r = self.result
        fmt = score_format(r["metric"])
        how = (
            f"chosen on the validation split from {len(r['trace'])} values (`evaluation.search`)"
            if r["searched"]
            else "fixed in the config"
        )
        lines = [
            f"α = {r['alpha_label']}, {how}. Kind `{r['kind']}`, metric {r['metric']}:",
            "",
            "| task | validation | test |",
            "|---|---|---|",
            *[f"| {t} | {fmt(r['validation'][t])} | {fmt(r['test'][t])} |" for t in r["tasks"]],
            f"| average | {fmt(r['average']['validation'])} | {fmt(r['average']['test'])} |",
            "",
        ]
        if r["excluded"]:
            shown = ", ".join(f"`{n}`" for n in r["excluded"][:8]) + (" ..." if len(r["excluded"]) > 8 else "")
            lines += [f"Not merged ({len(r['excluded'])}; kept from the base): {shown}", ""]
        if r.get("task_folders"):
            lines += [
                "Per-task models (the merged backbone with each task's own head): "
                + ", ".join(f"`{t}/`" for t in r["task_folders"]),
                "",
            ]
        if r.get("calibration"):
            lines += [calibration_line(r["calibration"]), ""]
        lines += ["Details: `evaluation.md`, `evaluation.json`.", ""]
        return "\n".join(lines)


# -- pactmerge evaluate ---------------------------------------------------------------------------------


def _finetune_loader(cfg: MergeConfig, evaluator: ModelEvaluator, ref: Any) -> Any:
    """A function that puts fine-tune ``ref`` into the evaluator (an adapter as theta_0 + s B A)."""
    from pactmerge.io.lora import is_adapter
    from pactmerge.io.sources import open_source

    if is_adapter(ref):
        from pactmerge.eval.harness import merged_task_vector

        exclude = [*cfg.exclude, *[f"^{re.escape(n)}$" for n in evaluator.excluded]]
        single = {"base_model": cfg.base_model, "models": [ref], "method": "task_arithmetic", "exclude": exclude}
        delta = merged_task_vector(single)[0]
        return lambda: evaluator.set_merged(delta, 1.0)

    def load() -> None:
        with open_source(ref, "<in-memory model>") as src:
            evaluator.set_weights({n: src.get(n) for n in src.names() if n in evaluator.weights.names})

    return load


def _merged_alpha(folder: Path) -> str:
    import yaml

    cfg_file = folder / "pactmerge_config.yaml"
    if not cfg_file.exists():
        return "—"
    alpha = (yaml.safe_load(cfg_file.read_text()) or {}).get("alpha")
    return f"{alpha:g}" if isinstance(alpha, (int, float)) else str(alpha)


def evaluate(
    config: MergeConfig | Mapping | str | os.PathLike,
    models: Sequence[str] = ("base", "finetuned"),
    *,
    device: str = "cpu",
    progress: bool = False,
) -> dict:
    """Score models on the test split of the config's evaluation tasks.

    Args:
        config: a merge config with an ``evaluation`` block.
        models: ``"base"`` (the base model: zero-shot, or with each task's own head), ``"finetuned"``
            (each fine-tune on its own task) and ``"merged:<folder>"`` (a merged model's folder), in
            the order the table lists them.

    Returns:
        A report like the bench's (``tasks``, ``rows``; rows have ``test``, ``normalized``,
        ``avg_abs``, ``avg_norm``): normalized = score / that task's fine-tune's score.
    """
    from pactmerge.engine import resolve_device
    from pactmerge.io.sources import open_source

    cfg = load_config(config)
    dev = resolve_device(device)
    wanted = []
    for m in models:
        if m in ("base", "finetuned") or (m.startswith("merged:") and len(m) > len("merged:")):
            wanted.append(m)
        else:
            raise PactMergeError(f"--models: {m!r} is not base, finetuned or merged:<folder>")
    folders = [Path(m.split(":", 1)[1]) for m in wanted if m.startswith("merged:")]
    for folder in folders:
        if not folder.exists():
            raise PactMergeError(f"--models merged:{folder}: {folder} does not exist")
    t0 = time.perf_counter()
    spec = eval_spec(cfg, dev, progress)
    prepared = prepare(spec)
    evaluator: ModelEvaluator = prepared.evaluator()
    tasks = list(evaluator.tasks)

    ft_test: dict[str, float] = {}
    for task, ref in spec.finetuned.items():  # always: the normalization's reference
        _finetune_loader(cfg, evaluator, ref)()
        ft_test[task] = evaluator.scores("test", [task])[task]
    rows = []
    for m in wanted:
        if m == "base":
            evaluator.set_weights({})
            own_heads = spec.evaluation.kind == "sequence-classification"
            label = "base, each task's own head" if own_heads else "base (zero-shot)"
            rows.append(result_row("base", label, evaluator.scores("test")))
        elif m == "finetuned":
            rows.append(result_row("finetuned", "fine-tuned (each task its own model)", dict(ft_test)))
        else:
            folder = Path(m.split(":", 1)[1])
            with open_source(str(folder)) as src:
                evaluator.set_weights({n: src.get(n) for n in src.names() if n in evaluator.weights.names})
            row = result_row(m, f"merged: {folder}", evaluator.scores("test"))
            row["alpha_label"] = _merged_alpha(folder)
            rows.append(row)
    add_averages(rows, ft_test)
    return {
        "kind": spec.evaluation.kind,
        "metric": spec.metric,
        "tasks": tasks,
        "sizes": prepared.sizes,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
