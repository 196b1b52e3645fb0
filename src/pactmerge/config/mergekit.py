"""mergekit merge configs, read as they are and mapped onto pactmerge's schema.

Detection rule (:func:`is_mergekit_config`): a config mapping with a top-level ``merge_method``
key is mergekit's (pactmerge's own key is ``method``; a config with both is refused). The mapping
follows mergekit 0.1.5's semantics; the table, with what is refused and why, is docs/mergekit.md.

The generalized task-arithmetic family (``task_arithmetic``, ``ties``, ``dare_*``,
``breadcrumbs*``, ``della*``) merges ``base + lambda * sum_t w_t S_t(Delta_t) [/ divisor]`` where
S_t is the method's sparsification with the model's ``density``, the sign consensus (``*ties``,
``della``) keeps the entries agreeing with the elected sign, and ``normalize`` divides by the
summed weights (of the agreeing models, under consensus). Per model it reads ``weight``
(required: mergekit has no default), ``density`` (default 1), ``gamma`` / ``epsilon``; shared, from
the top-level ``parameters`` only: ``normalize``, ``rescale``, ``lambda``, ``int8_mask``. A
per-model value falls back to the top-level ``parameters``, then to mergekit's default. The
models equal to ``base_model`` are the base: their task vector is zero and mergekit leaves them
out of every per-model parameter, so they are dropped from ``models``.

Mapping rules that hold for every method:

* ``lambda`` is our ``alpha``. Without sign consensus, ``normalize: true`` divides by the constant
  ``sum_t w_t`` (left alone when ``|sum| < 1e-8``, as mergekit), so it becomes ``alpha = lambda /
  sum_t w_t``; under consensus the divisor differs per entry and maps to TIES's ``aggregate: mean``.
* A per-model option (``density``, ``gamma``, ``epsilon``) equal for every model becomes the
  method's shared option; values that differ are passed per model, and a target method that has no
  such per-model option refuses them (naming ``models[i].parameters.key``).
* Lists (gradients over layers) and ``filter:``/``value:`` conditions (except slerp's ``t``),
  ``slices``, ``modules``, ``passthrough`` and the methods without an equivalent are refused with
  the key that names them;
  so is any option whose mergekit meaning we do not reproduce (e.g. ``rescale: true`` for
  ``ties``), rather than approximated.

``dtype`` sets the output dtype when ``out_dtype`` is absent (as in mergekit); pactmerge computes
in float32 (float64 for ``dtype: float64``), so a half-precision merge can differ from mergekit's
by the output's rounding. A few pactmerge keys may be added to a mergekit config: ``pact`` (runs
first, before a mapped ``dare``), ``exclude``, ``seed``, ``max_shard_size``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pactmerge.errors import PactMergeError

MERGEKIT_KEYS = frozenset(
    {
        "merge_method",
        "base_model",
        "models",
        "parameters",
        "dtype",
        "out_dtype",
        "tokenizer_source",
        "tokenizer",
        "chat_template",
        "slices",
        "modules",
    }
)
# pactmerge keys a mergekit config may add (anything else is refused).
PACTMERGE_EXTRAS = frozenset({"pact", "exclude", "seed", "max_shard_size"})
_DTYPES = {"float16", "bfloat16", "float32", "float64"}


@dataclass(frozen=True)
class _TaskArithmeticFamily:
    """One of mergekit's generalized task-arithmetic methods (its registry's flags)."""

    sparsify: str | None  # None, "magnitude", "random", "magnitude_outliers", "della"
    consensus: bool  # sign election ("sum" consensus)
    normalize: bool  # default of `normalize`
    rescale: bool  # default of `rescale`


_GTA = {
    "task_arithmetic": _TaskArithmeticFamily(None, False, False, False),
    "ties": _TaskArithmeticFamily("magnitude", True, True, False),
    "dare_ties": _TaskArithmeticFamily("random", True, False, True),
    "dare_linear": _TaskArithmeticFamily("random", False, False, True),
    "breadcrumbs": _TaskArithmeticFamily("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": _TaskArithmeticFamily("magnitude_outliers", True, False, False),
    "della": _TaskArithmeticFamily("della", True, True, True),
    "della_linear": _TaskArithmeticFamily("della", False, False, True),
}
_OTHERS = ("linear", "slerp", "model_stock")
# mergekit 0.1.5 methods with no pactmerge equivalent.
_NO_EQUIVALENT = {
    "passthrough": "it copies layers (e.g. for frankenmerges), it does not merge task vectors",
    "nuslerp": "pactmerge has no (normalized) SLERP of task vectors",
    "multislerp": "pactmerge has no multi-model SLERP",
    "karcher": "pactmerge has no Karcher mean",
    "arcee_fusion": "pactmerge has no Arcee Fusion",
    "nearswap": "pactmerge has no NearSwap",
    "ram": "pactmerge has no RAM",
    "ramplus_tl": "pactmerge has no RAM+",
    "sce": "pactmerge has no SCE",
}


def is_mergekit_config(data: Mapping) -> bool:
    """Whether a config mapping uses mergekit's vocabulary: it has a top-level ``merge_method``."""
    return "merge_method" in data


