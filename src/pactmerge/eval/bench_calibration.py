"""Calibration data for the benchmark's data-aware rows (PAVE, RegMean, Fisher): each task's
*training* split, as :class:`pactmerge.stats.ModelData` for its fine-tuned encoder.

Examples are the task's training texts in a seeded random order (the pass takes the first N),
tokenized as the fine-tunes were trained (``max_tokens``, no padding; the pass pads per batch and
masks the padding). The model is the fine-tuned encoder read from its folder; the Fisher loss is
the fine-tunes' own training loss, the cross-entropy of the frozen head's logits, with the true
label (the empirical Fisher). The head's hash is the data's ``tag``, so a different head never
reuses a Fisher computed with another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pactmerge.eval.heads import MAX_TOKENS, embed, logits, tokenize
from pactmerge.eval.tasks import Task
from pactmerge.stats import ModelData


def train_examples(task: Task, tokenizer, seed: int = 0, max_tokens: int = MAX_TOKENS) -> list[dict[str, Tensor]]:
    """Every training item of ``task`` as ``{"input_ids": (L,), "labels": ()}``, in a seeded random order."""
    texts, labels = task.splits["train"]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    tok = tokenize(tokenizer, [texts[i] for i in order], [labels[i] for i in order], max_tokens)
    return [{"input_ids": torch.tensor(ids), "labels": tok.labels[j]} for j, ids in enumerate(tok.ids)]


def _head_loss(head: Tensor):
    head = head.detach()

    def loss(model, batch):
        emb = embed(model, batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits(emb, head), batch["labels"].reshape(-1))

    return loss


def _loader(path: Path):
    def load():
        from pactmerge.eval.finetune import load_model

        return load_model(path)

    return load


def text_calibration(
    tasks: Mapping[str, Task],
    models: Mapping[str, Path],
    tokenizer,
    heads: Mapping[str, Tensor],
    seed: int = 0,
) -> list[ModelData]:
    """One :class:`ModelData` per task, in ``tasks`` order: its fine-tune (``models[name]``) on its
    training split."""
    out = []
    for name, task in tasks.items():
        head = heads[name]
        tag = "head:" + hashlib.sha256(head.detach().float().cpu().numpy().tobytes()).hexdigest()
        out.append(
            ModelData(
                examples=train_examples(task, tokenizer, seed),
                load_model=_loader(Path(models[name])),
                loss=_head_loss(head),
                pad_id=tokenizer.pad_token_id or 0,
                tag=tag,
            )
        )
    return out
