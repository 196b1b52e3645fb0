"""Backends and the speed levers of the engine: every lever keeps the output bytes.

* the local pool (any worker count, any memory budget) and Ray write byte-identical folders to
  the plain loop's;
* copy-free reads never let a method or filter write into an input (in-memory or mapped);
* the shard plan writes the same bytes in any order; the cheap finiteness check finds every
  NaN/Inf and never flags a finite tensor; the TIES/DARE rewrites match their formulas.
"""

from __future__ import annotations

import hashlib
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pactmerge
from pactmerge.backends import Sequential, make_backend
from pactmerge.backends.local import LocalBackend
from pactmerge.backends.ray import split_groups
from pactmerge.backends.threads import threads_per_worker
from pactmerge.errors import PactMergeError
from pactmerge.io.writer import ShardedWriter, ShardPlan
from pactmerge.plan import check_finite
from pactmerge.registry import available_filters, available_methods
from pactmerge.synthetic import base_state, finetune_state, make_checkpoints

CONFIGS = {
    "ta": {"method": "task_arithmetic", "alpha": 0.7},
    "ties-model": {"method": "ties"},  # a statistics pass first
    "dare-ties": {"method": "ties", "filters": [{"dare": {"p": 0.4}}], "parameters": {"scope": "tensor"}},
    "pact-iso_c": {"method": "iso_c", "pact": {"K": 4, "k": 2, "svd": "randomized"}},
    "tsv_m-bf16": {"method": "tsv_m", "out_dtype": "bfloat16"},
}


def digest(folder: Path) -> dict[str, str]:
    """Every file's hash except the card (it holds the merge time)."""
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.name != "README.md"
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    base, models = make_checkpoints(root, 3, layers=3, hidden=24, max_shard_bytes=12_000)
    return base, models


def _cfg(checkpoints, name):
    base, models = checkpoints
    return {"base_model": str(base), "models": [str(m) for m in models], "max_shard_size": 12_000, **CONFIGS[name]}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_local_pool_writes_the_same_bytes_as_the_plain_loop(checkpoints, tmp_path, name):
    cfg = _cfg(checkpoints, name)
    plain = digest(pactmerge.merge(cfg, tmp_path / "plain"))
    assert len([f for f in plain if f.endswith(".safetensors")]) > 1  # several shards
    pooled = digest(pactmerge.merge(cfg, tmp_path / "pool", workers=3))
    assert pooled == plain
    # A budget smaller than any parameter: one parameter in flight at a time, same bytes.
    tight = LocalBackend(workers=2, memory_budget=1, readahead=3)
    from pactmerge.api import _write
    from pactmerge.config import load_config
    from pactmerge.engine import open_inputs

    inputs = open_inputs(load_config(cfg))
    try:
        _write(inputs, tmp_path / "tight", torch.device("cpu"), {"overwrite": False}, False, runner=tight)
    finally:
        inputs.close()
    assert digest(tmp_path / "tight") == plain


def test_in_memory_merge_is_the_same_with_a_pool():
    base = base_state(layers=2, hidden=16)
    models = [finetune_state(base, t) for t in range(3)]
    cfg = {"base_model": base, "models": models, "method": "ties", "filters": ["dare"]}
    plain = pactmerge.merge(cfg)
    pooled = pactmerge.merge(cfg, workers=2)
    assert plain.keys() == pooled.keys()
    assert all(torch.equal(plain[k], pooled[k]) for k in plain)
    # Copied tensors (integer buffers) are the result's own, not the input's memory.
    assert plain["embeddings.position_ids"].data_ptr() != base["embeddings.position_ids"].data_ptr()


# -- copy-free reads never let anything write into an input --------------------------------------