def supported_methods() -> list[str]:
    """The mergekit ``merge_method`` values this module maps."""
    return sorted([*_GTA, *_OTHERS])


def _fail(key: str, what: str) -> PactMergeError:
    return PactMergeError(f"config key '{key}' (mergekit): {what}")


def _scalar(value: Any, key: str, kind: type) -> Any:
    """``value`` as one number (``kind`` float) or bool; gradients and conditions are refused."""
    if isinstance(value, list):
        raise _fail(key, "a list (a gradient over layers) is not supported; give one value for the whole model")
    if isinstance(value, Mapping):
        raise _fail(key, "filter/value conditions are not supported; give one value for the whole model")
    if kind is bool:
        if not isinstance(value, bool):
            raise _fail(key, f"expected true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(key, f"expected a number, got {value!r}")
    return float(value)


def _reference(ref: Any, key: str) -> str:
    """mergekit's model reference (``path``, ``path@revision``, ``model+lora``, or the mapping form)
    as one string; LoRA references are returned as ``model+lora`` for the caller to check."""
    if isinstance(ref, str):
        if ref.count("+") > 1 or ref.count("@") > 1:
            raise _fail(key, f"cannot parse the model reference {ref!r}")
        return ref
    if isinstance(ref, os.PathLike):
        return os.fspath(ref)
    if isinstance(ref, Mapping):
        extra = set(ref) - {"model", "lora"}
        if extra:
            raise _fail(f"{key}.{sorted(extra)[0]}", "not supported; give the model's path or Hub id")

        def path(p: Any, where: str) -> str:
            if isinstance(p, str):
                return p
            if isinstance(p, Mapping) and isinstance(p.get("path"), str) and set(p) <= {"path", "revision"}:
                return p["path"] + (f"@{p['revision']}" if p.get("revision") else "")
            raise _fail(where, f"expected a path or {{path, revision}}, got {p!r}")

        out = path(ref.get("model"), f"{key}.model")
        if ref.get("lora") is not None:
            out += "+" + path(ref["lora"], f"{key}.lora")
        return out
    raise _fail(key, f"expected a model path or Hub id, got {ref!r}")


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b)


@dataclass
class _Model:
    index: int  # position in the mergekit config's `models`
    ref: str
    params: dict[str, Any]


def _models(data: Mapping) -> list[_Model]:
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise _fail("models", "a non-empty list of models is required")
    out = []
    for i, entry in enumerate(models):
        key = f"models[{i}]"
        if not isinstance(entry, Mapping):
            entry = {"model": entry}
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise _fail(f"{key}.{sorted(extra)[0]}", "unknown key (a model entry has model and parameters)")
        if "model" not in entry:
            raise _fail(f"{key}.model", "missing")
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise _fail(f"{key}.parameters", "expected a mapping")
        out.append(_Model(i, _reference(entry["model"], f"{key}.model"), dict(params)))
    return out


