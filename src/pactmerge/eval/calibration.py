"""Calibration data for data-aware merging: N training examples of a task, as model inputs.

One function, :func:`calibration_batches`, for the tasks of a config's ``evaluation:`` block and for
the built-in suites alike, so that a data-aware method (RegMean, Fisher merging, PAVE) reads its
statistics from the same task definitions the merge is evaluated on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor

from pactmerge.errors import PactMergeError

BUILT_IN = ("text6", "text12", "text20", "image")


def calibration_batches(
    source: Any,
    task: str,
    n: int,
    *,
    batch_size: int = 32,
    seed: int = 0,
    split: str = "train",
) -> Iterator[dict[str, Tensor]]:
    """``n`` examples of ``task`` (a seeded draw from ``split``) as batches of model inputs.

    Args:
        source: a merge config with an ``evaluation:`` block (a :class:`MergeConfig`, a mapping or a
            YAML path), or a built-in suite name: ``text6``, ``text12``, ``text20`` (MiniLM inputs) or
            ``image`` (EfficientNet-Lite0 inputs).
        task: a task of that config or suite.
        n: how many examples (fewer when the split has fewer).

    Yields:
        dicts of batched tensors, at most ``batch_size`` rows each: ``input_ids`` and
        ``attention_mask`` (int64, ``(b, L)``, right-padded; ``token_type_ids`` too for a
        sequence-classification tokenizer that has them) for text and causal-LM kinds,
        ``pixel_values`` (float32 ``(b, 3, H, W)``, normalized as the model expects) for images.
    """
    if n < 1:
        raise PactMergeError(f"calibration: n must be at least 1, not {n}")
    if isinstance(source, str) and source in BUILT_IN:
        yield from _suite_batches(source, task, n, batch_size, seed, split)
        return
    if not isinstance(source, (str, os.PathLike, Mapping)) and not hasattr(source, "evaluation"):
        raise PactMergeError(f"calibration: {source!r} is neither a config nor one of {', '.join(BUILT_IN)}")
    from pactmerge.config import load_config
    from pactmerge.eval.kinds import prepare
    from pactmerge.eval.session import eval_spec

    cfg = load_config(source)
    if cfg.evaluation is None or task not in cfg.evaluation.tasks:
        known = ", ".join(cfg.evaluation.tasks) if cfg.evaluation else "none (no evaluation block)"
        raise PactMergeError(f"calibration: task {task!r} is not in evaluation.tasks (tasks: {known})")
    yield from prepare(eval_spec(cfg)).model_inputs(task, split, n, batch_size, seed)


def _suite_batches(
    suite: str, task: str, n: int, batch_size: int, seed: int, split: str
) -> Iterator[dict[str, Tensor]]:
    import torch

    if suite == "image":
        from pactmerge.eval.images import load_image_tasks, to_input

        try:
            images = load_image_tasks([task])[task].splits[split][0]
        except ValueError as e:
            raise PactMergeError(f"calibration: {e}") from None
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        for start in range(0, len(order), batch_size):
            yield {"pixel_values": to_input(images[order[start : start + batch_size]], 32)}
        return
    from pactmerge.eval.finetune import load_tokenizer, minilm_path
    from pactmerge.eval.heads import MAX_TOKENS
    from pactmerge.eval.kinds.zero_shot_text import tokenized_batches
    from pactmerge.eval.tasks import load_tasks, suite_tasks

    if task not in suite_tasks(suite):
        raise PactMergeError(f"calibration: {task!r} is not a task of {suite} ({', '.join(suite_tasks(suite))})")
    texts = load_tasks([task])[task].splits[split][0]
    yield from tokenized_batches(load_tokenizer(minilm_path()), texts, n, batch_size, MAX_TOKENS, seed)
