"""KnOTS (Stoica et al. 2025, "Model merging with SVD to tie the KnOTS", ICLR 2025): align the task
updates in one shared basis, then merge their singular-value-scaled coordinates.

For a 2-D parameter with task vectors ``Delta_t`` (``m x n``)::

    [Delta_1 ... Delta_T] = U S [V_1 ... V_T]        (thin SVD of the m x Tn concatenation;
                                                      V_t: the q x n block of V^T for task t)
    C_t    = S V_t                                   (task t's coordinates, q x n: Delta_t = U C_t)
    merged = U merge(C_1, ..., C_T)

``base_method`` is the merge of the coordinates:

* ``task_arithmetic``: ``sum_t w_t C_t`` (which gives back ``sum_t w_t Delta_t``);
* ``ties``: TIES on the ``C_t`` -- each task's top-``density`` magnitudes kept, over the whole
  model (``scope: model``, default, as the reference code trims the concatenation of every
  layer's scaled coordinates) or per parameter (``scope: tensor``), then sign election and the
  disjoint mean (or sum) with the models' weights;
* ``iso_c`` / ``iso_cts``: Iso-C / Iso-CTS (:mod:`pactmerge.methods.isotropic`) of the
  coordinates (``w_t C_t``), mapped back by ``U``. Because ``U`` has orthonormal columns, this is
  Iso-C / Iso-CTS of the task vectors restricted to their joint column space: the flat spectrum is
  spread over ``min(q, n)`` directions instead of ``min(m, n)`` (q = rank of the concatenation).

``dare_p > 0`` first drops each entry of each ``C_t`` with probability ``dare_p`` and rescales
the rest by ``1 / (1 - dare_p)`` (KnOTS-DARE-TIES with ``ties``); the draws are seeded per
parameter and task. 1-D parameters: ``task_arithmetic`` / ``ties`` on the task vectors themselves
(with the model-wide thresholds under ``scope: model``), the mean for ``iso_c`` / ``iso_cts``.
PACT composes as a filter: it runs on the task vectors first. With ``ties``, a model's
``parameters: {density: d_t}`` replaces ``density`` for its task.

``scope: model`` needs each task's k-th largest ``|C_t|`` over the whole model before merging:
``prepare`` recomputes the coordinates in each of TIES's radix-selection passes (2 in float32),
so the SVDs run about three times.

The reference code (``SVDMerger``) also turns norm weights into diagonal matrices and appends
biases as an extra column of their weight matrix before the SVD; here every 2-D parameter is
aligned on its own and 1-D parameters are merged directly.

Well-posed form (default, ``rank_aware: true``): only the numerical rank of the concatenation is
kept (singular values above ``rank_rtol * S[0]``; the reference keeps ``S > 1e-5``). The other
rows are arbitrary and would enter TIES's trim and DARE's draws. ``rank_aware: false`` keeps them.

LoRA adapters (every ``Delta_t = B_t A_t`` a :class:`~pactmerge.lowrank.LowRankDelta`): the SVD
comes from the factors -- ``[B_1 ... B_T] = Q R`` and ``A_t^T = Q_t R_t``, so the concatenation is
``Q (R blkdiag(R_t^T)) blkdiag(Q_t^T)``; the SVD of the small core ``R blkdiag(R_t^T) = U_c S W^T``
gives ``U = Q U_c`` and ``V_t = W^T[:, block t] Q_t^T`` -- and the result is low-rank,
``U merge(C)``. Exact in the well-posed form (the same kept rows, up to each row's sign, which
every base method is equivariant to).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.filters.dare import dare_mask
from pactmerge.linalg import numerical_rank, thin_svd
from pactmerge.lowrank import LowRankDelta, all_lowrank, densify
from pactmerge.methods.isotropic import iso_cts_merge, isotropic_flatten, mean_of
from pactmerge.methods.task_arithmetic import weighted_sum
from pactmerge.methods.ties import (
    MappedStream,
    TiesModelParams,
    TiesParams,
    kth_largest_magnitude,
    model_thresholds,
    task_densities,
    ties_merge,
    trim_count,
)
from pactmerge.registry import ParamContext, Params, register_method

_DARE_SALT = 7919  # keeps KnOTS's DARE draws apart from a `dare` filter's on the same parameter


class KnotsParams(Params):
    base_method: Literal["task_arithmetic", "ties", "iso_c", "iso_cts"] = Field(
        "task_arithmetic", description="how the aligned coordinates S V_t are merged"
    )
    density: float = Field(0.2, gt=0.0, le=1.0, description="ties: fraction of each task's coordinates kept")
    scope: Literal["model", "tensor"] = Field("model", description="ties: top-k over the whole model or per parameter")
    aggregate: Literal["mean", "sum"] = Field("mean", description="ties: disjoint mean or sum")
    trim_count: Literal["floor", "floor_plus_1", "floor_at_least_1"] = Field(
        "floor", description="ties: k rule (see ties)"
    )
    dare_p: float = Field(0.0, ge=0.0, lt=1.0, description="DARE drop probability applied to each C_t (0: off)")
    common_space_fraction: float = Field(0.8, ge=0.0, le=1.0, description="iso_cts: share of common directions")
    rank_aware: bool = Field(True, description="keep only the numerical rank of the concatenation (False: literal)")
    rank_rtol: float | None = Field(None, gt=0, description="null tolerance relative to S[0]; default max(m, Tn)*eps")


def _ties(p: KnotsParams) -> TiesParams:
    return TiesParams(density=p.density, scope=p.scope, aggregate=p.aggregate, trim_count=p.trim_count)


def knots_model_params(p: KnotsParams) -> type[Params] | None:
    # Only the TIES base method has a per-model option (density).
    return TiesModelParams if p.base_method == "ties" else None


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


def knots_coordinates(deltas: list, ctx: ParamContext, p: KnotsParams) -> tuple[Tensor, list[Tensor]]:
    """``(U, [C_t])`` for a 2-D parameter: the basis and the scaled coordinates (after DARE)."""
    m, n = deltas[0].shape
    u, s, vs = knots_svd(deltas)
    if p.rank_aware:
        keep = numerical_rank(s, (m, n * len(deltas)), p.rank_rtol)
        u, s, vs = u[:, :keep], s[:keep], [v[:keep] for v in vs]
    coords = [s.unsqueeze(1) * v for v in vs]
    if p.dare_p > 0:
        coords = [
            torch.where(dare_mask(c.shape, p.dare_p, ctx.generator(salt=_DARE_SALT + t)).to(c.device), c, 0.0)
            / (1 - p.dare_p)
            for t, c in enumerate(coords)
        ]
    return u, coords


def _trimmed_items(ctx: ParamContext, _base: Tensor, deltas: list, p: KnotsParams) -> list[Tensor]:
    """What KnOTS-TIES ranks for one parameter: the coordinates (2-D) or the task vectors (1-D)."""
    if ctx.info.is_matrix:
        return knots_coordinates(deltas, ctx, p)[1]
    return densify(deltas)


def _prepare(stream, p: KnotsParams) -> dict:
    if p.base_method != "ties" or p.scope != "model":
        return {}
    tp = _ties(p)
    ranked = MappedStream(stream, lambda ctx, base, deltas: _trimmed_items(ctx, base, deltas, p))
    return {"thresholds": model_thresholds(ranked, lambda ctx, t, n: trim_count(n, tp, task_densities(ctx, tp)[t]))}


def _ties_on(items: list[Tensor], ctx: ParamContext, p: KnotsParams) -> Tensor:
    if p.scope == "model":
        stats = ctx.stats.get("knots")
        if not stats:
            raise RuntimeError("knots: ties with scope 'model' needs the thresholds of its prepare pass")
        thresholds = stats["thresholds"]
    else:
        tp = _ties(p)
        densities = task_densities(ctx, tp)
        thresholds = [kth_largest_magnitude(x, trim_count(x.numel(), tp, d)) for x, d in zip(items, densities)]
    return ties_merge(items, ctx.weights, thresholds, p.aggregate)


def merge_coordinates(coords: list[Tensor], ctx: ParamContext, p: KnotsParams) -> Tensor:
    """The base method on the same-shape coordinate matrices ``coords``, with the models' weights."""
    if p.base_method == "task_arithmetic":
        return weighted_sum(coords, ctx.weights)
    if p.base_method == "ties":
        return _ties_on(coords, ctx, p)
    scaled = [c * w if w != 1.0 else c for c, w in zip(coords, ctx.weights)]
    if p.base_method == "iso_c":
        return isotropic_flatten(weighted_sum(scaled, [1.0] * len(scaled)), p.rank_aware, p.rank_rtol)
    return iso_cts_merge(scaled, p.common_space_fraction, p.rank_aware, p.rank_rtol)


@register_method(
    "knots",
    params=KnotsParams,
    prepare=_prepare,
    lowrank=True,
    model_params=knots_model_params,
    uses_weight=True,
    paper="Model merging with SVD to tie the KnOTS (arXiv:2410.19735)",
)
def knots(base: Tensor, deltas: list, ctx: ParamContext, p: KnotsParams):
    """KnOTS: SVD of [Delta_1 ... Delta_T] = U S [V_1 ... V_T]; merge the coordinates S V_t (TA, TIES, Iso-C/CTS)."""
    if not ctx.info.is_matrix:
        dense = densify(deltas)
        if p.base_method == "task_arithmetic":
            return weighted_sum(dense, ctx.weights)
        if p.base_method == "ties":
            return _ties_on(dense, ctx, p)
        return mean_of(dense)
    lowrank = all_lowrank(deltas)
    u, coords = knots_coordinates(deltas, ctx, p)
    merged = merge_coordinates(coords, ctx, p)
    if lowrank:
        return LowRankDelta(u, merged)
    return u @ merged
