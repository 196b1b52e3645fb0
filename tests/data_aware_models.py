"""Tiny models and calibration data for the data-aware tests (PAVE, RegMean, Fisher, the stats pass)."""

from __future__ import annotations

import types

import torch
from torch import nn

from pactmerge.stats import ModelData

V, D, H, C = 13, 6, 9, 3


class Tiny(nn.Module):
    """Embedding -> residual tanh MLP blocks -> masked mean -> head (a miniature encoder)."""

    def __init__(self, d: int = D, h: int = H, blocks: int = 2):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(d, h), "down": nn.Linear(h, d)}) for _ in range(blocks)
        )
        self.head = nn.Linear(d, C)

    def hidden(self, input_ids):
        x = self.emb(input_ids)
        for blk in self.layers:
            x = x + blk["down"](torch.tanh(blk["up"](x)))
        return x

    def forward(self, input_ids, attention_mask=None, labels=None):
        x = self.hidden(input_ids)
        m = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).unsqueeze(-1).to(x.dtype)
        logits = self.head((x * m).sum(1) / m.sum(1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return types.SimpleNamespace(logits=logits, loss=loss)


class Wrapped(nn.Module):
    """The same network one level down (``body.``): names differ from a bare checkpoint by a prefix."""

    def __init__(self):
        super().__init__()
        self.body = Tiny()

    def forward(self, **kw):
        return self.body(**kw)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def family(T: int, seed: int = 0, scale: float = 0.05):
    """A float64 base state dict and T perturbed fine-tunes."""
    torch.manual_seed(seed)
    base = state(Tiny().double())
    g = torch.Generator().manual_seed(seed + 1)
    fts = [{k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in base.items()} for _ in range(T)]
    return base, fts


def loader(sd: dict[str, torch.Tensor], cls=Tiny, prefix: str = ""):
    def load():
        m = cls().double()
        m.load_state_dict({prefix + k: v for k, v in sd.items()})
        return m

    return load


def examples(n: int, seed: int, min_len: int = 2, max_len: int = 8):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        out.append({"input_ids": torch.randint(1, V, (L,), generator=g), "labels": torch.tensor(i % C)})
    return out


def model_data(fts, n: int = 24, seed: int = 10, **kw) -> list[ModelData]:
    return [ModelData(examples(n, seed + t), loader(sd), **kw) for t, sd in enumerate(fts)]


def manual_covariances(sd: dict[str, torch.Tensor], exs, **shape) -> dict[str, torch.Tensor]:
    """sum x x^T of each linear layer's input, by a hand-written float64 forward, one example at a time."""
    m = Tiny(**shape).double()
    m.load_state_dict(sd)
    out: dict[str, torch.Tensor] = {}

    def add(name, x):
        out[name] = out.get(name, 0) + x.T @ x

    with torch.no_grad():
        for ex in exs:
            x = m.emb(ex["input_ids"])  # (L, d): no padding at all
            for i, blk in enumerate(m.layers):
                add(f"layers.{i}.up.weight", x)
                a = torch.tanh(blk["up"](x))
                add(f"layers.{i}.down.weight", a)
                x = x + blk["down"](a)
            add("head.weight", x.mean(0, keepdim=True))
    return out
