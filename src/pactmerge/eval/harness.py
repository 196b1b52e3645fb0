"""The evaluation harness: alpha chosen on validation over ONE merged task vector, reference rows,
and the row loop every benchmark suite runs.

An :class:`Evaluator` holds one model and swaps its weights cheaply; the harness never looks inside
it. A merge is scored as ``theta_0 + alpha * merged``; ``merged`` is one task vector shared by every
task, or a function ``task -> task vector`` when a method gives each task its own model (per-task
masks or modulators): :func:`scores_at` then loads each task's own state before scoring that task.
The test split is scored only once alpha is fixed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor
from tqdm.auto import tqdm

from pactmerge.eval.alpha import AlphaChoice, AlphaSearch, choose_alpha
from pactmerge.eval.rows import Row, row_config

TaskVector = Mapping[str, Tensor]
PerTaskVectors = Callable[[str], Mapping[str, Tensor]]
Merged = TaskVector | PerTaskVectors  # one merged task vector for every task, or one per task


class Evaluator(Protocol):
    """One model, every task's data prepared once, and cheap weight swaps."""

    @property
    def tasks(self) -> Sequence[str]:
        """The task names, in order."""
        ...

    def set_weights(self, weights: Mapping[str, Tensor]) -> None:
        """theta = ``weights`` (names not given: theta_0)."""

    def set_merged(self, merged: Mapping[str, Tensor], alpha: float) -> None:
        """theta = theta_0 + alpha * merged (names not given: theta_0)."""

    def scores(self, split: str, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """The metric of the current weights on ``split`` of each task (all tasks by default)."""
        ...


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def normalized(acc: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """Per-task score divided by the reference (the task's own fine-tuned model) score."""
    return {t: acc[t] / reference[t] if reference.get(t, 0) > 0 else float("nan") for t in acc}


def scores_at(
    evaluator: Evaluator, merged: Merged, alpha: float, splits: Sequence[str], tasks: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """``{split: {task: score}}`` of theta_0 + alpha * merged (per task when ``merged`` is a function)."""
    names = list(tasks) if tasks is not None else list(evaluator.tasks)
    if isinstance(merged, Mapping):
        evaluator.set_merged(merged, alpha)
        return {s: evaluator.scores(s, tasks) for s in splits}
    out: dict[str, dict[str, float]] = {s: {} for s in splits}
    for task in names:
        evaluator.set_merged(merged(task), alpha)
        for s in splits:
            out[s].update(evaluator.scores(s, [task]))
    return out


@dataclass
class MergeScores:
    choice: AlphaChoice
    validation: dict[str, float]
    test: dict[str, float]


def evaluate_merge(
    evaluator: Evaluator,
    merged: Merged,
    fixed_alpha: float | None = None,
    search: AlphaSearch | None = None,
    progress: bool = False,
) -> MergeScores:
    """Choose alpha on the validation split (the mean score over tasks), then score both splits at
    that alpha. The test split is never looked at before alpha is fixed."""
    bar = tqdm(desc="alpha search", unit="alpha", disable=not progress, file=sys.stderr, leave=False)
    validation: dict[float, dict[str, float]] = {}  # per alpha: the scores are deterministic, kept for the pick

    def val_score(alpha: float) -> float:
        scores = scores_at(evaluator, merged, alpha, ["validation"])["validation"]
        validation[round(alpha, 6)] = scores
        bar.update()
        bar.set_postfix(alpha=f"{alpha:g}", score=f"{mean(scores.values()):.4f}")
        return mean(scores.values())

    try:
        if fixed_alpha is not None:
            choice = AlphaChoice(fixed_alpha, val_score(fixed_alpha))
        else:
            choice = choose_alpha(val_score, search or AlphaSearch())
    finally:
        bar.close()
    test = scores_at(evaluator, merged, choice.alpha, ["test"])["test"]
    return MergeScores(choice, validation[round(choice.alpha, 6)], test)


def merged_task_vector(merge_cfg: Mapping[str, Any], progress: bool = False) -> tuple[dict[str, Tensor], float]:
    """One streamed merge: ``{name: merged task vector}`` (float32, CPU; copied parameters
    omitted) and its seconds."""
    from pactmerge.config import load_config
    from pactmerge.engine import iter_merged_deltas, open_inputs
    from pactmerge.lowrank import densify

    t0 = time.perf_counter()
    inputs = open_inputs(load_config(merge_cfg))
    try:
        merged = {
            info.name: densify([d])[0].float().cpu()
            for info, _, d in iter_merged_deltas(inputs, "cpu", progress)
            if d is not None
        }
    finally:
        inputs.close()
    return merged, time.perf_counter() - t0


# -- result rows -------------------------------------------------------------------------------------


def result_row(
    key: str,
    label: str,
    test: dict,
    val: dict | None = None,
    choice: AlphaChoice | None = None,
    fixed: bool = False,
    **extra: Any,
) -> dict:
    """One row of a report: scores per task, and the alpha choice (None for reference rows)."""
    return {
        "key": key,
        "label": label,
        "test": test,
        "validation": val,
        "alpha": None if choice is None else choice.alpha,
        "alpha_label": "—" if choice is None else choice.label() + (" (fixed)" if fixed else ""),
        "alpha_edge": None if choice is None else choice.edge,
        "alpha_extended": None if choice is None else choice.extended,
        "alpha_trace": None if choice is None else choice.trace,
        **extra,
    }


def add_averages(results: list[dict], ft_test: Mapping[str, float]) -> None:
    """Fill each scored row's normalized scores (vs the fine-tuned models) and averages."""
    for r in results:
        if "test" in r:
            r["normalized"] = normalized(r["test"], ft_test)
            r["avg_abs"] = mean(r["test"].values())
            r["avg_norm"] = mean(r["normalized"].values())


# -- the benchmark row loop -------------------------------------------------------------------------


@dataclass
class BenchSuite:
    """A prepared suite: what :func:`run_rows` needs from it.

    ``load_finetuned(task)`` puts that task's own fine-tune into the evaluator (``load_base()`` the base
    model, default ``set_weights({})``); ``exclude`` lists the
    parameter patterns the merges copy from the base; ``extra_references`` adds suite-specific
    reference rows after the fine-tuned one; ``row_extra`` is stored in every merge row.
    """

    evaluator: Evaluator
    base_path: Path
    finetuned: dict[str, Path]  # task -> checkpoint, in task order
    exclude: list[str]
    load_finetuned: Callable[[str], None]
    load_base: Callable[[], None] | None = None
    zero_shot_label: str = "zero-shot"
    zero_shot_validation: bool = False
    extra_references: Callable[[], list[dict]] | None = None
    after_references: Callable[[], None] | None = None  # e.g. free the fine-tuned weights
    row_extra: dict = field(default_factory=dict)


def run_rows(
    suite: BenchSuite,
    rows: Sequence[Row],
    *,
    dtype: str = "float32",
    search: AlphaSearch | None = None,
    log: Callable[[str], None] = print,
    progress: bool = False,
    checkpoint: Callable[[list[dict], dict[str, float]], None] | None = None,
) -> tuple[list[dict], dict[str, float]]:
    """The reference rows (zero-shot, fine-tuned), then one streamed merge per method row with alpha
    chosen on validation. ``checkpoint(results, ft_test)`` runs after each merge row (partial results
    survive an interrupted run). Returns the rows and the fine-tuned test scores."""
    ev = suite.evaluator
    tasks = list(suite.finetuned)
    results: list[dict] = []
    t0 = time.perf_counter()
    if suite.load_base is not None:
        suite.load_base()
    else:
        ev.set_weights({})
    zs_test = ev.scores("test")
    zs_val = ev.scores("validation") if suite.zero_shot_validation else None
    ft_test: dict[str, float] = {}
    ft_val: dict[str, float] = {}
    for name in tasks:
        suite.load_finetuned(name)
        ft_test[name] = ev.scores("test", [name])[name]
        ft_val[name] = ev.scores("validation", [name])[name]
    if suite.after_references is not None:
        suite.after_references()
    for row in rows:
        if row.key == "zeroshot":
            results.append(result_row(row.key, suite.zero_shot_label, zs_test, zs_val))
        elif row.key == "finetuned":
            results.append(result_row(row.key, row.label, ft_test, ft_val))
    if suite.extra_references is not None:
        results += suite.extra_references()
    log(
        f"references: zero-shot avg test {100 * mean(zs_test.values()):.1f}, fine-tuned"
        f" {100 * mean(ft_test.values()):.1f} ({time.perf_counter() - t0:.0f}s)"
    )

    models = [suite.finetuned[n] for n in tasks]
    merge_rows = [r for r in rows if r.methods]
    for row in tqdm(merge_rows, desc="merge rows", unit="row", disable=not progress, file=sys.stderr):
        mcfg = row_config(row, suite.base_path, models, suite.exclude, dtype)
        if isinstance(mcfg, str):
            log(f"skip {row.label}: {mcfg}")
            results.append({"key": row.key, "label": row.label, "skipped": mcfg})
            continue
        try:
            merged, merge_s = merged_task_vector(mcfg, progress)
            t1 = time.perf_counter()
            scored = evaluate_merge(ev, merged, row.fixed_alpha, search, progress)
        except Exception as e:  # one broken method must not cost the whole (long) run
            log(f"error in {row.label}: {type(e).__name__}: {e}")
            results.append({"key": row.key, "label": row.label, "skipped": f"error: {type(e).__name__}: {e}"})
            continue
        eval_s = time.perf_counter() - t1
        results.append(
            result_row(
                row.key,
                row.label,
                scored.test,
                scored.validation,
                scored.choice,
                row.fixed_alpha is not None,
                method=mcfg["method"],
                parameters=mcfg["parameters"],
                filters=mcfg["filters"],
                merge_seconds=round(merge_s, 2),
                eval_seconds=round(eval_s, 2),
                **suite.row_extra,
            )
        )
        log(
            f"{row.label}: alpha {scored.choice.label()} avg test {100 * mean(scored.test.values()):.1f}"
            f"  (merge {merge_s:.1f}s, {len(scored.choice.trace)} alphas, {eval_s:.0f}s eval)"
        )
        del merged
        if checkpoint is not None:
            checkpoint(results, ft_test)
    return results, ft_test
