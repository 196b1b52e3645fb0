"""The calibration pass: hooks, name mapping, squared gradients, the cache, and its bad inputs."""

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pactmerge
from data_aware_models import Tiny, Wrapped, examples, family, loader, manual_covariances, model_data, state
from pactmerge.errors import PactMergeError
from pactmerge.stats import ModelData, collate, collect_covariances, map_names, squared_gradients
from pactmerge.stats.cache import META_KEY


def merge(base, fts, data, tmp_path, method="regmean", filters=(), samples=16, **cal):
    cfg = {
        "base_model": base,
        "models": fts,
        "method": method,
        "filters": list(filters),
        "dtype": "float64",
        "calibration": {"samples": samples, "cache_dir": str(tmp_path / "stats"), "dtype": "float64", **cal},
    }
    return pactmerge.merge(cfg, calibration_data=data)


# -- hooks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_hooks_sum_xxT_over_real_tokens_only(batch_size):
    base, _ = family(1)
    exs = examples(11, seed=3)
    model = loader(base)().eval()
    got = collect_covariances(model, (collate(exs[i : i + batch_size]) for i in range(0, 11, batch_size)))
    ref = manual_covariances(base, exs)
    names = {f"layers.{i}.{w}": f"layers.{i}.{w}.weight" for i in range(2) for w in ("up", "down")}
    names["head"] = "head.weight"
    tokens = sum(len(e["input_ids"]) for e in exs)
    for mod, pname in names.items():
        np.testing.assert_allclose(got[mod].sum.numpy(), ref[pname].numpy(), rtol=1e-12, atol=1e-12)
        assert got[mod].count == (11 if mod == "head" else tokens)  # the head sees one pooled row per example


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 9), st.integers(1, 12), st.integers(1, 8), st.sampled_from([torch.float32, torch.float64]))
def test_hooks_property_random_shapes_and_dtypes(n, batch_size, d, dtype):
    torch.manual_seed(n * 100 + d)
    model = Tiny(d=d, h=d + 2).to(dtype).eval()
    sd = {k: v.double() for k, v in model.state_dict().items()}
    exs = examples(n, seed=n + d)
    got = collect_covariances(model, (collate(exs[i : i + batch_size]) for i in range(0, n, batch_size)))
    ref = manual_covariances(sd, exs, d=d, h=d + 2)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for i in range(2):
        for w in ("up", "down"):
            r = ref[f"layers.{i}.{w}.weight"].numpy()
            np.testing.assert_allclose(got[f"layers.{i}.{w}"].sum.numpy(), r, rtol=tol, atol=tol * np.abs(r).max())


def test_padding_is_masked_even_when_padded_inputs_are_large():
    # Padding tokens get id 12 whose embedding is huge: any leak would dominate C.
    base, _ = family(1)
    base["emb.weight"][12] = 1e3
    exs = examples(6, seed=4)
    model = loader(base)().eval()
    got = collect_covariances(model, [collate(exs, pad_id=12)])
    ref = manual_covariances(base, exs)
    np.testing.assert_allclose(got["layers.0.up"].sum.numpy(), ref["layers.0.up.weight"].numpy(), rtol=1e-12)


def test_pointwise_conv_is_the_matrix_at_every_pixel():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 5, 1), nn.ReLU(), nn.Conv2d(5, 3, 3, padding=1), nn.Conv2d(3, 2, 1)).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    got = collect_covariances(net, [{"x": x}], forward=lambda m, b: m(b["x"]))
    assert set(got) == {"0", "3"}  # the 3x3 convolution is not a matrix
    rows = x.permute(0, 2, 3, 1).reshape(-1, 4)
    np.testing.assert_allclose(got["0"].sum.numpy(), (rows.T @ rows).numpy(), rtol=1e-12)
    assert got["0"].count == 18


# -- names -----------------------------------------------------------------------------------------


