"""Lazy checkpoint sources.

A :class:`Source` knows every parameter's name, shape and dtype without reading data, and reads
one tensor at a time. Supported inputs:

* a Hugging Face model folder: ``model.safetensors``, or shards ``model-*.safetensors`` with
  ``model.safetensors.index.json``; ``pytorch_model.bin`` (or its sharded index) as a fallback;
* a single ``.safetensors`` file (memory-mapped; our own header parser, so truncation and
  corruption are reported with the file and parameter name);
* a PyTorch ``.bin`` / ``.pt`` state dict, loaded with ``weights_only=True`` (never unpickling
  arbitrary objects) and ``mmap=True`` where the file format allows;
* an in-memory ``dict[str, Tensor]`` (Python API);
* a Hugging Face Hub id (``owner/name[@revision]``) that is not an existing path: its folder in
  the local Hugging Face cache (:mod:`pactmerge.io.hub`; never downloaded).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.io.hub import local_reference

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    SAFETENSORS_DTYPES.update({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2})

_PAGE = mmap.PAGESIZE


class Source:
    """A lazily-read checkpoint. Subclasses fill ``_meta`` (name -> (shape, dtype)) in order."""

    def __init__(self, label: str, folder: Path | None = None):
        self.label = label  # how errors name this input (a path, or "<in-memory model 2>")
        self.folder = folder  # an HF folder whose non-weight files may be copied to the output
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def names(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str) -> Tensor:
        """One tensor, read without a defensive copy: it may share memory with the input (an
        in-memory state dict, a memory-mapped file), so callers must treat it as read-only.
        Write into :meth:`torch.Tensor.clone` of it, or into the result of a conversion."""
        raise NotImplementedError

    def release(self, name: str) -> None:
        """A hint that ``name`` is no longer needed: memory-mapped sources drop its pages from
        the resident set (they stay in the page cache; a later read maps them again)."""

    def file_of(self, name: str) -> str:
        """The file holding ``name`` (for error messages)."""
        return self.label

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DictSource(Source):
    def __init__(self, state: Mapping[str, Tensor], label: str):
        super().__init__(label)
        self._state = state
        for name, t in state.items():
            if not isinstance(t, Tensor):
                raise PactMergeError(f"{label}: parameter {name!r} is a {type(t).__name__}, not a torch.Tensor")
            self._meta[name] = (tuple(t.shape), t.dtype)

    def get(self, name: str) -> Tensor:
        return self._state[name].detach().to("cpu")  # the caller's tensor itself: read-only


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_safetensors_header(
    raw: bytes, data_len: int, label: str
) -> dict[str, tuple[tuple[int, ...], torch.dtype, int, int]]:
    """Parse and check a safetensors JSON header.

    Args:
        raw: the header bytes (after the 8-byte length).
        data_len: bytes in the file after the header (the data buffer).
        label: the file, for error messages.

    Returns:
        ``{name: (shape, dtype, begin, end)}`` in the header's order; ``begin``/``end`` are offsets
        into the data buffer.

    Raises:
        PactMergeError: naming the file (and the parameter) for invalid JSON, a duplicated key, a
            non-integer or negative shape/offset (``Infinity``, ``1.5``, ``true``), an unknown dtype,
            a byte range of the wrong length, past the end of the file, or overlapping another.
    """
    try:
        header = json.loads(raw, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise PactMergeError(f"{label}: corrupt safetensors header ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(header, dict):
        raise PactMergeError(f"{label}: corrupt safetensors header (not a JSON object)")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise PactMergeError(f"{label}: corrupt safetensors header (__metadata__ is not an object)")
    out: dict[str, tuple[tuple[int, ...], torch.dtype, int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        bad = f"{label}: corrupt safetensors header entry for parameter {name!r}"
        if not isinstance(entry, dict):
            raise PactMergeError(f"{bad} (not an object)")
        dtype_name = entry.get("dtype")
        dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise PactMergeError(f"{bad} (unsupported dtype {dtype_name!r})")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise PactMergeError(f"{bad} (shape {shape!r} is not a list of non-negative integers)")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets):
            raise PactMergeError(f"{bad} (data_offsets {offsets!r} is not two non-negative integers)")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes:
            raise PactMergeError(
                f"{label}: corrupt safetensors file: parameter {name!r} has {end - begin} bytes, expected {nbytes}"
            )
        if end > data_len:
            raise PactMergeError(
                f"{label}: truncated safetensors file: parameter {name!r} ends past the end of the file"
            )
        out[name] = (tuple(shape), dtype, begin, end)
    # Two tensors may not share bytes (an empty one occupies none).
    spans = sorted((b, e, n) for n, (_, _, b, e) in out.items() if e > b)
    for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise PactMergeError(
                f"{label}: corrupt safetensors file: parameters {name0!r} and {name1!r} overlap in the data buffer"
            )
    return out


class SafetensorsFile(Source):
    """One ``.safetensors`` file, memory-mapped; the header is parsed and checked up front."""

    def __init__(self, path: Path, folder: Path | None = None):
        super().__init__(str(path), folder)
        self.path = path
        try:
            self._file = open(path, "rb")  # noqa: SIM115 -- held open for the mmap until close()
        except OSError as e:
            raise PactMergeError(f"{path}: cannot open ({e.strerror})") from None
        try:
            size, header_len, entries = self._read_header(path)
        except OSError as e:
            self._file.close()
            raise PactMergeError(f"{path}: cannot read ({e.strerror})") from None
        except BaseException:
            self._file.close()
            raise
        self._data_start = 8 + header_len
        self._offsets: dict[str, tuple[int, int]] = {}
        for name, (shape, dtype, begin, end) in entries.items():
            self._meta[name] = (shape, dtype)
            self._offsets[name] = (begin, end)
        # Keep the checkpoint's own order of parameters (by file offset), as written.
        self._meta = dict(sorted(self._meta.items(), key=lambda kv: self._offsets[kv[0]][0]))
        # Copy-on-write: get() hands out views of this mapping; a stray write stays private.
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None

    def _read_header(self, path: Path) -> tuple[int, int, dict]:
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise PactMergeError(f"{path}: truncated or corrupt safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        if header_len > size - 8 or header_len > 100 * 2**20:
            raise PactMergeError(
                f"{path}: truncated or corrupt safetensors file (header length {header_len} > file size)"
            )
        return size, header_len, parse_safetensors_header(self._file.read(header_len), size - 8 - header_len, str(path))

    def get(self, name: str) -> Tensor:
        """A zero-copy view of the tensor's bytes in the mapping (copy-on-write: writing to it
        never reaches the file). Unaligned data (a writer that did not pad) is copied."""
        shape, dtype = self._meta[name]
        begin, end = self._offsets[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        assert self._mm is not None  # a non-empty range implies a non-empty, mapped file
        start = self._data_start + begin
        raw = torch.frombuffer(self._mm, dtype=torch.uint8, count=end - begin, offset=start)
        if start % raw.new_empty((), dtype=dtype).element_size():
            raw = raw.clone()
        return raw.view(dtype).reshape(shape)

    def release(self, name: str) -> None:
        # Drop the mapped pages from this process's resident set (they stay in the page cache):
        # otherwise RSS would grow to the whole checkpoint over a merge.
        begin, end = self._offsets[name]
        if self._mm is None or end == begin:
            return
        start = self._data_start + begin
        aligned = start - start % _PAGE
        with contextlib.suppress(AttributeError, OSError, ValueError):
            self._mm.madvise(mmap.MADV_DONTNEED, aligned, self._data_start + end - aligned)

    def close(self) -> None:
        # Tensors from get() keep the mapping alive (they hold a reference to it): dropping ours
        # unmaps it once the last of them is gone, never under a tensor still in use.
        self._mm = None
        self._file.close()


class TorchFile(Source):
    """A PyTorch state dict (``.bin`` / ``.pt``), loaded with ``weights_only=True``."""

    def __init__(self, path: Path, folder: Path | None = None):
        super().__init__(str(path), folder)
        if not path.is_file():
            raise PactMergeError(f"{path}: no such file")
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PactMergeError(f"{path}: cannot load as a weights-only PyTorch state dict ({first})") from None
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise PactMergeError(f"{path}: not a state dict (a {type(state).__name__})")
        self._state = {}
        for name, t in state.items():
            if not isinstance(t, Tensor):
                raise PactMergeError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
            self._state[name] = t
            self._meta[name] = (tuple(t.shape), t.dtype)

    def get(self, name: str) -> Tensor:
        return self._state[name]  # memory-mapped (copy-on-write) or loaded: read-only


class MultiFileSource(Source):
    """Several files (shards) seen as one checkpoint."""

    def __init__(self, label: str, parts: list[Source], folder: Path | None = None):
        super().__init__(label, folder)
        self._parts = parts
        self._where: dict[str, Source] = {}
        for part in parts:
            for name in part.names():
                if name in self._where:
                    raise PactMergeError(
                        f"{label}: parameter {name!r} appears in two shards ({self._where[name].label}, {part.label})"
                    )
                self._where[name] = part
                self._meta[name] = (part.shape(name), part.dtype(name))

    def get(self, name: str) -> Tensor:
        return self._where[name].get(name)

    def file_of(self, name: str) -> str:
        return self._where[name].label

    def release(self, name: str) -> None:
        self._where[name].release(name)

    def close(self) -> None:
        for p in self._parts:
            p.close()


def _open_file(path: Path, folder: Path | None = None) -> Source:
    if path.suffix == ".safetensors":
        return SafetensorsFile(path, folder)
    if path.suffix in (".bin", ".pt", ".pth"):
        return TorchFile(path, folder)
    raise PactMergeError(
        f"{path}: unsupported checkpoint file (expected .safetensors, .bin, .pt or an HF model folder)"
    )


def _open_index(folder: Path, index: Path) -> Source:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PactMergeError(f"{index}: cannot read the shard index ({e})") from None
    files = list(dict.fromkeys(weight_map.values()))  # first-appearance order
    parts = []
    for f in files:
        shard = folder / f
        if not shard.is_file():
            raise PactMergeError(f"{shard}: shard listed in {index.name} is missing")
        parts.append(_open_file(shard, folder))
    src = MultiFileSource(str(folder), parts, folder)
    missing = [n for n in weight_map if n not in src]
    if missing:
        raise PactMergeError(
            f"{index}: parameter {missing[0]!r} is listed but not in its shard {weight_map[missing[0]]}"
        )
    return src


def _open_folder(folder: Path) -> Source:
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / single).is_file():
            return _open_file(folder / single, folder)
        if (folder / index).is_file():
            return _open_index(folder, folder / index)
    shards = sorted(folder.glob("model-*.safetensors"))
    if shards:  # shards without an index: take them all
        return MultiFileSource(str(folder), [_open_file(s, folder) for s in shards], folder)
    raise PactMergeError(
        f"{folder}: no weights found (expected model.safetensors, model-*.safetensors with "
        "model.safetensors.index.json, or pytorch_model.bin)"
    )


def open_source(spec: str | os.PathLike | Mapping[str, Tensor], label: str | None = None) -> Source:
    """Open a checkpoint lazily: an HF folder, a .safetensors / .bin / .pt file, a state dict, or a Hub id
    in the local Hugging Face cache."""
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, Mapping):
        return DictSource(spec, label or "<in-memory state dict>")
    path = Path(local_reference(spec)).expanduser()
    if path.is_dir():
        return _open_folder(path)
    if not path.exists():
        raise PactMergeError(f"{path}: no such file or directory")
    return _open_file(path)
