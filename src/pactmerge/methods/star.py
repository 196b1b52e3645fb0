"""STAR: Spectral Truncation And Rescale (Lee et al. 2025, "STAR: Spectral truncation and rescale for
model merging", NAACL 2025, arXiv:2502.10339; "Model Merging Overview" survey, "Spectral Truncation
and Rescale (STAR)").

For a 2-D parameter and each task vector ``Delta_t = U diag(sigma) V^T`` (``m x n``, ``R = min(m, n)``
singular values, descending)::

    r_t        = min { k : sum_{i<=k} sigma_i >= (eta / 100) * sum_{i<=R} sigma_i }     (adaptive rank)
    sigma'_i   = sigma_i * sum_{i<=R} sigma_i / sum_{i<=r_t} sigma_i,   i <= r_t        (nuclear norm kept)
    Delta_t'   = U[:, :r_t] diag(sigma') V[:, :r_t]^T
    merged     = (1 / T) sum_t w_t Delta_t'

``eta`` (default 40, the paper's recommendation) is the share of the nuclear norm the kept
components must hold; the rescale gives ``Delta_t'`` the nuclear norm of ``Delta_t``. A zero task
vector stays zero. 1-D parameters: the mean of the task vectors. ``w_t`` are the models' weights
(default 1, the paper's plain average). The engine's ``alpha`` multiplies the result (the paper
uses 1).

Neither fusion_bench 0.2.33 nor mergekit 0.1.5 has STAR.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.methods.isotropic import mean_of
from pactmerge.methods.task_arithmetic import weighted_sum
from pactmerge.registry import ParamContext, Params, register_method


class StarParams(Params):
    eta: float = Field(40.0, gt=0.0, le=100.0, description="percentage of the nuclear norm the kept components hold")


def star_rank(s: Tensor, eta: float) -> int:
    """Smallest ``k`` with ``sum(s[:k]) >= eta / 100 * sum(s)`` (0 for an all-zero spectrum)."""
    total = s.sum()
    if total <= 0:
        return 0
    # Counting the partial sums below the target is robust to the last one rounding below the total.
    short = torch.cumsum(s, 0) < (eta / 100.0) * total
    return min(int(short.sum()) + 1, s.numel())


def star_truncate(d: Tensor, eta: float) -> Tensor:
    """``Delta'``: the top ``star_rank`` components of ``d`` rescaled to ``d``'s nuclear norm."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = star_rank(s, eta)
    if r == 0:
        return torch.zeros_like(d)
    scaled = s[:r] * (s.sum() / s[:r].sum())
    return (u[:, :r] * scaled) @ vh[:r]


@register_method("star", params=StarParams)
def star(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: StarParams) -> Tensor:
    """STAR: per task, keep the top singular values holding eta% of the nuclear norm, rescale to it; average."""
    if not ctx.info.is_matrix:
        return mean_of(deltas)
    T = len(deltas)
    return weighted_sum([star_truncate(d, p.eta) for d in deltas], [w / T for w in ctx.weights])
