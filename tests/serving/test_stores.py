"""Every store implementation satisfies its protocol (`gateway.stores`) structurally: it has each
member, and each method has the protocol's signature (names, kinds, defaults, annotations) and
is a coroutine exactly where the protocol's is. The Redis stores are built against a real
redis-server."""
from __future__ import annotations

import asyncio
import inspect
import uuid

import pytest

from hybridserve.config import BudgetConfig
from hybridserve.gateway import governor as G
from hybridserve.gateway.ledger import Ledger
from hybridserve.gateway.shared_state import RedisLedger, RedisSessions
from hybridserve.gateway.stores import BudgetStore, SessionBook

BUDGETS = [BudgetConfig(name="daily", tokens=100)]


def members(proto: type) -> tuple[list[str], list[str]]:
    """(data attributes, methods) the protocol declares."""
    methods = [n for n, v in vars(proto).items() if not n.startswith("_") and inspect.isfunction(v)]
    return list(proto.__annotations__), methods


def drift(proto: type, impl: type) -> list[str]:
    """How `impl`'s methods differ from the protocol's (empty when they match)."""
    out = []
    for name in members(proto)[1]:
        want, got = getattr(proto, name), getattr(impl, name, None)
        if got is None:
            out.append(f"{name}: missing")
            continue
        if inspect.iscoroutinefunction(want) != inspect.iscoroutinefunction(got):
            out.append(f"{name}: {'a coroutine' if inspect.iscoroutinefunction(want) else 'plain'} in the protocol")
        a, b = inspect.signature(want), inspect.signature(got)
        if a != b:
            out.append(f"{name}{b} is not {name}{a}")
    return out


def stores(kind: str, tmp_path, request):
    """(budget store, session book) of one kind."""
    if kind == "local":
        return Ledger(tmp_path / "l.sqlite", BUDGETS), G.Sessions(100, None)
    url, prefix = request.getfixturevalue("redis_url"), f"t{uuid.uuid4().hex[:8]}"
    return RedisLedger(url, BUDGETS, prefix=prefix), RedisSessions(url, 100, None, prefix=prefix)


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_each_store_satisfies_its_protocol(kind, tmp_path, request):
    ledger, sessions = stores(kind, tmp_path, request)
    for store, proto in ((ledger, BudgetStore), (sessions, SessionBook)):
        assert isinstance(store, proto), f"{type(store).__name__} is not a {proto.__name__}"
        data, methods = members(proto)
        assert methods and all(hasattr(store, name) for name in data)
        assert drift(proto, type(store)) == [], type(store).__name__

    async def close():
        await ledger.close()
        await sessions.close()
    asyncio.run(close())


def test_a_drifting_signature_is_caught():
    class Drifted:
        budgets: list = []

        def reserve(self, key, usd, tokens):        # not a coroutine, no annotations
            ...

        def settle(self, res, usd: float, tokens: int) -> None:   # no request_id
            ...

    problems = drift(BudgetStore, Drifted)
    assert any(p.startswith("reserve: a coroutine") for p in problems)
    assert any(p.startswith("settle(") for p in problems)
    assert "status: missing" in problems and "close: missing" in problems
    assert not isinstance(Drifted(), BudgetStore)
