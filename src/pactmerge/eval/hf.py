"""Hugging Face ``transformers`` for the evaluators and suites: offline, quiet, and a clear error
when the optional extra is missing."""

from __future__ import annotations

import os
from types import ModuleType

from pactmerge.errors import PactMergeError


def offline() -> None:
    """Nothing may come from the hub at run time: every model path here is a local folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def transformers_module(what: str = "evaluation") -> ModuleType:
    """``transformers``, imported offline and quiet; a one-line error naming the extra otherwise."""
    offline()
    try:
        import transformers
    except ImportError:
        raise PactMergeError(f"{what} needs the transformers package: pip install 'pactmerge[eval]'") from None
    quiet()
    return transformers


def quiet() -> None:
    """Silence transformers' warnings and progress bars (the harness prints its own)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - optional
        pass
