"""Attention over a paged KV cache: decode (one query per sequence), prefill, and KV writes.

Cache layout: k_cache, v_cache [num_blocks, block_size, Hkv, Dh]. Token i of
sequence b lives at [block_tables[b, i // block_size], i % block_size]. GQA:
query head h reads kv head h // (Hq // Hkv). Softmax in fp32; outputs in q.dtype.
Every op here reads K/V that `write_kv` has already stored, including the
current token's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from hybridserve.kernels import cpu_attention
from hybridserve.kernels._backend import interpreting, lazy_jit, next_pow2, tl, triton, use_triton
from hybridserve.kernels._scratch import scratch


def paged_attention_decode(
    q: torch.Tensor,  # [Bt, Hq, Dh]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    block_tables: torch.Tensor,  # [Bt, max_blocks] int32
    context_lens: torch.Tensor,  # [Bt] int32, valid tokens per sequence
    scale: float,
    *,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """One query token per sequence against its whole context; returns [Bt, Hq, Dh].

    `max_context_len` (optional, a host int >= every context_lens entry) sizes the
    split over the sequence; without it the block-table width bounds it, so no
    device-to-host sync happens either way.
    """
    args = (q, k_cache, v_cache, block_tables, context_lens, scale)
    if use_triton(q):
        return paged_attention_decode_triton(*args, max_context_len=max_context_len)
    if cpu_attention.usable(q, k_cache):
        return cpu_attention.paged_attention_decode_cpu(*args)
    return paged_attention_decode_ref(*args)


@lazy_jit
def _paged_attention_decode_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, part_o_ptr, part_lse_ptr, out_ptr, counters_ptr,
    # sizes
    split_len, scale, R, Dh, Hkv,
    # strides
    q_b, q_h, k_blk, k_off, k_h, v_blk, v_off, v_h, tab_b, po_b, po_h, po_s, pl_b, pl_h, out_b, out_h,
    # meta-parameters
    PAGE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DIRECT: tl.constexpr, FUSED_REDUCE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    # one program: sequence b, kv head kh (all R query heads sharing it), tokens of split sp.
    # Online softmax over BLOCK_N-token tiles gathered through the block table; writes a
    # partial (o, lse) per split, or the final output when there is one split (DIRECT).
    # FUSED_REDUCE: the last split of (b, kh) to finish (an atomic count) merges the partials
    # and resets the count, which saves the reduce launch.
    b = tl.program_id(0)
    kh = tl.program_id(1)
    sp = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    lo = sp * split_len
    if lo < ctx:
        hi = tl.minimum(lo + split_len, ctx)
        r = tl.arange(0, BLOCK_R)
        heads = kh * R + r  # [BLOCK_R]
        d = tl.arange(0, BLOCK_D)
        r_mask = r < R
        d_mask = d < Dh
        q = tl.load(q_ptr + b * q_b + heads[:, None] * q_h + d[None, :], mask=r_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter's dot mishandles bf16
            q = q.to(tl.float32)
        m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_R,), tl.float32)
        acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
            p_mask = pos < hi
            page = tl.load(tables_ptr + b * tab_b + pos // PAGE, mask=p_mask, other=0).to(tl.int64)
            kv_mask = p_mask[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + page[:, None] * k_blk + (pos % PAGE)[:, None] * k_off + kh * k_h + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + page[:, None] * v_blk + (pos % PAGE)[:, None] * v_off + kh * v_h + d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(p_mask[None, :], scores * scale, float("-inf"))  # [BLOCK_R, BLOCK_N]
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        o = acc / l[:, None]
        o_mask = r_mask[:, None] & d_mask[None, :]
        if DIRECT:
            tl.store(out_ptr + b * out_b + heads[:, None] * out_h + d[None, :], o.to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            tl.store(part_o_ptr + b * po_b + heads[:, None] * po_h + sp * po_s + d[None, :], o, mask=o_mask)
            tl.store(part_lse_ptr + b * pl_b + heads * pl_h + sp, m + tl.log(l), mask=r_mask)
            if FUSED_REDUCE:
                tl.debug_barrier()
                counter = counters_ptr + b * Hkv + kh
                n_splits = tl.cdiv(ctx, split_len)
                if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == n_splits - 1:
                    m_all = tl.full((BLOCK_R,), float("-inf"), tl.float32)
                    den = tl.zeros((BLOCK_R,), tl.float32)
                    merged = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
                    for s in range(0, n_splits):  # online merge of the splits' (o, lse)
                        lse = tl.load(part_lse_ptr + b * pl_b + heads * pl_h + s, mask=r_mask, other=0.0, cache_modifier=".cg")
                        o_s = tl.load(part_o_ptr + b * po_b + heads[:, None] * po_h + s * po_s + d[None, :],
                                      mask=o_mask, other=0.0, cache_modifier=".cg")
                        m_new = tl.maximum(m_all, lse)
                        scale_old = tl.exp(m_all - m_new)
                        w = tl.exp(lse - m_new)
                        den = den * scale_old + w
                        merged = merged * scale_old[:, None] + o_s * w[:, None]
                        m_all = m_new
                    tl.store(out_ptr + b * out_b + heads[:, None] * out_h + d[None, :],
                             (merged / den[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
                    tl.atomic_xchg(counter, 0)  # ready for the next call


@lazy_jit
def _paged_attention_reduce_kernel(
    # pointers
    part_o_ptr, part_lse_ptr, lens_ptr, out_ptr,
    # sizes
    split_len, Dh,
    # strides
    po_b, po_h, po_s, pl_b, pl_h, out_b, out_h,
    # meta-parameters
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program: sequence b, query head h; merges the splits' (o, lse) pairs
    b = tl.program_id(0)
    h = tl.program_id(1)
    n_splits = tl.cdiv(tl.load(lens_ptr + b), split_len)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < n_splits
    lse = tl.load(part_lse_ptr + b * pl_b + h * pl_h + s, mask=s_mask, other=float("-inf"))
    w = tl.where(s_mask, tl.exp(lse - tl.max(lse, axis=0)), 0.0)  # [BLOCK_S]
    o = tl.load(part_o_ptr + b * po_b + h * po_h + s[:, None] * po_s + d[None, :], mask=s_mask[:, None] & (d < Dh)[None, :], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * out_b + h * out_h + d, out.to(out_ptr.dtype.element_ty), mask=d < Dh)


_NUM_SMS: dict[int, int] = {}
_COUNTERS: dict[str, torch.Tensor] = {}


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (sequence, kv head), kept per device and re-zeroed by
    the kernel itself. Shared by every call on the device: calls must not overlap (one stream)."""
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1 << 16), device=device, dtype=torch.int32)
        _COUNTERS[key] = buf
    return buf


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def plan_splits(batch_programs: int, max_ctx: int, num_sms: int, block_n: int, min_split: int = 128) -> tuple[int, int]:
    """(num_splits, split_len): split the context until ~4 programs per SM are busy."""
    want = max(1, triton.cdiv(4 * num_sms, max(1, batch_programs)))
    num_splits = max(1, min(want, triton.cdiv(max_ctx, min_split)))
    split_len = triton.cdiv(triton.cdiv(max_ctx, num_splits), block_n) * block_n
    return triton.cdiv(max_ctx, split_len), split_len


