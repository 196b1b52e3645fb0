"""Exact and randomized SVD helpers, a rank-revealing orth and the polar factor, and the two
tolerances that decide what counts as zero.

Two kinds of "zero" (both measured; ``benchmarks/pact_numerics.py`` prints the numbers on the
benchmark's fine-tunes):

* :func:`null_rtol` -- ``sqrt(eps)`` of the compute dtype, relative to the largest singular value:
  the null test of the well-posed merging methods (Iso-C, Iso-CTS, TSV-M), whose inputs have been
  through PACT's projections. The singular values of the sum of the filtered task vectors along the
  directions every one of them annihilates are round-off, but not at the ``max(m, n) * eps`` level
  of :func:`default_rtol`: the projections are built from several SVDs whose subspaces carry
  ``eps / gap`` errors. Measured on 300 random layers (8..63 wide, T = 2..10, every K, k, flat and
  decaying spectra): up to 21 eps (float64) and 17 eps (float32) relative -- above
  ``max(m, n) * eps`` for small layers (the 40 x 24 case of issue 14 reached 59 eps > 40 eps) --
  while the smallest genuine singular value of those sums was 3.7e-6 (float64) / 3.3e-5 (float32)
  relative, and above 7.7e-4 in 99% of the layers. ``sqrt(eps)`` (1.5e-8 / 3.5e-4) sits in that gap
  with room on both sides in float64 and is the only dimension-free choice that does in float32
  (``max(m, n) * eps`` is already 4.6e-5 at n = 384 and 4.9e-4 at n = 4096).
* :func:`storage_noise_level` -- the spectral norm of independent one-ulp errors of the stored
  weights, ``eps(storage) * (largest row norm + largest column norm of theta_0)``: PACT counts
  singular values of ``theta_0`` and ``Delta_t`` at or below it as zero (the stored data do not
  resolve those directions). Measured on the benchmark's base weights and 400 random ones (some
  with outlier columns): one rounding of ``theta_0`` through a coarser dtype (bfloat16, float16)
  has spectral norm 0.15-0.21 of that level, independent +-1 ulp noise 0.42-0.59 of it.

All functions take and return torch tensors on the caller's device and dtype; nothing here
allocates more than a few matrices of the input's size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pactmerge.linalg.spectral import thin_svd, top_right_exact_values


def default_rtol(shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """Relative tolerance below which a singular value counts as zero.

    The textbook rank-revealing threshold (NumPy's ``matrix_rank``, LAPACK's ``xGELSD``):
    ``max(m, n) * eps(dtype)``, relative to the largest singular value. It sits just above
    the round-off floor of a float32/float64 SVD, so only numerically-null directions fall below.
    """
    return max(shape) * torch.finfo(dtype).eps


def null_rtol(dtype: torch.dtype) -> float:
    """``sqrt(eps(dtype))`` (1.5e-8 in float64, 3.5e-4 in float32): relative tolerance below which the
    well-posed merging methods count a singular value as zero (see the module doc for the measurement).

    Looser than :func:`default_rtol` because their inputs come out of PACT's projections, whose
    round-off along the directions every filtered task vector annihilates reaches tens of eps
    relative -- enough to pass ``max(m, n) * eps`` on small layers, never ``sqrt(eps)``.
    """
    return torch.finfo(dtype).eps ** 0.5


def storage_noise_level(theta0: Tensor, eps: float) -> float:
    """Spectral norm of a matrix of independent one-ulp errors of ``theta0``:
    ``eps * (max_i ||theta0[i, :]|| + max_j ||theta0[:, j]||)``.

    For independent zero-mean entries with standard deviations ``s_ij`` the expected spectral norm
    is at most about the largest row norm plus the largest column norm of ``(s_ij)`` (Bandeira and
    van Handel 2016; ``rms * (sqrt(m) + sqrt(n))`` when all ``s_ij`` are equal); here ``s_ij <= eps *
    |theta0_ij|``. The row/column form matters for trained weights, whose outlier rows or columns
    carry most of their round-off's spectral norm.

    Args:
        theta0: ``(m, n)`` stored weight (any floating dtype; half precision is upcast to float32).
        eps: machine epsilon of the storage dtype (the coarsest one the values went through).

    Returns:
        A float >= 0; 0 for an all-zero ``theta0``.
    """
    a = theta0 if theta0.dtype in (torch.float32, torch.float64) else theta0.float()
    rows = float(torch.linalg.vector_norm(a, dim=1).max()) if a.numel() else 0.0
    cols = float(torch.linalg.vector_norm(a, dim=0).max()) if a.numel() else 0.0
    return eps * (rows + cols)


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


def orth_qr(a: Tensor) -> Tensor:
    """The Q factor of the reduced QR of ``a``: ``(n, min(n, c))`` orthonormal columns, every column
    of ``a`` kept -- the ``orth`` of the PACT paper as written (Eq. 8, "QR decomposition").

    Unlike :func:`orth` it is not rank-revealing: where columns of ``a`` are (nearly) dependent, the
    corresponding columns of Q come from their round-off and are arbitrary directions.
    """
    n, c = a.shape
    if c == 0:
        return a.new_zeros((n, 0))
    q, _ = torch.linalg.qr(a)
    return q


def polar_factor(a: Tensor, rank_rtol: float | None = None, literal: bool = False) -> Tensor:
    """Orthogonal polar factor ``U V^T`` of ``a = U S V^T`` (the nearest matrix with orthonormal
    columns/rows in Frobenius norm).

    Args:
        a: ``(m, n)`` matrix.
        rank_rtol: singular values ``<= rank_rtol * sigma_max`` count as zero. Default
            :func:`null_rtol` (``sqrt(eps)``: about 3e-4 in float32, 1.5e-8 in float64), looser than
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
            rank_rtol = null_rtol(a.dtype)
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
    atol: float | None = None,
) -> Tensor:
    """The ``k`` leading right singular vectors of ``a``.

    Args:
        a: ``(m, n)`` matrix.
        k: how many, ``0 <= k <= min(m, n)``.
        method: ``"exact"`` (full thin SVD) or ``"randomized"`` (:func:`randomized_svd`).
        atol: if given, only directions with singular value ``> atol`` are returned (rank-revealing:
            a matrix of rank r < k gives r columns, a zero matrix none, instead of the arbitrary
            vectors an SVD completes its null space with).

    Returns:
        ``(n, k')`` with orthonormal columns, ordered by decreasing singular value; ``k' = k``
        unless ``atol`` drops some.
    """
    m, n = a.shape
    if k == 0:
        return a.new_zeros((n, 0))
    if method == "exact":
        # the small side / Gram route where it pays (linalg/spectral.py)
        s, v = top_right_exact_values(a, k)
    elif method == "randomized":
        _, s, vh = randomized_svd(a, k, oversample=oversample, power_iters=power_iters, generator=generator)
        v = vh.mT
    else:
        raise ValueError(f"unknown SVD method {method!r} (expected 'exact' or 'randomized')")
    if atol is not None:
        v = v[:, : int((s > atol).sum().item())]
    return v
