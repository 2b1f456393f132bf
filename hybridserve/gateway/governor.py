"""The test-time-compute governor: request controls, per-session caps, self-consistency votes.

Request controls (JSON body fields next to OpenAI's):

* `mode`: `fast` (no thinking; `auto` routes by `cheapest`) or `deep` (effort `high`;
  `auto` routes within the top tier, the priciest in models.yaml);
* `reasoning_effort`: `low | medium | high` → a thinking budget from
  `gateway.thinking_budgets`;
* `max_thinking_tokens`: an explicit thinking budget (the smaller one wins). The
  native worker enforces it by budget forcing (it emits `</think>` itself once the
  budget is spent); other engines are capped through `max_tokens`;
* `n` with `hybridserve_vote: true`: self-consistency. The backend samples n
  answers; the gateway returns the majority answer (compared after `</think>`,
  case- and whitespace-insensitive; ties go to the earliest sample) as choice 0 and
  reports the tally in `hybridserve_vote`.

Sessions (`X-Session-Id`): calls, tokens and $ across the session's calls, capped by
`gateway.session_max_tokens` / `session_max_usd`. At admission a call's max_tokens
is cut to what the session has left (its prompt counted at its upper bound, so the
cap holds even under concurrency); a cut answer that runs into the cut ends with
`finish_reason: "length"`, `stop_reason: "budget_exhausted"` and the header
`x-hybridserve-budget: exhausted`. A session with nothing left gets a 429.

A session belongs to its tenant, the key that opened it (`auth.KeyChecker.tenant`): the
book is keyed by (tenant, id), so the same id sent with another key is another session,
and another key reading it finds nothing. With auth disabled every caller is the one
`PUBLIC` tenant. The gateway passes the caller's tenant as `owner` to `hold` and `get`.

Trajectory (also in GET /v1/sessions/{id}): each settled call is booked under its step kind
(`X-Step-Kind`, UNSPECIFIED without one; a session keeps MAX_STEP_KINDS kinds apart, later
new ones go under OTHER) with its calls, prompt/completion/cached tokens, $, wall seconds
(the sum of its calls' durations) and tool calls; each row sums to the session's totals.
The session also counts the tool calls in the answers its client got (`tool_calls` in a
message or in a stream's deltas), its wall time (first call's start to last call's end,
which concurrent calls make shorter than the rows' sum) and its retries: `failovers` (backend
attempts within a call that could not take it, unreachable or saturated, so the gateway
tried the next) and `client_retries` (a call that reused the x-request-id of one of the
session's last RECENT_IDS calls, or that an OpenAI SDK marked with x-stainless-retry-count > 0).

The memory book keeps at most `MAX_SESSIONS` sessions per tenant (the least recently used
go first), so no tenant's sessions can push out another's. It satisfies `stores.SessionBook`:
`hold`, `get` and `close` are coroutines (that answer at once), `settle` and `release` are not.
"""
from __future__ import annotations

import re
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from hybridserve.config import GatewayConfig
from hybridserve.errors import BudgetExceededError, InvalidRequestError
from hybridserve.protocol import is_int

# body fields the gateway reads and never forwards (routing's hybridserve_quality_floor and
# hybridserve_task included): an upstream that refuses unknown fields would 400 on them
GATEWAY_FIELDS = ("mode", "reasoning_effort", "hybridserve_vote", "max_thinking_tokens",
                  "hybridserve_quality_floor", "hybridserve_task")
ANSWER_BUDGET_TOKENS = 256   # non-native engines: thinking cap + this many answer tokens
MAX_SESSIONS = 10_000            # sessions the memory book keeps per tenant (`Sessions(max_sessions=)`)
SESSION_TOTALS = ("calls", "prompt_tokens", "completion_tokens", "thinking_tokens", "usd", "escalations",
                  "budget_hits", "cached_tokens", "tool_calls", "failovers", "client_retries")
STEP_COUNTS = ("calls", "prompt_tokens", "completion_tokens", "cached_tokens", "usd", "wall_s", "tool_calls")
MAX_STEP_KINDS = 16              # step kinds a session keeps apart; later new kinds are booked as OTHER
MAX_KIND_CHARS = 64
RECENT_IDS = 64                  # request ids a session remembers to see a client's retry
UNSPECIFIED = "unspecified"      # the step kind of a call without X-Step-Kind
OTHER = "other"
THINK_END = "</think>"
PUBLIC = ""                      # the one tenant of a gateway without auth


@dataclass(frozen=True)
class Controls:
    thinking: int | None = None    # max thinking tokens (None: no cap)
    vote: bool = False
    mode: str | None = None
    policy: str | None = None      # routing override implied by the mode
    top_tier: bool = False

    @property
    def active(self) -> bool:
        return self.thinking is not None or self.vote or self.mode is not None


