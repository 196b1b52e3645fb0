"""The data-aware studies of `pactmerge analyze` (PACT paper Sec. 3.2.1 Fisher masks, Sec. 3.2.2
subspace ablation): the math against independent float64 numpy derivations, the masks on a
hand-checkable layer, the Fisher against per-sample gradients, and the studies end to end on a
tiny random BERT with tiny generated tasks (no downloads), through the API and the CLI."""

import copy
import json
import random

import numpy as np
import pytest
import torch
import yaml

from conftest import decaying, np_orth, np_top_right, t64
from pactmerge.analysis.ablation import ablate_state, collect_bases, project_out, random_complement_basis
from pactmerge.analysis.fisher import (
    empirical_fisher,
    enrichment_pvalues,
    enrichment_score,
    layer_masks,
    set_entries,
)
from pactmerge.analysis.stream import analysis_setup
from pactmerge.config import load_config
from pactmerge.engine import open_inputs, read_deltas
from pactmerge.errors import PactMergeError
from pactmerge.synthetic import make_checkpoints

transformers = pytest.importorskip("transformers")


# -- projection math ----------------------------------------------------------------------------------


def test_project_out_matches_numpy_and_kills_exactly_v(rng):
    m, n, d = 12, 20, 5
    w = rng.standard_normal((m, n))
    v = np_orth(rng.standard_normal((n, d)))
    got = project_out(t64(w), t64(v)).numpy()
    np.testing.assert_allclose(got, w @ (np.eye(n) - v @ v.T), atol=1e-12)  # independent: the n x n projector
    assert np.abs(got @ v).max() < 1e-12  # V is annihilated
    x = (np.eye(n) - v @ v.T) @ rng.standard_normal((n, 3))  # the complement is kept
    np.testing.assert_allclose(got @ x, w @ x, atol=1e-12)
    np.testing.assert_array_equal(project_out(t64(w), t64(v[:, :0])).numpy(), w)  # d = 0: identity


def test_random_control_is_orthonormal_in_the_core_complement(rng):
    n, K, d = 30, 6, 6
    core = t64(np_top_right(decaying(rng, 40, n), K))
    r = random_complement_basis(core, d, torch.Generator().manual_seed(1))
    assert r.shape == (n, d) and r.dtype == torch.float64
    np.testing.assert_allclose((r.T @ r).numpy(), np.eye(d), atol=1e-12)
    assert (core.T @ r).abs().max().item() < 1e-12
    again = random_complement_basis(core, d, torch.Generator().manual_seed(1))
    other = random_complement_basis(core, d, torch.Generator().manual_seed(2))
    assert torch.equal(r, again) and not torch.allclose(r, other)
    assert random_complement_basis(core.float(), 3, torch.Generator().manual_seed(0)).dtype == torch.float32
    random_complement_basis(core, n - K, torch.Generator())  # the whole complement is allowed ...
    with pytest.raises(ValueError, match="complement"):
        random_complement_basis(core, n - K + 1, torch.Generator())  # ... one more is not


def test_ablate_state_touches_only_the_given_matrices(rng):
    w = t64(rng.standard_normal((8, 10)))
    state = {"a.weight": w, "a.bias": t64(rng.standard_normal(8)), "b.weight": t64(rng.standard_normal((8, 10)))}
    v = t64(np_orth(rng.standard_normal((10, 3))))
    out, share = ablate_state(state, {"a.weight": v})
    assert out["a.bias"] is state["a.bias"] and out["b.weight"] is state["b.weight"]
    assert torch.equal(state["a.weight"], w)  # input not modified
    np.testing.assert_allclose(out["a.weight"].numpy(), w.numpy() @ (np.eye(10) - v.numpy() @ v.numpy().T), atol=1e-12)
    wn, vn = w.numpy(), v.numpy()
    assert share == pytest.approx(np.sum((wn @ vn) ** 2) / np.sum(wn**2), rel=1e-12)


