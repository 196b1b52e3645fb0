"""pactmerge analyze: every metric against an independent float64 numpy derivation, known
answers, agreement with the real pact filter and the merge's streaming, outputs and CLI."""

import json
import math

import numpy as np
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from conftest import decaying, np_orth, np_top_right, t64
from pactmerge.analysis import analyze
from pactmerge.analysis.cli import analyze_command
from pactmerge.analysis.components import classify
from pactmerge.analysis.metrics import param_metrics
from pactmerge.config import load_config
from pactmerge.engine import open_inputs, read_deltas
from pactmerge.errors import PactMergeError
from pactmerge.filters.pact import PactParams, pact, pact_subspaces
from pactmerge.plan import make_context
from pactmerge.registry import ParamContext, ParamInfo
from pactmerge.synthetic import make_checkpoints

M, N, K, k = 24, 20, 6, 3


def ctx_for(shape, T, depth_fraction=0.5):
    info = ParamInfo("layers.0.w", tuple(shape), torch.float64, "matrix", 0, depth_fraction)
    return ParamContext(info=info, seed=0, weights=[1.0] * T, model_params=[{}] * T)


def np_reference(base, deltas, K, k):
    """The paper's diagnostics written from scratch in float64 numpy (Eqs. 4, 5, 7, 8, 37)."""
    n = base.shape[1]
    v0 = np_top_right(base, K)
    act = [np_top_right(d, k) for d in deltas]
    lbw = [np_orth((np.eye(n) - v @ v.T) @ v0) for v in act]
    T = len(deltas)
    prot = [np_orth(np.concatenate([lbw[j] for j in range(T) if j != t], axis=1)) for t in range(T)]
    fro2 = lambda a: float(np.sum(a * a))  # noqa: E731
    return {
        "e_in": np.array([fro2(d @ v0) / fro2(d) for d in deltas]),
        "axis": np.array([[fro2(d @ v0[:, [i]]) / fro2(d) for i in range(K)] for d in deltas]),
        "sim": np.array(
            [[fro2(lbw[a].T @ lbw[b]) / min(lbw[a].shape[1], lbw[b].shape[1]) for b in range(T)] for a in range(T)]
        ),
        "inf": np.array([[fro2(act[b].T @ lbw[a]) / k for b in range(T)] for a in range(T)]),
        "pdim": np.array([p.shape[1] for p in prot]),
        "removed": np.array([fro2(d @ p) / fro2(d) for d, p in zip(deltas, prot)]),
        "resid": np.array([math.sqrt(fro2(v0 - p @ (p.T @ v0))) / math.sqrt(K) for p in prot]),
    }


@pytest.mark.parametrize("T", [2, 3, 5])
def test_metrics_match_numpy_derivation(rng, T):
    base = decaying(rng, M, N, decay=0.75)
    deltas = [
        0.05 * (rng.standard_normal((M, 3)) @ rng.standard_normal((3, N)) + 0.1 * rng.standard_normal((M, N)))
        for _ in range(T)
    ]
    p = PactParams(K=K, k=k)
    sub = pact_subspaces(t64(base), [t64(d) for d in deltas], p)
    m = param_metrics([t64(d) for d in deltas], sub)
    ref = np_reference(base, deltas, K, k)
    np.testing.assert_allclose(m.intrusion_energy.numpy(), ref["e_in"], atol=1e-10)
    np.testing.assert_allclose(m.core_axis_energy.numpy(), ref["axis"], atol=1e-10)
    np.testing.assert_allclose(m.sim.numpy(), ref["sim"], atol=1e-10)
    np.testing.assert_allclose(m.inf.numpy(), ref["inf"], atol=1e-10)
    np.testing.assert_array_equal(m.protect_dim.numpy(), ref["pdim"])
    np.testing.assert_allclose(m.removed_energy.numpy(), ref["removed"], atol=1e-10)
    np.testing.assert_allclose(m.core_residual.numpy(), ref["resid"], atol=1e-10)
    # The per-axis split sums to E_in; Inf(t -> t) = 0 and Sim(t, t) = 1 by construction.
    np.testing.assert_allclose(m.core_axis_energy.sum(1).numpy(), m.intrusion_energy.numpy(), atol=1e-12)
    assert np.abs(np.diag(m.inf.numpy())).max() < 1e-12
    np.testing.assert_allclose(np.diag(m.sim.numpy()), 1.0, atol=1e-12)
    # README, composing PACT with Iso-C: with K, k = 6, 3 the other tasks cover the whole core once (T-1)(K-k) >= K.
    assert bool(m.core_protected.all()) == ((T - 1) * (K - k) >= K)


