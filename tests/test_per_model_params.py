"""Per-model options (a model's ``parameters:``) and weights: honoured by the methods that declare
them, refused everywhere else -- checked against independent numpy derivations."""

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import pactmerge
from pactmerge.cli import app
from pactmerge.config import load_config
from pactmerge.filters.dare import dare, dare_mask
from pactmerge.registry import METHODS, NoParams, ParamContext, ParamInfo, register_method
from pactmerge.synthetic import make_checkpoints

runner = CliRunner()


def make_models(rng, T, shapes=((12, 10), (10,), (7, 12))):
    base = {f"p{i}.w": rng.standard_normal(s) for i, s in enumerate(shapes)}
    models = [{k: v + 0.1 * rng.standard_normal(v.shape) for k, v in base.items()} for _ in range(T)]
    return base, models


def t64(sd):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def merge(base, models, method="task_arithmetic", weights=None, model_params=None, **kw):
    entries = []
    for i, m in enumerate(models):
        e = {"model": t64(m)}
        if weights is not None:
            e["weight"] = float(weights[i])
        if model_params is not None and model_params[i]:
            e["parameters"] = model_params[i]
        entries.append(e)
    out = pactmerge.merge(base_model=t64(base), models=entries, method=method, dtype="float64", **kw)
    return {k: v.numpy() for k, v in out.items()}


# -- weight 0 removes a model exactly ---------------------------------------------------------


@pytest.mark.parametrize(
    "method,parameters",
    [
        ("task_arithmetic", {}),
        ("weight_average", {}),
        ("ties", {"scope": "tensor", "density": 0.4}),
        ("ties", {"scope": "model", "density": 0.3, "aggregate": "sum"}),
    ],
)
@pytest.mark.parametrize("dropped", [0, 2])
def test_weight_zero_removes_a_model_exactly(rng, method, parameters, dropped):
    base, models = make_models(rng, 4)
    weights = [1.0, 0.7, 1.3, 0.5]
    weights[dropped] = 0.0
    with_zero = merge(base, models, method, weights=weights, parameters=parameters)
    kept = [i for i in range(4) if i != dropped]
    without = merge(base, [models[i] for i in kept], method, weights=[weights[i] for i in kept], parameters=parameters)
    for k in base:
        assert np.array_equal(with_zero[k], without[k]), k  # bit for bit
    assert not np.array_equal(with_zero["p0.w"], merge(base, models, method, parameters=parameters)["p0.w"])


def test_mergekit_spelling_of_weight_is_the_weight(rng):
    base, models = make_models(rng, 3)
    a = merge(base, models, "ties", weights=[1.0, 0.0, 2.0], parameters={"scope": "tensor"})
    b = merge(base, models, "ties", model_params=[{}, {"weight": 0.0}, {"weight": 2.0}], parameters={"scope": "tensor"})
    for k in base:
        assert np.array_equal(a[k], b[k])


def test_weight_given_twice_differently_is_refused(rng):
    base, models = make_models(rng, 2)
    entries = [{"model": t64(models[0]), "weight": 0.5, "parameters": {"weight": 1.0}}, {"model": t64(models[1])}]
    with pytest.raises(pactmerge.PactMergeError, match=r"models.0.*weight is given twice"):
        load_config({"base_model": t64(base), "models": entries})


def test_iso_c_weights_scale_vectors_too(rng):
    base, models = make_models(rng, 3)
    w = [0.0, 1.0, 2.0]
    out = merge(base, models, "iso_c", weights=w)
    ref = sum(wi * (m["p1.w"] - base["p1.w"]) for wi, m in zip(w, models)) / 3
    np.testing.assert_allclose(out["p1.w"] - base["p1.w"], ref, atol=1e-12)


# -- TIES: per-model density against an independent derivation --------------------------------


def np_ties(deltas_per_task, weights, densities, scope, aggregate="mean", trim="floor"):
    """TIES (Yadav et al. 2023) in numpy: per task t keep its top k_t = count(d_t, n) magnitudes
    (n over the parameter, or over the whole model for scope 'model'), elect sgn(sum_t w_t D_t),
    disjoint weighted mean (or sum) of the agreeing entries. deltas_per_task[t][name] -> array."""
    names = list(deltas_per_task[0])

    def count(d, n):
        k = int(np.floor(d * n))
        return max(1, k) if trim == "floor_at_least_1" else k

    def threshold(arrays, d):
        flat = np.abs(np.concatenate([a.ravel() for a in arrays]))
        k = min(count(d, flat.size), flat.size)
        return np.inf if k == 0 else np.sort(flat)[::-1][k - 1]

    out = {}
    taus = [threshold([dt[n] for n in names], d) for dt, d in zip(deltas_per_task, densities)]
    for name in names:
        trimmed = []
        for t, dt in enumerate(deltas_per_task):
            tau = taus[t] if scope == "model" else threshold([dt[name]], densities[t])
            trimmed.append(np.where(np.abs(dt[name]) >= tau, dt[name], 0.0))
        gamma = np.sign(sum(w * d for w, d in zip(weights, trimmed)))
        agree = [(np.sign(d) == gamma) & (d != 0) for d in trimmed]
        num = sum(w * a * d for w, a, d in zip(weights, agree, trimmed))
        den = sum(w * a for w, a in zip(weights, agree))
        out[name] = num if aggregate == "sum" else np.where(den != 0, num / np.where(den != 0, den, 1), 0.0)
    return out


