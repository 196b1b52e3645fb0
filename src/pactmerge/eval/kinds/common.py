"""What every model evaluator shares: cheap weight swaps in one module, and the metrics."""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pactmerge.config.evaluation import EvaluationConfig
from pactmerge.errors import PactMergeError

METRICS = ("accuracy", "macro_f1")


class WeightSwap:
    """The parameters of one ``nn.Module``, replaced in place (no reallocation, no reload).

    Args:
        state: ``name -> tensor`` of the module (``module.state_dict()``; the tensors share the
            module's storage). Tied tensors (one storage under two names, e.g. an LM's input
            embedding and output head) are kept once, under the name in ``prefer`` if any.
        prefer: the checkpoint's names, to pick which name of a tied pair is kept.

    ``set_weights`` and ``set_merged`` copy every kept tensor, so a model is always complete:
    names not given take the base value ``theta_0`` (the state when this object was made).
    """

    def __init__(self, state: Mapping[str, Tensor], prefer: Collection[str] = ()):
        kept: dict[tuple[int, tuple[int, ...]], str] = {}
        for name, t in state.items():
            key = (t.data_ptr(), tuple(t.shape))
            if key not in kept or (name in prefer and kept[key] not in prefer):
                kept[key] = name
        names = set(kept.values())
        self.names = set(state)  # every name the module answers to, tied aliases included
        self.state = {n: t for n, t in state.items() if n in names}
        self.base = {n: t.detach().clone() for n, t in self.state.items()}

    @torch.no_grad()
    def set_weights(self, weights: Mapping[str, Tensor]) -> None:
        """theta = ``weights`` (a possibly partial state dict); names not given revert to theta_0."""
        for name, t in self.state.items():
            t.copy_(weights[name] if name in weights else self.base[name])

    @torch.no_grad()
    def set_merged(self, merged: Mapping[str, Tensor], alpha: float) -> None:
        """theta = theta_0 + alpha * merged for the merged parameters, theta_0 elsewhere."""
        for name, t in self.state.items():
            t.copy_(self.base[name])
            if name in merged:
                t.add_(merged[name].to(device=t.device, dtype=t.dtype), alpha=alpha)

    def missing(self, names: Iterable[str]) -> list[str]:
        """The ``names`` this module has no tensor for."""
        return [n for n in names if n not in self.names]


def classification_score(pred: Tensor, labels: Tensor, metric: str) -> float:
    """``accuracy``: the fraction of ``pred == labels``; ``macro_f1``: the unweighted mean of the
    per-class F1 over the classes present in ``labels`` or ``pred`` (scikit-learn's default).

    Args:
        pred, labels: ``(N,)`` integer class ids.
    """
    if metric == "accuracy":
        return float((pred == labels).float().mean())
    if metric == "macro_f1":
        f1 = []
        for c in torch.unique(torch.cat([labels, pred])).tolist():
            tp = int(((pred == c) & (labels == c)).sum())
            fp = int(((pred == c) & (labels != c)).sum())
            fn = int(((pred != c) & (labels == c)).sum())
            f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        return sum(f1) / len(f1) if f1 else float("nan")
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def batches(n: int, batch_size: int, desc: str, progress: bool) -> Any:
    """``range(0, n, batch_size)`` with a progress bar when ``progress`` (on stderr, left behind
    only while running)."""
    return tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress, file=sys.stderr, leave=False)


# -- what a kind builds from an `evaluation:` block -----------------------------------------------------


@dataclass
class EvalSpec:
    """What every kind is built from.

    ``base``: the base model's HF folder; ``finetuned``: ``task -> model reference`` (``models[].task``).
    """

    evaluation: EvaluationConfig
    base: Path
    finetuned: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = False

    @property
    def metric(self) -> str:
        return self.evaluation.metric_name


class Prepared:
    """A kind's tasks read and checked (no model loaded yet).

    Subclasses set ``tasks`` and ``sizes`` (``task -> split -> items``) and implement
    :meth:`evaluator`; the rest is optional.
    """

    kind = ""
    tasks: list[str]
    sizes: dict[str, dict[str, int]]

    def evaluator(self) -> ModelEvaluator:
        """Load the model (on the spec's device) and build the evaluator."""
        raise NotImplementedError

    def model_inputs(
        self, task: str, split: str, n: int, batch_size: int, seed: int = 0
    ) -> Iterator[dict[str, Tensor]]:
        """``n`` items of ``split`` of ``task`` (a seeded draw) as batches of model inputs."""
        raise PactMergeError(f"kind {self.kind} has no model inputs to draw calibration data from")

    def write_task_folders(self, folder: Path, root_files: list[str]) -> list[str]:
        """Extra per-task output next to a written merge; returns the folders written."""
        return []


