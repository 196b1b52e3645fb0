"""Hugging Face Hub ids as model references (resolved in a local cache built here, never
downloaded) and --push-to-hub (stopped before the network)."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
import yaml
from typer.testing import CliRunner

import pactmerge
import pactmerge.io.hub as hub
from pactmerge.cli import app
from pactmerge.io import open_source
from pactmerge.io.lora import is_adapter
from pactmerge.synthetic import make_checkpoints

runner = CliRunner()
COMMIT = "a" * 40


def add_to_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT, refs=("main",)) -> Path:
    """Put ``folder``'s files into a Hub cache as huggingface_hub lays it out: content-addressed
    blobs, a snapshot of symlinks to them, and refs naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for f in sorted(folder.rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A Hub cache under a temporary HF_HOME holding a base and three fine-tunes."""
    base, models = make_checkpoints(tmp_path / "src", n_models=3, layers=1, hidden=8)
    root = tmp_path / "hf_home" / "hub"
    add_to_cache(root, "acme/base", base)
    add_to_cache(root, "acme/ft-0", models[0])
    add_to_cache(root, "acme/ft-1", models[1], commit="b" * 40)
    add_to_cache(root, "acme/ft-2", models[2], commit="c" * 40, refs=("main", "v1"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))  # read at import time
    return root, base, models


def test_cache_layout_is_huggingface_hubs_own(cache):
    root, _, _ = cache
    info = huggingface_hub.scan_cache_dir(root)
    assert {r.repo_id for r in info.repos} == {"acme/base", "acme/ft-0", "acme/ft-1", "acme/ft-2"}
    assert not info.warnings


def test_parse_hub_id():
    assert hub.parse_hub_id("acme/ft-0") == ("acme/ft-0", None)
    assert hub.parse_hub_id("acme/ft-0@v1.2") == ("acme/ft-0", "v1.2")
    assert hub.parse_hub_id("acme/ft-0@refs/pr/3") == ("acme/ft-0", "refs/pr/3")
    for not_an_id in ("./acme/ft", "/abs/path", "a/b/c", "model.safetensors", "acme/model.safetensors", "../x"):
        assert hub.parse_hub_id(not_an_id) is None, not_an_id


def test_hub_ids_merge_like_their_folders(cache, tmp_path):
    _, base, models = cache
    by_id = pactmerge.merge(
        base_model="acme/base",
        models=["acme/ft-0", f"acme/ft-1@{'b' * 40}", "acme/ft-2@v1"],
        method="ties",
    )
    by_path = pactmerge.merge(base_model=str(base), models=[str(m) for m in models], method="ties")
    assert by_id.keys() == by_path.keys()
    for k in by_id:
        assert torch.equal(by_id[k], by_path[k]), k
    with open_source("acme/ft-2@v1") as src:
        assert Path(src.label).is_relative_to(cache[0] / "models--acme--ft-2" / "snapshots" / ("c" * 40))


def test_missing_hub_id_says_how_to_download(cache):
    with pytest.raises(pactmerge.PactMergeError) as e:
        open_source("acme/absent")
    msg = str(e.value)
    assert "acme/absent: no such file or directory, and not in the local Hugging Face cache" in msg
    assert "`hf download acme/absent`" in msg
    with pytest.raises(pactmerge.PactMergeError, match=r"`hf download acme/ft-0 --revision v9`"):
        open_source("acme/ft-0@v9")  # a revision the cache does not have


def test_an_existing_path_wins_over_a_hub_id(cache, tmp_path, monkeypatch):
    _, base, models = cache
    local = tmp_path / "work" / "acme" / "ft-0"
    shutil.copytree(models[1], local)  # a local folder spelled like a cached Hub id, other weights
    monkeypatch.chdir(tmp_path / "work")
    with open_source("acme/ft-0") as src:
        assert Path(src.label).resolve().is_relative_to(local.resolve())


def test_hub_id_without_huggingface_hub(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(pactmerge.PactMergeError, match=r"acme/ft-0: .*install huggingface_hub.*hf download acme/ft-0"):
        open_source("acme/ft-0")


def test_adapter_by_hub_id(cache, tmp_path):
    root, _, _ = cache
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    add_to_cache(root, "acme/lora", folder)
    assert is_adapter("acme/lora")
    assert not is_adapter("acme/ft-0")


def test_card_names_hub_ids(cache, tmp_path):
    out = pactmerge.merge(base_model="acme/base", models=["acme/ft-0", "acme/ft-1"], output_dir=tmp_path / "merged")
    meta = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert meta["base_model"] == ["acme/base", "acme/ft-0", "acme/ft-1"]


def test_cli_with_hf_home_in_a_fresh_process(cache, tmp_path):
    root, _, _ = cache
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"base_model": "acme/base", "models": ["acme/ft-0", "acme/absent"]}))
    env = {**os.environ, "HF_HOME": str(root.parent), "PYTHONPATH": str(Path(pactmerge.__file__).parents[1])}
    env.pop("HF_HUB_CACHE", None)
    res = subprocess.run(
        [sys.executable, "-m", "pactmerge", "merge", str(cfg), str(tmp_path / "o"), "--dry-run", "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert "acme/absent" in line and "hf download acme/absent" in line
    assert not (tmp_path / "o").exists()


# -- --push-to-hub ----------------------------------------------------------------------------


@pytest.fixture
def small_config(tmp_path):
    base, models = make_checkpoints(tmp_path / "in", n_models=2, layers=1, hidden=8)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"base_model": str(base), "models": [str(m) for m in models]}))
    return path


def test_push_to_hub_uploads_the_written_folder(small_config, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
    )

    def upload(self, **kw):
        calls.append(("upload", kw["repo_id"], sorted(p.name for p in Path(kw["folder_path"]).iterdir())))

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload)
    out = tmp_path / "merged"
    res = runner.invoke(
        app, ["merge", str(small_config), str(out), "--no-progress", "--push-to-hub", "me/merged", "--private"]
    )
    assert res.exit_code == 0, res.output
    assert calls[0] == ("create", "me/merged", {"private": True, "exist_ok": True})
    assert calls[1][:2] == ("upload", "me/merged") and "README.md" in calls[1][2] and "model.safetensors" in calls[1][2]
    assert "uploaded to https://huggingface.co/me/merged" in res.output


@pytest.mark.parametrize("dry", [True, False])
def test_push_to_hub_refused_before_any_work(small_config, tmp_path, monkeypatch, dry):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "merged"
    args = ["merge", str(small_config), str(out), "--no-progress", "--push-to-hub", "me/merged"]
    res = runner.invoke(app, args + (["--dry-run"] if dry else []))
    assert res.exit_code == 2
    (line,) = res.output.strip().splitlines()
    assert "--push-to-hub me/merged: not logged in" in line and "hf auth login" in line
    assert not out.exists()
    res = runner.invoke(app, ["merge", str(small_config), str(out), "--push-to-hub", "not a repo"])
    assert res.exit_code == 2 and "expected a Hub repo id" in res.output
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "needs the huggingface_hub package" in res.output and not out.exists()


def test_push_failure_is_one_line(small_config, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")

    def boom(self, *a, **kw):
        raise RuntimeError("403 Forbidden: you cannot write to me/merged\nmore detail")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", boom)
    out = tmp_path / "merged"
    res = runner.invoke(app, ["merge", str(small_config), str(out), "--no-progress", "--push-to-hub", "me/merged"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith("error: --push-to-hub me/merged: upload failed (403")
    assert out.is_dir()  # the merge itself is kept
