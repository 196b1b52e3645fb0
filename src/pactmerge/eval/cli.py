"""``pactmerge bench`` and ``pactmerge evaluate``: which flags go together, and what they run.

Registered on the main app by :mod:`pactmerge.cli`; nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from pactmerge.errors import PactMergeError


def _csv(s: str | None) -> tuple[str, ...] | None:
    return None if s is None else tuple(x.strip() for x in s.split(",") if x.strip())


def _pact_rank(pact_rank: str | None) -> tuple[int, int] | None:
    if not pact_rank:
        return None
    try:
        K, k = (int(x) for x in pact_rank.split(","))
    except ValueError:
        raise ValueError(f"--pact-rank {pact_rank!r}: give K,k, e.g. 15,8") from None
    return K, k


def bench_plan(
    suite: str | None = None,
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
    image_head: str | None = None,
    threads: int | None = None,
) -> tuple[Callable[..., dict], Any]:
    """``(run, config)`` of a ``pactmerge bench`` command line: ``run(config, log=...)`` runs it.
    Flags that do not go together are refused (ValueError)."""
    rank = _pact_rank(pact_rank)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if suite == "image":  # the CNN suite (eval/suites/image.py)
        if lora or tasks or quick or preset:
            raise ValueError(
                "--suite image takes --methods, --steps, --seed, --cache-dir, --out, --pact-rank, --alpha-max,"
                " --threads only"
            )
        from pactmerge.eval.suites.image import HeadConfig, ImageBenchConfig, run_image_bench

        icfg = ImageBenchConfig(alpha_max=alpha_max, progress=progress)
        ift = replace(icfg.finetune, seed=seed)
        icfg = replace(icfg, finetune=replace(ift, steps=steps) if steps is not None else ift)
        if methods:
            icfg = replace(icfg, methods=_csv(methods))
        if cache_dir is not None:
            icfg = replace(icfg, cache_dir=Path(cache_dir))
        if out is not None:
            icfg = replace(icfg, out_dir=Path(out))
        if rank:
            icfg = replace(icfg, K=rank[0], k=rank[1])
        if image_head:
            icfg = replace(icfg, head=HeadConfig(kind=image_head))
        if threads is not None:
            icfg = replace(icfg, threads=threads)
        return run_image_bench, icfg
    if image_head:
        raise ValueError("--image-head is for --suite image only")
    if suite and tasks:
        raise ValueError("give --suite or --tasks, not both")
    from pactmerge.eval.finetune import LoraFinetuneConfig
    from pactmerge.eval.suites.text import PRESETS, run_text_bench
    from pactmerge.eval.tasks import suite_tasks

    preset = preset or ("quick" if quick else "full")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    if lora:
        cfg = replace(cfg, lora=LoraFinetuneConfig(steps=cfg.finetune.steps), K=7, k=4)  # the preset's length
    K, k = rank or (cfg.K, cfg.k)
    ft = replace(cfg.finetune, seed=seed)
    if steps is not None:
        ft = replace(ft, steps=steps)
    if cfg.lora:
        lora_cfg = replace(cfg.lora, seed=seed)
        cfg = replace(cfg, lora=replace(lora_cfg, steps=steps) if steps is not None else lora_cfg)
    default_out = Path("bench_out_lora" if lora else "bench_out")
    cfg = replace(
        cfg,
        finetune=ft,
        K=K,
        k=k,
        cache_dir=cache_dir,
        out_dir=Path(out) if out is not None else default_out,
        alpha_max=alpha_max,
        progress=progress,
    )
    if suite:
        cfg = replace(cfg, tasks=suite_tasks(suite))
    if tasks:
        cfg = replace(cfg, tasks=_csv(tasks) or ())
    if methods:
        cfg = replace(cfg, methods=_csv(methods))
    if threads is not None:
        cfg = replace(cfg, threads=threads)
    return run_text_bench, cfg


def run_bench(log: Callable[[str], None] | None = None, **flags: Any) -> dict:
    """Run a bench command line (:func:`bench_plan`'s flags), print the table and where it went."""
    from pactmerge.eval.report import markdown_table

    run, cfg = bench_plan(**flags)
    report = run(cfg, log=log or (lambda m: print(m, file=sys.stderr, flush=True)))
    print(markdown_table(report))
    files = "results.json, results.md" + (", results.png" if cfg.chart else "")
    out = f"; wrote {cfg.out_dir}/{{{files}}}" if cfg.out_dir is not None else ""
    print(f"\nfine-tuning {report['finetune_seconds']:.0f}s, total {report['total_seconds']:.0f}s{out}")
    return report


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(code=2)


def bench_command(
    suite: str = typer.Option(
        None, help="Named suite: text6 (default), text12, text20 (MiniLM, text), image (EfficientNet-Lite0)."
    ),
    tasks: str = typer.Option(None, help="Comma-separated tasks (default: the text6 suite)."),
    methods: str = typer.Option(
        None,
        help="Comma-separated row keys, e.g. ta,pact-ta,isoc (default: every default row). Also names the extra"
        " rows that never run by default: data-aware emr, pave-emr, pave-ta, pave-ties, regmean, fisher,"
        " pave-pact-ta, pact-pave-ta (calibration on the training split); survey breadcrumbs, della, pcb, star,"
        " cart, wudi (each also as pact-<key>), wudi-exact, model-stock, pact-model-stock, consensus-ties,"
        " pact-consensus, consensus-ties-val and pact-consensus-ties-val (per-task lambda on validation),"
        " pact-ties, pact-isocts, nan, pact-nan, tall-masks, tsv-c; randomized SVD tsvm-rsvd, pact-ta-rsvd,"
        " pact-tsvm-rsvd, pact-isoc-rsvd (each at the alpha of its exact row, which must run too;"
        " docs/benchmark_results.md).",
    ),
    steps: int = typer.Option(None, help="Fine-tuning steps per task (default 120, image 300; 30 with --quick)."),
    seed: int = typer.Option(0, help="Fine-tuning seed."),
    cache_dir: Path = typer.Option(
        None, help="Fine-tune cache (default $PACTMERGE_CACHE or ~/.cache/pactmerge/bench)."
    ),
    out: Path = typer.Option(
        None,
        help="Folder for results.json, results.md, results.png (default bench_out, bench_out_lora, bench_out_image).",
    ),
    quick: bool = typer.Option(False, "--quick", help="Smoke run: few steps, few items, headline rows."),
    pact_rank: str = typer.Option(None, help="PACT K,k (default 15,8; 7,4 with --lora; CSP rank and S-PACT K use K)."),
    alpha_max: float = typer.Option(20.0, help="Upper limit of the extended alpha search."),
    progress: bool = typer.Option(sys.stderr.isatty(), "--progress/--no-progress", help="Show progress bars."),
    lora: bool = typer.Option(False, "--lora", help="LoRA benchmark: rank-16 PEFT adapters, merged in low-rank form."),
    image_head: str = typer.Option(None, help="--suite image only: the frozen task heads, cosine (default) or probe."),
    threads: int = typer.Option(
        None, help="CPU threads for torch (default 2 for the text suites, 1 for image; 1 when two runs share 2 cores)."
    ),
):
    """Fine-tune MiniLM on six built-in tasks, merge with every method, report accuracy (offline, CPU)."""
    try:
        run_bench(
            suite=suite,
            tasks=tasks,
            methods=methods,
            steps=steps,
            seed=seed,
            cache_dir=cache_dir,
            out=out,
            quick=quick,
            pact_rank=pact_rank,
            alpha_max=alpha_max,
            progress=progress,
            lora=lora,
            image_head=image_head,
            threads=threads,
        )
    except (PactMergeError, ValueError) as e:
        _fail(e)


def evaluate_command(
    config: Path = typer.Argument(..., help="YAML merge config with an `evaluation:` block."),
    models: str = typer.Option(
        "base,finetuned", help="Comma-separated: base, finetuned, merged:<folder> (any number of merged folders)."
    ),
    device: str = typer.Option("cpu", help="Where the forward passes run: cpu, cuda, auto."),
    out: Path = typer.Option(None, help="Also write results.json and results.md to this folder."),
    progress: bool = typer.Option(sys.stderr.isatty(), "--progress/--no-progress", help="Show progress bars."),
):
    """Score the base model, each fine-tune on its own task and merged folders on the test split."""
    from pactmerge.eval.report import markdown_table, write_outputs
    from pactmerge.eval.session import evaluate

    try:
        report = evaluate(config, _csv(models) or (), device=device, progress=progress)
    except PactMergeError as e:
        _fail(e)
    typer.echo(markdown_table(report))
    typer.echo(
        f"\n{report['kind']}, metric {report['metric']} on the test split; avg norm = score / that task's"
        f" fine-tune's score (%); {report['seconds']:.0f}s"
    )
    if out is not None:
        write_outputs(report, Path(out), chart=False)
        typer.echo(f"wrote {out}/results.json, results.md")
