"""Iso-C and Iso-CTS (Marczak et al. 2025, "No task left behind: isotropic model merging").

For a 2-D parameter, M = sum_t Delta_t = U S V^T; Iso-C replaces every singular value by their
mean sigma_bar = mean(S) over all min(m, n) of them: merged = sigma_bar * U V^T. 1-D parameters
take the mean of the task vectors (as the reference code does).

Well-posed form (default, ``rank_aware: true``): directions whose singular value is numerically
zero (below ``rank_rtol * S[0]``, default :func:`pactmerge.linalg.null_rtol` = ``sqrt(eps)`` of the
compute dtype) get no update. sigma_bar stays the mean over all min(m, n) values, so the two forms
differ only on those null directions, whose singular vectors are arbitrary (whatever LAPACK
completes the basis with). After PACT with T >= 3 tasks the sum has exactly such a null space --
the pretrained core PACT protects -- and the literal form writes sigma_bar into it (README,
"Composing PACT with spectrum-flattening methods").

Why ``sqrt(eps)`` and not ``max(m, n) * eps`` (the textbook rank threshold, used before issue 14):
the filtered task vectors carry PACT's round-off, and along the directions all of them annihilate
their sum's singular values reach tens of eps relative (measured: up to 21 eps in float64 on random
layers, 59 eps on a 40 x 24 layer where ``max(m, n) * eps`` = 40 eps, and the literal sigma_bar then
went into the protected core: 22% of the update). ``sqrt(eps)`` is far above that and far below
the smallest genuine singular value measured (see :mod:`pactmerge.linalg.core`); the invariant
"no update along the directions every filtered task vector annihilates" is a property test
(``tests/test_numerics_null.py``).

Iso-CTS (``iso_cts``, below) adds task-specific directions to the common subspace; see its docstring.

LoRA adapters (every task vector a :class:`~pactmerge.lowrank.LowRankDelta`): in the well-posed
form both methods are computed from the stacked factors (:func:`pactmerge.lowrank.stacked_svd`,
no ``m x n`` SVD) and return a low-rank update; this is exact, because every direction outside the
factors' span has a zero singular value and gets no update. The literal form (``rank_aware:
false``) writes onto those null directions, so it densifies.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.linalg import null_rtol, numerical_rank, polar_factor, thin_svd
from pactmerge.lowrank import Delta, LowRankDelta, all_lowrank, densify, factor_svd, scale_delta, stacked_svd
from pactmerge.methods.task_arithmetic import weighted_sum
from pactmerge.registry import ParamContext, Params, register_method


class IsoCParams(Params):
    rank_aware: bool = Field(True, description="drop numerically-null directions (False: the literal formula)")
    rank_rtol: float | None = Field(None, gt=0, description="null tolerance relative to S[0]; default sqrt(eps)")


def mean_of(deltas: list[Tensor]) -> Tensor:
    return weighted_sum(deltas, [1.0 / len(deltas)] * len(deltas))


def isotropic_flatten(m: Tensor, rank_aware: bool = True, rank_rtol: float | None = None) -> Tensor:
    """sigma_bar * U V^T of ``m = U S V^T`` with sigma_bar = mean(S) over all min(m, n) values.

    With ``rank_aware`` the product runs over the numerical range of ``m`` only: singular values
    ``<= rank_rtol * S[0]`` (default :func:`~pactmerge.linalg.null_rtol`) count as zero.
    """
    u, s, vh = thin_svd(m)
    sigma_bar = s.mean()
    if rank_aware:
        r = numerical_rank(s, tuple(m.shape), rank_rtol if rank_rtol is not None else null_rtol(m.dtype))
        u, vh = u[:, :r], vh[:r]
    return sigma_bar * (u @ vh)


def isotropic_flatten_lowrank(
    deltas: list[LowRankDelta], weights: list[float], rank_rtol: float | None = None
) -> LowRankDelta:
    """The well-posed :func:`isotropic_flatten` of ``sum_t w_t B_t A_t`` from the stacked factors.

    sigma_bar = sum(S) / min(m, n): the dense spectrum's other values are zero."""
    m, n = deltas[0].shape
    u, s, vh = stacked_svd(deltas, weights)
    r = numerical_rank(s, (m, n), rank_rtol if rank_rtol is not None else null_rtol(s.dtype))
    sigma_bar = s.sum() / min(m, n)
    return LowRankDelta(sigma_bar * u[:, :r], vh[:r])


