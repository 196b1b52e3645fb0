"""Where the per-parameter unit of work runs: the plain loop, a local thread pool, or Ray.

A merge is a sequence of independent per-parameter units (:mod:`pactmerge.engine`): read the
parameter (``theta_0`` and the task vectors in the compute dtype), then run it through the
pipeline (:func:`pactmerge.engine.merge_parameter`) and form the output tensor. A backend maps
that two-phase unit over the plan's parameters and yields the results **in the plan's order**,
so the writer, the statistics passes and every caller see the same stream whatever runs it:

* :func:`sequential` -- the plain loop in the calling thread (``--workers 1``, the default);
* :class:`~pactmerge.backends.local.LocalBackend` -- a small pool of worker threads (torch
  releases the GIL in its kernels and in LAPACK), reads ahead of the compute and leaves the
  writing to the caller's thread (write-behind), within a memory budget;
* :mod:`pactmerge.backends.ray` -- parameter groups fanned out to Ray workers that read the
  inputs themselves and write their own parts of the output shards (``--backend ray``).

Every backend runs the same unit with the same per-parameter seeds, so the output bytes are the
same as the plain loop's -- given the same intra-op thread count (a matrix product split over a
different number of threads may round differently; the pool's default is 1 thread per worker
on a machine with no more cores than workers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
X = TypeVar("X")
R = TypeVar("R")

BACKENDS = ("local", "ray")


class Backend(Protocol):
    """Maps a two-phase unit over items, yielding results in the items' order."""

    def imap(
        self,
        items: Sequence[Any],
        read: Callable[[Any], Any],
        compute: Callable[[Any, Any], Any],
        cost: Callable[[Any], int] | None = None,
    ) -> Iterator[Any]:
        """``compute(item, read(item))`` for every item, in order. ``cost(item)`` estimates the
        bytes the item holds from its read until its result is consumed (for memory bounds)."""
        ...


class Sequential:
    """The plain loop: read, compute, yield, one item at a time, in the calling thread."""

    workers = 1

    def imap(self, items, read, compute, cost=None):
        for item in items:
            yield compute(item, read(item))


def sequential() -> Sequential:
    return Sequential()


def make_backend(name: str = "local", workers: int = 1, threads: int | None = None, **options: Any) -> Backend:
    """A backend by name: ``local`` (``workers`` 1: the plain loop; more: a thread pool) or
    ``ray`` (see :mod:`pactmerge.backends.ray`; needs the ``ray`` extra)."""
    from pactmerge.errors import PactMergeError

    if workers < 1:
        raise PactMergeError(f"--workers {workers}: must be at least 1")
    if name == "local":
        if workers == 1 and threads is None and not options:
            return Sequential()
        from pactmerge.backends.local import LocalBackend

        return LocalBackend(workers=workers, threads=threads, **options)
    if name == "ray":
        from pactmerge.backends.ray import RayBackend

        return RayBackend(workers=workers if workers > 1 else None, threads=threads, **options)
    raise PactMergeError(f"--backend {name!r}: unknown backend (expected one of {', '.join(BACKENDS)})")
