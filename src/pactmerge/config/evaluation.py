"""The ``evaluation:`` block of a merge config: the user's tasks, how to score them, how to choose alpha.

Validated here: the keys and their types, which task keys each kind takes, and the search grid.
The data themselves (files, columns, labels) are checked by :mod:`pactmerge.eval.session` before the
merge starts. docs/evaluate.md describes every key.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Kind = Literal["sequence-classification", "zero-shot-text", "clip-zero-shot", "causal-lm", "python"]

# The task keys each kind reads (beyond `data` and `split_column`, which every data-reading kind takes).
TASK_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # kind -> (required, optional)
    "sequence-classification": (("data", "text", "label"), ("split_column",)),
    "zero-shot-text": (("data", "text", "label"), ("split_column", "labels", "template", "prompts")),
    "clip-zero-shot": (("data",), ("split_column", "image", "label", "classnames", "templates")),
    "causal-lm": (("data",), ("split_column", "prompt", "choices", "answer")),
    "python": ((), ()),
}
# The metrics each kind offers; the first is the default.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "sequence-classification": ("accuracy", "macro_f1"),
    "zero-shot-text": ("accuracy", "macro_f1"),
    "clip-zero-shot": ("accuracy", "macro_f1"),
    "causal-lm": ("accuracy",),  # multiple choice: accuracy; prompt + answer: exact match (reported as accuracy)
    "python": ("score",),  # whatever the function returns (higher is better)
}
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TaskConfig(BaseModel):
    """One task's data and columns. Which keys apply depends on the evaluation's ``kind``."""

    model_config = ConfigDict(extra="forbid")

    data: str | dict[str, str] | None = None  # a file/folder, or {split: file/folder}
    split_column: str = "split"  # a column naming each row's split (train / validation / test)
    text: str | list[str] | None = None  # a column, or two for sentence pairs (sequence-classification)
    label: str | None = None
    labels: list[str] | None = None  # zero-shot-text: class names in class-id order
    template: str | None = None  # zero-shot-text: the prompt of a class, "{}" = its name
    prompts: dict[str, str] | None = None  # zero-shot-text: class name -> prompt (overrides template)
    image: str | None = None  # clip-zero-shot, CSV of paths: the column of image paths
    classnames: list[str] | None = None  # clip-zero-shot: class names in class-id order
    templates: list[str] | None = None  # clip-zero-shot: prompts with "{}", averaged per class
    prompt: str | None = None  # causal-lm: the prompt column
    choices: str | None = None  # causal-lm: the column with the list of choices
    answer: str | None = None  # causal-lm: the answer column (index or text of the right choice, or the text)

    @field_validator("data")
    @classmethod
    def _splits(cls, v):
        if isinstance(v, dict):
            bad = [k for k in v if k not in ("train", "validation", "test")]
            if bad:
                raise ValueError(f"split {bad[0]!r}: the splits are train, validation, test")
        return v

    @field_validator("text")
    @classmethod
    def _text(cls, v):
        if isinstance(v, list) and not 1 <= len(v) <= 2:
            raise ValueError("one column, or a list of two (a sentence pair)")
        return v


class SearchConfig(BaseModel):
    """The alpha search (:class:`pactmerge.eval.alpha.AlphaSearch`): the bench's rule by default."""

    model_config = ConfigDict(extra="forbid")

    grid: tuple[float, float, float] = (0.1, 3.0, 0.1)  # start, stop, step
    patience: int = Field(3, ge=1)
    extend: bool = True  # past the top (extend_step steps, up to max) and below the bottom (halving)
    extend_step: float = Field(0.25, gt=0)
    max: float = Field(20.0, gt=0)
    min: float = Field(0.01, gt=0)
    coarse: float | None = Field(None, gt=0)  # coarse-to-fine: the coarse step (e.g. 0.5)

    @field_validator("grid")
    @classmethod
    def _grid(cls, v):
        start, stop, step = v
        if not (0 < start <= stop and step > 0):
            raise ValueError("grid is [start, stop, step] with 0 < start <= stop and step > 0")
        return v

    @model_validator(mode="after")
    def _coarse(self):
        if self.coarse is not None and self.coarse <= self.grid[2]:
            raise ValueError(f"coarse step {self.coarse} must be larger than the grid step {self.grid[2]}")
        return self


