"""Fisher crucial masks (PACT paper Sec. 3.2.1, Eq. 3, Tables 1-2, Fig. 2; App. C.1).

For a task pair (A, B) with task vectors Delta_A, Delta_B and fine-tuned model theta_A:

    Fisher       F = (1/N) sum_i (dL_i/dtheta)^2 on theta_A, L_i = -log p(y_i | x_i) the training
                 loss (cross-entropy of the frozen head's logits) of the i-th of N train samples of A
    E_B(S)       = (d/n) sum_{i in S} Delta_B[i]^2 / sum_{i in layer} Delta_B[i]^2   (Eq. 3; n = |S|,
                 d = entries of the layer): > 1 when B concentrates its update on S

Per weight matrix ("layer"), following the paper's filter process:

    1. S       = the 30% entries with the smallest |Delta_A|
    2. A^      = the 30% of S with the largest Fisher                       (~9% of the layer)
    3. crucial = the entries of A^ with significant enrichment, p < 0.05

The paper does not spell out the test of step 3; we test each entry (a "dimension" is one
scalar parameter, Def. 3.1): E_B of the single entry i is ``d Delta_B[i]^2 / ||Delta_B||^2``,
and under the null "i is a uniformly drawn entry of the layer" its exact p-value is

    p_i = #{j : Delta_B[j]^2 >= Delta_B[i]^2} / d

(the permutation test of the singleton statistic), so p_i < 0.05 keeps the entries whose
|Delta_B| is in the layer's top 5%. The controls have the crucial mask's size n_c in each layer:

    safe    the entries of S in the 30% with the *lowest* Fisher that pass the same test, n_c of
            them drawn at random; if fewer pass, all of them topped up with the lowest-Fisher
            passing entries of the rest of S, then of the rest of the layer (counted as
            ``safe_outside_pool``), so that the size matches whenever the layer allows it
    random  n_c entries drawn uniformly from the layer's entries that pass the test, excluding
            the crucial ones (one mask per random seed)

Crucial and safe masks are disjoint by construction (the top and bottom 30% of S); random is
disjoint from crucial. A set-level diagnostic is kept too: E_B of A^ and a one-sided z-test of
its mean Delta_B^2 against the layer's (sampling without replacement), reported per layer.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from pactmerge.eval.heads import Tokenized, embed, logits
from pactmerge.stats.gradients import squared_gradients

F64 = torch.float64


# -- Fisher --------------------------------------------------------------------------------------


def empirical_fisher(
    model: torch.nn.Module,
    head: Tensor,
    tok: Tokenized,
    names: list[str],
    pad_id: int = 0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Empirical Fisher ``(1/N) sum_i (dL_i/dtheta)^2`` of the named parameters (Eq. 3).

    ``L_i`` is the cross-entropy of sample i's true label under ``logits(embed(model, x_i), head)``
    (the loss the fine-tunes were trained with), by :func:`pactmerge.stats.squared_gradients`:
    each sample is its own forward/backward pass (batch of 1, no padding), in eval mode (no
    dropout); the model's weights, ``requires_grad`` flags and train/eval mode are left as they were.

    Args:
        model: encoder (``embed`` reads ``last_hidden_state``).
        head: ``(C, hidden)`` frozen head.
        tok: the N samples with their labels.
        names: parameter names (``model.named_parameters()``) to compute it for.

    Returns:
        ``name -> tensor`` of the parameter's shape, float32 (accumulated in float64).
    """
    if len(tok) == 0:
        raise ValueError("empirical Fisher of zero samples")
    head = head.detach()

    def samples():
        for i in tqdm(
            range(len(tok)), desc="Fisher", unit="sample", disable=not progress, file=sys.stderr, leave=False
        ):
            ids, mask = tok.batch([i], pad_id)
            yield {"input_ids": ids, "attention_mask": mask, "labels": tok.labels[i : i + 1]}

    def loss(m, batch):
        return F.cross_entropy(logits(embed(m, batch["input_ids"], batch["attention_mask"]), head), batch["labels"])

    return {n: f.float() for n, f in squared_gradients(model, samples(), loss, names).items()}


# -- masks ---------------------------------------------------------------------------------------


def fraction_count(d: int, frac: float) -> int:
    """``round(frac * d)`` (halves up), the size of "the frac of d entries"."""
    return int(math.floor(frac * d + 0.5 + 1e-9))