def test_collected_bases_are_the_merges_lbw_subspaces(tmp_path, rng):
    """V_{t,LBW} = orth((I - V_{t,k}V_{t,k}^T) V_{0,K}) of the config's streamed tensors (numpy
    reference); random controls of the same dimension in the complement of V_{0,K}; depth honoured."""
    base, models = make_checkpoints(tmp_path, n_models=3, layers=2, hidden=16)
    cfg = load_config(
        {"base_model": str(base), "models": [str(m) for m in models], "pact": {"K": 4, "k": 2, "depth": 0.5}}
    )
    setup = analysis_setup(cfg)
    inputs = open_inputs(cfg)
    try:
        bases, _ = collect_bases(inputs, setup, seeds=[0, 1])
        assert bases and all(b.info.in_depth(0.5) for b in bases)
        assert len(bases) < sum(1 for i in inputs.plan.params if i.is_matrix)  # the deeper half is not ablated
        for b in bases:
            th0, deltas = read_deltas(inputs, b.info, torch.device("cpu"))
            th0, deltas = th0.double().numpy(), [d.double().numpy() for d in deltas]
            n = th0.shape[1]
            v0 = np_top_right(th0, 4)
            for t, d in enumerate(deltas):
                vk = np_top_right(d, 2)
                ref = np_orth((np.eye(n) - vk @ vk.T) @ v0)
                got = b.lbw[t].double().numpy()
                assert got.shape == ref.shape
                np.testing.assert_allclose(got @ got.T, ref @ ref.T, atol=1e-4)  # same subspace (float32 compute)
                for s in range(2):
                    r = b.random[s][t].double().numpy()
                    assert r.shape == got.shape  # same dimension
                    np.testing.assert_allclose(r.T @ r, np.eye(r.shape[1]), atol=1e-5)
                    assert np.abs(v0.T @ r).max() < 1e-4
                assert not np.allclose(b.random[0][t], b.random[1][t])
    finally:
        inputs.close()


# -- masks ---------------------------------------------------------------------------------------------


def _layer(enriched_at):
    """A 20 x 10 layer (d = 200): |Delta_A| = 1..200 in flat order, so S (30% smallest) = flat 0..59;
    Fisher = 1000 - i, so the top 30% of S (A^) = 0..17 and the bottom 30% = 42..59. Delta_B is
    0.01 except at ``enriched_at``: 9 entries = the layer's top 4.5%, the only ones with p < 0.05."""
    a = torch.arange(1, 201, dtype=torch.float64).reshape(20, 10)
    f = (1000 - torch.arange(200, dtype=torch.float64)).reshape(20, 10)
    b = torch.full((200,), 0.01, dtype=torch.float64)
    for j, i in enumerate(enriched_at):
        b[i] = 1.0 + j
    return a, b.reshape(20, 10), f


