"""TSV-M with ``svd: randomized`` (PACT paper App. B, Eqs. 34 and 36; issue 16): the T per-task
truncated SVDs by a seeded randomized range finder, the two polar factors exact."""

import numpy as np
import pytest
import torch

import pactmerge
from conftest import t64
from pactmerge.errors import PactMergeError
from pactmerge.methods.tsv import TsvParams, tsv_m
from pactmerge.registry import ParamContext, ParamInfo


def ctx_for(shape, T, seed=0):
    info = ParamInfo("encoder.layer.0.w", tuple(shape), torch.float64, "matrix", 0, 1.0)
    return ParamContext(info, seed=seed, weights=[1.0] * T, model_params=[{}] * T)


def low_rank_plus_noise(rng, m, n, rank, noise, spectrum=None):
    u, _ = np.linalg.qr(rng.standard_normal((m, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    s = np.geomspace(1.0, 0.1, rank) if spectrum is None else np.asarray(spectrum)
    return (u * s) @ v.T + noise * rng.standard_normal((m, n))


def np_tsv(deltas):
    """TSV-M (Gargiulo et al. 2025) in numpy float64: top floor(r/T) triplets of each task, polar
    factors of the concatenated U and V, the tasks' own singular values."""
    m, n = deltas[0].shape
    k = min(m, n) // len(deltas)
    svds = [np.linalg.svd(d, full_matrices=False) for d in deltas]
    u = np.concatenate([s[0][:, :k] for s in svds], 1)
    s = np.concatenate([s[1][:k] for s in svds])
    v = np.concatenate([s[2][:k].T for s in svds], 1)

    def polar(x):
        p, _, qt = np.linalg.svd(x, full_matrices=False)
        return p @ qt

    return polar(u) @ np.diag(s) @ polar(v).T


@pytest.mark.parametrize("shape,T", [((60, 48), 3), ((40, 72), 4), ((50, 50), 2)])
def test_randomized_equals_exact_on_low_rank_plus_noise(rng, shape, T):
    m, n = shape
    k = min(m, n) // T
    deltas = [low_rank_plus_noise(rng, m, n, k, 1e-9) for _ in range(T)]
    ds = [t64(d) for d in deltas]
    ctx = ctx_for(shape, T)
    exact = tsv_m(ds[0], ds, ctx, TsvParams())
    rand = tsv_m(ds[0], ds, ctx, TsvParams(svd="randomized", oversample=10, power_iters=2))
    ref = np_tsv(deltas)
    np.testing.assert_allclose(exact.numpy(), ref, atol=1e-10)
    assert torch.linalg.matrix_norm(rand - exact) < 1e-8 * torch.linalg.matrix_norm(exact)


def test_randomized_is_reproducible_and_seeded(rng):
    deltas = [t64(low_rank_plus_noise(rng, 40, 36, 12, 1e-2)) for _ in range(3)]
    p = TsvParams(svd="randomized", power_iters=0, oversample=2)
    a = tsv_m(deltas[0], deltas, ctx_for((40, 36), 3, seed=5), p)
    b = tsv_m(deltas[0], deltas, ctx_for((40, 36), 3, seed=5), p)
    c = tsv_m(deltas[0], deltas, ctx_for((40, 36), 3, seed=6), p)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the sketch comes from the seed (approximate without power iterations)


def test_randomized_through_the_engine_with_pact(rng):
    """PACT-TSV-M with both SVD phases randomized (Eq. 36): reproducible for a fixed config seed and
    close to the exact merge on a low-rank-plus-noise layer."""
    # Spectral gaps after K = 6 (base) and k = 3 (tasks), and rank floor(40 / 4) = 10 per task.
    base = {"layers.0.w": t64(low_rank_plus_noise(rng, 48, 40, 6, 1e-9, np.linspace(2, 1, 6)))}
    task_spectrum = [1.0, 0.9, 0.8, *np.linspace(0.1, 0.05, 7)]
    models = [
        {"layers.0.w": base["layers.0.w"] + 0.05 * t64(low_rank_plus_noise(rng, 48, 40, 10, 1e-9, task_spectrum))}
        for _ in range(4)
    ]
    common = {"base_model": base, "models": models, "method": "tsv_m", "dtype": "float64", "seed": 3}
    rand = {"svd": "randomized", "power_iters": 3}
    one = pactmerge.merge(**common, parameters=rand, pact={"K": 6, "k": 3, **rand})
    two = pactmerge.merge(**common, parameters=rand, pact={"K": 6, "k": 3, **rand})
    exact = pactmerge.merge(**common, pact={"K": 6, "k": 3})
    assert torch.equal(one["layers.0.w"], two["layers.0.w"])
    d_exact = exact["layers.0.w"] - base["layers.0.w"]
    assert torch.linalg.matrix_norm(one["layers.0.w"] - exact["layers.0.w"]) < 1e-6 * torch.linalg.matrix_norm(d_exact)


def test_bad_randomized_parameters_are_refused():
    sd = {"l.0.w": torch.randn(8, 6)}
    with pytest.raises(PactMergeError, match="power_iters"):
        pactmerge.merge(base_model=sd, models=[sd, sd], method="tsv_m", parameters={"power_iters": -1})
    with pytest.raises(PactMergeError, match="svd"):
        pactmerge.merge(base_model=sd, models=[sd, sd], method="tsv_m", parameters={"svd": "lanczos"})
