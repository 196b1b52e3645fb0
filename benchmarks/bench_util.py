"""Shared pieces of the side-by-side benchmarks: model shapes, streamed checkpoint generation,
measured fresh processes, result comparison and table printing.

Every benchmark runs each side in a fresh process, one thread each (``OMP_NUM_THREADS=1``,
``MKL_NUM_THREADS=1``, ``torch.set_num_threads(1)``), interleaving the sides and repeating,
and reports medians. Peak RSS is the child's ``ru_maxrss`` (``os.wait4``), the whole process.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

Layout = list[tuple[str, tuple[int, ...]]]


# -- shapes ---------------------------------------------------------------------------------------


def llama_layout(hidden: int, inter: int, layers: int, vocab: int, heads: int, kv_heads: int) -> Layout:
    """Parameter names and shapes of a Hugging Face ``LlamaForCausalLM``."""
    kv = hidden // heads * kv_heads
    out: Layout = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


TINYLLAMA = {"hidden": 2048, "inter": 5632, "layers": 22, "vocab": 32000, "heads": 32, "kv_heads": 4}
LLAMA2_7B = {"hidden": 4096, "inter": 11008, "layers": 32, "vocab": 32000, "heads": 32, "kv_heads": 32}


def llama_config(shape: dict, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["inter"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "vocab_size": shape["vocab"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }


def vit_b32_layout(layers: int = 12) -> Layout:
    """The CLIP ViT-B/32 image encoder (open_clip / fusion_bench naming), 87.8 M parameters."""
    w = 768
    out: Layout = [
        ("class_embedding", (w,)),
        ("positional_embedding", (50, w)),
        ("conv1.weight", (w, 3, 32, 32)),
        ("ln_pre.weight", (w,)),
        ("ln_pre.bias", (w,)),
    ]
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        out += [
            (p + "ln_1.weight", (w,)),
            (p + "ln_1.bias", (w,)),
            (p + "attn.in_proj_weight", (3 * w, w)),
            (p + "attn.in_proj_bias", (3 * w,)),
            (p + "attn.out_proj.weight", (w, w)),
            (p + "attn.out_proj.bias", (w,)),
            (p + "ln_2.weight", (w,)),
            (p + "ln_2.bias", (w,)),
            (p + "mlp.c_fc.weight", (4 * w, w)),
            (p + "mlp.c_fc.bias", (4 * w,)),
            (p + "mlp.c_proj.weight", (w, 4 * w)),
            (p + "mlp.c_proj.bias", (w,)),
        ]
    out += [("ln_post.weight", (w,)), ("ln_post.bias", (w,)), ("proj", (w, 512))]
    return out


# -- checkpoints -----------------------------------------------------------------------------------


def base_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A pretrained-looking tensor: norms near 1, everything else N(0, 0.02^2)."""
    if len(shape) == 1 and name.endswith("weight") and ("norm" in name or "ln_" in name):
        return 1.0 + 0.02 * torch.randn(shape, generator=gen)
    return 0.02 * torch.randn(shape, generator=gen)


def write_checkpoint(
    folder: Path,
    layout: Layout,
    make: Callable[[str, tuple[int, ...]], torch.Tensor],
    dtype: torch.dtype,
    config: dict | None = None,
    max_shard_bytes: int = 2 * 10**9,
) -> Path:
    """Write an HF folder one tensor at a time (memory: one tensor), ``make(name, shape)`` each."""
    sys.path.insert(0, str(SRC))
    from pactmerge.io.writer import ShardedWriter

    folder.mkdir(parents=True, exist_ok=True)
    w = ShardedWriter(folder, [(n, s, dtype) for n, s in layout], max_shard_bytes)
    for name, shape in layout:
        w.add(name, make(name, shape).to(dtype).contiguous())
    w.close()
    (folder / "config.json").write_text(json.dumps(config or {"generated_by": "pactmerge benchmarks"}))
    return folder


