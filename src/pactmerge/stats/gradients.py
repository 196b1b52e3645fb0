"""Squared gradients: the diagonal empirical Fisher of a model on its calibration examples."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from pactmerge.stats.data import Batch


def squared_gradients(
    model: nn.Module,
    batches: Iterable[Batch],
    loss: Callable[[nn.Module, Batch], Tensor],
    names: list[str],
) -> dict[str, Tensor]:
    """``F = (1/N) sum_i (dL_i/dtheta)^2`` of the named parameters, one batch = one example ``i``.

    Each example is its own forward/backward pass (per-example gradients: squaring a batch's
    gradient would square a sum). The model runs in eval mode (no dropout); its weights are not
    changed, and its ``requires_grad`` flags and train/eval mode are restored afterwards. A
    parameter the loss does not reach gets a zero Fisher.

    Args:
        model: the model to differentiate.
        batches: N batches of one example each.
        loss: ``loss(model, batch)`` -> scalar ``L_i``.
        names: parameter names (``model.named_parameters()``).

    Returns:
        ``{name: tensor of the parameter's shape}``, float64 on the CPU.

    Raises:
        KeyError: a name is not a parameter of the model. ValueError: no batches.
    """
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"no such parameter(s) in the model: {', '.join(missing[:3])}")
    flags = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    wanted = set(names)
    acc = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    count = 0
    try:
        model.eval()
        for n, p in params.items():
            p.requires_grad_(n in wanted)
        for batch in batches:
            grads = torch.autograd.grad(loss(model, batch), [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    acc[n].add_(g.detach().to(device="cpu", dtype=torch.float64).square())
            count += 1
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    if count == 0:
        raise ValueError("squared gradients of zero examples")
    return {n: a / count for n, a in acc.items()}
