"""The faster spectral routes give the same decompositions; the base-subspace cache is keyed
correctly; PACT's batched (GPU) path equals its per-matrix path.

References are independent: numpy float64 (eigenvectors of the Gram matrix, numpy's SVD).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pactmerge
from pactmerge.filters.pact import PactParams, pact_subspaces
from pactmerge.linalg import randomized_svd, spectral, top_right_singular_vectors
from pactmerge.linalg.cache import SubspaceCache
from pactmerge.linalg.spectral import stacked_top_right, thin_svd, top_right_exact
from pactmerge.registry import ParamContext, ParamInfo
from pactmerge.synthetic import base_state, finetune_state


def decaying(m, n, seed, decay=0.8, dtype=torch.float64):
    g = np.random.default_rng(seed)
    r = min(m, n)
    u, _ = np.linalg.qr(g.standard_normal((m, r)))
    v, _ = np.linalg.qr(g.standard_normal((n, r)))
    return torch.from_numpy((u * decay ** np.arange(r)) @ v.T).to(dtype)


def subspace_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """sin of the largest principal angle between the column spans of a and b (orthonormal)."""
    a, b = a.double().numpy(), b.double().numpy()
    return float(np.linalg.norm(a - b @ (b.T @ a), 2))


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 10**6),
)
def test_thin_svd_is_an_svd_of_every_shape(m, n, dtype, seed):
    a = torch.from_numpy(np.random.default_rng(seed).standard_normal((m, n))).to(dtype)
    u, s, vh = thin_svd(a)
    r = min(m, n)
    assert u.shape == (m, r) and s.shape == (r,) and vh.shape == (r, n)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    ref = np.linalg.svd(a.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(s.double().numpy(), ref, atol=tol * max(1.0, ref[0]))
    np.testing.assert_allclose((u * s) @ vh, a, atol=tol * max(1.0, ref[0]))
    np.testing.assert_allclose(u.mT @ u, np.eye(r), atol=tol)
    np.testing.assert_allclose(vh @ vh.mT, np.eye(r), atol=tol)
    assert bool((s[:-1] >= s[1:]).all())


@pytest.mark.parametrize("shape", [(120, 30), (30, 120), (64, 60), (200, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_right_exact_matches_the_gram_eigenvectors(shape, dtype):
    m, n = shape
    a = decaying(m, n, seed=m * n, decay=0.85, dtype=dtype)
    k = 6
    got = top_right_exact(a, k)
    w, v = np.linalg.eigh(a.double().numpy().T @ a.double().numpy())  # independent reference
    ref = torch.from_numpy(v[:, np.argsort(w)[::-1][:k]])
    assert got.shape == (n, k) and got.dtype == dtype
    np.testing.assert_allclose(got.mT @ got, np.eye(k), atol=1e-5)
    assert subspace_gap(got, ref) < (1e-5 if dtype == torch.float32 else 1e-10)
    # each vector, not only the span (decaying spectrum: distinct singular values), up to sign
    np.testing.assert_allclose(np.abs((got.double().mT @ ref).diagonal().numpy()), 1.0, atol=1e-5)


def test_top_right_exact_falls_back_to_the_svd_below_the_gram_precision():
    # sigma_k / sigma_1 = 3e-5 < GRAM_MIN_RATIO: the Gram route would blur the k-th direction.
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(90, 3, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(30, 3, dtype=torch.float64, generator=g))
    a = ((u * torch.tensor([1.0, 1e-2, 3e-5], dtype=torch.float64)) @ v.mT).float()
    got = top_right_exact(a, 3)
    assert subspace_gap(got[:, 2:], v[:, 2:].float()) < 2e-2  # the SVD resolves it
    _, _, vh = torch.linalg.svd(a, full_matrices=False)
    assert subspace_gap(got, vh[:3].mT) < 1e-4


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_stacked_path_equals_the_per_matrix_path(method):
    mats = [decaying(80, 50, seed=s, decay=0.8, dtype=torch.float32) for s in range(5)]
    gens = [torch.Generator().manual_seed(100 + i) for i in range(5)]
    stacked = stacked_top_right(mats, 7, method=method, oversample=5, power_iters=2, generators=gens)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(5)]
    single = [
        top_right_singular_vectors(a, 7, method=method, oversample=5, power_iters=2, generator=g)
        for a, g in zip(mats, gens)
    ]
    for x, y in zip(stacked, single):
        assert x.shape == y.shape == (50, 7)
        # Same vectors up to sign, within float32 round-off.
        np.testing.assert_allclose(np.abs((x.double().mT @ y.double()).diagonal().numpy()), 1.0, atol=1e-4)


def test_randomized_rank_is_computed_through_the_small_side():
    a = decaying(40, 300, seed=3, dtype=torch.float64)  # wide: the last SVD runs on a transpose
    u, s, vh = randomized_svd(a, 5, oversample=10, power_iters=3, generator=torch.Generator().manual_seed(0))
    ref = np.linalg.svd(a.numpy(), compute_uv=False)[:5]
    np.testing.assert_allclose(s.numpy(), ref, rtol=1e-8)


def test_pact_batched_path_equals_the_per_matrix_path(monkeypatch):
    g = torch.Generator().manual_seed(0)
    base = decaying(48, 40, seed=1, dtype=torch.float32)
    deltas = [0.1 * torch.randn(48, 40, generator=g) for _ in range(4)]
    ctx = ParamContext(ParamInfo("w", (48, 40), torch.float32, "matrix", 0, 1.0), 7, [1.0] * 4, [{}] * 4)
    for svd in ("exact", "randomized"):
        p = PactParams(K=5, k=3, svd=svd)
        loop = pact_subspaces(base, deltas, p, ctx)
        monkeypatch.setattr(spectral, "BATCH_DEVICES", {"cpu", "cuda"})
        batched = pact_subspaces(base, deltas, p, ctx)
        monkeypatch.setattr(spectral, "BATCH_DEVICES", {"cuda"})
        for x, y in zip(loop.protect, batched.protect):
            assert x.shape == y.shape
            np.testing.assert_allclose(x @ x.mT, y @ y.mT, atol=1e-4)  # the same projector


# -- the V_{0,K} cache ------------------------------------------------------------------------------


def test_cache_is_keyed_by_base_values_rank_and_options(tmp_path):
    cache = SubspaceCache(tmp_path / "c")
    a = torch.randn(20, 10)
    calls = []

    def compute(x=a, k=3):
        calls.append(k)
        return top_right_exact(x, k)

    first = cache.get_or_compute(a, compute, K=3, svd="exact")
    again = cache.get_or_compute(a.clone(), compute, K=3, svd="exact")  # same values: a hit
    assert calls == [3] and torch.equal(first, again) and cache.hits == 1
    cache.get_or_compute(a, lambda: compute(k=4), K=4, svd="exact")  # another K
    b = a.clone()
    b[0, 0] += 1e-3  # another base
    cache.get_or_compute(b, lambda: compute(b), K=3, svd="exact")
    cache.get_or_compute(a.double(), lambda: compute(a.double()), K=3, svd="exact")  # another dtype
    cache.get_or_compute(a, compute, K=3, svd="randomized", seed=1)  # other options
    assert calls == [3, 4, 3, 3, 3] and cache.misses == 5
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 5


def test_cached_merge_is_byte_identical_and_skips_the_base_svds(tmp_path, monkeypatch):
    base = base_state(layers=2, hidden=16)
    models = [finetune_state(base, t) for t in range(3)]
    cfg = {"base_model": base, "models": models, "method": "iso_c", "pact": {"K": 4, "k": 2}}
    plain = pactmerge.merge(cfg)
    first = pactmerge.merge(cfg, cache_dir=tmp_path / "cache")
    entries = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(entries) == sum(1 for k, v in base.items() if v.ndim == 2 and v.is_floating_point())
    import pactmerge.filters.pact as pact_module

    real_top = pact_module._top
    salts = []

    def spy(a, r, atol, p, ctx, salt):
        salts.append(salt)
        return real_top(a, r, atol, p, ctx, salt)

    monkeypatch.setattr(pact_module, "_top", spy)
    second = pactmerge.merge(cfg, cache_dir=tmp_path / "cache")
    assert 0 not in salts and salts  # every V_{0,K} came from the cache; the task subspaces did not
    for k in plain:
        assert torch.equal(plain[k], first[k]) and torch.equal(first[k], second[k])
    # Another K or another base: new entries, the old ones untouched.
    pactmerge.merge({**cfg, "pact": {"K": 3, "k": 2}}, cache_dir=tmp_path / "cache")
    other = {k: (v * 1.01 if v.is_floating_point() else v) for k, v in base.items()}
    pactmerge.merge({**cfg, "base_model": other}, cache_dir=tmp_path / "cache")
    assert len(sorted((tmp_path / "cache").glob("*.safetensors"))) == 3 * len(entries)
