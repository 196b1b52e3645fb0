"""Choosing the scaling coefficient alpha on validation data.

The PACT paper's procedure (App. E.3): try alpha = 0.1, 0.2, ..., 3.0 in order and stop after
``patience`` = 3 values in a row that do not improve the best validation score. One change: when
the grid runs out before the patience does -- the best alpha sits at or near the top -- the search
goes on upward (in ``extend_step`` steps) until it stops improving. Filters such as PACT remove a
large share of each task vector, so the best alpha of a composition can lie well above 3; a search
capped at 3 would report the cap, not the method (docs/benchmark_results.md).
Likewise at the bottom: when the best alpha is the grid's first value, the search halves it
(0.05, 0.025, ...) down to ``min_alpha`` -- many summed task vectors (Task Arithmetic on 20 tasks,
the image suite) can want less than 0.1. A pick at either end of what was searched is flagged.

**Coarse to fine** (:attr:`AlphaSearch.coarse_step`, the demo's search): the same rule first runs on
a coarse grid (every ``coarse_step``, patience 2, extended upward the same way, never below its
first value) to find the peak's neighbourhood; the fine rule then runs from one coarse step below
the coarse pick. From there on the fine rule visits exactly the values the full search visits, so
on a validation curve that rises up to that point the pick is the full search's, with about half
the evaluations. Every score is computed once (a memo shared by both stages).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class AlphaChoice:
    alpha: float
    score: float
    trace: list[tuple[float, float]] = field(default_factory=list)  # (alpha, validation score), in order
    extended: bool = False  # went beyond the base grid
    edge: bool = False  # ran out of alpha values before `patience` non-improving ones: a boundary pick

    def label(self) -> str:
        flag = " (edge)" if self.edge else " (ext)" if self.extended else ""
        return f"{self.alpha:g}{flag}"


@dataclass(frozen=True)
class AlphaSearch:
    """The search rule's settings (the defaults are the bench's).

    ``start``, ``stop``, ``step``: the base grid; ``patience``: non-improving values in a row that
    end the search; ``extend``: go on past ``stop`` (in ``extend_step`` steps, up to ``max_alpha``)
    and below ``start`` (halving, down to ``min_alpha``) when the best value is at the grid's end;
    ``coarse_step``: run the coarse-to-fine form (module docstring), ``None`` for the plain rule.
    """

    start: float = 0.1
    stop: float = 3.0
    step: float = 0.1
    patience: int = 3
    extend: bool = True
    extend_step: float = 0.25
    max_alpha: float = 20.0
    min_alpha: float = 0.01
    coarse_step: float | None = None
    coarse_patience: int = 2

    def __post_init__(self) -> None:
        if not (0 < self.start <= self.stop and self.step > 0 and self.extend_step > 0 and self.patience >= 1):
            raise ValueError(f"alpha search: bad grid start={self.start}, stop={self.stop}, step={self.step}")
        if self.coarse_step is not None and self.coarse_step <= self.step:
            raise ValueError(f"alpha search: coarse_step {self.coarse_step} must exceed step {self.step}")


def _grid(s: AlphaSearch, begin: float | None = None) -> Iterator[tuple[float, bool]]:
    """``(alpha, beyond the base grid)`` in search order, from ``begin`` (default: the start)."""
    n = int(round((s.stop - s.start) / s.step))
    values = [(round(s.start + i * s.step, 6), False) for i in range(n + 1)]
    for a, beyond in values:
        if begin is None or a >= begin - 1e-9:
            yield a, beyond
    if s.extend:
        j = 1
        while s.stop + j * s.extend_step <= s.max_alpha + 1e-9:
            a = round(s.stop + j * s.extend_step, 6)
            if begin is None or a >= begin - 1e-9:
                yield a, True
            j += 1


def _patience_search(score: Callable[[float], float], s: AlphaSearch, begin: float | None = None) -> AlphaChoice:
    """The patience rule on the grid of ``s`` from ``begin``; halving below ``start`` as documented."""
    best_a: float | None = None
    best_s, bad, extended, edge = float("-inf"), 0, False, True
    trace: list[tuple[float, float]] = []
    for a, beyond in _grid(s, begin):
        v = score(a)
        trace.append((a, v))
        extended = extended or beyond
        if v > best_s + 1e-12:
            best_a, best_s, bad = a, v, 0
        else:
            bad += 1
            if bad >= s.patience:
                edge = False
                break
    if not trace:
        raise ValueError(f"alpha search: no grid value at or above {begin}")
    assert best_a is not None
    at_bottom = best_a == trace[0][0] and trace[0][0] <= s.start + 1e-9
    if edge or not s.extend or not at_bottom:
        return AlphaChoice(best_a, best_s, trace, extended, edge=edge or (not s.extend and at_bottom))
    # The best is the grid's first value: go down by halving until `patience` values fail to improve.
    a, bad = s.start / 2, 0
    while a >= s.min_alpha - 1e-12:
        v = score(a)
        trace.append((round(a, 6), v))
        extended = True
        if v > best_s + 1e-12:
            best_a, best_s, bad = round(a, 6), v, 0
        else:
            bad += 1
            if bad >= s.patience:
                return AlphaChoice(best_a, best_s, trace, extended, edge=False)
        a /= 2
    return AlphaChoice(best_a, best_s, trace, extended, edge=bad == 0)


def search_alpha(
    score: Callable[[float], float],
    start: float = 0.1,
    stop: float = 3.0,
    step: float = 0.1,
    patience: int = 3,
    extend: bool = True,
    extend_step: float = 0.25,
    max_alpha: float = 20.0,
    min_alpha: float = 0.01,
) -> AlphaChoice:
    """Maximize ``score(alpha)`` over the grid with early stopping (ties keep the smaller alpha;
    below the grid, a smaller alpha must score strictly better)."""
    rule = AlphaSearch(start, stop, step, patience, extend, extend_step, max_alpha, min_alpha)
    return _patience_search(score, rule)


def choose_alpha(score: Callable[[float], float], search: AlphaSearch) -> AlphaChoice:
    """The alpha that ``search`` picks for ``score``: the plain rule, or coarse to fine.

    Returns an :class:`AlphaChoice` whose ``trace`` lists every alpha scored, once each, in the
    order scored.
    """
    if search.coarse_step is None:
        return _patience_search(score, search)
    memo: dict[float, float] = {}
    trace: list[tuple[float, float]] = []

    def scored(a: float) -> float:
        key = round(a, 6)
        if key not in memo:
            memo[key] = score(a)
            trace.append((key, memo[key]))
        return memo[key]

    c = search.coarse_step
    coarse_rule = AlphaSearch(
        start=c,
        stop=max(c, round(search.stop / c) * c),
        step=c,
        patience=search.coarse_patience,
        extend=search.extend,
        extend_step=c,
        max_alpha=search.max_alpha,
        min_alpha=c,  # no halving: the fine rule goes below the coarse grid itself
    )
    coarse = _patience_search(scored, coarse_rule)
    begin = max(search.start, coarse.alpha - c)
    fine = _patience_search(scored, search, begin=begin if begin > search.start + 1e-9 else None)
    return AlphaChoice(fine.alpha, fine.score, trace, fine.extended, fine.edge)
