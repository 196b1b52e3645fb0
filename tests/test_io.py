"""Checkpoint formats in and out."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pactmerge.errors import PactMergeError
from pactmerge.io import ShardedWriter, atomic_output_dir, open_source
from pactmerge.io.output_guard import MARKER
from pactmerge.synthetic import base_state, write_hf_folder


def assert_same_state(src, state):
    assert set(src.names()) == set(state)
    for k, v in state.items():
        assert src.shape(k) == tuple(v.shape) and src.dtype(k) == v.dtype
        assert torch.equal(src.get(k), v)


def test_sharded_hf_folder_roundtrip(tmp_path):
    sd = base_state(layers=3, hidden=16)
    folder = write_hf_folder(tmp_path / "m", sd, max_shard_bytes=4000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    with open_source(folder) as src:
        assert_same_state(src, sd)
        assert src.folder == folder


def test_single_safetensors_file_bf16_and_ints(tmp_path):
    sd = {"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(5), "c": torch.tensor([True, False])}
    save_file(sd, str(tmp_path / "x.safetensors"))
    with open_source(tmp_path / "x.safetensors") as src:
        assert_same_state(src, sd)


def test_pytorch_bin_and_hf_bin_fallback(tmp_path):
    sd = base_state(layers=1, hidden=8)
    torch.save(sd, tmp_path / "w.pt")
    with open_source(tmp_path / "w.pt") as src:
        assert_same_state(src, sd)
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    with open_source(folder) as src:
        assert_same_state(src, sd)


def test_bin_with_arbitrary_objects_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"w": torch.ones(2), "x": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(PactMergeError, match="evil.bin"):
        open_source(tmp_path / "evil.bin")


def test_in_memory_source_reads_without_copy():
    # get() is read-only and copy-free: the caller's own tensor (the merge never writes to it,
    # tests/test_backends.py checks that for every method and filter).
    t = torch.ones(3)
    src = open_source({"w": t})
    assert src.get("w").data_ptr() == t.data_ptr()


def test_writer_single_shard_named_model_safetensors(tmp_path):
    w = ShardedWriter(tmp_path, [("a", (2,), torch.float32)], 10**9)
    w.add("a", torch.ones(2))
    assert w.close() == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["a"], torch.ones(2))


def test_writer_streams_into_planned_shards_readable_by_safetensors(tmp_path):
    tensors = {
        "a": torch.randn(10, 10),
        "b": torch.arange(7),
        "c": torch.randn(3).to(torch.bfloat16),
        "d": torch.zeros(0, 4),
        "e": torch.randn(30, 10, dtype=torch.float64),
        "f": torch.randn(50),
    }
    w = ShardedWriter(tmp_path, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], 500)
    for n, t in tensors.items():
        w.add(n, t)
    files = w.close()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    got = {}
    for f in files:
        got.update(load_file(str(tmp_path / f)))  # the reference reader accepts our headers
    assert set(got) == set(tensors) and set(index["weight_map"]) == set(tensors)
    for n, t in tensors.items():
        assert torch.equal(got[n], t)


def test_writer_rejects_unplanned_tensors(tmp_path):
    w = ShardedWriter(tmp_path, [("a", (2,), torch.float32)], 10**9)
    with pytest.raises(RuntimeError, match="planned"):
        w.add("a", torch.ones(3))


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output_dir(target) as tmp:
        (tmp / "partial").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(PactMergeError, match="already exists"), atomic_output_dir(target):
        pass
    # --overwrite replaces only an earlier pactmerge output (marker); --force anything.
    with pytest.raises(PactMergeError, match="not a pactmerge output"), atomic_output_dir(target, overwrite=True):
        pass
    with atomic_output_dir(target, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "new"]
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "newer").write_text("newer")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "newer"]
