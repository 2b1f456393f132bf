"""Batch inference against interactive traffic on one private stack: throughput, TTFT, overload.

A private `hybridserve up` serves the small pair (native workers, auth off, the gateway's
`batch_concurrency` equal to the interactive burst's concurrency so the two are compared
at the same width). Phases, one after the other:

1. interactive burst: `--lines` completions sent at once through the gateway, `--concurrency`
   in flight, `auto:cheapest`; completion tokens per second of wall time;
2. the same lines as one Batch API job (files.create → batches.create → poll): tokens per
   second from `in_progress_at` to `completed_at`; the ratio to phase 1 (target >= 0.90);
3. interactive TTFT, idle: `--probes` streamed requests one at a time (p50, p95);
4. the same probes while a second batch runs; p95 ratio to idle (target <= 1.5);
5. overload: a burst of 4x the backends' capacity (seats + queue of every worker) at once:
   every request must end as a 200 or as a 429 with Retry-After within 2 s (none may wait
   into a timeout); counts and the slowest refusal.

Prints each phase as it ends and a table of the targets with their ratios; the last stdout
line is one JSON object.

    python benchmarks/bench_batch.py                 # small pair, 500 lines
    python benchmarks/bench_batch.py --quick         # tiny pair, 60 lines (smoke)
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hybridserve.eval.stack import Stack  # noqa: E402

SEATS, QUEUE = 8, 32


def write_config(folder: Path, models: list[str], concurrency: int) -> Path:
    backends = [{"name": m, "arch": "hybrid" if "hybrid" in m else "transformer", "engine": "native",
                 "checkpoint": f"builtin:{m}", "max_context": 1024, "price_per_hour": 0.5,
                 "native": {"max_num_seqs": SEATS, "max_num_waiting": QUEUE, "cache_memory_gb": 0.5}}
                for m in models]
    gw = {"auth": "disabled", "batch_concurrency": concurrency, "request_timeout_s": 600,
          "ledger_path": str(folder / "ledger.sqlite"), "files_dir": str(folder / "files")}
    path = folder / "bench-batch.yaml"
    path.write_text(yaml.safe_dump({"gateway": gw, "backends": backends}))
    return path


def lines(n: int, max_tokens: int) -> list[dict]:
    return [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "auto:cheapest", "prompt": f"Request {i}: tell a short story about the number {i}.",
                      "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}} for i in range(n)]


async def burst(url: str, bodies: list[dict], concurrency: int) -> tuple[float, int, list[int]]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=900, trust_env=False,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as c:
        async def one(body):
            async with gate:
                r = await c.post(url + "/v1/completions", json=body)
                return r.status_code, (r.json().get("usage") or {}).get("completion_tokens", 0) if r.status_code == 200 else 0
        t0 = time.perf_counter()
        got = await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - t0, sum(t for _, t in got), [s for s, _ in got]


def run_batch(url: str, rows: list[dict]) -> dict:
    with httpx.Client(base_url=url + "/v1", timeout=60, trust_env=False) as c:
        data = "\n".join(json.dumps(r) for r in rows).encode()
        f = c.post("/files", files={"file": ("lines.jsonl", io.BytesIO(data), "application/jsonl")},
                   data={"purpose": "batch"}).json()
        b = c.post("/batches", json={"input_file_id": f["id"], "endpoint": "/v1/completions",
                                     "completion_window": "24h"}).json()
        while b["status"] not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.5)
            b = c.get(f"/batches/{b['id']}").json()
        return b


def batch_tokens(url: str, batch: dict) -> int:
    with httpx.Client(timeout=60, trust_env=False) as c:
        text = c.get(f"{url}/v1/files/{batch['output_file_id']}/content").text
    return sum(json.loads(l)["response"]["body"]["usage"]["completion_tokens"] for l in text.splitlines() if l)


async def probes(url: str, n: int) -> list[float]:
    body = {"model": "auto:cheapest", "prompt": "A quick interactive question:", "max_tokens": 8,
            "temperature": 0, "stream": True}
    out = []
    async with httpx.AsyncClient(timeout=300, trust_env=False) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            first = None
            async with c.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():  # read to the end: the next probe starts idle
                    if first is None and line.startswith("data: ") and '"choices":[{' in line:
                        first = time.perf_counter() - t0
            if first is not None:
                out.append(first)
    return out


async def overload(url: str, n: int) -> dict:
    async with httpx.AsyncClient(timeout=900, trust_env=False, limits=httpx.Limits(max_connections=n + 4)) as c:
        async def one(i):
            t0 = time.perf_counter()
            try:
                r = await c.post(url + "/v1/completions", json={"model": "auto:cheapest", "prompt": f"burst {i}",
                                                                 "max_tokens": 16, "temperature": 0, "ignore_eos": True})
                return r.status_code, time.perf_counter() - t0, "retry-after" in r.headers
            except httpx.HTTPError:
                return -1, time.perf_counter() - t0, False
        got = await asyncio.gather(*(one(i) for i in range(n)))
    refused = [t for s, t, _ in got if s == 429]
    return {"requests": n, "ok": sum(1 for s, _, _ in got if s == 200), "refused_429": len(refused),
            "other": sum(1 for s, _, _ in got if s not in (200, 429)),
            "refusals_with_retry_after": sum(1 for s, _, h in got if s == 429 and h),
            "slowest_refusal_s": max(refused, default=None), "slowest_answer_s": max(t for _, t, _ in got)}


def _p95(xs):
    return sorted(xs)[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="small-transformer,small-hybrid")
    ap.add_argument("--lines", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--probes", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="tiny pair, 60 lines, 10 probes")
    a = ap.parse_args()
    if a.quick:
        a.models, a.lines, a.probes = "tiny-transformer,tiny-hybrid", 60, 10
    models = a.models.split(",")
    folder = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    cfg = write_config(folder, models, a.concurrency)
    rows = lines(a.lines, a.max_tokens)
    out: dict = {"bench": "batch", "models": models, "lines": a.lines, "max_tokens": a.max_tokens,
                 "concurrency": a.concurrency}
    with Stack(str(cfg), None, folder / "up.log") as stack:
        url = stack.url.removesuffix("/v1")  # the gateway root; paths below name /v1 themselves
        print(f"stack up at {url}; logs in {folder}", flush=True)
        asyncio.run(burst(url, [r["body"] for r in rows[:4]], 4))  # warm-up
        wall, toks, codes = asyncio.run(burst(url, [r["body"] for r in rows], a.concurrency))
        if codes.count(200) == 0:
            raise SystemExit(f"no request answered 200 (statuses {sorted(set(codes))}); see {folder / 'up.log'}")
        out["interactive_tok_s"] = toks / wall
        print(f"1. interactive burst: {toks} tokens in {wall:.1f} s = {toks / wall:.1f} tok/s "
              f"({codes.count(200)} x 200, {codes.count(429)} x 429)", flush=True)
        b = run_batch(url, rows)
        span = b["completed_at"] - b["in_progress_at"]
        btoks = batch_tokens(url, b)
        out["batch_tok_s"] = btoks / max(span, 1e-9)
        print(f"2. batch alone: {btoks} tokens in {span} s = {out['batch_tok_s']:.1f} tok/s "
              f"(request_counts {b['request_counts']})", flush=True)
        idle = asyncio.run(probes(url, a.probes))
        out["ttft_idle_p50_s"], out["ttft_idle_p95_s"] = statistics.median(idle), _p95(idle)
        print(f"3. TTFT idle: p50 {out['ttft_idle_p50_s']:.3f} s, p95 {out['ttft_idle_p95_s']:.3f} s", flush=True)

        async def during() -> list[float]:
            job = asyncio.create_task(asyncio.to_thread(run_batch, url, rows))
            await asyncio.sleep(2.0)  # the batch is in flight
            got = await probes(url, a.probes)
            await job
            return got
        busy = asyncio.run(during())
        out["ttft_batch_p50_s"], out["ttft_batch_p95_s"] = statistics.median(busy), _p95(busy)
        print(f"4. TTFT with a batch running: p50 {out['ttft_batch_p50_s']:.3f} s, "
              f"p95 {out['ttft_batch_p95_s']:.3f} s", flush=True)
        over = asyncio.run(overload(url, 4 * len(models) * (SEATS + QUEUE)))
        out["overload"] = over
        print(f"5. overload burst of {over['requests']}: {over['ok']} x 200, {over['refused_429']} x 429 "
              f"({over['refusals_with_retry_after']} with Retry-After), {over['other']} other; slowest "
              f"refusal {over['slowest_refusal_s']} s", flush=True)
    out["ratios"] = {"batch_over_interactive_throughput": out["batch_tok_s"] / out["interactive_tok_s"],
                     "ttft_p95_batch_over_idle": out["ttft_batch_p95_s"] / out["ttft_idle_p95_s"]}
    print(f"\n  {'batch / interactive throughput':<34} {out['ratios']['batch_over_interactive_throughput']:.2f}"
          f"  (target >= 0.90)")
    print(f"  {'TTFT p95 with batch / idle':<34} {out['ratios']['ttft_p95_batch_over_idle']:.2f}  (target <= 1.5)")
    ok = over["other"] == 0 and over["refused_429"] == over["refusals_with_retry_after"] and (
        over["slowest_refusal_s"] is None or over["slowest_refusal_s"] <= 2.0)
    print(f"  {'overload: 200 or 429+Retry-After <= 2 s':<34} {'yes' if ok else 'no'}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
