"""An output a person can publish: the Hugging Face model card, the base folder's subfolders
(sentence-transformers modules), the dtype in config.json, the umask, --version."""

import json
import os
import stat

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import pactmerge
from pactmerge.cli import app
from pactmerge.io.card import library_name, read_front_matter, set_evaluation
from pactmerge.io.hf_files import set_config_dtype
from pactmerge.io.writer import copy_non_weight_files
from pactmerge.synthetic import make_checkpoints

runner = CliRunner()


@pytest.fixture
def ckpts(tmp_path):
    base, models = make_checkpoints(tmp_path / "in", n_models=3, layers=1, hidden=8)
    return tmp_path, base, models


def write_yaml(tmp_path, text):
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    return path


def front(card: str) -> dict:
    meta = read_front_matter(card)
    assert meta, card[:200]
    return meta


def test_version_flag():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == pactmerge.__version__


def test_card_front_matter_and_body(ckpts):
    tmp_path, base, models = ckpts
    (base / "README.md").write_text("---\nlicense: apache-2.0\ntags: [bert]\n---\n# The base\n")
    text = (
        "# my merge -- comments and key order are kept in the card\n"
        f"base_model: {base}\n"
        "models:\n"
        f"  - model: {models[0]}\n"
        f"  - model: {models[1]}\n"
        "    parameters: {density: 0.5, weight: 0.5}\n"
        f"  - model: {models[2]}\n"
        "method: ties\n"
        "filters: [pact, dare]\n"
        "pact: {K: 2, k: 1}\n"
    )
    out = pactmerge.merge(write_yaml(tmp_path, text), tmp_path / "merged")
    card = (out / "README.md").read_text()
    meta = front(card)
    assert meta["base_model"] == [str(base), *map(str, models)]
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["merge", "pactmerge", "ties", "pact", "dare"]
    assert meta["license"] == "apache-2.0"
    assert "# merged" in card
    assert "[arXiv:2306.01708](https://arxiv.org/abs/2306.01708)" in card  # TIES
    assert "[arXiv:2606.18627](https://arxiv.org/abs/2606.18627)" in card  # PACT
    assert "[arXiv:2311.03099](https://arxiv.org/abs/2311.03099)" in card  # DARE
    assert text in card  # the user's YAML, verbatim
    assert f"| model 1 | `{models[1]}` | 0.5 | `density: 0.5` |" in card
    assert "## Evaluation" not in card
    assert "README.md" not in (out / "README.md").read_text().split("copied from the base folder:")[1].split("\n")[0]


def test_card_license_from_config_and_none(ckpts):
    tmp_path, base, models = ckpts
    cfg = {"base_model": str(base), "models": [str(m) for m in models]}
    out = pactmerge.merge(cfg, tmp_path / "a")
    meta = front((out / "README.md").read_text())
    assert "license" not in meta
    conf = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**conf, "license": "mit"}))
    out = pactmerge.merge(cfg, tmp_path / "b")
    assert front((out / "README.md").read_text())["license"] == "mit"


def test_card_of_an_in_memory_config_shows_the_normalised_yaml(ckpts):
    tmp_path, base, models = ckpts
    out = pactmerge.merge(
        base_model=str(base), models=[str(m) for m in models], method="iso_c", output_dir=tmp_path / "m"
    )
    card = (out / "README.md").read_text()
    quoted = card.split("```yaml\n")[1].split("\n```")[0]
    assert yaml.safe_load(quoted)["method"] == "iso_c"
    assert "pactmerge's normalised form" in card


def test_evaluation_hook(ckpts):
    tmp_path, base, models = ckpts
    out = pactmerge.merge({"base_model": str(base), "models": [str(m) for m in models]}, tmp_path / "m")
    card_path = out / "README.md"
    set_evaluation(card_path, {"accuracy": 0.8123, "tasks": 3})
    card = card_path.read_text()
    assert "## Evaluation\n\n| metric | value |\n|---|---|\n| accuracy | 0.8123 |\n| tasks | 3 |\n" in card
    assert card.index("## Evaluation") < card.index("## Configuration")
    set_evaluation(card_path, "Measured on **text6**: 71.2%.")
    card = card_path.read_text()
    assert card.count("## Evaluation") == 1 and "Measured on **text6**: 71.2%." in card and "0.8123" not in card


def test_code_fence_survives_backticks_in_the_yaml(ckpts):
    tmp_path, base, models = ckpts
    text = f"# a ``` fence in a comment\nbase_model: {base}\nmodels: [{models[0]}, {models[1]}]\n"
    out = pactmerge.merge(write_yaml(tmp_path, text), tmp_path / "m")
    card = (out / "README.md").read_text()
    assert f"````yaml\n{text.rstrip()}\n````" in card


def test_library_name():
    assert library_name(None, "adapter") == "peft"
    assert library_name(None) is None


