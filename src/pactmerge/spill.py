"""Pre-filtered task vectors kept on disk between the statistics passes of one ``prepare``.

A method that needs model-wide statistics (TIES, PCB, Consensus-TIES, DELLA in model scope) streams
the model several times before merging: min/max, sums, then the radix passes of an exact top-k
selection. Each pass sees the task vectors *after* the pre filters, so without a spill every pass
runs the filters again -- PACT's SVDs and projections, the expensive part of a PACT-then-TIES
merge. A :class:`FilteredSpill` writes each parameter's filtered task vectors to a temporary folder
during the first full pass (in the caller's process, whatever backend computed them), and the later
passes read them back instead: the filters run once per parameter.

The values read back are the bytes written (same dtype, same layout, safetensors files), so a merge
with a spill equals one without, bit for bit. The spill holds ``T`` task vectors of every merged
parameter in the compute dtype; :func:`spill_bytes` estimates it, and the engine spills only when it
fits in half the free space of :func:`spill_dir`: ``$PACTMERGE_SPILL_DIR``, else
``~/.cache/pactmerge/spill`` (on disk beside the other caches, not a ``/tmp`` that may live in
memory). ``PACTMERGE_SPILL_DIR=none`` turns the spill off.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pactmerge.lowrank import Delta


def spill_bytes(shapes: list[tuple[int, ...]], num_models: int, dtype: torch.dtype) -> int:
    """Bytes of ``num_models`` task vectors of every shape in ``shapes`` stored in ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(shape) for shape in shapes) * itemsize * num_models


def spill_dir() -> Path | None:
    """``$PACTMERGE_SPILL_DIR``, else ``~/.cache/pactmerge/spill``; None when it is ``none`` (no spill)."""
    env = os.environ.get("PACTMERGE_SPILL_DIR")
    if env is not None and env.strip().lower() == "none":
        return None
    return Path(env) if env else Path.home() / ".cache" / "pactmerge" / "spill"


def spill_fits(nbytes: int, directory: Path) -> bool:
    """Whether ``nbytes`` fit in half the free space of ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    return nbytes <= shutil.disk_usage(directory).free // 2


class FilteredSpill:
    """One statistics stage's filtered task vectors, one safetensors file per parameter.

    ``put`` during the first pass, ``get`` in the later ones; ``complete`` is set by the caller once
    a pass has put every parameter. Only dense tensors are spilled: a pass that yields a low-rank
    update marks the spill ``disabled`` and the caller recomputes instead. ``close`` deletes the
    folder (also when the merge fails).
    """

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="merge-", dir=directory))
        self.complete = False
        self.disabled = False
        self._files: dict[str, Path] = {}

    def put(self, name: str, deltas: list[Delta]) -> None:
        """Write ``name``'s task vectors (kept as they are: dtype, and a transposed view's layout)."""
        if self.disabled:
            return
        if not all(isinstance(d, Tensor) for d in deltas):
            self.disabled = True
            return
        tensors: dict[str, Tensor] = {}
        for i, d in enumerate(deltas):
            assert isinstance(d, Tensor)
            # A transposed view (an (in, out) weight seen as (out, in)) is stored as its contiguous
            # transpose and read back as the same view, so later passes see the same strides.
            if d.dim() == 2 and not d.is_contiguous() and d.mT.is_contiguous():
                tensors[f"t{i}"] = d.mT.detach().cpu()
            else:
                tensors[f"c{i}"] = d.detach().contiguous().cpu()
        path = self.root / f"{len(self._files)}.safetensors"
        save_file(tensors, str(path))
        self._files[name] = path

    def get(self, name: str, device: torch.device) -> list[Tensor]:
        """``name``'s task vectors as written, on ``device``."""
        loaded = load_file(str(self._files[name]))
        out: list[Tensor] = []
        for i in range(len(loaded)):
            if f"t{i}" in loaded:
                out.append(loaded[f"t{i}"].to(device).mT)
            else:
                out.append(loaded[f"c{i}"].to(device))
        return out

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self._files.clear()