def _every_stage_config():
    """One config per registered method (with PACT in front) and per filter (with TA); the data-aware
    stages (they need calibration data; tests/test_data_aware.py) are left out."""
    from pactmerge.registry import get_filter, get_method

    methods = [m for m in available_methods() if not get_method(m).needs]
    configs = [{"method": m, "filters": [{"pact": {"K": 3, "k": 2}}]} for m in methods]
    options = {"pact": {"K": 3, "k": 2}, "s_pact": {"K": 3}, "csp": {"rank": 3}, "dare": {"p": 0.3}}
    filters = [f for f in available_filters() if not get_filter(f).needs]
    configs += [{"method": "task_arithmetic", "filters": [{f: options.get(f, {})}]} for f in filters]
    return configs


@pytest.mark.parametrize("extra", _every_stage_config(), ids=lambda c: f"{c['method']}+{next(iter(c['filters'][0]))}")
def test_no_method_or_filter_writes_into_an_in_memory_input(extra):
    base = base_state(layers=1, hidden=12)
    models = [finetune_state(base, t) for t in range(2 if extra["method"] == "slerp" else 3)]
    before = [{k: v.clone() for k, v in sd.items()} for sd in (base, *models)]
    out = pactmerge.merge(base_model=base, models=models, **extra)
    for sd, ref in zip((base, *models), before):
        for k in sd:
            assert torch.equal(sd[k], ref[k]), f"{extra}: input {k} was modified"
    # ... and the result does not alias an input.
    inputs = {t.data_ptr() for sd in (base, *models) for t in sd.values()}
    assert not any(t.data_ptr() in inputs for t in out.values())


def test_mapped_inputs_stay_untouched_and_usable_after_close(checkpoints, tmp_path):
    from pactmerge.io.sources import open_source

    base, models = checkpoints
    files = sorted(p for d in (base, *models) for p in Path(d).glob("*.safetensors"))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    pactmerge.merge(_cfg(checkpoints, "pact-iso_c"), tmp_path / "out", workers=2)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files} == before
    src = open_source(models[0])
    name = src.names()[0]
    view = src.get(name)
    expected = view.clone()
    view += 1  # copy-on-write: never reaches the file
    src.release(name)  # pages dropped: the next read maps the file again
    src.close()  # the tensor keeps its mapping alive: reading it after close is safe
    assert view.shape == expected.shape and bool(torch.isfinite(view).all())
    assert torch.equal(open_source(models[0]).get(name), expected)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files} == before


# -- the local pool ------------------------------------------------------------------------------


