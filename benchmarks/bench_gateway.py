"""Gateway overhead: the same short-completion load sent straight to an upstream and through
the gateway, at fixed request rates; reports the latency the gateway adds.

The upstream is a minimal OpenAI-compatible server that answers at once (a raw ASGI
app under uvicorn), declared to the gateway as an `engine: remote` backend, so the
difference between the two paths is the gateway's own cost: parsing, validation,
auth, routing, the proxy hop and its headers. Load is open-loop (request i is sent at
t0 + i/rate, whether or not earlier ones have finished), from one asyncio client with
pooled keep-alive connections (hybridserve's own lean HTTP/1.1 client, so that the
load generator takes as little of the shared CPU as it can). Upstream, gateway and client each run in their own
process on the same machine, so the figures include their competition for CPU.

    .venv/bin/python benchmarks/bench_gateway.py [--rates 50,100,200,400,800] [--duration 5]
        [--budget-store none|sqlite|redis]

`--budget-store` gives the gateway a key budget no run reaches, so every request also
reserves and settles: in the SQLite ledger, or in a local redis-server (shared state).

Prints a table (latencies in ms; `gw cpu` is the gateway process's CPU time per request,
whose inverse is the rate one core could sustain), then one JSON line. A rate is "held" when every request succeeded
and the achieved rate was at least 95% of the target.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from hybridserve.gateway.upstream import Pool

REPO = Path(__file__).resolve().parents[1]
BODY = json.dumps({"model": "echo", "prompt": "Say hi", "max_tokens": 4}).encode()
ANSWER = json.dumps({
    "id": "cmpl-echo", "object": "text_completion", "created": 0, "model": "echo",
    "choices": [{"index": 0, "text": " hi", "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()
KEY = "bench-key"


# ------------------------------------------------------------------ the upstream


async def upstream_app(scope, receive, send):
    """Answers every POST with a fixed completion and /metrics with zero load."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            await send({"type": msg["type"] + ".complete"})
            if msg["type"] == "lifespan.shutdown":
                return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/metrics":
        body, ctype = b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n", b"text/plain"
    else:
        body, ctype = ANSWER, b"application/json"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve_upstream(port: int) -> None:
    import uvicorn

    uvicorn.run(upstream_app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                timeout_keep_alive=75)


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ok(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up")


def start_processes(tmp: Path, log_level: str, store: str = "none") -> tuple[list[subprocess.Popen], str, str]:
    """Upstream and gateway (first two), plus a redis-server for `--budget-store redis`."""
    up_port, gw_port = free_port(), free_port()
    gateway = {"host": "127.0.0.1", "port": gw_port, "auth": "required",
               "api_key_hashes": [hashlib.sha256(KEY.encode()).hexdigest()]}
    log = open(tmp / "processes.log", "wb")
    extra = []
    if store != "none":  # a cap no run reaches: every request reserves and settles, none is refused
        gateway["budgets"] = [{"name": "bench", "tokens": 10**12, "period": "day"}]
        gateway["ledger_path"] = str(tmp / "ledger.sqlite")
    if store == "redis":
        redis_port = free_port()
        extra.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                                      stdout=log, stderr=subprocess.STDOUT))
        gateway["state_url"] = f"redis://127.0.0.1:{redis_port}/0"
    cfg = {"gateway": gateway,
           "backends": [{"name": "echo", "arch": "transformer", "engine": "remote",
                         "url": f"http://127.0.0.1:{up_port}", "price_per_hour": 0.0}]}
    path = tmp / "bench.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    procs = [subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(up_port)],
                              stdout=log, stderr=subprocess.STDOUT),
             subprocess.Popen([sys.executable, "-m", "hybridserve.cli", "gateway", "--config",
                               str(path), "--log-level", log_level], cwd=REPO, stdout=log,
                              stderr=subprocess.STDOUT), *extra]
    direct, via = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{gw_port}"
    wait_ok(direct + "/metrics")
    wait_ok(via + "/health")
    return procs, direct, via


