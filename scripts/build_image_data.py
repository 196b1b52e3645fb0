#!/usr/bin/env python3
"""Build the compact, committed extract of the image benchmark's eight tasks.

Reads files that Debian and PyPI packages ship (install them first)::

    apt-get install dataset-fashion-mnist openclipart-png fonts-dejavu-core fonts-liberation \
        fonts-freefont-ttf fonts-noto-core fonts-urw-base35 fonts-texgyre fonts-lato \
        fonts-open-sans fonts-roboto-unhinted fonts-cantarell fonts-crosextra-carlito \
        fonts-crosextra-caladea fonts-linuxlibertine fonts-ebgaramond fonts-comic-neue \
        fonts-inconsolata fonts-hack fonts-firacode fonts-go fonts-oxygen fonts-quicksand
    pip install --no-deps animal-mnist    # its data only; its code imports tensorflow

and writes ``src/pactmerge/eval/data/images.npz``: 32 x 32 uint8 images (grayscale, RGB for the
clip art) with class-balanced, seeded, disjoint train/validation/test splits, and a JSON header
(task names, class names, sources, the font split). Only the extract ships with the package, so
the benchmark needs none of these packages at run time.

Tasks (also in ``pactmerge/eval/images.py``):

fashion       Fashion-MNIST (dataset-fashion-mnist), 10 classes; train/validation drawn from the
              official training file, test from the official test file. 28 x 28, zero-padded.
animals       Animal-MNIST silhouettes (animal-mnist), 10 classes. 28 x 28, zero-padded.
digits8       scikit-learn's 8 x 8 digits (UCI optdigits), 10 classes, upscaled to 24 x 24
              (bicubic) and zero-padded.
font_digits   0-9 rendered from Debian fonts, white on black.
font_upper    A-Z rendered from Debian fonts.
font_greek    the 24 lowercase Greek letters rendered from the fonts that have them.
font_symbols  16 punctuation and math symbols rendered from Debian fonts.
clipart       openclipart-png top-level categories (8), composited on white, RGB.

Fonts: one image per (font file, character), with a seeded random size (70-95% of the box),
offset and rotation (+-8 degrees) so that a font's images differ from a plain template. Font files
are grouped into *design clusters* (a family together with its metric clones: Times = Nimbus Roman
= TeX Gyre Termes = FreeSerif = Liberation Serif, Helvetica, Courier, Palatino, Bookman,
Century Schoolbook, Avant Garde, Zapf Chancery; DejaVu with its derivative Hack; Noto Sans with
Open Sans; Lato with Carlito) and whole clusters go to one split: no design seen in training is
tested. Symbol, dingbat, math, keyboard and small-caps fonts are skipped; a font is used for a task only if it
has a real glyph for every character (its rendering differs from the missing-glyph box).

Images that occur twice (byte-identical, as files and again as 32 x 32 images) within a task are
kept once, and dropped when they occur under two labels; so is clip art filed under two of the
chosen categories.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pickle
import random
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parents[1] / "src" / "pactmerge" / "eval" / "data" / "images.npz"
FASHION = Path("/usr/share/datasets/fashion-mnist")
CLIPART = Path("/usr/share/openclipart/png")
SIZE = 32
MAX_PIXELS = 16_000_000  # a few clip-art PNGs are 100+ megapixel canvases: skipped
SEED = 0

FASHION_CLASSES = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
DIGITS = list("0123456789")
UPPER = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
GREEK = list("αβγδεζηθικλμνξοπρστυφχψω")
SYMBOLS = list("+-=<>%&@#$?!*/()")
CLIPART_CLASSES = [
    "animals",
    "computer",
    "food",
    "people",
    "recreation",
    "shapes",
    "signs_and_symbols",
    "transportation",
]

# Per class: (train, validation, test); None = what is left (test of a font task: its test fonts).
# Font tasks draw theirs from the images of the split's fonts (one image per font and character).
COUNTS = {
    "fashion": (120, 10, 40),
    "animals": (120, 10, 40),
    "digits8": (120, 10, 40),
    "font_digits": (120, 10, 40),
    "font_upper": (100, 10, 40),
    "font_greek": (100, 10, 40),
    "font_symbols": (100, 10, 40),
    "clipart": (110, 10, 40),  # transportation has 164 distinct 32 x 32 images
}

SKIP_FONTS = ("symbol", "dingbat", "d050000l", "math", "keyboard", "standard symbols", "smallcaps")
CLUSTERS = {
    "times": ("nimbus roman", "tex gyre termes", "freeserif", "liberation serif"),
    "helvetica": ("nimbus sans", "tex gyre heros", "freesans", "liberation sans"),
    "courier": ("nimbus mono", "tex gyre cursor", "freemono", "liberation mono"),
    "palatino": ("p052", "tex gyre pagella"),
    "bookman": ("urw bookman", "tex gyre bonum"),
    "schoolbook": ("c059", "tex gyre schola"),
    "avantgarde": ("urw gothic", "tex gyre adventor"),
    "chancery": ("z003", "tex gyre chorus"),
    "dejavu": ("dejavu", "hack"),
    "notosans": ("noto sans", "open sans"),
    "lato": ("lato", "carlito"),
}
# Share of font *files* per split (whole clusters are assigned, so the shares are approximate).
FONT_SPLIT = {"test": 0.25, "validation": 0.12}


# -- sources ---------------------------------------------------------------------------------------


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist():
    tr = _idx(FASHION / "train-images-idx3-ubyte.gz"), _idx(FASHION / "train-labels-idx1-ubyte.gz")
    te = _idx(FASHION / "t10k-images-idx3-ubyte.gz"), _idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    return tr, te


class _NumpyOnly(pickle.Unpickler):
    """animal-mnist ships pickled ndarrays: allow exactly what rebuilding an ndarray needs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def animal_mnist():
    import importlib.util

    spec = importlib.util.find_spec("animal_mnist")  # locate the package without importing it
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps animal-mnist")
    root = Path(spec.origin).parent / "data" / "Animal_MNIST"
    with gzip.open(root / "animal_data_version_3.gz") as fh:
        x = _NumpyOnly(fh).load()
    with gzip.open(root / "animal_label_version_3.gz") as fh:
        y = _NumpyOnly(fh).load()
    return np.asarray(x, np.uint8), np.asarray(y, np.int64)


