"""models.yaml's quality, tier and cascade fields, and the Router that reads them (no processes)."""
import json
import subprocess
import sys

import pytest

from hybridserve.config import ConfigError, parse_config
from hybridserve.errors import InvalidRequestError
from hybridserve.gateway.registry import Registry
from hybridserve.gateway.routing import Router, request_quality
from tests.router.test_quality import profile

BACKENDS = [{"name": "CHEAP", "arch": "hybrid", "engine": "remote", "url": "http://127.0.0.1:1",
             "price_per_hour": 0.5, "tier": "economy"},
            {"name": "MID", "arch": "transformer", "engine": "remote", "url": "http://127.0.0.1:2",
             "price_per_hour": 1.0, "tier": "standard"},
            {"name": "TOP", "arch": "transformer", "engine": "remote", "url": "http://127.0.0.1:3",
             "price_per_hour": 4.0, "tier": "standard"}]


def _cfg(backends=BACKENDS, aliases=None, **gateway):
    return parse_config({"gateway": {"auth": "disabled", **gateway}, "backends": backends,
                         "aliases": aliases or {}})


def _router(cfg):
    reg = Registry.from_config(cfg)
    for b in reg.backends.values():
        b.healthy = True
    return Router(cfg, reg), reg


@pytest.fixture()
def qfile(tmp_path):
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(profile()))
    return str(path)


@pytest.mark.parametrize("gateway, words", [
    ({"quality_floor": 1.5}, "quality_floor"),
    ({"quality_floor": 0.3}, "needs measurements: set gateway.quality_profile"),
    ({"quality_profile": "q.json", "quality_floors": {"gold": 0.5}}, "quality_floors.gold: 'gold' is neither an alias nor a tier"),
    ({"quality_profile": "q.json", "quality_floors": {"standard": 2}}, "quality_floors.standard must be a number in 0..1"),
    ({"quality_unmeasured": "maybe"}, "quality_unmeasured"),
    ({"default_tier": "gold"}, "default_tier 'gold' is not a tier"),
    ({"cascade": [{"name": "a", "backend": "MID"}]}, "two or more rungs"),
    ({"cascade": [{"name": "a", "backend": "MID"}, {"name": "a", "backend": "TOP"}]}, "unique; repeated: a"),
    ({"cascade": [{"name": "a", "backend": "MID"}, {"name": "b", "backend": "nope"}]}, r"cascade\[1\].backend 'nope'"),
    ({"cascade": [{"name": "a", "backend": "MID", "params": {"model": "x"}}, {"name": "b", "backend": "TOP"}]},
     "params may not set model"),
    ({"cascade": [{"name": "a", "backend": "MID", "params": {"hybridserve_vote": True}},
                  {"name": "b", "backend": "TOP"}]}, "needs `n` >= 2"),
])
def test_bad_quality_fields_name_the_field_and_the_fix(gateway, words):
    with pytest.raises(ConfigError, match=words):
        _cfg(**gateway)


def test_a_missing_or_bad_quality_profile_fails_at_startup(tmp_path):
    cfg = _cfg(quality_profile=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="gateway.quality_profile: .*missing.json.*hybridserve eval"):
        _router(cfg)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**profile(), "version": 9}))
    with pytest.raises(ConfigError, match="version must be 1"):
        _router(_cfg(quality_profile=str(bad)))


def test_floor_comes_from_the_request_then_the_group_then_the_global(qfile):
    router, _ = _router(_cfg(quality_profile=qfile, quality_floor=0.1, quality_floors={"standard": 0.4},
                             aliases={"pair": ["MID", "TOP"]}))
    assert router.floor_for("auto", None, 0.9) == 0.9
    assert router.floor_for("standard", "standard", None) == 0.4
    assert router.floor_for("auto", None, None) == 0.1
    assert router.floor_for("auto", None, 0.0) == 0.0        # an explicit 0 is a floor, not "unset"


def test_aliases_and_tiers_pass_their_tier():
    router, _ = _router(_cfg(aliases={"pair": ["MID", "TOP"], "mixed": ["CHEAP", "TOP"]}))
    assert router.group_tier("standard", "economics") == ("standard", False)
    assert router.group_tier("pair", "economics") == ("standard", False)   # both backends are standard
    assert router.group_tier("mixed", "economics") == (None, False)
    assert router.group_tier("auto", "economics") == (None, False)        # no default_tier set


def test_plain_auto_routes_within_the_default_tier_and_falls_back_when_it_is_down():
    router, reg = _router(_cfg(default_tier="standard"))
    cands = list(reg.backends.values())
    route = router.decide("auto", False, cands, frozenset(), 10, 10)
    assert route.decision.backend == "MID"           # CHEAP (economy) would be cheaper
    assert router.decide("auto:cheapest", False, cands, frozenset(), 10, 10, "cheapest").decision.backend == "CHEAP"
    reg.backends["MID"].healthy = reg.backends["TOP"].healthy = False
    down = router.decide("auto", False, cands, frozenset(), 10, 10)
    assert down.decision.backend == "CHEAP" and "no healthy backend in default tier 'standard'" in down.decision.reason


def test_a_floor_routes_by_the_profile_and_failover_stays_within_it(qfile):
    router, reg = _router(_cfg(quality_profile=qfile, quality_floor=0.45))
    route = router.decide("auto", False, list(reg.backends.values()), frozenset(), 10, 10, task="arith")
    assert route.decision.backend == "MID" and [b.name for b in route.order] == ["MID", "TOP"]
    assert route.decision.quality.source == "tag arith"


