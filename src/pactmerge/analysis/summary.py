"""Aggregate per-parameter diagnostics into the ``summary`` block of metrics.json.

All averages are unweighted means over weight matrices (as the paper's global averages over
layers, App. C.2), ignoring NaN entries. "Off-diagonal" means the mean over ordered pairs
``a != b`` (Inf(t -> t) and Sim(t, t) say nothing about interference). A "layer" in the worst-N
lists is one weight matrix, as in the paper's Figs. 7-8 and 13 (``b00.mlp.c_fc``); per-block
figures are in ``by_layer`` (block index from the plan, ``null`` for unindexed names).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from pactmerge.analysis.components import COMPONENTS


def _nanmean(a: np.ndarray, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices are reported as NaN
        return np.nanmean(a, axis=axis)


def offdiag_mean(m: np.ndarray) -> float:
    """Mean of the off-diagonal entries of a ``(T, T)`` (or ``(..., T, T)``) array; NaN for T < 2."""
    T = m.shape[-1]
    if T < 2:
        return math.nan
    mask = ~np.eye(T, dtype=bool)
    return float(_nanmean(m[..., mask]))


def _arrays(params: dict[str, dict]) -> dict[str, np.ndarray]:
    names = list(params)
    get = lambda key: np.array([params[n][key] for n in names], dtype=float)  # noqa: E731
    return {
        "e_in": get("intrusion_energy"),  # (P, T)
        "sim": get("sim"),  # (P, T, T)
        "inf": get("inf"),  # (P, T, T)
        "removed": get("removed_energy"),
        "pdim": get("protect_dim"),
        "resid": get("core_residual"),
        "prot": get("core_protected"),
    }


def _block(a: dict[str, np.ndarray], rows) -> dict:
    """Means over the selected parameter rows."""
    sel = {k: v[rows] for k, v in a.items()}
    return {
        "num_parameters": int(len(sel["e_in"])),
        "intrusion_energy": _nanmean(sel["e_in"], axis=0).tolist(),
        "removed_energy": _nanmean(sel["removed"], axis=0).tolist(),
        "protect_dim": _nanmean(sel["pdim"], axis=0).tolist(),
        "core_residual": _nanmean(sel["resid"], axis=0).tolist(),
        "core_protected_fraction": _nanmean(sel["prot"], axis=0).tolist(),
        "sim": _nanmean(sel["sim"], axis=0).tolist(),
        "inf": _nanmean(sel["inf"], axis=0).tolist(),
        "sim_offdiag_mean": offdiag_mean(sel["sim"]),
        "inf_offdiag_mean": offdiag_mean(sel["inf"]),
    }


def _layer_key(layer):
    return (layer is None, -1 if layer is None else layer)


def summarize(params: dict[str, dict], tasks: list[str], worst_n: int = 5) -> dict:
    """The ``summary`` block (see docs/analysis.md) from the ``parameters`` block.

    Args:
        params: ``{name: entry}`` with the per-parameter lists of metrics.json.
        tasks: task labels, in order.
        worst_n: how many weight matrices the worst-by-Inf and worst-by-E_in lists hold.
    """
    names = list(params)
    a = _arrays(params)
    T = len(tasks)
    layers = [params[n]["layer"] for n in names]
    comps = [params[n]["component"] for n in names]
    idx = np.arange(len(names))

    by_component = [{"component": c, **_block(a, idx[[x == c for x in comps]])} for c in COMPONENTS if c in comps]
    by_layer = [{"layer": l, **_block(a, idx[[x == l for x in layers]])} for l in sorted(set(layers), key=_layer_key)]
    by_layer_component = [
        {"layer": l, "component": c, **_block(a, idx[[x == l and y == c for x, y in zip(layers, comps)]])}
        for l in sorted(set(layers), key=_layer_key)
        for c in COMPONENTS
        if any(x == l and y == c for x, y in zip(layers, comps))
    ]

    inf_score = np.array([offdiag_mean(m) for m in a["inf"]])
    ein_score = _nanmean(a["e_in"], axis=1)
    # NaN scores (T = 1, zero task vectors) sort last.
    worst_inf = [int(i) for i in sorted(idx, key=lambda i: -np.nan_to_num(inf_score[i], nan=-1.0))[:worst_n]]
    worst_ein = [int(i) for i in sorted(idx, key=lambda i: -np.nan_to_num(ein_score[i], nan=-1.0))[:worst_n]]

    def inf_row(i):
        m = a["inf"][i].copy()
        np.fill_diagonal(m, -np.inf)
        ta, tb = np.unravel_index(int(np.nanargmax(m)), m.shape) if T >= 2 else (0, 0)
        return {
            "parameter": names[i],
            "layer": layers[i],
            "component": comps[i],
            "inf_offdiag_mean": float(inf_score[i]),
            "inf_max": float(m[ta, tb]) if T >= 2 else math.nan,
            "inf_max_pair": {"from": tasks[tb], "into": tasks[ta]},
            "sim_offdiag_mean": offdiag_mean(a["sim"][i]),
        }

    def ein_row(i):
        t = int(np.nanargmax(a["e_in"][i])) if np.isfinite(a["e_in"][i]).any() else 0
        return {
            "parameter": names[i],
            "layer": layers[i],
            "component": comps[i],
            "intrusion_energy_mean": float(ein_score[i]),
            "intrusion_energy_max": float(a["e_in"][i][t]),
            "intrusion_energy_max_task": tasks[t],
        }

    worst_block = _block(a, np.array(worst_inf))
    return {
        "num_parameters": len(names),
        "num_tasks": T,
        "global": _block(a, idx),
        "by_component": by_component,
        "by_layer": by_layer,
        "by_layer_component": by_layer_component,
        "worst_n": worst_n,
        "worst_by_inf": [inf_row(i) for i in worst_inf],
        "worst_by_intrusion": [ein_row(i) for i in worst_ein],
        # Sim and Inf averaged over the worst-by-Inf matrices only (the paper's "top-6 layers" view).
        "worst_inf_average": {key: worst_block[key] for key in ("sim", "inf")},
    }
