"""Economics policy: the cheapest backend predicted to meet the latency SLO, the tier and the quality floor.

For each healthy candidate it prices the request from the live table (prompt
tokens, expected output tokens, current load) and sets aside backends whose cache
is nearly full (`CACHE_FULL`, unless all are). With a quality floor
(`RouteRequest.quality_floor`) only backends whose measured accuracy for the
request's task kind (`RouteRequest.task_kind`: task tag, else step kind, else
overall; a tag the profile lacks falls back to overall) is at least the floor stay;
an unmeasured backend stays only when `unmeasured="allow"`. If none does, the most
accurate candidate is taken (ties: the cheapest) and the decision says so
(`Decision.quality.met` is False): never a silent drop. Among those left it drops
backends predicted to miss the SLO and ranks by the objective:

* `cheapest`: predicted $ (ties: faster, then less loaded, then taking turns);
* `value`: predicted $ per correct answer = predicted $ / accuracy; unmeasured and
  zero-accuracy backends rank last (by $ among themselves);
* `fastest`: predicted end-to-end latency.

If none meets the SLO it takes the fastest and says so. The decision carries every
estimate so the choice can be audited.
"""
from __future__ import annotations

import itertools

from hybridserve.router.policies.base import (BackendView, Decision, QualityNote, RouteRequest, Snapshot,
                                              no_backend)
from hybridserve.router.quality import Measured
from hybridserve.router.table import Estimate

CACHE_FULL = 0.95  # a backend past this cache usage would queue or preempt the request
OBJECTIVES = ("cheapest", "value", "fastest")
UNMEASURED = ("allow", "deny")


def meets_slo(est, req: RouteRequest) -> bool:
    return ((req.slo_ttft_s is None or est.ttft_s <= req.slo_ttft_s)
            and (req.slo_e2e_s is None or est.e2e_s <= req.slo_e2e_s))


def meets_floor(m: Measured, floor: float, unmeasured: str) -> bool:
    """A measured figure meets the floor at or above it; an unmeasured one only when allowed."""
    return unmeasured == "allow" if m.accuracy is None else m.accuracy >= floor


def usd_per_correct(est: Estimate, m: Measured) -> float | None:
    """Predicted $ per correct answer (None when accuracy is unknown or zero)."""
    return est.usd / m.accuracy if m.accuracy else None


def value_key(est: Estimate, m: Measured) -> tuple:
    """Rank for the `value` objective: measured $/correct first, the rest last by $."""
    per = usd_per_correct(est, m)
    return (0, per, est.e2e_s) if per is not None else (1, est.usd, est.e2e_s)


def _fig(m: Measured) -> str:
    return "unmeasured" if m.accuracy is None else f"{m.accuracy:.2f}"


