"""Session trajectories: GET /v1/sessions/{id} breaks a session down by step kind, counts the tool
calls its answers asked for (whole and streamed), its wall time and its retries (failovers and
client retries), and Prometheus counts steps, step tokens and tool calls under a bounded label set.

The first tests hold the memory and Redis session books to one contract without processes; the
rest run a gateway over two mock upstreams (tests/serving/mock_upstream.py: `mock_tool_calls`
answers with tool calls, `mock_saturate` makes a mock answer 429 queue_full).
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import httpx
import pytest

from hybridserve.gateway import governor as G
from hybridserve.gateway.outcome import Outcome
from hybridserve.gateway.relay import tap_usage
from hybridserve.gateway.shared_state import RedisSessions
from tests.serving.conftest import log_tail, start_mock_upstream, start_stack, stop_process

pytestmark = pytest.mark.timeout(120)

ROW_SUMS = ("calls", "prompt_tokens", "completion_tokens", "cached_tokens", "tool_calls")


def assert_rows_sum_to_totals(s: dict) -> None:
    for name in ROW_SUMS:
        assert sum(row[name] for row in s["steps"].values()) == s[name], name
    assert sum(row["usd"] for row in s["steps"].values()) == pytest.approx(s["usd"])


# ---------------------------------------------------------------- the two books, one contract

def _book(kind: str, redis_url: str | None):
    if kind == "memory":
        return G.Sessions(None, None)
    return RedisSessions(redis_url, None, None, prefix=f"t{uuid.uuid4().hex[:8]}")


async def _settle(book, sid: str, step: G.Step, prompt: int, completion: int, usd: float) -> None:
    hold = await book.hold(sid, 10, 10, 0.0)
    hold.step = step
    book.settle(hold, "b", {"prompt_tokens": prompt, "completion_tokens": completion}, usd)


@pytest.fixture(params=["memory", "redis"])
def book_kind(request):
    return request.param


def test_both_books_keep_one_trajectory(book_kind, request):
    """Rows per kind that sum to the totals, the wall-time span, tool calls, failovers, a retried
    request id and a client's retry mark, and the cap on kinds: the same in memory and in Redis."""
    url = request.getfixturevalue("redis_url") if book_kind == "redis" else None

    async def go():
        book = _book(book_kind, url)
        t0 = 1_000.0
        await _settle(book, "s", G.Step("plan", t0, t0 + 2.0, cached_tokens=4, request_id="r1"), 10, 5, 0.25)
        await _settle(book, "s", G.Step("tool", t0 + 1.0, t0 + 1.5, tool_calls=2, failovers=1,
                                        request_id="r2"), 7, 3, 0.5)
        await _settle(book, "s", G.Step("tool", t0 + 3.0, t0 + 4.0, request_id="r2"), 1, 1, 0.0)  # a retry
        await _settle(book, "s", G.Step(G.UNSPECIFIED, t0 + 5.0, t0 + 6.0, client_retry=True,
                                        request_id="r3"), 2, 2, 0.0)
        for i in range(G.MAX_STEP_KINDS + 2):     # client-chosen kinds beyond the cap go to OTHER
            await _settle(book, "s", G.Step(f"k{i}", t0 + 6.0, t0 + 6.0, request_id=f"x{i}"), 0, 1, 0.0)
        s = (await book.get("s")).as_json(None, None)
        if book_kind == "redis":
            await book.close()
        return s

    s = asyncio.run(go())
    assert_rows_sum_to_totals(s)
    assert s["steps"]["plan"] == {"calls": 1, "prompt_tokens": 10, "completion_tokens": 5, "cached_tokens": 4,
                                  "usd": 0.25, "wall_s": 2.0, "tool_calls": 0}
    assert s["steps"]["tool"]["calls"] == 2 and s["steps"]["tool"]["wall_s"] == pytest.approx(1.5)
    assert (s["tool_calls"], s["failovers"], s["client_retries"], s["retries"]) == (2, 1, 2, 3)
    assert s["wall_s"] == pytest.approx(6.0) and s["first_call_at"] == pytest.approx(1_000.0)
    assert len(s["steps"]) == G.MAX_STEP_KINDS + 1 and s["steps"][G.OTHER]["calls"] == 5
    assert s["calls"] == 4 + G.MAX_STEP_KINDS + 2


def test_a_released_hold_books_no_step(book_kind, request):
    url = request.getfixturevalue("redis_url") if book_kind == "redis" else None

    async def go():
        book = _book(book_kind, url)
        book.release(await book.hold("s", 1, 1, 0.0))
        s = (await book.get("s")).as_json(None, None)
        if book_kind == "redis":
            await book.close()
        return s

    s = asyncio.run(go())
    assert (s["calls"], s["budget_hits"], s["steps"], s["wall_s"]) == (0, 1, {}, 0.0)


def test_stream_tap_shows_tool_call_deltas_and_relays_them_unchanged():
    events = [{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": j, "id": f"c{j}",
                                                                  "function": {"name": "f", "arguments": ""}}]}}]}
              for j in range(2)]
    events += [{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
                             "finish_reason": "tool_calls"}]}]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    for split in (None, 9):
        o = Outcome()
        chunks = [body] if split is None else [body[i:i + split] for i in range(0, len(body), split)]

        async def go():
            async def src():
                for c in chunks:
                    yield c
            return b"".join([c async for c in tap_usage(src(), lambda u: u, True, o.saw_tool_call_deltas)])
        assert asyncio.run(go()) == body
        assert o.tool_calls == 2                    # two calls, one of them in two deltas


