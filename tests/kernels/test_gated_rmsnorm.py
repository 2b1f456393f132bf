"""Triton gated RMSNorm against the torch reference."""

import pytest
import torch
from kernels_testing import DEVICES, assert_close

from hybridserve.kernels.gated_rmsnorm import gated_rms_norm_ref, gated_rms_norm_triton


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,Dm,group_size,gated", [(5, 48, None, True), (3, 60, 12, True), (1, 20, None, False)])
def test_gated_rms_norm_matches_ref(device, dtype, T, Dm, group_size, gated):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, Dm, generator=g).to(device, dtype)
    z = torch.randn(T, Dm, generator=g).to(device, dtype) if gated else None
    w = torch.randn(Dm, generator=g).to(device, dtype)
    want = gated_rms_norm_ref(x, z, w, 1e-5, group_size)
    out = gated_rms_norm_triton(x, z, w, 1e-5, group_size)
    assert out.dtype == dtype
    assert_close("gated rmsnorm", out, want, dtype)
