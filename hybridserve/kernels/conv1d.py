"""Depthwise causal conv1d for Mamba-2: prefill over packed sequences, and the decode update.

Contract (prefill, `causal_conv1d`): for each sequence s, the K-1 inputs before
its first token are conv_states[state_indices[s]] when has_initial_state[s],
else zeros; out_t = act(bias + sum_k weight[:, k] * input[t - K + 1 + k]).
Afterwards conv_states[state_indices[s]] holds the last K-1 inputs of
(previous state ++ the sequence's tokens), also for sequences shorter than K-1.
Decode (`causal_conv1d_update`) is the same for one token per sequence.
Math in fp32; outputs in x.dtype; states stored in their own dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridserve.kernels import cpu_mamba
from hybridserve.kernels._backend import lazy_jit, next_pow2, tl, triton, use_triton

ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d(
    x: torch.Tensor,  # [T, Dc] packed tokens
    weight: torch.Tensor,  # [Dc, K]
    bias: torch.Tensor | None = None,  # [Dc]
    *,
    conv_states: torch.Tensor,  # [num_slots, Dc, K-1], updated in place
    cu_seqlens: torch.Tensor,  # [S + 1] int64
    state_indices: torch.Tensor,  # [S] int64
    has_initial_state: torch.Tensor,  # [S] bool
    activation: str | None = "silu",
) -> torch.Tensor:
    """Causal depthwise conv over packed sequences; returns [T, Dc] in x.dtype."""
    _check_activation(activation)
    kwargs = dict(
        conv_states=conv_states, cu_seqlens=cu_seqlens, state_indices=state_indices,
        has_initial_state=has_initial_state, activation=activation,
    )
    if use_triton(x):
        return causal_conv1d_triton(x, weight, bias, **kwargs)
    if cpu_mamba.causal_conv1d_usable(x, weight, conv_states):
        return cpu_mamba.causal_conv1d_cpu(x, weight, bias, **kwargs)
    return causal_conv1d_ref(x, weight, bias, **kwargs)


def causal_conv1d_update(
    x: torch.Tensor,  # [Bt, Dc] one token per sequence
    conv_states: torch.Tensor,  # [num_slots, Dc, K-1], shifted in place
    weight: torch.Tensor,  # [Dc, K]
    bias: torch.Tensor | None = None,  # [Dc]
    *,
    state_indices: torch.Tensor,  # [Bt] int64
    activation: str | None = "silu",
) -> torch.Tensor:
    """One decode step of the causal conv; returns [Bt, Dc] in x.dtype."""
    _check_activation(activation)
    if use_triton(x):
        return causal_conv1d_update_triton(
            x, conv_states, weight, bias, state_indices=state_indices, activation=activation
        )
    return causal_conv1d_update_ref(
        x, conv_states, weight, bias, state_indices=state_indices, activation=activation
    )


def _check_activation(activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {ACTIVATIONS}")


def _activate(out: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(out) if activation in ("silu", "swish") else out


def causal_conv1d_ref(
    x, weight, bias=None, *, conv_states, cu_seqlens, state_indices, has_initial_state,
    activation="silu",
):
    """Torch reference of `causal_conv1d`; loops over sequences.

    It is the CPU prefill path too, so it works in the tokens' own [T, Dc] layout: the previous
    K-1 inputs are prepended as rows and the K taps are K multiply-adds over shifted row
    ranges, each a contiguous pass. Transposing to F.conv1d's [Dc, T] layout and back cost
    more than the convolution (small hybrid's layer, Dc = 1152, K = 4, one thread: 20.3 ms for
    2,048 tokens that way, 6.9 ms this way; 4.0 and 1.8 ms for 512; the same sums).
    """
    T, Dc = x.shape
    K = weight.shape[1]
    w = weight.float().t()  # [K, Dc]: row k is tap k of every channel
    b = bias.float() if bias is not None else None
    out = torch.empty(T, Dc, device=x.device, dtype=x.dtype)
    bounds = cu_seqlens.tolist()
    slots = state_indices.tolist()
    has_init = has_initial_state.tolist()
    for s, slot in enumerate(slots):
        start, end = bounds[s], bounds[s + 1]
        L = end - start
        if has_init[s]:
            prev = conv_states[slot].float().t()  # [K-1, Dc]
        else:
            prev = torch.zeros(K - 1, Dc, device=x.device, dtype=torch.float32)
        seq = torch.cat([prev, x[start:end].float()], dim=0)  # [K-1+L, Dc]
        y = seq[0:L] * w[0] if b is None else torch.addcmul(b, seq[0:L], w[0])
        for k in range(1, K):
            y.addcmul_(seq[k:k + L], w[k])
        out[start:end] = _activate(y, activation).to(x.dtype)
        if K > 1:
            conv_states[slot] = seq[seq.shape[0] - (K - 1):].t().to(conv_states.dtype)
    return out


def causal_conv1d_update_ref(x, conv_states, weight, bias=None, *, state_indices, activation="silu"):
    """Torch reference of `causal_conv1d_update`, batched over rows.

    Written for the CPU decode path: index_select / index_copy_ (much cheaper than
    advanced-index get/put), and one multiply-add per tap instead of a reduction over
    the short last axis, which CPU torch does slowly.
    """
    hist = conv_states.index_select(0, state_indices)  # [Bt, Dc, K-1], a copy
    w = weight.float()
    y = x.float() * w[:, -1]  # [Bt, Dc]
    for k in range(hist.shape[2]):
        y.addcmul_(hist[:, :, k], w[:, k])
    if bias is not None:
        y += bias.float()
    if hist.shape[2]:  # width-1 convs keep no history
        shifted = torch.empty_like(hist)
        shifted[:, :, :-1] = hist[:, :, 1:]
        shifted[:, :, -1] = x
        conv_states.index_copy_(0, state_indices, shifted)
    return _activate(y, activation).to(x.dtype)


@lazy_jit
def _causal_conv1d_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, states_ptr, seq_of_token_ptr, cu_ptr, slots_ptr, has_init_ptr, out_ptr,
    # sizes
    T, Dc,
    # strides
    x_t, w_d, st_slot, st_d, out_t,
    # meta-parameters
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program: tokens [t0, t0 + BLOCK_T) x channels [d0, d0 + BLOCK_D); a tap that falls
    # before its sequence's first token reads the slot's conv state (or zero)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    t_mask = t < T
    d_mask = d < Dc
    seq = tl.load(seq_of_token_ptr + t, mask=t_mask, other=0)
    start = tl.load(cu_ptr + seq, mask=t_mask, other=0)
    slot = tl.load(slots_ptr + seq, mask=t_mask, other=0).to(tl.int64)
    has_init = tl.load(has_init_ptr + seq, mask=t_mask, other=0) != 0

    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        src = t - (K - 1) + k  # [BLOCK_T] input position read by tap k
        m_x = (t_mask & (src >= start))[:, None] & d_mask[None, :]
        xv = tl.load(x_ptr + src[:, None].to(tl.int64) * x_t + d[None, :], mask=m_x, other=0.0)
        wk = tl.load(w_ptr + d * w_d + k, mask=d_mask, other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * wk[None, :]
    # only tiles holding one of a sequence's first K-1 tokens read conv states
    if tl.sum((t_mask & (t - start < K - 1) & has_init).to(tl.int32), axis=0) > 0:
        for k in tl.static_range(K - 1):
            src = t - (K - 1) + k
            j = src - start + (K - 1)  # column of the conv state holding that input
            m_s = (t_mask & (src < start) & has_init)[:, None] & d_mask[None, :]
            sv = tl.load(states_ptr + slot[:, None] * st_slot + d[None, :] * st_d + j[:, None], mask=m_s, other=0.0)
            wk = tl.load(w_ptr + d * w_d + k, mask=d_mask, other=0.0).to(tl.float32)
            acc += sv.to(tl.float32) * wk[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    o_mask = t_mask[:, None] & d_mask[None, :]
    tl.store(out_ptr + t[:, None].to(tl.int64) * out_t + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=o_mask)


@lazy_jit
def _conv_state_save_kernel(
    # pointers
    x_ptr, states_ptr, cu_ptr, slots_ptr, has_init_ptr,
    # sizes
    Dc,
    # strides
    x_t, st_slot, st_d,
    # meta-parameters
    KM1: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program: sequence s x channels [d0, d0 + BLOCK_D); new state column j holds input
    # position L - (K-1) + j, which is a token of s, or an older column of the previous state
    s = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    j = tl.arange(0, BLOCK_J)  # [BLOCK_J]
    start = tl.load(cu_ptr + s)
    L = tl.load(cu_ptr + s + 1) - start
    slot = tl.load(slots_ptr + s).to(tl.int64)
    has_init = tl.load(has_init_ptr + s) != 0
    pos = L - KM1 + j  # [BLOCK_J]
    mask = (d < Dc)[:, None] & (j < KM1)[None, :]
    m_x = mask & (pos >= 0)[None, :]
    xv = tl.load(x_ptr + (start + pos)[None, :].to(tl.int64) * x_t + d[:, None], mask=m_x, other=0.0)
    tile = states_ptr + slot * st_slot + d[:, None] * st_d  # row base per channel
    m_s = mask & (pos < 0)[None, :] & has_init
    sv = tl.load(tile + (j + L)[None, :], mask=m_s, other=0.0)
    new = tl.where((pos >= 0)[None, :], xv.to(tl.float32), sv.to(tl.float32))
    tl.store(tile + j[None, :], new.to(states_ptr.dtype.element_ty), mask=mask)


def causal_conv1d_triton(
    x, weight, bias=None, *, conv_states, cu_seqlens, state_indices, has_initial_state, activation="silu",
    block_t=32, block_d=64,
):
    """Triton `causal_conv1d`: one conv kernel, then one kernel that saves the new states."""
    T, Dc = x.shape
    K = weight.shape[1]
    S = state_indices.shape[0]
    if x.stride(1) != 1 or conv_states.stride(2) != 1 or weight.stride(1) != 1:
        raise ValueError("x, weight and conv_states need a contiguous last dim")
    out = torch.empty(T, Dc, device=x.device, dtype=x.dtype)
    if T == 0:
        return out
    dev = x.device  # index tensors may come from the host
    cu = cu_seqlens.to(device=dev, dtype=torch.int32)
    state_indices = state_indices.to(dev)
    lens = cu[1:] - cu[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(S, device=x.device, dtype=torch.int32), lens, output_size=T)
    has_init = has_initial_state.to(device=dev, dtype=torch.int8)
    grid = (triton.cdiv(T, block_t), triton.cdiv(Dc, block_d))
    _causal_conv1d_kernel[grid](
        x, weight, bias if bias is not None else weight, conv_states, seq_of_token, cu, state_indices, has_init, out,
        T, Dc,
        x.stride(0), weight.stride(0), conv_states.stride(0), conv_states.stride(1), out.stride(0),
        K=K, HAS_BIAS=bias is not None, SILU=activation is not None, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    if K > 1:
        _conv_state_save_kernel[(S, triton.cdiv(Dc, block_d))](
            x, conv_states, cu, state_indices, has_init,
            Dc,
            x.stride(0), conv_states.stride(0), conv_states.stride(1),
            KM1=K - 1, BLOCK_J=next_pow2(K - 1), BLOCK_D=block_d,
        )
    return out


@lazy_jit
def _causal_conv1d_update_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, states_ptr, slots_ptr, out_ptr,
    # sizes
    Dc,
    # strides
    x_b, w_d, st_slot, st_d, out_b,
    # meta-parameters
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program: batch row b x channels [d0, d0 + BLOCK_D); taps 0..K-2 come from the state
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_mask = d < Dc
    slot = tl.load(slots_ptr + b).to(tl.int64)
    row = states_ptr + slot * st_slot + d * st_d  # [BLOCK_D] pointers to column 0
    xv = tl.load(x_ptr + b * x_b + d, mask=d_mask, other=0.0).to(tl.float32)
    acc = xv * tl.load(w_ptr + d * w_d + (K - 1), mask=d_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    for k in tl.static_range(K - 1):
        col = tl.load(row + k, mask=d_mask, other=0.0)
        acc += col.to(tl.float32) * tl.load(w_ptr + d * w_d + k, mask=d_mask, other=0.0).to(tl.float32)
        if k > 0:
            tl.store(row + (k - 1), col, mask=d_mask)  # shift left by one
    if K > 1:
        tl.store(row + (K - 2), xv.to(states_ptr.dtype.element_ty), mask=d_mask)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + b * out_b + d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


@lazy_jit
def _causal_conv1d_update_flat_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, states_ptr, slots_ptr, out_ptr,
    # sizes
    Dc,
    # strides
    x_b, st_slot, out_b,
    # meta-parameters
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # one program: batch row b x channels [d0, d0 + BLOCK_D). The state rows of those channels
    # are one contiguous run of BLOCK_D * (K-1) values: read and written as a flat vector (wide
    # accesses), shifted and reduced per channel in registers with gathers
    KM1: tl.constexpr = K - 1
    b = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_D
    slot = tl.load(slots_ptr + b).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)  # [BLOCK_D] channel in the block
    d_mask = d0 + dd < Dc
    f = tl.arange(0, BLOCK_F)  # [BLOCK_F] flat index: channel f // KM1, tap f % KM1
    ch = tl.minimum(f // KM1, BLOCK_D - 1)
    tap = f % KM1
    f_mask = f < tl.minimum(BLOCK_D, Dc - d0) * KM1  # one bound, so the mask stays vector-friendly
    run = states_ptr + slot * st_slot + d0 * KM1
    old = tl.load(run + f, mask=f_mask, other=0.0)
    xv = tl.load(x_ptr + b * x_b + d0 + dd, mask=d_mask, other=0.0)
    new = tl.where(tap == KM1 - 1, tl.gather(xv, ch, 0), tl.gather(old, tl.minimum(f + 1, BLOCK_F - 1), 0))
    tl.store(run + f, new, mask=f_mask)

    wi = tl.arange(0, BLOCK_W)  # the block's weights, [BLOCK_D, K] row-major, as one flat run
    w = tl.load(w_ptr + d0 * K + wi, mask=wi < tl.minimum(BLOCK_D, Dc - d0) * K, other=0.0).to(tl.float32)
    prod = old.to(tl.float32) * tl.gather(w, ch * K + tap, 0)  # [BLOCK_F] tap products
    acc = xv.to(tl.float32) * tl.gather(w, dd * K + KM1, 0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d0 + dd, mask=d_mask, other=0.0).to(tl.float32)
    for k in tl.static_range(KM1):
        acc += tl.gather(prod, dd * KM1 + k, 0)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + b * out_b + d0 + dd, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


def causal_conv1d_update_triton(
    x, conv_states, weight, bias=None, *, state_indices, activation="silu", block_d=256, num_warps=4, flat=True,
):
    """Triton `causal_conv1d_update`; `block_d`, `num_warps` and `flat` are tuning knobs.

    `flat` reads/writes each state run (and the weights) as one contiguous vector
    (needs contiguous [Dc, K-1] state rows and [Dc, K] weights); otherwise one
    strided access per tap.
    """
    Bt, Dc = x.shape
    K = weight.shape[1]
    if x.stride(1) != 1 or conv_states.stride(2) != 1 or weight.stride(1) != 1:
        raise ValueError("x, weight and conv_states need a contiguous last dim")
    out = torch.empty_like(x)
    if Bt == 0:
        return out
    state_indices = state_indices.to(x.device)
    b = bias if bias is not None else weight
    meta = dict(K=K, HAS_BIAS=bias is not None, SILU=activation is not None, BLOCK_D=block_d, num_warps=num_warps)
    grid = (Bt, triton.cdiv(Dc, block_d))
    if flat and K > 1 and conv_states.stride(1) == K - 1 and weight.stride(0) == K:
        _causal_conv1d_update_flat_kernel[grid](
            x, weight, b, conv_states, state_indices, out,
            Dc,
            x.stride(0), conv_states.stride(0), out.stride(0),
            BLOCK_F=next_pow2(block_d * (K - 1)), BLOCK_W=next_pow2(block_d * K), **meta,
        )
        return out
    _causal_conv1d_update_kernel[grid](
        x, weight, b, conv_states, state_indices, out,
        Dc,
        x.stride(0), weight.stride(0), conv_states.stride(0), conv_states.stride(1), out.stride(0),
        **meta,
    )
    return out
