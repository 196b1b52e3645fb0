"""Exact and randomized SVD helpers, a rank-revealing orth and the polar factor.

All functions take and return torch tensors on the caller's device and dtype; nothing here
allocates more than a few matrices of the input's size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pactmerge.linalg.spectral import thin_svd, top_right_exact


def default_rtol(shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """Relative tolerance below which a singular value counts as zero.

    The textbook rank-revealing threshold (NumPy's ``matrix_rank``, LAPACK's ``xGELSD``):
    ``max(m, n) * eps(dtype)``, relative to the largest singular value. It sits just above
    the round-off floor of a float32/float64 SVD, so only numerically-null directions fall below.
    """
    return max(shape) * torch.finfo(dtype).eps


def numerical_rank(singular_values: Tensor, shape: tuple[int, ...], rtol: float | None = None) -> int:
    """Number of singular values above ``rtol * max(singular_values)``.

    Args:
        singular_values: 1-D, sorted in descending order (as ``torch.linalg.svd`` returns them).
        shape: shape of the factored matrix (for the default tolerance).
        rtol: relative tolerance; ``None`` means :func:`default_rtol`.
    """
    if singular_values.numel() == 0:
        return 0
    if rtol is None:
        rtol = default_rtol(shape, singular_values.dtype)
    top = singular_values[0]
    if top <= 0:
        return 0
    return int((singular_values > rtol * top).sum().item())


def orth(a: Tensor, rtol: float | None = None, atol: float = 0.0) -> Tensor:
    """Orthonormal basis of the column space of ``a``, rank-revealing.

    Args:
        a: ``(n, c)`` matrix. Its columns may be (nearly) linearly dependent.
        rtol: singular values ``<= rtol * sigma_max`` are dropped; ``None`` means
            :func:`default_rtol` (``max(n, c) * eps``). A plain QR would instead turn the
            round-off of dependent columns into invented directions.
        atol: singular values ``<= atol`` are also dropped (guards an all-zero ``a``).

    Returns:
        ``(n, r)`` with orthonormal columns, ``r`` the numerical rank (``r = 0`` allowed).
    """
    n, c = a.shape
    if c == 0:
        return a.new_zeros((n, 0))
    u, s, _ = thin_svd(a)
    if rtol is None:
        rtol = default_rtol(tuple(a.shape), a.dtype)
    if s.numel() == 0 or s[0] <= atol:
        return a.new_zeros((n, 0))
    keep = int(((s > rtol * s[0]) & (s > atol)).sum().item())
    return u[:, :keep]


def polar_factor(a: Tensor, rank_rtol: float | None = None, literal: bool = False) -> Tensor:
    """Orthogonal polar factor ``U V^T`` of ``a = U S V^T`` (the nearest matrix with orthonormal
    columns/rows in Frobenius norm).

    Args:
        a: ``(m, n)`` matrix.
        rank_rtol: singular values ``<= rank_rtol * sigma_max`` count as zero. Default
            ``sqrt(eps(dtype))`` (about 3e-4 in float32, 1.5e-8 in float64), looser than
            :func:`default_rtol`: the inputs here are stacked (near-)orthonormal bases, whose
            truly dependent directions come out of the preceding SVDs with round-off well above
            ``max(m, n) * eps``; at that threshold whether they count would be a coin flip.
        literal: if True, use every singular pair, including those of (numerically) zero
            singular values, whose vectors are arbitrary; if False (default) the factor is
            restricted to the numerical range, which is unique.

    Returns:
        ``(m, n)`` matrix, a partial isometry on the range of ``a``.
    """
    u, s, vh = thin_svd(a)
    if not literal:
        if rank_rtol is None:
            rank_rtol = torch.finfo(a.dtype).eps ** 0.5
        r = numerical_rank(s, tuple(a.shape), rank_rtol)
        u, vh = u[:, :r], vh[:r]
    return u @ vh


def randomized_svd(
    a: Tensor,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` truncated SVD by randomized range finding (Halko, Martinsson & Tropp 2011,
    Algorithms 4.4 and 5.1), with QR re-orthonormalisation between power iterations.

    Args:
        a: ``(m, n)`` matrix.
        rank: number of singular triplets wanted, ``0 <= rank <= min(m, n)``.
        oversample: extra sketch columns ``p``; the sketch has ``min(rank + p, min(m, n))``.
        power_iters: subspace iterations ``q``; each sharpens a decaying spectrum by ``sigma^(2q+1)``.
        generator: CPU ``torch.Generator`` for the Gaussian test matrix (reproducibility).

    Returns:
        ``(U, S, Vh)`` with shapes ``(m, rank)``, ``(rank,)``, ``(rank, n)``.
    """
    m, n = a.shape
    rank = min(rank, m, n)
    width = min(rank + oversample, m, n)
    # Sketch on the CPU with the given generator, then move: identical draws on every device.
    omega = torch.randn((n, width), generator=generator, dtype=a.dtype).to(a.device)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(a.mT @ q)
        q, _ = torch.linalg.qr(a @ z)
    b = q.mT @ a  # (width, n)
    ub, s, vh = thin_svd(b)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def top_right_singular_vectors(
    a: Tensor,
    k: int,
    *,
    method: str = "exact",
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The ``k`` leading right singular vectors of ``a``.

    Args:
        a: ``(m, n)`` matrix.
        k: how many, ``0 <= k <= min(m, n)``.
        method: ``"exact"`` (full thin SVD) or ``"randomized"`` (:func:`randomized_svd`).

    Returns:
        ``(n, k)`` with orthonormal columns, ordered by decreasing singular value.
    """
    m, n = a.shape
    if k == 0:
        return a.new_zeros((n, 0))
    if method == "exact":
        return top_right_exact(a, k)  # the small side / Gram route where it pays (linalg/spectral.py)
    if method == "randomized":
        _, _, vh = randomized_svd(a, k, oversample=oversample, power_iters=power_iters, generator=generator)
        return vh.mT
    raise ValueError(f"unknown SVD method {method!r} (expected 'exact' or 'randomized')")
