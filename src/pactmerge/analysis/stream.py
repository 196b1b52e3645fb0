"""Stream the diagnostics over a merge config: one 2-D parameter at a time, read exactly as the merge reads it.

Same config file, same sources, same plan (exclusions, layer indices, depth fractions), same
compute dtype and device, and the same per-parameter seeds, so :func:`pact_subspaces` returns the
very subspaces the merge's ``pact`` filter builds (randomized SVD included). Pre-filters that the
config runs *before* ``pact`` (e.g. ``dare``) are applied first, as in the merge; later filters
and the method are irrelevant to what PACT sees and are not run. Only the ``T + 1`` tensors of
the current parameter are in memory.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pactmerge.analysis.metrics import ParamMetrics, param_metrics
from pactmerge.config import MergeConfig
from pactmerge.engine import MergeInputs, apply_filters, read_deltas, release_parameter
from pactmerge.errors import PactMergeError
from pactmerge.filters.pact import PactParams, PactSubspaces, pact_subspaces
from pactmerge.filters.pact_scope import pact_narrow_reason
from pactmerge.pipeline import Stage
from pactmerge.plan import make_context
from pactmerge.registry import ParamInfo


@dataclass
class AnalysisSetup:
    """What the analysis takes from the config."""

    pact: PactParams
    pact_configured: bool  # False: the config runs no pact filter; its default parameters are used
    pre_filters: list[Stage] = field(default_factory=list)  # filters that run before pact


def analysis_setup(cfg: MergeConfig) -> AnalysisSetup:
    """The pact parameters of ``cfg`` (its first ``pact`` filter, else :class:`PactParams` defaults)
    and the pre-filters configured before it.

    Raises:
        PactMergeError: K = 0 or k = 0 (no core or no active subspace: nothing to measure), or a
            filter before pact needs a model-wide first pass (not supported here).
    """
    pact = cfg.pipeline.first("pact")
    if pact is not None:
        setup = AnalysisSetup(pact.params, True, list(cfg.pipeline.pre_before("pact")))
    else:
        setup = AnalysisSetup(PactParams(), False, [])
    if (setup.pact.K == 0 and setup.pact.K_ratio is None) or (setup.pact.k == 0 and setup.pact.k_ratio is None):
        raise PactMergeError(
            f"analyze: pact.K={setup.pact.K}, pact.k={setup.pact.k}: both must be >= 1 for the LBW diagnostics"
        )
    for stage in setup.pre_filters:
        if stage.spec.prepare is not None:
            raise PactMergeError(
                f"analyze: filter {stage.name!r} before pact needs a first pass; not supported by analyze"
            )
    return setup


def select(inputs: MergeInputs, setup: AnalysisSetup, layers: str | None) -> tuple[list[ParamInfo], list[dict]]:
    """The 2-D parameters to analyze, in plan order, and the skipped ones with a reason.

    ``layers`` is a regex searched in each parameter name. A matrix PACT cannot filter (the merge's
    rule, :func:`pactmerge.filters.pact_scope.pact_narrow_reason`: ``min(m, n) <= K`` or ``< k``) is
    skipped: the merge bypasses it (or, with ``pact.narrow: error``, refuses it).
    """
    try:
        pattern = re.compile(layers) if layers else None
    except re.error as e:
        raise PactMergeError(f"--layers {layers!r}: bad regex ({e})") from None
    p = setup.pact
    chosen, skipped = [], []
    for info in inputs.plan.params:
        if info.kind != "matrix" or (pattern is not None and not pattern.search(info.name)):
            continue
        reason = pact_narrow_reason(p, info.shape)
        if reason is not None:
            skipped.append({"parameter": info.name, "reason": reason})
            continue
        chosen.append(info)
    if not chosen:
        which = f" matching --layers {layers!r}" if layers else ""
        raise PactMergeError(f"analyze: no 2-D parameter{which} to analyze (of {len(inputs.plan.params)} in the plan)")
    return chosen, skipped


def iter_subspaces(
    inputs: MergeInputs,
    setup: AnalysisSetup,
    params: list[ParamInfo],
    device: torch.device,
    progress: bool = False,
    desc: str = "analyzing",
) -> Iterator[tuple[ParamInfo, Tensor, list[Tensor], PactSubspaces]]:
    """Yield ``(info, theta_0, deltas, subspaces)`` for each of ``params``: the task vectors after
    the config's pre-filters and :func:`pact_subspaces` exactly as the merge's pact filter builds
    them (same context, seeds, dtype). One parameter is held at a time."""
    cfg, p = inputs.cfg, setup.pact
    for info in tqdm(params, desc=desc, unit="param", disable=not progress, file=sys.stderr):
        ctx = make_context(cfg, info)
        base, deltas = read_deltas(inputs, info, device)
        deltas = apply_filters(setup.pre_filters, base, deltas, ctx)
        yield info, base, deltas, pact_subspaces(base, deltas, p, ctx)
        del base, deltas
        release_parameter(inputs, info.name)


def iter_param_metrics(
    inputs: MergeInputs,
    setup: AnalysisSetup,
    params: list[ParamInfo],
    device: torch.device,
    progress: bool = False,
) -> Iterator[tuple[ParamInfo, ParamMetrics]]:
    """Yield ``(info, metrics)`` for each of ``params``, reading and releasing one parameter at a time."""
    T = len(inputs.models)
    for info, _, deltas, sub in iter_subspaces(inputs, setup, params, device, progress):
        # Mirrors the guard of the pact filter: where it returns the task vectors untouched.
        applied = info.in_depth(setup.pact.depth) and T >= 2
        yield info, param_metrics(deltas, sub, pact_applied=applied)