def _lora_over_base(m: _Model, base: str | None) -> str:
    """``model+lora`` is the LoRA adapter merged into ``model``: ours only over the base model."""
    if "+" not in m.ref:
        return m.ref
    model, lora = m.ref.split("+")
    if base is not None and _same_model(model, base):
        return lora  # a PEFT adapter folder over base_model (docs/lora.md)
    raise _fail(
        f"models[{m.index}].model",
        f"{m.ref!r}: a LoRA merged into a model other than base_model is not supported;"
        " merge it into that model first, or apply the adapter to base_model",
    )


class _Params:
    """Resolves one mergekit method's parameters: per model, then top-level, then the default."""

    def __init__(self, method: str, top: Mapping[str, Any], shared: dict[str, Any], per_model: dict[str, Any]):
        self.method = method
        self.top = dict(top)
        self.shared = shared  # name -> default (bool or float)
        self.per_model = per_model  # name -> default (None: required)
        known = set(shared) | set(per_model)
        for k in self.top:
            if k not in known:
                raise _fail(f"parameters.{k}", f"not a parameter of mergekit's {method} (it has {_list(known)})")

    def check_model(self, m: _Model) -> None:
        for k in m.params:
            if k in self.shared:
                raise _fail(
                    f"models[{m.index}].parameters.{k}",
                    f"{k} is shared by all models in mergekit's {self.method}; set it in the top-level parameters",
                )
            if k not in self.per_model:
                raise _fail(
                    f"models[{m.index}].parameters.{k}",
                    f"not a per-model parameter of mergekit's {self.method} (it has {_list(self.per_model)})",
                )

    def get_shared(self, name: str) -> Any:
        default = self.shared[name]
        if name not in self.top:
            return default
        return _scalar(self.top[name], f"parameters.{name}", bool if isinstance(default, bool) else float)

    def given(self, name: str) -> bool:
        return name in self.top

    def for_model(self, m: _Model, name: str) -> float:
        if name in m.params:
            return _scalar(m.params[name], f"models[{m.index}].parameters.{name}", float)
        if name in self.top:
            return _scalar(self.top[name], f"parameters.{name}", float)
        default = self.per_model[name]
        if default is None:
            raise _fail(
                f"models[{m.index}].parameters.{name}",
                f"mergekit's {self.method} needs a {name} for every model (it has no default); add {name}: 1.0",
            )
        return default


def _list(names) -> str:
    return ", ".join(sorted(names)) or "none"


def _uniform_or_per_model(
    values: list[float], name: str, shared: dict[str, Any], entries: list[dict[str, Any]], ours: str | None = None
) -> None:
    """Equal values become the shared option ``ours`` (default ``name``); else each model's own."""
    ours = ours or name
    if len(set(values)) == 1:
        shared[ours] = values[0]
    else:
        for e, v in zip(entries, values):
            e.setdefault("parameters", {})[ours] = v


