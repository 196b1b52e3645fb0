"""mergekit configs read as they are: the mapping (docs/mergekit.md), merged weights against an
independent numpy rendering of mergekit 0.1.5's formulas, and every refused key."""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

import pactmerge
import pactmerge.registry as registry
from pactmerge.cli import app
from pactmerge.config import load_config
from pactmerge.config.mergekit import from_mergekit, is_mergekit_config

runner = CliRunner()
SHAPES = {"layers.0.w": (10, 8), "layers.0.b": (8,), "layers.1.w": (6, 10), "ids": (4,)}


@pytest.fixture
def files(tmp_path, rng):
    """A float64 base and four fine-tunes as .safetensors files (an int tensor rides along)."""
    base = {k: rng.standard_normal(s) for k, s in SHAPES.items() if k != "ids"}
    paths = {}
    arrays = {"base": base}
    for i in range(4):
        arrays[f"m{i}"] = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in base.items()}
    for name, sd in arrays.items():
        tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
        tensors["ids"] = torch.arange(4)
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(paths[name]))
    return paths, arrays


def mk(files, method, models, **kw):
    """A mergekit config dict; ``models`` = [(name, parameters or None)]."""
    paths, _ = files
    entries = []
    for name, params in models:
        e = {"model": str(paths[name])}
        if params is not None:
            e["parameters"] = params
        entries.append(e)
    return {"merge_method": method, "base_model": str(paths["base"]), "models": entries, "dtype": "float64", **kw}


def run(cfg):
    return {k: v.numpy() for k, v in pactmerge.merge(cfg).items()}


def np_mergekit_gta(arrays, names, weights, densities, sparsify, consensus, normalize, lam):
    """mergekit 0.1.5's generalized task arithmetic, written out in numpy: per tensor, each task
    vector sparsified with its density (magnitude: top max(1, int(d n)), d >= 1 keeps all), times
    its weight; with consensus, the entries whose sign matches sgn(sum) (sum >= 0 -> +1) are summed
    and normalize divides by the matching weights (0 -> 1); else the sum, divided by sum(w)."""
    base = arrays["base"]
    out = {}
    for k in base:
        deltas = []
        for name, d in zip(names, densities):
            x = arrays[name][k] - base[k]
            if sparsify == "magnitude" and d < 1:
                kk = max(1, int(d * x.size))
                order = np.argsort(-np.abs(x).ravel())[:kk]
                mask = np.zeros(x.size)
                mask[order] = 1
                x = x * mask.reshape(x.shape)
            deltas.append(x)
        wd = [w * x for w, x in zip(weights, deltas)]
        if consensus:
            majority = np.where(sum(wd) >= 0, 1.0, -1.0)
            masks = [np.sign(x) == majority for x in wd]
            mixed = sum(x * m for x, m in zip(wd, masks))
            div = sum(w * m for w, m in zip(weights, masks))
            div = np.where(div == 0, 1.0, div)
        else:
            mixed = sum(wd)
            div = sum(weights)
            div = 1.0 if abs(div) < 1e-8 else div
        if normalize:
            mixed = mixed / div
        out[k] = base[k] + lam * mixed
    return out


def assert_close(out, ref):
    for k in ref:
        np.testing.assert_allclose(out[k], ref[k], atol=1e-12, err_msg=k)


def test_detection_rule():
    assert is_mergekit_config({"merge_method": "ties", "models": []})
    assert not is_mergekit_config({"method": "ties", "models": []})


