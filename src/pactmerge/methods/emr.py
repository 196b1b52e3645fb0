"""EMR-Merging (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024).

For the task vectors ``tau_t`` (each scaled by its model's ``weight``, default 1), entrywise::

    gamma_uni = sgn(sum_t tau_t)                                   Elect: the unified sign
    eps_uni   = max_t |tau_t| over the tasks with tau_t gamma_uni > 0   ... and the largest agreeing magnitude
    tau_uni   = gamma_uni * eps_uni                                the unified task vector
    M_t       = [tau_t * tau_uni > 0]                              Mask: task t's directions
    lambda_t  = sum |tau_t| / sum |M_t * tau_uni|                  Rescale: sums over every merged parameter

Task t's model is ``theta_0 + alpha * lambda_t * (M_t * tau_uni)`` (the paper's ``alpha = 1``: EMR
is tuning-free). The result is task-specific (:mod:`pactmerge.modulators`): the shared output is
``theta_0 + alpha * tau_uni`` and each task's modulator is its mask (1 bit per entry) and its
rescaler, so ``pactmerge materialize OUT t DEST`` writes task t's model. Every merged parameter
(matrices, biases, norms) takes part, as in the paper.

``lambda_t`` needs two sums over the whole model before any parameter is merged: one streaming
``prepare`` pass (after the pre filters, e.g. PAVE). ``rescaler_sum: tensor_means`` gives the
reference code's variant (``sum_p mean|tau_t,p| / sum_p mean|M_t tau_uni,p|``, per-parameter means
summed over parameters; the EMR repository and fusion_bench 0.2.33 compute it so); the default
``entries`` is the paper's formula. A task whose mask is empty everywhere gets lambda 1 (its
update is zero either way). Where ``sum_t tau_t`` is exactly 0 the paper's sign is 0 (no task
agrees, tau_uni = 0); the reference code takes such entries as negative -- they differ only on
exact cancellations.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.modulators import Modulator, TaskSpecific
from pactmerge.registry import ParamContext, Params, register_method


class EmrParams(Params):
    rescaler_sum: Literal["entries", "tensor_means"] = Field(
        "entries", description="lambda_t from sums over every entry (paper) or of per-parameter means (reference code)"
    )


def elect(deltas: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """``(tau_uni, [M_t])`` of one parameter (see the module doc)."""
    total = torch.zeros_like(deltas[0])
    for d in deltas:
        total.add_(d)
    sign = torch.sign(total)
    magnitude = torch.zeros_like(deltas[0])
    for d in deltas:
        agree = d * sign > 0
        magnitude = torch.maximum(magnitude, torch.where(agree, d.abs(), torch.zeros_like(d)))
    unified = sign * magnitude
    return unified, [d * unified > 0 for d in deltas]


def _sums(deltas: list[Tensor], unified: Tensor, masks: list[Tensor], p: EmrParams) -> list[tuple[float, float]]:
    """Per task, this parameter's share of ``(sum |tau_t|, sum |M_t tau_uni|)``."""
    masked = [torch.where(m, unified, torch.zeros_like(unified)).abs() for m in masks]
    if p.rescaler_sum == "tensor_means":
        return [(float(d.abs().mean()), float(u.mean())) for d, u in zip(deltas, masked)]
    return [(float(d.abs().sum()), float(u.sum())) for d, u in zip(deltas, masked)]


def _scaled(deltas: list[Tensor], ctx: ParamContext) -> list[Tensor]:
    return [d if w == 1.0 else d * w for d, w in zip(deltas, ctx.weights)]


def _prepare(stream, p: EmrParams) -> dict:
    totals: list[list[float]] | None = None
    for ctx, _base, deltas in stream:
        deltas = _scaled(deltas, ctx)
        unified, masks = elect(deltas)
        part = _sums(deltas, unified, masks, p)
        if totals is None:
            totals = [[0.0, 0.0] for _ in part]
        for acc, (num, den) in zip(totals, part):
            acc[0] += num
            acc[1] += den
    return {"rescalers": [num / den if den > 0 else 1.0 for num, den in totals or []]}


@register_method(
    "emr",
    params=EmrParams,
    prepare=_prepare,
    task_specific=True,
    uses_weight=True,
    paper="EMR-Merging: Tuning-free high-performance model merging (arXiv:2405.17461)",
)
def emr(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: EmrParams) -> TaskSpecific:
    """EMR: the unified task vector (elected sign, largest agreeing magnitude) plus, per task, a mask and a rescaler."""
    unified, masks = elect(_scaled(deltas, ctx))
    rescalers = ctx.stats["emr"]["rescalers"]
    return TaskSpecific(unified, [Modulator(mask=m, scale=lam) for m, lam in zip(masks, rescalers)])
