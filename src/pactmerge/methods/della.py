"""DELLA-Merging (Deep et al. 2024, "DELLA-Merging: Reducing interference in model merging through
magnitude-based sampling", arXiv:2406.11617; "Model Merging Overview" survey, "DELLA-Merging").

MAGPRUNE, per task and per row of a parameter (its first dimension; a 1-D parameter is one
row), with ``n`` entries in the row and ``r_i`` the rank of ``|Delta_t[i]|`` in it, 0 for the
largest and ``n - 1`` for the smallest (ties broken by position)::

    p_i     = (1 - density) - epsilon / 2 + epsilon * r_i / n    drop probability (the paper's p_min + Delta_i,
                                                                  mean drop rate p = 1 - density)
    m_i     ~ Bernoulli(1 - p_i)                                  1 = keep
    D_t[i]  = m_i * Delta_t[i] * c_i

so larger magnitudes are dropped less often. Rescale ``c_i``: ``keep_prob`` (the paper, default)
``1 / (1 - p_i)``, which keeps ``E[D_t] = Delta_t``; ``l1`` (mergekit) one factor per task and
parameter restoring ``||Delta_t||_1``; ``none``. Then Elect and Fuse, as TIES without the trim:
``gamma = sgn(sum_t w_t D_t)``, ``merged = sum_{t agreeing} w_t D_t / sum_{t agreeing} w_t``
(``aggregate: mean``, the paper; ``sum``); ``elect: false`` skips the election and sums
``sum_t w_t D_t`` (mergekit's ``della_linear``). The engine's ``alpha`` is the paper's lambda.

Requires ``0 <= p_i < 1`` for every rank: ``epsilon / 2 <= 1 - density`` and
``epsilon / 2 < density`` (parameters outside are refused). ``epsilon = 0`` is DARE with
``p = 1 - density``. Draws: ``ctx.generator`` per (config seed, parameter, task).

mergekit 0.1.5 ``della``: keep probability ``density - eps' + 2 eps' q`` with ``q = rank / (n - 1)``
from the smallest (0) to the largest (1) in the row -- the same linear ramp with ``eps' =
epsilon / 2`` spread over ``[0, 1]`` instead of ``[0, (n - 1)/n]`` -- L1 rescale (``rescale:
l1`` here), sign election by the sum, disjoint weighted mean (``normalize: true``), lambda.
Its masks come from torch's global generator, so single runs differ entrywise
(benchmarks/reference_parity.py compares the deterministic part, ``density: 1``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from pactmerge.methods.task_arithmetic import weighted_sum
from pactmerge.methods.ties import ties_merge
from pactmerge.registry import ParamContext, Params, register_method

_SALT = 104_729  # keeps DELLA's draws apart from a `dare` filter's on the same parameter


class DellaParams(Params):
    density: float = Field(0.7, gt=0.0, le=1.0, description="mean fraction of entries kept (1 - the paper's p)")
    epsilon: float = Field(0.1, ge=0.0, lt=1.0, description="spread of the drop probabilities across magnitude ranks")
    rescale: Literal["keep_prob", "l1", "none"] = Field(
        "keep_prob", description="1/(1 - p_i) per entry (paper); restore the L1 norm (mergekit); none"
    )
    elect: bool = Field(True, description="TIES-style sign election before fusing (false: della_linear)")
    aggregate: Literal["mean", "sum"] = Field("mean", description="fuse the agreeing entries by mean (paper) or sum")

    @model_validator(mode="after")
    def _probabilities_valid(self):
        half = self.epsilon / 2
        if half > 1.0 - self.density + 1e-12 or (self.density < 1.0 and half >= self.density):
            raise ValueError(
                f"density={self.density:g}, epsilon={self.epsilon:g}: drop probabilities (1 - density) -/+ epsilon/2"
                " must lie in [0, 1); lower epsilon"
            )
        return self


def magprune_keep_probability(d: Tensor, density: float, epsilon: float) -> Tensor:
    """``1 - p_i`` for every entry of ``d`` (float64, ``d``'s shape): rows are ``d``'s first
    dimension (a 1-D ``d`` is one row); rank 0 is the largest magnitude of its row."""
    rows = d.detach().reshape(1, -1) if d.ndim < 2 else d.detach().reshape(d.shape[0], -1)
    n = rows.shape[1]
    order = torch.sort(rows.abs().to(torch.float64), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=d.device).expand_as(order))
    drop = (1.0 - density) - epsilon / 2 + epsilon * rank.to(torch.float64) / n
    return (1.0 - drop).reshape(d.shape)


def magprune(d: Tensor, p: DellaParams, gen: torch.Generator) -> Tensor:
    """One task vector dropped and rescaled by MAGPRUNE (see module doc)."""
    if p.density >= 1.0 and p.epsilon == 0.0:
        return d
    keep_prob = magprune_keep_probability(d, p.density, p.epsilon)
    draws = torch.rand(d.shape, generator=gen, dtype=torch.float64).to(d.device)
    keep = draws < keep_prob
    kept = torch.where(keep, d, torch.zeros((), dtype=d.dtype, device=d.device))
    if p.rescale == "keep_prob":
        return kept / keep_prob.to(d.dtype)
    if p.rescale == "l1":
        before, after = d.abs().sum(), kept.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            return kept * (before / after)
    return kept


@register_method("della", params=DellaParams)
def della(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: DellaParams) -> Tensor:
    """DELLA: magnitude-ranked stochastic drop (MAGPRUNE) with rescale, sign election, disjoint mean."""
    pruned = [magprune(d, p, ctx.generator(salt=_SALT + t)) for t, d in enumerate(deltas)]
    if not p.elect:
        return weighted_sum(pruned, ctx.weights)
    return ties_merge(pruned, ctx.weights, [0.0] * len(pruned), p.aggregate)
