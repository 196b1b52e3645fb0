"""Peak memory of LLM-sized merges: Llama-2-7B-shaped bfloat16 checkpoints (base + 2), TA and
PACT-Iso-C (randomized), disk to disk, at 2, 4 and 8 layers of the 7B shapes; extrapolated to 32.

Goal (issue 18): peak RSS <= 8 GiB for TA and for PACT-Iso-C, flat in the number of layers.

Usage::

    .venv/bin/python benchmarks/llama7b_memory.py [--layers 2,4,8] [--full]
        [--workdir DIR] [--threads 2]

Each merge is ``pactmerge merge`` in a fresh process (the plain loop, ``--workers 1``); peak
RSS is that process's ``ru_maxrss``. Each layer count's checkpoints are generated, merged and
deleted before the next (disk: about 3 x (0.5 + 0.4 L) GB plus the output). The extrapolation
is a least-squares line through the measured peaks: its slope per layer is what 32 layers add.
``--full`` also runs all 32 layers (about 54 GB of disk) if ``df`` shows room for it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

from bench_util import (
    LLAMA2_7B,
    SRC,
    default_workdir,
    fmt_bytes,
    llama_config,
    llama_layout,
    machine,
    make_family,
    run_with_peak,
    table,
)

CASES = {
    "TA": {"method": "task_arithmetic"},
    "PACT-Iso-C (randomized)": {"method": "iso_c", "pact": {"K": 15, "k": 8, "svd": "randomized"}},
}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,4,8")
    ap.add_argument("--full", action="store_true", help="also the full 32 layers, if the disk has room")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each merge")
    ap.add_argument("--methods", default=",".join(CASES))
    ap.add_argument("--workdir", type=Path, default=default_workdir("llama7b"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (hidden 256) to check the script quickly")
    args = ap.parse_args()
    counts = [int(x) for x in args.layers.split(",") if x]
    if args.full:
        need = 3 * 13.5e9 + 13.5e9 + 5e9
        free = shutil.disk_usage(args.workdir.parent if args.workdir.parent.exists() else "/").free
        if free > need:
            counts.append(LLAMA2_7B["layers"])
        else:
            print(f"--full skipped: {free / 1e9:.0f} GB free, about {need / 1e9:.0f} GB needed", file=sys.stderr)
    methods = [m for m in args.methods.split(",") if m]
    peaks: dict = {m: {} for m in methods}
    secs: dict = {m: {} for m in methods}
    ours_py = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python")
    for n_layers in counts:
        shape = {**LLAMA2_7B, "layers": n_layers}
        if args.tiny:
            shape.update(hidden=256, inter=688, vocab=1000, heads=8, kv_heads=8)
        data = args.workdir / f"layers-{n_layers}"
        base, models = make_family(
            data, llama_layout(**shape), 2, dtype=torch.bfloat16, config=llama_config(shape, "bfloat16")
        )
        for m in methods:
            cfg = data / f"{m.split()[0]}.yaml"
            cfg.write_text(yaml.safe_dump({"base_model": str(base), "models": [str(p) for p in models], **CASES[m]}))
            out = data / "out"
            cmd = [ours_py, "-m", "pactmerge", "merge", str(cfg), str(out), "--no-progress", "--overwrite"]
            env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
            r = run_with_peak(cmd, env)
            print(f"{n_layers} layers, {m}: {r}", file=sys.stderr, flush=True)
            shutil.rmtree(out, ignore_errors=True)
            if "error" in r:
                peaks[m][n_layers] = r["error"]
                continue
            peaks[m][n_layers] = r["peak_rss"]
            secs[m][n_layers] = r["seconds"]
        shutil.rmtree(data, ignore_errors=True)
    print(
        f"\nLlama-2-7B shapes (hidden 4096, FFN 11008, vocab 32000), bfloat16, base + 2, compute float32,"
        f" disk to disk, {args.threads} thread(s); {machine()}.\n"
    )
    header = ["method", *[f"{n} layers" for n in counts], "slope / layer", "extrapolated 32 layers"]
    rows = []
    for m in methods:
        got = {n: v for n, v in peaks[m].items() if isinstance(v, int | float)}
        cells = [fmt_bytes(peaks[m][n]) if n in got else f"error: {peaks[m].get(n)}" for n in counts]
        if len(got) >= 2:
            xs, ys = list(got), list(got.values())
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sum((x - mx) ** 2 for x in xs) or 1.0)
            at32 = my + slope * (32 - mx)
            rows.append([m, *cells, f"{slope / 2**20:+.0f} MiB", fmt_bytes(at32)])
        else:
            rows.append([m, *cells, "-", "-"])
    print(table(header, rows))
    print("\nwall seconds:", {m: {n: round(s, 1) for n, s in v.items()} for m, v in secs.items()})
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
