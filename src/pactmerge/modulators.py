"""Task-specific merge results: one shared merged task vector plus, per task, a *modulator*.

Most methods return one merged task vector per parameter. Some also recover each task's own
update from it when the task is known at inference time -- TALL masks (a binary mask per task),
TSV-C (each task's low-rank update), EMR (a mask and a rescaler per task). Such a method returns
a :class:`TaskSpecific` instead of a tensor: the shared merged task vector (which gives the
merged model, as for every other method) and one :class:`Modulator` per task.

Task ``t``'s update of one parameter, with ``alpha`` the config's ``alpha``::

    u_t = replacement_t   if the modulator has one (dense or low-rank), else the shared vector
    u_t = mask_t * u_t    if it has a mask (boolean, the parameter's shape)
    u_t = scale_t * u_t   if it has a scale (a number)
    theta_t = theta_0 + alpha * u_t

A parameter for which task ``t`` has no modulator keeps the merged model's value.

On disk, beside the merged model (``OUT/model*.safetensors``)::

    OUT/task_modulators/modulators.json
    OUT/task_modulators/task_000.safetensors, task_001.safetensors, ...

``modulators.json`` (format ``pactmerge.task_modulators``, version 1)::

    {"format": "pactmerge.task_modulators", "version": 1,
     "method": "tall_masks", "alpha": 1.0,
     "base_model": "/path/to/base" | null,      # where theta_0 comes from when materialising
     "mask_bit_order": "little",
     "tasks": [{"index": 0, "model": "/path/to/model0", "file": "task_000.safetensors"}, ...],
     "parameters": {"<name>": {"shape": [m, n]}, ...}}   # every parameter some task modulates

Each ``task_XXX.safetensors`` holds, for every modulated parameter ``<name>`` of that task:

* ``<name>:mask`` -- uint8, ``ceil(numel / 8)`` bytes: the flattened boolean mask packed 8 entries
  per byte, first entry in the lowest bit (``numpy.packbits(..., bitorder="little")``);
* ``<name>:scale`` -- float64, shape ``[]``;
* ``<name>:delta`` -- a dense replacement, the parameter's shape (compute dtype);
* ``<name>:B``, ``<name>:A`` -- a low-rank replacement ``B @ A``, ``(m, r)`` and ``(r, n)``.

:func:`materialize` writes task ``t``'s full model as an HF folder. It reads ``theta_0`` from the
base model (the path recorded in ``modulators.json``, or one given); for a mask or scale on the
shared vector it uses ``alpha * shared = theta - theta_0`` from the merged model itself, so a
mask alone selects, entry by entry, the merged value or the pretrained one -- exactly, in any
output dtype.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

import numpy as np
import torch
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.io.sources import SAFETENSORS_DTYPES, Source, open_source
from pactmerge.lowrank import Delta, LowRankDelta, densify

FORMAT = "pactmerge.task_modulators"
VERSION = 1
FOLDER = "task_modulators"
INDEX = "modulators.json"
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass
class Modulator:
    """How one task's update of one parameter differs from the shared merged task vector.

    Attributes:
        mask: boolean tensor of the parameter's shape, or None.
        scale: a number multiplying the update, or None.
        replacement: the task's own update (dense tensor or :class:`LowRankDelta`) used instead of
            the shared vector, or None.
    """

    mask: Tensor | None = None
    scale: float | None = None
    replacement: Delta | None = None

    def __post_init__(self):
        if self.mask is not None and self.mask.dtype != torch.bool:
            raise ValueError(f"Modulator.mask must be boolean, got {self.mask.dtype}")

    @property
    def is_empty(self) -> bool:
        return self.mask is None and self.scale is None and self.replacement is None

    def apply(self, shared: Tensor) -> Tensor:
        """``u_t`` (see module doc) as a dense tensor, from the shared merged task vector."""
        u = densify([self.replacement])[0] if self.replacement is not None else shared
        if self.mask is not None:
            u = torch.where(self.mask.to(u.device), u, torch.zeros((), dtype=u.dtype, device=u.device))
        if self.scale is not None:
            u = u * self.scale
        return u


@dataclass
class TaskSpecific:
    """A method's result for one parameter: the shared merged task vector and one modulator per task."""

    shared: Delta
    per_task: list[Modulator]


MethodResult: TypeAlias = "Tensor | LowRankDelta | TaskSpecific"  # what a method returns


def split_result(result: MethodResult) -> tuple[Delta, list[Modulator] | None]:
    """``(shared, modulators)``; ``modulators`` is None for a plain merged task vector."""
    if isinstance(result, TaskSpecific):
        return result.shared, result.per_task
    return result, None


