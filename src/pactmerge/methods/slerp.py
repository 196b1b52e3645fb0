"""SLERP: spherical linear interpolation of exactly two models, per tensor (Shoemake 1985,
"Animating rotation with quaternion curves"; the merge method of mergekit and fusion_bench).

For one parameter, with the two models' tensors flattened to vectors ``a`` and ``b``::

    cos(Omega) = <a, b> / (||a|| ||b||)                       (norms below 1e-8 count as 1)
    slerp(t)   = sin((1 - t) Omega) / sin(Omega) * a + sin(t Omega) / sin(Omega) * b
    slerp(t)   = (1 - t) a + t b        where |cos(Omega)| > dot_threshold (nearly collinear)

``space: weights`` (default, mergekit's and fusion_bench's): ``a = theta_0 + Delta_1``, ``b =
theta_0 + Delta_2`` -- the two fine-tuned weights -- and the merged task vector is
``slerp(t) - theta_0``; ``space: task_vectors``: ``a = Delta_1``, ``b = Delta_2`` and the merged
task vector is ``slerp(t)``. ``t = 0`` gives the first model, ``t = 1`` the second; for ``||a|| =
||b||`` every ``slerp(t)`` has that norm (it stays on the arc). With ``alpha = 1`` (the engine's
scale; SLERP has no weights, per-model weights other than 1 are refused).

``t`` per tensor, as mergekit writes it: a number; a list of numbers (a gradient over the layers:
layer ``i`` of ``L`` sits at ``x = i / (L - 1)``, ``x = 1`` when ``L = 1``, and parameters outside
the numbered layers at ``x = 0``; ``t`` is the linear interpolation of the list at ``x (len - 1)``);
or a list of ``{filter: <substring of the parameter name>, value: <number or list>}`` rules, the
first matching one applying (a rule without ``filter``, or ``filter: "*"``, matches everything).
Every ``t`` must lie in [0, 1]. Exactly two models; any other count is refused before the merge
starts.

mergekit 0.1.5 ``slerp`` (``base_model`` = the first model) and fusion_bench 0.2.33
``SlerpMergeAlgorithm``: the same formula and threshold (0.9995); both work in float32 unless the
inputs are float64, here the dot product is accumulated in float64.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from pactmerge.errors import PactMergeError
from pactmerge.registry import ParamContext, ParamInfo, Params, register_method


class TRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filter: str | None = Field(None, description="substring of the parameter name; None or '*' matches all")
    value: float | list[float]


class SlerpParams(Params):
    t: float | list[float] | list[TRule] = Field(0.5, description="interpolation factor (see module doc)")
    space: Literal["weights", "task_vectors"] = "weights"
    dot_threshold: float = Field(0.9995, gt=0.0, le=1.0, description="above this |cos| interpolate linearly")

    @field_validator("t")
    @classmethod
    def _in_unit_interval(cls, v: float | list) -> float | list:
        values: list[float] = []
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, TRule):
                values += item.value if isinstance(item.value, list) else [item.value]
            else:
                values.append(item)
        if isinstance(v, list) and not v:
            raise ValueError("empty list; give a number, a gradient list or filter rules")
        bad = [x for x in values if not 0.0 <= x <= 1.0]
        if bad:
            raise ValueError(f"t = {bad[0]:g} is outside [0, 1]")
        return v


def gradient_position(info: ParamInfo) -> float:
    """mergekit's position of a parameter along a gradient list (see module doc)."""
    if info.layer_rank is None or info.num_layers == 0:
        return 0.0
    return 1.0 if info.num_layers == 1 else info.layer_rank / (info.num_layers - 1)


def _interpolate(values: list[float], x: float) -> float:
    scaled = x * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def resolve_t(p: SlerpParams, info: ParamInfo) -> float:
    """The ``t`` of parameter ``info`` (raises :class:`PactMergeError` if no rule matches)."""
    setting = p.t
    if isinstance(setting, list) and setting and isinstance(setting[0], TRule):
        for rule in setting:
            assert isinstance(rule, TRule)
            if rule.filter in (None, "*") or rule.filter in info.name:
                setting = rule.value
                break
        else:
            raise PactMergeError(
                f"method slerp: parameter {info.name!r}: no rule of parameters.t matches it"
                " (add a last rule without `filter` as the default)"
            )
    if isinstance(setting, list):
        return _interpolate([float(x) for x in setting], gradient_position(info))  # type: ignore[arg-type]
    return float(setting)


def _check(p: SlerpParams, info: ParamInfo) -> None:
    if info.num_models and info.num_models != 2:
        raise PactMergeError(f"method slerp: interpolates exactly 2 models, the config has {info.num_models}")
    resolve_t(p, info)


def slerp_vectors(t: float, a: Tensor, b: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """SLERP of two same-shape tensors as flattened vectors (see module doc); result in ``a``'s dtype."""
    a64, b64 = a.to(torch.float64).reshape(-1), b.to(torch.float64).reshape(-1)
    na, nb = float(a64.norm()), float(b64.norm())
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = max(-1.0, min(1.0, float((a64 / na) @ (b64 / nb))))
    if abs(dot) > dot_threshold:
        ca, cb = 1.0 - t, t
    else:
        omega = torch.arccos(torch.tensor(dot, dtype=torch.float64))
        sin = torch.sin(omega)
        ca, cb = float(torch.sin((1 - t) * omega) / sin), float(torch.sin(t * omega) / sin)
    return (ca * a64 + cb * b64).reshape(a.shape).to(a.dtype)


@register_method("slerp", params=SlerpParams, check=_check)
def slerp(base: Tensor, deltas: list[Tensor], ctx: ParamContext, p: SlerpParams) -> Tensor:
    """SLERP of exactly two models (their weights, or their task vectors), with a per-tensor t."""
    if len(deltas) != 2:
        raise PactMergeError(f"method slerp: interpolates exactly 2 models, the config has {len(deltas)}")
    if any(w != 1.0 for w in ctx.weights):
        raise PactMergeError("method slerp: per-model weights do not apply (set the interpolation with parameters.t)")
    t = resolve_t(p, ctx.info)
    if p.space == "task_vectors":
        return slerp_vectors(t, deltas[0], deltas[1], p.dot_threshold)
    return slerp_vectors(t, base + deltas[0], base + deltas[1], p.dot_threshold) - base
