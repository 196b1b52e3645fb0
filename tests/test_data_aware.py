"""PAVE, spectral rank allocation, RegMean and Fisher merging against independent float64 derivations."""

from itertools import product

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pactmerge
from conftest import np_pact, t64
from data_aware_models import examples, family, loader, manual_covariances, model_data
from pactmerge.errors import PactMergeError
from pactmerge.filters.pave import PaveParams, allocate_ranks, pave
from pactmerge.methods.fisher_merge import FisherParams, fisher
from pactmerge.methods.regmean import RegMeanParams, regmean
from pactmerge.registry import ParamContext, ParamInfo
from pactmerge.stats import ParamStats
from pactmerge.stats.hooks import IN_OUT

# -- references, written from the papers -----------------------------------------------------------


def np_pave(W_B, fine, covs, ranks, damping):
    """Eqs. 5-6 literally: SVD_r(W C') C'^-1 - W_B with C' = C + damping * mean(diag C) * I."""
    out = []
    for W, C, r in zip(fine, covs, ranks):
        Cd = C + damping * np.mean(np.diag(C)) * np.eye(C.shape[0])
        U, S, Vt = np.linalg.svd(W @ Cd, full_matrices=False)
        out.append((U[:, :r] * S[:r]) @ Vt[:r] @ np.linalg.inv(Cd) - W_B)
    return out


def np_floor(gamma, R):
    return max(0, min(int(np.floor(gamma * R + 1e-9)), R - 1))


def brute_ranks(svals, rho, gamma):
    """argmin of Eq. 9 over every allocation with sum r_t <= rho T R and r_t >= the floor."""
    T, R = len(svals), len(svals[0])
    norm = [np.asarray(s) / s[0] for s in svals]
    lo = np_floor(gamma, R)
    best, best_cost = None, np.inf
    for r in product(range(lo, R + 1), repeat=T):
        if sum(r) > rho * T * R + 1e-9:
            continue
        cost = sum(float(np.sum(n[k:] ** 2)) for n, k in zip(norm, r))
        if cost < best_cost - 1e-15:
            best, best_cost = list(r), cost
    return best if best is not None else [lo] * T  # infeasible: every model at its floor


def np_cost(svals, ranks):
    return sum(float(np.sum((np.asarray(s) / s[0])[r:] ** 2)) for s, r in zip(svals, ranks))


def ctx_for(shape, stats=None, weights=None, name="blk.0.w"):
    info = ParamInfo(name, tuple(shape), torch.float64, "matrix" if len(shape) == 2 else "vector", 0, 1.0)
    T = len(weights) if weights else 1
    return ParamContext(info, 0, weights or [1.0] * T, [{} for _ in range(T)], calibration=stats)


def cov(rng, n, rows):
    X = rng.standard_normal((rows, n)) * rng.uniform(0.2, 3.0, n)  # anisotropic inputs
    return X.T @ X


def spectrum(draw, R):
    vals = sorted(draw(st.lists(st.floats(0.01, 10.0), min_size=R, max_size=R)), reverse=True)
    return np.array(vals)


# -- spectral rank allocation ----------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_rank_allocation_equals_brute_force(data):
    T = data.draw(st.integers(1, 4))
    R = data.draw(st.integers(1, 6 if T < 4 else 4))
    svals = [spectrum(data.draw, R) for _ in range(T)]
    rho = data.draw(st.sampled_from([7 / 8, 15 / 16, 3 / 4, 1 / 2, 1.0]) | st.floats(0.05, 1.0))
    gamma = data.draw(st.none() | st.floats(0.0, 1.0))
    g = gamma if gamma is not None else max(0.0, rho - (1 - rho) / 2)
    got = allocate_ranks([t64(s) for s in svals], rho, g)
    ref = brute_ranks(svals, rho, g)
    assert np_cost(svals, got) == pytest.approx(np_cost(svals, ref), abs=1e-12)
    assert sum(got) == sum(ref)
    assert all(np_floor(g, R) <= r <= R for r in got)


def test_rank_allocation_prunes_the_flat_spectrum_less():
    fast = t64(0.5 ** np.arange(16))  # energy in a few directions: cheap to prune
    flat = t64(np.linspace(1.0, 0.8, 16))
    ranks = allocate_ranks([fast, flat], rho=7 / 8, gamma=0.0)
    assert sum(ranks) == 28 and ranks[1] == 16 and ranks[0] == 12
    floored = allocate_ranks([fast, flat], rho=7 / 8, gamma=13 / 16)  # fast may not go below 13
    assert floored == [13, 15]


