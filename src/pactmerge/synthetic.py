"""Small generated checkpoints in real formats, for tests, benchmarks and the offline demo.

A BERT-like layout (``encoder.layer.{i}.attention.query.weight``, ...), a pretrained base with a
decaying spectrum (so it has a meaningful core V_{0,K}) and fine-tunes whose task vectors are a
low-rank update plus small noise, written as HF folders (config.json, tokenizer files, sharded
safetensors with an index), a single .safetensors file or a .bin state dict.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from pactmerge.io.writer import ShardedWriter


def decaying_matrix(m: int, n: int, gen: torch.Generator, decay: float = 0.85, scale: float = 1.0) -> Tensor:
    """Random ``(m, n)`` matrix with singular values ``scale * decay**i``."""
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    s = scale * decay ** torch.arange(r, dtype=torch.float64)
    return (u * s) @ v.T


def base_state(
    layers: int = 2, hidden: int = 32, ffn: int | None = None, vocab: int = 50, seed: int = 0
) -> dict[str, Tensor]:
    """A BERT-like float32 state dict with structured (decaying-spectrum) matrices."""
    g = torch.Generator().manual_seed(seed)
    ffn = ffn or 2 * hidden
    sd: dict[str, Tensor] = {
        "embeddings.word_embeddings.weight": 0.1 * torch.randn(vocab, hidden, generator=g, dtype=torch.float64),
        "embeddings.LayerNorm.weight": torch.ones(hidden, dtype=torch.float64),
        "embeddings.LayerNorm.bias": torch.zeros(hidden, dtype=torch.float64),
        "embeddings.position_ids": torch.arange(16).unsqueeze(0),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.query", "attention.key", "attention.value", "attention.output"):
            sd[p + name + ".weight"] = decaying_matrix(hidden, hidden, g)
            sd[p + name + ".bias"] = 0.02 * torch.randn(hidden, generator=g, dtype=torch.float64)
        sd[p + "intermediate.dense.weight"] = decaying_matrix(ffn, hidden, g)
        sd[p + "intermediate.dense.bias"] = 0.02 * torch.randn(ffn, generator=g, dtype=torch.float64)
        sd[p + "output.dense.weight"] = decaying_matrix(hidden, ffn, g)
        sd[p + "output.dense.bias"] = 0.02 * torch.randn(hidden, generator=g, dtype=torch.float64)
        sd[p + "output.LayerNorm.weight"] = torch.ones(hidden, dtype=torch.float64)
    sd["pooler.dense.weight"] = decaying_matrix(hidden, hidden, g)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def finetune_state(base: dict[str, Tensor], seed: int, rank: int = 4, scale: float = 0.05) -> dict[str, Tensor]:
    """base + a task vector: rank-``rank`` update plus 10% noise on matrices, noise on vectors;
    integer buffers unchanged. ``scale`` is relative to each tensor's RMS."""
    g = torch.Generator().manual_seed(10_000 + seed)
    out = {}
    for name, w in base.items():
        if not w.is_floating_point():
            out[name] = w.clone()
            continue
        rms = float(w.double().pow(2).mean().sqrt()) or 1.0
        if w.ndim == 2:
            m, n = w.shape
            r = min(rank, m, n)
            low = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) / r**0.5
            d = low + 0.1 * torch.randn(m, n, generator=g)
        else:
            d = torch.randn(w.shape, generator=g)
        out[name] = w + scale * rms * d / float(d.pow(2).mean().sqrt())
    return out


def write_hf_folder(
    folder: Path, state: dict[str, Tensor], max_shard_bytes: int = 10**9, dtype: torch.dtype | None = None
) -> Path:
    """Write ``state`` as an HF model folder (sharded safetensors + index when it needs more than
    one shard), with a config.json and tokenizer files to be copied by a merge."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {n: (t.to(dtype) if (dtype is not None and t.is_floating_point()) else t) for n, t in state.items()}
    w = ShardedWriter(folder, [(n, tuple(t.shape), t.dtype) for n, t in state.items()], max_shard_bytes)
    for name, t in state.items():
        w.add(name, t)
    w.close()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertModel"], "generated_by": "pactmerge.synthetic"})
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"tok{i}" for i in range(46)]) + "\n"
    )
    return folder


def make_checkpoints(
    root: Path,
    n_models: int = 3,
    *,
    layers: int = 2,
    hidden: int = 32,
    ffn: int | None = None,
    max_shard_bytes: int = 10**9,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[Path, list[Path]]:
    """Write a base and ``n_models`` fine-tunes as HF folders under ``root``; return their paths."""
    root = Path(root)
    base = base_state(layers, hidden, ffn, seed=seed)
    base_dir = write_hf_folder(root / "base", base, max_shard_bytes, dtype)
    models = [
        write_hf_folder(root / f"task{t}", finetune_state(base, seed * 100 + t), max_shard_bytes, dtype)
        for t in range(n_models)
    ]
    return base_dir, models
