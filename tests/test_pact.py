"""PACT against an independent numpy re-derivation, and its invariants."""

import numpy as np
import pytest
import torch

import pactmerge
from conftest import decaying, np_orth, np_pact, np_top_right, t64
from pactmerge.filters.pact import PactParams, pact_subspaces
from pactmerge.registry import ParamContext, ParamInfo


def run_pact(base, deltas, **params):
    """Call the registered filter on one 2-D parameter."""
    from pactmerge.filters.pact import pact

    info = ParamInfo("encoder.layer.0.w", tuple(base.shape), base.dtype, "matrix", 0, 1.0)
    ctx = ParamContext(info, seed=0, weights=[1.0] * len(deltas), model_params=[{}] * len(deltas))
    return pact(base, deltas, ctx, PactParams(**params))


def make_layer(rng, T, m=40, n=36, scale=0.05):
    base = decaying(rng, m, n, decay=0.85)
    deltas = [scale * decaying(rng, m, n, decay=0.7) + 0.005 * rng.standard_normal((m, n)) for _ in range(T)]
    return base, deltas


@pytest.mark.parametrize("T", [1, 2, 3, 8])
@pytest.mark.parametrize("K,k", [(6, 3), (10, 4)])
def test_pact_matches_independent_derivation(rng, T, K, k):
    base, deltas = make_layer(rng, T)
    ref = np_pact(base, deltas, K, k)
    ours = run_pact(t64(base), [t64(d) for d in deltas], K=K, k=k)
    for r, o in zip(ref, ours):
        np.testing.assert_allclose(o.numpy(), r, atol=1e-10)


@pytest.mark.parametrize("T", [2, 3, 8])
def test_filtered_task_vector_is_orthogonal_to_other_lbw(rng, T):
    base, deltas = make_layer(rng, T)
    p = PactParams(K=10, k=4)
    b, ds = t64(base), [t64(d) for d in deltas]
    sub = pact_subspaces(b, ds, p)
    out = run_pact(b, ds, K=10, k=4)
    for t in range(T):
        for j in range(T):
            if j != t:
                assert (out[t] @ sub.lbw[j]).norm() < 1e-10 * ds[t].norm()
    # And (Eq. 5) each LBW subspace is orthogonal to its own task's active subspace.
    for a, l in zip(sub.active, sub.lbw):
        assert (a.T @ l).abs().max() < 1e-10


def test_pact_identity_cases(rng):
    base, deltas = make_layer(rng, 4)
    b, ds = t64(base), [t64(d) for d in deltas]
    for o, d in zip(run_pact(b, ds, K=0, k=4), ds):
        assert torch.equal(o, d)
    (single,) = run_pact(b, ds[:1], K=10, k=4)
    assert torch.equal(single, ds[0])


@pytest.mark.parametrize("T,K,k", [(3, 4, 2), (4, 15, 8), (8, 15, 8)])
def test_pact_removes_the_whole_core_once_others_cover_it(rng, T, K, k):
    """With (T-1)(K-k) >= K the other tasks' LBW subspaces jointly contain the whole core V_{0,K},
    so every filtered task vector annihilates it (README, "Composing PACT with spectrum-flattening methods")."""
    base, deltas = make_layer(rng, T, m=64, n=60)
    b, ds = t64(base), [t64(d) for d in deltas]
    out = run_pact(b, ds, K=K, k=k)
    core = torch.from_numpy(np_top_right(base, K))
    for o, d in zip(out, ds):
        assert (o @ core).norm() < 1e-10 * d.norm()
        assert (d @ core).norm() > 1e-3 * d.norm()  # ... which the unfiltered vector did not


def test_pact_with_two_tasks_keeps_part_of_the_core(rng):
    base, deltas = make_layer(rng, 2, m=64, n=60)
    out = run_pact(t64(base), [t64(d) for d in deltas], K=15, k=8)
    core = torch.from_numpy(np_top_right(base, 15))
    assert all((o @ core).norm() > 1e-6 for o in out)


