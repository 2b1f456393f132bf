"""Budgets that hold exactly: what a call reserves bounds what it may spend, for every request
shape (no max_tokens, n, batches of prompts, streams, cascades, verifiers, votes), a cap is
overspent by at most one reservation however many requests race for it, and whatever path a
request takes it settles once, from one outcome.

Live tests run a gateway in front of the mock upstream in `mock_fill` mode (every choice as long
as max_tokens allows, FILL_UNCAPPED without one, one prompt token per byte; streams too), so an
answer is the worst case a real engine could produce. A text prompt's upper bound is its bytes + 2.

The property test (`test_the_budget_property_holds_under_concurrent_random_requests`) sends
HYBRIDSERVE_BUDGET_REQUESTS (default 500) random requests drawn from HYBRIDSERVE_BUDGET_SEED
(default 15) and prints one summary line; run it with
`pytest -s tests/serving/test_budget_property.py -k property_holds`.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
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

pytestmark = pytest.mark.timeout(180)

ROOMY_CAP = 10_000_000     # the live unit tests' key budget (never reached)
SESSION_CAP = 40           # tokens per session (live unit tests)
REQUESTS = int(os.environ.get("HYBRIDSERVE_BUDGET_REQUESTS", "500"))
SEED = int(os.environ.get("HYBRIDSERVE_BUDGET_SEED", "15"))
KEYS = 8                   # property test: API keys, each with its own cap ('*')
KEY_CAP = 16 * REQUESTS    # tokens per day per key: well below what its requests would spend
SESSIONS_PER_KEY = 3
PROPERTY_SESSION_CAP = 1500
IN_FLIGHT = 48             # requests in flight at once
USD_ROUNDING = 1e-10       # a receipt's cost_usd has 10 decimals
LEAVE_AFTER_S = 0.4        # a client that leaves before its answer waits this long (the answer takes 1 s)


# ------------------------------------------------------------------ request shapes

def prompt_upper(p) -> int:
    """admission.prompt_bounds' upper bound of one prompt."""
    return len(p.encode()) + 2 if isinstance(p, str) else len(p)


