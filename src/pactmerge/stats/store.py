"""Calibration statistics streamed into the merge, one parameter at a time.

:class:`StatsStore` holds one open statistics file per (kind, model) and reads nothing up front;
:meth:`StatsStore.view` gives a parameter's :class:`ParamStats`, which reads that parameter's T
tensors the first time a stage asks for them. So the merge holds at most one parameter's
statistics -- ``T x d_in x d_in`` for a covariance -- besides its tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pactmerge.stats.cache import read_meta
from pactmerge.stats.hooks import IN_OUT, OUT_IN

COVARIANCE = "covariance"
FISHER = "fisher"
KINDS = (COVARIANCE, FISHER)


def _constant(values: list[Tensor]) -> Callable[[], list[Tensor]]:
    return lambda: values


class ParamStats:
    """One parameter's statistics, one entry per model (the config's order).

    ``get(kind)`` returns T tensors, or None when the parameter has none of that kind (not a
    linear weight, or a parameter the calibration model does not have). A model whose layer saw
    no input has an all-zero entry with ``counts(kind)[t] == 0``.

    Covariances are ``sum x x^T`` over ``counts`` rows, ``(d_in, d_in)``; Fishers have the
    parameter's shape. ``transposed`` is True when the weight is stored ``(d_in, d_out)``
    (transformers' Conv1D), so a stage works on its transpose.
    """

    def __init__(
        self,
        name: str,
        loaders: dict[str, Callable[[], list[Tensor]]],
        counts: dict[str, list[int]],
        layout: str = OUT_IN,
        examples: list[int] | None = None,
    ):
        self.name = name
        self._loaders = loaders
        self._counts = counts
        self._loaded: dict[str, list[Tensor]] = {}
        self.transposed = layout == IN_OUT
        self.examples = examples or []  # N_t: calibration examples model t used

    @classmethod
    def of(
        cls,
        covariance: Sequence[Tensor] | None = None,
        fisher: Sequence[Tensor] | None = None,
        counts: dict[str, list[int]] | None = None,
        layout: str = OUT_IN,
        name: str = "",
        examples: list[int] | None = None,
    ) -> ParamStats:
        """In-memory statistics (tests, or a caller that computed them itself); counts and
        examples default to 1 per model."""
        given = {k: list(v) for k, v in ((COVARIANCE, covariance), (FISHER, fisher)) if v is not None}
        loaders = {k: _constant(v) for k, v in given.items()}
        cnt = {k: [1] * len(v) for k, v in given.items()}
        cnt.update(counts or {})
        n_models = max((len(v) for v in given.values()), default=0)
        return cls(name, loaders, cnt, layout, examples if examples is not None else [1] * n_models)

    def has(self, kind: str) -> bool:
        return kind in self._loaders

    def get(self, kind: str) -> list[Tensor] | None:
        if kind not in self._loaders:
            return None
        if kind not in self._loaded:
            self._loaded[kind] = self._loaders[kind]()
        return self._loaded[kind]

    def covariance(self) -> list[Tensor] | None:
        return self.get(COVARIANCE)

    def fisher(self) -> list[Tensor] | None:
        return self.get(FISHER)

    def counts(self, kind: str) -> list[int]:
        return self._counts[kind]


class StatsStore:
    """The statistics files of a merge: ``files[kind][t]`` for model t (see :mod:`pactmerge.stats.cache`)."""

    def __init__(self, files: dict[str, list[Path]], examples: list[int] | None = None):
        from safetensors import safe_open

        self.files = files
        self.examples = examples or []  # N actually used per model
        self._handles: dict[str, list[Any]] = {}
        self._meta: dict[str, list[dict[str, Any]]] = {}
        self._keys: dict[str, list[set[str]]] = {}
        for kind, paths in files.items():
            self._handles[kind] = [safe_open(str(p), framework="pt") for p in paths]
            self._keys[kind] = [set(h.keys()) for h in self._handles[kind]]
            self._meta[kind] = [read_meta(p) or {} for p in paths]

    def view(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ParamStats:
        """The statistics of parameter ``name`` on ``device`` in ``dtype`` (read lazily)."""
        loaders: dict[str, Callable[[], list[Tensor]]] = {}
        counts: dict[str, list[int]] = {}
        layout = OUT_IN
        for kind, handles in self._handles.items():
            present = [name in keys for keys in self._keys[kind]]
            if not any(present):
                continue
            metas = self._meta[kind]
            first = present.index(True)
            layout = metas[first].get("layouts", {}).get(name, layout)
            counts[kind] = [int(m.get("counts", {}).get(name, 0)) if p else 0 for m, p in zip(metas, present)]

            def load(handles=handles, present=present, first=first) -> list[Tensor]:
                got = {
                    t: h.get_tensor(name).to(device=device, dtype=dtype) for t, h in enumerate(handles) if present[t]
                }
                return [got[t] if t in got else torch.zeros_like(got[first]) for t in range(len(handles))]

            loaders[kind] = load
        return ParamStats(name, loaders, counts, layout, self.examples)

    def close(self) -> None:
        self._handles.clear()
