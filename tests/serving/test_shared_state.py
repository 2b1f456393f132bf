"""Budgets and sessions shared by several gateway replicas through a real Redis server.

The same contracts as the local ledger and session book (the scenarios below run on both),
plus what only sharing brings: replicas admitting at once still overspend by at most one
reservation in all, a dead replica's reservations expire, a retried settle books once, a
settle waits out a Redis pause, and a Redis that does not answer refuses (503), never admits.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import signal
import uuid

import httpx
import pytest

from hybridserve.config import BudgetConfig
from hybridserve.errors import BudgetExceededError, StateUnavailableError
from hybridserve.gateway import governor as G
from hybridserve.gateway.ledger import Ledger
from hybridserve.gateway.shared_state import RedisLedger, RedisSessions
from tests.serving.conftest import (free_port, log_tail, start_mock_upstream, start_redis, start_stack,
                                    stop_process)

pytestmark = pytest.mark.timeout(90)

DAY0 = 86400.0 * 100 + 10


@pytest.fixture()
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


class Clock:
    def __init__(self, t: float = DAY0):
        self.t = t

    def __call__(self) -> float:
        return self.t


async def call(method, *args):
    """The stores' common call: local ones answer at once, Redis ones return a coroutine."""
    out = method(*args)
    return await out if inspect.isawaitable(out) else out


def _ledger(kind: str, tmp_path, redis_url: str, prefix: str, budgets, clock, **kw):
    if kind == "sqlite":
        return Ledger(tmp_path / "l.sqlite", budgets, clock=clock)
    return RedisLedger(redis_url, budgets, prefix=prefix, clock=clock, **kw)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_both_ledgers_keep_the_same_contract(kind, tmp_path, redis_url, prefix):
    async def go():
        clock = Clock()
        budgets = [BudgetConfig(name="daily", tokens=10, usd=1.0)]
        ledger = _ledger(kind, tmp_path, redis_url, prefix, budgets, clock)
        a = await call(ledger.reserve, "k", 0.1, 8)
        b = await call(ledger.reserve, "k", 0.1, 8)   # spent + reserved (8) is below 10: admitted
        assert (await call(ledger.status, "k"))[0]["reserved_tokens"] == 16
        with pytest.raises(BudgetExceededError) as err:
            await call(ledger.reserve, "k", 0.1, 8)   # 16 reserved: refused
        assert "'daily' (10 tokens per day)" in err.value.message and "resets at" in err.value.message
        ledger.settle(a, 0.01, 4)
        ledger.settle(a, 0.01, 4)                     # settling twice books once
        ledger.settle(b, 0.01, 4)
        st = (await call(ledger.status, "k"))[0]
        assert (st["spent_tokens"], st["reserved_tokens"]) == (8, 0)
        assert st["spent_usd"] == pytest.approx(0.02)
        await call(ledger.reserve, "other", 0.1, 8)   # '*' budgets are per key
        clock.t += 86400                              # next day: a fresh window
        assert (await call(ledger.status, "k"))[0]["spent_tokens"] == 0
        await call(ledger.reserve, "k", 0.1, 8)
        await call(ledger.close)
        clock.t -= 86400
        again = _ledger(kind, tmp_path, redis_url, prefix, [BudgetConfig(name="daily", tokens=10)], clock)
        assert (await call(again.status, "k"))[0]["spent_tokens"] == 8   # the spend outlived the instance
        await call(again.close)
    asyncio.run(go())


def test_dollar_cap_is_named_when_it_is_the_one_hit(redis_url, prefix):
    async def go():
        ledger = RedisLedger(redis_url, [BudgetConfig(name="usd", usd=0.5, tokens=10_000)], prefix=prefix,
                             clock=Clock())
        await ledger.reserve("k", 0.6, 10)
        with pytest.raises(BudgetExceededError) as err:
            await ledger.reserve("k", 0.1, 10)
        assert "'usd' ($0.5 per day)" in err.value.message
        assert "across every gateway replica" in err.value.message
        await ledger.close()
    asyncio.run(go())


def test_two_replicas_admitting_at_once_overspend_by_one_reservation_in_all(redis_url, prefix):
    """Forty admissions at once over two replicas (each with its own connections) race for a
    10-token cap with 8-token reservations: 0 and 8 reserved are below the cap, so exactly two
    are admitted."""
    async def go():
        budgets = [BudgetConfig(name="daily", tokens=10)]
        replicas = [RedisLedger(redis_url, budgets, prefix=prefix) for _ in range(2)]
        out = await asyncio.gather(*(replicas[i % 2].reserve("k", 0.0, 8) for i in range(40)),
                                   return_exceptions=True)
        refused = [o for o in out if isinstance(o, BudgetExceededError)]
        assert (len(out) - len(refused), len(refused)) == (2, 38)
        assert (await replicas[1].status("k"))[0]["reserved_tokens"] == 16
        for r in replicas:
            await r.close()
    asyncio.run(go())