# -- PAVE ------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 7), st.integers(2, 7), st.data())
def test_pave_projection_equals_svd_r_wc_cinv(m, n, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    R = min(m, n)
    r = data.draw(st.integers(1, R))
    W_B = rng.standard_normal((m, n))
    W = W_B + 0.3 * rng.standard_normal((m, n))
    C = cov(rng, n, 3 * n)  # invertible
    stats = ParamStats.of(covariance=[t64(C)])
    out = pave(t64(W_B), [t64(W - W_B)], ctx_for((m, n), stats), PaveParams(rho=r / R, damping=0.0))
    (ref,) = np_pave(W_B, [W], [C], [r], 0.0)
    np.testing.assert_allclose(out[0].numpy(), ref, atol=1e-9 * max(1.0, np.abs(W).max()))


def test_pave_full_rank_gives_back_the_task_vector(rng):
    W_B, W = rng.standard_normal((5, 8)), rng.standard_normal((5, 8))
    C = cov(rng, 8, 30)
    deltas = [t64(W - W_B), t64(2 * W - W_B)]
    stats = ParamStats.of(covariance=[t64(C), t64(C)])
    out = pave(t64(W_B), deltas, ctx_for((5, 8), stats), PaveParams(rho=1.0))
    assert all(torch.equal(a, b) for a, b in zip(out, deltas))
    # Eq. 5 at r = R is W itself (C invertible): the reference agrees
    np.testing.assert_allclose(np_pave(W_B, [W], [C], [5], 0.0)[0], W - W_B, atol=1e-10)
    kept = pave(t64(W_B), deltas, ctx_for((5, 8), stats), PaveParams(rho=0.5, full_rank=[1]))
    assert torch.equal(kept[1], deltas[1]) and not torch.allclose(kept[0], deltas[0])


@pytest.mark.parametrize("damping", [0.01, 0.3])
def test_pave_three_models_with_allocation_and_damping(rng, damping):
    m, n, T = 7, 9, 3
    W_B = rng.standard_normal((m, n))
    fine = [W_B + 0.5 * rng.standard_normal((m, n)) for _ in range(T)]
    covs = [cov(rng, n, 5) for _ in range(T)]  # rank 5 < 9: singular, damping needed
    stats = ParamStats.of(covariance=[t64(c) for c in covs])
    p = PaveParams(rho=0.7, damping=damping)
    out = pave(t64(W_B), [t64(W - W_B) for W in fine], ctx_for((m, n), stats), p)
    svals = []
    for W, C in zip(fine, covs):
        Cd = C + damping * np.mean(np.diag(C)) * np.eye(n)
        svals.append(np.linalg.svd(W @ Cd, compute_uv=False))
    ranks = brute_ranks(svals, 0.7, p.floor)
    for got, ref in zip(out, np_pave(W_B, fine, covs, ranks, damping)):
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-8)


def test_pave_task_vector_variant_projects_only_delta(rng):
    m, n = 5, 6
    W_B = rng.standard_normal((m, n))
    fine = [W_B + 0.2 * rng.standard_normal((m, n)) for _ in range(2)]
    covs = [cov(rng, n, 20) for _ in range(2)]
    stats = ParamStats.of(covariance=[t64(c) for c in covs])
    p = PaveParams(rho=0.6, damping=0.0, project="task_vector")
    out = pave(t64(W_B), [t64(W - W_B) for W in fine], ctx_for((m, n), stats), p)
    svals = [np.linalg.svd(W @ C, compute_uv=False) for W, C in zip(fine, covs)]
    for got, W, C, r in zip(out, fine, covs, brute_ranks(svals, 0.6, p.floor)):
        U = np.linalg.svd(W @ C)[0][:, :r]
        np.testing.assert_allclose(got.numpy(), U @ U.T @ (W - W_B), atol=1e-10)


def test_pave_transposed_weights(rng):
    W_B, W = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))  # stored (d_in, d_out) = (6, 4)
    C = cov(rng, 6, 20)
    p = PaveParams(rho=0.5, damping=0.0)
    got = pave(t64(W_B), [t64(W - W_B)], ctx_for((6, 4), ParamStats.of(covariance=[t64(C)], layout=IN_OUT)), p)
    (ref,) = np_pave(W_B.T, [W.T], [C], [2], 0.0)
    np.testing.assert_allclose(got[0].numpy(), ref.T, atol=1e-10)


