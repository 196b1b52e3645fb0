"""Which weight matrices PACT can filter: the one rule that the merge, ``--dry-run`` and ``analyze`` share.

For a matrix ``theta_0`` of shape ``(m, n)`` and ranks ``(K, k)`` (:meth:`PactParams.ranks`), PACT
cannot filter it when

* ``min(m, n) <= K``: ``theta_0`` has at most ``min(m, n)`` right singular directions, so its
  "core" ``V_{0,K}`` would be all of them (for ``n <= K``, the whole input space, and the other
  tasks' walls would remove every task vector entirely); directions past its rank would be arbitrary;
* ``min(m, n) < k``: a task's active subspace ``V_{t,k}`` would include arbitrary directions past
  the task vector's rank.

Such a *narrow* matrix (BERT's ``token_type_embeddings``, 2 x hidden; a 16-wide convolution with
K = 15) is left unfiltered (``pact.narrow: bypass``, the default; ``--dry-run`` lists it) or, with
``pact.narrow: error``, refused before any work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a runtime import would be a cycle: pact.py imports this module
    from pactmerge.filters.pact import PactParams
    from pactmerge.registry import ParamInfo


def narrow_reason(shape: tuple[int, ...], K: int, k: int) -> str | None:
    """Why PACT with ranks ``(K, k)`` cannot filter a matrix of ``shape``, or None if it can."""
    r = min(int(shape[-2]), int(shape[-1]))
    if K > 0 and r <= K:
        return f"min(m, n)={r} <= pact.K={K}"
    if r < k:
        return f"min(m, n)={r} < pact.k={k}"
    return None


def pact_narrow_reason(p: PactParams, shape: tuple[int, ...]) -> str | None:
    """:func:`narrow_reason` with the ranks ``p`` gives a matrix of ``shape`` (fixed or width-relative)."""
    K, k = p.ranks(shape)
    return narrow_reason(shape, K, k)


def pact_bypass(p: PactParams, info: ParamInfo) -> str | None:
    """Why the ``pact`` filter leaves ``info`` unfiltered although it is a matrix within ``depth``
    (the filter's registered ``bypass``, reported by ``--dry-run``), or None."""
    if not info.is_matrix or not info.in_depth(p.depth):
        return None
    return pact_narrow_reason(p, info.shape)
