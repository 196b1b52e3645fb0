"""Model Breadcrumbs (Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling multi-task model merging
with sparse masks", arXiv:2312.06795; "Model Merging Overview" survey, "Model Breadcrumbs").

Per parameter ("layer-wise") and per task, with the ``n`` entries of ``Delta_t`` sorted by
magnitude, ascending (ties broken by position)::

    g = floor(gamma * n)                  the largest magnitudes dropped (outliers)
    k = floor(density * n)                entries kept
    m_t = 1 on the sorted positions [n - g - k, n - g), 0 elsewhere   (drop the small tail and the top g)
    merged = sum_t w_t (m_t * Delta_t)

so exactly ``k`` entries of each task vector survive: the band just below the top ``g``. The
paper's ``beta`` (left tail) is ``1 - density - gamma``; the engine's ``alpha`` is its lambda.
``elect: true`` adds TIES's sign election on the masked task vectors and sums the agreeing
entries (mergekit's ``breadcrumbs_ties``).

mergekit 0.1.5 ``breadcrumbs`` (``sparsify: magnitude_outliers``): the same band
(``target_n = int(density n)``, ``n_top = int(gamma n)``), weights multiplied in, summed
(``normalize: false``), lambda; it shrinks the top drop when ``density + gamma > 1``, where this
method refuses the parameters instead. The two can differ only where magnitudes tie at a band
edge (mergekit's sort order is unspecified).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor

from pactmerge.methods.task_arithmetic import weighted_sum
from pactmerge.methods.ties import ties_merge
from pactmerge.registry import ParamContext, Params, register_method


class BreadcrumbsParams(Params):
    density: float = Field(0.9, gt=0.0, le=1.0, description="fraction of each task vector's entries kept")
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of the largest magnitudes dropped")
    elect: bool = Field(False, description="TIES sign election on the masked task vectors (breadcrumbs_ties)")

    @model_validator(mode="after")
    def _band_fits(self):
        if self.density + self.gamma > 1.0 + 1e-12:
            raise ValueError(
                f"density + gamma = {self.density + self.gamma:g} > 1: the kept band would overlap the dropped top;"
                " lower density or gamma"
            )
        return self


def breadcrumbs_mask(d: Tensor, density: float, gamma: float) -> Tensor:
    """Boolean mask keeping exactly ``floor(density n)`` entries of ``d``: those just below its
    ``floor(gamma n)`` largest magnitudes (ascending magnitude order, ties broken by position)."""
    n = d.numel()
    k, g = int(density * n), int(gamma * n)
    order = torch.sort(d.detach().abs().reshape(-1), stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool, device=d.device)
    keep[order[n - g - k : n - g]] = True
    return keep.reshape(d.shape)


@register_method("breadcrumbs", params=BreadcrumbsParams)
def breadcrumbs(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: BreadcrumbsParams) -> Tensor:
    """Model Breadcrumbs: per layer, keep each task vector's band below its top-gamma magnitudes; weighted sum."""
    masked = [
        torch.where(breadcrumbs_mask(d, p.density, p.gamma), d, torch.zeros((), dtype=d.dtype, device=d.device))
        for d in deltas
    ]
    if p.elect:
        return ties_merge(masked, ctx.weights, [0.0] * len(masked), "sum")
    return weighted_sum(masked, ctx.weights)
