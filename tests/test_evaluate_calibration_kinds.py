"""Calibration data from the `evaluation:` block for the other kinds: zero-shot-text (Fisher through the
frozen prompt head), causal-lm (prompt + right choice / answer, loss on the target tokens), clip-zero-shot
(the vision tower's inputs), python (refused). Each CLI merge equals the Python merge given the same data
built by hand, with an independent forward / loss."""

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import pactmerge  # noqa: E402
from pactmerge.cli import app  # noqa: E402
from pactmerge.io import open_source  # noqa: E402
from pactmerge.stats import ModelData  # noqa: E402
from tiny_models import embedding_setup, read_csv, write_jsonl  # noqa: E402

runner = CliRunner()


def _read(folder):
    with open_source(str(folder)) as src:
        return {n: src.get(n) for n in src.names()}


def _write(path, cfg):
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _merge_cli(config, out):
    res = runner.invoke(app, ["merge", str(config), str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    return _read(out)


def _assert_same(written, expected, names=None):
    for n in names or expected:
        assert torch.equal(written[n], expected[n]), (n, (written[n].double() - expected[n].double()).abs().max())


def _order(n, seed, samples):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()[:samples]


# -- zero-shot-text: the Fisher of the prompt-head cross-entropy ------------------------------------------

TEXT_TASKS = {"colors": ["red", "blue", "green"], "animals": ["cat", "dog"]}


def _pooled(model, ids, mask):
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def test_zero_shot_text_fisher_uses_the_frozen_prompt_heads(tmp_path):
    base, finetuned, data = embedding_setup(tmp_path, TEXT_TASKS)
    calib = {"samples": 20, "dtype": "float64"}
    cfg = {
        "base_model": str(base),
        "models": [{"model": str(finetuned[t]), "task": t} for t in TEXT_TASKS],
        "method": "fisher",
        "alpha": 1.0,
        "evaluation": {
            "kind": "zero-shot-text",
            "tasks": {
                "colors": {"data": str(data["colors"]), "text": "text", "label": "label", "template": "the {} one"},
                "animals": {"data": str(data["animals"]), "text": "text", "label": "label"},
            },
        },
        "calibration": {**calib, "cache_dir": str(tmp_path / "cache_cli")},
    }
    written = _merge_cli(_write(tmp_path / "merge.yaml", cfg), tmp_path / "out")

    # By hand: the heads are the base's normalized prompt embeddings; logits = 20 * cosine.
    tok = transformers.AutoTokenizer.from_pretrained(str(base))
    base_model = transformers.AutoModel.from_pretrained(str(base)).eval()
    hand = []
    for task, labels in TEXT_TASKS.items():
        names = sorted(labels)
        prompts = [f"the {c} one" if task == "colors" else c for c in names]
        with torch.no_grad():
            enc = tok(prompts, padding=True, return_tensors="pt")
            head = _pooled(base_model, enc["input_ids"], enc["attention_mask"])
        train = [r for r in read_csv(data[task]) if r["split"] == "train"]
        examples = [
            {
                "input_ids": torch.tensor(tok(train[i]["text"])["input_ids"]),
                "labels": torch.tensor(names.index(train[i]["label"])),
            }
            for i in _order(len(train), 0, 20)
        ]

        def loss(model, batch, head=head):
            emb = _pooled(model, batch["input_ids"], batch["attention_mask"])
            return F.cross_entropy(20.0 * emb @ head.T, batch["labels"])

        folder = str(finetuned[task])
        hand.append(ModelData(examples, lambda f=folder: transformers.AutoModel.from_pretrained(f), loss=loss))
    expected = pactmerge.merge(
        {
            "base_model": str(base),
            "models": [str(finetuned[t]) for t in TEXT_TASKS],
            "method": "fisher",
            "calibration": {**calib, "cache_dir": str(tmp_path / "cache_py")},
        },
        calibration_data=hand,
    )
    _assert_same(written, expected)
    plain = pactmerge.merge(
        base_model=str(base), models=[str(finetuned[t]) for t in TEXT_TASKS], method="weight_average"
    )
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(written[name], plain[name])  # the Fisher weighting did act


def test_python_kind_and_a_model_without_task_are_refused(tmp_path):
    base, finetuned, data = embedding_setup(tmp_path, {"x": ["a", "b"]})
    (tmp_path / "scorer.py").write_text("def score(model, task, split):\n    return 0.5\n")
    cfg = {
        "base_model": str(base),
        "models": [{"model": str(finetuned["x"]), "task": "x"}],
        "method": "regmean",
        "evaluation": {"kind": "python", "function": f"{tmp_path / 'scorer.py'}:score", "tasks": {"x": {}}},
    }
    res = runner.invoke(app, ["merge", str(_write(tmp_path / "m.yaml", cfg)), str(tmp_path / "out"), "--no-progress"])
    msg = res.output.strip()
    assert res.exit_code != 0 and len(msg.splitlines()) == 1, msg
    assert "regmean need(s) calibration statistics" in msg and "kind python has no task data" in msg
    assert "calibration_data=" in msg and not (tmp_path / "out").exists()
    cfg["models"] = [str(finetuned["x"])]  # no task: which task's rows to use is unknown
    cfg["evaluation"] = {
        "kind": "zero-shot-text",
        "tasks": {"x": {"data": str(data["x"]), "text": "text", "label": "label"}},
    }
    res = runner.invoke(app, ["merge", str(_write(tmp_path / "m.yaml", cfg)), str(tmp_path / "out"), "--no-progress"])
    msg = res.output.strip()
    assert res.exit_code != 0 and len(msg.splitlines()) == 1, msg
    assert "models.0: regmean draw(s) calibration examples" in msg and "set `task:`" in msg


# -- causal-lm ---------------------------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(24)]


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    import tokenizers
    from tokenizers import models, pre_tokenizers, processors

    root = tmp_path_factory.mktemp("lm_calib")
    vocab = ["<pad>", "<s>", "</s>", "<unk>", *WORDS]
    tk = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    base_model = transformers.LlamaForCausalLM(cfg)
    base = root / "base"
    base_model.save_pretrained(base)
    tok.save_pretrained(base)
    finetuned = {}
    for i, task in enumerate(("mc", "qa")):
        ft = transformers.LlamaForCausalLM(cfg)
        ft.load_state_dict(base_model.state_dict())
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        finetuned[task] = root / task
        ft.save_pretrained(finetuned[task])
    rng = torch.Generator().manual_seed(5)

    def words(n):
        return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=rng))

    mc = [
        {"prompt": words(3 + i % 4), "choices": [words(1), words(2), words(1 + i % 3)], "answer": i % 3, "split": s}
        for s in ("train", "validation", "test")
        for i in range(6)
    ]
    qa = [
        {"prompt": words(4), "answer": words(2), "split": s} for s in ("train", "validation", "test") for _ in range(5)
    ]
    data = {"mc": write_jsonl(root / "mc.jsonl", mc), "qa": write_jsonl(root / "qa.jsonl", qa)}
    return root, base, finetuned, data, mc, qa, tok


