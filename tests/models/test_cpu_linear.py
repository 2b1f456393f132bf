"""oneDNN-packed linears: same products as `F.linear`, applied by `load_model` only where they fit."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridserve.models.builtin import materialize
from hybridserve.kernels import cpu_gemm
from hybridserve.models.cpu_linear import PackedLinear, prepack_available, prepack_linears, routes_upto
from hybridserve.models.loader import load_model
from tests.models.helpers import make_cache, rel_err, run_chunk

needs_onednn = pytest.mark.skipif(not prepack_available("cpu", torch.float32),
                                  reason="this torch has no oneDNN linear ops")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(1,), (7,), (3, 5), (130,)])
def test_packed_linear_equals_f_linear(bias, lead):
    g = torch.Generator().manual_seed(len(lead) * 10 + bias)
    lin = nn.Linear(48, 40, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 48, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(40, generator=g))
    x = torch.randn(*lead, 48, generator=g)
    with torch.no_grad():
        want = F.linear(x, lin.weight, lin.bias)
        got = PackedLinear(lin)(x)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-5


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 64])
@pytest.mark.parametrize("copies", ["plain", "panel"])
def test_a_packed_linear_with_its_extra_copy_equals_f_linear_at_every_row_count(rows, copies):
    if copies == "panel" and not cpu_gemm.available():
        pytest.skip("the C++ panel kernel cannot be built here")
    g = torch.Generator().manual_seed(rows)
    lin = nn.Linear(48, 40)
    x = torch.randn(rows, 48, generator=g)
    dual = PackedLinear(lin, keep_plain=copies == "plain", panels=copies == "panel")
    assert getattr(dual, f"{copies}_weight") is not None and f"{copies} copy" in repr(dual)
    with torch.no_grad():
        assert rel_err(dual(x), F.linear(x, lin.weight, lin.bias)) < 1e-5
        assert rel_err(dual(x.t().contiguous().t()), F.linear(x, lin.weight, lin.bias)) < 1e-5  # strided rows


def _timer(fastest: dict[int, str], calls: list):
    """A stand-in for `time_products`: at each row count the named product takes 1 s, the rest 2 s."""
    def timer(linears, rows, kinds):
        calls.append((len(linears), rows, tuple(kinds)))
        return {k: 1.0 if k == fastest.get(rows, "packed") else 2.0 for k in kinds}
    return timer


def _routes(model):
    prepack_linears(model)
    return [(m.route, m.plain_weight is not None, m.panel_weight is not None)
            for m in model.modules() if isinstance(m, PackedLinear)]


@needs_onednn
def test_each_row_count_gets_the_product_that_measured_fastest_and_unused_copies_go(monkeypatch):
    from hybridserve.models import cpu_linear

    monkeypatch.delenv("HYBRIDSERVE_CPU_PREPACK", raising=False)
    monkeypatch.setattr(cpu_gemm, "available", lambda: True)
    small = lambda: nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))   # noqa: E731
    calls = []
    monkeypatch.setattr(cpu_linear, "time_products", _timer({1: "plain", 2: "panel", 4: "panel"}, calls))
    got = _routes(small())
    want = ("packed", "plain", "panel", "panel", "panel", "packed", "packed", "packed", "packed")
    assert got == [(want, True, True)] * 2          # 3 takes 4's winner, 5-7 take 8's
    assert calls == [(2, 1, ("packed", "plain", "panel")), (2, 2, ("packed", "plain", "panel")),
                     (2, 4, ("packed", "panel")), (2, 8, ("packed", "panel"))]    # plain: 1-2 rows only
    assert cpu_linear.LAST_CALIBRATION["route"][3] == "panel"
    assert cpu_linear.LAST_CALIBRATION["rows"][1] == {"packed_us": 2e6, "plain_us": 1e6, "panel_us": 2e6}
    monkeypatch.setattr(cpu_linear, "time_products", _timer({r: "panel" for r in (1, 2, 4, 8)}, calls))
    assert _routes(small()) == [(("packed",) + ("panel",) * 8, False, True)] * 2
    monkeypatch.setattr(cpu_linear, "time_products", _timer({1: "plain"}, calls))
    assert _routes(small()) == [(("packed", "plain") + ("packed",) * 7, True, False)] * 2
    monkeypatch.setattr(cpu_linear, "time_products", _timer({}, calls))
    assert _routes(small()) == [(("packed",) * 9, False, False)] * 2
    monkeypatch.setattr(cpu_gemm, "available", lambda: False)       # no kernel: not a candidate
    calls.clear()
    monkeypatch.setattr(cpu_linear, "time_products", _timer({1: "plain", 2: "plain"}, calls))
    assert _routes(small()) == [(("packed", "plain", "plain") + ("packed",) * 6, True, False)] * 2
    assert [c[2] for c in calls] == [("packed", "plain")] * 2         # 4 and 8 rows: packed alone, not timed


@needs_onednn
def test_big_models_and_the_environment_skip_the_measurement(monkeypatch):
    from hybridserve.models import cpu_linear

    small = lambda: nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))   # noqa: E731
    calls = []
    monkeypatch.setattr(cpu_linear, "time_products", _timer({1: "plain"}, calls))
    monkeypatch.delenv("HYBRIDSERVE_CPU_PREPACK", raising=False)
    monkeypatch.setattr(cpu_linear, "DUAL_MAX_BYTES", 8 * 8 * 4)   # below the two weights together
    assert _routes(small()) == [(("packed",), False, False)] * 2
    monkeypatch.setattr(cpu_linear, "DUAL_MAX_BYTES", 1 << 40)
    monkeypatch.setenv("HYBRIDSERVE_CPU_PREPACK", "dual")             # as told: kept, nothing timed
    assert _routes(small()) == [(routes_upto("plain", cpu_linear.PLAIN_MAX_ROWS), True, False)] * 2
    monkeypatch.setenv("HYBRIDSERVE_CPU_PREPACK", "packed")
    assert _routes(small()) == [(("packed",), False, False)] * 2
    if cpu_gemm.available():
        monkeypatch.setenv("HYBRIDSERVE_CPU_PREPACK", "panel")
        assert _routes(small()) == [(routes_upto("panel", cpu_linear.PANEL_MAX_ROWS), False, True)] * 2
    assert calls == []


@needs_onednn
def test_a_near_tie_keeps_packed():
    from hybridserve.models import cpu_linear

    lins = [PackedLinear(nn.Linear(8, 8), keep_plain=True)]
    near = lambda ls, r, kinds: {k: 1.0 if k == "packed" else 0.97 for k in kinds}   # noqa: E731
    assert cpu_linear.calibrate_routes(lins, ["plain"], timer=near) == ("packed",) * 9   # within the margin
    clear = lambda ls, r, kinds: {k: 1.0 if k == "packed" else 0.90 for k in kinds}  # noqa: E731
    assert cpu_linear.calibrate_routes(lins, ["plain"], timer=clear) == ("packed", "plain", "plain") + ("packed",) * 6


@needs_onednn
def test_the_real_measurement_times_every_product_and_the_model_stays_exact(monkeypatch):
    from hybridserve.models import cpu_linear

    monkeypatch.delenv("HYBRIDSERVE_CPU_PREPACK", raising=False)
    lins = [PackedLinear(nn.Linear(64, 96), keep_plain=True, panels=cpu_gemm.available()) for _ in range(3)]
    kinds = ["packed", "plain"] + (["panel"] if cpu_gemm.available() else [])
    took = cpu_linear.time_products(lins, rows=1, kinds=kinds, repeats=2)
    assert set(took) == set(kinds) and all(0 < s < 1 for s in took.values())
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64))
    with torch.no_grad():
        want = {r: model(torch.ones(r, 64) * r) for r in (1, 3, 8, 20)}
        prepack_linears(model)
        got = {r: model(torch.ones(r, 64) * r) for r in want}
    route = cpu_linear.LAST_CALIBRATION["route"]
    assert set(route) == set(range(1, 9)) and set(cpu_linear.LAST_CALIBRATION["rows"]) == {1, 2, 4, 8}
    for m in model.modules():
        if isinstance(m, PackedLinear):
            assert (m.plain_weight is not None) == ("plain" in route.values())
            assert (m.panel_weight is not None) == ("panel" in route.values())
    assert all(rel_err(got[r], want[r]) < 1e-5 for r in want)


@needs_onednn
def test_the_timed_sample_stays_within_its_byte_budget():
    from hybridserve.models import cpu_linear

    lins = [PackedLinear(nn.Linear(16, 16), keep_plain=True) for _ in range(10)]   # 1 KiB each
    assert cpu_linear._sample(lins, 1 << 20) == lins
    picked = cpu_linear._sample(lins, 3 * 1024)
    assert 1 <= len(picked) <= 3 and picked[0] is lins[0]
    assert len({id(m) for m in picked}) == len(picked)
    assert [lins.index(m) for m in picked] == sorted(lins.index(m) for m in picked)


@needs_onednn
def test_load_model_packs_on_cpu_fp32_and_logits_stay_equal(monkeypatch):
    path = materialize("tiny-hybrid")
    packed, plain = load_model(path), load_model(path, prepack=False)
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == \
        sum(type(m) is nn.Linear for m in plain.modules()) > 0
    tokens = list(range(1, 40))
    a = run_chunk(packed, make_cache(packed), tokens, 0, len(tokens), [], 0)
    b = run_chunk(plain, make_cache(plain), tokens, 0, len(tokens), [], 0)
    assert rel_err(a, b) < 1e-5 and torch.equal(a.argmax(-1), b.argmax(-1))
    monkeypatch.setenv("HYBRIDSERVE_CPU_PREPACK", "0")
    assert not any(isinstance(m, PackedLinear) for m in load_model(path).modules())


def test_prepack_is_refused_where_it_does_not_apply():
    assert not prepack_available("cpu", torch.bfloat16)
    assert not prepack_available("meta", torch.float32)
    with pytest.raises(ValueError, match="fp32 on CPU"):
        load_model(materialize("tiny-transformer"), dtype="bfloat16", prepack=True)
    model = nn.Sequential(nn.Linear(4, 4))
    if prepack_available("cpu", torch.float32):
        assert prepack_linears(model) == 1 and isinstance(model[0], PackedLinear)
