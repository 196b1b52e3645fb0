"""Command line: ``pactmerge merge CONFIG OUTPUT_DIR``."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

from pactmerge import __version__
from pactmerge.errors import PactMergeError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Merge fine-tuned models without training (PACT and friends)."
)


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


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
):
    """Merge the models of CONFIG into OUTPUT_DIR."""
    from pactmerge.api import dry_run as do_dry_run
    from pactmerge.api import merge as do_merge

    try:
        if dry_run:
            typer.echo(do_dry_run(config, progress=progress))
            typer.echo("dry run: all inputs are valid; nothing written")
            return
        out = do_merge(config, output_dir, device=device.value, overwrite=overwrite, progress=progress)
    except PactMergeError as e:
        _fail(e)
    typer.echo(f"wrote {out}")
    summary = Path(str(out)) / "evaluation.md"
    if summary.exists():  # an `evaluation:` block: say what it chose
        typer.echo(summary.read_text().split("\n\n")[1])


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
