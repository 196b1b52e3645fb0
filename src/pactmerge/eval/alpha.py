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
"""

from __future__ import annotations

from collections.abc import Callable
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

    def grid():
        n = int(round((stop - start) / step))
        for i in range(n + 1):
            yield round(start + i * step, 6), False
        if extend:
            j = 1
            while stop + j * extend_step <= max_alpha + 1e-9:
                yield round(stop + j * extend_step, 6), True
                j += 1

    best_a, best_s, bad, trace, extended = None, float("-inf"), 0, [], False
    edge = True
    for a, beyond in grid():
        s = score(a)
        trace.append((a, s))
        extended = extended or beyond
        if s > best_s + 1e-12:
            best_a, best_s, bad = a, s, 0
        else:
            bad += 1
            if bad >= patience:
                edge = False
                break
    if edge or not extend or best_a != trace[0][0]:
        return AlphaChoice(best_a, best_s, trace, extended, edge=edge or (not extend and best_a == trace[0][0]))
    # The best is the grid's first value: go down by halving until `patience` values fail to improve.
    a, bad = start / 2, 0
    while a >= min_alpha - 1e-12:
        s = score(a)
        trace.append((round(a, 6), s))
        extended = True
        if s > best_s + 1e-12:
            best_a, best_s, bad = round(a, 6), s, 0
        else:
            bad += 1
            if bad >= patience:
                return AlphaChoice(best_a, best_s, trace, extended, edge=False)
        a /= 2
    return AlphaChoice(best_a, best_s, trace, extended, edge=bad == 0)
