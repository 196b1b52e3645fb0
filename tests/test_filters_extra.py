"""DARE, CSP (post-merge) and S-PACT against independent float64 derivations; their invariants;
composition with PACT and the post-merge stage through the public API."""

import zlib

import numpy as np
import pytest
import torch

import pactmerge
from conftest import np_pact, np_top_right
from test_methods_extra import as_torch, deltas_of, layer_models, np_kth_largest, np_ties_merge, np_trim, run


def np_dare_keep(name: str, salt: int, shape, p: float, seed: int = 0) -> np.ndarray:
    """The documented draw: per-parameter seed (config seed, crc32 of the name), generator seeded
    with (seed * 1_000_003 + task index) mod (2^63 - 1), uniforms in the compute dtype (float64
    here) on the CPU, keep if >= p."""
    pseed = (seed * 2_654_435_761 + zlib.crc32(name.encode())) % (2**62)
    g = torch.Generator().manual_seed((pseed * 1_000_003 + salt) % (2**63 - 1))
    return (torch.rand(tuple(shape), generator=g, dtype=torch.float64) >= p).numpy()


def np_dare(name, ds, p, rescale="keep_prob", seed=0):
    out = []
    for t, d in enumerate(ds):
        kept = np.where(np_dare_keep(name, t, d.shape, p, seed), d, 0.0)
        if rescale == "keep_prob":
            kept = kept / (1 - p)
        elif rescale == "l1":
            kept = kept * (np.abs(d).sum() / np.abs(kept).sum())
        out.append(kept)
    return out


# -- DARE -------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2, 3, 8])
@pytest.mark.parametrize("rescale", ["keep_prob", "l1", "none"])
def test_dare_ta_matches_formula(rng, T, rescale):
    base, models = layer_models(rng, T)
    out = run(base, models, "task_arithmetic", alpha=0.9, seed=5, filters=[{"dare": {"p": 0.3, "rescale": rescale}}])
    for k in base:
        ref = sum(np_dare(k, deltas_of(base, models, k), 0.3, rescale, seed=5))
        np.testing.assert_allclose(out[k], base[k] + 0.9 * ref, atol=1e-12)


def test_dare_deterministic_and_seeded(rng):
    base, models = layer_models(rng, 3)
    a = run(base, models, "task_arithmetic", filters=["dare"], seed=1)
    b = run(base, models, "task_arithmetic", filters=["dare"], seed=1)
    c = run(base, models, "task_arithmetic", filters=["dare"], seed=2)
    for k in base:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(np.abs(a[k] - c[k]).max() > 1e-6 for k in base)


def test_dare_keeps_the_expectation(rng):
    base, models = layer_models(rng, 1)
    d = deltas_of(base, models, "blk.0.w")[0]
    b, ms = as_torch(base), [as_torch(m) for m in models]
    acc = np.zeros_like(d)
    n = 400
    for seed in range(n):
        out = pactmerge.merge(base_model=b, models=ms, dtype="float64", seed=seed, filters=[{"dare": {"p": 0.5}}])
        acc += out["blk.0.w"].numpy() - base["blk.0.w"]
    # Each entry is d / (1-p) * Bernoulli(1-p): std of the mean = |d| sqrt(p / (1-p) / n).
    err = np.abs(acc / n - d) / (np.abs(d) * np.sqrt(1.0 / n))
    assert err.max() < 5.0
    assert np.abs((acc / n).sum() - d.sum()) < 5 * np.sqrt((d**2).sum() / n)


def test_dare_drop_rate(rng):
    base, models = layer_models(rng, 2, m=60, n=50)
    out = run(base, models, "task_arithmetic", filters=[{"dare": {"p": 0.7}}])
    kept = np.mean(out["blk.0.w"] != base["blk.0.w"])
    assert abs(kept - (1 - 0.7 * 0.7)) < 0.05  # an entry is untouched only if both tasks drop it


# -- CSP --------------------------------------------------------------------------------------


def np_csp(base, tau, rank=None, p=None):
    u, s, vt = np.linalg.svd(base, full_matrices=False)
    if rank is None:
        rank = int(np.searchsorted(np.cumsum(s) / s.sum(), p) + 1)
    ur, vr = u[:, :rank], vt[:rank].T
    pu = np.eye(base.shape[0]) - ur @ ur.T
    pv = np.eye(base.shape[1]) - vr @ vr.T
    return pu @ tau @ pv, ur, vr


