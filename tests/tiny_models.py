"""Tiny generated models, tokenizers and task data for the evaluation tests (nothing downloaded)."""

from __future__ import annotations

import csv
import json
import os
import random
import tempfile
from pathlib import Path

import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FILLER = ["the", "a", "of", "and", "to"]


def marker_words(label: str) -> list[str]:
    return [f"{label}{c}" for c in "abcdef"]


def vocabulary(labels: list[str]) -> list[str]:
    return FILLER + [w for lab in labels for w in marker_words(lab)] + list(labels)


def bert_tokenizer(words: list[str]):
    import transformers

    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    try:
        return transformers.BertTokenizer(vocab=vocab)  # transformers >= 5
    except TypeError:  # pragma: no cover - transformers 4 wants a file
        path = os.path.join(tempfile.mkdtemp(), "vocab.txt")
        Path(path).write_text("\n".join(vocab) + "\n")
        return transformers.BertTokenizerFast(vocab_file=path)


def bert_config(words: list[str], num_labels: int = 2):
    import transformers

    return transformers.BertConfig(
        vocab_size=len(SPECIALS) + len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        num_labels=num_labels,
    )


def text_rows(labels: list[str], per_split=(16, 8, 8), seed: int = 0, noise: float = 0.5) -> list[dict]:
    """Rows ``{text, label, split}``: each label owns marker words mixed with shared filler words."""
    rng = random.Random(seed)
    rows, used = [], set()
    for split, count in zip(("train", "validation", "test"), per_split):
        for lab in labels:
            made = 0
            while made < count:
                words = [
                    rng.choice(marker_words(lab)) if rng.random() < noise else rng.choice(FILLER) for _ in range(6)
                ]
                text = " ".join(words)
                if text in used:
                    continue
                used.add(text)
                rows.append({"text": text, "label": lab, "split": split})
                made += 1
    return rows


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: r[c] for c in columns})
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_classifier(model, tokenizer, texts: list[str], labels: list[int], steps: int = 20, lr: float = 3e-3, seed=0):
    """A few AdamW steps of a sequence classifier (every parameter trains)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(texts), (8,), generator=g).tolist()
        batch = tokenizer([texts[i] for i in idx], padding=True, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor([labels[i] for i in idx])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def seqcls_setup(root: Path, tasks: dict[str, list[str]], steps: int = 25) -> tuple[Path, dict[str, Path], dict]:
    """A tiny BERT base saved as BertForSequenceClassification (its own random 2-label head) and one
    fine-tune per task with that task's number of labels; the tasks' CSVs (split column)."""
    import transformers

    words = vocabulary([lab for labs in tasks.values() for lab in labs])
    tok = bert_tokenizer(words)
    torch.manual_seed(0)
    base = root / "base"
    transformers.BertForSequenceClassification(bert_config(words, 2)).save_pretrained(base)
    tok.save_pretrained(base)
    finetuned, data = {}, {}
    for i, (task, labels) in enumerate(tasks.items()):
        rows = text_rows(labels, seed=i)
        data[task] = write_csv(root / "data" / f"{task}.csv", rows)
        cfg = bert_config(words, len(labels))
        cfg.id2label = dict(enumerate(labels))
        cfg.label2id = {lab: j for j, lab in enumerate(labels)}
        model = transformers.BertForSequenceClassification.from_pretrained(
            base, config=cfg, ignore_mismatched_sizes=True
        )
        train = [r for r in rows if r["split"] == "train"]
        train_classifier(
            model, tok, [r["text"] for r in train], [labels.index(r["label"]) for r in train], steps, seed=i
        )
        finetuned[task] = root / "ft" / task
        model.save_pretrained(finetuned[task])
        tok.save_pretrained(finetuned[task])
    return base, finetuned, data


def embedding_setup(root: Path, tasks: dict[str, list[str]], seed: int = 0) -> tuple[Path, dict[str, Path], dict]:
    """A tiny BertModel base and per-task 'fine-tunes' (the base with seeded perturbations of the
    encoder), and the tasks' CSVs."""
    import transformers

    words = vocabulary([lab for labs in tasks.values() for lab in labs])
    tok = bert_tokenizer(words)
    torch.manual_seed(seed)
    base = root / "base"
    model = transformers.BertModel(bert_config(words))
    model.save_pretrained(base)
    tok.save_pretrained(base)
    finetuned, data = {}, {}
    for i, (task, labels) in enumerate(tasks.items()):
        data[task] = write_csv(root / "data" / f"{task}.csv", text_rows(labels, seed=i))
        g = torch.Generator().manual_seed(100 + i)
        ft = transformers.BertModel(bert_config(words))
        ft.load_state_dict(model.state_dict())
        with torch.no_grad():
            for n, p in ft.named_parameters():
                if n.startswith("encoder."):
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        finetuned[task] = root / "ft" / task
        ft.save_pretrained(finetuned[task])
        tok.save_pretrained(finetuned[task])
    return base, finetuned, data


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
