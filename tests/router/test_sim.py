"""route-sim: economics beats round robin on a mixed workload when the pair crosses over."""
from hybridserve.router.policies import BackendView
from hybridserve.router.sim import load_trace, mixed_workload, simulate
from hybridserve.router.table import EconomicsTable, Entry


def _pair():
    table = EconomicsTable({"T": 0.5, "H": 0.5}, {
        "T": [Entry(c, 1, 2000, tps) for c, tps in [(512, 60), (1024, 50), (2048, 35), (4096, 20), (8192, 10)]],
        "H": [Entry(c, 1, 1500, tps) for c, tps in [(512, 45), (1024, 44), (2048, 42), (4096, 40), (8192, 36)]],
    })
    views = [BackendView("T", "transformer", "standard", 0.5, 16384), BackendView("H", "hybrid", "standard", 0.5, 16384)]
    return table, views


def test_economics_cheaper_than_round_robin_at_equal_slo():
    table, views = _pair()
    reqs = mixed_workload(600, 0.3, seed=1, max_context=8192)
    rr = simulate("round_robin", reqs, views, table, None, 60.0)
    ec = simulate("economics", reqs, views, table, None, 60.0)
    assert ec["usd_per_1m_tokens"] < rr["usd_per_1m_tokens"]
    assert ec["slo_attainment"] >= rr["slo_attainment"]
    assert 0 < ec["share"].get("T", 0) < len(reqs)  # both used: chats to T, documents to H


def test_workload_shape_and_trace(tmp_path):
    reqs = mixed_workload(1000, 0.25, seed=0, max_context=8192)
    docs = [r for r in reqs if r.kind == "document"]
    assert 150 < len(docs) < 350
    assert all(2048 <= r.prompt_tokens <= 8192 - r.output_tokens for r in docs)
    p = tmp_path / "t.jsonl"
    p.write_text('{"prompt_tokens": 10, "output_tokens": 5}\n{"prompt_tokens": 7}\n')
    try:
        load_trace(p)
    except ValueError as err:
        assert ":2:" in str(err)
    else:
        raise AssertionError("bad trace line accepted")


def test_cascade_reports_escalations():
    table, views = _pair()
    out = simulate("cascade", mixed_workload(400, seed=2), views, table, None, None, escalation_p=0.3, seed=2)
    assert 0.2 < out["escalation_rate"] < 0.4