def parse_controls(data: dict, gw: GatewayConfig, stream: bool) -> Controls:
    """Validate the governor's request fields, whatever JSON type they arrive as; a 400
    names the bad one."""
    mode = data.get("mode")
    if mode is not None and (not isinstance(mode, str) or mode not in ("fast", "deep")):
        raise InvalidRequestError("`mode` must be 'fast' or 'deep'", param="mode")
    effort = data.get("reasoning_effort")
    if effort is None and mode == "deep":
        effort = "high"
    if effort is not None and (not isinstance(effort, str) or effort not in gw.thinking_budgets):
        raise InvalidRequestError(f"`reasoning_effort` must be one of {', '.join(gw.thinking_budgets)}",
                                  param="reasoning_effort")
    explicit = data.get("max_thinking_tokens")
    if explicit is not None and (not is_int(explicit) or explicit < 0):
        raise InvalidRequestError("`max_thinking_tokens` must be an integer >= 0", param="max_thinking_tokens")
    caps = [c for c in (explicit, gw.thinking_budgets.get(effort) if effort else None,
                        0 if mode == "fast" else None) if c is not None]
    vote = data.get("hybridserve_vote", False)
    if not isinstance(vote, bool):
        raise InvalidRequestError("`hybridserve_vote` must be true or false", param="hybridserve_vote")
    if vote and stream:
        raise InvalidRequestError("`hybridserve_vote` needs the whole answer: it cannot stream",
                                  param="hybridserve_vote")
    n = data.get("n", 1)
    if vote and (not is_int(n) or n < 2):
        raise InvalidRequestError("`hybridserve_vote` needs `n` >= 2 samples", param="n")
    return Controls(min(caps) if caps else None, vote, mode, "cheapest" if mode == "fast" else None,
                    mode == "deep")


def has_gateway_fields(data: dict) -> bool:
    """Whether a body carries any field that must be removed before it goes upstream."""
    return any(k in data for k in GATEWAY_FIELDS)


def upstream_fields(data: dict, ctl: Controls, native: bool, max_tokens: int | None) -> dict:
    """The body to send one backend: gateway-only fields removed, the thinking cap applied."""
    out = {k: v for k, v in data.items() if k not in GATEWAY_FIELDS}
    if ctl.thinking is not None:
        if native:
            out["max_thinking_tokens"] = ctl.thinking
        else:
            cap = ctl.thinking + ANSWER_BUDGET_TOKENS
            max_tokens = cap if max_tokens is None else min(max_tokens, cap)
    if max_tokens is not None:
        key = "max_completion_tokens" if "max_completion_tokens" in out else "max_tokens"
        out[key] = max_tokens
    return out


# ------------------------------------------------------------------ self-consistency

def answer_key(text: str) -> str:
    """What two samples must share to count as the same answer."""
    tail = text.rsplit(THINK_END, 1)[-1]
    return re.sub(r"\s+", " ", tail).strip().strip(".").lower()


def choice_text(choice: Any, chat: bool) -> str:
    """A choice's answer text; '' for a choice of any other shape (an upstream's garbage)."""
    if not isinstance(choice, dict):
        return ""
    msg = choice.get("message")
    text = (msg.get("content") if isinstance(msg, dict) else None) if chat else choice.get("text")
    return text if isinstance(text, str) else ""


def vote(choices: list[dict], chat: bool) -> tuple[dict, dict]:
    """The majority choice (re-indexed 0) and the tally."""
    keys = [answer_key(choice_text(c, chat)) for c in choices]
    tally = Counter(keys)
    best = max(tally.values())
    winner = next(i for i, k in enumerate(keys) if tally[k] == best)
    return {**choices[winner], "index": 0}, {"samples": len(choices), "agreeing": best,
                                              "distinct_answers": len(tally), "winner_sample": winner}


# ------------------------------------------------------------------ sessions

def step_kind(header: str | None) -> str:
    """The step kind a call is booked under: its X-Step-Kind (at most MAX_KIND_CHARS), else UNSPECIFIED."""
    kind = (header or "").strip()[:MAX_KIND_CHARS]
    return kind or UNSPECIFIED


@dataclass
class Step:
    """What one call did besides its tokens and $, booked with it in its session's trajectory:
    its step kind, when it started and ended (wall clock, s), the prompt tokens served from
    a prefix cache, the tool calls in the answer the client got, the backend attempts that
    failed over, and whether the client marked it as a retry (x-stainless-retry-count)."""

    kind: str = UNSPECIFIED
    started: float = 0.0
    ended: float = 0.0
    cached_tokens: int = 0
    tool_calls: int = 0
    failovers: int = 0
    client_retry: bool = False
    request_id: str = ""           # a second call with the same id is a client retry too

    @property
    def wall_s(self) -> float:
        return max(0.0, self.ended - self.started)


