"""Mamba-2 selective-state update: one decode step on slot-indexed states, in place.

Contract: for each batch row b with slot i = state_indices[b] (b when None),

    dt = softplus(dt[b] + dt_bias)                                    [H]
    state[i] = exp(dt * A) * state[i] + dt * x[b] (outer) B[b]        [H, P, N]
    y[b] = state[i] . C[b] (sum over N) + D * x[b];  y *= silu(z[b])

dt is one value per head, tied across the head dim P, as Mamba-2 uses it. Math
in fp32; the new state is stored in the state's dtype (fp32 or bf16) and y is
computed from the fp32 value before that rounding. y is returned in x.dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridserve.kernels._backend import use_triton
from hybridserve.kernels.ssd import process_dt


def selective_state_update(
    state: torch.Tensor,  # [num_slots, H, P, N] fp32 or bf16, updated in place
    x: torch.Tensor,  # [Bt, H, P]
    dt: torch.Tensor,  # [Bt, H]
    A: torch.Tensor,  # [H]
    B: torch.Tensor,  # [Bt, G, N]
    C: torch.Tensor,  # [Bt, G, N]
    D: torch.Tensor | None = None,  # [H]
    *,
    z: torch.Tensor | None = None,  # [Bt, H, P]
    dt_bias: torch.Tensor | None = None,  # [H]
    dt_softplus: bool = True,
    state_indices: torch.Tensor | None = None,  # [Bt] int64; None = rows 0..Bt-1
) -> torch.Tensor:
    """One recurrence step per row; returns y [Bt, H, P] in x.dtype."""
    args = (state, x, dt, A, B, C, D)
    kwargs = dict(z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, state_indices=state_indices)
    if use_triton(x):
        from hybridserve.kernels.state_update_triton import selective_state_update_triton

        return selective_state_update_triton(*args, **kwargs)
    return selective_state_update_ref(*args, **kwargs)


def selective_state_update_ref(
    state, x, dt, A, B, C, D=None, *, z=None, dt_bias=None, dt_softplus=True, state_indices=None
):
    """Torch reference of `selective_state_update`, batched over rows (no Python loop)."""
    Bt, H, P = x.shape
    G = B.shape[1]
    if H % G:
        raise ValueError(f"heads ({H}) must be a multiple of B/C groups ({G})")
    if state_indices is None:
        state_indices = torch.arange(Bt, device=state.device)
    head_group = torch.arange(H, device=x.device) // (H // G)  # [H]
    Bh = B.float()[:, head_group]  # [Bt, H, N]
    Ch = C.float()[:, head_group]  # [Bt, H, N]
    dt = process_dt(dt, dt_bias, dt_softplus)  # [Bt, H]
    decay = torch.exp(dt * A.float())  # [Bt, H]

    old = state[state_indices].float()  # [Bt, H, P, N]
    new = old * decay[..., None, None] + (dt[..., None] * x.float())[..., None] * Bh[:, :, None, :]
    state[state_indices] = new.to(state.dtype)

    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)
