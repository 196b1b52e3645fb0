"""Command line: ``pactmerge merge CONFIG OUTPUT_DIR``."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

from pactmerge.backends.threads import prefer_huge_pages, prefer_passive_wait

# Before torch is imported (both are read once at its start): idle OpenMP threads sleep instead
# of spinning; large tensors get transparent huge pages (docs/performance.md).
prefer_passive_wait()
prefer_huge_pages()

import typer  # noqa: E402

from pactmerge import __version__  # noqa: E402
from pactmerge.errors import PactMergeError  # noqa: E402

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Merge fine-tuned models without training (PACT and friends)."
)


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


class BackendName(str, Enum):
    local = "local"
    ray = "ray"


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(code=2)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True)):
    if version:
        typer.echo(__version__)
        raise typer.Exit()


@app.command()
def merge(
    config: Path = typer.Argument(..., help="YAML merge config."),
    output_dir: Path = typer.Argument(..., help="Folder to write the merged model to (HF layout)."),
    device: Device = typer.Option(Device.cpu, help="Where to compute."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate every input and print the plan; write nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT_DIR if it exists."),
    progress: bool = typer.Option(sys.stderr.isatty(), "--progress/--no-progress", help="Show a progress bar."),
    backend: BackendName = typer.Option(
        BackendName.local, help="local: this process; ray: a Ray cluster (needs the ray extra; docs/performance.md)."
    ),
    workers: int = typer.Option(
        1, min=1, help="local: 1 = the plain loop, N = N worker threads with read-ahead; ray: parallel tasks."
    ),
    threads: int = typer.Option(None, min=1, help="torch threads per worker (default: cores / workers in a pool)."),
    cache_dir: Path = typer.Option(
        None, help="Keep base-model subspaces (PACT's V_0,K) in this folder across runs (default: none)."
    ),
):
    """Merge the models of CONFIG into OUTPUT_DIR."""
    from pactmerge.api import dry_run as do_dry_run
    from pactmerge.api import merge as do_merge

    try:
        if dry_run:
            typer.echo(do_dry_run(config, progress=progress))
            typer.echo("dry run: all inputs are valid; nothing written")
            return
        out = do_merge(
            config,
            output_dir,
            device=device.value,
            overwrite=overwrite,
            progress=progress,
            backend=backend.value,
            workers=workers,
            threads=threads,
            cache_dir=cache_dir,
        )
    except PactMergeError as e:
        _fail(e)
    typer.echo(f"wrote {out}")


@app.command("methods")
def list_methods():
    """List the registered merging methods and filters."""
    from pactmerge.registry import FILTERS, METHODS, available_filters, available_methods

    for kind, names, table in (("methods", available_methods(), METHODS), ("filters", available_filters(), FILTERS)):
        typer.echo(f"{kind}:")
        for n in names:
            first = table[n].doc.splitlines()[0] if table[n].doc else ""
            typer.echo(f"  {n:<18} {first}")


# `analyze` lives with the diagnostics; its module imports nothing heavy until it runs.
from pactmerge.analysis.cli import analyze_command  # noqa: E402

app.command("analyze")(analyze_command)


@app.command("bench")
def bench(
    suite: str = typer.Option(
        None, help="Named suite: text6 (default), text12, text20 (MiniLM, text), image (EfficientNet-Lite0)."
    ),
    tasks: str = typer.Option(None, help="Comma-separated tasks (default: the text6 suite)."),
    methods: str = typer.Option(None, help="Comma-separated row keys, e.g. ta,pact-ta,isoc (default: all)."),
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
):
    """Fine-tune MiniLM on six built-in tasks, merge with every method, report accuracy (offline, CPU)."""
    from pactmerge.eval.bench import bench_command

    try:
        bench_command(
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
            suite=suite,
            image_head=image_head,
        )
    except (PactMergeError, ValueError) as e:
        _fail(e)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
