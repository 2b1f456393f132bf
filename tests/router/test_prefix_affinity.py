"""Prefix affinity: the backend that holds a session's, a prompt_cache_key's or a prefix's cache is priced
with the expected hit, bounded by load, per tenant (no processes)."""
import pytest

from hybridserve.config import parse_config
from hybridserve.gateway.affinity import PrefixAffinity, head_of
from hybridserve.gateway.registry import Registry
from hybridserve.gateway.routing import Router
from hybridserve.router.table import EconomicsTable, Entry

TWINS = [{"name": name, "arch": "transformer", "engine": "remote", "url": f"http://127.0.0.1:{port}",
          "price_per_hour": price, "tier": "standard"}
         for name, port, price in (("A", 1, 1.0), ("B", 2, 1.1))]
SYSTEM = [{"role": "system", "content": "You are an agent with tools. " * 40}]


def _router(**gateway):
    cfg = parse_config({"gateway": {"auth": "disabled", **gateway}, "backends": TWINS})
    reg = Registry.from_config(cfg)
    for b in reg.backends.values():
        b.healthy = True
    router = Router(cfg, reg)
    # prefill-bound figures: a long prompt's cost is mostly prefill, so a cache hit matters
    router.table = EconomicsTable({"A": 1.0, "B": 1.1}, {n: [Entry(4096, 1, 500.0, 50.0)] for n in ("A", "B")})
    return router, reg


def _decide(router, reg, prompt_tokens=3000, hints=None):
    return router.decide("standard", False, list(reg.backends.values()), frozenset(), prompt_tokens, 16,
                         hints=hints)


def test_a_cached_prefix_makes_the_dearer_backend_the_cheaper_choice():
    router, reg = _router()
    assert _decide(router, reg).decision.backend == "A"  # A is 10% cheaper per hour
    keys = router.affinity.keys("tenant", {"messages": SYSTEM + [{"role": "user", "content": "hi"}]},
                                {"x-session-id": "s1"}, chat=True)
    router.affinity.record(keys, "B", prompt_tokens=2900, completion_tokens=60)
    d = _decide(router, reg, hints=router.affinity.hints(keys, 3000)).decision
    assert d.backend == "B"
    assert "B holds ~2960 tokens of this session's prefix" in d.reason
    assert d.estimate.usd < router.table.predict("B", 3000, 16).usd


def test_the_hint_is_dropped_when_its_backend_is_busy():
    router, reg = _router(prefix_affinity_max_extra_load=2)
    keys = router.affinity.keys("t", {"prompt_cache_key": "agent-7", "prompt": "x"}, {}, chat=False)
    router.affinity.record(keys, "B", 2900, 60)
    reg.backends["B"].inflight = 3  # load 3 > A's 0 + 2
    d = _decide(router, reg, hints=router.affinity.hints(keys, 3000)).decision
    assert d.backend == "A" and "B holds this prompt_cache_key's prefix but is busy (load 3)" in d.reason
    reg.backends["B"].inflight = 2
    assert _decide(router, reg, hints=router.affinity.hints(keys, 3000)).decision.backend == "B"


def test_keys_are_per_tenant_and_most_specific_first():
    aff = PrefixAffinity()
    body = {"messages": SYSTEM + [{"role": "user", "content": "q"}], "prompt_cache_key": "k"}
    mine = aff.keys("a", body, {"x-session-id": "s"}, chat=True)
    assert [k[0] for k in mine] == ["session", "prompt_cache_key", "prefix"]
    aff.record(mine, "B", 1000, 10)
    assert aff.hints(aff.keys("b", body, {"x-session-id": "s"}, chat=True), 2000) == {}
    other_session = aff.keys("a", body, {"x-session-id": "s2"}, chat=True)
    hint = aff.hints(other_session, 2000)["B"]
    assert hint.via == "prompt_cache_key" and hint.tokens == 1010
    only_prefix = aff.keys("a", {"messages": body["messages"]}, {}, chat=True)
    hint = aff.hints(only_prefix, 2000)["B"]
    assert hint.via == "prefix" and hint.tokens == head_of(body, True)[1] // 4  # the head, not the session
    assert aff.hints(other_session, 500)["B"].tokens == 499, "never more than the prompt but one token"


def test_heads_and_memory_bound():
    assert head_of({"messages": [{"role": "user", "content": "no system"}]}, True) is None
    assert head_of({"prompt": "short"}, False) is None
    a = head_of({"prompt": "p" * 3000 + "one"}, False)
    assert a == head_of({"prompt": "p" * 3000 + "two"}, False) and a[1] == 2048
    assert head_of({"prompt": list(range(100))}, False) is not None
    aff = PrefixAffinity(capacity=3)
    for i in range(5):
        aff.record(aff.keys("t", {}, {"x-session-id": f"s{i}"}, chat=True), "A", 10, 1)
    assert len(aff) == 3
    assert aff.hints(aff.keys("t", {}, {"x-session-id": "s0"}, chat=True), 100) == {}
    assert aff.hints(aff.keys("t", {}, {"x-session-id": "s4"}, chat=True), 100)["A"].tokens == 11


def test_cached_tokens_cost_no_prefill_in_the_table():
    t = EconomicsTable({"A": 1.0}, {"A": [Entry(4096, 1, 500.0, 50.0)]})
    full, hit = t.predict("A", 3000, 16), t.predict("A", 3000, 16, cached_tokens=2900)
    assert hit.usd < full.usd / 5 and hit.ttft_s == pytest.approx(100 / 500)
    # a hit observed as it was measured (100 prefilled tokens) leaves the correction at 1
    t.observe("A", 3000, 16, device_seconds=100 / 500 + 16 / 50, cached_tokens=2900)
    assert t.correction("A", 3016) == pytest.approx(1.0, abs=1e-6)


def test_affinity_off_keeps_no_memory():
    router, _ = _router(prefix_affinity=False)
    assert router.affinity is None


def test_a_gguf_checkpoint_is_priced_from_its_header_not_its_file_size():
    """A quantized GGUF's size says little about its parameters (Q4_1 SmolLM2-135M reads as 176M);
    the header's config gives the count the economics seed needs (134.5M)."""
    from hybridserve.config import BackendConfig
    from hybridserve.gateway.routing import checkpoint_shape
    from hybridserve.models.builtin import packaged_gguf
    from hybridserve.router.estimate import file_params

    path = packaged_gguf("smollm2-135m-instruct")
    b = BackendConfig(name="s", arch="transformer", engine="native", checkpoint=str(path), price_per_hour=1.0)
    params, cfg = checkpoint_shape(b)
    assert cfg["hidden_size"] == 576 and cfg["num_hidden_layers"] == 30
    assert 130e6 < params < 140e6
    assert abs(file_params(path) - params) > 0.2 * params  # what the file size alone would have said
