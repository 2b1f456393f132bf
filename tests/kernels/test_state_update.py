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


@pytest.mark.parametrize("slots, runs", [
    ([3, 4, 5, 6, 7, 8], [(0, 3, 6)]),                               # one run: the usual batch
    ([0, 1, 5, 6, 7, 10], [(0, 0, 2), (2, 5, 3), (5, 10, 1)]),        # a few runs, in place each
    ([9, 7, 5, 3, 1, 0], None),                                       # over MAX_RUNS: gather/scatter
])
def test_ref_run_paths_equal_row_by_row(slots, runs):
    """The ref's CPU decode updates runs of consecutive slots in place and gathers otherwise; every
    way must give what updating each row on its own gives, and touch only the rows' slots."""
    from hybridserve.kernels.state_update import _slot_runs, selective_state_update_ref

    g = torch.Generator().manual_seed(0)
    H, P, N, n = 4, 8, 16, len(slots)
    state = torch.randn(12, H, P, N, generator=g)
    x, dt = torch.randn(n, H, P, generator=g), torch.randn(n, H, generator=g)
    B, C = torch.randn(n, 2, N, generator=g), torch.randn(n, 2, N, generator=g)
    z = torch.randn(n, H, P, generator=g)
    A, D, bias = -torch.rand(H, generator=g) * 4, torch.rand(H, generator=g), torch.randn(H, generator=g)
    idx = torch.tensor(slots)
    assert _slot_runs(idx, n, state) == runs
    got, want = state.clone(), state.clone()
    y = selective_state_update_ref(got, x, dt, A, B, C, D, z=z, dt_bias=bias, state_indices=idx)
    y_rows = torch.cat([selective_state_update_ref(want, x[r:r + 1], dt[r:r + 1], A, B[r:r + 1], C[r:r + 1], D,
                                                   z=z[r:r + 1], dt_bias=bias, state_indices=idx[r:r + 1])
                        for r in range(n)])
    torch.testing.assert_close(y, y_rows, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    untouched = [s for s in range(12) if s not in slots]
    assert torch.equal(got[untouched], state[untouched])
    assert not torch.allclose(got[slots], state[slots])  # the slots were really updated
