"""A merge config resolved once into what runs: the pre filters, the method and the post filters.

Every consumer -- the engine, ``--dry-run``, ``analyze``, the model card, the backends -- reads the
same :class:`Pipeline`, built by :func:`resolve_pipeline` when the config is validated, so a method
or filter name, its parameters and its stage are looked up and checked exactly once.

Per-model options (a model's ``parameters:``) are checked here too: every key must be one that a
stage of the pipeline declares (``Spec.model_params``), every value passes that stage's
validation, and a ``weight`` other than 1 needs a method that honours weights
(``Spec.uses_weight``). The result, ``Pipeline.model_params``, is what the methods see as
``ctx.model_params``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from pactmerge.errors import PactMergeError
from pactmerge.registry import ParamInfo, Spec, get_filter, get_method
from pactmerge.validation import describe_validation_error


@dataclass(frozen=True)
class Stage:
    """One method or filter with its validated parameters.

    ``where`` is the config key the parameters came from (``parameters``, ``pact``,
    ``filters[1].dare``), for error messages.
    """

    spec: Spec
    params: Any  # the spec's pydantic Params instance
    where: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def elementwise(self) -> bool:
        """Whether this stage, with these parameters, works entry by entry (registry doc)."""
        e = self.spec.elementwise
        return bool(e(self.params) if callable(e) else e)

    @property
    def depth(self) -> float:
        """The fraction of layers the stage applies to (filters with a ``depth`` option), else 1."""
        return float(getattr(self.params, "depth", 1.0))

    def bypass(self, info: ParamInfo) -> str | None:
        """Why this stage leaves ``info`` untouched though it is in its scope (e.g. PACT on a matrix
        narrower than K), or None."""
        return self.spec.bypass(self.params, info) if self.spec.bypass is not None else None


@dataclass(frozen=True)
class Pipeline:
    """What runs on each parameter: ``pre`` filters in order, the ``method``, ``post`` filters in order.

    ``filters`` keeps the configured order of every filter (pre and post together).
    """

    method: Stage
    filters: tuple[Stage, ...] = ()
    # Per model: its validated per-model options (only the keys it gave), see resolve_model_params.
    model_params: tuple[dict[str, Any], ...] = ()

    @property
    def pre(self) -> tuple[Stage, ...]:
        return tuple(s for s in self.filters if s.spec.stage == "pre")

    @property
    def post(self) -> tuple[Stage, ...]:
        return tuple(s for s in self.filters if s.spec.stage == "post")

    @property
    def stages(self) -> tuple[Stage, ...]:
        """Every stage in the order it runs: pre filters, the method, post filters."""
        return (*self.pre, self.method, *self.post)

    def first(self, name: str) -> Stage | None:
        """The first filter called ``name``, or None."""
        return next((s for s in self.filters if s.name == name), None)

    def pre_before(self, name: str) -> tuple[Stage, ...]:
        """The pre filters that run before the first filter called ``name`` (all of them if absent)."""
        out = []
        for s in self.pre:
            if s.name == name:
                break
            out.append(s)
        return tuple(out)

    def describe(self) -> str:
        """``pact -> dare -> ties -> csp``: the stages in the order they run."""
        return " -> ".join(s.name for s in self.stages)


def validate_params(spec: Spec, params: Mapping, where: str) -> BaseModel:
    """``spec.params`` validated from ``params``; a one-line error naming ``where`` otherwise."""
    if not isinstance(params, Mapping):
        raise PactMergeError(f"config key '{where}' ({spec.name}): expected a mapping of options, got {params!r}")
    try:
        return spec.params.model_validate(dict(params))
    except ValidationError as e:
        loc, msg = describe_validation_error(e)
        key = f"{where}.{loc}" if loc else where
        raise PactMergeError(f"config key '{key}' ({spec.name}): {msg}") from None


def resolve_model_params(
    method: Stage, filters: Sequence[Stage], weights: Sequence[float], parameters: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, Any], ...]:
    """Validate every model's per-model options against the stages that honour them.

    Args:
        method: the method's stage.
        filters: the filters' stages.
        weights: ``models[i].weight`` for each model.
        parameters: ``models[i].parameters`` for each model.

    Returns:
        One dict per model: the validated values of the keys that model gave (under the names it
        used, e.g. ``lambda``), which a method reads as ``ctx.model_params[i]``.

    Raises:
        PactMergeError: a key no stage honours, a value a stage rejects, or a weight other than 1
            for a method without per-model weights; the message names ``models[i]...``.
    """
    stages = [method, *filters]
    models_of = [(s, s.spec.model_params_for(s.params)) for s in stages]
    honoured = [(s, m) for s, m in models_of if m is not None]
    known = {name for _, m in honoured for name in _option_names(m)}
    out = []
    for i, (weight, given) in enumerate(zip(weights, parameters)):
        if weight != 1.0 and not method.spec.uses_weight:
            raise PactMergeError(
                f"config key 'models[{i}].weight' ({method.name}): this method has no per-model weight;"
                " remove the weight (or set it to 1), or choose a method that has one"
            )
        for key in given:
            if key not in known:
                here = f"it takes {', '.join(sorted(known))}" if known else "it takes none"
                raise PactMergeError(
                    f"config key 'models[{i}].parameters.{key}': not a per-model option of"
                    f" {' + '.join(s.name for s in stages)} ({here}); remove it or correct its name"
                )
        values: dict[str, Any] = {}
        for stage, model in honoured:
            mine = {k: v for k, v in given.items() if k in _option_names(model)}
            if not mine:
                continue
            try:
                checked = model.model_validate(mine)
            except ValidationError as e:
                err = e.errors()[0]
                loc = ".".join(str(x) for x in err["loc"])
                raise PactMergeError(
                    f"config key 'models[{i}].parameters.{loc}' ({stage.name}): {err['msg']}"
                ) from None
            for k, v in checked.model_dump(by_alias=True, exclude_unset=True).items():
                values.setdefault(k, v)
        out.append(values)
    return tuple(out)


def _option_names(model: type[BaseModel]) -> set[str]:
    """The keys a per-model options model accepts (aliases, e.g. ``lambda``, where given)."""
    return {f.alias or name for name, f in model.model_fields.items()}


def resolve_pipeline(
    method: str,
    parameters: Mapping[str, Any],
    filters: Sequence[str | Mapping[str, Any]] | None,
    pact: Mapping[str, Any] | None,
    models: Sequence[tuple[float, Mapping[str, Any]]] = (),
) -> Pipeline:
    """Look up and validate a config's method and filters (and the models' per-model options).

    ``filters`` lists filter names or ``{name: {options}}`` in order; ``None`` means ``[pact]`` when
    a ``pact`` block is given, else no filter. A bare ``pact`` entry takes its options from ``pact``.
    ``models`` gives each model's ``(weight, parameters)``, checked by :func:`resolve_model_params`.
    """
    method_spec = get_method(method)
    method_stage = Stage(method_spec, validate_params(method_spec, parameters, "parameters"), "parameters")
    entries: list[tuple[str, Mapping[str, Any], str]] = []
    if filters is None:
        if pact is not None:
            entries.append(("pact", pact, "pact"))
    else:
        for i, item in enumerate(filters):
            if isinstance(item, str):
                if item == "pact" and pact is not None:
                    entries.append((item, pact, "pact"))
                else:
                    entries.append((item, {}, f"filters[{i}]"))
            elif isinstance(item, Mapping) and len(item) == 1:
                ((name, params),) = item.items()
                entries.append((str(name), params or {}, f"filters[{i}].{name}"))
            else:
                raise PactMergeError("config key 'filters': each entry is a filter name or {name: {options}}")
        if pact is not None and not any(where == "pact" for _, _, where in entries):
            raise PactMergeError(
                "config key 'pact': given, but 'filters' does not list a bare 'pact' to use it"
                " (add 'pact' to filters, or remove the pact block)"
            )
    stages = []
    for name, params, where in entries:
        spec = get_filter(name)
        stages.append(Stage(spec, validate_params(spec, params, where), where))
    weights = [float(w) for w, _ in models]
    per_model = resolve_model_params(method_stage, stages, weights, [dict(p) for _, p in models])
    return Pipeline(method_stage, tuple(stages), per_model)
