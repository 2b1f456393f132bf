"""Per-key budgets in a live gateway: durable across a restart, and never overspent by more than
one reservation under concurrency (the ledger's own contract is tested, for SQLite and Redis
alike, in test_shared_state.py). Mock upstreams (no engine):
each answer uses 4 tokens (prompt 1 + completion 3); a request for prompt "hi" with max_tokens 4
reserves 4 (prompt upper bound) + 4 = 8 tokens.
"""
from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.serving.conftest import log_tail, start_mock_upstream, start_stack, stop_process

pytestmark = pytest.mark.timeout(60)

CAP_TOKENS = 10
RESERVATION = 8


@pytest.fixture(scope="module")
def mocks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ledger")
    proc, backend = start_mock_upstream(tmp, "up1")
    yield tmp, [backend]
    stop_process(proc, 5)


def _gateway(tmp, backends, ledger):
    return start_stack(tmp, backends, gateway={"ledger_path": str(ledger), "budgets": [
        {"name": "tokens-per-day", "tokens": CAP_TOKENS, "period": "day"}]})


def _post(stack, **extra) -> httpx.Response:
    return httpx.post(stack.base_url + "/completions", headers=stack.headers(), timeout=10, trust_env=False,
                      json={"model": "up1", "prompt": "hi", "max_tokens": 4, **extra})


def test_budget_survives_a_gateway_restart(mocks, tmp_path):
    tmp, backends = mocks
    ledger = tmp_path / "ledger.sqlite"
    stack = _gateway(tmp_path, backends, ledger)
    try:
        codes = [_post(stack).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]   # 0, 4, 8 spent: admitted; 12 >= 10: refused
        err = _post(stack).json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "budget_exceeded"
        assert "tokens-per-day" in err["message"] and "resets at" in err["message"]
    finally:
        stop_process(stack.proc)
    stack = _gateway(tmp_path, backends, ledger)
    try:
        assert _post(stack).status_code == 429
        status = httpx.get(stack.base_url + "/budgets", headers=stack.headers(), trust_env=False).json()
        assert status["data"][0]["spent_tokens"] == 12
    finally:
        stop_process(stack.proc)
    assert stack.proc.returncode == 0, log_tail(stack.log)


def test_concurrent_requests_overspend_by_at_most_one_reservation(mocks, tmp_path):
    tmp, backends = mocks
    stack = _gateway(tmp_path, backends, tmp_path / "ledger.sqlite")

    async def burst():
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            return await asyncio.gather(*(client.post(
                stack.base_url + "/completions", headers=stack.headers(),
                json={"model": "up1", "prompt": "hi", "max_tokens": 4, "delay_s": 0.5}) for _ in range(12)))
    try:
        codes = [r.status_code for r in asyncio.run(burst())]
        # 0 then 8 reserved are below the cap; 16 is not: two admitted while both are in flight
        assert codes.count(200) == 2 and codes.count(429) == 10
        status = httpx.get(stack.base_url + "/budgets", headers=stack.headers(), trust_env=False).json()
        spent = status["data"][0]["spent_tokens"]
        assert spent == 8 and spent <= CAP_TOKENS + RESERVATION
        assert status["data"][0]["reserved_tokens"] == 0
    finally:
        stop_process(stack.proc)
