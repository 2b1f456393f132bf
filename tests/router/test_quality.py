"""Quality-aware routing on hand-made snapshots: the quality table, the floor, the value objective,
profile loading and cascade rung thresholds. One test per rule, each able to fail."""
import json

import pytest

from hybridserve.router.policies import BackendView, Economics, RouteRequest, Rung, RungCascade, Snapshot, make_policy
from hybridserve.router.quality import (QualityTable, check_profile, load_quality_profile, rung_thresholds)
from hybridserve.router.table import EconomicsTable, Entry


def _tag(acc, n=100):
    return {"n": n, "correct": round(acc * n), "accuracy": acc, "wilson_low": acc, "wilson_high": acc,
            "usd_per_request": 1e-6, "usd_per_correct": None}


def _target(model, all_, params=None, threshold=None, **tags):
    return {"model": model, "params": params or {},
            "tags": {"all": _tag(all_), **{k: _tag(v) for k, v in tags.items()}},
            "calibration": {"bins": [], "threshold": threshold, "target_accuracy": None}}


def profile(**extra):
    # CHEAP: cheapest, weak; MID: a little dearer, good at arithmetic; TOP: dearest, best overall
    return {"object": "quality_profile", "version": 1, "created": 0, "eval": "mini", "targets": {
        "CHEAP": _target("CHEAP", 0.10, arith=0.05, facts=0.40),
        "MID": _target("MID", 0.50, arith=0.62),
        "TOP": _target("TOP", 0.80, arith=0.70),
        "MID-vote": _target("MID", 0.70, params={"n": 5, "hybridserve_vote": True}, threshold=-0.4),
    }, **extra}


def _snap(quality=None, **overrides):
    prices = {"CHEAP": 1.0, "MID": 2.0, "TOP": 8.0, "NEW": 0.5}
    table = EconomicsTable(prices, {n: [Entry(4096, 1, 2000, 50)] for n in prices})
    views = {n: BackendView(n, "transformer", "standard", p, 4096) for n, p in prices.items()}
    for name, kw in overrides.items():
        views[name] = BackendView(**{**views[name].__dict__, **kw})
    return Snapshot(tuple(views.values()), table, (), QualityTable(quality if quality is not None else profile()))


def _req(floor=None, task=None, step_kind=None):
    return RouteRequest(100, 50, quality_floor=floor, task=task, step_kind=step_kind)


def _no_new(**kw):
    return _snap(NEW={"healthy": False}, **kw)


# ------------------------------------------------------------------ the table

def test_accuracy_reads_the_tag_then_overall_then_unmeasured():
    q = QualityTable(profile())
    assert q.accuracy("MID", "arith") == (0.62, "tag arith")
    assert q.accuracy("MID", "facts") == (0.50, "overall")      # MID has no facts tag
    assert q.accuracy("MID") == (0.50, "overall")
    assert q.accuracy("NEW", "arith") == (None, "unmeasured")


def test_a_target_with_params_never_measures_the_bare_backend():
    p = profile()
    del p["targets"]["MID"]
    assert QualityTable(p).accuracy("MID") == (None, "unmeasured")  # only MID-vote (n=5) is left
    p["targets"]["mid-plain"] = _target("MID", 0.33)
    assert QualityTable(p).accuracy("MID") == (0.33, "overall")      # found by its model instead


# ------------------------------------------------------------------ the floor

def test_floor_met_by_the_cheapest_keeps_the_cheapest():
    d = Economics().choose(_req(floor=0.05), _no_new())
    assert d.backend == "CHEAP" and d.quality.met and d.quality.accuracy == 0.10


def test_cheapest_below_the_floor_is_skipped():
    d = Economics().choose(_req(floor=0.45), _no_new())
    assert d.backend == "MID" and "CHEAP" not in d.fallbacks
    assert "cheapest with all accuracy >= 0.45: MID 0.50 (overall); CHEAP 0.10 below" in d.reason


def test_the_task_tag_is_what_the_floor_reads():
    # overall TOP is best, but on arithmetic MID (0.62) already clears 0.6 and is cheaper
    d = Economics().choose(_req(floor=0.6, task="arith"), _no_new())
    assert d.backend == "MID" and d.quality.source == "tag arith"
    assert "arith accuracy >= 0.60: MID 0.62 (tag arith)" in d.reason
    assert Economics().choose(_req(floor=0.6), _no_new()).backend == "TOP"   # overall: MID 0.50 is below


def test_step_kind_is_the_task_when_no_tag_is_given():
    assert _req(step_kind="arith").task_kind == "arith"
    assert _req(task="facts", step_kind="arith").task_kind == "facts"
    assert Economics().choose(_req(floor=0.6, step_kind="arith"), _no_new()).backend == "MID"


def test_a_tag_the_profile_lacks_falls_back_to_overall():
    d = Economics().choose(_req(floor=0.45, task="passkey"), _no_new())
    assert d.backend == "MID" and d.quality.source == "overall"


def test_unmeasured_backends_are_denied_by_default_and_allowed_on_request():
    snap = _snap()   # NEW: the cheapest of all, and unmeasured
    denied = Economics().choose(_req(floor=0.45), snap)
    assert denied.backend == "MID" and "NEW unmeasured denied" in denied.reason
    allowed = Economics(unmeasured="allow").choose(_req(floor=0.45), snap)
    assert allowed.backend == "NEW" and allowed.quality.source == "unmeasured" and allowed.quality.met


def test_no_candidate_meets_the_floor_takes_the_most_accurate_and_says_so():
    d = Economics().choose(_req(floor=0.95), _snap())
    assert d.backend == "TOP" and d.quality.met is False and d.quality.accuracy == 0.80
    assert d.reason.startswith("no backend meets all accuracy >= 0.95; most accurate instead: TOP 0.80")


