"""GPU check for a machine with CUDA: the same merges on the GPU as on the CPU (correctness) and
their times (speed). GPU speed is otherwise unmeasured (docs/performance.md).

Usage (a few minutes; needs torch with CUDA)::

    PYTHONPATH=src python benchmarks/gpu_check.py [--layers 4] [--tasks 8] [--repeats 3]

For each merge -- TA, TIES, TSV-M, Iso-C, PACT-Iso-C (exact and randomized) on CLIP ViT-B/32
image-encoder shapes, float32, in memory -- it prints the max relative difference of the merged
update between ``device="cuda"`` and the CPU (float32 tolerance: expect <= 1e-4; DARE-free
methods only, so the random draws are the same) and the median times of CPU (all cores) and
GPU, with the plain loop and with ``workers=2`` (read-ahead through pinned memory overlapping
the compute). It also checks the stacked (batched) top-k SVD against the per-matrix one on the
GPU. Exit status 1 if any difference is above tolerance.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bench_util import table, vit_b32_layout

CASES = {
    "TA": {"method": "task_arithmetic"},
    "TIES": {"method": "ties", "parameters": {"scope": "tensor"}},
    "TSV-M": {"method": "tsv_m"},
    "Iso-C": {"method": "iso_c"},
    "PACT-Iso-C exact": {"method": "iso_c", "pact": {"K": 15, "k": 8}},
    "PACT-Iso-C randomized": {"method": "iso_c", "pact": {"K": 15, "k": 8, "svd": "randomized"}},
}
TOL = 1e-4


def rel_diff(base: dict, a: dict, b: dict) -> float:
    worst = 0.0
    for k, t0 in base.items():
        da, db = a[k].double() - t0.double(), b[k].double() - t0.double()
        worst = max(worst, float((da - db).abs().max()) / (float(db.abs().max()) or 1.0))
    return worst


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    import pactmerge
    from pactmerge.linalg import stacked_top_right, top_right_singular_vectors

    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    # Stacked vs per-matrix top-k on the GPU.
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(3072, 768, generator=g).cuda() for _ in range(9)]
    worst_stack = 0.0
    for method in ("exact", "randomized"):
        gens = [torch.Generator().manual_seed(i) for i in range(9)]
        stacked = stacked_top_right(mats, 8, method=method, generators=gens)
        gens = [torch.Generator().manual_seed(i) for i in range(9)]
        single = [top_right_singular_vectors(a, 8, method=method, generator=gg) for a, gg in zip(mats, gens)]
        for x, y in zip(stacked, single):
            worst_stack = max(worst_stack, float((x @ x.mT - y @ y.mT).abs().max()))
    print(f"stacked vs per-matrix top-8 projectors on the GPU: max difference {worst_stack:.1e}")

    layout = vit_b32_layout(args.layers)
    base = {n: 0.02 * torch.randn(s, generator=g) for n, s in layout}
    models = []
    for t in range(args.tasks):
        gt = torch.Generator().manual_seed(100 + t)
        models.append({n: v + 0.002 * torch.randn(v.shape, generator=gt) for n, v in base.items()})
    rows, bad = [], worst_stack > TOL
    for name, cfg in CASES.items():
        t_cpu, cpu = timed(lambda cfg=cfg: pactmerge.merge(base_model=base, models=models, **cfg), args.repeats)
        t_gpu, gpu = timed(
            lambda cfg=cfg: pactmerge.merge(base_model=base, models=models, device="cuda", **cfg), args.repeats
        )
        t_gpu2, _ = timed(
            lambda cfg=cfg: pactmerge.merge(base_model=base, models=models, device="cuda", workers=2, **cfg),
            args.repeats,
        )
        d = rel_diff(base, gpu, cpu)
        bad |= d > TOL
        rows.append([name, f"{d:.1e}", f"{t_cpu:.2f}", f"{t_gpu:.2f}", f"{t_gpu2:.2f}", f"{t_cpu / t_gpu:.1f}x"])
        print(rows[-1], flush=True)
    print(f"\nCLIP ViT-B/32 shapes, {args.layers} blocks, float32, T = {args.tasks}; medians of {args.repeats}.\n")
    print(table(["merge", "max rel diff GPU vs CPU", "CPU s", "GPU s", "GPU s, workers 2", "GPU speed-up"], rows))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
