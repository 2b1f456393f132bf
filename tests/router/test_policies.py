"""Routing policies on hand-made snapshots: each rule of each policy has a test that can fail."""
import pytest

from hybridserve.router.policies import (BackendView, Cascade, Economics, LeastLoaded, RoundRobin, RouteRequest,
                                         Rule, Rules, Snapshot, make_policy, should_escalate)
from hybridserve.router.table import EconomicsTable, Entry


def _table():
    # transformer: fast at short context, slow at long; hybrid: the other way round
    return EconomicsTable({"T": 1.0, "H": 1.0, "BIG": 4.0}, {
        "T": [Entry(512, 1, 4000, 100), Entry(8192, 1, 1000, 20)],
        "H": [Entry(512, 1, 3000, 70), Entry(8192, 1, 2500, 60)],
        "BIG": [Entry(512, 1, 8000, 300), Entry(8192, 1, 6000, 250)],
    })


def _snap(**overrides):
    views = {"T": BackendView("T", "transformer", "standard", 1.0, 16384),
             "H": BackendView("H", "hybrid", "standard", 1.0, 16384),
             "BIG": BackendView("BIG", "transformer", "premium", 4.0, 4096)}
    for name, kw in overrides.items():
        views[name] = BackendView(**{**views[name].__dict__, **kw})
    return Snapshot(tuple(views.values()), _table(), tier_order=("standard", "premium"))


def test_economics_takes_cheapest_per_context():
    pol = Economics()
    short = pol.choose(RouteRequest(200, 100, tier="standard"), _snap())
    long_ = pol.choose(RouteRequest(6000, 100, tier="standard"), _snap())
    assert short.backend == "T" and long_.backend == "H"
    assert {e.backend for e in long_.estimates} == {"T", "H"}
    assert long_.estimate.usd < next(e.usd for e in long_.estimates if e.backend == "T")
    assert "cheapest" in long_.reason


def test_economics_respects_slo():
    # at short context the cheap T takes 1s per 100 tokens; a 0.5 s SLO forces the faster, pricier BIG
    req = RouteRequest(200, 50, slo_e2e_s=0.3)
    d = Economics().choose(req, _snap())
    assert d.backend == "BIG"
    assert d.estimate.e2e_s <= 0.3


def test_economics_when_nobody_meets_slo_takes_fastest_and_says_so():
    d = Economics().choose(RouteRequest(200, 50, slo_e2e_s=0.001), _snap())
    assert d.backend == "BIG" and "no backend predicted to meet the SLO" in d.reason


def test_economics_respects_tier_health_and_context():
    pol = Economics()
    assert pol.choose(RouteRequest(200, 10, tier="premium"), _snap()).backend == "BIG"
    assert pol.choose(RouteRequest(200, 10, tier="standard"), _snap(T={"healthy": False})).backend == "H"
    assert pol.choose(RouteRequest(8000, 10), _snap()).backend != "BIG"  # BIG's context is 4096
    none = pol.choose(RouteRequest(200, 10, tier="standard"), _snap(T={"healthy": False}, H={"healthy": False}))
    assert none.backend is None and "no healthy backend" in none.reason


def _loaded_snap(h_load):
    # H measured at 1, 4 and 8 concurrent sequences: aggregate decode grows, per-sequence decode shrinks
    table = EconomicsTable({"T": 1.0, "H": 1.0}, {
        "T": [Entry(8192, 1, 1000, 20)],
        "H": [Entry(8192, 1, 2500, 60), Entry(8192, 4, 2500, 120), Entry(8192, 8, 2500, 80)],
    })
    views = (BackendView("T", "transformer", "standard", 1.0, 16384),
             BackendView("H", "hybrid", "standard", 1.0, 16384, load=h_load))
    return Snapshot(views, table, tier_order=("standard",))


