"""Property-based fuzzing: whatever the input, a clean :class:`PactMergeError` or a correct result,
never another exception.

* configs: a valid config with random keys set to hostile values (bools, huge and negative ints,
  NaN/Inf, 1e308, strings, lists, None), validated and then merged on tiny in-memory models;
* YAML: random documents built from config-like lines (duplicates, tags, anchors, tabs) and raw bytes;
* safetensors headers: random structured headers, and random byte edits of a valid file;
* PEFT ``adapter_config.json``: random values for the keys the reader uses.

Examples are bounded and derandomized (the same inputs on every run), a few seconds in all.
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import pactmerge
from pactmerge.config import MergeConfig, load_config
from pactmerge.errors import PactMergeError
from pactmerge.io.lora import open_adapter
from pactmerge.io.sources import SafetensorsFile, open_source, parse_safetensors_header
from pactmerge.registry import available_filters, available_methods
from pactmerge.synthetic import base_state, finetune_state


def fuzz(examples: int):
    """Bounded, derandomized (the same inputs on every run), no example database on disk."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


HOSTILE = st.one_of(
    st.booleans(),
    st.none(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, -1, 3, 8, 15, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 1e-320, 1e38, 1e308, -1e308, float("nan"), float("inf")]),
    st.text(max_size=6),
    st.sampled_from(["LOTS", "2GB", "1e400", "exact", "randomized", "ties", "tensor", "model", "float16", "pact"]),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.dictionaries(st.sampled_from(["K", "k", "p", "x"]), st.integers(min_value=-2, max_value=20), max_size=2),
)

# Where an edit goes, and values there that may well be valid (an edit takes one of these or a
# HOSTILE value), so that many fuzzed configs get through validation into a real merge.
SPOTS: dict[tuple, list] = {
    ("alpha",): [0.5, 1.0, 2, -1.0, 0, 1e30],
    ("method",): available_methods(),
    ("dtype",): ["float32", "float64"],
    ("out_dtype",): ["float16", "bfloat16", "float32", None],
    ("seed",): [0, 1, -5, 2**40],
    ("max_shard_size",): ["2GB", "1KB", 500, "1.5GiB"],
    ("exclude",): [[], ["pooler"], ["encoder\\.layer\\.0"]],
    ("filters",): [["pact"], ["dare"], [{"dare": {"p": 0.5}}], ["csp"], [{"s_pact": {"K": 4}}], [{"csp": {"rank": 2}}]],
    ("output",): ["dense", "adapter"],
    ("adapter_rank",): [1, 4, None],
    ("allow_nonfinite",): [True, False],
    ("extra_parameters",): ["error", "copy", "drop"],
    ("models",): [[]],
    ("models", 0, "weight"): [0.5, 2.0, 0.0, -1.0, 1e30],
    ("models", 1, "weight"): [0.5, 3],
    ("models", 0, "parameters", "lambda"): [0.5, 1.0],
    ("nonsense",): [1],
    ("pact", "K"): [0, 2, 4, 8, 16, 17],
    ("pact", "k"): [0, 1, 2, 4],
    ("pact", "svd"): ["exact", "randomized"],
    ("pact", "oversample"): [0, 5, 100],
    ("pact", "power_iters"): [0, 1, 3, 100],
    ("pact", "depth"): [0.0, 0.5, 1.0],
    ("pact", "orth_rtol"): [1e-6, 0.5, None],
    ("pact", "K_ratio"): [0.25, 1.0, None],
    ("pact", "k_ratio"): [0.1, None],
    ("parameters", "density"): [0.1, 0.5, 1.0],
    ("parameters", "scope"): ["model", "tensor"],
    ("parameters", "aggregate"): ["mean", "sum"],
    ("parameters", "trim_count"): ["floor", "floor_plus_1", "floor_at_least_1"],
    ("parameters", "k"): [0, 1, 2, 3],
    ("parameters", "lambda"): [0.0, 0.6, 5.0],
    ("parameters", "base_method"): ["ties", "task_arithmetic"],
    ("parameters", "rank_aware"): [True, False],
    ("parameters", "rank_rtol"): [1e-3, None],
    ("parameters", "common_space_fraction"): [0.1, 0.8],
    ("parameters", "dare_p"): [0.0, 0.5],
    ("parameters", "ties"): [{"density": 0.5}],
}


def plausible_or_hostile(values: list):
    """One of ``values`` three times in four, else a HOSTILE value."""
    return st.integers(min_value=0, max_value=3).flatmap(lambda i: HOSTILE if i == 0 else st.sampled_from(values))


EDIT = st.sampled_from(sorted(SPOTS, key=str)).flatmap(
    lambda spot: st.tuples(st.just(spot), plausible_or_hostile(SPOTS[spot]))
)


@pytest.fixture(scope="module")
def tiny():
    base = base_state(layers=1, hidden=16, vocab=20)
    return base, [finetune_state(base, seed=s) for s in (1, 2)]


