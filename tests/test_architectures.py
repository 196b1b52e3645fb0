"""Compatibility matrix: tiny random transformers models of every common architecture, merged with
TA, TIES, Iso-C and PACT-Iso-C, loaded back with their Auto class and run; every merged tensor is
checked against an independent numpy formula (float64, written from the papers)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file, save_file

import pactmerge
from conftest import np_pact
from pactmerge.api import dry_run
from pactmerge.errors import PactMergeError

transformers = pytest.importorskip("transformers")

# PACT ranks for hidden size 32. k > K/2 keeps the other tasks' walls from covering the whole core
# (they do for K >= 2k at T = 3), so the PACT-filtered sum has no numerically-null directions whose
# round-off would decide Iso-C's rank and make an exact comparison meaningless.
K, k = 4, 3
N_MODELS = 3
VOCAB = 101  # distinct from every other dimension, so no other axis looks like the vocabulary
HIDDEN, LAYERS, HEADS, FFN, POSITIONS = 32, 2, 4, 64, 40


@dataclass(frozen=True)
class Arch:
    name: str
    auto: str  # the transformers Auto class that must load the output
    kind: str  # "encoder" | "decoder" | "seq2seq" | "vision" | "clip"
    conv1d: tuple[str, ...] = ()  # weights the test itself knows are stored (in, out)
    position_ids_in_base: bool = False  # the base holds embeddings.position_ids (an old save)


def _build(name: str) -> Any:
    t = transformers
    common = {"num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "intermediate_size": FFN}
    if name.startswith("bert"):
        return t.BertModel(
            t.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, max_position_embeddings=POSITIONS, **common)
        )
    if name == "roberta":
        return t.RobertaModel(
            t.RobertaConfig(
                vocab_size=VOCAB, hidden_size=HIDDEN, max_position_embeddings=POSITIONS, pad_token_id=1, **common
            )
        )
    if name == "distilbert":
        return t.DistilBertModel(
            t.DistilBertConfig(
                vocab_size=VOCAB,
                dim=HIDDEN,
                n_layers=LAYERS,
                n_heads=HEADS,
                hidden_dim=FFN,
                max_position_embeddings=POSITIONS,
            )
        )
    if name == "gpt2":
        return t.GPT2LMHeadModel(
            t.GPT2Config(
                vocab_size=VOCAB,
                n_embd=HIDDEN,
                n_layer=LAYERS,
                n_head=HEADS,
                n_positions=POSITIONS,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
    if name.startswith("llama") or name == "qwen2":
        cls, cfg_cls = (t.Qwen2ForCausalLM, t.Qwen2Config) if name == "qwen2" else (t.LlamaForCausalLM, t.LlamaConfig)
        return cls(
            cfg_cls(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                num_key_value_heads=2,
                max_position_embeddings=POSITIONS,
                tie_word_embeddings=name != "llama-untied",
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=2,
                **common,
            )
        )
    if name == "t5":
        return t.T5ForConditionalGeneration(
            t.T5Config(
                vocab_size=VOCAB,
                d_model=HIDDEN,
                d_kv=8,
                d_ff=FFN,
                num_layers=LAYERS,
                num_heads=HEADS,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
    if name == "vit":
        return t.ViTModel(t.ViTConfig(hidden_size=HIDDEN, image_size=16, patch_size=4, **common))
    if name == "clip":
        text = dict(
            vocab_size=VOCAB, hidden_size=HIDDEN, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, **common
        )
        vision = dict(hidden_size=HIDDEN, image_size=16, patch_size=8, **common)
        return t.CLIPModel(t.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    raise AssertionError(name)


ARCHS = [
    Arch("bert+position_ids", "AutoModel", "encoder", position_ids_in_base=True),
    Arch("bert", "AutoModel", "encoder"),
    Arch("roberta", "AutoModel", "encoder"),
    Arch("distilbert", "AutoModel", "encoder"),
    Arch("gpt2", "AutoModelForCausalLM", "decoder", conv1d=("c_attn", "c_proj", "c_fc")),
    Arch("llama-tied", "AutoModelForCausalLM", "decoder"),
    Arch("llama-untied", "AutoModelForCausalLM", "decoder"),
    Arch("qwen2", "AutoModelForCausalLM", "decoder"),
    Arch("t5", "AutoModelForSeq2SeqLM", "seq2seq"),
    Arch("vit", "AutoModel", "vision"),
    Arch("clip", "AutoModel", "clip"),
]

METHODS: dict[str, dict] = {
    "ta": {"method": "task_arithmetic"},
    "ties": {"method": "ties", "parameters": {"density": 0.5, "scope": "tensor"}},
    "iso_c": {"method": "iso_c"},
    "pact_iso_c": {"method": "iso_c", "pact": {"K": K, "k": k}},
}


def _save_family(arch: Arch, root: Path) -> tuple[Path, list[Path]]:
    """The base and N_MODELS perturbed fine-tunes, each saved with save_pretrained."""
    torch.manual_seed(0)
    model = _build(arch.name).eval()
    base = root / "base"
    model.save_pretrained(base)
    if arch.position_ids_in_base:  # as transformers < 4.31 saved it (a persistent buffer then)
        state = load_file(base / "model.safetensors")
        state["embeddings.position_ids"] = torch.arange(POSITIONS, dtype=torch.int64)[None]
        save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    models = []
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in range(N_MODELS):
        gen = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for n, p in model.named_parameters():  # tied parameters appear once, so stay tied
                p.copy_(original[n] + 0.02 * torch.randn(p.shape, generator=gen))
        models.append(root / f"ft{t}")
        model.save_pretrained(models[-1])
    return base, models


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    cache: dict[str, tuple[Path, list[Path]]] = {}

    def get(arch: Arch) -> tuple[Path, list[Path]]:
        if arch.name not in cache:
            cache[arch.name] = _save_family(arch, tmp_path_factory.mktemp(arch.name.replace("+", "_")))
        return cache[arch.name]

    return get


# -- the independent formulas (numpy, float64) ------------------------------------------------


def np_ties(deltas: list[np.ndarray], density: float) -> np.ndarray:
    """TIES (Yadav et al. 2023), per tensor: keep each task's top floor(density n) magnitudes,
    elect the sign of the sum, mean over the tasks that agree with it."""
    trimmed = []
    for d in deltas:
        keep = int(density * d.size)
        tau = np.sort(np.abs(d).ravel())[::-1][keep - 1] if keep > 0 else np.inf
        trimmed.append(np.where(np.abs(d) >= tau, d, 0.0))
    sign = np.sign(sum(trimmed))
    agree = [(np.sign(d) == sign) & (d != 0) for d in trimmed]
    num = sum(np.where(a, d, 0.0) for a, d in zip(agree, trimmed))
    den = sum(a.astype(np.float64) for a in agree)
    return np.where(den > 0, num / np.maximum(den, 1), 0.0)


def np_iso_c(total: np.ndarray) -> np.ndarray:
    """Iso-C (Marczak et al. 2025), well-posed: sigma_bar U V^T over the numerical range of the sum."""
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    r = int((s > max(total.shape) * np.finfo(np.float64).eps * s[0]).sum())
    return s.mean() * u[:, :r] @ vt[:r]


def expected_delta(method: str, name: str, base: np.ndarray, deltas: list[np.ndarray], arch: Arch) -> np.ndarray:
    """The merged task vector of one float parameter, as the paper defines it."""
    if method == "ta":
        return sum(deltas)
    if method == "ties":
        return np_ties(deltas, 0.5)
    if base.ndim != 2:  # Iso-C: vectors (and scalars, convolutions) take the mean
        return sum(deltas) / len(deltas)
    conv1d = any(name.endswith(f".{m}.weight") for m in arch.conv1d)
    view = (lambda a: a.T) if conv1d else (lambda a: a)  # the paper's W is (out, in)
    b, ds = view(base), [view(d) for d in deltas]
    if method == "pact_iso_c" and min(b.shape) > K:  # narrow matrices are bypassed
        ds = np_pact(b, ds, K, k)
    return view(np_iso_c(sum(ds)))


# -- running the output ----------------------------------------------------------------------


def run_output(arch: Arch, model) -> torch.Tensor:
    """A forward pass (``generate`` for decoders); returns the output that is checked."""
    ids = torch.tensor([[5, 17, 42, 7, 3]])
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if arch.kind == "encoder":
            out = model(input_ids=ids).last_hidden_state
            assert out.shape == (1, 5, HIDDEN)
        elif arch.kind == "decoder":
            out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert out.shape == (1, 9) and torch.equal(out[:, :5], ids)
            out = out.float()
        elif arch.kind == "seq2seq":
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
            assert out.shape[0] == 1 and 2 <= out.shape[1] <= 5
            out = out.float()
        elif arch.kind == "vision":
            out = model(pixel_values=pixels).last_hidden_state
            assert out.shape == (1, 17, HIDDEN)
        else:
            out = model(input_ids=ids, pixel_values=pixels).logits_per_image
            assert out.shape == (1, 1)
    return out


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_matrix(arch: Arch, method: str, families, tmp_path):
    base, models = families(arch)
    out = tmp_path / "merged"
    cfg = {"base_model": str(base), "models": [str(m) for m in models], "dtype": "float64", **METHODS[method]}
    pactmerge.merge(cfg, out)

    # Loads with its Auto class, with every weight it expects, and runs.
    auto = getattr(transformers, arch.auto)
    model, info = auto.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert set(info["unexpected_keys"]) <= ({"embeddings.position_ids"} if arch.position_ids_in_base else set())
    assert torch.isfinite(run_output(arch, model.eval())).all()

    # Every merged tensor equals the independent formula; the loaded model holds it as stored.
    merged = load_np(out / "model.safetensors")
    theta0 = load_np(base / "model.safetensors")
    fts = [load_np(m / "model.safetensors") for m in models]
    assert set(merged) == set(theta0)
    for name, b in theta0.items():
        if not np.issubdtype(b.dtype, np.floating):
            np.testing.assert_array_equal(merged[name], b, err_msg=name)  # buffers: the base's
            continue
        b64 = b.astype(np.float64)
        want = b64 + expected_delta(method, name, b64, [f[name].astype(np.float64) - b64 for f in fts], arch)
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=2e-6, err_msg=f"{arch.name} {method} {name}")
    state = model.state_dict()
    for name in [n for n in merged if n in state and any(f".{m}.weight" in n for m in arch.conv1d)][:2]:
        assert torch.equal(state[name], torch.from_numpy(merged[name])), name


# -- orientation ------------------------------------------------------------------------------


def test_gpt2_conv1d_is_filtered_on_its_input_side(families, tmp_path):
    """PACT-Iso-C on GPT-2's (in, out) c_attn equals PACT on W^T, not on the stored matrix."""
    arch = next(a for a in ARCHS if a.name == "gpt2")
    base, models = families(arch)
    cfg = {"base_model": str(base), "models": [str(m) for m in models], "dtype": "float64", **METHODS["pact_iso_c"]}
    state = pactmerge.merge(cfg)
    name = "transformer.h.0.attn.c_attn.weight"
    b = load_np(base / "model.safetensors")[name].astype(np.float64)
    ds = [load_np(m / "model.safetensors")[name].astype(np.float64) - b for m in models]
    assert b.shape == (HIDDEN, 3 * HIDDEN)  # stored (in, out)
    right = b + np_iso_c(sum(np_pact(b.T, [d.T for d in ds], K, k))).T
    wrong = b + np_iso_c(sum(np_pact(b, ds, K, k)))
    got = state[name].numpy()
    np.testing.assert_allclose(got, right, rtol=1e-5, atol=2e-6)
    assert np.abs(got - wrong).max() > 100 * np.abs(got - right).max()


