"""Consensus Merging with TALL masks (Wang et al. 2024, "Localizing task information for improved
model merging and compression"; "Model Merging Overview" survey, "TALL-Masks and Consensus Merging").

For task vectors ``Delta_t`` (any shape), entrywise::

    tau_MTL = base_method(Delta_1, ..., Delta_T)                         (the multi-task vector)
    m_t     = [ |Delta_t| >= lambda_t * |tau_MTL - Delta_t| ]            (TALL mask of task t)
    m       = [ sum_t m_t >= k ]                                          (consensus mask)
    merged  = m * tau_MTL

``base_method``: ``task_arithmetic`` (``tau_MTL = sum_t w_t Delta_t``, the models' weights;
Consensus-TA) or ``ties`` (TIES with the options under ``ties:``; Consensus-TIES). As in the
paper's code (github.com/nik-dim/tall_masks, ``use_ties``), Consensus-TIES builds the TALL masks
from the TIES-merged vector itself and TIES aggregates by the disjoint *sum* (``ties:
{aggregate: sum}`` is the default here; ``mean`` stays available). ``k = 2`` (default) drops
"selfish" entries (relevant to one task only) and "catastrophic" ones (relevant to none);
``k = 0`` reduces to the base method, ``k > T`` to the zero update.

``lambda_t``: a model's ``parameters: {lambda: ...}`` if given, else the method's ``lambda``. The
paper tunes lambda_t per task on validation data over {0.2, 0.3, 0.4, 0.5, 0.6}; the data-free
default here is 0.6, fusion_bench's default for TALL masks (``tall_mask_lambda: 0.6``). Smaller
lambda selects more entries. (The survey writes ``>=``; the TALL code ``>``: they differ only
where both sides are equal, which for lambda > 0 means ``Delta_t = tau_MTL = 0`` -- an entry the
mask multiplies by 0 either way.)

Up to pactmerge 0.1.0 the masks compared each task vector with the plain sum ``sum_t Delta_t``
whatever the base method, and Consensus-TIES used the disjoint mean; with ``base_method: ties``
that was neither the paper's method nor a documented variant, and it was replaced.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict, Field
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.methods.task_arithmetic import weighted_sum
from pactmerge.methods.ties import TiesParams, thresholds_for, ties_merge, ties_prepare
from pactmerge.registry import ParamContext, Params, register_method


class DisjointSumTiesParams(TiesParams):
    """TIES options whose aggregate defaults to the disjoint sum (the TALL paper's TIES)."""

    aggregate: Literal["mean", "sum"] = Field("sum", description="disjoint sum (TALL paper) or disjoint mean")


class ConsensusParams(Params):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    k: int = Field(2, ge=0, description="an entry is kept when at least k TALL masks select it")
    lambda_: float = Field(
        0.6, ge=0.0, alias="lambda", description="default lambda_t (a model's parameters.lambda overrides)"
    )
    base_method: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    ties: DisjointSumTiesParams = Field(
        default_factory=DisjointSumTiesParams, description="TIES options when base_method is ties"
    )


def task_lambdas(ctx: ParamContext, default: float) -> list[float]:
    """lambda_t per task: the model's ``parameters.lambda`` if given, else ``default``."""
    out = []
    for i, mp in enumerate(ctx.model_params):
        lam = mp.get("lambda", default)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
            raise PactMergeError(f"config key 'models[{i}].parameters.lambda': must be a number >= 0, got {lam!r}")
        out.append(float(lam))
    return out


def tall_masks(deltas: list[Tensor], mtl: Tensor, lambdas: list[float]) -> list[Tensor]:
    """Boolean masks ``|Delta_t| >= lambda_t |tau_MTL - Delta_t|``, one per task, each of ``mtl``'s shape."""
    return [d.abs() >= lam * (mtl - d).abs() for d, lam in zip(deltas, lambdas)]


def consensus_mask(masks: list[Tensor], k: int) -> Tensor:
    """Boolean mask: at least ``k`` of ``masks`` hold."""
    count = torch.zeros(masks[0].shape, dtype=torch.int32, device=masks[0].device)
    for m in masks:
        count += m.to(torch.int32)
    return count >= k


def _prepare(stream, p: ConsensusParams) -> dict:
    # Consensus-TIES with a model-wide top-k needs TIES's thresholds.
    if p.base_method == "ties":
        return ties_prepare(stream, p.ties)
    return {}


@register_method("consensus", params=ConsensusParams, prepare=_prepare)
def consensus(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: ConsensusParams) -> Tensor:
    """Consensus merging: base method (TA or TIES) masked to entries >= k TALL masks (built from it) agree on."""
    if p.base_method == "ties":
        thresholds = thresholds_for(deltas, ctx, p.ties, ctx.stats.get("consensus"))
        mtl = ties_merge(deltas, ctx.weights, thresholds, p.ties.aggregate)
    else:
        mtl = weighted_sum(deltas, ctx.weights)
    mask = consensus_mask(tall_masks(deltas, mtl, task_lambdas(ctx, p.lambda_)), p.k)
    return torch.where(mask, mtl, torch.zeros((), dtype=mtl.dtype, device=mtl.device))
