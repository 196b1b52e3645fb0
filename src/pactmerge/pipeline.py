"""A merge config resolved once into what runs: the pre filters, the method and the post filters.

Every consumer -- the engine, ``--dry-run``, ``analyze``, the model card, the backends -- reads the
same :class:`Pipeline`, built by :func:`resolve_pipeline` when the config is validated, so a method
or filter name, its parameters and its stage are looked up and checked exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from pactmerge.errors import PactMergeError
from pactmerge.registry import Spec, get_filter, get_method


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


@dataclass(frozen=True)
class Pipeline:
    """What runs on each parameter: ``pre`` filters in order, the ``method``, ``post`` filters in order.

    ``filters`` keeps the configured order of every filter (pre and post together).
    """

    method: Stage
    filters: tuple[Stage, ...] = ()

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
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        key = f"{where}.{loc}" if loc else where
        raise PactMergeError(f"config key '{key}' ({spec.name}): {msg}") from None


def resolve_pipeline(
    method: str,
    parameters: Mapping[str, Any],
    filters: Sequence[str | Mapping[str, Any]] | None,
    pact: Mapping[str, Any] | None,
) -> Pipeline:
    """Look up and validate a config's method and filters.

    ``filters`` lists filter names or ``{name: {options}}`` in order; ``None`` means ``[pact]`` when
    a ``pact`` block is given, else no filter. A bare ``pact`` entry takes its options from ``pact``.
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
    return Pipeline(method_stage, tuple(stages))
