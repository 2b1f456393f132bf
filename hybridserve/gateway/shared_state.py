"""Budgets and sessions shared by several gateway replicas, kept in Redis.

One gateway keeps per-key budgets in SQLite and agent sessions in memory. Behind a
load balancer, N replicas would each enforce the caps alone, so a key could spend
N times its budget. With `gateway.state_url: redis://HOST:6379/0` on every replica,
`RedisLedger` and `RedisSessions` replace both, with the same contract:

* Admission (`reserve`, `hold`) is one Lua script: it checks spent + reserved
  against every cap and books the reservation atomically, so replicas admitting
  at the same moment still overspend a cap by at most one reservation in total.
* Each reservation is a field of a hash with a deadline (`lease_s`, twice the
  request timeout plus a minute). A replica that dies mid-request leaves nothing
  behind for long: the next admission drops reservations whose deadline passed.
* Everything runs on the gateway's event loop (redis.asyncio, no threads).
  Admission is awaited, at most `state_timeout_s`; when Redis does not answer,
  the request gets a 503 (`state_unavailable`): budgets fail closed, never open.
* Completion (`settle`, `release`) is queued to one writer task, so no request
  waits on it, and retried while Redis is away. It is idempotent: it leaves a
  marker key for the reservation (one lease long), so a retry after a lost reply
  books nothing twice. A replica's own reads (`status`, `get`) first wait for its
  queued writes.

Keys live under `gateway.state_prefix`. Spend windows expire one period after
they end; a session expires after `SESSION_TTL_S` without a call. A session's keys
name its tenant (`{prefix}:session:{tenant}:{id}`, tenant `-` without auth), so each
key's sessions are its own, as in `governor.Sessions`. The session
gauges are totals over the whole deployment (every replica reports the same
numbers, so aggregate them with max, not sum).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

from hybridserve.config import BudgetConfig
from hybridserve.errors import StateUnavailableError
from hybridserve.gateway.governor import (MAX_STEP_KINDS, PUBLIC, RECENT_IDS, SESSION_TOTALS, STEP_COUNTS,
                                          Session, SessionHold, Step, session_exhausted, step_row)
from hybridserve.gateway.ledger import ANONYMOUS, PERIOD_S, Budgets, Reservation, budget_exhausted, budget_row

logger = logging.getLogger(__name__)

SESSION_TTL_S = 7 * 86400
WRITE_RETRY_S = 60.0        # a settle that cannot reach Redis is retried this long, then logged and dropped
Write = Callable[[], Awaitable[Any]]
# Live reservations: hash field = reservation id, value = "usd tokens deadline". _HELD sums those of
# one hash into (u, t) and drops those past their deadline. Once a reservation is settled (or
# cancelled) its id gets a marker key, `done`, that lives as long as a lease: a retried settle and
# an admission that arrives after its own cancellation both see it and do nothing.
_HELD = """
local function held(key, now)
  local u, t = 0, 0
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    local a, b, c = string.match(all[i + 1], '^(%S+) (%S+) (%S+)$')
    if a == nil or tonumber(c) < now then
      redis.call('HDEL', key, all[i])
    else
      u = u + tonumber(a); t = t + tonumber(b)
    end
  end
  return u, t