@pytest.mark.parametrize("normalize", [None, True, False])
def test_task_arithmetic(files, normalize):
    top = {"lambda": 0.7} if normalize is None else {"lambda": 0.7, "normalize": normalize}
    cfg = mk(
        files,
        "task_arithmetic",
        [("base", None), ("m0", {"weight": 0.5}), ("m1", {"weight": 1.5}), ("m2", None)],
        parameters={**top, "weight": 0.25},  # the top-level weight is m2's (the default for every model)
    )
    out = run(cfg)
    ref = np_mergekit_gta(files[1], ["m0", "m1", "m2"], [0.5, 1.5, 0.25], [1, 1, 1], None, False, bool(normalize), 0.7)
    assert_close(out, ref)
    assert np.array_equal(out["ids"], np.arange(4))


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_with_per_model_density_and_weight(files, normalize):
    cfg = mk(
        files,
        "ties",
        [("m0", {"weight": 1.0, "density": 0.2}), ("m1", {"weight": 0.5, "density": 0.7}), ("m2", {"weight": 0.8})],
        parameters={"normalize": normalize, "int8_mask": True, "density": 0.4, "lambda": 1.2},
    )
    mapped = from_mergekit(cfg)
    assert mapped["method"] == "ties" and mapped["alpha"] == 1.2
    assert mapped["parameters"]["scope"] == "tensor" and mapped["parameters"]["trim_count"] == "floor_at_least_1"
    assert [m["parameters"]["density"] for m in mapped["models"]] == [0.2, 0.7, 0.4]
    out = run(cfg)
    ref = np_mergekit_gta(
        files[1], ["m0", "m1", "m2"], [1.0, 0.5, 0.8], [0.2, 0.7, 0.4], "magnitude", True, normalize, 1.2
    )
    assert_close(out, ref)


def test_ties_uniform_density_becomes_the_method_option(files):
    cfg = mk(files, "ties", [("m0", {"weight": 1.0, "density": 0.5}), ("m1", {"weight": 1.0, "density": 0.5})])
    mapped = from_mergekit(cfg)
    assert mapped["parameters"]["density"] == 0.5
    assert all("parameters" not in m for m in mapped["models"])
    assert mapped["parameters"]["aggregate"] == "mean"  # mergekit's ties normalizes by default


def test_dare_methods_at_density_one_are_exact(files):
    # density 1: mergekit's DARE keeps everything, so the rest of the pipeline is checked exactly.
    models = [("m0", {"weight": 1.0}), ("m1", {"weight": 0.6}), ("m2", {"weight": 1.4})]
    ties = run(mk(files, "dare_ties", models))
    ref = np_mergekit_gta(files[1], ["m0", "m1", "m2"], [1.0, 0.6, 1.4], [1, 1, 1], None, True, False, 1.0)
    assert_close(ties, ref)
    linear = run(mk(files, "dare_linear", models, parameters={"normalize": True}))
    ref = np_mergekit_gta(files[1], ["m0", "m1", "m2"], [1.0, 0.6, 1.4], [1, 1, 1], None, False, True, 1.0)
    assert_close(linear, ref)


def test_dare_density_maps_to_drop_rate(files):
    cfg = mk(files, "dare_ties", [("m0", {"weight": 1.0, "density": 0.53}), ("m1", {"weight": 1.0, "density": 0.3})])
    mapped = from_mergekit(cfg)
    assert mapped["filters"] == [{"dare": {"rescale": "l1"}}]
    assert [m["parameters"]["p"] for m in mapped["models"]] == pytest.approx([0.47, 0.7])
    assert mapped["parameters"] == {
        "density": 1.0,
        "scope": "tensor",
        "trim_count": "floor_at_least_1",
        "aggregate": "sum",
    }
    cfg["parameters"] = {"rescale": False}
    assert from_mergekit(cfg)["filters"][0]["dare"]["rescale"] == "none"
    # The per-model drop rates reach the filter: model 0 keeps about 53% of its entries, model 1 30%.
    cfg_one = mk(files, "dare_linear", [("m0", {"weight": 1.0, "density": 0.53}), ("m1", {"weight": 0.0})])
    kept = np.mean(run(cfg_one)["layers.0.w"] != files[1]["base"]["layers.0.w"])
    assert abs(kept - 0.53) < 0.15  # 80 entries: a binomial standard deviation of 0.056


def test_linear_is_the_weighted_mean(files):
    a = files[1]
    cfg = mk(files, "linear", [("base", {"weight": 0.5}), ("m0", {"weight": 1.0}), ("m1", {"weight": 3.0})])
    out = run(cfg)
    for k in a["base"]:
        np.testing.assert_allclose(out[k], (0.5 * a["base"][k] + a["m0"][k] + 3.0 * a["m1"][k]) / 4.5, atol=1e-12)
    # without base_model: the first model is the reference, and it is still the weighted mean
    cfg = mk(files, "linear", [("m0", {"weight": 1.0}), ("m1", {"weight": 3.0})])
    del cfg["base_model"]
    out = run(cfg)
    for k in a["base"]:
        np.testing.assert_allclose(out[k], (a["m0"][k] + 3.0 * a["m1"][k]) / 4.0, atol=1e-12)


