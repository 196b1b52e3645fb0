"""The calibration pass: each model's statistics, computed once and cached, for the data-aware stages.

A method or filter declares the statistics it needs when it registers (``needs=("covariance",)``;
see :mod:`pactmerge.registry`). Before the first merged parameter, :meth:`Calibration.ensure`
makes sure that, for every model t of the config and every needed kind, a statistics file of
*that checkpoint* on *its first N examples* exists in the cache (:mod:`pactmerge.stats.cache`),
computing the missing ones model by model:

* ``covariance``: ``C_t = sum x x^T`` over the inputs of each linear layer of fine-tuned model t on
  its own task's examples (:func:`pactmerge.stats.hooks.collect_covariances`; PAVE, RegMean);
* ``fisher``: the diagonal empirical Fisher of every parameter of model t on its examples
  (:func:`pactmerge.stats.gradients.squared_gradients`; Fisher merging).

The live model's names are mapped onto the checkpoint's (:func:`pactmerge.stats.names.map_names`),
and every mapped linear weight is checked to equal the checkpoint's, so statistics are never
filed under a model they were not computed on. The merge then reads them per parameter
(:class:`pactmerge.stats.store.StatsStore`).

Memory during the pass: one model, plus its statistics (every linear layer's ``d_in x d_in``, or a
parameter-sized Fisher) until they are written.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pactmerge.errors import PactMergeError
from pactmerge.io.sources import Source
from pactmerge.stats.cache import (
    cache_path,
    data_fingerprint,
    default_cache_dir,
    identity,
    is_valid,
    model_fingerprint,
    write_stats,
)
from pactmerge.stats.data import ModelData, batches, collate, to_device
from pactmerge.stats.gradients import squared_gradients
from pactmerge.stats.hooks import collect_covariances, hookable_modules
from pactmerge.stats.names import map_names
from pactmerge.stats.settings import CalibrationSettings
from pactmerge.stats.store import COVARIANCE, FISHER, KINDS, StatsStore


def needed_kinds(pipeline: Any) -> dict[str, list[str]]:
    """``{kind: [stage names]}`` of the statistics a pipeline's stages declare (``Spec.needs``)."""
    out: dict[str, list[str]] = {}
    for stage in pipeline.stages:
        for kind in stage.spec.needs:
            out.setdefault(kind, []).append(stage.name)
    return out


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PactMergeError(f"config key 'calibration.device': {name}: CUDA is not available on this machine")
    return torch.device(name)


@dataclass
class Calibration:
    """The statistics one merge needs and the data to compute them from (see the module doc)."""

    kinds: dict[str, list[str]]  # kind -> the stages that need it
    data: list[ModelData]
    settings: CalibrationSettings
    store: StatsStore | None = None
    seconds: float = 0.0  # time spent computing (0 when everything came from the cache)
    computed: list[tuple[int, str]] = field(default_factory=list)  # (model, kind) computed by this merge

    def ensure(self, models: Sequence[Source], progress: bool = False) -> StatsStore:
        """The statistics of every model, from the cache or computed now (once per merge)."""
        if self.store is not None:
            return self.store
        cache_dir = Path(self.settings.cache_dir).expanduser() if self.settings.cache_dir else default_cache_dir()
        n_used = [min(self.settings.samples, len(d.examples)) for d in self.data]
        files: dict[str, list[Path]] = {k: [] for k in self.kinds}
        todo: dict[int, list[tuple[str, Path, dict[str, Any]]]] = {}
        for t, (src, data) in enumerate(zip(models, self.data)):
            model_fp = model_fingerprint(src)
            data_fp = data_fingerprint(data.examples[: n_used[t]], data.tag)
            for kind in self.kinds:
                ident = identity(kind, model_fp, data_fp, n_used[t], self.settings.dtype)
                path = cache_path(cache_dir, ident)
                files[kind].append(path)
                if not is_valid(path, ident):
                    todo.setdefault(t, []).append((kind, path, ident))
        start = time.perf_counter()
        for t, jobs in tqdm(
            todo.items(), desc="calibration", unit="model", disable=not progress, file=sys.stderr, leave=False
        ):
            self._compute(t, models[t], n_used[t], jobs)
        self.seconds = time.perf_counter() - start
        self.store = StatsStore(files, n_used)
        return self.store

    def _compute(self, t: int, src: Source, n: int, jobs: list[tuple[str, Path, dict[str, Any]]]) -> None:
        data = self.data[t]
        device = _device(self.settings.device)
        model = data.load_model()
        if not isinstance(model, nn.Module):
            raise PactMergeError(f"calibration data of model {t} ({src.label}): load_model returned a {type(model)}")
        model = model.to(device).eval()
        examples = data.examples[:n]
        results: dict[str, tuple[dict[str, Tensor], dict[str, int], dict[str, str]]] = {}
        for kind, _, _ in jobs:
            if kind == COVARIANCE:
                results[kind] = _covariances(model, src, t, data, examples, self.settings.batch_size, device)
            elif kind == FISHER:
                results[kind] = _fisher(model, src, t, data, examples, device)
            else:  # registry names only known kinds; guard against a typo in a plug-in
                raise PactMergeError(f"unknown calibration statistic {kind!r} (known: {', '.join(KINDS)})")
        del model
        for kind, path, ident in jobs:  # written only once every kind of this model succeeded
            tensors, counts, layouts = results[kind]
            write_stats(path, ident, tensors, counts, layouts)
            self.computed.append((t, kind))

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def plan_calibration(
    pipeline: Any, settings: CalibrationSettings | None, models: Sequence[Source], data: Sequence[Any] | None
) -> Calibration | None:
    """Check up front that a merge has what its data-aware stages need; None if none needs anything.

    Raises a :class:`PactMergeError` for a ``calibration`` block or data nothing uses, a stage that
    needs statistics without data, data for the wrong number of models, a model without data,
    and fewer examples than ``calibration.samples`` (unless ``allow_fewer``).
    """
    kinds = needed_kinds(pipeline)
    if not kinds:
        if settings is not None:
            raise PactMergeError(
                "config key 'calibration': given, but no method or filter of this merge uses calibration statistics"
                " (remove it)"
            )
        if data is not None:
            raise PactMergeError("calibration data given, but no method or filter of this merge uses it")
        return None
    users = ", ".join(sorted({s for names in kinds.values() for s in names}))
    if data is None:
        raise PactMergeError(
            f"{users} need(s) calibration statistics ({', '.join(kinds)}) from each model's task data: add an"
            " `evaluation:` block with each model's task (`models[i].task`; its train split is used), or pass"
            " calibration_data=[pactmerge.stats.ModelData per model] in Python (docs/data_aware.md)"
        )
    if len(data) != len(models):
        raise PactMergeError(f"calibration data for {len(data)} model(s), but the config has {len(models)} models")
    settings = settings or CalibrationSettings()
    for t, (d, src) in enumerate(zip(data, models)):
        if not isinstance(d, ModelData):
            raise PactMergeError(f"calibration data of model {t} ({src.label}): missing (need a ModelData)")
        if len(d.examples) == 0:
            raise PactMergeError(f"calibration data of model {t} ({src.label}): no examples")
        if len(d.examples) < settings.samples and not settings.allow_fewer:
            raise PactMergeError(
                f"calibration data of model {t} ({src.label}): {len(d.examples)} examples, fewer than"
                f" calibration.samples = {settings.samples} (lower calibration.samples, or set"
                " calibration.allow_fewer: true)"
            )
    return Calibration(kinds, list(data), settings)


