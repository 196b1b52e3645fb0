"""PNG figures of the LBW diagnostics, after the paper's App. C.2-C.3 (Figs. 5-13).

matplotlib is an optional dependency, imported only here and only when plotting; figures are
built with the object API (``matplotlib.figure.Figure`` + Agg), so no global pyplot state or
backend is touched. Every function takes the metrics dict of :func:`pactmerge.analysis.analyze`
and a target path and returns that path.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pactmerge.analysis.components import COMPONENT_TITLES
from pactmerge.errors import PactMergeError

DPI = 110


def _figure(w: float, h: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the environment
        raise PactMergeError("plots need matplotlib: pip install matplotlib (or pass no output folder)") from None
    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _arr(x) -> np.ndarray:
    return np.array(x, dtype=float)  # None (NaN in JSON) -> nan


def _layer_label(layer) -> str:
    return "n/a" if layer is None else str(layer)


def _heatmap(
    fig, ax, mat: np.ndarray, rows, cols, title: str, cbar: str, vmin=0.0, vmax=None, annotate=True, cmap="viridis"
):
    im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(
        range(len(cols)), cols, rotation=45 if len(cols) > 3 else 0, ha="right" if len(cols) > 3 else "center"
    )
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=cbar, shrink=0.9)
    if annotate and mat.size <= 200:
        for (i, j), v in np.ndenumerate(mat):
            if math.isfinite(v):
                r, g, b, _ = im.cmap(im.norm(v))
                # Dark text on light cells and vice versa, whatever the colormap.
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white",
                )
    return im


def plot_intrusion_by_layer(result: dict, path: Path) -> Path:
    """E_in (Eq. 37) against block index, one panel per component type, one line per task (paper Fig. 11)."""
    tasks, rows = result["tasks"], result["summary"]["by_layer_component"]
    comps = [c for c in COMPONENT_TITLES if any(r["component"] == c for r in rows)]
    ncol = min(3, len(comps))
    nrow = math.ceil(len(comps) / ncol)
    fig = _figure(4.6 * ncol + 1.8, 3.3 * nrow)
    axes = fig.subplots(nrow, ncol, squeeze=False, sharey=True)
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    pos = {l: i for i, l in enumerate(layers)}
    pos[None] = len(layers)  # unindexed names (embeddings, pooler, head) at the right end, labelled n/a
    colors = _colors(len(tasks))
    for ax, c in zip(axes.flat, comps):
        sel = sorted((r for r in rows if r["component"] == c), key=lambda r: pos[r["layer"]])
        x = [pos[r["layer"]] for r in sel]
        e = _arr([r["intrusion_energy"] for r in sel])  # (points, T)
        for t, name in enumerate(tasks):
            ax.plot(x, e[:, t], marker="o", ms=4, lw=1.5, color=colors[t], label=name)
        ax.set_title(COMPONENT_TITLES[c])
        ticks = sorted(set(x))
        inv = {v: k for k, v in pos.items()}
        ax.set_xticks(ticks, [_layer_label(inv[p]) for p in ticks])
        ax.set_xlabel("layer (block index)")
        ax.grid(alpha=0.3)
    top = np.nanmax(_arr([r["intrusion_energy"] for r in rows]))
    axes.flat[0].set_ylim(0, 1.08 * top if math.isfinite(top) and top > 0 else 1.0)  # y is shared
    for ax in axes[:, 0]:
        ax.set_ylabel("intrusion energy $E_{in}$")
    return _finish_task_grid(
        fig,
        axes,
        len(comps),
        path,
        "Intrusion energy by layer and component (share of each task vector's energy in the base's top-K core)",
    )


def plot_intrusion_heatmap(result: dict, path: Path) -> Path:
    """E_in as a (layer x component) x task heatmap (paper Fig. 12)."""
    tasks, rows = result["tasks"], result["summary"]["by_layer_component"]
    mat = _arr([r["intrusion_energy"] for r in rows])
    labels = [("" if r["layer"] is None else f"L{r['layer']} ") + COMPONENT_TITLES[r["component"]] for r in rows]
    fig = _figure(max(6.0, 1.0 * len(tasks) + 4.5), max(3.5, 0.32 * len(rows) + 1.8))
    ax = fig.subplots()
    _heatmap(
        fig,
        ax,
        mat,
        labels,
        tasks,
        "Intrusion energy $E_{in}$ per layer, component and task",
        "$E_{in}$",
        vmin=0.0,
        vmax=max(float(np.nanmax(mat)) if np.isfinite(mat).any() else 1.0, 1e-12),
        cmap="magma",
    )
    ax.set_xlabel("task")
    ax.set_ylabel("layer / component (mean over its matrices)")
    fig.savefig(path)
    return path


def plot_sim_inf(result: dict, path: Path) -> Path:
    """Sim and Inf (Eq. 7) heatmaps: global average over matrices vs the worst-N matrices by Inf (paper Figs. 5-8)."""
    tasks, s = result["tasks"], result["summary"]
    n = len(s["worst_by_inf"])
    panels = [
        (s["global"]["sim"], "Sim(a, b), global average", "Sim", "Greens"),
        (s["worst_inf_average"]["sim"], f"Sim(a, b), worst {n} matrices by Inf", "Sim", "Greens"),
        (s["global"]["inf"], "Inf(b → a), global average", "Inf", "Reds"),
        (s["worst_inf_average"]["inf"], f"Inf(b → a), worst {n} matrices by Inf", "Inf", "Reds"),
    ]
    side = max(4.2, 0.55 * len(tasks) + 3.0)
    fig = _figure(2 * side + 0.5, 2 * side - 0.6)
    axes = fig.subplots(2, 2)

    def finite(mats):
        v = np.concatenate([_arr(m).ravel() for m in mats])
        return v[np.isfinite(v)] if np.isfinite(v).any() else np.array([0.0, 1.0])

    # One colour scale per metric, shared by its two panels; Sim's starts at its smallest value
    # (typically > 0.5) so that differences stay visible, the numbers are printed in the cells.
    inf_max = max(float(finite([p[0] for p in panels[2:]]).max()), 1e-12)
    sim_min = min(float(np.floor(finite([p[0] for p in panels[:2]]).min() * 20) / 20), 0.95)
    for ax, (mat, title, cb, cmap) in zip(axes.flat, panels):
        is_inf = cb == "Inf"
        _heatmap(
            fig,
            ax,
            _arr(mat),
            tasks,
            tasks,
            title,
            cb,
            vmin=0.0 if is_inf else sim_min,
            vmax=inf_max if is_inf else 1.0,
            cmap=cmap,
        )
        ax.set_xlabel("task b (active directions V_b,k)" if is_inf else "task b")
        ax.set_ylabel("task a (LBW subspace V_a,LBW)" if is_inf else "task a")
    fig.suptitle("Load-bearing-wall overlap (Sim) and hidden interference (Inf)")
    fig.savefig(path)
    return path


def plot_axis_intrusion(result: dict, path: Path, max_panels: int = 6) -> Path:
    """Per-axis intrusion ``||Delta_t v_i||^2 / ||Delta_t||^2`` for the most intruded matrices (paper Fig. 13)."""
    tasks, params = result["tasks"], result["parameters"]
    names = [r["parameter"] for r in result["summary"]["worst_by_intrusion"]][:max_panels]
    ncol = min(2, len(names))
    nrow = math.ceil(len(names) / ncol)
    K = len(params[names[0]]["core_axis_energy"][0])
    fig = _figure(max(6.0, 0.45 * K * ncol + 1.5) * (1 if ncol == 1 else 1.0) + 1.8, 3.0 * nrow + 0.6)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    colors = _colors(len(tasks))
    width = 0.8 / len(tasks)
    for ax, name in zip(axes.flat, names):
        e = _arr(params[name]["core_axis_energy"])  # (T, K)
        for t, task in enumerate(tasks):
            ax.bar(np.arange(K) + (t - (len(tasks) - 1) / 2) * width, e[t], width, color=colors[t], label=task)
        ax.set_xticks(range(K), [f"v{i + 1}" for i in range(K)], fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("share of $\\|\\Delta_t\\|_F^2$")
        ax.grid(axis="y", alpha=0.3)
    return _finish_task_grid(
        fig,
        axes,
        len(names),
        path,
        "Intrusion energy split over the core axes $v_1, \\dots, v_K$ (most intruded matrices)",
    )


PLOTS = {
    "intrusion_by_layer.png": plot_intrusion_by_layer,
    "intrusion_heatmap.png": plot_intrusion_heatmap,
    "sim_inf_heatmaps.png": plot_sim_inf,
    "axis_intrusion.png": plot_axis_intrusion,
}


def write_plots(result: dict, folder: Path) -> list[str]:
    """Write every figure of :data:`PLOTS` into ``folder``; return the file names."""
    for name, fn in PLOTS.items():
        fn(result, Path(folder) / name)
    return list(PLOTS)


def _finish_task_grid(fig, axes, used: int, path, title: str):
    """Hide the unused panels of a grid, add one shared task legend and the title, save."""
    for ax in list(axes.flat)[used:]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", title="task", fontsize=8)
    fig.suptitle(title)
    fig.savefig(path)
    return path


# -- data-aware studies (pactmerge.analysis.studies) ---------------------------------------------------


def plot_ablation(ablation: dict, path: Path) -> Path:
    """Bars per task: accuracy of theta_t, LBW-ablated, random-ablated (std over seeds) (paper Table 3)."""
    rows = ablation["tasks"]
    tasks = list(rows)
    x = np.arange(len(tasks))
    fig = _figure(max(6.0, 1.1 * len(tasks) + 2.5), 4.2)
    ax = fig.subplots()
    width = 0.27
    series = [
        ("fine-tuned $\\theta_t$", [rows[t]["finetuned"] for t in tasks], None, "#999999"),
        ("LBW ablated", [rows[t]["lbw"] for t in tasks], None, "#d95f02"),
        (
            f"random ablated ({len(ablation['seeds'])} seeds)",
            [rows[t]["random_mean"] for t in tasks],
            [rows[t]["random_std"] or 0.0 for t in tasks],
            "#1b9e77",
        ),
    ]
    for i, (label, vals, err, color) in enumerate(series):
        v = 100 * _arr(vals)
        ax.bar(
            x + (i - 1) * width,
            v,
            width,
            label=label,
            color=color,
            yerr=None if err is None else 100 * _arr(err),
            capsize=3,
        )
        for xi, vi in zip(x + (i - 1) * width, v):
            ax.text(xi, vi, f"{vi:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, tasks, rotation=20, ha="right")
    ax.set_ylabel(f"accuracy (%), {ablation['split']} split")
    ax.set_ylim(0, 108)
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
    p = ablation["pact"]
    fig.suptitle(
        f"Subspace ablation: remove $V_{{t,LBW}}$ (K = {p['K']}, k = {p['k']})\n"
        "vs a random subspace of the same dimension outside $V_{0,K}$",
        fontsize=10,
    )
    fig.savefig(path)
    return path


def plot_fisher_attack(pairs: list[dict], path: Path) -> Path:
    """Accuracy on task A against attack strength alpha for M2-M4, with M0/M1 as lines (paper Fig. 2)."""
    ncol = min(3, len(pairs))
    nrow = math.ceil(len(pairs) / ncol)
    fig = _figure(4.6 * ncol + 0.4, 3.6 * nrow + 0.4)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    colors = {"M2": "#d62728", "M3": "#1f77b4", "M4": "#2ca02c"}
    labels = {"M2": "M2 crucial", "M3": "M3 safe", "M4": "M4 random"}
    for ax, fr in zip(axes.flat, pairs):
        al = _arr([r["alpha"] for r in fr["attack"]])
        for m in ("M2", "M3", "M4"):
            v = 100 * _arr([r[m] for r in fr["attack"]])
            ax.plot(al, v, marker="o", ms=4, color=colors[m], label=labels[m])
            if m == "M4" and any(r["M4_std"] is not None for r in fr["attack"]):
                s = 100 * _arr([r["M4_std"] or 0.0 for r in fr["attack"]])
                ax.fill_between(al, v - s, v + s, color=colors[m], alpha=0.15, lw=0)
        ax.axhline(100 * fr["M0"], color="black", ls="--", lw=1, label="M0 $\\theta_A$")
        ax.axhline(100 * fr["M1"], color="grey", ls=":", lw=1.5, label="M1 crucial ← $\\theta_0$")
        ax.set_xticks(al, [f"{a:g}" for a in al])
        ax.set_xlabel("attack strength α")
        ax.set_ylabel(f"accuracy on A (%), {fr['split']}")
        ax.set_ylim(0, 105)
        ax.set_title(f"A = {fr['task_a']}, B = {fr['task_b']}", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.set_visible(False)
    handles, lab = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, lab, loc="outside right center", fontsize=8)
    fig.suptitle("Fisher masks: entries set to $\\theta_0 + \\alpha\\Delta_B$ inside $\\theta_A$")
    fig.savefig(path)
    return path


def write_study_plots(studies: dict, folder: Path) -> list[str]:
    """ablation.png and fisher_attack.png for the studies present; returns the file names."""
    out = []
    if "ablation" in studies:
        out.append(plot_ablation(studies["ablation"], Path(folder) / "ablation.png").name)
    if studies.get("fisher"):
        out.append(plot_fisher_attack(studies["fisher"], Path(folder) / "fisher_attack.png").name)
    return out
