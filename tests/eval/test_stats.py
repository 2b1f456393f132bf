"""Wilson intervals, percentiles, win rates and the target × tag table."""
from __future__ import annotations

import math

import pytest

from hybridserve.eval.stats import percentile, table, wilson, win_counts


def wilson_by_formula(k: int, n: int, z: float = 1.959963984540054):
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n)


@pytest.mark.parametrize("k,n", [(0, 10), (5, 10), (10, 10), (83, 100), (1, 3)])
def test_wilson_matches_formula(k, n):
    low, high = wilson(k, n)
    exp_low, exp_high = wilson_by_formula(k, n)
    assert low == pytest.approx(max(0.0, exp_low), abs=1e-12)
    assert high == pytest.approx(min(1.0, exp_high), abs=1e-12)


def test_wilson_published_values():
    # 0/10 -> [0, 0.2775], 5/10 -> [0.2366, 0.7634], 10/10 -> [0.7225, 1] (Wilson 1927 / standard tables)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-5)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=5e-5)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=5e-5)
    assert wilson(0, 0) == (0.0, 1.0)


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 95) == 5
    assert percentile([], 50) is None
    assert percentile([0, 10], 95) == pytest.approx(9.5)


def rec(target, i, ok, tags=("t",), cost=0.0):
    return {"target": target, "id": str(i), "correct": ok, "tags": list(tags), "cost_usd": cost, "latency_s": 0.1}


def test_win_counts_hand_table():
    ref = [rec("ref", i, ok) for i, ok in enumerate([True, True, False, False, True])]
    mine = [rec("me", i, ok) for i, ok in enumerate([True, False, True, False, True])]
    mine.append(rec("me", 99, True))   # not answered by the reference: ignored
    w = win_counts(mine, ref)
    assert (w["wins"], w["losses"], w["ties"]) == (1, 1, 3)
    assert w["win_rate"] == 0.5
    assert win_counts(ref, ref)["win_rate"] is None


def test_table_rows_per_tag_and_costs():
    rs = [rec("a", 1, True, ("x",), 0.01), rec("a", 2, False, ("y",), 0.03),
          rec("b", 1, False, ("x",), 0.0), rec("b", 2, False, ("y",), 0.0)]
    rows = {(r["target"], r["tag"]): r for r in table(rs, ["a", "b"], "a")}
    assert set(rows) == {("a", "all"), ("a", "x"), ("a", "y"), ("b", "all"), ("b", "x"), ("b", "y")}
    a = rows[("a", "all")]
    assert (a["n"], a["correct"], a["accuracy"]) == (2, 1, 0.5)
    assert a["usd_per_request"] == pytest.approx(0.02) and a["usd_per_correct"] == pytest.approx(0.04)
    b = rows[("b", "all")]
    assert b["usd_per_correct"] is None and (b["wins"], b["losses"], b["ties"]) == (0, 1, 1)
    assert rows[("b", "x")]["losses"] == 1 and rows[("b", "y")]["ties"] == 1
