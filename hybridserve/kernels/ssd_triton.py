"""Triton kernels of the SSD chunked scan (`ssd.ssd_scan` holds the contract and the reference).

Chunks never straddle a sequence: sequence s is cut into ceil(L_s / chunk_size)
chunks, listed in a small table (start, end, sequence). Four launches:

1. `_chunk_state_kernel`  dt -> softplus/clamp, chunk-local cumsum of dt*A and its total (stored),
                           and each chunk's own end state  sum_l exp(cum_end - cum_l) dt_l x_l B_l^T
2. `_state_passing_kernel` walks each sequence's chunks in order from its initial
                           state: writes every chunk's start state and the final state
3. `_chunk_cb_kernel`      C_l . B_s per chunk and B/C group (shared by the group's heads)
4. `_chunk_scan_kernel`    y = intra-chunk (CB * decay * dt) @ x + exp(cum) * C @ start_state,
                           + D x, * silu(z)

Buffers: dt/cum [H, T] fp32, chunk totals [H, nchunks] fp32, chunk states [nchunks, H, P, N] fp32, start states
[nchunks, H, P, N] in x.dtype when x is 16-bit (as mamba-ssm keeps them) else fp32,
CB [nchunks, G, chunk, chunk] fp32.
"""

from __future__ import annotations

import torch

from hybridserve.kernels._backend import interpreting, lazy_jit, next_pow2, tl, triton