def enrichment_pvalues(delta_b: Tensor) -> Tensor:
    """Per-entry p-values of enrichment: ``p_i = #{j : b_j >= b_i} / d``, ``b = Delta_B^2``.

    Args:
        delta_b: task B's update of one layer, any shape (``d`` entries).

    Returns:
        ``(d,)`` float64, flattened in row-major order; ``1/d <= p_i <= 1``.
    """
    b = delta_b.detach().reshape(-1).to(F64).square()
    s, _ = torch.sort(b)
    ge = b.numel() - torch.searchsorted(s, b, side="left")
    return ge.to(F64) / b.numel()


def enrichment_score(delta_b: Tensor, index: Tensor) -> float:
    """``E_B = (d/n) sum_{i in index} Delta_B[i]^2 / sum_i Delta_B[i]^2`` (Eq. 3).

    Args:
        delta_b: one layer's update (``d`` entries, flattened row-major).
        index: ``(n,)`` long, flat indices of the subset.

    Returns:
        E_B as a float; NaN for an empty subset or a zero update.
    """
    b = delta_b.detach().reshape(-1).to(F64).square()
    total = float(b.sum())
    if index.numel() == 0 or total == 0:
        return math.nan
    return b.numel() / index.numel() * float(b[index].sum()) / total


def enrichment_set_pvalue(delta_b: Tensor, index: Tensor) -> float:
    """One-sided p-value that the subset's mean ``Delta_B^2`` exceeds the layer's (normal
    approximation of the mean of n draws without replacement from the d entries); NaN if undefined."""
    b = delta_b.detach().reshape(-1).to(F64).square()
    d, n = b.numel(), index.numel()
    if n == 0 or n >= d:
        return math.nan
    var = float(b.var(unbiased=False)) / n * (d - n) / (d - 1)
    if var <= 0:
        return math.nan
    z = (float(b[index].mean()) - float(b.mean())) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2))


@dataclass
class LayerMasks:
    """Flat (row-major) index sets of one layer; each sorted ascending."""

    crucial: Tensor
    safe: Tensor
    random: list[Tensor]  # one per random seed
    stats: dict = field(default_factory=dict)


def layer_masks(
    delta_a: Tensor,
    delta_b: Tensor,
    fisher: Tensor,
    *,
    small_frac: float = 0.3,
    fisher_frac: float = 0.3,
    p_max: float = 0.05,
    generator: torch.Generator | None = None,
    random_generators: list[torch.Generator] | None = None,
) -> LayerMasks:
    """Crucial, safe and random masks of one layer (see the module doc for the definitions).

    Args:
        delta_a, delta_b, fisher: same shape (``d`` entries); Fisher of theta_A on task A.
        small_frac: share of the layer kept as "smallest |Delta_A|" (S).
        fisher_frac: share of S kept by Fisher (largest for crucial, lowest for safe).
        p_max: significance level of the per-entry enrichment test.
        generator: CPU generator for the safe mask's subsampling.
        random_generators: one CPU generator per random mask.

    Returns:
        :class:`LayerMasks` with ``stats``: d, small, candidate (|A^|), enriched (entries of the
        layer passing the test), crucial, safe, safe_outside_pool, random, E_B_candidate,
        p_candidate (set-level z-test), E_B_crucial, E_B_safe, E_B_random (mean over seeds).
    """
    if not (delta_a.shape == delta_b.shape == fisher.shape):
        raise ValueError(f"shapes differ: {tuple(delta_a.shape)}, {tuple(delta_b.shape)}, {tuple(fisher.shape)}")
    a = delta_a.detach().reshape(-1).abs()
    f = fisher.detach().reshape(-1)
    d = a.numel()
    small = torch.argsort(a, stable=True)[: fraction_count(d, small_frac)]
    n_cand = fraction_count(small.numel(), fisher_frac)
    by_fisher = small[torch.argsort(f[small], stable=True)]  # ascending Fisher (ties: smaller |Delta_A| first)
    high = small[torch.argsort(f[small], descending=True, stable=True)]
    candidate, low = high[:n_cand], by_fisher[:n_cand]
    enriched = enrichment_pvalues(delta_b) < p_max
    crucial = candidate[enriched[candidate]]
    n_c = crucial.numel()
    is_crucial = torch.zeros(d, dtype=torch.bool)
    is_crucial[crucial] = True

    pool = low[enriched[low]]
    if pool.numel() >= n_c:
        safe = pool[torch.randperm(pool.numel(), generator=generator)[:n_c]]
        outside = 0
    else:  # top up, lowest Fisher first, same enrichment test: from the rest of S, then from outside S
        in_pool = torch.zeros(d, dtype=torch.bool)
        in_pool[pool] = True
        in_small = torch.zeros(d, dtype=torch.bool)
        in_small[small] = True
        outside_s = torch.nonzero(~in_small).flatten()
        rest = torch.cat([by_fisher[n_cand:], outside_s[torch.argsort(f[outside_s], stable=True)]])
        rest = rest[enriched[rest] & ~is_crucial[rest] & ~in_pool[rest]]
        extra = rest[: n_c - pool.numel()]
        safe, outside = torch.cat([pool, extra]), int(extra.numel())

    eligible = torch.nonzero(enriched & ~is_crucial).flatten()
    randoms = [eligible[torch.randperm(eligible.numel(), generator=g)[:n_c]] for g in (random_generators or [])]

    crucial, safe = crucial.sort().values, safe.sort().values
    randoms = [r.sort().values for r in randoms]
    e_rand = [enrichment_score(delta_b, r) for r in randoms]
    stats = {
        "d": d,
        "small": int(small.numel()),
        "candidate": int(n_cand),
        "enriched": int(enriched.sum()),
        "crucial": int(n_c),
        "safe": int(safe.numel()),
        "safe_outside_pool": outside,
        "random": int(randoms[0].numel()) if randoms else 0,
        "E_B_candidate": enrichment_score(delta_b, candidate),
        "p_candidate": enrichment_set_pvalue(delta_b, candidate),
        "E_B_crucial": enrichment_score(delta_b, crucial),
        "E_B_safe": enrichment_score(delta_b, safe),
        "E_B_random": sum(e_rand) / len(e_rand) if e_rand else math.nan,
    }
    return LayerMasks(crucial, safe, randoms, stats)


