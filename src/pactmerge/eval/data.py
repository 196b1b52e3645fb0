"""The user's task data: rows read from CSV, JSONL, Parquet or ``datasets`` folders, cut into splits.

A task's ``data`` is one file or folder, or ``{split: file}``. A single file is split by its
``split_column`` when it has one (values train / validation / test; ``val``, ``valid`` and ``dev``
mean validation), else by a seeded shuffle cut into the fractions of ``evaluation.split``. A
``datasets.load_from_disk`` folder holding a ``DatasetDict`` brings its own splits. Every error is
one line naming the task, the file and the column or split at fault.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pactmerge.errors import PactMergeError

SPLITS = ("train", "validation", "test")
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation"}
SPLIT_NAMES |= {"val": "validation", "dev": "validation", "test": "test"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

Row = dict[str, Any]


@dataclass
class TaskRows:
    """A task's rows per split, and where each split came from (for error messages)."""

    task: str
    splits: dict[str, list[Row]]
    sources: dict[str, str]  # split -> file (and how it was split)

    def column(self, split: str, name: str) -> list[Any]:
        return [r[name] for r in self.splits[split]]


def _is_datasets_folder(path: Path) -> bool:
    return any((path / f).exists() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


def read_rows(path: Path, where: str) -> list[Row] | dict[str, list[Row]]:
    """The rows of a CSV / JSONL / Parquet file or a ``datasets`` folder (a ``DatasetDict`` folder
    gives ``{split: rows}``). CSV cells are strings; integer-looking labels are compared as ids later."""
    if not path.exists():
        raise PactMergeError(f"{where}: {path} does not exist")
    try:
        if path.is_dir():
            if not _is_datasets_folder(path):
                raise PactMergeError(
                    f"{where}: {path} is a folder but not a `datasets.save_to_disk` folder (no dataset_dict.json"
                    " or state.json)"
                )
            return _read_datasets(path, where)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as fh:
                return [dict(r) for r in csv.DictReader(fh)]
        if suffix in (".jsonl", ".json"):
            rows = []
            with open(path, encoding="utf-8") as fh:
                for i, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise PactMergeError(f"{where}: {path} line {i} is not JSON ({e.msg})") from None
                        if not isinstance(row, dict):
                            raise PactMergeError(f"{where}: {path} line {i} is not a JSON object")
                        rows.append(row)
            return rows
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise PactMergeError(
                    f"{where}: reading {path} (Parquet) needs pyarrow: pip install 'pactmerge[data]'"
                ) from None
            return list(pq.read_table(str(path)).to_pylist())
    except PactMergeError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
        raise PactMergeError(f"{where}: cannot read {path} ({type(e).__name__}: {e})") from None
    raise PactMergeError(f"{where}: {path}: unknown data format (use .csv, .jsonl, .parquet or a datasets folder)")


def _read_datasets(path: Path, where: str) -> list[Row] | dict[str, list[Row]]:
    try:
        import datasets
    except ImportError:
        raise PactMergeError(
            f"{where}: reading {path} (a datasets folder) needs the datasets package: pip install 'pactmerge[data]'"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        out: dict[str, list[Row]] = {}
        for name, ds in loaded.items():
            split = SPLIT_NAMES.get(name.lower())
            if split is None:
                raise PactMergeError(f"{where}: {path} has split {name!r}; the splits are train, validation, test")
            out[split] = list(ds.to_list())
        return out
    return list(loaded.to_list())


def read_image_folder(path: Path, where: str) -> list[Row]:
    """An ImageFolder (``root/<class>/<image>``) as rows ``{"image": path, "label": class}``."""
    if not path.is_dir():
        raise PactMergeError(f"{where}: {path} is not a folder")
    rows = []
    for cls in sorted(p for p in path.iterdir() if p.is_dir()):
        for img in sorted(cls.iterdir()):
            if img.suffix.lower() in IMAGE_SUFFIXES:
                rows.append({"image": str(img), "label": cls.name})
    if not rows:
        raise PactMergeError(f"{where}: {path} has no class folders with images (expected root/<class>/<image>)")
    return rows


def task_rows(
    task: str,
    data: str | Mapping[str, str],
    split_column: str,
    fractions: Mapping[str, float],
    seed: int,
    image_folders: bool = False,
) -> TaskRows:
    """Read a task's data and cut it into splits (see the module docstring).

    ``fractions`` and ``seed`` make the seeded split of a file without a split column;
    ``image_folders``: a plain folder is an ImageFolder (clip-zero-shot) rather than an error.
    """
    where = f"evaluation.tasks.{task}.data"
    splits: dict[str, list[Row]] = {}
    sources: dict[str, str] = {}
    if isinstance(data, Mapping):
        for split, file in data.items():
            rows = _read(Path(file), f"{where}.{split}", image_folders)
            if isinstance(rows, dict):
                raise PactMergeError(f"{where}.{split}: {file} holds several splits; give it as `data: {file}`")
            if not rows:
                raise PactMergeError(f"{where}.{split}: {file} is empty (no rows)")
            splits[split], sources[split] = rows, str(file)
        return TaskRows(task, splits, sources)
    path = Path(data)
    rows = _read(path, where, image_folders)
    if not rows:
        raise PactMergeError(f"{where}: {path} is empty (no rows)")
    if isinstance(rows, dict):
        return TaskRows(task, rows, {s: f"{path} [{s}]" for s in rows})
    if rows and split_column in rows[0]:
        for i, row in enumerate(rows):
            value = str(row.get(split_column, "")).strip().lower()
            named = SPLIT_NAMES.get(value)
            if named is None:
                raise PactMergeError(
                    f"{where}: {path} row {i + 1}: column {split_column!r} is {row.get(split_column)!r};"
                    " expected train, validation or test"
                )
            splits.setdefault(named, []).append(row)
        return TaskRows(task, splits, {s: f"{path} ({split_column} == {s})" for s in splits})
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    start = 0
    for split in SPLITS:
        n = int(round(fractions.get(split, 0.0) * len(rows)))
        if split == SPLITS[-1]:
            n = len(rows) - start
        if fractions.get(split, 0.0) > 0:
            splits[split] = [rows[i] for i in order[start : start + n]]
            sources[split] = f"{path} (seeded split, seed {seed})"
        start += n
    return TaskRows(task, splits, sources)


def _read(path: Path, where: str, image_folders: bool) -> list[Row] | dict[str, list[Row]]:
    if image_folders and path.is_dir() and not _is_datasets_folder(path):
        return read_image_folder(path, where)
    return read_rows(path, where)


def require_splits(rows: TaskRows, needed: tuple[str, ...] = ("validation", "test")) -> None:
    """Each split in ``needed`` exists and has at least one row."""
    where = f"evaluation.tasks.{rows.task}"
    for split in needed:
        if split not in rows.splits:
            have = ", ".join(rows.splits) or "none"
            raise PactMergeError(f"{where}: no {split} split (the data have: {have}); see docs/evaluate.md#splits")
        if not rows.splits[split]:
            raise PactMergeError(f"{where}: the {split} split of {rows.sources[split]} has no items")


def require_columns(rows: TaskRows, columns: list[str]) -> None:
    """Every row of every split has each of ``columns``."""
    for split, items in rows.splits.items():
        for i, row in enumerate(items):
            for col in columns:
                if col not in row:
                    have = ", ".join(row)
                    raise PactMergeError(
                        f"evaluation.tasks.{rows.task}: {rows.sources[split]} has no column {col!r}"
                        + (f" in row {i + 1}" if i else "")
                        + f" (columns: {have})"
                    )


def as_class_id(value: Any, names: list[str], where: str) -> int:
    """A label cell as a class id: an integer (or integer-looking string) in range, or a class name."""
    if isinstance(value, bool):
        raise PactMergeError(f"{where}: label {value!r} is neither a class id nor a class name")
    if isinstance(value, str) and value in names:
        return names.index(value)
    i: int | None = None
    if (
        isinstance(value, int)
        or (isinstance(value, float) and value.is_integer())
        or isinstance(value, str)
        and value.strip().lstrip("-").isdigit()
    ):
        i = int(value)
    if i is not None and 0 <= i < len(names):
        return i
    shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
    raise PactMergeError(f"{where}: label {value!r} is not a class of this task (ids 0-{len(names) - 1}: {shown})")