@pytest.mark.parametrize("T", [1, 2, 3, 8])
@pytest.mark.parametrize("opt", [{"rank": 5}, {"p": 0.6}])
def test_csp_after_ties_matches_formula_and_is_post_merge(rng, T, opt):
    base, models = layer_models(rng, T)
    out = run(base, models, "ties", alpha=1.3, filters=[{"csp": opt}], parameters={"scope": "tensor"})
    for k in base:
        ds = deltas_of(base, models, k)
        merged = np_ties_merge([np_trim(d, np_kth_largest(d, int(0.2 * d.size))) for d in ds], [1.0] * T, "mean")
        if base[k].ndim == 2:
            ref, ur, vr = np_csp(base[k], merged, **opt)
            upd = (out[k] - base[k]) / 1.3
            assert np.abs(ur.T @ upd).max() < 1e-12 and np.abs(upd @ vr).max() < 1e-12  # no core component
        else:
            ref = merged  # 1-D parameters are left alone
        np.testing.assert_allclose(out[k], base[k] + 1.3 * ref, atol=1e-12)


def test_csp_linear_method_equals_projecting_each_task_vector(rng):
    base, models = layer_models(rng, 3)
    out = run(base, models, "weight_average", filters=[{"csp": {"rank": 4}}])
    for k in ("blk.0.w", "blk.1.w"):
        per_task = sum(np_csp(base[k], d, rank=4)[0] for d in deltas_of(base, models, k)) / 3
        np.testing.assert_allclose(out[k], base[k] + per_task, atol=1e-12)


def test_csp_runs_after_the_method_whatever_its_position(rng):
    base, models = layer_models(rng, 3)
    a = run(base, models, "ties", filters=[{"csp": {"rank": 3}}, {"dare": {"p": 0.2}}], parameters={"scope": "tensor"})
    b = run(base, models, "ties", filters=[{"dare": {"p": 0.2}}, {"csp": {"rank": 3}}], parameters={"scope": "tensor"})
    for k in base:
        np.testing.assert_array_equal(a[k], b[k])


def test_csp_needs_rank_or_p_and_checks_rank(rng):
    base, models = layer_models(rng, 2)
    with pytest.raises(pactmerge.PactMergeError, match="exactly one"):
        run(base, models, "task_arithmetic", filters=["csp"])
    with pytest.raises(pactmerge.PactMergeError, match="csp.rank=50"):
        run(base, models, "task_arithmetic", filters=[{"csp": {"rank": 50}}])


# -- S-PACT -----------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2, 3, 8])
def test_s_pact_matches_formula(rng, T):
    base, models = layer_models(rng, T)
    out = run(base, models, "task_arithmetic", filters=[{"s_pact": {"K": 5}}])
    for k in base:
        ds = deltas_of(base, models, k)
        if base[k].ndim == 2:
            v0 = np_top_right(base[k], 5)
            ds = [d - d @ v0 @ v0.T for d in ds]
        np.testing.assert_allclose(out[k], base[k] + sum(ds), atol=1e-12)


def test_s_pact_depth(rng):
    base, models = layer_models(rng, 2)  # blk.0 at depth 0.5, blk.1 at depth 1, head.w at depth 1
    out = run(base, models, "task_arithmetic", filters=[{"s_pact": {"K": 5, "depth": 0.5}}])
    np.testing.assert_allclose(out["blk.1.w"], base["blk.1.w"] + sum(deltas_of(base, models, "blk.1.w")), atol=1e-12)
    assert np.abs(out["blk.0.w"] - base["blk.0.w"] - sum(deltas_of(base, models, "blk.0.w"))).max() > 1e-4


# -- composition through the public API -------------------------------------------------------


@pytest.mark.parametrize("T", [2, 3, 8])
def test_pact_then_dare_then_ties(rng, T):
    base, models = layer_models(rng, T, m=32, n=28)
    out = run(
        base,
        models,
        "ties",
        seed=3,
        filters=[{"pact": {"K": 6, "k": 3}}, {"dare": {"p": 0.4}}],
        parameters={"scope": "tensor", "density": 0.5},
    )
    for k in base:
        ds = deltas_of(base, models, k)
        if base[k].ndim == 2 and min(base[k].shape) > 6:  # head.w (6, 28): min(m, n) <= K, PACT bypasses it
            ds = np_pact(base[k], ds, 6, 3)
        ds = np_dare(k, ds, 0.4, seed=3)
        merged = np_ties_merge([np_trim(d, np_kth_largest(d, int(0.5 * d.size))) for d in ds], [1.0] * T, "mean")
        np.testing.assert_allclose(out[k], base[k] + merged, atol=1e-11)


def test_s_pact_then_csp_with_tsv(rng):
    base, models = layer_models(rng, 3)
    out = run(base, models, "tsv_m", filters=[{"s_pact": {"K": 4}}, {"csp": {"rank": 2}}])
    from test_methods_extra import np_tsv

    for k in ("blk.0.w", "blk.1.w"):
        v0 = np_top_right(base[k], 4)
        ds = [d - d @ v0 @ v0.T for d in deltas_of(base, models, k)]
        ref = np_csp(base[k], np_tsv(ds, literal=False), rank=2)[0]
        np.testing.assert_allclose(out[k], base[k] + ref, atol=1e-11)
