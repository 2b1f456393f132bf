"""`hybridserve bench`: sweep context × concurrency for every backend, resumably, and report.

Each finished point is appended to `points.jsonl` in the output folder, keyed by
backend, checkpoint, context, concurrency and new tokens; a rerun skips those
(`fresh=True` starts over). Native backends run in this process on their own
engine; `vllm` and `remote` backends (or any `--url`) are measured over HTTP.

With `repeat=N` every point is measured N times, in N rounds over the whole grid that
alternate the backends' order (a slow spell of the machine then hits both sides), and each
point is reported as its median with the min-max spread (see report.aggregate); the economics
profile gets the medians. Native engines are built once and kept across the rounds.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hybridserve.bench import measure, report
from hybridserve.models.memory import DTYPE_BYTES, cache_bytes_per_seq


@dataclass
class BenchOptions:
    contexts: list[int] | None = None       # None: powers of two from min_context to the backend's max
    min_context: int = 512
    max_context: int | None = 8192         # cap on the sweep (CPU default); None = backend max
    concurrency: list[int] = field(default_factory=lambda: [1, 4])
    new_tokens: int = 32
    backends: list[str] | None = None
    out: str = "results/bench"
    fresh: bool = False
    url: str | None = None                 # measure this endpoint instead of models.yaml engines
    api_key: str | None = None
    memory_budget_gb: float | None = None  # override each backend's cache budget
    repeat: int = 1                         # rounds over the grid; points report median and spread

    @classmethod
    def quick(cls, **kw) -> "BenchOptions":
        base = dict(contexts=[64, 128, 256], concurrency=[1, 2], new_tokens=8)
        return cls(**{**base, **kw})


def contexts_for(backend, opts: BenchOptions) -> list[int]:
    limit = backend.max_context - opts.new_tokens
    if opts.contexts:
        return [c for c in opts.contexts if c <= limit]
    top = min(limit, opts.max_context or limit)
    out, c = [], opts.min_context
    while c <= top:
        out.append(c)
        c *= 2
    return out


def _key(backend, ctx: int, conc: int, new: int, round_: int = 0) -> str:
    base = f"{backend.name}|{backend.checkpoint or backend.url}|{ctx}|{conc}|{new}"
    return base if round_ == 0 else f"{base}|r{round_}"


def _load_done(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["key"]] = rec
    return done


def _cache_bytes(backend, ctx: int) -> tuple[int, int]:
    """(bytes per sequence at ctx, budget bytes) from the checkpoint's config."""
    from hybridserve.models.builtin import builtin_config
    from hybridserve.models.registry import model_args, read_config

    from hybridserve.models.gguf import header_config, is_gguf_ref

    ref = backend.checkpoint or ""
    if ref.startswith("builtin:"):
        cfg = builtin_config(ref.split(":", 1)[1])
    else:
        cfg = header_config(ref) if is_gguf_ref(ref) else read_config(ref)
    nbytes = DTYPE_BYTES[backend.dtype]
    per_seq = cache_bytes_per_seq(model_args(cfg), ctx, kv_bytes=nbytes)
    budget = int(backend.native.cache_memory_gb * 2**30)
    return per_seq, budget


