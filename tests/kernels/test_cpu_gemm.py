"""The C++ small-row linear (panel) kernel against float64 products."""
import pytest
import torch
import torch.nn.functional as F

from hybridserve.kernels import cpu_gemm
from tests.kernels.kernels_testing import torch_threads

pytestmark = pytest.mark.skipif(not cpu_gemm.available(), reason="the C++ panel kernel cannot be built here")


def exact(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 8, 9, 17])
@pytest.mark.parametrize("out_features", [16, 40, 64, 100, 197])   # whole tiles, tails of 1-3 panels, ragged columns
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_panel_linear_matches_float64(rows, out_features, bias, threads):
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = torch.randn(out_features, 72, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    x = torch.randn(rows, 72, generator=g)
    with torch_threads(threads):
        y = cpu_gemm.panel_linear(x, cpu_gemm.pack_panels(w), b, out_features)
    want = exact(x, w, b)
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < 1e-6


def test_rows_with_a_stride_and_the_panel_layout():
    w = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)
    p = cpu_gemm.pack_panels(w)
    assert p.shape == (2, 3, 16)
    assert torch.equal(p[0, :, 5], w[5]) and torch.equal(p[1, :, 3], w[19])
    assert torch.count_nonzero(p[1, :, 4:]) == 0                        # padding columns are zeros
    big = torch.randn(6, 10)
    x = big[::2, 2:5]                                                    # rows 20 floats apart
    torch.testing.assert_close(cpu_gemm.panel_linear(x, p, None, 20), x @ w.t(), rtol=1e-6, atol=1e-5)


def test_bad_arguments_are_refused_with_a_reason():
    w = torch.randn(20, 8)
    p = cpu_gemm.pack_panels(w)
    with pytest.raises(RuntimeError, match="inputs"):
        cpu_gemm.panel_linear(torch.randn(2, 9), p, None, 20)
    with pytest.raises(RuntimeError, match="panels for"):
        cpu_gemm.panel_linear(torch.randn(2, 8), p, None, 40)
    with pytest.raises(RuntimeError, match="fp32"):
        cpu_gemm.panel_linear(torch.randn(2, 8, dtype=torch.float64), p, None, 20)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        cpu_gemm.panel_linear(torch.randn(8, 2).t(), p, None, 20)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_gemm.panel_linear(torch.randn(2, 8), p, torch.randn(19), 20)
