"""Mamba-2 SSD chunked scan over packed variable-length sequences (prefill).

Contract: for each sequence s of the packed batch (boundaries `cu_seqlens`),
starting from `initial_states[s]` (zeros when None),

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t (outer) B_t      h: [H, P, N]
    y_t = h_t . C_t  (sum over N)  +  D * x_t ;  y_t *= silu(z_t) when z is given

with dt_t = clamp(softplus(dt_t + dt_bias), *dt_limit). Returns y [T, H, P] in
x.dtype and the state after each sequence's last token, [S, H, P, N] fp32.
With `state_offsets` (packed token offsets, each strictly inside a sequence) it
also returns the state after the first `o` packed tokens, [K, H, P, N] fp32, for
each offset o: the chunks are cut there, so those states come from the state
passing the scan does anyway (the prefix cache's Mamba snapshots).
Head h reads B/C group h // (H // G). The result does not depend on
`chunk_size` beyond rounding. `cu_seqlens` may live on the host (the Triton
path reads it there once per call; on the device that costs a sync).

Triton: `ssd_triton` (four kernels, the default) or `ssd_fused_triton` (one fused
kernel after C.B; HYBRIDSERVE_SSD_FUSED=1 picks it).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from hybridserve.kernels import cpu_ssd
from hybridserve.kernels._backend import use_triton

CPU_CHUNK = 64


def ssd_scan(
    x: torch.Tensor,  # [T, H, P]
    dt: torch.Tensor,  # [T, H]
    A: torch.Tensor,  # [H] fp32, negative
    B: torch.Tensor,  # [T, G, N]
    C: torch.Tensor,  # [T, G, N]
    D: torch.Tensor | None = None,  # [H]
    *,
    chunk_size: int = 256,
    z: torch.Tensor | None = None,  # [T, H, P]
    dt_bias: torch.Tensor | None = None,  # [H]
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    initial_states: torch.Tensor | None = None,  # [S, H, P, N] fp32
    cu_seqlens: torch.Tensor | None = None,  # [S + 1] int64
    state_offsets: list[int] | None = None,  # K host ints in (cu[s], cu[s+1]) of some s
):
    """Chunked selective scan; returns (y [T, H, P] x.dtype, final_states [S, H, P, N] fp32),
    plus the states at `state_offsets` [K, H, P, N] fp32 when those are given."""
    args = (x, dt, A, B, C, D)
    kwargs = dict(
        chunk_size=chunk_size, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
        dt_limit=dt_limit, initial_states=initial_states, cu_seqlens=cu_seqlens,
    )
    if state_offsets is not None:
        kwargs["state_offsets"] = state_offsets
    if use_triton(x):
        if state_offsets is None and os.environ.get("HYBRIDSERVE_SSD_FUSED", "0") == "1":  # one-kernel variant, opt-in until timed on a GPU
            from hybridserve.kernels.ssd_fused_triton import ssd_scan_fused_triton

            return ssd_scan_fused_triton(*args, **kwargs)
        from hybridserve.kernels.ssd_triton import ssd_scan_triton

        return ssd_scan_triton(*args, **kwargs)
    # One piece per sequence (cut only at state_offsets), each scanned in all its chunks at once,
    # by the C++ kernel where it is built (its chunk is CPU_CHUNK), else by `_scan_cpu`.
    kwargs["chunk_size"] = max(x.shape[0], 1)
    fast = cpu_ssd.usable(x) and cpu_chunk_size() == cpu_ssd.CHUNK
    return ssd_scan_ref(*args, **kwargs, chunk_fn=cpu_ssd.scan_piece if fast else _scan_cpu)


def cpu_chunk_size() -> int:
    """Chunk length of the CPU scan (HYBRIDSERVE_CPU_SSD_CHUNK, default CPU_CHUNK).

    The result does not depend on it beyond rounding, so the CPU path picks what is fastest
    there, not the model's chunk (256 for Granite 4.0-H): the [H, l, l] decays grow with the
    square of l. One thread, T = 2048, H = 16, P = N = 64 (the small hybrid's layer), chunk
    by chunk: l = 256 took 214 ms, 128 72 ms, 64 30 ms, 32 32 ms; H = 32, N = 128: 676 / 329
    / 74 / 90 ms (relative differences in y ~6e-6). `_scan_cpu` takes every chunk at once."""
    return int(os.environ.get("HYBRIDSERVE_CPU_SSD_CHUNK", CPU_CHUNK))


def process_dt(
    dt: torch.Tensor,  # [..., H]
    dt_bias: torch.Tensor | None,  # [H]
    dt_softplus: bool,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """dt -> clamp(softplus(dt + dt_bias)) in fp32, the step size every op uses."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    return dt


def ssd_scan_ref(
    x, dt, A, B, C, D=None, *, chunk_size=256, z=None, dt_bias=None, dt_softplus=True,
    dt_limit=(0.0, float("inf")), initial_states=None, cu_seqlens=None, chunk_fn=None, state_offsets=None,
):
    """Torch reference of `ssd_scan`: per sequence, chunk by chunk, fp32 inside.

    `chunk_fn` computes one chunk: `_chunk_ref` (the default, the oracle of the kernel tests)
    or `_scan_cpu` (what `ssd_scan` runs on CPU, with one piece per sequence)."""
    chunk_fn = chunk_fn or _chunk_ref
    T, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    if H % G:
        raise ValueError(f"heads ({H}) must be a multiple of B/C groups ({G})")
    R = H // G
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, T], dtype=torch.int64)
    bounds = cu_seqlens.tolist()
    S = len(bounds) - 1
    if initial_states is None:
        initial_states = torch.zeros(S, H, P, N, device=x.device, dtype=torch.float32)

    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit).view(T, G, R)  # [T, G, R]
    xf = x.float().view(T, G, R, P)
    Bf, Cf = B.float(), C.float()
    Af = A.float().view(G, R)
    y = torch.empty(T, G, R, P, device=x.device, dtype=torch.float32)
    final_states = torch.empty(S, H, P, N, device=x.device, dtype=torch.float32)

    cuts = set(state_offsets or ())
    kept: dict[int, torch.Tensor] = {}
    for s in range(S):
        state = initial_states[s].float().reshape(G, R, P, N)
        for start, end in chunk_bounds(bounds[s], bounds[s + 1], chunk_size, cuts):
            sl = slice(start, end)
            y[sl], state = chunk_fn(xf[sl], dt[sl], Af, Bf[sl], Cf[sl], state)
            if end in cuts and end < bounds[s + 1]:
                kept[end] = state.reshape(H, P, N).clone()
        final_states[s] = state.reshape(H, P, N)

    y = y.view(T, H, P)
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    if state_offsets is None:
        return y.to(x.dtype), final_states
    return y.to(x.dtype), final_states, _stack_kept(kept, state_offsets, (H, P, N), x.device)


