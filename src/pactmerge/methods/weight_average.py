"""Weight averaging (uniform "model soup"; Wortsman et al. 2022, the baseline of every merging paper).

For every parameter, with per-model weights ``w_t`` (the models' ``weight``, default 1)::

    merged = sum_t w_t * Delta_t / sum_t w_t          Delta_t = theta_t - theta_0, shape of the parameter

so ``theta_0 + merged = sum_t w_t theta_t / sum_t w_t``: the (weighted) mean of the fine-tuned
weights. The engine forms ``theta_0 + alpha * merged``; weight averaging proper is ``alpha = 1``.
"""

from __future__ import annotations

from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.lowrank import Delta, all_lowrank, densify, lowrank_sum
from pactmerge.methods.task_arithmetic import weighted_sum
from pactmerge.registry import NoParams, ParamContext, register_method


@register_method(
    "weight_average",
    params=NoParams,
    lowrank=True,
    uses_weight=True,
    elementwise=True,
    paper="Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing"
    " inference time (arXiv:2203.05482)",
)
def weight_average(base: Tensor, deltas: list[Delta], ctx: ParamContext, p: NoParams) -> Delta:
    """sum_t w_t Delta_t / sum_t w_t: the (weighted) mean of the fine-tuned weights at alpha = 1."""
    total = float(sum(ctx.weights))
    if total == 0.0:
        raise PactMergeError("method weight_average: the models' weights sum to 0 (cannot normalise)")
    weights = [w / total for w in ctx.weights]
    if all_lowrank(deltas):  # LoRA adapters: the concatenated factors, exact
        return lowrank_sum(deltas, weights)
    return weighted_sum(densify(deltas), weights)