# ---------------------------------------------------------------- a live gateway

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trajectory")
    p1, up1 = start_mock_upstream(tmp, "up1")
    p2, up2 = start_mock_upstream(tmp, "up2")
    up2["price_per_hour"] = 1.0          # `cheapest` tries up1 first
    try:
        s = start_stack(tmp, [up1, up2], gateway={"policy": "cheapest", "step_tiers": {"plan": "up1"}},
                        aliases={"pair": ["up1", "up2"]})
    except BaseException:
        for p in (p1, p2):
            stop_process(p, 5)
        raise
    yield s
    stop_process(s.proc)
    for p in (p1, p2):
        stop_process(p, 5)
    assert s.proc.returncode == 0, log_tail(s.log)


def post(stack, sid: str, kind: str | None = None, path: str = "/completions", headers=None, **body):
    h = {**stack.headers(), "X-Session-Id": sid, **(headers or {})}
    if kind:
        h["X-Step-Kind"] = kind
    return httpx.post(stack.base_url + path, headers=h, timeout=30, trust_env=False,
                      json={"model": "up1", "prompt": "hi", "max_tokens": 4, **body})


def session(stack, sid: str) -> dict:
    r = httpx.get(f"{stack.base_url}/sessions/{sid}", headers=stack.headers(), timeout=10, trust_env=False)
    assert r.status_code == 200, r.text
    return r.json()


def test_breakdown_tool_calls_and_wall_time(stack):
    sid = f"agent-{uuid.uuid4().hex[:6]}"
    assert post(stack, sid, "plan").status_code == 200
    unary = post(stack, sid, "tool", path="/chat/completions", mock_tool_calls=2,
                 messages=[{"role": "user", "content": "look it up"}])
    assert unary.json()["choices"][0]["finish_reason"] == "tool_calls"
    with httpx.stream("POST", stack.base_url + "/chat/completions", timeout=30, trust_env=False,
                      headers={**stack.headers(), "X-Session-Id": sid, "X-Step-Kind": "tool"},
                      json={"model": "up1", "messages": [{"role": "user", "content": "x"}], "stream": True,
                            "max_tokens": 8, "mock_tool_calls": 3}) as r:
        text = "".join(r.iter_text())
    deltas = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
    assert sum(len(d["choices"][0]["delta"].get("tool_calls", [])) for d in deltas if d["choices"]) == 6
    assert post(stack, sid).status_code == 200            # no X-Step-Kind
    first = session(stack, sid)
    assert_rows_sum_to_totals(first)
    assert set(first["steps"]) == {"plan", "tool", G.UNSPECIFIED}
    assert first["tool_calls"] == 2 + 3 and first["steps"]["tool"]["tool_calls"] == 5
    assert first["steps"]["tool"]["calls"] == 2 and first["steps"]["tool"]["cached_tokens"] == 2 * 3
    assert first["cached_tokens"] == 6 and first["retries"] == 0
    assert 0 < first["wall_s"] and first["wall_s"] >= max(r["wall_s"] for r in first["steps"].values())
    time.sleep(0.3)
    assert post(stack, sid, "answer").status_code == 200
    later = session(stack, sid)
    assert later["wall_s"] >= first["wall_s"] + 0.3 and later["calls"] == first["calls"] + 1
    assert_rows_sum_to_totals(later)


def test_failovers_and_client_retries_are_counted(stack):
    sid = f"retry-{uuid.uuid4().hex[:6]}"
    r = post(stack, sid, "tool", model="pair", mock_saturate=["up1"])
    assert r.status_code == 200 and r.headers["x-hybridserve-backend"] == "up2"
    s = session(stack, sid)
    assert (s["failovers"], s["client_retries"], s["retries"]) == (1, 0, 1)
    assert post(stack, sid, headers={"x-request-id": "same-id-1"}).status_code == 200
    assert post(stack, sid, headers={"x-request-id": "same-id-1"}).status_code == 200   # sent again
    assert post(stack, sid, headers={"x-stainless-retry-count": "1"}).status_code == 200
    s = session(stack, sid)
    assert (s["failovers"], s["client_retries"], s["retries"], s["calls"]) == (1, 2, 3, 4)


def test_step_labels_are_capped(stack):
    sid = f"labels-{uuid.uuid4().hex[:6]}"
    for kind in ("plan", "made-up-kind", "another-one", None):
        assert post(stack, sid, kind).status_code == 200
    assert post(stack, sid, "plan", model="pair", mock_saturate=["up1"]).status_code == 200   # one failover
    assert post(stack, sid, "made-up-kind", path="/chat/completions", mock_tool_calls=1,
                messages=[{"role": "user", "content": "x"}]).status_code == 200
    text = httpx.get(stack.url + "/metrics", timeout=10, trust_env=False).text
    labels = set(re.findall(r'hybridserve_gateway_session_steps_total\{step_kind="([^"]*)"\}', text))
    assert labels == {"plan", "other", G.UNSPECIFIED}
    assert re.search(r'hybridserve_gateway_tool_calls_total\{step_kind="other"\} [1-9]', text)
    assert re.search(r'hybridserve_gateway_session_step_tokens_total\{kind="cached",step_kind="other"\} [1-9]', text)
    assert "made-up-kind" not in text and "made-up-kind" in session(stack, sid)["steps"]
    assert re.search(r"^hybridserve_sessions_failovers [1-9]", text, re.M)   # the session gauges count them too
