"""Filters that keep task updates out of the pretrained weight's dominant ("core") subspace.

``csp`` -- Core Subspace Preservation (Sun et al., "Revisiting the Role of Pretrained Weights in
Model Merging: On Near-Optimality within the Core Subspace", Eqs. 4-5, Algorithm 1).
For a 2-D parameter with pretrained weight ``theta_0 = U S V^T`` (``m x n``) and the *merged* task
vector ``tau`` (``m x n``)::

    U_r, V_r = U[:, :r], V[:, :r]
    csp(tau) = (I - U_r U_r^T) tau (I - V_r V_r^T)

so ``U_r^T csp(tau) = 0`` and ``csp(tau) V_r = 0``: the update has no component in the core block.
``r`` is a fixed ``rank`` (the paper's main setting) or, per layer, the smallest rank whose
singular values hold a fraction ``p`` of their sum (the paper's "Top-p", Appendix C.4); the paper
tunes both per setting, so one of them must be given. 1-D parameters are left alone (the paper's
projection is defined per weight matrix).

The paper projects the merged task vector, after the method. CSP is therefore registered as a
*post* filter (``stage="post"``): the engine applies it to the method's output. Because the
projection is linear, for linear methods (task_arithmetic, weight_average) this equals
projecting every task vector first; for nonlinear methods (TIES, TSV-M, Iso-C/CTS) it does not,
and the post stage gives the paper's result.

``s_pact`` -- static PACT (arXiv:2606.18627, Appendix D.1, Eq. 38), a per-task (pre) filter::

    Delta~_t = Delta_t (I - V_{0,K} V_{0,K}^T)       V_{0,K}: top-K right singular vectors of theta_0

1-D parameters bypass it, and so do layers beyond ``depth`` (as for PACT).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.linalg import thin_svd, top_right_singular_vectors
from pactmerge.registry import ParamContext, ParamInfo, Params, register_filter


class CspParams(Params):
    rank: int | None = Field(None, ge=0, description="fixed core rank r (give rank or p)")
    p: float | None = Field(None, gt=0.0, le=1.0, description="per layer: smallest r with sum(S[:r]) >= p * sum(S)")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.rank is None) == (self.p is None):
            raise ValueError("give exactly one of 'rank' (fixed r) or 'p' (top-p of the singular-value sum)")
        return self


def csp_rank(s: Tensor, p: CspParams) -> int:
    """The core rank r for singular values ``s`` (descending)."""
    if p.rank is not None:
        return min(p.rank, s.numel())
    total = s.sum()
    if total <= 0:
        return 0
    frac = torch.cumsum(s, 0) / total
    assert p.p is not None  # CspParams: exactly one of rank and p
    return min(int((frac < p.p).sum().item()) + 1, s.numel())


def project_out_core(tau: Tensor, u_r: Tensor, v_r: Tensor) -> Tensor:
    """(I - U_r U_r^T) tau (I - V_r V_r^T) for ``u_r`` (m, r), ``v_r`` (n, r) orthonormal."""
    left = tau - u_r @ (u_r.mT @ tau)
    return left - (left @ v_r) @ v_r.mT


def _check_csp(p: CspParams, info: ParamInfo) -> None:
    if info.is_matrix and p.rank is not None and p.rank > min(info.shape):
        raise PactMergeError(
            f"parameter {info.name!r} {tuple(info.shape)}: csp.rank={p.rank} exceeds min(m, n)={min(info.shape)}"
            " (lower csp.rank, use csp.p, or exclude the parameter)"
        )


@register_filter(
    "csp",
    params=CspParams,
    check=_check_csp,
    stage="post",
    paper="Revisiting the role of pretrained weights in model merging: on near-optimality within the core subspace",
)
def csp(base: Tensor, merged: list[Tensor], ctx: ParamContext, p: CspParams) -> list[Tensor]:
    """CSP (post-merge): project the merged update off the top-r singular block of theta_0."""
    if not ctx.info.is_matrix:
        return merged
    u, s, vh = thin_svd(base)
    r = csp_rank(s, p)
    if r == 0:
        return merged
    return [project_out_core(tau, u[:, :r], vh[:r].mT) for tau in merged]


class SPactParams(Params):
    K: int = Field(15, ge=0, description="rank of the pretrained core V_{0,K}")
    depth: float = Field(1.0, ge=0.0, le=1.0, description="fraction of layers, from the input side, that are filtered")
    svd: Literal["exact", "randomized"] = "exact"
    oversample: int = Field(10, ge=0, description="randomized SVD: extra sketch columns")
    power_iters: int = Field(2, ge=0, le=100, description="randomized SVD: power iterations (a few suffice)")


def _check_s_pact(p: SPactParams, info: ParamInfo) -> None:
    if info.is_matrix and info.in_depth(p.depth) and min(info.shape) < p.K:
        raise PactMergeError(
            f"parameter {info.name!r} {tuple(info.shape)}: s_pact.K={p.K} exceeds min(m, n)={min(info.shape)}"
            " (lower s_pact.K or exclude the parameter)"
        )


@register_filter(
    "s_pact",
    params=SPactParams,
    check=_check_s_pact,
    paper="PACT: Preserving anchored cores in task-vectors for model merging (arXiv:2606.18627)",
)
def s_pact(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: SPactParams) -> list[Tensor]:
    """Static PACT: Delta_t (I - V_{0,K} V_{0,K}^T), the pretrained core removed from every task vector."""
    if not ctx.info.is_matrix or not ctx.info.in_depth(p.depth) or p.K == 0:
        return deltas
    gen = ctx.generator(0) if p.svd == "randomized" else None
    v0 = top_right_singular_vectors(
        base, p.K, method=p.svd, oversample=p.oversample, power_iters=p.power_iters, generator=gen
    )
    return [d - (d @ v0) @ v0.mT for d in deltas]
