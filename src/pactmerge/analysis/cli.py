"""``pactmerge analyze CONFIG OUT_DIR``: the command function, registered by pactmerge.cli with
``app.command("analyze")(analyze_command)``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from pactmerge.errors import PactMergeError


def analyze_command(
    config: Path = typer.Argument(..., help="YAML merge config (its sources, plan and pact K/k/svd/depth are used)."),
    out_dir: Path = typer.Argument(..., help="Folder for metrics.json, CSV tables, PNG plots and report.md."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Regex: analyze only parameters whose name matches."),
    worst_n: int = typer.Option(5, "--worst-n", min=1, help="How many worst matrices (by Inf and by E_in) to list and plot."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists."),
    progress: bool = typer.Option(sys.stderr.isatty(), "--progress/--no-progress", help="Show a progress bar."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
):
    """Data-free load-bearing-wall diagnostics (PACT paper Sec. 3.2, App. C) of CONFIG's checkpoints."""
    from pactmerge.analysis.api import analyze

    if device not in ("cpu", "auto") and not device.startswith("cuda"):
        typer.echo(f"error: --device {device!r}: expected cpu, cuda[:N] or auto", err=True)
        raise typer.Exit(code=2)
    try:
        result = analyze(config, out_dir, layers=layers, worst_n=worst_n, device=device, progress=progress, overwrite=overwrite)
    except PactMergeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None
    g = result["summary"]["global"]
    e_in = [x for x in g["intrusion_energy"] if x is not None]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    typer.echo(
        f"{result['summary']['num_parameters']} matrices, {len(result['tasks'])} tasks:"
        f" mean E_in {fmt(sum(e_in) / len(e_in) if e_in else None)},"
        f" Sim {fmt(g['sim_offdiag_mean'])}, Inf {fmt(g['inf_offdiag_mean'])} (off-diagonal means)"
    )
    worst = result["summary"]["worst_by_inf"][0]
    typer.echo(f"worst by Inf: {worst['parameter']} ({fmt(worst['inf_offdiag_mean'])})")
    typer.echo(f"wrote {out_dir} (report.md, metrics.json, CSV tables, PNG plots)")
