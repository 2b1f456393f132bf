"""The governor and the stream usage tap, without processes: controls, votes, session caps."""
from __future__ import annotations

import asyncio
import json

import pytest

from hybridserve import protocol as P
from hybridserve.config import GatewayConfig
from hybridserve.errors import BudgetExceededError, InvalidRequestError
from hybridserve.gateway import governor as G
from hybridserve.gateway.relay import tap_usage

GW = GatewayConfig(auth="disabled")


def test_modes_and_efforts_become_thinking_budgets():
    assert G.parse_controls({"mode": "fast"}, GW, False) == G.Controls(0, False, "fast", "cheapest", False)
    deep = G.parse_controls({"mode": "deep"}, GW, False)
    assert deep.thinking == GW.thinking_budgets["high"] and deep.top_tier
    assert G.parse_controls({"reasoning_effort": "medium", "max_thinking_tokens": 50}, GW, False).thinking == 50
    assert G.parse_controls({"reasoning_effort": "low", "max_thinking_tokens": 5000}, GW, False).thinking == 256
    assert not G.parse_controls({}, GW, False).active
    for bad, param in [({"mode": "slow"}, "mode"), ({"max_thinking_tokens": -1}, "max_thinking_tokens"),
                       ({"hybridserve_vote": True, "n": 3}, "hybridserve_vote")]:
        with pytest.raises(InvalidRequestError) as err:
            G.parse_controls(bad, GW, stream=True)
        assert err.value.param == param


def test_thinking_cap_goes_to_native_workers_and_caps_max_tokens_elsewhere():
    ctl = G.Controls(thinking=100)
    data = {"model": "auto", "prompt": "x", "mode": "deep", "reasoning_effort": "high", "max_tokens": 1000}
    native = G.upstream_fields(data, ctl, native=True, max_tokens=1000)
    assert native["max_thinking_tokens"] == 100 and native["max_tokens"] == 1000
    assert "mode" not in native and "reasoning_effort" not in native
    other = G.upstream_fields(data, ctl, native=False, max_tokens=1000)
    assert "max_thinking_tokens" not in other and other["max_tokens"] == 100 + G.ANSWER_BUDGET_TOKENS
    chat = G.upstream_fields({"max_completion_tokens": 9}, G.Controls(), native=True, max_tokens=5)
    assert chat == {"max_completion_tokens": 5}


def test_vote_takes_the_majority_answer_after_thinking():
    texts = ["<think>a</think> 42.", "<think>b</think>41", "<think>c</think>  42 ", "41"]
    choices = [{"index": i, "text": t, "finish_reason": "stop"} for i, t in enumerate(texts)]
    winner, tally = G.vote(choices, chat=False)
    assert winner["text"] == texts[0] and winner["index"] == 0  # 2-2 tie: the earliest sample wins
    assert tally == {"samples": 4, "agreeing": 2, "distinct_answers": 2, "winner_sample": 0}
    chat = [{"index": i, "message": {"role": "assistant", "content": c}} for i, c in enumerate(["no", "Yes", "yes"])]
    assert G.vote(chat, chat=True)[0]["message"]["content"] == "Yes"


def test_session_holds_never_exceed_the_cap_together():
    async def go():
        sessions = G.Sessions(max_tokens=100, max_usd=None)
        holds = []
        with pytest.raises(BudgetExceededError):
            for _ in range(10):  # concurrent calls: nothing settles in between
                holds.append(await sessions.hold("s", prompt_upper=10, max_tokens=30, usd_for_max=0.0))
        assert sum(h.tokens for h in holds) <= 100
        assert [h.cut_to for h in holds] == [None, None, 10]   # 40 + 40, then what is left: 100 - 80 - 10
        sessions.settle(holds[0], "b", {"prompt_tokens": 5, "completion_tokens": 3}, 0.01)
        s = await sessions.get("s")
        assert (s.calls, s.tokens, s.budget_hits, s.reserved_tokens) == (1, 8, 1, 60)
        usd = G.Sessions(max_tokens=None, max_usd=1.0)
        assert (await usd.hold("u", 1, 100, usd_for_max=4.0)).cut_to == 25  # $1 left buys a quarter of $4
    asyncio.run(go())


def test_the_session_cap_is_per_tenant():
    """Tenant A opening more sessions than the book keeps pushes out only A's own oldest ones:
    tenant B's session keeps its spend and still admits B."""
    async def go():
        sessions = G.Sessions(max_tokens=100, max_usd=None, max_sessions=5)
        h = await sessions.hold("b-agent", 10, 30, 0.0, owner="B")
        sessions.settle(h, "x", {"prompt_tokens": 10, "completion_tokens": 30}, 0.0)
        for i in range(50):
            await sessions.hold(f"a-{i}", 1, 1, 0.0, owner="A")
        b = await sessions.get("b-agent", "B")
        assert b is not None and (b.calls, b.tokens) == (1, 40)          # neither evicted nor reset
        assert (await sessions.hold("b-agent", 10, 30, 0.0, owner="B")).cut_to is None
        assert await sessions.get("a-44", "A") is None                   # A keeps its 5 newest
        assert all([await sessions.get(f"a-{i}", "A") for i in range(45, 50)])
        assert sessions.totals()["sessions"] == 5 + 1
    asyncio.run(go())


def test_the_per_tenant_cap_defaults_to_max_sessions(monkeypatch):
    assert G.Sessions(None, None).max_sessions == G.MAX_SESSIONS == 10_000
    monkeypatch.setattr(G, "MAX_SESSIONS", 3)     # the old module-level setting still works
    assert G.Sessions(None, None).max_sessions == 3
    with pytest.raises(ValueError, match="max_sessions"):
        G.Sessions(None, None, max_sessions=0)


def _events(*objs) -> bytes:
    return b"".join(P.sse(o) for o in objs) + P.SSE_DONE


def _run(chunks, keep):
    seen = []

    def on_usage(u):
        seen.append(dict(u))
        return {**u, "cost_usd": 1.5}

    async def go():
        async def src():
            for c in chunks:
                yield c
        return b"".join([c async for c in tap_usage(src(), on_usage, keep)])
    return asyncio.run(go()), seen


@pytest.mark.parametrize("split", [None, 7, 40])
def test_stream_tap_reads_usage_and_strips_it_when_not_asked(split):
    body = _events({"choices": [{"index": 0, "text": "a"}], "usage": None},
                   {"choices": [{"index": 0, "text": "b"}], "usage": None},
                   {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}})
    chunks = [body] if split is None else [body[i:i + split] for i in range(0, len(body), split)]
    kept, seen = _run(chunks, keep=True)
    assert seen == [{"prompt_tokens": 2, "completion_tokens": 2}]
    events = [json.loads(e[6:]) for e in kept.split(b"\n\n") if e.startswith(b"data: {")]
    assert events[-1]["usage"]["cost_usd"] == 1.5 and kept.endswith(P.SSE_DONE)
    dropped, seen = _run(chunks, keep=False)
    assert len(seen) == 1 and b"usage" not in dropped and dropped.endswith(P.SSE_DONE)
    assert [json.loads(e[6:])["choices"][0]["text"] for e in dropped.split(b"\n\n")
            if e.startswith(b"data: {")] == ["a", "b"]
