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
zero (below ``rank_rtol * S_t[0]``) are dropped -- their singular vectors are arbitrary -- and the
polar factors are taken on the numerical range of U^ and V^ only
(:func:`pactmerge.linalg.polar_factor` with ``literal=False``). The two forms agree whenever every
task has rank >= k and U^, V^ have full column rank; they differ when the concatenated bases are
rank-deficient -- e.g. after PACT with T >= 4 every filtered task vector annihilates the core
V_{0,K}, so V^ has at most n - K independent columns, and the literal polar factor completes it
with arbitrary directions that land in that core (README, "Composing PACT with spectrum-flattening methods").
``rank_aware: false`` is the literal formula.

LoRA adapters (every task vector a :class:`~pactmerge.lowrank.LowRankDelta`): in the well-posed
form each task's SVD comes from its factors (:func:`pactmerge.lowrank.factor_svd`) and the result
is low-rank, ``(U_perp S^) V_perp^T`` -- exact, since a rank-r_t task has no triplets beyond r_t
to keep. The literal form densifies (it may fill U^/V^ with null-space vectors).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.linalg import numerical_rank, polar_factor, thin_svd
from pactmerge.lowrank import Delta, LowRankDelta, all_lowrank, densify, factor_svd, scale_delta
from pactmerge.methods.isotropic import mean_of
from pactmerge.registry import ParamContext, Params, register_method


class TsvParams(Params):
    rank_aware: bool = Field(
        True, description="drop null triplets, polar factors on the numerical range (False: literal)"
    )
    rank_rtol: float | None = Field(
        None, gt=0, description="null tolerance relative to the largest singular value; default max(m,n)*eps"
    )


def tsv_merge(deltas: list[Delta], rank_aware: bool = True, rank_rtol: float | None = None) -> Delta:
    """U_perp diag(S^) V_perp^T for ``T`` matrices ``deltas`` of shape ``(m, n)`` (see module doc).

    All :class:`LowRankDelta` with ``rank_aware``: from the factors, returned as a LowRankDelta."""
    lowrank = rank_aware and all_lowrank(deltas)
    m, n = deltas[0].shape
    k = min(m, n) // len(deltas)
    us, ss, vs = [], [], []
    for d in deltas if lowrank else densify(deltas):
        u, s, vh = factor_svd(d) if isinstance(d, LowRankDelta) else thin_svd(d)
        keep = min(k, numerical_rank(s, (m, n), rank_rtol)) if rank_aware else k
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vs.append(vh[:keep].mT)
    u_cat, s_cat, v_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    if s_cat.numel() == 0:
        return LowRankDelta(u_cat, v_cat.mT) if lowrank else torch.zeros((m, n), dtype=u_cat.dtype, device=u_cat.device)
    u_perp = polar_factor(u_cat, rank_rtol, literal=not rank_aware)
    v_perp = polar_factor(v_cat, rank_rtol, literal=not rank_aware)
    if lowrank:
        return LowRankDelta(u_perp * s_cat, v_perp.mT)
    return (u_perp * s_cat) @ v_perp.mT


@register_method("tsv_m", params=TsvParams, lowrank=True)
def tsv_m(base: Tensor, deltas: list[Delta], ctx: ParamContext, p: TsvParams) -> Delta:
    """TSV-M: each task's top floor(r/T) singular triplets, U and V whitened by polar factors; 1-D: mean."""
    scaled = [scale_delta(d, w) for d, w in zip(deltas, ctx.weights)]
    if not ctx.info.is_matrix:
        return mean_of(densify(scaled))
    return tsv_merge(scaled, p.rank_aware, p.rank_rtol)
