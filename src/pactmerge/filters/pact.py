"""PACT: Preserving Anchored Cores in Task-vectors (arXiv:2606.18627, Eqs. 4, 5, 8, 9; Algorithm 1).

For one 2-D parameter with pretrained weight theta_0 (m x n) and task vectors Delta_t:

    V_{0,K}      top-K right singular vectors of theta_0                      (Eq. 4)
    V_{t,k}      top-k right singular vectors of Delta_t                      (Eq. 4)
    V_{t,LBW}    orth((I - V_{t,k} V_{t,k}^T) V_{0,K})                         (Eq. 5)
    P_t          orth([V_{j,LBW} for every j != t])                            (Eq. 8)
    Delta~_t     Delta_t - Delta_t P_t P_t^T                                   (Eq. 9)

1-D parameters bypass the filter (Appendix E.2); so do layers beyond ``depth`` (Appendix D.2).

``orth`` (``orth: svd``, the default) is rank-revealing (:func:`pactmerge.linalg.orth`): the LBW
subspaces of different tasks overlap almost entirely, and the dependent columns of their
concatenation must not be turned into invented directions. ``orth: qr`` is the paper as written
(":func:`pactmerge.linalg.orth_qr`", the Q of a plain QR, in Eqs. 5 and 8): P_t then has one column
per column of the concatenation, (T - 1) K of them, the dependent ones spanning round-off. Measured
on the benchmark's 384-wide layers with T = 8, K, k = 15, 8: 71 protected directions (rank-revealing;
the generic dimension K + (T - 1) k) vs 105 (QR) (``benchmarks/pact_numerics.py``).

Rank-revealing V_{0,K} and V_{t,k}: the top directions are taken from the *resolved* row space
only. Singular values at or below ``null_ulps`` times the spectral norm of one-ulp errors of
theta_0 (:func:`pactmerge.linalg.storage_noise_level`, eps of the coarsest of the base's storage
dtype, the model's storage dtype and the compute dtype) count as zero, so V_{t,k} has fewer than k
columns when Delta_t has lower rank: a zero task vector (a frozen layer) has no active subspace,
and its LBW is the whole core. Without this, LAPACK's arbitrary null-space vectors -- or the few
ulps a frozen layer picks up in a dtype round trip -- would decide the other tasks' protection.
Such a task vector (no singular value above the level) is itself round-off, and the filter returns
it as exact zeros.
Measured: one rounding of theta_0 through bfloat16/float16 has 0.15-0.21 of that level, so a frozen
layer stored in a coarser dtype than the base is recognised as unchanged; a genuine update of the
benchmark's fine-tunes has its 15th singular value over 1e4 times above it (float32 storage).

A filtered task vector that is only the projection's round-off -- P_t spans the whole row space,
or at most ``sqrt(eps)`` of ``||Delta_t||_F`` is left because Delta_t's row space lies inside
span(P_t) -- is returned as exact zeros, so that the merging methods' relative null tests see it
as zero (otherwise TSV-M's polar factors rotate other tasks' directions into its arbitrary ones).

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
from pydantic import Field, model_validator
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.filters.pact_scope import pact_bypass, pact_narrow_reason
from pactmerge.linalg import null_rtol, orth, orth_qr, storage_noise_level, top_right_singular_vectors
from pactmerge.linalg.spectral import batches_on, stacked_top_right
from pactmerge.lowrank import Delta, LowRankDelta, top_right_lowrank
from pactmerge.registry import ParamContext, ParamInfo, Params, register_filter


class PactParams(Params):
    K: int = Field(15, ge=0, description="rank of the pretrained core V_{0,K}")
    k: int = Field(8, ge=0, description="rank of each task's active subspace V_{t,k}")
    svd: Literal["exact", "randomized"] = "exact"
    oversample: int = Field(10, ge=0, description="randomized SVD: extra sketch columns")
    power_iters: int = Field(2, ge=0, le=100, description="randomized SVD: power iterations (a few suffice)")
    depth: float = Field(1.0, ge=0.0, le=1.0, description="fraction of layers, from the input side, that are filtered")
    orth: Literal["svd", "qr"] = Field(
        "svd", description="orth() of Eqs. 5 and 8: rank-revealing SVD, or the paper's plain QR (every column kept)"
    )
    orth_rtol: float | None = Field(
        None,
        gt=0,
        description="rank tolerance of orth: svd, relative to the largest singular value; default max(n, c)*eps",
    )
    null_ulps: float = Field(
        1.0,
        ge=0,
        description="singular values of theta_0 and Delta_t up to null_ulps x the spectral norm of one-ulp errors"
        " of theta_0 count as zero (0: only exact zeros)",
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
    narrow: Literal["bypass", "error"] = Field(
        "bypass",
        description="a matrix PACT cannot filter (min(m, n) <= K or < k; filters/pact_scope.py): leave it unfiltered"
        " (bypass) or refuse the merge (error)",
    )

    @model_validator(mode="after")
    def _orth_rtol_needs_svd(self):
        if self.orth == "qr" and self.orth_rtol is not None:
            raise ValueError("orth_rtol applies to orth: svd only (orth: qr keeps every column)")
        return self

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

    core: Tensor  # V_{0,K}: (n, K') , K' <= K (fewer when theta_0's resolved rank is lower)
    active: list[Tensor]  # V_{t,k}: (n, k_t) each, k_t <= k (0 for a zero task vector)
    lbw: list[Tensor]  # V_{t,LBW}: (n, d_t) each, d_t <= K'
    protect: list[Tensor]  # P_t: (n, p_t) each
    zero: list[bool]  # Delta_t has no singular value above the round-off level (a frozen layer)


def storage_eps(info: ParamInfo | None, compute: torch.dtype, task: int | None = None) -> float:
    """Machine epsilon of the coarsest dtype the values of one parameter went through: the compute
    dtype, the base's storage dtype and (for ``task`` t) model t's storage dtype."""
    dtypes = [compute]
    if info is not None:
        dtypes.append(info.dtype)
        if task is not None and task < len(info.model_dtypes):
            dtypes.append(info.model_dtypes[task])
    return max(torch.finfo(d).eps for d in dtypes)


def _top(a: Tensor | LowRankDelta, r: int, atol: float, p: PactParams, ctx: ParamContext | None, salt: int) -> Tensor:
    if isinstance(a, LowRankDelta):  # from the factors (exact and cheaper than a randomized sketch)
        return top_right_lowrank(a, r, p.lora_subspace, atol=atol)
    gen = ctx.generator(salt) if (ctx is not None and p.svd == "randomized") else None
    return top_right_singular_vectors(
        a, r, method=p.svd, oversample=p.oversample, power_iters=p.power_iters, generator=gen, atol=atol
    )


# -- speed (pactmerge.linalg.spectral / .cache): same results, computed faster ------------------


def _core(base: Tensor, K: int, atol: float, p: PactParams, ctx: ParamContext | None) -> Tensor:
    """V_{0,K}, from the merge's on-disk cache when it has one (a base is merged many times)."""
    cache = getattr(ctx, "cache", None)

    def compute() -> Tensor:  # contiguous, like a cached value: the same bytes downstream either way
        return _top(base, K, atol, p, ctx, salt=0).contiguous()

    if cache is None or K == 0:
        return compute()
    # atol (the storage round-off level, from null_ulps and the dtypes) decides how many columns come back.
    options: dict = {"what": "pact.core", "K": K, "svd": p.svd, "atol": repr(float(atol))}
    if p.svd == "randomized":
        options.update(oversample=p.oversample, power_iters=p.power_iters, seed=ctx.seed if ctx else None)
    return cache.get_or_compute(base, compute, **options)


