"""Name -> function registries for merging methods and task-vector filters.

A *method* merges one parameter's task vectors into one merged task vector::

    @register_method("task_arithmetic", params=TaskArithmeticParams)
    def task_arithmetic(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: TaskArithmeticParams) -> Tensor

A *filter* rewrites one parameter's task vectors (same count, same shapes)::

    @register_filter("pact", params=PactParams)
    def pact(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: PactParams) -> list[Tensor]

A filter registered with ``stage="post"`` runs *after* the method instead, on the merged task
vector: it is called as ``fn(base, [merged], ctx, p)`` and returns ``[merged']`` (e.g. CSP, which
the paper applies to the merged update; for a nonlinear method that is not the same as filtering
each task vector). Post filters run in their configured order, after every pre filter and the method.

``params`` is a pydantic model (``extra="forbid"``) validated once per merge, so an unknown or
out-of-range option fails before anything is read. A method or filter that needs model-wide
statistics (e.g. TIES with a global top-k) gives ``prepare``: it receives an iterator over
``(ctx, base, deltas)`` for every parameter (an explicit first streaming pass) and returns a dict
that later calls see as ``ctx.stats[name]``. The argument is re-iterable: each ``for`` over it is
one more full streaming pass (re-reading the inputs), for statistics that one pass cannot give
exactly (e.g. a k-th largest value by radix selection). ``check(p, info)`` may reject a parameter up front
(e.g. a rank larger than a matrix allows) with a :class:`PactMergeError`.

``elementwise`` (a bool, or a predicate of the validated params) declares that every output entry
depends only on the same entry of the inputs (given the ``prepare`` statistics): ``fn`` applied to
a contiguous slice of the flattened tensors gives that slice of its result, bit for bit. When
every stage of a merge is elementwise the engine runs each parameter in cache-sized chunks
(:func:`pactmerge.engine.merged_weight_chunked`), which only such a stage may receive.

``lowrank=True`` declares that ``fn`` (and ``prepare``) accept task vectors given as
:class:`pactmerge.lowrank.LowRankDelta` (LoRA adapters) mixed with dense tensors, and may return
them; for every other method/filter the engine densifies them first, one parameter at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from pactmerge.lowrank import Delta


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Params(BaseModel):
    """Base class for method/filter parameter models: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class ParamInfo:
    """What the plan knows about one parameter before reading it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str  # "matrix" (2-D, merged by the SVD-aware path), "vector" (other float), "copy" (int/bool/excluded)
    layer: int | None  # layer index parsed from the name (see plan.layer_position)
    depth_fraction: float  # position of the layer in (0, 1]: filters with depth d apply when <= d

    @property
    def is_matrix(self) -> bool:
        return self.kind == "matrix"

    def in_depth(self, depth: float) -> bool:
        return depth > 0 and self.depth_fraction <= depth + 1e-9


@dataclass
class ParamContext:
    """Everything a method/filter may use besides the tensors themselves."""

    info: ParamInfo
    seed: int  # per-parameter seed, derived from the config seed and the parameter name
    weights: list[float]  # per-model weight (default 1.0)
    model_params: list[dict[str, Any]]  # per-model method-specific options (e.g. a lambda per task)
    stats: dict[str, Any] = field(default_factory=dict)  # from the `prepare` passes, keyed by method/filter name
    cache: Any = None  # a pactmerge.linalg.cache.SubspaceCache for base-model subspaces, or None

    @property
    def name(self) -> str:
        return self.info.name

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from (seed, parameter name, salt): the same draws whatever order
        or device the parameters are processed in."""
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + salt) % (2**63 - 1))
        return g


MethodFn = Callable[[Tensor, list[Delta], ParamContext, Any], Delta]
FilterFn = Callable[[Tensor, list[Delta], ParamContext, Any], list[Delta]]
# The stream is re-iterable: each `for` over it is one more full streaming pass over the inputs.
PrepareFn = Callable[[Iterable[tuple[ParamContext, Tensor, list[Delta]]], Any], Any]
CheckFn = Callable[[Any, ParamInfo], None]


@dataclass(frozen=True)
class Spec:
    name: str
    fn: Callable
    params: type[BaseModel]
    prepare: PrepareFn | None = None
    check: CheckFn | None = None
    doc: str = ""
    stage: str = "pre"  # filters only: "pre" (each task vector, before the method) or "post" (the merged one)
    lowrank: bool = False  # accepts pactmerge.lowrank.LowRankDelta task vectors; else the engine densifies them
    elementwise: bool | Callable[[Any], bool] = False  # entry-by-entry (see the module doc): may run on chunks


METHODS: dict[str, Spec] = {}
FILTERS: dict[str, Spec] = {}


def _register(
    table: dict[str, Spec],
    kind: str,
    name: str,
    params,
    prepare,
    check,
    stage: str = "pre",
    lowrank: bool = False,
    elementwise: bool | Callable[[Any], bool] = False,
):
    if stage not in ("pre", "post"):
        raise ValueError(f"{kind} {name!r}: stage must be 'pre' or 'post', not {stage!r}")

    def deco(fn):
        if name in table:
            raise RuntimeError(f"{kind} {name!r} registered twice")
        doc = (fn.__doc__ or "").strip()
        table[name] = Spec(name, fn, params or NoParams, prepare, check, doc, stage, lowrank, elementwise)
        return fn

    return deco


def register_method(
    name: str,
    params: type[BaseModel] | None = None,
    prepare=None,
    check=None,
    lowrank: bool = False,
    elementwise: bool | Callable[[Any], bool] = False,
):
    return _register(METHODS, "method", name, params, prepare, check, lowrank=lowrank, elementwise=elementwise)


def register_filter(
    name: str,
    params: type[BaseModel] | None = None,
    prepare=None,
    check=None,
    stage: str = "pre",
    lowrank: bool = False,
):
    return _register(FILTERS, "filter", name, params, prepare, check, stage, lowrank)


def _load_builtins() -> None:
    # Importing the packages runs their @register_* decorators.
    import pactmerge.filters
    import pactmerge.methods  # noqa: F401


def get_method(name: str) -> Spec:
    _load_builtins()
    try:
        return METHODS[name]
    except KeyError:
        from pactmerge.errors import PactMergeError

        raise PactMergeError(
            f"config key 'method': unknown method {name!r}; known: {', '.join(sorted(METHODS))}"
        ) from None


def get_filter(name: str) -> Spec:
    _load_builtins()
    try:
        return FILTERS[name]
    except KeyError:
        from pactmerge.errors import PactMergeError

        raise PactMergeError(
            f"config key 'filters': unknown filter {name!r}; known: {', '.join(sorted(FILTERS))}"
        ) from None


def available_methods() -> list[str]:
    _load_builtins()
    return sorted(METHODS)


def available_filters() -> list[str]:
    _load_builtins()
    return sorted(FILTERS)
