"""pactmerge: merge models fine-tuned from one pretrained base, without training.

Public API (see README):
    merge(config, output_dir=None, ...)   -> merged state dict (in memory) or a written HF folder
    MergeConfig                             the validated configuration
"""

__version__ = "0.1.0"

from pactmerge.errors import PactMergeError

__all__ = ["__version__", "PactMergeError", "merge", "MergeConfig"]


def __getattr__(name):
    # Lazy so that `import pactmerge` stays cheap and free of import cycles.
    if name == "merge":
        from pactmerge.api import merge

        return merge
    if name == "MergeConfig":
        from pactmerge.config import MergeConfig

        return MergeConfig
    raise AttributeError(name)
