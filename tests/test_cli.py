"""End to end through the CLI on generated HF folders, and every error case."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import pactmerge
from pactmerge.cli import app
from pactmerge.io import open_source
from pactmerge.synthetic import make_checkpoints

runner = CliRunner()


@pytest.fixture
def ckpts(tmp_path):
    base, models = make_checkpoints(tmp_path / "in", n_models=3, layers=2, hidden=24, max_shard_bytes=20_000)
    return tmp_path, base, models


def write_config(tmp_path, base, models, **extra):
    cfg = {
        "base_model": str(base),
        "models": [{"model": str(m)} for m in models],
        "method": "iso_c",
        "alpha": 1.0,
        "pact": {"K": 6, "k": 3},
        **extra,
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def read_folder(folder):
    with open_source(folder) as src:
        return {n: src.get(n) for n in src.names()}


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_cli_merge_end_to_end_equals_api(ckpts, svd):
    tmp_path, base, models = ckpts
    path, cfg = write_config(tmp_path, base, models, max_shard_size=15_000)
    cfg["pact"]["svd"] = svd
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "merged"
    res = runner.invoke(app, ["merge", str(path), str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # several shards
    for f in ("config.json", "tokenizer_config.json", "vocab.txt", "README.md", "pactmerge_config.yaml"):
        assert (out / f).is_file(), f
    assert (out / "config.json").read_text() == (base / "config.json").read_text()
    assert "iso_c" in (out / "README.md").read_text() and pactmerge.__version__ in (out / "README.md").read_text()
    merged = read_folder(out)
    base_sd = read_folder(base)
    assert set(merged) == set(base_sd)
    api = pactmerge.merge(cfg)
    for k in base_sd:
        assert torch.equal(merged[k], api[k]), k
        assert merged[k].dtype == base_sd[k].dtype
    assert torch.equal(merged["embeddings.position_ids"], base_sd["embeddings.position_ids"])
    # The saved config reproduces the merge.
    again = pactmerge.merge(out / "pactmerge_config.yaml")
    assert all(torch.equal(again[k], api[k]) for k in api)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_accepts_single_files_and_bin(ckpts):
    tmp_path, base, models = ckpts
    sd = [read_folder(p) for p in [base, *models]]
    save_file(sd[0], str(tmp_path / "base.safetensors"))
    torch.save(sd[1], tmp_path / "a.bin")
    save_file(sd[2], str(tmp_path / "b.safetensors"))
    torch.save(sd[3], tmp_path / "c.pt")
    files = [tmp_path / "a.bin", tmp_path / "b.safetensors", tmp_path / "c.pt"]
    path, cfg = write_config(tmp_path, tmp_path / "base.safetensors", files)
    res = runner.invoke(app, ["merge", str(path), str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 0, res.output
    merged = read_folder(tmp_path / "out")
    ref = pactmerge.merge(base_model=sd[0], models=sd[1:], method="iso_c", pact={"K": 6, "k": 3})
    assert all(torch.equal(merged[k], ref[k]) for k in ref)


def test_dry_run_prints_plan_and_writes_nothing(ckpts):
    tmp_path, base, models = ckpts
    path, _ = write_config(tmp_path, base, models, pact={"K": 6, "k": 3, "depth": 0.5})
    res = runner.invoke(app, ["merge", str(path), str(tmp_path / "out"), "--dry-run", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "out").exists()
    lines = {l.split()[0]: l for l in res.output.splitlines() if l.startswith("  ") and "layer=" in l}
    assert "filters=pact" in lines["encoder.layer.0.attention.query.weight"]
    assert "filters=-" in lines["encoder.layer.1.attention.query.weight"]  # beyond depth 0.5
    assert "vector" in lines["encoder.layer.0.attention.query.bias"]
    assert "copy" in lines["embeddings.position_ids"]
    assert "filters=pact" in lines["embeddings.word_embeddings.weight"]  # input side: filtered
    assert "filters=-" in lines["pooler.dense.weight"]  # output side: only at depth 1


def test_overwrite(ckpts):
    tmp_path, base, models = ckpts
    path, _ = write_config(tmp_path, base, models)
    out = tmp_path / "out"
    assert runner.invoke(app, ["merge", str(path), str(out), "--no-progress"]).exit_code == 0
    res = runner.invoke(app, ["merge", str(path), str(out), "--no-progress"])
    assert res.exit_code != 0 and "already exists" in res.output
    assert runner.invoke(app, ["merge", str(path), str(out), "--overwrite", "--no-progress"]).exit_code == 0


# --- error cases: one line naming the file and parameter, non-zero exit, no output -------------


def _corrupt(kind, tmp_path, base, models):
    """Damage the inputs in one way; return (config overrides, expected message fragments)."""
    shard = sorted(models[1].glob("model-*.safetensors"))[-1]
    name = "encoder.layer.1.output.dense.weight"
    if kind == "missing_file":
        return {"models": [{"model": str(models[0])}, {"model": str(tmp_path / "nope")}]}, ["nope", "no such file"]
    if kind == "missing_key":
        sd = read_folder(models[1])
        del sd[name]
        shutil.rmtree(models[1])
        models[1].mkdir()
        save_file(sd, str(models[1] / "model.safetensors"))
        return {}, [str(models[1]), name, "missing"]
    if kind == "shape":
        sd = read_folder(models[2])
        sd[name] = sd[name][:, :-1].contiguous()
        shutil.rmtree(models[2])
        models[2].mkdir()
        save_file(sd, str(models[2] / "model.safetensors"))
        return {}, [str(models[2]), name, "shape"]
    if kind in ("nan", "inf"):
        sd = load_file(str(shard))
        victim = sorted(k for k in sd if sd[k].is_floating_point())[0]
        sd[victim][0] = float("nan") if kind == "nan" else float("inf")
        save_file(sd, str(shard))
        return {}, [str(shard), victim, "NaN" if kind == "nan" else "Inf"]
    if kind == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 100])
        return {}, [str(shard), "truncated"]
    if kind == "corrupt":
        shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        return {}, [str(shard), "corrupt"]
    if kind == "unknown_method":
        return {"method": "frobnicate"}, ["method", "frobnicate"]
    if kind == "unknown_parameter":
        return {"parameters": {"rank_awaer": True}}, ["parameters.rank_awaer", "unknown key"]
    if kind == "unknown_key":
        return {"alhpa": 2.0}, ["alhpa", "unknown key"]
    if kind == "K_out_of_range":
        return {"pact": {"K": 30, "k": 3, "narrow": "error"}}, [
            "pact.K=30",
            "embeddings.word_embeddings.weight",
            "min(m, n)=24",
        ]
    if kind == "k_negative":
        return {"pact": {"K": 6, "k": -1}}, ["pact.k", "greater than or equal to 0"]
    raise AssertionError(kind)


ERRORS = [
    "missing_file",
    "missing_key",
    "shape",
    "nan",
    "inf",
    "truncated",
    "corrupt",
    "unknown_method",
    "unknown_parameter",
    "unknown_key",
    "K_out_of_range",
    "k_negative",
]


@pytest.mark.parametrize("kind", ERRORS)
def test_errors_are_clear_and_write_nothing(ckpts, kind):
    tmp_path, base, models = ckpts
    overrides, expected = _corrupt(kind, tmp_path, base, models)
    path, cfg = write_config(tmp_path, base, models)
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    res = runner.invoke(app, ["merge", str(path), str(out), "--no-progress"])
    assert res.exit_code == 2, res.output
    msg = res.output.strip()
    assert msg.startswith("error: ") and len(msg.splitlines()) == 1, msg
    for frag in expected:
        assert frag in msg, (frag, msg)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary folder left behind


def test_dry_run_catches_nan(ckpts):
    tmp_path, base, models = ckpts
    overrides, expected = _corrupt("nan", tmp_path, base, models)
    path, _ = write_config(tmp_path, base, models)
    res = runner.invoke(app, ["merge", str(path), str(tmp_path / "out"), "--dry-run", "--no-progress"])
    assert res.exit_code == 2 and all(f in res.output for f in expected), res.output


def test_bad_yaml_and_missing_config(tmp_path):
    (tmp_path / "bad.yaml").write_text("base_model: [unclosed")
    res = runner.invoke(app, ["merge", str(tmp_path / "bad.yaml"), str(tmp_path / "o")])
    assert res.exit_code == 2 and "bad.yaml" in res.output and "invalid YAML" in res.output
    res = runner.invoke(app, ["merge", str(tmp_path / "none.yaml"), str(tmp_path / "o")])
    assert res.exit_code == 2 and "none.yaml" in res.output