def paged_attention_decode_triton(
    q, k_cache, v_cache, block_tables, context_lens, scale, *, max_context_len=None, num_splits=None,
    block_n=None, num_warps=4, fused_reduce=True,
):
    """Triton `paged_attention_decode`: split-K (flash-decoding), merged by the last split of
    each (sequence, kv head) (`fused_reduce`) or by a second kernel."""
    Bt, Hq, Dh = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dim")
    out = torch.empty_like(q)
    if Bt == 0:
        return out
    R = Hq // Hkv
    block_tables, context_lens = block_tables.to(q.device), context_lens.to(q.device)
    block_n = block_n or (64 if Dh <= 128 else 32)
    max_ctx = max_context_len or block_tables.shape[1] * page
    if num_splits is None:
        num_splits, split_len = plan_splits(Bt * Hkv, max_ctx, _num_sms(q.device), block_n)
    else:
        split_len = triton.cdiv(triton.cdiv(max_ctx, num_splits), block_n) * block_n
        num_splits = triton.cdiv(max_ctx, split_len)
    direct = num_splits == 1
    part_o = q.new_empty((Bt, Hq, num_splits, Dh) if not direct else (1, 1, 1, 1), dtype=torch.float32)
    part_lse = q.new_empty((Bt, Hq, num_splits) if not direct else (1, 1, 1), dtype=torch.float32)
    block_d = max(16, next_pow2(Dh))  # the dot's inner dimension: tensor-core tiles need 16
    fused_reduce = fused_reduce and not direct
    counters = _split_counters(q.device, Bt * Hkv) if fused_reduce else part_lse
    _paged_attention_decode_kernel[(Bt, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part_o, part_lse, out, counters,
        split_len, scale, R, Dh, Hkv,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        PAGE=page, BLOCK_R=max(16, next_pow2(R)), BLOCK_N=block_n, BLOCK_D=block_d,
        DIRECT=direct, FUSED_REDUCE=fused_reduce, IEEE=q.dtype == torch.float32, UPCAST=interpreting(),
        num_warps=num_warps,
    )
    if not direct and not fused_reduce:
        _paged_attention_reduce_kernel[(Bt, Hq)](
            part_o, part_lse, context_lens, out,
            split_len, Dh,
            part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_S=next_pow2(num_splits), BLOCK_D=block_d,
        )
    return out


def paged_attention_decode_ref(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Torch reference of `paged_attention_decode`, batched over sequences.

    This is the CPU decode path, so it is written for memory traffic: it gathers whole
    blocks (one index per block, not per token) into reused scratch buffers (fresh
    ones page-fault in every step), and hands SDPA the Hq // Hkv query heads that
    share a kv head as the query rows of that kv head, so K/V are read once per kv
    head (SDPA's `enable_gqa` path with one query row is several times slower).
    """
    Bt, Hq, Dh = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    if Bt == 0:
        return q.new_empty(Bt, Hq, Dh)
    num_blocks = -(-int(context_lens.max()) // block_size)
    flat = block_tables[:, :num_blocks].long().clamp_min(0).reshape(-1)  # [Bt * nb]
    L = num_blocks * block_size
    gathered = (flat.numel(), block_size, Hkv, Dh)
    k = torch.index_select(k_cache, 0, flat, out=scratch("decode_k", gathered, k_cache.dtype, k_cache.device))
    v = torch.index_select(v_cache, 0, flat, out=scratch("decode_v", gathered, v_cache.dtype, v_cache.device))
    k = k.view(Bt, L, Hkv, Dh).transpose(1, 2).float()  # [Bt, Hkv, L, Dh]
    v = v.view(Bt, L, Hkv, Dh).transpose(1, 2).float()
    valid = torch.arange(L, device=q.device)[None, :] < context_lens[:, None].long()  # [Bt, L]
    qg = q.float().view(Bt, Hkv, Hq // Hkv, Dh)  # query head h reads kv head h // (Hq // Hkv)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=valid[:, None, None, :], scale=scale)
    return out.reshape(Bt, Hq, Dh).to(q.dtype)


def paged_attention_prefill(
    q: torch.Tensor,  # [T, Hq, Dh] packed queries
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    cu_seqlens_q: torch.Tensor,  # [S + 1] int64
    context_lens: torch.Tensor,  # [S] int32, context length including the queries
    scale: float,
) -> torch.Tensor:
    """Causal attention for the last q_len_s positions of each sequence; returns [T, Hq, Dh].

    On CPU in fp32 with a head size that is a multiple of 16 (up to 256) each sequence goes to
    the C++ kernel (`cpu_attention.prefill_attention_cpu`): torch's fused CPU attention runs
    its block products through MKL, which takes a generic path on AMD CPUs (60-80 GFLOP/s on
    an EPYC box where the kernel reaches ~150: 2.0x at 2K x 8K, 2.5x at 2K causal, 3.4x at
    512). `HYBRIDSERVE_CPU_PREFILL_ATTENTION=0` (or no compiler) keeps the torch reference,
    which every other device runs (a Triton prefill kernel is not written).
    """
    if cpu_attention.prefill_usable(q):
        out = torch.empty_like(q)
        for start, end, qs, k, v in _sequences(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens):
            out[start:end] = cpu_attention.prefill_attention_cpu(qs[0], k[0], v[0], scale).transpose(0, 1)
        return out
    return paged_attention_prefill_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)


def _sequences(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens):
    """Per sequence with queries: (start, end, qs [1, Hq, q_len, Dh], k/v [1, Hkv, ctx, Dh]),
    gathered from the paged cache into contiguous copies (fp32 on CPU, the input dtype on CUDA)."""
    Dh, block_size, Hkv = q.shape[2], k_cache.shape[1], k_cache.shape[2]
    dtype = q.dtype if q.is_cuda else torch.float32
    bounds = cu_seqlens_q.tolist()
    for s, ctx in enumerate(context_lens.tolist()):
        start, end = bounds[s], bounds[s + 1]
        if end == start:
            continue
        pos = torch.arange(ctx, device=q.device)
        blocks = block_tables[s, pos // block_size].long()
        # [1, H, len, Dh], contiguous: the layout SDPA's fused CPU kernel takes (3-D or strided
        # inputs fall back to the math path, which materialises [Hq, q_len, ctx] scores)
        slots = blocks * block_size + pos % block_size
        k = k_cache.view(-1, Hkv, Dh).index_select(0, slots).to(dtype).transpose(0, 1).contiguous()[None]
        v = v_cache.view(-1, Hkv, Dh).index_select(0, slots).to(dtype).transpose(0, 1).contiguous()[None]
        qs = q[start:end].to(dtype).transpose(0, 1).contiguous()[None]
        yield start, end, qs, k, v


def paged_attention_prefill_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
    """Torch reference of `paged_attention_prefill`; loops over sequences, SDPA inside.

    The causal mask is SDPA's own (`is_causal` when the queries are the whole context).
    When they are a suffix (a later prefill chunk), CPU splits the work into unmasked
    attention to the earlier context and causal attention within the chunk, merged by
    log-sum-exp (`_suffix_attention_cpu`; 1.06-1.17x faster prefill at 2K-8K); other
    devices take SDPA's lower-right causal bias. Long prompts stay on the fused kernels. fp32 on CPU; the input dtype on CUDA
    (the fused kernels keep the softmax in fp32).
    """
    out = torch.empty_like(q)
    for start, end, qs, k, v in _sequences(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens):
        q_len, ctx = end - start, k.shape[2]
        if q_len == ctx:  # the whole context is new: plain causal attention
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale, enable_gqa=True)[0]
        elif _FLASH_CPU is not None and not qs.is_cuda:
            o = _suffix_attention_cpu(qs, k, v, scale)[0]
        else:
            mask = causal_lower_right(q_len, ctx)  # queries are the last q_len positions
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=True)[0]
        out[start:end] = o.transpose(0, 1).to(q.dtype)
    return out


# torch's fused CPU attention, which also returns each row's log-sum-exp (public SDPA does not)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _suffix_attention_cpu(qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last q_len positions of a context (a later prefill chunk), unmasked.

    qs [1, Hq, q_len, Dh], k/v [1, Hkv, ctx, Dh]. A lower-right causal mask costs a
    materialised [q_len, ctx] bias per call and the masked kernel path (about 25 % slower
    at 8K context); instead the queries attend to the earlier context with no mask (a kv
    head's Hq // Hkv query heads stacked as rows of one head, so K/V are not repeated)
    and to their own chunk with plain causal attention, and the two halves are merged
    by their log-sum-exps.
    """
    _, Hq, q_len, Dh = qs.shape
    Hkv, ctx = k.shape[1], k.shape[2]
    group, prefix = Hq // Hkv, ctx - q_len
    o1, l1 = _FLASH_CPU(qs.view(1, Hkv, group * q_len, Dh), k[:, :, :prefix], v[:, :, :prefix],
                        0.0, False, scale=scale)[:2]
    kc, vc = k[:, :, prefix:], v[:, :, prefix:]
    if group > 1:
        kc, vc = kc.repeat_interleave(group, 1), vc.repeat_interleave(group, 1)
    o2, l2 = _FLASH_CPU(qs, kc, vc, 0.0, True, scale=scale)[:2]
    o1, l1 = o1.reshape(1, Hq, q_len, Dh), l1.reshape(1, Hq, q_len)
    m = torch.maximum(l1, l2)
    w1, w2 = (l1 - m).exp_().unsqueeze(-1), (l2 - m).exp_().unsqueeze(-1)
    return o1.mul_(w1).addcmul_(o2, w2).div_(w1 + w2)


def write_kv(
    k: torch.Tensor,  # [T, Hkv, Dh]
    v: torch.Tensor,  # [T, Hkv, Dh]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh], written in place
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh], written in place
    slot_mapping: torch.Tensor,  # [T] int64 = block * block_size + offset, all >= 0
) -> None:
    """Store each token's K/V at its slot; caches must be contiguous."""
    num_blocks, block_size, Hkv, Dh = k_cache.shape
    flat = num_blocks * block_size
    k_cache.view(flat, Hkv, Dh).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(flat, Hkv, Dh).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
