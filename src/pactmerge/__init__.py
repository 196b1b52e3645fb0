"""pactmerge: merge models fine-tuned from one pretrained base, without training.

Public API (see README):
    merge(config, output_dir=None, ...)   -> merged state dict (in memory) or a written HF folder
    MergeConfig                             the validated configuration
    materialize(out_dir, task, dest, ...)   task t's own model from a merge with per-task outputs
"""

__version__ = "0.1.0"

from pactmerge.errors import PactMergeError

__all__ = ["__version__", "PactMergeError", "merge", "MergeConfig", "materialize"]


def __getattr__(name):
    # Lazy so that `import pactmerge` stays cheap and free of import cycles.
    if name == "merge":
        from pactmerge.api import merge

        return merge
    if name == "materialize":
        from pactmerge.modulators import materialize

        return materialize
    if name == "MergeConfig":
        from pactmerge.config import MergeConfig

        return MergeConfig
    raise AttributeError(name)
