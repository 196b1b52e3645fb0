"""The evaluator kinds of an ``evaluation:`` block, one module each.

Every module has ``prepare(spec) -> Prepared``: the tasks read and checked (no model loaded), whose
``evaluator()`` loads the model. See docs/evaluate.md for what each kind expects.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from pactmerge.eval.kinds.common import EvalSpec, Prepared

MODULES = {
    "sequence-classification": "pactmerge.eval.kinds.sequence_classification",
    "zero-shot-text": "pactmerge.eval.kinds.zero_shot_text",
    "clip-zero-shot": "pactmerge.eval.kinds.clip",
    "causal-lm": "pactmerge.eval.kinds.causal_lm",
    "python": "pactmerge.eval.kinds.python_fn",
}


def prepare(spec: EvalSpec) -> Prepared:
    """Read and check the tasks of ``spec.evaluation`` for its kind."""
    build: Callable[[EvalSpec], Prepared] = importlib.import_module(MODULES[spec.evaluation.kind]).prepare
    return build(spec)
