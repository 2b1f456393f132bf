"""Calibration bins, a target's keep threshold, and the cascade threshold on hand-made tables."""
from __future__ import annotations

import math

import pytest

from hybridserve.eval import calibration as cal


def rows(target, table, cost):
    """table: [(id, mean_logprob, correct)]."""
    return [{"target": target, "id": i, "mean_logprob": c, "correct": ok, "cost_usd": cost} for i, c, ok in table]


CHEAP = [("1", -0.1, True), ("2", -0.2, True), ("3", -0.5, True), ("4", -0.9, False),
         ("5", -1.5, False), ("6", -2.0, True), ("7", None, False), ("8", -3.0, False)]
DEEP = [(i, -0.1, ok) for i, ok in zip("12345678", [True, True, True, True, True, False, True, True])]


def test_keep_threshold_lowest_that_reaches_accuracy():
    r = rows("a", CHEAP, 0.001)
    # kept at t=-0.5: 3/3 right; t=-0.9: 3/4 = 0.75; t=-2.0: 4/6
    assert cal.keep_threshold(r, 1.0) == -0.5
    assert cal.keep_threshold(r, 0.75) == -0.9
    assert cal.keep_threshold(r, 0.6) == -2.0
    assert cal.keep_threshold(r, None) is None
    assert cal.keep_threshold(rows("a", [("1", -1.0, False)], 0), 0.5) is None


def test_bins_cover_known_answers_in_order():
    r = rows("a", CHEAP, 0.001)
    b = cal.bins(r, k=5)
    assert b[0]["low"] is None and b[-1]["high"] is None
    assert sum(x["n"] for x in b) == 7                       # the unknown confidence is left out
    assert sum(x["correct"] for x in b) == 4
    for left, right in zip(b, b[1:]):
        assert left["high"] == right["low"]
    top = b[-1]
    assert top["accuracy"] == 1.0                            # the most confident answers are right


def brute_force(a, b, goal):
    """Every candidate threshold scored directly from the definition, cheapest reaching goal."""
    by = {x["id"]: x for x in b}
    best = None
    for t in [-math.inf, math.inf] + [x["mean_logprob"] for x in a if x["mean_logprob"] is not None]:
        esc = [x["mean_logprob"] is None or x["mean_logprob"] < t for x in a]
        acc = sum((by[x["id"]] if e else x)["correct"] for x, e in zip(a, esc)) / len(a)
        cost = a[0]["cost_usd"] + sum(esc) / len(a) * b[0]["cost_usd"]
        if acc >= goal and (best is None or cost < best[1]):
            best = (t, cost, acc)
    return best


def test_cascade_threshold_cheapest_reaching_target():
    a, b = rows("a", CHEAP, 0.001), rows("b", DEEP, 0.01)
    c = cal.cascade(a, b, target_accuracy=7 / 8)
    # escalating below -0.5 sends 4,5,6,7,8 to B: items 1-3 A right, 4,5,7,8 B right, 6 B wrong -> 7/8
    assert c["threshold"] == -0.5
    assert c["predicted_accuracy"] == pytest.approx(7 / 8)
    assert c["escalate_share"] == pytest.approx(5 / 8)
    assert c["predicted_usd_per_request"] == pytest.approx(0.001 + 5 / 8 * 0.01)
    t, cost, acc = brute_force(a, b, 7 / 8)
    assert (c["threshold"], c["predicted_usd_per_request"]) == (t, pytest.approx(cost))
    assert c["deep_accuracy"] == pytest.approx(7 / 8)


def test_cascade_default_goal_is_deep_minus_margin():
    a, b = rows("a", CHEAP, 0.001), rows("b", DEEP, 0.01)
    c = cal.cascade(a, b)
    assert c["target_accuracy"] == pytest.approx(7 / 8 - 0.02)
    t, cost, _ = brute_force(a, b, 7 / 8 - 0.02)
    assert c["threshold"] == t and c["predicted_usd_per_request"] == pytest.approx(cost)


def test_cascade_keep_all_and_escalate_all_written_finite():
    good = rows("a", [("1", -0.3, True), ("2", -0.4, True)], 0.001)
    deep = rows("b", [("1", -0.1, True), ("2", -0.1, False)], 0.01)
    c = cal.cascade(good, deep, target_accuracy=1.0)
    assert c["threshold"] == -math.inf and c["written_threshold"] == -0.4 and c["escalate_share"] == 0
    bad = rows("a", [("1", -0.3, False), ("2", -0.4, False)], 0.001)
    c = cal.cascade(bad, rows("b", [("1", -0.1, True), ("2", -0.1, True)], 0.01), target_accuracy=1.0)
    assert c["threshold"] == math.inf and c["written_threshold"] == cal.ALWAYS and c["escalate_share"] == 1


def test_cascade_unreachable_goal_takes_most_accurate():
    a = rows("a", [("1", -0.4, False), ("2", -0.3, True)], 0.001)
    b = rows("b", [("1", -0.1, True), ("2", -0.1, False)], 0.01)
    c = cal.cascade(a, b, target_accuracy=1.5)
    assert not c["reached"] and c["predicted_accuracy"] == 1.0 and c["threshold"] == -0.3


def test_cascade_needs_shared_items():
    assert cal.cascade(rows("a", [("1", -1.0, True)], 0), rows("b", [("2", -1.0, True)], 0)) is None
