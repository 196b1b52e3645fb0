"""Data-free load-bearing-wall diagnostics (PACT paper Sec. 3.2, App. C.2-C.3) for a merge config.

    analyze(config, out_dir=None, *, layers=None, worst_n=5, device="cpu", progress=False) -> dict

Modules: ``metrics`` (per-matrix math), ``components`` (name -> component type), ``stream``
(one parameter at a time, as the merge reads it), ``summary`` (aggregates), ``report`` (JSON,
CSV, report.md), ``plots`` (PNG figures, matplotlib imported lazily), ``cli`` (``pactmerge analyze``).

Data-aware studies (need task data and fine-tunes; ``pactmerge analyze --suite text6``):
``studies`` (suites, ``subspace_ablation``, ``fisher_study``, ``analyze_suite``), ``ablation``
(Sec. 3.2.2 math), ``fisher`` (Sec. 3.2.1 Fisher, masks, attack conditions).
"""

__all__ = ["analyze"]


def __getattr__(name):
    # Lazy, so that importing pactmerge.analysis.cli (done by pactmerge.cli) stays cheap.
    if name == "analyze":
        from pactmerge.analysis.api import analyze

        return analyze
    raise AttributeError(name)
