"""Write a merged update as a PEFT LoRA adapter folder (``output: adapter``).

For every merged 2-D weight ``W`` (name ``<module>.weight``) with update ``D = alpha * merged``::

    D = U S V^T                (from the factors when D is low-rank: QR of B and of A^T, SVD of
                                the small core -- pactmerge.lowrank.stacked_svd; else a dense SVD)
    q = numerical rank of D    (singular values above max(m, n) * eps * S[0])
    r = q, or min(q, adapter_rank) when adapter_rank is set
    lora_B = U_r sqrt(S_r),  lora_A = sqrt(S_r) V_r^T,  PEFT scale alpha / r = 1

so the adapter is exact whenever r = q (e.g. Task Arithmetic of adapters: rank <= sum of their
ranks), and otherwise the best rank-r approximation (Eckart-Young), with the kept energy
sum(S_r^2) / sum(S_q^2) reported per weight. Modules of different ranks get ``rank_pattern`` /
``alpha_pattern`` entries. With ``fan_in_fan_out`` (the base stores ``W^T``) the factors are
transposed back. Weights with a zero update are not targeted. A LoRA adapter cannot carry
updates of 1-D parameters (biases, norms) or of 2-D parameters not named ``*.weight``: their
norms are reported as dropped (zero for merges of adapters, which never update them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from pactmerge.linalg import numerical_rank
from pactmerge.lowrank import LowRankDelta, stacked_svd


@dataclass
class AdapterReport:
    """What :func:`write_adapter` wrote: per module ``(rank written, numerical rank, kept energy)``."""

    modules: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    dropped: dict[str, float] = field(default_factory=dict)  # parameter -> ||update||_F that no adapter can carry

    @property
    def exact(self) -> bool:
        return all(r == q for r, q, _ in self.modules.values()) and not any(v > 0 for v in self.dropped.values())


def compress(delta: Tensor | LowRankDelta, max_rank: int | None = None) -> tuple[Tensor, Tensor, int, float]:
    """``(B, A, numerical rank, kept energy)`` with ``B A`` the best rank-``min(q, max_rank)``
    approximation of ``delta`` (exact when that is its numerical rank q)."""
    if isinstance(delta, LowRankDelta):
        u, s, vh = stacked_svd([delta])
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    q = numerical_rank(s, tuple(delta.shape))
    r = q if max_rank is None else min(q, max_rank)
    total = float((s[:q] ** 2).sum())
    energy = float((s[:r] ** 2).sum()) / total if total > 0 else 1.0
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r], q, energy


def write_adapter(
    folder: Path,
    updates,
    *,
    max_rank: int | None,
    fan_in_fan_out: bool,
    base_name: str | None,
    dtype_of,
) -> AdapterReport:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``folder``.

    Args:
        updates: iterable of ``(info, update)`` with ``update`` the full ``alpha * merged`` update
            of a merged parameter (dense tensor or :class:`LowRankDelta`), in the compute dtype.
        max_rank: ``adapter_rank`` (None: each weight's numerical rank).
        fan_in_fan_out: the base stores its Linear weights transposed (GPT-2 Conv1D).
        base_name: ``base_model_name_or_path`` for the config (None for an in-memory base).
        dtype_of: ``info -> torch.dtype`` of the written factors.
    """
    report = AdapterReport()
    tensors: dict[str, Tensor] = {}
    for info, update in updates:
        if not info.is_matrix or not info.name.endswith(".weight"):
            norm = float(torch.linalg.vector_norm(update.dense() if isinstance(update, LowRankDelta) else update))
            report.dropped[info.name] = norm
            continue
        b, a, q, energy = compress(update, max_rank)
        if b.shape[1] == 0:
            continue  # a zero update: the module is not targeted
        if fan_in_fan_out:  # stored W^T = B A  ->  the adapter's (B A)^T: swap and transpose
            b, a = a.mT, b.mT
        module = info.name[: -len(".weight")]
        dtype = dtype_of(info)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype).contiguous().cpu()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(dtype).contiguous().cpu()
        report.modules[module] = (b.shape[1], q, energy)
    ranks = {m: r for m, (r, _, _) in report.modules.items()}
    r0 = max(ranks.values(), default=1)
    odd = {m: r for m, r in ranks.items() if r != r0}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_name,
        "r": r0,
        "lora_alpha": r0,  # scale alpha / r = 1: the factors carry the update as is
        "rank_pattern": odd,
        "alpha_pattern": odd,
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (Path(folder) / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(Path(folder) / "adapter_model.safetensors"), metadata={"format": "pt"})
    return report