def step_row(step: Step, counts: dict[str, float]) -> dict[str, float]:
    """One call's increments to its step kind's row (STEP_COUNTS): `counts` holds its prompt and
    completion tokens and $; the rest comes from the step."""
    row = {"calls": 1, "cached_tokens": step.cached_tokens, "wall_s": step.wall_s, "tool_calls": step.tool_calls,
           **{k: counts.get(k, 0) for k in ("prompt_tokens", "completion_tokens", "usd")}}
    return {name: row[name] for name in STEP_COUNTS}


def book_kind(steps: dict[str, Any], kind: str) -> str:
    """The key a step of `kind` is booked under in a session that already has `steps`: its own
    while the session has fewer than MAX_STEP_KINDS kinds (a client chooses them), else OTHER."""
    return kind if kind in steps or len(steps) < MAX_STEP_KINDS else OTHER


@dataclass
class Session:
    id: str
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    thinking_tokens: int = 0
    usd: float = 0.0
    escalations: int = 0
    budget_hits: int = 0
    cached_tokens: int = 0
    tool_calls: int = 0
    failovers: int = 0
    client_retries: int = 0
    reserved_tokens: int = 0
    reserved_usd: float = 0.0
    backends: dict[str, int] = field(default_factory=dict)
    steps: dict[str, dict[str, float]] = field(default_factory=dict)   # kind → STEP_COUNTS
    first_at: float | None = None  # when its first call started (wall clock)
    last_at: float | None = None   # when its last call ended
    owner: str = PUBLIC            # the tenant that opened it (never shown: it is a key's id)
    recent_ids: deque = field(default_factory=lambda: deque(maxlen=RECENT_IDS), repr=False)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def wall_s(self) -> float:
        """First call's start to last call's end (0 before any call is booked)."""
        if self.first_at is None or self.last_at is None:
            return 0.0
        return max(0.0, self.last_at - self.first_at)

    def as_json(self, max_tokens: int | None, max_usd: float | None) -> dict[str, Any]:
        steps = {k: {n: (v[n] if n in ("usd", "wall_s") else int(v[n])) for n in STEP_COUNTS}
                 for k, v in self.steps.items()}
        return {"id": self.id, "object": "session", "calls": self.calls, "tokens": self.tokens,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "thinking_tokens": self.thinking_tokens, "cached_tokens": self.cached_tokens, "usd": self.usd,
                "escalations": self.escalations, "budget_hits": self.budget_hits,
                "tool_calls": self.tool_calls, "retries": self.failovers + self.client_retries,
                "failovers": self.failovers, "client_retries": self.client_retries,
                "wall_s": self.wall_s, "first_call_at": self.first_at, "last_call_at": self.last_at,
                "steps": steps, "backends": self.backends, "in_flight_tokens": self.reserved_tokens,
                "max_tokens": max_tokens, "max_usd": max_usd}

    def book_step(self, step: Step, counts: dict[str, float], retry: bool) -> None:
        """Add one settled call's trajectory: its kind's row, the wall-time span, tool calls,
        failovers and (`retry`) a client retry. `counts` are its prompt/completion tokens and $."""
        row = self.steps.setdefault(book_kind(self.steps, step.kind), dict.fromkeys(STEP_COUNTS, 0))
        for name, value in step_row(step, counts).items():
            row[name] += value
        self.cached_tokens += step.cached_tokens
        self.tool_calls += step.tool_calls
        self.failovers += step.failovers
        self.client_retries += int(retry)
        self.first_at = step.started if self.first_at is None else min(self.first_at, step.started)
        self.last_at = step.ended if self.last_at is None else max(self.last_at, step.ended)


@dataclass
class SessionHold:
    """One call's reservation against its session."""

    sid: str
    session: Session | None        # the in-memory session (None where sessions live in Redis)
    tokens: int
    usd: float
    cut_to: int | None = None      # max_tokens was cut to this to fit the session's budget
    limit: int | None = None       # max_tokens sent upstream (set whenever the session is capped)
    done: bool = False
    rid: str = ""                  # its id where sessions live in Redis
    owner: str = PUBLIC            # the session's tenant (`sid` is the client's id within it)
    step: Step = field(default_factory=Step)   # filled by the call (`call.Call.settle`) before it settles


def session_exhausted(sid: str, tokens: int, usd: float, max_tokens: int | None,
                      max_usd: float | None) -> BudgetExceededError:
    """The 429 for a session with nothing left under its caps."""
    return BudgetExceededError(
        f"session '{sid}' has spent its budget ({tokens} tokens, ${usd:.6f}; caps: "
        f"{max_tokens or '-'} tokens, ${max_usd or '-'}); start a new session",
        code="session_budget_exceeded")


