"""weight_average, TIES, Consensus, TSV-M and Iso-CTS against independent float64 derivations
(numpy, written here from the papers' formulas), their invariants, and the well-posed vs literal
forms after PACT."""

import numpy as np
import pytest
import torch

import pactmerge
import pactmerge.methods.ties as ties_mod
from conftest import decaying, np_top_right


def layer_models(rng, T, m=24, n=20):
    base = {
        "blk.0.w": decaying(rng, m, n),
        "blk.0.b": rng.standard_normal(n),
        "blk.1.w": decaying(rng, n, m),
        "head.w": decaying(rng, 6, n),
    }
    models = [{k: v + 0.05 * rng.standard_normal(v.shape) for k, v in base.items()} for _ in range(T)]
    return base, models


def as_torch(sd, dtype=torch.float64):
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in sd.items()}


def run(base, models, method, dtype="float64", weights=None, model_params=None, **kw):
    tdt = torch.float64 if dtype == "float64" else torch.float32
    entries = []
    for i, m in enumerate(models):
        e = {"model": as_torch(m, tdt)}
        if weights is not None:
            e["weight"] = float(weights[i])
        if model_params is not None:
            e["parameters"] = model_params[i]
        entries.append(e)
    out = pactmerge.merge(base_model=as_torch(base, tdt), models=entries, method=method, dtype=dtype, **kw)
    return {k: v.double().numpy() for k, v in out.items()}


def deltas_of(base, models, k):
    return [m[k] - base[k] for m in models]


# -- weight_average ---------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2, 3, 8])
def test_weight_average_is_weighted_mean_of_finetuned(rng, T):
    base, models = layer_models(rng, T)
    w = rng.uniform(0.2, 2.0, T)
    out = run(base, models, "weight_average", weights=w)
    for k in base:
        ref = sum(wi * m[k] for wi, m in zip(w, models)) / w.sum()
        np.testing.assert_allclose(out[k], ref, atol=1e-12)


def test_weight_average_rejects_zero_weight_sum(rng):
    base, models = layer_models(rng, 2)
    with pytest.raises(pactmerge.PactMergeError, match="sum to 0"):
        run(base, models, "weight_average", weights=[1.0, -1.0])


# -- TIES -------------------------------------------------------------------------------------


def np_count(n, density, rule):
    k = int(density * n)
    if rule == "floor_plus_1":
        k += 1
    elif rule == "floor_at_least_1":
        k = max(1, k)
    return min(k, n)


def np_trim(d, tau):
    return np.where(np.abs(d) >= tau, d, 0.0)


def np_kth_largest(a, k):
    return np.inf if k == 0 else np.sort(np.abs(a).ravel())[::-1][k - 1]


def np_ties_merge(trimmed, w, aggregate):
    trimmed = np.stack(trimmed)
    w = np.asarray(w).reshape((-1,) + (1,) * (trimmed.ndim - 1))
    elected = np.sign((w * trimmed).sum(0))
    agree = (np.sign(trimmed) == elected) & (trimmed != 0)
    num = (w * trimmed * agree).sum(0)
    if aggregate == "sum":
        return num
    den = (w * agree).sum(0)
    return np.where(den != 0, num / np.where(den != 0, den, 1), 0.0)


@pytest.mark.parametrize("T", [1, 2, 3, 8])
@pytest.mark.parametrize("aggregate,rule", [("mean", "floor"), ("sum", "floor_plus_1"), ("mean", "floor_at_least_1")])
def test_ties_tensor_scope_matches_formula(rng, T, aggregate, rule):
    base, models = layer_models(rng, T)
    w = rng.uniform(0.5, 1.5, T)
    out = run(
        base,
        models,
        "ties",
        weights=w,
        alpha=0.8,
        parameters={"scope": "tensor", "density": 0.3, "aggregate": aggregate, "trim_count": rule},
    )
    for k in base:
        ds = deltas_of(base, models, k)
        trimmed = [np_trim(d, np_kth_largest(d, np_count(d.size, 0.3, rule))) for d in ds]
        np.testing.assert_allclose(out[k], base[k] + 0.8 * np_ties_merge(trimmed, w, aggregate), atol=1e-12)


