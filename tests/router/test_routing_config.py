"""models.yaml routing fields: validated with messages that name the field and the fix."""
import pytest

from hybridserve.config import ConfigError, parse_config
from hybridserve.gateway.registry import Registry
from hybridserve.gateway.routing import Router

BACKENDS = [{"name": "t", "arch": "transformer", "engine": "remote", "url": "http://127.0.0.1:1",
             "price_per_hour": 1.0, "tier": "standard"},
            {"name": "h", "arch": "hybrid", "engine": "remote", "url": "http://127.0.0.1:2",
             "price_per_hour": 0.5, "tier": "economy"}]


def _cfg(**gateway):
    return parse_config({"gateway": {"auth": "disabled", **gateway}, "backends": BACKENDS})


def test_default_policy_is_economics_with_or_without_a_profile():
    assert _cfg().gateway.routing_policy() == "economics"   # never a silent least-loaded fallback
    assert _cfg(economics_profile="p.json").gateway.routing_policy() == "economics"
    assert _cfg(policy="cascade", economics_profile="p.json").gateway.routing_policy() == "cascade"


@pytest.mark.parametrize("gateway, words", [
    ({"policy": "random"}, "unknown routing policy"),
    ({"policy": "parallel_verify"}, "needs gateway.verifier"),
    ({"verifier": "nope"}, "is not a backend"),
    ({"step_tiers": {"plan": "gold"}}, "step_tiers.plan"),
    ({"budgets": [{"name": "b"}]}, "caps nothing"),
    ({"budgets": [{"key": "plain-key", "tokens": 5}]}, "sha256"),
])
def test_bad_routing_fields_name_the_fix(gateway, words):
    with pytest.raises(ConfigError, match=words):
        _cfg(**gateway)


def test_missing_profile_is_a_config_error_and_unmeasured_backends_get_defaults(tmp_path):
    cfg = _cfg(economics_profile=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="economics_profile"):
        Router(cfg, Registry.from_config(cfg))
    router = Router(_cfg(), Registry.from_config(_cfg()))
    assert {r["backend"] for r in router.economics()["rows"]} == {"t", "h"}
    assert router.tier_order == ("economy", "standard")  # cheapest tier first
