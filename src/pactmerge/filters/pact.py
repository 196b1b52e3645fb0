"""PACT: Preserving Anchored Cores in Task-vectors (arXiv:2606.18627, Eqs. 4, 5, 8, 9; Algorithm 1).

For one 2-D parameter with pretrained weight theta_0 (m x n) and task vectors Delta_t:

    V_{0,K}      top-K right singular vectors of theta_0                      (Eq. 4)
    V_{t,k}      top-k right singular vectors of Delta_t                      (Eq. 4)
    V_{t,LBW}    orth((I - V_{t,k} V_{t,k}^T) V_{0,K})                         (Eq. 5)
    P_t          orth([V_{j,LBW} for every j != t])                            (Eq. 8)
    Delta~_t     Delta_t - Delta_t P_t P_t^T                                   (Eq. 9)

1-D parameters bypass the filter (Appendix E.2); so do layers beyond ``depth`` (Appendix D.2).
``orth`` is rank-revealing (:func:`pactmerge.linalg.orth`): the LBW subspaces of different tasks
overlap almost entirely, and the dependent columns of their concatenation must not be turned
into invented directions.

LoRA adapters (:class:`~pactmerge.lowrank.LowRankDelta`, ``Delta_t = B_t A_t``; PACT paper
Section 5.2): V_{t,k} comes from the factors, never from an ``m x n`` SVD -- by default the exact
top-k of ``B_t A_t`` (QR of B_t, SVD of the small R_t A_t), or with ``lora_subspace: a_rows`` the
paper's shortcut, the top-k right singular vectors of A_t alone (same row space, A_t's own
ordering within it). Filtering touches only A_t: Delta~_t = B_t (A_t (I - P_t P_t^T)), still rank r.
For k > r an adapter's active subspace is its r-dimensional row space (a dense SVD would pad it
with arbitrary null-space directions). Dense and low-rank task vectors may be mixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.linalg import orth, top_right_singular_vectors
from pactmerge.linalg.spectral import batches_on, stacked_top_right
from pactmerge.lowrank import Delta, LowRankDelta, top_right_lowrank
from pactmerge.registry import ParamContext, ParamInfo, Params, register_filter


class PactParams(Params):
    K: int = Field(15, ge=0, description="rank of the pretrained core V_{0,K}")
    k: int = Field(8, ge=0, description="rank of each task's active subspace V_{t,k}")
    svd: Literal["exact", "randomized"] = "exact"
    oversample: int = Field(10, ge=0, description="randomized SVD: extra sketch columns")
    power_iters: int = Field(2, ge=0, description="randomized SVD: power iterations")
    depth: float = Field(1.0, ge=0.0, le=1.0, description="fraction of layers, from the input side, that are filtered")
    orth_rtol: float | None = Field(
        None,
        gt=0,
        description="rank tolerance of orth(), relative to the largest singular value; default max(n, c)*eps",
    )
    lora_subspace: Literal["exact", "a_rows"] = Field(
        "exact",
        description="LoRA adapters: V_{t,k} = exact top-k of B_t A_t from the factors, or of A_t alone (paper 5.2)",
    )
    K_ratio: float | None = Field(
        None,
        gt=0,
        le=1,
        description="if set, K = max(1, round(K_ratio * min(m, n))) for each parameter instead of a fixed K",
    )
    k_ratio: float | None = Field(
        None,
        gt=0,
        le=1,
        description="if set, k = max(1, round(k_ratio * min(m, n))) for each parameter instead of a fixed k",
    )

    def ranks(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
        """(K, k) for a parameter of this (m, n) shape. A fixed K suits layers of similar width (the
        paper's transformers); with ratios, a narrow layer (a CNN's 16-wide 1x1 convolution) gets
        a core of the same relative size as a wide one, not most of its input space."""
        r = min(int(shape[-2]), int(shape[-1]))

        def pick(fixed: int, ratio: float | None) -> int:
            return fixed if ratio is None else max(1, round(ratio * r))

        return pick(self.K, self.K_ratio), pick(self.k, self.k_ratio)


@dataclass
class PactSubspaces:
    """The subspaces PACT computes for one parameter (also used by the diagnostics)."""

    core: Tensor  # V_{0,K}: (n, K)
    active: list[Tensor]  # V_{t,k}: (n, k) each
    lbw: list[Tensor]  # V_{t,LBW}: (n, d_t) each, d_t <= K
    protect: list[Tensor]  # P_t: (n, p_t) each


def _top(a: Tensor | LowRankDelta, r: int, p: PactParams, ctx: ParamContext | None, salt: int) -> Tensor:
    if isinstance(a, LowRankDelta):  # from the factors (exact and cheaper than a randomized sketch)
        return top_right_lowrank(a, r, p.lora_subspace)
    gen = ctx.generator(salt) if (ctx is not None and p.svd == "randomized") else None
    return top_right_singular_vectors(
        a, r, method=p.svd, oversample=p.oversample, power_iters=p.power_iters, generator=gen
    )


# -- speed (pactmerge.linalg.spectral / .cache): same results, computed faster ------------------


def _core(base: Tensor, K: int, p: PactParams, ctx: ParamContext | None) -> Tensor:
    """V_{0,K}, from the merge's on-disk cache when it has one (a base is merged many times)."""
    cache = getattr(ctx, "cache", None)

    def compute() -> Tensor:  # contiguous, like a cached value: the same bytes downstream either way
        return _top(base, K, p, ctx, salt=0).contiguous()

    if cache is None or K == 0:
        return compute()
    options: dict = {"what": "pact.core", "K": K, "svd": p.svd}
    if p.svd == "randomized":
        options.update(oversample=p.oversample, power_iters=p.power_iters, seed=ctx.seed if ctx else None)
    return cache.get_or_compute(base, compute, **options)


