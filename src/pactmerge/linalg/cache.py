"""An on-disk cache of subspaces computed from the base model (PACT's ``V_{0,K}``).

The base model is the same across many merges (other fine-tunes, other alpha, other methods),
and its top-K right singular vectors are one of the ``T + 1`` SVDs PACT needs per matrix. With
``cache_dir`` (``pactmerge merge --cache-dir DIR``, ``merge(cache_dir=...)``) they are stored
once and read back afterwards.

Key: a SHA-256 of the base parameter's values (its bytes in the compute dtype -- what the base
file holds for it, converted), its shape, K, the SVD options that shape the result (method;
oversample, power iterations and the per-parameter seed when randomized), the device type,
torch's version and this cache's format. A different base file, another K or other options give
another key; nothing is ever invalidated in place. A hit returns the stored tensor itself, so a
cached run computes the same bytes as the run that filled the cache.
Entries are small safetensors files (``n x K`` values), written atomically (several workers or
Ray tasks may fill the same cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

FORMAT = 1


def tensor_digest(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and values (read from its bytes; CPU copy if needed)."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    data = t.detach().contiguous().cpu()
    if data.numel():
        h.update(data.view(torch.uint8).reshape(-1).numpy().data)
    return h.hexdigest()


class SubspaceCache:
    """Stored subspaces in ``folder`` (created on first write)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        self.hits = 0
        self.misses = 0

    def key(self, source: Tensor, **options) -> str:
        """The entry name for ``source`` and the computation's ``options`` (JSON-able values)."""
        meta = {
            "format": FORMAT,
            "torch": torch.__version__,
            "device": source.device.type,
            "source": tensor_digest(source),
            **options,
        }
        return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()

    def get_or_compute(self, source: Tensor, compute: Callable[[], Tensor], **options) -> Tensor:
        """The stored result for ``(source, options)``, or ``compute()`` stored under that key.

        Returns it on ``source``'s device, in the computed dtype."""
        from safetensors.torch import load_file, save_file

        path = self.folder / f"{self.key(source, **options)}.safetensors"
        if path.is_file():
            try:
                value = load_file(str(path))["value"]
                self.hits += 1
                return value.to(source.device)
            except Exception:  # a damaged entry is recomputed and replaced
                pass
        self.misses += 1
        value = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=self.folder)
        os.close(fd)
        try:
            save_file({"value": value.detach().contiguous().cpu()}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return value
