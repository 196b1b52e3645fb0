"""``pactmerge analyze [CONFIG] OUT_DIR``: the command function, registered by pactmerge.cli with
``app.command("analyze")(analyze_command)``.

Without ``--suite``: CONFIG is a merge config and OUT_DIR gets the data-free diagnostics.
With ``--suite text6``: the models are the suite's cached fine-tunes (fine-tuned if missing), an
optional CONFIG supplies pact K/k/svd/depth, dtype and seed, and ``--ablation`` / ``--fisher A,B``
add the data-aware studies of :mod:`pactmerge.analysis.studies`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from pactmerge.errors import PactMergeError


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code=2)


def analyze_command(
    paths: list[Path] = typer.Argument(
        ...,
        metavar="[CONFIG] OUT_DIR",
        help="CONFIG: YAML merge config (its sources, plan and pact K/k/svd/depth are used; optional with"
        " --suite, then only pact/filters, dtype, seed, exclude are read). OUT_DIR: output folder.",
    ),
    layers: str | None = typer.Option(
        None, "--layers", help="Regex: analyze only parameters whose name matches (data-free metrics)."
    ),
    worst_n: int = typer.Option(
        5, "--worst-n", min=1, help="How many worst matrices (by Inf and by E_in) to list and plot."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists."),
    progress: bool = typer.Option(sys.stderr.isatty(), "--progress/--no-progress", help="Show progress bars."),
    device: str = typer.Option(
        "cpu", "--device", help="cpu, cuda or auto (subspaces; models are evaluated on the CPU)."
    ),
    suite: str | None = typer.Option(
        None, "--suite", help="Built-in task suite whose cached fine-tunes are analyzed: text6, text12 or text20."
    ),
    tasks: str | None = typer.Option(
        None, "--tasks", help="With --suite: comma-separated subset of its tasks (default all)."
    ),
    cache_dir: Path | None = typer.Option(
        None,
        "--cache-dir",
        help="With --suite: the bench's fine-tune cache (default $PACTMERGE_CACHE or ~/.cache/pactmerge/bench).",
    ),
    ablation: bool = typer.Option(
        False, "--ablation", help="Subspace ablation of every task (paper Sec. 3.2.2); needs --suite."
    ),
    fisher: list[str] | None = typer.Option(
        None,
        "--fisher",
        help="Fisher crucial-mask study of task pair A,B (paper Sec. 3.2.1); repeatable; needs --suite.",
    ),
    seeds: int = typer.Option(
        3, "--seeds", min=1, help="Random controls: seeds of the random subspaces and random masks."
    ),
    fisher_samples: int = typer.Option(
        1000, "--fisher-samples", min=1, help="Train samples of task A for the empirical Fisher (capped by the split)."
    ),
):
    """Load-bearing-wall diagnostics (PACT paper Sec. 3.2, App. C): data-free from CONFIG's checkpoints, or with
    --suite on cached fine-tunes, plus the data-aware studies (--ablation, --fisher A,B)."""
    if device not in ("cpu", "auto") and not device.startswith("cuda"):
        _fail(f"--device {device!r}: expected cpu, cuda[:N] or auto")
    if suite is None:
        if ablation or fisher:
            _fail(
                "--ablation and --fisher need task data and an evaluator: pass --suite text6"
                " (the suite's cached fine-tunes are used; CONFIG then supplies pact K/k/svd/depth)"
            )
        if tasks or cache_dir:
            _fail("--tasks and --cache-dir apply to --suite only")
        if len(paths) != 2:
            _fail("expected CONFIG OUT_DIR (or --suite NAME [CONFIG] OUT_DIR)")
        config, out_dir = paths
    else:
        if len(paths) not in (1, 2):
            _fail("expected [CONFIG] OUT_DIR with --suite")
        config, out_dir = (None, paths[0]) if len(paths) == 1 else paths
    try:
        if suite is None:
            from pactmerge.analysis.api import analyze

            result = analyze(
                config, out_dir, layers=layers, worst_n=worst_n, device=device, progress=progress, overwrite=overwrite
            )
        else:
            from pactmerge.analysis.studies import analyze_suite

            result = analyze_suite(
                out_dir,
                suite=suite,
                config=config,
                tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
                ablation=ablation,
                fisher=list(fisher or []),
                seeds=seeds,
                fisher_samples=fisher_samples,
                cache_dir=cache_dir,
                layers=layers,
                worst_n=worst_n,
                device=device,
                overwrite=overwrite,
                progress=progress,
                log=lambda m: typer.echo(m, err=True),
            )
    except PactMergeError as e:
        _fail(str(e))
    _echo_summary(result)
    typer.echo(
        f"wrote {out_dir} (report.md, metrics.json, CSV tables, PNG plots"
        + (", ablation.*" if ablation else "")
        + (", fisher.*" if fisher else "")
        + ")"
    )


def _echo_summary(result: dict) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    g = result["summary"]["global"]
    e_in = [x for x in g["intrusion_energy"] if x is not None]
    typer.echo(
        f"{result['summary']['num_parameters']} matrices, {len(result['tasks'])} tasks:"
        f" mean E_in {fmt(sum(e_in) / len(e_in) if e_in else None)},"
        f" Sim {fmt(g['sim_offdiag_mean'])}, Inf {fmt(g['inf_offdiag_mean'])} (off-diagonal means)"
    )
    worst = result["summary"]["worst_by_inf"][0]
    typer.echo(f"worst by Inf: {worst['parameter']} ({fmt(worst['inf_offdiag_mean'])})")
    studies = result.get("studies") or {}
    if "ablation" in studies:
        typer.echo("subspace ablation (accuracy %): task  fine-tuned -> LBW-ablated | random-ablated  ratio")
        for t, r in studies["ablation"]["tasks"].items():
            ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.1f}x"
            typer.echo(f"  {t}: {pct(r['finetuned'])} -> {pct(r['lbw'])} | {pct(r['random_mean'])}  {ratio}")
    for fr in studies.get("fisher") or []:
        t1, rest, a = fr["table1"], fr["restoration"], fr["task_a"]
        typer.echo(
            f"fisher A={a} B={fr['task_b']} (alpha {t1['alpha']:g}): M0 {pct(t1['M0'])} M1 {pct(t1['M1'])}"
            f" M2 {pct(t1['M2'])} M3 {pct(t1['M3'])} M4 {pct(t1['M4'])};"
            f" merge {pct(rest['merged'][a])} -> crucial restored {pct(rest['crucial_to_theta0'][a])}"
        )