def test_linear_averages_in_an_unlisted_base_model(files):
    # mergekit adds base_model as an input of linear when models does not list it.
    a = files[1]
    cfg = mk(files, "linear", [("m0", {"weight": 1.0}), ("m1", {"weight": 3.0})], parameters={"weight": 2.0})
    out = run(cfg)
    for k in a["base"]:
        np.testing.assert_allclose(out[k], (2.0 * a["base"][k] + a["m0"][k] + 3.0 * a["m1"][k]) / 6.0, atol=1e-12)
    del cfg["parameters"]
    with pytest.raises(pactmerge.PactMergeError, match=r"'base_model' \(mergekit\): mergekit's linear averages"):
        load_config(cfg)


def test_linear_unnormalized_only_when_weights_sum_to_one(files):
    cfg = mk(files, "linear", [("m0", {"weight": 0.25}), ("m1", {"weight": 0.75})], parameters={"normalize": False})
    cfg["models"].append({"model": cfg["base_model"], "parameters": {"weight": 0.0}})
    out = run(cfg)
    a = files[1]
    np.testing.assert_allclose(out["layers.0.w"], 0.25 * a["m0"]["layers.0.w"] + 0.75 * a["m1"]["layers.0.w"])
    cfg["models"][1]["parameters"]["weight"] = 1.0
    with pytest.raises(pactmerge.PactMergeError, match=r"'parameters\.normalize' \(mergekit\)"):
        load_config(cfg)


def test_targets_by_registry_name(files, monkeypatch):
    names = [*registry.available_methods(), "breadcrumbs", "della", "slerp", "model_stock"]
    monkeypatch.setattr(registry, "available_methods", lambda: sorted(names))
    b = from_mergekit(
        mk(
            files,
            "breadcrumbs_ties",
            [("m0", {"weight": 1.0, "density": 0.8}), ("m1", {"weight": 1.0, "density": 0.8})],
        )
    )
    assert b["method"] == "breadcrumbs" and b["parameters"] == {"density": 0.8, "gamma": 0.01, "elect": True}
    d = from_mergekit(
        mk(files, "della", [("m0", {"weight": 1.0, "density": 0.6, "epsilon": 0.1}), ("m1", {"weight": 2.0})])
    )
    assert d["method"] == "della" and d["parameters"]["elect"] is True and d["parameters"]["aggregate"] == "mean"
    # mergekit's epsilon is a half-width (ours the full width); density 1 does not prune in mergekit: epsilon 0.
    assert d["parameters"]["rescale"] == "l1" and d["models"][0]["parameters"] == {"density": 0.6, "epsilon": 0.2}
    assert d["models"][1]["parameters"] == {"density": 1.0, "epsilon": 0.0}
    s = from_mergekit(mk(files, "slerp", [("base", None), ("m0", None)], parameters={"t": 0.3}))
    assert s["method"] == "slerp" and s["parameters"] == {"t": 0.3} and len(s["models"]) == 2
    ms = from_mergekit(mk(files, "model_stock", [("base", None), ("m0", None), ("m1", None)]))
    assert ms["method"] == "model_stock" and len(ms["models"]) == 2


@pytest.mark.parametrize("method", ["breadcrumbs", "della_linear", "slerp", "model_stock"])
def test_unregistered_target_is_not_available(files, monkeypatch, method):
    target = {"breadcrumbs": "breadcrumbs", "della_linear": "della", "slerp": "slerp", "model_stock": "model_stock"}
    names = [n for n in registry.available_methods() if n != target[method]]
    monkeypatch.setattr(registry, "available_methods", lambda: names)
    models = [("base", None), ("m0", None), ("m1", None)]
    params = {"t": 0.5} if method == "slerp" else {}
    if method in ("breadcrumbs", "della_linear"):
        models = [("m0", {"weight": 1.0}), ("m1", {"weight": 1.0})]
    if method == "slerp":
        models = models[:2]
    with pytest.raises(
        pactmerge.PactMergeError, match=rf"maps to pactmerge's method '{target[method]}'.*not available"
    ):
        load_config(mk(files, method, models, parameters=params))