def map_updates(result: MethodResult, fn: Callable[[Delta], Delta]) -> MethodResult:
    """``fn`` applied to the shared vector and to every replacement (e.g. a post filter, which
    rewrites *a merged update*: for TSV-C each task's replacement is that task's merged update).
    Masks and scales are kept as they are."""
    if not isinstance(result, TaskSpecific):
        return fn(result)
    per_task = [
        Modulator(m.mask, m.scale, fn(m.replacement) if m.replacement is not None else None) for m in result.per_task
    ]
    return TaskSpecific(fn(result.shared), per_task)


def pack_mask(mask: Tensor) -> Tensor:
    """A boolean tensor as uint8 bytes, 8 entries per byte, first entry in the lowest bit."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().reshape(-1), bitorder="little"))


def unpack_mask(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_mask` for a mask of ``shape``."""
    numel = int(np.prod(shape)) if len(shape) else 1
    bits = np.unpackbits(packed.cpu().numpy(), count=numel, bitorder="little").astype(bool)
    return torch.from_numpy(bits).reshape(tuple(shape))


# -- writing ----------------------------------------------------------------------------------


class _StreamingSafetensors:
    """A safetensors file written one tensor at a time without knowing the layout up front:
    tensor bytes go to a scratch file; :meth:`close` writes the header, then copies them after it."""

    def __init__(self, path: Path):
        self.path = path
        self._scratch = path.with_name(path.name + ".data")
        self._fh: BinaryIO = open(self._scratch, "wb")  # noqa: SIM115 -- open across add() calls
        self._header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self._offset = 0

    def add(self, name: str, tensor: Tensor) -> None:
        # Flatten before viewing as bytes: a contiguous tensor may keep odd strides on size-1 dims.
        t = tensor.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self._header[name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self._offset, self._offset + len(raw)],
        }
        self._fh.write(raw)
        self._offset += len(raw)

    def close(self) -> None:
        self._fh.close()
        head = json.dumps(self._header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(self.path, "wb") as out, open(self._scratch, "rb") as data:
            out.write(struct.pack("<Q", len(head)) + head)
            shutil.copyfileobj(data, out, 1 << 24)
        self._scratch.unlink()


class ModulatorWriter:
    """Writes ``task_modulators/`` into a (temporary) output folder, one parameter at a time.

    Args:
        folder: the merged model's folder (``task_modulators/`` is created inside it).
        tasks: one label per task (the models' paths, or placeholders for in-memory models).
        method: the method's name (recorded).
        alpha: the config's alpha (recorded; replacements are scaled by it when materialising).
        base_model: path of the base model, recorded for :func:`materialize` (None for in-memory).
    """

    def __init__(self, folder: Path, tasks: Sequence[str], *, method: str, alpha: float, base_model: str | None = None):
        self.dir = Path(folder) / FOLDER
        self.dir.mkdir(parents=True, exist_ok=True)
        self._files = [f"task_{t:03d}.safetensors" for t in range(len(tasks))]
        self._writers = [_StreamingSafetensors(self.dir / f) for f in self._files]
        self._index: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "method": method,
            "alpha": float(alpha),
            "base_model": base_model,
            "mask_bit_order": "little",
            "tasks": [{"index": t, "model": label, "file": f} for t, (label, f) in enumerate(zip(tasks, self._files))],
            "parameters": {},
        }

    def add(self, name: str, shape: Sequence[int], modulators: Sequence[Modulator]) -> None:
        """Record the modulators of parameter ``name`` (``len(modulators)`` == number of tasks)."""
        if len(modulators) != len(self._writers):
            raise RuntimeError(f"{name}: {len(modulators)} modulators for {len(self._writers)} tasks")
        if all(m.is_empty for m in modulators):
            return
        self._index["parameters"][name] = {"shape": [int(s) for s in shape]}
        for writer, mod in zip(self._writers, modulators):
            if mod.mask is not None:
                writer.add(f"{name}:mask", pack_mask(mod.mask))
            if mod.scale is not None:
                writer.add(f"{name}:scale", torch.tensor(float(mod.scale), dtype=torch.float64))
            if isinstance(mod.replacement, LowRankDelta):
                writer.add(f"{name}:B", mod.replacement.B)
                writer.add(f"{name}:A", mod.replacement.A)
            elif mod.replacement is not None:
                writer.add(f"{name}:delta", mod.replacement)

    def close(self) -> None:
        for w in self._writers:
            w.close()
        (self.dir / INDEX).write_text(json.dumps(self._index, indent=1))


# -- reading and materialising ------------------------------------------------------------------


def read_index(out_dir: str | os.PathLike) -> dict:
    """The parsed ``task_modulators/modulators.json`` of a merged model folder (checked)."""
    path = Path(out_dir) / FOLDER / INDEX
    try:
        index = json.loads(path.read_text())
    except OSError:
        raise PactMergeError(
            f"{path}: no task modulators here (only methods with per-task outputs, e.g. tall_masks or tsv_c, write"
            " them)"
        ) from None
    except json.JSONDecodeError as e:
        raise PactMergeError(f"{path}: corrupt ({e})") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise PactMergeError(
            f"{path}: not a pactmerge task-modulator index of version {VERSION} (format {index.get('format')!r},"
            f" version {index.get('version')!r})"
        )
    return index


