"""PAVE: purifying task vectors in a knowledge-aware subspace ("Purifying Task Vectors in
Knowledge-Aware Subspace for Model Merging", Eqs. 5-9, Algorithm 1).

For a linear weight (``y = W x``) with pretrained ``W_B`` (m x n), fine-tuned ``W_t = W_B + Delta_t``
and ``C_t = sum x x^T``, the input covariance of fine-tuned model t on N examples of its own task
(:mod:`pactmerge.stats`)::

    C'_t        = C_t + damping * mean(diag C_t) * I                      (damping, see below)
    W_t C'_t    = U_t S_t V_t^T                                           (context-oriented SVD, CO-SVD)
    W_t^dagger  = SVD_r(W_t C'_t) C'_t^-1 = U_{t,r} U_{t,r}^T W_t         (Eq. 5)
    Delta_t    <- W_t^dagger - W_B                                        (Eq. 6)

The second form of Eq. 5 is exact whenever C'_t is invertible (``SVD_r(W C') = U_r U_r^T W C'``),
so no inverse is ever formed: W_t is projected onto the top-r left singular vectors of W_t C'_t.
Note that the purified task vector also drops the part of W_B outside that subspace
(``Delta_PAVE = Delta_t - (I - U_r U_r^T) W_t``), as the paper defines it.

**Spectral rank allocation** (Algorithm 1, Eqs. 7-9), per layer: with R = min(m, n), the
normalised singular values ``s_{t,j} = sigma_{t,j} / sigma_{t,1}`` of every model, and all
``r_t = R``: while ``sum_t r_t / (T R) > rho``, drop the smallest ``s_{t, r_t}`` among the models
still in play (``r_t -= 1``; ties: the lower model index); a model whose rank reaches
``r_t <= gamma R`` leaves play (the per-model floor). This greedy minimises Eq. 9 -- the summed
normalised activated pruning error ``sum_t sum_{j > r_t} s_{t,j}^2`` -- under the floor. If every
model reaches its floor first, the layer keeps more than the fraction rho. Default
``gamma = rho - (1 - rho) / 2`` (the paper's App. A.1).

**Damping.** ``C = X X^T`` is singular when a layer saw fewer distinct rows than its width (or
the inputs are degenerate); the paper adds to the diagonal "until it is invertible", following
CorDA (Yang et al. 2024), whose code adds ``0.01 * mean(diag C)`` and doubles the factor until its
float32 inverse is accurate. PAVE here needs no inverse, so the relative ``damping`` (default 0.01,
CorDA's starting value) is used as given. ``damping: 0`` uses C as measured and refuses a
singular one (smallest eigenvalue <= n * eps * largest) with an error naming the parameter.

**Variant** (not the paper's): ``project: task_vector`` projects only the task vector,
``Delta_t <- U_r U_r^T Delta_t``, leaving W_B whole. With the paper's form, ``Delta_PAVE - Delta_t =
-(I - U_r U_r^T) W_t`` is mostly *base* weight when fine-tuning moved the weights little (measured on
the MiniLM benchmark fine-tunes: 2-5 times the norm of Delta_t at rho = 15/16 .. 7/8), so every
purified task vector carries a copy of "remove W_B's weakly activated output directions".

Only parameters with covariance statistics are purified (the linear weights of the calibration
model); biases, norms, embeddings and layers the calibration model does not have pass through.
A model whose layer saw no calibration input keeps its task vector and takes no part in that
layer's allocation. ``full_rank`` lists models kept at full rank after the allocation (the
paper's App. A.1 assigns full rank to the tasks most hurt by pruning, one at a time, and keeps the
best merge on validation).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.registry import ParamContext, Params, register_filter


class PaveParams(Params):
    rho: float = Field(15 / 16, gt=0.0, le=1.0, description="preserved rank ratio: per layer, sum_t r_t / (T R) <= rho")
    gamma: float | None = Field(
        None, ge=0.0, le=1.0, description="stopping ratio: a model's rank stops falling at <= gamma R; rho - (1-rho)/2"
    )
    damping: float = Field(0.01, ge=0.0, description="C' = C + damping * mean(diag C) * I; 0: C must be invertible")
    full_rank: list[int] = Field(default_factory=list, description="model indices kept at full rank (App. A.1)")
    project: Literal["fine_tuned", "task_vector"] = Field(
        "fine_tuned", description="project W_t (the paper, Eq. 6) or only Delta_t onto U_r (a variant)"
    )

    @model_validator(mode="after")
    def _indices(self):
        if any(i < 0 for i in self.full_rank):
            raise ValueError("full_rank: model indices are >= 0")
        return self

    @property
    def floor(self) -> float:
        """gamma, or the paper's default ``rho - (1 - rho) / 2`` (at least 0)."""
        return self.gamma if self.gamma is not None else max(0.0, self.rho - (1.0 - self.rho) / 2.0)


