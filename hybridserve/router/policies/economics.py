"""Economics policy: the cheapest backend predicted to meet the latency SLO and the tier.

For each healthy candidate it prices the request from the live table (prompt
tokens, expected output tokens, current load), sets aside backends whose cache is
nearly full (`CACHE_FULL`, unless all are), drops those predicted to miss the SLO,
and takes the cheapest; if none meets the SLO it takes the fastest and says so.
The decision carries every estimate so the choice can be audited.
"""
from __future__ import annotations

from hybridserve.router.policies.base import Decision, RouteRequest, Snapshot, no_backend

CACHE_FULL = 0.95  # a backend past this cache usage would queue or preempt the request


def meets_slo(est, req: RouteRequest) -> bool:
    return ((req.slo_ttft_s is None or est.ttft_s <= req.slo_ttft_s)
            and (req.slo_e2e_s is None or est.e2e_s <= req.slo_e2e_s))


class Economics:
    name = "economics"

    def __init__(self, objective: str = "cheapest"):
        if objective not in ("cheapest", "fastest"):
            raise ValueError("objective must be 'cheapest' or 'fastest'")
        self.objective = objective

    def choose(self, req: RouteRequest, snap: Snapshot) -> Decision:
        cands = snap.candidates(req)
        if not cands:
            return no_backend(self.name, req)
        cands = [b for b in cands if b.cache_usage < CACHE_FULL] or cands  # memory headroom
        ests = [snap.estimate(b, req) for b in cands]
        ok = [e for e in ests if meets_slo(e, req)]
        if self.objective == "fastest":
            pick = min(ests, key=lambda e: (e.e2e_s, e.usd))
            why = f"fastest: predicted {pick.e2e_s:.3f}s end to end"
        elif ok:
            pick = min(ok, key=lambda e: (e.usd, e.e2e_s))
            others = ", ".join(f"{e.backend} ${e.usd:.2e}" for e in ests if e is not pick)
            why = f"cheapest meeting the SLO: ${pick.usd:.2e} predicted" + (f" (vs {others})" if others else "")
        else:
            pick = min(ests, key=lambda e: (e.e2e_s, e.usd))
            why = f"no backend predicted to meet the SLO; fastest ({pick.e2e_s:.3f}s) instead"
        rest = tuple(e.backend for e in sorted(ests, key=lambda e: e.usd) if e is not pick)
        return Decision(pick.backend, self.name if self.objective == "cheapest" else "economics:fastest", why,
                        rest, tuple(ests))
