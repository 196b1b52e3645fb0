"""NAN: norm-based merging coefficients (Si et al. 2025, "NAN: A training-free solution to coefficient
estimation in model merging", arXiv:2505.16148; "Model Merging Overview" survey, "NAN").

A pre filter that rescales each task vector by a per-layer coefficient from its norm. For one
parameter ("layer") with task vectors ``tau_t``::

    alpha_t = (1 / ||tau_t||_F) / sum_s (1 / ||tau_s||_F)          (inverse-norm share; sum_t alpha_t = 1)
    tau_t  <- scale * alpha_t * tau_t,   scale = T / 2 by default   (the paper's global factor)

so ``filters: [nan]`` + ``task_arithmetic`` is NAN's merge ``theta_0 + T/2 sum_t alpha_t tau_t``, and
in front of any other method NAN supplies its coefficients (the paper's "plug-and-play" use).
``norm_of: weights`` takes the norm of the fine-tuned weights ``theta_t`` instead of the task
vector (the survey's ``||W_i||``, read literally). A task vector that is zero on a parameter
(a layer that task did not change) gets coefficient 0 there and the others share the
coefficients; when all are zero nothing changes. Applies to every merged parameter.

Neither fusion_bench 0.2.33 nor mergekit 0.1.5 has NAN.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.registry import ParamContext, Params, register_filter


class NanParams(Params):
    scale: float | None = Field(None, gt=0.0, description="global factor; default T/2 (the paper's)")
    norm_of: Literal["task_vector", "weights"] = Field(
        "task_vector", description="inverse norm of tau_t (default) or of the fine-tuned weights theta_t"
    )


def nan_coefficients(norms: list[float]) -> list[float]:
    """``alpha_t`` from the norms: inverse-norm shares over the nonzero norms, 0 for zero ones."""
    inv = [1.0 / n if n > 0 else 0.0 for n in norms]
    total = sum(inv)
    return [x / total if total > 0 else 0.0 for x in inv]


@register_filter("nan", params=NanParams)
def nan(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: NanParams) -> list[Tensor]:
    """NAN: scale each task vector by scale * (1/||tau_t||) / sum_s (1/||tau_s||), per parameter."""
    if not any(bool(d.any()) for d in deltas):
        return deltas
    if p.norm_of == "weights":
        norms = [float(torch.linalg.vector_norm((base + d).to(torch.float64))) for d in deltas]
    else:
        norms = [float(torch.linalg.vector_norm(d.to(torch.float64))) for d in deltas]
    coeffs = nan_coefficients([n if bool(d.any()) else 0.0 for n, d in zip(norms, deltas)])
    scale = p.scale if p.scale is not None else len(deltas) / 2
    return [d * (scale * c) for d, c in zip(deltas, coeffs)]