def test_economics_prices_load():
    # a loaded backend is predicted at its concurrency (load + 1 sequences): slower per request, and
    # with a 12 s SLO the busy H (8 sequences: 10 tok/s each) misses it and the idle T is taken instead
    req = RouteRequest(6000, 100, tier="standard", slo_e2e_s=12.0)
    h = {}
    for load in (0, 3, 7):
        d = Economics().choose(req, _loaded_snap(load))
        h[load] = next(e for e in d.estimates if e.backend == "H")
        h[load, "pick"] = d.backend
    assert h[0].e2e_s == pytest.approx(6000 / 2500 + 100 / 60)        # concurrency 1: 60 tok/s per seq
    assert h[3].e2e_s == pytest.approx(6000 / 2500 + 100 / 30)        # concurrency 4: 120 / 4
    assert h[7].e2e_s == pytest.approx(6000 / 2500 + 100 / 10)        # concurrency 8: 80 / 8
    assert h[7].device_s == pytest.approx(6000 / 2500 + 100 / 80)     # device time shared over the batch
    assert h[0, "pick"] == "H" and h[3, "pick"] == "H"
    assert h[7, "pick"] == "T"
    t = next(e for e in Economics().choose(req, _loaded_snap(7)).estimates if e.backend == "T")
    assert t.e2e_s == pytest.approx(6000 / 1000 + 100 / 20) and t.e2e_s <= 12.0 < h[7].e2e_s


def test_fastest_objective():
    d = Economics("fastest").choose(RouteRequest(200, 100), _snap())
    assert d.backend == min(d.estimates, key=lambda e: e.e2e_s).backend


def test_round_robin_cycles_and_least_loaded_picks_idle():
    rr = RoundRobin()
    picks = [rr.choose(RouteRequest(100, 10, tier="standard"), _snap()).backend for _ in range(4)]
    assert picks == ["T", "H", "T", "H"]
    assert LeastLoaded().choose(RouteRequest(100, 10), _snap(T={"load": 3}, BIG={"load": 1})).backend == "H"


def test_rules_first_match_then_fallback():
    pol = Rules([Rule("H", min_prompt_tokens=4000), Rule("premium", step_kind="polish")], Economics())
    assert pol.choose(RouteRequest(5000, 10), _snap()).backend == "H"
    d = pol.choose(RouteRequest(100, 10, step_kind="polish"), _snap())
    assert d.backend == "BIG" and "rule 2" in d.reason
    d = pol.choose(RouteRequest(100, 10, step_kind="plan"), _snap())
    assert "no rule matched" in d.reason


def test_cascade_orders_by_tier_then_cost_and_escalates_on_low_confidence():
    d = Cascade(threshold=-1.5).choose(RouteRequest(200, 50), _snap())
    assert d.backend == "T" and d.fallbacks == ("H", "BIG")
    assert should_escalate(-2.0, -1.5) and should_escalate(None, -1.5) and not should_escalate(-0.5, -1.5)


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("random")


def test_parallel_verify_drafts_cheap_and_scores_yes():
    from hybridserve.router.policies.verify import judge_prompt, verdict_score

    with pytest.raises(ValueError, match="verifier"):
        make_policy("parallel_verify")
    d = make_policy("parallel_verify", threshold=-0.5, verifier="T").choose(RouteRequest(200, 50), _snap())
    assert d.policy == "parallel_verify" and d.backend == "T" and d.fallbacks[-1] == "BIG"  # standard tier first
    assert "judged by T" in d.reason
    assert verdict_score({" Yes": -0.2, "no": -1.0, "yes": -0.7}) == -0.2
    assert verdict_score({"no": -0.1}) is None and verdict_score(None) is None
    assert "2+2" in judge_prompt(" 2+2? ", "4") and judge_prompt("q", "a").endswith("Reply:")


def test_sim_charges_the_verifier():
    from hybridserve.router.sim import SimRequest, simulate

    views = [BackendView("T", "transformer", "standard", 1.0, 16384), BackendView("H", "hybrid", "standard", 1.0, 16384)]
    reqs = [SimRequest(300, 50)] * 50
    casc = simulate("cascade", reqs, views, _table(), None, None, escalation_p=0.0)
    pv = simulate("parallel_verify", reqs, views, _table(), None, None, escalation_p=0.0, verifier="H")
    assert pv["usd"] > casc["usd"] and pv["share"] == casc["share"]


def test_economics_avoids_a_full_cache_unless_all_are_full():
    req = RouteRequest(200, 100, tier="standard")
    assert Economics().choose(req, _snap(T={"cache_usage": 0.99})).backend == "H"
    assert Economics().choose(req, _snap(T={"cache_usage": 0.99}, H={"cache_usage": 0.99})).backend == "T"