def test_known_answers_inside_and_outside_core(rng):
    base = decaying(rng, M, N)
    v0 = np_top_right(base, K)
    inside = rng.standard_normal((M, K)) @ v0.T  # Delta = X V_{0,K}^T
    outside = rng.standard_normal((M, N)) @ (np.eye(N) - v0 @ v0.T)
    sub = pact_subspaces(t64(base), [t64(inside), t64(outside)], PactParams(K=K, k=k))
    m = param_metrics([t64(inside), t64(outside)], sub)
    assert m.intrusion_energy[0].item() == pytest.approx(1.0, abs=1e-12)
    assert m.intrusion_energy[1].item() == pytest.approx(0.0, abs=1e-12)
    assert m.core_axis_energy[0].sum().item() == pytest.approx(1.0, abs=1e-12)
    assert m.core_axis_energy[1].abs().max().item() < 1e-12


def test_identical_tasks_have_sim_one(rng):
    base = decaying(rng, M, N)
    d = 0.05 * rng.standard_normal((M, N))
    deltas = [t64(d), t64(d.copy()), t64(d.copy())]
    m = param_metrics(deltas, pact_subspaces(t64(base), deltas, PactParams(K=K, k=k)))
    np.testing.assert_allclose(m.sim.numpy(), 1.0, atol=1e-10)
    np.testing.assert_allclose(m.inf.numpy(), 0.0, atol=1e-10)  # the same k directions, outside every LBW


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_removed_energy_equals_real_pact_filter(rng, svd):
    base = decaying(rng, M, N)
    deltas = [t64(0.05 * rng.standard_normal((M, N))) for _ in range(3)]
    p = PactParams(K=K, k=k, svd=svd)
    ctx = ctx_for((M, N), 3)
    filtered = pact(t64(base), deltas, ctx, p)
    m = param_metrics(deltas, pact_subspaces(t64(base), deltas, p, ctx))
    for t, (d, f) in enumerate(zip(deltas, filtered)):
        expect = float(((d - f) ** 2).sum() / (d**2).sum())
        assert m.removed_energy[t].item() == pytest.approx(expect, rel=1e-10)


def test_unfiltered_parameter_reports_nothing_removed(rng):
    base = decaying(rng, M, N)
    deltas = [t64(0.05 * rng.standard_normal((M, N))) for _ in range(3)]
    m = param_metrics(deltas, pact_subspaces(t64(base), deltas, PactParams(K=K, k=k)), pact_applied=False)
    assert m.protect_dim.tolist() == [0, 0, 0] and m.removed_energy.tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(m.core_residual.numpy(), 1.0, atol=1e-12)
    assert not m.core_protected.any() and not m.pact_applied


def test_zero_task_vector_gives_nan_not_zero(rng):
    base = decaying(rng, M, N)
    deltas = [t64(np.zeros((M, N))), t64(0.05 * rng.standard_normal((M, N)))]
    m = param_metrics(deltas, pact_subspaces(t64(base), deltas, PactParams(K=K, k=k)))
    assert math.isnan(m.intrusion_energy[0].item()) and math.isnan(m.removed_energy[0].item())
    assert math.isfinite(m.intrusion_energy[1].item())