def test_map_names_identity_and_prefixes():
    ckpt = ["emb.weight", "layers.0.up.weight", "layers.0.down.weight", "head.weight"]
    assert map_names(["layers.0.up.weight", "classifier.weight"], ckpt) == {"layers.0.up.weight": "layers.0.up.weight"}
    # the live model wraps the checkpoint's network (bert.encoder... vs encoder...)
    wrapped = ["bert.emb.weight", "bert.layers.0.up.weight", "classifier.weight"]
    assert map_names(wrapped, ckpt) == {
        "bert.emb.weight": "emb.weight",
        "bert.layers.0.up.weight": "layers.0.up.weight",
    }
    # the checkpoint wraps the live model's network (model.layers... vs layers...)
    outer = ["model." + n for n in ckpt]
    assert map_names(["layers.0.up.weight", "head.weight"], outer) == {
        "layers.0.up.weight": "model.layers.0.up.weight",
        "head.weight": "model.head.weight",
    }
    assert map_names(["x.weight"], ckpt) == {}


def test_map_names_uses_one_rewrite_for_all_names():
    # "a.w" could map to "a.w" or (dropping "enc.") "enc.a.w" -> "a.w"; the majority rewrite wins for every name.
    ckpt = ["a.w", "b.w", "c.w"]
    got = map_names(["enc.a.w", "enc.b.w", "enc.c.w", "a.w"], ckpt)
    assert got == {"enc.a.w": "a.w", "enc.b.w": "b.w", "enc.c.w": "c.w"}


# -- squared gradients -----------------------------------------------------------------------------


