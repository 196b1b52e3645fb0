"""The image suite's pieces on tiny generated data and a randomly initialized EfficientNet-Lite0
(no pretrained weights read, nothing downloaded)."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from pactmerge.eval.images import SPLITS, ImageTask, load_image_tasks, to_input
from pactmerge.eval.suites import image as ib

# -- 1 x 1 convolutions as matrices ---------------------------------------------------------------


def _state():
    g = torch.Generator().manual_seed(0)
    return {
        "conv1x1.weight": torch.randn(8, 4, 1, 1, generator=g),
        "conv3x3.weight": torch.randn(8, 4, 3, 3, generator=g),
        "dw.weight": torch.randn(8, 1, 3, 3, generator=g),
        "one_by_one_out.weight": torch.randn(1, 1, 1, 1, generator=g),
        "bn.weight": torch.randn(8, generator=g),
        "bn.num_batches_tracked": torch.tensor(3),
        "fc.weight": torch.randn(5, 8, generator=g),
    }


def test_squeeze_1x1_round_trip_is_exact():
    state = _state()
    sq = ib.squeeze_1x1(state)
    assert sq["conv1x1.weight"].shape == (8, 4)
    assert sq["one_by_one_out.weight"].shape == (1, 1)
    for name in ("conv3x3.weight", "dw.weight", "bn.weight", "fc.weight", "bn.num_batches_tracked"):
        assert sq[name].shape == state[name].shape  # only 1 x 1 convolutions change
    back = ib.unsqueeze_1x1(sq, state)
    assert set(back) == set(state)
    for name, t in state.items():
        assert back[name].shape == t.shape and back[name].dtype == t.dtype and torch.equal(back[name], t)
    # A merged 2-D delta of a 1 x 1 convolution goes back into the network's shape too.
    assert ib.unsqueeze_1x1({"conv1x1.weight": torch.ones(8, 4)}, state)["conv1x1.weight"].shape == (8, 4, 1, 1)


def test_1x1_convolution_is_its_matrix_at_every_pixel():
    w = _state()["conv1x1.weight"]
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    by_conv = F.conv2d(x, w.double())
    by_matrix = torch.einsum("oi,bihw->bohw", ib.squeeze_1x1({"w": w})["w"].double(), x)
    torch.testing.assert_close(by_conv, by_matrix)


def _random_weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "lite0-random.pth"
    torch.save(ib.build_network(32).state_dict(), path)
    return path


pytest.importorskip("efficientnet_lite_pytorch")


def test_engine_sees_the_1x1_convolutions_as_matrices(tmp_path):
    from pactmerge.config import load_config
    from pactmerge.engine import open_inputs

    base = ib.prepare_image_base(tmp_path / "cache", _random_weights(tmp_path))
    cfg = load_config(
        {"base_model": str(base.path), "models": [str(base.path)], "method": "task_arithmetic", "exclude": ib.EXCLUDE}
    )
    inputs = open_inputs(cfg)
    try:
        kinds = {p.name: p.kind for p in inputs.plan.params}
    finally:
        inputs.close()
    assert kinds["_blocks.1._expand_conv.weight"] == "matrix"
    assert kinds["_blocks.1._project_conv.weight"] == "matrix"
    assert kinds["_conv_head.weight"] == "matrix"
    assert kinds["_blocks.1._depthwise_conv.weight"] == "vector"
    assert kinds["_conv_stem.weight"] == "vector"
    assert kinds["_blocks.1._bn0.running_mean"] == "copy"
    assert kinds["_blocks.1._bn0.weight"] == "vector"
    smallest = min(min(s) for n, s in ((p.name, p.shape) for p in inputs.plan.params) if kinds[n] == "matrix")
    assert smallest >= 15  # PACT's default K = 15 applies to every matrix


# -- BatchNorm re-estimation ------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.01)
        self.c2, self.b2 = nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5, momentum=0.01)

    def forward(self, x):
        return self.b2(self.c2(F.relu(self.b1(self.c1(x)))))


def _direct_stats(net: _Tiny, x: torch.Tensor):
    """Each BatchNorm's input statistics on x, computed by hand (training-mode normalization)."""
    out = []
    h = net.c1(x)
    m, v = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
    out.append((m, h.var((0, 2, 3), unbiased=True)))
    h = (h - m[None, :, None, None]) / torch.sqrt(v[None, :, None, None] + net.b1.eps)
    h = h * net.b1.weight[None, :, None, None] + net.b1.bias[None, :, None, None]
    h = net.c2(F.relu(h))
    out.append((h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)))
    return out


