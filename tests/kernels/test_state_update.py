"""Triton selective-state update against its torch reference (interpreter on CPU, compiled on CUDA)."""

import pytest
import torch
from kernels_testing import DEVICES, assert_close

from hybridserve.kernels.state_update import selective_state_update_ref, selective_state_update_triton


def inputs(Bt, H, P, G, N, dtype, device, slots, state_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    d = dict(
        x=r(Bt, H, P), dt=r(Bt, H) - 1, A=-torch.rand(H, generator=g) - 0.1, B=r(Bt, G, N), C=r(Bt, G, N),
        D=r(H), z=r(Bt, H, P), dt_bias=r(H) * 0.5,
    )
    d = {k: v.to(device=device, dtype=dtype if k in ("x", "dt", "B", "C", "z") else torch.float32) for k, v in d.items()}
    state = r(slots, H, P, N).to(device=device, dtype=state_dtype)
    return state, d


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
@pytest.mark.parametrize("shape", [(3, 6, 5, 2, 7), (2, 4, 16, 1, 16)])  # Bt, H, P, G, N
def test_state_update_matches_ref(device, dtype, state_dtype, shape):
    Bt, H, P, G, N = shape
    state, d = inputs(Bt, H, P, G, N, dtype, device, slots=Bt + 2, state_dtype=state_dtype)
    slots = torch.randperm(Bt + 2, generator=torch.Generator().manual_seed(1))[:Bt].to(device)
    want_state = state.clone()
    y_want = selective_state_update_ref(want_state, **d, state_indices=slots)
    y = selective_state_update_triton(state, **d, state_indices=slots, block_p=4)
    assert_close("y", y, y_want, dtype)
    assert_close("state", state, want_state, state_dtype if state_dtype == torch.bfloat16 else dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_state_update_without_optional_inputs(device):
    state, d = inputs(2, 4, 8, 2, 8, torch.float32, device, slots=2, state_dtype=torch.float32)
    want_state = state.clone()
    args = (d["x"], d["dt"], d["A"], d["B"], d["C"])
    y_want = selective_state_update_ref(want_state, *args, dt_softplus=False)
    y = selective_state_update_triton(state, *args, dt_softplus=False)
    assert_close("y", y, y_want, torch.float32)
    assert_close("state", state, want_state, torch.float32)
