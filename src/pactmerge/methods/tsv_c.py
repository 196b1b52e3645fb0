"""TSV-C: Task Singular Vectors compression (Gargiulo et al. 2025, "Task singular vectors: reducing
task interference in model merging", CVPR 2025; "Model Merging Overview" survey, TSV-Merging,
"TSV-Compress"): each task keeps a low-rank copy of its own update, used when the task is known.

For a 2-D parameter with ``Delta_t = U_t diag(S_t) V_t^T`` (``m x n``, r = min(m, n))::

    k         = floor(fraction * r)          (default fraction 1/T: all tasks together store one model's worth)
    Delta^_t  = U_t[:, :k] diag(S_t[:k]) V_t[:, :k]^T          task t's update, kept as the factors
                                                                (U_t[:, :k] S_t[:k], V_t[:, :k]^T)

1-D parameters keep each task's own vector (as the reference code stores them). The result is
task-specific (:mod:`pactmerge.modulators`): the merged model uses the shared vector
``shared`` -- ``tsv_m`` (default: TSV-M on the same task vectors and weights, the paper's
merge of the same singular vectors) or ``sum`` (``sum_t w_t Delta^_t``) -- and task ``t``'s model
is ``theta_0 + alpha * w_t Delta^_t`` (``pactmerge materialize OUT t DEST``); with ``alpha = 1``
and weight 1 that is exactly the rank-k task update.

fusion_bench 0.2.33 keeps ``int(r * sv_reduction)`` triplets per task
(``TSVC_utils.compress_tv``; its ``TaskSingularVectorCompression`` algorithm is not implemented):
the same ``k`` with ``fraction = sv_reduction``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from pactmerge.lowrank import Delta, LowRankDelta, densify
from pactmerge.methods.isotropic import mean_of
from pactmerge.methods.task_arithmetic import weighted_sum
from pactmerge.methods.tsv import tsv_merge
from pactmerge.modulators import Modulator, TaskSpecific
from pactmerge.registry import ParamContext, Params, register_method


class TsvCParams(Params):
    fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="k = floor(fraction * min(m, n)) per task; default 1/T"
    )
    shared: Literal["tsv_m", "sum"] = Field("tsv_m", description="the merged model: TSV-M, or the sum of Delta^_t")


def compress(d: Tensor, k: int) -> LowRankDelta:
    """``Delta^`` as factors ``(U[:, :k] diag(S[:k]), V[:, :k]^T)`` of shapes ``(m, k)``, ``(k, n)``."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return LowRankDelta((u[:, :k] * s[:k]).contiguous(), vh[:k].contiguous())


@register_method("tsv_c", params=TsvCParams, task_specific=True)
def tsv_c(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: TsvCParams) -> TaskSpecific:
    """TSV-C: each task's top floor(fraction r) singular triplets as its own update; shared: TSV-M (or their sum)."""
    scaled = [d * w if w != 1.0 else d for d, w in zip(deltas, ctx.weights)]
    if not ctx.info.is_matrix:
        return TaskSpecific(mean_of(scaled), [Modulator(replacement=d) for d in scaled])
    fraction = p.fraction if p.fraction is not None else 1.0 / len(deltas)
    k = int(fraction * min(deltas[0].shape))
    compressed = [compress(d, k) for d in scaled]
    if p.shared == "tsv_m":
        merged = densify([tsv_merge(list[Delta](scaled))])[0]
    else:
        merged = weighted_sum(densify(compressed), [1.0] * len(compressed))
    return TaskSpecific(merged, [Modulator(replacement=c) for c in compressed])
