"""Sessions belong to the key that opened them, in the memory book and in Redis alike.

The same session id sent with another key is another session: it neither reads nor spends
the first one. Through a live gateway (auth required, two keys, mock upstream): each answer
uses 4 tokens and a request for prompt "hi" with max_tokens 4 holds 4 (prompt upper bound) +
4 = 8 tokens, so a 20-token session cap admits four calls (the fifth would need 16 + 4 + 1).
"""
from __future__ import annotations

import asyncio
import hashlib
import inspect
import uuid

import httpx
import pytest

from hybridserve.config import GatewayConfig
from hybridserve.errors import BudgetExceededError
from hybridserve.gateway import governor as G
from hybridserve.gateway.auth import KeyChecker, hash_key
from hybridserve.gateway.shared_state import RedisSessions
from tests.serving.conftest import log_tail, start_mock_upstream, start_stack, stop_process

pytestmark = pytest.mark.timeout(90)

KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"
A, B = hash_key(KEY_A), hash_key(KEY_B)
CAP = 20


async def call(method, *args, **kw):
    out = method(*args, **kw)
    return await out if inspect.isawaitable(out) else out


def book(kind: str, request) -> G.Sessions | RedisSessions:
    if kind == "memory":
        return G.Sessions(CAP, None)
    url = request.getfixturevalue("redis_url")
    return RedisSessions(url, CAP, None, prefix=f"t{uuid.uuid4().hex[:8]}")


async def spend_all(sessions, sid: str, owner: str) -> int:
    """Hold and settle 4-token calls until the session refuses; the number admitted."""
    admitted = 0
    while True:
        try:
            h = await call(sessions.hold, sid, 4, 4, 0.0, owner=owner)
        except BudgetExceededError:
            return admitted
        sessions.settle(h, "b", {"prompt_tokens": 1, "completion_tokens": 3}, 0.0)
        if isinstance(sessions, RedisSessions):
            await sessions.writer.flush()
        admitted += 1


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_one_id_under_two_keys_is_two_sessions(kind, request):
    async def go():
        sessions = book(kind, request)
        assert await spend_all(sessions, "agent", A) == 4
        a = await call(sessions.get, "agent", A)
        assert (a.calls, a.tokens, a.budget_hits) == (4, 16, 1)
        assert await call(sessions.get, "agent", B) is None       # B cannot see A's session
        assert await spend_all(sessions, "agent", B) == 4         # B's has A's whole cap of its own
        a2 = await call(sessions.get, "agent", A)
        assert (a2.calls, a2.tokens, a2.budget_hits) == (4, 16, 1)   # and spent nothing of A's
        assert (await call(sessions.get, "agent", B)).calls == 4
        assert await call(sessions.get, "agent", G.PUBLIC) is None
        if kind == "redis":
            await sessions.close()
    asyncio.run(go())


def test_redis_session_keys_name_the_tenant_and_keep_holds_apart(redis_url):
    s = RedisSessions(redis_url, CAP, None, prefix="p")
    assert s._keys("x", A)[:2] == [f"p:session:{A}:x", f"p:session-held:{A}:x"]
    assert s._keys("x", G.PUBLIC)[0] == "p:session:-:x"
    # no session id can name another session's holds, nor another tenant's session
    assert s._keys("x:held", A)[0] not in s._keys("x", A)[1:]
    assert s._keys(f"{A}:x", G.PUBLIC)[0] != s._keys("x", A)[0]


def test_without_auth_every_caller_is_one_tenant():
    open_gw = KeyChecker(GatewayConfig(auth="disabled"))
    assert open_gw.tenant(open_gw.check(f"Bearer {KEY_A}")) == open_gw.tenant(open_gw.check(None)) == G.PUBLIC
    keyed = KeyChecker(GatewayConfig(auth="required", api_key_hashes=[A, B]))
    assert keyed.tenant(keyed.check(f"Bearer {KEY_A}")) == A != keyed.tenant(keyed.check(f"Bearer {KEY_B}"))


# ---------------------------------------------------------------- a live gateway

@pytest.fixture(scope="module")
def mock(tmp_path_factory):
    proc, backend = start_mock_upstream(tmp_path_factory.mktemp("owned"), "up1")
    yield [backend]
    stop_process(proc, 5)


