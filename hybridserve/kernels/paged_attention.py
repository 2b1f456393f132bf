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

from hybridserve.kernels._backend import use_triton


def paged_attention_decode(
    q: torch.Tensor,  # [Bt, Hq, Dh]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    block_tables: torch.Tensor,  # [Bt, max_blocks] int32
    context_lens: torch.Tensor,  # [Bt] int32, valid tokens per sequence
    scale: float,
) -> torch.Tensor:
    """One query token per sequence against its whole context; returns [Bt, Hq, Dh]."""
    args = (q, k_cache, v_cache, block_tables, context_lens, scale)
    if use_triton(q):
        from hybridserve.kernels.paged_attention_triton import paged_attention_decode_triton

        return paged_attention_decode_triton(*args)
    return paged_attention_decode_ref(*args)


def paged_attention_decode_ref(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Torch reference of `paged_attention_decode`, batched over sequences."""
    Bt, Hq, Dh = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    if Bt == 0:
        return q.new_empty(Bt, Hq, Dh)
    max_len = int(context_lens.max())
    pos = torch.arange(max_len, device=q.device)  # [L]
    blocks = block_tables[:, pos // block_size].long().clamp_min(0)  # [Bt, L]
    offsets = (pos % block_size).expand(Bt, max_len)  # [Bt, L]
    k = k_cache[blocks, offsets].float()  # [Bt, L, Hkv, Dh]
    v = v_cache[blocks, offsets].float()
    qg = q.float().view(Bt, Hkv, Hq // Hkv, Dh)  # [Bt, Hkv, R, Dh]
    scores = torch.einsum("bkrd,blkd->bkrl", qg, k) * scale  # [Bt, Hkv, R, L]
    valid = pos[None, :] < context_lens[:, None].long()  # [Bt, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkrl,blkd->bkrd", probs, v)
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

    The torch reference runs on every device (a Triton prefill kernel is not written).
    """
    return paged_attention_prefill_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)


def paged_attention_prefill_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
    """Torch reference of `paged_attention_prefill`; loops over sequences, SDPA inside."""
    T, Hq, Dh = q.shape
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for s, ctx in enumerate(lens):
        start, end = bounds[s], bounds[s + 1]
        q_len = end - start
        if q_len == 0:
            continue
        pos = torch.arange(ctx, device=q.device)
        blocks = block_tables[s, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].float().transpose(0, 1)  # [Hkv, ctx, Dh]
        v = v_cache[blocks, pos % block_size].float().transpose(0, 1)
        qs = q[start:end].float().transpose(0, 1)  # [Hq, q_len, Dh]
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        mask = pos[None, :] <= q_pos[:, None]  # [q_len, ctx]
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:end] = o.transpose(0, 1).to(q.dtype)
    return out


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