def _check_weights(model_params: Mapping[str, Tensor], mapping: dict[str, str], src: Source, t: int) -> None:
    """Every mapped tensor of the live model equals the checkpoint's (same values, any layout)."""
    for mname, cname in mapping.items():
        mine = model_params[mname].detach().cpu()
        ckpt = src.get(cname)
        if mine.numel() != ckpt.numel():
            raise PactMergeError(
                f"calibration model of model {t} ({src.label}): {mname!r} has shape {list(mine.shape)}, the"
                f" checkpoint's {cname!r} has {list(ckpt.shape)}"
            )
        if not torch.equal(mine.reshape(-1), ckpt.to(mine.dtype).reshape(-1)):
            raise PactMergeError(
                f"calibration model of model {t} ({src.label}): its {mname!r} differs from the checkpoint's"
                f" {cname!r} (load_model must return this checkpoint's model)"
            )


def _covariances(
    model: nn.Module, src: Source, t: int, data: ModelData, examples, batch_size: int, device: torch.device
) -> tuple[dict[str, Tensor], dict[str, int], dict[str, str]]:
    modules = hookable_modules(model)
    if not modules:
        raise PactMergeError(
            f"calibration model of model {t} ({src.label}): no linear layer the hooks can see (nn.Linear, 1x1"
            " nn.Conv2d, transformers Conv1D)"
        )
    params = dict(model.named_parameters())
    weights = {f"{name}.weight": name for name in modules if f"{name}.weight" in params}
    mapping = map_names(weights, src.names())
    if not mapping:
        example = next(iter(weights), "?")
        raise PactMergeError(
            f"calibration model of model {t} ({src.label}): none of its {len(weights)} linear weights matches a"
            f" parameter of the checkpoint (e.g. {example!r})"
        )
    _check_weights(params, mapping, src, t)
    hooked = {weights[w]: modules[weights[w]] for w in mapping}
    covs = collect_covariances(
        model, (to_device(b, device) for b in batches(examples, batch_size, data.pad_id)), data.forward, hooked
    )
    if not covs:
        raise PactMergeError(
            f"calibration model of model {t} ({src.label}): none of its linear layers ran during the forward pass"
        )
    tensors, counts, layouts = {}, {}, {}
    for wname, cname in mapping.items():
        cov = covs.get(weights[wname])
        if cov is not None:
            tensors[cname], counts[cname], layouts[cname] = cov.sum, cov.count, cov.layout
    return tensors, counts, layouts


def _fisher(
    model: nn.Module, src: Source, t: int, data: ModelData, examples, device: torch.device
) -> tuple[dict[str, Tensor], dict[str, int], dict[str, str]]:
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    mapping = map_names(params, src.names())
    if not mapping:
        raise PactMergeError(
            f"calibration model of model {t} ({src.label}): none of its parameters matches a parameter of the"
            " checkpoint"
        )
    _check_weights(params, mapping, src, t)
    singles = (to_device(collate([ex], data.pad_id), device) for ex in examples)
    fisher = squared_gradients(model, singles, data.loss, list(mapping))
    tensors = {cname: fisher[mname].reshape(src.shape(cname)) for mname, cname in mapping.items()}
    return tensors, dict.fromkeys(tensors, len(examples)), {}
