"""Task Arithmetic and Iso-C against independent float64 derivations; the PACT-Iso-C trap."""

import numpy as np
import pytest
import torch

import pactmerge
from conftest import decaying, np_pact, np_top_right, t64


def layer_models(rng, T, m=24, n=20, dtype=np.float64):
    base = {"blk.0.w": decaying(rng, m, n), "blk.0.b": rng.standard_normal(n), "blk.1.w": decaying(rng, n, m)}
    models = [{k: v + 0.05 * rng.standard_normal(v.shape) for k, v in base.items()} for _ in range(T)]
    to_t = lambda sd: {k: torch.from_numpy(v.astype(dtype)) for k, v in sd.items()}  # noqa: E731
    return base, models, to_t(base), [to_t(m) for m in models]


def np_iso_c(msum: np.ndarray, rank_aware: bool) -> np.ndarray:
    u, s, vt = np.linalg.svd(msum, full_matrices=False)
    sbar = s.mean()
    if rank_aware:
        keep = s > np.sqrt(np.finfo(np.float64).eps) * s[0]  # the well-posed null tolerance (issue 14)
        u, vt = u[:, keep], vt[keep]
    return sbar * u @ vt


@pytest.mark.parametrize("T", [1, 2, 3, 8])
def test_task_arithmetic_matches_formula(rng, T):
    base, models, b, ms = layer_models(rng, T)
    weights = list(rng.uniform(0.2, 1.5, T))
    out = pactmerge.merge(
        base_model=b,
        models=[{"model": m, "weight": w} for m, w in zip(ms, weights)],
        method="task_arithmetic",
        alpha=0.7,
        dtype="float64",
    )
    for k in base:
        ref = base[k] + 0.7 * sum(w * (m[k] - base[k]) for m, w in zip(models, weights))
        np.testing.assert_allclose(out[k].numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("T", [1, 2, 3, 8])
@pytest.mark.parametrize("rank_aware", [True, False])
def test_iso_c_matches_formula(rng, T, rank_aware):
    base, models, b, ms = layer_models(rng, T)
    out = pactmerge.merge(
        base_model=b, models=ms, method="iso_c", alpha=1.3, dtype="float64", parameters={"rank_aware": rank_aware}
    )
    for k in base:
        deltas = [m[k] - base[k] for m in models]
        merged = np.mean(deltas, axis=0) if base[k].ndim == 1 else np_iso_c(sum(deltas), rank_aware)
        np.testing.assert_allclose(out[k].numpy(), base[k] + 1.3 * merged, atol=1e-12)


def test_iso_c_merged_delta_has_equal_singular_values(rng):
    base, models, b, ms = layer_models(rng, 3)
    out = pactmerge.merge(base_model=b, models=ms, method="iso_c", dtype="float64")
    s = torch.linalg.svdvals(out["blk.0.w"] - b["blk.0.w"])
    assert (s.max() - s.min()) < 1e-10 * s.max()
    deltas_sum = sum(m["blk.0.w"] - b["blk.0.w"] for m in ms)
    torch.testing.assert_close(s.mean(), torch.linalg.svdvals(deltas_sum).mean())


def _pact_iso_setup(rng, T=8, m=96, n=96, K=15, k=8):
    base = decaying(rng, m, n, decay=0.9)
    deltas = [0.05 * decaying(rng, m, n, decay=0.93) for _ in range(T)]
    return base, deltas, {"K": K, "k": k}


def _common_null_space(filtered: list[np.ndarray], tol=1e-8) -> np.ndarray:
    stacked = np.concatenate(filtered, axis=0)
    _, s, vt = np.linalg.svd(stacked)
    s_full = np.concatenate([s, np.zeros(vt.shape[0] - len(s))])
    return vt[s_full < tol * s[0]].T


def test_default_pact_iso_c_writes_nothing_into_the_protected_core(rng):
    base, deltas, kk = _pact_iso_setup(rng)
    filtered = np_pact(base, deltas, kk["K"], kk["k"])
    null = _common_null_space(filtered)
    core = np_top_right(base, kk["K"])
    assert null.shape[1] >= kk["K"]
    # The whole core lies in that common null space (T=8 >= 4).
    assert np.linalg.norm(core - null @ (null.T @ core)) < 1e-8

    sd0 = {"l.0.w": t64(base)}
    models = [{"l.0.w": t64(base + d)} for d in deltas]
    common = {"base_model": sd0, "models": models, "method": "iso_c", "dtype": "float64", "pact": kk}
    well = pactmerge.merge(**common)["l.0.w"].numpy() - base
    literal = pactmerge.merge(**common, parameters={"rank_aware": False})["l.0.w"].numpy() - base
    assert np.linalg.norm(well @ null) < 1e-9 * np.linalg.norm(well)
    # The literal formula puts a large share of its update there (about 40% in the notes).
    share = np.linalg.norm(literal @ null) / np.linalg.norm(literal)
    assert share > 0.2
    # Both share sigma_bar and agree outside the null space.
    np.testing.assert_allclose(well - well @ null @ null.T, literal - literal @ null @ null.T, atol=1e-9)


@pytest.mark.parametrize("method", ["iso_c", "tsv_m", "iso_cts"])
def test_default_pact_spectral_methods_are_stable_under_float32_rounding(rng, method):
    """The well-posed forms depend continuously on the inputs even where PACT makes the sums and
    stacked bases rank-deficient (the literal forms change arbitrarily there)."""
    base, deltas, kk = _pact_iso_setup(rng, T=6, m=64, n=64)
    sd0 = {"l.0.w": t64(base)}
    models = [{"l.0.w": t64(base + d)} for d in deltas]
    ref = (
        pactmerge.merge(base_model=sd0, models=models, method=method, dtype="float64", pact=kk)["l.0.w"].numpy() - base
    )
    sd0_32 = {"l.0.w": t64(base).float()}
    models_32 = [{"l.0.w": m["l.0.w"].float()} for m in models]
    got = pactmerge.merge(base_model=sd0_32, models=models_32, method=method, dtype="float32", pact=kk)["l.0.w"]
    got = got.double().numpy() - base.astype(np.float32).astype(np.float64)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 5e-4, rel