@pytest.mark.parametrize("scope", ["tensor", "model"])
@pytest.mark.parametrize("aggregate", ["mean", "sum"])
def test_ties_per_model_density_matches_numpy(rng, scope, aggregate):
    base, models = make_models(rng, 3)
    densities = [0.1, 0.5, 0.9]
    weights = [1.0, 0.6, 1.4]
    out = merge(
        base,
        models,
        "ties",
        weights=weights,
        model_params=[{"density": d} for d in densities],
        parameters={"scope": scope, "aggregate": aggregate, "density": 0.2},
    )
    deltas = [{k: m[k] - base[k] for k in base} for m in models]
    ref = np_ties(deltas, weights, densities, scope, aggregate)
    for k in base:
        np.testing.assert_allclose(out[k] - base[k], ref[k], atol=1e-12)
    # The densities really differ per model: the uniform merge is another one.
    uniform = merge(base, models, "ties", weights=weights, parameters={"scope": scope, "aggregate": aggregate})
    assert not np.allclose(out["p0.w"], uniform["p0.w"])


def test_ties_model_without_own_density_uses_the_method_density(rng):
    base, models = make_models(rng, 3)
    out = merge(base, models, "ties", model_params=[{"density": 0.7}, {}, {}], parameters={"density": 0.3})
    deltas = [{k: m[k] - base[k] for k in base} for m in models]
    ref = np_ties(deltas, [1.0] * 3, [0.7, 0.3, 0.3], "model")
    for k in base:
        np.testing.assert_allclose(out[k] - base[k], ref[k], atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 9),
    densities=st.lists(st.floats(0.05, 1.0), min_size=2, max_size=4),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(["float32", "float64"]),
)
def test_ties_per_model_density_property(m, n, densities, seed, dtype):
    rng = np.random.default_rng(seed)
    T = len(densities)
    base = {"w": rng.standard_normal((m, n))}
    models = [{"w": base["w"] + rng.standard_normal((m, n))} for _ in range(T)]
    tdt = torch.float32 if dtype == "float32" else torch.float64
    entries = [
        {"model": {"w": torch.from_numpy(x["w"]).to(tdt)}, "parameters": {"density": d}}
        for x, d in zip(models, densities)
    ]
    out = pactmerge.merge(
        base_model={"w": torch.from_numpy(base["w"]).to(tdt)},
        models=entries,
        method="ties",
        parameters={"scope": "tensor", "trim_count": "floor_at_least_1"},
        dtype="float64",
        out_dtype="float64",
    )["w"]
    # Reference on the same (rounded) inputs, in float64.
    b64 = torch.from_numpy(base["w"]).to(tdt).double().numpy()
    deltas = [{"w": torch.from_numpy(x["w"]).to(tdt).double().numpy() - b64} for x in models]
    ref = np_ties(deltas, [1.0] * T, densities, "tensor", trim="floor_at_least_1")["w"]
    np.testing.assert_allclose(out.numpy() - b64, ref, atol=1e-12)
    # Invariant: each task keeps max(1, floor(d_t n)) entries, so every merged entry is one a task kept.
    kept_any = sum(
        np.abs(d["w"]) >= np.sort(np.abs(d["w"]).ravel())[::-1][max(1, int(dt * (m * n))) - 1]
        for d, dt in zip(deltas, densities)
    )
    assert np.all((out.numpy() - b64)[kept_any == 0] == 0)


# -- consensus and KnOTS: per-model density where their TIES applies ---------------------------


def test_consensus_ties_per_model_density_and_lambda_match_numpy(rng):
    base, models = make_models(rng, 3)
    densities, lambdas = [0.3, 0.6, 0.9], [0.2, 0.6, 0.4]
    out = merge(
        base,
        models,
        "consensus",
        model_params=[{"density": d, "lambda": lam} for d, lam in zip(densities, lambdas)],
        parameters={"k": 2, "base_method": "ties", "ties": {"scope": "tensor"}},
    )
    deltas = [{k: m[k] - base[k] for k in base} for m in models]
    # Wang et al.: Consensus-TIES merges by the disjoint sum and builds the TALL masks from that vector.
    ties_ref = np_ties(deltas, [1.0] * 3, densities, "tensor", aggregate="sum")
    for k in base:
        mtl = ties_ref[k]
        votes = sum((np.abs(d[k]) >= lam * np.abs(mtl - d[k])).astype(int) for d, lam in zip(deltas, lambdas))
        np.testing.assert_allclose(out[k] - base[k], np.where(votes >= 2, mtl, 0.0), atol=1e-12)


