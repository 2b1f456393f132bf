"""One request's life in the gateway after admission: route, reservations, upstream body, receipt.

`Calls.open` routes the admitted request, applies the governor's controls and
session cut, and reserves the predicted worst case in the key ledger and the session
(`stores.BudgetStore`, `stores.SessionBook`; a 429 here reserves nothing). The proxy
then asks the `Call` for each attempt's upstream body (`body_for`) and records what
happened in the call's one `outcome.Outcome`: every call sent, every measured `usage`
(`add_usage`: the cost is price_per_hour × device_seconds, and the economics table
learns from it), the tiers tried, a disconnect, an error. `settle` books that outcome in
the ledger and the session exactly once, whichever path the request took (a second call
does nothing; the proxy settles after the answer, on any exception, or when a stream's
relay closes). Receipts:
headers (`receipt_headers`) and the `usage` extension (`usage_extension`): cost_usd,
gateway_total_tokens (every call's tokens: what the key's ledger books), device_seconds,
route_policy, route_backend, route_reason, predicted_cost_usd, `quality` when a quality
floor applied, and for cascades every tier (or configured rung) tried.

Cascade rungs (`gateway.cascade`): each rung's params are merged into the request
body, and the merged body is read by the governor again (so a rung's
`{n: 5, hybridserve_vote: true}` samples five answers and returns the majority);
bodies are built once per (engine kind, rung). A voting rung's confidence is the
mean token logprob of the winning sample, the answer the client gets.

Reservations hold exactly (`Calls.worst_case`): tokens are every prompt the call may send
(prompt upper bound × prompts × tiers, the verifier's judge prompts included) plus every
completion it may generate (n × prompts × tiers, each up to the reserved max_tokens); and
whenever a key budget or a session cap applies, the max_tokens sent upstream is the one
reserved (the client's own smaller one wins), so measured tokens never exceed reserved ones.
Dollars are measured (price × device seconds), so no request can bound them in advance: the
reservation is the predicted worst case × USD_SAFETY, and a measured cost above it is booked in
full, so the next admission sees it.

Session trajectory: a call in a session carries a `governor.Step` on its hold (its X-Step-Kind,
start and end on the wall clock, cached prompt tokens, the tool calls in the client's answer,
failed-over attempts, a client's retry mark), filled in at `settle` and booked with its counts.

Fast path: a request with no controls, no gateway-only fields, no key budget or session
cap, no cascade and (for streams) its own include_usage goes upstream byte for byte as the
client sent it.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from hybridserve import protocol as P
from hybridserve.config import HybridserveConfig
from hybridserve.gateway import governor as G
from hybridserve.gateway.admission import Admitted
from hybridserve.gateway.ledger import Reservation
from hybridserve.gateway.outcome import Outcome, Spend
from hybridserve.gateway.registry import BackendState
from hybridserve.gateway.routing import Route, Router, RouteRung, estimate_prompt_tokens, request_quality
from hybridserve.gateway.stores import BudgetStore, SessionBook
from hybridserve.protocol import is_int
from hybridserve.router.policies.cascade import mean_logprob

logger = logging.getLogger(__name__)

BUDGET_EXHAUSTED = "budget_exhausted"
USD_SAFETY = 2.0                 # $ reserved = predicted worst case × this
VERIFIER_OVERHEAD_TOKENS = 128   # judge_prompt's template (99 bytes) and its one answer token


@dataclass(frozen=True)
class WorstCase:
    """What one call may spend at most: `fixed` tokens (prompts, verdicts) plus `samples`
    completions of up to max_tokens each; `usd` is their predicted $ × USD_SAFETY."""

    usd: float
    fixed: int
    samples: int

    def tokens(self, max_tokens: int) -> int:
        return self.fixed + self.samples * max_tokens


@dataclass
class Call:
    adm: Admitted
    route: Route
    controls: G.Controls
    router: Router
    ledger: BudgetStore | None
    sessions: SessionBook
    reservation: Reservation | None = None
    hold: G.SessionHold | None = None
    outcome: Outcome = field(default_factory=Outcome)
    settled: bool = False
    rung_controls: dict[str, G.Controls] = field(default_factory=dict)  # configured cascade rungs
    answered_by: RouteRung | None = None     # the rung whose answer the client gets
    affinity_keys: list = field(default_factory=list)  # where this request's prefix will be cached
    cache_salt: str | None = None  # the tenant's prefix-cache namespace on the backends (see tenant_salt)
    step_kind: str = G.UNSPECIFIED  # its X-Step-Kind (`governor.step_kind`)
    _bodies: dict[tuple[bool, str | None], bytes] = field(default_factory=dict)

    # ---------------------------------------------------------------- upstream body

    @property
    def cut_to(self) -> int | None:
        return self.hold.cut_to if self.hold else None

    @property
    def reserved_cap(self) -> int | None:
        """The max_tokens per completion that the reservations hold: sent upstream whenever a
        key budget or a session cap applies (None: nothing to hold, the client's body goes)."""
        if self.hold is not None and self.hold.limit is not None:
            return self.hold.limit
        return self.route.max_tokens if self.reservation is not None else None

    @property
    def wants_logprobs(self) -> bool:
        d = self.adm.data
        return bool(d.get("logprobs")) or (not self.adm.chat and d.get("logprobs") is not None)

    @property
    def wants_confidence(self) -> bool:
        """The cascade reads the answer's own logprobs (parallel_verify asks a verifier instead)."""
        return self.route.cascade and self.route.verifier is None and not self.adm.stream

    def rung_of(self, b: BackendState) -> RouteRung | None:
        """The first configured rung on this backend (streams and failover run one rung only)."""
        return next((r for r in self.route.rungs if r.backend is b), None)

    def cascade_steps(self) -> list[tuple[BackendState, RouteRung | None]]:
        """What a non-streaming cascade walks: the configured rungs, else every backend of the order."""
        if self.route.rungs:
            return [(r.backend, r) for r in self.route.rungs]
        return [(b, None) for b in self.route.order]

    def threshold_of(self, rung: RouteRung | None) -> float | None:
        return rung.threshold if rung else self.route.threshold

    def controls_for(self, rung: RouteRung | None) -> G.Controls:
        return self.rung_controls.get(rung.name, self.controls) if rung else self.controls

    def body_for(self, b: BackendState, rung: RouteRung | None = None) -> bytes:
        """The upstream body for backend `b` (as cascade rung `rung`), built once per engine kind and rung."""
        rung = rung or self.rung_of(b)
        key = (b.config.engine == "native", rung.name if rung else None)
        if key not in self._bodies:
            self._bodies[key] = self._build(key[0], rung)
        return self._bodies[key]

    def _build(self, native: bool, rung: RouteRung | None = None) -> bytes:
        d = {**self.adm.data, **rung.params} if rung else self.adm.data
        ctl = self.controls_for(rung)
        limit = self.reserved_cap
        rewrite = (ctl.active or limit is not None or self.wants_confidence or bool(rung and rung.params)
                   or G.has_gateway_fields(self.adm.data)
                   or (self.cache_salt is not None and "cache_salt" in self.adm.data)
                   or (not native and "hybridserve_priority" in self.adm.data)
                   or (self.adm.stream and not self.adm.client_usage))
        if not rewrite:
            return self._salted(self.adm.raw)
        if limit is not None:
            own = [v for v in (d.get("max_completion_tokens"), d.get("max_tokens")) if is_int(v)]
            limit = min([limit, *own])
        out = G.upstream_fields(d, ctl, native, limit or self.adm.max_tokens)
        if not native:  # a native worker's scheduling class; other engines do not know the field
            out.pop("hybridserve_priority", None)
        if self.cache_salt is not None:
            out["cache_salt"] = self.cache_salt
        if self.adm.stream and not self.adm.client_usage:
            out["stream_options"] = {**(d.get("stream_options") or {}), "include_usage": True}
        if self.wants_confidence:
            if self.adm.chat:
                out["logprobs"] = True
            elif out.get("logprobs") is None:
                out["logprobs"] = 0
        return json.dumps(out, separators=(",", ":")).encode()

    def _salted(self, raw: bytes) -> bytes:
        """The client's bytes with the tenant's cache_salt as the first member (the body has none:
        a client's own salt goes through `_build`, folded into the tenant's)."""
        if self.cache_salt is None:
            return raw
        body = raw.lstrip()
        if not body.startswith(b"{"):
            return raw
        rest = body[1:].lstrip()
        sep = b"" if rest.startswith(b"}") else b","
        return b'{"cache_salt":"' + self.cache_salt.encode() + b'"' + sep + rest

    # ---------------------------------------------------------------- accounting

    @property
    def usd(self) -> float:
        return self.outcome.usd

    @property
    def device_s(self) -> float:
        return self.outcome.device_s

    @property
    def exhausted(self) -> bool:
        return self.outcome.exhausted

    def add_usage(self, b: BackendState, usage: Any, answer: bool = True) -> float:
        """Record one sent call's measured usage (a tier's answer, or with `answer` false a
        verifier's verdict) in the outcome; returns its $. A missing usage records nothing: that
        call stays unmeasured (see `outcome`)."""
        if not isinstance(usage, dict) or not usage:
            return 0.0
        cost = self.router.observe(b, usage)
        self.outcome.measured(Spend.of(b.name, usage, cost, verdict=not answer), usage if answer else None)
        if answer and self.affinity_keys and self.router.affinity is not None:
            self.router.affinity.record(self.affinity_keys, b.name, int(usage.get("prompt_tokens") or 0),
                                        int(usage.get("completion_tokens") or 0))
        return cost

    def check_exhausted(self, choices: list[dict]) -> bool:
        """A choice cut by the session budget ran into the cut."""
        answer = self.outcome.answer
        if self.cut_to is None or not answer:
            return False
        per_choice = int(answer.get("completion_tokens") or 0) / max(1, len(choices) or 1)
        hit = any(c.get("finish_reason") == "length" for c in choices) and per_choice >= self.cut_to
        self.outcome.exhausted = self.outcome.exhausted or hit
        return hit

    def settle(self) -> None:
        """Book the outcome of every call made (all tiers, rungs and verdicts) in the key ledger
        and the session, once; later calls do nothing. Each store is charged what was measured,
        or at least what it reserved when a call never reported (`Outcome.charge`); a measured
        cost above the reservation is booked in full (the next admission sees it)."""
        if self.settled:
            return
        self.settled = True
        o, prompt_bound = self.outcome, self.adm.prompt_upper * self.adm.prompts
        if self.ledger is not None and self.reservation is not None:
            usd, tokens, _ = o.charge(self.reservation.tokens, self.reservation.usd, prompt_bound)
            self.ledger.settle(self.reservation, usd, tokens, o.request_id)
        if self.hold is not None:
            usd, _, usage = o.charge(self.hold.tokens, self.hold.usd, prompt_bound)
            step = self.hold.step
            step.ended, step.request_id = time.time(), o.request_id
            step.cached_tokens, step.tool_calls, step.failovers = o.cached, o.tool_calls, o.failovers
            self.sessions.settle(self.hold, o.backend, usage, usd, escalations=o.escalations,
                                 exhausted=o.exhausted)
        if o.disconnected or o.error or o.unmeasured:
            logger.info("%s settled: %d tokens, $%.6g measured; %d call(s) unmeasured%s%s", o.request_id,
                        o.tokens, o.usd, o.unmeasured, ", client left" if o.disconnected else "",
                        f", ended by {o.error}" if o.error else "")

    # ---------------------------------------------------------------- receipts

    def receipt_headers(self, final: bool) -> dict[str, str]:
        h = self.route.headers()
        tried = self.outcome.tried
        if final:
            h["x-hybridserve-cost-usd"] = f"{self.usd:.10g}"
            h["x-hybridserve-total-tokens"] = str(self.outcome.tokens)
            h["x-hybridserve-device-seconds"] = f"{self.device_s:.6f}"
            h["x-hybridserve-cached-tokens"] = str(self.outcome.cached)
            if self.exhausted:
                h["x-hybridserve-budget"] = "exhausted"
        elif self.cut_to is not None:
            h["x-hybridserve-budget"] = f"capped; max_tokens cut to {self.cut_to}"
        if len(tried) > 1:
            h["x-hybridserve-tiers"] = ",".join(t["backend"] for t in tried)
        q = self.route.decision.quality
        if q is not None:
            fig = "unmeasured" if q.accuracy is None else f"{q.accuracy:.2f}"
            h["x-hybridserve-quality"] = (f"{'met' if q.met else 'unmet'}; {q.task} {fig} "
                                          f"({q.source}), floor {q.floor:.2f}")
        return h

    def usage_extension(self, backend: str) -> dict[str, Any]:
        est = self.route.decision.estimate
        ext: dict[str, Any] = {"cost_usd": round(self.usd, 10), "route_policy": self.route.policy,
                               "route_backend": backend, "route_reason": self.route.decision.reason,
                               "predicted_cost_usd": round(est.usd, 10) if est else None,
                               "gateway_total_tokens": self.outcome.tokens,
                               "gateway_cached_tokens": self.outcome.cached,
                               "gateway_device_seconds": round(self.device_s, 6)}
        if self.outcome.tried:
            ext["tiers"] = self.outcome.tried
        q = self.route.decision.quality
        if q is not None:
            ext["quality"] = {"floor": q.floor, "task": q.task, "accuracy": q.accuracy, "source": q.source,
                              "met": q.met}
        ctl = self.controls_for(self.answered_by)
        if ctl.thinking is not None:
            ext["max_thinking_tokens"] = ctl.thinking
        if self.cut_to is not None:
            ext["budget"] = "exhausted" if self.exhausted else f"max_tokens cut to {self.cut_to}"
        if self.hold is not None:
            ext["session_id"] = self.hold.sid
        return ext

    def finish_body(self, b: BackendState, body: dict, rung: RouteRung | None = None) -> dict:
        """A finished non-streaming answer (of `rung`, for a configured cascade): vote, budget
        marks, logprobs stripped, receipt."""
        self.answered_by = rung or self.rung_of(b)
        choices = body.get("choices") or []
        if self.check_exhausted(choices):
            for c in choices:
                if c.get("finish_reason") == "length":
                    c["stop_reason"] = BUDGET_EXHAUSTED
        if self.wants_confidence and not self.wants_logprobs:
            for c in choices:
                c["logprobs"] = None
        if self.controls_for(self.answered_by).vote and len(choices) > 1:
            winner, tally = G.vote(choices, self.adm.chat)
            body["choices"] = [winner]
            body["hybridserve_vote"] = tally
        self.outcome.saw_tool_calls(body)
        usage = body.get("usage")
        if isinstance(usage, dict):
            usage.update(self.usage_extension(b.name))
        return body


def confidence(body: dict, chat: bool, vote: bool = False) -> float | None:
    """Mean token logprob over every choice of an answer (None when there are none); with `vote`
    (self-consistency) over the winning sample only: the answer the client will get."""
    lps: list[float] = []
    choices = body.get("choices") or []
    if vote and len(choices) > 1:
        choices = [choices[G.vote(choices, chat)[1]["winner_sample"]]]
    for c in choices:
        lp = c.get("logprobs") or {}
        if chat:
            lps += [e["logprob"] for e in lp.get("content") or [] if e.get("logprob") is not None]
        else:
            lps += [x for x in lp.get("token_logprobs") or [] if x is not None]
    return mean_logprob(lps)


class Calls:
    """Opens a `Call` per admitted request (routing, governor, ledger and sessions together)."""

    def __init__(self, cfg: HybridserveConfig, router: Router, ledger: BudgetStore | None,
                 sessions: SessionBook, limiter: Any = None):
        self.gw = cfg.gateway
        self.limiter = limiter     # gateway.rate_limits (ratelimit.py), or None
        self.router = router
        self.ledger = ledger       # SQLite or Redis (gateway.app.budget_stores)
        self.sessions = sessions   # in memory or Redis

    async def open(self, adm: Admitted, headers: Any, key_id: str | None, owner: str = G.PUBLIC) -> Call:
        """Route, apply controls and reserve; `owner` is the caller's tenant (`KeyChecker.tenant`),
        whose session book the `X-Session-Id` names."""
        ctl = G.parse_controls(adm.data, self.gw, adm.stream)
        floor, task = request_quality(adm.data, headers)
        prompt = estimate_prompt_tokens(adm.prompt_bytes, adm.prompt_lower, adm.prompt_upper)
        P.check_priority(adm.data.get("hybridserve_priority"))
        cands = adm.candidates
        if ctl.top_tier and not adm.pinned and self.router.tier_order:
            top = self.router.tier_order[-1]
            cands = [b for b in cands if b.config.tier == top] or cands
        aff = self.router.affinity
        keys = aff.keys(owner, adm.data, headers, adm.chat) if aff is not None and not adm.pinned else []
        route = self.router.decide(adm.model, adm.pinned, cands, adm.preferred, prompt, adm.max_tokens,
                                   adm.policy or ctl.policy, headers.get("x-step-kind"), key_id,
                                   floor=floor, task=task, deep=ctl.top_tier,
                                   hints=aff.hints(keys, prompt) if keys else None)
        call = Call(adm, route, ctl, self.router, self.ledger, self.sessions, affinity_keys=keys,
                    cache_salt=tenant_salt(owner, adm.data.get("cache_salt")),
                    step_kind=G.step_kind(headers.get("x-step-kind")))
        call.rung_controls = self.rung_controls(adm, route)
        worst = self.worst_case(adm, route)
        if self.limiter is not None:
            await self.limiter.admit(key_id, worst.tokens(route.max_tokens))
        sid = headers.get("x-session-id")
        if sid:
            started = time.time()
            call.hold = await self.sessions.hold(sid[:128], worst.fixed, route.max_tokens, worst.usd, owner,
                                                 worst.samples)
            call.hold.step = G.Step(call.step_kind, started, client_retry=client_retried(headers))
        if self.ledger is not None and self.ledger.budgets:
            cap = call.cut_to or route.max_tokens
            usd = worst.usd * cap / route.max_tokens
            try:
                call.reservation = await self.ledger.reserve(key_id, usd, worst.tokens(cap))
            except BaseException:
                if call.hold is not None:
                    self.sessions.release(call.hold)
                raise
        return call

    def rung_controls(self, adm: Admitted, route: Route) -> dict[str, G.Controls]:
        """The governor's controls of each rung's merged body (a stream runs only the first rung);
        a bad combination is a 400 naming the field."""
        rungs = route.rungs[:1] if adm.stream else route.rungs
        return {r.name: G.parse_controls({**adm.data, **r.params}, self.gw, adm.stream) for r in rungs}

    def worst_case(self, adm: Admitted, route: Route) -> WorstCase:
        """Everything the call may spend, summed over every attempt that may produce usage: every
        configured rung; for the tier cascade and parallel_verify every backend of the order and a
        verdict on every tier but the last; else the chosen backend (failover happens only where
        nothing was answered). Each attempt sends every prompt and generates n per prompt."""
        n, prompts = int(adm.data.get("n") or 1), adm.prompts
        prompt, cap = adm.prompt_upper * prompts, route.max_tokens
        if route.rungs:
            attempts = [(r.backend, int(r.params.get("n") or n)) for r in route.rungs]
        elif route.threshold is not None and not adm.stream:
            attempts = [(b, n) for b in route.order]
        else:
            est = route.decision.estimate
            return WorstCase((est.usd if est else 0.0) * n * prompts * USD_SAFETY, prompt, n * prompts)
        usd, fixed, samples = 0.0, 0, 0
        for b, k in attempts:
            usd += self.router.predict_usd(b.name, route.prompt_tokens, cap) * k * prompts
            fixed += prompt
            samples += k * prompts
        if route.verifier is not None and not route.rungs:
            judged = adm.prompt_upper + cap + VERIFIER_OVERHEAD_TOKENS
            verdicts = len(attempts) - 1
            fixed += judged * verdicts
            usd += self.router.predict_usd(route.verifier.name, judged, 1) * verdicts
        return WorstCase(usd * USD_SAFETY, fixed, samples)


def client_retried(headers: Any) -> bool:
    """The client says this request is a retry: OpenAI's SDKs send x-stainless-retry-count, 0 first."""
    n = headers.get("x-stainless-retry-count")
    return bool(n) and n.strip().isdigit() and int(n) > 0


def tenant_salt(owner: str, client_salt: Any) -> str | None:
    """The backends' prefix-cache namespace of a tenant: one tenant's cached prefixes never speed up
    (or reveal themselves to) another's requests. A client's own `cache_salt` narrows it further.
    None for the public tenant of an open gateway, whose requests share one cache as before."""
    if owner == G.PUBLIC and client_salt is None:
        return None
    P.check_cache_salt(client_salt)
    text = f"{owner}\x1f{client_salt if isinstance(client_salt, str) else ''}"
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


async def store_io(method, *args):
    """Call a store method and await what it returns if that is awaitable (gateway.app's reads
    go through this; the `stores` protocols make every admission and read a coroutine)."""
    out = method(*args)
    return await out if inspect.isawaitable(out) else out


def question_and_answer(data: dict, body: dict, chat: bool) -> tuple[str, str] | None:
    """The question (last user message, or the text prompt) and the first answer, for a verifier."""
    if chat:
        users = [m for m in data.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
        q = users[-1].get("content") if users else None
    else:
        q = data.get("prompt")
    choices = body.get("choices") or []
    if not isinstance(q, str) or not choices:
        return None
    a = (choices[0].get("message") or {}).get("content") if chat else choices[0].get("text")
    return q, a or ""