def test_dry_run_reports_orientation_buffers_and_narrow_matrices(families):
    arch = ARCHS[0]  # bert + position_ids
    base, models = families(arch)
    text = dry_run({"base_model": str(base), "models": [str(m) for m in models], "pact": {"K": K, "k": k}})
    assert "'embeddings.position_ids' is missing from" in text and "copied from the base" in text
    assert re.search(
        r"pact bypasses 'embeddings.token_type_embeddings.weight' \[2, 32\]: min\(m, n\)=2 <= pact.K=4", text
    )
    row = next(line for line in text.splitlines() if "token_type_embeddings.weight" in line and "filters=" in line)
    assert "filters=-" in row
    gpt2 = next(a for a in ARCHS if a.name == "gpt2")
    base, models = families(gpt2)
    text = dry_run({"base_model": str(base), "models": [str(m) for m in models], "method": "iso_c"})
    rows = [line for line in text.splitlines() if "(in,out)" in line]
    assert len(rows) == 4 * LAYERS and all(re.search(r"\.(c_attn|c_proj|c_fc)\.weight", r) for r in rows)
    assert "stored (in, out)" in text


def test_a_missing_parameter_that_is_no_buffer_is_still_an_error_and_exclude_waives_it(families, tmp_path):
    arch = next(a for a in ARCHS if a.name == "bert")
    base, models = families(arch)
    broken = tmp_path / "ft"
    broken.mkdir()
    state = load_file(models[0] / "model.safetensors")
    del state["pooler.dense.weight"]
    save_file(state, broken / "model.safetensors")
    (broken / "config.json").write_text((models[0] / "config.json").read_text())
    cfg = {"base_model": str(base), "models": [str(broken), str(models[1])]}
    with pytest.raises(PactMergeError, match=r"ft.*missing parameter 'pooler.dense.weight'.*exclude"):
        pactmerge.merge(cfg)
    merged = pactmerge.merge({**cfg, "exclude": [r"^pooler\.dense\.weight$"]})
    assert torch.equal(merged["pooler.dense.weight"], load_file(base / "model.safetensors")["pooler.dense.weight"])


