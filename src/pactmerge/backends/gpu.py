"""Moving inputs to a CUDA device: pinned staging buffers and a copy stream per device.

With ``--device cuda`` every input tensor is copied host -> device through page-locked
("pinned") memory: the bytes are first copied from the (memory-mapped) source into a pinned
buffer, then transferred asynchronously on a dedicated copy stream, converted to the compute
dtype on the device (a bfloat16 input crosses the bus at half the size of its float32 form).
Run from the local pool's reader thread (``--workers N``), these copies overlap the compute of
earlier parameters on the default stream; the reader waits for its own copy to finish before
handing the tensor over, and marks it used on the default stream so the caching allocator does
not recycle it early. Same-shape matrices of one parameter are decomposed as one stacked call
there (:mod:`pactmerge.linalg.spectral`).

GPU speed has not been measured (no GPU was available while this was written):
``benchmarks/gpu_check.py`` checks the results against the CPU and times both on a GPU machine.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

_STREAMS: dict[int, torch.cuda.Stream] = {}
_LOCK = threading.Lock()


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _LOCK:
        if index not in _STREAMS:
            _STREAMS[index] = torch.cuda.Stream(device=index)
        return _STREAMS[index]


def to_device(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``t.to(device, dtype)``; for a CPU tensor going to CUDA, through a pinned buffer on the
    copy stream (see the module doc). Other moves are plain ``.to``."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device=device, dtype=dtype)
    pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    pinned.copy_(t)
    stream = _copy_stream(device)
    with torch.cuda.stream(stream):
        out = pinned.to(device=device, non_blocking=True).to(dtype)
    stream.synchronize()  # the pinned buffer may be reused, the tensor is complete
    out.record_stream(torch.cuda.default_stream(out.device))
    return out