@pytest.mark.parametrize(
    "T,dtype,collect",
    [
        (1, "float64", True),
        (2, "float64", True),
        (3, "float32", True),
        (8, "float64", True),
        (8, "float32", True),
        (3, "float64", False),
        (3, "float32", False),
    ],
)
def test_ties_model_scope_equals_whole_model_topk(rng, monkeypatch, T, dtype, collect):
    if not collect:  # force the radix selection through every 16-bit digit instead of collecting
        monkeypatch.setattr(ties_mod, "_COLLECT", -1)
    base, models = layer_models(rng, T)
    if dtype == "float32":
        base = {k: v.astype(np.float32).astype(np.float64) for k, v in base.items()}
        models = [{k: v.astype(np.float32).astype(np.float64) for k, v in m.items()} for m in models]
    out = run(base, models, "ties", dtype=dtype, parameters={"scope": "model", "density": 0.2})
    keys = list(base)
    taus = []
    for t in range(T):
        if dtype == "float32":  # the engine subtracts in float32
            flat = np.concatenate(
                [(models[t][k].astype(np.float32) - base[k].astype(np.float32)).ravel() for k in keys]
            )
        else:
            flat = np.concatenate([(models[t][k] - base[k]).ravel() for k in keys])
        taus.append(np_kth_largest(flat, int(0.2 * flat.size)))
    for k in keys:
        if dtype == "float32":
            ds = [(m[k].astype(np.float32) - base[k].astype(np.float32)).astype(np.float64) for m in models]
        else:
            ds = deltas_of(base, models, k)
        ref = np_ties_merge([np_trim(d, tau) for d, tau in zip(ds, taus)], [1.0] * T, "mean")
        atol = 1e-12 if dtype == "float64" else 1e-6
        np.testing.assert_allclose(out[k] - base[k], ref, atol=atol)
    # Exactly floor(0.2 n) entries survive the trim per task over the whole model (distinct magnitudes).
    for t in range(T):
        kept = sum(int((np.abs(models[t][k] - base[k]) >= taus[t]).sum()) for k in keys) if dtype == "float64" else None
        if kept is not None:
            assert kept == int(0.2 * sum(base[k].size for k in keys))


def test_ties_model_and_tensor_scope_differ(rng):
    base, models = layer_models(rng, 3)
    models[0]["head.w"] = base["head.w"] + 5.0 * (models[0]["head.w"] - base["head.w"])  # one loud tensor
    a = run(base, models, "ties", parameters={"scope": "model"})
    b = run(base, models, "ties", parameters={"scope": "tensor"})
    assert max(np.abs(a[k] - b[k]).max() for k in base) > 1e-3


@pytest.mark.parametrize("T", [2, 3, 8])
def test_ties_output_agrees_with_elected_sign(rng, T):
    base, models = layer_models(rng, T)
    out = run(base, models, "ties", parameters={"scope": "tensor"})
    for k in base:
        ds = deltas_of(base, models, k)
        trimmed = [np_trim(d, np_kth_largest(d, int(0.2 * d.size))) for d in ds]
        elected = np.sign(sum(trimmed))
        merged = out[k] - base[k]
        nz = np.abs(merged) > 1e-15
        assert np.all(np.sign(merged[nz]) == elected[nz])
        assert nz.any()


# -- Consensus --------------------------------------------------------------------------------


def np_consensus_mask(ds, lams, k, mtl=None):
    """Wang et al.: TALL masks |Delta_t| >= lambda_t |tau_MTL - Delta_t| from the merged vector, count >= k."""
    mtl = sum(ds) if mtl is None else mtl
    count = sum((np.abs(d) >= lam * np.abs(mtl - d)).astype(int) for d, lam in zip(ds, lams))
    return count >= k


@pytest.mark.parametrize("T", [1, 2, 3, 8])
@pytest.mark.parametrize("base_method", ["task_arithmetic", "ties"])
def test_consensus_matches_formula(rng, T, base_method):
    base, models = layer_models(rng, T)
    lams = rng.uniform(0.2, 0.6, T)
    lams[0] = 0.6  # the model without its own lambda gets the default
    mp = [{} if t == 0 else {"lambda": float(lams[t])} for t in range(T)]
    params = {"base_method": base_method, "k": 2}
    if base_method == "ties":
        params["ties"] = {"scope": "tensor", "density": 0.4}
    out = run(base, models, "consensus", model_params=mp, parameters=params)
    for k in base:
        ds = deltas_of(base, models, k)
        if base_method == "ties":  # the paper's Consensus-TIES: disjoint *sum*, masks from that vector
            merged = np_ties_merge([np_trim(d, np_kth_largest(d, int(0.4 * d.size))) for d in ds], [1.0] * T, "sum")
        else:
            merged = sum(ds)
        mask = np_consensus_mask(ds, lams, 2, merged)
        np.testing.assert_allclose(out[k], base[k] + mask * merged, atol=1e-12)


def test_consensus_k0_is_base_method_and_ta_masking_commutes(rng):
    base, models = layer_models(rng, 3)
    a = run(base, models, "consensus", parameters={"k": 0})
    b = run(base, models, "task_arithmetic")
    for k in base:
        np.testing.assert_allclose(a[k], b[k], atol=1e-12)