def test_reestimate_bn_gives_the_statistics_of_the_data():
    torch.manual_seed(0)
    net = _Tiny().double()
    with torch.no_grad():
        for b in (net.b1, net.b2):
            b.weight.uniform_(0.5, 2.0)
            b.bias.normal_()
            b.running_mean.fill_(7.0)  # stale statistics that must be replaced, not averaged with
            b.running_var.fill_(9.0)
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    x = torch.randn(24, 3, 6, 6, dtype=torch.float64) * 3 + 1
    ib.reestimate_bn(net, x, batch_size=64, forward=net)
    with torch.no_grad():
        expected = _direct_stats(net, x)
    for bn, (m, v) in zip((net.b1, net.b2), expected):
        torch.testing.assert_close(bn.running_mean, m)
        torch.testing.assert_close(bn.running_var, v)
        assert bn.momentum == 0.01  # restored
    assert not net.training
    assert all(torch.equal(p, weights[n]) for n, p in net.named_parameters())

    # Several batches: the average of the per-batch statistics.
    ib.reestimate_bn(net, x, batch_size=8, forward=net)
    with torch.no_grad():
        per_batch = [_direct_stats(net, x[i : i + 8]) for i in range(0, 24, 8)]
    for j, bn in enumerate((net.b1, net.b2)):
        torch.testing.assert_close(bn.running_mean, sum(p[j][0] for p in per_batch) / 3)
        torch.testing.assert_close(bn.running_var, sum(p[j][1] for p in per_batch) / 3)


# -- tiny tasks ------------------------------------------------------------------------------------