@pytest.mark.parametrize(
    "name,component",
    [
        ("encoder.layer.0.attention.self.query.weight", "attn_in"),
        ("model.layers.3.self_attn.k_proj.weight", "attn_in"),
        ("visual.transformer.resblocks.0.attn.in_proj_weight", "attn_in"),
        ("h.0.attn.c_attn.weight", "attn_in"),
        ("encoder.layer.0.attention.output.dense.weight", "attn_out"),
        ("model.layers.3.self_attn.o_proj.weight", "attn_out"),
        ("visual.transformer.resblocks.0.attn.out_proj.weight", "attn_out"),
        ("h.0.attn.c_proj.weight", "attn_out"),
        ("encoder.layer.0.intermediate.dense.weight", "mlp_in"),
        ("model.layers.3.mlp.gate_proj.weight", "mlp_in"),
        ("vision_model.encoder.layers.0.mlp.fc1.weight", "mlp_in"),
        ("h.0.mlp.c_fc.weight", "mlp_in"),
        ("encoder.layer.0.output.dense.weight", "mlp_out"),
        ("model.layers.3.mlp.down_proj.weight", "mlp_out"),
        ("h.0.mlp.c_proj.weight", "mlp_out"),
        ("vision_model.encoder.layers.0.mlp.fc2.weight", "mlp_out"),
        ("embeddings.word_embeddings.weight", "embeddings"),
        ("transformer.wte.weight", "embeddings"),
        ("visual.positional_embedding", "embeddings"),
        ("encoder.layer.0.output.LayerNorm.weight", "other"),
        ("pooler.dense.weight", "other"),
        ("lm_head.weight", "other"),
    ],
)
def test_component_classification(name, component):
    assert classify(name) == component


# -- end to end on generated checkpoints --------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    base, models = make_checkpoints(root / "in", n_models=3, layers=2, hidden=16)
    return root, base, models


def config(base, models, **pact):
    return {
        "base_model": str(base),
        "models": [str(m) for m in models],
        "method": "iso_c",
        "pact": {"K": 4, "k": 2, **pact},
    }


PARAM_KEYS = {
    "intrusion_energy",
    "core_axis_energy",
    "sim",
    "inf",
    "protect_dim",
    "removed_energy",
    "core_residual",
    "layer",
    "component",
    "shape",
}