def _active(deltas: list[Delta], k: int, atols: list[float], p: PactParams, ctx: ParamContext | None) -> list[Tensor]:
    """V_{t,k} of every task; dense task vectors on a batching device (a GPU) as one stacked call."""
    if all(isinstance(d, Tensor) for d in deltas) and batches_on(deltas[0].device):
        gens = [
            ctx.generator(t + 1) if (ctx is not None and p.svd == "randomized") else None for t in range(len(deltas))
        ]
        dense = [d for d in deltas if isinstance(d, Tensor)]
        return stacked_top_right(
            dense, k, method=p.svd, oversample=p.oversample, power_iters=p.power_iters, generators=gens, atols=atols
        )
    return [_top(d, k, a, p, ctx, salt=t + 1) for t, (d, a) in enumerate(zip(deltas, atols))]


def pact_subspaces(base: Tensor, deltas: list[Delta], p: PactParams, ctx: ParamContext | None = None) -> PactSubspaces:
    """Compute V_{0,K}, V_{t,k}, V_{t,LBW} and the protection bases P_t of every task.

    Args:
        base: ``(m, n)`` pretrained weight.
        deltas: ``T`` task vectors of shape ``(m, n)``, in the compute dtype: dense tensors or
            :class:`LowRankDelta` (see the module doc).
        ctx: the parameter's context: storage dtypes (for the rank-revealing tolerance; without
            it the compute dtype is taken as the storage dtype) and the randomized SVD's seeds.
    """
    K, k = p.ranks(base.shape)
    info = ctx.info if ctx is not None else None

    level = storage_noise_level(base, 1.0)  # per unit eps

    def atol(task: int | None) -> float:
        return p.null_ulps * storage_eps(info, base.dtype, task) * level

    core = _core(base, K, atol(None), p, ctx)
    # At least one direction, so that a zero task vector is recognised even when k = 0.
    tops = _active(deltas, max(k, 1), [atol(t) for t in range(len(deltas))], p, ctx)
    active = [v[:, :k] for v in tops]
    # Eqs. 5 and 8 on n x (T-1)K matrices, cheap next to the SVDs above: in float64, so that a
    # nearly dependent wall direction (singular value g in the stacked bases) costs eps64 / g, not
    # eps32 / g, of protection -- in float32 that reached 2e-4 relative on the 40 x 24 layer of issue 14.
    work = base.dtype if base.device.type == "mps" else torch.float64  # MPS has no float64
    basis = orth_qr if p.orth == "qr" else (lambda a: orth(a, rtol=p.orth_rtol))
    core_w = core.to(work)
    lbw_w = [basis(core_w - v @ (v.mT @ core_w)) for v in (a.to(work) for a in active)]
    protect = []
    for t in range(len(deltas)):
        others = [lbw_w[j] for j in range(len(deltas)) if j != t]
        stacked = torch.cat(others, dim=1) if others else core_w.new_zeros((base.shape[1], 0))
        protect.append(basis(stacked).to(base.dtype))
    lbw = [b.to(base.dtype) for b in lbw_w]
    return PactSubspaces(core, active, lbw, protect, [v.shape[1] == 0 for v in tops])


