"""Per-task outputs (pactmerge.modulators): TALL masks and TSV-C written beside the merged model,
materialised back into each task's model, against independent float64 derivations; the on-disk
format; the CLI; and the one-line errors."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

import pactmerge
from conftest import decaying
from pactmerge.modulators import FOLDER, Modulator, TaskSpecific, map_updates, pack_mask, unpack_mask


def write_models(tmp_path, rng, T, m=16, n=12, scale=0.05):
    base = {
        "enc.0.w": decaying(rng, m, n),
        "enc.0.b": rng.standard_normal(n),
        "enc.1.w": decaying(rng, n, m),
        "head.w": decaying(rng, 4, n),
    }
    models = [{k: v + scale * rng.standard_normal(v.shape) for k, v in base.items()} for _ in range(T)]
    paths = []
    for name, sd in [("base", base)] + [(f"m{t}", mm) for t, mm in enumerate(models)]:
        folder = tmp_path / name
        folder.mkdir()
        save_file({k: torch.from_numpy(v) for k, v in sd.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "toy", "name": name}))
        paths.append(str(folder))
    return base, models, paths[0], paths[1:]


def load(folder):
    from safetensors.torch import load_file

    return {k: v.double().numpy() for k, v in load_file(str(folder / "model.safetensors")).items()}


def np_tall(ds, mtl, lam):
    return [np.abs(d) >= lam * np.abs(mtl - d) for d in ds]


@pytest.mark.parametrize("T", [2, 3])
def test_tall_masks_materialise_to_masked_multitask_vector(tmp_path, rng, T):
    base, models, base_path, paths = write_models(tmp_path, rng, T)
    lams = [0.3, 0.5, 0.6][:T]
    cfg = {
        "base_model": base_path,
        "models": [{"model": p, "parameters": {"lambda": lam}} for p, lam in zip(paths, lams)],
        "method": "tall_masks",
        "alpha": 0.8,
        "dtype": "float64",
    }
    out = pactmerge.merge(cfg, tmp_path / "out")
    merged = load(out)
    for k in base:
        ds = [m[k] - base[k] for m in models]
        np.testing.assert_allclose(merged[k], base[k] + 0.8 * sum(ds), atol=1e-12)  # the shared tau_MTL
    for t in range(T):
        dest = pactmerge.materialize(out, t, tmp_path / f"task{t}")
        got = load(dest)
        assert json.loads((dest / "config.json").read_text())["name"] == "base"  # copied from the merge
        for k in base:
            ds = [m[k] - base[k] for m in models]
            mask = np_tall(ds, sum(ds), lams[t])[t]
            np.testing.assert_allclose(got[k], base[k] + mask * (0.8 * sum(ds)), atol=1e-12, err_msg=k)
    # The task can also be named by its model's folder; and the mask is exact (a selection), any dtype.
    by_name = load(pactmerge.materialize(out, "m1", tmp_path / "by_name"))
    assert all(np.array_equal(by_name[k], load(tmp_path / "task1")[k]) for k in base)


def test_tall_masks_on_disk_format(tmp_path, rng):
    base, models, base_path, paths = write_models(tmp_path, rng, 3)
    out = pactmerge.merge({"base_model": base_path, "models": paths, "method": "tall_masks"}, tmp_path / "out")
    index = json.loads((out / FOLDER / "modulators.json").read_text())
    assert index["format"] == "pactmerge.task_modulators" and index["version"] == 1
    assert index["method"] == "tall_masks" and index["mask_bit_order"] == "little"
    assert index["base_model"] == base_path and [t["model"] for t in index["tasks"]] == paths
    assert set(index["parameters"]) == set(base)
    from safetensors import safe_open

    with safe_open(str(out / FOLDER / "task_000.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert keys == {f"{k}:mask" for k in base}
        for k in base:
            packed = f.get_tensor(f"{k}:mask")
            assert packed.dtype == torch.uint8 and packed.numel() == -(-base[k].size // 8)  # one bit per entry
    assert "pactmerge materialize" in (out / "README.md").read_text()


@pytest.mark.parametrize("fraction", [None, 0.25])
def test_tsv_c_materialises_the_rank_k_task_update(tmp_path, rng, fraction):
    T = 3
    base, models, base_path, paths = write_models(tmp_path, rng, T)
    params = {} if fraction is None else {"fraction": fraction}
    cfg = {"base_model": base_path, "models": paths, "method": "tsv_c", "dtype": "float64", "parameters": params}
    out = pactmerge.merge(cfg, tmp_path / "out")
    tsv_m = pactmerge.merge({**cfg, "method": "tsv_m", "parameters": {}})
    merged = load(out)
    for k in base:  # the shared vector is TSV-M of the same task vectors
        np.testing.assert_allclose(merged[k], tsv_m[k].numpy(), atol=1e-12)
    for t in range(T):
        got = load(pactmerge.materialize(out, t, tmp_path / f"task{t}"))
        for k in base:
            d = models[t][k] - base[k]
            if d.ndim == 2:
                kk = int((fraction or 1 / T) * min(d.shape))
                u, s, vt = np.linalg.svd(d, full_matrices=False)
                d = (u[:, :kk] * s[:kk]) @ vt[:kk]
            np.testing.assert_allclose(got[k], base[k] + d, atol=1e-12, err_msg=k)
    from safetensors import safe_open

    with safe_open(str(out / FOLDER / "task_001.safetensors"), "pt") as f:  # stored as factors
        kk = int((fraction or 1 / T) * 12)
        assert tuple(f.get_tensor("enc.0.w:B").shape) == (16, kk) and tuple(f.get_tensor("enc.0.w:A").shape) == (kk, 12)


def test_post_filter_runs_on_each_task_update(tmp_path, rng):
    base, models, base_path, paths = write_models(tmp_path, rng, 2)
    cfg = {"base_model": base_path, "models": paths, "method": "tsv_c", "dtype": "float64", "alpha": 1.5}
    out = pactmerge.merge({**cfg, "filters": [{"csp": {"rank": 3}}]}, tmp_path / "out")
    got = load(pactmerge.materialize(out, 1, tmp_path / "t1"))
    k = "enc.0.w"
    u0, _, v0t = np.linalg.svd(base[k], full_matrices=False)
    d = models[1][k] - base[k]
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    low = (u[:, :6] * s[:6]) @ vt[:6]  # floor(12 / 2) triplets
    ur, vr = u0[:, :3], v0t[:3].T
    proj = (np.eye(16) - ur @ ur.T) @ low @ (np.eye(12) - vr @ vr.T)
    np.testing.assert_allclose(got[k], base[k] + 1.5 * proj, atol=1e-12)


def test_cli_materialize_and_errors(tmp_path, rng):
    from pactmerge.cli import app

    base, models, base_path, paths = write_models(tmp_path, rng, 2)
    out = pactmerge.merge({"base_model": base_path, "models": paths, "method": "tall_masks"}, tmp_path / "out")
    runner = CliRunner()
    res = runner.invoke(app, ["materialize", str(out), "1", str(tmp_path / "t1")])
    assert res.exit_code == 0, res.output
    assert np.array_equal(
        load(tmp_path / "t1")["enc.0.w"], load(pactmerge.materialize(out, 1, tmp_path / "t1b"))["enc.0.w"]
    )
    for args, match in [
        ([str(out), "7", str(tmp_path / "x")], "out of range"),
        ([str(out), "nope", str(tmp_path / "x")], "no such task"),
        ([str(tmp_path / "m0"), "0", str(tmp_path / "x")], "no task modulators"),
        ([str(out), "0", str(tmp_path / "t1")], "already exists"),
    ]:
        res = runner.invoke(app, ["materialize", *args])
        assert res.exit_code == 2 and match in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "x").exists()


def test_in_memory_base_needs_a_base_path_and_adapter_output_is_refused(tmp_path, rng):
    base, models, base_path, paths = write_models(tmp_path, rng, 2)
    sd = {k: torch.from_numpy(v) for k, v in base.items()}
    out = pactmerge.merge({"base_model": sd, "models": paths, "method": "tall_masks"}, tmp_path / "out")
    with pytest.raises(pactmerge.PactMergeError, match="in-memory base model"):
        pactmerge.materialize(out, 0, tmp_path / "t0")
    pactmerge.materialize(out, 0, tmp_path / "t0", base_model=base_path)
    with pytest.raises(pactmerge.PactMergeError, match="cannot carry the per-task outputs"):
        pactmerge.merge(
            {"base_model": base_path, "models": paths, "method": "tsv_c", "output": "adapter"}, tmp_path / "a"
        )
    assert not (tmp_path / "a").exists()


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1))
def test_mask_packing_round_trips(shape, seed):
    mask = torch.from_numpy(np.random.default_rng(seed).random(shape) < 0.3)
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, shape), mask)
    first = int(mask.reshape(-1)[0])
    assert int(packed[0]) & 1 == first  # first entry in the lowest bit


def test_modulator_semantics_and_map_updates():
    from pactmerge.lowrank import LowRankDelta

    shared = torch.arange(6.0).reshape(2, 3)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    assert torch.equal(Modulator(mask=mask, scale=2.0).apply(shared), torch.where(mask, 2 * shared, 0.0))
    repl = LowRankDelta(torch.ones(2, 1), torch.ones(1, 3))
    assert torch.equal(Modulator(replacement=repl, mask=mask).apply(shared), mask.double().float())
    mapped = map_updates(
        TaskSpecific(shared, [Modulator(mask=mask), Modulator(replacement=repl.dense())]), lambda u: -u
    )
    assert isinstance(mapped, TaskSpecific) and torch.equal(mapped.shared, -shared)
    assert mapped.per_task[0].mask is mask and torch.equal(mapped.per_task[1].replacement, -repl.dense())
    with pytest.raises(ValueError, match="boolean"):
        Modulator(mask=torch.ones(2))
