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

from hybridserve.kernels._backend import lazy_jit, next_pow2, tl, triton, use_triton
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
        return selective_state_update_triton(*args, **kwargs)
    return selective_state_update_ref(*args, **kwargs)


@lazy_jit
def _selective_state_update_kernel(
    # pointers
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, idx_ptr, y_ptr,
    # sizes
    P, N, heads_per_group,
    # strides
    s_slot, s_head, s_p,
    x_b, x_h, dt_b, B_b, B_g, C_b, C_g, z_b, z_h, y_b, y_h,
    # meta-parameters
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    HAS_INDICES: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # one program: batch row b, head h, rows [p0, p0 + BLOCK_P) of the [P, N] state
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    g = h // heads_per_group
    slot = tl.load(idx_ptr + b).to(tl.int64) if HAS_INDICES else b.to(tl.int64)

    dt = tl.load(dt_ptr + b * dt_b + h).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + h).to(tl.float32)
    if DT_SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    decay = tl.exp(dt * tl.load(A_ptr + h).to(tl.float32))

    p_mask = p < P
    n_mask = n < N
    tile_mask = p_mask[:, None] & n_mask[None, :]
    tile = state_ptr + slot * s_slot + h * s_head + p[:, None] * s_p + n[None, :]  # [BLOCK_P, BLOCK_N]
    state = tl.load(tile, mask=tile_mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * x_b + h * x_h + p, mask=p_mask, other=0.0).to(tl.float32)  # [BLOCK_P]
    Bv = tl.load(B_ptr + b * B_b + g * B_g + n, mask=n_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
    Cv = tl.load(C_ptr + b * C_b + g * C_g + n, mask=n_mask, other=0.0).to(tl.float32)

    state = state * decay + (dt * x)[:, None] * Bv[None, :]
    tl.store(tile, state.to(state_ptr.dtype.element_ty), mask=tile_mask)

    y = tl.sum(state * Cv[None, :], axis=1)  # [BLOCK_P]
    if HAS_D:
        y += x * tl.load(D_ptr + h).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + b * z_b + h * z_h + p, mask=p_mask, other=0.0).to(tl.float32)
        y *= zv * tl.sigmoid(zv)
    tl.store(y_ptr + b * y_b + h * y_h + p, y.to(y_ptr.dtype.element_ty), mask=p_mask)


def selective_state_update_triton(
    state, x, dt, A, B, C, D=None, *, z=None, dt_bias=None, dt_softplus=True, state_indices=None,
    block_p=None, num_warps=4,
):
    """Triton `selective_state_update`; `block_p` / `num_warps` are tuning knobs for benchmarks."""
    Bt, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    if H % G:
        raise ValueError(f"heads ({H}) must be a multiple of B/C groups ({G})")
    if state.stride(-1) != 1 or x.stride(-1) != 1 or B.stride(-1) != 1 or C.stride(-1) != 1:
        raise ValueError("state, x, B and C need a contiguous last dim")
    if z is not None and z.stride(-1) != 1:
        z = z.contiguous()
    if dt.stride(-1) != 1:
        dt = dt.contiguous()
    y = torch.empty_like(x)
    if Bt == 0:
        return y
    if state_indices is not None:
        state_indices = state_indices.to(x.device)
    block_n = next_pow2(N)
    block_p = block_p or min(next_pow2(P), max(1, 4096 // block_n))
    grid = (Bt, H, triton.cdiv(P, block_p))
    zz = z if z is not None else x
    _selective_state_update_kernel[grid](
        state, x, dt, A, B, C, D if D is not None else A, zz, dt_bias if dt_bias is not None else A,
        state_indices if state_indices is not None else x, y,
        P, N, H // G,
        state.stride(0), state.stride(1), state.stride(2),
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        zz.stride(0), zz.stride(1), y.stride(0), y.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
        HAS_INDICES=state_indices is not None, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y


MAX_RUNS = 4  # more runs of consecutive slots than this: one gather/scatter instead


def _slot_runs(state_indices, n: int, state: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """(first row, first slot, length) of each run of rows whose slots are consecutive, for an fp32
    CPU state updated in place; None when the state is not that, or the rows make over MAX_RUNS runs."""
    if state.dtype != torch.float32 or state.is_cuda or not state.is_contiguous():
        return None
    if state_indices is None:
        return [(0, 0, n)]
    if state_indices.is_cuda or n == 0:
        return None
    slots = state_indices.tolist()
    runs = [[0, slots[0], 1]]
    for row in range(1, n):
        if slots[row] == slots[row - 1] + 1:
            runs[-1][2] += 1
        elif len(runs) == MAX_RUNS:
            return None
        else:
            runs.append([row, slots[row], 1])
    return [tuple(r) for r in runs]


def selective_state_update_ref(
    state, x, dt, A, B, C, D=None, *, z=None, dt_bias=None, dt_softplus=True, state_indices=None
):
    """Torch reference of `selective_state_update`, batched over rows (a loop only over the few
    runs of consecutive slots that are updated in place)."""
    Bt, H, P = x.shape
    G = B.shape[1]
    if H % G:
        raise ValueError(f"heads ({H}) must be a multiple of B/C groups ({G})")
    runs = _slot_runs(state_indices, Bt, state)
    HG = H // G
    dt = process_dt(dt, dt_bias, dt_softplus)  # [Bt, H]
    decay = torch.exp(dt * A.float())  # [Bt, H]
    # This ref is the CPU decode path, so it is written for memory traffic and for the shapes
    # CPU BLAS is fast at: no [Bt, H, P, N] temporaries; when the rows are a few runs of
    # consecutive fp32 slots (the usual case: the runner orders decode rows by seat, and seats
    # are handed out lowest first) each run's states are updated in place, with no gather/scatter
    # (a gather of 8 rows out of order made the small hybrid's step 2.6 ms slower); the heads of a
    # B/C group share one [1, N] x [N, HG*P] product (a bmm with a one-column output is ~8x slower
    # on CPU).
    dtx = (dt[..., None] * x.float()).view(Bt, G, HG * P, 1)
    Bf, Cf = B.float(), C.float()
    if runs is None:
        if state_indices is None:
            state_indices = torch.arange(Bt, device=state.device)
        new = state.index_select(0, state_indices).float()  # [Bt, H, P, N]
        y = _update_rows(new, decay, dtx, Bf, Cf)
        state.index_copy_(0, state_indices, new.to(state.dtype))
    else:
        ys = [_update_rows(state.narrow(0, slot, n), decay[row:row + n], dtx[row:row + n], Bf[row:row + n],
                           Cf[row:row + n]) for row, slot, n in runs]
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
    y = y.view(Bt, H, P)
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def _update_rows(new: torch.Tensor, decay, dtx, B, C) -> torch.Tensor:
    """Rows' states [n, H, P, N] in place: decay, add dt*x (outer) B; returns their y as
    [n * G, 1, HG * P] (per B/C group: C against the group's heads)."""
    n, G, HGP, _ = dtx.shape
    N = B.shape[-1]
    grouped = new.view(n, G, HGP, N)
    new.mul_(decay[..., None, None])
    grouped.addcmul_(dtx, B.view(n, G, 1, N))
    return torch.bmm(C.reshape(n * G, 1, N), grouped.view(n * G, HGP, N).transpose(1, 2))