@register_method(
    "iso_c",
    params=IsoCParams,
    lowrank=True,
    uses_weight=True,
    paper="No task left behind: isotropic model merging with common and task-specific subspaces (arXiv:2502.04959)",
)
def iso_c(base: Tensor, deltas: list[Delta], ctx: ParamContext, p: IsoCParams) -> Delta:
    """Iso-C: the spectrum of sum_t Delta_t flattened to its mean; 1-D parameters: mean of Delta_t."""
    if ctx.info.is_matrix and p.rank_aware and all_lowrank(deltas):
        return isotropic_flatten_lowrank(deltas, ctx.weights, p.rank_rtol)
    dense = densify(deltas)
    if not ctx.info.is_matrix:  # the mean of w_t Delta_t (the weights scale the task vectors, as in the sum)
        return weighted_sum(dense, [w / len(dense) for w in ctx.weights])
    return isotropic_flatten(weighted_sum(dense, ctx.weights), p.rank_aware, p.rank_rtol)


# -- Iso-CTS ----------------------------------------------------------------------------------


class IsoCtsParams(Params):
    common_space_fraction: float = Field(
        0.8, ge=0.0, le=1.0, description="f: share of the r directions taken from the common subspace"
    )
    rank_aware: bool = Field(
        True, description="drop null directions, polar factors on the numerical range (False: literal)"
    )
    rank_rtol: float | None = Field(None, gt=0, description="null tolerance (relative); default sqrt(eps)")


