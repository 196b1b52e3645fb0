"""pactmerge vs mergekit 0.1.5, command line, disk to disk: TA, TIES, DARE-TIES on a
TinyLlama-1.1B-shaped bfloat16 model with 3 fine-tunes, plus the I/O floor.

Goal (issue 18): wall time <= 0.5x mergekit's and peak RSS <= 1.0x, TA within 1.3x the I/O floor.

Usage (the benchmark venv has mergekit; our side runs from this checkout's src/)::

    PYTHONPATH=src .venv-bench/bin/python benchmarks/vs_mergekit.py \
        [--repeats 3] [--layers 22] [--workdir DIR] [--keep]

Each run is a fresh process with one thread (OMP/MKL_NUM_THREADS=1; mergekit ``-j 1``), the sides
interleaved (floor, mergekit, pactmerge for every method, repeated); the table has medians. Both
sides compute in float32 and write bfloat16. The I/O floor is a process that reads every input
file once (into a reused buffer) and writes one output model of the same size: the least any
tool must do. "max rel diff" is max over tensors of max|D_ours - D_mergekit| / max|D_mergekit|,
D = merged - base; both round the same float32 result to bfloat16, so identical arithmetic gives
0. TIES differs where magnitudes tie at the trim threshold -- frequent with bfloat16 weights,
whose differences take few distinct values: pactmerge keeps every entry equal to the k-th
largest magnitude (the TIES code's rule), mergekit exactly k by a sort; the fraction of entries
that differ is given. DARE draws different random masks on the two sides (not comparable entrywise; the p = 0 case
matches exactly, see reference_parity.py): its row reports the relative difference of the
merged updates' L1 norms instead.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import yaml

from bench_util import (
    SRC,
    TINYLLAMA,
    default_workdir,
    digest,
    fmt_bytes,
    llama_config,
    llama_layout,
    machine,
    make_family,
    max_rel_diff_folders,
    median,
    open_folder,
    run_with_peak,
    table,
)

OURS_PY = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python")

CASES = {
    "TA": (
        {"method": "task_arithmetic"},
        {"merge_method": "task_arithmetic", "model_params": {"weight": 1.0}},
    ),
    "TIES": (
        {
            "method": "ties",
            "parameters": {"scope": "tensor", "density": 0.2, "aggregate": "mean", "trim_count": "floor_at_least_1"},
        },
        {"merge_method": "ties", "model_params": {"weight": 1.0, "density": 0.2}},
    ),
    "DARE-TIES": (
        {
            "method": "ties",
            "filters": [{"dare": {"p": 0.5, "rescale": "l1"}}],
            "parameters": {"scope": "tensor", "density": 1.0, "aggregate": "sum"},
        },
        {"merge_method": "dare_ties", "model_params": {"weight": 1.0, "density": 0.5}},
    ),
}

FLOOR = r"""
import sys, time, os
from pathlib import Path
t0 = time.perf_counter()
buf = bytearray(64 * 2**20)
view = memoryview(buf)
inputs = [Path(p) for p in sys.argv[2:]]
for folder in inputs:
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
size = sum(f.stat().st_size for f in inputs[0].glob("*.safetensors"))
with open(out / "model.safetensors", "wb", buffering=0) as fh:
    while size > 0:
        n = min(size, len(buf))
        fh.write(view[:n])
        size -= n
