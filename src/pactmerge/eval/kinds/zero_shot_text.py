"""Kind ``zero-shot-text``: an embedding model read out by frozen label-prompt heads.

A text's embedding is the attention-masked mean of the encoder's last hidden states, normalized
(:mod:`pactmerge.eval.heads`); a task's head is the normalized embedding of each class's prompt under
the *base* model, so every model of a task is read out the same way and only the encoder is
compared. The built-in text suites of ``pactmerge bench`` use this evaluator too.

One :class:`ZeroShotTextEvaluator` holds a single encoder and every task's splits tokenized once.
The items of all tasks in a split are encoded together, sorted by length (little padding), without
gradients; changing models means copying tensors into the same module, so an alpha grid costs
forward passes only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.eval.data import TaskRows, as_class_id, require_columns, require_splits, task_rows
from pactmerge.eval.heads import MAX_TOKENS, Tokenized, build_head, embed_all, logits, tokenize
from pactmerge.eval.kinds.common import (
    EvalSpec,
    ModelEvaluator,
    Prepared,
    WeightSwap,
    base_tokenizer,
    check_split,
    checkpoint_state,
    classification_score,
    load_hf,
)
from pactmerge.eval.tasks import Task


class ZeroShotTextEvaluator:
    """Scores of one encoder on every task, through each task's frozen prompt head.

    Args:
        model: an HF encoder (``AutoModel``); its weights are swapped in place.
        tokenizer: its tokenizer.
        tasks: ``name -> Task`` (texts and class ids per split).
        heads: ``name -> (num_classes, hidden)`` normalized prompt embeddings.
        splits: the splits to tokenize now (and score later).
        metric: ``accuracy`` or ``macro_f1``.
        state: the module's tensors under the checkpoints' names (default ``model.state_dict()``).
    """

    def __init__(
        self,
        model,
        tokenizer,
        tasks: Mapping[str, Task],
        heads: Mapping[str, Tensor],
        splits: Sequence[str] = ("validation", "test"),
        batch_size: int = 128,
        max_tokens: int = MAX_TOKENS,
        metric: str = "accuracy",
        progress: bool = False,
        state: Mapping[str, Tensor] | None = None,
    ):
        self.model = model.eval()
        self.tasks = list(tasks)
        self.heads = dict(heads)
        self.batch_size = batch_size
        self.metric = metric
        self.progress = progress
        self.pad_id = tokenizer.pad_token_id or 0
        self.data: dict[str, tuple[Tokenized, dict[str, slice]]] = {}
        for split in splits:
            ids: list[list[int]] = []
            labels, spans, start = [], {}, 0
            for name, task in tasks.items():
                texts, ys = task.splits[split]
                tok = tokenize(tokenizer, texts, ys, max_tokens)
                ids += tok.ids
                labels.append(tok.labels)
                spans[name] = slice(start, start + len(tok))
                start += len(tok)
            self.data[split] = (Tokenized(ids, torch.cat(labels)), spans)
        # The base weights, kept so that every model is loaded relative to them; ``state`` names the
        # module's tensors as the checkpoints do (default: the module's own names).
        self.weights = WeightSwap(self.model.state_dict() if state is None else state)

    def set_weights(self, weights: Mapping[str, Tensor]) -> None:
        self.weights.set_weights(weights)

    def set_merged(self, merged: Mapping[str, Tensor], alpha: float) -> None:
        self.weights.set_merged(merged, alpha)

    def scores(self, split: str, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """The metric of the current weights on ``split`` of each task (all tasks by default)."""
        tok, spans = self.data[split]
        names = list(tasks) if tasks else list(self.tasks)
        if tasks is not None:  # only encode what is asked for
            index = [i for n in names for i in range(spans[n].start, spans[n].stop)]
            sub = Tokenized([tok.ids[i] for i in index], tok.labels[index])
            offsets, start = {}, 0
            for n in names:
                size = spans[n].stop - spans[n].start
                offsets[n] = slice(start, start + size)
                start += size
            tok, spans = sub, offsets
        emb = embed_all(self.model, tok, self.batch_size, self.pad_id, self.progress)
        out = {}
        for n in names:
            s = spans[n]
            pred = logits(emb[s], self.heads[n]).argmax(-1)
            out[n] = classification_score(pred, tok.labels[s], self.metric)
        return out


def tokenized_batches(
    tokenizer, texts: list[str], n: int, batch_size: int, max_tokens: int, seed: int = 0
) -> Iterator[dict[str, Tensor]]:
    """``n`` of ``texts`` (a seeded draw) as ``{"input_ids", "attention_mask"}`` batches, right-padded."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()[:n]
    tok = tokenize(tokenizer, [texts[i] for i in order], None, max_tokens)
    pad = tokenizer.pad_token_id or 0
    for start in range(0, len(tok), batch_size):
        ids, mask = tok.batch(list(range(start, min(start + batch_size, len(tok)))), pad)
        yield {"input_ids": ids, "attention_mask": mask}


