"""TALL masks as a method (Wang et al. 2024, "Localizing task information for improved model merging
and compression", ICML 2024; "Model Merging Overview" survey, "TALL-Masks and Consensus Merging").

For task vectors ``Delta_t`` (any shape), the multi-task vector ``tau_MTL`` is the base method's
merged vector -- ``task_arithmetic``: ``sum_t w_t Delta_t`` (the paper's), or ``ties`` (TIES with
its options under ``ties:``; the paper's TIES variant uses the disjoint sum) -- and, entrywise::

    m_t = [ |Delta_t| >= lambda_t * |tau_MTL - Delta_t| ]        TALL mask of task t

which is the ``argmin_m || m * tau_MTL - Delta_t ||_1`` for ``lambda_t = 1``. The result is
task-specific (:mod:`pactmerge.modulators`): the merged model is ``theta_0 + alpha * tau_MTL`` and
task ``t``'s model is ``theta_0 + alpha * (m_t * tau_MTL)`` (``pactmerge materialize OUT t DEST``).
With ``alpha = 1`` that is the paper's reconstruction ``theta_0 + m_t * tau_MTL``.

``lambda_t``: a model's ``parameters: {lambda: ...}`` if given, else the method's ``lambda``
(default 0.6, fusion_bench's default; the paper picks lambda_t per task from {0.2, ..., 0.6} on
validation data). Masks are stored packed, one bit per entry.

The TALL repository (``generate_task_masks``, copied into fusion_bench 0.2.33 as
``fusion_bench.method.tall_mask.utils``) uses ``>`` where the survey writes ``>=``: they differ only
where both sides are equal (e.g. an entry that is 0 in every task). fusion_bench's
``TallMaskTaskArithmeticAlgorithm`` instead compares ``|theta_0 - Delta_t|`` (the pretrained
*weights* minus the task vector) with ``lambda |tau_MTL - Delta_t|`` -- a slip that selects almost
every entry of a layer whose weights are large; it is not reproduced here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from torch import Tensor

from pactmerge.methods.consensus import DisjointSumTiesParams, tall_masks, task_lambdas
from pactmerge.methods.task_arithmetic import weighted_sum
from pactmerge.methods.ties import thresholds_for, ties_merge, ties_prepare
from pactmerge.modulators import Modulator, TaskSpecific
from pactmerge.registry import ParamContext, Params, register_method


class TallMasksParams(Params):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    lambda_: float = Field(
        0.6, ge=0.0, alias="lambda", description="default lambda_t (a model's parameters.lambda overrides)"
    )
    base_method: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    ties: DisjointSumTiesParams = Field(
        default_factory=DisjointSumTiesParams, description="TIES options when base_method is ties"
    )


def _prepare(stream, p: TallMasksParams) -> dict:
    return ties_prepare(stream, p.ties) if p.base_method == "ties" else {}


@register_method("tall_masks", params=TallMasksParams, prepare=_prepare, task_specific=True)
def tall_masks_method(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: TallMasksParams) -> TaskSpecific:
    """TALL masks: the merged tau_MTL plus, per task, the mask |Delta_t| >= lambda_t |tau_MTL - Delta_t|."""
    if p.base_method == "ties":
        thresholds = thresholds_for(deltas, ctx, p.ties, ctx.stats.get("tall_masks"))
        merged = ties_merge(deltas, ctx.weights, thresholds, p.ties.aggregate)
    else:
        merged = weighted_sum(deltas, ctx.weights)
    masks = tall_masks(deltas, merged, task_lambdas(ctx, p.lambda_))
    return TaskSpecific(merged, [Modulator(mask=m) for m in masks])
