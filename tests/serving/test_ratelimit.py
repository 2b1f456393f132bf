"""Per-key rpm/tpm limits: counted per clock minute, per key, in memory or across replicas in Redis,
refused with 429 `rate_limit_exceeded` and Retry-After before anything is reserved."""
from __future__ import annotations

import asyncio
import hashlib
import uuid

import httpx
import pytest
import redis.asyncio as aioredis

from hybridserve.config import ConfigError, RateLimitConfig, parse_config
from hybridserve.gateway.ratelimit import RateLimitedError, RateLimiter, RedisRateLimiter
from tests.serving.conftest import log_tail, start_mock_upstream, start_stack, stop_process

pytestmark = pytest.mark.timeout(90)


class Clock:
    def __init__(self, t: float = 6000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def limiters(kind: str, limits, clock, request):
    if kind == "memory":
        one = RateLimiter(limits, clock)
        return one, one, None
    url = request.getfixturevalue("redis_url")
    client = aioredis.from_url(url)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    return RedisRateLimiter(client, limits, prefix, clock), RedisRateLimiter(client, limits, prefix, clock), client


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_requests_and_tokens_per_minute_per_key(kind, request):
    clock = Clock(6000.0 + 15)  # 45 s left in this minute
    a, b, client = limiters(kind, [RateLimitConfig(name="per-key", rpm=3, tpm=100)], clock, request)

    async def go():
        await a.admit("k1", 10)
        await b.admit("k1", 10)           # another replica counts into the same window (Redis)
        await a.admit("k2", 90)           # each key its own
        with pytest.raises(RateLimitedError) as err:
            await b.admit("k1", 90)       # 20 + 90 tokens > 100
        assert err.value.code == "rate_limit_exceeded" and "tokens" in err.value.message
        assert err.value.headers()["Retry-After"] == "45"
        await a.admit("k1", 10)           # the refusal counted nothing
        with pytest.raises(RateLimitedError, match="requests"):
            await a.admit("k1", 1)        # a fourth request
        clock.t += 45                     # the next minute
        await a.admit("k1", 100)
        if client is not None:
            await client.aclose()
    asyncio.run(go())


def test_a_limit_for_one_key_leaves_the_others_alone():
    mine = hashlib.sha256(b"k").hexdigest()
    lim = RateLimiter([RateLimitConfig(name="one", key=mine, rpm=1)], Clock())

    async def go():
        await lim.admit(mine, 1)
        for _ in range(5):
            await lim.admit("someone-else", 1)
        with pytest.raises(RateLimitedError):
            await lim.admit(mine, 1)
    asyncio.run(go())


@pytest.mark.parametrize("bad, words", [({"name": "x"}, "limits nothing"),
                                        ({"rpm": 0}, "greater than or equal to 1"),
                                        ({"rpm": 5, "key": "abc"}, "sha256 hex")])
def test_bad_rate_limits_name_the_fix(bad, words):
    with pytest.raises(ConfigError, match=words):
        parse_config({"gateway": {"auth": "disabled", "rate_limits": [bad]},
                      "backends": [{"name": "m", "arch": "transformer", "engine": "remote",
                                    "url": "http://127.0.0.1:1", "price_per_hour": 1.0}]})


def test_the_gateway_refuses_past_the_limit_with_retry_after(tmp_path):
    proc, backend = start_mock_upstream(tmp_path, "up1")
    keys = ["sk-a", "sk-b"]
    gw = {"api_key_hashes": [hashlib.sha256(k.encode()).hexdigest() for k in keys],
          "rate_limits": [{"name": "per-key", "rpm": 3}]}
    stack = start_stack(tmp_path, [backend], gateway=gw)
    body = {"model": "up1", "prompt": "hi", "max_tokens": 4}
    try:
        with httpx.Client(base_url=stack.base_url, trust_env=False, timeout=10) as c:
            def post(key):
                return c.post("/completions", json=body, headers={"authorization": f"Bearer {key}"})
            got = [post("sk-a") for _ in range(7)]  # 3 a minute: a turn of the minute admits 3 more
            codes = [r.status_code for r in got]
            assert codes[:3] == [200, 200, 200] and 429 in codes and codes.count(200) <= 6, codes
            for r in got:
                if r.status_code == 429:
                    assert r.json()["error"]["code"] == "rate_limit_exceeded"
                    assert 1 <= int(r.headers["retry-after"]) <= 60
            assert post("sk-b").status_code == 200  # the other key has its own rate
    finally:
        stop_process(stack.proc)
        stop_process(proc, 5)
    assert stack.proc.returncode == 0, log_tail(stack.log)