def _task_arithmetic_family(name: str, data: Mapping, models: list[_Model], base: str | None) -> dict[str, Any]:
    fam = _GTA[name]
    shared_defaults: dict[str, Any] = {
        "normalize": fam.normalize,
        "rescale": fam.rescale,
        "lambda": 1.0,
        "int8_mask": False,
    }
    per_model_defaults: dict[str, Any] = {"weight": None, "density": 1.0}
    if fam.sparsify == "magnitude_outliers":
        per_model_defaults["gamma"] = 0.01
    if fam.sparsify == "della":
        per_model_defaults["epsilon"] = 0.15
    params = _Params(name, data.get("parameters") or {}, shared_defaults, per_model_defaults)
    if base is None:
        raise _fail("base_model", f"mergekit's {name} needs a base_model (its task vectors are relative to it)")
    inputs = []
    for m in models:
        if _same_model(m.ref, base):
            if m.params:
                raise _fail(
                    f"models[{m.index}].parameters",
                    f"this entry is the base_model, whose parameters mergekit's {name} ignores; remove them",
                )
            continue
        params.check_model(m)
        inputs.append(m)
    if not inputs:
        raise _fail("models", f"mergekit's {name} needs at least one model besides the base_model")

    normalize = params.get_shared("normalize")
    rescale = params.get_shared("rescale")
    lam = params.get_shared("lambda")
    params.get_shared("int8_mask")  # checked; only the mask's storage type in mergekit, no numerical effect
    weights = [params.for_model(m, "weight") for m in inputs]
    densities = [params.for_model(m, "density") for m in inputs]
    entries: list[dict[str, Any]] = [{"model": _lora_over_base(m, base), "weight": w} for m, w in zip(inputs, weights)]
    for m, d in zip(inputs, densities):
        if not 0.0 < d <= 1.0:
            where = f"models[{m.index}].parameters.density" if "density" in m.params else "parameters.density"
            raise _fail(where, f"must be in (0, 1], got {d:g} (to leave a model out, give it weight: 0)")
    if fam.consensus and any(w < 0 for w in weights):
        i = next(m.index for m, w in zip(inputs, weights) if w < 0)
        raise _fail(
            f"models[{i}].parameters.weight",
            f"a negative weight under mergekit's {name} flips the sign its consensus sees, which pactmerge's sign"
            " election does not reproduce; use a weight >= 0",
        )

    out: dict[str, Any] = {"base_model": base}
    shared: dict[str, Any] = {}
    filters: list[Any] = []
    alpha = lam
    if not fam.consensus and normalize:
        total = sum(weights)
        alpha = lam / total if abs(total) >= 1e-8 else lam
    if fam.sparsify is None:
        for m, d in zip(inputs, densities):
            if d != 1.0:
                where = f"models[{m.index}].parameters.density" if "density" in m.params else "parameters.density"
                raise _fail(where, f"has no effect in mergekit's {name} (it does not sparsify); remove it")
        if rescale:
            raise _fail("parameters.rescale", f"has no effect in mergekit's {name} (it does not sparsify); remove it")
        method = "task_arithmetic"
    elif fam.sparsify == "magnitude":  # ties
        if rescale:
            raise _fail(
                "parameters.rescale", "rescaling after the magnitude trim has no pactmerge equivalent; remove it"
            )
        method = "ties"
        shared.update(scope="tensor", trim_count="floor_at_least_1", aggregate="mean" if normalize else "sum")
        _uniform_or_per_model(densities, "density", shared, entries)
    elif fam.sparsify == "random":  # dare_*
        dare: dict[str, Any] = {"rescale": "l1" if rescale else "none"}
        _uniform_or_per_model([1.0 - d for d in densities], "density", dare, entries, ours="p")
        filters.append({"dare": dare})
        if fam.consensus:
            method = "ties"
            shared.update(density=1.0, scope="tensor", trim_count="floor_at_least_1")
            shared["aggregate"] = "mean" if normalize else "sum"
        else:
            method = "task_arithmetic"
    elif fam.sparsify == "magnitude_outliers":  # breadcrumbs*
        if rescale:
            raise _fail("parameters.rescale", f"rescaling in mergekit's {name} has no pactmerge equivalent; remove it")
        if fam.consensus and normalize:
            raise _fail("parameters.normalize", f"normalize: true for mergekit's {name} has no pactmerge equivalent")
        method = "breadcrumbs"
        _uniform_or_per_model(densities, "density", shared, entries)
        gammas = [params.for_model(m, "gamma") for m in inputs]
        _uniform_or_per_model(gammas, "gamma", shared, entries)
        shared["elect"] = fam.consensus
    else:  # della*
        method = "della"
        _uniform_or_per_model(densities, "density", shared, entries)
        # mergekit's epsilon is the half-width of the keep probabilities (density -/+ epsilon), ours the
        # full width; with density 1 mergekit does not prune at all, whatever epsilon says.
        epsilons = [2 * params.for_model(m, "epsilon") if d < 1.0 else 0.0 for m, d in zip(inputs, densities)]
        _uniform_or_per_model(epsilons, "epsilon", shared, entries)
        shared.update(rescale="l1" if rescale else "none", elect=fam.consensus)
        shared["aggregate"] = "mean" if (fam.consensus and normalize) else "sum"
    out.update(method=method, alpha=alpha, models=entries)
    if shared:
        out["parameters"] = shared
    if filters:
        out["filters"] = filters
    return out


