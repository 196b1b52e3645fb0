"""What the calibration pass needs from the caller: each model's examples and how to run it.

An *example* is one mapping of model keyword inputs without the batch dimension: text
``{"input_ids": (L,), "attention_mask": (L,)}`` (lengths may differ between examples), an image
``{"pixel_values": (3, H, W)}``; ``"labels"`` (a 0-d class id, or ``(L,)`` token ids) is only
used by the Fisher loss. :func:`collate` pads and stacks examples into a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pactmerge.errors import PactMergeError

Example = Mapping[str, Tensor]
Batch = dict[str, Tensor]
LABELS = "labels"
_PAD_VALUE = {"input_ids": None, "labels": -100}  # None: the model's pad id; anything else pads with 0


def default_forward(model: nn.Module, batch: Batch) -> object:
    """``model(**batch)`` without the labels (the covariance pass needs no loss)."""
    return model(**{k: v for k, v in batch.items() if k != LABELS})


def default_loss(model: nn.Module, batch: Batch) -> Tensor:
    """``model(**batch).loss``: the training loss of a Hugging Face model called with ``labels``."""
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise PactMergeError(
            "calibration: the model returned no .loss for a batch with 'labels'; give ModelData(loss=...) for"
            " Fisher statistics"
        )
    return loss


@dataclass
class ModelData:
    """Calibration data of one model (the same position as the model in the config's ``models``).

    Attributes:
        examples: the model's task examples (see the module doc); the first ``samples`` are used,
            so put them in the order to draw from (e.g. a seeded shuffle of the training split).
        load_model: returns the fine-tuned model of that checkpoint as an ``nn.Module`` (the pass
            checks that its linear weights equal the checkpoint's, then puts it in eval mode).
        forward: ``forward(model, batch)`` runs the model on a collated batch; default
            :func:`default_forward`.
        loss: ``loss(model, batch)`` -> the scalar loss of a batch of one example, for Fisher
            statistics; default :func:`default_loss`.
        pad_id: the padding id of ``input_ids``.
        tag: anything besides the examples that changes the statistics (e.g. the hash of a frozen
            head the loss uses); part of the cache key.
    """

    examples: Sequence[Example]
    load_model: Callable[[], nn.Module]
    forward: Callable[[nn.Module, Batch], object] = default_forward
    loss: Callable[[nn.Module, Batch], Tensor] = default_loss
    pad_id: int = 0
    tag: str = ""


def collate(examples: Sequence[Example], pad_id: int = 0) -> Batch:
    """Stack examples into a batch; 1-D entries of different lengths are right-padded.

    ``input_ids`` pad with ``pad_id``, ``labels`` with -100, everything else with 0. Examples with
    1-D ``input_ids`` and no ``attention_mask`` get one (1 = real token; whether or not this batch
    needed padding, so a model sees the same inputs in any batch), which the statistics use to
    leave the padding out.

    Returns:
        ``{key: (B, ...)}``.
    """
    if not examples:
        raise ValueError("collate: no examples")
    keys = list(examples[0])
    for i, ex in enumerate(examples):
        if list(ex) != keys:
            raise PactMergeError(f"calibration data: example {i} has keys {sorted(ex)}, example 0 has {sorted(keys)}")
    batch: Batch = {}
    for key in keys:
        ts = [torch.as_tensor(ex[key]) for ex in examples]
        if all(t.shape == ts[0].shape for t in ts):
            batch[key] = torch.stack(ts)
            continue
        if any(t.ndim != 1 for t in ts):
            raise PactMergeError(f"calibration data: entry {key!r} has different shapes and is not 1-D")
        value = _PAD_VALUE.get(key, 0)
        out = torch.full((len(ts), max(len(t) for t in ts)), pad_id if value is None else value, dtype=ts[0].dtype)
        for j, t in enumerate(ts):
            out[j, : len(t)] = t
        batch[key] = out
    if "input_ids" in batch and batch["input_ids"].ndim == 2 and "attention_mask" not in batch:
        lengths = torch.tensor([len(torch.as_tensor(ex["input_ids"])) for ex in examples])
        batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]).long()
    return batch


def batches(examples: Sequence[Example], batch_size: int, pad_id: int = 0) -> Iterator[Batch]:
    """Consecutive batches of ``batch_size`` examples (the last may be smaller)."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_id)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}