@lazy_jit
def _chunk_state_kernel(
    # pointers
    x_ptr, dt_ptr, A_ptr, B_ptr, dt_bias_ptr, chunks_ptr, dt_out_ptr, cum_ptr, total_ptr, states_ptr,
    # sizes
    T, nchunks, P, N, heads_per_group, dt_min, dt_max,
    # strides
    x_t, x_h, dt_t, B_t, B_g, st_c, st_h, st_p,
    # meta-parameters
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # one program: head h, state tile [p-block, n-block], chunk c
    n_pb = tl.cdiv(P, BLOCK_P)
    n_nb = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    h = pid // (n_pb * n_nb)
    pb = (pid // n_nb) % n_pb
    nb = pid % n_nb
    c = tl.program_id(1)
    g = h // heads_per_group
    start = tl.load(chunks_ptr + c)
    length = tl.load(chunks_ptr + nchunks + c) - start
    start = start.to(tl.int64)  # chunk-base pointers in 64 bits, offsets inside a chunk in 32
    x_c = x_ptr + start * x_t
    dt_c = dt_ptr + start * dt_t
    B_c = B_ptr + start * B_t
    dt_out_c = dt_out_ptr + h * T + start
    cum_c = cum_ptr + h * T + start
    A = tl.load(A_ptr + h).to(tl.float32)
    bias = 0.0
    if HAS_DT_BIAS:
        bias = tl.load(dt_bias_ptr + h).to(tl.float32)
    writes_dt = (pb == 0) & (nb == 0)

    # pass 1: the chunk's total log-decay
    l_all = tl.arange(0, CHUNK)
    dt_all = tl.load(dt_c + l_all * dt_t + h, mask=l_all < length, other=0.0).to(tl.float32) + bias
    if DT_SOFTPLUS:
        dt_all = tl.where(dt_all <= 20.0, tl.log(1.0 + tl.exp(dt_all)), dt_all)
    dt_all = tl.minimum(tl.maximum(dt_all, dt_min), dt_max)
    total = tl.sum(tl.where(l_all < length, dt_all * A, 0.0), axis=0)
    if writes_dt:
        tl.store(total_ptr + h * nchunks + c, total)

    # pass 2: accumulate sum_l (exp(total - cum_l) dt_l x_l)^T B_l over blocks of BLOCK_L tokens
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
    carry = total * 0.0
    for l0 in range(0, CHUNK, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)  # [BLOCK_L] positions in the chunk
        t_mask = l < length
        dt = tl.load(dt_c + l * dt_t + h, mask=t_mask, other=0.0).to(tl.float32) + bias
        if DT_SOFTPLUS:
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        dt = tl.where(t_mask, tl.minimum(tl.maximum(dt, dt_min), dt_max), 0.0)
        cum = carry + tl.cumsum(dt * A, axis=0)
        carry += tl.sum(dt * A, axis=0)
        if writes_dt:
            tl.store(dt_out_c + l, dt, mask=t_mask)
            tl.store(cum_c + l, cum, mask=t_mask)
        scale = tl.where(t_mask, tl.exp(total - cum) * dt, 0.0)  # [BLOCK_L]
        xt = tl.load(x_c + l[:, None] * x_t + h * x_h + p[None, :], mask=t_mask[:, None] & (p < P)[None, :], other=0.0)
        Bt = tl.load(B_c + l[:, None] * B_t + g * B_g + n[None, :], mask=t_mask[:, None] & (n < N)[None, :], other=0.0)
        xs = xt.to(tl.float32) * scale[:, None]  # [BLOCK_L, BLOCK_P]
        if UPCAST:
            Bt = Bt.to(tl.float32)
        else:
            xs = xs.to(Bt.dtype)
        if IEEE:
            acc += tl.dot(tl.trans(xs), Bt, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(xs), Bt)
    out = states_ptr + c.to(tl.int64) * st_c + h * st_h + p[:, None] * st_p + n[None, :]
    tl.store(out, acc, mask=(p < P)[:, None] & (n < N)[None, :])


@lazy_jit
def _state_passing_kernel(
    # pointers
    states_ptr, total_ptr, seq_chunks_ptr, init_ptr, start_states_ptr, final_ptr,
    # sizes
    nchunks, PN,
    # strides
    st_c, st_h, ss_c, ss_h, init_s, init_h, fin_s, fin_h,
    # meta-parameters
    HAS_INIT: tl.constexpr, BLOCK: tl.constexpr,
):
    # one program: BLOCK elements of the flattened [P * N] state of head h in sequence s
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    h = tl.program_id(1)
    s = tl.program_id(2)
    mask = e < PN
    if HAS_INIT:
        state = tl.load(init_ptr + s * init_s + h * init_h + e, mask=mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), tl.float32)
    c0 = tl.load(seq_chunks_ptr + s).to(tl.int64)  # int64 loop bounds: c * stride may pass 2**31
    c1 = tl.load(seq_chunks_ptr + s + 1).to(tl.int64)
    # the next chunk's local state and decay are loaded one step ahead, so the loads
    # of the serial walk overlap instead of each waiting a full memory latency
    nxt_local = tl.load(states_ptr + c0 * st_c + h * st_h + e, mask=mask & (c0 < c1), other=0.0)
    nxt_total = tl.load(total_ptr + h * nchunks + c0, mask=c0 < c1, other=0.0)
    for c in range(c0, c1):
        local = nxt_local
        decay = tl.exp(nxt_total)
        more = c + 1 < c1
        nxt_local = tl.load(states_ptr + (c + 1) * st_c + h * st_h + e, mask=mask & more, other=0.0)
        nxt_total = tl.load(total_ptr + h * nchunks + c + 1, mask=more, other=0.0)
        tl.store(start_states_ptr + c * ss_c + h * ss_h + e, state.to(start_states_ptr.dtype.element_ty), mask=mask)
        state = state * decay + local
    tl.store(final_ptr + s * fin_s + h * fin_h + e, state, mask=mask)


@lazy_jit
def _chunk_cb_kernel(
    # pointers
    B_ptr, C_ptr, chunks_ptr, cb_ptr,
    # sizes
    nchunks, N,
    # strides
    B_t, B_g, C_t, C_g, cb_c, cb_g, cb_m,
    # meta-parameters
    IEEE: tl.constexpr, UPCAST: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # one program: tile [m-block, k-block] of C B^T for group g in chunk c (causal tiles only)
    n_kb = CHUNK // BLOCK_K
    mb = tl.program_id(0) // n_kb
    kb = tl.program_id(0) % n_kb
    g = tl.program_id(1)
    c = tl.program_id(2)
    start = tl.load(chunks_ptr + c)
    length = tl.load(chunks_ptr + nchunks + c) - start
    B_c = B_ptr + start.to(tl.int64) * B_t
    C_c = C_ptr + start.to(tl.int64) * C_t
    if (kb * BLOCK_K <= mb * BLOCK_M + BLOCK_M - 1) & (mb * BLOCK_M < length):
        m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            Cm = tl.load(C_c + m[:, None] * C_t + g * C_g + n[None, :], mask=(m < length)[:, None] & (n < N)[None, :], other=0.0)
            Bk = tl.load(B_c + k[:, None] * B_t + g * B_g + n[None, :], mask=(k < length)[:, None] & (n < N)[None, :], other=0.0)
            if UPCAST:
                Cm = Cm.to(tl.float32)
                Bk = Bk.to(tl.float32)
            if IEEE:
                acc += tl.dot(Cm, tl.trans(Bk), input_precision="ieee")
            else:
                acc += tl.dot(Cm, tl.trans(Bk))
        tl.store(cb_ptr + c.to(tl.int64) * cb_c + g * cb_g + m[:, None] * cb_m + k[None, :], acc)


@lazy_jit
def _chunk_scan_kernel(
    # pointers
    x_ptr, z_ptr, D_ptr, C_ptr, cb_ptr, dt_out_ptr, cum_ptr, start_states_ptr, chunks_ptr, y_ptr,
    # sizes
    T, nchunks, P, N, heads_per_group,
    # strides
    x_t, x_h, z_t, z_h, C_t, C_g, cb_c, cb_g, cb_m, ss_c, ss_h, ss_p, y_t, y_h,
    # meta-parameters
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # one program: output rows [m-block] of chunk c, head h, head-dim block [p-block]
    n_pb = tl.cdiv(P, BLOCK_P)
    h = tl.program_id(0) // n_pb
    pb = tl.program_id(0) % n_pb
    c = tl.program_id(1) // (CHUNK // BLOCK_M)
    mb = tl.program_id(1) % (CHUNK // BLOCK_M)
    g = h // heads_per_group
    start = tl.load(chunks_ptr + c)
    length = tl.load(chunks_ptr + nchunks + c) - start
    start = start.to(tl.int64)  # chunk-base pointers in 64 bits, offsets inside a chunk in 32
    x_c = x_ptr + start * x_t
    z_c = z_ptr + start * z_t
    y_c = y_ptr + start * y_t
    C_c = C_ptr + start * C_t
    cum_c = cum_ptr + h * T + start
    dt_c = dt_out_ptr + h * T + start
    m0 = mb * BLOCK_M
    if m0 < length:
        m = m0 + tl.arange(0, BLOCK_M)  # positions in the chunk
        m_mask = m < length
        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < P
        n = tl.arange(0, BLOCK_N)
        cum_m = tl.load(cum_c + m, mask=m_mask, other=0.0)

        # the incoming state's share: exp(cum_m) * C_m . state^T
        Cm = tl.load(C_c + m[:, None] * C_t + g * C_g + n[None, :], mask=m_mask[:, None] & (n < N)[None, :], other=0.0)
        S = tl.load(
            start_states_ptr + c.to(tl.int64) * ss_c + h * ss_h + p[None, :] * ss_p + n[:, None],
            mask=(n < N)[:, None] & p_mask[None, :], other=0.0,
        )  # [BLOCK_N, BLOCK_P]
        if UPCAST:
            Cm = Cm.to(tl.float32)
            S = S.to(tl.float32)
        else:
            S = S.to(Cm.dtype)
        if IEEE:
            acc = tl.dot(Cm, S, input_precision="ieee")
        else:
            acc = tl.dot(Cm, S)
        acc = acc * tl.exp(cum_m)[:, None]

        # the chunk's own tokens: sum_{k <= m} CB[m, k] exp(cum_m - cum_k) dt_k x_k
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


def tile_sizes(blocks: dict | None, chunk: int, P: int, N: int, small: bool) -> tuple[int, ...]:
    """(BLOCK_L, BLOCK_M, BLOCK_K, BLOCK_P, BLOCK_N) from defaults and `blocks` overrides.

    Compiled for a GPU every dot dimension is at least 16 (tensor-core tiles); the
    interpreter (`small`) takes any power of two, which keeps CPU tests fast.
    """
    lo = 1 if small else 16
    if chunk < lo:
        raise ValueError(f"chunk_size={chunk}: the GPU kernels need chunk_size >= {lo}")
    bl = blocks or {}
    default = 16 if small else 64
    inner = [max(lo, min(bl.get(key, default), chunk)) for key in ("l", "m", "k")]
    BP = max(lo, bl.get("p", min(next_pow2(P), default)))
    return (*inner, BP, max(lo, next_pow2(N)))


_CHUNK_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}


def chunk_table(cu_seqlens: torch.Tensor | None, T: int, chunk: int, device: torch.device,
                cuts: list[int] | None = None):
    """(chunks [3, nchunks] int32 = start/end/seq, seq_chunks [S + 1] int32, nchunks).

    Cached for the single-sequence case; with cu_seqlens it reads them on the host once.
    `cuts` (packed offsets) also start chunks, so the state passing writes the state there.
    """
    key = (T, chunk, str(device))
    if cu_seqlens is None and not cuts and key in _CHUNK_TABLES:
        return _CHUNK_TABLES[key]
    cu = torch.tensor([0, T]) if cu_seqlens is None else cu_seqlens.detach().to("cpu", torch.int64)
    if cuts:
        return _cut_chunk_table(cu.tolist(), chunk, set(cuts), device)
    lens = cu[1:] - cu[:-1]
    per_seq = (lens + chunk - 1) // chunk  # [S]
    seq_chunks = torch.cat([torch.zeros(1, dtype=torch.int64), per_seq.cumsum(0)])
    nchunks = int(seq_chunks[-1])
    seq = torch.repeat_interleave(torch.arange(len(lens)), per_seq)
    starts = cu[seq] + (torch.arange(nchunks) - seq_chunks[seq]) * chunk
    ends = torch.minimum(starts + chunk, cu[seq + 1])
    table = torch.stack([starts, ends, seq]).to(device=device, dtype=torch.int32)
    result = (table, seq_chunks.to(device=device, dtype=torch.int32), nchunks)
    if cu_seqlens is None:
        _CHUNK_TABLES[key] = result
    return result


def _cut_chunk_table(bounds: list[int], chunk: int, cuts: set[int], device: torch.device):
    from hybridserve.kernels.ssd import chunk_bounds

    rows, seq_chunks = [], [0]
    for s in range(len(bounds) - 1):
        spans = chunk_bounds(bounds[s], bounds[s + 1], chunk, cuts)
        rows += [(a, b, s) for a, b in spans]
        seq_chunks.append(len(rows))
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3).t().contiguous()
    return (table.to(device=device, dtype=torch.int32),
            torch.tensor(seq_chunks, dtype=torch.int32, device=device), len(rows))


def ssd_scan_triton(
    x, dt, A, B, C, D=None, *, chunk_size=256, z=None, dt_bias=None, dt_softplus=True,
    dt_limit=(0.0, float("inf")), initial_states=None, cu_seqlens=None, blocks=None, state_offsets=None,
):
    """Triton `ssd_scan`; `blocks` = dict(l=, m=, k=, p=) overrides tile sizes (tests, tuning).

    `state_offsets` start chunks, so the states there are the start states the state
    passing already writes (kept in x.dtype when x is 16-bit, as the scan itself uses them)."""
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
    table, seq_chunks, nchunks = chunk_table(cu_seqlens, T, chunk_size, dev, state_offsets)
    S = seq_chunks.shape[0] - 1
    y = torch.empty_like(x)
    if initial_states is not None:
        initial_states = initial_states.to(torch.float32).contiguous()
    if nchunks == 0:
        final = torch.zeros(S, H, P, N, device=dev, dtype=torch.float32)
        return y, (initial_states.clone() if initial_states is not None else final)
    final = torch.empty(S, H, P, N, device=dev, dtype=torch.float32)

    small = interpreting()
    BL, BM, BK, BP, BN = tile_sizes(blocks, chunk_size, P, N, small)
    ieee = x.dtype == torch.float32
    upcast = small
    state_dtype = x.dtype if x.element_size() == 2 else torch.float32

    dt_out = torch.empty(H, T, device=dev, dtype=torch.float32)
    cum = torch.empty(H, T, device=dev, dtype=torch.float32)
    total = torch.empty(H, nchunks, device=dev, dtype=torch.float32)
    states = torch.empty(nchunks, H, P, N, device=dev, dtype=torch.float32)
    start_states = torch.empty(nchunks, H, P, N, device=dev, dtype=state_dtype)
    cb = torch.empty(nchunks, G, chunk_size, chunk_size, device=dev, dtype=torch.float32)

    _chunk_state_kernel[(H * triton.cdiv(P, BP), nchunks)](
        x, dt, A, B, dt_bias if dt_bias is not None else A, table, dt_out, cum, total, states,
        T, nchunks, P, N, H // G, float(dt_limit[0]), float(dt_limit[1]),
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1),
        states.stride(0), states.stride(1), states.stride(2),
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, IEEE=ieee, UPCAST=upcast,
        CHUNK=chunk_size, BLOCK_L=BL, BLOCK_P=BP, BLOCK_N=BN, num_warps=4 if small else 8,
    )
    block = min(next_pow2(P * N), 512)
    init = initial_states if initial_states is not None else final
    _state_passing_kernel[(triton.cdiv(P * N, block), H, S)](
        states, total, seq_chunks, init, start_states, final,
        nchunks, P * N,
        states.stride(0), states.stride(1), start_states.stride(0), start_states.stride(1),
        init.stride(0), init.stride(1), final.stride(0), final.stride(1),
        HAS_INIT=initial_states is not None, BLOCK=block,
    )
    _chunk_cb_kernel[((chunk_size // BM) * (chunk_size // BK), G, nchunks)](
        B, C, table, cb,
        nchunks, N,
        B.stride(0), B.stride(1), C.stride(0), C.stride(1), cb.stride(0), cb.stride(1), cb.stride(2),
        IEEE=ieee, UPCAST=upcast, CHUNK=chunk_size, BLOCK_M=BM, BLOCK_K=BK, BLOCK_N=min(BN, 64),
    )
    zz = z if z is not None else x
    _chunk_scan_kernel[(H * triton.cdiv(P, BP), nchunks * (chunk_size // BM))](
        x, zz, D if D is not None else A, C, cb, dt_out, cum, start_states, table, y,
        T, nchunks, P, N, H // G,
        x.stride(0), x.stride(1), zz.stride(0), zz.stride(1), C.stride(0), C.stride(1),
        cb.stride(0), cb.stride(1), cb.stride(2), start_states.stride(0), start_states.stride(1),
        start_states.stride(2), y.stride(0), y.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, IEEE=ieee, UPCAST=upcast, CHUNK=chunk_size,
        BLOCK_M=BM, BLOCK_K=BK, BLOCK_P=BP, BLOCK_N=BN, num_warps=4,
    )
    if state_offsets is None:
        return y, final
    return y, final, _start_states_at(table, start_states, state_offsets)


def _start_states_at(table: torch.Tensor, start_states: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """[K, H, P, N] fp32: the start state of the chunk beginning at each offset."""
    starts, seqs = table[0].tolist(), table[2].tolist()
    first = {o: i for i, o in enumerate(starts) if i and seqs[i - 1] == seqs[i]}  # not a sequence's start
    missing = [o for o in offsets if o not in first]
    if missing:
        raise ValueError(f"state_offsets {missing[:4]} are not strictly inside a sequence")
    idx = torch.tensor([first[o] for o in offsets], dtype=torch.int64, device=start_states.device)
    return start_states.index_select(0, idx).float()
