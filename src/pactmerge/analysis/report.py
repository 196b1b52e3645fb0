"""Write the analysis outputs: metrics.json, CSV tables, PNG plots and report.md, atomically.

Files (see docs/analysis.md):
    metrics.json            the dict :func:`pactmerge.analysis.analyze` returns (NaN as null)
    parameters.csv          one row per (parameter, task)
    pairs.csv               one row per (parameter, task a, task b): Sim(a, b), Inf(b -> a)
    layer_component.csv     one row per (layer, component, task): means over the matrices
    *.png                   :mod:`pactmerge.analysis.plots`
    report.md               tables and figures, one line of reading each

With the data-aware studies (``result["studies"]``, :mod:`pactmerge.analysis.studies`) also:
    ablation.json / .csv    subspace ablation (Sec. 3.2.2), one CSV row per task
    fisher.json / .csv      Fisher crucial masks (Sec. 3.2.1), one CSV row per (pair, condition, alpha, task)
    ablation.png, fisher_attack.png
and their sections at the end of report.md.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from pactmerge.analysis.components import COMPONENT_TITLES
from pactmerge.io.writer import atomic_output_dir


def _num(x):
    return "" if x is None else x


def write_csvs(result: dict, folder: Path) -> list[str]:
    tasks, params = result["tasks"], result["parameters"]
    T = len(tasks)
    with open(folder / "parameters.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "parameter",
                "layer",
                "component",
                "m",
                "n",
                "task",
                "intrusion_energy",
                "removed_energy",
                "protect_dim",
                "core_residual",
                "core_protected",
                "lbw_rank",
                "pact_applied",
                "inf_received_mean",
                "inf_caused_mean",
                "sim_mean",
            ]
        )
        for name, e in params.items():
            inf, sim = np.array(e["inf"], dtype=float), np.array(e["sim"], dtype=float)
            for t, task in enumerate(tasks):
                others = [b for b in range(T) if b != t]
                mean = lambda v: float(np.nanmean(v)) if len(v) and np.isfinite(v).any() else None  # noqa: E731
                w.writerow(
                    [
                        name,
                        _num(e["layer"]),
                        e["component"],
                        *e["shape"],
                        task,
                        _num(e["intrusion_energy"][t]),
                        _num(e["removed_energy"][t]),
                        e["protect_dim"][t],
                        _num(e["core_residual"][t]),
                        e["core_protected"][t],
                        e["lbw_rank"][t],
                        e["pact_applied"],
                        _num(mean(inf[t, others])),
                        _num(mean(inf[others, t])),
                        _num(mean(sim[t, others])),
                    ]
                )
    with open(folder / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["parameter", "layer", "component", "task_a", "task_b", "sim_a_b", "inf_b_to_a"])
        for name, e in params.items():
            for a in range(T):
                for b in range(T):
                    w.writerow(
                        [
                            name,
                            _num(e["layer"]),
                            e["component"],
                            tasks[a],
                            tasks[b],
                            _num(e["sim"][a][b]),
                            _num(e["inf"][a][b]),
                        ]
                    )
    with open(folder / "layer_component.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "layer",
                "component",
                "num_parameters",
                "task",
                "intrusion_energy",
                "removed_energy",
                "protect_dim",
                "core_protected_fraction",
                "sim_offdiag_mean",
                "inf_offdiag_mean",
            ]
        )
        for r in result["summary"]["by_layer_component"]:
            for t, task in enumerate(tasks):
                w.writerow(
                    [
                        _num(r["layer"]),
                        r["component"],
                        r["num_parameters"],
                        task,
                        _num(r["intrusion_energy"][t]),
                        _num(r["removed_energy"][t]),
                        _num(r["protect_dim"][t]),
                        _num(r["core_protected_fraction"][t]),
                        _num(r["sim_offdiag_mean"]),
                        _num(r["inf_offdiag_mean"]),
                    ]
                )
    return ["parameters.csv", "pairs.csv", "layer_component.csv"]


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(map(str, r)) + " |" for r in rows],
        "",
    ]


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
        + (f"; parameters matching `{cfg['layers']}`" if cfg["layers"] else "")
        + ".",
        f"Base model `{cfg['base_model']}`; tasks: "
        + ", ".join(f"{t} = `{m}`" for t, m in zip(tasks, cfg["models"]))
        + ".",
        "",
        "## Per task (mean over matrices)",
        "",
        "E_in (Eq. 37): share of the task vector's energy inside the base's top-K right singular subspace."
        " Removed: share PACT's filter strips from it (‖Δ_t P_t‖²/‖Δ_t‖², Theorem 1). Core protected: share of"
        " matrices whose whole core V_{0,K} lies in span(P_t).",
        "",
        *_table(
            ["task", "E_in", "removed energy", "dim P_t", "core residual", "core protected"],
            [
                [
                    t,
                    _f(g["intrusion_energy"][i]),
                    _f(g["removed_energy"][i]),
                    _f(g["protect_dim"][i], 1),
                    _f(g["core_residual"][i]),
                    _f(g["core_protected_fraction"][i], 2),
                ]
                for i, t in enumerate(tasks)
            ],
        ),
        f"Off-diagonal means: Sim = {_f(g['sim_offdiag_mean'])}, Inf = {_f(g['inf_offdiag_mean'])}.",
        "",
        *_matrix("Sim(a, b), global average (row a, column b)", g["sim"], tasks),
        *_matrix("Inf(b → a), global average (row a = LBW owner, column b = intruder)", g["inf"], tasks),
        f"## Worst {s['worst_n']} matrices by hidden interference",
        "",
        "Ranked by the mean off-diagonal Inf; the pair names the largest entry (b's active directions inside a's"
        " LBW subspace).",
        "",
        *_table(
            ["parameter", "component", "mean Inf", "max Inf", "from → into", "mean Sim"],
            [
                [
                    f"`{r['parameter']}`",
                    COMPONENT_TITLES[r["component"]],
                    _f(r["inf_offdiag_mean"]),
                    _f(r["inf_max"]),
                    f"{r['inf_max_pair']['from']} → {r['inf_max_pair']['into']}",
                    _f(r["sim_offdiag_mean"]),
                ]
                for r in s["worst_by_inf"]
            ],
        ),
        *_matrix(
            f"Inf(b → a) averaged over these {len(s['worst_by_inf'])} matrices", s["worst_inf_average"]["inf"], tasks
        ),
        f"## Worst {s['worst_n']} matrices by intrusion energy",
        "",
        "Ranked by E_in averaged over tasks; these are where fine-tuning reshaped the pretrained core most.",
        "",
        *_table(
            ["parameter", "component", "mean E_in", "max E_in", "task"],
            [
                [
                    f"`{r['parameter']}`",
                    COMPONENT_TITLES[r["component"]],
                    _f(r["intrusion_energy_mean"]),
                    _f(r["intrusion_energy_max"]),
                    r["intrusion_energy_max_task"],
                ]
                for r in s["worst_by_intrusion"]
            ],
        ),
        "## By component type",
        "",
        "Input-facing projections (attention in, MLP in) are where the paper finds most intrusion (App. C.3.2).",
        "",
        *_table(
            ["component", "matrices", "E_in (mean over tasks)", "removed energy", "Sim", "Inf"],
            [
                [
                    COMPONENT_TITLES[r["component"]],
                    r["num_parameters"],
                    _f(float(np.nanmean(np.array(r["intrusion_energy"], dtype=float)))),
                    _f(float(np.nanmean(np.array(r["removed_energy"], dtype=float)))),
                    _f(r["sim_offdiag_mean"]),
                    _f(r["inf_offdiag_mean"]),
                ]
                for r in s["by_component"]
            ],
        ),
        "## By layer",
        "",
        "Per block index (n/a: names without an index, e.g. embeddings, pooler, head).",
        "",
        *_table(
            ["layer", "matrices", "E_in (mean over tasks)", "removed energy", "Sim", "Inf"],
            [
                [
                    "n/a" if r["layer"] is None else r["layer"],
                    r["num_parameters"],
                    _f(float(np.nanmean(np.array(r["intrusion_energy"], dtype=float)))),
                    _f(float(np.nanmean(np.array(r["removed_energy"], dtype=float)))),
                    _f(r["sim_offdiag_mean"]),
                    _f(r["inf_offdiag_mean"]),
                ]
                for r in s["by_layer"]
            ],
        ),
        "## Figures",
        "",
        "![E_in by layer](intrusion_by_layer.png)",
        "",
        "E_in against block index per component type, one line per task: high values mark layers whose pretrained"
        " core the fine-tunes rewrote (paper Fig. 11).",
        "",
        "![E_in heatmap](intrusion_heatmap.png)",
        "",
        "E_in per layer × component (rows) and task (columns): bright bands are intrusion hot spots shared across"
        " tasks (paper Fig. 12).",
        "",
        "![Sim and Inf](sim_inf_heatmaps.png)",
        "",
        "Sim (top) near 1 means two tasks lean on the same LBW directions; Inf (bottom, row a, column b) is the"
        " share of task b's top-k update directions that land in task a's LBW subspace; the right column shows the"
        " worst matrices, which global averages hide (paper Figs. 5-8).",
        "",
        "![Per-axis intrusion](axis_intrusion.png)",
        "",
        "For the most intruded matrices, which core axes v_i each task's update hits: different tasks attacking"
        " different axes is why PACT's shield is task-specific (paper Fig. 13, App. C.3.3).",
        "",
    ]
    if s.get("skipped"):
        lines += ["## Skipped", "", *[f"- `{r['parameter']}`: {r['reason']}" for r in s["skipped"]], ""]
    lines += [
        "Files: metrics.json (everything), parameters.csv, pairs.csv, layer_component.csv; schema in docs/analysis.md.",
        "",
    ]
    return "\n".join(lines)


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.1f}"


def _pm(mean, std) -> str:
    return _pct(mean) + ("" if std is None else f" ± {100 * std:.1f}")


def write_study_csvs(studies: dict, folder: Path) -> list[str]:
    written = []
    if "ablation" in studies:
        ab = studies["ablation"]
        with open(folder / "ablation.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                [
                    "task",
                    "finetuned",
                    "lbw_ablated",
                    "random_mean",
                    "random_std",
                    "drop_lbw",
                    "drop_random",
                    "ratio",
                    "lbw_dims",
                    "lbw_fraction",
                    "energy_removed_lbw",
                    "energy_removed_random",
                    "update_in_lbw",
                    "random_per_seed",
                ]
            )
            for task, r in ab["tasks"].items():
                w.writerow(
                    [
                        task,
                        r["finetuned"],
                        r["lbw"],
                        r["random_mean"],
                        _num(r["random_std"]),
                        r["drop_lbw"],
                        r["drop_random"],
                        _num(r["ratio"]),
                        r["lbw_dims"],
                        r["lbw_fraction"],
                        r["energy_removed_lbw"],
                        r["energy_removed_random"],
                        _num(r["update_in_lbw"]),
                        " ".join(f"{x:.6g}" for x in r["random"]),
                    ]
                )
        written.append("ablation.csv")
    if studies.get("fisher"):
        with open(folder / "fisher.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["task_a", "task_b", "condition", "alpha", "eval_task", "accuracy", "std"])
            for fr in studies["fisher"]:
                a, b = fr["task_a"], fr["task_b"]
                w.writerow([a, b, "M0", "", a, fr["M0"], ""])
                w.writerow([a, b, "M1", "", a, fr["M1"], ""])
                for r in fr["attack"]:
                    for m in ("M2", "M3", "M4"):
                        w.writerow([a, b, m, r["alpha"], a, r[m], _num(r["M4_std"]) if m == "M4" else ""])
                for cond, accs in fr["restoration"].items():
                    if cond.endswith("_seeds") or accs is None:
                        continue
                    for t in (a, b):
                        w.writerow([a, b, f"restore:{cond}", "", t, accs[t], ""])
        written.append("fisher.csv")
    return written


def render_studies(studies: dict) -> str:
    """The report.md sections of the data-aware studies (one line of reading each)."""
    lines = []
    if "ablation" in studies:
        ab = studies["ablation"]
        p, m = ab["pact"], ab["mean"]
        lines += [
            "## Subspace ablation (data-aware, paper Sec. 3.2.2, Table 3)",
            "",
            f"Accuracy (%) on the {ab['split']} split of each task's fine-tuned model θ_t, after removing its LBW"
            " subspace from"
            f" every filtered weight (W ← W(I − V_{{t,LBW}}V_{{t,LBW}}ᵀ), K = {p['K']}, k = {p['k']}, svd = {p['svd']},"
            f" depth = {p['depth']}; {ab['dims']['num_matrices']} matrices), and after removing a random subspace"
            " of the same"
            f" dimension inside the complement of V_{{0,K}} (mean ± std over {len(ab['seeds'])} seeds). Drops in"
            " points;"
            " ratio = drop_LBW / drop_random (n/a when the random drop is ≤ 0). Energy: share of ‖W‖²_F of the ablated"
            " matrices that each ablation projects out.",
            "",
            *_table(
                [
                    "task",
                    "θ_t",
                    "LBW ablated",
                    "drop LBW",
                    "random",
                    "drop random",
                    "ratio",
                    "dim LBW / dims",
                    "energy LBW",
                    "energy random",
                ],
                [
                    [
                        t,
                        _pct(r["finetuned"]),
                        _pct(r["lbw"]),
                        _pct(r["drop_lbw"]),
                        _pm(r["random_mean"], r["random_std"]),
                        _pct(r["drop_random"]),
                        "n/a" if r["ratio"] is None else f"{r['ratio']:.1f}×",
                        f"{r['lbw_dims']} / {ab['dims']['input_dims']} ({100 * r['lbw_fraction']:.2f}%)",
                        _f(r["energy_removed_lbw"], 4),
                        _f(r["energy_removed_random"], 4),
                    ]
                    for t, r in ab["tasks"].items()
                ]
                + [
                    [
                        "**mean**",
                        _pct(m["finetuned"]),
                        _pct(m["lbw"]),
                        _pct(m["drop_lbw"]),
                        _pct(m["random_mean"]),
                        _pct(m["drop_random"]),
                        "n/a" if m["ratio"] is None else f"{m['ratio']:.1f}×",
                        f"({100 * m['lbw_fraction']:.2f}%)",
                        _f(m["energy_removed_lbw"], 4),
                        _f(m["energy_removed_random"], 4),
                    ]
                ],
            ),
            "Reading: a large LBW drop next to a small random drop means the task relies on pretrained directions"
            " its own"
            " update left untouched (the LBW subspace); the energy columns show how much more of the weight the LBW"
            " directions carry than random ones — they are the base's top singular directions, so part of the gap"
            " is scale.",
            "",
            "![Subspace ablation](ablation.png)",
            "",
            "Bars: accuracy of θ_t, LBW-ablated and random-ablated (error bar: std over seeds) per task.",
            "",
        ]
    for fr in studies.get("fisher") or []:
        a, b, sz = fr["task_a"], fr["task_b"], fr["sizes"]
        t1, en = fr["table1"], fr["enrichment"]
        rest = fr["restoration"]
        lines += [
            f"## Fisher crucial mask: A = {a}, B = {b} (data-aware, paper Sec. 3.2.1)",
            "",
            f"Empirical Fisher of θ_A on {fr['samples']} train samples of {a}. Per layer: the"
            f" {100 * fr['fractions']['small']:.0f}%"
            f" smallest |Δ_A| entries, then the {100 * fr['fractions']['fisher']:.0f}% of those with the largest Fisher"
            f" ({sz['candidate']} entries), then the entries whose |Δ_B| is significantly enriched (per-entry"
            " permutation"
            f" p < {fr['fractions']['p_max']}): crucial mask = {sz['crucial']} entries ="
            f" {100 * sz['crucial_fraction_of_layers']:.2f}%"
            f" of the {sz['d']} entries of the {en['num_layers']} trainable matrices"
            f" ({100 * sz['crucial_fraction_of_model']:.2f}% of"
            f" all {sz['total_params']} parameters). Safe mask {sz['safe']} entries ({sz['safe_outside_pool']}"
            " from outside the"
            f" low-Fisher 30%), random masks {sz['random']} entries each ({fr['seeds']} seeds). Mean E_B over layers:"
            f" candidate {_f(en['E_B_candidate'], 2)}, crucial {_f(en['E_B_crucial'], 2)}, safe"
            f" {_f(en['E_B_safe'], 2)},"
            f" random {_f(en['E_B_random'], 2)}; {en['layers_candidate_significant']} of {en['num_layers']} layers"
            " have a"
            " significantly enriched candidate set (z-test).",
            "",
            f"**Table 1** (accuracy % on {a}, {fr['split']} split, α = {t1['alpha']:g}): M0 = θ_A, M1 = crucial"
            " entries reset to θ_0,"
            " M2/M3/M4 = crucial/safe/random entries set to θ_0 + αΔ_B.",
            "",
            *_table(
                ["M0", "M1", "M2 (crucial)", "M3 (safe)", "M4 (random)"],
                [[_pct(t1["M0"]), _pct(t1["M1"]), _pct(t1["M2"]), _pct(t1["M3"]), _pm(t1["M4"], t1["M4_std"])]],
            ),
            "Accuracy against attack strength α:",
            "",
            *_table(
                ["α", "M2 (crucial)", "M3 (safe)", "M4 (random)"],
                [[f"{r['alpha']:g}", _pct(r["M2"]), _pct(r["M3"]), _pm(r["M4"], r["M4_std"])] for r in fr["attack"]],
            ),
            "**Table 2** (restoration on the merge θ_0 + Δ_A + Δ_B; accuracy %; Δacc vs the merge):",
            "",
            *_table(
                ["model", f"{a} (A)", "Δacc A", f"{b} (B)", "Δacc B"],
                [
                    [
                        label,
                        _pct(rest[key][a]),
                        "" if key == "merged" else f"{100 * (rest[key][a] - rest['merged'][a]):+.1f}",
                        _pct(rest[key][b]),
                        "" if key == "merged" else f"{100 * (rest[key][b] - rest['merged'][b]):+.1f}",
                    ]
                    for key, label in (
                        ("merged", "θ_0 + Δ_A + Δ_B"),
                        ("crucial_to_theta0", "crucial ← θ_0 (paper)"),
                        ("crucial_to_thetaA", "crucial ← θ_A"),
                        ("random_to_theta0", "random ← θ_0 (mean)"),
                        ("random_to_thetaA", "random ← θ_A (mean)"),
                    )
                    if rest.get(key) is not None
                ],
            ),
            "Reading: M2 far below M3/M4 at the same α means the small-update, high-Fisher entries that B also"
            " moves are"
            " load-bearing for A; M1 ≈ M0 confirms their value comes from θ_0. A restoration gain on A for the"
            " crucial mask"
            " beyond the random mask's means merging with B overwrote them.",
            "",
        ]
    if studies.get("fisher"):
        lines += [
            "![Fisher attack curves](fisher_attack.png)",
            "",
            "Accuracy on task A against attack strength α for the crucial (M2), safe (M3) and random (M4) masks;"
            " dashed: M0 (θ_A) and M1 (crucial reset to θ_0) (paper Fig. 2).",
            "",
        ]
    if studies.get("notes"):
        lines += ["Notes: " + "; ".join(studies["notes"]), ""]
    if lines:
        lines += ["Files: ablation.json/.csv, fisher.json/.csv (definitions and choices in docs/analysis.md).", ""]
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: Path, overwrite: bool = False) -> Path:
    """Write every output file into ``out_dir`` atomically (nothing is left behind on failure).

    ``result["studies"]``, if present, adds the data-aware study files and report sections;
    metrics.json holds the data-free metrics only.
    """
    from pactmerge.analysis.plots import write_plots, write_study_plots

    studies = result.get("studies")
    metrics = {k: v for k, v in result.items() if k != "studies"}
    with atomic_output_dir(Path(out_dir), overwrite) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
        write_csvs(metrics, tmp)
        write_plots(metrics, tmp)
        report = render_report(metrics)
        if studies:
            from pactmerge.analysis.api import json_clean

            studies = json_clean(studies)
            if "ablation" in studies:
                (tmp / "ablation.json").write_text(
                    json.dumps({"suite": studies["suite"], **studies["ablation"]}, indent=1, allow_nan=False)
                )
            if studies.get("fisher"):
                (tmp / "fisher.json").write_text(
                    json.dumps({"suite": studies["suite"], "pairs": studies["fisher"]}, indent=1, allow_nan=False)
                )
            write_study_csvs(studies, tmp)
            write_study_plots(studies, tmp)
            report += "\n" + render_studies(studies)
        (tmp / "report.md").write_text(report)
    return Path(out_dir)