def test_pave_leaves_parameters_without_statistics_alone(rng):
    d = [t64(rng.standard_normal(5))]
    assert pave(t64(rng.standard_normal(5)), d, ctx_for((5,), None), PaveParams())[0] is d[0]
    d2 = [t64(rng.standard_normal((3, 4)))]
    assert pave(t64(rng.standard_normal((3, 4))), d2, ctx_for((3, 4), ParamStats.of()), PaveParams())[0] is d2[0]


def test_pave_full_rank_index_out_of_range(rng):
    stats = ParamStats.of(covariance=[t64(cov(rng, 4, 9))])
    with pytest.raises(PactMergeError, match="full_rank"):
        pave(t64(np.ones((3, 4))), [t64(np.ones((3, 4)))], ctx_for((3, 4), stats), PaveParams(full_rank=[1]))


# -- through the merge: the hooks' statistics and the composition with other stages ------------------


LINEAR = [f"layers.{i}.{w}.weight" for i in range(2) for w in ("up", "down")] + ["head.weight"]


def run(base, fts, tmp_path, method="task_arithmetic", filters=(), samples=16, **kw):
    cfg = {
        "base_model": base,
        "models": fts,
        "method": method,
        "filters": list(filters),
        "dtype": "float64",
        "calibration": {"samples": samples, "cache_dir": str(tmp_path / "stats"), "dtype": "float64"},
        **kw,
    }
    return pactmerge.merge(cfg, calibration_data=model_data(fts))


def reference_pave_deltas(base, fts, rho=15 / 16, damping=0.01, deltas=None):
    """Delta_PAVE of every linear weight, from hand-computed covariances (not the hooks)."""
    covs = [manual_covariances(sd, examples(24, 10 + t)[:16]) for t, sd in enumerate(fts)]
    out = []
    for t, sd in enumerate(fts):
        out.append({k: (sd[k] - base[k]).numpy() if deltas is None else deltas[t][k] for k in base})
    p = PaveParams(rho=rho, damping=damping)
    for k in LINEAR:
        W_B = base[k].numpy()
        fine = [W_B + out[t][k] for t in range(len(fts))]
        Cs = [c[k].numpy() for c in covs]
        svals = []
        for W, C in zip(fine, Cs):
            Cd = C + damping * np.mean(np.diag(C)) * np.eye(C.shape[0])
            svals.append(np.linalg.svd(W @ Cd, compute_uv=False))
        ranks = brute_ranks(svals, rho, p.floor)
        for t, d in enumerate(np_pave(W_B, fine, Cs, ranks, damping)):
            out[t][k] = d
    return out


def test_pave_ta_end_to_end(tmp_path):
    base, fts = family(3)
    got = run(base, fts, tmp_path, filters=[{"pave": {"rho": 0.75}}], alpha=0.6)
    ref = reference_pave_deltas(base, fts, rho=0.75)
    for k in base:
        expect = base[k].numpy() + 0.6 * sum(r[k] for r in ref)
        np.testing.assert_allclose(got[k].numpy(), expect, atol=1e-9, err_msg=k)
    assert any(not np.allclose(ref[0][k], (fts[0][k] - base[k]).numpy()) for k in LINEAR)  # PAVE did something


def test_pave_composes_with_weight_averaging_ties_dare(tmp_path):
    base, fts = family(3)
    ref = reference_pave_deltas(base, fts)
    wa = run(base, fts, tmp_path, method="weight_average", filters=["pave"])
    for k in base:
        np.testing.assert_allclose(wa[k].numpy(), base[k].numpy() + np.mean([r[k] for r in ref], 0), atol=1e-9)
    # TIES / DARE after PAVE equal TIES / DARE on the purified models given as inputs
    purified = [{k: base[k] + torch.from_numpy(r[k]) for k in base} for r in ref]
    for method, filters in (("ties", []), ("task_arithmetic", [{"dare": {"p": 0.3}}])):
        a = run(base, fts, tmp_path, method=method, filters=["pave", *filters])
        b = pactmerge.merge(base_model=base, models=purified, method=method, filters=filters, dtype="float64")
        for k in base:
            np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-9)


