"""Thread counts for torch inside pactmerge's workers.

Each merge worker runs torch's own intra-op threads (OpenMP, and MKL/LAPACK inside an SVD). On a
machine shared with other jobs, more threads than free cores make every parallel region wait for
its slowest thread; with OpenMP's default *active* wait policy the idle threads spin meanwhile and
steal the very cores the others need (measured on a loaded 2-core machine: one 3072 x 768 SVD took
16.4 s with torch's default 2 threads, 0.29 s on one). Two defaults follow:

* ``workers x threads <= cores``: a pool of ``W`` workers gives each ``max(1, cores // W)``
  threads (:func:`threads_per_worker`), set in each worker thread (:func:`set_worker_threads`);
* the command line sets ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of
  spinning) unless the environment already sets it -- it must be set before torch is imported,
  so Python API users who want it set it themselves (``export OMP_WAIT_POLICY=PASSIVE``).

The command line also sets ``THP_MEM_ALLOC_ENABLE=1`` (:func:`prefer_huge_pages`), for the same
reason read only at torch's start.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Intra-op threads for each of ``workers`` concurrent workers: ``max(1, cores // workers)``."""
    cores = usable_cores() if cores is None else cores
    return max(1, cores // max(1, workers))


def set_worker_threads(threads: int) -> None:
    """Set torch's intra-op thread count for the calling thread (OpenMP's count is per thread)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))


def prefer_passive_wait() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless already set. Takes effect only if torch (OpenMP) has not
    been loaded yet: call it before ``import torch``."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def prefer_huge_pages() -> None:
    """``THP_MEM_ALLOC_ENABLE=1`` unless already set: torch backs CPU tensors of 2 MB and more
    with transparent huge pages. A merge allocates a fresh buffer per parameter and task; with
    4 KiB pages each costs a page fault per 4 KiB (measured: 1.4 M faults and 2.0 s -> 0.1 M and
    0.65 s for a 100 M-parameter bfloat16 TA merge). Read once by torch: call before ``import torch``."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
