"""Cascade: cheapest tier first; escalate when the answer's confidence is below a threshold.

`choose` returns the first backend and, as fallbacks, the escalation order
(cheapest first, by predicted cost for this request). The gateway runs the
first, measures confidence (mean token logprob, or a verifier's score) and calls
`should_escalate` to decide whether to try the next.

With `gateway.cascade` configured, `RungCascade` runs those rungs instead of the
tiers: each rung is a backend, or a backend with test-time-compute params (e.g.
`{n: 5, hybridserve_vote: true}`), with its own threshold (see
router/quality.py `rung_thresholds`).
"""
from __future__ import annotations

from dataclasses import dataclass

from hybridserve.router.policies.base import Decision, RouteRequest, Snapshot, no_backend


def mean_logprob(logprobs: list[float]) -> float | None:
    return sum(logprobs) / len(logprobs) if logprobs else None


def should_escalate(confidence: float | None, threshold: float) -> bool:
    """Escalate when confidence is unknown or below the threshold."""
    return confidence is None or confidence < threshold


class Cascade:
    name = "cascade"

    def __init__(self, threshold: float = -1.0):
        self.threshold = threshold

    def choose(self, req: RouteRequest, snap: Snapshot) -> Decision:
        cands = snap.candidates(req)
        if not cands:
            return no_backend(self.name, req)
        order = {t: i for i, t in enumerate(snap.tier_order)}
        ests = {b.name: snap.estimate(b, req) for b in cands}
        ranked = sorted(cands, key=lambda b: (order.get(b.tier, len(order)), ests[b.name].usd))
        first = ranked[0]
        return Decision(first.name, self.name,
                        f"cheapest tier first ({first.tier}); escalate below mean logprob {self.threshold}",
                        tuple(b.name for b in ranked[1:]), tuple(ests.values()))


@dataclass(frozen=True)
class Rung:
    """One configured cascade step: a backend, possibly with test-time-compute params (the
    gateway merges those into the upstream body), and the threshold below which it escalates."""

    name: str
    backend: str
    threshold: float | None        # None: the last rung, never escalates
    source: str = ""               # where the threshold came from


class RungCascade:
    """`gateway.cascade`: the configured rungs in order, skipping those whose backend is not a
    healthy candidate that fits the request. `Decision.rungs` names the rungs to run."""

    name = "cascade"

    def __init__(self, rungs: tuple[Rung, ...]):
        if len(rungs) < 2:
            raise ValueError("a cascade needs two or more rungs (gateway.cascade)")
        self.rungs = rungs

    def choose(self, req: RouteRequest, snap: Snapshot) -> Decision:
        cands = {b.name: b for b in snap.candidates(req)}
        live = [r for r in self.rungs if r.backend in cands]
        if not live:
            return no_backend(self.name, req)
        ests = {n: snap.estimate(cands[n], req) for n in dict.fromkeys(r.backend for r in live)}
        skipped = [r.name for r in self.rungs if r not in live]
        steps = " -> ".join(r.name if r.threshold is None else f"{r.name} (< {r.threshold:g})" for r in live)
        why = f"cascade rungs {steps}; escalate below the rung's mean logprob threshold" + (
            f"; skipped {', '.join(skipped)} (unhealthy or too short)" if skipped else "")
        backends = list(dict.fromkeys(r.backend for r in live))
        return Decision(backends[0], self.name, why, tuple(backends[1:]), tuple(ests.values()),
                        rungs=tuple(r.name for r in live))