def _linear(data: Mapping, models: list[_Model], base: str | None) -> dict[str, Any]:
    params = _Params("linear", data.get("parameters") or {}, {"normalize": True}, {"weight": None})
    for m in models:
        params.check_model(m)
    inputs = list(models)
    if base is not None and not any(_same_model(m.ref, base) for m in models):
        # mergekit adds a base_model missing from `models` as one more input of the weighted mean.
        if not params.given("weight"):
            raise _fail(
                "base_model",
                "mergekit's linear averages the base_model in too (it adds it as an input), so it needs a weight:"
                " list it in models with a weight, give a top-level parameters.weight, or remove base_model",
            )
        inputs.append(_Model(-1, base, {}))
    normalize = params.get_shared("normalize")
    weights = [params.for_model(m, "weight") for m in inputs]
    total = sum(weights)
    if not normalize and abs(total - 1.0) > 1e-9:
        raise _fail(
            "parameters.normalize",
            f"false with weights summing to {total:g}: sum_t w_t theta_t is not a merge of task vectors;"
            " use normalize: true, or weights that sum to 1",
        )
    if normalize and abs(total) < 1e-12:
        raise _fail("models", "the weights sum to 0, so normalize has nothing to divide by; change a weight")
    # The weighted mean does not depend on the reference point: base_model (else the first model)
    # is only where the output's config and tokenizer come from, as in mergekit.
    ref_base = base if base is not None else _lora_over_base(models[0], None)
    entries = [{"model": _lora_over_base(m, base), "weight": w} for m, w in zip(inputs, weights)]
    return {"base_model": ref_base, "method": "weight_average", "models": entries}


def _slerp(data: Mapping, models: list[_Model], base: str | None) -> dict[str, Any]:
    params = _Params("slerp", data.get("parameters") or {}, {"t": None}, {})
    if base is None:
        raise _fail("base_model", "mergekit's slerp needs a base_model (it interpolates from it)")
    others = [m for m in models if not _same_model(m.ref, base)]
    for m in models:
        params.check_model(m)
    if len(others) != 1:
        raise _fail("models", f"mergekit's slerp merges the base_model with exactly one other model, got {len(others)}")
    if "t" not in params.top:
        raise _fail("parameters.t", "mergekit's slerp needs t (0: the base model, 1: the other model)")
    t = params.top["t"]
    # Gradients (lists) and filter/value conditions are pactmerge's slerp syntax too (validated there).
    t = [t] if isinstance(t, Mapping) else t if isinstance(t, list) else _scalar(t, "parameters.t", float)
    # pactmerge's slerp interpolates its two models; the base_model is the first (its task vector is zero).
    return {
        "base_model": base,
        "method": "slerp",
        "parameters": {"t": t},
        "models": [base, _lora_over_base(others[0], base)],
    }


def _model_stock(data: Mapping, models: list[_Model], base: str | None) -> dict[str, Any]:
    params = _Params("model_stock", data.get("parameters") or {}, {"filter_wise": False}, {})
    if base is None:
        raise _fail("base_model", "mergekit's model_stock needs a base_model")
    others = [m for m in models if not _same_model(m.ref, base)]
    for m in models:
        params.check_model(m)
    if len(others) < 2:
        raise _fail("models", f"mergekit's model_stock needs at least two models besides the base, got {len(others)}")
    out: dict[str, Any] = {
        "base_model": base,
        "method": "model_stock",
        "models": [_lora_over_base(m, base) for m in others],
    }
    if params.given("filter_wise"):
        out["parameters"] = {"filter_wise": params.get_shared("filter_wise")}
    return out