def prompt_list(prompt) -> list:
    return [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else list(prompt)


def reservation(body: dict, steps: int = 1, verdicts: int = 0) -> int:
    """The tokens the gateway must reserve at most for a completion body: per step (a tier of a
    cascade) every prompt's bound plus n completions per prompt of the reserved max_tokens, and
    per verifier verdict the question, the draft and the judge's template."""
    prompts = prompt_list(body["prompt"])
    cap = body.get("max_tokens") or DEFAULT_OUTPUT_TOKENS
    upper = max(prompt_upper(p) for p in prompts)
    one = upper * len(prompts) + int(body.get("n", 1)) * len(prompts) * cap
    return one * steps + verdicts * (upper + cap + VERIFIER_OVERHEAD_TOKENS)


def random_body(rng: random.Random) -> dict:
    """A random completion: text, a batch of texts or token ids; n 1-3; max_tokens or none."""
    shape = rng.choice(["text", "batch", "ids", "id_batch"])
    word = lambda: "w" * rng.randint(1, 12)  # noqa: E731
    prompt = {"text": word(), "batch": [word() for _ in range(rng.randint(2, 3))],
              "ids": [rng.randint(1, 50) for _ in range(rng.randint(1, 8))],
              "id_batch": [[1, 2, 3], [4, 5]]}[shape]
    body = {"model": "up1", "prompt": prompt, "n": rng.choice([1, 1, 2, 3]), "mock_fill": True,
            "delay_s": rng.uniform(0.0, 0.05)}
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


# ------------------------------------------------------------------ the property, live

@dataclass
class Shot:
    """One random request of the property test, and what became of it."""

    i: int
    key: int
    body: dict
    session: str | None
    leave: str | None            # None, "stream" (after the first event) or "wait" (before the answer)
    bound: int                   # the most it may be charged (`reservation` of its shape)
    status: int | None = None
    code: str | None = None      # the error code of a refusal
    receipt: tuple[int, float] | None = None   # (tokens, $) the gateway reported to the client
    left: bool = False
    problem: str | None = None

    @property
    def rid(self) -> str:
        return f"bp-{self.i}"


def key_of(k: int) -> str:
    return f"sk-budget-property-{k}"


def random_shot(rng: random.Random, i: int) -> Shot:
    """A random shape: pinned, routed, tier cascade or parallel_verify; unary, stream or vote;
    in a session or not; the client staying, leaving mid-stream or leaving before the answer."""
    body = random_body(rng)
    body["model"] = rng.choice(["cheap", "dear", "auto", "auto:cascade", "auto:parallel_verify"])
    stream = rng.random() < 0.4
    leave = None
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
        if rng.random() < 0.35:     # events 0.1 s apart: it leaves long before the usage event
            leave, body["delay_s"] = "stream", 0.1
    else:
        if body["n"] >= 2 and rng.random() < 0.25:
            body["hybridserve_vote"] = True
        if rng.random() < 0.1:
            leave, body["delay_s"] = "wait", 1.0
    if body["model"] == "auto:cascade":
        body["mock_logprob"] = rng.choice([None, -0.5, -3.0])   # threshold -1: stays, escalates
    walks = body["model"] in ("auto:cascade", "auto:parallel_verify") and not stream
    verdicts = int(walks and body["model"] == "auto:parallel_verify")
    session = f"s{rng.randrange(SESSIONS_PER_KEY)}" if rng.random() < 0.5 else None
    return Shot(i, rng.randrange(KEYS), body, session, leave, reservation(body, 2 if walks else 1, verdicts))


async def send(client: httpx.AsyncClient, base: str, shot: Shot) -> None:
    """Send one shot and record its status, receipt (usage.gateway_total_tokens and cost_usd,
    from the answer or the stream's usage event) and whether the client left."""
    headers = {"authorization": f"Bearer {key_of(shot.key)}", "x-request-id": shot.rid}
    if shot.session:
        headers["x-session-id"] = shot.session
    url = base + "/completions"
    if shot.body.get("stream"):
        async with client.stream("POST", url, json=shot.body, headers=headers) as r:
            shot.status = r.status_code
            if r.status_code != 200:
                return _refused(shot, json.loads(await r.aread()))
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    shot.problem = f"error event {event['error']}"
                elif event.get("usage"):
                    shot.receipt = _receipt(event["usage"])
                if shot.leave == "stream":
                    shot.left = True
                    return          # leaving the block closes the connection mid-stream
        return
    try:
        r = await asyncio.wait_for(client.post(url, json=shot.body, headers=headers),
                                   LEAVE_AFTER_S if shot.leave == "wait" else None)
    except asyncio.TimeoutError:
        shot.left = True
        return
    shot.status = r.status_code
    if r.status_code != 200:
        return _refused(shot, r.json())
    shot.receipt = _receipt(r.json()["usage"])
    if int(r.headers["x-hybridserve-total-tokens"]) != shot.receipt[0]:
        shot.problem = "the header and usage receipts differ"


def _receipt(usage: dict) -> tuple[int, float]:
    return int(usage["gateway_total_tokens"]), float(usage["cost_usd"])


def _refused(shot: Shot, body: dict) -> None:
    shot.code = (body.get("error") or {}).get("code")
    if shot.status != 429 or shot.code not in ("budget_exceeded", "session_budget_exceeded"):
        shot.problem = f"{shot.status}: {json.dumps(body)[:200]}"


@dataclass
class Samples:
    """What the books showed while requests were in flight: (spent + reserved) per key and
    (tokens + in flight) per session, at every read."""

    keys: dict[int, list[int]] = field(default_factory=dict)
    sessions: dict[tuple[int, str], list[int]] = field(default_factory=dict)


async def sample(client: httpx.AsyncClient, base: str, seen: Samples, stop: asyncio.Event) -> None:
    """Read every key's budget and every session at once, tick after tick, until `stop`."""
    async def key(k: int) -> None:
        auth = {"authorization": f"Bearer {key_of(k)}"}
        row = (await client.get(base + "/budgets", headers=auth)).json()["data"][0]
        seen.keys.setdefault(k, []).append(row["spent_tokens"] + row["reserved_tokens"])

    async def session(k: int, sid: str) -> None:
        r = await client.get(base + f"/sessions/{sid}", headers={"authorization": f"Bearer {key_of(k)}"})
        if r.status_code == 200:
            s = r.json()
            seen.sessions.setdefault((k, sid), []).append(s["tokens"] + s["in_flight_tokens"])
    tick = 0
    while not stop.is_set():             # every key each tick, the sessions every third
        sessions = [(k, f"s{j}") for k in range(KEYS) for j in range(SESSIONS_PER_KEY)] if tick % 3 == 0 else []
        await asyncio.gather(*(key(k) for k in range(KEYS)), *(session(k, sid) for k, sid in sessions))
        tick += 1
        await asyncio.sleep(0.01)


async def settled_books(client: httpx.AsyncClient, base: str, timeout_s: float = 10.0) -> tuple[dict, dict]:
    """Every key's budget row and every session, once nothing is reserved any more (a request
    whose client left settles when the gateway notices); raises if something stays held."""
    deadline = time.monotonic() + timeout_s
    while True:
        budgets, sessions = {}, {}
        for k in range(KEYS):
            auth = {"authorization": f"Bearer {key_of(k)}"}
            budgets[k] = (await client.get(base + "/budgets", headers=auth)).json()["data"][0]
            for j in range(SESSIONS_PER_KEY):
                r = await client.get(base + f"/sessions/s{j}", headers=auth)
                if r.status_code == 200:
                    sessions[(k, f"s{j}")] = r.json()
        held = ([b["reserved_tokens"] for b in budgets.values() if b["reserved_tokens"]]
                + [s["in_flight_tokens"] for s in sessions.values() if s["in_flight_tokens"]])
        if not held:
            return budgets, sessions
        if time.monotonic() > deadline:
            raise AssertionError(f"reservations still held after every request finished: {held}")
        await asyncio.sleep(0.1)


@pytest.fixture()
def property_stack(tmp_path):
    """A gateway with KEYS keys (KEY_CAP tokens a day each), session caps, two tiers (cheap and
    dear, the verifier) on one mock upstream process."""
    proc, mock_backend = start_mock_upstream(tmp_path, "mockp")
    backends = [{**mock_backend, "name": name, "tier": tier, "price_per_hour": price, "max_context": 4096}
                for name, tier, price in (("cheap", "standard", 0.1), ("dear", "premium", 1.0))]
    try:
        stack = start_stack(tmp_path, backends, gateway={
            "ledger_path": str(tmp_path / "ledger.sqlite"), "request_timeout_s": 30,
            "api_key_hashes": [hashlib.sha256(key_of(k).encode()).hexdigest() for k in range(KEYS)],
            "budgets": [{"name": "tokens-per-day", "tokens": KEY_CAP, "period": "day"}],
            "session_max_tokens": PROPERTY_SESSION_CAP, "cascade_threshold": -1.0, "verifier": "dear"})
    except BaseException:
        stop_process(proc, 5)
        raise
    yield stack
    stop_process(stack.proc)
    stop_process(proc, 5)


def test_the_budget_property_holds_under_concurrent_random_requests(property_stack):
    """REQUESTS random requests, IN_FLIGHT at a time, against small key and session caps. Each is
    answered or refused with a 429; no key's spent + reserved ever exceeds its cap by more than
    one reservation, nor any session's tokens + held; each request is charged at most its
    reservation; the key ledger and every session book exactly the receipts (the client's, or
    the ledger's receipt row for a client that left); nothing is left reserved."""
    stack, rng, t0 = property_stack, random.Random(SEED), time.monotonic()
    shots = [random_shot(rng, i) for i in range(REQUESTS)]
    seen = Samples()

    async def run() -> tuple[dict, dict]:
        # no pool limit (the semaphore bounds what is in flight), so a request goes out at once
        # and one that leaves before its answer has reached the gateway; the books are read
        # over connections of their own
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=IN_FLIGHT)
        async with (httpx.AsyncClient(trust_env=False, timeout=30, limits=limits) as client,
                    httpx.AsyncClient(trust_env=False, timeout=30) as reader):
            gate, stop = asyncio.Semaphore(IN_FLIGHT), asyncio.Event()

            async def one(shot: Shot) -> None:
                async with gate:
                    await send(client, stack.base_url, shot)
            sampler = asyncio.create_task(sample(reader, stack.base_url, seen, stop))
            try:
                await asyncio.gather(*(one(s) for s in shots))
            finally:
                stop.set()
                await sampler
            return await settled_books(reader, stack.base_url)
    budgets, sessions = asyncio.run(run())
    elapsed = time.monotonic() - t0
    ledger = Ledger(stack.config.parent / "ledger.sqlite", [])
    rows = {s.rid: ledger.receipts(s.rid) for s in shots}
    violations = check_property(shots, rows, budgets, sessions, seen)
    by_key = [[s for s in shots if s.key == k] for k in range(KEYS)]
    overshoot = max(max(v) - KEY_CAP for v in seen.keys.values())
    session_overshoot = max((max(v) - PROPERTY_SESSION_CAP for v in seen.sessions.values()), default=0)
    answered = sum(s.status == 200 and not s.left for s in shots)
    print(f"\nbudget property: requests {len(shots)}, answered {answered}, "
          f"refused {sum(s.status == 429 for s in shots)}, violations: {len(violations)}, "
          f"stream disconnects {sum(s.left and s.leave == 'stream' for s in shots)}, "
          f"left before the answer {sum(s.left and s.leave == 'wait' for s in shots)}, "
          f"max key overshoot {overshoot} tokens (largest reservation "
          f"{max(s.bound for s in shots if s.status == 200 or s.left)}), max session overshoot "
          f"{session_overshoot}, samples {min(map(len, seen.keys.values()))} per key, {elapsed:.1f}s")
    assert not violations, violations[:10] + [vars(s) for s in shots if s.problem][:3]
    assert all(any(s.code == "budget_exceeded" for s in group) for group in by_key)   # every key's cap bit
    assert any(s.code == "session_budget_exceeded" for s in shots)                    # and session caps
    assert answered > len(shots) // 6 and sum(s.left for s in shots) >= len(shots) // 50


