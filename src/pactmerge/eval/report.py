"""Result tables and charts: the benchmark's ``results.{json,md,png}`` and a merge's
``evaluation.{json,md,png}`` (one table code for both)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any


def jsonable(x: Any) -> Any:
    """``x`` with paths as strings, tuples as lists and dataclasses as dicts (for json.dumps)."""
    if is_dataclass(x) and not isinstance(x, type):
        return jsonable(asdict(x))
    if isinstance(x, Mapping):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def markdown_table(report: Mapping[str, Any]) -> str:
    """One row per model: score per task (%), average, average normalized by the fine-tunes, alpha,
    merge seconds (and calibration seconds when a row needed calibration data). Skipped rows say why."""
    tasks = report["tasks"]
    fmt = score_format(report.get("metric", "accuracy"))
    calibrated = any("calibration_seconds" in r for r in report["rows"])
    head = ["method", *tasks, "avg abs", "avg norm", "α", "merge s"] + (["calib s"] if calibrated else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        if "skipped" in r:
            dashes = " | ".join(["—"] * (len(head) - 2 - calibrated))
            lines.append(f"| {r['label']} | {dashes} | skipped: {r['skipped']} |" + (" — |" if calibrated else ""))
            continue
        cells = [r["label"], *(fmt(r["test"].get(t)) for t in tasks)]
        cells += [fmt(r["avg_abs"]), _pct(r["avg_norm"]), r["alpha_label"]]
        cells.append(f"{r['merge_seconds']:.1f}" if r.get("merge_seconds") is not None else "—")
        if calibrated:
            cells.append(f"{r['calibration_seconds']:.1f}" if "calibration_seconds" in r else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "—" if x is None or x != x else f"{100 * x:.1f}"  # x != x: NaN (no reference to normalize by)


def _raw(x: float | None) -> str:
    return "—" if x is None or x != x else f"{x:.4g}"


def score_format(metric: str) -> Callable[[float | None], str]:
    """Fractions (accuracy, macro F1) as percentages; a python function's score as it is."""
    return _raw if metric == "score" else _pct


def write_outputs(report: Mapping[str, Any], out: Path, chart: bool = True, title: str | None = None) -> None:
    """``results.json``, ``results.md`` and (``chart``) ``results.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(jsonable(report), indent=1))
    (out / "results.md").write_text(markdown_table(report) + "\n")
    if chart:
        bar_chart(report, out / "results.png", title)


def bar_chart(report: Mapping[str, Any], path: Path, title: str | None = None) -> None:
    """Average and normalized score per row; ``title`` replaces the text suites' title."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "avg_abs" in r]
    labels = [r["label"] + (f"  α={r['alpha_label']}" if r.get("alpha") is not None else "") for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.38 * len(rows) + 1.5), sharey=True)
    y = range(len(rows))
    for ax, key, heading in (
        (axes[0], "avg_abs", "average accuracy (%)"),
        (axes[1], "avg_norm", "average normalized accuracy (%)"),
    ):
        vals = [100 * r[key] if r[key] == r[key] else 0.0 for r in rows]
        colors = [
            "#999999"
            if not r.get("filters") and r.get("alpha") is None
            else "#d95f02"
            if any("pact" in f for flt in (r.get("filters") or []) for f in flt)
            else "#1b9e77"
            for r in rows
        ]
        ax.barh(list(y), vals, color=colors)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
        ax.set_title(heading)
        ax.set_xlim(0, max(vals) * 1.12 if vals and max(vals) > 0 else 1)
    axes[0].set_yticks(list(y), labels, fontsize=8)
    axes[0].invert_yaxis()  # first row on top; the axes share y, so once inverts both
    if title is None:
        kind = " LoRA r{}".format(report["config"]["lora"]["rank"]) if report["config"].get("lora") else ""
        title = f"pactmerge bench: MiniLM-L6{kind}, {len(report['tasks'])} tasks, test split"
    fig.suptitle(f"{title} (grey: references, orange: PACT / S-PACT)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- a merge's evaluation (alpha: search) ----------------------------------------------------------------


def calibration_line(calibration: Mapping[str, Any]) -> str:
    """One sentence: what a data-aware merge's statistics were computed from."""
    per_model = ", ".join(f"{n} ({t})" if t else str(n) for n, t in zip(calibration["examples"], calibration["tasks"]))
    return (
        f"Calibration statistics ({', '.join(calibration['statistics'])}) from {calibration['data']}:"
        f" {per_model} examples per model"
        + (f", computed in {calibration['seconds']:g} s." if calibration["seconds"] else ", from the cache.")
    )


def evaluation_markdown(evaluation: Mapping[str, Any]) -> str:
    """``evaluation.md``: the chosen alpha, per-task validation and test scores, and the alpha trace."""
    tasks: Sequence[str] = evaluation["tasks"]
    metric = evaluation["metric"]
    fmt = score_format(metric)
    lines = [
        "# Evaluation",
        "",
        f"Kind `{evaluation['kind']}`, metric {metric}, {len(tasks)} task(s). "
        + (
            f"α = {evaluation['alpha_label']}, chosen on the validation split (mean {metric} over tasks)"
            f" from {len(evaluation['trace'])} values; the test split was scored at that α only."
            if evaluation["searched"]
            else f"α = {evaluation['alpha']:g} (fixed in the config)."
        ),
        "",
        "| task | validation | test | items (validation / test) |",
        "|---|---|---|---|",
    ]
    for t in tasks:
        sizes = evaluation["sizes"].get(t, {})
        lines.append(
            f"| {t} | {fmt(evaluation['validation'][t])} | {fmt(evaluation['test'][t])} |"
            f" {sizes.get('validation', '—')} / {sizes.get('test', '—')} |"
        )
    avg = evaluation["average"]
    lines.append(f"| **average** | {fmt(avg['validation'])} | {fmt(avg['test'])} | |")
    if evaluation.get("calibration"):
        lines += ["", calibration_line(evaluation["calibration"])]
    if evaluation.get("excluded"):
        lines += ["", "Not merged (kept from the base; each task's own head where it has one): "]
        lines[-1] += ", ".join(evaluation["excluded"])
    if evaluation["trace"]:
        lines += [
            "",
            "## α search (validation, mean over tasks, in the order scored)",
            "",
            "| α | score |",
            "|---|---|",
        ]
        best = evaluation["alpha"]
        lines += [f"| {a:g}{' ←' if a == best else ''} | {fmt(s)} |" for a, s in evaluation["trace"]]
    return "\n".join(lines) + "\n"


def alpha_chart(evaluation: Mapping[str, Any], path: Path) -> None:
    """``evaluation.png``: the validation score of every alpha scored, the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(evaluation["trace"]) or [(evaluation["alpha"], evaluation["average"]["validation"])]
    fig, ax = plt.subplots(figsize=(7, 4))
    scale, unit = (1.0, "") if evaluation["metric"] == "score" else (100.0, " (%)")
    ax.plot([a for a, _ in points], [scale * s for _, s in points], "o-", ms=3)
    ax.axvline(evaluation["alpha"], color="#d95f02", ls="--", label=f"chosen α = {evaluation['alpha']:g}")
    ax.set_xlabel("α")
    ax.set_ylabel(f"validation {evaluation['metric']}{unit}, mean over tasks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
