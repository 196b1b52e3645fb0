"""The on-disk cache of calibration statistics.

One safetensors file per (model, data, N, kind)::

    <cache_dir>/<kind>-<key>.safetensors
    key = sha256({kind, model fingerprint, data fingerprint, N, storage dtype, format version})[:24]

* the *model fingerprint* is the sha256 of every tensor of the checkpoint (name, dtype, shape,
  bytes), so a retrained model in the same path gets a new key; for file checkpoints it is
  remembered for the process while the files' size, mtime and inode stay the same;
* the *data fingerprint* is the sha256 of the N examples used (every key, dtype, shape and
  byte) and the data's ``tag`` (e.g. the loss's frozen head).

The file's metadata repeats all of these; a file whose metadata does not match what is asked for
(another model or data under a colliding or copied name, a different format) is recomputed and
replaced, never used. Files are written to a temporary name and renamed into place when complete.

Tensors are stored under the checkpoint's parameter names, in ``calibration.dtype`` (float32 by
default; the sums are accumulated in float64 either way): ``covariance`` files hold
``sum x x^T`` (``(d_in, d_in)``) per linear weight, ``fisher`` files the mean squared gradient
(the parameter's shape). The metadata also has, per tensor, ``counts`` (rows summed: tokens for
a covariance; examples for a Fisher) and ``layouts`` (``out_in`` or ``in_out``, see
:mod:`pactmerge.stats.hooks`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pactmerge.io.sources import Source
from pactmerge.stats.data import Example

FORMAT_VERSION = 1
META_KEY = "pactmerge_stats"
_FINGERPRINTS: dict[tuple, str] = {}


def default_cache_dir() -> Path:
    """``$PACTMERGE_STATS_CACHE``, else ``~/.cache/pactmerge/stats``."""
    env = os.environ.get("PACTMERGE_STATS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pactmerge" / "stats"


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _file_state(label: str) -> tuple | None:
    """Size, mtime and inode of a checkpoint's files (a file, or a folder's files), or None."""
    path = Path(label)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json"))
    else:
        return None
    return tuple((str(p), (st := p.stat()).st_size, st.st_mtime_ns, st.st_ino) for p in files)


def model_fingerprint(src: Source) -> str:
    """sha256 of every tensor of a checkpoint (see the module doc)."""
    state = _file_state(src.label) if src.folder is not None or Path(src.label).is_file() else None
    memo_key = (src.label, state) if state is not None else None
    if memo_key is not None and memo_key in _FINGERPRINTS:
        return _FINGERPRINTS[memo_key]
    h = hashlib.sha256()
    for name in src.names():
        t = src.get(name)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    digest = h.hexdigest()
    if memo_key is not None:
        _FINGERPRINTS[memo_key] = digest
    return digest


def data_fingerprint(examples: Sequence[Example], tag: str = "") -> str:
    """sha256 of the examples (keys, dtypes, shapes, bytes) and the tag."""
    h = hashlib.sha256(f"tag|{tag}|n|{len(examples)}|".encode())
    for ex in examples:
        for key in sorted(ex):
            t = torch.as_tensor(ex[key])
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


def identity(kind: str, model: str, data: str, n: int, dtype: str = "float32") -> dict[str, Any]:
    """What a statistics file must have been computed from (and its storage dtype)."""
    return {"kind": kind, "model": model, "data": data, "n": n, "dtype": dtype, "version": FORMAT_VERSION}


def cache_path(cache_dir: Path, ident: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{ident['kind']}-{key}.safetensors"


def read_meta(path: Path) -> dict[str, Any] | None:
    """The statistics metadata of a cache file, or None if it is missing or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta[META_KEY])
    except Exception:  # corrupt, truncated, foreign: recompute
        return None


def is_valid(path: Path, ident: dict[str, Any]) -> bool:
    """True if ``path`` holds statistics computed from exactly ``ident``."""
    meta = read_meta(path)
    return meta is not None and all(meta.get(k) == v for k, v in ident.items())


def write_stats(
    path: Path, ident: dict[str, Any], tensors: dict[str, Tensor], counts: dict[str, int], layouts: dict[str, str]
) -> None:
    """Write a statistics file atomically (a temporary sibling, renamed into place)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**ident, "counts": counts, "layouts": layouts}
    dtype = torch.float64 if ident.get("dtype") == "float64" else torch.float32
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(
            {k: v.detach().to(dtype).cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={META_KEY: json.dumps(meta)},
        )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