def check_property(shots: list[Shot], rows: dict[str, list[dict]], budgets: dict, sessions: dict,
                   seen: Samples) -> list[str]:
    """Every way the run could break the property, as messages."""
    out = [f"{s.rid}: {s.problem}" for s in shots if s.problem]
    charged: dict[str, tuple[int, float]] = {}
    for s in shots:
        mine = rows[s.rid]
        if s.status == 429:
            if mine:
                out.append(f"{s.rid}: refused but booked {mine}")
            continue
        if s.left and not mine:
            continue        # it left before the gateway admitted it: nothing reserved, nothing owed
        if len(mine) != 1:
            out.append(f"{s.rid}: {len(mine)} receipt rows (settled more or less than once)")
            continue
        row = mine[0]
        if s.left:
            charged[s.rid] = (row["tokens"], row["usd"])
            if (row["tokens"], row["usd"]) != (row["reserved_tokens"], row["reserved_usd"]):
                out.append(f"{s.rid}: left before any usage came, yet charged {row} (not what it reserved)")
        elif s.receipt is None:
            out.append(f"{s.rid}: answered without a receipt")
            continue
        else:
            charged[s.rid] = s.receipt
            if row["tokens"] != s.receipt[0] or row["usd"] != pytest.approx(s.receipt[1], abs=USD_ROUNDING):
                out.append(f"{s.rid}: ledger row {row} is not the receipt {s.receipt}")
        if charged[s.rid][0] > s.bound or row["tokens"] > row["reserved_tokens"]:
            out.append(f"{s.rid}: charged {charged[s.rid][0]} tokens, reserved {row['reserved_tokens']}, "
                       f"bound {s.bound}: {s.body}")
    for k, row in budgets.items():
        mine = [s for s in shots if s.key == k]
        one = max((s.bound for s in mine if s.rid in charged), default=0)
        tokens = sum(charged[s.rid][0] for s in mine if s.rid in charged)
        usd = sum(charged[s.rid][1] for s in mine if s.rid in charged)
        if row["spent_tokens"] != tokens or row["spent_usd"] != pytest.approx(usd, abs=USD_ROUNDING * len(mine)):
            out.append(f"key {k}: booked {row['spent_tokens']} tokens ${row['spent_usd']}, receipts {tokens} ${usd}")
        if max([row["spent_tokens"], *seen.keys.get(k, [])]) > KEY_CAP + one:
            out.append(f"key {k}: {max(seen.keys.get(k, [0]))} spent + reserved, cap {KEY_CAP} + one reservation {one}")
    for (k, sid), sess in sessions.items():
        mine = [s for s in shots if s.key == k and s.session == sid and s.rid in charged]
        one = max((s.bound for s in mine), default=0)
        if sess["tokens"] != sum(charged[s.rid][0] for s in mine):
            out.append(f"session {k}/{sid}: {sess['tokens']} tokens, receipts {sum(charged[s.rid][0] for s in mine)}")
        if max([sess["tokens"], *seen.sessions.get((k, sid), [])]) > PROPERTY_SESSION_CAP + one:
            out.append(f"session {k}/{sid} over its cap {PROPERTY_SESSION_CAP} by more than one reservation {one}")
    return out


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
    async def go():
        sessions = G.Sessions(max_tokens=100, max_usd=None)
        h = await sessions.hold("s", prompt_upper=10, max_tokens=40, usd_for_max=0.0, samples=3)
        assert (h.cut_to, h.limit, h.tokens) == (30, 30, 10 + 3 * 30)   # 3 × 40 would not fit in 90
        with pytest.raises(BudgetExceededError):
            await sessions.hold("s", prompt_upper=1, max_tokens=40, usd_for_max=0.0, samples=1)
    asyncio.run(go())