def test_dtype_and_out_dtype(files):
    cfg = mk(files, "task_arithmetic", [("m0", {"weight": 1.0})], dtype="bfloat16")
    mapped = from_mergekit(cfg)
    assert mapped["dtype"] == "float32" and mapped["out_dtype"] == "bfloat16"
    cfg["out_dtype"] = "float16"
    assert from_mergekit(cfg)["out_dtype"] == "float16"
    out = pactmerge.merge(cfg)
    assert out["layers.0.w"].dtype == torch.float16 and out["ids"].dtype == torch.int64


def test_pactmerge_extras_in_a_mergekit_config(files):
    cfg = mk(files, "dare_ties", [("m0", {"weight": 1.0, "density": 0.5})], pact={"K": 2, "k": 1}, seed=3)
    mapped = from_mergekit(cfg)
    assert mapped["filters"][0] == "pact" and "dare" in mapped["filters"][1] and mapped["seed"] == 3
    assert load_config(cfg).pipeline.describe() == "pact -> dare -> ties"


def test_lora_over_the_base_is_an_adapter_entry(files):
    paths, _ = files
    cfg = mk(files, "task_arithmetic", [("m0", {"weight": 1.0})])
    cfg["models"].append({"model": f"{paths['base']}+adapters/a", "parameters": {"weight": 1.0}})
    assert from_mergekit(cfg)["models"][1]["model"] == "adapters/a"
    cfg["models"][1]["model"] = f"{paths['m0']}+adapters/a"
    with pytest.raises(pactmerge.PactMergeError, match=r"'models\[1\]\.model' \(mergekit\).*LoRA"):
        load_config(cfg)


REFUSED = [
    ({"slices": [{"sources": []}]}, r"'slices' \(mergekit\)"),
    ({"modules": {"text": {}}}, r"'modules' \(mergekit\)"),
    ({"merge_method": "passthrough"}, r"'merge_method'.*passthrough"),
    ({"merge_method": "nuslerp"}, r"'merge_method'.*nuslerp"),
    ({"merge_method": "frobnicate"}, r"'merge_method'.*'frobnicate' is not a mergekit method"),
    ({"method": "ties"}, r"'method' \(mergekit\).*keep one"),
    ({"alpha": 2.0}, r"'alpha' \(mergekit\).*parameters\.lambda"),
    ({"parameters": {"rescale": True}}, r"'parameters\.rescale' \(mergekit\)"),
    ({"parameters": {"gamma": 0.1}}, r"'parameters\.gamma' \(mergekit\): not a parameter of mergekit's ties"),
    ({"parameters": {"lambda": [0.5, 1.0]}}, r"'parameters\.lambda' \(mergekit\): a list"),
    ({"parameters": {"normalize": "yes"}}, r"'parameters\.normalize' \(mergekit\): expected true or false"),
    ({"dtype": "int8"}, r"'dtype' \(mergekit\)"),
    ({"tokenizer": {"source": "base", "tokens": {"<x>": {}}}}, r"'tokenizer\.tokens' \(mergekit\)"),
    ({"chat_template": "chatml"}, r"'chat_template' \(mergekit\).*template text"),
    ({"chat_template": "auto"}, r"'chat_template' \(mergekit\)"),
    ({"base_model": None}, r"'base_model' \(mergekit\).*needs a base_model"),
]


@pytest.mark.parametrize("change,match", REFUSED)
def test_refused_top_level(files, change, match):
    cfg = mk(files, "ties", [("m0", {"weight": 1.0}), ("m1", {"weight": 1.0})])
    cfg.update(change)
    with pytest.raises(pactmerge.PactMergeError, match=match):
        load_config(cfg)