def test_squared_gradients_are_the_mean_of_per_example_squares():
    base, _ = family(1)
    model = loader(base)()
    exs = examples(5, seed=7)
    names = ["layers.1.down.weight", "head.bias", "emb.weight"]
    got = squared_gradients(model, (collate([e]) for e in exs), lambda m, b: m(**b).loss, names)
    ref = {n: torch.zeros_like(dict(model.named_parameters())[n]) for n in names}
    for e in exs:
        m = loader(base)()
        out = m(**collate([e]))
        grads = torch.autograd.grad(out.loss, [dict(m.named_parameters())[n] for n in names])
        for n, g in zip(names, grads):
            ref[n] += g**2 / len(exs)
    for n in names:
        np.testing.assert_allclose(got[n].double().numpy(), ref[n].numpy(), rtol=1e-6, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


# -- the pass through the merge --------------------------------------------------------------------


def test_statistics_are_cached_and_reused(tmp_path):
    base, fts = family(2)
    data = model_data(fts)
    first = merge(base, fts, data, tmp_path)
    files = sorted(os.listdir(tmp_path / "stats"))
    assert len(files) == 2 and all(f.startswith("covariance-") for f in files)
    calls = []
    reuse = [ModelData(d.examples, lambda d=d: calls.append(1) or d.load_model()) for d in data]
    second = merge(base, fts, reuse, tmp_path)
    assert calls == []  # nothing recomputed
    for k in first:
        assert torch.equal(first[k], second[k])


def test_other_data_or_model_recomputes(tmp_path):
    base, fts = family(2)
    merge(base, fts, model_data(fts), tmp_path)
    merge(base, fts, model_data(fts, seed=99), tmp_path)  # other examples: new keys
    assert len(os.listdir(tmp_path / "stats")) == 4
    moved = [{k: v + 1e-3 for k, v in sd.items()} for sd in fts]  # retrained models, same data
    merge(base, moved, model_data(moved), tmp_path)
    assert len(os.listdir(tmp_path / "stats")) == 6


def test_a_file_with_foreign_metadata_is_recomputed_not_used(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base, fts = family(2)
    data = model_data(fts)
    merge(base, fts, data, tmp_path)
    path = sorted((tmp_path / "stats").iterdir())[0]
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    tensors = load_file(str(path))
    meta["data"] = "0" * 64  # statistics of other data under this name
    save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, str(path), metadata={META_KEY: json.dumps(meta)})
    calls = []
    spy = [ModelData(d.examples, lambda d=d: calls.append(1) or d.load_model()) for d in data]
    merge(base, fts, spy, tmp_path)
    assert calls == [1]  # exactly the tampered model recomputed
    fresh = load_file(str(path))
    assert all(torch.equal(fresh[k].double(), tensors[k].double()) for k in tensors)


def test_prefixed_live_model_is_mapped_onto_the_checkpoint(tmp_path):
    base, fts = family(2)
    plain = merge(base, fts, model_data(fts), tmp_path / "a")
    wrapped = [ModelData(examples(24, 10 + t), loader(sd, Wrapped, "body.")) for t, sd in enumerate(fts)]
    got = merge(base, fts, wrapped, tmp_path / "b")
    for k in plain:
        torch.testing.assert_close(got[k], plain[k], rtol=0, atol=0)


# -- bad input: one-line errors, nothing written ----------------------------------------------------


def _nothing_written(tmp_path):
    stats = tmp_path / "stats"
    return not stats.exists() or not any(stats.iterdir())


def test_stage_needing_statistics_without_data(tmp_path):
    base, fts = family(2)
    with pytest.raises(PactMergeError, match="regmean need.*calibration statistics"):
        pactmerge.merge(base_model=base, models=fts, method="regmean")
    with pytest.raises(PactMergeError, match="model 1 .*missing"):
        merge(base, fts, [model_data(fts)[0], None], tmp_path)
    with pytest.raises(PactMergeError, match="for 1 model.*2 models"):
        merge(base, fts, model_data(fts)[:1], tmp_path)
    assert _nothing_written(tmp_path)


def test_calibration_given_but_unused_is_refused(tmp_path):
    base, fts = family(2)
    with pytest.raises(PactMergeError, match="'calibration': given, but no method"):
        pactmerge.merge(base_model=base, models=fts, calibration={"samples": 4})
    with pytest.raises(PactMergeError, match="calibration data given, but no method"):
        pactmerge.merge({"base_model": base, "models": fts}, calibration_data=model_data(fts))


def test_more_samples_than_data(tmp_path):
    base, fts = family(2)
    with pytest.raises(PactMergeError, match="model 0 .*24 examples, fewer than calibration.samples = 100"):
        merge(base, fts, model_data(fts), tmp_path, samples=100)
    assert _nothing_written(tmp_path)
    out = merge(base, fts, model_data(fts), tmp_path, samples=100, allow_fewer=True)  # the option honoured
    assert set(out) == set(base)


def test_model_without_visible_linear_layers(tmp_path):
    class Convs(nn.Module):  # only a 3x3 convolution: nothing the hooks handle
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 2, 3)

        def forward(self, x):
            return self.c(x)

    base = state(Convs().double())
    fts = [{k: v + 0.1 for k, v in base.items()} for _ in range(2)]

    def load(sd):
        def f():
            m = Convs().double()
            m.load_state_dict(sd)
            return m

        return f

    data = [ModelData([{"x": torch.randn(2, 5, 5, dtype=torch.float64)}] * 4, load(sd)) for sd in fts]
    with pytest.raises(PactMergeError, match="no linear layer the hooks can see"):
        merge(base, fts, data, tmp_path, samples=4)
    assert _nothing_written(tmp_path)


def test_loader_returning_another_model_is_refused(tmp_path):
    base, fts = family(2)
    data = model_data(fts)
    data[1] = ModelData(data[1].examples, loader(base))  # the base model instead of fine-tune 1
    with pytest.raises(PactMergeError, match="model 1 .*differs from the checkpoint"):
        merge(base, fts, data, tmp_path)
    # model 0's statistics were complete and valid: cached; model 1 wrote nothing
    assert len(os.listdir(tmp_path / "stats")) == 1


