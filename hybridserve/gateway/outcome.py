"""What one request did, whatever path it took: each upstream answer's usage, the tiers tried, how it ended.

The proxy fills one `Outcome` per request, on every path (plain, stream, tier cascade,
configured rungs, verifier verdicts, votes, failover, client disconnect, error), and
`Call.settle` books it once in the key ledger and the session book. The outcome knows
nothing of the stores: `charge` says what to book against a reservation of a given size.
For the session's trajectory it also counts the attempts that failed over and the tool
calls of the answer the client got (a whole body's `message.tool_calls`, or a stream's
distinct (choice, call) indexes across its deltas).

The rule that keeps a reservation an upper bound: every upstream call is `sent`, and stays
unmeasured until it reports usage (`measured`) or is known to have produced nothing
(`produced_nothing`: it never reached the backend, or the backend answered with an error).
A call that never reported (the client left, the answer broke off or timed out, a 200 came
without usage) may have generated up to what was reserved, so a request with one is charged
the larger of what was measured and what was reserved; otherwise it is charged what was measured.
"""
from __future__ import annotations

from dataclasses import dataclass, field

USAGE_COUNTS = ("prompt_tokens", "completion_tokens", "thinking_tokens")


def cached_tokens(usage: dict) -> int:
    """OpenAI's usage.prompt_tokens_details.cached_tokens (0 when absent or malformed)."""
    details = usage.get("prompt_tokens_details")
    n = details.get("cached_tokens") if isinstance(details, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


def tool_calls_in(choices) -> int:
    """Tool calls in a whole answer's choices (`message.tool_calls`); malformed parts count none."""
    n = 0
    for c in choices if isinstance(choices, list) else ():
        msg = c.get("message") if isinstance(c, dict) else None
        calls = msg.get("tool_calls") if isinstance(msg, dict) else None
        n += len(calls) if isinstance(calls, list) else 0
    return n


def tool_call_keys(choices) -> set[tuple[int, int]]:
    """The (choice, tool call) indexes a stream chunk's deltas name: a call's first delta and its
    argument fragments name the same pair, so a stream's tool calls are the distinct pairs seen."""
    keys = set()
    for c in choices if isinstance(choices, list) else ():
        delta = c.get("delta") if isinstance(c, dict) else None
        calls = delta.get("tool_calls") if isinstance(delta, dict) else None
        for j, tc in enumerate(calls if isinstance(calls, list) else ()):
            at = tc.get("index", j) if isinstance(tc, dict) else j
            keys.add((c.get("index", 0), at))
    return keys


@dataclass(frozen=True)
class Spend:
    """One upstream answer's measured usage: a tier's, a rung's or a verifier's verdict."""

    backend: str
    counts: dict[str, int]          # prompt, completion and thinking tokens
    tokens: int                     # its total_tokens (else prompt + completion)
    usd: float                      # price_per_hour × device_seconds
    device_s: float
    verdict: bool = False           # a verifier's verdict, not an answer
    cached: int = 0                 # prompt tokens its backend served from the prefix cache

    @classmethod
    def of(cls, backend: str, usage: dict, usd: float, verdict: bool = False) -> Spend:
        counts = {k: int(usage.get(k) or 0) for k in USAGE_COUNTS}
        tokens = int(usage.get("total_tokens") or 0) or counts["prompt_tokens"] + counts["completion_tokens"]
        return cls(backend, counts, tokens, usd, float(usage.get("device_seconds") or 0.0), verdict,
                   cached_tokens(usage))


@dataclass
class Outcome:
    request_id: str = ""
    spends: list[Spend] = field(default_factory=list)
    tried: list[dict] = field(default_factory=list)   # the receipt's tiers or rungs (`usage.tiers`)
    unmeasured: int = 0           # upstream calls sent that have neither reported usage nor produced nothing
    backend: str | None = None    # the backend last asked for the answer
    status: int | None = None     # the HTTP status of that backend's answer
    answer: dict | None = None    # the usage of the answer the client gets (the last tier's)
    exhausted: bool = False       # an answer ran into its session cut
    disconnected: bool = False    # the client left before the answer was done
    error: str | None = None      # the exception that ended the request, if one did
    failovers: int = 0            # backend attempts that could not take the call (unreachable, saturated)
    tool_calls: int = 0           # tool calls in the answer the client got (`saw_tool_calls`, `..._deltas`)
    _stream_tools: set = field(default_factory=set, repr=False)

    # ---------------------------------------------------------------- filled in by the proxy

    def sent(self) -> None:
        """An upstream call went out; it counts as unmeasured until it reports or produced nothing."""
        self.unmeasured += 1

    def produced_nothing(self) -> None:
        """The last call sent never reached its backend, or the backend answered with an error."""
        self.unmeasured -= 1

    def measured(self, spend: Spend, answer: dict | None = None) -> None:
        """A call sent reported its usage; `answer` is that usage when it is the client's answer."""
        self.unmeasured -= 1
        self.spends.append(spend)
        if answer is not None:
            self.answer = answer

    def saw_tool_calls(self, answer: dict) -> None:
        """Count the tool calls of the client's whole answer (it is the last one asked for)."""
        self.tool_calls = tool_calls_in(answer.get("choices"))

    def saw_tool_call_deltas(self, chunk: dict) -> None:
        """Count the tool calls a stream chunk's deltas start or continue (the stream's calls so far)."""
        self._stream_tools |= tool_call_keys(chunk.get("choices"))
        self.tool_calls = len(self._stream_tools)

    # ---------------------------------------------------------------- read at settlement

    @property
    def usd(self) -> float:
        return sum(s.usd for s in self.spends)

    @property
    def device_s(self) -> float:
        return sum(s.device_s for s in self.spends)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.spends)

    @property
    def cached(self) -> int:
        return sum(s.cached for s in self.spends)

    @property
    def counts(self) -> dict[str, int]:
        return {k: sum(s.counts[k] for s in self.spends) for k in USAGE_COUNTS}

    @property
    def answered(self) -> bool:
        """A backend's 200 answer reached the client (whole, or as a stream that started)."""
        return self.status == 200

    @property
    def escalations(self) -> int:
        return max(0, len(self.tried) - 1)

    def charge(self, held_tokens: int, held_usd: float, prompt_bound: int) -> tuple[float, int, dict | None]:
        """($, tokens, usage counts) to book against a store that reserved `held_tokens` and
        `held_usd`: what was measured, or, when a call never reported, at least what was held
        (its counts split as `prompt_bound` prompt tokens, the rest completion). The usage is
        None when nothing was measured and nothing is owed."""
        usd, tokens = self.usd, self.tokens
        usage = self.counts if self.spends else None
        if self.unmeasured > 0:
            if held_tokens > tokens or usage is None:
                prompt = min(held_tokens, prompt_bound)
                usage = {"prompt_tokens": prompt, "completion_tokens": max(0, held_tokens - prompt)}
            usd, tokens = max(usd, held_usd), max(tokens, held_tokens)
        return usd, tokens, usage
