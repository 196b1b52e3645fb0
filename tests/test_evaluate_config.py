"""The `evaluation:` block, the data reader, the metrics, the coarse-to-fine alpha search and the
harness's per-task merges (no transformers needed)."""

import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pactmerge.config import load_config
from pactmerge.errors import PactMergeError
from pactmerge.eval.alpha import AlphaSearch, choose_alpha, search_alpha
from pactmerge.eval.data import as_class_id, read_rows, require_columns, require_splits, task_rows
from pactmerge.eval.harness import evaluate_merge, scores_at
from pactmerge.eval.kinds.common import WeightSwap, classification_score


def _cfg(**extra):
    base = {
        "base_model": "base",
        "models": [{"model": "a", "task": "t1"}, {"model": "b", "task": "t2"}],
        "alpha": "search",
        "evaluation": {
            "kind": "zero-shot-text",
            "tasks": {
                "t1": {"data": "t1.csv", "text": "text", "label": "label"},
                "t2": {"data": "t2.csv", "text": "text", "label": "label"},
            },
        },
    }
    base.update(extra)
    return base


# -- the config block ----------------------------------------------------------------------------------


def test_alpha_search_and_tasks_validate():
    cfg = load_config(_cfg())
    assert cfg.alpha == "search" and cfg.evaluation.metric_name == "accuracy"
    assert [m.task for m in cfg.models] == ["t1", "t2"]
    with pytest.raises(PactMergeError, match="alpha: search chooses alpha on validation data; it needs an"):
        load_config({"base_model": "b", "models": ["a"], "alpha": "search"})
    with pytest.raises(PactMergeError, match="config key 'alpha': must be a number or 'search', not 'best'"):
        load_config(_cfg(alpha="best"))
    with pytest.raises(PactMergeError, match=r"models.1.task: 't3' is not in evaluation.tasks \(tasks: t1, t2\)"):
        load_config(_cfg(models=[{"model": "a", "task": "t1"}, {"model": "b", "task": "t3"}]))
    with pytest.raises(PactMergeError, match="models.1.task: task 't1' is already the task of models.0"):
        load_config(_cfg(models=[{"model": "a", "task": "t1"}, {"model": "b", "task": "t1"}]))
    with pytest.raises(PactMergeError, match="models.0.task: names task 't1', but the config has no evaluation"):
        load_config({"base_model": "b", "models": [{"model": "a", "task": "t1"}]})
    assert load_config(_cfg(alpha=2)).fixed_alpha == 2.0
    with pytest.raises(PactMergeError, match="alpha: search is chosen on validation data"):
        _ = load_config(_cfg()).fixed_alpha


def test_each_kind_takes_its_own_task_keys():
    bad = _cfg()
    bad["evaluation"]["tasks"]["t1"]["image"] = "path"
    with pytest.raises(PactMergeError, match="tasks.t1.image: not a key of kind zero-shot-text"):
        load_config(bad)
    missing = _cfg()
    del missing["evaluation"]["tasks"]["t2"]["label"]
    with pytest.raises(PactMergeError, match="tasks.t2: kind zero-shot-text needs 'label'"):
        load_config(missing)
    with pytest.raises(PactMergeError, match="metric 'f1': kind zero-shot-text offers accuracy, macro_f1"):
        load_config(_cfg(evaluation={**_cfg()["evaluation"], "metric": "f1"}))
    with pytest.raises(PactMergeError, match="kind python needs 'function: module:function'"):
        load_config(_cfg(evaluation={"kind": "python", "tasks": {"t1": {}, "t2": {}}}))
    with pytest.raises(PactMergeError, match="function: only kind python takes it"):
        load_config(_cfg(evaluation={**_cfg()["evaluation"], "function": "m:f"}))
    with pytest.raises(PactMergeError, match="unknown key"):
        load_config(_cfg(evaluation={**_cfg()["evaluation"], "serach": {}}))
    with pytest.raises(PactMergeError, match="coarse step 0.05 must be larger than the grid step 0.1"):
        load_config(_cfg(evaluation={**_cfg()["evaluation"], "search": {"coarse": 0.05}}))
    with pytest.raises(PactMergeError, match="train \\+ validation \\+ test must be 1"):
        load_config(_cfg(evaluation={**_cfg()["evaluation"], "split": {"validation": 0.3, "test": 0.3}}))
    with pytest.raises(PactMergeError, match="task name 'a/b'"):
        load_config(_cfg(models=["a"], evaluation={**_cfg()["evaluation"], "tasks": {"a/b": {"data": "x"}}}))
    seqcls = _cfg(models=[{"model": "a", "task": "t1"}, "b"])
    seqcls["evaluation"]["kind"] = "sequence-classification"
    with pytest.raises(PactMergeError, match="evaluation.tasks.t2: kind sequence-classification takes each task's"):
        load_config(seqcls)


