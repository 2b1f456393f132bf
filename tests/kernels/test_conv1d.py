"""Triton causal conv1d (prefill and decode update) against the torch reference."""

import pytest
import torch
from kernels_testing import DEVICES, assert_close

from hybridserve.kernels.conv1d import (
    causal_conv1d_ref,
    causal_conv1d_triton,
    causal_conv1d_update_ref,
    causal_conv1d_update_triton,
)


def make(lens, Dc, K, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = len(lens)
    x = torch.randn(sum(lens), Dc, generator=g).to(device, dtype)
    w = torch.randn(Dc, K, generator=g).to(device, dtype)
    b = torch.randn(Dc, generator=g).to(device, dtype)
    states = torch.randn(S + 2, Dc, K - 1, generator=g).to(device, dtype)
    slots = torch.randperm(S + 2, generator=g)[:S].to(device)
    has_init = (torch.arange(S) % 2 == 0).to(device)
    cu = torch.tensor([0] + lens).cumsum(0).to(device)
    return x, w, b, states, slots, has_init, cu


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lens,Dc,K,act", [([1, 7, 2, 40], 10, 4, "silu"), ([3], 33, 3, None), ([2, 1], 5, 5, "silu")]
)
def test_conv_prefill_matches_ref(device, dtype, lens, Dc, K, act):
    x, w, b, states, slots, has_init, cu = make(lens, Dc, K, dtype, device)
    want_states = states.clone()
    kw = dict(cu_seqlens=cu, state_indices=slots, has_initial_state=has_init, activation=act)
    want = causal_conv1d_ref(x, w, b, conv_states=want_states, **kw)
    out = causal_conv1d_triton(x, w, b, conv_states=states, **kw, block_t=8, block_d=16)
    assert_close("out", out, want, dtype)
    assert_close("states", states, want_states, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Dc,K,bias,act", [(10, 4, True, "silu"), (37, 3, False, None)])
@pytest.mark.parametrize("flat", [False, True])
def test_conv_update_matches_ref(device, dtype, Dc, K, bias, act, flat):
    x, w, b, states, slots, _, _ = make([1, 1, 1], Dc, K, dtype, device, seed=3)
    want_states = states.clone()
    b = b if bias else None
    want = causal_conv1d_update_ref(x, want_states, w, b, state_indices=slots, activation=act)
    out = causal_conv1d_update_triton(x, states, w, b, state_indices=slots, activation=act, block_d=16, flat=flat)
    assert_close("out", out, want, dtype)
    assert_close("states", states, want_states, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_prefill_chained_equals_one_call(device):
    """Two prefill calls (the second starting from the saved state) equal one call."""
    x, w, b, states, slots, _, _ = make([9], 6, 4, torch.float32, device, seed=5)
    one = states.clone()
    kw = dict(state_indices=slots, activation="silu")
    full = causal_conv1d_triton(
        x, w, b, conv_states=one, cu_seqlens=torch.tensor([0, 9], device=device),
        has_initial_state=torch.tensor([False], device=device), **kw,
    )
    parts = []
    for i, (lo, hi) in enumerate([(0, 2), (2, 9)]):
        parts.append(causal_conv1d_triton(
            x[lo:hi], w, b, conv_states=states, cu_seqlens=torch.tensor([0, hi - lo], device=device),
            has_initial_state=torch.tensor([i > 0], device=device), **kw,
        ))
    assert_close("chained", torch.cat(parts), full, torch.float32)
    assert_close("state", states[slots], one[slots], torch.float32)
