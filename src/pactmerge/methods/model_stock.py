"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models", ECCV
2024, arXiv:2403.19522): interpolate between the average of the fine-tuned weights and the
pretrained anchor, by a ratio set by the angle between the task vectors.

Per parameter (``filter_wise: true``: per row, i.e. per output unit, as the paper's layer-wise
form for linear layers), with ``N = T`` fine-tuned models::

    cos(theta) = mean over pairs s < t of <Delta_s, Delta_t> / (||Delta_s|| ||Delta_t||)
    ratio      = N cos(theta) / (1 + (N - 1) cos(theta))
    merged     = ratio * sum_t w_t Delta_t / sum_t w_t         (theta_0 + merged = ratio w_avg + (1 - ratio) theta_0)

``average: angle`` averages the pairwise *angles* and takes their cosine instead (fusion_bench).
Orthogonal task vectors give ``ratio = 0`` (the anchor); identical ones ``ratio = 1`` (their
average). Where ``|1 + (N - 1) cos(theta)| < 1e-6`` the ratio is undefined and set to 0 (keep the
anchor), as mergekit does; a zero task vector has cosine 0 with the others (mergekit clamps the
norm product at 1e-6, fusion_bench adds 1e-8). Needs at least 2 models. ``w_t`` are the models'
weights (default 1: the paper's plain average); the cosines do not use them.

mergekit 0.1.5 ``model_stock`` is this method with ``average: cosine`` (also ``filter_wise``);
fusion_bench 0.2.33 ``ModelStock`` averages angles in degrees (``average: angle``), per tensor.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.methods.task_arithmetic import weighted_sum
from pactmerge.registry import ParamContext, ParamInfo, Params, register_method


class ModelStockParams(Params):
    filter_wise: bool = Field(False, description="one ratio per row (output unit) instead of per parameter")
    average: Literal["cosine", "angle"] = Field(
        "cosine", description="mean of the pairwise cosines (mergekit) or cosine of the mean angle (fusion_bench)"
    )


def _check(p: ModelStockParams, info: ParamInfo) -> None:
    if 0 < info.num_models < 2:
        raise PactMergeError(f"method model_stock: needs at least 2 models, got {info.num_models}")


def stock_ratio(deltas: list[Tensor], filter_wise: bool, average: str) -> Tensor:
    """The interpolation ratio (float64): shape ``(rows, 1)`` when ``filter_wise`` (a 1-D
    parameter is one row), else ``()``."""
    if filter_wise:
        vs = [d.detach().to(torch.float64).reshape(d.shape[0] if d.ndim > 1 else 1, -1) for d in deltas]
    else:
        vs = [d.detach().to(torch.float64).reshape(1, -1) for d in deltas]
    n = len(vs)
    cosines = []
    for s in range(n):
        for t in range(s + 1, n):
            norms = (vs[s].norm(dim=1) * vs[t].norm(dim=1)).clamp(min=1e-6)
            cosines.append(((vs[s] * vs[t]).sum(dim=1) / norms).clamp(-1.0, 1.0))
    stacked = torch.stack(cosines)
    cos = torch.cos(torch.acos(stacked).mean(0)) if average == "angle" else stacked.mean(0)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6  # no finite ratio: keep the anchor
    ratio = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denom))
    return ratio.unsqueeze(1) if filter_wise else ratio.reshape(())


@register_method("model_stock", params=ModelStockParams, check=_check)
def model_stock(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: ModelStockParams) -> Tensor:
    """Model Stock: ratio * mean(Delta_t), ratio = N cos / (1 + (N - 1) cos) from the task vectors' mean cosine."""
    if len(deltas) < 2:
        raise PactMergeError(f"method model_stock: needs at least 2 models, got {len(deltas)}")
    total = float(sum(ctx.weights))
    if total == 0.0:
        raise PactMergeError("method model_stock: the models' weights sum to 0 (cannot average)")
    avg = weighted_sum(deltas, [w / total for w in ctx.weights])
    ratio = stock_ratio(deltas, p.filter_wise, p.average).to(avg.dtype)
    if p.filter_wise:
        rows = avg.shape[0] if avg.ndim > 1 else 1
        return (avg.reshape(rows, -1) * ratio).reshape(avg.shape)
    return avg * ratio