def test_pool_yields_in_order_and_respects_the_memory_budget():
    backend = LocalBackend(workers=3, memory_budget=10, readahead=4)
    lock = threading.Lock()
    live = {"now": 0, "peak": 0}
    costs = [3, 4, 2, 12, 1, 5, 5, 3]  # 12 > budget: it must run alone

    def read(i):
        with lock:
            live["now"] += costs[i]
            live["peak"] = max(live["peak"], live["now"])
        time.sleep(0.002 * (i % 3))
        return i * 10

    def compute(i, x):
        time.sleep(0.003 * ((7 - i) % 4))  # finish out of order
        return x + 1

    out = []
    for r in backend.imap(range(len(costs)), read, compute, cost=lambda i: costs[i]):
        out.append(r)
        with lock:
            live["now"] -= costs[r // 10]
    assert out == [i * 10 + 1 for i in range(len(costs))]
    assert live["peak"] <= 12  # the oversized item alone, otherwise within the budget of 10


def test_pool_propagates_errors_and_stops_early():
    backend = LocalBackend(workers=2)

    def compute(i, x):
        if i == 3:
            raise PactMergeError("parameter 3 is bad")
        return i

    with pytest.raises(PactMergeError, match="parameter 3"):
        list(backend.imap(range(10), lambda i: i, compute))
    started = []
    gen = backend.imap(range(1000), lambda i: started.append(i) or i, lambda i, x: x)
    assert next(gen) == 0
    gen.close()
    assert len(started) < 20  # the window, not the whole list


def test_threads_per_worker_never_oversubscribes():
    assert threads_per_worker(1, cores=8) == 8
    assert threads_per_worker(3, cores=8) == 2
    assert threads_per_worker(4, cores=2) == 1
    assert isinstance(make_backend("local", 1), Sequential)
    assert make_backend("local", 4).threads == threads_per_worker(4)
    with pytest.raises(PactMergeError, match="--backend 'gpu'"):
        make_backend("gpu")


def test_split_groups_is_contiguous_and_balanced():
    items = list(range(10))
    costs = [1, 1, 1, 1, 10, 1, 1, 1, 1, 1]
    groups = split_groups(items, costs, 3)
    assert [x for g in groups for x in g] == items and len(groups) <= 3
    assert max(sum(costs[i] for i in g) for g in groups) <= 11


# -- writer, finiteness check ------------------------------------------------------------------


def test_shard_plan_writes_the_same_bytes_in_any_order(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"t{i}": torch.randn(7, i + 1, generator=g).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(9)
    }
    layout = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    seq = tmp_path / "seq"
    seq.mkdir()
    w = ShardedWriter(seq, layout, 150)
    for n, t in tensors.items():
        w.add(n, t)
    w.close()
    scattered = tmp_path / "scattered"
    scattered.mkdir()
    plan = ShardPlan(layout, 150)
    plan.create(scattered)
    for n in reversed(list(tensors)):
        plan.write(scattered, n, tensors[n])
    plan.finish(scattered)
    assert digest(seq) == digest(scattered) and len(digest(seq)) > 2
    with pytest.raises(RuntimeError, match="planned"):
        plan.write(scattered, "t0", tensors["t1"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cheap_finiteness_check_finds_every_bad_entry_and_no_false_alarm(dtype):
    big = torch.full((64,), torch.finfo(dtype).max, dtype=dtype)  # its sum overflows; it is finite
    check_finite(big, "f", "w")
    check_finite(torch.empty(0, dtype=dtype), "f", "w")
    for pos in (0, 17, 63):
        for bad, word in ((float("nan"), "NaN"), (float("inf"), r"\+Inf"), (float("-inf"), "-Inf")):
            t = torch.randn(64).to(dtype)
            t[pos] = bad
            with pytest.raises(PactMergeError, match=f"f: parameter 'w' contains NaN/Inf \\(1 {word}"):
                check_finite(t, "f", "w")


def test_non_finite_input_is_named_with_its_file(tmp_path):
    from pactmerge.synthetic import write_hf_folder

    base = base_state(layers=2, hidden=16)
    bad = finetune_state(base, 0)
    bad["encoder.layer.1.attention.key.weight"][3, 4] = float("nan")
    write_hf_folder(tmp_path / "base", base)
    write_hf_folder(tmp_path / "bad", bad)
    for workers in (1, 2):
        with pytest.raises(
            PactMergeError, match=r"bad/model\.safetensors: parameter 'encoder\.layer\.1\.attention\.key"
        ):
            pactmerge.merge(base_model=str(tmp_path / "base"), models=[str(tmp_path / "bad")], workers=workers)


# -- TIES / DARE levers against their formulas -----------------------------------------------------


def _np_ties(ds, ws, taus, aggregate):
    trimmed = [np.where(np.abs(d) >= tau, d, 0.0) for d, tau in zip(ds, taus)]
    gamma = np.sign(sum(w * d for w, d in zip(ws, trimmed)))
    agree = [(np.sign(d) == gamma) & (d != 0) for d in trimmed]
    num = sum(w * a * d for w, a, d in zip(ws, agree, trimmed))
    den = sum(w * a for w, a in zip(ws, agree))
    return num if aggregate == "sum" else np.where(den != 0, num / np.where(den != 0, den, 1), 0.0)


@pytest.mark.parametrize("aggregate", ["mean", "sum"])
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_ties_tensor_scope_and_density_one_match_the_formula(aggregate, density):
    from pactmerge.methods.ties import TiesParams, ties_merge, trim_count

    g = torch.Generator().manual_seed(3)
    ds = [torch.randn(40, 30, generator=g, dtype=torch.float64) for _ in range(4)]
    ds[2][:5] = 0.0
    ws = [1.0, 0.5, 2.0, -0.7]  # a negative weight: agreeing weights may cancel to 0
    p = TiesParams(density=density, aggregate=aggregate, scope="tensor")
    counts = [trim_count(d.numel(), p) for d in ds]
    np_ds = [d.numpy() for d in ds]
    taus = [np.sort(np.abs(d).ravel())[::-1][k - 1] if k < d.size else 0.0 for d, k in zip(np_ds, counts)]
    ref = _np_ties(np_ds, ws, taus, aggregate)
    got = ties_merge(ds, ws, None, aggregate, counts)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-12)
    assert all(torch.equal(d, c) for d, c in zip(ds, [d.clone() for d in ds]))
    if density == 1.0:  # no selection: the thresholds are 0 and every task vector is kept as is
        same = ties_merge(ds, ws, [0.0] * 4, aggregate)
        assert torch.equal(same, got)


def test_dare_draws_in_the_compute_dtype_as_documented():
    from pactmerge.plan import param_seed

    base = {"w": torch.zeros(30, 20)}
    model = {"w": torch.ones(30, 20)}
    out = pactmerge.merge(base_model=base, models=[model], seed=4, filters=[{"dare": {"p": 0.3}}])["w"]
    g = torch.Generator().manual_seed((param_seed(4, "w") * 1_000_003 + 0) % (2**63 - 1))
    keep = torch.rand((30, 20), generator=g, dtype=torch.float32) >= 0.3
    assert torch.equal(out, torch.where(keep, torch.full_like(out, 1 / 0.7), torch.zeros_like(out)))
    assert param_seed(4, "w") == (4 * 2_654_435_761 + zlib.crc32(b"w")) % (2**62)


# -- Ray ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_backend_writes_the_same_bytes_as_the_plain_loop(ray_cluster, checkpoints, tmp_path):
    for name in ("ta", "ties-model"):  # plain, and with a distributed statistics pass first
        cfg = _cfg(checkpoints, name)
        plain = digest(pactmerge.merge(cfg, tmp_path / f"{name}-plain"))
        distributed = digest(pactmerge.merge(cfg, tmp_path / f"{name}-ray", backend="ray"))
        assert distributed == plain


def test_ray_backend_reports_a_bad_input_in_one_line(ray_cluster, tmp_path):
    from pactmerge.synthetic import write_hf_folder

    base = base_state(layers=2, hidden=16)
    bad = finetune_state(base, 0)
    bad["encoder.layer.1.output.dense.weight"][0, 0] = float("inf")
    write_hf_folder(tmp_path / "base", base)
    write_hf_folder(tmp_path / "bad", bad)
    cfg = {"base_model": str(tmp_path / "base"), "models": [str(tmp_path / "bad")]}
    with pytest.raises(
        PactMergeError,
        match=r"bad/model\.safetensors: parameter 'encoder\.layer\.1\.output\.dense\.weight' contains NaN/Inf",
    ):
        pactmerge.merge(cfg, tmp_path / "out", backend="ray")
    assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(PactMergeError, match="contains NaN/Inf"):  # also from the statistics pass
        pactmerge.merge({**cfg, "method": "ties"}, tmp_path / "out", backend="ray")


def test_ray_backend_refuses_in_memory_inputs(ray_cluster, tmp_path):
    sd = {"w": torch.zeros(3, 3)}
    with pytest.raises(PactMergeError, match="--backend ray: .*in-memory"):
        pactmerge.merge(base_model=sd, models=[sd], output_dir=tmp_path / "o", backend="ray")
    with pytest.raises(PactMergeError, match="--backend ray writes a dense model folder"):
        pactmerge.merge(base_model=sd, models=[sd], backend="ray")


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1 << 16, 1 << 17),
    frac=st.floats(0.0, 1.0),
    repeats=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 10**6),
)
def test_kth_largest_magnitude_is_exact_on_large_tensors(n, frac, repeats, dtype, seed):
    from pactmerge.methods.ties import kth_largest_magnitude

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3)
    if repeats:  # many equal magnitudes around the threshold
        x[: n // 2] = np.round(x[: n // 2], 1)
    t = torch.from_numpy(x).to(dtype)
    k = max(1, min(n - 1, int(frac * n)))
    ref = np.sort(np.abs(t.numpy()))[::-1][k - 1]  # independent: numpy's sort
    assert kth_largest_magnitude(t, k) == float(ref)


# -- elementwise merges run in chunks, with the same bytes ---------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        {"method": "task_arithmetic", "alpha": 0.7},
        {"method": "weight_average"},
        {"method": "ties"},  # model scope: thresholds from the statistics pass
        {"method": "ties", "parameters": {"density": 1.0, "aggregate": "sum"}},  # model scope at density 1
    ],
    ids=["ta", "weight_average", "ties-model", "ties-density1"],
)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_elementwise_merges_in_chunks_write_the_same_bytes(tmp_path, monkeypatch, cfg, dtype):
    import pactmerge.engine as engine
    from pactmerge.synthetic import write_hf_folder

    base = base_state(layers=2, hidden=20, vocab=37)  # odd sizes: chunks end mid-row, tails differ
    write_hf_folder(tmp_path / "base", base, dtype=dtype)
    for t in range(3):
        write_hf_folder(tmp_path / f"m{t}", finetune_state(base, t), dtype=dtype)
    full = {
        "base_model": str(tmp_path / "base"),
        "models": [str(tmp_path / f"m{t}") for t in range(3)],
        "out_dtype": "bfloat16" if dtype else None,
        **cfg,
    }
    calls = []
    real = engine.merged_weight_chunked
    monkeypatch.setattr(engine, "merged_weight_chunked", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(engine, "CHUNK", 256)  # many chunks per parameter
    chunked = digest(pactmerge.merge(full, tmp_path / "chunked"))
    assert calls  # the chunked path ran
    monkeypatch.setattr(engine, "merges_in_chunks", lambda *a: False)
    whole = digest(pactmerge.merge(full, tmp_path / "whole"))
    assert chunked == whole


def test_chunks_are_used_only_when_every_stage_is_elementwise(checkpoints):
    from pactmerge.config import load_config
    from pactmerge.engine import merges_in_chunks, open_inputs

    base, models = checkpoints
    cpu = torch.device("cpu")
    for extra, expected in (
        ({"method": "task_arithmetic"}, True),
        ({"method": "ties", "parameters": {"scope": "tensor"}}, False),  # per-tensor top-k
        ({"method": "task_arithmetic", "filters": ["dare"]}, False),
        ({"method": "task_arithmetic", "pact": {"K": 2, "k": 1}}, False),
        ({"method": "iso_c"}, False),
    ):
        inputs = open_inputs(load_config({"base_model": str(base), "models": [str(m) for m in models], **extra}))
        try:
            info = next(p for p in inputs.plan.params if p.kind == "matrix")
            assert merges_in_chunks(inputs, info, cpu) is expected, extra
        finally:
            inputs.close()


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"method": "tall_masks"}, "per-task outputs"),
        ({"method": "regmean"}, "data-aware stages"),
        ({"method": "task_arithmetic", "output": "adapter"}, "dense model folder"),
    ],
)
def test_ray_backend_refuses_what_it_cannot_run_before_any_work(checkpoints, tmp_path, extra, message):
    cfg = {**_cfg(checkpoints, "ta"), **extra}
    with pytest.raises(PactMergeError, match=message) as err:
        pactmerge.merge(cfg, tmp_path / "out", backend="ray")
    assert str(err.value).startswith("--backend ray") and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
