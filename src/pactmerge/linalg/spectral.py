"""Faster routes to the same decompositions: the small side of a rectangular matrix, the Gram
matrix where precision allows, and stacks of same-shape matrices in one call.

:func:`thin_svd` is ``torch.linalg.svd(a, full_matrices=False)`` computed through the small side
of ``a`` -- exact, only a different LAPACK path (measured on one CPU thread, docs/performance.md):

* **wide** (``m < n``): the SVD of ``a^T`` (LAPACK's divide-and-conquer is about 2x faster on a
  tall matrix than on its wide transpose), factors swapped back;
* **very tall** (``m >= 2 n``): ``a = Q R`` first, then the ``n x n`` SVD of ``R``, ``U = Q U_R``.

:func:`top_right_exact` (the ``k`` leading right singular vectors) additionally uses the
eigendecomposition of the small side's **Gram matrix**, formed in float64, when

* the input is float32 or narrower (a float64 input keeps the SVD: its Gram would lose half of
  its digits), and
* the matrix is at least twice as long as wide in either direction (for square matrices the
  symmetric eigensolver is no faster than the SVD), and
* the wanted directions are well separated from round-off: ``sigma_k / sigma_1 >= 1e-4``. The
  float64 Gram resolves singular values down to ``~1e-8 sigma_1``, so the vectors are then at
  least as accurate as a float32 SVD's (error ``~eps64 * (sigma_1 / sigma_k)^2`` against
  ``~eps32 * sigma_1 / gap``); below that the SVD is used.

:func:`stacked_top_right` runs the same computation on a stack of same-shape matrices (PACT's
``theta_0`` and ``T`` task vectors of a parameter) as one batched call -- on a GPU, one batched
SVD instead of ``T + 1`` launches; on the CPU the same code runs (and is what the tests check
against the per-matrix path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

GRAM_MIN_RATIO = 1e-4  # sigma_k / sigma_1 below this: the Gram route is not used (see module doc)
GRAM_MIN_ASPECT = 2.0  # max(m, n) / min(m, n) at least this: the Gram route pays


def thin_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(a, full_matrices=False)`` through the small side of ``a``.

    Args:
        a: ``(..., m, n)``, any floating dtype.

    Returns:
        ``(U, S, Vh)`` of shapes ``(..., m, r)``, ``(..., r)``, ``(..., r, n)``, r = min(m, n).
    """
    m, n = a.shape[-2], a.shape[-1]
    if m < n:  # wide: decompose the transpose, which LAPACK handles faster
        u, s, vh = thin_svd(a.mT)
        return vh.mT, s, u.mT
    if n > 0 and m >= 2 * n:
        q, r = torch.linalg.qr(a)
        ur, s, vh = torch.linalg.svd(r, full_matrices=False)
        return q @ ur, s, vh
    return torch.linalg.svd(a, full_matrices=False)