class Economics:
    def __init__(self, objective: str = "cheapest", unmeasured: str = "deny"):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)} (got {objective!r})")
        if unmeasured not in UNMEASURED:
            raise ValueError(f"unmeasured must be 'allow' or 'deny' (got {unmeasured!r})")
        self.objective = objective
        self.unmeasured = unmeasured
        self.name = {"cheapest": "economics", "value": "value", "fastest": "economics:fastest"}[objective]
        self._turn = itertools.count()

    def choose(self, req: RouteRequest, snap: Snapshot) -> Decision:
        cands = snap.candidates(req)
        if not cands:
            return no_backend(self.name, req)
        cands = [b for b in cands if b.cache_usage < CACHE_FULL] or cands  # memory headroom
        ests = {b.name: snap.estimate(b, req) for b in cands}
        acc = {b.name: snap.accuracy(b, req) for b in cands}
        if req.quality_floor is None:
            return self._rank(req, cands, ests, acc, None, "")
        ok = [b for b in cands if meets_floor(acc[b.name], req.quality_floor, self.unmeasured)]
        if not ok:
            return self._most_accurate(req, cands, ests, acc)
        return self._rank(req, ok, ests, acc, *self._floor_words(req, ok, cands, acc))

    # ---------------------------------------------------------------- quality floor

    def _floor_words(self, req: RouteRequest, ok: list[BackendView], cands: list[BackendView],
                     acc: dict[str, Measured]) -> tuple[QualityNote, str]:
        """The floor's part of the reason: who was set aside, and the note (filled in by _rank)."""
        out = [b for b in cands if b not in ok]
        words = [f"{b.name} {_fig(acc[b.name])} " + ("denied" if acc[b.name].accuracy is None else "below")
                 for b in out]
        note = QualityNote(req.quality_floor, req.task_kind, None, "unmeasured", True)
        return note, "; ".join(words)

    def _most_accurate(self, req: RouteRequest, cands: list[BackendView], ests: dict[str, Estimate],
                       acc: dict[str, Measured]) -> Decision:
        def key(b: BackendView):
            a = acc[b.name].accuracy
            return (-(a if a is not None else -1.0), ests[b.name].usd)
        ranked = sorted(cands, key=key)
        pick = ranked[0]
        m = acc[pick.name]
        others = ", ".join(f"{b.name} {_fig(acc[b.name])}" for b in ranked[1:])
        why = (f"no backend meets {req.task_kind} accuracy >= {req.quality_floor:.2f}; most accurate instead: "
               f"{pick.name} {_fig(m)} ({m.source})" + (f"; {others}" if others else ""))
        note = QualityNote(req.quality_floor, req.task_kind, m.accuracy, m.source, False)
        return Decision(pick.name, self.name, why, tuple(b.name for b in ranked[1:]),
                        tuple(ests.values()), note)

    # ---------------------------------------------------------------- objective

    def _rank(self, req: RouteRequest, pool: list[BackendView], ests: dict[str, Estimate],
              acc: dict[str, Measured], note: QualityNote | None, set_aside: str) -> Decision:
        turn, n = next(self._turn), len(pool)
        load = {b.name: (b.load, (pool.index(b) - turn) % n) for b in pool}
        es = [ests[b.name] for b in pool]
        ok = [e for e in es if meets_slo(e, req)]
        if self.objective == "fastest":
            pick = min(es, key=lambda e: (e.e2e_s, e.usd, load[e.backend]))
            why = f"fastest: predicted {pick.e2e_s:.3f}s end to end"
        elif not ok:
            pick = min(es, key=lambda e: (e.e2e_s, e.usd, load[e.backend]))
            why = f"no backend predicted to meet the SLO; fastest ({pick.e2e_s:.3f}s) instead"
        elif self.objective == "value":
            pick = min(ok, key=lambda e: (*value_key(e, acc[e.backend]), load[e.backend]))
            why = self._value_words(pick, es, acc)
        else:
            pick = min(ok, key=lambda e: (e.usd, e.e2e_s, load[e.backend]))
            others = ", ".join(f"{e.backend} ${e.usd:.2e}" for e in es if e is not pick)
            why = f"cheapest meeting the SLO: ${pick.usd:.2e} predicted" + (f" (vs {others})" if others else "")
        if note is not None:
            m = acc[pick.backend]
            note = QualityNote(note.floor, note.task, m.accuracy, m.source, True)
            why = (f"{self.objective} with {note.task} accuracy >= {note.floor:.2f}: {pick.backend} {_fig(m)} "
                   f"({m.source})" + (f"; {set_aside}" if set_aside else "") + f"; {why}")
        rest = tuple(e.backend for e in sorted(es, key=lambda e: e.usd) if e is not pick)  # within the floor
        return Decision(pick.backend, self.name, why, rest, tuple(ests.values()), note)

    @staticmethod
    def _value_words(pick: Estimate, es: list[Estimate], acc: dict[str, Measured]) -> str:
        def per(e: Estimate) -> str:
            p = usd_per_correct(e, acc[e.backend])
            return "unmeasured" if acc[e.backend].accuracy is None else (
                "never correct" if p is None else f"${p:.2e}/correct")
        others = ", ".join(f"{e.backend} {per(e)}" for e in es if e is not pick)
        return (f"best value meeting the SLO: {per(pick)} predicted (${pick.usd:.2e} / accuracy "
                f"{_fig(acc[pick.backend])})" + (f" (vs {others})" if others else ""))
