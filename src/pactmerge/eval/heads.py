"""Sentence embeddings and frozen CLIP-style zero-shot heads.

A text's embedding is the attention-masked mean of the encoder's last hidden states, normalized
(all-MiniLM-L6-v2's own pooling). A task's head is the normalized embedding of each label's prompt
under the *base* encoder; logits = LOGIT_SCALE * cosine(embedding, head). The heads stay frozen for
fine-tuning and merging alike, so every model of a task is read out the same way and only the
encoder is compared.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

LOGIT_SCALE = 20.0
MAX_TOKENS = 32


@dataclass
class Tokenized:
    """A split tokenized once (no padding): eval batches are padded on the fly, sorted by length."""

    ids: list[list[int]]
    labels: Tensor  # (N,) class ids

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: list[int], pad_id: int = 0) -> tuple[Tensor, Tensor]:
        rows = [self.ids[i] for i in index]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        return ids, mask


def tokenize(tokenizer, texts: list[str], labels: list[int] | None = None, max_tokens: int = MAX_TOKENS) -> Tokenized:
    enc = tokenizer(texts, truncation=True, max_length=max_tokens, padding=False)
    ys = torch.tensor(labels if labels is not None else [-1] * len(texts), dtype=torch.long)
    return Tokenized([list(x) for x in enc["input_ids"]], ys)


def embed(model, ids: Tensor, mask: Tensor) -> Tensor:
    """Mean-pooled, L2-normalized sentence embeddings (gradients flow if enabled)."""
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1)


def logits(emb: Tensor, head: Tensor) -> Tensor:
    return LOGIT_SCALE * emb @ head.T


@torch.no_grad()  # not inference_mode: heads built here are used under autograd
def embed_all(model, tok: Tokenized, batch_size: int = 256, pad_id: int = 0, progress: bool = False) -> Tensor:
    """(N, hidden) float32 CPU embeddings of every item, in the original order (batched by length to
    cut padding; the forward passes run on the model's device)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(tok)), key=lambda i: len(tok.ids[i]))
    out = torch.empty((len(tok), model.config.hidden_size))
    steps = range(0, len(order), batch_size)
    for start in tqdm(steps, desc="encoding", unit="batch", disable=not progress, leave=False, file=sys.stderr):
        index = order[start : start + batch_size]
        ids, mask = tok.batch(index, pad_id)
        out[index] = embed(model, ids.to(device), mask.to(device)).float().cpu()
    model.train(was_training)
    return out


def build_head(model, tokenizer, prompts: list[str]) -> Tensor:
    """(num_classes, hidden) normalized prompt embeddings: the frozen zero-shot head."""
    return embed_all(model, tokenize(tokenizer, prompts), pad_id=tokenizer.pad_token_id or 0)
