"""Economics table: bucket lookup, live correction from measured device-seconds, decay."""
import time

import pytest

from hybridserve.router.table import EconomicsTable, Entry


def _table(**kw):
    return EconomicsTable({"A": 3.6}, {"A": [Entry(1024, 1, 1000, 10), Entry(1024, 4, 2000, 30),
                                             Entry(4096, 1, 500, 5)]}, **kw)


def test_lookup_picks_bucket_at_or_above_and_concurrency_at_or_below():
    t = _table()
    assert t.entry("A", 800, 1).decode_tok_s == 10
    assert t.entry("A", 1024, 6).concurrency == 4
    assert t.entry("A", 2000, 1).context == 4096
    far = t.entry("A", 8192, 1)
    assert far.decode_tok_s == pytest.approx(2.5)  # beyond measured: scaled down, never optimistic


def test_predict_is_price_times_device_seconds():
    t = _table()
    e = t.predict("A", 500, 100, concurrency=1)
    assert e.device_s == pytest.approx(500 / 1000 + 100 / 10)
    assert e.usd == pytest.approx(3.6 / 3600 * e.device_s)
    assert e.ttft_s == pytest.approx(0.5)


def test_observations_move_predictions_and_decay_back():
    t = _table(half_life_s=0.2, alpha=0.5)
    before = t.predict("A", 500, 100).device_s
    for _ in range(10):
        t.observe("A", 500, 100, device_seconds=2 * before)  # measured: twice as slow
    assert t.predict("A", 500, 100).device_s == pytest.approx(2 * before, rel=0.05)
    assert t.usd_per_1m_output("A", 600) > 1e6 * 3.6 / 3600 / 10 * 1.9
    time.sleep(0.6)  # three half-lives
    assert t.predict("A", 500, 100).device_s < 1.2 * before
    row = next(r for r in t.rows() if r["context"] == 1024 and r["concurrency"] == 1)
    assert row["usd_per_1m_output"] is not None and row["correction"] >= 1.0


def test_unknown_backend_gets_conservative_default():
    e = EconomicsTable({"X": 1.0}).predict("X", 100, 10)
    assert e.device_s > 0 and e.usd > 0