# -- the kind, on the user's tasks ----------------------------------------------------------------------


class ZeroShotTextData(Prepared):
    """``evaluation.kind: zero-shot-text``: texts and class names from the data, prompts from the config."""

    kind = "zero-shot-text"

    def __init__(self, spec: EvalSpec):
        self.spec = spec
        ev = spec.evaluation
        self.tasks = list(ev.tasks)
        self.tokenizer = base_tokenizer(spec.base, "zero-shot-text")
        self.task_data: dict[str, Task] = {}
        self.sizes: dict[str, dict[str, int]] = {}
        for name, tcfg in ev.tasks.items():
            assert tcfg.data is not None and tcfg.label is not None
            if not isinstance(tcfg.text, str):
                raise PactMergeError(f"evaluation.tasks.{name}.text: kind zero-shot-text takes one text column")
            rows = task_rows(name, tcfg.data, tcfg.split_column, ev.split.model_dump(), ev.split.seed)
            require_splits(rows, ("validation", "test"))
            require_columns(rows, [tcfg.text, tcfg.label])
            classes = tcfg.labels or _class_names(rows, tcfg.label, name)
            prompts = dict(tcfg.prompts or {})
            unknown = [c for c in prompts if c not in classes]
            if unknown:
                raise PactMergeError(f"evaluation.tasks.{name}.prompts: {unknown[0]!r} is not a class ({classes})")
            template = tcfg.template or "{}"
            if "{}" not in template and len(prompts) < len(classes):
                raise PactMergeError(f"evaluation.tasks.{name}.template: needs a '{{}}' for the class name")
            splits = {}
            for split, items in rows.splits.items():
                where = f"evaluation.tasks.{name}: {rows.sources[split]}, column {tcfg.label!r}"
                ys = [as_class_id(r[tcfg.label], classes, where) for r in items]
                splits[split] = ([str(r[tcfg.text]) for r in items], ys)
            self.task_data[name] = Task(name, classes, [prompts.get(c, template.format(c)) for c in classes], splits)
            self.sizes[name] = {s: len(v[0]) for s, v in splits.items()}

    def evaluator(self) -> ZeroShotTextKind:
        return ZeroShotTextKind(self)

    def model_inputs(
        self, task: str, split: str, n: int, batch_size: int, seed: int = 0
    ) -> Iterator[dict[str, Tensor]]:
        check_split(self.task_data[task].splits, task, split)
        texts = self.task_data[task].splits[split][0]
        yield from tokenized_batches(self.tokenizer, texts, n, batch_size, self.spec.evaluation.max_length, seed)


def _class_names(rows: TaskRows, column: str, task: str) -> list[str]:
    values = {r[column] for items in rows.splits.values() for r in items}
    if all(isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit()) for v in values):
        raise PactMergeError(
            f"evaluation.tasks.{task}: column {column!r} holds class ids; give `labels: [class names]` for the prompts"
        )
    return sorted(str(v) for v in values)


class ZeroShotTextKind(ModelEvaluator):
    """:class:`ZeroShotTextEvaluator` on the user's tasks, under the checkpoint's parameter names."""

    def __init__(self, data: ZeroShotTextData):
        from pactmerge.io.sources import open_source

        spec = data.spec
        model = load_hf("AutoModel", spec.base, spec.device, f"base_model {spec.base}")
        with open_source(str(spec.base)) as base:
            names = set(base.names())
        state = checkpoint_state(model, names, f"base_model {spec.base}", [model.base_model_prefix])
        self.excluded = sorted(names - set(state))  # e.g. the LM head of a base saved with one
        heads = {n: build_head(model, data.tokenizer, t.prompts) for n, t in data.task_data.items()}
        self.inner = ZeroShotTextEvaluator(
            model,
            data.tokenizer,
            data.task_data,
            heads,
            batch_size=spec.evaluation.batch_size,
            max_tokens=spec.evaluation.max_length,
            metric=spec.metric,
            progress=spec.progress,
            state=state,
        )
        self.tasks = self.inner.tasks
        self.weights = self.inner.weights
        self.heads = self.inner.heads  # task -> frozen prompt head (also the calibration pass's Fisher loss)

    def scores(self, split: str, tasks: Sequence[str] | None = None) -> dict[str, float]:
        return self.inner.scores(split, tasks)


def prepare(spec: EvalSpec) -> ZeroShotTextData:
    return ZeroShotTextData(spec)
