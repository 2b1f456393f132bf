"""The live economics table: what each backend costs and how fast it is, per context bucket.

Seeded from a harness profile (`hybridserve bench`) or conservative defaults,
then corrected by every finished request: the request's measured device-seconds
over the table's prediction is folded into a per (backend, bucket) correction
factor (EWMA). Corrections decay back toward 1 as they age, so one bad minute
does not steer routing for an hour. `predict` is pure arithmetic on the table.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

from hybridserve.router.economics import context_bucket, usd_per_million

DEFAULT_PREFILL_TOK_S = 500.0
DEFAULT_DECODE_TOK_S = 20.0


@dataclass(frozen=True)
class Entry:
    """Measured figures at one (context bucket, concurrency)."""

    context: int
    concurrency: int
    prefill_tok_s: float
    decode_tok_s: float            # aggregate over `concurrency` sequences
    cache_bytes_per_seq: int = 0
    ttft_s: float | None = None

    @property
    def decode_tok_s_per_seq(self) -> float:
        return self.decode_tok_s / max(1, self.concurrency)


@dataclass(frozen=True)
class Estimate:
    backend: str
    usd: float               # predicted cost of the request
    ttft_s: float
    e2e_s: float
    device_s: float
    correction: float


@dataclass
class _Correction:
    factor: float = 1.0
    updated: float = field(default_factory=time.monotonic)
    samples: int = 0


class EconomicsTable:
    def __init__(self, prices: dict[str, float], entries: dict[str, list[Entry]] | None = None,
                 half_life_s: float = 600.0, alpha: float = 0.2):
        self.prices = dict(prices)
        self.entries = {b: sorted(v, key=lambda e: (e.context, e.concurrency)) for b, v in (entries or {}).items()}
        self.half_life_s = half_life_s
        self.alpha = alpha
        self._corr: dict[tuple[str, int], _Correction] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_profile(cls, profile: dict, prices: dict[str, float] | None = None, **kw) -> "EconomicsTable":
        entries: dict[str, list[Entry]] = {}
        price = {}
        for name, b in profile.get("backends", {}).items():
            price[name] = b.get("price_per_hour", 0.0)
            entries[name] = [Entry(p["context"], p["concurrency"], p["prefill_tok_s"], p["decode_tok_s"],
                                   p.get("cache_bytes_per_seq", 0), p.get("ttft_p50_s"))
                             for p in b.get("points", []) if p.get("decode_tok_s") and p.get("prefill_tok_s")]
        price.update(prices or {})
        return cls(price, entries, **kw)

    # ---- lookup
    def entry(self, backend: str, context: int, concurrency: int) -> Entry:
        """Nearest measured bucket at or above `context` (else the largest), concurrency at or below."""
        pts = self.entries.get(backend)
        if not pts:
            return Entry(context_bucket(context), 1, DEFAULT_PREFILL_TOK_S, DEFAULT_DECODE_TOK_S)
        ctxs = sorted({e.context for e in pts})
        ctx = next((c for c in ctxs if c >= context), ctxs[-1])
        at = [e for e in pts if e.context == ctx]
        below = [e for e in at if e.concurrency <= max(1, concurrency)]
        chosen = max(below, key=lambda e: e.concurrency) if below else min(at, key=lambda e: e.concurrency)
        if ctx < context:  # beyond the measured range: scale attention-bound throughput down, pessimistically
            scale = ctx / context
            chosen = Entry(context, chosen.concurrency, chosen.prefill_tok_s * scale, chosen.decode_tok_s * scale,
                           chosen.cache_bytes_per_seq, chosen.ttft_s)
        return chosen

    def _key(self, backend: str, context: int) -> tuple[str, int]:
        """Corrections are kept per measured bucket: the one a prediction at `context` reads."""
        ctxs = sorted({e.context for e in self.entries.get(backend, ())})
        if not ctxs:
            return backend, context_bucket(context)
        return backend, next((c for c in ctxs if c >= context), ctxs[-1])

    def correction(self, backend: str, context: int) -> float:
        c = self._corr.get(self._key(backend, context))
        if c is None:
            return 1.0
        age = time.monotonic() - c.updated
        w = 0.5 ** (age / self.half_life_s)
        return 1.0 + (c.factor - 1.0) * w

    def predict(self, backend: str, prompt_tokens: int, output_tokens: int, concurrency: int = 1,
                cached_tokens: int = 0) -> Estimate:
        """Cost and latency of a request; `cached_tokens` of its prompt are expected from the backend's
        prefix cache (not prefilled), while the context it decodes against stays the whole prompt."""
        e = self.entry(backend, prompt_tokens + output_tokens, concurrency)
        corr = self.correction(backend, prompt_tokens + output_tokens)
        prefill_s = max(1, prompt_tokens - cached_tokens) / e.prefill_tok_s
        device_s = (prefill_s + output_tokens / e.decode_tok_s) * corr
        e2e = (prefill_s + output_tokens / e.decode_tok_s_per_seq) * corr
        usd = self.prices.get(backend, 0.0) / 3600.0 * device_s
        return Estimate(backend, usd, prefill_s * corr, e2e, device_s, corr)

    def usd_per_1m_output(self, backend: str, context: int, concurrency: int = 1) -> float | None:
        e = self.entry(backend, context, concurrency)
        return usd_per_million(self.prices.get(backend, 0.0), e.decode_tok_s / self.correction(backend, context))

    # ---- live updates
    def observe(self, backend: str, prompt_tokens: int, completion_tokens: int, device_seconds: float,
                concurrency: int = 1, cached_tokens: int = 0) -> None:
        """Fold one finished request's measured device-seconds into the table (its cached prompt
        tokens cost no prefill, so a cache hit does not read as a faster backend)."""
        if device_seconds <= 0 or prompt_tokens + completion_tokens <= 0:
            return
        e = self.entry(backend, prompt_tokens + completion_tokens, concurrency)
        computed = max(0, prompt_tokens - cached_tokens)
        predicted = computed / e.prefill_tok_s + completion_tokens / e.decode_tok_s
        ratio = min(100.0, max(0.01, device_seconds / predicted))
        key = self._key(backend, prompt_tokens + completion_tokens)
        with self._lock:
            current = self.correction(*key)
            c = self._corr.setdefault(key, _Correction())
            c.factor = math.exp((1 - self.alpha) * math.log(current) + self.alpha * math.log(ratio))
            c.updated, c.samples = time.monotonic(), c.samples + 1

    def rows(self) -> list[dict]:
        """The table as JSON rows (for /v1/economics and gauges)."""
        out = []
        for backend, pts in self.entries.items():
            for e in pts:
                corr = self.correction(backend, e.context)
                out.append({"backend": backend, "context": e.context, "concurrency": e.concurrency,
                            "prefill_tok_s": e.prefill_tok_s / corr, "decode_tok_s": e.decode_tok_s / corr,
                            "cache_bytes_per_seq": e.cache_bytes_per_seq, "correction": corr,
                            "usd_per_1m_output": usd_per_million(self.prices.get(backend, 0.0),
                                                                 e.decode_tok_s / corr),
                            "usd_per_1m_input": usd_per_million(self.prices.get(backend, 0.0),
                                                                e.prefill_tok_s / corr)})
        return out