def test_singular_covariance_without_damping(tmp_path):
    base, fts = family(2)
    few = [ModelData(examples(1, 5 + t, 2, 3), loader(sd)) for t, sd in enumerate(fts)]  # <= 3 tokens, width 6
    with pytest.raises(PactMergeError, match="pave: parameter 'layers.0.up.weight'.*singular.*damping"):
        merge(base, fts, few, tmp_path, method="task_arithmetic", filters=[{"pave": {"damping": 0}}], samples=1)
    out = tmp_path / "out"
    cfg = {
        "base_model": base,
        "models": fts,
        "filters": [{"pave": {"damping": 0}}],
        "calibration": {"samples": 1, "cache_dir": str(tmp_path / "stats")},
    }
    with pytest.raises(PactMergeError, match="singular"):
        pactmerge.merge(cfg, out, calibration_data=few)
    assert not out.exists()
    merge(base, fts, few, tmp_path, method="task_arithmetic", filters=["pave"], samples=1)  # damped: fine


def test_tiny_model_fixture_matches_its_hand_forward():
    # guard for the reference used above: Tiny's forward equals the hand-written one
    base, _ = family(1)
    m = Tiny().double()
    m.load_state_dict(base)
    ids = torch.tensor([[1, 2, 3]])
    x = m.emb(ids)
    for blk in m.layers:
        x = x + blk["down"](torch.tanh(blk["up"](x)))
    torch.testing.assert_close(m.hidden(ids), x)


def test_cli_merge_with_a_data_aware_stage_and_no_data(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from pactmerge.cli import app
    from pactmerge.synthetic import make_checkpoints

    base, models = make_checkpoints(tmp_path / "in", n_models=2, layers=1, hidden=8)
    path = tmp_path / "merge.yaml"
    cfg = {"base_model": str(base), "models": [str(m) for m in models], "method": "regmean"}
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code != 0
    msg = res.output.strip()
    assert "regmean need(s) calibration statistics" in msg and len(msg.splitlines()) == 1
    assert "add an `evaluation:` block" in msg and "calibration_data=" in msg  # says what to add
    assert not (tmp_path / "out").exists()


def test_store_streams_one_parameter_and_fills_a_layer_a_model_never_ran(tmp_path):
    from pactmerge.filters.pave import PaveParams, pave
    from pactmerge.registry import ParamContext, ParamInfo
    from pactmerge.stats import StatsStore
    from pactmerge.stats.cache import identity, write_stats

    C0 = torch.eye(3, dtype=torch.float64) * 2
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    write_stats(paths[0], identity("covariance", "m0", "d", 4, "float64"), {"w": C0}, {"w": 7}, {"w": "out_in"})
    write_stats(paths[1], identity("covariance", "m1", "d", 4, "float64"), {}, {}, {})  # w never ran in model 1
    store = StatsStore({"covariance": paths}, [4, 4])
    view = store.view("w", "cpu", torch.float64)
    assert view.counts("covariance") == [7, 0] and view.examples == [4, 4]
    covs = view.covariance()
    assert torch.equal(covs[0], C0) and torch.equal(covs[1], torch.zeros(3, 3, dtype=torch.float64))
    assert store.view("other", "cpu", torch.float64).covariance() is None
    info = ParamInfo("w", (2, 3), torch.float64, "matrix", 0, 1.0)
    deltas = [torch.randn(2, 3, dtype=torch.float64) for _ in range(2)]
    out = pave(
        torch.zeros(2, 3, dtype=torch.float64),
        deltas,
        ParamContext(info, 0, [1.0, 1.0], [{}, {}], calibration=view),
        PaveParams(rho=0.5),
    )
    assert torch.equal(out[1], deltas[1])  # no statistics in that model: its task vector is kept
    assert torch.linalg.matrix_rank(out[0]) == 1  # model 0 alone takes the allocation: rank 1 of 2
