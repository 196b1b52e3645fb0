"""A distributed backend on Ray (``--backend ray``; the optional ``ray`` extra).

The driver plans the merge and the output's shard layout (:class:`pactmerge.io.writer.ShardPlan`)
as always, creates the shard files (headers, final sizes), and fans **parameter groups** --
contiguous runs of the plan, balanced by size -- out to Ray tasks. Each task opens the inputs
itself (safetensors are memory-mapped: every worker reads just its own tensors from the shared
files), runs the same per-parameter unit as the plain loop (:func:`pactmerge.engine.merged_weight`)
and writes each result straight into its place in the shard files. The driver then writes the
index, the config and the model card. Because every byte goes where the single-process writer
would put it, the folder is byte-identical to a ``--backend local`` merge (same thread count per
worker: Ray gives each task one CPU and one torch thread by default).

Whole-model statistics (TIES with ``scope: model``, any stage's ``prepare``) run first, as a
distributed pass: the workers read and pre-filter the parameters (the expensive part, e.g. PACT's
SVDs before TIES), the driver folds the streamed task vectors into the statistics in the plan's
order, exactly as the plain loop does.

Running on a cluster: start it (``ray start --head`` on one machine, ``ray start
--address=HEAD:6379`` on the others), install pactmerge on every node, put the inputs and the
output folder on a filesystem every node sees at the same path, and set ``RAY_ADDRESS=HEAD:6379``
(or pass ``address``) before ``pactmerge merge --backend ray``. Without an address Ray starts a
local cluster on this machine. Inputs must be paths (in-memory state dicts are refused).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pactmerge.errors import PactMergeError


def _ray():
    try:
        import ray
    except ImportError:
        raise PactMergeError("--backend ray: Ray is not installed (pip install 'pactmerge[ray]')") from None
    return ray


def _get(ray, ref):
    """``ray.get``, re-raising a task's PactMergeError as itself (one line for the user)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, PactMergeError):
            raise PactMergeError(str(cause)) from None
        raise


def _run_chunk(read: Callable, compute: Callable, items: list, threads: int) -> list:
    from pactmerge.backends.threads import set_worker_threads

    set_worker_threads(threads)
    return [compute(item, read(item)) for item in items]


def _write_group(inputs: Any, infos: list, device: Any, stats: dict, plan: Any, folder: str, threads: int) -> int:
    from pactmerge.backends.threads import set_worker_threads
    from pactmerge.engine import merged_weight, read_for_merge, release_parameter

    set_worker_threads(threads)
    for info in infos:
        theta = merged_weight(inputs, info, read_for_merge(inputs, info, device, chunks=True), stats, device)
        plan.write(Path(folder), info.name, theta)
        if info.kind == "copy":
            release_parameter(inputs, info.name)
    return len(infos)


def split_groups(items: Sequence[Any], costs: Sequence[int], groups: int) -> list[list[Any]]:
    """Contiguous runs of ``items`` with about equal total cost, at most ``groups`` of them."""
    total = sum(costs) or 1
    target = total / max(1, groups)
    out: list[list[Any]] = [[]]
    acc = 0.0
    for item, c in zip(items, costs):
        if out[-1] and acc + c > target * 1.0001 and len(out) < groups:
            out.append([])
            acc = 0.0
        out[-1].append(item)
        acc += c
    return [g for g in out if g]


class RayBackend:
    """Parameter groups on Ray workers; see the module doc.

    Args:
        workers: tasks in flight (default: the cluster's CPUs).
        threads: torch threads per task (default 1; each task asks Ray for that many CPUs).
        address: a running cluster's address (default ``$RAY_ADDRESS``, else a local cluster).
        groups_per_worker: parameter groups per worker (more groups balance uneven costs).
    """

    def __init__(
        self,
        workers: int | None = None,
        threads: int | None = None,
        address: str | None = None,
        groups_per_worker: int = 4,
    ):
        self.workers = workers
        self.threads = int(threads) if threads else 1
        self.address = address
        self.groups_per_worker = max(1, int(groups_per_worker))

    def _start(self):
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        return ray

    def _slots(self, ray) -> int:
        if self.workers:
            return self.workers
        return max(1, int(ray.cluster_resources().get("CPU", 1)) // self.threads)

    def imap(
        self,
        items: Sequence[Any],
        read: Callable[[Any], Any],
        compute: Callable[[Any, Any], Any],
        cost: Callable[[Any], int] | None = None,
    ) -> Iterator[Any]:
        """Chunks of ``items`` on the workers, results yielded in order (a bounded window of chunks)."""
        ray = self._start()
        slots = self._slots(ray)
        costs = [cost(x) if cost is not None else 1 for x in items]
        chunks = split_groups(list(items), costs, slots * self.groups_per_worker)
        task = ray.remote(num_cpus=self.threads)(_run_chunk)
        read_ref, compute_ref = ray.put(read), ray.put(compute)
        window: collections.deque = collections.deque()
        pending = iter(chunks)
        try:
            while True:
                while len(window) < 2 * slots:
                    chunk = next(pending, None)
                    if chunk is None:
                        break
                    window.append(task.remote(read_ref, compute_ref, chunk, self.threads))
                if not window:
                    return
                yield from _get(ray, window.popleft())
        finally:
            for ref in window:
                ray.cancel(ref)

    def write_model(self, inputs: Any, folder: Path, device: Any, progress: bool = False) -> list[str]:
        """Merge ``inputs`` into shard files under ``folder`` (statistics first); returns the file names."""
        from tqdm.auto import tqdm

        from pactmerge.engine import output_layout, param_cost, prepare_stats
        from pactmerge.io.writer import ShardPlan, parse_size

        check_distributable(inputs)
        ray = self._start()
        stats = prepare_stats(inputs, device, progress, backend=self)
        plan = ShardPlan(output_layout(inputs), parse_size(inputs.cfg.max_shard_size))
        plan.create(folder)
        params = inputs.plan.params
        groups = split_groups(
            params, [param_cost(inputs, info) for info in params], self._slots(ray) * self.groups_per_worker
        )
        task = ray.remote(num_cpus=self.threads)(_write_group)
        shared = [ray.put(x) for x in (inputs, device, stats, plan)]
        refs = [task.remote(shared[0], g, *shared[1:], str(folder), self.threads) for g in groups]
        remaining = refs
        try:
            with tqdm(total=len(params), desc="merging (ray)", unit="param", disable=not progress) as bar:
                while remaining:
                    done, remaining = ray.wait(remaining, num_returns=1)
                    bar.update(_get(ray, done[0]))
        finally:
            for ref in remaining:  # a failed group stops the others
                ray.cancel(ref)
        return plan.finish(folder)


def check_distributable(inputs: Any) -> None:
    """Ray workers open the inputs themselves: every input must be a path."""
    from pactmerge.io.sources import DictSource

    for src in (inputs.base, *inputs.models):
        if isinstance(src, DictSource) or isinstance(getattr(src, "base", None), DictSource):
            raise PactMergeError(
                f"--backend ray: {src.label} is an in-memory state dict; Ray workers read the inputs"
                " themselves, so give paths (or use --backend local)"
            )
