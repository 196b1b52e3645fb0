"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023).

For a linear weight ``y = W x`` (stored ``(d_out, d_in)``), each model's Gram matrix of its inputs
``G_t = X_t^T X_t`` (``(d_in, d_in)``, from :mod:`pactmerge.stats`) and the per-model weights
``w_t`` (default 1), RegMean minimises ``sum_t w_t ||W X_t^T - W_t X_t^T||^2``::

    G~_t   = off_diagonal * G_t + (1 - off_diagonal) * diag(G_t)     (the paper's alpha)
    W_M    = (sum_t w_t W_t G~_t) (sum_t w_t G~_t)^-1

In task vectors (``W_t = W_B + Delta_t``; ``W_B`` cancels), the merged task vector is
``(sum_t w_t Delta_t G~_t) (sum_t w_t G~_t)^-1``, so ``alpha = 1`` in the config is RegMean itself.
The linear solve replaces the inverse. Input coordinates no model ever activates (a zero row and
column of ``sum_t G~_t``) do not enter the objective; their columns get the weighted mean of the
task vectors. A singular sum otherwise is an error (lower ``off_diagonal``, or more data).

``normalize`` scales each Gram matrix before merging: ``examples`` (default) divides ``G_t`` by
the N_t examples it was summed over -- the paper's plain sum up to a factor common to all
models when every model uses the same N; ``tokens`` divides by the rows summed (fusion_bench's
per-token mean, which there also counts padding); ``none`` uses the sums as they are.

Every parameter without Gram statistics (biases, norms, embeddings, layers the calibration model
does not have) is merged by weighted averaging, ``sum_t w_t Delta_t / sum_t w_t``, as in the
paper and its reference code.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.registry import ParamContext, Params, register_method


class RegMeanParams(Params):
    off_diagonal: float = Field(
        0.9, ge=0.0, le=1.0, description="the paper's alpha: scale of the Gram matrices' off-diagonal entries"
    )
    normalize: Literal["examples", "tokens", "none"] = Field(
        "examples", description="divide each Gram matrix by its examples N_t, its rows (tokens), or not at all"
    )


def weighted_mean(deltas: list[Tensor], weights: list[float]) -> Tensor:
    total = float(sum(weights))
    if total == 0.0:
        raise PactMergeError("the models' weights sum to 0 (cannot average)")
    out = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        out.add_(d, alpha=w / total)
    return out


def regmean_closed_form(deltas: list[Tensor], grams: list[Tensor], weights: list[float], name: str = "") -> Tensor:
    """``(sum_t w_t Delta_t G_t)(sum_t w_t G_t)^-1`` for ``(m, n)`` task vectors and ``(n, n)`` Grams
    (already shrunk/normalised); dead input coordinates get the weighted mean (module doc)."""
    total = sum(w * g for w, g in zip(weights, grams))
    rhs = sum(w * (d @ g) for w, d, g in zip(weights, deltas, grams))
    assert isinstance(total, Tensor) and isinstance(rhs, Tensor)
    live = total.abs().sum(0) > 0
    out = weighted_mean(deltas, weights)
    if not bool(live.any()):
        return out
    sub = total[live][:, live]
    try:
        # X sub = rhs  <=>  sub X^T = rhs^T  (sub is symmetric)
        solved = torch.linalg.solve(sub, rhs[:, live].mT).mT
    except RuntimeError:  # torch.linalg.LinAlgError: exactly singular
        solved = None
    if solved is None or not bool(torch.isfinite(solved).all()):
        raise PactMergeError(
            f"regmean: parameter {name!r}: the summed Gram matrix is singular (set parameters.off_diagonal < 1,"
            " or use more calibration examples)"
        )
    out[:, live] = solved
    return out


@register_method(
    "regmean",
    params=RegMeanParams,
    needs=("covariance",),
    uses_weight=True,
    paper="Dataless knowledge fusion by merging weights of language models (arXiv:2212.09849)",
)
def regmean(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: RegMeanParams) -> Tensor:
    """RegMean: per linear weight, (sum_t w_t Delta_t G~_t)(sum_t w_t G~_t)^-1; other parameters averaged."""
    stats = ctx.calibration
    grams = stats.covariance() if stats is not None and ctx.info.is_matrix else None
    if grams is None:
        return weighted_mean(deltas, ctx.weights)
    if p.normalize == "examples":
        scale = [1.0 / n if n else 0.0 for n in stats.examples]
    elif p.normalize == "tokens":
        scale = [1.0 / c if c else 0.0 for c in stats.counts("covariance")]
    else:
        scale = [1.0] * len(grams)
    shrunk = []
    for g, s in zip(grams, scale):
        diag = torch.diag_embed(g.diagonal())
        shrunk.append(s * (p.off_diagonal * g + (1.0 - p.off_diagonal) * diag))
    if stats.transposed:
        return regmean_closed_form([d.mT for d in deltas], shrunk, ctx.weights, ctx.name).mT
    return regmean_closed_form(deltas, shrunk, ctx.weights, ctx.name)
