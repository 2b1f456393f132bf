"""Reusable scratch buffers for the torch reference ops.

On CPU a fresh multi-megabyte tensor costs more than the work done in it: the
allocator hands large blocks back to the OS on free, so every step page-faults
its temporaries in again (an 8 K-context KV gather at batch 8 took 22 ms fresh
and 3 ms into a reused buffer). The refs gather into these buffers instead.

Buffers are per thread (each engine steps on its own thread, so two engines in
one process never share one) and per (tag, device, dtype); they grow by half
again when too small and are never shrunk. A returned view is valid until the
next `scratch` call with the same tag on the same thread.
"""
from __future__ import annotations

import math
import threading

import torch

_local = threading.local()


def scratch(tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape`, backed by this thread's `tag` buffer."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    numel = math.prod(shape)
    key = (tag, torch.device(device), dtype)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        grown = max(numel, buf.numel() * 3 // 2 if buf is not None else 0)
        buffers.pop(key, None)  # free the old one before allocating the new one
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = buffers[key] = torch.empty(grown, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def clear() -> None:
    """Drop this thread's buffers (tests, or an engine shutting down)."""
    _local.buffers = {}
