"""Low-rank task vectors: ``Delta = B A`` kept as its factors, and the exact factor-space SVDs.

A LoRA adapter's update of a weight ``W`` (``m x n``) is ``s * B A`` with ``B`` (``m x r``) and
``A`` (``r x n``), r << min(m, n). :class:`LowRankDelta` holds ``B`` (the scale ``s`` folded in)
and ``A`` (as the adapter stores it, so the rows of ``A`` still span the update's row space:
the paper's Section 5.2 shortcut takes its SVD directly). The engine hands these to filters and
methods registered with ``lowrank=True``; every other filter/method receives
:func:`densify`-ed tensors, one parameter at a time.

Everything spectral is computed on small matrices, never by an ``m x n`` SVD:

* one update, ``B A``: ``B = Q R`` (thin QR), ``R A = U_c S V^T`` (``r x n``), so
  ``B A = (Q U_c) S V^T`` is an exact thin SVD (:func:`factor_svd`);
* a weighted sum ``sum_t w_t B_t A_t = [w_1 B_1 ... w_T B_T] [A_1; ...; A_T]``: QR of the
  stacked ``B`` (``m x R``) and of the stacked ``A^T`` (``n x R``), SVD of the ``R x R`` core
  (:func:`stacked_svd`), R = sum_t r_t.

Cost: O((m + n) R^2 + R^3) instead of O(m n min(m, n)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias, TypeGuard

import torch
from torch import Tensor


@dataclass
class LowRankDelta:
    """The update ``B @ A``: ``B`` is ``(m, r)`` (any scale folded in), ``A`` is ``(r, n)``.

    ``r = 0`` is allowed (a weight an adapter does not target: a zero update).
    """

    B: Tensor
    A: Tensor

    def __post_init__(self):
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(f"LowRankDelta: B {tuple(self.B.shape)} and A {tuple(self.A.shape)} do not chain")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.B.shape[0], self.A.shape[1]))

    @property
    def rank(self) -> int:
        """The factor width r (an upper bound on the numerical rank)."""
        return self.A.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    def dense(self) -> Tensor:
        """The ``(m, n)`` matrix ``B A``."""
        return self.B @ self.A

    def scaled(self, w: float) -> LowRankDelta:
        return self if w == 1.0 else LowRankDelta(self.B * w, self.A)

    def to(self, device=None, dtype=None) -> LowRankDelta:
        return LowRankDelta(self.B.to(device=device, dtype=dtype), self.A.to(device=device, dtype=dtype))


Delta: TypeAlias = "Tensor | LowRankDelta"  # a task vector: dense, or a LoRA update as its factors


def is_lowrank(x) -> bool:
    return isinstance(x, LowRankDelta)


def all_lowrank(deltas: Sequence[Delta]) -> TypeGuard[list[LowRankDelta]]:
    return bool(deltas) and all(isinstance(d, LowRankDelta) for d in deltas)


def densify(deltas: Sequence[Delta]) -> list[Tensor]:
    """The same list with every :class:`LowRankDelta` replaced by its dense matrix."""
    return [d.dense() if isinstance(d, LowRankDelta) else d for d in deltas]


def tensors_of(x: Delta) -> list[Tensor]:
    """The tensors ``x`` is stored as (its factors, or itself): for finiteness checks."""
    return [x.B, x.A] if isinstance(x, LowRankDelta) else [x]


def add_to(base: Tensor, delta: Delta, alpha: float = 1.0) -> Tensor:
    """``base += alpha * delta`` in place; a low-rank delta is added without forming it first."""
    if isinstance(delta, LowRankDelta):
        return base.addmm_(delta.B, delta.A, alpha=alpha)
    return base.add_(delta, alpha=alpha)


def factor_svd(d: LowRankDelta) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD ``(U, S, Vh)`` of ``B A`` from the factors: shapes ``(m, q)``, ``(q,)``,
    ``(q, n)`` with q = min(r, m, n). Singular values beyond the numerical rank are ~0."""
    q, r = torch.linalg.qr(d.B)  # B = Q R, Q (m x min(m, r))
    uc, s, vh = torch.linalg.svd(r @ d.A, full_matrices=False)
    return q @ uc, s, vh


def stacked_svd(deltas: list[LowRankDelta], weights: list[float] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD of ``sum_t w_t B_t A_t`` via the stacked factors (see module doc).

    Returns ``(U, S, Vh)`` with at most R = sum_t r_t singular triplets (fewer when R > m or n).
    """
    weights = weights if weights is not None else [1.0] * len(deltas)
    b = torch.cat([d.B * w if w != 1.0 else d.B for d, w in zip(deltas, weights)], dim=1)
    a = torch.cat([d.A for d in deltas], dim=0)
    if b.shape[1] == 0:
        m, n = deltas[0].shape
        return b.new_zeros((m, 0)), b.new_zeros((0,)), b.new_zeros((0, n))
    qb, rb = torch.linalg.qr(b)  # (m, p), (p, R)
    qa, ra = torch.linalg.qr(a.mT)  # (n, p'), (p', R)
    uc, s, vh = torch.linalg.svd(rb @ ra.mT, full_matrices=False)
    return qb @ uc, s, vh @ qa.mT


def top_right_lowrank(d: LowRankDelta, k: int, mode: str = "exact", atol: float | None = None) -> Tensor:
    """Top-``k`` right singular vectors of ``B A`` as an ``(n, min(k, r))`` matrix.

    ``mode="exact"``: from :func:`factor_svd` -- the same subspace as the dense SVD of ``B A``
    for k <= rank. ``mode="a_rows"``: the top-k right singular vectors of ``A`` alone (PACT paper,
    Section 5.2: ``B A`` and ``A`` share their row space; within it the ordering is A's own,
    which differs from ``B A``'s unless ``B`` has orthogonal columns of equal norm).

    A rank-r update has only r meaningful directions: for k > r the result has r columns (the
    dense SVD would pad with arbitrary null-space vectors). With ``atol``, the rank is the number
    of singular values of ``B A`` above ``atol`` (in both modes: an adapter whose ``B`` is still
    zero, as PEFT initialises it, has rank 0 whatever its ``A``).
    """
    _, s, vh = factor_svd(d)
    if mode == "a_rows":
        _, _, vh = torch.linalg.svd(d.A, full_matrices=False)
    elif mode != "exact":
        raise ValueError(f"unknown low-rank subspace mode {mode!r} (expected 'exact' or 'a_rows')")
    if atol is not None:
        k = min(k, int((s > atol).sum().item()))
    return vh[:k].mT


def scale_delta(d: Delta, w: float) -> Delta:
    """``w * d`` for a dense or low-rank task vector (the weight goes into ``B``)."""
    if w == 1.0:
        return d
    return d.scaled(w) if isinstance(d, LowRankDelta) else d * w


def lowrank_sum(deltas: list[LowRankDelta], weights: list[float]) -> LowRankDelta:
    """``sum_t w_t B_t A_t`` exactly, as the concatenated factors ``[w_t B_t] [A_t]`` (rank <= sum r_t)."""
    return LowRankDelta(
        torch.cat([d.B * w if w != 1.0 else d.B for d, w in zip(deltas, weights)], dim=1),
        torch.cat([d.A for d in deltas], dim=0),
    )
