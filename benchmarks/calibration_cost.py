"""Cost of the calibration pass and of the data-aware merges on a benchmark suite's fine-tunes.

Usage: python benchmarks/calibration_cost.py [--suite text20 --samples 512 --kinds covariance,fisher]

Uses the cached fine-tunes of ``pactmerge bench --suite SUITE`` (run that first; nothing is
trained here unless a fine-tune is missing). Each step runs in a fresh subprocess with an empty
statistics cache (``--workdir``), and prints a markdown table: wall time, peak resident-set growth
(VmHWM minus RSS at the start of the step), peak anonymous-memory growth (RssAnon sampled every
20 ms: the resident set also counts the checkpoint pages the step maps and reads, which the
kernel can drop) and the statistics written to disk.

Steps: the covariance pass (PAVE, RegMean), the Fisher pass (Fisher merging), then streamed
merges that read the cached statistics (PAVE-TA, RegMean, Fisher) beside plain TA, to show that a
merge's memory grows by one parameter's T covariances, not by the statistics' total size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import json, sys, time, torch
    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    args = json.loads(sys.argv[1])
    torch.set_num_threads(args["threads"])
    from pactmerge.eval.suites.text import FROZEN
    from pactmerge.eval.bench_calibration import text_calibration
    from pactmerge.eval.finetune import FinetuneConfig, get_finetuned, load_model, load_tokenizer, prepare_base
    from pactmerge.eval.heads import build_head
    from pactmerge.eval.tasks import load_tasks, suite_tasks
    tasks = load_tasks(suite_tasks(args["suite"]))
    base = prepare_base(None, None)
    tok = load_tokenizer(base.path)
    enc = load_model(base.path).eval()
    heads = {n: build_head(enc, tok, t.prompts) for n, t in tasks.items()}
    paths = {n: get_finetuned(t, heads[n], base, FinetuneConfig(), None, tok, False) for n, t in tasks.items()}
    data = text_calibration(tasks, paths, tok, heads)
    del enc
    cfg = {"base_model": str(base.path), "models": [str(paths[n]) for n in tasks], "exclude": FROZEN,
           "method": args["method"], "filters": args["filters"]}
    needs = args["step"] != "merge-ta"
    if needs:
        cfg["calibration"] = {"samples": args["samples"], "allow_fewer": True, "cache_dir": args["cache"]}
    import pactmerge
    from pactmerge.engine import iter_merged_deltas, open_inputs
    from pactmerge.config import load_config
    inputs = open_inputs(load_config(cfg), data if needs else None)
    import threading
    anon_peak, done = [status("RssAnon")], threading.Event()
    def sample_anon():  # VmHWM counts file pages mapped from the checkpoints too; RssAnon does not
        while not done.wait(0.02):
            anon_peak[0] = max(anon_peak[0], status("RssAnon"))
    sampler = threading.Thread(target=sample_anon, daemon=True)
    before, anon_before = status("VmRSS"), status("RssAnon")
    sampler.start()
    t0 = time.perf_counter()
    if args["step"] in ("covariance", "fisher"):
        inputs.calibration.ensure(inputs.models)
    else:
        for info, _, merged in iter_merged_deltas(inputs, "cpu"):
            del merged
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    anon_peak[0] = max(anon_peak[0], status("RssAnon"))
    growth = status("VmHWM") - before
    inputs.close()
    print(json.dumps({"seconds": seconds, "growth": growth, "anon_growth": anon_peak[0] - anon_before}))
    """
)

STEPS = {
    "covariance": ("task_arithmetic", ["pave"]),
    "fisher": ("fisher", []),
    "merge-ta": ("task_arithmetic", []),
    "merge-pave-ta": ("task_arithmetic", ["pave"]),
    "merge-regmean": ("regmean", []),
    "merge-fisher": ("fisher", []),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="text20")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--kinds", default="covariance,fisher")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pactmerge-calibration-cost"))
    a = ap.parse_args()
    kinds = a.kinds.split(",")
    cache = a.workdir / "stats"
    if cache.exists():
        for f in cache.iterdir():
            f.unlink()
    steps = [*kinds, "merge-ta"]
    steps += ["merge-pave-ta", "merge-regmean"] if "covariance" in kinds else []
    steps += ["merge-fisher"] if "fisher" in kinds else []
    rows = []
    for step in steps:
        method, filters = STEPS[step]
        args = {
            "suite": a.suite,
            "samples": a.samples,
            "step": step,
            "method": method,
            "filters": filters,
            "cache": str(cache),
            "threads": a.threads,
        }
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"step {step} failed")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        disk = sum(f.stat().st_size for f in cache.glob(f"{step}-*.safetensors")) if step in kinds else 0
        rows.append((step, res["seconds"], res["growth"], res["anon_growth"], disk))
        print(
            f"{step}: {res['seconds']:.1f} s, +{res['growth'] / 2**20:.0f} MiB RSS,"
            f" +{res['anon_growth'] / 2**20:.0f} MiB anonymous",
            file=sys.stderr,
        )
    print(f"\n{a.suite}, N = {a.samples} per task, {a.threads} threads\n")
    print("| step | wall s | peak RSS growth (MiB) | peak anonymous growth (MiB) | statistics on disk (MiB) |")
    print("|---|---|---|---|---|")
    for step, s, g, an, d in rows:
        disk = f"{d / 2**20:.0f}" if d else "—"
        print(f"| {step} | {s:.1f} | {g / 2**20:.0f} | {an / 2**20:.0f} | {disk} |")


if __name__ == "__main__":
    main()
