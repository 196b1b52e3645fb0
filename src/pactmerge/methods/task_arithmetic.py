"""Task Arithmetic (Ilharco et al. 2023): the merged task vector is sum_t w_t Delta_t.

LoRA adapters: when every task vector is low-rank the sum is the concatenated factors, exact.
"""

from __future__ import annotations

from torch import Tensor

from pactmerge.lowrank import Delta, all_lowrank, densify, lowrank_sum
from pactmerge.registry import NoParams, ParamContext, register_method


def weighted_sum(deltas: list[Tensor], weights: list[float]) -> Tensor:
    """sum_t w_t * deltas[t], accumulated in place: one output tensor, no temporaries."""
    out = deltas[0] * weights[0]
    for d, w in zip(deltas[1:], weights[1:]):
        out.add_(d, alpha=w)
    return out


@register_method(
    "task_arithmetic",
    params=NoParams,
    lowrank=True,
    uses_weight=True,
    elementwise=True,
    paper="Editing models with task arithmetic (arXiv:2212.04089)",
)
def task_arithmetic(base: Tensor, deltas: list[Delta], ctx: ParamContext, p: NoParams) -> Delta:
    """sum_t w_t * Delta_t (w_t = the model's `weight`, default 1); alpha scales the result."""
    if all_lowrank(deltas):
        return lowrank_sum(deltas, ctx.weights)
    return weighted_sum(densify(deltas), ctx.weights)