def chunk_bounds(start: int, end: int, chunk_size: int, cuts: set[int]) -> list[tuple[int, int]]:
    """[start, end) cut every `chunk_size` tokens and at each offset in `cuts` inside it."""
    edges = sorted({*range(start, end, chunk_size), *(c for c in cuts if start < c < end)})
    return list(zip(edges, edges[1:] + [end]))


def _stack_kept(kept: dict[int, torch.Tensor], offsets: list[int], shape, device) -> torch.Tensor:
    missing = [o for o in offsets if o not in kept]
    if missing:
        raise ValueError(f"state_offsets {missing[:4]} are not strictly inside a sequence")
    if not offsets:
        return torch.empty(0, *shape, device=device, dtype=torch.float32)
    return torch.stack([kept[o] for o in offsets])


def _chunk_ref(x, dt, A, B, C, state):
    """One chunk of length l: quadratic intra-chunk term + the incoming state's term.

    x [l, G, R, P]; dt [l, G, R]; A [G, R]; B, C [l, G, N]; state [G, R, P, N].
    Returns (y [l, G, R, P], state after the chunk [G, R, P, N]).
    """
    dA = dt * A  # [l, G, R]
    cum = dA.cumsum(0)  # [l, G, R]
    decay = torch.exp(_segsum(dA.permute(1, 2, 0)))  # [G, R, t, s]
    scores = torch.einsum("tgn,sgn->gts", C, B)  # [G, t, s]
    weights = scores[:, None] * decay * dt.permute(1, 2, 0)[:, :, None, :]  # [G, R, t, s]
    y = torch.einsum("grts,sgrp->tgrp", weights, x)
    y = y + torch.einsum("tgn,grpn->tgrp", C, state) * torch.exp(cum)[..., None]
    to_end = torch.exp(cum[-1:] - cum) * dt  # [l, G, R]
    state = state * torch.exp(cum[-1])[..., None, None] + torch.einsum(
        "tgrp,tgn->grpn", x * to_end[..., None], B
    )
    return y, state


