"""Per-matrix load-bearing-wall diagnostics of the PACT paper (pure math, one 2-D parameter).

Notation (PACT, arXiv:2606.18627, Sec. 3.2, Eqs. 4-5, 8): ``Delta_t`` is task t's ``(m, n)`` task vector,
``V_{0,K}`` the ``(n, K)`` top-K right singular vectors of the base, ``V_{t,k}`` the ``(n, k)``
top-k right singular vectors of ``Delta_t``, ``V_{t,LBW} = orth((I - V_{t,k}V_{t,k}^T) V_{0,K})``
with rank ``r_t <= K``, and ``P_t = orth([V_{j,LBW}]_{j != t})`` PACT's protection basis.
Every function takes these subspaces as :func:`pactmerge.filters.pact.pact_subspaces` returns
them, so the numbers describe exactly the subspaces a merge uses.

    E_in(t)        = ||Delta_t V_{0,K}||_F^2 / ||Delta_t||_F^2                  (Eq. 37)
    axis(t, i)     = ||Delta_t v_i||^2 / ||Delta_t||_F^2,  i = 1..K;  sum_i = E_in(t)   (App. C.3.3)
    Sim(a, b)      = ||V_{a,LBW}^T V_{b,LBW}||_F^2 / min(r_a, r_b)              (Eq. 7)
    Inf(b -> a)    = ||V_{b,k}^T V_{a,LBW}||_F^2 / k                            (Eq. 7), stored as inf[a, b]
    removed(t)     = ||Delta_t P_t||_F^2 / ||Delta_t||_F^2    energy PACT strips (Eq. 9, Theorem 1)
    residual(t)    = ||V_{0,K} - P_t P_t^T V_{0,K}||_F / sqrt(K)   0 iff the whole core lies in span(P_t)

Products are formed in the tensors' dtype (the merge's compute dtype; they are only ``m x K`` /
``K x k``) and every norm and ratio is accumulated in float64. An undefined ratio (a zero task
vector, an empty LBW subspace) is NaN, never a made-up 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

F64 = torch.float64


def _sq(x: Tensor) -> Tensor:
    """Squared Frobenius norm in float64 (no float64 copy of a large input is kept)."""
    return torch.linalg.vector_norm(x, dtype=F64).square()


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return num / den if float(den) > 0 else torch.full_like(num, math.nan)


def core_axis_energy(delta: Tensor, core: Tensor) -> Tensor:
    """``(K,)`` float64: ``||Delta v_i||^2 / ||Delta||_F^2`` for each core axis ``v_i`` (column of
    ``core``). Sums to :func:`intrusion_energy` because the columns are orthonormal."""
    cols = torch.linalg.vector_norm(delta @ core, dim=0, dtype=F64).square()
    return _ratio(cols, _sq(delta))


def intrusion_energy(delta: Tensor, core: Tensor) -> float:
    """E_in = ``||Delta V_{0,K}||_F^2 / ||Delta||_F^2`` (Eq. 37), in [0, 1]."""
    return float(_ratio(_sq(delta @ core), _sq(delta)))


def lbw_similarity(lbw: list[Tensor]) -> Tensor:
    """``(T, T)`` float64 Sacred Space Similarity (Eq. 7); ``sim[a, b] = ||V_a^T V_b||_F^2 / min(r_a, r_b)``.

    Symmetric, in [0, 1], 1 on the diagonal for a non-empty LBW; NaN where an LBW subspace is empty.
    """
    T = len(lbw)
    out = torch.full((T, T), math.nan, dtype=F64)
    for a in range(T):
        for b in range(T):
            r = min(lbw[a].shape[1], lbw[b].shape[1])
            if r > 0:
                out[a, b] = float(_sq(lbw[a].mT @ lbw[b])) / r
    return out


def hidden_interference(active: list[Tensor], lbw: list[Tensor]) -> Tensor:
    """``(T, T)`` float64 Hidden Interference Ratio (Eq. 7): ``inf[a, b] = Inf(b -> a) =
    ||V_{b,k}^T V_{a,LBW}||_F^2 / k``, the share of task b's active directions that fall into task
    a's LBW subspace. The diagonal is 0 up to round-off, since V_{t,LBW} is orthogonal to V_{t,k}
    by construction (Eq. 5). NaN where ``k = 0``.
    """
    T = len(active)
    out = torch.full((T, T), math.nan, dtype=F64)
    for a in range(T):
        for b in range(T):
            k = active[b].shape[1]
            if k > 0:
                out[a, b] = float(_sq(active[b].mT @ lbw[a])) / k
    return out


def removed_energy(delta: Tensor, protect: Tensor) -> float:
    """``||Delta P||_F^2 / ||Delta||_F^2``: the share of the task vector's energy that PACT's
    projection ``Delta - Delta P P^T`` (Eq. 9) discards; the ``||Delta_j P_j||`` of Theorem 1."""
    if protect.shape[1] == 0:
        return 0.0 if float(_sq(delta)) > 0 else math.nan
    return float(_ratio(_sq(delta @ protect), _sq(delta)))


def core_residual(core: Tensor, protect: Tensor) -> float:
    """``||V_{0,K} - P P^T V_{0,K}||_F / sqrt(K)`` in [0, 1]: the RMS sine of the angles between
    the core axes and span(P); 0 when the whole core is protected (the regime of
    README "Composing PACT with spectrum-flattening methods": generically T >= 4 for K, k = 15, 8),
    1 when P is orthogonal to it."""
    K = core.shape[1]
    if K == 0:
        return math.nan
    rest = core - protect @ (protect.mT @ core)
    return float(_sq(rest).sqrt() / math.sqrt(K))


def protected_tolerance(dtype: torch.dtype) -> float:
    """Largest :func:`core_residual` counted as "core protected": 1000 eps of the compute dtype,
    above the round-off of the rank-revealing orth, far below any real gap."""
    return 1000 * torch.finfo(dtype).eps


@dataclass
class ParamMetrics:
    """All diagnostics of one 2-D parameter with T tasks and core rank K (float64 CPU tensors)."""

    intrusion_energy: Tensor  # (T,)    E_in(t), Eq. 37
    core_axis_energy: Tensor  # (T, K)  per-axis split of E_in (rows sum to E_in)
    sim: Tensor  # (T, T)  Sim(a, b), Eq. 7
    inf: Tensor  # (T, T)  inf[a, b] = Inf(b -> a), Eq. 7
    lbw_rank: Tensor  # (T,)    r_t = dim V_{t,LBW}
    protect_dim: Tensor  # (T,)    dim P_t (0 where PACT does not filter this parameter)
    removed_energy: Tensor  # (T,)    ||Delta_t P_t||^2 / ||Delta_t||^2
    core_residual: Tensor  # (T,)    ||V_{0,K} - P_t P_t^T V_{0,K}||_F / sqrt(K)
    core_protected: Tensor  # (T,) bool  core_residual <= protected_tolerance(compute dtype)
    pact_applied: bool  # whether the configured merge filters this parameter at all


def param_metrics(deltas: list[Tensor], sub, pact_applied: bool = True) -> ParamMetrics:
    """Every diagnostic of one parameter.

    Args:
        deltas: T task vectors ``(m, n)``, as PACT receives them.
        sub: :class:`pactmerge.filters.pact.PactSubspaces` of those task vectors.
        pact_applied: False where the merge leaves the parameter unfiltered (beyond ``depth``,
            fewer than 2 tasks): then P_t is empty, nothing is removed and the core is unprotected.
    """
    core = sub.core
    dtype = core.dtype
    T = len(deltas)
    axis = (
        torch.stack([core_axis_energy(d, core).cpu() for d in deltas])
        if T
        else torch.zeros((0, core.shape[1]), dtype=F64)
    )
    empty = core.new_zeros((core.shape[0], 0))
    protect = list(sub.protect) if pact_applied else [empty] * T
    residual = torch.tensor([core_residual(core, P) for P in protect], dtype=F64)
    return ParamMetrics(
        intrusion_energy=torch.tensor([intrusion_energy(d, core) for d in deltas], dtype=F64),
        core_axis_energy=axis.cpu(),
        sim=lbw_similarity(sub.lbw),
        inf=hidden_interference(sub.active, sub.lbw),
        lbw_rank=torch.tensor([v.shape[1] for v in sub.lbw]),
        protect_dim=torch.tensor([P.shape[1] for P in protect]),
        removed_energy=torch.tensor([removed_energy(d, P) for d, P in zip(deltas, protect)], dtype=F64),
        core_residual=residual,
        core_protected=residual <= protected_tolerance(dtype),
        pact_applied=pact_applied,
    )
