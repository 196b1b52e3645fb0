"""Kind ``clip-zero-shot``: a Hugging Face ``CLIPModel``, vision tower merged, text tower frozen.

The PACT paper's setting. Each task's head is CLIP's zero-shot classifier, computed once from the
*base* text tower: for every class, the normalized text embedding of each template filled with the
class name, averaged over the templates and normalized again. An image's logits are its normalized
image embedding times the heads (the logit scale does not change the argmax).

Only the vision side is merged: every parameter outside ``vision_model.*`` and
``visual_projection.*`` (the text tower, its projection, the logit scale) is excluded from the merge
automatically and reported, so the written model keeps the base's text tower.

Images: an ImageFolder (``root/<class>/<image>``), or a CSV / JSONL / Parquet of paths (relative to
that file's folder) with a label column. Preprocessing is CLIP's: the shortest side resized to the
processor's size (bicubic), a center crop, scaled to [0, 1] and normalized by the processor's mean
and std (``preprocessor_config.json`` in the base folder, else CLIP's published values and the
vision config's image size). Images are kept as uint8 once resized.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.eval.data import as_class_id, require_columns, require_splits, task_rows
from pactmerge.eval.kinds.common import (
    EvalSpec,
    ModelEvaluator,
    Prepared,
    WeightSwap,
    base_tokenizer,
    batches,
    check_split,
    checkpoint_state,
    classification_score,
    hf_folder,
    load_hf,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEMPLATES = ("a photo of a {}.",)
MERGED_PREFIXES = ("vision_model.", "visual_projection.")


def _preprocessing(base: Path) -> tuple[int, int, Tensor, Tensor]:
    """``(resize, crop, mean, std)`` from the base's preprocessor config, else CLIP's defaults."""
    cfg_file = base / "preprocessor_config.json"
    vision = json.loads((base / "config.json").read_text()).get("vision_config", {})
    size = crop = int(vision.get("image_size", 224))
    mean, std = CLIP_MEAN, CLIP_STD
    if cfg_file.exists():
        pre = json.loads(cfg_file.read_text())
        s = pre.get("size", size)
        size = int(s.get("shortest_edge") or s.get("height") or size) if isinstance(s, dict) else int(s)
        c = pre.get("crop_size", size)
        crop = int(c.get("height") or size) if isinstance(c, dict) else int(c)
        mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
    return size, crop, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def load_image(path: Path, size: int, crop: int, where: str) -> Tensor:
    """One image as a uint8 ``(3, crop, crop)`` tensor: shortest side to ``size`` (bicubic), center crop."""
    try:
        from PIL import Image
    except ImportError:
        raise PactMergeError("kind clip-zero-shot reads images with Pillow: pip install pillow") from None
    try:
        with Image.open(path) as opened:
            rgb = opened.convert("RGB")
        w, h = rgb.size
        scale = size / min(w, h)
        rgb = rgb.resize((max(crop, round(w * scale)), max(crop, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = rgb.size
        left, top = (w - crop) // 2, (h - crop) // 2
        rgb = rgb.crop((left, top, left + crop, top + crop))
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    except (OSError, ValueError) as e:
        raise PactMergeError(f"{where}: cannot read image {path} ({e})") from None
    return data.view(crop, crop, 3).permute(2, 0, 1).contiguous()


class ClipData(Prepared):
    kind = "clip-zero-shot"

    def __init__(self, spec: EvalSpec):
        hf_folder(spec.base, "base_model")
        self.spec = spec
        ev = spec.evaluation
        self.tasks = list(ev.tasks)
        self.tokenizer = base_tokenizer(spec.base, "clip-zero-shot")
        size, crop, self.mean, self.std = _preprocessing(spec.base)
        self.classes: dict[str, list[str]] = {}
        self.templates: dict[str, list[str]] = {}
        self.images: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
        self.sizes: dict[str, dict[str, int]] = {}
        for name, tcfg in ev.tasks.items():
            assert tcfg.data is not None
            rows = task_rows(name, tcfg.data, tcfg.split_column, ev.split.model_dump(), ev.split.seed, True)
            require_splits(rows, ("validation", "test"))
            image_col, label_col = tcfg.image or "image", tcfg.label or "label"
            require_columns(rows, [image_col, label_col])
            values = sorted({str(r[label_col]) for items in rows.splits.values() for r in items})
            classes = list(tcfg.classnames or values)
            templates = list(tcfg.templates or TEMPLATES)
            bad = [t for t in templates if "{}" not in t]
            if bad:
                raise PactMergeError(f"evaluation.tasks.{name}.templates: {bad[0]!r} has no '{{}}' for the class name")
            self.classes[name], self.templates[name] = classes, templates
            self.images[name], self.sizes[name] = {}, {}
            for split, items in rows.splits.items():
                where = f"evaluation.tasks.{name}: {rows.sources[split]}"
                base_dir = _data_dir(tcfg.data, split)
                labels = [as_class_id(r[label_col], classes, f"{where}, column {label_col!r}") for r in items]
                pix = [load_image(_path(r[image_col], base_dir), size, crop, where) for r in items]
                self.images[name][split] = (torch.stack(pix), torch.tensor(labels, dtype=torch.long))
                self.sizes[name][split] = len(items)

    def pixels(self, images: Tensor) -> Tensor:
        """uint8 ``(N, 3, H, W)`` -> CLIP's normalized float input."""
        return (images.float() / 255.0 - self.mean) / self.std

    def evaluator(self) -> ClipEvaluator:
        return ClipEvaluator(self)

    def model_inputs(
        self, task: str, split: str, n: int, batch_size: int, seed: int = 0
    ) -> Iterator[dict[str, Tensor]]:
        check_split(self.images[task], task, split)
        images = self.images[task][split][0]
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()[:n]
        for start in range(0, len(order), batch_size):
            yield {"pixel_values": self.pixels(images[order[start : start + batch_size]])}


