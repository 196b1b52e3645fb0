"""Time and peak memory of merging three ~100M-parameter generated checkpoints.

Usage: python benchmarks/merge_speed.py [--layers 12 --hidden 768 --workdir /tmp/pactmerge-speed]

Generates a BERT-base-shaped base (12 layers x 768, FFN 3072, 30522-token embeddings: ~110M
parameters, float32) and three fine-tunes once (cached in --workdir), then runs each merge in a
fresh subprocess and prints a markdown table: wall time and the peak resident-set growth of the
merge (VmHWM minus RSS before the merge). Run the rows side by side in one invocation; quote
ratios, not absolute numbers (shared, noisy machines).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import json, sys, time, torch, pactmerge
    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    torch.linalg.svd(torch.randn(64, 64))
    before = status("VmRSS")
    t0 = time.perf_counter()
    pactmerge.merge(json.loads(sys.argv[1]), sys.argv[2], overwrite=True, device=sys.argv[3])
    print(json.dumps({"seconds": time.perf_counter() - t0, "growth": status("VmHWM") - before}))
    """
)


def generate(workdir: Path, layers: int, hidden: int, n_models: int) -> tuple[Path, list[Path]]:

    from pactmerge.synthetic import base_state, finetune_state, write_hf_folder

    marker = workdir / f"done-{layers}-{hidden}-{n_models}"
    base_dir, models = workdir / "base", [workdir / f"task{t}" for t in range(n_models)]
    if marker.exists():
        return base_dir, models
    t0 = time.perf_counter()
    base = base_state(layers=layers, hidden=hidden, ffn=4 * hidden, vocab=30522)
    n = sum(v.numel() for v in base.values())
    print(f"generating base + {n_models} fine-tunes of {n / 1e6:.1f}M parameters in {workdir} ...", file=sys.stderr)
    write_hf_folder(base_dir, base, max_shard_bytes=2 * 10**9)
    for t, path in enumerate(models):
        write_hf_folder(path, finetune_state(base, t), max_shard_bytes=2 * 10**9)
    del base
    marker.write_text("ok")
    print(f"generated in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return base_dir, models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pactmerge-speed"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", default="all", help="comma-separated row names, or 'all'")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    base, models = generate(args.workdir, args.layers, args.hidden, args.models)
    pact = {"K": 15, "k": 8}
    rows = {
        "task_arithmetic": {"method": "task_arithmetic"},
        "PACT-TA (exact)": {"method": "task_arithmetic", "pact": {**pact, "svd": "exact"}},
        "PACT-TA (randomized)": {"method": "task_arithmetic", "pact": {**pact, "svd": "randomized"}},
        "iso_c": {"method": "iso_c"},
        "PACT-Iso-C (exact)": {"method": "iso_c", "pact": {**pact, "svd": "exact"}},
        "PACT-Iso-C (randomized)": {"method": "iso_c", "pact": {**pact, "svd": "randomized"}},
    }
    if args.rows != "all":
        rows = {k: v for k, v in rows.items() if k in args.rows.split(",")}
    print(
        f"\n{args.models} models of {args.layers} layers x {args.hidden} (BERT-base shapes), float32, device"
        f" {args.device}\n"
    )
    print("| merge | wall time (s) | peak RSS growth (MiB) |")
    print("|---|---|---|")
    for name, extra in rows.items():
        cfg = {"base_model": str(base), "models": [str(m) for m in models], "max_shard_size": "1GB", **extra}
        res = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(cfg), str(args.workdir / "out"), args.device],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            print(f"| {name} | failed: {res.stderr.strip().splitlines()[-1]} | |")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['seconds']:.1f} | {r['growth'] / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()
