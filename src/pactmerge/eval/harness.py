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
from pactmerge.eval.rows import Row, row_config, row_needs

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
    merged = merge_for_scoring(merge_cfg, [], progress)
    return merged.shared, merged.seconds


@dataclass
class MergeResult:
    """One streamed merge, ready to score.

    ``shared``: ``{name: merged task vector}`` (float32, CPU; copied parameters omitted).
    ``per_task``: for a task-specific method (EMR, TALL masks, TSV-C; :mod:`pactmerge.modulators`)
    the function ``task -> task vector`` that applies that task's modulators to ``shared``; None
    for every other method. ``seconds``: the whole merge; ``calibration_seconds``: the part spent
    computing calibration statistics (0 when they came from the cache), ``calibration_examples``:
    N used per model ([] when the merge needs no data).
    """

    shared: dict[str, Tensor]
    per_task: PerTaskVectors | None = None
    seconds: float = 0.0
    calibration_seconds: float = 0.0
    calibration_examples: list[int] = field(default_factory=list)

    @property
    def merged(self) -> Merged:
        """What :func:`evaluate_merge` scores: each task's own vector when there is one."""
        return self.per_task if self.per_task is not None else self.shared


def _per_task_vectors(
    shared: Mapping[str, Tensor], modulators: Mapping[str, list[Any]], tasks: Sequence[str]
) -> PerTaskVectors:
    index = {t: i for i, t in enumerate(tasks)}

    def vector(task: str) -> dict[str, Tensor]:
        if task not in index:
            raise KeyError(f"task {task!r}: the merge has tasks {', '.join(tasks)}")
        t = index[task]
        out = dict(shared)
        for name, mods in modulators.items():
            out[name] = mods[t].apply(shared[name]).float()
        return out

    return vector


def merge_for_scoring(
    merge_cfg: Mapping[str, Any],
    tasks: Sequence[str],
    progress: bool = False,
    calibration_data: Sequence[Any] | None = None,
) -> MergeResult:
    """One streamed merge of ``merge_cfg`` (models in ``tasks`` order). ``calibration_data``: one
    :class:`pactmerge.stats.ModelData` per model, for data-aware methods and filters. A task-specific
    method's per-task modulators are kept, so each task can be scored with its own model."""
    from pactmerge.config import load_config
    from pactmerge.engine import iter_merged_deltas, open_inputs
    from pactmerge.lowrank import densify

    t0 = time.perf_counter()
    inputs = open_inputs(load_config(merge_cfg), calibration_data)
    modulators: dict[str, list[Any]] = {}

    def keep(info, mods) -> None:
        if not all(m.is_empty for m in mods):
            modulators[info.name] = mods

    try:
        shared = {
            info.name: densify([d])[0].float().cpu()
            for info, _, d in iter_merged_deltas(inputs, "cpu", progress, on_modulators=keep)
            if d is not None
        }
        cal = inputs.calibration
        cal_s = cal.seconds if cal is not None else 0.0
        cal_n = list(cal.store.examples) if cal is not None and cal.store is not None else []
    finally:
        inputs.close()
    if modulators and len(tasks) != len(inputs.models):
        raise ValueError(f"per-task outputs for {len(inputs.models)} models, but {len(tasks)} task names given")
    per_task = _per_task_vectors(shared, modulators, tasks) if modulators else None
    return MergeResult(shared, per_task, time.perf_counter() - t0, cal_s, cal_n)