def make_family(
    root: Path,
    layout: Layout,
    n_models: int,
    dtype: torch.dtype,
    config: dict | None = None,
    rel_noise: float = 0.1,
    max_shard_bytes: int = 2 * 10**9,
) -> tuple[Path, list[Path]]:
    """A base and ``n_models`` fine-tunes (base + ``rel_noise`` x 0.02 x N(0, 1) plus a rank-4
    update on matrices), generated tensor by tensor and cached under ``root`` (a marker file)."""
    marker = root / f"done-{n_models}"
    base_dir, models = root / "base", [root / f"m{t}" for t in range(n_models)]
    if marker.exists():
        return base_dir, models
    t0 = time.perf_counter()

    def base_of(name, shape):
        g = torch.Generator().manual_seed(zlib.crc32(f"{name}/base".encode()))
        return base_tensor(name, shape, g)

    write_checkpoint(base_dir, layout, base_of, dtype, config, max_shard_bytes)
    for t, folder in enumerate(models):

        def tuned(name, shape, t=t):
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{t}".encode()))
            d = torch.randn(shape, generator=g)
            if len(shape) == 2:
                r = 4
                d += torch.randn(shape[0], r, generator=g) @ torch.randn(r, shape[1], generator=g) / r
            return base_of(name, shape) + rel_noise * 0.02 * d

        write_checkpoint(folder, layout, tuned, dtype, config, max_shard_bytes)
    marker.write_text("ok")
    print(f"generated {root} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return base_dir, models


# -- measured processes ------------------------------------------------------------------------------


PEAK_WRAPPER = r"""
import os, sys, json, time, resource
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stdout.flush()
print(json.dumps({"wall": time.perf_counter() - t0, "peak_rss": usage.ru_maxrss * 1024, "status": status}))
"""


def run_with_peak(cmd: list[str], env: dict | None = None, timeout: float = 7200) -> dict:
    """Run ``cmd`` in a fresh process under a tiny wrapper that reports its exact wall time and
    peak RSS (``wait4`` of that one child). Returns ``{"seconds", "peak_rss", "stdout"}`` or ``{"error"}``."""
    full_env = {**os.environ, **ONE_THREAD, **(env or {})}
    res = subprocess.run(
        [sys.executable, "-c", PEAK_WRAPPER, *cmd], env=full_env, capture_output=True, text=True, timeout=timeout
    )
    lines = res.stdout.strip().splitlines()
    try:
        info = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    if info["status"] != 0:
        return {"error": (res.stderr.strip().splitlines() or [f"exit status {info['status']}"])[-1]}
    return {"seconds": info["wall"], "peak_rss": info["peak_rss"], "stdout": "\n".join(lines[:-1])}


# -- results ----------------------------------------------------------------------------------------


def digest(folder: Path) -> dict:
    """Each file's SHA-256 in a merge output folder, except the model card (it holds the merge time)."""
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.name != "README.md"
    }


def open_folder(path: Path):
    sys.path.insert(0, str(SRC))
    from pactmerge.io.sources import open_source

    return open_source(path)


def max_rel_diff_folders(base: Path, ours: Path, ref: Path) -> tuple[float, float]:
    """``(max over tensors of max|D_ours - D_ref| / max|D_ref|, fraction of differing entries)``,
    ``D = merged - base`` in float64, streamed tensor by tensor."""
    b, o, r = open_folder(base), open_folder(ours), open_folder(ref)
    worst, differ, total = 0.0, 0, 0
    for name in b.names():
        if not b.dtype(name).is_floating_point:
            continue
        t0 = b.get(name).double()
        d_ref, d_ours = r.get(name).double() - t0, o.get(name).double() - t0
        scale = float(d_ref.abs().max()) or 1.0
        diff = (d_ours - d_ref).abs()
        worst = max(worst, float(diff.max()) / scale)
        differ += int((diff > 0).sum())
        total += diff.numel()
        for s in (b, o, r):
            s.release(name)
    return worst, differ / max(1, total)


def max_rel_diff_states(base: dict, ours: dict, ref: dict) -> float:
    worst = 0.0
    for k, t0 in base.items():
        if not t0.is_floating_point():
            continue
        d_ref, d_ours = ref[k].double() - t0.double(), ours[k].double() - t0.double()
        scale = float(d_ref.abs().max()) or 1.0
        worst = max(worst, float((d_ours - d_ref).abs().max()) / scale)
    return worst


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def default_workdir(name: str) -> Path:
    """Where a benchmark writes its generated checkpoints unless ``--workdir`` says otherwise:
    ``$PACTMERGE_BENCH_DIR/<name>``, else ``<temp dir>/pactmerge-bench/<name>``."""
    root = os.environ.get("PACTMERGE_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "pactmerge-bench")
    return Path(root) / name


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        load = f", load average {os.getloadavg()[0]:.1f}"
    except OSError:
        load = ""
    return f"{cpu}, {cores} cores{load}, {platform.python_version()}, torch {torch.__version__}"


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