def test_relative_data_paths_follow_the_config_file(tmp_path, monkeypatch):
    import yaml

    (tmp_path / "cfgdir").mkdir()
    (tmp_path / "cfgdir" / "t1.csv").write_text("text,label\n")
    (tmp_path / "cfgdir" / "score.py").write_text("def f(model, task, split):\n    return 1.0\n")
    path = tmp_path / "cfgdir" / "merge.yaml"
    cfg = _cfg()
    cfg["evaluation"]["tasks"]["t2"]["data"] = {"validation": "t1.csv", "test": "nope.csv"}
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    loaded = load_config(path)
    assert loaded.evaluation.tasks["t1"].data == str(tmp_path / "cfgdir" / "t1.csv")
    assert loaded.evaluation.tasks["t2"].data == {"validation": str(tmp_path / "cfgdir" / "t1.csv"), "test": "nope.csv"}
    py = {
        "base_model": "b",
        "models": ["a"],
        "evaluation": {"kind": "python", "function": "score.py:f", "tasks": {"x": {}}},
    }
    path.write_text(yaml.safe_dump(py))
    assert load_config(path).evaluation.function == f"{tmp_path / 'cfgdir' / 'score.py'}:f"


# -- data --------------------------------------------------------------------------------------------


def _rows(n=40):
    return [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(n)]