end
"""

# KEYS: spent_1, held_1, spent_2, held_2, ..., done.  ARGV: now, rid, usd, tokens, deadline, ttl,
# then cap_usd_b, cap_tokens_b per budget ('' for no cap). Returns {0}, or for the first budget that
# is exhausted {b, spent $, spent tokens, reserved $, reserved tokens}, or {-1} when the id is
# already done: its admission timed out at the gateway and was cancelled before it ran here.
_RESERVE = _HELD + """
local now = tonumber(ARGV[1])
local n = (#KEYS - 1) / 2
if redis.call('EXISTS', KEYS[#KEYS]) == 1 then return {-1} end
for b = 1, n do
  local s = redis.call('HMGET', KEYS[2 * b - 1], 'usd', 'tokens')
  local su, st = tonumber(s[1] or '0'), tonumber(s[2] or '0')
  local ru, rt = held(KEYS[2 * b], now)
  local cu, ct = ARGV[5 + 2 * b], ARGV[6 + 2 * b]
  if (cu ~= '' and su + ru >= tonumber(cu)) or (ct ~= '' and st + rt >= tonumber(ct)) then
    return {b, tostring(su), tostring(st), tostring(ru), tostring(rt)}
  end
end
for b = 1, n do
  redis.call('HSET', KEYS[2 * b], ARGV[2], ARGV[3] .. ' ' .. ARGV[4] .. ' ' .. ARGV[5])
  redis.call('EXPIRE', KEYS[2 * b], ARGV[6])
end
return {0}
"""

# KEYS: spent_1, held_1, ..., done.  ARGV: rid, usd, tokens, marker ttl (s), then ttl_b (s) per budget.
_SETTLE = """
local n = (#KEYS - 1) / 2
if not redis.call('SET', KEYS[#KEYS], '1', 'NX', 'EX', ARGV[4]) then return 0 end
for b = 1, n do
  redis.call('HDEL', KEYS[2 * b], ARGV[1])
  if tonumber(ARGV[2]) > 0 or tonumber(ARGV[3]) > 0 then
    redis.call('HINCRBYFLOAT', KEYS[2 * b - 1], 'usd', ARGV[2])
    redis.call('HINCRBY', KEYS[2 * b - 1], 'tokens', ARGV[3])
    redis.call('HINCRBY', KEYS[2 * b - 1], 'requests', 1)
    redis.call('EXPIRE', KEYS[2 * b - 1], ARGV[4 + b])
  end
end
return 1
"""

# KEYS: session, held, totals, done.  ARGV: now, rid, prompt_upper, max_tokens, usd_for_max,
# cap_tokens, cap_usd ('' for none), deadline, ttl, samples (completions of up to the cut each,
# as in `governor.Sessions.hold`). Returns {cut, held $}, {-1, tokens, $} when
# nothing is left, or {-2} when the id is already done (cancelled after a timeout, as in _RESERVE).
_HOLD = _HELD + """
local now = tonumber(ARGV[1])
if redis.call('EXISTS', KEYS[4]) == 1 then return {-2} end
local prompt, maxt, ufm = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local samples = math.max(1, tonumber(ARGV[10] or '1'))
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HINCRBY', KEYS[3], 'sessions', 1)
  redis.call('HSET', KEYS[1], 'calls', 0)
end
local v = redis.call('HMGET', KEYS[1], 'prompt_tokens', 'completion_tokens', 'usd')
local tokens = tonumber(v[1] or '0') + tonumber(v[2] or '0')
local usd = tonumber(v[3] or '0')
local ru, rt = held(KEYS[2], now)
local cut = maxt
if ARGV[6] ~= '' then cut = math.min(cut, math.floor((tonumber(ARGV[6]) - tokens - rt - prompt) / samples)) end
if ARGV[7] ~= '' and ufm > 0 then
  local left = tonumber(ARGV[7]) - usd - ru
  local afford = maxt * left / ufm
  if afford >= 0 then afford = math.floor(afford) else afford = math.ceil(afford) end
  cut = math.min(cut, afford)
end
redis.call('EXPIRE', KEYS[1], ARGV[9])
if cut < 1 then
  redis.call('HINCRBY', KEYS[1], 'budget_hits', 1)
  redis.call('HINCRBY', KEYS[3], 'budget_hits', 1)
  return {-1, tostring(tokens), tostring(usd)}
end
local hu = 0
if maxt > 0 then hu = ufm * cut / maxt end
redis.call('HSET', KEYS[2], ARGV[2], tostring(hu) .. ' ' .. tostring(prompt + samples * cut) .. ' ' .. ARGV[8])
redis.call('EXPIRE', KEYS[2], ARGV[9])
return {cut, tostring(hu)}
"""

# KEYS: session, held, totals, done, recent ids (a sorted set).  ARGV: rid, marker ttl (s), session
# ttl (s), backend ('' for none), step kind ('' for none: a release or a cancellation books no
# step), MAX_STEP_KINDS, started, ended, request id ('' for none), client retry mark (0/1),
# RECENT_IDS, n, then n field, increment pairs added to the session and to the totals, then the
# step's field, increment pairs added to its kind's row (`step:KIND:FIELD`; as in
# `governor.Session.book_step`, a session keeps MAX_STEP_KINDS kinds apart, later new ones go to
# 'other', governor.OTHER). A request id among the session's last RECENT_IDS is a client retry.
_SESSION_SETTLE = """
if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
local function add(name, value)
  if tonumber(value) ~= 0 then
    redis.call('HINCRBYFLOAT', KEYS[1], name, value)
    redis.call('HINCRBYFLOAT', KEYS[3], name, value)
  end
end
local last = 12 + 2 * tonumber(ARGV[12])
for i = 13, last, 2 do add(ARGV[i], ARGV[i + 1]) end
if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[1], 'backend:' .. ARGV[4], 1) end
if ARGV[5] ~= '' then
  local retry = ARGV[10] == '1'
  if ARGV[9] ~= '' then
    if redis.call('ZSCORE', KEYS[5], ARGV[9]) then
      retry = true
    else
      redis.call('ZADD', KEYS[5], ARGV[8], ARGV[9])
      redis.call('ZREMRANGEBYRANK', KEYS[5], 0, -tonumber(ARGV[11]) - 1)
    end
    redis.call('EXPIRE', KEYS[5], ARGV[3])
  end
  if retry then add('client_retries', 1) end
  local kind = ARGV[5]
  if redis.call('HEXISTS', KEYS[1], 'step:' .. kind .. ':calls') == 0 then
    if tonumber(redis.call('HGET', KEYS[1], 'step_kinds') or '0') >= tonumber(ARGV[6]) then kind = 'other' end
    if redis.call('HEXISTS', KEYS[1], 'step:' .. kind .. ':calls') == 0 then
      redis.call('HINCRBY', KEYS[1], 'step_kinds', 1)
    end
  end
  for i = last + 1, #ARGV, 2 do
    redis.call('HINCRBYFLOAT', KEYS[1], 'step:' .. kind .. ':' .. ARGV[i], ARGV[i + 1])
  end
  local first = redis.call('HGET', KEYS[1], 'first_at')
  if not first or tonumber(ARGV[7]) < tonumber(first) then redis.call('HSET', KEYS[1], 'first_at', ARGV[7]) end
  local ended = redis.call('HGET', KEYS[1], 'last_at')
  if not ended or tonumber(ARGV[8]) > tonumber(ended) then redis.call('HSET', KEYS[1], 'last_at', ARGV[8]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect(url: str, timeout_s: float):
    """An asyncio Redis client; it connects on first use, on the loop that uses it."""
    import redis.asyncio

    return redis.asyncio.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                        decode_responses=True, health_check_interval=30)


class _Writer:
    """One task on the event loop that runs the completion writes in order, retrying while
    Redis is away. Started on first use, so it lives on the loop that serves requests."""

    def __init__(self, where: str):
        self.where = where
        self.q: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    def put(self, write: Write, what: str = "a write") -> None:
        """Queue `write`; `what` names it in the log line should it have to be dropped."""
        if self.task is None:
            self.q = asyncio.Queue()
            self.task = asyncio.get_running_loop().create_task(self._run())
        self.q.put_nowait((time.monotonic(), write, what))

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) until every write queued so far is done."""
        if self.task is None:
            return
        done = asyncio.Event()

        async def mark() -> None:
            done.set()
        self.put(mark)
        try:
            await asyncio.wait_for(done.wait(), timeout_s)
        except asyncio.TimeoutError:
            logger.warning("shared state %s: writes still queued after %.0f s", self.where, timeout_s)

    async def close(self, timeout_s: float = 5.0) -> None:
        if self.task is not None:
            await self.flush(timeout_s)
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    async def _run(self) -> None:
        from redis.exceptions import ConnectionError, TimeoutError

        while True:
            queued, write, what = await self.q.get()
            delay = 0.05
            while True:
                try:
                    await write()
                    break
                except (ConnectionError, TimeoutError) as e:
                    # the age limit counts from when the write was queued, so a long outage
                    # drains the backlog instead of waiting it out item by item
                    if time.monotonic() - queued > WRITE_RETRY_S:
                        logger.error("shared state %s unreachable for %.0f s; %s was dropped: %s",
                                     self.where, WRITE_RETRY_S, what, e)
                        break
                    await asyncio.sleep(delay)
                    delay = min(1.0, delay * 2)
                except Exception:
                    logger.exception("shared state %s: %s failed", self.where, what)
                    break


class _Store:
    """A Redis client, its scripts and its writer task."""

    def __init__(self, url: str, prefix: str, lease_s: float, clock, client, timeout_s: float):
        self.where = redact(url)
        self.prefix = prefix
        self.lease_s = lease_s
        self.clock = clock
        self.owns_client = client is None   # a client passed in is closed by whoever made it
        self.r = client if client is not None else connect(url, timeout_s)
        self.writer = _Writer(self.where)

    async def call(self, op: Write, undo: Write | None = None) -> Any:
        """Run a read or an admission; a Redis failure becomes a 503 that says so. An admission
        that failed may still have reached Redis (a timeout): `undo` is queued to cancel it."""
        from redis.exceptions import RedisError

        try:
            return await op()
        except RedisError as e:
            if undo is not None:
                self.writer.put(undo, "the cancellation of a timed-out admission")
            raise StateUnavailableError(
                f"the gateway's shared budget store ({self.where}) did not answer ({type(e).__name__}: "
                f"{e}); requests that need a budget check are refused until it does") from None

    async def ping(self) -> str | None:
        """None when Redis answers, else why not."""
        try:
            await self.r.ping()
            return None
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    def deadline(self) -> float:
        return self.clock() + self.lease_s

    def done_key(self, rid: str) -> str:
        return f"{self.prefix}:done:{rid}"

    @property
    def marker_ttl(self) -> str:
        return str(int(self.lease_s) + 1)

    async def close(self) -> None:
        await self.writer.close()
        if self.owns_client:
            await self.r.aclose()


class RedisLedger(_Store, Budgets):
    """`stores.BudgetStore` (reserve at admission, settle at completion) with Redis as the book."""

    def __init__(self, url: str, budgets: list[BudgetConfig], *, prefix: str = "hybridserve",
                 timeout_s: float = 0.5, lease_s: float = 1260.0, clock=time.time, client=None):
        super().__init__(url, prefix, lease_s, clock, client, timeout_s)
        self.budgets = list(budgets)
        self._reserve = self.r.register_script(_RESERVE)
        self._settle = self.r.register_script(_SETTLE)

    def _keys(self, name: str, key: str, start: int) -> tuple[str, str]:
        base = f"{self.prefix}:budget:{name}:{key}:{start}"
        return base + ":spent", base + ":held"

    async def reserve(self, key: str | None, usd: float, tokens: int) -> Reservation:
        key = key or ANONYMOUS
        budgets = self.applicable(key)
        res = Reservation(key, usd, tokens)
        if not budgets:
            return res
        keys, caps = [], []
        for b in budgets:
            start, _ = self.window(b)
            keys += self._keys(b.name, key, start)
            caps += ["" if b.usd is None else repr(b.usd), "" if b.tokens is None else str(b.tokens)]
            res.slots.append((b.name, start))
        rid = res.rid = uuid.uuid4().hex
        args = [repr(self.clock()), rid, repr(float(usd)), str(int(tokens)), repr(self.deadline()),
                str(int(self.lease_s * 2)), *caps]
        out = await self.call(lambda: self._reserve(keys=[*keys, self.done_key(rid)], args=args),
                              undo=self._settle_write(res, 0.0, 0))
        if int(out[0]) < 0:
            raise StateUnavailableError("the admission was cancelled after a timeout; retry")
        if int(out[0]) > 0:
            b = budgets[int(out[0]) - 1]
            _, end = self.window(b)
            raise budget_exhausted(b, end, *(float(x) for x in out[1:5]),
                                   scope=", across every gateway replica")
        return res

    def settle(self, res: Reservation, usd: float, tokens: int, request_id: str = "") -> None:
        """Queue the booking of what the request is charged (once; later calls do nothing).
        Unlike the SQLite ledger it keeps no receipt rows: `request_id` names the write in the
        log should Redis stay away past WRITE_RETRY_S."""
        if res.settled or not res.slots:
            res.settled = True
            return
        res.settled = True
        self.writer.put(self._settle_write(res, usd, tokens),
                        f"the settle of request {request_id or res.rid} ({tokens} tokens, ${usd:.6g})")

    def _settle_write(self, res: Reservation, usd: float, tokens: int) -> Write:
        """The write that books a reservation's cost (zero: cancels it) and marks it done."""
        keys, expire = [], []
        now = self.clock()
        for name, start in res.slots:   # a window is kept for one period after it ends
            keys += self._keys(name, res.key, start)
            b = next((x for x in self.budgets if x.name == name), None)
            length = PERIOD_S[b.period] if b else 86400
            expire.append(str(max(60, int(start + 2 * length - now))))
        keys.append(self.done_key(res.rid))
        args = [res.rid, repr(float(usd)), str(int(tokens)), self.marker_ttl, *expire]
        return lambda: self._settle(keys=keys, args=args)

    async def status(self, key: str | None) -> list[dict]:
        key = key or ANONYMOUS
        await self.writer.flush()
        budgets = self.applicable(key)
        now = self.clock()

        async def read():
            pipe = self.r.pipeline(transaction=False)
            for b in budgets:
                spent, held = self._keys(b.name, key, self.window(b)[0])
                pipe.hmget(spent, "usd", "tokens")
                pipe.hgetall(held)
            return await pipe.execute()
        raw = await self.call(read) if budgets else []
        out = []
        for i, b in enumerate(budgets):
            _, end = self.window(b)
            (usd, tokens), held = raw[2 * i], raw[2 * i + 1]
            r_usd, r_tok = _live_holds(held, now)
            out.append(budget_row(b, end, float(usd or 0.0), int(float(tokens or 0)), r_usd, r_tok))
        return out


def _steps(fields: dict[str, str]) -> dict[str, dict[str, float]]:
    """A session hash's `step:KIND:FIELD` entries as governor.Session.steps (a kind may hold ':')."""
    out: dict[str, dict[str, float]] = {}
    for key, value in fields.items():
        if key.startswith("step:"):
            kind, name = key[5:].rsplit(":", 1)
            out.setdefault(kind, dict.fromkeys(STEP_COUNTS, 0.0))[name] = float(value)
    return out


def _live_holds(held: dict[str, str], now: float) -> tuple[float, float]:
    """Sum of the reservations in a held-hash that are not past their deadline."""
    usd = tokens = 0.0
    for value in held.values():
        parts = value.split()
        if len(parts) == 3 and float(parts[2]) >= now:
            usd += float(parts[0])
            tokens += float(parts[1])
    return usd, tokens


class RedisSessions(_Store):
    """`stores.SessionBook` shared through Redis (sessions keyed by tenant and id); `totals`
    reads what the last `refresh_totals` (a coroutine) fetched."""

    def __init__(self, url: str, max_tokens: int | None, max_usd: float | None, *,
                 prefix: str = "hybridserve", timeout_s: float = 0.5, lease_s: float = 1260.0,
                 clock=time.time, client=None):
        super().__init__(url, prefix, lease_s, clock, client, timeout_s)
        self.max_tokens = max_tokens
        self.max_usd = max_usd
        self._hold = self.r.register_script(_HOLD)
        self._settle = self.r.register_script(_SESSION_SETTLE)
        self.totals_key = f"{prefix}:sessions:totals"
        self._totals: dict[str, float] | None = None

    def _keys(self, sid: str, owner: str) -> list[str]:
        """The session's hash, its holds and the totals. A tenant (a key id, or '-') holds no
        ':', so no two (tenant, id) pairs share a key, and the holds (and the recent request ids,
        `_ids_key`) live apart from the sessions, so no session id can name another session's."""
        where = f"{owner or '-'}:{sid}"
        return [f"{self.prefix}:session:{where}", f"{self.prefix}:session-held:{where}", self.totals_key]

    def _ids_key(self, sid: str, owner: str) -> str:
        return f"{self.prefix}:session-ids:{owner or '-'}:{sid}"

    async def hold(self, sid: str, prompt_upper: int, max_tokens: int, usd_for_max: float,
                   owner: str = PUBLIC, samples: int = 1) -> SessionHold:
        """Reserve the call's worst case against the tenant's session `sid` (one script; the
        arguments mean what they mean in `governor.Sessions.hold`)."""
        rid = uuid.uuid4().hex
        samples = max(1, int(samples))
        args = [repr(self.clock()), rid, str(int(prompt_upper)), str(int(max_tokens)), repr(float(usd_for_max)),
                "" if self.max_tokens is None else str(self.max_tokens),
                "" if self.max_usd is None else repr(self.max_usd), repr(self.deadline()), str(SESSION_TTL_S),
                str(samples)]
        keys = [*self._keys(sid, owner), self.done_key(rid)]
        out = await self.call(lambda: self._hold(keys=keys, args=args),
                              undo=self._book_write(SessionHold(sid, None, 0, 0.0, rid=rid, owner=owner), None, {}))
        cut = int(out[0])
        if cut == -2:
            raise StateUnavailableError("the admission was cancelled after a timeout; retry")
        if cut < 1:
            raise session_exhausted(sid, int(float(out[1])), float(out[2]), self.max_tokens, self.max_usd)
        capped = self.max_tokens is not None or self.max_usd is not None
        return SessionHold(sid, None, prompt_upper + samples * cut, float(out[1]), cut if cut < max_tokens else None,
                           cut if capped else None, rid=rid, owner=owner)

    def _book(self, hold: SessionHold, backend: str | None, incr: dict[str, float],
              step: Step | None = None) -> None:
        if hold.done:
            return
        hold.done = True
        self.writer.put(self._book_write(hold, backend, incr, step),
                        f"the booking of a call in session {hold.sid}")

    def _book_write(self, hold: SessionHold, backend: str | None, incr: dict[str, float],
                    step: Step | None = None) -> Write:
        """The write that adds a call's counts (and its `step`, when it was a call) to its session
        and marks its hold done (no counts: cancels the hold)."""
        args = [hold.rid, self.marker_ttl, str(SESSION_TTL_S), backend or "", step.kind if step else "",
                str(MAX_STEP_KINDS), repr(step.started if step else 0.0), repr(step.ended if step else 0.0),
                step.request_id if step else "", "1" if step and step.client_retry else "0", str(RECENT_IDS),
                str(len(incr))]
        for name, value in incr.items():
            args += [name, repr(float(value))]
        if step is not None:
            for name, value in step_row(step, incr).items():
                args += [name, repr(float(value))]
        keys = [*self._keys(hold.sid, hold.owner), self.done_key(hold.rid), self._ids_key(hold.sid, hold.owner)]
        return lambda: self._settle(keys=keys, args=args)

    def settle(self, hold: SessionHold, backend: str | None, usage: dict | None, usd: float,
               escalations: int = 0, exhausted: bool = False) -> None:
        """Queue the call's counts and its trajectory step for its session (once; later calls do nothing)."""
        usage, step = usage or {}, hold.step
        self._book(hold, backend, {
            "calls": 1, "usd": usd, "escalations": escalations, "budget_hits": int(exhausted),
            "cached_tokens": step.cached_tokens, "tool_calls": step.tool_calls, "failovers": step.failovers,
            **{k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens", "thinking_tokens")}},
            step)

    def release(self, hold: SessionHold) -> None:
        self._book(hold, None, {"budget_hits": 1})

    async def get(self, sid: str, owner: str = PUBLIC) -> Session | None:
        """The tenant's session `sid` (after this replica's queued writes), or None."""
        await self.writer.flush()
        base, held, _ = self._keys(sid, owner)

        async def read():
            pipe = self.r.pipeline(transaction=False)
            pipe.hgetall(base)
            pipe.hgetall(held)
            return await pipe.execute()
        fields, holds = await self.call(read)
        if not fields:
            return None
        r_usd, r_tok = _live_holds(holds, self.clock())
        num = {k: float(fields.get(k) or 0) for k in SESSION_TOTALS}
        first, last = fields.get("first_at"), fields.get("last_at")
        return Session(sid, **{k: (v if k == "usd" else int(v)) for k, v in num.items()},
                       reserved_tokens=int(r_tok), reserved_usd=r_usd, owner=owner,
                       backends={k.removeprefix("backend:"): int(v) for k, v in fields.items()
                                 if k.startswith("backend:")}, steps=_steps(fields),
                       first_at=float(first) if first else None, last_at=float(last) if last else None)

    async def refresh_totals(self) -> None:
        """Fetch the deployment-wide totals (every session that has called, over all replicas)."""
        await self.writer.flush()
        self._totals = None             # a failed read leaves no stale figures behind
        raw = await self.call(lambda: self.r.hgetall(self.totals_key))
        self._totals = {k: float(raw.get(k) or 0) for k in SESSION_TOTALS}
        self._totals["sessions"] = float(raw.get("sessions") or 0)

    def totals(self) -> dict[str, float]:
        if self._totals is None:
            raise StateUnavailableError("session totals have not been read from the shared store yet")
        return self._totals
