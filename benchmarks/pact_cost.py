"""What PACT adds to Iso-C: PACT-Iso-C (randomized and exact SVDs) against plain Iso-C on
768-wide layers (CLIP ViT-B/32 image-encoder shapes), T = 8, float32.

Goal (issue 18): PACT-Iso-C with ``svd: randomized`` <= 1.3x plain Iso-C.

Usage::

    .venv/bin/python benchmarks/pact_cost.py [--repeats 3] [--workdir DIR]

Each merge is a fresh process with one thread, in-memory inputs loaded (materialized) before the
timed ``pactmerge.merge`` call; the rows alternate and repeat; the table has medians and the
ratio to plain Iso-C's median. "cached V_0K" runs with ``cache_dir`` after a run that filled
the cache (a base merged again: other fine-tunes, another alpha).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_util import SRC, default_workdir, machine, make_family, median, run_with_peak, table, vit_b32_layout

PACT = {"K": 15, "k": 8}
ENV = {"THP_MEM_ALLOC_ENABLE": "1", "OMP_WAIT_POLICY": "PASSIVE"}  # as pactmerge's command line sets
ROWS = {
    "Iso-C": {"method": "iso_c"},
    "PACT-Iso-C randomized": {"method": "iso_c", "pact": {**PACT, "svd": "randomized"}},
    "PACT-Iso-C randomized + cached V_0K": {"method": "iso_c", "pact": {**PACT, "svd": "randomized"}, "cache": True},
    "PACT-Iso-C exact": {"method": "iso_c", "pact": {**PACT, "svd": "exact"}},
    "PACT-Iso-C exact + cached V_0K": {"method": "iso_c", "pact": {**PACT, "svd": "exact"}, "cache": True},
}


def worker(spec: dict) -> None:
    import torch
    from safetensors.torch import load_file

    from pactmerge.api import merge
    from pactmerge.registry import available_methods

    available_methods()  # imports outside the timed call
    torch.set_num_threads(1)
    data = Path(spec["data"])

    def load(name):
        return {k: v.clone() for k, v in load_file(str(data / name / "model.safetensors")).items()}

    base = load("base")
    models = [load(p.name) for p in sorted(data.iterdir()) if p.name.startswith("m")]
    cfg = dict(spec["cfg"])
    cache = spec.get("cache_dir") if cfg.pop("cache", False) else None
    t0 = time.perf_counter()
    merge(base_model=base, models=models, cache_dir=cache, **cfg)
    print(json.dumps({"merge_s": time.perf_counter() - t0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--workdir", type=Path, default=default_workdir("pact_cost"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    import torch

    data = args.workdir / f"vit-b32-{args.layers}"
    make_family(data, vit_b32_layout(args.layers), args.tasks, dtype=torch.float32, max_shard_bytes=10**12)
    rows = [r for r in args.rows.split(",") if r]
    cache_dir = Path(tempfile.mkdtemp(prefix="vcache-", dir=args.workdir))
    times: dict = {r: [] for r in rows}
    # Fill the cache once (not timed), as a previous run of the same base would have.
    for r in rows:
        if ROWS[r].get("cache"):
            spec = {"data": str(data), "cfg": ROWS[r], "cache_dir": str(cache_dir)}
            run_with_peak([sys.executable, __file__, "--worker", json.dumps(spec)], {"PYTHONPATH": str(SRC), **ENV})
    for rep in range(args.repeats):
        for r in rows if rep % 2 == 0 else list(reversed(rows)):
            spec = {"data": str(data), "cfg": ROWS[r], "cache_dir": str(cache_dir)}
            res = run_with_peak(
                [sys.executable, __file__, "--worker", json.dumps(spec)], {"PYTHONPATH": str(SRC), **ENV}
            )
            if "error" not in res:
                res.update(json.loads(res.pop("stdout").strip().splitlines()[-1]))
            times[r].append(res)
            print(f"[{rep}] {r}: {res}", file=sys.stderr, flush=True)
    base_t = median(x["merge_s"] for x in times["Iso-C"] if "merge_s" in x) if "Iso-C" in times else float("nan")
    out = []
    for r in rows:
        vals = [x["merge_s"] for x in times[r] if "merge_s" in x]
        if not vals:
            out.append([r, "error: " + next(x["error"] for x in times[r] if "error" in x), ""])
            continue
        out.append([r, f"{median(vals):.2f}", f"**{median(vals) / base_t:.2f}x**"])
    print(
        f"\nCLIP ViT-B/32 image-encoder shapes ({args.layers} blocks, 768 wide), float32, T = {args.tasks},"
        f" PACT K = {PACT['K']}, k = {PACT['k']}; {machine()}; {args.repeats} repeats, medians; one thread.\n"
    )
    print(table(["merge", "merge call s", "vs Iso-C"], out))
    shutil.rmtree(cache_dir, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
