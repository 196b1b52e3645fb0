"""What `alpha: search` costs next to a merge with alpha fixed, on text6-sized models.

The six cached text6 fine-tunes of `pactmerge bench` (MiniLM-L6, 22 M parameters; the bench
fine-tunes them when the cache lacks them), merged with PACT-Iso-C as a user would: `pactmerge.merge`
on a config file. The search's config describes the tasks as a user would (CSV files written here
from the built-in validation and test splits, kind `zero-shot-text` with the bench's class names and
prompts), so its validation scores -- and its pick -- should be the bench's: the script checks that
the plain search picks what `pactmerge bench` picked for PACT-Iso-C (3.75, docs/benchmark_results.md).

    python benchmarks/alpha_search_cost.py [--workdir DIR] [--threads 2]

Prints a side-by-side table: wall seconds of the whole call (model loading included), alpha, the
number of validation passes.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

import pactmerge
from pactmerge.eval.cache import default_cache_dir
from pactmerge.eval.finetune import FinetuneConfig, get_finetuned, load_model, load_tokenizer, prepare_base
from pactmerge.eval.heads import MAX_TOKENS, build_head
from pactmerge.eval.suites.text import FROZEN
from pactmerge.eval.tasks import DEFAULT_TASKS, load_tasks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="alpha-cost-"))
    work.mkdir(parents=True, exist_ok=True)

    tasks = load_tasks(DEFAULT_TASKS)
    cache = default_cache_dir()
    base = prepare_base(None, cache)
    tokenizer = load_tokenizer(base.path)
    model = load_model(base.path).eval()
    finetuned = {}
    for name, task in tasks.items():  # cached by the bench; trained here otherwise
        head = build_head(model, tokenizer, task.prompts)
        finetuned[name] = get_finetuned(task, head, base, FinetuneConfig(), cache, tokenizer, progress=False)

    eval_tasks = {}
    for name, task in tasks.items():
        path = work / f"{name}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["text", "label", "split"])
            w.writeheader()
            for split in ("validation", "test"):
                for text, y in zip(*task.splits[split]):
                    w.writerow({"text": text, "label": task.labels[y], "split": split})
        eval_tasks[name] = {
            "data": str(path),
            "text": "text",
            "label": "label",
            "labels": task.labels,
            "prompts": dict(zip(task.labels, task.prompts)),
        }
    plain = {
        "base_model": str(base.path),
        "models": [str(finetuned[n]) for n in tasks],
        "method": "iso_c",
        "parameters": {"rank_aware": True},
        "pact": {"K": 15, "k": 8},
        "exclude": FROZEN,
    }
    common = {**plain, "models": [{"model": str(finetuned[n]), "task": n} for n in tasks]}
    evaluation = {"kind": "zero-shot-text", "tasks": eval_tasks, "batch_size": 128, "max_length": MAX_TOKENS}
    runs = {
        "fixed alpha = 3.75": {**plain, "alpha": 3.75},
        "alpha: search": {**common, "alpha": "search", "evaluation": evaluation},
        "alpha: search, coarse 0.5": {
            **common,
            "alpha": "search",
            "evaluation": {**evaluation, "search": {"coarse": 0.5}},
        },
    }
    rows = []
    for label, cfg in runs.items():
        path = work / (label.replace(" ", "_").replace(":", "").replace(",", "").replace("=", "") + ".yaml")
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out = work / f"out-{path.stem}"
        t0 = time.perf_counter()
        pactmerge.merge(path, out, overwrite=True)
        seconds = time.perf_counter() - t0
        ev_file = out / "evaluation.json"
        ev = json.loads(ev_file.read_text()) if ev_file.exists() else None
        rows.append(
            (
                label,
                seconds,
                ev["alpha_label"] if ev else "3.75",
                len(ev["trace"]) if ev else 0,
                ev["merge_seconds"] if ev else None,
                100 * ev["average"]["test"] if ev else None,
            )
        )
        print(f"{label}: {seconds:.1f}s", flush=True)
    print("\n| run | wall s | α | validation passes | merge s (inside) | avg test % |")
    print("|---|---|---|---|---|---|")
    for label, s, a, n, m, t in rows:
        merge_s = "—" if m is None else f"{m:.1f}"
        test = "—" if t is None else f"{t:.1f}"
        print(f"| {label} | {s:.1f} | {a} | {n} | {merge_s} | {test} |")
    searched = rows[1][2]
    print(f"\nplain search picks {searched}; pactmerge bench picked 3.75 (ext) for PACT-Iso-C (well-posed)")


if __name__ == "__main__":
    main()
