"""TSV-M: Task Singular Vectors Merging (Gargiulo et al. 2025, "Task singular vectors: reducing
task interference in model merging"; "Model Merging Overview" survey, TSV-Merging and its Appendix 12.1).

For a 2-D parameter with ``T`` task vectors ``Delta_t = U_t S_t V_t^T`` (``m x n``, r = min(m, n)),
each task keeps its top ``k = floor(r / T)`` singular triplets::

    U^ = [U_1[:, :k] ... U_T[:, :k]]          (m x Tk)
    V^ = [V_1[:, :k] ... V_T[:, :k]]          (n x Tk)
    S^ = blkdiag(S_1[:k], ..., S_T[:k])       (Tk x Tk)
    U_perp = polar(U^),  V_perp = polar(V^)   (polar(X) = P Q^T for X = P D Q^T: the nearest matrix
                                               with orthonormal columns, = X (X^T X)^{-1/2})
    merged = U_perp S^ V_perp^T

The singular values are the tasks' own (not flattened). 1-D parameters take the mean of the task
vectors (as the reference code does). Per-model weights scale the task vectors first
(``Delta_t <- w_t Delta_t``, fusion_bench's per-task ``alpha`` list); default 1.

Well-posed form (default, ``rank_aware: true``): triplets whose singular value is numerically
zero -- below ``rank_rtol * max_t S_t[0]``, the largest singular value of all tasks (a task PACT
has annihilated is round-off even relative to itself); default :func:`pactmerge.linalg.null_rtol`
= ``sqrt(eps)``, the polar factors' tolerance too; why not ``max(m, n) * eps``:
:mod:`pactmerge.methods.isotropic` -- are dropped (their singular vectors are arbitrary), and the
polar factors are taken on the numerical range of U^ and V^ only
(:func:`pactmerge.linalg.polar_factor` with ``literal=False``). The two forms agree whenever every
task has rank >= k and U^, V^ have full column rank; they differ when the concatenated bases are
rank-deficient -- e.g. after PACT with T >= 4 every filtered task vector annihilates the core
V_{0,K}, so V^ has at most n - K independent columns, and the literal polar factor completes it
with arbitrary directions that land in that core (README, "Composing PACT with spectrum-flattening methods").
``rank_aware: false`` is the literal formula.

``svd: randomized`` computes each task's top-k triplets by a randomized range finder (Halko et
al. 2011; :func:`pactmerge.linalg.randomized_svd`, ``oversample`` extra sketch columns,
``power_iters`` subspace iterations), seeded per parameter and task from the config ``seed`` -- the
PACT paper's efficient TSV-M (Appendix B, Eqs. 34 and 36: the T task SVDs become O(m n k), the two
polar factors stay exact). It equals the exact form up to the sketch's accuracy, which is tight
when the spectrum decays past k (``tests/test_numerics_tsv_randomized.py``).

LoRA adapters (every task vector a :class:`~pactmerge.lowrank.LowRankDelta`): in the well-posed
form each task's SVD comes from its factors (:func:`pactmerge.lowrank.factor_svd`) and the result
is low-rank, ``(U_perp S^) V_perp^T`` -- exact, since a rank-r_t task has no triplets beyond r_t
to keep. The literal form densifies (it may fill U^/V^ with null-space vectors).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.linalg import null_rtol, polar_factor, randomized_svd, thin_svd
from pactmerge.lowrank import Delta, LowRankDelta, all_lowrank, densify, factor_svd, scale_delta
from pactmerge.methods.isotropic import mean_of
from pactmerge.registry import ParamContext, Params, register_method

# Salts of the per-task randomized SVDs (ctx.generator(salt)): distinct from PACT's (0 .. T), so a
# PACT-TSV-M merge never reuses a PACT sketch.
_SKETCH_SALT = 1_000


class TsvParams(Params):
    rank_aware: bool = Field(
        True, description="drop null triplets, polar factors on the numerical range (False: literal)"
    )
    rank_rtol: float | None = Field(
        None, gt=0, description="null tolerance relative to the largest singular value; default sqrt(eps)"
    )
    svd: Literal["exact", "randomized"] = Field(
        "exact", description="the T per-task truncated SVDs: exact, or randomized (PACT paper App. B, Eq. 34)"
    )
    oversample: int = Field(10, ge=0, description="randomized SVD: extra sketch columns")
    power_iters: int = Field(2, ge=0, description="randomized SVD: power iterations")


def tsv_merge(
    deltas: list[Delta],
    rank_aware: bool = True,
    rank_rtol: float | None = None,
    *,
    svd: str = "exact",
    oversample: int = 10,
    power_iters: int = 2,
    generators: list[torch.Generator] | None = None,
) -> Delta:
    """U_perp diag(S^) V_perp^T for ``T`` matrices ``deltas`` of shape ``(m, n)`` (see module doc).

    All :class:`LowRankDelta` with ``rank_aware``: from the factors, returned as a LowRankDelta.
    ``svd="randomized"``: each dense task's top-k triplets by :func:`pactmerge.linalg.randomized_svd`
    (``generators[t]`` seeds task t's sketch); low-rank tasks always use their exact factor SVD.
    """
    lowrank = rank_aware and all_lowrank(deltas)
    m, n = deltas[0].shape
    k = min(m, n) // len(deltas)
    rtol = rank_rtol if rank_rtol is not None else null_rtol(deltas[0].dtype)
    svds = []
    for t, d in enumerate(deltas if lowrank else densify(deltas)):
        if isinstance(d, LowRankDelta):
            svds.append(factor_svd(d))
        elif svd == "randomized":
            gen = generators[t] if generators is not None else None
            svds.append(randomized_svd(d, k, oversample=oversample, power_iters=power_iters, generator=gen))
        else:
            svds.append(thin_svd(d))
    # Null test against the largest singular value of all tasks, not each task's own: a task that
    # PACT has (almost) annihilated is round-off relative to itself, and its arbitrary directions
    # would enter the polar factors (which then rotate the other tasks' directions into them).
    top = max((float(s[0]) for _, s, _ in svds if s.numel()), default=0.0)
    us, ss, vs = [], [], []
    for u, s, vh in svds:
        keep = min(k, int((s > rtol * top).sum().item())) if rank_aware else k
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vs.append(vh[:keep].mT)
    u_cat, s_cat, v_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    if s_cat.numel() == 0:
        return LowRankDelta(u_cat, v_cat.mT) if lowrank else torch.zeros((m, n), dtype=u_cat.dtype, device=u_cat.device)
    u_perp = polar_factor(u_cat, rtol, literal=not rank_aware)
    v_perp = polar_factor(v_cat, rtol, literal=not rank_aware)
    if lowrank:
        return LowRankDelta(u_perp * s_cat, v_perp.mT)
    return (u_perp * s_cat) @ v_perp.mT


@register_method(
    "tsv_m",
    params=TsvParams,
    lowrank=True,
    uses_weight=True,
    paper="Task singular vectors: reducing task interference in model merging (arXiv:2412.00081)",
)
def tsv_m(base: Tensor, deltas: list[Delta], ctx: ParamContext, p: TsvParams) -> Delta:
    """TSV-M: each task's top floor(r/T) singular triplets, U and V whitened by polar factors; 1-D: mean."""
    scaled = [scale_delta(d, w) for d, w in zip(deltas, ctx.weights)]
    if not ctx.info.is_matrix:
        return mean_of(densify(scaled))
    gens = [ctx.generator(_SKETCH_SALT + t) for t in range(len(scaled))] if p.svd == "randomized" else None
    return tsv_merge(
        scaled,
        p.rank_aware,
        p.rank_rtol,
        svd=p.svd,
        oversample=p.oversample,
        power_iters=p.power_iters,
        generators=gens,
    )
