"""Per-API-key budgets ($ and tokens per period), kept in SQLite so they survive restarts.

Contract: `reserve` at admission books the request's predicted worst case (the
predicted cost of its max_tokens, and prompt upper bound + max_tokens tokens)
against every budget that applies to the key; `settle` at completion replaces the
reservation with what the request is charged (`gateway.outcome`: the measured cost, or at
least the reservation when an upstream call never reported its usage), which is what the
database records.

A request is admitted while spent + reserved is below the cap, so concurrent
requests can overspend a cap by at most one reservation (the last one admitted), provided
no settle books more than its reservation. For tokens that holds exactly (the gateway sends
upstream the max_tokens it reserved, see `gateway.call`); measured dollars may exceed their
reservation (predicted × `call.USD_SAFETY`), and `settle` books them in full, so the $
overspend is one reservation plus what in-flight requests cost beyond their reservations.
Reservations live in memory only: a request in flight when the gateway stops
never completes, so it has nothing to record. All calls happen on the event-loop
thread; the lock only guards against use from other threads. `reserve`, `status` and
`close` are coroutines that answer at once, as `stores.BudgetStore` asks of every ledger.

Every settle also writes one receipt row (`receipts`): the request id, the key, what was
booked and what had been reserved, so what a request was charged can be read back when
its client never saw a receipt (it left mid-stream). Rows older than the longest budget
period (at least RECEIPT_KEEP_S) are pruned at startup and every RECEIPT_PRUNE_EVERY settles.

Budgets come from `gateway.budgets`: `key: '*'` gives every key its own cap,
`key: <sha256 hex>` caps one key. Periods are aligned windows (a `day` budget
resets at 00:00 UTC; `month` is 30 days from the epoch).
"""
from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hybridserve.config import BudgetConfig
from hybridserve.errors import BudgetExceededError