class ModelEvaluator:
    """An evaluator over one HF module (``self.weights`` swaps its tensors, under checkpoint names).

    ``excluded``: the base's parameters this kind keeps out of the merge (reported), e.g. task heads or
    a frozen text tower.
    """

    tasks: list[str]
    weights: WeightSwap
    excluded: list[str]

    def set_weights(self, weights: Mapping[str, Tensor]) -> None:
        self.weights.set_weights(weights)

    def set_merged(self, merged: Mapping[str, Tensor], alpha: float) -> None:
        self.weights.set_merged(merged, alpha)

    def scores(self, split: str, tasks: Sequence[str] | None = None) -> dict[str, float]:
        raise NotImplementedError


def checkpoint_state(
    module: torch.nn.Module, names: Collection[str], what: str, prefixes: Sequence[str] = ()
) -> dict[str, Tensor]:
    """``module``'s tensors under the checkpoint's ``names``: as the module names them, or with one of
    ``prefixes`` in front (a base saved with a head class, e.g. ``bert.`` / ``roberta.``).

    A module tensor the checkpoint lacks is an error (one line naming it), unless it shares its
    storage with one the checkpoint has (a tied output head). Returns only names in ``names``.
    """
    state = module.state_dict()
    best: tuple[int, str] = (-1, "")
    for prefix in ("", *[p if p.endswith(".") else p + "." for p in prefixes if p]):
        hits = sum(f"{prefix}{n}" in names for n in state)
        if hits > best[0]:
            best = (hits, prefix)
    mapped = {f"{best[1]}{n}": t for n, t in state.items()}
    present = {(t.data_ptr(), tuple(t.shape)) for n, t in mapped.items() if n in names}
    missing = [n for n, t in mapped.items() if n not in names and (t.data_ptr(), tuple(t.shape)) not in present]
    if missing:
        raise PactMergeError(
            f"{what} has no parameter {missing[0]!r} (and {len(missing) - 1} more) that the evaluated model"
            f" ({type(module).__name__}) has; see docs/evaluate.md#models"
        )
    return {n: t for n, t in mapped.items() if n in names}


def base_tokenizer(base: Path, kind: str) -> Any:
    """The base model folder's tokenizer, or a one-line error naming the folder."""
    from pactmerge.eval.hf import transformers_module

    tf = transformers_module(f"kind {kind}")
    try:
        return tf.AutoTokenizer.from_pretrained(str(base))
    except (OSError, ValueError, TypeError) as e:
        raise PactMergeError(f"base_model {base}: no tokenizer ({str(e).splitlines()[0]})") from None


def check_split(splits: Collection[str], task: str, split: str) -> None:
    """Refuse a split the task's data do not have, naming the task."""
    if split not in splits:
        raise PactMergeError(f"evaluation.tasks.{task}: no {split} split (see docs/evaluate.md#splits)")


def load_hf(class_name: str, folder: Path, device: torch.device, what: str) -> Any:
    """``transformers.<class_name>.from_pretrained(folder)`` in eval mode on ``device`` (float32 on the CPU)."""
    from pactmerge.eval.hf import transformers_module

    cls = getattr(transformers_module(what), class_name, None)
    if cls is None:
        raise PactMergeError(f"{what}: transformers has no class {class_name!r}")
    try:
        model = cls.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise PactMergeError(f"{what}: cannot load {folder} as {class_name} ({str(e).splitlines()[0]})") from None
    if device.type == "cpu":
        model.float()
    return model.to(device).eval()


def hf_folder(ref: Any, what: str) -> Path:
    """A model reference that must be a Hugging Face folder (with config.json)."""
    if not isinstance(ref, (str, Path)) or not (Path(ref) / "config.json").is_file():
        shown = ref if isinstance(ref, (str, Path)) else "an in-memory state dict"
        raise PactMergeError(f"{what}: {shown} is not a Hugging Face model folder (config.json); evaluation loads it")
    return Path(ref)
