"""Per-key request and token rates (`gateway.rate_limits`: rpm, tpm), in memory or shared through Redis.

A limit counts, per API key, the requests and the worst-case tokens (prompt upper bound +
max_tokens for every completion asked for) admitted in the current minute, a fixed window
aligned to the clock. A request that would pass a limit is refused before anything is
reserved: 429 `rate_limit_error`, code `rate_limit_exceeded`, with `Retry-After` set to the
seconds left in the window. Check and count happen in one step (a lock here, one Lua script
in Redis), so replicas sharing `state_url` enforce one rate together. Rates are not budgets:
nothing is settled afterwards, and a request refused later (a budget, a saturated backend)
still counts, as at OpenAI.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from hybridserve.config import RateLimitConfig
from hybridserve.errors import OverloadedError, StateUnavailableError
from hybridserve.gateway.ledger import ANONYMOUS

WINDOW_S = 60


class RateLimitedError(OverloadedError):
    """A key passed its requests- or tokens-per-minute limit (429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message, retry_after_s, code="rate_limit_exceeded")


@dataclass(frozen=True)
class _Verdict:
    limit: RateLimitConfig
    what: str  # "requests" or "tokens"
    used: int


def _applies(limit: RateLimitConfig, key: str) -> bool:
    return limit.key in ("*", key)


def _refusal(v: _Verdict, key: str, now: float) -> RateLimitedError:
    cap = v.limit.rpm if v.what == "requests" else v.limit.tpm
    left = WINDOW_S - now % WINDOW_S
    return RateLimitedError(f"rate limit '{v.limit.name}' for this key: {v.used} {v.what} of {cap} per minute "
                            f"used; retry in {left:.0f}s", left)


class RateLimiter:
    """One process's windows: {(limit, key, window): [requests, tokens]}."""

    def __init__(self, limits: list[RateLimitConfig], clock=time.time):
        self.limits = limits
        self.clock = clock
        self._windows: dict[tuple[str, str, int], list[int]] = {}
        self._lock = asyncio.Lock()

    async def admit(self, key: str | None, tokens: int) -> None:
        key = key or ANONYMOUS
        now = self.clock()
        window = int(now // WINDOW_S)
        async with self._lock:
            mine = [lim for lim in self.limits if _applies(lim, key)]
            counts = [self._windows.get((lim.name, key, window), [0, 0]) for lim in mine]
            for lim, (n, t) in zip(mine, counts):
                if lim.rpm is not None and n + 1 > lim.rpm:
                    raise _refusal(_Verdict(lim, "requests", n), key, now)
                if lim.tpm is not None and t + tokens > lim.tpm:
                    raise _refusal(_Verdict(lim, "tokens", t), key, now)
            for lim, (n, t) in zip(mine, counts):
                self._windows[(lim.name, key, window)] = [n + 1, t + tokens]
            if len(self._windows) > 10_000:  # past windows: nothing reads them again
                self._windows = {k: v for k, v in self._windows.items() if k[2] >= window}


# KEYS: one requests counter and one tokens counter per limit; ARGV: tokens, ttl, then rpm, tpm per
# limit (-1: no cap). Returns 0 when counted, else the 1-based index of the limit refused and which.
_ADMIT = """
local tokens, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = #KEYS / 2
for i = 1, n do
  local rpm, tpm = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local r = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
  local t = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
  if rpm >= 0 and r + 1 > rpm then return {i, 'requests', r} end
  if tpm >= 0 and t + tokens > tpm then return {i, 'tokens', t} end
end
for i = 1, n do
  redis.call('INCR', KEYS[2 * i - 1]); redis.call('EXPIRE', KEYS[2 * i - 1], ttl)
  redis.call('INCRBY', KEYS[2 * i], tokens); redis.call('EXPIRE', KEYS[2 * i], ttl)
end
return {0, '', 0}
"""


class RedisRateLimiter:
    """The same windows in Redis, so every replica naming `state_url` counts into one."""

    def __init__(self, client, limits: list[RateLimitConfig], prefix: str, clock=time.time):
        self.limits = limits
        self.prefix = prefix
        self.clock = clock
        self._admit = client.register_script(_ADMIT)

    async def admit(self, key: str | None, tokens: int) -> None:
        key = key or ANONYMOUS
        mine = [lim for lim in self.limits if _applies(lim, key)]
        if not mine:
            return
        now = self.clock()
        window = int(now // WINDOW_S)
        keys, argv = [], [tokens, 2 * WINDOW_S]
        for lim in mine:
            base = f"{self.prefix}:rate:{lim.name}:{key}:{window}"
            keys += [base + ":r", base + ":t"]
            argv += [-1 if lim.rpm is None else lim.rpm, -1 if lim.tpm is None else lim.tpm]
        from redis.exceptions import RedisError

        try:
            index, what, used = await self._admit(keys=keys, args=argv)
        except RedisError as err:
            raise StateUnavailableError(f"the shared state store did not answer ({type(err).__name__}); "
                                        "rate limits cannot be checked, retry shortly") from None
        if int(index):
            what = what.decode() if isinstance(what, bytes) else what
            raise _refusal(_Verdict(mine[int(index) - 1], what, int(used)), key, now)


def rate_limiter(limits: list[RateLimitConfig], state_prefix: str, redis_client=None,
                 ) -> RateLimiter | RedisRateLimiter | None:
    """The limiter `gateway.rate_limits` asks for: none, this process's, or the replicas' shared one."""
    if not limits:
        return None
    if redis_client is not None:
        return RedisRateLimiter(redis_client, limits, state_prefix)
    return RateLimiter(limits)