PERIOD_S = {"minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400, "month": 30 * 86400}
ANONYMOUS = "anonymous"
RECEIPT_KEEP_S = 86400
RECEIPT_PRUNE_EVERY = 10_000

_SCHEMA = ("""CREATE TABLE IF NOT EXISTS spend (
    budget TEXT NOT NULL, key TEXT NOT NULL, period_start INTEGER NOT NULL,
    usd REAL NOT NULL DEFAULT 0, tokens INTEGER NOT NULL DEFAULT 0, requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (budget, key, period_start))""",
           """CREATE TABLE IF NOT EXISTS receipts (
    request_id TEXT NOT NULL, key TEXT NOT NULL, settled_at REAL NOT NULL, usd REAL NOT NULL,
    tokens INTEGER NOT NULL, reserved_usd REAL NOT NULL, reserved_tokens INTEGER NOT NULL)""",
           "CREATE INDEX IF NOT EXISTS receipts_by_request ON receipts (request_id)")


@dataclass
class Reservation:
    key: str
    usd: float
    tokens: int
    slots: list[tuple[str, int]] = field(default_factory=list)  # (budget name, period start)
    settled: bool = False
    rid: str = ""                  # its id in a shared (Redis) ledger


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def budget_row(b: BudgetConfig, end: float, usd: float, tokens: int, r_usd: float, r_tok: float) -> dict:
    """One entry of GET /v1/budgets: the cap, what is spent and reserved, when it resets."""
    return {"budget": b.name, "period": b.period, "cap_usd": b.usd, "cap_tokens": b.tokens,
            "spent_usd": usd, "spent_tokens": tokens, "reserved_usd": r_usd,
            "reserved_tokens": int(r_tok), "resets_at": _iso(end)}


def budget_exhausted(b: BudgetConfig, end: float, usd: float, tokens: float, r_usd: float, r_tok: float,
                     scope: str = "") -> BudgetExceededError:
    """The 429 for budget `b`, which spent + reserved has reached: names the cap that was hit
    ($ when it was, else tokens), what was spent and reserved, and when the window resets."""
    over = f"${b.usd:g}" if b.usd is not None and usd + r_usd >= b.usd else f"{b.tokens} tokens"
    return BudgetExceededError(
        f"budget '{b.name}' ({over} per {b.period}) is exhausted for this API key "
        f"(spent ${usd:.6f} and {int(tokens)} tokens, {int(r_tok)} tokens reserved in flight{scope}); "
        f"it resets at {_iso(end)}")


class Budgets:
    """Which budgets apply to a key, and their current windows (`budgets` and `clock` are set
    by the ledger that uses this)."""

    budgets: list[BudgetConfig]
    clock: Callable[[], float]

    def applicable(self, key: str) -> list[BudgetConfig]:
        return [b for b in self.budgets if b.key in ("*", key)]

    def window(self, b: BudgetConfig) -> tuple[int, int]:
        length = PERIOD_S[b.period]
        start = int(self.clock()) // length * length
        return start, start + length


class Ledger(Budgets):
    def __init__(self, path: str | Path, budgets: list[BudgetConfig], clock=time.time):
        self.budgets = list(budgets)
        self.clock = clock
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        for statement in _SCHEMA:
            self.db.execute(statement)
        self._reserved: dict[tuple[str, str, int], list[float]] = {}  # (budget, key, start) -> [usd, tokens]
        self._lock = threading.Lock()
        self._settles = 0
        self.prune_receipts()

    async def close(self) -> None:
        self.db.close()

    def spent(self, budget: str, key: str, start: int) -> tuple[float, int]:
        row = self.db.execute("SELECT usd, tokens FROM spend WHERE budget=? AND key=? AND period_start=?",
                              (budget, key, start)).fetchone()
        return (row[0], row[1]) if row else (0.0, 0)

    def can_reserve(self, key: str) -> None:
        """Raise BudgetExceededError naming the first exhausted budget for this key."""
        for b in self.applicable(key):
            start, end = self.window(b)
            usd, tokens = self.spent(b.name, key, start)
            r_usd, r_tok = self._reserved.get((b.name, key, start), (0.0, 0))
            if ((b.usd is not None and usd + r_usd >= b.usd)
                    or (b.tokens is not None and tokens + r_tok >= b.tokens)):
                raise budget_exhausted(b, end, usd, tokens, r_usd, r_tok)

    async def reserve(self, key: str | None, usd: float, tokens: int) -> Reservation:
        key = key or ANONYMOUS
        with self._lock:
            self.can_reserve(key)
            res = Reservation(key, usd, tokens)
            for b in self.applicable(key):
                start, _ = self.window(b)
                slot = self._reserved.setdefault((b.name, key, start), [0.0, 0])
                slot[0] += usd
                slot[1] += tokens
                res.slots.append((b.name, start))
            return res

    def settle(self, res: Reservation, usd: float, tokens: int, request_id: str = "") -> None:
        """Replace the reservation with what the request is charged (once; later calls do nothing),
        and write its receipt row."""
        with self._lock:
            if res.settled:
                return
            res.settled = True
            if res.slots:
                self._receipt(res, usd, tokens, request_id)
            for name, start in res.slots:
                slot = self._reserved.get((name, res.key, start))
                if slot is not None:
                    slot[0] -= res.usd
                    slot[1] -= res.tokens
                    if slot[1] <= 0 and slot[0] <= 1e-15:
                        del self._reserved[(name, res.key, start)]
                if usd > 0 or tokens > 0:
                    self.db.execute(
                        "INSERT INTO spend (budget, key, period_start, usd, tokens, requests) "
                        "VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT (budget, key, period_start) DO UPDATE SET "
                        "usd = usd + excluded.usd, tokens = tokens + excluded.tokens, "
                        "requests = requests + 1", (name, res.key, start, usd, tokens))

    def _receipt(self, res: Reservation, usd: float, tokens: int, request_id: str) -> None:
        self.db.execute("INSERT INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (request_id, res.key, self.clock(), usd, tokens, res.usd, res.tokens))
        self._settles += 1
        if self._settles % RECEIPT_PRUNE_EVERY == 0:
            self.prune_receipts()

    def prune_receipts(self) -> None:
        """Drop receipt rows older than the longest budget period (at least RECEIPT_KEEP_S)."""
        keep = max([RECEIPT_KEEP_S, *(PERIOD_S[b.period] for b in self.budgets)])
        self.db.execute("DELETE FROM receipts WHERE settled_at < ?", (self.clock() - keep,))

    def receipts(self, request_id: str) -> list[dict]:
        """The receipt rows of one request id (a client may reuse an id: one row per settle)."""
        rows = self.db.execute("SELECT key, settled_at, usd, tokens, reserved_usd, reserved_tokens FROM receipts "
                               "WHERE request_id=? ORDER BY settled_at", (request_id,)).fetchall()
        names = ("key", "settled_at", "usd", "tokens", "reserved_usd", "reserved_tokens")
        return [dict(zip(names, row)) for row in rows]

    async def status(self, key: str | None) -> list[dict]:
        """Every budget that applies to the key: cap, spent, reserved, reset time."""
        key = key or ANONYMOUS
        out = []
        for b in self.applicable(key):
            start, end = self.window(b)
            usd, tokens = self.spent(b.name, key, start)
            r_usd, r_tok = self._reserved.get((b.name, key, start), (0.0, 0))
            out.append(budget_row(b, end, usd, tokens, r_usd, r_tok))
        return out