def test_consensus_rejects_bad_model_lambda(rng):
    base, models = layer_models(rng, 2)
    with pytest.raises(pactmerge.PactMergeError, match="lambda"):
        run(base, models, "consensus", model_params=[{"lambda": -1}, {}])


def test_consensus_ties_mean_aggregate_still_reachable(rng):
    base, models = layer_models(rng, 3)
    params = {"base_method": "ties", "ties": {"scope": "tensor", "aggregate": "mean", "density": 0.5}}
    out = run(base, models, "consensus", parameters=params)
    for k in base:
        ds = deltas_of(base, models, k)
        mtl = np_ties_merge([np_trim(d, np_kth_largest(d, int(0.5 * d.size))) for d in ds], [1.0] * 3, "mean")
        np.testing.assert_allclose(out[k] - base[k], np_consensus_mask(ds, [0.6] * 3, 2, mtl) * mtl, atol=1e-12)


def test_consensus_weighted_ta_masks_use_the_weighted_sum(rng):
    base, models = layer_models(rng, 3)
    w = [0.5, 1.0, 2.0]
    out = run(base, models, "consensus", weights=w, parameters={"lambda": 0.4})
    for k in base:
        ds = deltas_of(base, models, k)
        mtl = sum(wi * d for wi, d in zip(w, ds))
        np.testing.assert_allclose(out[k] - base[k], np_consensus_mask(ds, [0.4] * 3, 2, mtl) * mtl, atol=1e-12)


def test_consensus_model_scope_ties(rng):
    base, models = layer_models(rng, 3)
    out = run(base, models, "consensus", parameters={"base_method": "ties", "lambda": 0.3, "ties": {"scope": "model"}})
    keys = list(base)
    taus = [
        np_kth_largest(
            np.concatenate([(m[k] - base[k]).ravel() for k in keys]), int(0.2 * sum(base[k].size for k in keys))
        )
        for m in models
    ]
    for k in keys:
        ds = deltas_of(base, models, k)
        mtl = np_ties_merge([np_trim(d, t) for d, t in zip(ds, taus)], [1.0] * 3, "sum")
        ref = np_consensus_mask(ds, [0.3] * 3, 2, mtl) * mtl
        np.testing.assert_allclose(out[k] - base[k], ref, atol=1e-12)


# -- TSV-M ------------------------------------------------------------------------------------


def np_polar(x, literal=True):
    p, d, qt = np.linalg.svd(x, full_matrices=False)
    if not literal:
        keep = d > max(x.shape) * np.finfo(np.float64).eps * d[0]
        p, qt = p[:, keep], qt[keep]
    return p @ qt


def np_tsv(ds, literal=True):
    m, n = ds[0].shape
    k = min(m, n) // len(ds)
    us, ss, vs = [], [], []
    for d in ds:
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        keep = k if literal else min(k, int((s > max(m, n) * np.finfo(np.float64).eps * s[0]).sum()))
        us.append(u[:, :keep]), ss.append(s[:keep]), vs.append(vt[:keep].T)
    if k == 0:  # T > min(m, n): no task keeps a triplet
        return np.zeros((m, n))
    return (
        np_polar(np.concatenate(us, 1), literal)
        @ np.diag(np.concatenate(ss))
        @ np_polar(np.concatenate(vs, 1), literal).T
    )


@pytest.mark.parametrize("T", [1, 2, 3, 8])
@pytest.mark.parametrize("rank_aware", [True, False])
def test_tsv_m_matches_formula(rng, T, rank_aware):
    base, models = layer_models(rng, T)
    out = run(base, models, "tsv_m", alpha=1.1, parameters={"rank_aware": rank_aware})
    for k in base:
        ds = deltas_of(base, models, k)
        ref = np.mean(ds, axis=0) if base[k].ndim == 1 else np_tsv(ds, literal=not rank_aware)
        np.testing.assert_allclose(out[k], base[k] + 1.1 * ref, atol=1e-11)


@pytest.mark.parametrize("T", [2, 3, 8])
def test_tsv_m_factors_orthonormal(rng, T):
    """merged = U_perp S^ V_perp^T with orthonormal U_perp, V_perp  <=>  its singular values are
    exactly the kept task singular values."""
    base, models = layer_models(rng, T)
    out = run(base, models, "tsv_m")
    for k in ("blk.0.w", "blk.1.w"):
        ds = deltas_of(base, models, k)
        kk = min(ds[0].shape) // T
        kept = np.sort(np.concatenate([np.linalg.svd(d, compute_uv=False)[:kk] for d in ds]))[::-1]
        s = np.linalg.svd(out[k] - base[k], compute_uv=False)[: kept.size]
        np.testing.assert_allclose(s, kept, rtol=1e-10)


