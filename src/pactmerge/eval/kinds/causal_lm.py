"""Kind ``causal-lm``: a decoder LM (``AutoModelForCausalLM``), scored on prompts.

Two task forms, told apart by the data (the column names are configurable):

* **multiple choice** -- ``prompt``, ``choices`` (a list of strings) and ``answer`` (the index of the
  right choice, or its text). Each choice is scored by its length-normalized log-likelihood: the
  mean, over the choice's tokens, of log p(token | prompt and the choice's earlier tokens). The
  prompt is tokenized as the tokenizer does a text (BOS included when it adds one), the choice on
  its own without special tokens, and the two id lists are concatenated; a sequence longer than
  ``max_length`` loses tokens from the prompt's start. The highest score is the prediction (ties:
  the first choice); the metric is accuracy.
* **exact match** -- ``prompt`` and ``answer`` (a string). Greedy decoding of at most
  ``max_new_tokens`` tokens (default: the longest answer's token count + 2); the continuation up to
  its first newline, stripped, must equal the stripped answer.

Forward passes are batched: every (item, choice) sequence of a split sorted by length, right-padded;
generation batches are left-padded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.eval.data import require_columns, require_splits, task_rows
from pactmerge.eval.kinds.common import (
    EvalSpec,
    ModelEvaluator,
    Prepared,
    WeightSwap,
    base_tokenizer,
    batches,
    check_split,
    checkpoint_state,
    load_hf,
)


@dataclass
class ChoiceItems:
    """A multiple-choice split: per item, its choices' token ids (prompt + choice) and where the choice starts."""

    sequences: list[list[int]]  # one per (item, choice)
    starts: list[int]  # index of each sequence's first choice token
    item_of: list[int]  # the item each sequence belongs to
    choice_of: list[int]  # which of its item's choices it is
    answers: Tensor  # (items,) index of the right choice


@dataclass
class AnswerItems:
    """An exact-match split: prompt ids and the expected answers."""

    prompts: list[list[int]]
    answers: list[str]


class CausalLMData(Prepared):
    kind = "causal-lm"

    def __init__(self, spec: EvalSpec):
        self.spec = spec
        ev = spec.evaluation
        self.tasks = list(ev.tasks)
        self.tokenizer = base_tokenizer(spec.base, "causal-lm")
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.items: dict[str, dict[str, ChoiceItems | AnswerItems]] = {}
        self.sizes: dict[str, dict[str, int]] = {}
        self.max_new_tokens: dict[str, int] = {}
        for name, tcfg in ev.tasks.items():
            assert tcfg.data is not None
            rows = task_rows(name, tcfg.data, tcfg.split_column, ev.split.model_dump(), ev.split.seed)
            require_splits(rows, ("validation", "test"))
            prompt, answer = tcfg.prompt or "prompt", tcfg.answer or "answer"
            choices = tcfg.choices or "choices"
            multiple_choice = tcfg.choices is not None or any(choices in r for rs in rows.splits.values() for r in rs)
            require_columns(rows, [prompt, answer] + ([choices] if multiple_choice else []))
            self.items[name], self.sizes[name] = {}, {}
            longest = 0
            for split, rs in rows.splits.items():
                where = f"evaluation.tasks.{name}: {rows.sources[split]}"
                if multiple_choice:
                    self.items[name][split] = self._choices(rs, prompt, choices, answer, where, ev.max_length)
                else:
                    ids = [self._prompt_ids(str(r[prompt]), ev.max_length) for r in rs]
                    answers = [str(r[answer]) for r in rs]
                    longest = max([longest, *(len(self._ids(a)) for a in answers)])
                    self.items[name][split] = AnswerItems(ids, answers)
                self.sizes[name][split] = len(rs)
            self.max_new_tokens[name] = ev.max_new_tokens or longest + 2

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt_ids(self, text: str, max_length: int) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])[-max_length:]

    def _choices(self, rows: list[dict[str, Any]], prompt: str, choices: str, answer: str, where: str, max_length: int):
        seqs, starts, item_of, choice_of, answers = [], [], [], [], []
        for i, r in enumerate(rows):
            options = r[choices]
            if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
                raise PactMergeError(f"{where} row {i + 1}: column {choices!r} must be a non-empty list of strings")
            a = r[answer]
            if isinstance(a, str) and a in options:
                a = options.index(a)
            if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(options):
                raise PactMergeError(
                    f"{where} row {i + 1}: column {answer!r} is {r[answer]!r}; give the index of the right choice"
                    f" (0-{len(options) - 1}) or its text"
                )
            answers.append(a)
            p = list(self.tokenizer(str(r[prompt]))["input_ids"])
            for k, option in enumerate(options):
                c = self._ids(option)
                if not c:
                    raise PactMergeError(f"{where} row {i + 1}: choice {option!r} has no tokens")
                seq = (p + c)[-max_length:]
                seqs.append(seq)
                starts.append(max(1, len(seq) - len(c)))
                item_of.append(i)
                choice_of.append(k)
        return ChoiceItems(seqs, starts, item_of, choice_of, torch.tensor(answers, dtype=torch.long))

    def evaluator(self) -> CausalLMEvaluator:
        return CausalLMEvaluator(self)

    def model_inputs(
        self, task: str, split: str, n: int, batch_size: int, seed: int = 0
    ) -> Iterator[dict[str, Tensor]]:
        """The prompts (exact match) or the prompt + right choice sequences (multiple choice)."""
        check_split(self.items[task], task, split)
        items = self.items[task][split]
        if isinstance(items, ChoiceItems):
            right = [j for j, i in enumerate(items.item_of) if items.choice_of[j] == int(items.answers[i])]
            seqs = [items.sequences[j] for j in right]
        else:
            seqs = items.prompts
        order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed)).tolist()[:n]
        for start in range(0, len(order), batch_size):
            ids, mask = pad_right([seqs[i] for i in order[start : start + batch_size]], self.pad_id)
            yield {"input_ids": ids, "attention_mask": mask}