def test_request_quality_fields_and_headers_are_validated():
    assert request_quality({"hybridserve_quality_floor": 0.5, "hybridserve_task": "arith"}, {}) == (0.5, "arith")
    assert request_quality({}, {"x-hybridserve-quality-floor": "0.25", "x-hybridserve-task": "facts"}) == (0.25, "facts")
    assert request_quality({"hybridserve_quality_floor": 0.7}, {"x-hybridserve-quality-floor": "0.1"})[0] == 0.7
    for data, headers, param in [({"hybridserve_quality_floor": 1.2}, {}, "hybridserve_quality_floor"),
                                 ({"hybridserve_quality_floor": True}, {}, "hybridserve_quality_floor"),
                                 ({}, {"x-hybridserve-quality-floor": "high"}, "x-hybridserve-quality-floor"),
                                 ({"hybridserve_task": "a b"}, {}, "hybridserve_task"),
                                 ({}, {"x-hybridserve-task": ""}, "x-hybridserve-task")]:
        with pytest.raises(InvalidRequestError) as err:
            request_quality(data, headers)
        assert err.value.param == param


def test_cascade_rungs_resolve_their_thresholds_from_the_profile(qfile):
    router, _ = _router(_cfg(quality_profile=qfile, cascade_threshold=-2.0, cascade=[
        {"name": "cheap", "backend": "CHEAP"},
        {"name": "mid-vote", "backend": "MID", "params": {"n": 5, "hybridserve_vote": True}},
        {"name": "top", "backend": "TOP"}]))
    assert [(r.name, r.threshold, r.source) for r in router.rungs] == [
        ("cheap", -2.0, "gateway.cascade_threshold"), ("mid-vote", -0.4, "calibration of mid-vote"),
        ("top", None, "last rung")]
    route = router.decide("auto:cascade", False, list(router.registry.backends.values()), frozenset(), 10, 10,
                          "cascade")
    assert [r.name for r in route.rungs] == ["cheap", "mid-vote", "top"] and route.cascade
    assert router.economics()["cascade"][1]["params"] == {"n": 5, "hybridserve_vote": True}


def test_without_a_profile_the_table_is_seeded_from_the_checkpoints_shape():
    cfg = _cfg(backends=[
        {"name": "st", "arch": "transformer", "checkpoint": "builtin:small-transformer", "price_per_hour": 0.5},
        {"name": "tt", "arch": "transformer", "checkpoint": "builtin:tiny-transformer", "price_per_hour": 0.5},
        BACKENDS[0]])
    router, _ = _router(cfg)
    econ = router.economics()
    assert econ["policy"] == "economics" and econ["seeded"] == "config"
    assert {n: b["seeded"] for n, b in econ["backends"].items()} == {"st": "config", "tt": "config",
                                                                      "CHEAP": "default"}
    # the tiny model (~0.2M params) decodes far faster than the small one (~24M) by the arithmetic
    assert router.table.entry("tt", 100, 1).decode_tok_s > 50 * router.table.entry("st", 100, 1).decode_tok_s


def test_safetensors_headers_give_the_exact_parameter_count(tmp_path):
    from hybridserve.router.estimate import safetensors_params

    header = json.dumps({"a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
                         "b": {"dtype": "F32", "shape": [5], "data_offsets": [48, 68]},
                         "__metadata__": {"format": "pt"}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(68))
    assert safetensors_params(tmp_path) == 17
    assert safetensors_params(tmp_path / "nothing-here") is None


def test_a_single_file_checkpoint_is_sized_by_its_quantisation(tmp_path):
    from hybridserve.router.estimate import file_params

    (tmp_path / "m-Q8_0.gguf").write_bytes(bytes(1060))
    (tmp_path / "m-f16.gguf").write_bytes(bytes(1000))
    assert file_params(tmp_path / "m-Q8_0.gguf") == 1000 and file_params(tmp_path / "m-f16.gguf") == 500
    assert file_params(tmp_path / "none.gguf") is None


def test_the_gateway_never_imports_torch():
    code = ("import sys; from hybridserve.config import parse_config; from hybridserve.gateway.app import create_app; "
            "create_app(parse_config({'gateway': {'auth': 'disabled'}, 'backends': [{'name': 's', 'arch': 'hybrid', "
            "'checkpoint': 'builtin:small-hybrid', 'price_per_hour': 0.5}]})); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_tiers_at_one_price_are_ordered_by_measured_accuracy(qfile):
    """Same price per hour: the tier that answers better is the top one (mode: deep goes there),
    whatever order models.yaml lists them in."""
    strong_first = [{**b, "price_per_hour": 1.0} for b in reversed(BACKENDS)]  # TOP, MID (standard), CHEAP
    assert _router(_cfg(strong_first, quality_profile=qfile))[0].tier_order == ("economy", "standard")
    swapped = [{**b, "tier": {"economy": "standard", "standard": "economy"}[b["tier"]]}
               for b in [{**b, "price_per_hour": 1.0} for b in BACKENDS]]  # CHEAP (standard) listed first
    assert _router(_cfg(swapped, quality_profile=qfile))[0].tier_order == ("standard", "economy")
    # price still comes first: a cheaper tier is lower whatever it scores
    assert _router(_cfg(list(reversed(BACKENDS)), quality_profile=qfile))[0].tier_order == ("economy", "standard")
