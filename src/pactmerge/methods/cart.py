"""CART: Centered Arithmetic with Rank-reduced Task vectors (Choi et al. 2025, "Revisiting weight
averaging for model merging", arXiv:2412.12153; "Model Merging Overview" survey, "Centered Arithmetic
with Rank-reduced Task Vectors (CART)").

For a 2-D parameter with fine-tuned weights ``theta_t``, ``theta_avg = (1/T) sum_t theta_t`` and
``SVD_k`` the best rank-``k`` approximation::

    theta_M = theta_avg + lambda * sum_t SVD_k(theta_t - theta_avg)

so, as a merged task vector (``Delta_t = theta_t - theta_0``, ``Delta_avg = (1/T) sum_t Delta_t``)::

    merged  = Delta_avg + lambda * sum_t SVD_k(Delta_t - Delta_avg)

``k = ceil(rank_ratio * min(m, n))`` (default 0.08, the paper's "about 8% of the full rank";
``rank: k`` fixes it instead). ``k = min(m, n)`` gives back weight averaging (the centred vectors
sum to zero), ``k = 0`` too. ``lambda`` (default 1.0) scales only the low-rank centred part --
the paper tunes it on validation data -- while the engine's ``alpha`` scales the whole update
(use ``alpha: 1``, the paper's form). 1-D parameters: ``Delta_avg`` (the centred low-rank part
is not defined for them; the centred vectors' sum is zero anyway).

Per-model weights are not part of CART: weights other than 1 are refused. Neither fusion_bench
0.2.33 nor mergekit 0.1.5 has CART.
"""

from __future__ import annotations

import math

import torch
from pydantic import ConfigDict, Field, model_validator
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.methods.isotropic import mean_of
from pactmerge.registry import ParamContext, ParamInfo, Params, register_method


class CartParams(Params):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    rank_ratio: float | None = Field(0.08, gt=0.0, le=1.0, description="k = ceil(rank_ratio * min(m, n))")
    rank: int | None = Field(None, ge=0, description="fixed k instead of rank_ratio")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the low-rank centred part")

    @model_validator(mode="after")
    def _one_rank(self):
        if self.rank is not None:
            self.rank_ratio = None
        return self

    def k_for(self, shape: tuple[int, ...]) -> int:
        r = min(shape[-2], shape[-1])
        if self.rank is not None:
            return min(self.rank, r)
        assert self.rank_ratio is not None
        return min(math.ceil(self.rank_ratio * r), r)


def _check(p: CartParams, info: ParamInfo) -> None:
    if info.is_matrix and p.rank is not None and p.rank > min(info.shape):
        raise PactMergeError(
            f"parameter {info.name!r} {tuple(info.shape)}: cart.rank={p.rank} exceeds min(m, n)={min(info.shape)}"
            " (lower rank, use rank_ratio, or exclude the parameter)"
        )


def truncated(d: Tensor, k: int) -> Tensor:
    """The best rank-``k`` approximation of ``d``."""
    if k == 0:
        return torch.zeros_like(d)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@register_method("cart", params=CartParams, check=_check)
def cart(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: CartParams) -> Tensor:
    """CART: weight average plus lambda times the rank-k parts of the task vectors centred on that average."""
    if any(w != 1.0 for w in ctx.weights):
        raise PactMergeError("method cart: per-model weights are not part of CART; remove the models' weight keys")
    avg = mean_of(deltas)
    if not ctx.info.is_matrix:
        return avg
    k = p.k_for(tuple(avg.shape))
    out = avg.clone()
    for d in deltas:
        out.add_(truncated(d - avg, k), alpha=p.lambda_)
    return out