def _scan_cpu(x, dt, A, B, C, state):
    """`_chunk_ref` as the CPU prefill path runs it, over a whole piece of one sequence.

    Same shapes as `_chunk_ref`, any length L. The piece is padded to whole chunks of
    `cpu_chunk_size()` with dt = 0, which is exact: a padded step neither decays the state
    nor adds to it. Each term is then one batched product over every chunk (and head)
    instead of one per chunk; only the state passing, a [G, R, P, N] multiply-add per
    chunk written straight into the states entering the next, stays a loop. Everything
    inside runs head-major ([chunk, G, R, l, ...]) so every product is a plain batched GEMM
    on contiguous operands: x is transposed once (with dt multiplied in), to_end and
    exp(cum) are folded into per-head copies of B and C, and only y is transposed back
    (one thread, T = 2048, 16 heads, P = N = 64: 30 -> 26 ms against the einsum form).
    Within a chunk it takes fewer passes over the [G, R, l, l] decays: a decay is exp of a difference of the chunk's running sum of dt * A (as mamba-ssm's
    kernels take it) rather than of a segment summed on its own, so there is no cumsum over
    [l, l]; dt multiplies x once instead of every weight; the masking, exp and the product
    with C.B happen in place. The difference costs at most ~|cum| * 6e-8 in each exponent
    (fp32), well inside what the model tests allow against Hugging Face.
    """
    L, G, R, P = x.shape
    l = min(cpu_chunk_size(), L)
    nc = -(-L // l)
    pad = nc * l - L
    if pad:
        x, dt = F.pad(x, (0, 0, 0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    N = B.shape[-1]
    dth = dt.view(nc, l, G, R).permute(0, 2, 3, 1)  # [nc, G, R, l]
    cum = (dth * A[..., None]).cumsum(-1).contiguous()  # [nc, G, R, l]
    Bh = B.view(nc, l, G, N).transpose(1, 2)  # [nc, G, l, N]
    Ch = C.view(nc, l, G, N).transpose(1, 2)
    xdt = torch.empty(nc, G, R, l, P, dtype=x.dtype, device=x.device)
    torch.mul(x.view(nc, l, G, R, P).permute(0, 2, 3, 1, 4), dth[..., None], out=xdt)
    decay = cum[..., :, None] - cum[..., None, :]  # [nc, G, R, t, s]
    decay.masked_fill_(_upper_mask(l, x.device), float("-inf")).exp_()
    decay.mul_(torch.matmul(Ch, Bh.transpose(-1, -2))[:, :, None])
    y = torch.matmul(decay, xdt)  # [nc, G, R, l, P]
    Bs = Bh[:, :, None] * torch.exp(cum[..., -1:] - cum)[..., None]  # [nc, G, R, l, N]
    local = torch.matmul(xdt.transpose(-1, -2), Bs)  # [nc, G, R, P, N]
    through = torch.exp(cum[..., -1])[..., None, None]  # [nc, G, R, 1, 1]
    entering = torch.empty(nc + 1, G, R, P, N, dtype=state.dtype, device=state.device)
    entering[0] = state
    for i in range(nc):
        torch.addcmul(local[i], entering[i], through[i], out=entering[i + 1])
    f = nc * G * R
    Cs = torch.empty(nc, G, R, l, N, dtype=x.dtype, device=x.device)
    torch.mul(Ch[:, :, None], torch.exp(cum)[..., None], out=Cs)
    torch.baddbmm(y.view(f, l, P), Cs.view(f, l, N), entering[:nc].view(f, P, N).transpose(1, 2), out=y.view(f, l, P))
    return y.permute(0, 3, 1, 2, 4).reshape(nc * l, G, R, P)[:L], entering[nc]


_MASKS: dict[tuple[int, str], torch.Tensor] = {}


def _upper_mask(l: int, device: torch.device) -> torch.Tensor:
    """[l, l] bool, True strictly above the diagonal (s > t: no decay from the future); cached."""
    key = (l, str(device))
    if key not in _MASKS:
        _MASKS[key] = torch.triu(torch.ones(l, l, dtype=torch.bool, device=device), diagonal=1)
    return _MASKS[key]


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """out[..., t, s] = sum(a[..., s+1 : t+1]) for t >= s, else -inf; summed, not differenced."""
    l = a.shape[-1]
    strict = torch.tril(torch.ones(l, l, dtype=torch.bool, device=a.device), diagonal=-1)
    out = a[..., :, None].expand(*a.shape, l).masked_fill(~strict, 0.0).cumsum(-2)
    causal = torch.tril(torch.ones(l, l, dtype=torch.bool, device=a.device))
    return out.masked_fill(~causal, float("-inf"))
