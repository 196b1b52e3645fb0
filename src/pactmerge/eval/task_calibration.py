"""Calibration data for the data-aware stages (PAVE, RegMean, Fisher) from a config's ``evaluation:`` tasks.

When a merge has a stage that needs statistics (``needs=`` in the registry) and the caller passes no
``calibration_data``, each model's :class:`pactmerge.stats.ModelData` is built from *its own task*
(``models[i].task``), as the evaluation kind reads it:

* **examples**: the items of the task's **train** split (never validation or test), in a seeded
  random order (``torch.randperm`` seeded with the config's ``seed``), the first
  ``calibration.samples`` of them, tokenized / preprocessed exactly as the kind does for evaluation,
  each with its true label;
* **load_model**: that fine-tune's folder loaded in the kind's model class;
* **forward**: the kind's forward pass (what the hooks see); **loss** (Fisher merging): the kind's own
  loss with the true label, i.e. the empirical Fisher.

Per kind (example keys; model class; forward / loss):

* ``sequence-classification``: ``input_ids``, ``attention_mask`` (``token_type_ids``), ``labels``;
  ``AutoModelForSequenceClassification``; ``model(**inputs)`` / its cross-entropy with the task's own
  head (``model(**batch).loss``).
* ``zero-shot-text``: ``input_ids``, ``labels``; ``AutoModel``; the masked-mean embedding / the
  cross-entropy of the frozen prompt head's logits (the bench's fine-tuning loss).
* ``clip-zero-shot``: ``pixel_values``, ``labels``; ``CLIPModel``; the image features (vision tower
  and projection) / the cross-entropy of the zero-shot head's cosine logits times the model's
  ``logit_scale``.
* ``causal-lm``: ``input_ids`` = the prompt followed by the right choice (multiple choice) or the
  answer's tokens (exact match), ``labels`` = the same ids with -100 on the prompt;
  ``AutoModelForCausalLM``; ``model(**inputs)`` / the LM loss of the choice's (answer's) tokens.
* ``python``: no task data; refused (pass ``calibration_data=`` in Python).

The frozen heads are the evaluator's (built from the base); their hash is the data's ``tag``, so a
statistic is never reused with another head.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pactmerge.config import MergeConfig
from pactmerge.errors import PactMergeError
from pactmerge.eval.kinds.common import ModelEvaluator, Prepared, hf_folder, load_hf
from pactmerge.io.lora import is_adapter
from pactmerge.stats import CalibrationSettings, ModelData, needed_kinds
from pactmerge.stats.data import Batch, default_forward, default_loss

SPLIT = "train"

# What a kind contributes: (examples in the given order, model class, forward, loss, pad id, tag).
KindData = tuple[list[dict[str, Tensor]], str, Callable[[nn.Module, Batch], object], Callable, int, str]


def task_calibration_data(cfg: MergeConfig, prepared: Prepared, evaluator: ModelEvaluator) -> list[ModelData] | None:
    """One :class:`ModelData` per model of ``cfg`` from its evaluation task (see the module doc).

    Args:
        cfg: the merge config (its ``models[].task``, ``seed``, ``calibration`` and ``evaluation``).
        prepared: the kind's tasks, read and tokenized (:func:`pactmerge.eval.kinds.prepare`).
        evaluator: the loaded evaluator (its frozen heads, for the Fisher loss).

    Returns:
        None when no stage of the merge needs statistics; else the data, in ``cfg.models`` order.

    Raises:
        PactMergeError: a model without ``task:``, a task without (enough) training items, a kind
            without task data (``python``), a fine-tune that is not a Hugging Face folder.
    """
    kinds = needed_kinds(cfg.pipeline)
    if not kinds:
        return None
    users = ", ".join(sorted({s for names in kinds.values() for s in names}))
    build = BUILDERS.get(prepared.kind)
    if build is None:
        raise PactMergeError(
            f"{users} need(s) calibration statistics, and evaluation kind {prepared.kind} has no task data to draw"
            " them from; pass calibration_data=[pactmerge.stats.ModelData per model] in Python (docs/data_aware.md)"
        )
    assert cfg.evaluation is not None
    settings = cfg.calibration or CalibrationSettings()
    out = []
    for i, entry in enumerate(cfg.models):
        task = entry.task
        if task is None:
            raise PactMergeError(
                f"models.{i}: {users} draw(s) calibration examples from each model's own task; set `task:` to the"
                f" evaluation task it was fine-tuned for (tasks: {', '.join(cfg.evaluation.tasks)})"
            )
        n = _train_size(cfg, prepared, task, users, settings)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()[: settings.samples]
        if is_adapter(entry.model):
            raise PactMergeError(
                f"models.{i}: {entry.model} is a PEFT adapter; the calibration pass of {users} runs the fine-tuned"
                " model itself: give a merged model folder, or calibration_data= in Python"
            )
        folder = hf_folder(entry.model, f"models.{i} (the calibration pass of {users} loads it)")
        examples, model_class, forward, loss, pad_id, tag = build(prepared, evaluator, task, order)
        what = f"models.{i} {folder}"
        out.append(
            ModelData(
                examples=examples,
                load_model=_loader(model_class, folder, what),
                forward=forward,
                loss=loss,
                pad_id=pad_id,
                tag=f"evaluation:{prepared.kind}{tag}",
            )
        )
    return out


def _train_size(cfg: MergeConfig, prepared: Prepared, task: str, users: str, settings: CalibrationSettings) -> int:
    """The number of training items of ``task``: refused when there are none, or too few for N."""
    assert cfg.evaluation is not None
    data = cfg.evaluation.tasks[task].data
    n = prepared.sizes.get(task, {}).get(SPLIT, 0)
    if n == 0:
        where = f"data: {{{', '.join(f'{s}: {f}' for s, f in data.items())}}}" if isinstance(data, dict) else str(data)
        raise PactMergeError(
            f"evaluation.tasks.{task}: no train items in {where}; {users} draw(s) calibration examples from the"
            " training split only (add rows with split `train`, a `train:` file, or evaluation.split.train;"
            " docs/evaluate.md#splits)"
        )
    if n < settings.samples and not settings.allow_fewer:
        raise PactMergeError(
            f"evaluation.tasks.{task}: {n} train items, fewer than calibration.samples = {settings.samples}"
            " (lower calibration.samples, or set calibration.allow_fewer: true)"
        )
    return n


def _loader(model_class: str, folder: Path, what: str) -> Callable[[], nn.Module]:
    def load() -> nn.Module:
        return load_hf(model_class, folder, torch.device("cpu"), what)

    return load


def _head_tag(head: Tensor) -> str:
    return ":head:" + hashlib.sha256(head.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


# -- the kinds ------------------------------------------------------------------------------------------


def _sequence_classification(prepared: Any, evaluator: Any, task: str, order: list[int]) -> KindData:
    encoded, labels = prepared.inputs[task][SPLIT]
    examples = [
        {**{k: torch.tensor(v, dtype=torch.long) for k, v in encoded[i].items()}, "labels": labels[i]} for i in order
    ]
    pad_id = prepared.tokenizer.pad_token_id or 0
    return examples, "AutoModelForSequenceClassification", default_forward, default_loss, pad_id, ""


def _zero_shot_text(prepared: Any, evaluator: Any, task: str, order: list[int]) -> KindData:
    from pactmerge.eval.heads import embed, logits, tokenize

    texts, ys = prepared.task_data[task].splits[SPLIT]
    max_length = prepared.spec.evaluation.max_length
    tok = tokenize(prepared.tokenizer, [texts[i] for i in order], [ys[i] for i in order], max_length)
    examples = [{"input_ids": torch.tensor(ids), "labels": tok.labels[j]} for j, ids in enumerate(tok.ids)]
    head = evaluator.heads[task].detach().float().cpu()

    def forward(model: nn.Module, batch: Batch) -> Tensor:
        return embed(model, batch["input_ids"], batch["attention_mask"])

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        emb = forward(model, batch)
        return F.cross_entropy(logits(emb, head.to(emb.device, emb.dtype)), batch["labels"].reshape(-1))

    return examples, "AutoModel", forward, loss, prepared.tokenizer.pad_token_id or 0, _head_tag(head)


def _clip(prepared: Any, evaluator: Any, task: str, order: list[int]) -> KindData:
    images, labels = prepared.images[task][SPLIT]
    examples = [{"pixel_values": prepared.pixels(images[i : i + 1])[0], "labels": labels[i]} for i in order]
    head = evaluator.heads[task].detach().float().cpu()

    def forward(model: Any, batch: Batch) -> Tensor:
        # What CLIPModel.get_image_features computes: the vision tower's pooled output, projected.
        pooled = model.vision_model(pixel_values=batch["pixel_values"]).pooler_output
        return model.visual_projection(pooled)

    def loss(model: Any, batch: Batch) -> Tensor:
        feats = F.normalize(forward(model, batch), dim=-1)
        scale = model.logit_scale.detach().exp()
        return F.cross_entropy(scale * feats @ head.to(feats.device, feats.dtype).T, batch["labels"].reshape(-1))

    return examples, "CLIPModel", forward, loss, 0, _head_tag(head)


def _causal_lm(prepared: Any, evaluator: Any, task: str, order: list[int]) -> KindData:
    from pactmerge.eval.kinds.causal_lm import ChoiceItems

    items = prepared.items[task][SPLIT]
    max_length = prepared.spec.evaluation.max_length
    sequences: list[tuple[list[int], int]] = []  # (token ids, index of the first target token)
    if isinstance(items, ChoiceItems):  # the prompt followed by the right choice, as the kind scores it
        right = {i: j for j, i in enumerate(items.item_of) if items.choice_of[j] == int(items.answers[i])}
        sequences = [(items.sequences[right[i]], items.starts[right[i]]) for i in range(len(items.answers))]
    else:  # the prompt followed by the answer's tokens
        for prompt, answer in zip(items.prompts, items.answers):
            target = list(prepared.tokenizer(answer, add_special_tokens=False)["input_ids"])
            seq = (prompt + target)[-max_length:]
            sequences.append((seq, max(1, len(seq) - len(target))))
    examples = []
    for i in order:
        seq, start = sequences[i]
        ids = torch.tensor(seq, dtype=torch.long)
        labels = ids.clone()
        labels[:start] = -100  # the loss is on the choice / answer tokens only
        examples.append({"input_ids": ids, "labels": labels})
    return examples, "AutoModelForCausalLM", default_forward, default_loss, prepared.pad_id, ""


BUILDERS: dict[str, Callable[[Any, Any, str, list[int]], KindData]] = {
    "sequence-classification": _sequence_classification,
    "zero-shot-text": _zero_shot_text,
    "clip-zero-shot": _clip,
    "causal-lm": _causal_lm,
}
