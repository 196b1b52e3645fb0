"""Fine-tunes with added tokens: tokenizer_source base | union | <model>, remapped rows, tokenizer out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file, save_file

import pactmerge
from pactmerge.api import dry_run
from pactmerge.errors import PactMergeError
from pactmerge.io.vocab import remap_rows

transformers = pytest.importorskip("transformers")

HIDDEN = 32
WORDS = [f"w{i}" for i in range(40)]


def _tokenizer(kind: str, folder: Path):
    t = transformers
    if kind == "bert":
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
        tok = t.BertTokenizer(str(folder / "vocab.txt"))
        (folder / "vocab.txt").unlink()
        return tok
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return t.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _model(kind: str, vocab: int):
    t = transformers
    common = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    if kind == "bert":
        return t.BertForMaskedLM(
            t.BertConfig(vocab_size=vocab, hidden_size=HIDDEN, max_position_embeddings=24, **common)
        )
    return t.LlamaForCausalLM(
        t.LlamaConfig(
            vocab_size=vocab,
            hidden_size=HIDDEN,
            num_key_value_heads=2,
            max_position_embeddings=24,
            tie_word_embeddings=kind == "llama-tied",
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            **common,
        )
    )


ADDED = [[], ["<new1>"], ["<new1>", "<new2>"]]  # tokens each fine-tune adds; <new2> is special


def _family(kind: str, root: Path) -> tuple[Path, list[Path]]:
    """A base and three fine-tunes: the same vocabulary, + <new1>, + <new1> <new2> (resized)."""
    torch.manual_seed(0)
    tok = _tokenizer(kind, root / "tok")
    model = _model(kind, len(tok)).eval()
    base = root / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = []
    for t, added in enumerate(ADDED):
        ft_tok = _tokenizer(kind, root / f"tok{t}")
        for word in added:
            special = word == "<new2>"
            ft_tok.add_tokens([transformers.AddedToken(word, special=special, normalized=not special)])
        ft = _model(kind, len(tok))
        ft.load_state_dict({n: p.clone() for n, p in original.items()}, strict=False)
        ft.resize_token_embeddings(len(ft_tok), mean_resizing=False)
        gen = torch.Generator().manual_seed(10 + t)
        with torch.no_grad():
            for p in ft.parameters():  # tied parameters appear once
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        folder = root / f"ft{t}"
        ft.save_pretrained(folder)
        ft_tok.save_pretrained(folder)
        out.append(folder)
    return base, out


KINDS = ["bert", "llama-tied", "llama-untied"]
VOCAB_PARAMS = {
    "bert": ["bert.embeddings.word_embeddings.weight", "cls.predictions.bias"],
    "llama-tied": ["model.embed_tokens.weight"],
    "llama-untied": ["model.embed_tokens.weight", "lm_head.weight"],
}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    cache: dict[str, tuple[Path, list[Path]]] = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = _family(kind, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


def _vocab(folder: Path) -> dict[str, int]:
    return transformers.AutoTokenizer.from_pretrained(folder).get_vocab()


def expected_rows(base: Path, models: list[Path], out_vocab: dict[str, int], name: str) -> np.ndarray:
    """Task arithmetic of one vocabulary parameter, row by row from each input's own tokenizer
    (written independently of pactmerge.io.vocab): a model's missing token takes the base's row; the
    base's missing token takes the mean of the models that have it."""
    vocabs = [_vocab(f) for f in [base, *models]]
    tensors = [load_np(f / "model.safetensors")[name].astype(np.float64) for f in [base, *models]]
    rows = max(out_vocab.values()) + 1
    result = np.zeros((rows, *tensors[0].shape[1:]))
    for token, j in out_vocab.items():
        have = [t[v[token]] for v, t in zip(vocabs[1:], tensors[1:]) if token in v]
        base_row = tensors[0][vocabs[0][token]] if token in vocabs[0] else np.mean(have, axis=0)
        model_rows = [t[v[token]] if token in v else base_row for v, t in zip(vocabs[1:], tensors[1:])]
        result[j] = base_row + sum(r - base_row for r in model_rows)
    return result


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", ["union", "base", "ft2"])
def test_added_tokens_merge_and_load(kind, source, families, tmp_path):
    base, models = families(kind)
    out = tmp_path / "merged"
    tokenizer_source = str(models[2]) if source == "ft2" else source
    cfg = {"base_model": str(base), "models": [str(m) for m in models], "tokenizer_source": tokenizer_source}
    plan = dry_run(cfg)
    assert f"tokenizer_source {source if source != 'ft2' else str(models[2])}" in plan
    pactmerge.merge(cfg, out)

    want_vocab = _vocab(base if source == "base" else models[2])  # ft2's vocabulary is the union
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == want_vocab
    if source == "ft2":
        assert (out / "tokenizer.json").read_bytes() == (models[2] / "tokenizer.json").read_bytes()
    if source != "base":  # added-token settings survive the union
        assert tok.added_tokens_decoder[want_vocab["<new2>"]].special
        assert not tok.added_tokens_decoder[want_vocab["<new1>"]].special
    rows = len(want_vocab)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == rows

    merged = load_np(out / "model.safetensors")
    for name in VOCAB_PARAMS[kind]:
        want = expected_rows(base, models, want_vocab, name)
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    if kind == "llama-tied":
        assert "lm_head.weight" not in merged

    auto = transformers.AutoModelForMaskedLM if kind == "bert" else transformers.AutoModelForCausalLM
    model, info = auto.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    ids = tok("w1 w2 <new1>" if source != "base" else "w1 w2", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        if kind == "bert":
            logits = model(input_ids=ids).logits
            assert logits.shape[-1] == rows and torch.isfinite(logits).all()
        else:
            gen = model.generate(ids, max_new_tokens=3, do_sample=False)
            assert gen.shape[1] == ids.shape[1] + 3 and int(gen.max()) < rows
    if kind in ("llama-tied", "bert"):  # tied embeddings stay tied
        head = model.get_output_embeddings().weight
        assert head.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_differing_vocabularies_need_tokenizer_source(families, tmp_path):
    base, models = families("llama-untied")
    cfg = {"base_model": str(base), "models": [str(m) for m in models]}
    with pytest.raises(PactMergeError) as e:
        dry_run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and str(models[1]) in msg and "tokenizer_source" in msg and "<new1>" in msg
    with pytest.raises(PactMergeError, match="tokenizer_source"):
        pactmerge.merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())

    with pytest.raises(PactMergeError, match=r"config key 'tokenizer_source': '.*nowhere' is none of base, union"):
        dry_run({**cfg, "tokenizer_source": str(tmp_path / "nowhere")})


