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

from hybridserve.kernels._backend import use_triton

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
        from hybridserve.kernels.conv1d_triton import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, **kwargs)
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
        from hybridserve.kernels.conv1d_triton import causal_conv1d_update_triton

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
    """Torch reference of `causal_conv1d`; loops over sequences."""
    T, Dc = x.shape
    K = weight.shape[1]
    w = weight.float()[:, None, :]  # [Dc, 1, K]
    b = bias.float() if bias is not None else None
    out = torch.empty(T, Dc, device=x.device, dtype=x.dtype)
    bounds = cu_seqlens.tolist()
    slots = state_indices.tolist()
    has_init = has_initial_state.tolist()
    for s, slot in enumerate(slots):
        start, end = bounds[s], bounds[s + 1]
        if has_init[s]:
            prev = conv_states[slot].float()  # [Dc, K-1]
        else:
            prev = torch.zeros(Dc, K - 1, device=x.device, dtype=torch.float32)
        seq = torch.cat([prev, x[start:end].float().t()], dim=1)  # [Dc, K-1+L]
        y = F.conv1d(seq[None], w, b, groups=Dc)[0]  # [Dc, L]
        out[start:end] = _activate(y, activation).t().to(x.dtype)
        if K > 1:
            conv_states[slot] = seq[:, seq.shape[1] - (K - 1) :].to(conv_states.dtype)
    return out


def causal_conv1d_update_ref(x, conv_states, weight, bias=None, *, state_indices, activation="silu"):
    """Torch reference of `causal_conv1d_update`, batched over rows."""
    window = torch.cat([conv_states[state_indices].float(), x.float()[:, :, None]], dim=2)  # [Bt, Dc, K]
    y = (window * weight.float()).sum(-1)  # [Bt, Dc]
    if bias is not None:
        y = y + bias.float()
    conv_states[state_indices] = window[:, :, 1:].to(conv_states.dtype)
    return _activate(y, activation).to(x.dtype)