def set_entries(state: dict[str, Tensor], masks: dict[str, Tensor], values: dict[str, Tensor]) -> dict[str, Tensor]:
    """A copy of ``state`` whose masked entries are taken from ``values``.

    Args:
        state: ``name -> tensor``; only the masked entries are copied (others shared).
        masks: ``name -> (n,)`` flat indices.
        values: ``name -> tensor`` of the same shape as ``state[name]``.

    Returns:
        new dict; ``out[name].flatten()[idx] = values[name].flatten()[idx]``.
    """
    out = dict(state)
    for name, idx in masks.items():
        w = state[name].clone()
        w.view(-1)[idx] = values[name].reshape(-1)[idx].to(w.dtype)
        out[name] = w
    return out


# -- the study -----------------------------------------------------------------------------------


def _generator(seed: int, name: str, salt: int) -> torch.Generator:
    from pactmerge.plan import param_seed

    return torch.Generator().manual_seed((param_seed(seed, name) * 1_000_003 + salt) % (2**63 - 1))


def fisher_masks(
    theta0: dict[str, Tensor],
    theta_a: dict[str, Tensor],
    theta_b: dict[str, Tensor],
    fisher: dict[str, Tensor],
    *,
    seed: int = 0,
    n_random: int = 3,
    small_frac: float = 0.3,
    fisher_frac: float = 0.3,
    p_max: float = 0.05,
) -> dict[str, LayerMasks]:
    """:func:`layer_masks` of every layer ``fisher`` covers, Delta = theta - theta0 in float64.

    Draws are seeded per (seed, layer name): the safe subsample with salt 0, random mask s with salt s + 1.
    """
    out = {}
    for name, f in fisher.items():
        d_a = theta_a[name].to(F64) - theta0[name].to(F64)
        d_b = theta_b[name].to(F64) - theta0[name].to(F64)
        out[name] = layer_masks(
            d_a,
            d_b,
            f,
            small_frac=small_frac,
            fisher_frac=fisher_frac,
            p_max=p_max,
            generator=_generator(seed, name, 0),
            random_generators=[_generator(seed, name, s + 1) for s in range(n_random)],
        )
    return out