class Sessions:
    """The in-memory session book: one least-recently-used book per tenant, each keeping at
    most `max_sessions` (default MAX_SESSIONS) sessions by id."""

    def __init__(self, max_tokens: int | None, max_usd: float | None, max_sessions: int | None = None):
        self.max_tokens = max_tokens
        self.max_usd = max_usd
        self.max_sessions = MAX_SESSIONS if max_sessions is None else max_sessions
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1 (sessions kept per tenant), got {self.max_sessions}")
        self._books: dict[str, OrderedDict[str, Session]] = {}

    async def get(self, sid: str, owner: str = PUBLIC) -> Session | None:
        """The tenant's session `sid`, or None when this tenant has none by that id."""
        return self._books.get(owner, {}).get(sid)

    def session(self, sid: str, owner: str = PUBLIC) -> Session:
        """The tenant's session `sid`, opened if new; the tenant's least recently used session
        goes when it has more than `max_sessions` (other tenants' books are not touched)."""
        book = self._books.setdefault(owner, OrderedDict())
        s = book.get(sid)
        if s is None:
            s = book[sid] = Session(sid, owner=owner)
            while len(book) > self.max_sessions:
                book.popitem(last=False)
        book.move_to_end(sid)
        return s

    async def close(self) -> None:
        """Nothing to close: the book lives in this process."""

    async def hold(self, sid: str, prompt_upper: int, max_tokens: int, usd_for_max: float,
                   owner: str = PUBLIC, samples: int = 1) -> SessionHold:
        """Reserve the call's worst case against the tenant's session `sid`, cutting max_tokens
        to what the session has left.

        `prompt_upper` is every prompt token the call may send (all prompts, all tiers),
        `samples` how many completions of up to `max_tokens` each it may generate (n × prompts
        × tiers) and `usd_for_max` the $ of all of them at `max_tokens`. The hold is
        `prompt_upper + samples × cut` tokens, and `cut` (per completion) is what is sent
        upstream as max_tokens, so no call can generate more tokens than it holds."""
        s = self.session(sid, owner)
        samples = max(1, int(samples))
        cut = max_tokens
        if self.max_tokens is not None:
            cut = min(cut, (self.max_tokens - s.tokens - s.reserved_tokens - prompt_upper) // samples)
        if self.max_usd is not None and usd_for_max > 0:
            left = self.max_usd - s.usd - s.reserved_usd
            cut = min(cut, int(max_tokens * left / usd_for_max))
        if cut < 1:
            s.budget_hits += 1
            raise session_exhausted(sid, s.tokens, s.usd, self.max_tokens, self.max_usd)
        usd = usd_for_max * cut / max_tokens if max_tokens else 0.0
        s.reserved_tokens += prompt_upper + samples * cut
        s.reserved_usd += usd
        capped = self.max_tokens is not None or self.max_usd is not None
        return SessionHold(sid, s, prompt_upper + samples * cut, usd, cut if cut < max_tokens else None,
                           cut if capped else None, owner=s.owner)

    def release(self, hold: SessionHold) -> None:
        """Drop a hold whose call was refused after it (by a key budget): a budget hit, no call."""
        if hold.done:
            return
        hold.done = True
        hold.session.reserved_tokens -= hold.tokens
        hold.session.reserved_usd -= hold.usd
        hold.session.budget_hits += 1

    def totals(self) -> dict[str, float]:
        """Sums over the tracked sessions, for the gateway's gauges."""
        live = [s for book in self._books.values() for s in book.values()]
        out = {name: float(sum(getattr(s, name) for s in live)) for name in SESSION_TOTALS}
        out["sessions"] = float(len(live))
        return out

    def settle(self, hold: SessionHold, backend: str | None, usage: dict | None, usd: float,
               escalations: int = 0, exhausted: bool = False) -> None:
        """Replace the hold with the call's counts (once; later calls do nothing)."""
        if hold.done:
            return
        hold.done = True
        s = hold.session
        s.reserved_tokens -= hold.tokens
        s.reserved_usd -= hold.usd
        s.calls += 1
        s.usd += usd
        s.escalations += escalations
        s.budget_hits += int(exhausted)
        usage = usage or {}
        counts = {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}
        s.prompt_tokens += counts["prompt_tokens"]
        s.completion_tokens += counts["completion_tokens"]
        s.thinking_tokens += int(usage.get("thinking_tokens") or 0)
        if backend:
            s.backends[backend] = s.backends.get(backend, 0) + 1
        rid = hold.step.request_id
        retry = hold.step.client_retry or (bool(rid) and rid in s.recent_ids)
        if rid and rid not in s.recent_ids:
            s.recent_ids.append(rid)
        s.book_step(hold.step, {**counts, "usd": usd}, retry)
