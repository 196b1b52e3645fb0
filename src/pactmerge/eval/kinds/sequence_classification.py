"""Kind ``sequence-classification``: each fine-tune carries its own classification head.

The GLUE-style setting (e.g. RoBERTa with per-task heads, as in the PAVE paper). Each task's
fine-tune is an ``AutoModelForSequenceClassification`` folder; its head (every parameter outside the
backbone, ``classifier.*`` / ``score.*`` ...) may have its own number of labels. The heads are not
merged: the base's own parameters outside the backbone are excluded from the merge automatically
(and reported), the fine-tunes' heads are ignored by it, and the merged backbone is scored with each
task's own head. One backbone module is shared by every task's model, so a weight swap serves all.

Output next to a merge: ``<out>/<task>/`` per task, loadable with
``AutoModelForSequenceClassification.from_pretrained``: the task's config, the merged backbone's
weight files as hard links (no second copy on disk; a copy where links are not possible), the
task's head in ``head.safetensors`` and an index naming which file holds what.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.eval.data import as_class_id, require_columns, require_splits, task_rows
from pactmerge.eval.kinds.common import (
    EvalSpec,
    ModelEvaluator,
    Prepared,
    WeightSwap,
    batches,
    check_split,
    classification_score,
    hf_folder,
)

SPLITS = ("validation", "test")


class SequenceClassificationData(Prepared):
    kind = "sequence-classification"

    def __init__(self, spec: EvalSpec):
        from pactmerge.eval.hf import transformers_module
        from pactmerge.io.sources import open_source

        tf = transformers_module("kind sequence-classification")
        self.spec = spec
        ev = spec.evaluation
        self.tasks = list(ev.tasks)
        self.configs: dict[str, Any] = {}
        self.folders: dict[str, Path] = {}
        for task in self.tasks:
            folder = hf_folder(spec.finetuned[task], f"evaluation.tasks.{task}: its fine-tune")
            self.folders[task] = folder
            self.configs[task] = tf.AutoConfig.from_pretrained(str(folder))
        self.tokenizer = _tokenizer(tf, [spec.base, *self.folders.values()])
        # The backbone's parameter names: the fine-tunes' class says where the backbone lives.
        with torch.device("meta"):
            probe = tf.AutoModelForSequenceClassification.from_config(self.configs[self.tasks[0]])
        self.prefix = probe.base_model_prefix + "."
        with open_source(str(spec.base)) as base:
            base_names = base.names()
        backbone = [n for n in base_names if n.startswith(self.prefix)]
        if not backbone:
            raise PactMergeError(
                f"base_model {spec.base}: no parameter starts with {self.prefix!r}, where the fine-tunes'"
                f" {type(probe).__name__} keeps its backbone; save the base with that class"
                " (AutoModelForSequenceClassification.from_pretrained(base).save_pretrained(...)), see"
                " docs/evaluate.md#models"
            )
        self.excluded = [n for n in base_names if not n.startswith(self.prefix)]
        self.heads: dict[str, dict[str, Tensor]] = {}
        for task, folder in self.folders.items():
            with open_source(str(folder)) as src:
                self.heads[task] = {n: src.get(n) for n in src.names() if not n.startswith(self.prefix)}
            if not self.heads[task]:
                raise PactMergeError(
                    f"evaluation.tasks.{task}: fine-tune {folder} has no head (parameters outside {self.prefix}*)"
                )

        self.inputs: dict[str, dict[str, tuple[list[dict[str, list[int]]], Tensor]]] = {}
        self.sizes: dict[str, dict[str, int]] = {}
        for task in self.tasks:
            tcfg = ev.tasks[task]
            assert tcfg.data is not None and tcfg.text is not None and tcfg.label is not None
            columns = [tcfg.text] if isinstance(tcfg.text, str) else list(tcfg.text)
            rows = task_rows(task, tcfg.data, tcfg.split_column, ev.split.model_dump(), ev.split.seed)
            require_splits(rows, SPLITS)
            require_columns(rows, [*columns, tcfg.label])
            cfg = self.configs[task]
            names = [str(cfg.id2label.get(i, i)) for i in range(cfg.num_labels)]
            self.inputs[task], self.sizes[task] = {}, {}
            for split, items in rows.splits.items():
                where = f"evaluation.tasks.{task}: {rows.sources[split]}, column {tcfg.label!r}"
                labels = torch.tensor([as_class_id(r[tcfg.label], names, where) for r in items], dtype=torch.long)
                texts = [[str(r[c]) for c in columns] for r in items]
                self.inputs[task][split] = (_encode(self.tokenizer, texts, ev.max_length), labels)
                self.sizes[task][split] = len(items)

    def evaluator(self) -> SequenceClassificationEvaluator:
        return SequenceClassificationEvaluator(self)

    def model_inputs(
        self, task: str, split: str, n: int, batch_size: int, seed: int = 0
    ) -> Iterator[dict[str, Tensor]]:
        check_split(self.inputs[task], task, split)
        encoded, _ = self.inputs[task][split]
        order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()[:n]
        for start in range(0, len(order), batch_size):
            yield _pad(self.tokenizer, [encoded[i] for i in order[start : start + batch_size]])

    def write_task_folders(self, folder: Path, root_files: list[str]) -> list[str]:
        from safetensors.torch import save_file

        index_file = folder / "model.safetensors.index.json"
        if index_file.exists():
            where = json.loads(index_file.read_text())["weight_map"]
        else:
            from pactmerge.io.sources import open_source

            with open_source(str(folder / root_files[0])) as src:
                where = dict.fromkeys(src.names(), root_files[0])
        renamed = {f: f.replace("model", "backbone", 1) for f in root_files}
        shared = [n for n in where if n.startswith(self.prefix)]
        skip = {"config.json", "README.md", "pactmerge_config.yaml", "model.safetensors.index.json"}
        written = []
        for task in self.tasks:
            dest = folder / task
            dest.mkdir()
            for f in root_files:
                _link_or_copy(folder / f, dest / renamed[f])
            save_file(
                {n: t.contiguous() for n, t in self.heads[task].items()},
                str(dest / "head.safetensors"),
                metadata={"format": "pt"},
            )
            weight_map = {n: renamed[where[n]] for n in shared} | dict.fromkeys(self.heads[task], "head.safetensors")
            (dest / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
            )
            shutil.copy2(self.folders[task] / "config.json", dest / "config.json")
            for extra in folder.iterdir():  # the tokenizer and the like, as the merged folder has them
                if extra.is_file() and extra.name not in skip and not extra.name.startswith(("model", "evaluation")):
                    shutil.copy2(extra, dest / extra.name)
            written.append(task)
        return written


def _tokenizer(tf: Any, folders: Sequence[Path]) -> Any:
    for folder in folders:
        try:
            return tf.AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError):
            continue
    raise PactMergeError(f"no tokenizer in {folders[0]} or the fine-tunes' folders")


def _encode(tokenizer: Any, texts: list[list[str]], max_length: int) -> list[dict[str, list[int]]]:
    """Each text (or sentence pair) tokenized, unpadded."""
    first = [t[0] for t in texts]
    second = [t[1] for t in texts] if texts and len(texts[0]) > 1 else None
    enc = tokenizer(first, second, truncation=True, max_length=max_length, padding=False)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{k: list(enc[k][i]) for k in keys} for i in range(len(first))]


def _pad(tokenizer: Any, items: list[dict[str, list[int]]]) -> dict[str, Tensor]:
    return dict(tokenizer.pad(items, return_tensors="pt"))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (another device, some file systems): a copy
        shutil.copy2(src, dst)


class SequenceClassificationEvaluator(ModelEvaluator):
    """One backbone module shared by every task's ``AutoModelForSequenceClassification``."""

    def __init__(self, data: SequenceClassificationData):
        from pactmerge.eval.hf import transformers_module
        from pactmerge.io.sources import open_source

        tf = transformers_module("kind sequence-classification")
        spec = data.spec
        self.data, self.tasks, self.excluded = data, list(data.tasks), list(data.excluded)
        self.metric, self.batch_size, self.progress = spec.metric, spec.evaluation.batch_size, spec.progress
        first = self.tasks[0]
        model0 = tf.AutoModelForSequenceClassification.from_config(data.configs[first])
        backbone = getattr(model0, model0.base_model_prefix)
        self.models: dict[str, torch.nn.Module] = {}
        for task in self.tasks:
            if task == first:
                model = model0
            else:
                with torch.device("meta"):
                    model = tf.AutoModelForSequenceClassification.from_config(data.configs[task])
                setattr(model, model.base_model_prefix, backbone)
                for child in model.children():  # the head: materialized, then loaded
                    if child is not backbone:
                        child.to_empty(device="cpu")
            missing, unexpected = model.load_state_dict(data.heads[task], strict=False)
            head_missing = [n for n in missing if not n.startswith(data.prefix)]
            if head_missing or unexpected:
                bad = (head_missing or unexpected)[0]
                raise PactMergeError(
                    f"evaluation.tasks.{task}: the head of {data.folders[task]} does not fit its config"
                    f" ({'missing' if head_missing else 'unexpected'} {bad!r})"
                )
            self.models[task] = model
        state = {data.prefix + n: t for n, t in backbone.state_dict().items()}
        with open_source(str(spec.base)) as base:
            lacking = [n for n in state if n not in base]
            if lacking:
                raise PactMergeError(
                    f"base_model {spec.base}: has no parameter {lacking[0]!r} of the fine-tunes' backbone;"
                    " see docs/evaluate.md#models"
                )
            with torch.no_grad():
                for n, t in state.items():
                    t.copy_(base.get(n))
        for model in self.models.values():
            model.to(spec.device).eval()
        # Re-read after the move: .to() may have replaced the tensors.
        state = {data.prefix + n: t for n, t in backbone.state_dict().items()}
        self.weights = WeightSwap(state)

    @torch.no_grad()
    def scores(self, split: str, tasks: Sequence[str] | None = None) -> dict[str, float]:
        out = {}
        for task in list(tasks) if tasks else self.tasks:
            encoded, labels = self.data.inputs[task][split]
            model = self.models[task]
            device = next(model.parameters()).device
            order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
            pred = torch.empty(len(encoded), dtype=torch.long)
            for start in batches(len(order), self.batch_size, f"{task} {split}", self.progress):
                index = order[start : start + self.batch_size]
                batch = _pad(self.data.tokenizer, [encoded[i] for i in index])
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
                pred[index] = logits.argmax(-1).cpu()
            out[task] = classification_score(pred, labels, self.metric)
        return out


def prepare(spec: EvalSpec) -> SequenceClassificationData:
    return SequenceClassificationData(spec)