def _check(p: PactParams, info: ParamInfo) -> None:
    if not info.is_matrix or not info.in_depth(p.depth) or p.narrow == "bypass":
        return
    reason = pact_narrow_reason(p, info.shape)
    if reason is not None:
        raise PactMergeError(
            f"parameter {info.name!r} {tuple(info.shape)}: PACT cannot filter it, {reason} (pact.narrow: error;"
            " lower pact.K / pact.k, give pact.K_ratio / pact.k_ratio, exclude the parameter,"
            " or set pact.narrow: bypass)"
        )


def _frobenius(d: Tensor | LowRankDelta) -> Tensor:
    if isinstance(d, LowRankDelta):  # ||B A||_F^2 = sum((B^T B A) * A), without forming B A
        return torch.sum(((d.B.mT @ d.B) @ d.A) * d.A).clamp_min(0).sqrt()
    return torch.linalg.matrix_norm(d)


def _zeros_like(d: Tensor | LowRankDelta) -> Tensor | LowRankDelta:
    return LowRankDelta(d.B, torch.zeros_like(d.A)) if isinstance(d, LowRankDelta) else torch.zeros_like(d)


def _project_out(d: Tensor | LowRankDelta, P: Tensor) -> Tensor | LowRankDelta:
    """Delta (I - P P^T); for factors only the row factor changes, so the rank stays r.

    What is left is returned as exact zeros when it is the projection's round-off: P spans the
    whole row space (n columns), or at most ``null_rtol`` (sqrt(eps)) of Delta's norm remains
    (Delta's row space lies inside span(P)). A relative null test downstream could not tell such a
    remainder from signal; exact zeros it can."""
    if P.shape[1] == P.shape[0]:
        return _zeros_like(d)
    if isinstance(d, LowRankDelta):
        out: Tensor | LowRankDelta = LowRankDelta(d.B, d.A - (d.A @ P) @ P.mT)
    else:
        out = torch.addmm(d, d @ P, P.mT, alpha=-1.0)  # d - (d P) P^T in one product, no m x n temporary
    if P.shape[1] > 0 and _frobenius(out) <= null_rtol(P.dtype) * _frobenius(d):
        return _zeros_like(d)
    return out


@register_filter(
    "pact",
    params=PactParams,
    check=_check,
    lowrank=True,
    bypass=pact_bypass,
    paper="PACT: Preserving anchored cores in task-vectors for model merging (arXiv:2606.18627)",
)
def pact(base: Tensor, deltas: list[Delta], ctx: ParamContext, p: PactParams) -> list[Delta]:
    """Strip each task vector of its projection onto the other tasks' load-bearing-wall subspaces."""
    if not ctx.info.is_matrix or not ctx.info.in_depth(p.depth) or len(deltas) < 2 or p.ranks(base.shape)[0] == 0:
        return deltas
    if pact_narrow_reason(p, base.shape) is not None:  # narrow: bypass (with narrow: error, _check refused it)
        return deltas
    sub = pact_subspaces(base, deltas, p, ctx)
    return [_zeros_like(d) if z else _project_out(d, P) for d, P, z in zip(deltas, sub.protect, sub.zero)]
