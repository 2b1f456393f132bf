"""Calibration: accuracy by confidence (mean token logprob), thresholds and cascade thresholds.

- `bins`: a target's results with a known confidence, cut into (up to) 5 quantile
  bins [low, high); the first bin's low and the last bin's high are None (-inf/+inf).
- `keep_threshold`: the lowest observed confidence t whose kept answers (conf >= t)
  reach the target accuracy on their own, or None.
- `cascade`: for A (cheap) then B (expensive) evaluated on the same items (joined by
  id), escalate to B when conf_A < t or unknown. For each candidate t (the distinct
  observed confidences plus -inf and +inf): accuracy(t) = mean over items of
  (A correct if kept else B correct); cost(t) = mean cost_A + escalated share × mean
  cost_B. It picks the cheapest t that reaches the target accuracy (default: B's
  accuracy − 0.02); none reaches it -> the most accurate t, cheapest among equals.

Thresholds are written as finite numbers: -inf (never escalate a known confidence)
as the lowest observed confidence, +inf (always escalate) as `ALWAYS` = 1.0, above any
mean logprob (logprobs are <= 0).
"""
from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)

ALWAYS = 1.0
DEFAULT_MARGIN = 0.02


def _conf(r: dict) -> float | None:
    v = r.get("mean_logprob")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def bins(results: list[dict], k: int = 5) -> list[dict]:
    """Quantile bins of confidence with n, correct and accuracy each."""
    known = sorted((_conf(r), bool(r["correct"])) for r in results if _conf(r) is not None)
    if not known:
        return []
    confs = [c for c, _ in known]
    edges = sorted({confs[min(len(confs) - 1, (i * len(confs)) // k)] for i in range(1, k)} - {confs[0]})
    bounds = [None] + edges + [None]
    out = []
    for low, high in zip(bounds, bounds[1:]):
        inside = [ok for c, ok in known if (low is None or c >= low) and (high is None or c < high)]
        if inside:
            out.append({"low": low, "high": high, "n": len(inside), "correct": sum(inside),
                        "accuracy": sum(inside) / len(inside)})
    return out


def keep_threshold(results: list[dict], target_accuracy: float | None) -> float | None:
    """Lowest t whose kept answers (known conf >= t) have accuracy >= target_accuracy."""
    if target_accuracy is None:
        return None
    known = [(_conf(r), bool(r["correct"])) for r in results if _conf(r) is not None]
    for t in sorted({c for c, _ in known}):
        kept = [ok for c, ok in known if c >= t]
        if kept and sum(kept) / len(kept) >= target_accuracy - 1e-12:
            return t
    return None


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _evaluate(pairs: list[tuple[dict, dict]], t: float, cost_a: float, cost_b: float) -> tuple[float, float, float]:
    """(accuracy, cost per request, escalated share) of the cascade at threshold t."""
    esc = [(_conf(a) is None or _conf(a) < t) for a, _ in pairs]
    acc = _mean(bool(b["correct"]) if e else bool(a["correct"]) for (a, b), e in zip(pairs, esc))
    share = _mean(esc)
    return acc, cost_a + share * cost_b, share


def finite(t: float, confs: list[float]) -> float:
    """A threshold as written to the profile (see module docstring)."""
    if t == math.inf:
        return ALWAYS
    if t == -math.inf:
        return min(confs) if confs else -1e9
    return t


def cascade(results_a: list[dict], results_b: list[dict], target_accuracy: float | None = None) -> dict | None:
    """The cheapest threshold reaching target_accuracy; None when A and B share no item."""
    b_by_id = {r["id"]: r for r in results_b}
    pairs = [(a, b_by_id[a["id"]]) for a in results_a if a["id"] in b_by_id]
    if not pairs:
        return None
    cost_a = _mean(float(a.get("cost_usd") or 0.0) for a, _ in pairs)
    cost_b = _mean(float(b.get("cost_usd") or 0.0) for _, b in pairs)
    deep_acc = _mean(bool(b["correct"]) for _, b in pairs)
    goal = deep_acc - DEFAULT_MARGIN if target_accuracy is None else target_accuracy
    confs = sorted({c for a, _ in pairs if (c := _conf(a)) is not None})
    scored = [(t, *_evaluate(pairs, t, cost_a, cost_b)) for t in [-math.inf, *confs, math.inf]]
    ok = [s for s in scored if s[1] >= goal - 1e-12]
    # cheapest reaching the goal (then most accurate); else most accurate (then cheapest)
    best = min(ok, key=lambda s: (s[2], -s[1])) if ok else min(scored, key=lambda s: (-s[1], s[2]))
    t, acc, cost, share = best
    return {"threshold": t, "written_threshold": finite(t, confs), "target_accuracy": goal,
            "reached": bool(ok), "predicted_accuracy": acc, "predicted_usd_per_request": cost,
            "deep_accuracy": deep_acc, "deep_usd_per_request": cost_b, "cheap_usd_per_request": cost_a,
            "escalate_share": share, "n": len(pairs)}