def _call(tmp_path, usd_cap: float | None = None):
    """A Call with a key reservation (100 tokens, $0.004) and a session hold, over stubs."""
    async def go():
        ledger = Ledger(tmp_path / "ledger.sqlite", [BudgetConfig(name="t", tokens=10_000, usd=usd_cap)])
        sessions = G.Sessions(max_tokens=1000, max_usd=None)
        call = Call(_adm(prompts=1), _route("cascade", -1.0), G.Controls(), StubRouter(), ledger, sessions)
        call.reservation = await ledger.reserve("k", 0.004, 100)
        call.hold = await sessions.hold("s", 10, 50, 0.0)
        call.outcome.request_id = "req-1"
        return call, ledger, sessions
    return asyncio.run(go())


def _usage(prompt: int, completion: int, usd: float = 0.0) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "usd": usd}


def _answer(call: Call, b, usage: dict) -> None:
    """What the proxy does for one tier that answers: send, then measure its usage."""
    call.outcome.sent()
    call.outcome.backend, call.outcome.status = b.name, 200
    call.add_usage(b, usage)


def _books(ledger, sessions) -> tuple[dict, G.Session]:
    async def go():
        return (await ledger.status("k"))[0], await sessions.get("s")
    return asyncio.run(go())


def test_a_session_counts_every_tier_of_a_cascade(tmp_path):
    call, ledger, sessions = _call(tmp_path)
    _answer(call, A, _usage(5, 7))
    _answer(call, B, _usage(5, 9))
    call.finish_body(B, {"choices": [{"index": 0, "text": "x", "finish_reason": "stop"}], "usage": _usage(5, 9)})
    call.settle()
    budget, s = _books(ledger, sessions)
    assert (s.prompt_tokens, s.completion_tokens, s.tokens, s.backends) == (10, 16, 26, {"b": 1})
    assert budget["spent_tokens"] == 26
    assert [(r["tokens"], r["reserved_tokens"]) for r in ledger.receipts("req-1")] == [(26, 100)]


