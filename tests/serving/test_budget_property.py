"""Budgets that hold exactly: what a call reserves bounds what it may spend, for every request
shape (no max_tokens, n, batches of prompts, cascades, verifiers), and a cap is overspent by at
most one reservation however many requests race for it.

Live tests run a gateway in front of the mock upstream in `mock_fill` mode (every choice as long
as max_tokens allows, FILL_UNCAPPED without one, one prompt token per byte), so an answer is the
worst case a real engine could produce. A text prompt's upper bound is its bytes + 2.
"""
from __future__ import annotations

import asyncio
import random
import time
from types import SimpleNamespace

import httpx
import pytest

from hybridserve.config import BudgetConfig
from hybridserve.errors import BudgetExceededError
from hybridserve.gateway import governor as G
from hybridserve.gateway.admission import Admitted
from hybridserve.gateway.call import USD_SAFETY, VERIFIER_OVERHEAD_TOKENS, Call, Calls
from hybridserve.gateway.ledger import Ledger
from hybridserve.gateway.routing import DEFAULT_OUTPUT_TOKENS, Route
from hybridserve.router.policies.base import Decision
from hybridserve.router.table import Estimate
from tests.serving.conftest import start_mock_upstream, start_stack, stop_process

pytestmark = pytest.mark.timeout(120)

TIGHT_CAP = 5000           # tokens per day, the property test's key budget
ROOMY_CAP = 10_000_000     # the live unit tests' key budget (never reached)
SESSION_CAP = 40           # tokens per session (live unit tests)
REQUESTS = 80


# ------------------------------------------------------------------ request shapes

def prompt_upper(p) -> int:
    """admission.prompt_bounds' upper bound of one prompt."""
    return len(p.encode()) + 2 if isinstance(p, str) else len(p)


