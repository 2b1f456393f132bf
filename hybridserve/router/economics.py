"""Serving economics: $/token from measured throughput, and the economics profile format.

$/1M tokens = price_per_hour / 3600 / tokens_per_second × 1e6.

Economics profile (JSON, written by `hybridserve bench`, read by the router as its
starting table):

    {
      "format": "hybridserve-economics/1",
      "created": "2026-11-30T01:40:00Z",
      "host": {"cpus": 2, "device": "cpu"},
      "backends": {
        "<backend name>": {
          "arch": "transformer" | "hybrid",
          "price_per_hour": 0.5,                  # USD
          "memory_budget_bytes": 1073741824,      # cache budget the concurrency figures assume
          "points": [                             # one per measured (context, concurrency)
            {"context": 2048, "concurrency": 4, "new_tokens": 32,
             "prefill_tok_s": ..., "decode_tok_s": ..., "decode_tok_s_per_seq": ...,
             "ttft_p50_s": ..., "ttft_p99_s": ..., "tpot_p50_s": ..., "tpot_p99_s": ...,
             "itl_p50_s": ..., "itl_p99_s": ...,
             "cache_bytes_per_seq": ..., "max_concurrency": ...,
             "usd_per_1m_input": ..., "usd_per_1m_output": ...}
          ]
        }
      }
    }

Context buckets are powers of two; a lookup between buckets takes the nearest
bucket at or above the request's context (pessimistic).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

PROFILE_FORMAT = "hybridserve-economics/1"


def usd_per_million(price_per_hour: float, tokens_per_second: float) -> float | None:
    """Dollars per 1M tokens at that throughput (None when nothing was produced)."""
    if not tokens_per_second or tokens_per_second <= 0:
        return None
    return price_per_hour / 3600.0 / tokens_per_second * 1e6


def context_bucket(tokens: int) -> int:
    """Smallest power of two ≥ tokens (at least 1)."""
    return 1 << max(0, int(tokens) - 1).bit_length()


def new_profile(host: dict[str, Any]) -> dict[str, Any]:
    return {"format": PROFILE_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": host, "backends": {}}


def save_profile(profile: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile, indent=1) + "\n")


def load_profile(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if data.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{path}: not an economics profile (format {data.get('format')!r}, "
                         f"expected {PROFILE_FORMAT!r}); write one with `hybridserve bench`")
    return data


def crossover_context(points_a: list[dict], points_b: list[dict], key: str = "usd_per_1m_output") -> int | None:
    """Smallest context from which b is cheaper than a at every measured larger context."""
    a = {p["context"]: p[key] for p in points_a if p.get(key) is not None}
    b = {p["context"]: p[key] for p in points_b if p.get(key) is not None}
    common = sorted(set(a) & set(b))
    found = None
    for ctx in reversed(common):
        if b[ctx] < a[ctx]:
            found = ctx
        else:
            break
    return found