def test_randomized_pact_matches_exact(rng):
    m, n = 80, 70
    base = decaying(rng, m, n, decay=0.6)
    deltas = [0.05 * decaying(rng, m, n, decay=0.5) for _ in range(4)]
    b, ds = t64(base), [t64(d) for d in deltas]
    exact = run_pact(b, ds, K=8, k=4)
    rand = run_pact(b, ds, K=8, k=4, svd="randomized", oversample=10, power_iters=3)
    for e, r in zip(exact, rand):
        assert (e - r).norm() < 1e-8 * e.norm()


def test_pact_depth_and_vectors_through_the_engine(rng):
    """1-D parameters bypass; depth filters only the first layers; with T=1 PACT is the identity."""
    sd0 = {f"layer.{i}.w": t64(decaying(rng, 20, 18)) for i in range(4)}
    sd0["layer.0.b"] = t64(rng.standard_normal(18))
    models = [{k: v + 0.05 * t64(rng.standard_normal(tuple(v.shape))) for k, v in sd0.items()} for _ in range(3)]
    common = {"base_model": sd0, "models": models, "method": "task_arithmetic", "dtype": "float64"}
    ta = pactmerge.merge(**common)
    filtered = pactmerge.merge(**common, pact={"K": 6, "k": 3, "depth": 0.5})
    assert torch.equal(filtered["layer.0.b"], ta["layer.0.b"])  # vector: bypass
    for i in (2, 3):  # layers beyond 50% depth: untouched
        assert torch.equal(filtered[f"layer.{i}.w"], ta[f"layer.{i}.w"])
    for i in (0, 1):
        assert not torch.allclose(filtered[f"layer.{i}.w"], ta[f"layer.{i}.w"])
        ref = np_pact(
            sd0[f"layer.{i}.w"].numpy(), [m[f"layer.{i}.w"].numpy() - sd0[f"layer.{i}.w"].numpy() for m in models], 6, 3
        )
        np.testing.assert_allclose(filtered[f"layer.{i}.w"].numpy(), sd0[f"layer.{i}.w"].numpy() + sum(ref), atol=1e-10)
    one = pactmerge.merge(base_model=sd0, models=models[:1], dtype="float64", pact={"K": 6, "k": 3})
    for k in sd0:
        torch.testing.assert_close(one[k], models[0][k])


def test_np_orth_reference_is_sane(rng):
    a = rng.standard_normal((10, 3))
    q = np_orth(np.concatenate([a, a], axis=1))
    assert q.shape == (10, 3)


def test_width_relative_ranks_match_the_fixed_rank_derivation(rng):
    # K_ratio / k_ratio give each parameter K = max(1, round(ratio * min(m, n))): on a 40 x 36 layer,
    # 0.25 and 0.1 mean K = 9, k = 4 -- the numpy derivation with those fixed ranks.
    base, deltas = make_layer(rng, 3)
    ref = np_pact(base, deltas, 9, 4)
    ours = run_pact(t64(base), [t64(d) for d in deltas], K_ratio=0.25, k_ratio=0.1)
    for r, o in zip(ref, ours):
        np.testing.assert_allclose(o.numpy(), r, atol=1e-10)
    p = PactParams(K_ratio=0.04, k_ratio=0.02)
    assert p.ranks((1280, 320)) == (13, 6) and p.ranks((16, 32)) == (1, 1)  # never below 1
    assert PactParams(K=15, k=8).ranks((16, 32)) == (15, 8)  # fixed ranks ignore the width
    assert PactParams(K=15, k_ratio=0.5).ranks((16, 32)) == (15, 8)  # each rank on its own
    with pytest.raises(Exception, match="K_ratio"):
        PactParams(K_ratio=1.5)


def test_width_relative_ranks_pass_the_check_where_a_fixed_k_fails():
    from pactmerge.errors import PactMergeError
    from pactmerge.filters.pact import _check

    narrow = ParamInfo("blocks.1.project.weight", (16, 32), torch.float32, "matrix", 0, 1.0)
    with pytest.raises(PactMergeError, match=r"min\(m, n\)=16 <= pact.K=20.*K_ratio"):
        _check(PactParams(K=20, k=8, narrow="error"), narrow)
    _check(PactParams(K=20, k=8, K_ratio=0.04, k_ratio=0.02, narrow="error"), narrow)  # K, k = 1, 1