def prompt_list(prompt) -> list:
    return [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else list(prompt)


def reservation(body: dict) -> int:
    """The tokens the gateway must reserve for a completion body: every prompt's bound plus
    n completions per prompt of the reserved max_tokens."""
    prompts = prompt_list(body["prompt"])
    cap = body.get("max_tokens") or DEFAULT_OUTPUT_TOKENS
    return max(prompt_upper(p) for p in prompts) * len(prompts) + int(body.get("n", 1)) * len(prompts) * cap


def random_body(rng: random.Random) -> dict:
    """A random completion: text, a batch of texts or token ids; n 1-3; max_tokens or none."""
    shape = rng.choice(["text", "batch", "ids", "id_batch"])
    word = lambda: "w" * rng.randint(1, 12)  # noqa: E731
    prompt = {"text": word(), "batch": [word() for _ in range(rng.randint(2, 3))],
              "ids": [rng.randint(1, 50) for _ in range(rng.randint(1, 8))],
              "id_batch": [[1, 2, 3], [4, 5]]}[shape]
    body = {"model": "up1", "prompt": prompt, "n": rng.choice([1, 1, 2, 3]), "mock_fill": True,
            "delay_s": rng.uniform(0.0, 0.4)}
    max_tokens = rng.choice([None, None, 1, 8, 32, 100])
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


# ------------------------------------------------------------------ live gateways

@pytest.fixture(scope="module")
def mock(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("budget-mock")
    proc, backend = start_mock_upstream(tmp, "up1")
    yield backend
    stop_process(proc, 5)


def _stack(tmp, backend, tokens: int, **gateway):
    return start_stack(tmp, [backend], gateway={
        "ledger_path": str(tmp / "ledger.sqlite"), "request_timeout_s": 30,
        "budgets": [{"name": "tokens-per-day", "tokens": tokens, "period": "day"}], **gateway})


@pytest.fixture(scope="module")
def roomy(mock, tmp_path_factory):
    stack = _stack(tmp_path_factory.mktemp("roomy"), mock, ROOMY_CAP, session_max_tokens=SESSION_CAP)
    yield stack
    stop_process(stack.proc)


def _post(stack, body: dict, **headers) -> httpx.Response:
    return httpx.post(stack.base_url + "/completions", headers={**stack.headers(), **headers}, json=body,
                      timeout=30, trust_env=False)


def _forwarded(mock) -> dict:
    return httpx.get(mock["url"] + "/stats", trust_env=False).json()["last_body"]


def _budget(stack) -> dict:
    return httpx.get(stack.base_url + "/budgets", headers=stack.headers(), trust_env=False).json()["data"][0]


def test_no_max_tokens_is_capped_at_what_was_reserved(roomy, mock):
    r = _post(roomy, {"model": "up1", "prompt": "hi", "mock_fill": True})
    assert r.status_code == 200
    assert _forwarded(mock)["max_tokens"] == DEFAULT_OUTPUT_TOKENS
    assert r.json()["usage"]["completion_tokens"] == DEFAULT_OUTPUT_TOKENS   # not the upstream's 1000
    r = _post(roomy, {"model": "up1", "prompt": "hi", "mock_fill": True, "max_tokens": 7})
    assert _forwarded(mock)["max_tokens"] == 7 and r.json()["usage"]["completion_tokens"] == 7


def test_a_batch_of_prompts_reserves_for_every_prompt_and_sample(roomy):
    body = {"model": "up1", "prompt": ["hi", "yo", "ab"], "n": 2, "max_tokens": 4, "mock_fill": True,
            "delay_s": 1.5}
    assert reservation(body) == 3 * 4 + 2 * 3 * 4 == 36

    async def go():
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            pending = asyncio.create_task(client.post(roomy.base_url + "/completions",
                                                      headers=roomy.headers(), json=body))
            seen = 0
            deadline = time.monotonic() + 5
            while not seen and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                seen = (await client.get(roomy.base_url + "/budgets",
                                         headers=roomy.headers())).json()["data"][0]["reserved_tokens"]
            return seen, await pending
    seen, r = asyncio.run(go())
    assert seen == 36
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 6 + 24 <= 36


def test_a_session_holds_n_completions(roomy, mock):
    body = {"model": "up1", "prompt": "hi", "n": 3, "max_tokens": 20, "mock_fill": True}
    r = _post(roomy, body, **{"X-Session-Id": "n-samples"})
    assert r.status_code == 200
    assert _forwarded(mock)["max_tokens"] == (SESSION_CAP - 4) // 3 == 12   # 3 × 20 would not fit
    s = httpx.get(roomy.base_url + "/sessions/n-samples", headers=roomy.headers(), trust_env=False).json()
    assert s["tokens"] == 2 + 3 * 12 <= SESSION_CAP


def test_concurrent_random_requests_never_overspend_by_more_than_one_reservation(mock, tmp_path):
    """The property: REQUESTS random shapes at once against a small cap; each is answered within
    its reservation or refused with 429, the booked total equals the receipts and stays within
    the cap plus one reservation."""
    rng = random.Random(15)
    bodies = [random_body(rng) for _ in range(REQUESTS)]
    stack = _stack(tmp_path, mock, TIGHT_CAP)

    async def burst():
        async with httpx.AsyncClient(trust_env=False, timeout=30,
                                     limits=httpx.Limits(max_connections=REQUESTS)) as client:
            return await asyncio.gather(*(client.post(stack.base_url + "/completions",
                                                      headers=stack.headers(), json=b) for b in bodies))
    try:
        responses = asyncio.run(burst())
        booked = _budget(stack)
    finally:
        stop_process(stack.proc)
    violations, answered, receipts = [], [], 0
    for body, r in zip(bodies, responses):
        if r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded":
            continue
        if r.status_code != 200:
            violations.append((body, r.status_code, r.text[:200]))
            continue
        used = r.json()["usage"]["total_tokens"]
        receipts += used
        answered.append(reservation(body))
        if used > reservation(body):
            violations.append((body, used, reservation(body)))
    print(f"requests: {len(bodies)}, answered: {len(answered)}, violations: {len(violations)}")
    assert not violations, violations[:5]
    assert answered and len(answered) < len(bodies)           # the cap was reached, and bit
    assert booked["reserved_tokens"] == 0
    assert booked["spent_tokens"] == receipts                  # settled totals are the receipts
    assert booked["spent_tokens"] <= TIGHT_CAP + max(answered)


def test_a_tier_cascade_reserves_and_counts_every_tier(tmp_path):
    """Two tiers (the mock answers without logprobs: no confidence, so the cascade escalates):
    the key reserves both tiers' worst case, and the session and the key book both answers."""
    procs, backends = [], []
    try:
        for name, tier, price in (("cheap", "standard", 0.1), ("dear", "premium", 1.0)):
            proc, b = start_mock_upstream(tmp_path, name)
            procs.append(proc)
            backends.append({**b, "tier": tier, "price_per_hour": price})
        stack = start_stack(tmp_path, backends, gateway={
            "ledger_path": str(tmp_path / "ledger.sqlite"), "cascade_threshold": -1.0, "session_max_tokens": 1000,
            "budgets": [{"name": "tokens-per-day", "tokens": ROOMY_CAP, "period": "day"}]})
    except BaseException:
        for proc in procs:
            stop_process(proc, 5)
        raise
    body = {"model": "auto:cascade", "prompt": "hi", "max_tokens": 4, "delay_s": 1.0}

    async def go():
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            pending = asyncio.create_task(client.post(stack.base_url + "/completions", json=body,
                                                      headers={**stack.headers(), "X-Session-Id": "casc"}))
            seen = 0
            deadline = time.monotonic() + 5
            while not seen and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                seen = (await client.get(stack.base_url + "/budgets",
                                         headers=stack.headers())).json()["data"][0]["reserved_tokens"]
            return seen, await pending
    try:
        seen, r = asyncio.run(go())
        assert r.status_code == 200
        tiers = r.json()["usage"]["tiers"]
        assert [t["backend"] for t in tiers] == ["cheap", "dear"]
        assert seen == 2 * reservation(body) == 16                   # both tiers, not the first only
        s = httpx.get(stack.base_url + "/sessions/casc", headers=stack.headers(), trust_env=False).json()
        assert (s["prompt_tokens"], s["completion_tokens"]) == (2 * 1, 2 * 3)   # each mock answer: 1 + 3
        assert _budget(stack)["spent_tokens"] == 8
    finally:
        stop_process(stack.proc)
        for proc in procs:
            stop_process(proc, 5)


# ------------------------------------------------------------------ worst case and settle, no processes

class StubRouter:
    """Predicts a fixed $ per backend and measures the `usd` a usage carries."""

    PRICES = {"a": 0.001, "b": 0.01, "v": 0.0001}

    def predict_usd(self, backend: str, prompt_tokens: int, max_tokens: int) -> float:
        return self.PRICES[backend]

    def observe(self, b, usage: dict) -> float:
        return float(usage.get("usd", 0.0))


A, B, V = SimpleNamespace(name="a"), SimpleNamespace(name="b"), SimpleNamespace(name="v")


def _calls() -> Calls:
    calls = Calls.__new__(Calls)
    calls.router = StubRouter()
    return calls


def _adm(**kw) -> Admitted:
    """n 2, 3 prompts of at most 10 tokens, max_tokens 50 (any of them overridden by `kw`)."""
    fields = {"stream": False, "data": {"n": 2}, "prompt_upper": 10, "prompts": 3, "max_tokens": 50, **kw}
    return Admitted("auto", pinned=False, candidates=[], **fields)


def _route(policy: str, threshold: float | None, verifier=None) -> Route:
    d = Decision("a", policy, "test", estimates=(Estimate("a", 0.001, 0.0, 0.0, 0.0, 1.0),))
    return Route(d, [A, B], prompt_tokens=10, max_tokens=50, threshold=threshold, verifier=verifier)


def test_one_backend_reserves_every_prompt_and_sample_with_the_safety_factor():
    w = _calls().worst_case(_adm(), _route("cheapest", None))
    assert (w.fixed, w.samples) == (30, 6) and w.tokens(50) == 30 + 300
    assert USD_SAFETY > 1 and w.usd == pytest.approx(0.001 * 6 * USD_SAFETY)


def test_the_tier_cascade_reserves_every_tier_it_may_try():
    w = _calls().worst_case(_adm(), _route("cascade", -1.0))
    assert (w.fixed, w.samples) == (2 * 30, 2 * 6)
    assert w.usd == pytest.approx((0.001 + 0.01) * 6 * USD_SAFETY)


def test_parallel_verify_reserves_every_tier_and_each_verdict():
    w = _calls().worst_case(_adm(), _route("parallel_verify", -1.0, verifier=V))
    judged = 10 + 50 + VERIFIER_OVERHEAD_TOKENS       # the question, the draft, the template
    assert (w.fixed, w.samples) == (2 * 30 + judged, 2 * 6)   # the last tier is not judged
    assert w.usd == pytest.approx(((0.001 + 0.01) * 6 + 0.0001) * USD_SAFETY)


def test_a_stream_runs_one_tier_and_reserves_one():
    w = _calls().worst_case(_adm(stream=True), _route("cascade", -1.0))
    assert (w.fixed, w.samples) == (30, 6)


def test_session_hold_counts_every_sample():
    sessions = G.Sessions(max_tokens=100, max_usd=None)
    h = sessions.hold("s", prompt_upper=10, max_tokens=40, usd_for_max=0.0, samples=3)
    assert (h.cut_to, h.limit, h.tokens) == (30, 30, 10 + 3 * 30)   # 3 × 40 would not fit in 90
    with pytest.raises(BudgetExceededError):
        sessions.hold("s", prompt_upper=1, max_tokens=40, usd_for_max=0.0, samples=1)


def _call(tmp_path, usd_cap: float | None = None):
    """A Call with a key reservation (100 tokens, $0.004) and a session hold, over stubs."""
    ledger = Ledger(tmp_path / "ledger.sqlite", [BudgetConfig(name="t", tokens=10_000, usd=usd_cap)])
    sessions = G.Sessions(max_tokens=1000, max_usd=None)
    call = Call(_adm(prompts=1), _route("cascade", -1.0), G.Controls(), StubRouter(), ledger, sessions)
    call.reservation = ledger.reserve("k", 0.004, 100)
    call.hold = sessions.hold("s", 10, 50, 0.0)
    return call, ledger, sessions


def _usage(prompt: int, completion: int, usd: float = 0.0) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "usd": usd}


def test_a_session_counts_every_tier_of_a_cascade(tmp_path):
    call, ledger, sessions = _call(tmp_path)
    call.add_usage(A, _usage(5, 7))
    call.add_usage(B, _usage(5, 9))
    call.finish_body(B, {"choices": [{"index": 0, "text": "x", "finish_reason": "stop"}], "usage": _usage(5, 9)})
    call.settle("b")
    s = sessions.get("s")
    assert (s.prompt_tokens, s.completion_tokens, s.tokens) == (10, 16, 26)
    assert ledger.status("k")[0]["spent_tokens"] == 26


def test_a_call_left_mid_cascade_books_at_least_its_reservation(tmp_path):
    call, ledger, sessions = _call(tmp_path)
    call.add_usage(A, _usage(5, 7))      # the first tier answered; the client left during the second
    call.settle("b")
    assert ledger.status("k")[0]["spent_tokens"] == 100 and ledger.status("k")[0]["spent_usd"] == 0.004
    assert sessions.get("s").tokens == call.hold.tokens == 60


def test_measured_dollars_above_the_reservation_are_booked_in_full_and_refuse_the_next(tmp_path):
    call, ledger, _ = _call(tmp_path, usd_cap=0.01)
    call.add_usage(A, _usage(5, 7, usd=0.05))   # 12× what was reserved
    call.finish_body(A, {"choices": [], "usage": _usage(5, 7)})
    call.settle("a")
    assert ledger.status("k")[0]["spent_usd"] == pytest.approx(0.05)
    with pytest.raises(BudgetExceededError):
        ledger.reserve("k", 0.001, 1)
