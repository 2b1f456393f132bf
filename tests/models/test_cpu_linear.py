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


@needs_onednn
def test_plain_copies_are_kept_for_small_models_or_as_told(monkeypatch):
    from hybridserve.models import cpu_linear

    def kept(model):
        prepack_linears(model)
        return [m.plain_weight is not None for m in model.modules() if isinstance(m, PackedLinear)]
    assert kept(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))) == [True, True]
    monkeypatch.setattr(cpu_linear, "DUAL_MAX_BYTES", 8 * 8 * 4)   # below the two weights together
    assert kept(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))) == [False, False]
    monkeypatch.setenv("HYBRIDSERVE_CPU_PREPACK", "dual")
    assert kept(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))) == [True, True]
    monkeypatch.setenv("HYBRIDSERVE_CPU_PREPACK", "packed")
    monkeypatch.setattr(cpu_linear, "DUAL_MAX_BYTES", 1 << 40)
    assert kept(nn.Sequential(nn.Linear(8, 8))) == [False]


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
