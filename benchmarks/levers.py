"""What each speed lever buys, measured in isolation on one thread: the old way and the new way
of the same step, side by side, with the ratio (and that the results agree).

Usage::

    .venv/bin/python benchmarks/levers.py [--repeats 5]

Medians of ``--repeats`` in one process (in-process steps) or in fresh processes (the huge-page
and worker-pool rows, whose settings act at process start). docs/performance.md quotes the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from bench_util import SRC, default_workdir, machine, table

sys.path.insert(0, str(SRC))


def timed(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def row(name: str, old: float, new: float, note: str = "") -> list[str]:
    unit, scale = ("ms", 1e3) if max(old, new) < 10 else ("s", 1.0)
    return [name, f"{old * scale:.1f} {unit}", f"{new * scale:.1f} {unit}", f"**{old / new:.1f}x**", note]


def in_process(repeats: int) -> list[list[str]]:
    from pactmerge.filters.pact import _project_out  # noqa: F401 -- imported to warm the registry
    from pactmerge.linalg import thin_svd, top_right_exact
    from pactmerge.linalg.cache import SubspaceCache
    from pactmerge.methods.ties import kth_largest_magnitude

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = []
    big = torch.randn(4096, 4096, generator=g)  # 64 MiB of float32

    def isfinite_old():
        return bool(torch.isfinite(big).all())

    def aminmax_new():
        lo, hi = torch.aminmax(big)
        return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))

    rows.append(
        row("finiteness check of a 4096 x 4096 tensor", timed(isfinite_old, repeats), timed(aminmax_new, repeats))
    )
    rows.append(
        row(
            "reading an in-memory input: defensive clone vs the tensor itself",
            timed(lambda: big.clone(), repeats),
            timed(lambda: big.detach(), repeats),
            "per 64 MiB input",
        )
    )
    mags = torch.randn(11_534_336, generator=g).abs()  # a TinyLlama MLP matrix
    k = int(0.2 * mags.numel())
    old = timed(lambda: float(torch.kthvalue(mags, mags.numel() - k + 1).values), repeats)
    new = timed(lambda: kth_largest_magnitude(mags, k, mags), repeats)
    same = float(torch.kthvalue(mags, mags.numel() - k + 1).values) == kth_largest_magnitude(mags, k, mags)
    rows.append(row("TIES k-th largest |Delta| (11.5 M), kthvalue vs radix step", old, new, f"same value: {same}"))
    rows.append(
        row(
            "DARE mask draws (11.5 M), float64 vs compute dtype float32",
            timed(lambda: torch.rand(11_534_336, generator=g, dtype=torch.float64) >= 0.5, repeats),
            timed(lambda: torch.rand(11_534_336, generator=g, dtype=torch.float32).ge_(0.5), repeats),
            "draws change (documented)",
        )
    )
    for m, n, what in ((768, 3072, "wide 768 x 3072: transposed"), (3072, 768, "tall 3072 x 768: QR first")):
        a = torch.randn(m, n, generator=g)
        old = timed(lambda a=a: torch.linalg.svd(a, full_matrices=False), repeats)
        new = timed(lambda a=a: thin_svd(a), repeats)
        s_old = torch.linalg.svdvals(a)
        s_new = thin_svd(a)[1]
        rel = float((s_old - s_new).abs().max() / s_old[0])
        rows.append(row(f"thin SVD, {what}", old, new, f"singular values agree to {rel:.0e} (relative)"))
    for m, n in ((3072, 768), (768, 3072)):
        a = torch.randn(m, n, generator=g)
        old = timed(lambda a=a: torch.linalg.svd(a, full_matrices=False)[2][:15].mT, repeats)
        new = timed(lambda a=a: top_right_exact(a, 15), repeats)
        v_old = torch.linalg.svd(a.double(), full_matrices=False)[2][:15].mT
        gap = float(
            torch.linalg.matrix_norm(
                top_right_exact(a, 15).double() - v_old @ (v_old.mT @ top_right_exact(a, 15).double()), 2
            )
        )
        rows.append(
            row(f"top-15 right singular vectors of {m} x {n}: SVD vs float64 Gram", old, new, f"subspace gap {gap:.0e}")
        )
    d = torch.randn(3072, 768, generator=g)
    p, _ = torch.linalg.qr(torch.randn(768, 71, generator=g))
    rows.append(
        row(
            "PACT projection d - (d P) P^T, 3072 x 768, p = 71: two products vs addmm",
            timed(lambda: d - (d @ p) @ p.mT, repeats),
            timed(lambda: torch.addmm(d, d @ p, p.mT, alpha=-1.0), repeats),
        )
    )
    base = torch.randn(3072, 768, generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        cache = SubspaceCache(tmp)
        cache.get_or_compute(base, lambda: top_right_exact(base, 15), K=15, svd="exact")
        rows.append(
            row(
                "V_{0,K} of a 3072 x 768 base, exact: computed vs cache hit",
                timed(lambda: top_right_exact(base, 15), repeats),
                timed(
                    lambda: cache.get_or_compute(base, lambda: top_right_exact(base, 15), K=15, svd="exact"), repeats
                ),
                "hashing the base included",
            )
        )
    return rows


CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    torch.set_num_threads(int(sys.argv[3]))
    from pactmerge.api import merge
    from pactmerge.registry import available_methods
    available_methods()
    t0 = time.perf_counter()
    merge(json.loads(sys.argv[1]), sys.argv[2], overwrite=True, workers=int(sys.argv[4]))
    print(json.dumps({"s": time.perf_counter() - t0, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt}))
    """
)