def sk_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = []
    for im in d.images:
        a = Image.fromarray(np.uint8(np.clip(im * 16, 0, 255))).resize((24, 24), Image.BICUBIC)
        imgs.append(np.asarray(a))
    return np.stack(imgs), d.target.astype(np.int64)


def pad_to(x: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Zero-pad (N, h, w) images to (N, size, size), centred."""
    n, h, w = x.shape
    out = np.zeros((n, size, size), np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, top : top + h, left : left + w] = x
    return out


# -- fonts -----------------------------------------------------------------------------------------


def font_files() -> list[Path]:
    out = subprocess.run(["fc-list", ":lang=en", "file"], capture_output=True, text=True, check=True).stdout
    files = sorted({Path(line.split(":")[0].strip()).resolve() for line in out.splitlines() if line.strip()})
    files = [f for f in files if f.suffix.lower() in (".ttf", ".otf", ".t1", ".pfb")]
    seen, unique = set(), []
    for f in files:
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        if sha not in seen:
            seen.add(sha)
            unique.append(f)
    return unique


def font_name(path: Path) -> tuple[str, str]:
    family, style = ImageFont.truetype(str(path), 20).getname()
    return family or path.stem, style or ""


def cluster_of(family: str) -> str:
    f = family.lower()
    for name, prefixes in CLUSTERS.items():
        if any(f.startswith(p) for p in prefixes):
            return name
    return f.split()[0]


def _glyph(font: ImageFont.FreeTypeFont, ch: str) -> np.ndarray:
    box = font.getbbox(ch)
    img = Image.new("L", (max(1, box[2] - box[0]) + 4, max(1, box[3] - box[1]) + 4), 0)
    ImageDraw.Draw(img).text((2 - box[0], 2 - box[1]), ch, fill=255, font=font)
    return np.asarray(img)


def has_glyphs(path: Path, chars: list[str]) -> bool:
    """Every char renders as ink that differs from the font's missing-glyph box (U+FFFF is unassigned)."""
    font = ImageFont.truetype(str(path), 40)
    missing = [_glyph(font, c).tobytes() for c in ("\uffff", "\U0010fffd")]
    seen = set()
    for ch in chars:
        g = _glyph(font, ch)
        if g.max() == 0 or g.tobytes() in missing or g.tobytes() in seen:
            return False
        seen.add(g.tobytes())
    return True


def render(path: Path, ch: str, rng: random.Random, size: int = SIZE) -> np.ndarray:
    """White glyph on black, scaled so its larger side is 70-95% of the box, jittered, rotated."""
    big = 4 * size
    font = ImageFont.truetype(str(path), big)
    g = Image.fromarray(_glyph(font, ch))
    g = g.rotate(rng.uniform(-8, 8), resample=Image.BICUBIC, expand=True)
    bbox = g.getbbox()
    if bbox:
        g = g.crop(bbox)
    scale = rng.uniform(0.70, 0.95) * size / max(g.size)
    w, h = max(1, round(g.width * scale)), max(1, round(g.height * scale))
    g = g.resize((w, h), Image.LANCZOS)
    canvas = Image.new("L", (size, size), 0)
    x = (size - w) // 2 + rng.randint(-2, 2)
    y = (size - h) // 2 + rng.randint(-2, 2)
    canvas.paste(g, (min(max(x, 0), size - w), min(max(y, 0), size - h)))
    return np.asarray(canvas)


def split_fonts(files: list[Path], seed: int = SEED) -> dict[str, list[Path]]:
    """Whole design clusters to test / validation / train, seeded, by share of files."""
    by_cluster: dict[str, list[Path]] = {}
    for f in files:
        by_cluster.setdefault(cluster_of(font_name(f)[0]), []).append(f)
    names = sorted(by_cluster)
    random.Random(seed).shuffle(names)
    total = len(files)
    out = {"test": [], "validation": [], "train": []}
    for name in names:
        for split in ("test", "validation"):
            if len(out[split]) + len(by_cluster[name]) <= FONT_SPLIT[split] * total + 2:
                out[split] += by_cluster[name]
                break
        else:
            out["train"] += by_cluster[name]
    return out


# -- clip art --------------------------------------------------------------------------------------


def clipart_image(path: Path, size: int = SIZE) -> np.ndarray:
    im = Image.open(path)  # lazy: only the header is read here
    if im.width * im.height > MAX_PIXELS:
        raise OSError(f"{path}: {im.width} x {im.height} canvas skipped")
    im = im.convert("RGBA")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(bg, im).convert("RGB")
    bbox = Image.eval(im.convert("L"), lambda v: 255 - v).getbbox()  # crop the white margin
    if bbox:
        im = im.crop(bbox)
    im.thumbnail((size, size), Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return np.asarray(canvas)


def clipart():
    Image.MAX_IMAGE_PIXELS = None  # sizes are checked in clipart_image before decoding
    files = {c: sorted((CLIPART / c).rglob("*.png")) for c in CLIPART_CLASSES}
    by_hash: dict[str, set[str]] = {}
    for c, fs in files.items():
        for f in fs:
            by_hash.setdefault(hashlib.sha256(f.read_bytes()).hexdigest(), set()).add(c)
    xs, ys, seen = [], [], set()
    for ci, c in enumerate(CLIPART_CLASSES):
        for f in files[c]:
            h = hashlib.sha256(f.read_bytes()).hexdigest()
            if len(by_hash[h]) > 1 or h in seen:
                continue
            seen.add(h)
            try:
                xs.append(clipart_image(f))
            except (OSError, Image.DecompressionBombError):  # unreadable, or a huge canvas: skipped
                continue
            ys.append(ci)
    return np.stack(xs), np.asarray(ys)


# -- splitting -------------------------------------------------------------------------------------


def dedupe(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep one copy of each distinct image; drop images that occur under two labels."""
    labels: dict[bytes, set] = {}
    for i in range(len(x)):
        labels.setdefault(x[i].tobytes(), set()).add(int(y[i]))
    seen, keep = set(), []
    for i in range(len(x)):
        h = x[i].tobytes()
        if h not in seen and len(labels[h]) == 1:
            seen.add(h)
            keep.append(i)
    return x[keep], y[keep]


def balanced(x, y, counts: tuple[int, ...], seed: int, classes: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Class-balanced, seeded, disjoint draws of counts[i] items per class from (x, y)."""
    rng = np.random.default_rng(seed)
    parts = [([], []) for _ in counts]
    for c in range(classes):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        if len(idx) < sum(counts):
            raise SystemExit(f"class {c}: {len(idx)} items < {sum(counts)} needed")
        start = 0
        for p, n in zip(parts, counts):
            p[0].append(idx[start : start + n])
            start += n
    return [(x[np.concatenate(i)], y[np.concatenate(i)]) for i, _ in parts]


def font_task(chars, fonts_by_split, seed, per_font):
    out, used = {}, {}
    for split, files in fonts_by_split.items():
        ok = [f for f in files if has_glyphs(f, chars)]
        used[split] = [f.name for f in ok]
        xs, ys = [], []
        for _fi, f in enumerate(ok):
            for ci, ch in enumerate(chars):
                for r in range(per_font[split]):
                    rng = random.Random(f"{seed}-{f.name}-{ch}-{r}")
                    xs.append(render(f, ch, rng))
                    ys.append(ci)
        out[split] = dedupe(np.stack(xs), np.asarray(ys))
    return out, used


def build(seed: int = SEED) -> tuple[dict[str, np.ndarray], dict]:
    arrays: dict[str, np.ndarray] = {}
    meta: dict = {"size": SIZE, "seed": seed, "tasks": {}}

    def put(name, classes, source, splits, **extra):
        for split, (x, y) in splits.items():
            arrays[f"{name}.{split}.x"] = x
            arrays[f"{name}.{split}.y"] = y.astype(np.int16)
        meta["tasks"][name] = {
            "classes": classes,
            "source": source,
            "channels": 3 if splits["train"][0].ndim == 4 else 1,
            "sizes": {s: int(len(v[1])) for s, v in splits.items()},
            **extra,
        }

    (xtr, ytr), (xte, yte) = fashion_mnist()
    tr, va = balanced(pad_to(xtr), ytr, COUNTS["fashion"][:2], seed, 10)
    (te,) = balanced(pad_to(xte), yte, COUNTS["fashion"][2:], seed + 1, 10)
    put(
        "fashion",
        FASHION_CLASSES,
        "Debian dataset-fashion-mnist (train file -> train/validation, t10k -> test)",
        {"train": tr, "validation": va, "test": te},
    )

    x, y = dedupe(*animal_mnist())
    put(
        "animals",
        ANIMAL_CLASSES,
        "PyPI animal-mnist 0.4",
        dict(zip(("train", "validation", "test"), balanced(pad_to(x), y, COUNTS["animals"], seed, 10))),
    )

    x, y = dedupe(*sk_digits())
    per = COUNTS["digits8"]
    put(
        "digits8",
        DIGITS,
        "scikit-learn load_digits (8x8, upscaled)",
        dict(zip(("train", "validation", "test"), balanced(pad_to(x), y, per, seed, 10))),
    )

    fonts = split_fonts(
        [f for f in font_files() if not any(s in font_name(f)[0].lower() or s in f.name.lower() for s in SKIP_FONTS)],
        seed,
    )
    meta["font_clusters"] = {s: sorted({cluster_of(font_name(f)[0]) for f in fs}) for s, fs in fonts.items()}
    per_font = {"train": 1, "validation": 1, "test": 1}
    for name, chars in (
        ("font_digits", DIGITS),
        ("font_upper", UPPER),
        ("font_greek", GREEK),
        ("font_symbols", SYMBOLS),
    ):
        splits, used = font_task(chars, fonts, seed, per_font)
        for i, split in enumerate(("train", "validation", "test")):
            (splits[split],) = balanced(*splits[split], COUNTS[name][i : i + 1], seed + i, len(chars))
        put(
            name,
            chars,
            "Debian fonts-* packages, rendered (train/validation/test fonts disjoint by design cluster)",
            splits,
            fonts=used,
        )

    x, y = dedupe(*clipart())  # different files can give the same 32 x 32 image
    put(
        "clipart",
        CLIPART_CLASSES,
        "Debian openclipart-png top-level categories",
        dict(zip(("train", "validation", "test"), balanced(x, y, COUNTS["clipart"], seed, len(CLIPART_CLASSES)))),
    )
    return arrays, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--preview", type=Path, help="also write a PNG grid of a few train images per task")
    args = ap.parse_args()
    arrays, meta = build(args.seed)
    header = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, __meta__=header, **arrays)
    os.replace(tmp, args.out)
    for name, t in meta["tasks"].items():
        print(f"{name:13s} {len(t['classes']):3d} classes  " + "  ".join(f"{s} {n}" for s, n in t["sizes"].items()))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    if args.preview:
        rows = []
        for name in meta["tasks"]:
            x, y = arrays[f"{name}.train.x"], arrays[f"{name}.train.y"]
            picks = [x[np.flatnonzero(y == c)[0]] for c in range(min(16, len(meta["tasks"][name]["classes"])))]
            picks = [p if p.ndim == 3 else np.repeat(p[..., None], 3, -1) for p in picks]
            picks += [np.zeros_like(picks[0])] * (16 - len(picks))
            rows.append(np.concatenate(picks, 1))
        Image.fromarray(np.concatenate(rows, 0)).resize((16 * 64, len(rows) * 64), Image.NEAREST).save(args.preview)


if __name__ == "__main__":
    main()