def stop_processes(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


# ------------------------------------------------------------------ load


async def run_rate(client: Pool, rate: float, duration_s: float) -> dict:
    """Open-loop load at `rate` req/s for `duration_s`; latency from each request's send."""
    n = int(rate * duration_s)
    latencies: list[float] = []
    errors = 0
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}

    async def one() -> None:
        nonlocal errors
        t = time.perf_counter()
        try:
            r = await client.request("POST", "/v1/completions", BODY, headers)
            body = await r.read()
            if r.status != 200 or not body:
                raise ValueError(f"status {r.status}")
            latencies.append(time.perf_counter() - t)
        except Exception:
            errors += 1

    t0 = time.perf_counter()
    tasks = []
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"n": n, "errors": errors, "achieved_rps": len(latencies) / elapsed,
            **{f"p{q}": pct(latencies, q) for q in (50, 95, 99)}}


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def measure(direct: str, via: str, rates: list[float], duration_s: float,
                  gateway_pid: int) -> list[dict]:
    straight, gateway = Pool(direct, max_idle=4096), Pool(via, max_idle=4096)
    for client in (straight, gateway):  # warm connections and code paths
        await run_rate(client, 50, 1.0)
    rows = []
    try:
        for rate in rates:
            d = await run_rate(straight, rate, duration_s)
            cpu0 = cpu_seconds(gateway_pid)
            g = await run_rate(gateway, rate, duration_s)
            g["cpu_ms_per_req"] = (cpu_seconds(gateway_pid) - cpu0) / max(1, g["n"]) * 1e3
            held = g["errors"] == 0 and g["achieved_rps"] >= 0.95 * rate
            rows.append({"rate": rate, "direct": d, "gateway": g, "held": held,
                         **{f"added_p{q}_ms": (g[f"p{q}"] - d[f"p{q}"]) * 1e3 for q in (50, 95, 99)}})
            print_row(rows[-1])
    finally:
        straight.close()
        gateway.close()
    return rows


def print_row(r: dict) -> None:
    d, g = r["direct"], r["gateway"]
    print(f"{r['rate']:>6.0f} {g['achieved_rps']:>8.1f} {d['p50']*1e3:>7.2f} {d['p95']*1e3:>7.2f} "
          f"{g['p50']*1e3:>7.2f} {g['p95']*1e3:>7.2f} {g['p99']*1e3:>7.2f} "
          f"{r['added_p50_ms']:>7.2f} {r['added_p95_ms']:>7.2f} {r['added_p99_ms']:>7.2f} "
          f"{g['cpu_ms_per_req']:>7.3f} {g['errors']:>5d} {'yes' if r['held'] else 'no':>5}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="50,100,200,400,800", help="comma-separated requests/s")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per rate and path")
    ap.add_argument("--gateway-log-level", default="info")
    ap.add_argument("--budget-store", choices=["none", "sqlite", "redis"], default="none",
                    help="key budgets off, in the SQLite ledger, or shared through a local redis-server")
    ap.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_upstream:
        return serve_upstream(args.serve_upstream)
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        procs, direct, via = start_processes(Path(tmp), args.gateway_log_level, args.budget_store)
        try:
            print(f"gateway overhead, {os.cpu_count()} CPUs, {args.duration:g}s per rate and path, "
                  f"budget store: {args.budget_store}; latencies in ms")
            print(f"{'rate':>6} {'achieved':>8} {'dir p50':>7} {'dir p95':>7} {'gw p50':>7} "
                  f"{'gw p95':>7} {'gw p99':>7} {'+p50':>7} {'+p95':>7} {'+p99':>7} {'gw cpu':>7} {'errs':>5} "
                  f"{'held':>5}")
            rows = asyncio.run(measure(direct, via, rates, args.duration, procs[1].pid))
        finally:
            stop_processes(procs)
    held = [r["rate"] for r in rows if r["held"]]
    at200 = next((r for r in rows if r["rate"] == 200), None)
    summary = {"bench": "gateway_overhead", "cpus": os.cpu_count(), "duration_s": args.duration,
               "budget_store": args.budget_store,
               "max_rate_held": max(held) if held else 0,
               "max_rate_held_with_p95_added_le_5ms": max(
                   [r["rate"] for r in rows if r["held"] and r["added_p95_ms"] <= 5.0], default=0),
               "target_p95_added_ms_at_200": 5.0,
               "p95_added_ms_at_200": round(at200["added_p95_ms"], 3) if at200 else None,
               "rows": [{"rate": r["rate"], "held": r["held"], "errors": r["gateway"]["errors"],
                         "achieved_rps": round(r["gateway"]["achieved_rps"], 1),
                         **{k: round(r[k], 3) for k in ("added_p50_ms", "added_p95_ms", "added_p99_ms")},
                         "direct_p95_ms": round(r["direct"]["p95"] * 1e3, 3),
                         "gateway_cpu_ms_per_req": round(r["gateway"]["cpu_ms_per_req"], 3),
                         "gateway_p95_ms": round(r["gateway"]["p95"] * 1e3, 3)} for r in rows]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
