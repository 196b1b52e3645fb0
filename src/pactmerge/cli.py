"""Command line: ``pactmerge merge CONFIG OUTPUT_DIR``."""

from __future__ import annotations

import contextlib
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def _one_line_errors(output: Path | None = None):
    """Every failure as one ``error:`` line: bad input and filesystem errors exit 2, a SIGINT/SIGTERM
    128 + its number (after the cleanup), an unexpected exception 1 (PACTMERGE_DEBUG=1 re-raises it)."""
    from pactmerge.signals import Interrupted, exit_on_signals

    try:
        with exit_on_signals():
            yield
    except PactMergeError as e:
        _fail(e)
    except Interrupted as e:
        done = f"; {e.output_complete} was already complete" if e.output_complete else "; nothing was written"
        typer.echo(f"error: interrupted by {e}{done if output is not None else ''}", err=True)
        raise typer.Exit(code=e.exit_code) from None
    except OSError as e:
        where = e.filename if e.filename else (output or "pactmerge")
        typer.echo(f"error: {where}: {e.strerror or e}", err=True)
        raise typer.Exit(code=2) from None
    except Exception as e:
        if os.environ.get("PACTMERGE_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        typer.echo(
            f"error: internal error ({type(e).__name__}: {first}); this is a pactmerge bug, please report it"
            " (PACTMERGE_DEBUG=1 shows the traceback)",
            err=True,
        )
        raise typer.Exit(code=1) from None


def _print_version(value: bool) -> None:
    # An eager option's callback runs while the options are parsed, before click asks for a command.
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
    ),
):
    pass


@app.command()
def merge(
    config: Path = typer.Argument(..., help="YAML merge config."),
    output_dir: Path = typer.Argument(..., help="Folder to write the merged model to (HF layout)."),
    device: Device = typer.Option(Device.cpu, help="Where to compute."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate every input and print the plan; write nothing."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace OUTPUT_DIR if it is an earlier pactmerge output (or an empty folder)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace OUTPUT_DIR whatever it holds (never an input). Implies --overwrite."
    ),
    allow_nonfinite: bool = typer.Option(
        False, "--allow-nonfinite", help="Write NaN/Inf values instead of failing (config: allow_nonfinite: true)."
    ),
    progress: bool = typer.Option(sys.stderr.isatty(), "--progress/--no-progress", help="Show a progress bar."),
    push_to_hub: str = typer.Option(
        None, "--push-to-hub", metavar="REPO", help="Then upload OUTPUT_DIR to this Hugging Face Hub repo (owner/name)."
    ),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo as private."),
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
    """Merge the models of CONFIG into OUTPUT_DIR (CONFIG: pactmerge's keys, or a mergekit config)."""
    from pactmerge.api import dry_run as do_dry_run
    from pactmerge.api import merge as do_merge
    from pactmerge.config import load_config
    from pactmerge.io.hub import check_push_ready, push_folder

    extra: dict[str, Any] = {"allow_nonfinite": True} if allow_nonfinite else {}
    with _one_line_errors(None if dry_run else output_dir):
        if push_to_hub is not None:
            check_push_ready(push_to_hub)  # before any work: installed, logged in, a valid repo id
        if dry_run:
            cfg = load_config(config)
            typer.echo(do_dry_run(load_config({**cfg.model_dump(), **extra}) if extra else cfg, progress=progress))
            typer.echo("dry run: all inputs are valid; nothing written")
            return
        out = do_merge(
            config,
            output_dir,
            device=device.value,
            overwrite=overwrite,
            force=force,
            progress=progress,
            backend=backend.value,
            workers=workers,
            threads=threads,
            cache_dir=cache_dir,
            **extra,
        )
        typer.echo(f"wrote {out}")
        summary = Path(str(out)) / "evaluation.md"
        if summary.exists():  # an `evaluation:` block: say what it chose
            typer.echo(summary.read_text().split("\n\n")[1])
        if push_to_hub is not None:
            typer.echo(f"uploaded to {push_folder(output_dir, push_to_hub, private=private)}")


@app.command("materialize")
def materialize(
    out_dir: Path = typer.Argument(..., help="A merged model folder with task_modulators/ (tall_masks, tsv_c)."),
    task: str = typer.Argument(..., help="Task number (the model's position in the config) or its model's path."),
    dest: Path = typer.Argument(..., help="Folder to write task TASK's model to (HF layout)."),
    base_model: Path = typer.Option(None, help="The pretrained model (default: the path recorded at merge time)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DEST if it exists."),
):
    """Write one task's own model from a merge with per-task outputs (TALL masks, TSV-C)."""
    from pactmerge.modulators import materialize as do_materialize

    with _one_line_errors(dest):
        out = do_materialize(out_dir, task, dest, base_model=base_model, overwrite=overwrite)
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


# `bench` and `evaluate` live with the evaluation harness; nothing heavy is imported until they run.
from pactmerge.eval.cli import bench_command, evaluate_command  # noqa: E402

app.command("bench")(bench_command)
app.command("evaluate")(evaluate_command)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
