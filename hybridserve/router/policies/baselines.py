"""Baseline policies: round robin and least loaded (what most gateways do)."""
from __future__ import annotations

import itertools

from hybridserve.router.policies.base import Decision, RouteRequest, Snapshot, no_backend


class RoundRobin:
    name = "round_robin"

    def __init__(self):
        self._counter = itertools.count()

    def choose(self, req: RouteRequest, snap: Snapshot) -> Decision:
        cands = snap.candidates(req)
        if not cands:
            return no_backend(self.name, req)
        i = next(self._counter) % len(cands)
        b = cands[i]
        return Decision(b.name, self.name, f"turn {i + 1} of {len(cands)}",
                        tuple(c.name for c in cands if c is not b))


class LeastLoaded:
    """The backend with the fewest requests running + waiting; equals take turns."""

    name = "least_loaded"

    def __init__(self):
        self._counter = itertools.count()

    def choose(self, req: RouteRequest, snap: Snapshot) -> Decision:
        cands = snap.candidates(req)
        if not cands:
            return no_backend(self.name, req)
        turn, n = next(self._counter), len(cands)
        ranked = sorted(cands, key=lambda b: (b.load, b.cache_usage, (cands.index(b) - turn) % n))
        b = ranked[0]
        return Decision(b.name, self.name, f"lowest load ({b.load:g} running+waiting)",
                        tuple(c.name for c in ranked[1:]))