def test_cli_refuses_differing_vocabularies_in_one_line(families, tmp_path):
    from typer.testing import CliRunner

    from pactmerge.cli import app

    base, models = families("bert")
    config = tmp_path / "merge.yaml"
    config.write_text(json.dumps({"base_model": str(base), "models": [str(m) for m in models]}))
    for extra in ([], ["--dry-run"]):
        res = CliRunner().invoke(app, ["merge", str(config), str(tmp_path / "out"), *extra])
        assert res.exit_code != 0 and not (tmp_path / "out").exists()
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "tokenizer_source" in lines[0], res.output


def test_same_tokens_at_other_ids_are_matched_by_token(families, tmp_path):
    """A fine-tune whose tokenizer swaps two ids (and its rows with them) merges as if it had not."""
    base, models = families("bert")
    swapped = tmp_path / "swapped"
    shutil.copytree(models[0], swapped)
    data = json.loads((swapped / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = vocab["w3"], vocab["w7"]
    vocab["w3"], vocab["w7"] = b, a
    (swapped / "tokenizer.json").write_text(json.dumps(data))
    state = load_file(swapped / "model.safetensors")
    for name in VOCAB_PARAMS["bert"]:
        state[name][[a, b]] = state[name][[b, a]].clone()
    save_file(state, swapped / "model.safetensors", metadata={"format": "pt"})

    common = {"base_model": str(base), "method": "ties", "parameters": {"scope": "tensor"}}
    plain = pactmerge.merge({**common, "models": [str(models[0]), str(base)]})
    with pytest.raises(PactMergeError, match=r"swapped.*token 'w\d' has id"):
        pactmerge.merge({**common, "models": [str(swapped), str(base)]})
    remapped = pactmerge.merge({**common, "models": [str(swapped), str(base)], "tokenizer_source": "base"})
    assert plain.keys() == remapped.keys()
    for name in plain:
        assert torch.equal(plain[name], remapped[name]), name


def test_a_model_without_tokenizer_files_and_other_rows_is_refused(families, tmp_path):
    base, models = families("llama-tied")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("model.safetensors", "config.json"):
        shutil.copy(models[1] / f, bare / f)
    cfg = {"base_model": str(base), "models": [str(models[0]), str(bare)], "tokenizer_source": "union"}
    with pytest.raises(PactMergeError, match=r"bare\S*: no tokenizer files.*add its tokenizer"):
        pactmerge.merge(cfg)
    differs = r"bare\S*: its vocabulary differs.*44 rows, the base 43.*tokenizer_source"
    with pytest.raises(PactMergeError, match=differs):
        pactmerge.merge({**cfg, "tokenizer_source": None})


def test_remap_rows_rules():
    """Own row; else the base's; the base's missing token: the mean of the models that have it; a
    token no input has: the mean of the base's rows (numpy, row by row)."""
    rng = np.random.default_rng(0)
    base, m1, m2 = rng.standard_normal((4, 3)), rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    # Output rows 0-3: the base's (m2 lacks row 2); row 4: m1 and m2 have it; row 5: only m2; row 6: nobody.
    index = [[0, 1, 2, 3, -1, -1, -1], [0, 1, 2, 3, 4, -1, -1], [0, 1, -1, 2, 3, 4, -1]]
    out = remap_rows([torch.from_numpy(x) for x in (base, m1, m2)], [torch.tensor(i) for i in index])
    want_base = np.vstack([base, (m1[4] + m2[3]) / 2, m2[4], base.mean(0)])
    np.testing.assert_allclose(out[0].numpy(), want_base)
    np.testing.assert_allclose(out[1].numpy(), np.vstack([m1, want_base[5:]]))
    np.testing.assert_allclose(out[2].numpy(), np.vstack([m2[:2], want_base[2], m2[2:], want_base[6]]))
    assert out[0].dtype == torch.float64 and out[1].shape == (7, 3)


def test_tokenizer_source_path_is_relative_to_the_config_file(families, tmp_path):
    base, models = families("llama-tied")
    for f in (base, *models):
        shutil.copytree(f, tmp_path / f.name)
    config = tmp_path / "merge.yaml"
    config.write_text("base_model: base\nmodels: [ft0, ft1, ft2]\ntokenizer_source: ft2\n")
    text = dry_run(config)
    assert f"tokenizer_source {tmp_path / 'ft2'}" in text and "rows (base 43)" in text


def test_adapters_and_adapter_output_with_a_changed_vocabulary_are_refused(families, tmp_path):
    base, models = families("llama-untied")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]})
    )
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    lora = {f"{prefix}.lora_A.weight": torch.randn(2, HIDDEN), f"{prefix}.lora_B.weight": torch.randn(HIDDEN, 2)}
    save_file(lora, adapter / "adapter_model.safetensors")
    cfg = {"base_model": str(base), "models": [str(models[1]), str(adapter)], "tokenizer_source": "union"}
    with pytest.raises(PactMergeError, match="LoRA adapter; merging adapters with a changed vocabulary"):
        dry_run(cfg)
    cfg = {
        "base_model": str(base),
        "models": [str(m) for m in models],
        "tokenizer_source": "union",
        "output": "adapter",
    }
    with pytest.raises(PactMergeError, match="tokenizer_source.*LoRA adapter cannot carry"):
        dry_run(cfg)
    # the same vocabulary everywhere: adapters merge as before, tokenizer_source: base is a no-op
    same = {"base_model": str(base), "models": [str(models[0]), str(adapter)], "tokenizer_source": "base"}
    assert "vocabulary:" not in dry_run(same)