def test_knots_ties_per_model_density_matches_numpy(rng):
    base, models = make_models(rng, 3, shapes=((9, 6),))
    densities = [0.2, 0.5, 0.8]
    out = merge(
        base,
        models,
        "knots",
        model_params=[{"density": d} for d in densities],
        parameters={"base_method": "ties"},
    )
    deltas = [m["p0.w"] - base["p0.w"] for m in models]
    u, s, vh = np.linalg.svd(np.concatenate(deltas, axis=1), full_matrices=False)
    r = int((s > max(9, 18) * np.finfo(float).eps * s[0]).sum())
    u, s, vh = u[:, :r], s[:r], vh[:r]
    # KnOTS trims the singular-value-scaled coordinates S V_t (one parameter here: model scope = tensor).
    cs = [{"c": s[:, None] * vh[:, t * 6 : (t + 1) * 6]} for t in range(3)]
    merged_c = np_ties(cs, [1.0] * 3, densities, "tensor")["c"]
    np.testing.assert_allclose(out["p0.w"] - base["p0.w"], u @ merged_c, atol=1e-10)


def test_dare_per_model_drop_rate():
    info = ParamInfo("w", (30, 20), torch.float64, "matrix", None, 1.0)
    ctx = ParamContext(info, seed=5, weights=[1.0, 1.0], model_params=[{"p": 0.0}, {}])
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(30, 20, generator=gen, dtype=torch.float64) for _ in range(2)]
    from pactmerge.filters.dare import DareParams

    out = dare(torch.zeros(30, 20, dtype=torch.float64), [d.clone() for d in deltas], ctx, DareParams(p=0.5))
    assert torch.equal(out[0], deltas[0])  # p_0 = 0: untouched
    keep = dare_mask((30, 20), 0.5, ctx.generator(salt=1))
    assert torch.equal(out[1], torch.where(keep, deltas[1], 0.0) / 0.5)


# -- refused ----------------------------------------------------------------------------------


def config(base, models, **kw):
    return {"base_model": t64(base), "models": [{"model": t64(m)} for m in models], **kw}


@pytest.mark.parametrize(
    "method,extra,params,match",
    [
        ("ties", {}, {"densty": 0.3}, r"'models\[1\]\.parameters\.densty'.*not a per-model option.*takes density"),
        ("task_arithmetic", {}, {"density": 0.3}, r"'models\[1\]\.parameters\.density'.*it takes none"),
        ("ties", {}, {"density": 1.5}, r"'models\[1\]\.parameters\.density' \(ties\)"),
        ("ties", {}, {"density": True}, r"'models\[1\]\.parameters\.density' \(ties\)"),
        ("consensus", {}, {"density": 0.3}, r"'models\[1\]\.parameters\.density'.*takes lambda"),
        ("knots", {}, {"density": 0.3}, r"'models\[1\]\.parameters\.density'.*it takes none"),
        ("task_arithmetic", {"filters": ["dare"]}, {"p": 1.0}, r"'models\[1\]\.parameters\.p' \(dare\)"),
        ("iso_c", {"pact": {"K": 2, "k": 1}}, {"K": 3}, r"'models\[1\]\.parameters\.K'"),
    ],
)
def test_bad_per_model_options_are_refused(rng, method, extra, params, match):
    base, models = make_models(rng, 2)
    cfg = config(base, models, method=method, **extra)
    cfg["models"][1]["parameters"] = params
    with pytest.raises(pactmerge.PactMergeError, match=match):
        load_config(cfg)


@pytest.fixture
def unweighted_method():
    @register_method("_test_unweighted", params=NoParams)
    def _unweighted(base, deltas, ctx, p):
        """A method with no per-model weight."""
        return sum(deltas) / len(deltas)

    yield "_test_unweighted"
    del METHODS["_test_unweighted"]


def test_weight_refused_by_a_method_without_weights(rng, unweighted_method):
    base, models = make_models(rng, 2)
    cfg = config(base, models, method=unweighted_method)
    load_config(cfg)  # weight 1 (the default) is fine
    cfg["models"][0]["weight"] = 0.0
    with pytest.raises(pactmerge.PactMergeError, match=r"'models\[0\]\.weight' \(_test_unweighted\).*no per-model"):
        load_config(cfg)


def test_cli_refuses_unknown_per_model_key_before_any_work(tmp_path):
    base, models = make_checkpoints(tmp_path / "in", n_models=2, layers=1, hidden=8)
    path = tmp_path / "merge.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base_model": str(base),
                "models": [{"model": str(models[0]), "parameters": {"density": 0.5}}, {"model": str(models[1])}],
                "method": "task_arithmetic",
            }
        )
    )
    out = tmp_path / "out"
    for extra in (["--dry-run"], []):
        res = runner.invoke(app, ["merge", str(path), str(out), "--no-progress", *extra])
        assert res.exit_code == 2
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and "models[0].parameters.density" in lines[0]
        assert not out.exists()
    assert not list(tmp_path.glob(".out*"))
