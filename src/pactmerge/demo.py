"""``python -m pactmerge.demo [OUT]`` (``make demo``): the benchmark's demo preset, with its wall time.

See :func:`pactmerge.eval.suites.text.demo_config`; ``pactmerge bench`` runs every row. The first run
fine-tunes the six task models (cached under $PACTMERGE_CACHE or ~/.cache/pactmerge/bench); later
runs reuse them and only merge and evaluate. Every stage prints one line as it finishes (progress
bars only when stderr is a terminal), so a log shows where a long run is.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from pactmerge.eval.report import markdown_table
    from pactmerge.eval.suites.text import demo_config, run_text_bench

    out = Path(argv[0]) if argv else Path("demo_out")
    t0 = time.perf_counter()

    def stage(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:5.0f}s] {msg}", flush=True)

    stage("demo: text6, rows TA / Iso-C with and without PACT; alpha on the whole validation split")
    report = run_text_bench(demo_config(out_dir=out, progress=sys.stderr.isatty()), log=stage)
    print(markdown_table(report))
    print(f"\nwrote {out}/results.json, results.md, results.png; demo wall time: {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
