"""Overload: a worker with a full queue answers 429 `queue_full` with Retry-After at once (never a
timeout), the gateway fails over to a backend with room, answers 429 `all_backends_saturated` when
none has any, and batch-priority requests are served like any other."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.serving.conftest import free_port, log_tail, start_stack, stop_process

pytestmark = pytest.mark.timeout(180)

SEATS, QUEUE = 1, 2


def backend(name: str) -> dict:
    return {"name": name, "arch": "transformer", "engine": "native", "checkpoint": "builtin:tiny-transformer",
            "max_context": 512, "price_per_hour": 0.5, "port": free_port(), "tier": "standard",
            "native": {"max_num_seqs": SEATS, "max_num_waiting": QUEUE, "cache_memory_gb": 0.05}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("overload"), [backend("w1"), backend("w2")],
                    aliases={"pair": ["w1", "w2"]})
    yield s
    stop_process(s.proc)
    assert s.proc.returncode == 0, log_tail(s.log)


BODY = {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "ignore_eos": True}


async def burst(url: str, model: str, n: int, headers: dict | None = None) -> list[tuple[int, float, httpx.Response]]:
    async with httpx.AsyncClient(timeout=60, trust_env=False) as c:
        async def one():
            t0 = time.perf_counter()
            r = await c.post(url + "/v1/completions", json={**BODY, "model": model}, headers=headers or {})
            return r.status_code, time.perf_counter() - t0, r
        return await asyncio.gather(*(one() for _ in range(n)))


def test_a_full_worker_queue_is_an_immediate_429_with_retry_after(stack):
    url = stack.workers["w1"]
    got = asyncio.run(burst(url, "w1", 4 * (SEATS + QUEUE)))
    codes = sorted(s for s, _, _ in got)
    assert set(codes) <= {200, 429} and codes.count(200) >= QUEUE and 429 in codes, codes  # a burst lands in the queue at once
    for status, took, r in got:
        if status == 429:
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
            assert took < 2.0, f"a refusal took {took:.2f} s"
    m = httpx.get(url + "/metrics", trust_env=False).text
    assert 'hybridserve:requests_shed_total{model_name="w1",reason="queue_full"}' in m
    wait = max(int(r.headers["retry-after"]) for s, _, r in got if s == 429)
    time.sleep(min(wait, 5))
    assert httpx.post(url + "/v1/completions", json={**BODY, "model": "w1"}, timeout=60,
                      trust_env=False).status_code == 200


def test_the_gateway_fails_over_then_says_every_backend_is_saturated(stack):
    got = asyncio.run(burst(stack.url, "pair", 5 * (SEATS + QUEUE), stack.headers()))
    codes = [s for s, _, _ in got]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 2 * QUEUE, "both backends should take work"
    refusals = [r for s, _, r in got if s == 429]
    assert refusals, "a burst of five times the capacity must shed some"
    for r in refusals:
        assert r.json()["error"]["code"] == "all_backends_saturated"
        assert int(r.headers["retry-after"]) >= 1
    assert max(t for s, t, _ in got if s == 429) < 2.0


def test_batch_priority_is_served_and_a_bad_one_is_a_400(stack):
    with httpx.Client(base_url=stack.base_url, headers=stack.headers(), timeout=60, trust_env=False) as c:
        ok = c.post("/completions", json={**BODY, "model": "w1", "hybridserve_priority": "batch", "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        bad = c.post("/completions", json={**BODY, "model": "w1", "hybridserve_priority": "urgent"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "hybridserve_priority"
    m = httpx.get(stack.workers["w1"] + "/metrics", trust_env=False).text
    line = next(l for l in m.splitlines() if l.startswith('hybridserve:scheduled_tokens_total{model_name="w1",priority="batch"}'))
    assert float(line.rsplit(" ", 1)[1]) >= 4