MODEL_REFUSED = [
    ({"weight": [0, 0.5, 1]}, r"'models\[1\]\.parameters\.weight' \(mergekit\): a list \(a gradient"),
    ({"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1}]}, r"'models\[1\]\.parameters\.weight'.*a list"),
    ({"weight": {"filter": "mlp", "value": 0.5}}, r"'models\[1\]\.parameters\.weight'.*conditions"),
    ({"density": 0.5}, r"'models\[1\]\.parameters\.weight' \(mergekit\): mergekit's ties needs a weight"),
    ({"weight": 1.0, "normalize": True}, r"'models\[1\]\.parameters\.normalize'.*top-level parameters"),
    ({"weight": 1.0, "t": 0.5}, r"'models\[1\]\.parameters\.t'.*not a per-model parameter"),
    ({"weight": -0.5}, r"'models\[1\]\.parameters\.weight'.*negative weight"),
    ({"weight": 1.0, "density": 0.0}, r"'models\[1\]\.parameters\.density'.*\(0, 1\]"),
]


@pytest.mark.parametrize("params,match", MODEL_REFUSED)
def test_refused_per_model(files, params, match):
    cfg = mk(files, "ties", [("m0", {"weight": 1.0}), ("m1", params)])
    with pytest.raises(pactmerge.PactMergeError, match=match):
        load_config(cfg)


def test_refused_base_entry_with_parameters_and_ta_density(files):
    cfg = mk(files, "ties", [("base", {"weight": 1.0}), ("m0", {"weight": 1.0})])
    with pytest.raises(pactmerge.PactMergeError, match=r"'models\[0\]\.parameters' \(mergekit\).*base_model"):
        load_config(cfg)
    cfg = mk(files, "task_arithmetic", [("m0", {"weight": 1.0, "density": 0.5})])
    with pytest.raises(pactmerge.PactMergeError, match=r"'models\[0\]\.parameters\.density'.*no effect"):
        load_config(cfg)


def test_tokenizer_source_base_is_ours(files):
    cfg = mk(files, "ties", [("m0", {"weight": 1.0})], tokenizer_source="base")
    load_config(cfg)
    cfg["tokenizer_source"] = "union"
    if "tokenizer_source" not in pactmerge.MergeConfig.model_fields:
        with pytest.raises(pactmerge.PactMergeError, match=r"'tokenizer_source' \(mergekit\).*'union'"):
            load_config(cfg)


def test_cli_mergekit_yaml_end_to_end(files, tmp_path):
    paths, arrays = files
    folder = tmp_path / "base_folder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(paths["base"].read_bytes())
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "torch_dtype": "float64"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    text = (
        "# a mergekit config, as mergekit's docs write them\n"
        "models:\n"
        f"  - model: {folder}\n"
        "    # no parameters for the base model\n"
        f"  - model: {paths['m0']}\n"
        "    parameters: {density: 0.5, weight: 0.6}\n"
        f"  - model: {paths['m1']}\n"
        "    parameters: {density: 0.3, weight: 0.4}\n"
        "merge_method: ties\n"
        f"base_model: {folder}\n"
        "parameters:\n  normalize: true\n  int8_mask: true\n"
        "dtype: float64\nout_dtype: float32\n"
        "chat_template: \"{% for m in messages %}{{ m['content'] }}{% endfor %}\"\n"
    )
    cfg_path = tmp_path / "mergekit.yml"
    cfg_path.write_text(text)
    out = tmp_path / "merged"
    res = runner.invoke(app, ["merge", str(cfg_path), str(out), "--dry-run", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert not out.exists()
    res = runner.invoke(app, ["merge", str(cfg_path), str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    merged = load_file(str(out / "model.safetensors"))
    ref = np_mergekit_gta(arrays, ["m0", "m1"], [0.6, 0.4], [0.5, 0.3], "magnitude", True, True, 1.0)
    for k in ref:
        assert merged[k].dtype == torch.float32
        np.testing.assert_allclose(merged[k].double().numpy(), ref[k].astype(np.float32), rtol=0, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert "{% for m in messages %}" in json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    assert text in (out / "README.md").read_text()  # the user's YAML, verbatim
    assert yaml.safe_load((out / "pactmerge_config.yaml").read_text())["method"] == "ties"


def test_cli_refused_mergekit_key_is_one_line_and_writes_nothing(files, tmp_path):
    cfg = mk(files, "ties", [("m0", {"weight": [0.0, 1.0]})])
    cfg_path = tmp_path / "mk.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    for extra in (["--dry-run"], []):
        res = runner.invoke(app, ["merge", str(cfg_path), str(out), "--no-progress", *extra])
        assert res.exit_code == 2
        (line,) = res.output.strip().splitlines()
        assert line.startswith(f"error: {cfg_path}: config key 'models[0].parameters.weight' (mergekit)")
        assert not out.exists()
