"""KnOTS (Stoica et al. 2025, "Model merging with SVD to tie the KnOTS"): align the task updates in
one shared basis, then merge their coordinates.

For a 2-D parameter with task vectors ``Delta_t`` (``m x n``)::

    [Delta_1 ... Delta_T] = U S [V_1 ... V_T]        (thin SVD of the m x Tn concatenation;
                                                      V_t: the q x n block of V^T for task t)
    so Delta_t = U S V_t exactly, and
    merged = U S merge(V_1, ..., V_T)

``base_method``: ``task_arithmetic`` (sum_t w_t V_t, which gives back sum_t w_t Delta_t) or
``ties`` (TIES on the V_t: per-V_t top-``density`` trim, sign election, disjoint mean or sum;
the models' weights as in TIES). ``dare_p > 0`` first drops each entry of each V_t with
probability ``dare_p`` and rescales the rest by 1/(1 - dare_p) (KnOTS-DARE-TIES with ``ties``);
the draws are seeded per parameter and task. 1-D parameters: ``base_method`` on the task
vectors themselves (TIES per tensor). PACT composes as a filter: it runs on the task vectors first.

Well-posed form (default, ``rank_aware: true``): only the numerical rank of the concatenation is
kept (singular values above ``rank_rtol * S[0]``). The other rows of [V_1 ... V_T] have zero
singular value and are arbitrary; they do not change ``U S V_merged`` for ``task_arithmetic``,
but would enter TIES's magnitude trim and DARE's draws. ``rank_aware: false`` keeps all of them.

LoRA adapters (every ``Delta_t = B_t A_t`` a :class:`~pactmerge.lowrank.LowRankDelta`): the SVD
comes from the factors -- ``[B_1 ... B_T] = Q R`` and ``A_t^T = Q_t R_t``, so the concatenation is
``Q (R blkdiag(R_t^T)) blkdiag(Q_t^T)``; the SVD of the small core ``R blkdiag(R_t^T) = U_c S W^T``
gives ``U = Q U_c`` and ``V_t = W^T[:, block t] Q_t^T`` -- and the result is low-rank,
``(U S) V_merged``. Exact in the well-posed form (the same kept rows, up to each row's sign, which
TA, TIES and DARE are all equivariant to).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.filters.dare import dare_mask
from pactmerge.linalg import numerical_rank, thin_svd
from pactmerge.lowrank import LowRankDelta, all_lowrank, densify
from pactmerge.methods.task_arithmetic import weighted_sum
from pactmerge.methods.ties import TiesParams, kth_largest_magnitude, ties_merge, trim_count
from pactmerge.registry import ParamContext, Params, register_method

_DARE_SALT = 7919  # keeps KnOTS's DARE draws apart from a `dare` filter's on the same parameter


class KnotsParams(Params):
    base_method: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic", description="how the aligned V_t are merged"
    )
    density: float = Field(0.2, gt=0.0, le=1.0, description="ties: fraction of each V_t's entries kept")
    aggregate: Literal["mean", "sum"] = Field("mean", description="ties: disjoint mean or sum")
    trim_count: Literal["floor", "floor_plus_1", "floor_at_least_1"] = Field(
        "floor", description="ties: k rule (see ties)"
    )
    dare_p: float = Field(0.0, ge=0.0, lt=1.0, description="DARE drop probability applied to each V_t (0: off)")
    rank_aware: bool = Field(True, description="keep only the numerical rank of the concatenation (False: literal)")
    rank_rtol: float | None = Field(None, gt=0, description="null tolerance relative to S[0]; default max(m, Tn)*eps")


def _ties(p: KnotsParams) -> TiesParams:
    return TiesParams(density=p.density, scope="tensor", aggregate=p.aggregate, trim_count=p.trim_count)


def knots_svd(deltas: list) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``(U, S, [V_t])`` of the concatenation ``[Delta_1 ... Delta_T]`` (see module doc)."""
    if all_lowrank(deltas):
        b = torch.cat([d.B for d in deltas], dim=1)
        q, r = torch.linalg.qr(b)
        qs, rs = zip(*(torch.linalg.qr(d.A.mT) for d in deltas))  # A_t^T = Q_t R_t
        core = r @ torch.block_diag(*[rt.mT for rt in rs])
        uc, s, wh = torch.linalg.svd(core, full_matrices=False)
        vs, start = [], 0
        for qt in qs:
            width = qt.shape[1]
            vs.append(wh[:, start : start + width] @ qt.mT)
            start += width
        return q @ uc, s, vs
    dense = densify(deltas)
    n = dense[0].shape[1]
    u, s, vh = thin_svd(torch.cat(dense, dim=1))
    return u, s, [vh[:, t * n : (t + 1) * n] for t in range(len(dense))]


def merge_coordinates(vs: list[Tensor], ctx: ParamContext, p: KnotsParams) -> Tensor:
    """The base method (after DARE) on same-shape matrices ``vs``, with the models' weights."""
    if p.dare_p > 0:
        vs = [
            torch.where(dare_mask(v.shape, p.dare_p, ctx.generator(salt=_DARE_SALT + t)).to(v.device), v, 0.0)
            / (1 - p.dare_p)
            for t, v in enumerate(vs)
        ]
    if p.base_method == "task_arithmetic":
        return weighted_sum(vs, ctx.weights)
    tp = _ties(p)
    thresholds = [kth_largest_magnitude(v, trim_count(v.numel(), tp)) for v in vs]
    return ties_merge(vs, ctx.weights, thresholds, p.aggregate)


@register_method("knots", params=KnotsParams, lowrank=True)
def knots(base: Tensor, deltas: list, ctx: ParamContext, p: KnotsParams):
    """KnOTS: SVD of [Delta_1 ... Delta_T] = U S [V_1 ... V_T], merge the V_t (TA/TIES, optional DARE), U S V_merged."""
    if not ctx.info.is_matrix:
        deltas = densify(deltas)
        if p.base_method == "task_arithmetic":
            return weighted_sum(deltas, ctx.weights)
        tp = _ties(p)
        return ties_merge(
            deltas, ctx.weights, [kth_largest_magnitude(d, trim_count(d.numel(), tp)) for d in deltas], p.aggregate
        )
    lowrank = all_lowrank(deltas)
    m, n = deltas[0].shape
    u, s, vs = knots_svd(deltas)
    if p.rank_aware:
        keep = numerical_rank(s, (m, n * len(deltas)), p.rank_rtol)
        u, s, vs = u[:, :keep], s[:keep], [v[:keep] for v in vs]
    merged_v = merge_coordinates(vs, ctx, p)
    if lowrank:
        return LowRankDelta(u * s, merged_v)
    return (u * s) @ merged_v
