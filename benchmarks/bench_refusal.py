"""The gateway's own cost of an overload refusal (429 all_backends_saturated), in process.

bench_batch.py's overload burst measures a refusal end to end on one box: the client, the
gateway and two busy workers share the cores, so its slowest refusal (4.3 s for 320 on 2
cores) says little about the gateway. This isolates the gateway: its ASGI app in this
process, every backend marked full by the gateway's own count (so `with_room` refuses before
any upstream call), a burst of `--burst` requests at once through httpx's in-process
transport, best of `--repeats`. It prints the time per refusal and the burst's wall time
against the 2 s target of the issue (ratio < 1 passes). The client's own cost is included
(it runs on the same loop), so the gateway's share is lower still.

    python benchmarks/bench_refusal.py --burst 320
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time

import httpx

from hybridserve.config import parse_config
from hybridserve.gateway.app import create_app

TARGET_S = 2.0
NATIVE = {"engine": "native", "checkpoint": "builtin:tiny-transformer", "arch": "transformer", "max_context": 512,
          "price_per_hour": 0.5, "tier": "standard", "native": {"max_num_seqs": 1, "max_num_waiting": 2}}


def saturated_gateway(tmp: str):
    cfg = parse_config({"gateway": {"auth": "disabled", "ledger_path": f"{tmp}/ledger.sqlite"},
                        "backends": [{"name": "w1", "port": 9301, **NATIVE}, {"name": "w2", "port": 9302, **NATIVE}],
                        "aliases": {"pair": ["w1", "w2"]}})
    app = create_app(cfg)
    for b in app.app.state.registry.backends.values():
        b.healthy, b.inflight = True, 3   # seats + queue: full by the gateway's count
    return app


async def burst(app, n: int) -> tuple[float, dict[int, int]]:
    body = {"model": "pair", "prompt": "Once upon a time", "max_tokens": 48}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        await c.post("/v1/completions", json=body)   # warm-up
        t0 = time.perf_counter()
        got = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(n)))
        wall = time.perf_counter() - t0
    codes: dict[int, int] = {}
    for r in got:
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "all_backends_saturated" and "retry-after" in r.headers
    return wall, codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--log-level", default="INFO", help="the gateway logs each refusal at INFO, as in production")
    a = ap.parse_args()
    import tempfile
    logging.basicConfig(level=a.log_level, filename=f"{tempfile.gettempdir()}/bench_refusal.log")
    with tempfile.TemporaryDirectory() as tmp:
        app = saturated_gateway(tmp)
        runs = [asyncio.run(burst(app, a.burst)) for _ in range(a.repeats)]
    wall, codes = min(runs, key=lambda r: r[0])
    per = wall / a.burst
    print(f"burst of {a.burst}: {codes} in {wall:.3f} s (best of {a.repeats}) = {per * 1e3:.2f} ms per refusal, "
          f"{1 / per:.0f} refusals/s")
    print(f"  slowest refusal of the burst {wall:.3f} s vs target {TARGET_S} s: ratio {wall / TARGET_S:.2f} "
          f"({'PASS' if wall <= TARGET_S and codes.get(429) == a.burst else 'FAIL'})")
    print(json.dumps({"burst": a.burst, "wall_s": round(wall, 4), "ms_per_refusal": round(per * 1e3, 3),
                      "codes": codes}))


if __name__ == "__main__":
    main()