def test_pave_and_pact_compose_in_both_orders(tmp_path):
    base, fts = family(3)
    K, k = 3, 1
    deltas = [{n: (sd[n] - base[n]).numpy() for n in base} for sd in fts]
    after = run(base, fts, tmp_path, filters=[{"pact": {"K": K, "k": k}}, "pave"])
    pact_first = [dict(d) for d in deltas]
    # PACT leaves a matrix with min(m, n) <= K unfiltered (the narrow rule: the 3 x 6 head here).
    filtered_by_pact = {n for n in base if base[n].ndim == 2 and min(base[n].shape) > K}
    for n in base:
        if n in filtered_by_pact:
            for t, f in enumerate(np_pact(base[n].numpy(), [d[n] for d in deltas], K, k)):
                pact_first[t][n] = f
    ref = reference_pave_deltas(base, fts, deltas=pact_first)
    for n in base:
        np.testing.assert_allclose(after[n].numpy(), base[n].numpy() + sum(r[n] for r in ref), atol=1e-8)
    before = run(base, fts, tmp_path, filters=["pave", {"pact": {"K": K, "k": k}}])
    pave_first = reference_pave_deltas(base, fts)
    for n in base:
        filtered = np_pact(base[n].numpy(), [r[n] for r in pave_first], K, k) if n in filtered_by_pact else None
        expect = sum(filtered) if filtered is not None else sum(r[n] for r in pave_first)
        np.testing.assert_allclose(before[n].numpy(), base[n].numpy() + expect, atol=1e-8)


# -- RegMean ---------------------------------------------------------------------------------------


def np_regmean(Ws, grams, weights, a):
    """The paper's form, y = W^T x with W (d_in, d_out): (sum w G~)^-1 sum w G~ W."""
    shrunk = [w * (a * G + (1 - a) * np.diag(np.diag(G))) for G, w in zip(grams, weights)]
    return np.linalg.solve(sum(shrunk), sum(G @ W for G, W in zip(shrunk, Ws)))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6), st.floats(0.0, 1.0), st.data())
def test_regmean_equals_its_closed_form(T, m, n, a, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    W_B = rng.standard_normal((m, n))
    fine = [W_B + rng.standard_normal((m, n)) for _ in range(T)]
    grams = [cov(rng, n, 2 * n + 1) for _ in range(T)]
    N = [int(x) for x in rng.integers(1, 50, T)]
    weights = [float(x) for x in rng.uniform(0.5, 2.0, T)]
    stats = ParamStats.of(covariance=[t64(G) for G in grams], examples=N)
    got = regmean(
        t64(W_B), [t64(W - W_B) for W in fine], ctx_for((m, n), stats, weights), RegMeanParams(off_diagonal=a)
    )
    ref = np_regmean([W.T for W in fine], [G / k for G, k in zip(grams, N)], weights, a).T - W_B
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-8 * max(1.0, np.abs(ref).max()))


def test_regmean_with_equal_grams_is_the_mean(rng):
    G = cov(rng, 5, 12)
    deltas = [t64(rng.standard_normal((4, 5))) for _ in range(3)]
    stats = ParamStats.of(covariance=[t64(G)] * 3)
    got = regmean(t64(np.zeros((4, 5))), deltas, ctx_for((4, 5), stats, [1.0] * 3), RegMeanParams())
    torch.testing.assert_close(got, sum(deltas) / 3, rtol=0, atol=1e-12)


def test_regmean_dead_inputs_get_the_mean_and_other_parameters_are_averaged(rng):
    grams = [cov(rng, 4, 10) for _ in range(2)]
    for G in grams:  # input 2 is never active
        G[2, :] = 0
        G[:, 2] = 0
    deltas = [t64(rng.standard_normal((3, 4))) for _ in range(2)]
    got = regmean(
        t64(np.zeros((3, 4))),
        deltas,
        ctx_for((3, 4), ParamStats.of(covariance=[t64(g) for g in grams]), [1.0, 1.0]),
        RegMeanParams(),
    )
    torch.testing.assert_close(got[:, 2], (deltas[0][:, 2] + deltas[1][:, 2]) / 2)
    live = [0, 1, 3]
    ref = np_regmean([d.numpy()[:, live].T for d in deltas], [g[np.ix_(live, live)] for g in grams], [1, 1], 0.9).T
    np.testing.assert_allclose(got[:, live].numpy(), ref, atol=1e-10)
    v = [t64(rng.standard_normal(6)) for _ in range(2)]
    torch.testing.assert_close(
        regmean(t64(np.zeros(6)), v, ctx_for((6,), None, [1.0, 3.0]), RegMeanParams()), (v[0] + 3 * v[1]) / 4
    )


