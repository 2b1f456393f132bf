"""oneDNN-packed linears: same products as `F.linear`, applied by `load_model` only where they fit."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridserve.models.builtin import materialize
from hybridserve.models.cpu_linear import PackedLinear, prepack_available, prepack_linears
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
@pytest.mark.parametrize("rows", [1, 2, 3, 64])
def test_a_packed_linear_with_its_plain_copy_equals_f_linear_at_every_row_count(rows):
    g = torch.Generator().manual_seed(rows)
    lin = nn.Linear(48, 40)
    x = torch.randn(rows, 48, generator=g)
    dual = PackedLinear(lin, keep_plain=True)
    assert dual.plain_weight is not None and "plain copy" in repr(dual)
    with torch.no_grad():
        assert rel_err(dual(x), F.linear(x, lin.weight, lin.bias)) < 1e-5


def _timer_where(plain_wins_up_to: int, calls: list):
    """A stand-in for `time_products`: the plain product is faster up to that many rows."""
    def timer(linears, rows):
        calls.append((len(linears), rows))
        return (1.0, 2.0) if rows <= plain_wins_up_to else (2.0, 1.0)
    return timer


@needs_onednn
def test_plain_copies_are_kept_for_small_models_where_they_measure_faster_or_as_told(monkeypatch):
    from hybridserve.models import cpu_linear

    def kept(model):
        prepack_linears(model)
        return [m.plain_max_rows if m.plain_weight is not None else None
                for m in model.modules() if isinstance(m, PackedLinear)]
    small = lambda: nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))   # noqa: E731
    calls = []
    monkeypatch.setattr(cpu_linear, "time_products", _timer_where(2, calls))
    assert kept(small()) == [2, 2] and calls == [(2, 1), (2, 2)]
    monkeypatch.setattr(cpu_linear, "time_products", _timer_where(1, calls))
    assert kept(small()) == [1, 1] and cpu_linear.LAST_CALIBRATION["plain_max_rows"] == 1
    calls.clear()
    monkeypatch.setattr(cpu_linear, "time_products", _timer_where(0, calls))
    assert kept(small()) == [None, None] and calls == [(2, 1)]      # lost at one row: not timed at two
    monkeypatch.setattr(cpu_linear, "time_products", _timer_where(2, calls))
    monkeypatch.setattr(cpu_linear, "DUAL_MAX_BYTES", 8 * 8 * 4)   # below the two weights together
    assert kept(small()) == [None, None]
    calls.clear()
    monkeypatch.setenv("HYBRIDSERVE_CPU_PREPACK", "dual")             # as told: kept, nothing timed
    monkeypatch.setattr(cpu_linear, "time_products", _timer_where(0, calls))
    assert kept(small()) == [cpu_linear.PLAIN_MAX_ROWS] * 2 and calls == []
    monkeypatch.setenv("HYBRIDSERVE_CPU_PREPACK", "packed")
    monkeypatch.setattr(cpu_linear, "DUAL_MAX_BYTES", 1 << 40)
    assert kept(nn.Sequential(nn.Linear(8, 8))) == [None]


@needs_onednn
def test_a_near_tie_keeps_no_plain_copy():
    from hybridserve.models import cpu_linear

    lins = [PackedLinear(nn.Linear(8, 8), keep_plain=True)]
    assert cpu_linear.calibrate_plain_rows(lins, timer=lambda ls, r: (0.97, 1.0)) == 0   # within the margin
    assert cpu_linear.calibrate_plain_rows(lins, timer=lambda ls, r: (0.90, 1.0)) == 2


@needs_onednn
def test_the_real_measurement_times_both_products_and_the_model_stays_exact():
    from hybridserve.models import cpu_linear

    lins = [PackedLinear(nn.Linear(64, 96), keep_plain=True) for _ in range(3)]
    plain_s, packed_s = cpu_linear.time_products(lins, rows=1, repeats=2)
    assert 0 < plain_s < 1 and 0 < packed_s < 1
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64))
    x = torch.randn(1, 64)
    with torch.no_grad():
        want = model(x)
        prepack_linears(model)
        got = model(x)
    rows = cpu_linear.LAST_CALIBRATION["plain_max_rows"]
    assert rows in (0, 1, 2) and set(cpu_linear.LAST_CALIBRATION["rows"]) <= {1, 2}
    assert all((m.plain_weight is not None) == (rows > 0) for m in model.modules() if isinstance(m, PackedLinear))
    assert rel_err(got, want) < 1e-5


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
