"""DARE: Drop And REscale (Yu et al. 2024, "Language models are Super Mario"; "Model Merging Overview").

For every task vector ``Delta_t`` (any shape) and drop rate ``p``::

    m_t ~ Bernoulli(1 - p) entrywise          (1 = keep)
    Delta~_t = m_t * Delta_t * c_t

with the rescale ``c_t``:

* ``keep_prob`` (the paper, default): ``c_t = 1 / (1 - p)``, so ``E[Delta~_t] = Delta_t``;
* ``l1`` (mergekit 0.1.5's ``dare_*`` with ``rescale: true``): ``c_t = ||Delta_t||_1 / ||m_t * Delta_t||_1``
  (the kept entries restore the L1 norm; ``c_t = 1`` when either norm is below 1e-7, like mergekit);
* ``none``: ``c_t = 1`` (random drop only).

Per model: a model's ``parameters: {p: p_t}`` replaces ``p`` for its task vector (mergekit's
per-model ``density`` of ``dare_*`` is ``1 - p_t``).

The draws come from ``ctx.generator(salt=t)`` on the CPU (then moved to the tensor's device):
the same mask for a given config seed, parameter name, task index and compute dtype, whatever the
device or the order parameters are processed in. The uniform draws are made in the compute dtype
(float32 by default; up to pactmerge 0.1.0 always float64, so float32 merges draw different,
equally distributed masks than that version did). Applies to every merged parameter (matrices and vectors). Put
it in front of any method: ``filters: [dare]`` + ``task_arithmetic`` is DARE-TA (mergekit's
``dare_linear``), + ``ties`` is DARE-TIES.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.registry import ParamContext, Params, register_filter


class DareParams(Params):
    p: float = Field(0.5, ge=0.0, lt=1.0, description="drop probability of each task-vector entry")
    rescale: Literal["keep_prob", "l1", "none"] = Field(
        "keep_prob", description="1/(1-p) (paper); match the L1 norm (mergekit); no rescale"
    )


class DareModelParams(Params):
    """Per-model options of DARE (a model's ``parameters:``)."""

    p: float | None = Field(None, ge=0.0, lt=1.0, strict=True, description="this task's drop probability")


def dare_keep(shape: torch.Size, p: float, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """Keep-mask as 1.0 / 0.0 in ``dtype``, each entry 1 with probability 1 - p (uniform draws in
    ``dtype`` on the CPU; the mask is built in the draws' own buffer)."""
    return torch.rand(shape, generator=gen, dtype=dtype).ge_(p)


def dare_mask(shape: torch.Size, p: float, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    """Boolean keep-mask, each entry True with probability 1 - p (the draws of :func:`dare_keep`)."""
    return torch.rand(shape, generator=gen, dtype=dtype) >= p


@register_filter(
    "dare",
    params=DareParams,
    model_params=DareModelParams,
    paper="Language models are Super Mario: absorbing abilities from homologous models as a free lunch"
    " (arXiv:2311.03099)",
)
def dare(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: DareParams) -> list[Tensor]:
    """DARE: drop each task-vector entry with probability p, rescale the rest by 1/(1-p)."""
    out = []
    for t, d in enumerate(deltas):
        p_t = p.p if ctx.model_params[t].get("p") is None else float(ctx.model_params[t]["p"])
        if p_t == 0.0:
            out.append(d)
            continue
        # The kept values are written into the mask's own buffer: one temporary per task vector.
        kept = dare_keep(d.shape, p_t, ctx.generator(salt=t), d.dtype).to(d.device).mul_(d)
        if p.rescale == "keep_prob":
            kept.div_(1.0 - p_t)
        elif p.rescale == "l1":
            # abs().sum(), not vector_norm(x, 1): torch's float32 vector_norm sums naively (measured
            # 1% off on 11.5 M entries); sum() is pairwise.
            before, after = d.abs().sum(), kept.abs().sum()
            if before >= 1e-7 and after >= 1e-7:
                kept.mul_(before / after)
        out.append(kept)
    return out