def test_csv_jsonl_and_split_rules(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("text,label,split\nx,a,train\ny,b,VAL\nz,a,test\nw,b,dev\n")
    rows = task_rows("t", str(csv_file), "split", {"validation": 0.5, "test": 0.5}, 0)
    assert {s: [r["text"] for r in v] for s, v in rows.splits.items()} == {
        "train": ["x"],
        "validation": ["y", "w"],
        "test": ["z"],
    }
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    seeded = task_rows("t", str(jsonl), "split", {"train": 0.5, "validation": 0.25, "test": 0.25}, 3)
    sizes = {s: len(v) for s, v in seeded.splits.items()}
    assert sizes == {"train": 20, "validation": 10, "test": 10}
    texts = [r["text"] for s in ("train", "validation", "test") for r in seeded.splits[s]]
    assert sorted(texts) == sorted(r["text"] for r in _rows())  # a partition
    order = list(range(40))
    random.Random(3).shuffle(order)  # the documented rule: a seeded shuffle, cut in split order
    assert [r["text"] for r in seeded.splits["train"]] == [f"t{i}" for i in order[:20]]
    again = task_rows("t", str(jsonl), "split", {"train": 0.5, "validation": 0.25, "test": 0.25}, 3)
    assert again.splits == seeded.splits  # seeded: reproducible
    per_file = task_rows("t", {"validation": str(csv_file), "test": str(jsonl)}, "split", {}, 0)
    assert len(per_file.splits["validation"]) == 4 and len(per_file.splits["test"]) == 40


def test_data_errors_name_the_file_column_and_split(tmp_path):
    where = "evaluation.tasks.t.data"
    with pytest.raises(PactMergeError, match=f"{where}: .*nope.csv does not exist"):
        task_rows("t", str(tmp_path / "nope.csv"), "split", {"test": 1.0}, 0)
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(PactMergeError, match="empty.csv is empty"):
        task_rows("t", str(tmp_path / "empty.csv"), "split", {"test": 1.0}, 0)
    (tmp_path / "bad.csv").write_bytes(b"text,label\n\xff\xfe,1\n")
    with pytest.raises(PactMergeError, match="cannot read .*bad.csv"):
        task_rows("t", str(tmp_path / "bad.csv"), "split", {"test": 1.0}, 0)
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(PactMergeError, match="bad.jsonl line 2 is not JSON"):
        read_rows(tmp_path / "bad.jsonl", where)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(PactMergeError, match="unknown data format"):
        read_rows(tmp_path / "x.txt", where)
    with pytest.raises(PactMergeError, match="is a folder but not a `datasets.save_to_disk` folder"):
        read_rows(tmp_path, where)
    (tmp_path / "s.csv").write_text("text,label,split\nx,a,training\ny,b,holdout\n")
    with pytest.raises(PactMergeError, match="row 2: column 'split' is 'holdout'; expected train, validation"):
        task_rows("t", str(tmp_path / "s.csv"), "split", {}, 0)
    (tmp_path / "only.csv").write_text("text,label,split\nx,a,train\ny,b,test\n")
    rows = task_rows("t", str(tmp_path / "only.csv"), "split", {}, 0)
    with pytest.raises(
        PactMergeError, match="evaluation.tasks.t: no validation split \\(the data have: train, test\\)"
    ):
        require_splits(rows)
    with pytest.raises(PactMergeError, match="only.csv \\(split == train\\) has no column 'sentence'"):
        require_columns(rows, ["sentence"])
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("text,label\nx,a\n")
    rows = task_rows("t", str(tiny), "split", {"validation": 0.5, "test": 0.5}, 0)
    with pytest.raises(
        PactMergeError, match="the validation split of .*tiny.csv \\(seeded split, seed 0\\) has no items"
    ):
        require_splits(rows)


def test_labels_as_ids_or_names():
    names = ["neg", "pos", "neutral"]
    assert [as_class_id(v, names, "w") for v in ("pos", 2, "0", 1.0, " 1")] == [1, 2, 0, 1, 1]
    for bad in ("happy", 3, -1, True, 1.5, None):
        with pytest.raises(PactMergeError, match="w: label .* (not a class|neither)"):
            as_class_id(bad, names, "w")


# -- metrics -------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=40))
def test_macro_f1_matches_its_definition(pairs):
    pred = torch.tensor([p for p, _ in pairs])
    gold = torch.tensor([g for _, g in pairs])
    # Independent: per class present in gold or pred, F1 = 2PR/(P+R) from counts in numpy.
    p, g = pred.numpy(), gold.numpy()
    f1s = []
    for c in np.union1d(p, g):
        tp = np.sum((p == c) & (g == c))
        prec = tp / max(np.sum(p == c), 1)
        rec = tp / max(np.sum(g == c), 1)
        f1s.append(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
    assert classification_score(pred, gold, "macro_f1") == pytest.approx(float(np.mean(f1s)))
    assert classification_score(pred, gold, "accuracy") == pytest.approx(float(np.mean(p == g)))


# -- weight swaps ----------------------------------------------------------------------------------------


def test_weight_swap_keeps_tied_tensors_once():
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied
    module = torch.nn.ModuleDict({"embed": emb, "head": head})
    swap = WeightSwap(module.state_dict(), prefer={"embed.weight"})
    assert set(swap.state) == {"embed.weight"} and swap.missing(["head.weight", "x"]) == ["x"]
    base = emb.weight.detach().clone()
    delta = torch.ones(5, 3)
    swap.set_merged({"embed.weight": delta}, 0.5)
    assert torch.equal(module["head"].weight, base + 0.5)  # not reset by its alias
    swap.set_weights({})
    assert torch.equal(emb.weight, base)


# -- the alpha search ------------------------------------------------------------------------------------


def _unimodal(peak, width):
    return lambda a: -abs(a - peak) / width


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([round(0.1 * i, 1) for i in range(1, 31)] + [3.25 + 0.25 * j for j in range(20)]))
def test_coarse_to_fine_picks_what_the_full_rule_picks_on_a_peaked_curve(peak):
    full = search_alpha(_unimodal(peak, 1.0))
    calls = []

    def score(a):
        calls.append(round(a, 6))
        return _unimodal(peak, 1.0)(a)

    fast = choose_alpha(score, AlphaSearch(coarse_step=0.5))
    assert fast.alpha == full.alpha == peak
    assert len(calls) == len(set(calls)) == len(fast.trace)  # every alpha scored once
    assert fast.edge == full.edge and fast.extended == full.extended


def test_coarse_to_fine_is_cheaper_on_high_peaks_and_keeps_the_bottom_rule():
    full = search_alpha(_unimodal(3.75, 1.0))
    fast = choose_alpha(_unimodal(3.75, 1.0), AlphaSearch(coarse_step=0.5))
    assert fast.alpha == 3.75 and len(fast.trace) < len(full.trace) / 2
    low = choose_alpha(_unimodal(0.03, 1.0), AlphaSearch(coarse_step=0.5))
    assert low.alpha == search_alpha(_unimodal(0.03, 1.0)).alpha == 0.025  # halving below the grid


def test_plain_choose_alpha_is_the_bench_rule():
    for peak in (0.3, 1.9, 3.75, 6.5):
        assert choose_alpha(_unimodal(peak, 1), AlphaSearch()) == search_alpha(_unimodal(peak, 1))


# -- the harness -------------------------------------------------------------------------------------------


class Linear1D:
    """A toy evaluator: task t scores -(w - target_t)^2 on validation and -(w - 2 target_t)^2 on test."""

    tasks = ("a", "b")

    def __init__(self):
        self.w = 0.0
        self.log = []

    def set_weights(self, weights):
        self.w = float(weights.get("w", torch.tensor(0.0)))

    def set_merged(self, merged, alpha):
        self.w = alpha * float(merged["w"])

    def scores(self, split, tasks=None):
        self.log.append((split, round(self.w, 6), tuple(tasks or self.tasks)))
        target = {"a": 1.0, "b": 2.0}
        k = 1.0 if split == "validation" else 2.0
        return {t: -((self.w - k * target[t]) ** 2) for t in tasks or self.tasks}


def test_per_task_merges_load_each_tasks_own_state():
    ev = Linear1D()
    vectors = {"a": {"w": torch.tensor(1.0)}, "b": {"w": torch.tensor(2.0)}}
    per_task = scores_at(ev, lambda t: vectors[t], 1.0, ["validation"])["validation"]
    assert per_task == {"a": 0.0, "b": 0.0}  # each task scored at its own optimum
    for t in ("a", "b"):
        assert per_task[t] == scores_at(ev, vectors[t], 1.0, ["validation"], [t])["validation"][t]
    ev.log.clear()
    res = evaluate_merge(ev, lambda t: vectors[t])
    assert res.choice.alpha == 1.0 and res.validation == {"a": 0.0, "b": 0.0}
    searched = 2 * len(res.choice.trace)  # two tasks scored per alpha
    assert all(split == "validation" for split, *_ in ev.log[:searched])  # the test split: only after alpha is fixed
    assert [split for split, *_ in ev.log[searched:]] == ["test", "test"]  # validation: kept from the search
