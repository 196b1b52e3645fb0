"""PEFT LoRA adapters as merge inputs and outputs: the low-rank path against the dense one."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import pactmerge
from conftest import np_top_right
from pactmerge.errors import PactMergeError
from pactmerge.lowrank import LowRankDelta, factor_svd, stacked_svd, top_right_lowrank

# module -> (out, in); "model.layers.<i>" so PACT's depth sees layers
SHAPES = {
    "model.layers.0.q": (16, 12),
    "model.layers.0.v": (12, 12),
    "model.layers.1.q": (16, 12),
    "model.layers.1.v": (12, 12),
}


def base_sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for mod, (m, n) in SHAPES.items():
        sd[mod + ".weight"] = torch.randn(m, n, generator=g, dtype=torch.float64)
        sd[mod + ".bias"] = torch.randn(m, generator=g, dtype=torch.float64)
    sd["model.norm.weight"] = torch.ones(12, dtype=torch.float64)
    return sd


def random_adapter(seed, rank, targets, alpha=None):
    """Factors {module: (A, B)} of a random adapter (B nonzero, unlike PEFT's init)."""
    g = torch.Generator().manual_seed(100 + seed)
    return {
        mod: (
            0.3 * torch.randn(rank, SHAPES[mod][1], generator=g, dtype=torch.float64),
            0.3 * torch.randn(SHAPES[mod][0], rank, generator=g, dtype=torch.float64),
        )
        for mod in targets
    }


def write_adapter(folder, factors, rank, alpha, prefix="base_model.model.", **config):
    folder.mkdir(parents=True)
    tensors = {}
    for mod, (a, b) in factors.items():
        tensors[f"{prefix}{mod}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}{mod}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted({m.split(".")[-1] for m in factors}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        **config,
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def dense_model(base, factors, scale):
    sd = {k: v.clone() for k, v in base.items()}
    for mod, (a, b) in factors.items():
        sd[mod + ".weight"] += scale * b @ a
    return sd


ALL = list(SHAPES)
# (rank, alpha, targets): different ranks and target modules
ADAPTERS = [
    (3, 6.0, ALL),
    (4, 4.0, ["model.layers.0.q", "model.layers.1.v", "model.layers.1.q"]),
    (5, 10.0, ["model.layers.0.v", "model.layers.1.q"]),
]


def make_inputs(tmp_path, same_targets=False):
    base = base_sd()
    folders, dense = [], []
    for i, (r, alpha, targets) in enumerate(ADAPTERS):
        f = random_adapter(i, r, ALL if same_targets else targets)
        folders.append(write_adapter(tmp_path / f"ad{i}", f, r, alpha))
        dense.append(dense_model(base, f, alpha / r))
    return base, folders, dense


METHODS = [
    ("task_arithmetic", {}, None),
    ("weight_average", {}, None),
    ("ties", {"density": 0.5}, None),
    ("ties", {"density": 0.5, "scope": "tensor"}, ["dare"]),  # DARE-TIES
    ("iso_c", {}, None),
    ("iso_cts", {}, None),
    ("tsv_m", {}, None),
    ("knots", {}, None),
    ("knots", {"base_method": "ties", "density": 0.5, "dare_p": 0.3}, None),
]


@pytest.mark.parametrize("with_pact", [False, True])
@pytest.mark.parametrize("method,params,filters", METHODS)
def test_lowrank_path_equals_dense(tmp_path, method, params, filters, with_pact):
    # PACT on a weight that only some adapters target: the dense SVD of a zero update pads
    # V_{t,k} with arbitrary vectors, the low-rank path does not (docs/lora.md) -> same targets.
    base, folders, dense = make_inputs(tmp_path, same_targets=with_pact)
    cfg = {"method": method, "parameters": params, "dtype": "float64", "alpha": 0.7}
    flt = list(filters or [])
    if with_pact:
        flt = [{"pact": {"K": 4, "k": 2}}] + flt
        if method in ("iso_cts", "tsv_m"):
            # After PACT the stacked singular vectors are exactly rank-deficient, and their
            # round-off singular values (dense or low-rank alike) straddle the default max(n, c)*eps
            # tolerance of the polar factor: a coin flip. A looser tolerance makes it well-defined.
            cfg["parameters"] = {**params, "rank_rtol": 1e-9}
    if flt:
        cfg["filters"] = flt
    ours = pactmerge.merge(base_model=base, models=[str(f) for f in folders], **cfg)
    ref = pactmerge.merge(base_model=base, models=dense, **cfg)
    assert set(ours) == set(ref)
    for k in ref:
        np.testing.assert_allclose(ours[k].numpy(), ref[k].numpy(), atol=1e-9, err_msg=k)


@pytest.mark.parametrize("method", ["task_arithmetic", "iso_c", "iso_cts", "tsv_m", "knots"])
def test_spectral_methods_return_lowrank(method):
    from pactmerge.registry import ParamContext, ParamInfo, get_method

    g = torch.Generator().manual_seed(3)
    ds = [
        LowRankDelta(
            torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randn(3, 30, generator=g, dtype=torch.float64)
        )
        for _ in range(3)
    ]
    info = ParamInfo("layers.0.w", (40, 30), torch.float64, "matrix", 0, 1.0)
    ctx = ParamContext(info, 0, [1.0, 0.5, 2.0], [{}] * 3)
    spec = get_method(method)
    out = spec.fn(torch.zeros(40, 30, dtype=torch.float64), ds, ctx, spec.params())
    assert isinstance(out, LowRankDelta) and out.rank <= 9
    dense = spec.fn(torch.zeros(40, 30, dtype=torch.float64), [d.dense() for d in ds], ctx, spec.params())
    np.testing.assert_allclose(out.dense().numpy(), dense.numpy(), atol=1e-10)


def test_factor_svds_and_exact_subspace():
    g = torch.Generator().manual_seed(5)
    b, a = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(6, 40, generator=g, dtype=torch.float64)
    d = LowRankDelta(b, a)
    u, s, vh = factor_svd(d)
    np.testing.assert_allclose(((u * s) @ vh).numpy(), d.dense().numpy(), atol=1e-12)
    np.testing.assert_allclose(s.numpy(), torch.linalg.svdvals(d.dense())[:6].numpy(), rtol=1e-12)
    for k in (1, 3, 6):
        v = top_right_lowrank(d, k).numpy()
        ref = np_top_right(d.dense().numpy(), k)  # independent: eigenvectors of the dense Gram matrix
        np.testing.assert_allclose(v @ v.T, ref @ ref.T, atol=1e-10)
    # a_rows: A's own row space (same span as B A at k = r)
    v = top_right_lowrank(d, 6, "a_rows").numpy()
    ref = np_top_right(d.dense().numpy(), 6)
    np.testing.assert_allclose(v @ v.T, ref @ ref.T, atol=1e-10)
    d2 = LowRankDelta(
        torch.randn(50, 2, generator=g, dtype=torch.float64), torch.randn(2, 40, generator=g, dtype=torch.float64)
    )
    u, s, vh = stacked_svd([d, d2], [0.5, -2.0])
    np.testing.assert_allclose(((u * s) @ vh).numpy(), (0.5 * d.dense() - 2 * d2.dense()).numpy(), atol=1e-12)


def test_pact_filtered_adapter_stays_low_rank_and_a_rows_option():
    from pactmerge.filters.pact import PactParams, pact
    from pactmerge.registry import ParamContext, ParamInfo

    g = torch.Generator().manual_seed(9)
    base = torch.randn(30, 24, generator=g, dtype=torch.float64)
    ds = [
        LowRankDelta(
            torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(4, 24, generator=g, dtype=torch.float64)
        )
        for _ in range(3)
    ]
    info = ParamInfo("layers.0.w", (30, 24), torch.float64, "matrix", 0, 1.0)
    ctx = ParamContext(info, 0, [1.0] * 3, [{}] * 3)
    out = pact(base, ds, ctx, PactParams(K=6, k=3))
    ref = pact(base, [d.dense() for d in ds], ctx, PactParams(K=6, k=3))
    for o, r, d in zip(out, ref, ds):
        assert isinstance(o, LowRankDelta) and o.rank == 4 and o.B is d.B  # only A_t changes
        np.testing.assert_allclose(o.dense().numpy(), r.numpy(), atol=1e-10)
    # a_rows with k = r: the same subspace, so the same result
    out_a = pact(base, ds, ctx, PactParams(K=6, k=4, lora_subspace="a_rows"))
    ref_a = pact(base, [d.dense() for d in ds], ctx, PactParams(K=6, k=4))
    for o, r in zip(out_a, ref_a):
        np.testing.assert_allclose(o.dense().numpy(), r.numpy(), atol=1e-9)


def test_prefix_rule_and_fan_in_fan_out(tmp_path):
    base = base_sd()
    f = random_adapter(0, 3, ["model.layers.0.q", "model.layers.1.v"])
    # base saved without the "model." prefix the adapter's model has
    stripped = {k[len("model.") :]: v for k, v in base.items()}
    folder = write_adapter(tmp_path / "a", f, 3, 6.0)
    out = pactmerge.merge(base_model=stripped, models=[str(folder)], dtype="float64")
    ref = dense_model(base, f, 2.0)
    for k, v in ref.items():
        np.testing.assert_allclose(out[k[len("model.") :]].numpy(), v.numpy(), atol=1e-12)
    # fan_in_fan_out: the base stores W^T (in, out); the adapter's A is (r, in), B (out, r)
    tbase = {k: (v.mT.contiguous() if v.ndim == 2 else v) for k, v in base.items()}
    folder2 = write_adapter(tmp_path / "b", f, 3, 6.0, fan_in_fan_out=True, use_rslora=True)
    out = pactmerge.merge(base_model=tbase, models=[str(folder2)], dtype="float64")
    ref = dense_model(base, f, 6.0 / np.sqrt(3))
    for k, v in ref.items():
        np.testing.assert_allclose(out[k].numpy(), (v.mT if v.ndim == 2 else v).numpy(), atol=1e-12)


def test_rank_and_alpha_patterns(tmp_path):
    base = base_sd()
    g = torch.Generator().manual_seed(1)
    f = {
        "model.layers.0.q": (
            torch.randn(2, 12, generator=g, dtype=torch.float64),
            torch.randn(16, 2, generator=g, dtype=torch.float64),
        ),
        "model.layers.0.v": (
            torch.randn(4, 12, generator=g, dtype=torch.float64),
            torch.randn(12, 4, generator=g, dtype=torch.float64),
        ),
    }
    folder = write_adapter(tmp_path / "a", f, 4, 8.0, rank_pattern={"q": 2}, alpha_pattern={"layers.0.q": 1.0})
    out = pactmerge.merge(base_model=base, models=[str(folder)], dtype="float64")
    np.testing.assert_allclose(
        out["model.layers.0.q.weight"].numpy(),
        (base["model.layers.0.q.weight"] + 0.5 * f["model.layers.0.q"][1] @ f["model.layers.0.q"][0]).numpy(),
        atol=1e-12,
    )
    np.testing.assert_allclose(
        out["model.layers.0.v.weight"].numpy(),
        (base["model.layers.0.v.weight"] + 2.0 * f["model.layers.0.v"][1] @ f["model.layers.0.v"][0]).numpy(),
        atol=1e-12,
    )


def test_mixed_full_finetune_and_adapter(tmp_path):
    base, folders, dense = make_inputs(tmp_path)
    ft = {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}
    for method in ("task_arithmetic", "iso_c", "tsv_m"):
        ours = pactmerge.merge(base_model=base, models=[str(folders[0]), ft], method=method, dtype="float64")
        ref = pactmerge.merge(base_model=base, models=[dense[0], ft], method=method, dtype="float64")
        for k in ref:
            np.testing.assert_allclose(ours[k].numpy(), ref[k].numpy(), atol=1e-10)


# -- errors: at plan time, nothing written -----------------------------------------------------


def _err_case(tmp_path, case):
    f = random_adapter(0, 3, ["model.layers.0.q"])
    a, b = f["model.layers.0.q"]
    cfg, prefix = {}, "base_model.model."
    if case == "missing_target":
        f = {"model.layers.7.q": (a, b)}
    elif case == "rank_mismatch":
        f = {"model.layers.0.q": (a, b[:, :2])}
    elif case == "base_shape":
        f = {"model.layers.0.q": (a[:, :10], b)}
    elif case == "config_r":
        cfg = {"r": 5}
    elif case == "peft_type":
        cfg = {"peft_type": "IA3"}
    elif case == "dora":
        cfg = {"use_dora": True}
    elif case == "bias":
        cfg = {"bias": "all"}
    elif case == "modules_to_save":
        cfg = {"modules_to_save": ["classifier"]}
    folder = write_adapter(tmp_path / "ad", f, 3, 6.0, prefix=prefix, **cfg)
    if case == "embedding":
        save_file(
            {
                "base_model.model.embed.lora_embedding_A.default": a,
                "base_model.model.embed.lora_embedding_B.default": b,
            },
            str(folder / "adapter_model.safetensors"),
        )
    if case == "conv":
        save_file(
            {
                "base_model.model.model.layers.0.q.lora_A.weight": a[:, :, None, None].contiguous(),
                "base_model.model.model.layers.0.q.lora_B.weight": b[:, :, None, None].contiguous(),
            },
            str(folder / "adapter_model.safetensors"),
        )
    return folder


ERRORS = {
    "missing_target": "has no weight 'model.layers.7.q.weight'",
    "rank_mismatch": "disagree on the rank",
    "base_shape": "the base weight 'model.layers.0.q.weight' is [16, 12]",
    "config_r": "the adapter config says r = 5",
    "peft_type": "peft_type 'IA3' is not supported",
    "dora": "DoRA (use_dora: true) is not supported",
    "bias": "bias 'all' is not supported",
    "modules_to_save": "modules_to_save is not supported",
    "embedding": "embedding LoRA",
    "conv": "convolution LoRA is not supported",
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_adapter_errors_before_writing(tmp_path, case):
    folder = _err_case(tmp_path, case)
    out = tmp_path / "out" / "merged"
    with pytest.raises(
        PactMergeError,
        match=ERRORS[case].replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)"),
    ):
        pactmerge.merge({"base_model": base_sd(), "models": [str(folder)]}, out)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# -- PEFT round trips ---------------------------------------------------------------------------

peft = pytest.importorskip("peft")


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(12, 16)
        self.v = torch.nn.Linear(16, 12)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(12, 5)

    def forward(self, x):
        for blk in self.layers:
            x = torch.tanh(blk.v(torch.tanh(blk.q(x))))
        return self.head(x)


def tiny(seed=0):
    torch.manual_seed(seed)
    return Tiny().double()


def peft_adapter(folder, seed, r, alpha, targets, safe=True, **kw):
    model = peft.get_peft_model(tiny(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.save_pretrained(str(folder), safe_serialization=safe)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("safe", [True, False])
def test_peft_adapter_read_like_merge_and_unload(tmp_path, safe):
    base = {k: v.detach().clone() for k, v in tiny().state_dict().items()}
    merged_by_peft = peft_adapter(
        tmp_path / "a", 1, 4, 8, ["q", "v"], safe, rank_pattern={"layers.1.v": 2}, alpha_pattern={"v": 3}
    )
    assert (tmp_path / "a" / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    ours = pactmerge.merge(base_model=base, models=[str(tmp_path / "a")], dtype="float64")
    for k, v in merged_by_peft.items():
        np.testing.assert_allclose(ours[k].numpy(), v.numpy(), atol=1e-12, err_msg=k)


@pytest.mark.parametrize("method,params,rank", [("task_arithmetic", {}, None), ("iso_c", {}, None), ("tsv_m", {}, 3)])
def test_output_adapter_loads_in_peft(tmp_path, method, params, rank):
    base = {k: v.detach().clone() for k, v in tiny().state_dict().items()}
    peft_adapter(tmp_path / "a", 1, 4, 8, ["q", "v"])
    peft_adapter(tmp_path / "b", 2, 2, 2, ["q"])
    cfg = {
        "base_model": base,
        "models": [str(tmp_path / "a"), str(tmp_path / "b")],
        "method": method,
        "parameters": params,
        "dtype": "float64",
        "alpha": 0.8,
    }
    dense = pactmerge.merge(**cfg)
    out = pactmerge.merge(dict(cfg, output="adapter", adapter_rank=rank), tmp_path / "out")
    card = (out / "README.md").read_text()
    assert "## LoRA adapter" in card
    loaded = peft.PeftModel.from_pretrained(tiny(), str(out)).double().eval()
    ref = tiny()
    ref.load_state_dict(dense)
    x = torch.randn(7, 12, dtype=torch.float64)
    with torch.no_grad():
        got, want = loaded(x), ref(x)
    if rank is None:  # exact: TA of adapters has rank <= 4 + 2, Iso-C likewise
        assert "exact" in card
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-10)
        cfg_out = json.loads((out / "adapter_config.json").read_text())
        assert cfg_out["r"] <= 6
    else:  # truncated to rank 3: reported, and close but not equal
        assert "energy kept" in card and "truncated" in card
        assert float(np.abs(got.numpy() - want.numpy()).max()) < 0.5


def test_output_adapter_fan_in_fan_out_round_trip(tmp_path):
    # The base stores W^T; the output adapter must say fan_in_fan_out and transpose its factors.
    base = base_sd()
    tbase = {k: (v.mT.contiguous() if v.ndim == 2 else v) for k, v in base.items()}
    folders = [
        write_adapter(tmp_path / f"a{i}", random_adapter(i, r, ALL), r, 2.0 * r, fan_in_fan_out=True)
        for i, r in enumerate((2, 3))
    ]
    cfg = {
        "base_model": tbase,
        "models": [str(f) for f in folders],
        "method": "iso_c",
        "dtype": "float64",
        "alpha": 0.5,
    }
    dense = pactmerge.merge(**cfg)
    out = pactmerge.merge(dict(cfg, output="adapter"), tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    again = pactmerge.merge(base_model=tbase, models=[str(out)], dtype="float64")
    for k, v in dense.items():
        np.testing.assert_allclose(again[k].numpy(), v.numpy(), atol=1e-10, err_msg=k)