def pad_right(seqs: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(s)
        mask[j, : len(s)] = 1
    return ids, mask


def pad_left(seqs: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, width - len(s) :] = torch.tensor(s)
        mask[j, width - len(s) :] = 1
    return ids, mask


class CausalLMEvaluator(ModelEvaluator):
    def __init__(self, data: CausalLMData):
        from pactmerge.io.sources import open_source

        spec = data.spec
        self.data, self.tasks = data, list(data.tasks)
        self.batch_size, self.progress = spec.evaluation.batch_size, spec.progress
        self.model = load_hf("AutoModelForCausalLM", spec.base, spec.device, f"base_model {spec.base}")
        with open_source(str(spec.base)) as base:
            names = set(base.names())
        # A tied output head has no tensor of its own in the checkpoint: the input embedding carries it.
        state = checkpoint_state(self.model, names, f"base_model {spec.base}", [self.model.base_model_prefix])
        self.excluded = sorted(names - set(state))
        self.weights = WeightSwap(state, prefer=names)

    @torch.no_grad()
    def scores(self, split: str, tasks: Sequence[str] | None = None) -> dict[str, float]:
        out = {}
        for task in list(tasks) if tasks else self.tasks:
            items = self.data.items[task][split]
            if isinstance(items, ChoiceItems):
                out[task] = self._choice_accuracy(items, f"{task} {split}")
            else:
                out[task] = self._exact_match(items, self.data.max_new_tokens[task], f"{task} {split}")
        return out

    def choice_scores(self, items: ChoiceItems, desc: str = "choices") -> Tensor:
        """(sequences,) mean log-probability of each choice's tokens given what precedes them."""
        device = next(self.model.parameters()).device
        order = sorted(range(len(items.sequences)), key=lambda j: len(items.sequences[j]))
        out = torch.empty(len(order), dtype=torch.float64)
        for start in batches(len(order), self.batch_size, desc, self.progress):
            index = order[start : start + self.batch_size]
            ids, mask = pad_right([items.sequences[j] for j in index], self.data.pad_id)
            logp = torch.log_softmax(
                self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1
            )
            logp = logp.cpu()
            for row, j in enumerate(index):
                seq, s = items.sequences[j], items.starts[j]
                target = torch.tensor(seq[s:])
                out[j] = logp[row, s - 1 : len(seq) - 1].gather(-1, target[:, None]).mean().double()
        return out

    def _choice_accuracy(self, items: ChoiceItems, desc: str) -> float:
        scores = self.choice_scores(items, desc)
        n = len(items.answers)
        best = torch.full((n,), float("-inf"), dtype=torch.float64)
        pred = torch.zeros(n, dtype=torch.long)
        for j, i in enumerate(items.item_of):
            if scores[j] > best[i]:  # strictly: ties keep the first choice
                best[i], pred[i] = scores[j], items.choice_of[j]
        return float((pred == items.answers).float().mean())

    def generate(self, prompts: list[list[int]], max_new_tokens: int, desc: str = "generate") -> list[str]:
        """Greedy continuations of ``prompts`` (decoded, special tokens skipped)."""
        device = next(self.model.parameters()).device
        out: list[str] = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))
        for start in batches(len(order), self.batch_size, desc, self.progress):
            index = order[start : start + self.batch_size]
            ids, mask = pad_left([prompts[j] for j in index], self.data.pad_id)
            gen = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.data.pad_id,
            )
            for row, j in enumerate(index):
                out[j] = self.data.tokenizer.decode(gen[row, ids.shape[1] :], skip_special_tokens=True)
        return out

    def _exact_match(self, items: AnswerItems, max_new_tokens: int, desc: str) -> float:
        texts = self.generate(items.prompts, max_new_tokens, desc)
        hits = [t.split("\n")[0].strip() == a.strip() for t, a in zip(texts, items.answers)]
        return sum(hits) / len(hits)


def prepare(spec: EvalSpec) -> CausalLMData:
    return CausalLMData(spec)
