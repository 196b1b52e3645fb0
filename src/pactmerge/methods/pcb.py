"""PCB-Merging: Parameter Competition Balancing (Du et al. 2024, "Parameter competition balancing for
model merging", NeurIPS 2024, arXiv:2410.02396; "Model Merging Overview" survey, "PCB-Merging" and
its appendix "Derivation for the Complete Formulation of PCB-Merging").

Over a scope of ``d`` entries (``scope: model`` -- every merged parameter flattened together, as
the reference code flattens the whole model -- or ``tensor``), for ``T`` task vectors::

    Norm(x)          = (x - min x) / (max x - min x)            min-max over the scope (0 if max = min)
    Softmax(x)_e     = exp(x_e) / sum_{e'} exp(x_e')             over the scope's entries
    beta_intra_i     = Softmax(T * Norm(tau_i * tau_i))          intra-balancing
    beta_inter_i     = sum_j Softmax(Norm(tau_i * tau_j))        inter-balancing (j = 1..T, i included)
    beta_i           = beta_intra_i * beta_inter_i
    m_i              = [beta_i >= sorted(beta_i)[floor((1 - r) d)]]     (ascending sort: keep the top ~r d)
    merged           = sum_i m_i beta_i w_i tau_i / sum_i m_i beta_i   (0 where no task is kept)

``r`` is ``ratio`` (default 0.1, the reference code's ``pcb_ratio``); ``w_i`` are the models'
weights (default 1; the paper's per-task lambda_i, found there by an evolutionary search on
validation data, multiply the task vectors in the numerator only); the engine's ``alpha`` is the
paper's lambda. Scores are computed in float64.

``scope: model`` needs model-wide minima, maxima, softmax denominators and each task's score
threshold before any parameter is merged: ``prepare`` streams the task vectors twice (min/max,
then the denominators) and then selects each task's threshold exactly with TIES's radix
selection over the scores (2 or more passes). Memory: O(T^2) numbers plus one 65,536-bin
histogram per task.

The reference code (github.com/duguodong7/pcb-merging, ``PCB_merge``) differs from the paper's
formulas, which this method follows: it first clips each task's magnitudes at their 0.01% and
99.99% quantiles, uses ``exp(T * Norm(|tau_i|)^2)`` (no softmax denominator), ``tanh(tau_i *
sum_j tau_j)`` as the inter-balancing term, and min-max-normalises the kept scores to [0, 1]
before weighting. fusion_bench 0.2.33 has no PCB-Merging.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.methods.ties import MappedStream, model_thresholds
from pactmerge.registry import ParamContext, Params, register_method


class PcbParams(Params):
    ratio: float = Field(0.1, gt=0.0, le=1.0, description="fraction r of each task's entries kept, by score")
    scope: Literal["model", "tensor"] = Field(
        "model", description="normalise, softmax and rank over the whole model (reference) or per parameter"
    )


def keep_count(n: int, ratio: float) -> int:
    """Entries kept among ``n``: ``n - floor((1 - ratio) n)`` (those >= the sorted value at that index)."""
    return n - int((1.0 - ratio) * n)


def _norm(x: Tensor, lo: float, hi: float) -> Tensor:
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


class PcbStats:
    """Min/max and softmax denominators of the PCB terms over a scope (float64 Python numbers)."""

    def __init__(self, T: int):
        self.T = T
        inf = float("inf")
        self.sq_lo, self.sq_hi = [inf] * T, [-inf] * T
        self.x_lo = [[inf] * T for _ in range(T)]
        self.x_hi = [[-inf] * T for _ in range(T)]
        self.z_intra = [0.0] * T
        self.z_inter = [[0.0] * T for _ in range(T)]

    def observe_range(self, deltas: list[Tensor]) -> None:
        ds = [d.detach().to(torch.float64) for d in deltas]
        for i, a in enumerate(ds):
            sq = a * a
            self.sq_lo[i] = min(self.sq_lo[i], float(sq.min()))
            self.sq_hi[i] = max(self.sq_hi[i], float(sq.max()))
            for j in range(i + 1, self.T):
                x = a * ds[j]
                lo, hi = float(x.min()), float(x.max())
                for u, v in ((i, j), (j, i)):
                    self.x_lo[u][v] = min(self.x_lo[u][v], lo)
                    self.x_hi[u][v] = max(self.x_hi[u][v], hi)
        for i in range(self.T):  # tau_i * tau_i is the squared term
            self.x_lo[i][i], self.x_hi[i][i] = self.sq_lo[i], self.sq_hi[i]

    def observe_denominators(self, deltas: list[Tensor]) -> None:
        ds = [d.detach().to(torch.float64) for d in deltas]
        for i, a in enumerate(ds):
            self.z_intra[i] += float(torch.exp(self.T * _norm(a * a, self.sq_lo[i], self.sq_hi[i])).sum())
            for j in range(i, self.T):
                z = float(torch.exp(_norm(a * ds[j], self.x_lo[i][j], self.x_hi[i][j])).sum())
                self.z_inter[i][j] += z
                if j != i:
                    self.z_inter[j][i] += z

    def scores(self, deltas: list[Tensor]) -> list[Tensor]:
        """``beta_i`` (float64, each task vector's shape) from the statistics of the scope."""
        ds = [d.detach().to(torch.float64) for d in deltas]
        out = []
        for i, a in enumerate(ds):
            intra = torch.exp(self.T * _norm(a * a, self.sq_lo[i], self.sq_hi[i])) / self.z_intra[i]
            inter = torch.zeros_like(a)
            for j, b in enumerate(ds):
                inter += torch.exp(_norm(a * b, self.x_lo[i][j], self.x_hi[i][j])) / self.z_inter[i][j]
            out.append(intra * inter)
        return out


def scope_stats(groups: Iterable[list[Tensor]]) -> PcbStats | None:
    """Statistics over every list of task vectors ``groups`` yields (iterated twice); None if it is empty."""
    stats = None
    for deltas in groups:
        stats = stats or PcbStats(len(deltas))
        stats.observe_range(deltas)
    if stats is None:
        return None
    for deltas in groups:
        stats.observe_denominators(deltas)
    return stats


class _DeltaLists:
    """The task-vector lists of a prepare stream, re-iterable (one streaming pass per iteration)."""

    def __init__(self, stream):
        self._stream = stream

    def __iter__(self):
        for _ctx, _base, deltas in self._stream:
            yield deltas


def _prepare(stream, p: PcbParams) -> dict:
    if p.scope != "model":
        return {}
    stats = scope_stats(_DeltaLists(stream))
    if stats is None:
        return {}
    scored = MappedStream(stream, lambda _ctx, _base, deltas: stats.scores(deltas))
    return {"stats": stats, "thresholds": model_thresholds(scored, lambda n: keep_count(n, p.ratio))}


def pcb_merge(deltas: list[Tensor], weights: list[float], betas: list[Tensor], thresholds: list[float]) -> Tensor:
    """``sum_i m_i beta_i w_i tau_i / sum_i m_i beta_i`` (see module doc), in the task vectors' dtype.

    ``betas``: the scores ``beta_i`` (float64); ``thresholds``: each task's score threshold."""
    num = torch.zeros_like(betas[0])
    den = torch.zeros_like(betas[0])
    for d, w, b, tau in zip(deltas, weights, betas, thresholds):
        kept = torch.where(b >= tau, b, torch.zeros((), dtype=b.dtype, device=b.device))
        num += kept * w * d.to(torch.float64)
        den += kept
    out = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    return out.to(deltas[0].dtype)


@register_method("pcb", params=PcbParams, prepare=_prepare)
def pcb(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: PcbParams) -> Tensor:
    """PCB-Merging: intra- and inter-balancing scores; keep each task's top-ratio scores; score-weighted mean."""
    if p.scope == "model":
        prepared = ctx.stats.get("pcb")
        if not prepared:
            raise RuntimeError("pcb: scope 'model' needs the statistics of its prepare pass")
        return pcb_merge(deltas, ctx.weights, prepared["stats"].scores(deltas), prepared["thresholds"])
    stats = scope_stats([deltas])
    assert stats is not None  # one group
    betas = stats.scores(deltas)
    thresholds = [
        float(torch.kthvalue(b.reshape(-1), b.numel() - keep_count(b.numel(), p.ratio) + 1).values) for b in betas
    ]
    return pcb_merge(deltas, ctx.weights, betas, thresholds)
