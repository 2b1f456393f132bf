"""Statistics over eval results: Wilson intervals, percentiles, win rates, per target × tag rows.

A result is a dict as written to results.jsonl (target, id, tags, correct, cost_usd,
prompt_tokens, completion_tokens, latency_s, status, error). Every target gets a row
per tag its items carry plus a row of tag `all`.

- accuracy = correct / n, with the 95 % Wilson score interval (z = 1.96).
- usd_per_request = total measured cost / n; usd_per_correct = total cost / correct,
  None (null in JSON, "—" in the report) when nothing is correct.
- Win rate against the reference target, over the items both answered: a win is right
  where the reference is wrong, a loss the reverse, a tie both right or both wrong;
  win_rate = wins / (wins + losses), None when there is no decisive item (always for
  the reference itself).
"""
from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)

Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if correct == 0 else max(0.0, centre - half)     # exact bounds at 0/n and n/n
    high = 1.0 if correct == n else min(1.0, centre + half)
    return low, high


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated q-th percentile (0-100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def win_counts(results: list[dict], reference: list[dict]) -> dict:
    """Wins, losses, ties of `results` against `reference`, joined by item id."""
    ref = {r["id"]: bool(r["correct"]) for r in reference}
    wins = losses = ties = 0
    for r in results:
        if r["id"] not in ref:
            continue
        mine, theirs = bool(r["correct"]), ref[r["id"]]
        if mine and not theirs:
            wins += 1
        elif theirs and not mine:
            losses += 1
        else:
            ties += 1
    decisive = wins + losses
    return {"wins": wins, "losses": losses, "ties": ties,
            "win_rate": wins / decisive if decisive else None}


def _mean(values: list) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float))]
    return sum(vals) / len(vals) if vals else None


def summarize(results: list[dict]) -> dict:
    """n, correct, accuracy, Wilson bounds, $ figures, tokens, latency and errors of one group."""
    n = len(results)
    correct = sum(1 for r in results if r["correct"])
    low, high = wilson(correct, n)
    cost = sum(float(r.get("cost_usd") or 0.0) for r in results)
    lat = [r["latency_s"] for r in results if isinstance(r.get("latency_s"), (int, float))]
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
            "wilson_low": low, "wilson_high": high, "usd_total": cost,
            "usd_per_request": cost / n if n else 0.0, "usd_per_correct": cost / correct if correct else None,
            "prompt_tokens_mean": _mean([r.get("prompt_tokens") for r in results]),
            "completion_tokens_mean": _mean([r.get("completion_tokens") for r in results]),
            "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
            "errors": sum(1 for r in results if r.get("error"))}


def tags_of(results: list[dict]) -> list[str]:
    return sorted({t for r in results for t in r.get("tags") or []})


def table(results: list[dict], targets: list[str], reference: str | None) -> list[dict]:
    """One row per target × tag (tag `all` first), with win counts against `reference`."""
    by_target = {t: [r for r in results if r["target"] == t] for t in targets}
    ref_rows = by_target.get(reference, [])
    rows = []
    for t in targets:
        mine = by_target[t]
        for tag in ["all"] + tags_of(mine):
            group = mine if tag == "all" else [r for r in mine if tag in (r.get("tags") or [])]
            rows.append({"target": t, "tag": tag, **summarize(group), **win_counts(group, ref_rows)})
    return rows
