"""Iso-C (Marczak et al. 2025, "No task left behind: isotropic model merging").

For a 2-D parameter, M = sum_t Delta_t = U S V^T; Iso-C replaces every singular value by their
mean sigma_bar = mean(S) over all min(m, n) of them: merged = sigma_bar * U V^T. 1-D parameters
take the mean of the task vectors (as the reference code does).

Well-posed form (default, ``rank_aware: true``): directions whose singular value is numerically
zero (below ``rank_rtol * S[0]``) get no update. sigma_bar stays the mean over all min(m, n)
values, so the two forms differ only on those null directions, whose singular vectors are
arbitrary (whatever LAPACK completes the basis with). After PACT with T >= 3 tasks the sum has
exactly such a null space -- the pretrained core PACT protects -- and the literal form writes
sigma_bar into it (../shared/notes/pact-composition.md).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.linalg import numerical_rank
from pactmerge.methods.task_arithmetic import weighted_sum
from pactmerge.registry import ParamContext, Params, register_method


class IsoCParams(Params):
    rank_aware: bool = Field(True, description="drop numerically-null directions (False: the literal formula)")
    rank_rtol: float | None = Field(None, gt=0, description="null tolerance relative to S[0]; default max(m,n)*eps")


def mean_of(deltas: list[Tensor]) -> Tensor:
    return weighted_sum(deltas, [1.0 / len(deltas)] * len(deltas))


def isotropic_flatten(m: Tensor, rank_aware: bool = True, rank_rtol: float | None = None) -> Tensor:
    """sigma_bar * U V^T of ``m = U S V^T`` with sigma_bar = mean(S) over all min(m, n) values.

    With ``rank_aware`` the product runs over the numerical range of ``m`` only.
    """
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    sigma_bar = s.mean()
    if rank_aware:
        r = numerical_rank(s, tuple(m.shape), rank_rtol)
        u, vh = u[:, :r], vh[:r]
    return sigma_bar * (u @ vh)


@register_method("iso_c", params=IsoCParams)
def iso_c(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: IsoCParams) -> Tensor:
    """Iso-C: the spectrum of sum_t Delta_t flattened to its mean; 1-D parameters: mean of Delta_t."""
    if not ctx.info.is_matrix:
        return mean_of(deltas)
    return isotropic_flatten(weighted_sum(deltas, ctx.weights), p.rank_aware, p.rank_rtol)
