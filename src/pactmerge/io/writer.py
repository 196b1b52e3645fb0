"""Write a merged model as an HF-style folder, atomically.

The plan knows every output tensor's name, shape and dtype before the first one is computed, so
the shard layout and each shard's safetensors header are fixed up front and every tensor is
written straight to its place in its shard as it arrives: no shard buffer, memory holds one
tensor. Shards are named ``model-00001-of-0000N.safetensors`` with
``model.safetensors.index.json``; a single shard is ``model.safetensors``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from pactmerge.io.output_guard import atomic_output_dir as atomic_output_dir  # its home was here
from pactmerge.io.sources import SAFETENSORS_DTYPES

WEIGHT_FILE_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.index.json",
    "*.msgpack",
    "*.h5",
    "*.ckpt",
    "*.onnx",
    "*.onnx_data",
    "*.gguf",
    "*.tflite",
    "*.ot",
)
# Written by pactmerge itself at the top of the output folder, so never copied from the base.
_OWN_FILES = ("README.md", "pactmerge_config.yaml")
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '1.5 GiB' / 1000000 -> a positive number of bytes.

    Raises:
        ValueError: anything else (a bool, zero or a negative number, an unknown unit), with the
            accepted forms in the message.
    """
    bad = f"{size!r} is not a size: give a positive number of bytes or a number with a unit, e.g. 2GB, 500MB, 1.5GiB"
    if isinstance(size, bool):
        raise ValueError(bad)
    if isinstance(size, int):
        if size < 1:
            raise ValueError(bad)
        return size
    m = _SIZE.match(size) if isinstance(size, str) else None
    if m is None or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(bad)
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    if not math.isfinite(value) or value < 1:
        raise ValueError(bad)
    return int(value)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