class SplitConfig(BaseModel):
    """A seeded split of a data file that has no split column: the fraction of rows per split."""

    model_config = ConfigDict(extra="forbid")

    train: float = Field(0.0, ge=0, le=1)
    validation: float = Field(0.5, ge=0, le=1)
    test: float = Field(0.5, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sum(self):
        if abs(self.train + self.validation + self.test - 1.0) > 1e-6:
            raise ValueError("train + validation + test must be 1")
        return self


class EvaluationConfig(BaseModel):
    """``evaluation:``: the tasks, the evaluator kind, the metric and the alpha search."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind
    tasks: dict[str, TaskConfig] = Field(min_length=1)
    metric: str | None = None  # default: the kind's first (KIND_METRICS)
    search: SearchConfig = Field(default_factory=SearchConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(128, ge=1)  # tokens per text (prompt + choice for causal-lm)
    function: str | None = None  # python: "module:function" or "path/to/file.py:function"
    model_class: str | None = None  # python: the transformers class the base is loaded with (AutoModel)
    max_new_tokens: int | None = Field(None, ge=1)  # causal-lm, prompt + answer: default from the answers

    @field_validator("tasks")
    @classmethod
    def _names(cls, v):
        for name in v:
            if not _TASK_NAME.match(name):
                raise ValueError(f"task name {name!r}: letters, digits, '_', '.', '-' only (it names a folder)")
        return v

    @model_validator(mode="after")
    def _kind_keys(self):
        required, optional = TASK_KEYS[self.kind]
        for name, task in self.tasks.items():
            # Keys given a value (a model_dump round trip sets every key, None and defaults included).
            given = {k for k in task.model_fields_set if getattr(task, k) is not None}
            if task.split_column == "split":
                given.discard("split_column")
            for key in sorted(given):
                if key not in required and key not in optional:
                    raise ValueError(f"tasks.{name}.{key}: not a key of kind {self.kind}")
            for key in required:
                if getattr(task, key) is None:
                    raise ValueError(f"tasks.{name}: kind {self.kind} needs '{key}'")
        metrics = KIND_METRICS[self.kind]
        if self.metric is not None and self.metric not in metrics:
            raise ValueError(f"metric {self.metric!r}: kind {self.kind} offers {', '.join(metrics)}")
        if self.kind == "python" and not self.function:
            raise ValueError("kind python needs 'function: module:function'")
        if self.kind != "python" and self.function is not None:
            raise ValueError(f"function: only kind python takes it (this is {self.kind})")
        if self.kind != "python" and self.model_class is not None:
            raise ValueError(f"model_class: only kind python takes it (this is {self.kind})")
        if self.kind != "causal-lm" and self.max_new_tokens is not None:
            raise ValueError(f"max_new_tokens: only kind causal-lm takes it (this is {self.kind})")
        return self

    @property
    def metric_name(self) -> str:
        return self.metric or KIND_METRICS[self.kind][0]


def check_model_tasks(tasks: list[str | None], evaluation: EvaluationConfig | None) -> None:
    """``models[i].task``: each names an evaluation task, at most one model per task; with kind
    sequence-classification every task needs its fine-tune (the head comes from it)."""
    if evaluation is None:
        for i, t in enumerate(tasks):
            if t is not None:
                raise ValueError(f"models.{i}.task: names task {t!r}, but the config has no evaluation block")
        return
    seen: dict[str, int] = {}
    for i, t in enumerate(tasks):
        if t is None:
            continue
        if t not in evaluation.tasks:
            raise ValueError(
                f"models.{i}.task: {t!r} is not in evaluation.tasks (tasks: {', '.join(evaluation.tasks)})"
            )
        if t in seen:
            raise ValueError(f"models.{i}.task: task {t!r} is already the task of models.{seen[t]}")
        seen[t] = i
    if evaluation.kind == "sequence-classification":
        headless = [t for t in evaluation.tasks if t not in seen]
        if headless:
            raise ValueError(
                f"evaluation.tasks.{headless[0]}: kind sequence-classification takes each task's head from its"
                " fine-tune; set `task:` on the model fine-tuned for it"
            )
