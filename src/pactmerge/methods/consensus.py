"""Consensus Merging with TALL masks (Wang et al. 2024, "Localizing task information for improved
model merging and compression"; "Model Merging Overview" survey, "TALL-Masks and Consensus Merging").

For task vectors ``Delta_t`` (any shape), entrywise::

    Delta_MTL = sum_t Delta_t
    m_t       = [ |Delta_t| >= lambda_t * |Delta_MTL - Delta_t| ]        (TALL mask of task t)
    m         = [ sum_t m_t >= k ]                                        (consensus mask)
    merged    = m * base_method(Delta_1, ..., Delta_T)

``k = 2`` (default) drops "selfish" entries (relevant to one task only) and "catastrophic" ones
(relevant to none); ``k = 0`` reduces to the base method, ``k > T`` to the zero update.
``base_method`` is ``task_arithmetic`` (sum_t w_t Delta_t, the models' weights; the paper's
Consensus-TA: m * Delta_MTL) or ``ties`` (the options under ``ties:``; Consensus-TIES). The mask
multiplies the merged vector, as the survey's tau_consensus = m * tau_MTL; for Task Arithmetic
that is the same as merging the masked task vectors. The masks use the unweighted sum.

``lambda_t``: a model's ``parameters: {lambda: ...}`` if given, else the method's ``lambda``. The
paper tunes lambda_t per task on validation data over {0.2, 0.3, 0.4, 0.5, 0.6}; the data-free
default here is 0.6, fusion_bench's default for TALL masks (``tall_mask_lambda: 0.6``). Smaller
lambda selects more entries. (The survey writes ``>=``; fusion_bench's code ``>``: they differ only
where both sides are equal, e.g. an entry that is 0 in every task.)
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


class ConsensusParams(Params):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    k: int = Field(2, ge=0, le=10_000, description="an entry is kept when at least k TALL masks select it")
    lambda_: float = Field(
        0.6, ge=0.0, alias="lambda", description="default lambda_t (a model's parameters.lambda overrides)"
    )
    base_method: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    ties: TiesParams = Field(default_factory=TiesParams, description="TIES options when base_method is ties")


def task_lambdas(ctx: ParamContext, p: ConsensusParams) -> list[float]:
    out = []
    for i, mp in enumerate(ctx.model_params):
        lam = mp.get("lambda", p.lambda_)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
            raise PactMergeError(
                f"config key 'models[{i}].parameters.lambda' (consensus): must be a number >= 0, got {lam!r}"
            )
        out.append(float(lam))
    return out


def consensus_mask(deltas: list[Tensor], lambdas: list[float], k: int) -> Tensor:
    """Boolean mask: at least ``k`` of the TALL masks |Delta_t| >= lambda_t |Delta_MTL - Delta_t| hold."""
    mtl = weighted_sum(deltas, [1.0] * len(deltas))
    count = torch.zeros(deltas[0].shape, dtype=torch.int32, device=deltas[0].device)
    for d, lam in zip(deltas, lambdas):
        count += (d.abs() >= lam * (mtl - d).abs()).to(torch.int32)
    return count >= k


def _prepare(stream, p: ConsensusParams) -> dict:
    # Consensus-TIES with a model-wide top-k needs TIES's thresholds (on the unmasked task vectors).
    if p.base_method == "ties":
        return ties_prepare(stream, p.ties)
    return {}


@register_method("consensus", params=ConsensusParams, prepare=_prepare)
def consensus(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: ConsensusParams) -> Tensor:
    """Consensus merging: base method (TA or TIES) masked to entries >= k TALL masks agree on."""
    mask = consensus_mask(deltas, task_lambdas(ctx, p), p.k)
    if p.base_method == "ties":
        merged = ties_merge(
            deltas, ctx.weights, thresholds_for(deltas, ctx, p.ties, ctx.stats.get("consensus")), p.ties.aggregate
        )
    else:
        merged = weighted_sum(deltas, ctx.weights)
    return torch.where(mask, merged, torch.zeros((), dtype=merged.dtype, device=merged.device))
