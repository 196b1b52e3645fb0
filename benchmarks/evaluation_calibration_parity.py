"""A data-aware merge from the command line reproduces the benchmark's calibration recipe.

Usage: python benchmarks/evaluation_calibration_parity.py [--suite text6 --tasks a,b --workdir DIR --samples 512
       --examples-only]

Writes the suite's tasks as CSV files (a ``split`` column) and a merge config whose ``evaluation:``
block describes them as a user would (kind ``zero-shot-text``, the bench's prompts, ``max_length``
32), with the cached fine-tunes of ``pactmerge bench --suite SUITE`` (run that first; nothing is
trained here). Then:

1. the calibration examples the config yields (:mod:`pactmerge.eval.task_calibration`) are compared
   with the bench's recipe (:func:`pactmerge.eval.bench_calibration.text_calibration`: each task's
   train split, seeded order, the fine-tunes' tokenization);
2. ``pactmerge merge cfg.yaml out/`` runs for each data-aware row (PAVE-TA, RegMean) at a fixed
   alpha, and its weights are compared with ``pactmerge.merge`` given the bench's data in Python;
3. a markdown table prints each row's validation / test average from the CLI's ``evaluation.json``,
   the wall time of the CLI merge, and the largest weight difference from the Python merge.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROWS = {  # label -> (method, filters, alpha)
    "PAVE-TA": ("task_arithmetic", ["pave"], 0.3),
    "RegMean": ("regmean", None, 1.3),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="text6")
    ap.add_argument("--workdir", default="/tmp/pactmerge-evaluation-calibration")
    ap.add_argument("--tasks", default=None, help="a comma-separated subset of the suite's tasks")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--examples-only", action="store_true", help="step 1 only (no merges; light on CPU)")
    args = ap.parse_args()

    from pactmerge.config import load_config
    from pactmerge.eval.bench_calibration import text_calibration
    from pactmerge.eval.finetune import FinetuneConfig, finetune_key, load_model, load_tokenizer, prepare_base
    from pactmerge.eval.heads import MAX_TOKENS, build_head
    from pactmerge.eval.session import MergeEvaluation
    from pactmerge.eval.suites.text import FROZEN
    from pactmerge.eval.tasks import load_tasks, suite_tasks
    from pactmerge.io import open_source

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    names = args.tasks.split(",") if args.tasks else list(suite_tasks(args.suite))
    tasks = load_tasks(names)
    base = prepare_base(None, None)
    cache = base.path.parent / "finetuned"
    paths = {n: cache / f"{n}-{finetune_key(t, base, FinetuneConfig())}" for n, t in tasks.items()}
    missing = [n for n, p in paths.items() if not p.is_dir()]
    if missing:
        sys.exit(f"no cached fine-tune of {', '.join(missing)}: run `pactmerge bench --suite {args.suite}` first")
    eval_tasks = {}
    for name, task in tasks.items():
        csv_path = work / f"{name}.csv"
        with open(csv_path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label", "split"])
            for split, (texts, ys) in task.splits.items():
                w.writerows([text, task.labels[y], split] for text, y in zip(texts, ys))
        eval_tasks[name] = {
            "data": str(csv_path),
            "text": "text",
            "label": "label",
            "labels": list(task.labels),
            "prompts": dict(zip(task.labels, task.prompts)),
        }
    calibration = {"samples": args.samples, "allow_fewer": True, "cache_dir": str(work / "cache_cli")}

    def config(method, filters, alpha):
        return {
            "base_model": str(base.path),
            "models": [{"model": str(paths[n]), "task": n} for n in tasks],
            "method": method,
            "filters": filters,
            "alpha": alpha,
            "exclude": FROZEN,
            "evaluation": {"kind": "zero-shot-text", "tasks": eval_tasks, "max_length": MAX_TOKENS, "batch_size": 128},
            "calibration": calibration,
        }

    # 1. The examples: the config's against the bench's recipe.
    tok = load_tokenizer(base.path)
    enc = load_model(base.path).eval()
    heads = {n: build_head(enc, tok, t.prompts) for n, t in tasks.items()}
    bench_data = text_calibration(tasks, paths, tok, heads)
    cli_data = MergeEvaluation(load_config(config(*ROWS["PAVE-TA"])), torch.device("cpu")).calibration_data()
    assert cli_data is not None
    same = []
    for cli, bench in zip(cli_data, bench_data):
        n = min(args.samples, len(bench.examples))
        same.append(
            len(cli.examples) == n
            and all(
                torch.equal(a["input_ids"], b["input_ids"]) and int(a["labels"]) == int(b["labels"])
                for a, b in zip(cli.examples, bench.examples[:n])
            )
        )
    sizes = ", ".join(f"{n} {len(d.examples)}" for n, d in zip(tasks, cli_data))
    print(f"examples identical to the bench recipe: {all(same)} ({sum(same)}/{len(same)} tasks; {sizes})")
    if args.examples_only:
        return

    # 2-3. The CLI merges against the Python merges on the bench's data.
    print("| row | alpha | validation avg | test avg | CLI merge s | max abs diff vs Python (bench data) |")
    print("|---|---|---|---|---|---|")
    for label, (method, filters, alpha) in ROWS.items():
        cfg_path = work / f"{label}.yaml"
        cfg_path.write_text(yaml.safe_dump(config(method, filters, alpha), sort_keys=False))
        out = work / f"out-{label}"
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "pactmerge", "merge", str(cfg_path), str(out), "--overwrite", "--no-progress"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        ev = json.loads((out / "evaluation.json").read_text())
        python_cfg = {k: v for k, v in config(method, filters, alpha).items() if k != "evaluation"}
        python_cfg["models"] = [str(paths[n]) for n in tasks]
        python_cfg["calibration"] = {**calibration, "cache_dir": str(work / "cache_py")}
        import pactmerge

        expected = pactmerge.merge(python_cfg, calibration_data=bench_data)
        with open_source(str(out)) as src:
            diff = max(float((src.get(n).double() - t.double()).abs().max()) for n, t in expected.items())
        val, test = ev["average"]["validation"], ev["average"]["test"]
        print(f"| {label} | {alpha} | {100 * val:.2f} | {100 * test:.2f} | {seconds:.1f} | {diff:.1e} |")
        print("  per task (test): " + ", ".join(f"{t} {100 * s:.1f}" for t, s in ev["test"].items()))


if __name__ == "__main__":
    main()