def test_in_out_detection_table():
    from pactmerge.io.architectures import in_out_weights, is_optional_buffer

    shapes = {
        "transformer.h.0.attn.c_attn.weight": (32, 96),
        "transformer.h.0.attn.c_proj.weight": (32, 32),
        "transformer.h.0.mlp.c_fc.weight": (32, 128),
        "transformer.h.0.mlp.c_proj.weight": (128, 32),
        "transformer.h.0.attn.c_attn.bias": (96,),
        "transformer.wte.weight": (101, 32),
    }
    conv = {n for n in shapes if n.endswith("c_attn.weight") or n.endswith("c_proj.weight") or "c_fc" in n}
    assert in_out_weights({"model_type": "gpt2"}, shapes) == conv
    assert in_out_weights({"architectures": ["GPT2LMHeadModel"]}, shapes) == conv
    assert in_out_weights(None, shapes) == conv  # no config.json: GPT-2's name and shape signature
    assert in_out_weights({"model_type": "gpt_bigcode"}, shapes) == set()  # nn.Linear with the same names
    bigcode = {"transformer.h.0.attn.c_attn.weight": (32 + 2 * 8, 32), "transformer.h.0.mlp.c_fc.weight": (128, 32)}
    assert in_out_weights(None, bigcode) == set()
    assert in_out_weights({"model_type": "llama"}, {"model.layers.0.mlp.c_fc.weight": (64, 32)}) == set()
    assert is_optional_buffer("bert.embeddings.position_ids", None)
    assert is_optional_buffer("model.layers.0.self_attn.rotary_emb.inv_freq", {"model_type": "llama"})
    assert is_optional_buffer("h.0.attn.bias", {"model_type": "gpt2"})
    assert not is_optional_buffer("h.0.attn.bias", {"model_type": "llama"})
    assert not is_optional_buffer("pooler.dense.weight", {"model_type": "bert"})


def test_transposition_is_the_engines_not_a_methods(tmp_path):
    """With in-memory GPT-2-like state dicts (no config.json) every method/filter sees (out, in):
    PACT's core is computed from the right singular vectors of W^T."""
    from pactmerge.config import load_config
    from pactmerge.engine import open_inputs, read_deltas

    gen = torch.Generator().manual_seed(0)
    base = {"h.0.attn.c_attn.weight": torch.randn(8, 24, generator=gen), "h.0.ln.weight": torch.ones(8)}
    fts = [{n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in base.items()} for _ in range(2)]
    inputs = open_inputs(load_config({"base_model": base, "models": fts}))
    try:
        info = next(p for p in inputs.plan.params if p.name == "h.0.attn.c_attn.weight")
        assert info.transposed and info.shape == (8, 24)
        b, ds = read_deltas(inputs, info, torch.device("cpu"))
        assert b.shape == (24, 8) and torch.equal(b, base["h.0.attn.c_attn.weight"].T)
        assert torch.allclose(ds[0], (fts[0]["h.0.attn.c_attn.weight"] - base["h.0.attn.c_attn.weight"]).T)
    finally:
        inputs.close()
