"""Low-rank (adapter factors) vs dense (adapter merged into a full checkpoint) merge paths.

A generated case: one ``m x n`` weight (default 4096 x 4096, float32) plus a bias, T LoRA adapters
of rank r on it; or, with ``--adapters``, real PEFT adapter folders on their base model (e.g. the
LoRA benchmark's, whose largest layers are MiniLM's 1536 x 384 MLP weights). The same merge runs
twice per method, each in a fresh subprocess writing a dense merged model: from the adapter
folders (low-rank path) and from the equivalent dense fine-tunes ``theta_0 + s B A`` saved as
safetensors (dense path). Prints wall time, peak RSS growth during the merge, and
the max |difference| between the two outputs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_lowrank.py --shape 4096x4096 --T 4 --r 16
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_lowrank.py \
        --base ~/.cache/pactmerge/bench/base-* --adapters ~/.cache/pactmerge/bench/lora/* \
        --pact 7,4 --exclude '^embeddings\\.' '^pooler\\.'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = [
    ("task_arithmetic", {}, None),
    ("iso_c", {}, None),
    ("tsv_m", {}, None),
    ("knots", {}, None),
    ("task_arithmetic", {}, {"K": 15, "k": 8}),
    ("iso_c", {}, {"K": 15, "k": 8}),
]


def generate(root: Path, m: int, n: int, T: int, r: int) -> tuple[str, list[str], list[str]]:
    """Writes the base, T adapters and their dense equivalents; returns their paths."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {
        "model.layers.0.proj.weight": torch.randn(m, n, generator=g) / n**0.5,
        "model.layers.0.proj.bias": torch.zeros(m),
    }
    save_file(base, str(root / "base.safetensors"))
    for t in range(T):
        a = torch.randn(r, n, generator=g) / n**0.5
        b = torch.randn(m, r, generator=g) / r**0.5
        folder = root / f"adapter{t}"
        folder.mkdir()
        save_file(
            {
                "base_model.model.model.layers.0.proj.lora_A.weight": a,
                "base_model.model.model.layers.0.proj.lora_B.weight": b,
            },
            str(folder / "adapter_model.safetensors"),
        )
        (folder / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["proj"]})
        )
        ft = {k: v.clone() for k, v in base.items()}
        ft["model.layers.0.proj.weight"] += 2.0 * b @ a
        save_file(ft, str(root / f"dense{t}.safetensors"))
    return (
        str(root / "base.safetensors"),
        [str(root / f"adapter{t}") for t in range(T)],
        [str(root / f"dense{t}.safetensors") for t in range(T)],
    )


def densify_adapters(root: Path, base: str, adapters: list[str]) -> list[str]:
    """The dense fine-tunes theta_0 + s B A of real adapters (read by pactmerge's own reader)."""
    import pactmerge

    weights = sorted(Path(base).glob("*.safetensors"))
    if len(weights) != 1:
        raise SystemExit(f"{base}: expected one model.safetensors")
    base_file = str(weights[0])
    dense = []
    for t, a in enumerate(adapters):
        out = root / f"dense{t}"
        pactmerge.merge({"base_model": base_file, "models": [a], "method": "task_arithmetic"}, out)
        dense.append(str(out / "model.safetensors"))
    return dense


CHILD = r"""
import json, sys, time
import pactmerge, torch
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
cfg = json.loads(sys.argv[1])
torch.linalg.svd(torch.randn(64, 64))  # library initialisation is not counted
# Reset the peak-RSS mark (VmHWM) to the current RSS, so import-time peaks are not counted.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
t0 = time.perf_counter()
pactmerge.merge(cfg, sys.argv[2])
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "peak_mib": (status("VmHWM") - before) / 2**20}))
"""


def run(cfg: dict, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(out)], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"merge failed ({cfg['method']}, pact {cfg.get('pact')}):\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096x4096", help="generated case: MxN of the one weight")
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--base", help="real case: the base model folder the adapters were trained on")
    ap.add_argument("--adapters", nargs="+", help="real case: PEFT adapter folders")
    ap.add_argument("--pact", default="15,8", help="PACT K,k of the PACT rows")
    ap.add_argument(
        "--exclude",
        nargs="*",
        default=[],
        help="real case: regexes of parameters copied from the base "
        "(the LoRA benchmark excludes '^embeddings\\.' '^pooler\\.', which its adapters do not touch)",
    )
    args = ap.parse_args()
    from safetensors.torch import load_file

    K, k = (int(x) for x in args.pact.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.adapters:
            base = str(next(Path(args.base).glob("*.safetensors")))
            adapters = args.adapters
            dense = densify_adapters(root, args.base, adapters)
            print(f"{len(adapters)} real adapters on {args.base}; peak = peak RSS growth during the merge")
        else:
            m, n = (int(x) for x in args.shape.lower().split("x"))
            base, adapters, dense = generate(root, m, n, args.T, args.r)
            print(
                f"one {m}x{n} float32 weight, T = {args.T} adapters of rank {args.r}; peak = peak RSS growth"
                " during the merge"
            )
        print("| method | PACT | low-rank s | dense s | low-rank peak MiB | dense peak MiB | max abs diff |")
        print("|---|---|---|---|---|---|---|")
        for i, (method, params, pact) in enumerate(CASES):
            common = {"base_model": base, "method": method, "parameters": params, "exclude": args.exclude}
            if pact:
                pact = {"K": K, "k": k}
                common["pact"] = pact
            lo = run({**common, "models": adapters}, root / f"lo{i}")
            de = run({**common, "models": dense}, root / f"de{i}")
            a = load_file(str(root / f"lo{i}" / "model.safetensors"))
            b = load_file(str(root / f"de{i}" / "model.safetensors"))
            diff = max(float((a[x] - b[x]).abs().max()) for x in a)
            print(
                f"| {method} | {'K,k=' + str(pact['K']) + ',' + str(pact['k']) if pact else '-'} |"
                f" {lo['seconds']:.2f} | {de['seconds']:.2f} "
                f"| {lo['peak_mib']:.0f} | {de['peak_mib']:.0f} | {diff:.2e} |",
                flush=True,
            )


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
