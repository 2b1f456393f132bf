"""Inputs and outputs of every routing policy: `choose(request, snapshot) -> Decision`.

Policies are pure: they read a `Snapshot` (backend health, load, tier, price, the
economics table and the measured quality table) and return a `Decision` that names
the backend and says why. They import neither the gateway nor the workers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from hybridserve.router.quality import OVERALL, Measured, QualityTable
from hybridserve.router.table import EconomicsTable, Estimate


@dataclass(frozen=True)
class RouteRequest:
    prompt_tokens: int                 # exact or an upper bound
    max_tokens: int                    # the cap the client asked for
    expected_output_tokens: int | None = None  # what to price with (default: max_tokens)
    tier: str | None = None            # quality tier the client asked for (None = any)
    api_key_id: str | None = None
    step_kind: str | None = None       # agent step: plan | tool | polish | ...
    slo_ttft_s: float | None = None
    slo_e2e_s: float | None = None
    quality_floor: float | None = None  # least measured accuracy (0..1) a backend must have
    task: str | None = None            # the request's task tag (x-hybridserve-task)

    @property
    def output_tokens(self) -> int:
        return self.expected_output_tokens or self.max_tokens

    @property
    def task_kind(self) -> str:
        """What accuracy is read for: the task tag, else the agent step kind, else overall."""
        return self.task or self.step_kind or OVERALL


@dataclass(frozen=True)
class BackendView:
    name: str
    arch: str
    tier: str
    price_per_hour: float
    max_context: int
    healthy: bool = True
    load: float = 0.0          # running + waiting requests
    cache_usage: float = 0.0   # 0..1
    cached_tokens: int = 0     # prompt tokens expected from its prefix cache (it served this prefix)


@dataclass(frozen=True)
class Snapshot:
    backends: tuple[BackendView, ...]
    table: EconomicsTable
    tier_order: tuple[str, ...] = ()   # cheapest/weakest first, for cascades
    quality: QualityTable = field(default_factory=QualityTable)  # measured accuracy (may be empty)

    def candidates(self, req: RouteRequest) -> list[BackendView]:
        """Healthy backends whose context fits the request (and its tier, when one is asked for)."""
        fit = [b for b in self.backends if b.healthy and req.prompt_tokens + 1 <= b.max_context]
        if req.tier:
            fit = [b for b in fit if b.tier == req.tier]
        return fit

    def estimate(self, b: BackendView, req: RouteRequest) -> Estimate:
        return self.table.predict(b.name, req.prompt_tokens, req.output_tokens, concurrency=int(b.load) + 1,
                                  cached_tokens=b.cached_tokens)

    def accuracy(self, b: BackendView, req: RouteRequest) -> Measured:
        return self.quality.accuracy(b.name, req.task_kind)


@dataclass(frozen=True)
class QualityNote:
    """How a quality floor shaped a decision: the chosen backend's figure and whether it met it."""

    floor: float
    task: str                  # the task kind asked for ("all" = overall)
    accuracy: float | None     # the chosen backend's figure (None: unmeasured)
    source: str                # which figure: "tag arith", "overall", "unmeasured"
    met: bool                  # False: no candidate met the floor; the most accurate was taken


@dataclass(frozen=True)
class Decision:
    backend: str | None
    policy: str
    reason: str
    fallbacks: tuple[str, ...] = ()          # next backends to try (cascade order / failover)
    estimates: tuple[Estimate, ...] = field(default_factory=tuple)
    quality: QualityNote | None = None       # set when a quality floor applied
    rungs: tuple[str, ...] = ()              # configured cascade: the rungs to run, in order

    @property
    def estimate(self) -> Estimate | None:
        return next((e for e in self.estimates if e.backend == self.backend), None)


class Policy(Protocol):
    name: str

    def choose(self, req: RouteRequest, snap: Snapshot) -> Decision: ...


def no_backend(policy: str, req: RouteRequest) -> Decision:
    tier = f" in tier '{req.tier}'" if req.tier else ""
    return Decision(None, policy, f"no healthy backend{tier} fits {req.prompt_tokens} prompt tokens")
