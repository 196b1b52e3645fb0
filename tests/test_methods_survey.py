"""The survey's data-free methods (Breadcrumbs, DELLA, PCB, STAR, CART, Model Stock, SLERP, WUDI, the
NAN filter, KnOTS's coordinates) against independent float64 derivations written here from the
papers (numpy, never our code), their invariants, and their one-line errors for bad parameters."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pactmerge
from conftest import decaying


def layer_models(rng, T, m=14, n=10, scale=0.05):
    base = {
        "blk.0.w": decaying(rng, m, n),
        "blk.0.b": rng.standard_normal(n),
        "blk.1.w": decaying(rng, n, m),
        "head.w": decaying(rng, 5, n),
    }
    models = [{k: v + scale * rng.standard_normal(v.shape) for k, v in base.items()} for _ in range(T)]
    return base, models


def as_torch(sd, dtype=torch.float64):
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in sd.items()}


def run(base, models, method, weights=None, model_params=None, **kw):
    entries = []
    for i, m in enumerate(models):
        e = {"model": as_torch(m)}
        if weights is not None:
            e["weight"] = float(weights[i])
        if model_params is not None:
            e["parameters"] = model_params[i]
        entries.append(e)
    out = pactmerge.merge(base_model=as_torch(base), models=entries, method=method, dtype="float64", **kw)
    return {k: v.double().numpy() for k, v in out.items()}


def deltas_of(base, models, k):
    return [m[k] - base[k] for m in models]


def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# -- Model Breadcrumbs ------------------------------------------------------------------------


def np_breadcrumbs_mask(d, density, gamma):
    n = d.size
    k, g = int(density * n), int(gamma * n)
    order = np.argsort(np.abs(d).ravel(), kind="stable")
    keep = np.zeros(n, dtype=bool)
    keep[order[n - g - k : n - g]] = True
    return keep.reshape(d.shape)


def np_elect_sum(xs, w):
    xs = np.stack([wi * x for wi, x in zip(w, xs)])
    elected = np.sign(xs.sum(0))
    agree = (np.sign(xs) == elected) & (xs != 0)
    return (xs * agree).sum(0)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("density,gamma,elect", [(0.9, 0.01, False), (0.5, 0.1, False), (0.3, 0.0, True)])
def test_breadcrumbs_matches_formula(rng, T, density, gamma, elect):
    base, models = layer_models(rng, T)
    w = rng.uniform(0.5, 1.5, T)
    params = {"density": density, "gamma": gamma, "elect": elect}
    out = run(base, models, "breadcrumbs", weights=w, alpha=0.9, parameters=params)
    for k in base:
        masked = [d * np_breadcrumbs_mask(d, density, gamma) for d in deltas_of(base, models, k)]
        ref = np_elect_sum(masked, w) if elect else sum(wi * x for wi, x in zip(w, masked))
        np.testing.assert_allclose(out[k], base[k] + 0.9 * ref, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 300),
    density=st.floats(0.01, 1.0),
    gamma=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_breadcrumbs_keeps_exactly_the_band(n, density, gamma, seed):
    from pactmerge.methods.breadcrumbs import breadcrumbs_mask

    if density + gamma > 1:
        gamma = 1 - density
    d = torch.from_numpy(np.random.default_rng(seed).standard_normal(n))
    keep = breadcrumbs_mask(d, density, gamma)
    k, g = int(density * n), int(gamma * n)
    assert int(keep.sum()) == k
    mags = d.abs()
    dropped = mags[~keep]
    top = torch.sort(mags, descending=True).values[:g]
    if k and g:  # every kept magnitude sits below every one of the top g
        assert mags[keep].max() <= top.min()
    if k and dropped.numel() > g:  # ... and above the small tail
        small = torch.sort(dropped).values[: dropped.numel() - g]
        assert mags[keep].min() >= small.max()


@pytest.mark.parametrize(
    "params,where",
    [({"density": 0.0}, "density"), ({"density": 1.5}, "density"), ({"density": 0.9, "gamma": 0.2}, "gamma")],
)
def test_breadcrumbs_rejects_bad_parameters(rng, params, where):
    base, models = layer_models(rng, 2)
    with pytest.raises(pactmerge.PactMergeError) as e:
        run(base, models, "breadcrumbs", parameters=params)
    assert "parameters" in one_line_error(e) and where in str(e.value)


# -- DELLA ------------------------------------------------------------------------------------


def np_della_keep_probability(d, density, epsilon):
    rows = d.reshape(1, -1) if d.ndim < 2 else d.reshape(d.shape[0], -1)
    n = rows.shape[1]
    out = np.empty_like(rows)
    for i, row in enumerate(rows):
        rank = np.empty(n)
        rank[np.argsort(-np.abs(row), kind="stable")] = np.arange(n)  # 0 = largest magnitude
        drop = (1 - density) - epsilon / 2 + epsilon * rank / n
        out[i] = 1 - drop
    return out.reshape(d.shape)


@pytest.mark.parametrize("shape", [(7,), (6, 9), (3, 2, 4)])
def test_della_keep_probability_matches_paper(rng, shape):
    from pactmerge.methods.della import magprune_keep_probability

    d = rng.standard_normal(shape)
    got = magprune_keep_probability(torch.from_numpy(d), 0.6, 0.2).numpy()
    np.testing.assert_allclose(got, np_della_keep_probability(d, 0.6, 0.2), atol=1e-15)
    # larger magnitudes are kept more often; the mean keep rate is density + eps/2 - eps (n-1)/(2n)... ~ density
    rows = d.reshape(d.shape[0], -1) if d.ndim > 1 else d.reshape(1, -1)
    krows = got.reshape(rows.shape)
    for row, kp in zip(rows, krows):
        order = np.argsort(-np.abs(row))
        assert np.all(np.diff(kp[order]) < 0)


def test_della_without_drop_is_elect_and_disjoint_mean(rng):
    base, models = layer_models(rng, 4)
    w = rng.uniform(0.5, 1.5, 4)
    out = run(base, models, "della", weights=w, parameters={"density": 1.0, "epsilon": 0.0})
    for k in base:
        xs = np.stack([wi * d for wi, d in zip(w, deltas_of(base, models, k))])
        elected = np.sign(xs.sum(0))
        agree = (np.sign(xs) == elected) & (xs != 0)
        wa = (w.reshape((-1,) + (1,) * (xs.ndim - 1)) * agree).sum(0)
        ref = np.where(wa != 0, (xs * agree).sum(0) / np.where(wa != 0, wa, 1), 0)
        np.testing.assert_allclose(out[k], base[k] + ref, atol=1e-12)


def test_della_single_run_rescales_kept_entries_by_keep_probability(rng):
    base, models = layer_models(rng, 1, m=40, n=30)
    out = run(base, models, "della", parameters={"density": 0.5, "epsilon": 0.4})
    d = models[0]["blk.0.w"] - base["blk.0.w"]
    got = out["blk.0.w"] - base["blk.0.w"]
    kept = got != 0
    kp = np_della_keep_probability(d, 0.5, 0.4)
    np.testing.assert_allclose(got[kept], d[kept] / kp[kept], rtol=1e-12)
    assert 0.4 < kept.mean() < 0.6  # 1200 Bernoulli draws around 0.5


def test_della_is_unbiased_and_follows_its_keep_probabilities():
    from pactmerge.methods.della import DellaParams, magprune

    rng = np.random.default_rng(0)
    d = torch.from_numpy(rng.standard_normal((4, 16)))
    p = DellaParams(density=0.5, epsilon=0.6)
    draws = torch.stack([magprune(d, p, torch.Generator().manual_seed(s)) for s in range(3000)])
    kp = np_della_keep_probability(d.numpy(), 0.5, 0.6)
    freq = (draws != 0).double().mean(0).numpy()
    assert np.abs(freq - kp).max() < 0.04  # 3000 draws: 4.5 standard errors at p = 0.5
    rel = (draws.mean(0) - d).abs() / (d.abs() * torch.from_numpy(np.sqrt((1 - kp) / kp / 3000)))
    assert float(rel.max()) < 5  # E[D] = Delta within 5 standard errors everywhere
    l1 = magprune(d, DellaParams(density=0.5, epsilon=0.6, rescale="l1"), torch.Generator().manual_seed(1))
    assert abs(float(l1.abs().sum() - d.abs().sum())) < 1e-12


@pytest.mark.parametrize("params", [{"density": 0.5, "epsilon": 1.0}, {"density": 0.95, "epsilon": 0.2}])
def test_della_rejects_probabilities_outside_unit_interval(rng, params):
    base, models = layer_models(rng, 2)
    with pytest.raises(pactmerge.PactMergeError) as e:
        run(base, models, "della", parameters=params)
    assert "epsilon" in one_line_error(e)


# -- PCB-Merging ------------------------------------------------------------------------------


def np_minmax(x):
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def np_softmax(x):
    e = np.exp(x)
    return e / e.sum()


def np_pcb_flat(taus, ratio):
    """PCB on flat vectors (one scope): survey Eqs. (pcb intra/inter/mask/merge)."""
    T, d = len(taus), taus[0].size
    betas = []
    for i in range(T):
        intra = np_softmax(T * np_minmax(taus[i] * taus[i]))
        inter = sum(np_softmax(np_minmax(taus[i] * taus[j])) for j in range(T))
        betas.append(intra * inter)
    kept = []
    for b in betas:
        thr = np.sort(b)[int((1 - ratio) * d)]
        kept.append(np.where(b >= thr, b, 0.0))
    return kept


def pcb_reference(base, models, ratio, scope, w):
    keys = list(base)
    T = len(models)
    out = {}
    groups = [[k] for k in keys] if scope == "tensor" else [keys]
    for group in groups:
        taus = [np.concatenate([(m[k] - base[k]).ravel() for k in group]) for m in models]
        kept = np_pcb_flat(taus, ratio)
        num = sum(b * wi * t for b, wi, t in zip(kept, w, taus))
        den = sum(kept)
        merged = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
        start = 0
        for k in group:
            out[k] = merged[start : start + base[k].size].reshape(base[k].shape)
            start += base[k].size
    assert len(w) == T
    return out


@pytest.mark.parametrize("T", [2, 4])
@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("ratio", [0.1, 0.35, 1.0])
def test_pcb_matches_formula(rng, T, scope, ratio):
    base, models = layer_models(rng, T)
    w = rng.uniform(0.8, 1.3, T)
    out = run(base, models, "pcb", weights=w, alpha=1.2, parameters={"ratio": ratio, "scope": scope})
    ref = pcb_reference(base, models, ratio, scope, w)
    for k in base:
        np.testing.assert_allclose(out[k], base[k] + 1.2 * ref[k], atol=1e-12, err_msg=k)


def test_pcb_keeps_the_top_ratio_and_stays_inside_the_tasks_range(rng):
    from pactmerge.methods.pcb import keep_count, scope_stats

    base, models = layer_models(rng, 3)
    ds = [torch.from_numpy(d) for d in deltas_of(base, models, "blk.0.w")]
    stats = scope_stats([ds])
    for b in stats.scores(ds):
        thr = torch.kthvalue(b.reshape(-1), b.numel() - keep_count(b.numel(), 0.2) + 1).values
        assert int((b >= thr).sum()) == keep_count(b.numel(), 0.2) == b.numel() - int(0.8 * b.numel())
    out = run(base, models, "pcb", parameters={"ratio": 0.5, "scope": "tensor"})
    stack = np.stack(deltas_of(base, models, "blk.0.w"))
    merged = out["blk.0.w"] - base["blk.0.w"]
    some = merged != 0  # a score-weighted mean of the kept tasks (0 where none is kept)
    assert some.mean() > 0.5
    assert np.all(merged[some] <= stack.max(0)[some] + 1e-12) and np.all(merged[some] >= stack.min(0)[some] - 1e-12)


def test_pcb_rejects_ratio_outside_unit_interval(rng):
    base, models = layer_models(rng, 2)
    for bad in (0.0, 1.2):
        with pytest.raises(pactmerge.PactMergeError) as e:
            run(base, models, "pcb", parameters={"ratio": bad})
        assert "ratio" in one_line_error(e)


# -- STAR -------------------------------------------------------------------------------------


def np_star(d, eta):
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    if s.sum() == 0:
        return np.zeros_like(d)
    r = next(k for k in range(1, s.size + 1) if s[:k].sum() >= eta / 100 * s.sum())
    return (u[:, :r] * (s[:r] * s.sum() / s[:r].sum())) @ vt[:r]


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("eta", [40.0, 80.0, 100.0])
def test_star_matches_formula_and_keeps_the_nuclear_norm(rng, T, eta):
    base, models = layer_models(rng, T)
    out = run(base, models, "star", parameters={"eta": eta})
    for k in base:
        ds = deltas_of(base, models, k)
        ref = np.mean(ds, axis=0) if base[k].ndim == 1 else sum(np_star(d, eta) for d in ds) / T
        np.testing.assert_allclose(out[k], base[k] + ref, atol=1e-12)
    if T == 1:
        d = deltas_of(base, models, "blk.0.w")[0]
        got = out["blk.0.w"] - base["blk.0.w"]
        nuc = lambda x: np.linalg.svd(x, compute_uv=False).sum()  # noqa: E731
        assert abs(nuc(got) - nuc(d)) < 1e-10 * nuc(d)


def test_star_rank_is_minimal():
    from pactmerge.methods.star import star_rank

    s = torch.tensor([5.0, 3.0, 1.0, 1.0], dtype=torch.float64)  # sum 10
    assert [star_rank(s, eta) for eta in (10, 50, 80, 90, 100)] == [1, 1, 2, 3, 4]
    assert star_rank(torch.zeros(3, dtype=torch.float64), 40) == 0


# -- CART -------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [{}, {"rank": 3, "lambda": 0.5}, {"rank_ratio": 1.0, "lambda": 2.0}])
def test_cart_matches_formula(rng, params):
    base, models = layer_models(rng, 4)
    out = run(base, models, "cart", parameters=params)
    lam = params.get("lambda", 1.0)
    for k in base:
        ds = deltas_of(base, models, k)
        avg = np.mean(ds, axis=0)
        ref = avg.copy()
        if base[k].ndim == 2:
            r = min(base[k].shape)
            kk = params.get("rank", int(np.ceil(params.get("rank_ratio", 0.08) * r)))
            for d in ds:
                u, s, vt = np.linalg.svd(d - avg, full_matrices=False)
                ref += lam * (u[:, :kk] * s[:kk]) @ vt[:kk]
        np.testing.assert_allclose(out[k], base[k] + ref, atol=1e-12)
    if params.get("rank_ratio") == 1.0:  # full rank: the centred parts sum to zero -> weight averaging
        wa = run(base, models, "weight_average")
        for k in base:
            np.testing.assert_allclose(out[k], wa[k], atol=1e-12)


def test_cart_refuses_weights_and_too_large_rank(rng):
    base, models = layer_models(rng, 2)
    with pytest.raises(pactmerge.PactMergeError) as e:
        run(base, models, "cart", weights=[1.0, 2.0])
    assert "weight" in one_line_error(e)
    with pytest.raises(pactmerge.PactMergeError) as e:
        run(base, models, "cart", parameters={"rank": 50})
    assert "cart.rank" in one_line_error(e)


# -- Model Stock ------------------------------------------------------------------------------


def np_model_stock(ds, filter_wise=False, average="cosine"):
    vs = [d.reshape(d.shape[0], -1) if (filter_wise and d.ndim > 1) else d.reshape(1, -1) for d in ds]
    N = len(vs)
    cos = []
    for s in range(N):
        for t in range(s + 1, N):
            cos.append(
                (vs[s] * vs[t]).sum(1) / np.maximum(np.linalg.norm(vs[s], axis=1) * np.linalg.norm(vs[t], axis=1), 1e-6)
            )
    cos = np.clip(np.array(cos), -1, 1)
    c = np.cos(np.arccos(cos).mean(0)) if average == "angle" else cos.mean(0)
    ratio = N * c / (1 + (N - 1) * c)
    avg = np.mean(ds, axis=0)
    return (avg.reshape(ratio.size, -1) * ratio[:, None]).reshape(avg.shape)


@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("filter_wise,average", [(False, "cosine"), (True, "cosine"), (False, "angle")])
def test_model_stock_matches_formula(rng, T, filter_wise, average):
    base, models = layer_models(rng, T)
    shared = {k: 0.04 * rng.standard_normal(v.shape) for k, v in base.items()}  # correlated task vectors
    models = [{k: v + shared[k] for k, v in m.items()} for m in models]
    out = run(base, models, "model_stock", parameters={"filter_wise": filter_wise, "average": average})
    for k in base:
        ref = np_model_stock(deltas_of(base, models, k), filter_wise, average)
        np.testing.assert_allclose(out[k], base[k] + ref, atol=1e-12)


def test_model_stock_ratio_on_orthogonal_and_identical_inputs():
    base = {"layers.0.w": np.zeros((4, 4))}
    e = np.eye(4)
    ortho = [{"layers.0.w": np.outer(e[i], e[i])} for i in range(3)]  # pairwise orthogonal task vectors
    out = run(base, ortho, "model_stock")
    np.testing.assert_allclose(out["layers.0.w"], 0.0, atol=1e-15)  # ratio 0: the anchor
    same = [{"layers.0.w": np.full((4, 4), 0.3)}] * 3
    out = run(base, same, "model_stock")
    np.testing.assert_allclose(out["layers.0.w"], 0.3, atol=1e-12)  # ratio 1: their average
    from pactmerge.methods.model_stock import stock_ratio

    # N = 2 at 60 degrees: cos = 1/2, ratio = 2 (1/2) / (1 + 1/2) = 2/3 (the paper's two-model case)
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.5, 3**0.5 / 2], dtype=torch.float64)
    assert abs(float(stock_ratio([a, b], False, "cosine")) - 2 / 3) < 1e-12


def test_model_stock_needs_two_models(rng):
    base, models = layer_models(rng, 1)
    with pytest.raises(pactmerge.PactMergeError) as e:
        run(base, models, "model_stock")
    assert "at least 2 models" in one_line_error(e)


# -- SLERP ------------------------------------------------------------------------------------


def np_slerp(t, a, b, thr=0.9995):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = np.clip(np.vdot(a / na, b / nb), -1, 1)
    if abs(dot) > thr:
        return (1 - t) * a + t * b
    om = np.arccos(dot)
    return np.sin((1 - t) * om) / np.sin(om) * a + np.sin(t * om) / np.sin(om) * b


@pytest.mark.parametrize("space", ["weights", "task_vectors"])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_matches_formula_and_endpoints(rng, space, t):
    base, models = layer_models(rng, 2, scale=0.3)
    out = run(base, models, "slerp", parameters={"t": t, "space": space})
    for k in base:
        a, b = deltas_of(base, models, k)
        ref = np_slerp(t, base[k] + a, base[k] + b) - base[k] if space == "weights" else np_slerp(t, a, b)
        np.testing.assert_allclose(out[k], base[k] + ref, atol=1e-12)
        if t in (0.0, 1.0):
            np.testing.assert_allclose(out[k], models[int(t)][k], atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(t=st.floats(0.0, 1.0), n=st.integers(2, 40), seed=st.integers(0, 2**31 - 1))
def test_slerp_keeps_the_norm_on_the_arc(t, n, seed):
    from pactmerge.methods.slerp import slerp_vectors

    g = np.random.default_rng(seed)
    a, b = g.standard_normal(n), g.standard_normal(n)
    b *= np.linalg.norm(a) / np.linalg.norm(b)
    if abs(np.vdot(a, b)) / np.vdot(a, a) > 0.9995:
        return  # the collinear fallback is a line, not the arc
    got = slerp_vectors(t, torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert abs(np.linalg.norm(got) - np.linalg.norm(a)) < 1e-10 * np.linalg.norm(a)
    np.testing.assert_allclose(got, np_slerp(t, a, b), atol=1e-12)


def test_slerp_gradient_and_filter_rules_per_tensor(rng):
    base = {
        "embed.w": rng.standard_normal((6, 5)),
        "model.layers.0.attn.w": rng.standard_normal((5, 5)),
        "model.layers.1.mlp.w": rng.standard_normal((5, 5)),
        "model.layers.2.attn.w": rng.standard_normal((5, 5)),
        "lm_head.w": rng.standard_normal((6, 5)),
    }
    models = [{k: v + 0.5 * rng.standard_normal(v.shape) for k, v in base.items()} for _ in range(2)]
    t_rules = [{"filter": "attn", "value": [0.0, 1.0]}, {"value": [0.2, 0.4, 0.8]}]
    out = run(base, models, "slerp", parameters={"t": t_rules})
    # mergekit: layer i of L at x = i / (L - 1); unnumbered parameters at x = 0; interpolate list at x (len - 1)
    expect_t = {
        "embed.w": 0.2,
        "model.layers.0.attn.w": 0.0,
        "model.layers.1.mlp.w": 0.4,
        "model.layers.2.attn.w": 1.0,
        "lm_head.w": 0.2,
    }
    for k, t in expect_t.items():
        ref = np_slerp(t, models[0][k], models[1][k])
        np.testing.assert_allclose(out[k], ref, atol=1e-12, err_msg=k)
    out = run(base, models, "slerp", parameters={"t": [0.0, 0.5]})  # 3 layers: x = 0, 0.5, 1 -> t = 0, .25, .5
    np.testing.assert_allclose(
        out["model.layers.1.mlp.w"], np_slerp(0.25, *(m["model.layers.1.mlp.w"] for m in models)), atol=1e-12
    )


def test_slerp_refuses_other_model_counts_before_reading(rng, monkeypatch):
    import pactmerge.engine as engine

    base, models = layer_models(rng, 3)

    def no_reading(*a, **k):
        raise AssertionError("read before refusing")

    monkeypatch.setattr(engine, "read_deltas", no_reading)
    for ms in (models, models[:1]):
        with pytest.raises(pactmerge.PactMergeError) as e:
            run(base, ms, "slerp")
        assert "exactly 2 models" in one_line_error(e)


@pytest.mark.parametrize(
    "params,match",
    [({"t": 1.5}, "outside"), ({"t": [{"filter": "attn", "value": 0.5}]}, "no rule"), ({"t": []}, "empty")],
)
def test_slerp_rejects_bad_t(rng, params, match):
    base, models = layer_models(rng, 2)
    with pytest.raises(pactmerge.PactMergeError) as e:
        run(base, models, "slerp", parameters=params)
    assert match in one_line_error(e)
    with pytest.raises(pactmerge.PactMergeError, match="weights do not apply"):
        run(base, models, "slerp", weights=[1.0, 2.0])


# -- WUDI -------------------------------------------------------------------------------------


def np_wudi_grad(x, taus):
    return sum(2 * (x - t) @ t.T @ t / np.sum(t * t) for t in taus)


def np_wudi_loss(x, taus):
    return sum(np.sum(((x - t) @ t.T) ** 2) / np.sum(t * t) for t in taus)


def np_adam(x, taus, iters, lr):
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    for step in range(1, iters + 1):
        g = np_wudi_grad(x, taus)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        x = x - lr * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
    return x


@pytest.mark.parametrize("T", [1, 3])
def test_wudi_adam_matches_formula(rng, T):
    base, models = layer_models(rng, T)
    w = rng.uniform(0.5, 1.5, T)
    out = run(base, models, "wudi", weights=w, parameters={"iterations": 25, "lr": 1e-3})
    for k in base:
        taus = [wi * d for wi, d in zip(w, deltas_of(base, models, k))]
        ref = np.mean(taus, axis=0) if base[k].ndim == 1 else np_adam(sum(taus), taus, 25, 1e-3)
        np.testing.assert_allclose(out[k], base[k] + ref, atol=1e-10, err_msg=k)


def test_wudi_exact_is_the_minimiser(rng):
    base, models = layer_models(rng, 3, m=12, n=20)  # wide: the tasks' rows do not span R^n
    out = run(base, models, "wudi", parameters={"solver": "exact"})
    adam = run(base, models, "wudi", parameters={"iterations": 50, "lr": 1e-3})
    for k in ("blk.0.w", "blk.1.w", "head.w"):
        taus = deltas_of(base, models, k)
        x = out[k] - base[k]
        assert np.abs(np_wudi_grad(x, taus)).max() < 1e-9 * np.abs(np_wudi_grad(sum(taus), taus)).max()
        rows = np.concatenate(taus, axis=0)  # x lies in the tasks' row space
        proj = x @ np.linalg.pinv(rows) @ rows
        np.testing.assert_allclose(x, proj, atol=1e-10)
        assert np_wudi_loss(x, taus) <= np_wudi_loss(adam[k] - base[k], taus) + 1e-12


def test_wudi_rejects_zero_task_vectors_and_unbounded_iterations(rng):
    base, models = layer_models(rng, 2)
    models[1]["blk.1.w"] = base["blk.1.w"].copy()
    with pytest.raises(pactmerge.PactMergeError) as e:
        run(base, models, "wudi")
    assert "blk.1.w" in one_line_error(e) and "model 1" in str(e.value)
    for bad in ({"iterations": 0}, {"iterations": 10**6}, {"lr": 0.0}):
        with pytest.raises(pactmerge.PactMergeError) as e:
            run(base, models, "wudi", parameters=bad)
        one_line_error(e)


# -- NAN (filter) -----------------------------------------------------------------------------


@pytest.mark.parametrize("norm_of,scale", [("task_vector", None), ("weights", 1.5)])
def test_nan_matches_formula(rng, norm_of, scale):
    base, models = layer_models(rng, 3)
    models[2] = {k: base[k] + 3.0 * (v - base[k]) for k, v in models[2].items()}  # one loud task
    params = {"norm_of": norm_of} | ({"scale": scale} if scale else {})
    out = run(base, models, "task_arithmetic", filters=[{"nan": params}])
    for k in base:
        ds = deltas_of(base, models, k)
        norms = [np.linalg.norm(m[k] if norm_of == "weights" else d) for m, d in zip(models, ds)]
        inv = [1 / x for x in norms]
        alpha = [x / sum(inv) for x in inv]
        c = scale if scale else 3 / 2
        np.testing.assert_allclose(out[k], base[k] + c * sum(a * d for a, d in zip(alpha, ds)), atol=1e-12)


def test_nan_zero_task_vector_gets_no_share(rng):
    base, models = layer_models(rng, 3)
    models[0]["blk.0.w"] = base["blk.0.w"].copy()
    out = run(base, models, "task_arithmetic", filters=["nan"])
    ds = deltas_of(base, models, "blk.0.w")[1:]
    inv = [1 / np.linalg.norm(d) for d in ds]
    ref = 1.5 * sum(x / sum(inv) * d for x, d in zip(inv, ds))
    np.testing.assert_allclose(out["blk.0.w"], base["blk.0.w"] + ref, atol=1e-12)


# -- KnOTS: scaled coordinates, model-wide trim, Iso-C / Iso-CTS ------------------------------


def np_knots_coords(ds):
    n = ds[0].shape[1]
    u, s, vt = np.linalg.svd(np.concatenate(ds, axis=1), full_matrices=False)
    keep = s > max(ds[0].shape[0], n * len(ds)) * np.finfo(np.float64).eps * s[0]
    u, s, vt = u[:, keep], s[keep], vt[keep]
    return u, [s[:, None] * vt[:, t * n : (t + 1) * n] for t in range(len(ds))]


def np_ties(items, taus, w, aggregate="mean"):
    trimmed = np.stack([np.where(np.abs(x) >= tau, x, 0.0) for x, tau in zip(items, taus)])
    wb = np.asarray(w).reshape((-1,) + (1,) * (trimmed.ndim - 1))
    elected = np.sign((wb * trimmed).sum(0))
    agree = (np.sign(trimmed) == elected) & (trimmed != 0)
    num = (wb * trimmed * agree).sum(0)
    if aggregate == "sum":
        return num
    den = (wb * agree).sum(0)
    return np.where(den != 0, num / np.where(den != 0, den, 1), 0.0)


@pytest.mark.parametrize("T", [2, 3])
def test_knots_ties_trims_scaled_coordinates_over_the_whole_model(rng, T):
    base, models = layer_models(rng, T)
    w = rng.uniform(0.6, 1.4, T)
    out = run(base, models, "knots", weights=w, parameters={"base_method": "ties", "density": 0.3})
    items = {}
    for k in base:
        ds = deltas_of(base, models, k)
        items[k] = np_knots_coords(ds) if base[k].ndim == 2 else (None, ds)
    taus = []
    for t in range(T):  # each task's 30% largest |C_t| (and 1-D |Delta_t|) over every parameter
        flat = np.abs(np.concatenate([items[k][1][t].ravel() for k in base]))
        taus.append(np.sort(flat)[::-1][int(0.3 * flat.size) - 1])
    for k in base:
        u, xs = items[k]
        merged = np_ties(xs, taus, w)
        ref = merged if u is None else u @ merged
        np.testing.assert_allclose(out[k], base[k] + ref, atol=1e-11, err_msg=k)


def np_iso_flat(x):
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    keep = s > max(x.shape) * np.finfo(np.float64).eps * s[0]
    return s.mean() * u[:, keep] @ vt[keep]


def test_knots_composes_with_iso_c_and_iso_cts(rng):
    base, models = layer_models(rng, 3, m=24, n=10)
    out = run(base, models, "knots", parameters={"base_method": "iso_c"})
    cts = run(base, models, "knots", parameters={"base_method": "iso_cts"})
    for k in ("blk.0.w", "head.w"):
        ds = deltas_of(base, models, k)
        u, coords = np_knots_coords(ds)
        np.testing.assert_allclose(out[k], base[k] + u @ np_iso_flat(sum(coords)), atol=1e-11)
        got = cts[k] - base[k]
        s = np.linalg.svd(got, compute_uv=False)
        q = min(coords[0].shape)
        assert s[:q].max() - s[:q].min() < 1e-9 * s[0]  # one flat spectrum over the joint space
        assert np.all(s[q:] < 1e-10 * s[0])
        col = u @ u.T  # ... inside the tasks' joint column space
        np.testing.assert_allclose(col @ got, got, atol=1e-10)
    np.testing.assert_allclose(
        out["blk.0.b"], np.mean(deltas_of(base, models, "blk.0.b"), axis=0) + base["blk.0.b"], atol=1e-12
    )


# -- composition with PACT: filters [pact] + method == method on hand-filtered task vectors -------

COMPOSE = [
    ("breadcrumbs", {"density": 0.5, "gamma": 0.05}, 3),
    ("della", {"density": 0.6, "epsilon": 0.2}, 3),
    ("pcb", {"ratio": 0.3}, 3),
    ("star", {}, 3),
    ("cart", {"rank": 2}, 3),
    ("wudi", {"iterations": 20, "lr": 1e-4}, 3),
    ("wudi", {"solver": "exact"}, 3),
    ("model_stock", {}, 3),
    ("slerp", {"t": 0.4}, 2),
    ("tall_masks", {"base_method": "ties"}, 3),
    ("tsv_c", {}, 3),
    ("consensus", {"base_method": "ties"}, 3),
    ("knots", {"base_method": "ties", "density": 0.4}, 3),
    ("knots", {"base_method": "iso_cts"}, 3),
]


@pytest.mark.parametrize("method,params,T", COMPOSE)
def test_pact_composes_with_method(rng, method, params, T):
    from conftest import np_pact

    base, models = layer_models(rng, T, m=16, n=12)
    K, k = 4, 2
    filtered = [dict(m) for m in models]
    for key in base:
        if base[key].ndim != 2:
            continue  # PACT bypasses 1-D parameters
        for t, d in enumerate(np_pact(base[key], deltas_of(base, models, key), K, k)):
            filtered[t][key] = base[key] + d
    out = run(base, models, method, filters=[{"pact": {"K": K, "k": k}}], parameters=params)
    ref = run(base, filtered, method, parameters=params)
    for key in base:
        np.testing.assert_allclose(out[key], ref[key], atol=1e-9, err_msg=key)


def test_pact_composes_with_nan_filter(rng):
    from conftest import np_pact

    base, models = layer_models(rng, 3, m=16, n=12)
    out = run(base, models, "task_arithmetic", filters=[{"pact": {"K": 4, "k": 2}}, "nan"])
    for key in base:
        ds = deltas_of(base, models, key)
        if base[key].ndim == 2:
            ds = np_pact(base[key], ds, 4, 2)
        inv = [1 / np.linalg.norm(d) for d in ds]
        ref = 1.5 * sum(x / sum(inv) * d for x, d in zip(inv, ds))
        np.testing.assert_allclose(out[key], base[key] + ref, atol=1e-10, err_msg=key)