def _tokenizer(data: Mapping, schema_fields: set[str]) -> dict[str, Any]:
    """``tokenizer_source`` / ``tokenizer:``: the base's vocabulary is pactmerge's own behaviour;
    anything else goes to the schema's ``tokenizer_source`` where it has one."""
    source = data.get("tokenizer_source")
    key = "tokenizer_source"
    tok = data.get("tokenizer")
    if tok is not None:
        if source is not None:
            raise _fail("tokenizer", "give tokenizer_source or tokenizer, not both (as mergekit)")
        if not isinstance(tok, Mapping):
            raise _fail("tokenizer", "expected a mapping with source")
        for k in tok:
            if k != "source":
                raise _fail(f"tokenizer.{k}", "not supported; remove it (only tokenizer.source is)")
        source, key = tok.get("source", "union"), "tokenizer.source"
    if source is None:
        return {}
    if "tokenizer_source" in schema_fields:
        return {"tokenizer_source": _reference(source, key) if source not in ("base", "union") else source}
    if source == "base":
        return {}  # the base's tokenizer and vocabulary: what pactmerge does
    raise _fail(key, f"{source!r}: only 'base' is available in this version (the base model's tokenizer)")


def _chat_template(data: Mapping) -> dict[str, Any]:
    tpl = data.get("chat_template")
    if tpl is None:
        return {}
    if not isinstance(tpl, str) or "{" not in tpl:
        raise _fail(
            "chat_template",
            f"{tpl!r}: mergekit's built-in template names and 'auto' are not available; give the Jinja template text",
        )
    return {"chat_template": tpl}


def from_mergekit(data: Mapping) -> dict[str, Any]:
    """A pactmerge config mapping for the mergekit config ``data``.

    Raises:
        PactMergeError: one line naming the mergekit key that has no faithful equivalent.
    """
    from pactmerge.config.schema import MergeConfig
    from pactmerge.registry import available_methods

    if "method" in data:
        raise _fail("method", "a config with merge_method (mergekit's) cannot also have method (pactmerge's); keep one")
    for key in data:
        if key not in MERGEKIT_KEYS and key not in PACTMERGE_EXTRAS:
            hint = "; use parameters.lambda" if key == "alpha" else ""
            raise _fail(str(key), f"not a mergekit config key{hint}")
    for key in ("slices", "modules"):
        if data.get(key) is not None:
            raise _fail(key, f"{key} (layer ranges stacked from several models) are not supported; use models")
    name = data.get("merge_method")
    if not isinstance(name, str):
        raise _fail("merge_method", f"expected a method name, got {name!r}")
    if name in _NO_EQUIVALENT:
        raise _fail("merge_method", f"{name!r} is not supported: {_NO_EQUIVALENT[name]}")
    if name not in _GTA and name not in _OTHERS:
        raise _fail(
            "merge_method", f"{name!r} is not a mergekit method pactmerge maps (it maps {_list(supported_methods())})"
        )
    base = _reference(data["base_model"], "base_model") if data.get("base_model") is not None else None
    if base is not None and "+" in base:
        raise _fail("base_model", "a LoRA merged into the base_model is not supported; merge it first")
    models = _models(data)
    if name in _GTA:
        out = _task_arithmetic_family(name, data, models, base)
    elif name == "linear":
        out = _linear(data, models, base)
    elif name == "slerp":
        out = _slerp(data, models, base)
    else:
        out = _model_stock(data, models, base)
    if out["method"] not in available_methods():
        raise _fail(
            "merge_method",
            f"{name!r} maps to pactmerge's method {out['method']!r}, which is not available in this version",
        )

    dtype = data.get("dtype")
    out_dtype = data.get("out_dtype")
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if value is not None and (not isinstance(value, str) or value.removeprefix("torch.") not in _DTYPES):
            raise _fail(key, f"{value!r}: expected one of {_list(_DTYPES)}")
    if dtype is not None:
        out["dtype"] = "float64" if dtype.removeprefix("torch.") == "float64" else "float32"
    written = out_dtype if out_dtype is not None else dtype
    if written is not None:
        out["out_dtype"] = written.removeprefix("torch.")
    out.update(_tokenizer(data, set(MergeConfig.model_fields)))
    out.update(_chat_template(data))
    if "pact" in data:
        out["pact"] = data["pact"]
        if out.get("filters"):
            out["filters"] = ["pact", *out["filters"]]
    for key in ("exclude", "seed", "max_shard_size"):
        if key in data:
            out[key] = data[key]
    return out
