"""The C++ RMSNorm and rotary embedding against their torch references (and float64)."""
import pytest
import torch

from hybridserve.kernels import cpu_ops
from tests.kernels.kernels_testing import torch_threads

needs_ext = pytest.mark.skipif(not cpu_ops.available(), reason="the C++ CPU ops cannot be built here")


@needs_ext
@pytest.mark.parametrize("shape", [(1, 576), (7, 64), (33, 100), (5, 8)])
@pytest.mark.parametrize("threads", [1, 2])
def test_rms_norm_matches_the_reference_and_float64(shape, threads):
    g = torch.Generator().manual_seed(shape[0] * shape[1])
    x = torch.randn(*shape, generator=g) * 3
    w = torch.randn(shape[1], generator=g)
    with torch_threads(threads):
        got = cpu_ops.rms_norm(x, w, 1e-5)
    xd = x.double()
    want = w.double() * (xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-6
    torch.testing.assert_close(got, cpu_ops.rms_norm_ref(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    rows = torch.randn(shape[0], shape[1] + 3, generator=g)[:, 1:1 + shape[1]]     # strided rows
    torch.testing.assert_close(cpu_ops.rms_norm(rows, w, 1e-5), cpu_ops.rms_norm_ref(rows, w, 1e-5),
                               rtol=1e-5, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("T,hq,hkv,dh", [(1, 9, 3, 64), (13, 4, 2, 32), (40, 2, 1, 8)])
def test_rotary_in_place_matches_the_reference(T, hq, hkv, dh):
    g = torch.Generator().manual_seed(T * dh)
    qkv = torch.randn(T, (hq + 2 * hkv) * dh, generator=g)        # q and k as views of one projection
    q = qkv[:, :hq * dh].view(T, hq, dh)
    k = qkv[:, hq * dh:(hq + hkv) * dh].view(T, hkv, dh)
    pos = torch.arange(T, dtype=torch.float32)[:, None] * torch.rand(dh // 2, generator=g)
    emb = torch.cat([pos, pos], -1)
    cos, sin = emb.cos()[:, None, :].contiguous(), emb.sin()[:, None, :].contiguous()
    want_q, want_k = cpu_ops.rotate_ref(q, cos, sin), cpu_ops.rotate_ref(k, cos, sin)
    v_before = qkv[:, (hq + hkv) * dh:].clone()
    got_q, got_k = cpu_ops.rotary(q, k, cos, sin)
    assert got_q.data_ptr() == q.data_ptr()                     # in place
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-6)
    assert torch.equal(qkv[:, (hq + hkv) * dh:], v_before)     # the rest of the row untouched


def test_other_dtypes_keep_the_reference():
    x = torch.randn(3, 16, dtype=torch.float64)
    w = torch.randn(16, dtype=torch.float64)
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-6), cpu_ops.rms_norm_ref(x, w, 1e-6))
    q, k = torch.randn(2, 2, 8, dtype=torch.float64), torch.randn(2, 1, 8, dtype=torch.float64)
    cos, sin = torch.rand(2, 1, 8, dtype=torch.float64), torch.rand(2, 1, 8, dtype=torch.float64)
    q0 = q.clone()
    got_q, _ = cpu_ops.rotary(q, k, cos, sin)
    assert torch.equal(q, q0) and torch.equal(got_q, cpu_ops.rotate_ref(q0, cos, sin))   # not in place


@needs_ext
def test_bad_shapes_are_refused_by_the_extension():
    mod = cpu_ops._KERNEL.module()
    with pytest.raises(RuntimeError, match="weight must be"):
        mod.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="cos and sin"):
        mod.rotary_(torch.randn(2, 2, 8), torch.randn(2, 1, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8))