def test_causal_lm_examples_are_prompt_plus_target_with_the_loss_on_the_target(lm_setup, tmp_path):
    root, base, finetuned, data, mc, qa, tok = lm_setup
    calib = {"samples": 4, "dtype": "float64"}
    cfg = {
        "base_model": str(base),
        "models": [{"model": str(finetuned[t]), "task": t} for t in ("mc", "qa")],
        "method": "fisher",
        "alpha": 1.0,
        "seed": 1,
        "evaluation": {
            "kind": "causal-lm",
            "tasks": {t: {"data": str(data[t])} for t in ("mc", "qa")},
            "max_new_tokens": 2,
        },
        "calibration": {**calib, "cache_dir": str(tmp_path / "cache_cli")},
    }
    written = _merge_cli(_write(tmp_path / "merge.yaml", cfg), tmp_path / "out")

    def ids(text, special=True):
        return tok(text, add_special_tokens=special)["input_ids"]

    hand = []
    for task, rows in (("mc", mc), ("qa", qa)):
        train = [r for r in rows if r["split"] == "train"]
        examples = []
        for i in _order(len(train), 1, 4):
            r = train[i]
            target = ids(r["choices"][r["answer"]] if task == "mc" else r["answer"], special=False)
            prompt = ids(r["prompt"])
            examples.append(
                {"input_ids": torch.tensor(prompt + target), "labels": torch.tensor([-100] * len(prompt) + target)}
            )

        def loss(model, batch):  # mean NLL of the target tokens given everything before them
            logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[0, :-1], -1)
            target = batch["labels"][0, 1:]
            keep = target != -100
            return -logp[keep].gather(-1, target[keep][:, None]).mean()

        folder = str(finetuned[task])
        hand.append(
            ModelData(examples, lambda f=folder: transformers.AutoModelForCausalLM.from_pretrained(f), loss=loss)
        )
    expected = pactmerge.merge(
        {
            "base_model": str(base),
            "models": [str(finetuned[t]) for t in ("mc", "qa")],
            "method": "fisher",
            "seed": 1,
            "calibration": {**calib, "cache_dir": str(tmp_path / "cache_py")},
        },
        calibration_data=hand,
    )
    assert set(written) == set(expected)
    for n, t in expected.items():  # an independent loss: equal up to float32 rounding of the gradients
        torch.testing.assert_close(written[n], t, rtol=1e-5, atol=1e-6)
    evaluation = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert evaluation["sizes"]["mc"]["train"] == 6  # the train rows are read, not scored
    assert set(evaluation["test"]) == {"mc", "qa"}