def _set(cfg: dict, spot: tuple, value) -> None:
    """``cfg[spot[0]][spot[1]]... = value``, creating dicts on the way; skipped where the path is gone."""
    node = cfg
    for step in spot[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(step, {})
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            node = node[step]
        else:
            return
    if isinstance(node, dict):
        node[spot[-1]] = value


@fuzz(400)
@given(
    method=st.sampled_from(available_methods()),
    filters=st.lists(st.sampled_from(available_filters()), max_size=2),
    with_pact=st.booleans(),
    edits=st.lists(EDIT, max_size=3),
)
def test_config_fuzz_clean_error_or_correct_merge(tiny, method, filters, with_pact, edits):
    base, models = tiny
    cfg: dict = {
        "base_model": base,
        "models": [{"model": models[0]}, {"model": models[1]}],
        "method": method,
        "parameters": {},
    }
    if filters:
        cfg["filters"] = list(filters)
    if with_pact or "pact" in filters:
        cfg["pact"] = {"K": 4, "k": 2}
    for spot, value in edits:
        _set(cfg, spot, value)
    try:
        checked = load_config(cfg)
    except PactMergeError:
        return
    assert isinstance(checked, MergeConfig)
    assert not isinstance(checked.alpha, bool) and math.isfinite(checked.alpha)
    try:
        merged = pactmerge.merge(checked)
    except PactMergeError:
        return
    assert set(merged) == set(base)
    if not checked.allow_nonfinite:
        assert all(bool(torch.isfinite(t).all()) for t in merged.values() if t.is_floating_point())


YAML_LINES = [
    "base_model: in/c",
    "models:\n  - model: in/a\n    weight: 1e308\n  - in/b",
    "method: ties",
    "method: iso_c",
    "alpha: .nan",
    "alpha: true",
    "alpha: 1e400",
    "alpha: 0x10",
    "alpha: 1_000",
    "alpha: !!binary aGVsbG8=",
    "pact: {K: false, k: 2}",
    "pact:\n  K: 4\n  K: 5",
    "pact: &p {K: 4, k: 2}",
    "filters: [*p]",
    "filters: [{dare: {p: 0.5}}, pact]",
    "parameters: {density: yes}",
    "max_shard_size: LOTS",
    "seed: 2019-01-01",
    "exclude: ['(']",
    "x: !!python/object:os.system ls",
    "? [a, b]\n: 1",
    "<<: {alpha: 2}",
    "\tbad: tab",
    "- a list",
    "base_model: ~",
    "'alpha': 3",
    "alpha: 1e-5",
    "dtype: float64",
    "seed: 7",
    "exclude: [pooler]",
    "method: tsv_m",
    "out_dtype: bfloat16",
    "alpha: 0.3",
    "method: task_arithmetic",
    "pact: {K: 4, k: 2, svd: randomized, power_iters: 3}",
    "max_shard_size: 500MB",
    "extra_parameters: copy",
    "allow_nonfinite: true",
    "filters: [dare]",
    "parameters: {}",
    "# a comment",
    "",
]


@fuzz(300)
@given(
    lines=st.lists(st.sampled_from(YAML_LINES), max_size=4),
    noise=st.integers(min_value=0, max_value=3).flatmap(lambda i: st.text(max_size=12) if i == 0 else st.just("")),
)
def test_yaml_fuzz_clean_error_or_config(tmp_path_factory, lines, noise):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    text = "\n".join(["base_model: in/base", "models: [in/a, in/b]", *lines, noise])
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        cfg = load_config(path)
    except PactMergeError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    assert isinstance(cfg, MergeConfig)


@fuzz(150)
@given(data=st.binary(max_size=200))
def test_config_bytes_fuzz(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz-bytes.yaml"
    path.write_bytes(data)
    try:
        load_config(path)
    except PactMergeError as e:
        assert "\n" not in str(e) and str(path) in str(e)


# --- safetensors headers -----------------------------------------------------------------------

NUMBERISH = st.one_of(
    st.integers(min_value=-5, max_value=80),
    st.sampled_from([2**63, 2**64 + 1, 10**30, True, False, 1.5, float("inf"), float("nan"), -0.0]),
    st.text(max_size=3),
    st.none(),
)
ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F4", "f32", ""]), NUMBERISH),
        "shape": st.one_of(st.lists(NUMBERISH, max_size=3), NUMBERISH),
        "data_offsets": st.one_of(st.lists(NUMBERISH, max_size=3), NUMBERISH),
    }
)


def _check_readable(path) -> None:
    """A file the reader accepted: every tensor reads back with its declared shape and dtype."""
    with SafetensorsFile(path) as src:
        for name in src.names():
            t = src.get(name)
            assert tuple(t.shape) == src.shape(name) and t.dtype == src.dtype(name)


ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "BOOL": 1, "U8": 1}
TENSOR = st.tuples(st.sampled_from(sorted(ITEMSIZE)), st.lists(st.integers(min_value=0, max_value=4), max_size=3))
MUTATION = st.tuples(
    st.integers(min_value=0, max_value=5), st.sampled_from(["dtype", "shape", "data_offsets", "entry"]), NUMBERISH
)