def mask_sizes(masks: dict[str, LayerMasks], total_params: int) -> dict:
    """Totals over layers of the per-layer counts, and the crucial mask's share of the layers' and
    of the model's parameters (the paper's "fewer than 2% of the model parameters")."""
    keys = ("d", "small", "candidate", "enriched", "crucial", "safe", "safe_outside_pool", "random")
    tot = {k: sum(m.stats[k] for m in masks.values()) for k in keys}
    tot["crucial_fraction_of_layers"] = tot["crucial"] / tot["d"] if tot["d"] else math.nan
    tot["crucial_fraction_of_model"] = tot["crucial"] / total_params if total_params else math.nan
    tot["total_params"] = total_params
    return tot


def _mean_std(xs: list[float]) -> tuple[float, float | None]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


def run_fisher_conditions(
    accuracy,
    theta0: dict[str, Tensor],
    theta_a: dict[str, Tensor],
    theta_b: dict[str, Tensor],
    task_a: str,
    task_b: str,
    masks: dict[str, LayerMasks],
    alphas: list[float],
    progress: bool = False,
) -> dict:
    """The M0-M4 attack conditions on task A and the restoration experiment (Sec. 3.2.1).

    Args:
        accuracy: ``(full state dict, [task names]) -> {task: accuracy}``.
        theta0, theta_a, theta_b: full state dicts of the base and the two fine-tunes.
        masks: from :func:`fisher_masks`.
        alphas: attack strengths.

    Conditions (mask entries changed, everything else as stated):
        M0  theta_A
        M1  theta_A, crucial entries <- theta_0
        M2  theta_A, crucial entries <- theta_0 + alpha Delta_B      (per alpha)
        M3  theta_A, safe entries    <- theta_0 + alpha Delta_B
        M4  theta_A, random entries  <- theta_0 + alpha Delta_B      (mean/std over the random masks)
        restoration on theta_0 + Delta_A + Delta_B: as merged, crucial <- theta_0 (the paper's),
        crucial <- theta_A, random <- theta_0, random <- theta_A; accuracy on A and B.

    Returns:
        ``{"M0", "M1", "attack": [{"alpha", "M2", "M3", "M4", "M4_std", "M4_seeds"}], "restoration": {...}}``.
    """
    crucial = {n: m.crucial for n, m in masks.items()}
    safe = {n: m.safe for n, m in masks.items()}
    S = min(len(m.random) for m in masks.values())
    randoms = [{n: m.random[s] for n, m in masks.items()} for s in range(S)]
    on_a = lambda st: accuracy(st, [task_a])[task_a]  # noqa: E731
    steps = 2 + len(alphas) * (2 + S) + 3 + 2 * S
    bar = tqdm(
        total=steps,
        desc=f"Fisher conditions {task_a}/{task_b}",
        unit="eval",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )

    def run(fn, *args):
        out = fn(*args)
        bar.update()
        return out

    res = {"M0": run(on_a, theta_a), "M1": run(on_a, set_entries(theta_a, crucial, theta0))}
    attack = []
    for alpha in alphas:
        hit = {n: theta0[n] + alpha * (theta_b[n] - theta0[n]) for n in masks}
        m4 = [run(on_a, set_entries(theta_a, r, hit)) for r in randoms]
        m4_mean, m4_std = _mean_std(m4) if m4 else (math.nan, None)
        attack.append(
            {
                "alpha": alpha,
                "M2": run(on_a, set_entries(theta_a, crucial, hit)),
                "M3": run(on_a, set_entries(theta_a, safe, hit)),
                "M4": m4_mean,
                "M4_std": m4_std,
                "M4_seeds": m4,
            }
        )
        del hit
    res["attack"] = attack

    both = [task_a, task_b]
    merged = {n: (theta_a[n] + theta_b[n] - theta0[n]) if theta0[n].is_floating_point() else theta0[n] for n in theta0}
    rest = {
        "merged": run(accuracy, merged, both),
        "crucial_to_theta0": run(accuracy, set_entries(merged, crucial, theta0), both),
        "crucial_to_thetaA": run(accuracy, set_entries(merged, crucial, theta_a), both),
    }
    for target, src in (("theta0", theta0), ("thetaA", theta_a)):
        per_seed = [run(accuracy, set_entries(merged, r, src), both) for r in randoms]
        rest[f"random_to_{target}"] = {t: _mean_std([p[t] for p in per_seed])[0] for t in both} if per_seed else None
        rest[f"random_to_{target}_seeds"] = per_seed
    bar.close()
    res["restoration"] = rest
    return res
