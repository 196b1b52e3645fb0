"""Write a merged model as an HF-style folder, atomically.

Tensors are buffered and flushed to a safetensors shard whenever the buffer would exceed the
maximum shard size, so memory holds at most one shard. Shards are named
``model-00001-of-0000N.safetensors`` (renamed at the end, when N is known) with
``model.safetensors.index.json``; a single shard is ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from pactmerge.errors import PactMergeError

WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json", "*.msgpack", "*.h5", "*.ckpt")


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '1.5 GiB' / 1000000 -> bytes."""
    if isinstance(size, int):
        return size
    s = str(size).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(float(s))


class ShardedWriter:
    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        tmp_name = f"shard-{len(self._shards) + 1:05d}.safetensors.part"
        save_file(self._buffer, str(self.folder / tmp_name), metadata={"format": "pt"})
        self._shards.append((tmp_name, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

    def close(self) -> list[str]:
        """Flush the last shard, give shards their final names, write the index. Returns file names."""
        self._flush()
        if not self._shards:
            save_file({}, str(self.folder / "model.safetensors"), metadata={"format": "pt"})
            return ["model.safetensors"]
        n = len(self._shards)
        final = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        weight_map = {}
        for (tmp, names), dst in zip(self._shards, final):
            os.replace(self.folder / tmp, self.folder / dst)
            weight_map.update({name: dst for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return final


def copy_non_weight_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and other non-weight files of an HF folder (top level only)."""
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or any(f.match(p) for p in WEIGHT_FILE_PATTERNS) or f.name in ("README.md", "pactmerge_config.yaml"):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


@contextlib.contextmanager
def atomic_output_dir(target: Path, overwrite: bool = False):
    """Yield a temporary folder beside ``target``; move it into place only if the block succeeds.

    On any exception the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise PactMergeError(f"{target}: output folder already exists (pass --overwrite to replace it)")
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
        os.replace(target, trash / "old")
        os.replace(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, target)