@fuzz(400)
@given(
    tensors=st.lists(TENSOR, max_size=4),
    mutations=st.lists(MUTATION, max_size=2),
    extra_bytes=st.integers(min_value=-4, max_value=4),
    raw_edit=st.one_of(
        st.none(), st.tuples(st.integers(min_value=0, max_value=300), st.sampled_from(list(b'0-1:[]{}"e.')))
    ),
)
def test_safetensors_header_fuzz(tmp_path_factory, tensors, mutations, extra_bytes, raw_edit):
    # A valid header, then hostile edits of its fields (and maybe one raw byte).
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for i, (dtype, shape) in enumerate(tensors):
        n = ITEMSIZE[dtype] * math.prod(shape)
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    for i, key, value in mutations:
        name = f"t{i}"
        if isinstance(header.get(name), dict):
            if key == "entry":
                header[name] = value
            else:
                header[name][key] = value
    data_len = max(0, offset + extra_bytes)
    raw = json.dumps(header).encode()  # NaN/Infinity written as JSON extensions, as a hostile writer would
    if raw_edit is not None:
        pos, byte = raw_edit
        raw = raw[: pos % max(len(raw), 1)] + bytes([byte]) + raw[pos % max(len(raw), 1) + 1 :]
    try:
        entries = parse_safetensors_header(raw, data_len, "fuzz.safetensors")
    except PactMergeError as e:
        assert str(e).startswith("fuzz.safetensors: ") and "\n" not in str(e)
        return
    spans = sorted((b, e) for _, _, b, e in entries.values() if e > b)
    assert all(e <= data_len for _, e in spans) and all(b1 >= e0 for (_, e0), (b1, _) in zip(spans, spans[1:]))
    path = tmp_path_factory.getbasetemp() / "fuzz-ok.safetensors"
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(i % 256 for i in range(data_len)))
    _check_readable(path)


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "valid.safetensors"
    save_file({"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.zeros(0, 2), "d": torch.ones(2)}, str(path))
    return path.read_bytes()


@fuzz(400)
@given(
    edits=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=400),
            st.sampled_from(["flip", "insert", "delete", "digit", "digit"]),
            st.binary(min_size=1, max_size=3),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_safetensors_byte_edit_fuzz(tmp_path_factory, valid_file, edits):
    data = bytearray(valid_file)
    header_end = 8 + struct.unpack("<Q", valid_file[:8])[0]
    for pos, kind, chunk in edits:
        if kind == "digit":  # another digit in a number of the header: JSON stays valid, sizes go wrong
            digits = [i for i in range(8, header_end) if 48 <= data[i] <= 57]
            if digits:
                data[digits[pos % len(digits)]] = 48 + chunk[0] % 10
            continue
        pos %= header_end
        if kind == "flip":
            data[pos : pos + len(chunk)] = chunk
        elif kind == "insert":
            data[pos:pos] = chunk
        else:
            del data[pos : pos + len(chunk)]
    path = tmp_path_factory.getbasetemp() / "fuzz-edit.safetensors"
    path.write_bytes(bytes(data))
    try:
        _check_readable(path)
    except PactMergeError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)


# --- PEFT adapter configs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = {"layer.0.q.weight": torch.randn(6, 4), "layer.0.q.bias": torch.zeros(6)}
    folder = root / "adapter"
    folder.mkdir()
    save_file(
        {
            "base_model.model.layer.0.q.lora_A.weight": torch.randn(2, 4),
            "base_model.model.layer.0.q.lora_B.weight": torch.randn(6, 2),
        },
        str(folder / "adapter_model.safetensors"),
    )
    return base, folder


# adapter_config.json keys, with values that may well be valid (the adapter has rank 2)
ADAPTER_KEYS: dict[str, list] = {
    "peft_type": ["LORA", "lora", "IA3"],
    "r": [2, 4, 1],
    "lora_alpha": [2, 4.0, 0.5, 1e30],
    "rank_pattern": [{}, {"q": 2}, {"layer.0.q": 2}, {"(": 2}, {"q": 0}],
    "alpha_pattern": [{}, {"q": 8}, {".*": 1.5}],
    "use_rslora": [True, False],
    "fan_in_fan_out": [False, True],
    "bias": ["none", "all", None],
    "use_dora": [False, True],
    "modules_to_save": [None, ["x"]],
}
ADAPTER_ITEM = st.sampled_from(sorted(ADAPTER_KEYS)).flatmap(
    lambda key: st.tuples(st.just(key), plausible_or_hostile(ADAPTER_KEYS[key]))
)


@fuzz(300)
@given(config=st.one_of(st.lists(ADAPTER_ITEM, max_size=4).map(lambda kv: {"peft_type": "LORA", **dict(kv)}), HOSTILE))
def test_adapter_config_fuzz(lora_world, config):
    base, folder = lora_world
    (folder / "adapter_config.json").write_text(json.dumps(config))
    src = open_source(base)
    try:
        lora = open_adapter(folder, src)
    except PactMergeError as e:
        assert "adapter" in str(e) and "\n" not in str(e)
        return
    with lora:
        t = lora.get("layer.0.q.weight")
        assert t.shape == (6, 4)