def allocate_ranks(singular_values: Sequence[Tensor], rho: float, gamma: float) -> list[int]:
    """Spectral rank allocation of one layer (Algorithm 1, lines 3-13).

    Args:
        singular_values: T tensors of R singular values each, in descending order.
        rho: preserved rank ratio; gamma: stopping ratio (see the module doc).

    Returns:
        The ranks ``r_t`` (``0 <= r_t <= R``).
    """
    T = len(singular_values)
    if T == 0:
        return []
    R = int(singular_values[0].numel())
    norm = []
    for s in singular_values:
        vals = s.detach().double().cpu()
        top = float(vals[0]) if R else 0.0
        norm.append((vals / top).tolist() if top > 0 else [0.0] * R)
    ranks = [R] * T
    total, budget, floor = T * R, rho * T * R + 1e-9, gamma * R + 1e-9
    # Each model in play offers its last kept value s_{t, r_t}; pop the smallest.
    heap = [(norm[t][R - 1], t) for t in range(T) if R > 0]
    heapq.heapify(heap)
    while total > budget and heap:
        _, t = heapq.heappop(heap)
        ranks[t] -= 1
        total -= 1
        if ranks[t] > floor and ranks[t] > 0:
            heapq.heappush(heap, (norm[t][ranks[t] - 1], t))
    return ranks


def damped(C: Tensor, damping: float, name: str, t: int) -> Tensor:
    """``C + damping * mean(diag C) * I``; with damping 0, C itself after checking it is invertible."""
    n = C.shape[0]
    if damping > 0:
        return C + (damping * C.diagonal().mean()) * torch.eye(n, dtype=C.dtype, device=C.device)
    eig = torch.linalg.eigvalsh(C)
    if not bool(eig[-1] > 0) or bool(eig[0] <= n * torch.finfo(C.dtype).eps * eig[-1]):
        rank = int((eig > n * torch.finfo(C.dtype).eps * eig[-1].clamp_min(0)).sum())
        raise PactMergeError(
            f"pave: parameter {name!r}: the input covariance of model {t} is singular (rank {rank} < {n}) and"
            " pave.damping is 0 (set pave.damping > 0, e.g. 0.01, or use more calibration examples)"
        )
    return C


def co_svd(W: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors ``(m, R)`` and singular values ``(R,)`` of ``W C`` (descending)."""
    U, S, _ = torch.linalg.svd(W @ C, full_matrices=False)
    return U, S


@register_filter(
    "pave",
    params=PaveParams,
    needs=("covariance",),
    paper="Purifying task vectors in knowledge-aware subspace for model merging (PAVE)",
)
def pave(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: PaveParams) -> list[Tensor]:
    """PAVE: each fine-tuned weight projected onto the top-r_t left singular vectors of W_t C_t (ranks
    by spectral allocation), minus the base."""
    stats = ctx.calibration
    covs = stats.covariance() if stats is not None and ctx.info.is_matrix else None
    if covs is None:
        return deltas
    T = len(deltas)
    if any(i >= T for i in p.full_rank):
        raise PactMergeError(f"config key 'pave.full_rank': {p.full_rank} names a model >= the {T} models")
    W_B = base.mT if stats.transposed else base
    m, n = W_B.shape
    counts = stats.counts("covariance")
    active = [t for t in range(T) if counts[t] > 0]
    fine = {t: W_B + (deltas[t].mT if stats.transposed else deltas[t]) for t in active}
    decomposed = {}
    for t in active:
        if tuple(covs[t].shape) != (n, n):
            raise PactMergeError(
                f"pave: parameter {ctx.name!r}: covariance of model {t} is {tuple(covs[t].shape)}, the weight's"
                f" input size is {n}"
            )
        decomposed[t] = co_svd(fine[t], damped(covs[t], p.damping, ctx.name, t))
    ranks = allocate_ranks([decomposed[t][1] for t in active], p.rho, p.floor)
    R = min(m, n)
    out = list(deltas)
    for t, r in zip(active, ranks):
        if r >= R or t in p.full_rank:
            continue  # full rank: W_t^dagger = W_t exactly
        U_r = decomposed[t][0][:, :r]
        if p.project == "task_vector":
            d = fine[t] - W_B
            purified = U_r @ (U_r.mT @ d)
        else:
            purified = U_r @ (U_r.mT @ fine[t]) - W_B
        out[t] = purified.mT if stats.transposed else purified
    return out