class ShardPlan:
    """Where every tensor of ``layout`` goes: its shard file and its byte range there.

    Fixed before any tensor is computed, so writers in different processes or machines (the
    Ray backend) can each fill their own tensors into the same files: :meth:`create` writes every
    shard's header and sizes the file, :meth:`write` puts one tensor at its offset, :meth:`finish`
    writes the index. The bytes are the same as :class:`ShardedWriter`'s, in any order of writes.

    Args:
        layout: ``[(name, shape, dtype), ...]`` of every tensor, in output order.
        max_shard_bytes: a shard is closed before a tensor that would make it larger (a single
            larger tensor gets a shard of its own).
    """

    def __init__(self, layout: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for entry in layout:
            nbytes = _nbytes(entry[1], entry[2])
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += nbytes
        n = len(groups)
        self.files = (
            ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        )
        self.groups = groups
        self.order = [(g, entry) for g, group in enumerate(groups) for entry in group]
        self.total_bytes = sum(_nbytes(s, d) for _, s, d in layout)
        self.headers: list[bytes] = []
        self.where: dict[str, tuple[int, int, int]] = {}  # name -> (shard, absolute offset, nbytes)
        for g, group in enumerate(groups):
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, dtype in group:
                nbytes = _nbytes(shape, dtype)
                header[name] = {
                    "dtype": _DTYPE_NAMES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
            head = struct.pack("<Q", len(raw)) + raw
            self.headers.append(head)
            for name, _, _ in group:
                begin, end = header[name]["data_offsets"]
                self.where[name] = (g, len(head) + begin, end - begin)
        self._entries = {name: (tuple(shape), dtype) for _, (name, shape, dtype) in self.order}

    def shard_size(self, g: int) -> int:
        return len(self.headers[g]) + sum(_nbytes(s, d) for _, s, d in self.groups[g])

    def create(self, folder: Path) -> None:
        """Write every shard's header and give the file its final size (the data still zero)."""
        for g, name in enumerate(self.files):
            with open(Path(folder) / name, "wb") as fh:
                fh.write(self.headers[g])
                fh.truncate(self.shard_size(g))

    def check(self, name: str, tensor: Tensor) -> None:
        if name not in self._entries:
            raise RuntimeError(f"writer: unexpected tensor {name!r} (not in the planned layout)")
        shape, dtype = self._entries[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(
                f"writer: got {name!r} {list(tensor.shape)} {tensor.dtype}, planned {name!r} {list(shape)} {dtype}"
            )

    def write(self, folder: Path, name: str, tensor: Tensor) -> None:
        """Write one tensor into its place in a shard :meth:`create` made (any order, any process)."""
        self.check(name, tensor)
        g, offset, _ = self.where[name]
        if tensor.numel():
            with open(Path(folder) / self.files[g], "r+b") as fh:
                fh.seek(offset)
                fh.write(_bytes_of(tensor))

    def finish(self, folder: Path) -> list[str]:
        """Write the index (several shards); returns the shard file names."""
        if len(self.files) > 1:
            weight_map = {name: self.files[g] for g, (name, _, _) in self.order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return list(self.files)


def _bytes_of(tensor: Tensor):
    # Flatten before the byte view: a 0-D tensor (CLIP's logit_scale) has no last dim to view.
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


class ShardedWriter:
    """Stream tensors, in ``layout`` order, into safetensors shards of at most ``max_shard_bytes``.

    Args:
        folder: where the shards (and the index) go.
        layout: ``[(name, shape, dtype), ...]`` of every tensor, in the order they will be added.
        max_shard_bytes: a shard is closed before a tensor that would make it larger (a single
            larger tensor gets a shard of its own). See :class:`ShardPlan`.
    """

    def __init__(self, folder: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.folder = Path(folder)
        self.plan = ShardPlan(layout, max_shard_bytes)
        self.files = self.plan.files
        self.total_bytes = self.plan.total_bytes
        self._order = self.plan.order
        self._next = 0
        self._open_group = -1
        self._fh: BinaryIO | None = None

    def _start_shard(self, g: int) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = open(self.folder / self.files[g], "wb")  # noqa: SIM115 -- one shard stays open across add() calls
        self._open_group = g
        self._write(self.plan.headers[g])

    def _write(self, data) -> None:
        assert self._fh is not None  # _start_shard opened it
        try:
            self._fh.write(data)
        except OSError as e:  # e.g. a full disk: name the shard (write() errors carry no file name)
            raise OSError(e.errno, e.strerror, str(self.folder / self.files[self._open_group])) from None

    def add(self, name: str, tensor: Tensor) -> None:
        if self._next >= len(self._order):
            raise RuntimeError(f"writer: unexpected tensor {name!r} (every planned tensor was written)")
        g, (want, shape, dtype) = self._order[self._next]
        if name != want or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(
                f"writer: got {name!r} {list(tensor.shape)} {tensor.dtype}, planned {want!r} {list(shape)} {dtype}"
            )
        if g != self._open_group:
            self._start_shard(g)
        if tensor.numel():
            self._write(_bytes_of(tensor))
        self._next += 1

    def abort(self) -> None:
        """Close the open shard unfinished (after a failure; the caller discards the folder)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> list[str]:
        """Finish the last shard and write the index; returns the shard file names."""
        if self._next != len(self._order):
            raise RuntimeError(f"writer: only {self._next} of {len(self._order)} planned tensors were written")
        if self._open_group < 0:  # nothing planned: an empty but valid file
            self._start_shard(0)
        assert self._fh is not None
        self._fh.close()
        self._fh = None
        return self.plan.finish(self.folder)


def copy_non_weight_files(src: Path, dst: Path) -> list[str]:
    """Copy the non-weight files of an HF folder: config, tokenizer, and the subfolders'
    (e.g. sentence-transformers modules ``1_Pooling/``, and ``2_Normalize/``, which is empty).
    Weight files (:data:`WEIGHT_FILE_PATTERNS`) are never copied, nor hidden files and folders
    (``.git``, ``.cache``), nor the top-level ``README.md`` (the output has its own card).

    Returns:
        The copied files' paths relative to ``src`` (POSIX form), sorted.
    """
    copied = []
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if f.is_dir():
            if not any(f.iterdir()):  # an empty module folder still has to exist
                (dst / rel).mkdir(parents=True, exist_ok=True)
            continue
        if any(f.match(p) for p in WEIGHT_FILE_PATTERNS) or (len(rel.parts) == 1 and f.name in _OWN_FILES):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst / rel)  # content only: the output's modes follow the umask
        copied.append(rel.as_posix())
    return copied
