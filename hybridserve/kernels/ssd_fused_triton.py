"""SSD chunked scan with chunk state, state passing and chunk scan fused in one kernel.

Same contract as `ssd.ssd_scan`. Two launches: `_chunk_cb_kernel` (C.B per chunk
and group, shared by the group's heads), then `_ssd_fused_kernel`, one program per
(chunk, head, head-dim block), which

1. computes dt, the chunk-local cumsum of dt*A and its total (kept in [H, T] scratch),
2. computes the chunk's own end state  sum_l exp(total - cum_l) dt_l x_l B_l^T,
3. waits for the previous chunk of its sequence to publish its end state (a flag),
   adds it decayed by exp(total), and publishes its own (or writes the final state),
4. computes the chunk's outputs from the incoming state and the intra-chunk terms.

Programs take their (chunk, head, block) from an atomic ticket in chunk-major
order, so a program only ever waits for one that started before it: no deadlock
whatever order the GPU schedules programs in. The chunk states never make the
round trip through the separate state-passing pass of the four-kernel version.
"""

from __future__ import annotations

import torch

from hybridserve.kernels._backend import interpreting, lazy_jit, tl, triton
from hybridserve.kernels.ssd_triton import _chunk_cb_kernel, chunk_table, tile_sizes


@lazy_jit
def _ssd_fused_kernel(
    # pointers
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, init_ptr, chunks_ptr, seq_chunks_ptr,
    cb_ptr, dt_out_ptr, cum_ptr, carry_ptr, sync_ptr, final_ptr, y_ptr,
    # sizes
    T, nchunks, H, P, N, heads_per_group, dt_min, dt_max,
    # strides
    x_t, x_h, dt_t, B_t, B_g, C_t, C_g, z_t, z_h, y_t, y_h, cb_c, cb_g, cb_m,
    init_s, init_h, fin_s, fin_h, carry_c, carry_h,
    # meta-parameters
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    HAS_INIT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n_pb = tl.cdiv(P, BLOCK_P)
    ticket = tl.atomic_add(sync_ptr, 1)  # chunk-major: every earlier chunk already has its programs
    c = ticket // (H * n_pb)
    h = (ticket // n_pb) % H
    pb = ticket % n_pb
    g = h // heads_per_group
    start = tl.load(chunks_ptr + c)
    length = tl.load(chunks_ptr + nchunks + c) - start
    seq = tl.load(chunks_ptr + 2 * nchunks + c)
    start = start.to(tl.int64)  # chunk-base pointers in 64 bits, offsets inside a chunk in 32
    x_c = x_ptr + start * x_t
    z_c = z_ptr + start * z_t
    y_c = y_ptr + start * y_t
    B_c = B_ptr + start * B_t
    C_c = C_ptr + start * C_t
    dt_c = dt_out_ptr + h * T + start
    cum_c = cum_ptr + h * T + start
    first = c == tl.load(seq_chunks_ptr + seq)
    last = c == tl.load(seq_chunks_ptr + seq + 1) - 1
    A = tl.load(A_ptr + h).to(tl.float32)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_mask = p < P
    n_mask = n < N
    state_mask = p_mask[:, None] & n_mask[None, :]

    # 1. dt and the chunk-local cumsum of dt*A, written to scratch for the block loops below
    l_all = tl.arange(0, CHUNK)
    in_chunk = l_all < length
    dt_all = tl.load(dt_ptr + (start + l_all) * dt_t + h, mask=in_chunk, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt_all += tl.load(dt_bias_ptr + h).to(tl.float32)
    if DT_SOFTPLUS:
        dt_all = tl.where(dt_all <= 20.0, tl.log(1.0 + tl.exp(dt_all)), dt_all)
    dt_all = tl.where(in_chunk, tl.minimum(tl.maximum(dt_all, dt_min), dt_max), 0.0)
    cum_all = tl.cumsum(dt_all * A, axis=0)
    total = tl.sum(dt_all * A, axis=0)
    tl.store(dt_c + l_all, dt_all, mask=in_chunk)
    tl.store(cum_c + l_all, cum_all, mask=in_chunk)
    tl.debug_barrier()

    # 2. the chunk's own end state: sum_l (exp(total - cum_l) dt_l x_l)^T B_l
    local = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
    for l0 in range(0, CHUNK, BLOCK_K):
        l = l0 + tl.arange(0, BLOCK_K)  # positions in the chunk
        t_mask = l < length
        dt = tl.load(dt_c + l, mask=t_mask, other=0.0)
        cum = tl.load(cum_c + l, mask=t_mask, other=0.0)
        scale = tl.where(t_mask, tl.exp(total - cum) * dt, 0.0)
        xt = tl.load(x_c + l[:, None] * x_t + h * x_h + p[None, :], mask=t_mask[:, None] & p_mask[None, :], other=0.0)
        Bt = tl.load(B_c + l[:, None] * B_t + g * B_g + n[None, :], mask=t_mask[:, None] & n_mask[None, :], other=0.0)
        xs = xt.to(tl.float32) * scale[:, None]
        if UPCAST:
            Bt = Bt.to(tl.float32)
        else:
            xs = xs.to(Bt.dtype)
        if IEEE:
            local += tl.dot(tl.trans(xs), Bt, input_precision="ieee")
        else:
            local += tl.dot(tl.trans(xs), Bt)

    # 3. chain: start state = previous chunk's end state (or the initial state)
    flags = sync_ptr + 1
    slot = (c * H + h) * n_pb + pb
    tile = p[:, None] * BLOCK_N + n[None, :]  # offsets inside a [P, N] state (N padded to BLOCK_N)
    if first:
        if HAS_INIT:
            prev = tl.load(init_ptr + seq * init_s + h * init_h + p[:, None] * N + n[None, :], mask=state_mask, other=0.0)
        else:
            prev = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
    else:
        while tl.atomic_add(flags + slot - H * n_pb, 0, sem="acquire", scope="gpu") == 0:
            pass
        prev = tl.load(carry_ptr + (c - 1).to(tl.int64) * carry_c + h * carry_h + tile, cache_modifier=".cg")
    new = prev * tl.exp(total) + local
    if last:
        tl.store(final_ptr + seq * fin_s + h * fin_h + p[:, None] * N + n[None, :], new, mask=state_mask)
    else:
        tl.store(carry_ptr + c.to(tl.int64) * carry_c + h * carry_h + tile, new)
        tl.debug_barrier()
        tl.atomic_xchg(flags + slot, 1, sem="release", scope="gpu")

    # 4. outputs, BLOCK_M rows at a time
    if UPCAST:
        prev_op = tl.trans(prev)  # [BLOCK_N, BLOCK_P]
    else:
        prev_op = tl.trans(prev).to(x_ptr.dtype.element_ty)
    for m0 in range(0, CHUNK, BLOCK_M):
        if m0 < length:
            m = m0 + tl.arange(0, BLOCK_M)
            m_mask = m < length
            cum_m = tl.load(cum_c + m, mask=m_mask, other=0.0)
            Cm = tl.load(C_c + m[:, None] * C_t + g * C_g + n[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
            if UPCAST:
                Cm = Cm.to(tl.float32)
            if IEEE:
                acc = tl.dot(Cm, prev_op, input_precision="ieee")
            else:
                acc = tl.dot(Cm, prev_op)
            acc = acc * tl.exp(cum_m)[:, None]
            for k0 in range(0, m0 + BLOCK_M, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_mask = k < length
                cb = tl.load(cb_ptr + c.to(tl.int64) * cb_c + g * cb_g + m[:, None] * cb_m + k[None, :])
                cum_k = tl.load(cum_c + k, mask=k_mask, other=0.0)
                dt_k = tl.load(dt_c + k, mask=k_mask, other=0.0)
                causal = (m[:, None] >= k[None, :]) & k_mask[None, :]
                w = cb * tl.exp(tl.where(causal, cum_m[:, None] - cum_k[None, :], float("-inf"))) * dt_k[None, :]
                xk = tl.load(x_c + k[:, None] * x_t + h * x_h + p[None, :], mask=k_mask[:, None] & p_mask[None, :], other=0.0)
                if UPCAST:
                    xk = xk.to(tl.float32)
                else:
                    w = w.to(xk.dtype)
                if IEEE:
                    acc += tl.dot(w, xk, input_precision="ieee")
                else:
                    acc += tl.dot(w, xk)
            io_mask = m_mask[:, None] & p_mask[None, :]
            if HAS_D:
                xm = tl.load(x_c + m[:, None] * x_t + h * x_h + p[None, :], mask=io_mask, other=0.0).to(tl.float32)
                acc += xm * tl.load(D_ptr + h).to(tl.float32)
            if HAS_Z:
                zm = tl.load(z_c + m[:, None] * z_t + h * z_h + p[None, :], mask=io_mask, other=0.0).to(tl.float32)
                acc = acc * zm * tl.sigmoid(zm)
            tl.store(y_c + m[:, None] * y_t + h * y_h + p[None, :], acc.to(y_ptr.dtype.element_ty), mask=io_mask)


def ssd_scan_fused_triton(
    x, dt, A, B, C, D=None, *, chunk_size=256, z=None, dt_bias=None, dt_softplus=True,
    dt_limit=(0.0, float("inf")), initial_states=None, cu_seqlens=None, blocks=None, num_warps=None,
):
    """Fused Triton `ssd_scan`; `blocks` = dict(m=, k=, p=) and `num_warps` are tuning knobs."""
    T, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    if H % G:
        raise ValueError(f"heads ({H}) must be a multiple of B/C groups ({G})")
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size} must be a power of two for the Triton kernels")
    x, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, B, C))
    if z is not None and z.stride(-1) != 1:
        z = z.contiguous()
    if dt.stride(-1) != 1:
        dt = dt.contiguous()
    dev = x.device
    table, seq_chunks, nchunks = chunk_table(cu_seqlens, T, chunk_size, dev)
    S = seq_chunks.shape[0] - 1
    y = torch.empty_like(x)
    if initial_states is not None:
        initial_states = initial_states.to(torch.float32).contiguous()
    if nchunks == 0:
        final = torch.zeros(S, H, P, N, device=dev, dtype=torch.float32)
        return y, (initial_states.clone() if initial_states is not None else final)
    # sequences of length 0 own no chunk and keep their state
    final = initial_states.clone() if initial_states is not None else torch.zeros(S, H, P, N, device=dev)

    small = interpreting()
    _, BM, BK, BP, BN = tile_sizes(blocks, chunk_size, P, N, small)
    ieee = x.dtype == torch.float32
    n_pb = triton.cdiv(P, BP)

    dt_out = torch.empty(H, T, device=dev, dtype=torch.float32)
    cum = torch.empty(H, T, device=dev, dtype=torch.float32)
    carry = torch.empty(nchunks, H, n_pb * BP, BN, device=dev, dtype=torch.float32)
    sync = torch.zeros(1 + nchunks * H * n_pb, device=dev, dtype=torch.int32)
    cb = torch.empty(nchunks, G, chunk_size, chunk_size, device=dev, dtype=torch.float32)

    _chunk_cb_kernel[((chunk_size // BM) * (chunk_size // BK), G, nchunks)](
        B, C, table, cb,
        nchunks, N,
        B.stride(0), B.stride(1), C.stride(0), C.stride(1), cb.stride(0), cb.stride(1), cb.stride(2),
        IEEE=ieee, UPCAST=small, CHUNK=chunk_size, BLOCK_M=BM, BLOCK_K=BK, BLOCK_N=min(BN, 64),
    )
    zz = z if z is not None else x
    init = initial_states if initial_states is not None else final
    _ssd_fused_kernel[(nchunks * H * n_pb,)](
        x, dt, A, B, C, D if D is not None else A, zz, dt_bias if dt_bias is not None else A, init, table, seq_chunks,
        cb, dt_out, cum, carry, sync, final, y,
        T, nchunks, H, P, N, H // G, float(dt_limit[0]), float(dt_limit[1]),
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        zz.stride(0), zz.stride(1), y.stride(0), y.stride(1), cb.stride(0), cb.stride(1), cb.stride(2),
        init.stride(0), init.stride(1), final.stride(0), final.stride(1), carry.stride(0), carry.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
        HAS_INIT=initial_states is not None, IEEE=ieee, UPCAST=small, CHUNK=chunk_size,
        BLOCK_M=BM, BLOCK_K=BK, BLOCK_P=BP, BLOCK_N=BN, num_warps=num_warps or (4 if small else 8),
    )
    return y, final