def _tiny_task(name: str, classes: int, per=(6, 3, 4), seed=0, rgb=False) -> ImageTask:
    """Class c: a bright square at a class-specific place on noise (learnable, not trivial)."""
    g = torch.Generator().manual_seed(seed)
    splits = {}
    for split, n in zip(SPLITS, per):
        xs, ys = [], []
        for c in range(classes):
            for _ in range(n):
                img = (torch.rand(32, 32, generator=g) * 80).to(torch.uint8)
                r, col = 4 + 8 * (c % 3), 4 + 8 * (c // 3)
                img[r : r + 8, col : col + 8] = 255
                xs.append(img.unsqueeze(-1).expand(-1, -1, 3).contiguous() if rgb else img)
                ys.append(c)
        splits[split] = (torch.stack(xs), torch.tensor(ys))
    return ImageTask(name, [f"c{c}" for c in range(classes)], splits)


def test_probe_heads_stay_frozen_and_finetunes_are_cached(tmp_path):
    cache = tmp_path / "cache"
    base = ib.prepare_image_base(cache, _random_weights(tmp_path))
    task = _tiny_task("sq", 3)
    net = ib.build_network(32)
    net.load_state_dict(base.reference)
    heads = ib.get_heads({"sq": task}, net, base, ib.HeadConfig(kind="probe", max_iter=20), cache, 32)
    head = {n: h.clone() for n, h in heads["sq"].items()}
    cfg = ib.ImageFinetuneConfig(steps=3, batch_size=4, lr=1e-3)
    ib.TRAINED.clear()
    path = ib.get_image_finetuned(task, heads["sq"], base, cfg, cache, 32)
    assert ib.TRAINED == ["sq"]
    assert all(torch.equal(heads["sq"][n], head[n]) for n in head)  # the head did not train
    tuned = ib.load_merge_state(path)
    base_sd = ib.load_merge_state(base.path)
    assert set(tuned) == set(base_sd)
    assert not torch.equal(tuned["_blocks.3._expand_conv.weight"], base_sd["_blocks.3._expand_conv.weight"])
    assert tuned["_blocks.3._expand_conv.weight"].ndim == 2
    # BatchNorm stays in inference mode: the running statistics are the pretrained ones.
    assert torch.equal(tuned["_bn1.running_mean"], base_sd["_bn1.running_mean"])
    # Cached: same inputs train nothing; heads re-load identically.
    assert ib.get_image_finetuned(task, heads["sq"], base, cfg, cache, 32) == path
    assert ib.TRAINED == ["sq"]
    again = ib.get_heads({"sq": task}, net, base, ib.HeadConfig(kind="probe", max_iter=20), cache, 32)
    assert set(again["sq"]) == {"weight", "bias"} and all(torch.equal(again["sq"][n], head[n]) for n in head)


def test_cosine_head_is_scaled_cosine_to_centred_class_means():
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(30, 6, generator=g, dtype=torch.float64) * 3
    labels = torch.arange(30) % 3
    head = ib.fit_cosine_head(feats, labels, 3, scale=7.0)
    # Independent derivation in numpy, float64.
    f = feats.numpy()
    c = f.mean(0)
    z = (f - c) / np.linalg.norm(f - c, axis=1, keepdims=True)
    m = np.stack([z[labels.numpy() == k].mean(0) for k in range(3)])
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    np.testing.assert_allclose(head["class_means"].numpy(), m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head["center"].numpy(), c, rtol=1e-6)
    q = torch.rand(5, 6, generator=g, dtype=torch.float64).float()
    qz = (q.numpy() - c) / np.linalg.norm(q.numpy() - c, axis=1, keepdims=True)
    np.testing.assert_allclose(ib.head_logits(q, head).numpy(), 7.0 * qz @ m.T, rtol=1e-4, atol=1e-5)
    # Invariants: unit-norm class means; logits bounded by the scale; blind to the length of f - center.
    assert torch.allclose(head["class_means"].norm(dim=1), torch.ones(3))
    assert ib.head_logits(q, head).abs().max() <= 7.0 + 1e-5
    far = head["center"] + 4.0 * (q - head["center"])
    assert torch.allclose(ib.head_logits(far, head), ib.head_logits(q, head), atol=1e-5)
    # The two kinds have different digests (fine-tune cache keys), and a bad kind is refused.
    probe = {"weight": torch.ones(3, 6), "bias": torch.zeros(3)}
    assert ib.head_digest(head) != ib.head_digest(probe) and len(ib.head_digest(head)) == 16
    with pytest.raises(ValueError, match="head kind"):
        ib.HeadConfig(kind="knn")
    with pytest.raises(ValueError, match="every class"):
        ib.fit_cosine_head(feats, labels, 4)


def test_task_bn_policy_uses_each_tasks_own_statistics(tmp_path):
    base = ib.prepare_image_base(tmp_path / "cache", _random_weights(tmp_path))
    tasks = {"a": _tiny_task("a", 2, seed=1), "b": _tiny_task("b", 2, seed=2, rgb=True)}
    net = ib.build_network(32)
    net.load_state_dict(base.reference)
    heads = {n: {"weight": torch.randn(2, 1280), "bias": torch.zeros(2)} for n in tasks}
    ev = ib.ImageEvaluator(net, base, tasks, heads, 32, bn="task", bn_images=5)
    ev.scores("validation")
    ev._use_task_stats("b")
    got = {n: t.clone() for n, t in ev.state.items() if "running_" in n}
    ref = ib.build_network(32)
    ref.load_state_dict(base.reference)
    ib.reestimate_bn(ref, ev.bn_data["b"])
    for n, t in ref.state_dict().items():
        if "running_" in n:
            torch.testing.assert_close(got[n], t)
    assert not torch.allclose(got["_bn0.running_mean"], base.reference["_bn0.running_mean"])
    # The pretrained policy leaves the statistics alone.
    ev.set_merged({}, 0.0, bn="pretrained")
    ev.scores("validation")
    assert torch.equal(ev.state["_bn0.running_mean"], base.reference["_bn0.running_mean"])


# -- the shipped extract ---------------------------------------------------------------------------


def test_shipped_splits_are_balanced_and_disjoint():
    tasks = load_image_tasks()
    assert len(tasks) >= 6
    for name, task in tasks.items():
        seen = {}
        for split in SPLITS:
            x, y = task.splits[split]
            assert x.dtype == torch.uint8 and x.shape[1:3] == (32, 32)
            counts = torch.bincount(y, minlength=task.num_classes)
            assert counts.min() == counts.max() > 0, (name, split, counts)
            hashes = {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in x}
            for other, hs in seen.items():
                assert not hashes & hs, f"{name}: {split} and {other} share images"
            seen[split] = hashes
        fonts = task.meta.get("fonts")
        if fonts:  # font tasks: the train, validation and test fonts are disjoint
            assert not set(fonts["train"]) & set(fonts["test"])
            assert not set(fonts["train"]) & set(fonts["validation"])
            assert not set(fonts["validation"]) & set(fonts["test"])


def test_to_input_shapes_and_range():
    gray = torch.tensor([[[0, 255]]], dtype=torch.uint8).expand(1, 2, 2)
    out = to_input(gray)
    assert out.shape == (1, 3, 2, 2)
    assert out.min() == pytest.approx(-127 / 128) and out.max() == pytest.approx(1.0)
    rgb = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    rgb[..., 1] = 255
    out = to_input(rgb, size=8)
    assert out.shape == (2, 3, 8, 8) and out[:, 1].min() == pytest.approx(1.0) and out[:, 0].max() < 0


# -- end to end ------------------------------------------------------------------------------------


def test_run_image_bench_report_works_with_markdown_table(tmp_path):
    from pactmerge.eval.report import markdown_table

    weights = _random_weights(tmp_path)
    tasks = {"a": _tiny_task("a", 3, seed=1), "b": _tiny_task("b", 4, seed=2, rgb=True)}
    cfg = ib.ImageBenchConfig(
        tasks=tuple(tasks),
        methods=("zeroshot", "finetuned", "ta", "isoc", "pact-ta"),
        K=4,
        k=2,
        finetune=ib.ImageFinetuneConfig(steps=2, batch_size=4),  # default heads: cosine
        bn="task",
        bn_images=6,
        bn_rows=True,
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "out",
        alpha_max=3.0,
        progress=False,
        chart=False,
    )
    report = ib.run_image_bench(cfg, log=lambda m: None, tasks=tasks, weights=weights)
    assert report["tasks"] == ["a", "b"]
    assert report["finetune_seconds"] >= 0 and report["total_seconds"] >= report["finetune_seconds"]
    keys = [r["key"] for r in report["rows"]]
    assert keys == [
        "zeroshot",
        "finetuned",
        "zeroshot-bn",
        "finetuned-bn",
        "ta",
        "isoc",
        "pact-ta",
    ]  # default_rows order
    assert report["rows"][0]["label"] == "zero-shot (cosine class-mean head)"
    heads = list((tmp_path / "cache" / "heads").glob("*.safetensors"))
    assert len(heads) == 2 and all(set(load_file(str(h))) == {"center", "class_means", "scale"} for h in heads)
    for r in report["rows"]:
        assert set(r["test"]) == {"a", "b"} and 0.0 <= r["avg_abs"] <= 1.0
        assert r["normalized"]["a"] == pytest.approx(r["test"]["a"] / report["rows"][1]["test"]["a"])
    merges = [r for r in report["rows"] if r.get("merge_seconds") is not None]
    assert len(merges) == 3 and all(r["alpha"] is not None and r["alpha_trace"] for r in merges)
    table = markdown_table(report)
    assert "| Task Arithmetic |" in table and "PACT-TA" in table and table.count("\n") == len(report["rows"]) + 1
    assert (tmp_path / "out" / "results.json").exists() and (
        tmp_path / "out" / "results.md"
    ).read_text().strip() == table


def test_image_bench_data_aware_rows_calibrate_on_the_training_images(tmp_path):
    """PAVE, RegMean and Fisher rows run on the image suite: each fine-tune's statistics come from
    its own task's training images (never validation or test), through the fine-tune as trained."""
    weights = _random_weights(tmp_path)
    tasks = {"a": _tiny_task("a", 3, seed=1), "b": _tiny_task("b", 4, seed=2, rgb=True)}
    cfg = ib.ImageBenchConfig(
        tasks=tuple(tasks),
        methods=("finetuned", "pave-ta", "regmean", "fisher"),
        finetune=ib.ImageFinetuneConfig(steps=2, batch_size=4),
        cache_dir=tmp_path / "cache",
        out_dir=None,
        alpha_max=3.0,
        progress=False,
        chart=False,
    )
    report = ib.run_image_bench(cfg, log=lambda m: None, tasks=tasks, weights=weights)
    rows = {r["key"]: r for r in report["rows"]}
    assert not [r for r in rows.values() if "skipped" in r], [r.get("skipped") for r in rows.values()]
    for key in ("pave-ta", "regmean", "fisher"):
        assert rows[key]["calibration_examples"] == [len(tasks[t].splits["train"][1]) for t in tasks]

    base = ib.prepare_image_base(tmp_path / "cache", weights)
    net = ib.build_network(32)
    net.load_state_dict(base.reference)
    heads = ib.get_heads(tasks, net, base, ib.HeadConfig(), tmp_path / "cache", 32)
    ft = {n: Path(p) for n, p in report["finetuned_models"].items()}
    data = ib.image_calibration(tasks, ft, heads, base, 32)
    for (name, task), md in zip(tasks.items(), data):
        used = {ex["pixel_values"].numpy().tobytes() for ex in md.examples}
        split = {s: {x.numpy().tobytes() for x in to_input(task.splits[s][0], 32)} for s in task.splits}
        assert used == split["train"] and not used & (split["validation"] | split["test"])
        model = md.load_model()
        tuned = ib.load_merge_state(ft[name])
        w = "_blocks.3._expand_conv.weight"
        assert torch.equal(dict(model.named_parameters())[w].detach().reshape(tuned[w].shape), tuned[w])
        assert not model.training
        batch = {k: torch.stack([torch.as_tensor(ex[k]) for ex in md.examples[:2]]) for k in ("pixel_values", "labels")}
        expected = F.cross_entropy(
            ib.head_logits(ib.features(model, batch["pixel_values"]), heads[name]), batch["labels"]
        )
        torch.testing.assert_close(md.loss(model, batch), expected)