def _gram_route(shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    m, n = shape[-2], shape[-1]
    small, large = min(m, n), max(m, n)
    return dtype != torch.float64 and small > 0 and large >= GRAM_MIN_ASPECT * small


def top_right_exact(a: Tensor, k: int) -> Tensor:
    """The ``k`` leading right singular vectors of ``a`` (``(..., m, n)``) as ``(..., n, k)``,
    orthonormal, by decreasing singular value; the Gram route where it applies (module doc)."""
    return top_right_exact_values(a, k)[1]


def top_right_exact_values(a: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """:func:`top_right_exact` with the singular values: ``((..., k), (..., n, k))``.

    On the Gram route the values are the square roots of the float64 Gram eigenvalues, accurate
    to about ``eps64 * sigma_1^2 / sigma`` -- the route is taken only when every one of the ``k``
    is at least ``GRAM_MIN_RATIO * sigma_1``, so a rank-revealing cut at a round-off level far
    below that sees the same values an SVD would give."""
    m, n = a.shape[-2], a.shape[-1]
    if k == 0:
        return a.new_zeros((*a.shape[:-2], 0)), a.new_zeros((*a.shape[:-2], n, 0))
    if _gram_route(tuple(a.shape), a.dtype):
        a64 = a.to(torch.float64)
        if m >= n:  # tall: the right vectors are the eigenvectors of a^T a (n x n)
            w, v = torch.linalg.eigh(a64.mT @ a64)
            w, v = w.flip(-1), v.flip(-1)
            sigma = w[..., :k].clamp_min(0).sqrt()
            top = v[..., :k]
        else:  # wide: the left ones are those of a a^T (m x m); V_k = a^T U_k / sigma_k
            w, u = torch.linalg.eigh(a64 @ a64.mT)
            w, u = w.flip(-1), u.flip(-1)
            sigma = w[..., :k].clamp_min(0).sqrt()
            top = (a64.mT @ u[..., :k]) / sigma.unsqueeze(-2)
        lead = w[..., :1].clamp_min(0)
        if bool((w[..., k - 1 : k] >= (GRAM_MIN_RATIO**2) * lead).all()) and bool((lead > 0).all()):
            return sigma.to(a.dtype), top.to(a.dtype)
    _, s, vh = thin_svd(a)
    return s[..., :k], vh[..., :k, :].mT


def stacked_top_right(
    mats: Sequence[Tensor],
    k: int,
    *,
    method: str = "exact",
    oversample: int = 10,
    power_iters: int = 2,
    generators: Sequence[torch.Generator | None] | None = None,
    atols: Sequence[float | None] | None = None,
) -> list[Tensor]:
    """:func:`pactmerge.linalg.top_right_singular_vectors` of every matrix in ``mats`` (all the
    same shape, dtype and device), computed on their stack in one batched call.

    ``generators[i]`` draws matrix ``i``'s randomized test matrix exactly as the per-matrix call
    with that generator would, so the two paths agree up to round-off. ``atols[i]`` (if given)
    keeps only matrix ``i``'s directions with singular value above it, as the per-matrix ``atol``.

    Returns:
        ``(n, k_i)`` per matrix, ``k_i = k`` unless ``atols`` drops some.
    """
    if not mats:
        return []
    stack = torch.stack(list(mats))
    n = stack.shape[-1]
    if k == 0:
        return [stack.new_zeros((n, 0)) for _ in mats]
    if method == "exact":
        s, top = top_right_exact_values(stack, k)
    elif method == "randomized":
        gens: list[torch.Generator | None] = list(generators) if generators is not None else [None] * len(mats)
        s, top = _stacked_randomized_right(stack, k, oversample, power_iters, gens)
    else:
        raise ValueError(f"unknown SVD method {method!r} (expected 'exact' or 'randomized')")
    out = list(top.unbind(0))
    for i, atol in enumerate(atols or ()):
        if atol is not None:
            out[i] = out[i][:, : int((s[i] > atol).sum().item())]
    return out


def _stacked_randomized_right(
    a: Tensor, rank: int, oversample: int, power_iters: int, generators: list[torch.Generator | None]
) -> tuple[Tensor, Tensor]:
    """:func:`pactmerge.linalg.randomized_svd`'s singular values and right vectors on a ``(B, m, n)`` stack."""
    m, n = a.shape[-2], a.shape[-1]
    rank = min(rank, m, n)
    width = min(rank + oversample, m, n)
    # One test matrix per slice, drawn on the CPU from that slice's generator (as the per-matrix
    # path draws it), then moved: identical sketches on every device.
    omega = torch.stack([torch.randn((n, width), generator=g, dtype=a.dtype) for g in generators]).to(a.device)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(a.mT @ q)
        q, _ = torch.linalg.qr(a @ z)
    _, s, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
    return s[..., :rank], vh[..., :rank, :].mT


BATCH_DEVICES = {"cuda"}  # where stacking same-shape matrices into one call pays (module doc)


def batches_on(device: torch.device) -> bool:
    """Whether callers should stack same-shape matrices on ``device`` (:data:`BATCH_DEVICES`).

    On the CPU a stack only costs a copy (LAPACK loops over it anyway); tests add ``"cpu"`` to
    check that the batched code equals the per-matrix one."""
    return device.type in BATCH_DEVICES