def _headers(key: str, sid: str = "agent-1") -> dict:
    return {"authorization": f"Bearer {key}", "x-session-id": sid}


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_another_key_can_neither_read_nor_spend_a_session(kind, mock, request, tmp_path):
    gw = {"api_key_hashes": [hashlib.sha256(k.encode()).hexdigest() for k in (KEY_A, KEY_B)],
          "session_max_tokens": CAP}
    if kind == "redis":
        gw |= {"state_url": request.getfixturevalue("redis_url"), "state_prefix": f"t{uuid.uuid4().hex[:8]}"}
    stack = start_stack(tmp_path, mock, gateway=gw)
    body = {"model": "up1", "prompt": "hi", "max_tokens": 4}
    try:
        with httpx.Client(base_url=stack.base_url, trust_env=False, timeout=10) as c:
            def read(key: str, sid: str = "agent-1") -> httpx.Response:
                return c.get(f"/sessions/{sid}", headers={"authorization": f"Bearer {key}"})

            def calls(key: str) -> list[int]:
                """Five calls in session agent-1; a read after each waits out Redis's queued settles."""
                codes = []
                for _ in range(5):
                    codes.append(c.post("/completions", json=body, headers=_headers(key)).status_code)
                    read(key)
                return codes

            assert calls(KEY_A) == [200, 200, 200, 200, 429]
            mine = read(KEY_A).json()
            assert (mine["id"], mine["calls"], mine["tokens"], mine["budget_hits"]) == ("agent-1", 4, 16, 1)
            theirs = read(KEY_B)
            assert theirs.status_code == 404
            err = theirs.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and "agent-1" in err["message"]
            # B's calls with A's session id open B's own session: A's exhausted cap does not refuse them
            assert calls(KEY_B) == [200, 200, 200, 200, 429]
            assert read(KEY_A).json() == mine                    # nothing of B's landed in A's
            b = read(KEY_B).json()
            assert (b["calls"], b["tokens"], b["budget_hits"]) == (4, 16, 1)
            r = c.post("/completions", json=body, headers=_headers(KEY_B, "agent-2"))
            assert r.json()["usage"]["session_id"] == "agent-2"  # the client's id, not the internal one
            assert read(KEY_A, "agent-2").status_code == 404
    finally:
        stop_process(stack.proc)
    assert stack.proc.returncode == 0, log_tail(stack.log)


def test_prefix_caches_belong_to_their_key_too(mock, tmp_path):
    """Each tenant's requests reach the backend with its own cache_salt (a client's own salt is folded
    in, never taking the tenant's place), so one key's cached prefixes neither speed up nor reveal
    themselves to another's; the client's bytes are otherwise forwarded as sent."""
    gw = {"api_key_hashes": [hashlib.sha256(k.encode()).hexdigest() for k in (KEY_A, KEY_B)]}
    stack = start_stack(tmp_path, mock, gateway=gw)
    url = mock[0]["url"]

    def sent(key: str, **extra) -> dict:
        body = {"model": "up1", "prompt": "hi", "max_tokens": 4, **extra}
        r = httpx.post(stack.base_url + "/completions", json=body, trust_env=False, timeout=10,
                       headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        return httpx.get(url + "/stats", trust_env=False).json()["last_body"]

    try:
        a, a2, b = sent(KEY_A), sent(KEY_A), sent(KEY_B)
        assert a["cache_salt"] == a2["cache_salt"] != b["cache_salt"]
        assert {k: v for k, v in a.items() if k != "cache_salt"} == {"model": "up1", "prompt": "hi", "max_tokens": 4}
        own = sent(KEY_B, cache_salt=a["cache_salt"])  # B naming A's salt lands in a namespace of B's
        assert own["cache_salt"] not in (a["cache_salt"], b["cache_salt"])
        r = httpx.post(stack.base_url + "/completions", trust_env=False, timeout=10,
                       json={"model": "up1", "prompt": "hi", "max_tokens": 4, "cache_salt": "a/b"},
                       headers={"authorization": f"Bearer {KEY_A}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"
    finally:
        stop_process(stack.proc)
    assert stack.proc.returncode == 0, log_tail(stack.log)