def iso_cts_split(r: int, T: int, f: float) -> tuple[int, int]:
    """(k_c, s): common directions and task-specific directions per task, k_c + T s = r.

    ``k_c = r - round((r - floor(r f)) / T) * T`` (Python's round, half to even, as the reference
    code); when that is negative (f small, T large) ``s = floor(r / T)`` and ``k_c = r - T s``.
    """
    k_c = r - round((r - int(r * f)) / T) * T
    if k_c < 0:
        k_c = r - (r // T) * T
    return k_c, (r - k_c) // T


def iso_cts_merge(deltas: list[Tensor], f: float, rank_aware: bool = True, rank_rtol: float | None = None) -> Tensor:
    """Iso-CTS for ``T`` matrices of shape ``(m, n)`` (see :func:`iso_cts`)."""
    m, n = deltas[0].shape
    r, T = min(m, n), len(deltas)
    k_c, s_per = iso_cts_split(r, T, f)
    u, s, vh = thin_svd(weighted_sum(deltas, [1.0] * T))
    # One null tolerance for the common part, the task-specific remainders and the polar factors:
    # after PACT and the common projection, what is left of a task vector can be pure round-off,
    # and Iso-CTS would give it the full sigma_bar.
    rtol = rank_rtol if rank_rtol is not None else null_rtol(deltas[0].dtype)
    keep_c = min(k_c, numerical_rank(s, (m, n), rtol)) if rank_aware else k_c
    u_c = u[:, :keep_c]  # well-posed: arbitrary null-direction vectors are not projected out either
    us, vs, sigma_sum = [u_c], [vh[:keep_c].mT], s[:k_c].sum()
    # Null test of the task-specific remainders against the largest task norm: d_bar's round-off is
    # relative to ||Delta_t||, and a task PACT has (almost) annihilated is round-off even relative
    # to its own filtered norm.
    scale = max(float(torch.linalg.matrix_norm(d)) for d in deltas)
    for d in deltas:
        if s_per == 0:
            break
        d_bar = d - u_c @ (u_c.mT @ d)  # the common left subspace projected out
        ut, st, vht = thin_svd(d_bar)
        sigma_sum = sigma_sum + st[:s_per].sum()
        keep = int((st[:s_per] > rtol * scale).sum()) if rank_aware else s_per
        us.append(ut[:, :keep])
        vs.append(vht[:keep].mT)
    sigma_bar = sigma_sum / r
    u_cat, v_cat = torch.cat(us, 1), torch.cat(vs, 1)
    if u_cat.shape[1] == 0:
        return torch.zeros_like(deltas[0])
    u_perp = polar_factor(u_cat, rank_rtol, literal=not rank_aware)
    v_perp = polar_factor(v_cat, rank_rtol, literal=not rank_aware)
    return sigma_bar * (u_perp @ v_perp.mT)


def iso_cts_merge_lowrank(deltas: list[LowRankDelta], f: float, rank_rtol: float | None = None) -> LowRankDelta:
    """The well-posed :func:`iso_cts_merge` from the factors: the sum's SVD from the stacked
    factors, each (I - U_c U_c^T) B_t A_t from its own factors; returns a low-rank update."""
    m, n = deltas[0].shape
    r, T = min(m, n), len(deltas)
    k_c, s_per = iso_cts_split(r, T, f)
    u, s, vh = stacked_svd(deltas)
    rtol = rank_rtol if rank_rtol is not None else null_rtol(deltas[0].dtype)  # as in iso_cts_merge
    keep_c = min(k_c, numerical_rank(s, (m, n), rtol))
    u_c = u[:, :keep_c]
    us, vs, sigma_sum = [u_c], [vh[:keep_c].mT], s[:k_c].sum()
    scale = max(float(factor_svd(d)[1].norm()) for d in deltas)  # max_t ||B_t A_t||_F, as in iso_cts_merge
    for d in deltas:
        if s_per == 0:
            break
        ut, st, vht = factor_svd(LowRankDelta(d.B - u_c @ (u_c.mT @ d.B), d.A))
        sigma_sum = sigma_sum + st[:s_per].sum()
        keep = int((st[:s_per] > rtol * scale).sum())
        us.append(ut[:, :keep])
        vs.append(vht[:keep].mT)
    u_cat, v_cat = torch.cat(us, 1), torch.cat(vs, 1)
    if u_cat.shape[1] == 0:
        return LowRankDelta(u_cat, v_cat.mT)
    u_perp = polar_factor(u_cat, rank_rtol)
    v_perp = polar_factor(v_cat, rank_rtol)
    return LowRankDelta((sigma_sum / r) * u_perp, v_perp.mT)


@register_method(
    "iso_cts",
    params=IsoCtsParams,
    lowrank=True,
    uses_weight=True,
    paper="No task left behind: isotropic model merging with common and task-specific subspaces (arXiv:2502.04959)",
)
def iso_cts(base: Tensor, deltas: list[Delta], ctx: ParamContext, p: IsoCtsParams) -> Delta:
    """Iso-CTS: common + task-specific singular directions, polar-whitened, one flat spectrum; 1-D: mean.

    For a 2-D parameter (``m x n``, r = min(m, n)) with task vectors ``Delta_t`` (scaled by the
    models' weights, default 1), f = ``common_space_fraction`` (default 0.8, the paper's)::

        k_c = r - round((r - floor(r f)) / T) * T,   s = (r - k_c) / T          (iso_cts_split)
        sum_t Delta_t = U S V^T;   U_c, S_c, V_c = U[:, :k_c], S[:k_c], V[:, :k_c]     (common)
        Delta-bar_t = (I - U_c U_c^T) Delta_t = U_t S_t V_t^T;  keep U_t[:, :s], S_t[:s], V_t[:, :s]
        U* = [U_c | U_1[:, :s] | ... | U_T[:, :s]],  V* likewise     (m x r, n x r)
        sigma_bar = (sum(S_c) + sum_t sum(S_t[:s])) / r
        merged = sigma_bar * polar(U*) polar(V*)^T

    sigma_bar is the mean of the r singular values that were kept (common and task-specific), as
    the survey's formula ("Model Merging Overview", "Isotropic Model Merging") and the reference code
    have it -- not the mean of the spectrum of sum_t Delta_t alone (that is Iso-C's). 1-D
    parameters: mean of the task vectors.

    Well-posed form (default ``rank_aware: true``): common directions with a numerically zero
    singular value (below ``rank_rtol * S[0]``) and task-specific ones below ``rank_rtol *
    max_t ||Delta_t||_F`` are left out of U*, V*, and the polar factors are restricted to the numerical
    range (``polar_factor(literal=False)``); sigma_bar is unchanged. ``rank_rtol`` defaults to
    :func:`~pactmerge.linalg.null_rtol` (``sqrt(eps)``) in all three tests (see the module doc).
    Identical to the literal form unless U* or V* is rank-deficient -- as after PACT with T >= 4,
    where the literal polar factor fills the missing directions with arbitrary ones inside the
    protected core.
    """
    scaled = [scale_delta(d, w) for d, w in zip(deltas, ctx.weights)]
    if ctx.info.is_matrix and p.rank_aware and all_lowrank(scaled):
        return iso_cts_merge_lowrank(scaled, p.common_space_fraction, p.rank_rtol)
    dense = densify(scaled)
    if not ctx.info.is_matrix:
        return mean_of(dense)
    return iso_cts_merge(dense, p.common_space_fraction, p.rank_aware, p.rank_rtol)