class Progress:
    """One stderr line per point with position and an ETA from the points done so far."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.monotonic()

    def start(self, label: str) -> None:
        eta = ""
        if self.done:
            left = (time.monotonic() - self.t0) / self.done * (self.total - self.done)
            eta = f", ~{left:.0f}s left"
        bar = "#" * int(20 * self.done / max(1, self.total))
        print(f"[{bar:<20}] {self.done}/{self.total}{eta}  {label}", file=sys.stderr, flush=True)

    def step(self) -> None:
        self.done += 1


def _native_engine(backend, max_conc: int, max_ctx: int, budget_gb: float | None):
    from hybridserve.engine import LLMEngine

    native = backend.native.model_copy(update={"max_num_seqs": max(backend.native.max_num_seqs, max_conc),
                                               **({"cache_memory_gb": budget_gb} if budget_gb else {})})
    b = backend.model_copy(update={"native": native, "max_context": max(backend.max_context, max_ctx)})
    return LLMEngine.from_backend(b)


def run_bench(cfg, opts: BenchOptions, say=print) -> dict:
    """Measure every selected backend; writes all outputs into opts.out and returns the summary."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "points.jsonl"
    if opts.fresh and store.exists():
        store.unlink()
    done = _load_done(store)
    backends = [b for b in cfg.backends if not opts.backends or b.name in opts.backends]
    if not backends:
        raise ValueError(f"no backend selected; known: {', '.join(b.name for b in cfg.backends)}")
    if opts.repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {opts.repeat}")
    plan = [(b, c, n) for b in backends for c in contexts_for(b, opts) for n in opts.concurrency]
    progress = Progress(len(plan) * opts.repeat)
    records = []
    engines: dict[str, object] = {}
    for round_ in range(opts.repeat):
        order = backends if round_ % 2 == 0 else backends[::-1]
        for backend in order:
            for b, ctx, conc in [p for p in plan if p[0] is backend]:
                key = _key(b, ctx, conc, opts.new_tokens, round_)
                tag = f" round {round_ + 1}/{opts.repeat}" if opts.repeat > 1 else ""
                progress.start(f"{b.name} context={ctx} concurrency={conc}{tag}")
                if key not in done:
                    done[key] = _measure(b, ctx, conc, opts, engines, key, round_)
                    with store.open("a") as fh:
                        fh.write(json.dumps(done[key]) + "\n")
                    say(report.point_line(done[key]))
                records.append(done[key])
                progress.step()
            if opts.repeat == 1:
                engines.pop(backend.name, None)   # one round: free each engine once its points are done
    engines.clear()
    host = {"cpus": os.cpu_count(), "device": _device(backends)}
    if opts.repeat > 1:
        return report.write_all(report.aggregate(records), out, host, rounds=records)
    return report.write_all(records, out, host)


def _measure(b, ctx: int, conc: int, opts: BenchOptions, engines: dict, key: str, round_: int) -> dict:
    """One point of one round: the figures of one run of `conc` requests at `ctx`."""
    per_seq, budget = _cache_bytes(b, ctx + opts.new_tokens)
    if opts.memory_budget_gb:
        budget = int(opts.memory_budget_gb * 2**30)
    with measure.PeakRSS() as rss:
        if b.engine == "native" and not opts.url:
            if b.name not in engines:
                ctxs = contexts_for(b, opts)
                engines[b.name] = _native_engine(b, max(opts.concurrency), max(ctxs) + opts.new_tokens,
                                                 opts.memory_budget_gb)
            traces = measure.run_native(engines[b.name], ctx, conc, opts.new_tokens)
        else:
            url = opts.url or _backend_url(b)
            traces = measure.run_http(url, b.name, ctx, conc, opts.new_tokens, opts.api_key)
    fig = measure.summarize(traces, price_per_hour=b.price_per_hour, cache_bytes_per_seq=per_seq,
                            budget_bytes=budget, peak_rss_mb=rss.peak_mb if b.engine == "native" else None)
    return {"key": key, "backend": b.name, "arch": b.arch, "engine": b.engine,
            "price_per_hour": b.price_per_hour, "memory_budget_bytes": budget, "context": ctx,
            "concurrency": conc, "new_tokens": opts.new_tokens, "fits_budget": conc * per_seq <= budget,
            "round": round_, **fig}


def _backend_url(backend) -> str:
    if backend.engine == "remote":
        return backend.url.rstrip("/")
    if backend.port is None:
        raise ValueError(f"backend {backend.name}: engine {backend.engine} is measured over HTTP; give it a "
                         "`port` in models.yaml (and start it with `hybridserve up`) or pass --url")
    return f"http://{backend.host or '127.0.0.1'}:{backend.port}"


def _device(backends) -> str:
    return ",".join(sorted({b.device for b in backends}))