def test_regmean_singular_sum_is_an_error(rng):
    X = rng.standard_normal((2, 4))
    G = X.T @ X  # rank 2 < 4, every diagonal entry non-zero
    with pytest.raises(PactMergeError, match="regmean: parameter 'blk.0.w'.*singular"):
        regmean(
            t64(np.zeros((3, 4))),
            [t64(np.ones((3, 4)))],
            ctx_for((3, 4), ParamStats.of(covariance=[t64(G)])),
            RegMeanParams(off_diagonal=1.0),
        )


def test_regmean_end_to_end_uses_the_hooks_grams(tmp_path):
    base, fts = family(3)
    got = run(base, fts, tmp_path, method="regmean")
    grams = [manual_covariances(sd, examples(24, 10 + t)[:16]) for t, sd in enumerate(fts)]
    for k in base:
        if k in LINEAR:
            ref = np_regmean([sd[k].numpy().T for sd in fts], [g[k].numpy() / 16 for g in grams], [1, 1, 1], 0.9).T
        else:
            ref = np.mean([sd[k].numpy() for sd in fts], 0)
        np.testing.assert_allclose(got[k].numpy(), ref, atol=1e-9, err_msg=k)


# -- Fisher merging --------------------------------------------------------------------------------


def manual_fisher(sd, exs):
    m = loader(sd)()
    params = dict(m.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for ex in exs:
        ids = ex["input_ids"][None]
        loss = torch.nn.functional.cross_entropy(
            m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, ex["labels"][None]
        )
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            acc[n] += g.detach() ** 2 / len(exs)
    return acc


def test_fisher_merging_is_the_fisher_weighted_mean(tmp_path):
    base, fts = family(3)
    got = run(base, fts, tmp_path, method="fisher", parameters={"eps": 0.0})
    F = [manual_fisher(sd, examples(24, 10 + t)[:16]) for t, sd in enumerate(fts)]
    for k in base:
        num = sum(f[k].numpy() * sd[k].numpy() for f, sd in zip(F, fts))
        den = sum(f[k].numpy() for f in F)
        mean = np.mean([sd[k].numpy() for sd in fts], 0)  # entries no loss reaches (token 0 is never used)
        ref = np.where(den > 0, num / np.where(den > 0, den, 1), mean)
        assert (den == 0).any() == (k == "emb.weight")
        np.testing.assert_allclose(got[k].numpy(), ref, rtol=1e-9, atol=1e-12, err_msg=k)


def test_fisher_floor_weights_and_zero_fisher(rng):
    deltas = [t64(rng.standard_normal((2, 3))) for _ in range(2)]
    F = [t64(rng.uniform(0, 1, (2, 3))) for _ in range(2)]
    F[0][0, 0] = F[1][0, 0] = 0.0  # no model's loss reaches this entry
    w = [1.0, 3.0]
    got = fisher(t64(np.zeros((2, 3))), deltas, ctx_for((2, 3), ParamStats.of(fisher=F), w), FisherParams(eps=0.0))
    ref = (w[0] * F[0] * deltas[0] + w[1] * F[1] * deltas[1]) / (w[0] * F[0] + w[1] * F[1])
    ref[0, 0] = (deltas[0][0, 0] + 3 * deltas[1][0, 0]) / 4
    torch.testing.assert_close(got, ref)
    eps = fisher(t64(np.zeros((2, 3))), deltas, ctx_for((2, 3), ParamStats.of(fisher=F), w), FisherParams(eps=0.5))
    ref2 = (w[0] * (F[0] + 0.5) * deltas[0] + w[1] * (F[1] + 0.5) * deltas[1]) / (
        w[0] * (F[0] + 0.5) + w[1] * (F[1] + 0.5)
    )
    torch.testing.assert_close(eps, ref2)


# -- EMR-Merging -----------------------------------------------------------------------------------


def np_emr(deltas: list[dict], names, variant="entries"):
    """EMR written from the paper: tau_uni, masks, rescalers over every parameter in ``names``."""
    uni, masks = {}, [{} for _ in deltas]
    for n in names:
        taus = [d[n] for d in deltas]
        sign = np.sign(sum(taus))
        agree = [np.where(t * sign > 0, np.abs(t), 0.0) for t in taus]
        uni[n] = sign * np.max(agree, axis=0)
        for t, tau in enumerate(taus):
            masks[t][n] = tau * uni[n] > 0
    lam = []
    for t, d in enumerate(deltas):
        if variant == "entries":
            num = sum(np.abs(d[n]).sum() for n in names)
            den = sum(np.abs(masks[t][n] * uni[n]).sum() for n in names)
        else:
            num = sum(np.abs(d[n]).mean() for n in names)
            den = sum(np.abs(masks[t][n] * uni[n]).mean() for n in names)
        lam.append(num / den)
    return uni, masks, lam


@pytest.mark.parametrize("variant", ["entries", "tensor_means"])
def test_emr_masks_rescalers_and_materialised_tasks(tmp_path, variant):
    base, fts = family(3, seed=5)
    alpha = 0.8
    out = pactmerge.merge(
        base_model=base,
        models=fts,
        method="emr",
        parameters={"rescaler_sum": variant},
        alpha=alpha,
        dtype="float64",
        output_dir=None,
    )
    deltas = [{k: (sd[k] - base[k]).numpy() for k in base} for sd in fts]
    uni, masks, lam = np_emr(deltas, list(base), variant)
    for k in base:  # the shared output is theta_0 + alpha tau_uni
        np.testing.assert_allclose(out[k].numpy(), base[k].numpy() + alpha * uni[k], atol=1e-12)
    folder = tmp_path / "merged"
    base_path = tmp_path / "base.safetensors"
    from safetensors.torch import save_file

    save_file(base, str(base_path))
    pactmerge.merge(
        base_model=str(base_path),
        models=fts,
        method="emr",
        parameters={"rescaler_sum": variant},
        alpha=alpha,
        dtype="float64",
        output_dir=folder,
    )
    from pactmerge.modulators import read_index

    index = read_index(folder)
    assert index["method"] == "emr" and set(index["parameters"]) == set(base)
    for t in range(3):
        dest = pactmerge.materialize(folder, t, tmp_path / f"task{t}")
        from safetensors.torch import load_file

        got = load_file(str(dest / "model.safetensors"))
        for k in base:
            expect = base[k].numpy() + alpha * lam[t] * masks[t][k] * uni[k]
            np.testing.assert_allclose(got[k].numpy(), expect, atol=1e-12, err_msg=f"task {t} {k}")


def test_emr_elect_rules_and_weights(rng):
    from pactmerge.methods.emr import elect

    a = t64(np.array([1.0, -2.0, 3.0, 0.5]))
    b = t64(np.array([-1.0, -1.0, -4.0, 0.25]))
    uni, (ma, mb) = elect([a, b])
    torch.testing.assert_close(uni, t64(np.array([0.0, -2.0, -4.0, 0.5])))  # sum 0: no sign, nothing kept
    assert ma.tolist() == [False, True, False, True] and mb.tolist() == [False, True, True, True]
    base, fts = family(2, seed=6)
    w = [2.0, 0.5]
    got = pactmerge.merge(
        base_model=base, models=[{"model": m, "weight": x} for m, x in zip(fts, w)], method="emr", dtype="float64"
    )
    scaled = [{k: x * (sd[k] - base[k]).numpy() for k in base} for sd, x in zip(fts, w)]
    uni, _, _ = np_emr(scaled, list(base))
    for k in base:
        np.testing.assert_allclose(got[k].numpy(), base[k].numpy() + uni[k], atol=1e-12)


def test_pave_emr_is_emr_on_purified_task_vectors(tmp_path):
    base, fts = family(3)
    folder = tmp_path / "out"
    cfg = {
        "base_model": base,
        "models": fts,
        "method": "emr",
        "filters": ["pave"],
        "dtype": "float64",
        "calibration": {"samples": 16, "cache_dir": str(tmp_path / "stats"), "dtype": "float64"},
    }
    shared = pactmerge.merge(cfg, calibration_data=model_data(fts))
    ref = reference_pave_deltas(base, fts)
    uni, masks, lam = np_emr(ref, list(base))
    for k in base:
        np.testing.assert_allclose(shared[k].numpy(), base[k].numpy() + uni[k], atol=1e-9)
    from safetensors.torch import load_file, save_file

    save_file(base, str(tmp_path / "base.safetensors"))
    pactmerge.merge({**cfg, "base_model": str(tmp_path / "base.safetensors")}, folder, calibration_data=model_data(fts))
    got = load_file(str(pactmerge.materialize(folder, 1, tmp_path / "task1") / "model.safetensors"))
    for k in base:
        np.testing.assert_allclose(got[k].numpy(), base[k].numpy() + lam[1] * masks[1][k] * uni[k], atol=1e-9)
