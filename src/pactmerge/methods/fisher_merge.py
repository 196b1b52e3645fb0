"""Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022).

Each parameter entry is the Fisher-weighted mean of the fine-tuned values: with the diagonal
Fisher ``F_t`` of model t on its own task's examples (:mod:`pactmerge.stats`, the empirical Fisher
``(1/N) sum_i (dL_i/dtheta)^2`` of the loss the caller gives), the per-model weights ``w_t`` (the
paper's lambda_t, default 1) and a floor ``eps``::

    theta_M = sum_t w_t (F_t + eps) theta_t / sum_t w_t (F_t + eps)      entrywise

In task vectors the base cancels: the merged task vector is
``sum_t w_t (F_t + eps) Delta_t / sum_t w_t (F_t + eps)``, so ``alpha = 1`` is Fisher merging
itself. ``eps`` (default 1e-6, the reference code's ``fisher_floor``) keeps entries no model's
loss reaches at the plain weighted mean. A parameter without a Fisher (not in the calibration
model) is weight-averaged. The paper's Fisher takes the expectation over the model's own
predictions ``y ~ p_theta(y|x)``; the empirical Fisher uses the true labels (a ``ModelData.loss``
can implement either).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.methods.regmean import weighted_mean
from pactmerge.registry import ParamContext, Params, register_method


class FisherParams(Params):
    eps: float = Field(1e-6, ge=0.0, description="floor added to every Fisher value")


def fisher_weighted(deltas: list[Tensor], fishers: list[Tensor], weights: list[float], eps: float) -> Tensor:
    """``sum_t w_t (F_t + eps) Delta_t / sum_t w_t (F_t + eps)``; weighted mean where the denominator is 0."""
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0])
    for d, f, w in zip(deltas, fishers, weights):
        fw = w * (f.reshape(d.shape) + eps)
        num.add_(fw * d)
        den.add_(fw)
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), weighted_mean(deltas, weights))


@register_method(
    "fisher",
    params=FisherParams,
    needs=("fisher",),
    uses_weight=True,
    paper="Merging models with Fisher-weighted averaging (arXiv:2111.09832)",
)
def fisher(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: FisherParams) -> Tensor:
    """Fisher merging: the entrywise Fisher-weighted mean of the task vectors."""
    fishers = ctx.calibration.fisher() if ctx.calibration is not None else None
    if fishers is None:
        return weighted_mean(deltas, ctx.weights)
    return fisher_weighted(deltas, fishers, ctx.weights, p.eps)
