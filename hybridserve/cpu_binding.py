"""Which CPU cores each locally started backend may use, so workers do not fight over them.

Every CPU worker left alone runs one compute thread per core of the machine. Two of them
on one node (the default pair) then run twice as many threads as there are cores and
get in each other's way when both are busy. So `hybridserve up` gives each CPU backend
its own slice of the cores it may use itself, pins the worker process to it and sizes
its thread pool to match (`compute_threads`), as vLLM's CPU deployments bind each
instance's OpenMP threads to its own cores. The price: a worker busy while the other
idles has only its share (benchmarks/bench_pinning.py measures both sides on the node
at hand).

`cpu_cores` per backend:
  auto (default)  an equal, contiguous share of the cores not named by other backends
  all             no pinning: the worker sees every core (torch's own thread count)
  "0-3,8"         exactly these cores (Linux CPU list syntax)

On CUDA `auto` means `all` (the GPU does the work); a core list pins a CUDA worker too.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

_LIST_RE = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def parse_cores(spec: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8]; ValueError naming the problem."""
    spec = spec.replace(" ", "")
    if not _LIST_RE.match(spec):
        raise ValueError(f"'{spec}' is not a CPU list: use 'auto', 'all' or cores like '0-3,8'")
    cores: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise ValueError(f"CPU range '{part}' runs backwards: write '{last}-{first}'")
        cores.update(range(first, last + 1))
    return sorted(cores)


def format_cores(cores: Iterable[int]) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8' (the form taskset, numactl and vLLM read)."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(set(cores)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def available_cores() -> list[int]:
    """The cores this process may run on (its affinity mask, which containers narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def pinned(backend) -> bool:
    """Whether `up` pins this backend: started here (not remote, no `host`), with a core list or
    `auto` on the CPU."""
    if not backend.started_here or backend.cpu_cores == "all":
        return False
    return backend.cpu_cores != "auto" or backend.device == "cpu"


def plan_cores(backends: Sequence, available: Sequence[int]) -> dict[str, list[int]]:
    """Backend name -> its cores, for every backend `up` pins.

    Explicit lists are kept as given (`check_cores` has refused cores that are not
    available). The `auto` backends split what the explicit ones left, in config order,
    into contiguous slices as equal as they can be (the first ones get one more core
    when it does not divide); with more such backends than cores, they share them
    round-robin, one core each. If explicit lists took every core, `auto` backends
    share all of them.
    """
    chosen = [b for b in backends if pinned(b)]
    plan = {b.name: parse_cores(b.cpu_cores) for b in chosen if b.cpu_cores != "auto"}
    taken = {c for cores in plan.values() for c in cores}
    auto = [b for b in chosen if b.cpu_cores == "auto"]
    pool = [c for c in available if c not in taken] or list(available)
    if auto:
        if len(auto) > len(pool):
            for i, b in enumerate(auto):
                plan[b.name] = [pool[i % len(pool)]]
        else:
            size, extra = divmod(len(pool), len(auto))
            start = 0
            for i, b in enumerate(auto):
                n = size + (1 if i < extra else 0)
                plan[b.name] = pool[start:start + n]
                start += n
    return plan


def check_cores(backends: Sequence, available: Sequence[int]) -> None:
    """ValueError for an explicit list naming a core this machine (or container) lacks."""
    have = set(available)
    for b in backends:
        if pinned(b) and b.cpu_cores != "auto":
            missing = [c for c in parse_cores(b.cpu_cores) if c not in have]
            if missing:
                raise ValueError(f"backend '{b.name}': cpu_cores '{b.cpu_cores}' names core(s) "
                                 f"{format_cores(missing)}, but only {format_cores(have)} are "
                                 "available here; fix the list or use 'auto'")


RESERVE_FROM = 4  # workers with at least this many cores leave one to the serving thread


def compute_threads(n_cores: int) -> int:
    """Compute threads for a worker with `n_cores`.

    From RESERVE_FROM cores on, all but one: the spare core runs the serving thread
    (HTTP, tokenizer, streaming), as vLLM's CPU backend reserves a core for its
    scheduler, so no OpenMP thread shares its core with the server (one that does
    stalls every parallel region it is in). Below that, every core computes: on 2
    cores a native worker with one compute thread instead of two decoded 1.05-1.38x
    faster at batch 1 but answered 1.3-1.9x later (small-transformer TTFT at 8192
    tokens 14.2 s against 7.6 s), so a 32-token answer came back later at every
    context; with 4 or more cores the reserved one costs at most a quarter of
    prefill. (benchmarks/bench_vllm.py with and without --native-threads 1, 2026-11-30.)
    """
    return n_cores - 1 if n_cores >= RESERVE_FROM else max(1, n_cores)


def default_threads(environ: dict[str, str], cores: Sequence[int]) -> int | None:
    """The thread count a native worker should set for itself, or None when the user
    (or `up`) already chose one through OMP_NUM_THREADS."""
    return None if environ.get("OMP_NUM_THREADS") else compute_threads(len(cores))


def binding_env(cores: Sequence[int], engine: str, base: dict[str, str]) -> dict[str, str]:
    """Environment for a worker pinned to `cores`; what `base` already sets is kept.

    vLLM binds one OpenMP thread to each core of VLLM_CPU_OMP_THREADS_BIND and reserves
    none of them, so it gets the first `compute_threads` cores; its scheduler keeps
    the last one when one is spared.
    """
    env = {"HYBRIDSERVE_CPU_CORES": format_cores(cores)}
    threads = compute_threads(len(cores))
    if "OMP_NUM_THREADS" not in base:
        env["OMP_NUM_THREADS"] = str(threads)
    if engine == "vllm" and "VLLM_CPU_OMP_THREADS_BIND" not in base:
        env["VLLM_CPU_OMP_THREADS_BIND"] = format_cores(list(cores)[:threads])
    return env
