"""Calibration data from the `evaluation:` block: `pactmerge merge cfg.yaml out/` with PAVE / RegMean / Fisher.

Each model's examples are its task's training rows, tokenized as the kind does, in a seeded order; the
CLI merge must equal the Python merge given the same data built by hand from the CSV."""

import json

import pytest
import yaml
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import pactmerge  # noqa: E402
from pactmerge.cli import app  # noqa: E402
from pactmerge.errors import PactMergeError  # noqa: E402
from pactmerge.io import open_source  # noqa: E402
from pactmerge.stats import ModelData  # noqa: E402
from tiny_models import read_csv, seqcls_setup, write_csv  # noqa: E402

runner = CliRunner()
TASKS = {"colors": ["red", "blue"], "animals": ["cat", "dog", "cow"]}
SAMPLES = 24  # of 32 (colors) and 48 (animals) training rows: the seeded order decides which
SEED = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    base, finetuned, data = seqcls_setup(root, TASKS, steps=5)
    return root, base, finetuned, data


def _config(setup, path, data=None, **extra):
    root, base, finetuned, default_data = setup
    data = data or default_data
    cfg = {
        "base_model": str(base),
        "models": [{"model": str(finetuned[t]), "task": t} for t in TASKS],
        "method": "task_arithmetic",
        "filters": ["pave"],
        "alpha": 1.0,
        "seed": SEED,
        "evaluation": {
            "kind": "sequence-classification",
            "tasks": {t: {"data": str(data[t]), "text": "text", "label": "label"} for t in TASKS},
        },
        "calibration": {"samples": SAMPLES, "batch_size": 5, "cache_dir": str(root / "cache_cli"), "dtype": "float64"},
    }
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _read(folder):
    with open_source(str(folder)) as src:
        return {n: src.get(n) for n in src.names()}