def test_analyze_writes_schema_tables_and_plots(ckpts):
    from matplotlib import image

    root, base, models = ckpts
    out = root / "report"
    res = analyze(config(base, models), out, worst_n=3)
    data = json.loads((out / "metrics.json").read_text())  # strict JSON: NaN would have been written as null
    assert data == json.loads(json.dumps(res))
    assert set(data) == {"parameters", "summary", "tasks", "config"}
    assert data["tasks"] == ["task0", "task1", "task2"]
    T = 3
    matrices = list(data["parameters"])
    assert "encoder.layer.0.attention.query.weight" in matrices and not any(n.endswith(".bias") for n in matrices)
    for name, e in data["parameters"].items():
        assert set(e) >= PARAM_KEYS, name
        assert len(e["intrusion_energy"]) == T and len(e["removed_energy"]) == T and len(e["protect_dim"]) == T
        assert np.array(e["core_axis_energy"]).shape == (T, 4)
        assert np.array(e["sim"]).shape == (T, T) and np.array(e["inf"]).shape == (T, T)
        assert isinstance(e["component"], str) and len(e["shape"]) == 2
        assert e["layer"] is None or isinstance(e["layer"], int)
    s = data["summary"]
    for key in (
        "global",
        "by_component",
        "by_layer",
        "by_layer_component",
        "worst_by_inf",
        "worst_by_intrusion",
        "worst_inf_average",
    ):
        assert key in s, key
    assert len(s["worst_by_inf"]) == 3 and len(s["worst_by_intrusion"]) == 3
    ranked = [r["inf_offdiag_mean"] for r in s["worst_by_inf"]]
    assert ranked == sorted(ranked, reverse=True)
    # The global average is the plain mean over matrices.
    np.testing.assert_allclose(
        s["global"]["intrusion_energy"],
        np.mean([e["intrusion_energy"] for e in data["parameters"].values()], axis=0),
        atol=1e-12,
    )
    assert data["config"]["pact"]["K"] == 4 and data["config"]["pact_configured"]

    rows = (out / "parameters.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + T * len(matrices)
    assert len((out / "pairs.csv").read_text().strip().splitlines()) == 1 + T * T * len(matrices)
    assert (out / "layer_component.csv").is_file()
    report = (out / "report.md").read_text()
    for png in ("intrusion_by_layer.png", "intrusion_heatmap.png", "sim_inf_heatmaps.png", "axis_intrusion.png"):
        f = out / png
        assert f.stat().st_size > 10_000, png
        assert f"]({png})" in report
        img = image.imread(str(f))
        assert img.ndim == 3 and float(img[..., :3].var()) > 1e-3, f"{png} looks blank"
    assert not [p for p in root.iterdir() if p.name.startswith(".report.tmp")]  # atomic: no leftovers


def test_analyze_sees_exactly_what_the_merge_filter_sees(ckpts):
    """Same plan, dtype, seeds and randomized SVD draws: removed_energy equals the energy the
    merge's own pact filter strips from the streamed task vectors, and depth is honoured."""
    root, base, models = ckpts
    cfg = config(base, models, svd="randomized", depth=0.5)
    res = analyze(cfg)
    inputs = open_inputs(load_config(cfg))
    params = PactParams(K=4, k=2, svd="randomized", depth=0.5)
    try:
        checked = 0
        for info in inputs.plan.params:
            if info.name not in res["parameters"]:
                continue
            e = res["parameters"][info.name]
            ctx = make_context(inputs.cfg, info)
            b, deltas = read_deltas(inputs, info, torch.device("cpu"))
            filtered = pact(b, [d.clone() for d in deltas], ctx, params)
            assert e["pact_applied"] == info.in_depth(0.5)
            for t, (d, f) in enumerate(zip(deltas, filtered)):
                expect = float(((d - f).double() ** 2).sum() / (d.double() ** 2).sum())
                assert e["removed_energy"][t] == pytest.approx(expect, rel=1e-3, abs=1e-6), info.name
            if not info.in_depth(0.5):
                assert e["protect_dim"] == [0, 0, 0] and e["removed_energy"] == [0.0, 0.0, 0.0]
            checked += 1
        assert checked == len(res["parameters"]) > 0
    finally:
        inputs.close()
    assert any(not e["pact_applied"] for e in res["parameters"].values())


def test_layers_regex_and_errors(ckpts, tmp_path):
    root, base, models = ckpts
    res = analyze(config(base, models), layers=r"layer\.1\..*(query|key)")
    assert sorted(res["parameters"]) == [
        "encoder.layer.1.attention.key.weight",
        "encoder.layer.1.attention.query.weight",
    ]
    with pytest.raises(PactMergeError, match="no 2-D parameter"):
        analyze(config(base, models), layers="nothing-matches-this")
    with pytest.raises(PactMergeError, match="bad regex"):
        analyze(config(base, models), layers="(")
    with pytest.raises(PactMergeError, match="K=0"):
        analyze(config(base, models, K=0))
    (tmp_path / "exists").mkdir()
    with pytest.raises(PactMergeError, match="already exists"):
        analyze(config(base, models), tmp_path / "exists")
    # A config without a pact filter is analyzed with the PACT defaults (K, k = 15, 8).
    cfg = {"base_model": str(base), "models": [str(m) for m in models], "method": "task_arithmetic"}
    res = analyze(cfg, layers=r"layer\.0\.attention\.query")
    assert not res["config"]["pact_configured"] and res["config"]["pact"]["K"] == 15
    assert np.array(res["parameters"]["encoder.layer.0.attention.query.weight"]["core_axis_energy"]).shape == (3, 15)


def test_cli_analyze(ckpts, monkeypatch):
    import pactmerge.analysis.plots as plots

    monkeypatch.setattr(plots, "PLOTS", {})  # the figures are checked above; keep this test fast
    root, base, models = ckpts
    app = typer.Typer()
    app.command("analyze")(analyze_command)
    app.command("noop")(lambda: None)  # a second command so typer keeps the subcommand name
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(base, models)))
    out = root / "cli-out"
    runner = CliRunner()
    res = runner.invoke(app, ["analyze", str(path), str(out), "--no-progress", "--worst-n", "2", "--layers", "encoder"])
    assert res.exit_code == 0, res.output
    assert "Inf" in res.output and (out / "report.md").is_file()
    assert all(n.startswith("encoder") for n in json.loads((out / "metrics.json").read_text())["parameters"])
    again = runner.invoke(app, ["analyze", str(path), str(out), "--no-progress"])
    assert again.exit_code == 2 and "already exists" in again.output
    res = runner.invoke(app, ["analyze", str(path), str(out), "--no-progress", "--overwrite"])
    assert res.exit_code == 0, res.output
