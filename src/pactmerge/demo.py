"""``python -m pactmerge.demo`` (``make demo``): the benchmark's demo preset, with its wall time.

See ``pactmerge.eval.bench.demo_config``; ``pactmerge bench`` runs every row at full size.

The first run fine-tunes the six task models (cached under $PACTMERGE_CACHE or
~/.cache/pactmerge/bench); later runs reuse them and only merge and evaluate.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from pactmerge.eval.bench import bench_command

    out = Path(argv[0]) if argv else Path("demo_out")
    t0 = time.perf_counter()
    bench_command(out=out, preset="demo", progress=sys.stderr.isatty())
    print(f"demo wall time: {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
