"""Parquet files and datasets.save_to_disk folders as evaluation data (the `data` extra: pyarrow,
datasets), and the one-line error that names the extra when it is missing."""

import builtins

import pytest

from pactmerge.errors import PactMergeError
from pactmerge.eval.data import read_rows, task_rows


def _rows(n=40):
    return [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(n)]


def test_a_missing_extra_is_named(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow") or name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_dict.json").write_text("{}")
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(PactMergeError, match=r"d.parquet \(Parquet\) needs pyarrow: pip install 'pactmerge\[data\]'"):
        read_rows(tmp_path / "d.parquet", "evaluation.tasks.t.data")
    with pytest.raises(PactMergeError, match=r"a datasets folder\) needs the datasets package"):
        read_rows(tmp_path / "ds", "evaluation.tasks.t.data")


def test_parquet_and_datasets_folders(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_rows(6)), str(tmp_path / "d.parquet"))
    assert read_rows(tmp_path / "d.parquet", "w") == _rows(6)
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(_rows(4)), "validation": datasets.Dataset.from_list(_rows(2))}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    rows = task_rows("t", str(tmp_path / "dd"), "split", {}, 0)
    assert {s: len(v) for s, v in rows.splits.items()} == {"train": 4, "validation": 2}