def test_a_dead_replicas_reservations_expire(redis_url, prefix):
    async def go():
        clock = Clock()
        budgets = [BudgetConfig(name="daily", tokens=10)]
        dead = RedisLedger(redis_url, budgets, prefix=prefix, clock=clock, lease_s=120)
        live = RedisLedger(redis_url, budgets, prefix=prefix, clock=clock, lease_s=120)
        await dead.reserve("k", 0.0, 8)
        await dead.reserve("k", 0.0, 8)             # then the replica dies: never settled
        with pytest.raises(BudgetExceededError):
            await live.reserve("k", 0.0, 8)
        clock.t += 121                              # past their lease
        assert (await live.status("k"))[0]["reserved_tokens"] == 0
        live.settle(await live.reserve("k", 0.0, 8), 0.0, 5)
        assert (await live.status("k"))[0]["spent_tokens"] == 5
        await dead.close()
        await live.close()
    asyncio.run(go())


def test_a_retried_settle_books_once(redis_url, prefix):
    """A settle whose reply was lost is sent again; the reservation's marker makes it a no-op."""
    async def go():
        ledger = RedisLedger(redis_url, [BudgetConfig(name="daily", tokens=100)], prefix=prefix, clock=Clock())
        queued = []
        put = ledger.writer.put
        ledger.writer.put = lambda write, what="": (queued.append(write), put(write, what))
        ledger.settle(await ledger.reserve("k", 0.0, 8), 0.0, 6)
        await ledger.writer.flush()
        assert await queued[0]() == 0               # the retry: already booked
        assert (await ledger.status("k"))[0]["spent_tokens"] == 6
        await ledger.close()
    asyncio.run(go())


def test_settles_wait_out_a_redis_pause(tmp_path, prefix):
    """Settles queued while Redis is frozen (SIGSTOP) are booked once it runs again, and an
    admission that timed out meanwhile is cancelled rather than left holding budget."""
    proc, url = start_redis(tmp_path)

    async def go():
        ledger = RedisLedger(url, [BudgetConfig(name="daily", tokens=100)], prefix=prefix, timeout_s=0.2)
        res = [await ledger.reserve("k", 0.0, 8) for _ in range(3)]
        os.kill(proc.pid, signal.SIGSTOP)
        for r in res:
            ledger.settle(r, 0.0, 2)                # returns at once: the writer task retries
        with pytest.raises(StateUnavailableError):
            await ledger.reserve("k", 0.0, 8)       # admission does not wait: 503 within the timeout
        asyncio.get_running_loop().call_later(0.6, os.kill, proc.pid, signal.SIGCONT)
        await ledger.writer.flush(10)
        st = (await ledger.status("k"))[0]
        assert (st["spent_tokens"], st["reserved_tokens"]) == (6, 0)
        await ledger.close()
    try:
        asyncio.run(go())
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(10)


def test_redis_away_fails_closed_with_a_503_that_hides_the_password(prefix):
    async def go():
        url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
        ledger = RedisLedger(url, [BudgetConfig(name="daily", tokens=10)], prefix=prefix, timeout_s=0.2)
        sessions = RedisSessions(url, 100, None, prefix=prefix, timeout_s=0.2)
        for admit in (lambda: ledger.reserve("k", 0.0, 1), lambda: sessions.hold("s", 1, 1, 0.0),
                      sessions.refresh_totals):
            with pytest.raises(StateUnavailableError) as err:
                await admit()
            e = err.value
            assert e.status_code == 503 and e.code == "state_unavailable"
            assert "redis://:***@127.0.0.1" in e.message and "hunter2" not in e.message
        with pytest.raises(StateUnavailableError):
            sessions.totals()                       # no stale gauges after a failed read
        for store in (ledger, sessions):
            await store.writer.close(timeout_s=0.1)  # its queued cancellations would retry for 60 s
            await store.close()
    asyncio.run(go())