def resolve_task(index: dict, task: int | str) -> dict:
    """The index entry of ``task``: its number, or its model's recorded label (or that label's last path part)."""
    tasks = index["tasks"]
    if isinstance(task, str) and task.lstrip("-").isdigit():
        task = int(task)
    if isinstance(task, int):
        if not 0 <= task < len(tasks):
            raise PactMergeError(f"task {task}: out of range (this merge has tasks 0..{len(tasks) - 1})")
        return tasks[task]
    for entry in tasks:
        label = str(entry["model"])
        if task in (label, Path(label).name):
            return entry
    known = ", ".join(f"{e['index']}={e['model']}" for e in tasks)
    raise PactMergeError(f"task {task!r}: no such task (known: {known})")


def iter_task_params(merged: Source, base: Source, task_file: Source, index: dict) -> Iterator[tuple[str, Tensor]]:
    """``(name, theta_t)`` for every parameter of the merged model, in its order (see module doc).

    Modulated parameters are computed in float64 when the base is float64, else float32, and cast
    to the merged tensor's dtype; the others are the merged model's tensors.
    """
    alpha = float(index["alpha"])
    params = index["parameters"]
    for name in merged.names():
        theta = merged.get(name)
        has = [s for s in ("mask", "scale", "delta", "B") if f"{name}:{s}" in task_file]
        if name not in params or not has:
            yield name, theta
            continue
        if name not in base:
            raise PactMergeError(f"{base.label}: missing parameter {name!r} (needed to materialise the task model)")
        theta0 = base.get(name)
        if tuple(theta0.shape) != tuple(theta.shape):
            raise PactMergeError(
                f"{base.label}: parameter {name!r} has shape {list(theta0.shape)}, the merged model has"
                f" {list(theta.shape)} (wrong base model?)"
            )
        dtype = torch.float64 if theta0.dtype == torch.float64 else torch.float32
        mask = unpack_mask(task_file.get(f"{name}:mask"), theta.shape) if "mask" in has else None
        scale = float(task_file.get(f"{name}:scale")) if "scale" in has else None
        if "delta" in has or "B" in has:
            if "delta" in has:
                repl = task_file.get(f"{name}:delta").to(dtype)
            else:
                repl = task_file.get(f"{name}:B").to(dtype) @ task_file.get(f"{name}:A").to(dtype)
            update = alpha * Modulator(mask, scale).apply(repl)
            out = theta0.to(dtype) + update
        elif scale is None and mask is not None:
            # Exact selection: alpha * (mask * shared) = mask * (theta - theta_0).
            out = torch.where(mask, theta, theta0.to(theta.dtype))
        else:
            shared_times_alpha = theta.to(dtype) - theta0.to(dtype)
            out = theta0.to(dtype) + Modulator(mask, scale).apply(shared_times_alpha)
        yield name, out.to(theta.dtype)


def materialize(
    out_dir: str | os.PathLike,
    task: int | str,
    dest: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
) -> Path:
    """Write task ``task``'s model of a merge with per-task outputs as an HF folder at ``dest``.

    Args:
        out_dir: the merged model folder (with ``task_modulators/``).
        task: task number (the model's position in the config) or its model's path / folder name.
        dest: output folder (written atomically; config and tokenizer files are copied from ``out_dir``).
        base_model: the pretrained model; default: the path recorded at merge time.
        overwrite: replace ``dest`` if it exists.

    Returns:
        ``dest`` as a Path.
    """
    from pactmerge.io.writer import ShardedWriter, atomic_output_dir, copy_non_weight_files, parse_size

    index = read_index(out_dir)
    entry = resolve_task(index, task)
    base_ref = base_model if base_model is not None else index.get("base_model")
    if base_ref is None:
        raise PactMergeError(
            f"{out_dir}: the merge had an in-memory base model; give the base model's path (base_model=...)"
        )
    with (
        open_source(Path(out_dir)) as merged,
        open_source(base_ref) as base,
        open_source(Path(out_dir) / FOLDER / entry["file"]) as task_file,
    ):
        layout = [(n, merged.shape(n), merged.dtype(n)) for n in merged.names()]
        with atomic_output_dir(Path(dest), overwrite) as tmp:
            writer = ShardedWriter(tmp, layout, parse_size(max_shard_size))
            for name, tensor in iter_task_params(merged, base, task_file, index):
                writer.add(name, tensor)
            writer.close()
            copy_non_weight_files(Path(out_dir), tmp)
            (tmp / "README.md").write_text(
                f"# Task {entry['index']} of a pactmerge merge\n\nMaterialised from `{out_dir}` (method"
                f" `{index['method']}`, alpha = {index['alpha']}) for task {entry['index']}: `{entry['model']}`;"
                f" base model `{base_ref}`.\n"
            )
    return Path(dest)
