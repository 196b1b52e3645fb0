"""The image benchmark's tasks: small images from packages, in a shipped extract.

The data ship with the package (``eval/data/images.npz``, built by ``scripts/build_image_data.py``
from Debian's ``dataset-fashion-mnist``, ``openclipart-png`` and ``fonts-*`` packages, PyPI's
``animal-mnist`` and scikit-learn's digits). Every image is 32 x 32 uint8 (grayscale, RGB for the
clip art); every task has class-balanced, seeded, disjoint train/validation/test splits.

============  =========================================================================  =======
task          source and labelling rule                                                  classes
============  =========================================================================  =======
fashion       Fashion-MNIST article type (test from the official test file)                   10
animals       Animal-MNIST silhouette: bear, bird, cat, ... zebra                              10
digits8       scikit-learn's 8 x 8 handwritten digits (UCI optdigits), upscaled                10
font_digits   0-9 rendered from Debian fonts                                                   10
font_upper    A-Z rendered from Debian fonts                                                   26
font_greek    lowercase Greek letters rendered from Debian fonts                               24
font_symbols  16 punctuation and math symbols (+ - = < > % & @ # $ ? ! * / ( ))                16
clipart       openclipart top-level category (animals, computer, food, people,                  8
              recreation, shapes, signs and symbols, transportation)
============  =========================================================================  =======

Font tasks: one image per (font file, character), randomly sized, shifted and rotated a little;
the fonts are grouped into design clusters (a family with its metric clones) and the train,
validation and test fonts come from disjoint clusters, so a test glyph is always of an unseen
design. Per class: 120 train (100 for the 16-26-class font tasks), 10 validation, 40 test images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SPLITS = ("train", "validation", "test")
IMAGE_TASKS = ("fashion", "animals", "digits8", "font_digits", "font_upper", "font_greek", "font_symbols", "clipart")

# EfficientNet-Lite's preprocessing (the TF reference: mean 127, stddev 128 per channel).
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0


@dataclass
class ImageTask:
    name: str
    classes: list[str]
    splits: dict[str, tuple[Tensor, Tensor]]  # split -> (uint8 images (N,H,W) or (N,H,W,3), int64 labels)
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self, splits: tuple[str, ...] = SPLITS) -> str:
        """A digest of the images, labels and class names of ``splits`` (cache keys)."""
        h = hashlib.sha256(json.dumps([self.name, self.classes]).encode())
        for s in splits:
            x, y = self.splits[s]
            h.update(s.encode())
            h.update(x.contiguous().numpy().tobytes())
            h.update(y.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def subsample(self, per_class: dict[str, int]) -> ImageTask:
        """The first ``per_class[split]`` items of every class (splits not named are kept)."""
        splits = {}
        for s, (x, y) in self.splits.items():
            n = per_class.get(s)
            if n is None:
                splits[s] = (x, y)
                continue
            keep = torch.cat([torch.nonzero(y == c).flatten()[:n] for c in range(self.num_classes)]).sort().values
            splits[s] = (x[keep], y[keep])
        return ImageTask(self.name, self.classes, splits, self.source, self.meta)


def data_path() -> Path:
    return Path(str(resources.files("pactmerge.eval") / "data" / "images.npz"))


def load_image_tasks(
    names: tuple[str, ...] | list[str] | None = None, path: str | Path | None = None
) -> dict[str, ImageTask]:
    """The shipped tasks (all of :data:`IMAGE_TASKS` by default), in the order asked for."""
    path = Path(path) if path is not None else data_path()
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: the image benchmark's data extract is missing (scripts/build_image_data.py builds it)"
        )
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["__meta__"].tobytes())
        known = list(meta["tasks"])
        names = list(names) if names is not None else [n for n in IMAGE_TASKS if n in known]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown image task(s) {', '.join(unknown)}; known: {', '.join(known)}")
        out = {}
        for n in names:
            info = meta["tasks"][n]
            splits = {
                s: (torch.from_numpy(z[f"{n}.{s}.x"].copy()), torch.from_numpy(z[f"{n}.{s}.y"].astype(np.int64)))
                for s in SPLITS
            }
            out[n] = ImageTask(
                n,
                list(info["classes"]),
                splits,
                info.get("source", ""),
                {k: v for k, v in info.items() if k not in ("classes", "source")},
            )
    return out


def to_input(x: Tensor, size: int | None = None) -> Tensor:
    """uint8 images (N,H,W) or (N,H,W,3) -> normalized float (N,3,size,size) (gray repeated)."""
    x = x.float()
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if size is not None and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - PIXEL_MEAN) / PIXEL_STD).contiguous()