def _sessions(kind, redis_url, prefix, max_tokens, max_usd):
    if kind == "memory":
        return G.Sessions(max_tokens, max_usd)
    return RedisSessions(redis_url, max_tokens, max_usd, prefix=prefix)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_both_session_books_hold_every_sample(kind, redis_url, prefix):
    """n completions hold n × the cut: max_tokens is cut so that all of them fit."""
    async def go():
        sessions = _sessions(kind, redis_url, prefix, 100, None)
        h = await call(sessions.hold, "s", 10, 40, 0.0, G.PUBLIC, 3)
        assert (h.cut_to, h.limit, h.tokens) == (30, 30, 100)    # (100 - 10) // 3; 3 × 40 would not fit
        assert (await call(sessions.get, "s")).reserved_tokens == 100
        with pytest.raises(BudgetExceededError):
            await call(sessions.hold, "s", 1, 40, 0.0)
        if kind == "redis":
            await sessions.close()
    asyncio.run(go())


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_both_session_books_keep_the_same_contract(kind, redis_url, prefix):
    async def go():
        sessions = _sessions(kind, redis_url, prefix, 100, None)
        holds = []
        with pytest.raises(BudgetExceededError) as err:
            for _ in range(10):  # concurrent calls: nothing settles in between
                holds.append(await call(sessions.hold, "s", 10, 30, 0.0))
        assert err.value.code == "session_budget_exceeded"
        assert sum(h.tokens for h in holds) <= 100
        assert [h.cut_to for h in holds] == [None, None, 10]   # 40 + 40, then what is left: 100 - 80 - 10
        sessions.settle(holds[0], "b", {"prompt_tokens": 5, "completion_tokens": 3, "thinking_tokens": 2},
                        0.01)
        sessions.settle(holds[0], "b", {"prompt_tokens": 5, "completion_tokens": 3}, 0.01)  # once only
        sessions.release(holds[1])                 # refused later by a key budget: a hit, not a call
        s = await call(sessions.get, "s")
        assert (s.calls, s.tokens, s.thinking_tokens, s.budget_hits, s.reserved_tokens) == (1, 8, 2, 2, 20)
        assert s.usd == pytest.approx(0.01) and s.backends == {"b": 1}
        assert s.as_json(100, None)["in_flight_tokens"] == 20
        assert await call(sessions.get, "nobody") is None
        if kind == "redis":
            await sessions.refresh_totals()
        t = sessions.totals()
        assert (t["sessions"], t["calls"], t["prompt_tokens"], t["budget_hits"]) == (1, 1, 5, 2)
        usd = _sessions(kind, redis_url, prefix + "u", None, 1.0)
        assert (await call(usd.hold, "u", 1, 100, 4.0)).cut_to == 25  # $1 left buys a quarter of $4
        for store in (sessions, usd):
            if kind == "redis":
                await store.close()
    asyncio.run(go())


def test_a_session_spans_replicas(redis_url, prefix):
    async def go():
        a, b = (RedisSessions(redis_url, 100, None, prefix=prefix) for _ in range(2))
        h = await a.hold("agent-1", 10, 30, 0.0)
        assert (await b.hold("agent-1", 10, 30, 0.0)).cut_to is None   # 40 held on a, 40 more on b
        assert (await b.hold("agent-1", 10, 30, 0.0)).cut_to == 10     # what is left, whoever asks
        a.settle(h, "x", {"prompt_tokens": 10, "completion_tokens": 30}, 0.0)
        await a.writer.flush()
        assert (await b.get("agent-1")).tokens == 40
        for s in (a, b):
            await s.close()
    asyncio.run(go())


# ---------------------------------------------------------------- two live gateway replicas

@pytest.fixture(scope="module")
def mock(tmp_path_factory):
    proc, backend = start_mock_upstream(tmp_path_factory.mktemp("shared"), "up1")
    yield [backend]
    stop_process(proc, 5)


def test_two_gateway_replicas_enforce_one_budget_and_one_session(mock, redis_url, prefix, tmp_path):
    """Each answer uses 4 tokens; a request reserves 4 (prompt upper bound) + 4 = 8; cap 10."""
    gw = {"state_url": redis_url, "state_prefix": prefix, "session_max_tokens": 1000,
          "budgets": [{"name": "tokens-per-day", "tokens": 10, "period": "day"}]}
    stacks = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        stacks.append(start_stack(tmp_path / name, mock, gateway=gw))
    a, b = stacks

    def post(stack, **extra):
        return httpx.post(stack.base_url + "/completions", timeout=10, trust_env=False,
                          headers={**stack.headers(), "X-Session-Id": "agent-7"},
                          json={"model": "up1", "prompt": "hi", "max_tokens": 4, **extra})
    try:
        async def burst():
            async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
                return await asyncio.gather(*(client.post(
                    s.base_url + "/completions", headers=s.headers(),
                    json={"model": "up1", "prompt": "hi", "max_tokens": 4, "delay_s": 0.5})
                    for s in (a, b) * 6))
        codes = [r.status_code for r in asyncio.run(burst())]
        # one cap across both replicas: two admitted in all (two replicas alone would admit four)
        assert codes.count(200) == 2 and codes.count(429) == 10, codes
        assert post(a).status_code == 200                    # 8 spent: admitted (8 < 10)
        err = post(b).json()["error"]                        # 12 spent, seen by the other replica
        assert err["code"] == "budget_exceeded" and "across every gateway replica" in err["message"]
        status = httpx.get(b.base_url + "/budgets", headers=b.headers(), trust_env=False).json()["data"][0]
        assert (status["spent_tokens"], status["reserved_tokens"]) == (12, 0)
        session = httpx.get(b.base_url + "/sessions/agent-7", headers=b.headers(), trust_env=False).json()
        assert (session["calls"], session["tokens"], session["budget_hits"]) == (1, 4, 1)
        metrics = httpx.get(a.url + "/metrics", trust_env=False).text
        assert "hybridserve_sessions 1.0" in metrics and "hybridserve_sessions_budget_hits 1.0" in metrics
        assert "budgets and sessions shared through" in a.log.read_text()
    finally:
        for s in stacks:
            stop_process(s.proc)
    for s in stacks:
        assert s.proc.returncode == 0, log_tail(s.log)
