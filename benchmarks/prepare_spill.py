"""PACT before a model-scope method, with and without the spill of the filtered task vectors
(``pactmerge.spill``): TIES and PCB stream the model several times for their statistics, and
without the spill every pass runs PACT again.

Usage::

    .venv/bin/python benchmarks/prepare_spill.py [--layers 4] [--tasks 8] [--repeats 2]

CLIP ViT-B/32 image-encoder shapes (768 wide), float32, checkpoints on disk. Each merge is a fresh
process with one thread writing its output folder; "spill off" sets ``PACTMERGE_SPILL_DIR=none``.
The rows alternate and repeat; the table has medians, the ratio of the two, the peak RSS, and
whether the two outputs are the same bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from bench_util import (
    SRC,
    default_workdir,
    digest,
    fmt_bytes,
    machine,
    make_family,
    median,
    run_with_peak,
    table,
    vit_b32_layout,
)

PACT = {"K": 15, "k": 8}
METHODS = {
    "PACT-TIES": {"method": "ties", "pact": PACT},
    "PACT-PCB": {"method": "pcb", "pact": PACT},
}


def worker(spec: dict) -> None:
    from pactmerge.api import merge
    from pactmerge.registry import available_methods

    available_methods()  # imports outside the timed call
    t0 = time.perf_counter()
    merge(spec["cfg"], spec["out"])
    print(json.dumps({"merge_s": time.perf_counter() - t0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=default_workdir("prepare_spill"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    import torch

    data = args.workdir / f"vit-b32-{args.layers}"
    base, models = make_family(data, vit_b32_layout(args.layers), args.tasks, torch.float32, max_shard_bytes=10**12)
    spill_dir = args.workdir / "spill"
    modes = {"spill": {"PACTMERGE_SPILL_DIR": str(spill_dir)}, "no spill": {"PACTMERGE_SPILL_DIR": "none"}}
    runs: dict = {(m, mode): [] for m in METHODS for mode in modes}
    digests: dict = {}
    for rep in range(args.repeats):
        order = list(runs) if rep % 2 == 0 else list(reversed(list(runs)))
        for method, mode in order:
            out = args.workdir / "out" / f"{method}-{mode.replace(' ', '_')}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = {"base_model": str(base), "models": [str(m) for m in models], **METHODS[method]}
            res = run_with_peak(
                [sys.executable, __file__, "--worker", json.dumps({"cfg": cfg, "out": str(out)})],
                {"PYTHONPATH": str(SRC), **modes[mode]},
            )
            if "error" not in res:
                res.update(json.loads(res.pop("stdout").strip().splitlines()[-1]))
                digests[(method, mode)] = digest(out)
            runs[(method, mode)].append(res)
            print(f"[{rep}] {method} / {mode}: {res}", file=sys.stderr, flush=True)
    rows = []
    for method in METHODS:
        cells = [method]
        secs = {}
        for mode in modes:
            ok = [x for x in runs[(method, mode)] if "merge_s" in x]
            secs[mode] = median(x["merge_s"] for x in ok) if ok else float("nan")
            peak = max((x["peak_rss"] for x in ok), default=0)
            cells += [f"{secs[mode]:.1f}", fmt_bytes(peak)]
        spilled, plain = digests.get((method, "spill")), digests.get((method, "no spill"))
        same = spilled is not None and spilled == plain
        cells += [f"**{secs['no spill'] / secs['spill']:.2f}x**", "yes" if same else "NO"]
        rows.append(cells)
    print(
        f"\nCLIP ViT-B/32 shapes ({args.layers} blocks, 768 wide), float32, T = {args.tasks}, PACT K,k = "
        f"{PACT['K']},{PACT['k']}; {machine()}; {args.repeats} repeats, medians; one thread.\n"
    )
    header = ["merge", "spill: s", "peak RSS", "no spill: s", "peak RSS", "speed-up", "same bytes"]
    print(table(header, rows))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