def test_without_a_floor_quality_does_not_change_the_choice():
    d = Economics().choose(_req(), _snap())
    assert d.backend == "NEW" and d.quality is None and d.reason.startswith("cheapest meeting the SLO")


def test_failover_stays_within_the_floor():
    d = Economics().choose(_req(floor=0.45), _no_new())
    assert set(d.fallbacks) == {"TOP"}


# ------------------------------------------------------------------ value: $ per correct answer

def test_value_ranks_by_predicted_dollars_per_correct_answer():
    # $/correct: CHEAP 1/0.10 = 10, MID 2/0.50 = 4, TOP 8/0.80 = 10 (per unit of time): MID wins
    d = make_policy("value").choose(_req(), _no_new())
    assert d.backend == "MID" and d.policy == "value" and "/correct" in d.reason
    by_task = make_policy("value").choose(_req(task="facts"), _no_new())  # CHEAP facts 0.40: 1/0.4 = 2.5
    assert by_task.backend == "CHEAP"


def test_value_puts_unmeasured_and_never_correct_backends_last():
    p = profile()
    p["targets"]["CHEAP"] = _target("CHEAP", 0.0)
    d = make_policy("value").choose(_req(), _snap(p))   # NEW: cheapest but unmeasured; CHEAP: 0 correct
    assert d.backend == "MID"
    only_bad = make_policy("value").choose(_req(), _snap(p, MID={"healthy": False}, TOP={"healthy": False}))
    assert only_bad.backend == "NEW"   # among the last, the cheapest


def test_equal_costs_take_turns():
    snap = Snapshot((BackendView("A", "transformer", "standard", 1.0, 4096),
                     BackendView("B", "transformer", "standard", 1.0, 4096)),
                    EconomicsTable({"A": 1.0, "B": 1.0}, {"A": [Entry(4096, 1, 100, 10)], "B": [Entry(4096, 1, 100, 10)]}))
    pol = Economics()
    assert {pol.choose(_req(), snap).backend for _ in range(4)} == {"A", "B"}


# ------------------------------------------------------------------ profile loading

def test_load_accepts_a_good_profile(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps(profile()))
    assert QualityTable(load_quality_profile(path)).accuracy("TOP").accuracy == 0.80


@pytest.mark.parametrize("mutate, words", [
    (lambda p: p.update(object="economics"), "not a quality profile"),
    (lambda p: p.update(version=2), "version must be 1"),
    (lambda p: p["targets"]["MID"]["tags"].pop("all"), "targets.MID.tags must be an object with at least the 'all'"),
    (lambda p: p["targets"]["MID"]["tags"]["arith"].update(accuracy=1.5), r"targets.MID.tags.arith.accuracy must be a number in 0..1"),
    (lambda p: p["targets"]["MID"].update(model=None), "targets.MID.model"),
    (lambda p: p.update(cascades=[{"rungs": ["CHEAP", "GONE"], "thresholds": [-1.0]}]), "lacks: \\['GONE'\\]"),
    (lambda p: p.update(cascades=[{"rungs": ["CHEAP", "MID"], "thresholds": []}]), r"thresholds must hold 1 number"),
])
def test_bad_profiles_name_the_field_and_the_fix(mutate, words):
    p = profile()
    mutate(p)
    with pytest.raises(ValueError, match=words) as err:
        check_profile(p)
    assert "hybridserve eval" in str(err.value)


def test_unreadable_profiles_are_value_errors_naming_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_quality_profile(bad)
    with pytest.raises(OSError):
        load_quality_profile(tmp_path / "missing.json")


# ------------------------------------------------------------------ cascade rungs

RUNGS = [("cheap", "CHEAP", {}), ("mid-vote", "MID", {"n": 5, "hybridserve_vote": True}), ("top", "TOP", {})]


def test_rung_thresholds_come_from_the_profiles_cascade_first():
    q = QualityTable(profile(cascades=[{"rungs": ["cheap", "mid-vote", "top"], "thresholds": [-0.3, -0.6],
                                        "target_accuracy": 0.7}]))
    # the labels must exist as targets for the profile to be valid; the table itself only matches names
    assert rung_thresholds(q, RUNGS, -1.0) == [(-0.3, "profile cascade"), (-0.6, "profile cascade"),
                                                (None, "last rung")]


def test_rung_thresholds_fall_back_to_the_rungs_calibration_then_the_default():
    got = rung_thresholds(QualityTable(profile()), RUNGS, -1.0)
    # cheap: no target of that label, CHEAP's own target has no threshold -> default;
    # mid-vote: found by model + params (MID-vote), calibrated at -0.4
    assert got == [(-1.0, "gateway.cascade_threshold"), (-0.4, "calibration of mid-vote"), (None, "last rung")]


def test_rung_cascade_runs_configured_rungs_skipping_unhealthy_ones():
    pol = RungCascade((Rung("cheap", "CHEAP", -1.0), Rung("mid-vote", "MID", -0.4), Rung("top", "TOP", None)))
    d = pol.choose(_req(), _snap())
    assert d.rungs == ("cheap", "mid-vote", "top") and d.backend == "CHEAP" and d.fallbacks == ("MID", "TOP")
    d = pol.choose(_req(), _snap(CHEAP={"healthy": False}))
    assert d.rungs == ("mid-vote", "top") and d.backend == "MID" and "skipped cheap" in d.reason
    with pytest.raises(ValueError, match="two or more rungs"):
        RungCascade((Rung("a", "CHEAP", None),))