def choose_task_lambdas(
    evaluator: Evaluator,
    merge_cfg: Mapping[str, Any],
    tasks: Sequence[str],
    grid: Sequence[float],
    progress: bool = False,
) -> tuple[dict[str, float], dict[float, dict[str, float]]]:
    """Each task's TALL-mask ``lambda_t``, chosen on its validation split as Wang et al. do
    ("Localizing task information for improved model merging and compression", arXiv:2405.07813,
    Sec. 4) before a Consensus merge.

    For every ``lambda`` in ``grid``: the ``tall_masks`` merge of ``merge_cfg``'s models, filters and
    base method at that ``lambda``, and task t's own model ``theta_0 + m_t * tau_MTL`` scored on t's
    validation split at alpha = 1 (a TALL-masked model stands for the task's fine-tune at unit scale,
    as in the paper). ``lambda_t`` is the best-scoring value, the first in ``grid`` order on a tie.
    Returns ``({task: lambda_t}, {lambda: {task: validation score}})``.
    """
    if not grid:
        raise ValueError("choose_task_lambdas needs a non-empty lambda grid")
    params = {k: v for k, v in merge_cfg.get("parameters", {}).items() if k != "k"}  # k: Consensus's vote only
    scores: dict[float, dict[str, float]] = {}
    for lam in grid:
        cfg = {**merge_cfg, "method": "tall_masks", "parameters": {**params, "lambda": lam}}
        result = merge_for_scoring(cfg, tasks, progress)
        scores[lam] = scores_at(evaluator, result.merged, 1.0, ["validation"])["validation"]
    chosen = {t: max(grid, key=lambda lam: scores[lam][t]) for t in tasks}  # max keeps the first of equals
    return chosen, scores


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
    ``calibration_data()`` gives one :class:`pactmerge.stats.ModelData` per task (its *training*
    split) for the rows whose method or filters need calibration statistics, and ``calibration``
    is the merge config's ``calibration:`` block for them; a suite without it skips such rows.
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
    calibration_data: Callable[[], Sequence[Any]] | None = None
    calibration: dict = field(default_factory=dict)


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
    chosen_alpha: dict[str, float] = {}  # row key -> its alpha, for the rows that reuse it (alpha_of)
    for row in tqdm(merge_rows, desc="merge rows", unit="row", disable=not progress, file=sys.stderr):
        mcfg = row_config(row, suite.base_path, models, suite.exclude, dtype)
        needs = row_needs(row)
        if needs and suite.calibration_data is None and not isinstance(mcfg, str):
            mcfg = f"needs calibration statistics ({', '.join(needs)}); this suite has no calibration data"
        if row.alpha_of is not None and row.alpha_of not in chosen_alpha and not isinstance(mcfg, str):
            mcfg = f"scored at the alpha of row {row.alpha_of}, which has not run before it (add it to --methods)"
        if isinstance(mcfg, str):
            log(f"skip {row.label}: {mcfg}")
            results.append({"key": row.key, "label": row.label, "skipped": mcfg})
            continue
        data = None
        if needs and suite.calibration_data is not None:
            mcfg["calibration"] = dict(suite.calibration)
            data = suite.calibration_data()
        lambda_extra: dict[str, Any] = {}  # the per-task lambda choice of a Consensus row
        try:
            if row.lambda_grid:
                t_lam = time.perf_counter()
                lambdas, lambda_scores = choose_task_lambdas(ev, mcfg, tasks, row.lambda_grid, progress)
                mcfg["models"] = [
                    {"model": m, "parameters": {"lambda": lambdas[t]}} for m, t in zip(mcfg["models"], tasks)
                ]
                lambda_extra = {
                    "task_lambdas": lambdas,
                    "lambda_validation": {f"{lam:g}": sc for lam, sc in lambda_scores.items()},
                    "lambda_seconds": round(time.perf_counter() - t_lam, 2),
                }
                log(f"{row.label}: lambda_t on validation " + ", ".join(f"{t} {lambdas[t]:g}" for t in tasks))
            outcome = merge_for_scoring(mcfg, tasks, progress, data)
            t1 = time.perf_counter()
            fixed = chosen_alpha[row.alpha_of] if row.alpha_of is not None else row.fixed_alpha
            # A line per stage: an alpha search can take many minutes, and a log file would be silent.
            next_stage = "choosing alpha on validation" if fixed is None else f"scoring at alpha {fixed:g}"
            log(f"{row.label}: merged in {outcome.seconds:.1f}s; {next_stage}")
            scored = evaluate_merge(ev, outcome.merged, fixed, search, progress)
        except Exception as e:  # one broken method must not cost the whole (long) run
            log(f"error in {row.label}: {type(e).__name__}: {e}")
            results.append({"key": row.key, "label": row.label, "skipped": f"error: {type(e).__name__}: {e}"})
            continue
        eval_s = time.perf_counter() - t1
        merge_s = outcome.seconds - outcome.calibration_seconds
        extra: dict[str, Any] = {"per_task": outcome.per_task is not None}
        extra.update(lambda_extra)
        if row.alpha_of is not None:
            extra.update(alpha_of=row.alpha_of, alpha_label=f"{scored.choice.label()} (as {row.alpha_of})")
        chosen_alpha[row.key] = scored.choice.alpha
        if needs:
            extra.update(
                calibration=mcfg["calibration"],
                calibration_seconds=round(outcome.calibration_seconds, 2),
                calibration_examples=outcome.calibration_examples,
            )
        results.append(
            result_row(
                row.key,
                row.label,
                scored.test,
                scored.validation,
                scored.choice,
                fixed is not None,
                method=mcfg["method"],
                parameters=mcfg["parameters"],
                filters=mcfg["filters"],
                merge_seconds=round(merge_s, 2),
                eval_seconds=round(eval_s, 2),
                **extra,
                **suite.row_extra,
            )
        )
        cal = f", calibration {outcome.calibration_seconds:.1f}s" if needs else ""
        searched = "alpha fixed" if fixed is not None else f"{len(scored.choice.trace)} alphas"
        log(
            f"{row.label}: alpha {scored.choice.label()} avg test {100 * mean(scored.test.values()):.1f}"
            f"  (merge {merge_s:.1f}s{cal}, {searched}, {eval_s:.0f}s eval)"
        )
        del outcome
        if checkpoint is not None:
            checkpoint(results, ft_test)
    return results, ft_test
