"""Subspace ablation (PACT paper Sec. 3.2.2, Eq. 6, Table 3; App. A.3, C.2): does task t's
fine-tuned model depend on its load-bearing-wall subspace?

For every weight matrix W = theta_t (m x n) that PACT filters (2-D, not excluded, within
``depth``, not narrow: ``min(m, n) > K`` and ``>= k``, filters/pact_scope.py) and each task t:

    LBW ablation      W <- W (I - V V^T),  V = V_{t,LBW} = orth((I - V_{t,k}V_{t,k}^T) V_{0,K})   (Eq. 5)
    random control    W <- W (I - R R^T),  R: (n, d_t) orthonormal, uniformly random inside the
                      orthogonal complement of V_{0,K}, d_t = dim V_{t,LBW} (same dimension)

V_{0,K}, V_{t,k} and V_{t,LBW} are the very subspaces the merge's pact filter builds
(:func:`pactmerge.analysis.stream.iter_subspaces`: same config, plan, dtype, seeds). Every other
parameter (1-D, excluded, beyond depth) keeps theta_t's value.

The random basis is a Gaussian ``(n, d_t)`` matrix projected onto the complement of V_{0,K}
(twice, for round-off) and orthonormalized by QR. The paper draws a larger projected Gaussian
basis and keeps d_t random columns of it; both give a basis uniformly distributed over the
d_t-dimensional subspaces of the complement. Draws are seeded per (config seed, random seed,
parameter name, task), so a run is reproducible and independent of processing order.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pactmerge.analysis.stream import AnalysisSetup, iter_subspaces
from pactmerge.engine import MergeInputs
from pactmerge.filters.pact_scope import pact_narrow_reason
from pactmerge.plan import make_context
from pactmerge.registry import ParamInfo

F64 = torch.float64
_SALT = 10_000  # generator salts below this are the merge's own (randomized SVD: 0..T)


def project_out(w: Tensor, v: Tensor) -> Tensor:
    """``W (I - V V^T)``, computed as ``W - (W V) V^T`` (no n x n projector).

    Args:
        w: ``(m, n)`` weight.
        v: ``(n, d)`` orthonormal columns, ``d >= 0`` (``d = 0`` returns a copy of ``w``).

    Returns:
        ``(m, n)`` tensor in ``w``'s dtype; ``v`` is cast to it.
    """
    v = v.to(dtype=w.dtype, device=w.device)
    return w - (w @ v) @ v.mT


def random_complement_basis(core: Tensor, dim: int, generator: torch.Generator) -> Tensor:
    """A uniformly random ``dim``-dimensional orthonormal basis inside the orthogonal complement of ``core``.

    Args:
        core: ``(n, K)`` orthonormal columns (V_{0,K}).
        dim: wanted dimension, ``0 <= dim <= n - K``.
        generator: a CPU generator (the draw is made on the CPU in float64).

    Returns:
        ``(n, dim)`` tensor in ``core``'s dtype and device with orthonormal columns, ``core^T R = 0``
        up to round-off.

    Raises:
        ValueError: ``dim > n - K``.
    """
    n, K = core.shape
    if not 0 <= dim <= n - K:
        raise ValueError(
            f"random control of dimension {dim}: the complement of a rank-{K} core in R^{n} has dimension {n - K}"
        )
    c = core.detach().to("cpu", F64)
    x = torch.randn(n, dim, generator=generator, dtype=F64)
    for _ in range(2):  # project twice: one pass leaves O(eps * ||x||) inside the core
        x = x - c @ (c.mT @ x)
    q, _ = torch.linalg.qr(x)
    return q.to(dtype=core.dtype, device=core.device)


@dataclass
class ParamBases:
    """The ablation bases of one filtered weight matrix."""

    info: ParamInfo
    lbw: list[Tensor]  # per task: (n, d_t) V_{t,LBW}
    random: list[list[Tensor]]  # per random seed, per task: (n, d_t), in the complement of V_{0,K}
    delta_lbw_energy: list[float]  # per task ||Delta_t V_{t,LBW}||_F^2 (Eq. 26 assumes ~ 0)
    delta_energy: list[float]  # per task ||Delta_t||_F^2


def ablation_params(inputs: MergeInputs, setup: AnalysisSetup) -> tuple[list[ParamInfo], list[dict]]:
    """The 2-D parameters PACT filters (in plan order) and the matrices skipped as too small."""
    p = setup.pact
    chosen, skipped = [], []
    for info in inputs.plan.params:
        if not (info.is_matrix and info.in_depth(p.depth)):
            continue
        reason = pact_narrow_reason(p, info.shape)  # the merge's rule
        if reason is not None:
            skipped.append({"parameter": info.name, "reason": reason})
            continue
        chosen.append(info)
    return chosen, skipped


def collect_bases(
    inputs: MergeInputs,
    setup: AnalysisSetup,
    seeds: list[int],
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[list[ParamBases], list[dict]]:
    """V_{t,LBW} of every task and its random controls (one per seed) for every filtered matrix.

    Only bases are kept (``n x d_t`` each, d_t <= K); the weights are read one parameter at a time.

    Returns:
        ``(bases in plan order, skipped [{"parameter", "reason"}])``.
    """
    params, skipped = ablation_params(inputs, setup)
    out = []
    for info, _, deltas, sub in iter_subspaces(
        inputs, setup, params, torch.device(device), progress, desc="LBW subspaces"
    ):
        ctx = make_context(inputs.cfg, info)
        rand = [
            [
                random_complement_basis(sub.core, v.shape[1], ctx.generator(_SALT * (s + 1) + t)).cpu()
                for t, v in enumerate(sub.lbw)
            ]
            for s in seeds
        ]
        e_lbw = [float(torch.linalg.vector_norm(d @ v, dtype=F64) ** 2) for d, v in zip(deltas, sub.lbw)]
        e_all = [float(torch.linalg.vector_norm(d, dtype=F64) ** 2) for d in deltas]
        out.append(ParamBases(info, [v.cpu() for v in sub.lbw], rand, e_lbw, e_all))
    return out, skipped


def ablate_state(state: Mapping[str, Tensor], bases: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], float]:
    """``state`` with ``W <- W (I - V V^T)`` for every ``name -> V`` of ``bases``; other entries shared.

    Args:
        state: full state dict (``name -> tensor``); the ablated entries are 2-D.
        bases: ``name -> (n, d)`` orthonormal basis (any float dtype; cast to the weight's).

    Returns:
        ``(new state, removed energy share)`` where the share is ``sum ||W V||_F^2 / sum ||W||_F^2``
        over the ablated matrices (float64; NaN if they are all zero).
    """
    out = dict(state)
    removed = total = 0.0
    for name, v in bases.items():
        w = state[name]
        wv = w.to(F64) @ v.to(F64)
        removed += float(wv.square().sum())
        total += float(w.to(F64).square().sum())
        out[name] = project_out(w, v)
    return out, (removed / total if total > 0 else math.nan)


def _mean_std(xs: list[float]) -> tuple[float, float | None]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def run_subspace_ablation(
    accuracy: Callable[[Mapping[str, Tensor], str], float],
    load_state: Callable[[int], Mapping[str, Tensor]],
    tasks: list[str],
    bases: list[ParamBases],
    seeds: list[int],
    progress: bool = False,
) -> dict:
    """Accuracy of each theta_t, after its LBW ablation and after each random control.

    Args:
        accuracy: ``(state dict, task name) -> accuracy`` of a full model on that task.
        load_state: ``t -> theta_t``, the full state dict of task t's fine-tuned model.
        tasks: task names, in the config's model order.
        bases: from :func:`collect_bases` (same task order).
        seeds: the random seeds the controls were drawn with (for the record).

    Returns:
        ``{"tasks": {name: row}, "mean": {...}, "dims": {...}}``; a row holds ``finetuned``,
        ``lbw``, ``random`` (per seed), ``random_mean``, ``random_std`` (sample std, None for one
        seed), ``drop_lbw``, ``drop_random`` (= finetuned - random_mean), ``ratio`` =
        drop_lbw / drop_random (None unless drop_random > 0), ``lbw_dims`` (sum of d_t over the
        ablated matrices), ``lbw_fraction`` (lbw_dims / sum of their input dimensions n),
        ``energy_removed_lbw`` / ``energy_removed_random`` (share of ||theta_t||^2 of the ablated
        matrices projected out) and ``update_in_lbw`` (sum ||Delta_t V_LBW||^2 / sum ||Delta_t||^2).
    """
    input_dims = sum(b.info.shape[1] for b in bases)
    rows = {}
    for t, name in enumerate(tqdm(tasks, desc="subspace ablation", unit="task", disable=not progress, file=sys.stderr)):
        state = load_state(t)
        acc_ft = accuracy(state, name)
        ablated, e_lbw = ablate_state(state, {b.info.name: b.lbw[t] for b in bases})
        acc_lbw = accuracy(ablated, name)
        del ablated
        acc_rand, e_rand = [], []
        for s in range(len(seeds)):
            ablated, e = ablate_state(state, {b.info.name: b.random[s][t] for b in bases})
            acc_rand.append(accuracy(ablated, name))
            e_rand.append(e)
            del ablated
        del state
        r_mean, r_std = _mean_std(acc_rand)
        drop_lbw, drop_rand = acc_ft - acc_lbw, acc_ft - r_mean
        dims = sum(b.lbw[t].shape[1] for b in bases)
        d_all = sum(b.delta_energy[t] for b in bases)
        rows[name] = {
            "finetuned": acc_ft,
            "lbw": acc_lbw,
            "random": acc_rand,
            "random_mean": r_mean,
            "random_std": r_std,
            "drop_lbw": drop_lbw,
            "drop_random": drop_rand,
            "ratio": drop_lbw / drop_rand if drop_rand > 0 else None,
            "lbw_dims": dims,
            "lbw_fraction": dims / input_dims if input_dims else math.nan,
            "energy_removed_lbw": e_lbw,
            "energy_removed_random": sum(e_rand) / len(e_rand),
            "update_in_lbw": sum(b.delta_lbw_energy[t] for b in bases) / d_all if d_all > 0 else math.nan,
        }
    keys = (
        "finetuned",
        "lbw",
        "random_mean",
        "drop_lbw",
        "drop_random",
        "lbw_fraction",
        "energy_removed_lbw",
        "energy_removed_random",
    )
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in keys}
    # The paper's "on average ... x larger": the ratio of the mean drops (a mean of per-task
    # ratios would be dominated by tasks whose random drop is ~0).
    mean["ratio"] = mean["drop_lbw"] / mean["drop_random"] if mean["drop_random"] > 0 else None
    return {
        "tasks": rows,
        "mean": mean,
        "dims": {"num_matrices": len(bases), "input_dims": input_dims},
        "seeds": list(seeds),
    }
