"""A local pool of per-parameter workers with read-ahead, write-behind and a memory budget.

One reader thread reads upcoming parameters (page-cache copies, dtype conversion, the task
vector subtractions) while ``workers`` compute threads run the pipeline on earlier ones; the
caller's thread consumes the results in order (the writer: write-behind). At most
``workers + readahead`` parameters are in flight, and together at most ``memory_budget`` bytes of
their estimated footprint (:func:`pactmerge.engine.param_cost`) -- one parameter larger than the
budget runs alone. Each compute thread sets torch's intra-op threads to ``threads`` (default
``max(1, cores // workers)``, :mod:`pactmerge.backends.threads`).

Worker threads help because torch releases the GIL inside its kernels and in LAPACK (an SVD runs
in parallel with another thread's reads); they share the process, its inputs' memory maps and
the page cache, so nothing is copied between them.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pactmerge.backends.threads import set_worker_threads, threads_per_worker


def default_memory_budget() -> int:
    """A quarter of the machine's memory (``MemTotal``), or 4 GiB where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 4 * 2**30


class LocalBackend:
    """A thread pool over parameters; see the module doc.

    Args:
        workers: compute threads (>= 1).
        threads: torch intra-op threads per compute thread (default ``max(1, cores // workers)``).
        memory_budget: bytes of in-flight parameters (default :func:`default_memory_budget`).
        readahead: parameters read ahead of the compute threads (default ``workers``).
    """

    def __init__(
        self,
        workers: int = 2,
        threads: int | None = None,
        memory_budget: int | None = None,
        readahead: int | None = None,
    ):
        self.workers = max(1, int(workers))
        self.threads = int(threads) if threads else threads_per_worker(self.workers)
        self.memory_budget = int(memory_budget) if memory_budget else default_memory_budget()
        self.readahead = self.workers if readahead is None else max(0, int(readahead))

    def imap(
        self,
        items: Sequence[Any],
        read: Callable[[Any], Any],
        compute: Callable[[Any, Any], Any],
        cost: Callable[[Any], int] | None = None,
    ) -> Iterator[Any]:
        readers = ThreadPoolExecutor(
            1, thread_name_prefix="pactmerge-read", initializer=set_worker_threads, initargs=(1,)
        )
        computers = ThreadPoolExecutor(
            self.workers,
            thread_name_prefix="pactmerge-merge",
            initializer=set_worker_threads,
            initargs=(self.threads,),
        )
        window: collections.deque[tuple[Future, int]] = collections.deque()
        limit = self.workers + self.readahead
        in_flight = 0

        def run(item: Any, loaded: Future) -> Any:
            return compute(item, loaded.result())

        try:
            pending = iter(items)
            nxt = next(pending, _END)
            while True:
                # Admit items while the window has room; one item is always admitted.
                while nxt is not _END and len(window) < limit:
                    c = cost(nxt) if cost is not None else 0
                    if window and in_flight + c > self.memory_budget:
                        break
                    loaded = readers.submit(read, nxt)
                    window.append((computers.submit(run, nxt, loaded), c))
                    in_flight += c
                    nxt = next(pending, _END)
                if not window:
                    return
                fut, c = window.popleft()
                result = fut.result()
                in_flight -= c
                yield result
                del result
        finally:
            for fut, _ in window:
                fut.cancel()
            readers.shutdown(wait=True, cancel_futures=True)
            computers.shutdown(wait=True, cancel_futures=True)


_END = object()
