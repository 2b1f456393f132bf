"""Cache bytes per sequence from the architecture alone (no engine, no torch).

bytes(L) = attention layers × 2 (K and V) × kv heads × head dim × kv bytes × L
         + Mamba layers × (conv_dim × (d_conv − 1) × kv bytes + heads × head dim × d_state × state bytes)

The first term grows with context; the second is fixed per sequence. This is
the figure the harness reports and the router prices memory with; the native
engine allocates exactly these tensors (rounded up to whole KV blocks).
"""
from __future__ import annotations

from hybridserve.models.args import ModelArgs

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


def kv_bytes_per_token(args: ModelArgs, kv_bytes: int) -> int:
    return args.num_attention_layers * 2 * args.num_kv_heads * args.head_dim * kv_bytes


def state_bytes_per_seq(args: ModelArgs, conv_bytes: int, ssm_bytes: int) -> int:
    m = args.mamba
    if m is None:
        return 0
    per_layer = m.conv_dim * (m.d_conv - 1) * conv_bytes + m.num_heads * m.head_dim * m.d_state * ssm_bytes
    return args.num_mamba_layers * per_layer


def cache_bytes_per_seq(args: ModelArgs, context: int, kv_bytes: int = 4, ssm_bytes: int | None = None) -> int:
    """Bytes one sequence of `context` tokens holds in cache (KV for attention + Mamba state)."""
    ssm = kv_bytes if ssm_bytes is None else ssm_bytes
    return kv_bytes_per_token(args, kv_bytes) * context + state_bytes_per_seq(args, kv_bytes, ssm)


def max_concurrency(budget_bytes: int, bytes_per_seq: int) -> int:
    """Sequences of that size that fit the budget at once."""
    return int(budget_bytes // bytes_per_seq) if bytes_per_seq else 0