"""


def l1_rel_diff(base: Path, ours: Path, ref: Path) -> float:
    b, o, r = open_folder(base), open_folder(ours), open_folder(ref)
    num = den = 0.0
    for name in b.names():
        t0 = b.get(name).double()
        l1_o, l1_r = float((o.get(name).double() - t0).abs().sum()), float((r.get(name).double() - t0).abs().sum())
        num += abs(l1_o - l1_r)
        den += l1_r
        for s in (b, o, r):
            s.release(name)
    return num / (den or 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=TINYLLAMA["layers"])
    ap.add_argument("--workdir", type=Path, default=default_workdir("mergekit"))
    ap.add_argument("--methods", default=",".join(CASES))
    ap.add_argument("--workers", type=int, default=0, help="also time pactmerge --workers N (0: skip)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama (hidden 256) to check the script quickly")
    args = ap.parse_args()
    shape = {**TINYLLAMA, "layers": args.layers}
    if args.tiny:
        shape.update(hidden=256, inter=704, vocab=1000, heads=8, kv_heads=2)
    data = args.workdir / f"tinyllama-{args.layers}{'-tiny' if args.tiny else ''}"
    base, models = make_family(
        data, llama_layout(**shape), 3, dtype=_bf16(), config=llama_config(shape, "bfloat16"), rel_noise=0.1
    )
    src = open_folder(base)
    n_params = sum(math.prod(src.shape(n)) for n in src.names())
    outs = args.workdir / "out"
    cfgs = args.workdir / "configs"
    cfgs.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    sides = ["mergekit", "pactmerge"] + ([f"pactmerge -j{args.workers}"] if args.workers else [])
    results: dict = {(m, s): [] for m in methods for s in sides}
    floor: list[dict] = []
    diffs: dict = {}
    same: dict = {}
    for rep in range(args.repeats):
        floor.append(run_with_peak([sys.executable, "-c", FLOOR, str(outs / "floor"), str(base), *map(str, models)]))
        shutil.rmtree(outs / "floor", ignore_errors=True)
        for m in methods:
            ours_cfg, ref_cfg = CASES[m]
            ours_yaml, ref_yaml = cfgs / f"{m}-ours.yaml", cfgs / f"{m}-mergekit.yaml"
            ours_yaml.write_text(
                yaml.safe_dump(
                    {
                        "base_model": str(base),
                        "models": [str(p) for p in models],
                        "dtype": "float32",
                        "out_dtype": "bfloat16",
                        **ours_cfg,
                    }
                )
            )
            ref_yaml.write_text(
                yaml.safe_dump(
                    {
                        "merge_method": ref_cfg["merge_method"],
                        "base_model": str(base),
                        "dtype": "float32",
                        "out_dtype": "bfloat16",
                        "models": [{"model": str(p), "parameters": ref_cfg["model_params"]} for p in models],
                    }
                )
            )
            order = sides if rep % 2 == 0 else list(reversed(sides))
            for side in order:
                out = outs / f"{m}-{side.replace(' ', '')}"
                shutil.rmtree(out, ignore_errors=True)
                if side == "mergekit":
                    cmd = [
                        str(Path(sys.executable).parent / "mergekit-yaml"),
                        str(ref_yaml),
                        str(out),
                        "-j",
                        "1",
                        "--no-copy-tokenizer",
                        "--quiet",
                        "--no-write-model-card",
                    ]
                    env = {}
                else:
                    workers = side.split("-j")[1] if "-j" in side else "1"
                    cmd = [OURS_PY, "-m", "pactmerge", "merge", str(ours_yaml), str(out), "--no-progress"]
                    cmd += ["--workers", workers]
                    env = {"PYTHONPATH": str(SRC)}
                r = run_with_peak(cmd, env)
                results[(m, side)].append(r)
                print(f"[{rep}] {m} {side}: {r}", file=sys.stderr, flush=True)
            ref_out, ours_out = outs / f"{m}-mergekit", outs / f"{m}-pactmerge"
            for side in sides[2:]:  # the pool must write the plain loop's bytes
                pooled = outs / f"{m}-{side.replace(' ', '')}"
                if pooled.exists() and ours_out.exists():
                    same[(m, side)] = same.get((m, side), True) and digest(pooled) == digest(ours_out)
            if m not in diffs and ref_out.exists() and ours_out.exists():
                if m == "DARE-TIES":
                    diffs[m] = f"L1 {l1_rel_diff(base, ours_out, ref_out):.1e} (masks differ)"
                else:
                    worst, frac = max_rel_diff_folders(base, ours_out, ref_out)
                    diffs[m] = f"{worst:.1e} ({frac:.1e} of entries differ)"
            for side in sides:
                shutil.rmtree(outs / f"{m}-{side.replace(' ', '')}", ignore_errors=True)

    def med(rs, key):
        vals = [r[key] for r in rs if key in r]
        return median(vals) if vals else float("nan")

    floor_s, floor_rss = med(floor, "seconds"), med(floor, "peak_rss")
    tiny_note = " (tiny check)" if args.tiny else ""
    print(
        f"\nTinyLlama-1.1B shapes{tiny_note} ({args.layers} layers, {n_params / 1e9:.2f} B parameters), bfloat16,"
        " base + 3"
        f" fine-tunes, compute float32; {machine()}; {args.repeats} repeats, medians; one thread each side.\n"
        f"I/O floor (read 4 models, write 1): {floor_s:.1f} s, {fmt_bytes(floor_rss)}.\n"
    )
    rows = []
    for m in methods:
        mk = results[(m, "mergekit")]
        for side in sides[1:]:
            ours = results[(m, side)]
            errors = [r["error"] for r in mk + ours if "error" in r]
            if errors:
                rows.append([m, side, f"error: {errors[0]}", "", "", "", "", "", ""])
                continue
            t_mk, t_ours = med(mk, "seconds"), med(ours, "seconds")
            r_mk, r_ours = med(mk, "peak_rss"), med(ours, "peak_rss")
            rows.append(
                [
                    m,
                    side,
                    f"{t_mk:.1f}",
                    f"{t_ours:.1f}",
                    f"**{t_ours / t_mk:.2f}x**",
                    f"{fmt_bytes(r_mk)} / {fmt_bytes(r_ours)}",
                    f"**{r_ours / r_mk:.2f}x**",
                    f"{t_ours / floor_s:.2f}x",
                    diffs.get(m, "-")
                    if side == "pactmerge"
                    else ("same bytes as --workers 1" if same.get((m, side)) else "BYTES DIFFER from --workers 1"),
                ]
            )
    print(
        table(
            [
                "method",
                "ours",
                "mergekit s",
                "pactmerge s",
                "time ratio",
                "peak RSS mergekit / ours",
                "RSS ratio",
                "ours / I/O floor",
                "max rel diff",
            ],
            rows,
        )
    )
    print("\nraw:", json.dumps({f"{m}|{s}": v for (m, s), v in results.items()} | {"floor": floor}), file=sys.stderr)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


def _bf16():
    import torch

    return torch.bfloat16


if __name__ == "__main__":
    main()