# -- the output folder ------------------------------------------------------------------------


def test_subfolders_copied_weights_and_hidden_files_never(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for rel, data in {
        "config.json": "{}",
        "README.md": "the base's card",
        "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}',
        "2_Dense/config.json": "{}",
        "2_Dense/model.safetensors": "weights",
        "onnx/model.onnx": "weights",
        ".git/HEAD": "ref",
        "model.safetensors": "weights",
        "nested/deeper/notes.txt": "x",
    }.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(data)
    (src / "3_Normalize").mkdir()
    dst.mkdir()
    copied = copy_non_weight_files(src, dst)
    assert copied == ["1_Pooling/config.json", "2_Dense/config.json", "config.json", "nested/deeper/notes.txt"]
    assert (dst / "3_Normalize").is_dir()  # an empty module folder
    for absent in ("2_Dense/model.safetensors", "onnx/model.onnx", ".git", "model.safetensors", "README.md"):
        assert not (dst / absent).exists(), absent


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_output_honours_the_umask(ckpts, mask):
    tmp_path, base, models = ckpts
    old = os.umask(mask)
    try:
        out = pactmerge.merge({"base_model": str(base), "models": [str(m) for m in models]}, tmp_path / f"m{mask}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_config_dtype_follows_the_output(ckpts):
    tmp_path, base, models = ckpts
    conf = {"model_type": "bert", "torch_dtype": "float32", "text_config": {"dtype": "float32", "x": 1}, "z": [1, 2]}
    (base / "config.json").write_text(json.dumps(conf))
    cfg = {"base_model": str(base), "models": [str(m) for m in models], "out_dtype": "bfloat16"}
    out = pactmerge.merge(cfg, tmp_path / "bf16")
    written = json.loads((out / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "bfloat16"
    assert written["text_config"] == {"dtype": "bfloat16", "x": 1} and written["z"] == [1, 2]
    assert list(written)[:2] == ["model_type", "torch_dtype"]  # key order kept
    assert all(
        t.dtype == torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values() if t.is_floating_point()
    )
    out = pactmerge.merge({**cfg, "out_dtype": "float32"}, tmp_path / "f32")
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()  # nothing to change


def test_set_config_dtype_rules(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert not set_config_dtype(tmp_path, torch.float32)  # absent means float32 to transformers
    assert set_config_dtype(tmp_path, torch.float16)
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1, "torch_dtype": "float16", "dtype": "float16"}
    assert not set_config_dtype(tmp_path / "nowhere", torch.float16)


def test_chat_template_needs_a_tokenizer_config_and_is_caught_by_dry_run(ckpts):
    tmp_path, base, models = ckpts
    (base / "tokenizer_config.json").unlink()
    path = write_yaml(
        tmp_path,
        yaml.safe_dump(
            {"base_model": str(base), "models": [str(m) for m in models], "chat_template": "{{ messages }}"}
        ),
    )
    res = runner.invoke(app, ["merge", str(path), str(tmp_path / "o"), "--dry-run", "--no-progress"])
    assert res.exit_code == 2 and "chat_template" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_sentence_transformers_round_trip(tmp_path):
    """A sentence-transformers model (tiny random BERT + Pooling + Normalize, saved by the
    library) and three perturbed fine-tunes: the merge loads with SentenceTransformer and AutoModel."""
    st = pytest.importorskip("sentence_transformers")
    st_models = pytest.importorskip("sentence_transformers.models")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]) + "\n")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16,
    )  # fmt: skip
    hf = tmp_path / "hf"
    transformers.BertModel(config).save_pretrained(hf)
    transformers.BertTokenizer(str(vocab)).save_pretrained(hf)
    base_st = st.SentenceTransformer(
        modules=[st_models.Transformer(str(hf)), st_models.Pooling(16, "mean"), st_models.Normalize()]
    )
    base_dir = tmp_path / "base"
    base_st.save(str(base_dir))
    base_sd = load_file(str(base_dir / "model.safetensors"))
    fts = []
    for t in range(3):
        folder = tmp_path / f"ft{t}"
        base_st.save(str(folder))
        g = torch.Generator().manual_seed(t)
        save_file(
            {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base_sd.items()},
            str(folder / "model.safetensors"),
        )
        fts.append(str(folder))
    out = pactmerge.merge({"base_model": str(base_dir), "models": fts, "method": "ties"}, tmp_path / "merged")
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "modules.json").is_file()
    assert front((out / "README.md").read_text())["library_name"] == "sentence-transformers"
    emb = st.SentenceTransformer(str(out)).encode(["hello world"], convert_to_tensor=True)
    assert emb.shape == (1, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(1))  # Normalize ran
    merged = load_file(str(out / "model.safetensors"))
    loaded = transformers.AutoModel.from_pretrained(str(out)).state_dict()
    for k, v in merged.items():
        assert torch.equal(loaded[k], v), k
