"""`alpha: search` and `pactmerge evaluate` end to end on tiny generated sequence classifiers (per-task
heads with different label counts), through the CLI; and every bad input the issue lists."""

import json
import os
import shutil

import pytest
import yaml
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import pactmerge  # noqa: E402
from pactmerge.cli import app  # noqa: E402
from pactmerge.io import open_source  # noqa: E402
from tiny_models import read_csv, seqcls_setup, write_csv  # noqa: E402

runner = CliRunner()
TASKS = {"colors": ["red", "blue"], "animals": ["cat", "dog", "cow"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("seqcls")
    base, finetuned, data = seqcls_setup(root, TASKS)
    return root, base, finetuned, data


def _config(setup, path=None, **extra):
    root, base, finetuned, data = setup
    cfg = {
        "base_model": str(base),
        "models": [{"model": str(finetuned[t]), "task": t} for t in TASKS],
        "method": "task_arithmetic",
        "alpha": "search",
        "evaluation": {
            "kind": "sequence-classification",
            "tasks": {t: {"data": str(data[t]), "text": "text", "label": "label"} for t in TASKS},
            "search": {"grid": [0.2, 2.0, 0.2]},
        },
    }
    for k, v in extra.items():
        if k == "evaluation":
            cfg["evaluation"] = {**cfg["evaluation"], **v}
        else:
            cfg[k] = v
    path = path or root / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _read(folder):
    with open_source(str(folder)) as src:
        return {n: src.get(n) for n in src.names()}


def _hf_accuracy(folder, csv_rows, labels, split):
    """Independent: the written per-task folder loaded by transformers, scored one batch at a time."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    rows = [r for r in csv_rows if r["split"] == split]
    with torch.no_grad():
        enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
    gold = torch.tensor([labels.index(r["label"]) for r in rows])
    return float((pred == gold).float().mean())


@pytest.fixture(scope="module")
def searched(setup):
    root = setup[0]
    path = _config(setup)
    out = root / "out"
    res = runner.invoke(app, ["merge", str(path), str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "α =" in res.output and "chosen on the validation split" in res.output
    return path, out, json.loads((out / "evaluation.json").read_text())


def test_alpha_search_picks_the_validation_argmax_and_writes_everything(setup, searched):
    root, base, finetuned, data = setup
    path, out, ev = searched
    trace = ev["trace"]
    assert ev["searched"] and len(trace) >= 4
    best = max(s for _, s in trace)
    assert ev["alpha"] == next(a for a, s in trace if s == best)  # the first alpha with the best score
    assert ev["average"]["validation"] == pytest.approx(best)
    for f in ("evaluation.json", "evaluation.md", "evaluation.png", "README.md", "pactmerge_config.yaml"):
        assert (out / f).is_file(), f
    written = yaml.safe_load((out / "pactmerge_config.yaml").read_text())
    assert written["alpha"] == ev["alpha"] and written["evaluation"]["kind"] == "sequence-classification"
    assert f"α = {ev['alpha_label']}" in (out / "README.md").read_text()
    assert "## Evaluation" in (out / "README.md").read_text()
    # The heads are not merged: the base's own 2-label head is excluded and reported.
    with open_source(str(base)) as src:
        non_backbone = sorted(n for n in src.names() if not n.startswith("bert."))
    assert ev["excluded"] == non_backbone == ["classifier.bias", "classifier.weight"]
    md = (out / "evaluation.md").read_text()
    assert "classifier.weight" in md and f"| {ev['alpha']:g} ← |" in md  # the trace marks the pick


def test_the_written_model_is_the_fixed_alpha_merge(setup, searched):
    _, out, ev = searched
    root, base, finetuned, _ = setup
    fixed = pactmerge.merge(
        base_model=str(base),
        models=[str(finetuned[t]) for t in TASKS],
        method="task_arithmetic",
        alpha=ev["alpha"],
        exclude=[r"^classifier\."],
    )
    written = _read(out)
    assert set(written) == set(fixed)
    for n, t in fixed.items():
        assert torch.equal(written[n], t), n  # the same bytes as a merge with alpha fixed


def test_per_task_folders_load_with_their_heads_and_share_the_backbone(setup, searched):
    root, base, finetuned, data = setup
    _, out, ev = searched
    assert ev["task_folders"] == list(TASKS)
    merged = _read(out)
    for task, labels in TASKS.items():
        folder = out / task
        assert os.stat(folder / "backbone.safetensors").st_ino == os.stat(out / "model.safetensors").st_ino
        model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
        assert model.config.num_labels == len(labels)
        state = model.state_dict()
        ft = _read(finetuned[task])
        assert torch.equal(state["classifier.weight"], ft["classifier.weight"])  # the task's own head
        assert torch.equal(
            state["bert.encoder.layer.0.output.dense.weight"], merged["bert.encoder.layer.0.output.dense.weight"]
        )
        rows = read_csv(data[task])
        for split in ("validation", "test"):
            assert ev[split][task] == pytest.approx(_hf_accuracy(folder, rows, labels, split)), (task, split)


def test_test_data_never_influence_the_choice(setup, searched, tmp_path):
    root, base, finetuned, data = setup
    _, _, ev = searched
    scrambled = {}
    for task, labels in TASKS.items():
        rows = read_csv(data[task])
        for i, r in enumerate(rows):
            if r["split"] == "test":  # other texts and other labels in the test split only
                r["text"] = " ".join(reversed(r["text"].split()))
                r["label"] = labels[i % len(labels)]
        scrambled[task] = write_csv(tmp_path / f"{task}.csv", rows)
    tasks = {t: {"data": str(scrambled[t]), "text": "text", "label": "label"} for t in TASKS}
    path = _config(setup, tmp_path / "merge.yaml", evaluation={"tasks": tasks})
    out = tmp_path / "out"
    assert runner.invoke(app, ["merge", str(path), str(out), "--no-progress"]).exit_code == 0
    again = json.loads((out / "evaluation.json").read_text())
    assert again["trace"] == ev["trace"] and again["alpha"] == ev["alpha"]
    assert again["validation"] == ev["validation"]


def test_fixed_alpha_with_an_evaluation_scores_that_alpha_sharded(setup, tmp_path):
    root, base, finetuned, data = setup
    path = _config(setup, tmp_path / "merge.yaml", alpha=0.7, max_shard_size=40_000)
    out = tmp_path / "out"
    assert runner.invoke(app, ["merge", str(path), str(out), "--no-progress"]).exit_code == 0
    ev = json.loads((out / "evaluation.json").read_text())
    assert not ev["searched"] and ev["alpha"] == 0.7 and ev["trace"] == []
    assert "fixed in the config" in (out / "evaluation.md").read_text()
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1  # the per-task folders link every shard
    for task, labels in TASKS.items():
        linked = sorted(p.name for p in (out / task).glob("backbone-*.safetensors"))
        assert linked == [s.replace("model", "backbone", 1) for s in shards]
        rows = read_csv(data[task])
        assert ev["test"][task] == pytest.approx(_hf_accuracy(out / task, rows, labels, "test"))


def test_evaluate_command_prints_the_bench_table(setup, searched):
    path, out, ev = searched
    res = runner.invoke(app, ["evaluate", str(path), "--models", f"base,finetuned,merged:{out}", "--no-progress"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "| method | colors | animals | avg abs | avg norm | α | merge s |"
    report = pactmerge.evaluate(path, ["base", "finetuned", f"merged:{out}"])
    rows = {r["key"]: r for r in report["rows"]}
    assert rows["finetuned"]["avg_norm"] == pytest.approx(1.0)
    merged = rows[f"merged:{out}"]
    assert merged["test"] == pytest.approx(ev["test"])  # the folder scores as the search reported
    assert merged["alpha_label"] == f"{ev['alpha']:g}"
    for t in TASKS:
        assert merged["normalized"][t] == pytest.approx(merged["test"][t] / rows["finetuned"]["test"][t])
    # The fine-tuned row: each fine-tune on its own task, read by transformers independently.
    root, base, finetuned, data = setup
    for task, labels in TASKS.items():
        rows_csv = read_csv(data[task])
        assert rows["finetuned"]["test"][task] == pytest.approx(_hf_accuracy(finetuned[task], rows_csv, labels, "test"))


def test_calibration_batches_are_the_tasks_train_texts(setup):
    from pactmerge.eval.calibration import calibration_batches

    root, base, finetuned, data = setup
    path = _config(setup, root / "calib.yaml")
    batches = list(calibration_batches(path, "animals", 10, batch_size=4, seed=1))
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2]
    tok = transformers.AutoTokenizer.from_pretrained(base)
    train = [r["text"] for r in read_csv(data["animals"]) if r["split"] == "train"]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1)).tolist()[:10]
    got = [ids[mask.bool()].tolist() for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"])]
    assert got == [tok(train[i])["input_ids"] for i in order]
    with pytest.raises(pactmerge.PactMergeError, match="task 'birds' is not in evaluation.tasks"):
        next(calibration_batches(path, "birds", 3))


# -- bad input: one line naming the file / task / column, non-zero exit, nothing written --------------------


def _fails(path, out, *needles):
    res = runner.invoke(app, ["merge", str(path), str(out), "--no-progress"])
    assert res.exit_code != 0
    err = res.output.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_inputs_fail_before_the_merge(setup, tmp_path):
    root, base, finetuned, data = setup
    out = tmp_path / "out"
    ok = {t: {"data": str(data[t]), "text": "text", "label": "label"} for t in TASKS}

    def with_task(task, **change):
        tasks = {t: dict(v) for t, v in ok.items()}
        tasks[task].update(change)
        return _config(setup, tmp_path / "bad.yaml", evaluation={"tasks": tasks})

    _fails(with_task("colors", data=str(tmp_path / "missing.csv")), out, "evaluation.tasks.colors.data", "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    _fails(with_task("colors", data=str(tmp_path / "empty.csv")), out, "empty.csv", "empty")
    _fails(with_task("animals", text="sentence"), out, "evaluation.tasks.animals", "no column 'sentence'")
    (tmp_path / "labels.csv").write_text("text,label,split\nreda,red,validation\nblued,green,test\n")
    _fails(with_task("colors", data=str(tmp_path / "labels.csv")), out, "labels.csv", "'green'", "column 'label'")
    (tmp_path / "noval.csv").write_text("text,label,split\nreda,red,train\nblued,blue,test\n")
    _fails(with_task("colors", data=str(tmp_path / "noval.csv")), out, "evaluation.tasks.colors", "no validation split")
    (tmp_path / "zero.csv").write_text("text,label\nreda,red\n")
    _fails(with_task("colors", data=str(tmp_path / "zero.csv")), out, "validation split", "has no items")
    (tmp_path / "garbage.csv").write_bytes(b"text,label\n\xff\xfe\xfa,1\n")
    _fails(with_task("colors", data=str(tmp_path / "garbage.csv")), out, "cannot read", "garbage.csv")
    # A task named by a model with no evaluation.tasks entry; alpha: search without evaluation.
    bad = _config(setup, tmp_path / "bad.yaml")
    cfg = yaml.safe_load(bad.read_text())
    cfg["models"][0]["task"] = "sst2"
    bad.write_text(yaml.safe_dump(cfg))
    _fails(bad, out, "models.0.task: 'sst2' is not in evaluation.tasks")
    del cfg["evaluation"]
    cfg["models"][0].pop("task"), cfg["models"][1].pop("task")
    bad.write_text(yaml.safe_dump(cfg))
    _fails(bad, out, "alpha: search", "needs an `evaluation:` block")


def test_a_base_without_the_backbone_prefix_is_explained(setup, tmp_path):
    root, base, finetuned, data = setup
    plain = tmp_path / "plain"
    model = transformers.AutoModel.from_pretrained(base)  # BertModel: names without "bert."
    model.save_pretrained(plain)
    shutil.copy(base / "tokenizer_config.json", plain)
    shutil.copy(base / "tokenizer.json", plain)
    path = _config(setup, tmp_path / "m.yaml", base_model=str(plain))
    _fails(path, tmp_path / "out", "no parameter starts with 'bert.'", "save the base with that class")


def test_dry_run_checks_the_evaluation_too(setup, tmp_path):
    path = _config(setup, tmp_path / "m.yaml")
    res = runner.invoke(app, ["merge", str(path), str(tmp_path / "out"), "--dry-run", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "classifier.weight" in res.output and "copy" in res.output  # the head: excluded from the merge
    root, base, finetuned, data = setup
    tasks = {t: {"data": str(data[t]), "text": "text", "label": "nope"} for t in TASKS}
    bad = _config(setup, tmp_path / "b.yaml", evaluation={"tasks": tasks})
    res = runner.invoke(app, ["merge", str(bad), str(tmp_path / "out"), "--dry-run", "--no-progress"])
    assert res.exit_code != 0 and "no column 'nope'" in res.output
