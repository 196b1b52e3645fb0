"""Write the analysis outputs: metrics.json, CSV tables, PNG plots and report.md, atomically.

Files (see docs/analysis.md):
    metrics.json            the dict :func:`pactmerge.analysis.analyze` returns (NaN as null)
    parameters.csv          one row per (parameter, task)
    pairs.csv               one row per (parameter, task a, task b): Sim(a, b), Inf(b -> a)
    layer_component.csv     one row per (layer, component, task): means over the matrices
    *.png                   :mod:`pactmerge.analysis.plots`
    report.md               tables and figures, one line of reading each
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from pactmerge.analysis.components import COMPONENT_TITLES
from pactmerge.io.writer import atomic_output_dir

import numpy as np


def _num(x):
    return "" if x is None else x


def write_csvs(result: dict, folder: Path) -> list[str]:
    tasks, params = result["tasks"], result["parameters"]
    T = len(tasks)
    with open(folder / "parameters.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["parameter", "layer", "component", "m", "n", "task", "intrusion_energy", "removed_energy",
                    "protect_dim", "core_residual", "core_protected", "lbw_rank", "pact_applied",
                    "inf_received_mean", "inf_caused_mean", "sim_mean"])
        for name, e in params.items():
            inf, sim = np.array(e["inf"], dtype=float), np.array(e["sim"], dtype=float)
            for t, task in enumerate(tasks):
                others = [b for b in range(T) if b != t]
                mean = lambda v: float(np.nanmean(v)) if len(v) and np.isfinite(v).any() else None  # noqa: E731
                w.writerow([name, _num(e["layer"]), e["component"], *e["shape"], task, _num(e["intrusion_energy"][t]),
                            _num(e["removed_energy"][t]), e["protect_dim"][t], _num(e["core_residual"][t]),
                            e["core_protected"][t], e["lbw_rank"][t], e["pact_applied"],
                            _num(mean(inf[t, others])), _num(mean(inf[others, t])), _num(mean(sim[t, others]))])
    with open(folder / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["parameter", "layer", "component", "task_a", "task_b", "sim_a_b", "inf_b_to_a"])
        for name, e in params.items():
            for a in range(T):
                for b in range(T):
                    w.writerow([name, _num(e["layer"]), e["component"], tasks[a], tasks[b], _num(e["sim"][a][b]), _num(e["inf"][a][b])])
    with open(folder / "layer_component.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "component", "num_parameters", "task", "intrusion_energy", "removed_energy", "protect_dim",
                    "core_protected_fraction", "sim_offdiag_mean", "inf_offdiag_mean"])
        for r in result["summary"]["by_layer_component"]:
            for t, task in enumerate(tasks):
                w.writerow([_num(r["layer"]), r["component"], r["num_parameters"], task, _num(r["intrusion_energy"][t]),
                            _num(r["removed_energy"][t]), _num(r["protect_dim"][t]), _num(r["core_protected_fraction"][t]),
                            _num(r["sim_offdiag_mean"]), _num(r["inf_offdiag_mean"])])
    return ["parameters.csv", "pairs.csv", "layer_component.csv"]


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(map(str, r)) + " |" for r in rows], ""]


def _matrix(title: str, mat, tasks) -> list[str]:
    return [f"**{title}**", "", *_table(["", *tasks], [[a, *[_f(v, 2) for v in row]] for a, row in zip(tasks, mat)])]


def render_report(result: dict) -> str:
    """report.md: the summary tables and the figures, each with one line on how to read it."""
    s, tasks, cfg = result["summary"], result["tasks"], result["config"]
    g, p = s["global"], cfg["pact"]
    lines = [
        "# PACT load-bearing-wall diagnostics",
        "",
        f"{s['num_parameters']} weight matrices, {s['num_tasks']} tasks, K = {p['K']}, k = {p['k']}, svd = {p['svd']},"
        f" depth = {p['depth']}, compute dtype {cfg['dtype']}"
        + ("" if cfg["pact_configured"] else " (the config runs no pact filter: PACT defaults used)")
        + (f"; pre-filters applied first: {', '.join(cfg['pre_filters'])}" if cfg["pre_filters"] else "")
        + (f"; parameters matching `{cfg['layers']}`" if cfg["layers"] else "") + ".",
        f"Base model `{cfg['base_model']}`; tasks: " + ", ".join(f"{t} = `{m}`" for t, m in zip(tasks, cfg["models"])) + ".",
        "",
        "## Per task (mean over matrices)",
        "",
        "E_in (Eq. 37): share of the task vector's energy inside the base's top-K right singular subspace."
        " Removed: share PACT's filter strips from it (‖Δ_t P_t‖²/‖Δ_t‖², Theorem 1). Core protected: share of"
        " matrices whose whole core V_{0,K} lies in span(P_t).",
        "",
        *_table(["task", "E_in", "removed energy", "dim P_t", "core residual", "core protected"],
                [[t, _f(g["intrusion_energy"][i]), _f(g["removed_energy"][i]), _f(g["protect_dim"][i], 1),
                  _f(g["core_residual"][i]), _f(g["core_protected_fraction"][i], 2)] for i, t in enumerate(tasks)]),
        f"Off-diagonal means: Sim = {_f(g['sim_offdiag_mean'])}, Inf = {_f(g['inf_offdiag_mean'])}.",
        "",
        *_matrix("Sim(a, b), global average (row a, column b)", g["sim"], tasks),
        *_matrix("Inf(b → a), global average (row a = LBW owner, column b = intruder)", g["inf"], tasks),
        f"## Worst {s['worst_n']} matrices by hidden interference",
        "",
        "Ranked by the mean off-diagonal Inf; the pair names the largest entry (b's active directions inside a's LBW subspace).",
        "",
        *_table(["parameter", "component", "mean Inf", "max Inf", "from → into", "mean Sim"],
                [[f"`{r['parameter']}`", COMPONENT_TITLES[r["component"]], _f(r["inf_offdiag_mean"]), _f(r["inf_max"]),
                  f"{r['inf_max_pair']['from']} → {r['inf_max_pair']['into']}", _f(r["sim_offdiag_mean"])]
                 for r in s["worst_by_inf"]]),
        *_matrix(f"Inf(b → a) averaged over these {len(s['worst_by_inf'])} matrices", s["worst_inf_average"]["inf"], tasks),
        f"## Worst {s['worst_n']} matrices by intrusion energy",
        "",
        "Ranked by E_in averaged over tasks; these are where fine-tuning reshaped the pretrained core most.",
        "",
        *_table(["parameter", "component", "mean E_in", "max E_in", "task"],
                [[f"`{r['parameter']}`", COMPONENT_TITLES[r["component"]], _f(r["intrusion_energy_mean"]),
                  _f(r["intrusion_energy_max"]), r["intrusion_energy_max_task"]] for r in s["worst_by_intrusion"]]),
        "## By component type",
        "",
        "Input-facing projections (attention in, MLP in) are where the paper finds most intrusion (App. C.3.2).",
        "",
        *_table(["component", "matrices", "E_in (mean over tasks)", "removed energy", "Sim", "Inf"],
                [[COMPONENT_TITLES[r["component"]], r["num_parameters"], _f(float(np.nanmean(np.array(r["intrusion_energy"], dtype=float)))),
                  _f(float(np.nanmean(np.array(r["removed_energy"], dtype=float)))), _f(r["sim_offdiag_mean"]), _f(r["inf_offdiag_mean"])]
                 for r in s["by_component"]]),
        "## By layer",
        "",
        "Per block index (n/a: names without an index, e.g. embeddings, pooler, head).",
        "",
        *_table(["layer", "matrices", "E_in (mean over tasks)", "removed energy", "Sim", "Inf"],
                [["n/a" if r["layer"] is None else r["layer"], r["num_parameters"],
                  _f(float(np.nanmean(np.array(r["intrusion_energy"], dtype=float)))),
                  _f(float(np.nanmean(np.array(r["removed_energy"], dtype=float)))), _f(r["sim_offdiag_mean"]), _f(r["inf_offdiag_mean"])]
                 for r in s["by_layer"]]),
        "## Figures",
        "",
        "![E_in by layer](intrusion_by_layer.png)",
        "",
        "E_in against block index per component type, one line per task: high values mark layers whose pretrained core the fine-tunes rewrote (paper Fig. 11).",
        "",
        "![E_in heatmap](intrusion_heatmap.png)",
        "",
        "E_in per layer × component (rows) and task (columns): bright bands are intrusion hot spots shared across tasks (paper Fig. 12).",
        "",
        "![Sim and Inf](sim_inf_heatmaps.png)",
        "",
        "Sim (top) near 1 means two tasks lean on the same LBW directions; Inf (bottom, row a, column b) is the share of task b's top-k update directions that land in task a's LBW subspace; the right column shows the worst matrices, which global averages hide (paper Figs. 5-8).",
        "",
        "![Per-axis intrusion](axis_intrusion.png)",
        "",
        "For the most intruded matrices, which core axes v_i each task's update hits: different tasks attacking different axes is why PACT's shield is task-specific (paper Fig. 13, App. C.3.3).",
        "",
    ]
    if s.get("skipped"):
        lines += ["## Skipped", "", *[f"- `{r['parameter']}`: {r['reason']}" for r in s["skipped"]], ""]
    lines += ["Files: metrics.json (everything), parameters.csv, pairs.csv, layer_component.csv; schema in docs/analysis.md.", ""]
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: Path, overwrite: bool = False) -> Path:
    """Write every output file into ``out_dir`` atomically (nothing is left behind on failure)."""
    from pactmerge.analysis.plots import write_plots

    with atomic_output_dir(Path(out_dir), overwrite) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(result, indent=1, allow_nan=False))
        write_csvs(result, tmp)
        write_plots(result, tmp)
        (tmp / "report.md").write_text(render_report(result))
    return Path(out_dir)