def test_enrichment_pvalues_and_score():
    b = torch.tensor([0.5, -3.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(enrichment_pvalues(b).numpy(), [4 / 5, 1 / 5, 3 / 5, 3 / 5, 5 / 5])  # ties share p
    sq = b.double().numpy() ** 2
    assert enrichment_score(b, torch.tensor([1, 2])) == pytest.approx(5 / 2 * (sq[1] + sq[2]) / sq.sum())
    assert enrichment_score(b, torch.tensor([0, 1, 2, 3, 4])) == pytest.approx(1.0)  # the whole layer: 1


def test_masks_on_a_hand_checkable_layer():
    a, b, f = _layer([3, 5, 7, 44, 50, 55, 58, 100, 150])
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    m = layer_masks(a, b, f, generator=torch.Generator().manual_seed(9), random_generators=gens)
    s = m.stats
    assert (s["d"], s["small"], s["candidate"], s["enriched"]) == (200, 60, 18, 9)  # 30%, 30% of it, top 9 of |Delta_B|
    assert m.crucial.tolist() == [3, 5, 7]  # small |Delta_A|, high Fisher, enriched
    assert set(m.safe.tolist()) < {44, 50, 55, 58} and len(m.safe) == 3 and s["safe_outside_pool"] == 0
    for r in m.random:
        assert len(r) == 3 and set(r.tolist()) <= {44, 50, 55, 58, 100, 150}  # enriched, anywhere, not crucial
    assert len({tuple(r.tolist()) for r in m.random}) > 1  # the seeds differ
    assert not set(m.safe.tolist()) & set(m.crucial.tolist())
    bb = b.reshape(-1).numpy() ** 2
    assert s["E_B_crucial"] == pytest.approx(200 / 3 * bb[[3, 5, 7]].sum() / bb.sum())
    assert s["E_B_candidate"] == pytest.approx(200 / 18 * bb[:18].sum() / bb.sum())
    assert s["E_B_crucial"] > 1 and s["E_B_crucial"] > s["E_B_candidate"]  # filtering concentrates B's update


def test_safe_mask_tops_up_outside_the_low_fisher_pool():
    # Only 58 is enriched in the bottom 30% of S; 30 and 35 (mid-Fisher in S) are the next lowest-Fisher enriched.
    a, b, f = _layer([3, 5, 7, 58, 30, 35, 100, 150, 199])
    m = layer_masks(a, b, f, random_generators=[torch.Generator().manual_seed(0)])
    assert m.crucial.tolist() == [3, 5, 7]
    assert m.safe.tolist() == [30, 35, 58] and m.stats["safe_outside_pool"] == 2
    assert len(m.random[0]) == 3 and not set(m.random[0].tolist()) & {3, 5, 7}


def test_set_entries_copies_only_masked_entries():
    w = torch.zeros(3, 4)
    out = set_entries(
        {"w": w, "v": torch.ones(2)}, {"w": torch.tensor([1, 6])}, {"w": torch.arange(12.0).reshape(3, 4)}
    )
    assert out["w"].reshape(-1).tolist() == [0, 1, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0]
    assert torch.equal(w, torch.zeros(3, 4))


# -- tiny BERT and tasks (the pattern of test_eval_harness.py) ------------------------------------------

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOPICS = {"t1": ["red", "blue", "green"], "t2": ["cat", "dog", "cow", "fox"]}
FILLER = ["the", "a", "of", "and", "to"]


def _marker_words(label):
    return [f"{label}{c}" for c in "abcdef"]


def _tokenizer(words):
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    try:
        return transformers.BertTokenizer(vocab=vocab)
    except TypeError:  # pragma: no cover - transformers 4 wants a file
        import os
        import tempfile

        path = os.path.join(tempfile.mkdtemp(), "vocab.txt")
        with open(path, "w") as fh:
            fh.write("\n".join(vocab) + "\n")
        return transformers.BertTokenizerFast(vocab_file=path)


def _task(name, labels, seed, n=(12, 4, 6)):
    from pactmerge.eval.tasks import TaskSpec, make_task

    rng = random.Random(seed)
    splits, used = {}, set()
    for split, count in zip(("train", "validation", "test"), n):
        texts, ys = [], []
        for y, lab in enumerate(labels):
            made = 0
            while made < count:
                t = " ".join(
                    rng.choice(_marker_words(lab)) if rng.random() < 0.5 else rng.choice(FILLER) for _ in range(6)
                )
                if t not in used:
                    used.add(t)
                    texts.append(t)
                    ys.append(y)
                    made += 1
        splits[split] = (texts, ys)
    return make_task(name, labels, splits, TaskSpec("{}"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    words = (
        FILLER
        + [w for labs in TOPICS.values() for lab in labs for w in _marker_words(lab)]
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


@pytest.fixture(scope="module")
def tiny_suite(tiny):
    from pactmerge.analysis.studies import build_suite
    from pactmerge.eval.finetune import FinetuneConfig

    model_dir, tasks, root = tiny
    return build_suite(
        tasks,
        name="tiny",
        base_model=model_dir,
        cache_dir=root / "cache",
        finetune=FinetuneConfig(steps=8, lr=5e-3, batch_size=8, max_tokens=12),
    )


@pytest.fixture
def registered(tiny_suite, monkeypatch):
    from pactmerge.analysis import studies

    calls = []

    def load(cache_dir=None, tasks=None, progress=False, log=None):
        calls.append(tasks)
        return tiny_suite

    monkeypatch.setattr(studies, "SUITES", {**studies.SUITES, "tiny": lambda: studies.SuiteSpec(tuple(TOPICS), load)})
    return calls


def test_fisher_equals_direct_per_sample_gradients(tiny_suite):
    from pactmerge.eval.heads import tokenize

    model = tiny_suite.model
    task = tiny_suite.tasks["t1"]
    texts, ys = task.splits["train"]
    tok = tokenize(tiny_suite.tokenizer, texts[:5], ys[:5])
    head = tiny_suite.heads["t1"]
    names = [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.1.output.dense.weight",
        "pooler.dense.weight",
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = empirical_fisher(model, head, tok, names)

    # Reference: each sample's gradient on its own, in float64, then the mean of the squares.
    ref_model = copy.deepcopy(model).double().eval()
    params = dict(ref_model.named_parameters())
    sq = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(len(texts[:5])):
        ids, mask = tok.batch([i])
        hidden = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state
        emb = torch.nn.functional.normalize(hidden.mean(1), dim=-1)  # one sample, no padding: a plain mean
        logp = torch.log_softmax(20.0 * emb @ head.double().T, dim=-1)
        loss = -logp[0, ys[i]]
        grads = torch.autograd.grad(loss, [params[n] for n in names[:2]])
        for n, g in zip(names, grads):
            sq[n] += g**2
    for n in names[:2]:
        np.testing.assert_allclose(got[n].double().numpy(), (sq[n] / 5).numpy(), rtol=2e-3, atol=1e-9)
        assert got[n].abs().sum() > 0
    assert float(got["pooler.dense.weight"].abs().max()) == 0.0  # unused by the mean-pooled embedding
    for n, p in model.named_parameters():  # weights and flags untouched
        assert torch.equal(p.detach(), before[n]) and p.requires_grad == flags[n]


# -- end to end ----------------------------------------------------------------------------------------


def test_studies_end_to_end(tiny, tiny_suite, registered):
    from matplotlib import image

    from pactmerge.analysis.studies import analyze_suite

    _, _, root = tiny
    out = root / "suite-out"
    res = analyze_suite(
        out,
        suite="tiny",
        config={"pact": {"K": 4, "k": 2}},
        ablation=True,
        fisher=["t1,t2"],
        seeds=2,
        fisher_samples=20,
        log=lambda m: None,
    )
    assert res["tasks"] == ["t1", "t2"] and res["config"]["suite"] == "tiny"
    name = "encoder.layer.0.attention.self.query.weight"
    assert tiny_suite.evaluator.weights.state[name].equal(
        tiny_suite.evaluator.weights.base[name]
    )  # evaluator left at the base
    metrics = json.loads((out / "metrics.json").read_text())
    assert "studies" not in metrics and metrics["config"]["pact"]["K"] == 4

    ab = json.loads((out / "ablation.json").read_text())
    assert ab["pact"]["K"] == 4 and ab["seeds"] == [0, 1] and ab["dims"]["num_matrices"] == 12
    assert ab["dims"]["input_dims"] == 2 * (5 * 32 + 64)
    theta = {t: tiny_suite.state(t) for t in TOPICS}
    for t, r in ab["tasks"].items():
        assert r["finetuned"] == pytest.approx(tiny_suite.accuracy(theta[t], [t])[t])  # the real fine-tune, test split
        assert len(r["random"]) == 2 and r["random_mean"] == pytest.approx(np.mean(r["random"]))
        assert r["drop_lbw"] == pytest.approx(r["finetuned"] - r["lbw"])
        assert 0 < r["lbw_dims"] <= 4 * 12 and r["lbw_fraction"] == pytest.approx(
            r["lbw_dims"] / ab["dims"]["input_dims"]
        )
        # LBW directions are the base's top singular directions: they carry more weight energy than random ones.
        assert r["energy_removed_lbw"] > r["energy_removed_random"] > 0
    assert len((out / "ablation.csv").read_text().strip().splitlines()) == 1 + 2

    fj = json.loads((out / "fisher.json").read_text())
    (fr,) = fj["pairs"]
    assert (fr["task_a"], fr["task_b"], fr["samples"], fr["alphas"]) == ("t1", "t2", 20, [1.0, 5.0, 10.0, 20.0, 30.0])
    sz = fr["sizes"]
    assert sz["d"] == sum(r["d"] for r in fr["layers"]) == 2 * (4 * 32 * 32 + 2 * 32 * 64)  # the 12 trainable matrices
    assert 0 < sz["crucial"] <= sz["candidate"] and sz["safe"] == sz["crucial"] and sz["random"] == sz["crucial"]
    assert fr["M0"] == pytest.approx(ab["tasks"]["t1"]["finetuned"])  # theta_A on the same split
    assert [r["alpha"] for r in fr["attack"]] == fr["alphas"]
    assert fr["table1"]["M2"] == fr["attack"][-1]["M2"] and fr["table1"]["alpha"] == 30.0
    rest = fr["restoration"]
    merged = {n: theta["t1"][n] + theta["t2"][n] - tiny_suite.base_state()[n] for n in theta["t1"]}
    assert rest["merged"] == pytest.approx(tiny_suite.accuracy(merged, ["t1", "t2"]))
    for key in ("crucial_to_theta0", "crucial_to_thetaA", "random_to_theta0", "random_to_thetaA"):
        assert set(rest[key]) == {"t1", "t2"} and all(0 <= v <= 1 for v in rest[key].values())
    rows = (out / "fisher.csv").read_text().strip().splitlines()
    assert rows[0] == "task_a,task_b,condition,alpha,eval_task,accuracy,std" and len(rows) == 1 + 2 + 15 + 10

    report = (out / "report.md").read_text()
    assert "## Subspace ablation" in report and "## Fisher crucial mask: A = t1, B = t2" in report
    for png in ("ablation.png", "fisher_attack.png"):
        assert f"]({png})" in report
        img = image.imread(str(out / png))
        assert float(img[..., :3].var()) > 1e-3, f"{png} looks blank"


def test_cli_studies_and_errors(tiny, registered, monkeypatch):
    import typer
    from typer.testing import CliRunner

    import pactmerge.analysis.plots as plots
    from pactmerge.analysis.cli import analyze_command

    monkeypatch.setattr(plots, "PLOTS", {})  # data-free figures are tested in test_analysis.py
    _, _, root = tiny
    app = typer.Typer()
    app.command("analyze")(analyze_command)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    cfg = root / "pact.yaml"
    cfg.write_text(yaml.safe_dump({"pact": {"K": 4, "k": 2}, "base_model": "ignored", "seed": 3}))
    out = root / "cli-out"
    res = runner.invoke(
        app,
        [
            "analyze",
            "--suite",
            "tiny",
            str(cfg),
            str(out),
            "--ablation",
            "--fisher",
            "t2,t1",
            "--seeds",
            "1",
            "--fisher-samples",
            "8",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "subspace ablation" in res.output and "fisher A=t2 B=t1" in res.output
    assert {
        "ablation.json",
        "ablation.csv",
        "ablation.png",
        "fisher.json",
        "fisher.csv",
        "fisher_attack.png",
        "metrics.json",
        "report.md",
    } <= {p.name for p in out.iterdir()}
    fr = json.loads((out / "fisher.json").read_text())["pairs"][0]
    assert fr["samples"] == 8 and fr["seed"] == 3 and fr["seeds"] == 1  # the config's seed is used
    assert json.loads((out / "ablation.json").read_text())["pact"]["K"] == 4
    assert "base_model" in (out / "report.md").read_text()  # the note on the ignored key

    calls = len(registered)
    for args, msg in [
        (["--fisher", "t1,nosuch"], "unknown task 'nosuch'"),
        (["--fisher", "t1,t1"], "must differ"),
        (["--fisher", "t1"], "expected two task names"),
        (["--tasks", "t1,zzz"], "unknown task 'zzz'"),
    ]:
        bad = root / "never"
        res = runner.invoke(app, ["analyze", "--suite", "tiny", str(bad), "--no-progress", *args])
        assert res.exit_code == 2 and msg in res.output, res.output
        assert not bad.exists() and not [p for p in root.iterdir() if p.name.startswith(".never")]
    assert len(registered) == calls  # rejected before the suite was loaded
    res = runner.invoke(app, ["analyze", str(cfg), str(root / "never"), "--ablation"])
    assert res.exit_code == 2 and "--suite" in res.output
    res = runner.invoke(app, ["analyze", "--suite", "nosuch", str(root / "never")])
    assert res.exit_code == 2 and "unknown suite 'nosuch'" in res.output
    res = runner.invoke(app, ["analyze", "--suite", "tiny", str(cfg), str(out), "--no-progress"])
    assert res.exit_code == 2 and "already exists" in res.output


def test_subspace_ablation_of_a_removed_core_direction_is_what_the_math_says(tiny_suite):
    """The API function: accuracy after the LBW ablation is the accuracy of the explicitly
    projected model, computed here independently from pact_subspaces."""
    from pactmerge.analysis.studies import subspace_ablation, suite_config
    from pactmerge.filters.pact import PactParams, pact_subspaces

    res = subspace_ablation(tiny_suite, {"pact": {"K": 4, "k": 2}}, seeds=1)
    cfg, _ = suite_config(tiny_suite, {"pact": {"K": 4, "k": 2}})
    theta0 = tiny_suite.base_state()
    states = {t: tiny_suite.state(t) for t in TOPICS}
    names = [n for n, v in theta0.items() if v.ndim == 2 and n.startswith("encoder.")]
    ablated = dict(states["t2"])
    for n in names:
        sub = pact_subspaces(theta0[n], [states[t][n] - theta0[n] for t in TOPICS], PactParams(K=4, k=2))
        v = sub.lbw[1].double().numpy()
        ablated[n] = torch.from_numpy(states["t2"][n].double().numpy() @ (np.eye(v.shape[0]) - v @ v.T)).float()
    assert res["tasks"]["t2"]["lbw"] == pytest.approx(tiny_suite.accuracy(ablated, ["t2"])["t2"])
    with pytest.raises(PactMergeError, match="seeds"):
        subspace_ablation(tiny_suite, seeds=0)