def _active(deltas: list[Delta], k: int, p: PactParams, ctx: ParamContext | None) -> list[Tensor]:
    """V_{t,k} of every task; dense task vectors on a batching device (a GPU) as one stacked call."""
    if all(isinstance(d, Tensor) for d in deltas) and batches_on(deltas[0].device):
        gens = [
            ctx.generator(t + 1) if (ctx is not None and p.svd == "randomized") else None for t in range(len(deltas))
        ]
        dense = [d for d in deltas if isinstance(d, Tensor)]
        return stacked_top_right(
            dense, k, method=p.svd, oversample=p.oversample, power_iters=p.power_iters, generators=gens
        )
    return [_top(d, k, p, ctx, salt=t + 1) for t, d in enumerate(deltas)]


def pact_subspaces(base: Tensor, deltas: list[Delta], p: PactParams, ctx: ParamContext | None = None) -> PactSubspaces:
    """Compute V_{0,K}, V_{t,k}, V_{t,LBW} and the protection bases P_t of every task.

    Args:
        base: ``(m, n)`` pretrained weight.
        deltas: ``T`` task vectors of shape ``(m, n)``, in the compute dtype: dense tensors or
            :class:`LowRankDelta` (see the module doc).
    """
    K, k = p.ranks(base.shape)
    core = _core(base, K, p, ctx)
    active = _active(deltas, k, p, ctx)
    lbw = [orth(core - v @ (v.mT @ core), rtol=p.orth_rtol) for v in active]
    protect = []
    for t in range(len(deltas)):
        others = [lbw[j] for j in range(len(deltas)) if j != t]
        stacked = torch.cat(others, dim=1) if others else base.new_zeros((base.shape[1], 0))
        protect.append(orth(stacked, rtol=p.orth_rtol))
    return PactSubspaces(core, active, lbw, protect)


def _check(p: PactParams, info: ParamInfo) -> None:
    if not info.is_matrix or not info.in_depth(p.depth):
        return
    r = min(info.shape)
    for key, value in zip(("K", "k"), p.ranks(info.shape)):
        if value > r:
            raise PactMergeError(
                f"parameter {info.name!r} {tuple(info.shape)}: pact.{key}={value} exceeds min(m, n)={r}"
                f" (lower pact.{key}, give pact.{key}_ratio, or exclude the parameter)"
            )


def _project_out(d: Tensor | LowRankDelta, P: Tensor) -> Tensor | LowRankDelta:
    """Delta (I - P P^T); for factors only the row factor changes, so the rank stays r."""
    if isinstance(d, LowRankDelta):
        return LowRankDelta(d.B, d.A - (d.A @ P) @ P.mT)
    return torch.addmm(d, d @ P, P.mT, alpha=-1.0)  # d - (d P) P^T in one product, no m x n temporary


@register_filter("pact", params=PactParams, check=_check, lowrank=True)
def pact(base: Tensor, deltas: list[Delta], ctx: ParamContext, p: PactParams) -> list[Delta]:
    """Strip each task vector of its projection onto the other tasks' load-bearing-wall subspaces."""
    if not ctx.info.is_matrix or not ctx.info.in_depth(p.depth) or len(deltas) < 2 or p.ranks(base.shape)[0] == 0:
        return deltas
    sub = pact_subspaces(base, deltas, p, ctx)
    return [_project_out(d, P) for d, P in zip(deltas, sub.protect)]