def _data_dir(data: str | dict[str, str], split: str) -> Path:
    path = Path(data[split] if isinstance(data, dict) else data)
    return path if path.is_dir() else path.parent


def _path(value: object, base_dir: Path) -> Path:
    p = Path(str(value))
    return p if p.is_absolute() or p.exists() else base_dir / p


class ClipEvaluator(ModelEvaluator):
    def __init__(self, data: ClipData):
        from pactmerge.io.sources import open_source

        spec = data.spec
        self.data, self.tasks = data, list(data.tasks)
        self.metric, self.batch_size, self.progress = spec.metric, spec.evaluation.batch_size, spec.progress
        self.model = load_hf("CLIPModel", spec.base, spec.device, f"base_model {spec.base}")
        with open_source(str(spec.base)) as base:
            names = set(base.names())
        state = checkpoint_state(self.model, names, f"base_model {spec.base}")
        self.excluded = sorted(n for n in names if not n.startswith(MERGED_PREFIXES))
        self.heads = {t: self._head(data.classes[t], data.templates[t]) for t in self.tasks}
        self.weights = WeightSwap({n: t for n, t in state.items() if n.startswith(MERGED_PREFIXES)})

    @torch.no_grad()
    def _head(self, classes: list[str], templates: list[str]) -> Tensor:
        """(classes, dim): per class, the mean of its normalized template embeddings, normalized."""
        device = next(self.model.parameters()).device
        out = []
        for c in classes:
            enc = self.data.tokenizer(
                [t.format(c) for t in templates],
                padding=True,
                truncation=True,
                max_length=self.model.config.text_config.max_position_embeddings,
                return_tensors="pt",
            )
            emb = _features(self.model.get_text_features(**{k: v.to(device) for k, v in enc.items()}))
            out.append(F.normalize(F.normalize(emb.float(), dim=-1).mean(0), dim=0))
        return torch.stack(out).cpu()

    @torch.no_grad()
    def scores(self, split: str, tasks: Sequence[str] | None = None) -> dict[str, float]:
        device = next(self.model.parameters()).device
        out = {}
        for task in list(tasks) if tasks else self.tasks:
            images, labels = self.data.images[task][split]
            feats = []
            for start in batches(len(images), self.batch_size, f"{task} {split}", self.progress):
                x = self.data.pixels(images[start : start + self.batch_size]).to(device)
                feats.append(_features(self.model.get_image_features(pixel_values=x)).float().cpu())
            pred = (F.normalize(torch.cat(feats), dim=-1) @ self.heads[task].T).argmax(-1)
            out[task] = classification_score(pred, labels, self.metric)
        return out


def _features(out: object) -> Tensor:
    """transformers 5 returns a model output from ``get_*_features``; older versions a tensor."""
    if isinstance(out, Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    raise TypeError(f"unexpected CLIP features output {type(out).__name__}")


def prepare(spec: EvalSpec) -> ClipData:
    return ClipData(spec)
