"""The gateway refuses at once when every candidate's queue is full by its own count (no processes)."""
import pytest

from hybridserve.config import parse_config
from hybridserve.errors import OverloadedError
from hybridserve.gateway.registry import Registry
from hybridserve.gateway.routing import Router, capacity

NATIVE = {"engine": "native", "checkpoint": "builtin:tiny-transformer", "arch": "transformer",
          "price_per_hour": 1.0, "tier": "standard", "native": {"max_num_seqs": 2, "max_num_waiting": 3}}


def _router():
    cfg = parse_config({"gateway": {"auth": "disabled"},
                        "backends": [{"name": "a", "port": 9101, **NATIVE}, {"name": "b", "port": 9102, **NATIVE},
                                     {"name": "r", "engine": "remote", "url": "http://127.0.0.1:1",
                                      "arch": "transformer", "price_per_hour": 1.0, "tier": "other"}]})
    reg = Registry.from_config(cfg)
    for b in reg.backends.values():
        b.healthy = True
    return Router(cfg, reg), reg


def test_a_full_backend_is_skipped_and_all_full_is_a_429_with_retry_after():
    router, reg = _router()
    a, b = reg.backends["a"], reg.backends["b"]
    assert capacity(a.config) == 5 and capacity(reg.backends["r"].config) is None
    a.inflight = 5
    d = router.decide("standard", False, [a, b], frozenset(), 100, 16).decision
    assert d.backend == "b"
    b.inflight = 5
    with pytest.raises(OverloadedError) as err:
        router.decide("standard", False, [a, b], frozenset(), 100, 16)
    assert err.value.code == "all_backends_saturated" and int(err.value.headers()["Retry-After"]) >= 1
    b.inflight = 4
    assert router.decide("standard", False, [a, b], frozenset(), 100, 16).decision.backend == "b"


def test_a_backend_without_a_known_bound_is_never_called_full():
    router, reg = _router()
    r = reg.backends["r"]
    r.inflight = 10_000
    assert router.decide("other", False, [r], frozenset(), 100, 16).decision.backend == "r"
