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
(e.g. a rank larger than a matrix allows) with a :class:`PactMergeError`; ``bypass(p, info)`` returns
why a filter leaves a parameter untouched (``--dry-run`` reports it), or None.

Per-model options: ``model_params`` is a pydantic model (or a function of the validated ``params``
returning one, or None) of the options a model's ``parameters:`` may give this method/filter
(e.g. TIES's per-model ``density``); :mod:`pactmerge.pipeline` validates every model's keys against
the union over the pipeline's stages, once, and the methods read them from
``ctx.model_params[t]`` (only the keys the model gave). ``uses_weight=True`` declares that the
method honours the models' ``weight``; for any other method a weight other than 1 is refused.
``paper`` names the method's paper (title and arXiv id) for the model card.

``needs=("covariance",)`` (or ``"fisher"``) declares calibration statistics the stage reads: the
merge then runs the calibration pass first (:mod:`pactmerge.stats`) and the stage finds the
parameter's per-model statistics, read lazily, as ``ctx.calibration`` (a
:class:`pactmerge.stats.ParamStats`; ``ctx.calibration.covariance()`` is None for a parameter
that has none, e.g. a bias or an embedding).

``elementwise`` (a bool, or a predicate of the validated params) declares that every output entry
depends only on the same entry of the inputs (given the ``prepare`` statistics): ``fn`` applied to
a contiguous slice of the flattened tensors gives that slice of its result, bit for bit. When
every stage of a merge is elementwise the engine runs each parameter in cache-sized chunks
(:func:`pactmerge.engine.merged_weight_chunked`), which only such a stage may receive.

``lowrank=True`` declares that ``fn`` (and ``prepare``) accept task vectors given as
:class:`pactmerge.lowrank.LowRankDelta` (LoRA adapters) mixed with dense tensors, and may return
them; for every other method/filter the engine densifies them first, one parameter at a time.

``task_specific=True`` declares a method that returns a :class:`pactmerge.modulators.TaskSpecific`
(the shared merged task vector plus one modulator per task: a mask, a scale and/or a replacement)
instead of a tensor, for parameters where it recovers each task's own update (TALL masks, TSV-C).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor

from pactmerge.lowrank import Delta
from pactmerge.validation import StrictModel


class NoParams(StrictModel):
    pass


class Params(StrictModel):
    """Base class for method/filter parameter models: unknown keys are errors, a bool is not a
    number, floats are finite (see :mod:`pactmerge.validation`)."""


@dataclass(frozen=True)
class ParamInfo:
    """What the plan knows about one parameter before reading it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the base model's storage dtype (the output keeps it unless out_dtype is set)
    kind: str  # "matrix" (2-D, merged by the SVD-aware path), "vector" (other float), "copy" (int/bool/excluded)
    layer: int | None  # layer index parsed from the name (see plan.layer_position)
    depth_fraction: float  # position of the layer in (0, 1]: filters with depth d apply when <= d
    # Stored (in, out) (GPT-2's Conv1D; pactmerge.io.architectures): filters and methods get the
    # (out, in) view and `shape` is still the stored shape (min(shape) and the ranks are unaffected).
    transposed: bool = False
    num_models: int = 0  # how many task vectors the method will receive (0: not known, e.g. a hand-made info)
    layer_rank: int | None = None  # 0-based rank of `layer` among the model's distinct layer indices
    num_layers: int = 0  # how many distinct layer indices the model has
    model_dtypes: tuple[torch.dtype, ...] = ()  # each model's storage dtype (may differ from the base's); () = dtype

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
    # Per-model options, validated against the stages' ``model_params``: only the keys each model gave.
    model_params: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)  # from the `prepare` passes, keyed by method/filter name
    calibration: Any = None  # pactmerge.stats.ParamStats of this parameter, for stages that declare `needs`
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
# Why a filter leaves a parameter untouched though it is in the filter's scope (None: it filters it).
BypassFn = Callable[[Any, ParamInfo], str | None]
# The per-model options a stage honours: a pydantic model, or a function of the stage's validated params giving one.
ModelParamsSpec = type[BaseModel] | Callable[[Any], type[BaseModel] | None] | None


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
    model_params: ModelParamsSpec = None  # per-model options (see the module doc)
    uses_weight: bool = False  # methods: honours the models' `weight` (otherwise a weight != 1 is refused)
    paper: str = ""  # the paper, "Title (arXiv:NNNN.NNNNN)", for the model card
    bypass: BypassFn | None = None  # reported by --dry-run; the filter itself must follow the same rule
    task_specific: bool = False  # methods only: may return a pactmerge.modulators.TaskSpecific (per-task outputs)
    needs: tuple[str, ...] = ()  # calibration statistics the stage reads (pactmerge.stats.KINDS)
    elementwise: bool | Callable[[Any], bool] = False  # entry-by-entry (see the module doc): may run on chunks

    def model_params_for(self, params: Any) -> type[BaseModel] | None:
        """The per-model options model for this stage configured with ``params``."""
        mp = self.model_params
        if mp is None or isinstance(mp, type):  # a pydantic model class (or none)
            return mp
        return mp(params)


METHODS: dict[str, Spec] = {}
FILTERS: dict[str, Spec] = {}


def _register(table: dict[str, Spec], kind: str, name: str, params, stage: str = "pre", **options):
    if stage not in ("pre", "post"):
        raise ValueError(f"{kind} {name!r}: stage must be 'pre' or 'post', not {stage!r}")
    needs = options.get("needs", ())
    if any(n not in ("covariance", "fisher") for n in needs):  # pactmerge.stats.KINDS
        raise ValueError(f"{kind} {name!r}: needs must name covariance / fisher, not {needs!r}")

    def deco(fn):
        if name in table:
            raise RuntimeError(f"{kind} {name!r} registered twice")
        table[name] = Spec(name, fn, params or NoParams, doc=(fn.__doc__ or "").strip(), stage=stage, **options)
        return fn

    return deco


def register_method(
    name: str,
    params: type[BaseModel] | None = None,
    prepare=None,
    check=None,
    lowrank: bool = False,
    model_params: ModelParamsSpec = None,
    uses_weight: bool = False,
    paper: str = "",
    task_specific: bool = False,
    needs: tuple[str, ...] = (),
    elementwise: bool | Callable[[Any], bool] = False,
):
    return _register(
        METHODS,
        "method",
        name,
        params,
        prepare=prepare,
        check=check,
        lowrank=lowrank,
        model_params=model_params,
        uses_weight=uses_weight,
        paper=paper,
        task_specific=task_specific,
        needs=tuple(needs),
        elementwise=elementwise,
    )


def register_filter(
    name: str,
    params: type[BaseModel] | None = None,
    prepare=None,
    check=None,
    stage: str = "pre",
    lowrank: bool = False,
    model_params: ModelParamsSpec = None,
    paper: str = "",
    bypass: BypassFn | None = None,
    needs: tuple[str, ...] = (),
):
    return _register(
        FILTERS,
        "filter",
        name,
        params,
        stage,
        prepare=prepare,
        check=check,
        lowrank=lowrank,
        model_params=model_params,
        paper=paper,
        bypass=bypass,
        needs=tuple(needs),
    )


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
