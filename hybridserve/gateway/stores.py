"""The gateway's stores as typed protocols: what a request asks of a key ledger and a session book.

Each has a local implementation (`ledger.Ledger` in SQLite, `governor.Sessions` in memory) and a
shared one for several replicas (`shared_state.RedisLedger`, `shared_state.RedisSessions`), and
`gateway.call` is written against these protocols only. The contract all of them keep:

* admission (`reserve`, `hold`) and reads (`status`, `get`) are coroutines: a shared store waits
  on the network, a local one answers at once;
* completion (`settle`, `release`) never waits: a local store books at once, a shared one queues
  the write. Each is idempotent: a second `settle` of the same reservation books nothing;
* spent + reserved is checked against the cap and the reservation booked in one step, so
  concurrent admissions overspend a cap by at most one reservation.

tests/serving/test_stores.py checks every implementation against its protocol, signature by
signature, so one that drifts fails there rather than at a request.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from hybridserve.config import BudgetConfig
from hybridserve.gateway.governor import PUBLIC, Session, SessionHold
from hybridserve.gateway.ledger import Reservation


@runtime_checkable
class BudgetStore(Protocol):
    """Per-key budgets: reserve the worst case at admission, book the measured cost at the end."""

    budgets: list[BudgetConfig]

    async def reserve(self, key: str | None, usd: float, tokens: int) -> Reservation:
        """Book the reservation against every budget of `key`, or raise BudgetExceededError."""
        ...

    def settle(self, res: Reservation, usd: float, tokens: int, request_id: str = "") -> None:
        """Replace the reservation with what the request is charged (once)."""
        ...

    async def status(self, key: str | None) -> list[dict]:
        """Every budget of `key`: cap, spent, reserved, when it resets (GET /v1/budgets)."""
        ...

    async def close(self) -> None:
        ...


@runtime_checkable
class SessionBook(Protocol):
    """Agent sessions (`X-Session-Id`), keyed by (tenant, id), with token and $ caps."""

    max_tokens: int | None
    max_usd: float | None

    async def hold(self, sid: str, prompt_upper: int, max_tokens: int, usd_for_max: float,
                   owner: str = PUBLIC, samples: int = 1) -> SessionHold:
        """Reserve a call's worst case in the session, cutting max_tokens to what is left, or
        raise BudgetExceededError when nothing is."""
        ...

    def settle(self, hold: SessionHold, backend: str | None, usage: dict | None, usd: float,
               escalations: int = 0, exhausted: bool = False) -> None:
        """Replace the hold with the call's counts (once)."""
        ...

    def release(self, hold: SessionHold) -> None:
        """Drop a hold whose call was refused after it (a budget hit, no call)."""
        ...

    async def get(self, sid: str, owner: str = PUBLIC) -> Session | None:
        ...

    def totals(self) -> dict[str, float]:
        """Sums over the sessions, for the gateway's gauges."""
        ...

    async def close(self) -> None:
        ...
