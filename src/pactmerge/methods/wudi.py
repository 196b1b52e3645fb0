"""WUDI merging (Cheng et al. 2025, "Whoever started the interference should end it: guiding data-free
model merging via task vectors", ICML 2025, arXiv:2503.08099): per layer, the merged task vector is
optimised, without data, against the task vectors themselves.

For a 2-D parameter with task vectors ``tau_t`` (``m x n``, scaled by the models' weights) the
objective is::

    L(X) = sum_t || (X - tau_t) tau_t^T ||_F^2 / ||tau_t||_F^2
         = tr(X G X^T) - 2 tr(X B^T) + const,   G = sum_t tau_t^T tau_t / ||tau_t||^2   (n x n)
                                                B = sum_t tau_t tau_t^T tau_t / ||tau_t||^2   (m x n)
    grad L(X) = 2 (X G - B)

(the rows of the task vectors span the inputs they respond to, so ``(X - tau_t) tau_t^T`` is the
interference X causes on task t's own input subspace). ``solver``:

* ``adam`` (default; the paper and fusion_bench): start at ``X = sum_t tau_t`` and take
  ``iterations`` Adam steps (``lr``, betas (0.9, 0.999), eps 1e-8, no weight decay) on L. The
  gradient is written out in its residual form ``2 sum_t (X - tau_t) tau_t^T tau_t / ||tau_t||^2``
  (with the ``n x n`` Gram matrices ``tau_t^T tau_t`` precomputed when ``n <= m``), so no backward
  pass is needed; its rounding stays relative to the residuals ``X - tau_t`` -- the expanded
  ``X G - B`` would cancel two large terms, and Adam's normalised steps turn any noise in a small
  gradient entry into a full ``lr`` step. The iterates are fusion_bench's up to rounding.
* ``exact``: the minimiser itself, ``X* = B G^+`` (least squares; the component of X outside the
  tasks' row space is zero, where Adam started from the sum leaves it too).

1-D parameters: the mean of the task vectors (as fusion_bench does). ``iterations`` is bounded
(1 .. 100000) and ``lr`` must be positive. A task vector that is identically zero on a 2-D
parameter makes its weight ``1 / ||tau_t||^2`` undefined: the merge stops with an error naming the
parameter and the model (exclude the parameter, or drop the model).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.methods.isotropic import mean_of
from pactmerge.registry import ParamContext, Params, register_method


class WudiParams(Params):
    solver: Literal["adam", "exact"] = Field("adam", description="Adam from the sum (paper) or the exact minimiser")
    iterations: int = Field(300, ge=1, le=100_000, description="adam: number of steps")
    lr: float = Field(1e-5, gt=0.0, le=1.0, description="adam: learning rate")


def wudi_terms(taus: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(G, B)`` of the objective (see module doc) for ``T`` matrices ``(m, n)``: ``(n, n)``, ``(m, n)``."""
    n = taus[0].shape[1]
    G = taus[0].new_zeros((n, n))
    B = torch.zeros_like(taus[0])
    for tau in taus:
        c = 1.0 / float(torch.linalg.matrix_norm(tau) ** 2)
        gram = tau.mT @ tau
        G.add_(gram, alpha=c)
        B.add_(tau @ gram, alpha=c)
    return G, B


def wudi_gradient(taus: list[Tensor]):
    """``x -> grad L(x)`` in the residual form (see module doc), for ``T`` matrices ``(m, n)``."""
    weights = [2.0 / float(torch.linalg.matrix_norm(tau) ** 2) for tau in taus]
    m, n = taus[0].shape
    grams = [tau.mT @ tau for tau in taus] if n <= m else None

    def grad(x: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        for t, (tau, c) in enumerate(zip(taus, weights)):
            residual = x - tau
            out.add_(residual @ grams[t] if grams is not None else (residual @ tau.mT) @ tau, alpha=c)
        return out

    return grad


def wudi_adam(start: Tensor, taus: list[Tensor], iterations: int, lr: float) -> Tensor:
    """``iterations`` Adam steps (torch.optim.Adam's update, written out) on L from ``start``."""
    gradient = wudi_gradient(taus)
    x = start.clone()
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, iterations + 1):
        grad = gradient(x)
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
        x.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
    return x


def wudi_exact(G: Tensor, B: Tensor) -> Tensor:
    """The minimiser ``B G^+`` (G symmetric positive semi-definite)."""
    return B @ torch.linalg.pinv(G, hermitian=True)


@register_method("wudi", params=WudiParams)
def wudi(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: WudiParams) -> Tensor:
    """WUDI: per 2-D layer, minimise sum_t ||(X - tau_t) tau_t^T||^2 / ||tau_t||^2 (Adam from the sum, or exactly)."""
    taus = [d * w if w != 1.0 else d for d, w in zip(deltas, ctx.weights)]
    if not ctx.info.is_matrix:
        return mean_of(taus)
    for t, tau in enumerate(taus):
        if not bool(tau.any()):
            raise PactMergeError(
                f"method wudi: parameter {ctx.name!r}: the task vector of model {t} is all zero, so its weight"
                " 1/||tau_t||^2 is undefined (exclude the parameter with `exclude:` or drop the model)"
            )
    if p.solver == "exact":
        return wudi_exact(*wudi_terms(taus))
    start = taus[0].clone()
    for tau in taus[1:]:
        start.add_(tau)
    return wudi_adam(start, taus, p.iterations, p.lr)
