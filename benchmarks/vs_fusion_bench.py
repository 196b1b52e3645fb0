"""pactmerge vs fusion_bench 0.2.33 on a CLIP ViT-B/32-shaped image encoder (float32, T = 8):
TA, TIES, TSV-M, Iso-C and Iso-CTS -- the merge call alone and the whole process.

Goal (issue 18): every method at <= 0.5x fusion_bench's time, for the merge call and for the
whole process, with the same merged update (max relative difference beside the time).

Usage (the benchmark venv has fusion_bench; our side runs from this checkout's src/)::

    PYTHONPATH=src .venv-bench/bin/python benchmarks/vs_fusion_bench.py \
        [--repeats 3] [--methods TA,TIES,TSV-M,Iso-C,Iso-CTS] [--workdir DIR]

Every measurement is a fresh process with one thread (OMP/MKL_NUM_THREADS=1 and
``torch.set_num_threads(1)``) and, on both sides, the environment pactmerge's command line sets
(``THP_MEM_ALLOC_ENABLE=1``, ``OMP_WAIT_POLICY=PASSIVE``); the sides alternate and repeat; the
table has medians. Both sides import their library before the timed call.

* **merge call**: both sides first load every checkpoint into ordinary (anonymous) memory --
  ``.clone()`` of each tensor, so no lazily mapped page is first touched inside the timed call --
  then time ``fusion_bench``'s ``algorithm.run(modelpool)`` (``nn.Module`` inputs, as it takes
  them) against ``pactmerge.merge(base_model=dict, models=[dicts])`` (a merged state dict).
* **whole process**: start to finish of a process that imports the tool, loads the inputs the
  way the tool is used (fusion_bench: ``safetensors`` files into modules; pactmerge: the file
  paths given to ``merge``) and merges to a state dict in memory.

"max rel diff": max over parameters of max|D_ours - D_fb| / max|D_fb|, D = merged - base, from
the merge-call runs (float32 on both sides; different but equivalent orders of operations).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

from bench_util import (
    SRC,
    default_workdir,
    fmt_bytes,
    machine,
    make_family,
    max_rel_diff_states,
    median,
    run_with_peak,
    table,
    vit_b32_layout,
)

# Both sides run with the settings pactmerge's command line makes (docs/performance.md): torch's
# large buffers on transparent huge pages, idle OpenMP threads asleep.
SAME_ENV = {"THP_MEM_ALLOC_ENABLE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
OURS_PY = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python")

CASES = {
    "TA": (
        {"method": "task_arithmetic", "alpha": 0.3},
        ("TaskArithmeticAlgorithm", {"scaling_factor": 0.3}),
    ),
    "TIES": (
        {
            "method": "ties",
            "alpha": 0.3,
            "parameters": {"scope": "model", "aggregate": "sum", "trim_count": "floor_plus_1", "density": 0.2},
        },
        ("TiesMergingAlgorithm", {"scaling_factor": 0.3, "threshold": 20, "remove_keys": [], "merge_func": "sum"}),
    ),
    "TSV-M": (
        {"method": "tsv_m", "parameters": {"rank_aware": False}},
        ("TaskSingularVectorMerging", {"alpha": 1.0}),
    ),
    "Iso-C": (
        {"method": "iso_c", "parameters": {"rank_aware": False}},
        ("ISO_C_Merge", {"scaling_factor": 1.0}),
    ),
    "Iso-CTS": (
        {"method": "iso_cts", "parameters": {"rank_aware": False}},
        ("ISO_CTS_Merge", {"scaling_factor": 1.0, "common_space_fraction": 0.8}),
    ),
}


# -- the measured process ------------------------------------------------------------------------


def _load(path: Path, materialize: bool) -> dict:
    from safetensors.torch import load_file

    sd = load_file(str(path / "model.safetensors"))
    return {k: v.clone() for k, v in sd.items()} if materialize else sd


def _as_module(sd: dict):
    from torch import nn

    root = nn.Module()
    for name, v in sd.items():
        parts, m = name.split("."), root
        for p in parts[:-1]:
            if not hasattr(m, p):
                m.add_module(p, nn.Module())
            m = getattr(m, p)
        m.register_parameter(parts[-1], nn.Parameter(v, requires_grad=False))
    return root


def worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(1)
    data, side, mode, method = Path(spec["data"]), spec["side"], spec["mode"], spec["method"]
    names = sorted(p.name for p in data.iterdir() if p.name.startswith("m"))
    ours_cfg, (alg_name, alg_kw) = CASES[method]
    materialize = mode == "call"
    t_start = time.perf_counter()
    if side == "fusion_bench":
        import fusion_bench.method as fbm
        from fusion_bench.modelpool import BaseModelPool

        pool = BaseModelPool(
            models={
                "_pretrained_": _as_module(_load(data / "base", materialize)),
                **{n: _as_module(_load(data / n, materialize)) for n in names},
            }
        )
        alg = getattr(fbm, alg_name)(**alg_kw)

        def run():
            return {k: v.detach() for k, v in alg.run(pool).state_dict().items()}
    else:
        from pactmerge.api import merge
        from pactmerge.registry import available_methods

        available_methods()  # imports every method, as importing fusion_bench.method does
        if materialize:
            base, models = _load(data / "base", True), [_load(data / n, True) for n in names]
        else:
            base, models = str(data / "base"), [str(data / n) for n in names]

        def run():
            return merge(base_model=base, models=models, **ours_cfg)

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        merged = run()
    merge_s = time.perf_counter() - t0
    save_s = 0.0
    if spec.get("save"):
        from safetensors.torch import save_file

        t1 = time.perf_counter()
        save_file({k: v.contiguous() for k, v in merged.items()}, spec["save"])
        save_s = time.perf_counter() - t1
    print(json.dumps({"merge_s": merge_s, "save_s": save_s, "load_s": t0 - t_start}))


# -- the driver -----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--methods", default=",".join(CASES))
    ap.add_argument("--workdir", type=Path, default=default_workdir("fusion_bench"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    import torch

    data = args.workdir / f"vit-b32-{args.layers}"
    make_family(data, vit_b32_layout(args.layers), args.tasks, dtype=torch.float32, max_shard_bytes=10**12)
    methods = [m for m in args.methods.split(",") if m]
    runs = [("fusion_bench", "call"), ("pactmerge", "call"), ("fusion_bench", "process"), ("pactmerge", "process")]
    results: dict = {(m, s, mode): [] for m in methods for s, mode in runs}
    diffs: dict = {}
    out = args.workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    for rep in range(args.repeats):
        for m in methods:
            for side, mode in runs if rep % 2 == 0 else list(reversed(runs)):
                spec = {"data": str(data), "side": side, "mode": mode, "method": m}
                if rep == 0 and mode == "call":
                    spec["save"] = str(out / f"{m}-{side}.safetensors")
                py = sys.executable if side == "fusion_bench" else OURS_PY
                r = run_with_peak([py, __file__, "--worker", json.dumps(spec)], {"PYTHONPATH": str(SRC), **SAME_ENV})
                if "error" not in r:
                    r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
                    r["process_s"] = r["seconds"] - r["save_s"]
                results[(m, side, mode)].append(r)
                print(f"[{rep}] {m} {side} {mode}: {r}", file=sys.stderr, flush=True)
            if rep == 0:
                diffs[m] = _diff(data, out, m)
    print(
        f"\nCLIP ViT-B/32 image-encoder shapes ({args.layers} blocks), float32, T = {args.tasks}; {machine()};"
        f" {args.repeats} repeats, medians; one thread each side.\n"
    )
    rows = []
    for m in methods:

        def med(side, mode, key, m=m):
            vals = [r[key] for r in results[(m, side, mode)] if key in r]
            return median(vals) if vals else float("nan")

        errors = [r["error"] for s, mode in runs for r in results[(m, s, mode)] if "error" in r]
        if errors:
            rows.append([m, f"error: {errors[0]}", "", "", "", "", "", "", ""])
            continue
        c_fb, c_ours = med("fusion_bench", "call", "merge_s"), med("pactmerge", "call", "merge_s")
        p_fb, p_ours = med("fusion_bench", "process", "process_s"), med("pactmerge", "process", "process_s")
        rss_fb, rss_ours = med("fusion_bench", "process", "peak_rss"), med("pactmerge", "process", "peak_rss")
        rows.append(
            [
                m,
                f"{c_fb:.2f} / {c_ours:.2f}",
                f"**{c_ours / c_fb:.2f}x**",
                f"{p_fb:.2f} / {p_ours:.2f}",
                f"**{p_ours / p_fb:.2f}x**",
                f"{fmt_bytes(rss_fb)} / {fmt_bytes(rss_ours)}",
                f"{rss_ours / rss_fb:.2f}x",
                diffs.get(m, "-"),
            ]
        )
    print(
        table(
            [
                "method",
                "merge call s (fb / ours)",
                "call ratio",
                "whole process s (fb / ours)",
                "process ratio",
                "process peak RSS (fb / ours)",
                "RSS ratio",
                "max rel diff",
            ],
            rows,
        )
    )
    print("\nraw:", json.dumps({"|".join(k): v for k, v in results.items()}), file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


def _diff(data: Path, out: Path, m: str) -> str:
    from safetensors.torch import load_file

    paths = [out / f"{m}-fusion_bench.safetensors", out / f"{m}-pactmerge.safetensors"]
    if not all(p.exists() for p in paths):
        return "-"
    base = load_file(str(data / "base" / "model.safetensors"))
    ref, ours = (load_file(str(p)) for p in paths)
    d = max_rel_diff_states(base, ours, ref)
    for p in paths:
        p.unlink()
    return f"{d:.1e}"


if __name__ == "__main__":
    main()
