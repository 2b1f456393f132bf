"""Cascade: cheapest tier first; escalate when the answer's confidence is below a threshold.

`choose` returns the first backend and, as fallbacks, the escalation order
(cheapest first, by predicted cost for this request). The gateway runs the
first, measures confidence (mean token logprob, or a verifier's score) and calls
`should_escalate` to decide whether to try the next.
"""
from __future__ import annotations

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
