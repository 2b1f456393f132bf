"""Measure one (backend, context, concurrency) point: token timestamps in, serving figures out.

Both runners produce `RequestTrace`s — when each request started and when each
of its tokens arrived — and `summarize` turns them into throughput, latency
quantiles, memory and cost. The native runner drives an `LLMEngine` in this
process; the HTTP runner streams from any OpenAI-compatible endpoint.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from dataclasses import dataclass, field

from hybridserve.router.economics import usd_per_million


@dataclass
class RequestTrace:
    prompt_tokens: int
    start: float
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarize(traces: list[RequestTrace], *, price_per_hour: float, cache_bytes_per_seq: int,
              budget_bytes: int, peak_rss_mb: float | None) -> dict:
    """Figures of one point. Prefill ends when the last request has its first token."""
    start = min(t.start for t in traces)
    prefill_end = max(t.token_times[0] for t in traces)
    end = max(t.token_times[-1] for t in traces)
    prompt = sum(t.prompt_tokens for t in traces)
    after = sum(1 for t in traces for x in t.token_times if x > prefill_end)
    decode_s = end - prefill_end
    decode_tok_s = after / decode_s if decode_s > 0 and after else None
    prefill_tok_s = prompt / (prefill_end - start)
    tpots = [(t.token_times[-1] - t.token_times[0]) / (len(t.token_times) - 1)
             for t in traces if len(t.token_times) > 1]
    itls = [x for t in traces for x in t.itls]
    ttfts = [t.ttft for t in traces]
    return {
        "prefill_tok_s": prefill_tok_s, "decode_tok_s": decode_tok_s,
        "decode_tok_s_per_seq": decode_tok_s / len(traces) if decode_tok_s else None,
        "ttft_p50_s": quantile(ttfts, 0.5), "ttft_p99_s": quantile(ttfts, 0.99),
        "tpot_p50_s": quantile(tpots, 0.5), "tpot_p99_s": quantile(tpots, 0.99),
        "itl_p50_s": quantile(itls, 0.5), "itl_p99_s": quantile(itls, 0.99),
        "cache_bytes_per_seq": cache_bytes_per_seq,
        "max_concurrency": int(budget_bytes // cache_bytes_per_seq) if cache_bytes_per_seq else None,
        "peak_rss_mb": peak_rss_mb,
        "usd_per_1m_input": usd_per_million(price_per_hour, prefill_tok_s),
        "usd_per_1m_output": usd_per_million(price_per_hour, decode_tok_s or 0.0),
        "generated_tokens": sum(len(t.token_times) for t in traces),
        "wall_s": end - start,
        "mean_generated_per_seq": statistics.mean(len(t.token_times) for t in traces),
    }


def prompts(context: int, concurrency: int, seed: int = 0) -> list[list[int]]:
    """Distinct byte-token prompts (ids 32..126: printable ASCII, one token each in byte-level vocabularies)."""
    import random

    rng = random.Random(seed * 7919 + context * 31 + concurrency)
    return [[rng.randint(32, 126) for _ in range(context)] for _ in range(concurrency)]


class PeakRSS:
    """Samples this process's resident memory on a thread; `.peak_mb` after stop()."""

    def __init__(self, interval: float = 0.01):
        import psutil

        self._proc, self._interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def run_native(engine, context: int, concurrency: int, new_tokens: int) -> list[RequestTrace]:
    """Drive an LLMEngine: all requests arrive together; timestamps taken after each step."""
    from hybridserve.engine import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate([[65] * 8], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
    traces: dict[str, RequestTrace] = {}
    now = time.perf_counter()
    for i, p in enumerate(prompts(context, concurrency)):
        rid = f"bench-{context}-{concurrency}-{i}-{time.monotonic_ns()}"
        engine.add_request(rid, p, params)
        traces[rid] = RequestTrace(len(p), now)
    while engine.has_unfinished():
        outs = engine.step()
        t = time.perf_counter()
        for o in outs:
            traces[o.request_id].token_times += [t] * len(o.delta_token_ids)
    return list(traces.values())


async def _stream_one(client, url: str, model: str, prompt: list[int], new_tokens: int,
                      headers: dict) -> RequestTrace:
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0, "logprobs": 1,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    completion_tokens = None
    trace = RequestTrace(len(prompt), time.perf_counter())
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                trace.prompt_tokens = chunk["usage"].get("prompt_tokens", trace.prompt_tokens)
                completion_tokens = chunk["usage"].get("completion_tokens")
            choice = (chunk.get("choices") or [{}])[0]
            logprobs = choice.get("logprobs") or {}
            n = len(logprobs.get("tokens") or []) or (1 if choice.get("text") else 0)
            trace.token_times += [time.perf_counter()] * n
    if not trace.token_times:
        raise RuntimeError(f"{url}: the stream carried no tokens")
    if completion_tokens and completion_tokens > len(trace.token_times):  # tokens that carried no text
        trace.token_times += [trace.token_times[-1]] * (completion_tokens - len(trace.token_times))
    return trace


def run_http(url: str, model: str, context: int, concurrency: int, new_tokens: int,
             api_key: str | None = None, timeout_s: float = 600.0, seed: int = 0) -> list[RequestTrace]:
    """Send `concurrency` streaming completions at once to an OpenAI-compatible server
    (prompts from `prompts(context, concurrency, seed)`)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def main() -> list[RequestTrace]:
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
            await _stream_one(client, url, model, [65] * 8, 2, headers)  # warm-up
            return await asyncio.gather(*[_stream_one(client, url, model, p, new_tokens, headers)
                                          for p in prompts(context, concurrency, seed)])

    return asyncio.run(main())