# -- clip-zero-shot ----------------------------------------------------------------------------------------

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_clip_calibration_reads_the_training_images_through_the_vision_tower(tmp_path, method):
    from PIL import Image

    from tiny_models import bert_tokenizer

    words = ["a", "photo", "of", "the", *COLORS]
    tok = bert_tokenizer(words)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg = transformers.CLIPConfig(
        text_config={**small, "vocab_size": 5 + len(words), "max_position_embeddings": 16, "eos_token_id": 3},
        vision_config={**small, "image_size": 16, "patch_size": 8},
        projection_dim=8,
    )
    torch.manual_seed(0)
    base_model = transformers.CLIPModel(cfg)
    base_model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    images = {}
    for t in ("t1", "t2"):
        ft = transformers.CLIPModel(cfg)
        ft.load_state_dict(base_model.state_dict())
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        ft.save_pretrained(tmp_path / t)
        for split, n in (("train", 3), ("validation", 2), ("test", 2)):
            for name, rgb in COLORS.items():
                (tmp_path / "img" / t / split / name).mkdir(parents=True)
                for i in range(n):
                    x = (torch.rand(16, 16, 3, generator=g) * 60).to(torch.uint8)
                    x[4:12, 4:12] = torch.tensor(rgb, dtype=torch.uint8)
                    Image.fromarray(x.numpy()).save(tmp_path / "img" / t / split / name / f"{i}.png")
        images[t] = {s: str(tmp_path / "img" / t / s) for s in ("train", "validation", "test")}
    calib = {"samples": 6, "batch_size": 4, "dtype": "float64"}
    config = {
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / t), "task": t} for t in ("t1", "t2")],
        "method": method,
        "alpha": 1.0,
        "evaluation": {"kind": "clip-zero-shot", "tasks": {t: {"data": images[t]} for t in ("t1", "t2")}},
        "calibration": {**calib, "cache_dir": str(tmp_path / "cache_cli")},
    }
    written = _merge_cli(_write(tmp_path / "merge.yaml", config), tmp_path / "out")

    # By hand: ImageFolder order (class folders sorted, files sorted), 16 x 16 images need no resize or crop.
    # The zero-shot head: per class the base text tower's normalized embedding of "a photo of a {}.".
    classes = sorted(COLORS)
    with torch.no_grad():
        enc = tok([f"a photo of a {c}." for c in classes], padding=True, return_tensors="pt")
        text = base_model.text_projection(base_model.text_model(**enc).pooler_output)
        head = F.normalize(text, dim=-1)

    def image_features(model, batch):
        return model.visual_projection(model.vision_model(pixel_values=batch["pixel_values"]).pooler_output)

    def loss(model, batch):  # CLIP's zero-shot logits with the true label
        feats = F.normalize(image_features(model, batch), dim=-1)
        return F.cross_entropy(model.logit_scale.exp().detach() * feats @ head.T, batch["labels"])

    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    hand = []
    for t in ("t1", "t2"):
        paths = [(p, c) for c in classes for p in sorted((tmp_path / "img" / t / "train" / c).iterdir())]
        examples = []
        for i in _order(len(paths), 0, 6):
            pixels = torch.tensor(np.asarray(Image.open(paths[i][0]).convert("RGB")), dtype=torch.float32)
            x = (pixels.permute(2, 0, 1) / 255.0 - mean) / std
            examples.append({"pixel_values": x, "labels": torch.tensor(classes.index(paths[i][1]))})
        folder = str(tmp_path / t)
        hand.append(
            ModelData(
                examples, lambda f=folder: transformers.CLIPModel.from_pretrained(f), forward=image_features, loss=loss
            )
        )
    expected = pactmerge.merge(
        {
            "base_model": str(tmp_path / "base"),
            "models": [str(tmp_path / t) for t in ("t1", "t2")],
            "method": method,
            "exclude": [r"^(text_model|text_projection|logit_scale)"],  # the kind keeps the text side
            "calibration": {**calib, "cache_dir": str(tmp_path / "cache_py")},
        },
        calibration_data=hand,
    )
    assert set(written) == set(expected)
    for n, t in expected.items():  # an independent head and loss: equal up to float32 rounding
        torch.testing.assert_close(written[n], t, rtol=1e-4, atol=1e-6)
    name = "vision_model.encoder.layers.0.mlp.fc1.weight"
    mean_merge = pactmerge.merge(
        base_model=str(tmp_path / "base"), models=[str(tmp_path / t) for t in ("t1", "t2")], method="weight_average"
    )
    assert not torch.allclose(written[name], mean_merge[name], rtol=1e-4, atol=1e-5)  # the statistics did act
