"""Accuracy of one encoder on every task, and cheap swaps of its weights.

One :class:`Evaluator` holds a single encoder and every task's splits tokenized once. The items of
all tasks in a split are encoded together, sorted by length (little padding), without gradients.
Changing models means copying tensors into the same module: ``set_weights`` for a whole state dict,
``set_merged`` for ``theta_0 + alpha * merged`` -- so an alpha grid costs forward passes only.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from pactmerge.eval.heads import MAX_TOKENS, Tokenized, embed_all, logits, tokenize
from pactmerge.eval.tasks import Task


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def normalized(acc: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """Per-task accuracy divided by the reference (the task's own fine-tuned model) accuracy."""
    return {t: acc[t] / reference[t] if reference[t] > 0 else float("nan") for t in acc}


class Evaluator:
    def __init__(
        self,
        model,
        tokenizer,
        tasks: Mapping[str, Task],
        heads: Mapping[str, Tensor],
        splits: tuple[str, ...] = ("validation", "test"),
        batch_size: int = 128,
        max_tokens: int = MAX_TOKENS,
    ):
        self.model = model.eval()
        self.tasks = dict(tasks)
        self.heads = dict(heads)
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id or 0
        self.data: dict[str, tuple[Tokenized, dict[str, slice]]] = {}
        for split in splits:
            ids, labels, spans, start = [], [], {}, 0
            for name, task in self.tasks.items():
                texts, ys = task.splits[split]
                tok = tokenize(tokenizer, texts, ys, max_tokens)
                ids += tok.ids
                labels.append(tok.labels)
                spans[name] = slice(start, start + len(tok))
                start += len(tok)
            self.data[split] = (Tokenized(ids, torch.cat(labels)), spans)
        # The base weights, kept so that every model is loaded relative to them.
        self.state = self.model.state_dict()
        self.base = {k: v.detach().clone() for k, v in self.state.items()}

    # -- weights ----------------------------------------------------------------------------------

    @torch.no_grad()
    def set_weights(self, weights: Mapping[str, Tensor]) -> None:
        """Load a (possibly partial) state dict; names not given revert to the base."""
        for name, t in self.state.items():
            t.copy_(weights[name] if name in weights else self.base[name])

    @torch.no_grad()
    def set_merged(self, merged: Mapping[str, Tensor], alpha: float) -> None:
        """theta = theta_0 + alpha * merged for the merged parameters, theta_0 elsewhere."""
        for name, t in self.state.items():
            t.copy_(self.base[name])
            if name in merged:
                t.add_(merged[name].to(t.dtype), alpha=alpha)

    # -- accuracy ---------------------------------------------------------------------------------

    def accuracy(self, split: str, tasks: list[str] | None = None) -> dict[str, float]:
        """Accuracy of the current weights on ``split`` of each task (all tasks by default)."""
        tok, spans = self.data[split]
        names = tasks or list(self.tasks)
        if tasks is not None:  # only encode what is asked for
            index = [i for n in names for i in range(spans[n].start, spans[n].stop)]
            sub = Tokenized([tok.ids[i] for i in index], tok.labels[index])
            offsets, start = {}, 0
            for n in names:
                size = spans[n].stop - spans[n].start
                offsets[n] = slice(start, start + size)
                start += size
            tok, spans = sub, offsets
        emb = embed_all(self.model, tok, self.batch_size, self.pad_id)
        out = {}
        for n in names:
            s = spans[n]
            pred = logits(emb[s], self.heads[n]).argmax(-1)
            out[n] = float((pred == tok.labels[s]).float().mean())
        return out


def evaluate_merge(evaluator, merged: Mapping[str, Tensor], fixed_alpha: float | None = None, **search):
    """Choose alpha on the validation split (average accuracy over tasks), then report both splits
    at that alpha. The test split is never looked at before alpha is fixed.

    Returns ``(choice, validation accuracies, test accuracies)``.
    """
    from pactmerge.eval.alpha import AlphaChoice, search_alpha

    def val_score(alpha: float) -> float:
        evaluator.set_merged(merged, alpha)
        return mean(evaluator.accuracy("validation").values())

    if fixed_alpha is not None:
        choice = AlphaChoice(fixed_alpha, val_score(fixed_alpha))
    else:
        choice = search_alpha(val_score, **search)
    evaluator.set_merged(merged, choice.alpha)
    return choice, evaluator.accuracy("validation"), evaluator.accuracy("test")