def test_a_call_left_mid_cascade_books_at_least_its_reservation(tmp_path):
    call, ledger, sessions = _call(tmp_path)
    _answer(call, A, _usage(5, 7))      # the first tier answered; the client left during the second
    call.outcome.sent()
    call.outcome.disconnected = True
    call.settle()
    budget, s = _books(ledger, sessions)
    assert budget["spent_tokens"] == 100 and budget["spent_usd"] == 0.004
    assert s.tokens == call.hold.tokens == 60


def test_an_error_answer_books_only_what_was_measured_and_settles_once(tmp_path):
    call, ledger, sessions = _call(tmp_path)
    _answer(call, A, _usage(5, 7))
    call.outcome.sent()                 # the second tier answers 400: it generated nothing
    call.outcome.produced_nothing()
    call.settle()
    call.settle()                       # a second settle is a no-op
    call.outcome.sent()                 # and so is anything recorded after it
    call.settle()
    budget, s = _books(ledger, sessions)
    assert (budget["spent_tokens"], budget["reserved_tokens"], s.tokens, s.calls) == (12, 0, 12, 1)
    assert len(ledger.receipts("req-1")) == 1


def test_an_unreported_verdict_books_the_reservation(tmp_path):
    """A verifier that timed out may have generated its verdict: the call is charged what it held."""
    call, ledger, sessions = _call(tmp_path)
    _answer(call, A, _usage(5, 7))
    call.outcome.sent()                 # the verdict: sent, never reported
    _answer(call, B, _usage(5, 9))
    call.settle()
    assert _books(ledger, sessions)[0]["spent_tokens"] == 100


def test_measured_dollars_above_the_reservation_are_booked_in_full_and_refuse_the_next(tmp_path):
    call, ledger, _ = _call(tmp_path, usd_cap=0.01)
    _answer(call, A, _usage(5, 7, usd=0.05))   # 12× what was reserved
    call.finish_body(A, {"choices": [], "usage": _usage(5, 7)})
    call.settle()
    assert ledger.receipts("req-1")[0]["usd"] == pytest.approx(0.05)

    async def go():
        assert (await ledger.status("k"))[0]["spent_usd"] == pytest.approx(0.05)
        with pytest.raises(BudgetExceededError):
            await ledger.reserve("k", 0.001, 1)
    asyncio.run(go())