def test_tsv_m_weights_scale_task_vectors(rng):
    base, models = layer_models(rng, 3)
    w = [0.5, 1.0, 2.0]
    out = run(base, models, "tsv_m", weights=w)
    ds = [wi * d for wi, d in zip(w, deltas_of(base, models, "blk.0.w"))]
    np.testing.assert_allclose(out["blk.0.w"], base["blk.0.w"] + np_tsv(ds, literal=False), atol=1e-11)


# -- Iso-CTS ----------------------------------------------------------------------------------


def np_iso_cts(ds, f=0.8, literal=True):
    m, n = ds[0].shape
    r, T = min(m, n), len(ds)
    kc = r - round((r - int(r * f)) / T) * T
    if kc < 0:
        kc = r - (r // T) * T
    s_per = (r - kc) // T
    eps = max(m, n) * np.finfo(np.float64).eps
    u, s, vt = np.linalg.svd(sum(ds), full_matrices=False)
    keep_c = kc if literal else min(kc, int((s > eps * s[0]).sum()))
    uc = u[:, :keep_c]
    us, vs, total = [uc], [vt[:keep_c].T], s[:kc].sum()
    for d in ds:
        if s_per == 0:
            break
        ut, st, vtt = np.linalg.svd(d - uc @ uc.T @ d, full_matrices=False)
        total += st[:s_per].sum()
        keep = s_per if literal else int((st[:s_per] > eps * np.linalg.norm(d)).sum())
        us.append(ut[:, :keep]), vs.append(vtt[:keep].T)
    return total / r * np_polar(np.concatenate(us, 1), literal) @ np_polar(np.concatenate(vs, 1), literal).T


@pytest.mark.parametrize("T,f", [(1, 0.8), (2, 0.8), (3, 0.8), (8, 0.8), (3, 0.5)])
@pytest.mark.parametrize("rank_aware", [True, False])
def test_iso_cts_matches_formula(rng, T, rank_aware, f):
    base, models = layer_models(rng, T)
    out = run(base, models, "iso_cts", alpha=1.2, parameters={"rank_aware": rank_aware, "common_space_fraction": f})
    for k in base:
        ds = deltas_of(base, models, k)
        ref = np.mean(ds, axis=0) if base[k].ndim == 1 else np_iso_cts(ds, f, literal=not rank_aware)
        np.testing.assert_allclose(out[k], base[k] + 1.2 * ref, atol=1e-11)


@pytest.mark.parametrize("T", [2, 3, 8])
def test_iso_cts_singular_values_equal(rng, T):
    base, models = layer_models(rng, T)
    out = run(base, models, "iso_cts")
    for k in ("blk.0.w", "blk.1.w", "head.w"):
        s = np.linalg.svd(out[k] - base[k], compute_uv=False)
        assert s.max() - s.min() < 1e-10 * s.max()


def test_iso_cts_split_edge_cases():
    from pactmerge.methods.isotropic import iso_cts_split

    assert iso_cts_split(96, 8, 0.8) == (80, 2)  # round(2.5) = 2 (half to even, as the reference)
    assert iso_cts_split(20, 3, 0.8) == (17, 1)
    assert iso_cts_split(4, 8, 0.8) == (4, 0)
    kc, s = iso_cts_split(3, 2, 0.0)  # round(1.5) * 2 = 4 > 3: falls back to floor(r / T)
    assert (kc, s) == (1, 1)


# -- well-posed vs literal after PACT, T = 8 ---------------------------------------------------


@pytest.fixture(scope="module")
def pact_setup():
    rng = np.random.default_rng(7)
    m = n = 96  # 15 + 7 * 8 < 96: the other tasks' LBW subspaces leave room for each task's update
    base = {"layers.0.w": decaying(rng, m, n, decay=0.9)}
    models = []
    for _ in range(8):
        u = rng.standard_normal((m, 4))
        v = rng.standard_normal((n, 4))
        models.append({"layers.0.w": base["layers.0.w"] + 0.05 * (u @ v.T / 4 + 0.1 * rng.standard_normal((m, n)))})
    core = np_top_right(base["layers.0.w"], 15)
    return base, models, core


@pytest.mark.parametrize("method", ["tsv_m", "iso_cts"])
def test_well_posed_form_keeps_core_free_after_pact(pact_setup, method):
    base, models, core = pact_setup
    outs = {}
    for ra in (True, False):
        out = run(base, models, method, pact={"K": 15, "k": 8}, parameters={"rank_aware": ra})
        outs[ra] = out["layers.0.w"] - base["layers.0.w"]
    # Every PACT-filtered task vector annihilates the core when T >= 4 (K, k = 15, 8) ...
    well, literal = outs[True], outs[False]
    assert np.linalg.norm(well @ core) < 1e-9 * np.linalg.norm(well)
    # ... and the literal polar factors write a visible part of the update into it.
    assert np.linalg.norm(literal @ core) > 1e-2 * np.linalg.norm(literal)