def fresh(cfg: dict, out: Path, env: dict, threads: int = 1, workers: int = 1) -> dict:
    import os

    res = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cfg), str(out), str(threads), str(workers)],
        env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(threads), **env},
        capture_output=True,
        text=True,
    )
    if res.returncode:
        raise RuntimeError(res.stderr.strip().splitlines()[-1])
    return json.loads(res.stdout.strip().splitlines()[-1])


def in_fresh_processes(repeats: int, workdir: Path) -> list[list[str]]:
    from bench_util import llama_config, llama_layout, make_family, vit_b32_layout

    rows = []
    shape = {"hidden": 2048, "inter": 5632, "layers": 2, "vocab": 4000, "heads": 32, "kv_heads": 4}
    base, models = make_family(
        workdir / "llama", llama_layout(**shape), 3, torch.bfloat16, llama_config(shape, "bfloat16")
    )
    cfg = {"base_model": str(base), "models": [str(m) for m in models], "out_dtype": "bfloat16"}
    runs: dict = {"off": [], "on": []}
    for _ in range(repeats):
        for key, env in (("off", {"THP_MEM_ALLOC_ENABLE": "0"}), ("on", {"THP_MEM_ALLOC_ENABLE": "1"})):
            runs[key].append(fresh(cfg, workdir / "out", env))
    off, on = (statistics.median(r["s"] for r in runs[k]) for k in ("off", "on"))
    f_off, f_on = (statistics.median(r["faults"] for r in runs[k]) for k in ("off", "on"))
    rows.append(
        row(
            "TA merge, 100 M bfloat16 parameters x 4 inputs: 4 KiB pages vs huge pages",
            off,
            on,
            f"page faults {f_off / 1e6:.1f} M -> {f_on / 1e6:.2f} M",
        )
    )
    vb, vms = make_family(workdir / "vit", vit_b32_layout(2), 8, torch.float32, max_shard_bytes=10**12)
    cfg = {"base_model": str(vb), "models": [str(m) for m in vms], "method": "iso_c"}
    one, two = [], []
    for _ in range(repeats):
        one.append(fresh(cfg, workdir / "out", {}, threads=1, workers=1)["s"])
        two.append(fresh(cfg, workdir / "out", {}, threads=1, workers=2)["s"])
    rows.append(
        row(
            "Iso-C merge, 2 ViT-B/32 blocks, T = 8: plain loop vs --workers 2 (1 thread each)",
            statistics.median(one),
            statistics.median(two),
            "2 cores shared with other jobs",
        )
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=default_workdir("levers"))
    args = ap.parse_args()
    rows = in_process(args.repeats) + in_fresh_processes(max(3, args.repeats // 2), args.workdir)
    print(f"\n{machine()}; one thread unless stated; medians of {args.repeats}.\n")
    print(table(["lever", "before", "after", "speed-up", "note"], rows))
    import shutil

    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
