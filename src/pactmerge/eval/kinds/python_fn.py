"""Kind ``python``: the user's own scoring function, ``function(model, task_name, split) -> float``.

``function`` is ``package.module:name`` (imported from ``sys.path``) or ``path/to/file.py:name``
(relative to the current folder, else to the config file's). The model is the base folder loaded with
``transformers.<model_class>`` (default ``AutoModel``) on the evaluation's device, in eval mode; its
weights are swapped in place for every model scored, so the function must not keep its own copy
of them. ``split`` is ``"validation"`` (the alpha search) or ``"test"``. Higher must be better.

Before the merge starts the function is called once per task on the base model and validation
split, so that a function that cannot run or does not return a number fails first.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pactmerge.errors import PactMergeError
from pactmerge.eval.kinds.common import EvalSpec, ModelEvaluator, Prepared, WeightSwap, checkpoint_state, load_hf


def load_function(ref: str) -> Callable[..., Any]:
    """``module:name`` or ``file.py:name`` -> the callable (one-line error when it is not one)."""
    where = f"evaluation.function {ref!r}"
    module_name, sep, attr = ref.rpartition(":")
    if not sep or not module_name or not attr:
        raise PactMergeError(f"{where}: write it as module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.exists():
                raise PactMergeError(f"{where}: {module_name} does not exist")
            spec = importlib.util.spec_from_file_location(f"pactmerge_user_{path.stem}", path)
            if spec is None or spec.loader is None:
                raise PactMergeError(f"{where}: cannot import {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except PactMergeError:
        raise
    except Exception as e:  # the user's module: any error while importing it
        raise PactMergeError(f"{where}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise PactMergeError(f"{where}: {module_name} has no function {attr!r}")
    return fn


class PythonData(Prepared):
    kind = "python"

    def __init__(self, spec: EvalSpec):
        assert spec.evaluation.function is not None
        self.spec = spec
        self.tasks = list(spec.evaluation.tasks)
        self.sizes = {t: {} for t in self.tasks}
        self.function = load_function(spec.evaluation.function)

    def evaluator(self) -> PythonEvaluator:
        return PythonEvaluator(self)


class PythonEvaluator(ModelEvaluator):
    def __init__(self, data: PythonData):
        from pactmerge.io.sources import open_source

        spec = data.spec
        self.function, self.tasks, self.ref = data.function, list(data.tasks), spec.evaluation.function
        model_class = spec.evaluation.model_class or "AutoModel"
        self.model = load_hf(model_class, spec.base, spec.device, f"base_model {spec.base}")
        with open_source(str(spec.base)) as base:
            names = set(base.names())
        prefix = getattr(self.model, "base_model_prefix", "")
        state = checkpoint_state(self.model, names, f"base_model {spec.base}", [prefix])
        self.excluded = sorted(names - set(state))
        self.weights = WeightSwap(state, prefer=names)
        self.scores("validation")  # fail before the merge when the function cannot score

    def scores(self, split: str, tasks: Sequence[str] | None = None) -> dict[str, float]:
        out = {}
        for task in list(tasks) if tasks else self.tasks:
            try:
                value = self.function(self.model, task, split)
            except Exception as e:  # the user's function
                raise PactMergeError(
                    f"evaluation.function {self.ref}: failed on task {task!r}, {split} split ({type(e).__name__}: {e})"
                ) from None
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise PactMergeError(
                    f"evaluation.function {self.ref}: returned {value!r} for task {task!r}, {split} split;"
                    " it must return a finite number"
                )
            out[task] = float(value)
        return out


def prepare(spec: EvalSpec) -> PythonData:
    return PythonData(spec)
