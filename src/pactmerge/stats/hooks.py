"""Input covariances of a model's linear layers, collected with forward hooks.

For every module the hooks can see -- ``nn.Linear``, a 1 x 1 ``nn.Conv2d`` (stride 1, no
padding, one group: the same matrix at every pixel) and transformers' ``Conv1D`` (GPT-2; its
weight is stored ``(in, out)``) -- and every forward pass over the calibration batches::

    C = sum_rows x x^T          (d_in, d_in), float64; one row x per token (or pixel) fed to the layer
    count = number of rows

**Normalisation.** ``C`` is the plain sum over the N examples (the PAVE paper's ``C = X X^T``);
``count`` is kept beside it, so a consumer can take the per-token mean ``C / count`` (RegMean's
``normalize: tokens``) or the per-example mean ``C / N``. PAVE is invariant to the scale of C.

**Padding.** Rows at padded positions are left out: when the batch has an ``attention_mask``
``(B, L)`` and a layer's input is ``(B, L, ..., d_in)`` (batch first, then sequence), only the
positions with mask 1 count. Inputs of another shape (a pooler's ``(B, d_in)``, a classifier's)
count every row. A module called more than once per forward pass (shared weights) accumulates
every call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pactmerge.stats.data import Batch, default_forward

OUT_IN = "out_in"  # weight (d_out, d_in): nn.Linear, 1x1 Conv2d (as the matrix (out, in))
IN_OUT = "in_out"  # weight (d_in, d_out): transformers' Conv1D


@dataclass
class Covariance:
    """``sum`` = sum of x x^T over ``count`` input rows of one layer (see the module doc)."""

    sum: Tensor  # (d_in, d_in) float64
    count: int
    layout: str  # OUT_IN or IN_OUT: how the layer's weight is stored


def is_pointwise_conv(mod: nn.Module) -> bool:
    """A 1 x 1 convolution, stride 1, no padding, one group: a matrix applied at every pixel."""
    return (
        isinstance(mod, nn.Conv2d)
        and tuple(mod.kernel_size) == (1, 1)
        and tuple(mod.stride) == (1, 1)
        and mod.groups == 1
        and tuple(mod.dilation) == (1, 1)
        and mod.padding in ((0, 0), "valid")
    )


def hookable_modules(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{module name: (module, weight layout)}`` of every module the covariance hooks handle."""
    out: dict[str, tuple[nn.Module, str]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or is_pointwise_conv(mod):
            out[name] = (mod, OUT_IN)
        elif type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None and mod.weight.ndim == 2:
            out[name] = (mod, IN_OUT)  # transformers.pytorch_utils.Conv1D, matched by name: no import
    return out


def input_rows(x: Tensor, conv: bool, mask: Tensor | None) -> Tensor:
    """The rows ``(n, d_in)`` one call of a layer contributes (padding left out; module doc)."""
    if conv:  # (B, C, H, W): one row per pixel
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if mask is not None and x.ndim >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def collect_covariances(
    model: nn.Module,
    batches: Iterable[Batch],
    forward: Callable[[nn.Module, Batch], object] = default_forward,
    modules: dict[str, tuple[nn.Module, str]] | None = None,
) -> dict[str, Covariance]:
    """Run ``forward(model, batch)`` over ``batches`` and sum each hooked layer's input x x^T.

    Args:
        model: in the state to measure (the caller puts it in eval mode).
        batches: collated batches (``attention_mask``, if present, marks the real tokens).
        modules: the layers to hook (default :func:`hookable_modules`).

    Returns:
        ``{module name: Covariance}`` for every hooked layer that saw at least one call.
    """
    targets = hookable_modules(model) if modules is None else modules
    acc: dict[str, Covariance] = {}
    state: dict[str, Tensor | None] = {"mask": None}

    def make_hook(name: str, conv: bool, layout: str):
        def hook(module, inputs, output):
            rows = input_rows(inputs[0].detach(), conv, state["mask"])
            # One product per call in the input's precision (float32 at least), summed in float64.
            work = rows.to(torch.float64 if rows.dtype == torch.float64 else torch.float32)
            prod = (work.mT @ work).to(torch.float64).cpu()
            if name in acc:
                acc[name].sum += prod
                acc[name].count += rows.shape[0]
            else:
                acc[name] = Covariance(prod, rows.shape[0], layout)

        return hook

    handles = [
        mod.register_forward_hook(make_hook(name, is_pointwise_conv(mod), layout))
        for name, (mod, layout) in targets.items()
    ]
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            state["mask"] = mask.bool() if mask is not None else None
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return acc