def _merge_cli(config, out):
    res = runner.invoke(app, ["merge", str(config), str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    return _read(out)


def _hand_data(setup, samples=SAMPLES, seed=SEED):
    """Independent of pactmerge: each task's training rows of the CSV (file order), a seeded
    permutation, the first `samples`, tokenized one text at a time; the fine-tune loaded by transformers."""
    root, base, finetuned, data = setup
    tok = transformers.AutoTokenizer.from_pretrained(str(base))
    out = []
    for task, labels in TASKS.items():
        train = [r for r in read_csv(data[task]) if r["split"] == "train"]
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()[:samples]
        examples = []
        for i in order:
            enc = tok(train[i]["text"], truncation=True, max_length=128)
            ex = {k: torch.tensor(v) for k, v in enc.items()}
            ex["labels"] = torch.tensor(labels.index(train[i]["label"]))
            examples.append(ex)
        folder = str(finetuned[task])
        out.append(
            ModelData(
                examples,
                lambda folder=folder: transformers.AutoModelForSequenceClassification.from_pretrained(folder),
                pad_id=tok.pad_token_id,
            )
        )
    return out


def _merge_python(setup, tmp_path, **extra):
    root, base, finetuned, _ = setup
    cfg = {
        "base_model": str(base),
        "models": [str(finetuned[t]) for t in TASKS],
        "method": "task_arithmetic",
        "filters": ["pave"],
        "alpha": 1.0,
        "seed": SEED,
        "exclude": [r"^classifier\."],  # what the kind excludes: the heads
        "calibration": {
            "samples": SAMPLES,
            "batch_size": 5,
            "cache_dir": str(tmp_path / "cache_py"),
            "dtype": "float64",
        },
    }
    cfg.update(extra)
    return pactmerge.merge(cfg, calibration_data=_hand_data(setup))


def _assert_same(written, expected):
    assert set(written) == set(expected)
    for n, t in expected.items():
        assert torch.equal(written[n], t), (n, (written[n].double() - t.double()).abs().max())


def test_cli_pave_merge_equals_python_merge_on_hand_built_training_data(setup, tmp_path):
    written = _merge_cli(_config(setup, tmp_path / "merge.yaml"), tmp_path / "out")
    calibration = json.loads((tmp_path / "out" / "evaluation.json").read_text())["calibration"]
    assert calibration["statistics"] == ["covariance"] and calibration["examples"] == [SAMPLES, SAMPLES]
    assert calibration["data"] == "each model's task, train split" and calibration["tasks"] == list(TASKS)
    line = "Calibration statistics (covariance) from each model's task, train split: 24 (colors), 24 (animals)"
    for report in ("evaluation.md", "README.md"):
        assert line in (tmp_path / "out" / report).read_text(), report
    expected = _merge_python(setup, tmp_path)
    _assert_same(written, expected)
    # PAVE did act: the merge differs from plain task arithmetic.
    plain = pactmerge.merge(
        base_model=str(setup[1]),
        models=[str(setup[2][t]) for t in TASKS],
        method="task_arithmetic",
        exclude=[r"^classifier\."],
    )
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(written[name], plain[name])


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_cli_regmean_and_fisher_equal_python_merges(setup, tmp_path, method):
    written = _merge_cli(_config(setup, tmp_path / "merge.yaml", method=method, filters=None), tmp_path / "out")
    expected = _merge_python(setup, tmp_path, method=method, filters=None)
    _assert_same(written, expected)
    # The statistics are the kind's: with another seed (other training rows) the merge changes.
    other = _merge_cli(
        _config(setup, tmp_path / "merge2.yaml", method=method, filters=None, seed=SEED + 1), tmp_path / "o2"
    )
    assert any(not torch.equal(other[n], written[n]) for n in written if n.endswith("query.weight"))


def _edit(rows, split, task_labels):
    """A copy of rows with the first row of `split` given other words (label kept)."""
    rows = [dict(r) for r in rows]
    i = next(j for j, r in enumerate(rows) if r["split"] == split)
    rows[i]["text"] = " ".join([task_labels[0] + "a", "the"] * 5)
    return rows


def test_only_training_rows_feed_the_statistics(setup, tmp_path):
    root, base, finetuned, data = setup
    cache = tmp_path / "shared_cache"
    calib = {"samples": 32, "batch_size": 5, "cache_dir": str(cache), "dtype": "float64"}  # every colors train row
    rows = read_csv(data["colors"])

    def run(name, colors_rows):
        files = {**data, "colors": write_csv(tmp_path / name / "colors.csv", colors_rows)}
        cfg = _config(
            setup, tmp_path / f"{name}.yaml", data=files, calibration=calib, filters=[{"pave": {"rho": 0.75}}]
        )
        out = _merge_cli(cfg, tmp_path / name / "out")
        cached = "from the cache" in (tmp_path / name / "out" / "evaluation.md").read_text()
        return out, sorted(p.name for p in cache.iterdir()), cached

    original, files0, cached = run("original", rows)
    assert len(files0) == 2 and not cached  # one covariance file per model, computed now
    for split in ("validation", "test"):
        changed, files, cached = run(split, _edit(rows, split, TASKS["colors"]))
        assert files == files0 and cached  # the same examples: the cached statistics are reused
        _assert_same(changed, original)
    changed, files, cached = run("train", _edit(rows, "train", TASKS["colors"]))
    assert len(files) == 3 and set(files0) < set(files) and not cached  # model 0's recomputed from the new row
    assert any(not torch.equal(changed[n], original[n]) for n in original)


def test_a_task_without_training_rows_is_refused_before_any_work(setup, tmp_path):
    root, base, finetuned, data = setup
    no_train = write_csv(tmp_path / "animals.csv", [r for r in read_csv(data["animals"]) if r["split"] != "train"])
    calib = {"samples": 8, "cache_dir": str(tmp_path / "cache")}
    cfg = _config(setup, tmp_path / "merge.yaml", data={**data, "animals": no_train}, calibration=calib)
    for args in (["merge", str(cfg), str(tmp_path / "out")], ["merge", str(cfg), str(tmp_path / "out"), "--dry-run"]):
        res = runner.invoke(app, [*args, "--no-progress"])
        assert res.exit_code != 0
        msg = res.output.strip()
        assert len(msg.splitlines()) == 1, msg
        assert "evaluation.tasks.animals" in msg and str(no_train) in msg and "train" in msg
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_too_few_training_rows_and_models_without_a_task(setup, tmp_path):
    from pactmerge.api import dry_run
    from pactmerge.config import load_config
    from pactmerge.eval.session import MergeEvaluation

    root, base, finetuned, data = setup
    cfg = _config(setup, tmp_path / "merge.yaml", calibration={"samples": 40})
    with pytest.raises(PactMergeError, match=r"evaluation.tasks.colors: 32 train items, fewer than calibration"):
        dry_run(cfg)
    cfg = _config(setup, tmp_path / "merge.yaml", calibration={"samples": 40, "allow_fewer": True})
    session = MergeEvaluation(load_config(cfg), torch.device("cpu"))
    data_of = session.calibration_data()
    assert [len(d.examples) for d in data_of] == [32, 40]  # colors: all its train rows; animals: 40 of 48
    extra = {"models": [*yaml.safe_load(cfg.read_text())["models"], {"model": str(finetuned["colors"])}]}
    cfg = _config(setup, tmp_path / "merge.yaml", calibration={"samples": 8}, **extra)
    with pytest.raises(PactMergeError, match=r"models.2: pave draw\(s\) calibration examples .* set `task:`"):
        dry_run(cfg)
